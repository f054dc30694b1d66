//! Feeds: linked chains of records (KVS's feeds) — the pure state machine of one feed shard
//! (`FeedShard`, this module), its definition (`def`), its actor (`actor`), its supervisor
//! (`supervisor`) and the handle callers use (`runtime`).
//!
//! `FeedShard` owns one `Heap` and has one typed method per operation: `append`, `get`,
//! `remove`, `read`, `read_back`, the cursor operations, `trim`, `cut`, `rotate`,
//! `set_version` and `maintain` (roll by age, retention). It is synchronous, takes the time
//! as an argument, and knows nothing of actors or the wire.
//!
//! Keys and values in the shard's heap (integers big-endian in keys, so the B+tree orders
//! records by id; every value is postcard after a format byte of 1 unless noted):
//!
//! ```text
//! "M"                 FeedMeta: next_id, top, bottom, count, version, trimmed_below, open
//!                     (the open segment: first_id, appended, version, opened_ms)
//! "R" u64-BE id       a record: its value's Value::encode bytes (no format byte of ours)
//! "S" u64-BE first_id a sealed segment: last_id, version, opened_ms, sealed_ms
//! "C" name            a named cursor: the id it has consumed up to (0: before everything)
//! ```
//!
//! `prev` and `next` are not stored: they are a record's neighbours in id order, found by a
//! B+tree range lookup. Removing a record deletes one key, so its neighbours relink in the same
//! batch that updates the container, a link can never dangle, and an append never rewrites a
//! record of a sealed segment.
//!
//! Invariant: every operation that changes the feed is one `WriteBatch` (one op-log record), so
//! the container, the records and the segments change together or not at all, across a crash.
//! `trim`, `cut` and retention delete in chunks of `CUT_CHUNK` records; each chunk is such a
//! batch and leaves a consistent feed.
//! Invariant: ids strictly increase along the chain and are never reused: `next_id` only grows,
//! and a caller-supplied id must be at least `next_id` (or name an existing record: `IdExists`,
//! or success when the value is identical).
//! Invariant: every id below `trimmed_below` was dropped by retention (`trim`, `cut`, segment
//! drops); a read or cursor positioned below it gets `Trimmed`, never a silent jump.
//! Invariant: nothing reads the clock: time comes in as `now_ms`.

pub mod actor;
pub mod def;
pub mod runtime;
pub mod supervisor;

use std::ops::Bound;

use heapgrid_heap::{Heap, WriteBatch};
use serde::{Deserialize, Serialize};

use crate::error::GridError;
use crate::value::Value;

pub use def::{FeedDef, FeedInfo, FeedOptions, Retention};

/// Most records one read returns.
pub const FEED_READ_MAX: u32 = 10_000;
/// Longest cursor name, in bytes.
pub const CURSOR_NAME_BYTES_MAX: usize = 128;
/// Records deleted per batch by `trim`, `cut` and retention.
pub const CUT_CHUNK: u64 = 4096;

const META_KEY: &[u8] = b"M";
const RECORD: u8 = b'R';
const SEGMENT: u8 = b'S';
const CURSOR: u8 = b'C';
const FORMAT: u8 = 1;

/// Where a read starts. On the wire: append-only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pos {
    /// Before id 1: everything ever appended. `Trimmed` once retention has dropped anything.
    Start,
    /// The top at call time: only records appended later.
    End,
    /// After this id (records with larger ids).
    After(u64),
    /// Before the oldest record still kept: the caller's opt-in to skip what retention dropped.
    FirstAvailable,
}

/// A record as read. `prev`/`next` are its older and newer neighbours (0: none).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FeedRecord {
    pub id: u64,
    pub prev: u64,
    pub next: u64,
    /// The schema version the value was appended under.
    pub version: u32,
    pub value: Value,
}

/// Records read, and the position to pass to the next read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReadResult {
    pub records: Vec<FeedRecord>,
    /// Forwards: the last id returned (or the resolved start if none). Backwards: the lowest.
    pub next: u64,
}

/// A named cursor as reported: the id it has consumed up to, and how many records lie after it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorInfo {
    pub name: String,
    pub position: u64,
    pub lag: u64,
}

