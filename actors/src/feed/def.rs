//! A feed's definition: what the catalogue records (`FeedDef`), what a user chooses at creation
//! (`FeedOptions`, `Retention`) and what a user is shown (`FeedInfo`).
//!
//! Invariant: a `FeedDef` read from the catalogue is validated before use (untrusted bytes).

use serde::{Deserialize, Serialize};

use super::{FeedState, SegmentPolicy};
use crate::error::GridError;
use crate::table::def::{FsyncSetting, valid_name};

/// Most records in one segment (a dropped segment is deleted in `CUT_CHUNK` batches).
pub const SEGMENT_RECORDS_MAX: u64 = 1 << 24;
/// Records per segment when the creator does not say.
pub const SEGMENT_RECORDS_DEFAULT: u64 = 65_536;

/// What retention keeps. Only sealed segments are ever dropped. On the wire: fields fixed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Keep at most this many segments (the open one counts), dropping the oldest sealed ones.
    pub keep_segments: Option<u32>,
    /// Drop a sealed segment once it was sealed this long ago.
    pub max_age_ms: Option<u64>,
}

/// Options of one feed, fixed at creation. On the wire: fields fixed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedOptions {
    /// Records per segment; 0 means `SEGMENT_RECORDS_DEFAULT`.
    pub segment_records: u64,
    /// Seal the open segment once it is this old, even if it is not full (so age-based
    /// retention works on a quiet feed).
    pub roll_after_ms: Option<u64>,
    pub retention: Retention,
    /// Shards; 0 means 1. Only 1 is supported (a feed is one chain).
    pub shards: u32,
    /// fsync policy; `None` takes the grid's default.
    pub fsync: Option<FsyncSetting>,
}

/// A feed as recorded in the catalogue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedDef {
    pub name: String,
    pub segment_records: u64,
    pub roll_after_ms: Option<u64>,
    pub retention: Retention,
    pub fsync: FsyncSetting,
    /// This incarnation's directory under `<dir>/feeds/` (unique per creation).
    pub dir: String,
}

/// What a user sees of a feed: its definition and its container. On the wire: fields fixed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedInfo {
    pub name: String,
    pub segment_records: u64,
    pub roll_after_ms: Option<u64>,
    pub retention: Retention,
    pub fsync: FsyncSetting,
    pub state: FeedState,
}

impl FeedDef {
    /// A new feed's definition from the creator's options.
    pub fn new(
        name: &str,
        opts: &FeedOptions,
        default_fsync: FsyncSetting,
        dir: String,
    ) -> Result<FeedDef, GridError> {
        valid_name(name)?;
        if opts.shards > 1 {
            return Err(GridError::Invalid(
                "a feed has one shard (one chain); sharded feeds are not supported yet".into(),
            ));
        }
        let segment_records =
            if opts.segment_records == 0 { SEGMENT_RECORDS_DEFAULT } else { opts.segment_records };
        let def = FeedDef {
            name: name.into(),
            segment_records,
            roll_after_ms: opts.roll_after_ms,
            retention: opts.retention.clone(),
            fsync: opts.fsync.unwrap_or(default_fsync),
            dir,
        };
        def.check().map_err(GridError::Invalid)?;
        Ok(def)
    }

    fn check(&self) -> Result<(), String> {
        if !(1..=SEGMENT_RECORDS_MAX).contains(&self.segment_records) {
            return Err(format!(
                "segment_records is {}; use 1 to {SEGMENT_RECORDS_MAX}",
                self.segment_records
            ));
        }
        if self.roll_after_ms == Some(0) || self.retention.max_age_ms == Some(0) {
            return Err("roll_after_ms and max_age_ms must be above 0".into());
        }
        if self.retention.keep_segments == Some(0) {
            return Err("keep_segments must be at least 1 (the open segment counts)".into());
        }
        Ok(())
    }

    /// Checks a definition read from the catalogue (untrusted bytes).
    pub fn validate(&self) -> Result<(), GridError> {
        valid_name(&self.name)?;
        let dir_ok = self.dir.starts_with(&self.name)
            && self.dir.len() <= crate::limits::TABLE_NAME_BYTES_MAX + 17
            && self.dir.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !dir_ok || self.check().is_err() {
            return Err(GridError::Corrupted(format!("catalogue entry for feed {:?} is invalid", self.name)));
        }
        Ok(())
    }

    pub fn policy(&self) -> SegmentPolicy {
        SegmentPolicy {
            segment_records: self.segment_records,
            roll_after_ms: self.roll_after_ms,
            retention: self.retention.clone(),
        }
    }

    /// What a user is shown, with the container as it is now.
    pub fn info(&self, state: FeedState) -> FeedInfo {
        FeedInfo {
            name: self.name.clone(),
            segment_records: self.segment_records,
            roll_after_ms: self.roll_after_ms,
            retention: self.retention.clone(),
            fsync: self.fsync,
            state,
        }
    }
}
