//! A table's definition: what the catalogue records (`TableDef`), what a user chooses at
//! creation (`TableOptions`, `FsyncSetting`) and what a user is shown (`TableInfo`), and the
//! rules for table names.
//!
//! Invariant: a `TableDef` read from the catalogue is validated before use (untrusted bytes).

use heapgrid_heap::FsyncPolicy;
use serde::{Deserialize, Serialize};

use crate::error::GridError;
use crate::limits::{TABLE_NAME_BYTES_MAX, TABLE_SHARDS_MAX};

/// A fsync policy as stored in the catalogue. On the wire: append-only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FsyncSetting {
    Always,
    EveryMs(u32),
    Never,
}

impl From<FsyncSetting> for FsyncPolicy {
    fn from(f: FsyncSetting) -> Self {
        match f {
            FsyncSetting::Always => FsyncPolicy::Always,
            FsyncSetting::EveryMs(ms) => FsyncPolicy::EveryMs(ms),
            FsyncSetting::Never => FsyncPolicy::Never,
        }
    }
}

impl From<FsyncPolicy> for FsyncSetting {
    fn from(f: FsyncPolicy) -> Self {
        match f {
            FsyncPolicy::Always => FsyncSetting::Always,
            FsyncPolicy::EveryMs(ms) => FsyncSetting::EveryMs(ms),
            FsyncPolicy::Never => FsyncSetting::Never,
        }
    }
}

/// Options of one table, fixed at creation. On the wire: fields fixed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableOptions {
    /// Shards (by key hash); 0 means 1.
    pub shards: u32,
    /// fsync policy; `None` takes the grid's default.
    pub fsync: Option<FsyncSetting>,
}

/// What a user sees of a table. On the wire: fields fixed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableInfo {
    pub name: String,
    pub shards: u32,
    pub fsync: FsyncSetting,
}

/// A table as recorded in the catalogue (internal: it names the table's directory).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableDef {
    pub name: String,
    pub shards: u32,
    pub fsync: FsyncSetting,
    /// This incarnation's directory under `<dir>/tables/`: unique per creation, so a table
    /// dropped and created again never sees (or deletes) the other one's files.
    pub dir: String,
}

impl TableDef {
    /// Checks a definition read from the catalogue (untrusted bytes).
    pub fn validate(&self) -> Result<(), GridError> {
        valid_name(&self.name)?;
        let dir_ok = self.dir.starts_with(&self.name)
            && self.dir.len() <= TABLE_NAME_BYTES_MAX + 17
            && self.dir.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !(1..=TABLE_SHARDS_MAX).contains(&self.shards) || !dir_ok {
            return Err(GridError::Corrupted(format!("catalogue entry for {:?} is invalid", self.name)));
        }
        Ok(())
    }

    /// What a user is shown.
    pub fn info(&self) -> TableInfo {
        TableInfo { name: self.name.clone(), shards: self.shards, fsync: self.fsync }
    }
}

/// A directory name no earlier incarnation of `name` used.
pub fn incarnation_dir(name: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    format!("{name}-{:016x}", nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(48))
}

/// Checks a table (or procedure module) name.
pub fn valid_name(name: &str) -> Result<(), GridError> {
    let ok = !name.is_empty()
        && name.len() <= TABLE_NAME_BYTES_MAX
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(GridError::Invalid(format!(
            "table name {name:?}: use 1 to {TABLE_NAME_BYTES_MAX} ASCII letters, digits, '_' or '-'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_at_and_past_the_limit() {
        assert!(valid_name(&"a".repeat(TABLE_NAME_BYTES_MAX)).is_ok());
        assert!(valid_name(&"a".repeat(TABLE_NAME_BYTES_MAX + 1)).is_err());
        assert!(valid_name("").is_err() && valid_name("a/b").is_err());
        let def = |shards| TableDef {
            name: "t".into(),
            shards,
            fsync: FsyncSetting::Never,
            dir: incarnation_dir("t"),
        };
        assert!(def(TABLE_SHARDS_MAX).validate().is_ok());
        assert!(def(TABLE_SHARDS_MAX + 1).validate().is_err());
        assert!(def(0).validate().is_err());
    }
}