/// One segment as reported (newest first in `FeedState::segments`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentInfo {
    pub first_id: u64,
    /// `None` for the open segment.
    pub last_id: Option<u64>,
    pub version: u32,
    pub opened_ms: u64,
    pub sealed_ms: Option<u64>,
}

/// The container and its segments.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedState {
    pub top: u64,
    pub bottom: u64,
    pub count: u64,
    pub next_id: u64,
    pub version: u32,
    /// Every id below this was dropped by retention.
    pub trimmed_below: u64,
    /// Newest first.
    pub segments: Vec<SegmentInfo>,
}

/// An append's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub id: u64,
    /// The op-log record (0: nothing written: an idempotent retry of an existing id).
    pub lsn: u64,
    /// This append filled its segment, which is now sealed.
    pub sealed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct OpenSegment {
    first_id: u64,
    appended: u64,
    version: u32,
    opened_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct FeedMeta {
    next_id: u64,
    top: u64,
    bottom: u64,
    count: u64,
    version: u32,
    trimmed_below: u64,
    open: Option<OpenSegment>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct SealedSegment {
    last_id: u64,
    version: u32,
    opened_ms: u64,
    sealed_ms: u64,
}

fn record_key(id: u64) -> [u8; 9] {
    let mut k = [RECORD; 9];
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

fn segment_key(first: u64) -> [u8; 9] {
    let mut k = [SEGMENT; 9];
    k[1..].copy_from_slice(&first.to_be_bytes());
    k
}

fn cursor_key(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(CURSOR);
    k.extend_from_slice(name.as_bytes());
    k
}

fn id_of(key: &[u8]) -> Result<u64, GridError> {
    match key.get(1..).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
        Some(b) => Ok(u64::from_be_bytes(b)),
        None => Err(GridError::Corrupted(format!("feed key {key:?} is not 9 bytes"))),
    }
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![FORMAT];
    // Encoding our own plain structs into a Vec cannot fail.
    out.extend(postcard::to_allocvec(v).unwrap_or_default());
    out
}

fn decode<T: for<'a> Deserialize<'a>>(what: &str, bytes: &[u8]) -> Result<T, GridError> {
    match bytes.split_first() {
        Some((&FORMAT, rest)) => {
            postcard::from_bytes(rest).map_err(|e| GridError::Corrupted(format!("feed {what}: {e}")))
        }
        _ => Err(GridError::Corrupted(format!("feed {what}: unknown format byte"))),
    }
}

fn decode_value(id: u64, bytes: &[u8]) -> Result<Value, GridError> {
    Value::decode(bytes).map_err(|e| GridError::Corrupted(format!("feed record {id}: {e}")))
}

fn valid_cursor(name: &str) -> Result<(), GridError> {
    if name.is_empty() || name.len() > CURSOR_NAME_BYTES_MAX {
        return Err(GridError::Invalid(format!("cursor name: use 1 to {CURSOR_NAME_BYTES_MAX} bytes")));
    }
    Ok(())
}

fn check_n(n: u32) -> Result<(), GridError> {
    if n > FEED_READ_MAX {
        return Err(GridError::LimitExceeded {
            what: "records per read".into(),
            got: n as u64,
            max: FEED_READ_MAX as u64,
        });
    }
    Ok(())
}

/// The segment settings a feed shard follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentPolicy {
    pub segment_records: u64,
    pub roll_after_ms: Option<u64>,
    pub retention: Retention,
}

/// The container stored in `heap` (a new feed's, if none), checked.
fn read_meta(heap: &Heap) -> Result<FeedMeta, GridError> {
    let meta = match heap.get_ref(META_KEY)? {
        Some(b) => decode::<FeedMeta>("container", &b)?,
        None => {
            FeedMeta { next_id: 1, top: 0, bottom: 0, count: 0, version: 1, trimmed_below: 1, open: None }
        }
    };
    if meta.next_id == 0
        || meta.top >= meta.next_id
        || meta.bottom > meta.top
        || meta.trimmed_below > meta.next_id
    {
        return Err(GridError::Corrupted(format!("feed container is inconsistent: {meta:?}")));
    }
    Ok(meta)
}

/// The pure state machine of one feed shard.
pub struct FeedShard {
    heap: Heap,
    meta: FeedMeta,
    policy: SegmentPolicy,
    deferred_log: bool,
}

impl FeedShard {
    /// Reads (or, for a new heap, starts) the feed in `heap`.
    pub fn open(heap: Heap, policy: SegmentPolicy) -> Result<FeedShard, GridError> {
        let meta = read_meta(&heap)?;
        Ok(FeedShard { heap, meta, policy, deferred_log: false })
    }

    /// Reads the container again from the heap (after records were applied to the heap
    /// directly: a replica's, replicated from its primary).
    pub fn reload(&mut self) -> Result<(), GridError> {
        self.meta = read_meta(&self.heap)?;
        Ok(())
    }

    /// With `true`, writes only queue their op-log records (`Heap::apply_deferred`); the owner
    /// must `flush_log` before acknowledging them.
    pub fn set_deferred_log(&mut self, on: bool) {
        self.deferred_log = on;
    }

    pub fn len(&self) -> u64 {
        self.meta.count
    }

    pub fn is_empty(&self) -> bool {
        self.meta.count == 0
    }

    pub fn top(&self) -> u64 {
        self.meta.top
    }

    /// The highest id ever issued (0: none).
    pub fn last_issued(&self) -> u64 {
        self.meta.next_id - 1
    }

    fn apply(&mut self, batch: &WriteBatch, meta: FeedMeta) -> Result<u64, GridError> {
        let lsn =
            if self.deferred_log { self.heap.apply_deferred(batch)? } else { self.heap.apply(batch)? };
        self.meta = meta;
        Ok(lsn)
    }

    /// Links a new record at the top. `id`: the caller's (at least `next_id`; an existing id
    /// is `IdExists`, or success without a write if the stored value is identical), else the
    /// next one. The append that fills the open segment seals it.
    pub fn append(&mut self, value: &Value, id: Option<u64>, now_ms: u64) -> Result<Appended, GridError> {
        let bytes = value.encode().map_err(|e| GridError::Value(e.to_string()))?;
        let id = match id {
            None => self.meta.next_id,
            Some(0) | Some(u64::MAX) => return Err(GridError::Invalid("a record id is 1 to 2^64-2".into())),
            Some(id) if id < self.meta.next_id => {
                return match self.heap.get_ref(&record_key(id))? {
                    Some(stored) if *stored == *bytes => Ok(Appended { id, lsn: 0, sealed: false }),
                    Some(_) => Err(GridError::IdExists { id }),
                    None => Err(GridError::Invalid(format!(
                        "id {id} is below the feed's next id {} (ids only increase)",
                        self.meta.next_id
                    ))),
                };
            }
            Some(id) => id,
        };
        if id == u64::MAX {
            return Err(GridError::LimitExceeded { what: "feed id".into(), got: id, max: u64::MAX - 1 });
        }
        let mut meta = self.meta.clone();
        let mut batch = WriteBatch::new();
        let mut open = match meta.open.take() {
            Some(o) if o.version == meta.version => o,
            stale => {
                if let Some(o) = stale {
                    // Not reachable through `set_version` (which seals); kept so a segment is
                    // never lost: seal it in this batch.
                    let s = SealedSegment {
                        last_id: meta.next_id - 1,
                        version: o.version,
                        opened_ms: o.opened_ms,
                        sealed_ms: now_ms,
                    };
                    batch.put(&segment_key(o.first_id), &encode(&s))?;
                }
                OpenSegment { first_id: id, appended: 0, version: meta.version, opened_ms: now_ms }
            }
        };
        batch.put(&record_key(id), &bytes)?;
        open.appended += 1;
        meta.top = id;
        if meta.bottom == 0 {
            meta.bottom = id;
        }
        meta.count += 1;
        meta.next_id = id + 1;
        let sealed = open.appended >= self.policy.segment_records;
        if sealed {
            let s = SealedSegment {
                last_id: id,
                version: open.version,
                opened_ms: open.opened_ms,
                sealed_ms: now_ms,
            };
            batch.put(&segment_key(open.first_id), &encode(&s))?;
        } else {
            meta.open = Some(open);
        }
        batch.put(META_KEY, &encode(&meta))?;
        let lsn = self.apply(&batch, meta)?;
        Ok(Appended { id, lsn, sealed })
    }

    /// The record `id` with its neighbours, found without walking the chain.
    pub fn get(&self, id: u64) -> Result<Option<FeedRecord>, GridError> {
        let Some(bytes) = self.heap.get_ref(&record_key(id))? else { return Ok(None) };
        Ok(Some(FeedRecord {
            id,
            prev: self.neighbour(id, false)?,
            next: self.neighbour(id, true)?,
            version: self.segment_span(id)?.2,
            value: decode_value(id, &bytes)?,
        }))
    }

    /// The id of the nearest record above (`newer`) or below `id` (0: none).
    fn neighbour(&self, id: u64, newer: bool) -> Result<u64, GridError> {
        let e = if newer {
            self.heap
                .range::<[u8], _>((
                    Bound::Excluded(&record_key(id)[..]),
                    Bound::Included(&record_key(u64::MAX)[..]),
                ))
                .next()
        } else {
            self.heap
                .range::<[u8], _>((Bound::Included(&record_key(0)[..]), Bound::Excluded(&record_key(id)[..])))
                .next_back()
        };
        match e {
            Some(e) => id_of(e?.0),
            None => Ok(0),
        }
    }

    /// Unlinks and deletes record `id`: its neighbours point past it, `top`/`bottom` move if it
    /// was an end, `count - 1`. A missing id is `NoSuchRecord`.
    pub fn remove(&mut self, id: u64) -> Result<u64, GridError> {
        if id == 0 || !self.heap.contains(&record_key(id))? {
            return Err(GridError::NoSuchRecord { id });
        }
        let mut meta = self.meta.clone();
        meta.count -= 1;
        if meta.top == id {
            meta.top = self.neighbour(id, false)?;
        }
        if meta.bottom == id {
            meta.bottom = self.neighbour(id, true)?;
        }
        if meta.count == 0 {
            meta.top = 0;
            meta.bottom = 0;
        }
        let mut batch = WriteBatch::new();
        batch.delete(&record_key(id))?;
        batch.put(META_KEY, &encode(&meta))?;
        self.apply(&batch, meta)
    }

    /// The id a read starting at `pos` reads after, or `Trimmed` if retention dropped records
    /// it would have returned.
    pub fn resolve(&self, pos: Pos) -> Result<u64, GridError> {
        let after = match pos {
            Pos::Start => 0,
            Pos::End => self.meta.next_id - 1,
            Pos::After(id) => id,
            Pos::FirstAvailable => return Ok(self.first_available() - 1),
        };
        if after.saturating_add(1) < self.meta.trimmed_below {
            return Err(GridError::Trimmed { first_available: self.first_available() });
        }
        Ok(after)
    }

    /// The oldest id a reader can still get (the next id to be issued if the feed is empty).
    pub fn first_available(&self) -> u64 {
        if self.meta.bottom != 0 { self.meta.bottom } else { self.meta.next_id }
    }

    /// At most `n` records with ids above `after`, ascending.
    pub fn read_after(&self, after: u64, n: u32) -> Result<ReadResult, GridError> {
        let records = self.records(after.saturating_add(1), u64::MAX, n, false)?;
        let next = records.last().map_or(after, |r| r.id);
        Ok(ReadResult { records, next })
    }

    /// `read_after(resolve(pos), n)`.
    pub fn read(&self, pos: Pos, n: u32) -> Result<ReadResult, GridError> {
        let after = self.resolve(pos)?;
        self.read_after(after, n)
    }

    /// At most `n` records with ids below `before` (`None`: from the top), newest first.
    pub fn read_back(&self, before: Option<u64>, n: u32) -> Result<ReadResult, GridError> {
        let before = before.unwrap_or(u64::MAX);
        let records = self.records(0, before, n, true)?;
        let next = records.last().map_or(before, |r| r.id);
        Ok(ReadResult { records, next })
    }

    /// At most `n` records with ids in `[lo, hi)` (ascending, or descending if `back`), linked.
    fn records(&self, lo: u64, hi: u64, n: u32, back: bool) -> Result<Vec<FeedRecord>, GridError> {
        check_n(n)?;
        let mut records = Vec::new();
        if n > 0 && lo < hi {
            let (lo, hi) = (record_key(lo), record_key(hi));
            let range = self.heap.range::<[u8], _>((Bound::Included(&lo[..]), Bound::Excluded(&hi[..])));
            let entries: Box<dyn Iterator<Item = _>> =
                if back { Box::new(range.rev()) } else { Box::new(range) };
            for e in entries.take(n as usize) {
                let (k, v) = e?;
                let id = id_of(k)?;
                records.push(FeedRecord { id, prev: 0, next: 0, version: 0, value: decode_value(id, &v)? });
            }
        }
        self.link(&mut records, back)?;
        Ok(records)
    }

    /// Fills `prev`, `next` and `version` of consecutive records (ascending, or descending if
    /// `back`): neighbours inside the run from each other, the two ends by lookup; versions by
    /// segment, looked up once per segment met.
    fn link(&self, records: &mut [FeedRecord], back: bool) -> Result<(), GridError> {
        let n = records.len();
        if n == 0 {
            return Ok(());
        }
        for i in 0..n {
            let (older, newer) = if back { (i + 1, i.wrapping_sub(1)) } else { (i.wrapping_sub(1), i + 1) };
            let id = records[i].id;
            records[i].prev = match records.get(older) {
                Some(r) => r.id,
                None => self.neighbour(id, false)?,
            };
            records[i].next = match records.get(newer) {
                Some(r) => r.id,
                None => self.neighbour(id, true)?,
            };
        }
        let mut span: Option<(u64, u64, u32)> = None;
        for r in records.iter_mut() {
            match span {
                Some((lo, hi, v)) if r.id >= lo && r.id <= hi => r.version = v,
                _ => {
                    let (lo, hi, v) = self.segment_span(r.id)?;
                    r.version = v;
                    span = Some((lo, hi, v));
                }
            }
        }
        Ok(())
    }

    /// The id range and version of the segment holding `id`.
    fn segment_span(&self, id: u64) -> Result<(u64, u64, u32), GridError> {
        if let Some(o) = &self.meta.open
            && id >= o.first_id
        {
            return Ok((o.first_id, u64::MAX, o.version));
        }
        let found = self
            .heap
            .range::<[u8], _>((Bound::Included(&segment_key(0)[..]), Bound::Included(&segment_key(id)[..])))
            .next_back();
        match found {
            Some(e) => {
                let (k, v) = e?;
                let s = decode::<SealedSegment>("segment", &v)?;
                Ok((id_of(k)?, s.last_id, s.version))
            }
            None => Ok((0, 0, self.meta.version)),
        }
    }

    /// Records with ids in `(after, ∞)`: a cursor's lag. Counted by walking keys (O(lag)).
    pub fn count_after(&self, after: u64) -> Result<u64, GridError> {
        if after < self.meta.bottom {
            return Ok(self.meta.count);
        }
        if after >= self.meta.top {
            return Ok(0);
        }
        let lo = record_key(after + 1);
        let hi = record_key(u64::MAX);
        let mut n = 0;
        for e in self.heap.range::<[u8], _>((Bound::Included(&lo[..]), Bound::Included(&hi[..]))) {
            e?;
            n += 1;
        }
        Ok(n)
    }

    /// Cursor `name`'s position, if it exists.
    pub fn cursor_pos(&self, name: &str) -> Result<Option<u64>, GridError> {
        valid_cursor(name)?;
        match self.heap.get_ref(&cursor_key(name))? {
            Some(b) => Ok(Some(decode::<u64>("cursor", &b)?)),
            None => Ok(None),
        }
    }

    /// Sets (creating) cursor `name` at `pos` (resolved now: `End` is the top at this call).
    pub fn cursor_set(&mut self, name: &str, pos: Pos) -> Result<(CursorInfo, u64), GridError> {
        valid_cursor(name)?;
        let at = self.resolve(pos)?;
        let mut batch = WriteBatch::new();
        batch.put(&cursor_key(name), &encode(&at))?;
        let meta = self.meta.clone();
        let lsn = self.apply(&batch, meta)?;
        Ok((CursorInfo { name: name.into(), position: at, lag: self.count_after(at)? }, lsn))
    }

    /// Cursor `name`'s position and lag.
    pub fn cursor_get(&self, name: &str) -> Result<CursorInfo, GridError> {
        let at = self.cursor_pos(name)?.ok_or_else(|| GridError::NoSuchCursor(name.into()))?;
        Ok(CursorInfo { name: name.into(), position: at, lag: self.count_after(at)? })
    }

    /// Every cursor, by name.
    pub fn cursors(&self) -> Result<Vec<CursorInfo>, GridError> {
        let lo = [CURSOR];
        let hi = [CURSOR + 1];
        let mut out = Vec::new();
        for e in self.heap.range::<[u8], _>((Bound::Included(&lo[..]), Bound::Excluded(&hi[..]))) {
            let (k, v) = e?;
            let at = decode::<u64>("cursor", &v)?;
            let name = String::from_utf8_lossy(&k[1..]).into_owned();
            out.push(CursorInfo { name, position: at, lag: self.count_after(at)? });
        }
        Ok(out)
    }

    /// Reads at most `n` records after cursor `name` and moves it past them, in one batch.
    /// A cursor retention has passed gets `Trimmed` (move it with `cursor_set`).
    pub fn cursor_read(&mut self, name: &str, n: u32) -> Result<(ReadResult, u64), GridError> {
        let at = self.cursor_pos(name)?.ok_or_else(|| GridError::NoSuchCursor(name.into()))?;
        let r = self.read(Pos::After(at), n)?;
        if r.next == at {
            return Ok((r, 0));
        }
        let mut batch = WriteBatch::new();
        batch.put(&cursor_key(name), &encode(&r.next))?;
        let meta = self.meta.clone();
        let lsn = self.apply(&batch, meta)?;
        Ok((r, lsn))
    }

    /// Deletes cursor `name`; whether it existed.
    pub fn cursor_delete(&mut self, name: &str) -> Result<(bool, u64), GridError> {
        if self.cursor_pos(name)?.is_none() {
            return Ok((false, 0));
        }
        let mut batch = WriteBatch::new();
        batch.delete(&cursor_key(name))?;
        let meta = self.meta.clone();
        Ok((true, self.apply(&batch, meta)?))
    }

    /// Drops every record with an id below `before` (retention: later reads there get
    /// `Trimmed`), in batches of `CUT_CHUNK`. Returns the records dropped and the last LSN.
    pub fn cut(&mut self, before: u64) -> Result<(u64, u64), GridError> {
        let (mut dropped, mut lsn) = (0, 0);
        loop {
            let lo = record_key(0);
            let hi = record_key(before);
            let mut ids = Vec::new();
            for e in self
                .heap
                .range::<[u8], _>((Bound::Included(&lo[..]), Bound::Excluded(&hi[..])))
                .take(CUT_CHUNK as usize)
            {
                ids.push(id_of(e?.0)?);
            }
            let done = (ids.len() as u64) < CUT_CHUNK;
            // This chunk's ceiling: everything below it is gone after the batch.
            let upto = if done { before } else { ids.last().map_or(before, |l| l + 1) };
            let mut meta = self.meta.clone();
            if upto <= meta.trimmed_below && ids.is_empty() {
                break;
            }
            let mut batch = WriteBatch::new();
            for id in &ids {
                batch.delete(&record_key(*id))?;
            }
            meta.count -= ids.len() as u64;
            meta.trimmed_below = meta.trimmed_below.max(upto.min(meta.next_id));
            if meta.count == 0 {
                meta.top = 0;
                meta.bottom = 0;
            } else if !ids.is_empty() {
                meta.bottom = self.neighbour(*ids.last().unwrap_or(&0), true)?;
            }
            // Segments wholly below the cut go; the one it splits starts at the cut.
            let seg_hi = segment_key(upto);
            let mut segs = Vec::new();
            for e in self
                .heap
                .range::<[u8], _>((Bound::Included(&segment_key(0)[..]), Bound::Excluded(&seg_hi[..])))
            {
                let (k, v) = e?;
                segs.push((id_of(k)?, decode::<SealedSegment>("segment", &v)?));
            }
            for (first, s) in segs {
                batch.delete(&segment_key(first))?;
                if s.last_id >= upto {
                    batch.put(&segment_key(upto), &encode(&s))?;
                }
            }
            if let Some(o) = meta.open.as_mut()
                && o.first_id < upto
            {
                o.first_id = upto;
                if o.first_id >= meta.next_id {
                    // Cut whole: no id left in its range, so no segment (the next append opens one).
                    meta.open = None;
                }
            }
            batch.put(META_KEY, &encode(&meta))?;
            lsn = self.apply(&batch, meta)?;
            dropped += ids.len() as u64;
            if done {
                break;
            }
        }
        Ok((dropped, lsn))
    }

    /// Keeps the newest `keep` records, dropping the rest as retention.
    pub fn trim(&mut self, keep: u64) -> Result<(u64, u64), GridError> {
        if self.meta.count <= keep {
            return Ok((0, 0));
        }
        let before = if keep == 0 {
            self.meta.next_id
        } else {
            let lo = record_key(0);
            let hi = record_key(u64::MAX);
            let nth = self
                .heap
                .range::<[u8], _>((Bound::Included(&lo[..]), Bound::Included(&hi[..])))
                .rev()
                .nth(keep as usize - 1);
            match nth {
                Some(e) => id_of(e?.0)?,
                None => return Ok((0, 0)),
            }
        };
        self.cut(before)
    }

    /// Seals the open segment, if it holds any record: the next append opens a new one.
    pub fn rotate(&mut self, now_ms: u64) -> Result<u64, GridError> {
        let Some(o) = self.meta.open.clone() else { return Ok(0) };
        let mut meta = self.meta.clone();
        meta.open = None;
        let mut batch = WriteBatch::new();
        // The open segment's range ends at the highest id issued in it; one with no id left
        // in its range (all cut) just closes.
        let last_id = meta.next_id - 1;
        if last_id >= o.first_id {
            let s = SealedSegment { last_id, version: o.version, opened_ms: o.opened_ms, sealed_ms: now_ms };
            batch.put(&segment_key(o.first_id), &encode(&s))?;
        }
        batch.put(META_KEY, &encode(&meta))?;
        self.apply(&batch, meta)
    }

    /// Changes the feed's schema version: the open segment is sealed, and the next append
    /// starts a segment of the new version. Old records are never rewritten.
    pub fn set_version(&mut self, version: u32, now_ms: u64) -> Result<u64, GridError> {
        if version == self.meta.version {
            return Ok(0);
        }
        let lsn = self.rotate(now_ms)?;
        let mut meta = self.meta.clone();
        meta.version = version;
        let mut batch = WriteBatch::new();
        batch.put(META_KEY, &encode(&meta))?;
        Ok(self.apply(&batch, meta)?.max(lsn))
    }

    /// The supervisor's duties at `now_ms`: seal the open segment once it is `roll_after_ms`
    /// old; then drop the oldest sealed segments beyond `keep_segments`, and sealed segments
    /// sealed more than `max_age_ms` ago. Returns the records dropped and the last LSN.
    pub fn maintain(&mut self, now_ms: u64) -> Result<(u64, u64), GridError> {
        let mut lsn = 0;
        if let (Some(o), Some(roll)) = (&self.meta.open, self.policy.roll_after_ms)
            && now_ms.saturating_sub(o.opened_ms) >= roll
        {
            lsn = self.rotate(now_ms)?;
        }
        let segments = self.segments()?;
        // Newest first; only sealed segments are ever dropped.
        let mut cut_before = None;
        for (i, s) in segments.iter().enumerate() {
            let Some(last) = s.last_id else { continue };
            let over_count = self.policy.retention.keep_segments.is_some_and(|k| i as u64 >= k as u64);
            let too_old = match (self.policy.retention.max_age_ms, s.sealed_ms) {
                (Some(age), Some(sealed)) => now_ms.saturating_sub(sealed) >= age,
                _ => false,
            };
            if over_count || too_old {
                cut_before = Some(last + 1);
                break;
            }
        }
        let mut dropped = 0;
        if let Some(before) = cut_before {
            let (d, l) = self.cut(before)?;
            dropped = d;
            lsn = lsn.max(l);
        }
        Ok((dropped, lsn))
    }

    /// The segments, newest first (the open one, if any, first).
    pub fn segments(&self) -> Result<Vec<SegmentInfo>, GridError> {
        let mut out = Vec::new();
        if let Some(o) = &self.meta.open {
            out.push(SegmentInfo {
                first_id: o.first_id,
                last_id: None,
                version: o.version,
                opened_ms: o.opened_ms,
                sealed_ms: None,
            });
        }
        let lo = segment_key(0);
        let hi = segment_key(u64::MAX);
        for e in self.heap.range::<[u8], _>((Bound::Included(&lo[..]), Bound::Included(&hi[..]))).rev() {
            let (k, v) = e?;
            let s = decode::<SealedSegment>("segment", &v)?;
            out.push(SegmentInfo {
                first_id: id_of(k)?,
                last_id: Some(s.last_id),
                version: s.version,
                opened_ms: s.opened_ms,
                sealed_ms: Some(s.sealed_ms),
            });
        }
        Ok(out)
    }

    /// The container and its segments.
    pub fn state(&self) -> Result<FeedState, GridError> {
        Ok(FeedState {
            top: self.meta.top,
            bottom: self.meta.bottom,
            count: self.meta.count,
            next_id: self.meta.next_id,
            version: self.meta.version,
            trimmed_below: self.meta.trimmed_below,
            segments: self.segments()?,
        })
    }

    /// `check` of the feed in `heap` (as `heapgrid check` finds it on disk).
    pub fn check_heap(heap: Heap) -> Result<(), GridError> {
        // The segment policy only steers appends and retention; a check needs none of it.
        let policy =
            SegmentPolicy { segment_records: 1, roll_after_ms: None, retention: Retention::default() };
        FeedShard::open(heap, policy)?.check()
    }

    /// Walks the whole feed and checks the container against it: `count` records, `top` and
    /// `bottom` the ends, ids below `next_id` and not below `trimmed_below`, segments ordered
    /// and not overlapping. The debug checker behind the tests (and `heapgrid check`).
    pub fn check(&self) -> Result<(), GridError> {
        let bad = |why: String| Err(GridError::Corrupted(format!("feed check: {why}")));
        let lo = record_key(0);
        let hi = record_key(u64::MAX);
        let (mut n, mut first, mut last) = (0u64, 0u64, 0u64);
        for e in self.heap.range::<[u8], _>((Bound::Included(&lo[..]), Bound::Included(&hi[..]))) {
            let (k, v) = e?;
            let id = id_of(k)?;
            decode_value(id, &v)?;
            if first == 0 {
                first = id;
            }
            last = id;
            n += 1;
        }
        let m = &self.meta;
        if n != m.count || first != m.bottom || last != m.top {
            return bad(format!(
                "walked {n} records {first}..{last}; container says {} {}..{}",
                m.count, m.bottom, m.top
            ));
        }
        if last >= m.next_id || (first != 0 && first < m.trimmed_below) {
            return bad(format!("records {first}..{last} outside [{}, {})", m.trimmed_below, m.next_id));
        }
        let segs = self.segments()?;
        for w in segs.windows(2) {
            let (newer, older) = (&w[0], &w[1]);
            if older.last_id.is_none_or(|l| l >= newer.first_id) {
                return bad(format!("segments {older:?} and {newer:?} overlap"));
            }
        }
        Ok(())
    }
}

crate::gate::impl_heap_owner!(FeedShard);

#[cfg(test)]
mod tests;
