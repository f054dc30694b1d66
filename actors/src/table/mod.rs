//! Tables: the pure state machine of one table shard (`TableShard`, this module), its actor
//! (`actor`), its supervisor (`supervisor`) and the routing of a table's requests to its shards
//! (`runtime`).
//!
//! `TableShard` has one typed method per operation: `get`, `get_raw`, `contains`, `count`,
//! `scan`, `write_one` and `write`. It is synchronous and knows nothing of actors or the wire.
//!
//! Stored record (the heap value of each key):
//!
//! ```text
//! u64 LE   version: 1 for a new key, +1 on every write of that key (compare-and-set can use it)
//! ..       Value::encode (version byte + postcard)
//! ```
//!
//! Invariant: every `write_one` and every `write` is one `WriteBatch` and so one op-log record:
//! it applies completely or not at all. A batch whose operation fails (a compare-and-set that
//! does not match, an update of the wrong type) changes nothing.
//! Invariant: execution is deterministic: the same operations in the same order on the same
//! state give the same state and results (no clock, no randomness), so replicas can replay them.
//! A put descends the tree once (`Heap::upsert`): the stored version is read where the new record
//! is written. Values are never cloned to be written.

pub mod actor;
pub mod def;
pub mod runtime;
pub mod supervisor;

use std::collections::HashMap;
use std::ops::Bound;

use heapgrid_heap::{Heap, Snapshot, WriteBatch};
use serde::{Deserialize, Serialize};

use crate::key::{Key, KeyTooLong};
use crate::lock::fence::FenceTable;
use crate::value::{PathSeg, Update, Value, ValueError};

pub use crate::limits::{SCAN_LIMIT_MAX, TABLE_BATCH_OPS_MAX};
/// Bytes of the record header in front of each stored value.
const RECORD_HEADER_BYTES: usize = 8;

// The types below travel on the wire (protocol version 1) as they are: their variants are
// append-only and their fields fixed (pinned by the golden-bytes test in src/protocol.rs).

/// A stored value with its per-key version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Versioned {
    pub version: u64,
    pub value: Value,
}

/// What a compare-and-set expects to find. On the wire: append-only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Expect {
    /// The key must be absent.
    Absent,
    /// The key must hold exactly this value.
    Value(Value),
    /// The key must be at this version.
    Version(u64),
    /// The key must exist (any value).
    Present,
    /// Always holds: a `Cas` with it is an unconditional write that answers the state it
    /// replaced (a swap, Redis' `SET ... GET`).
    Any,
}

/// One write. On the wire: append-only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum WriteOp {
    Put {
        key: Key,
        value: Value,
    },
    Delete {
        key: Key,
    },
    /// Writes `new` (or deletes, if `None`) only if the current state matches `expect`.
    Cas {
        key: Key,
        expect: Expect,
        new: Option<Value>,
    },
    /// Changes a path inside the stored document; a missing key starts as an empty map (or,
    /// for an `Increment` of the whole value, as 0).
    Update {
        key: Key,
        path: Vec<PathSeg>,
        update: Update,
    },
    /// Writes nothing; in a batch, fails it (`CasFailed`) unless the current state matches
    /// `expect`. How an optimistic commit checks what it read without writing it.
    Check {
        key: Key,
        expect: Expect,
    },
    /// Writes nothing; fails the whole batch (`StaleFence`) unless `fence` is the current grant
    /// of `lock` and the lock is held (docs/locks.md). Keyless: it goes with the batch's shard.
    Fence {
        lock: String,
        fence: u64,
    },
}

impl WriteOp {
    /// The key written or checked (`None` for a `Fence`).
    pub fn key(&self) -> Option<&Key> {
        match self {
            WriteOp::Put { key, .. }
            | WriteOp::Delete { key }
            | WriteOp::Cas { key, .. }
            | WriteOp::Update { key, .. }
            | WriteOp::Check { key, .. } => Some(key),
            WriteOp::Fence { .. } => None,
        }
    }
}

/// The result of one write. On the wire: append-only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum WriteResult {
    /// The new version.
    Put { version: u64 },
    /// Whether the key existed.
    Deleted { existed: bool },
    /// Whether the swap happened, and the state it compared against.
    Cas { ok: bool, current: Option<Versioned> },
    /// The value now at the updated path, and the document's new version.
    Updated { value: Value, version: u64 },
    /// A `Check` held (or a `Fence` was current).
    Checked,
}

/// What a write committed: its op-log record (`lsn`, 0 if nothing was written) and one result
/// per operation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Written {
    pub lsn: u64,
    pub results: Vec<WriteResult>,
}

/// Keys in `[start, end]` per the bounds, at most `limit` entries, descending if `reverse`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanRange {
    pub start: Bound<Key>,
    pub end: Bound<Key>,
    pub limit: u32,
    pub reverse: bool,
}

impl ScanRange {
    /// Exactly the string keys starting with `prefix`.
    pub fn prefix(prefix: &str, limit: u32, reverse: bool) -> ScanRange {
        let end = match crate::key::str_successor(prefix) {
            Some(s) => Bound::Excluded(Key::Str(s)),
            // Every string from `prefix` on starts with it only when there is no successor,
            // i.e. the prefix is all U+10FFFF: bound by the end of the string keys.
            None => Bound::Unbounded,
        };
        ScanRange { start: Bound::Included(Key::Str(prefix.to_string())), end, limit, reverse }
    }
}

/// A stored record, borrowed from the heap where it is inline.
pub struct RawRecord<'a> {
    pub version: u64,
    /// `Value::encode` output: the value format version byte, then postcard.
    pub value: std::borrow::Cow<'a, [u8]>,
}

/// Why a table operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(transparent)]
    Key(#[from] KeyTooLong),
    #[error(transparent)]
    Value(#[from] ValueError),
    #[error(transparent)]
    Heap(#[from] heapgrid_heap::Error),
    #[error("compare-and-set {index} in the batch did not match; nothing was written")]
    CasFailed { index: u64 },
    #[error("{what} is {got}, the limit is {max}")]
    LimitExceeded { what: &'static str, got: u64, max: u64 },
    #[error("stored record for key {key} is corrupt: {why}")]
    Corrupted { key: String, why: String },
    #[error("fence {} of lock {} is stale; nothing was written", .0.presented, .0.lock)]
    StaleFence(crate::lock::fence::Stale),
}

fn encode_record(version: u64, value: &Value) -> Result<Vec<u8>, TableError> {
    let v = value.encode()?;
    let mut out = Vec::with_capacity(RECORD_HEADER_BYTES + v.len());
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&v);
    Ok(out)
}

fn corrupt(key: &[u8], why: String) -> TableError {
    TableError::Corrupted { key: String::from_utf8_lossy(key).into(), why }
}

fn record_version(key: &[u8], bytes: &[u8]) -> Result<u64, TableError> {
    match bytes.first_chunk::<RECORD_HEADER_BYTES>() {
        Some(h) => Ok(u64::from_le_bytes(*h)),
        None => Err(corrupt(key, "record shorter than its header".into())),
    }
}

fn decode_record(key: &[u8], bytes: &[u8]) -> Result<Versioned, TableError> {
    let version = record_version(key, bytes)?;
    let value = Value::decode(&bytes[RECORD_HEADER_BYTES..]).map_err(|e| corrupt(key, e.to_string()))?;
    Ok(Versioned { version, value })
}

fn next_version(key: &Key, current: Option<u64>) -> Result<u64, TableError> {
    match current {
        None => Ok(1),
        Some(v) => v.checked_add(1).ok_or_else(|| TableError::Corrupted {
            key: key.to_string(),
            why: "version counter at its maximum".into(),
        }),
    }
}

fn encode_bound(b: &Bound<Key>) -> Result<Bound<Vec<u8>>, TableError> {
    Ok(match b {
        Bound::Included(k) => Bound::Included(k.encode()?),
        Bound::Excluded(k) => Bound::Excluded(k.encode()?),
        Bound::Unbounded => Bound::Unbounded,
    })
}

/// What table reads run against: the shard's live heap (inside its actor) or a published
/// snapshot of it (on any thread).
pub trait Source {
    fn get_ref(&self, key: &[u8]) -> heapgrid_heap::Result<Option<std::borrow::Cow<'_, [u8]>>>;
    fn contains(&self, key: &[u8]) -> heapgrid_heap::Result<bool>;
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn range(&self, bounds: (Bound<Vec<u8>>, Bound<Vec<u8>>)) -> heapgrid_heap::Range<'_>;
}

impl Source for Heap {
    fn get_ref(&self, key: &[u8]) -> heapgrid_heap::Result<Option<std::borrow::Cow<'_, [u8]>>> {
        Heap::get_ref(self, key)
    }
    fn contains(&self, key: &[u8]) -> heapgrid_heap::Result<bool> {
        Heap::contains(self, key)
    }
    fn len(&self) -> u64 {
        Heap::len(self)
    }
    fn range(&self, bounds: (Bound<Vec<u8>>, Bound<Vec<u8>>)) -> heapgrid_heap::Range<'_> {
        Heap::range::<Vec<u8>, _>(self, bounds)
    }
}

impl Source for Snapshot {
    fn get_ref(&self, key: &[u8]) -> heapgrid_heap::Result<Option<std::borrow::Cow<'_, [u8]>>> {
        Snapshot::get_ref(self, key)
    }
    fn contains(&self, key: &[u8]) -> heapgrid_heap::Result<bool> {
        Snapshot::contains(self, key)
    }
    fn len(&self) -> u64 {
        Snapshot::len(self)
    }
    fn range(&self, bounds: (Bound<Vec<u8>>, Bound<Vec<u8>>)) -> heapgrid_heap::Range<'_> {
        Snapshot::range::<Vec<u8>, _>(self, bounds)
    }
}

/// The typed reads of a table shard, over its heap or a snapshot of it.
pub mod read {
    use super::*;

    /// The value and version stored under `key`.
    pub fn get(s: &impl Source, key: &Key) -> Result<Option<Versioned>, TableError> {
        let k = key.encode()?;
        match s.get_ref(&k)? {
            Some(bytes) => Ok(Some(decode_record(&k, &bytes)?)),
            None => Ok(None),
        }
    }

    /// The stored record under `key` without decoding its value (for callers that pass the
    /// encoded value on, such as the server's reply to a get).
    pub fn get_raw<'a>(s: &'a impl Source, key: &Key) -> Result<Option<RawRecord<'a>>, TableError> {
        let k = key.encode()?;
        let Some(bytes) = s.get_ref(&k)? else { return Ok(None) };
        let version = record_version(&k, &bytes)?;
        let value = match bytes {
            std::borrow::Cow::Borrowed(b) => std::borrow::Cow::Borrowed(&b[RECORD_HEADER_BYTES..]),
            std::borrow::Cow::Owned(mut b) => {
                b.drain(..RECORD_HEADER_BYTES);
                std::borrow::Cow::Owned(b)
            }
        };
        Ok(Some(RawRecord { version, value }))
    }

    /// Whether `key` is present.
    pub fn contains(s: &impl Source, key: &Key) -> Result<bool, TableError> {
        Ok(s.contains(&key.encode()?)?)
    }

    /// Number of keys.
    pub fn count(s: &impl Source) -> u64 {
        s.len()
    }

    /// Entries in `range`, in key order (descending if `range.reverse`).
    pub fn scan(s: &impl Source, range: &ScanRange) -> Result<Vec<(Key, Versioned)>, TableError> {
        if range.limit > SCAN_LIMIT_MAX {
            return Err(TableError::LimitExceeded {
                what: "scan limit",
                got: range.limit as u64,
                max: SCAN_LIMIT_MAX as u64,
            });
        }
        let bounds = (encode_bound(&range.start)?, encode_bound(&range.end)?);
        // An empty or inverted range has no entries.
        if let (Bound::Included(a) | Bound::Excluded(a), Bound::Included(b) | Bound::Excluded(b)) = &bounds
            && (a > b || (a == b && !matches!(bounds, (Bound::Included(_), Bound::Included(_)))))
        {
            return Ok(Vec::new());
        }
        let iter = s.range(bounds);
        let iter: Box<dyn Iterator<Item = _>> =
            if range.reverse { Box::new(iter.rev()) } else { Box::new(iter) };
        let mut out = Vec::new();
        for e in iter.take(range.limit as usize) {
            let (k, v) = e?;
            let key = Key::decode(k).ok_or_else(|| corrupt(k, "undecodable key".into()))?;
            out.push((key, decode_record(k, &v)?));
        }
        Ok(out)
    }
}

/// What a lone compare-and-set that does not match answers: a result, not an error.
enum Mismatch {
    /// In a batch: the whole batch fails.
    Fails,
    /// Alone: `ok: false` with the state it compared against.
    Answers,
}

/// One shard of a table: a heap plus the typed operations on it.
pub struct TableShard {
    heap: Heap,
    deferred_log: bool,
    /// Where fenced writes are checked (none: every fence is stale).
    fences: Option<std::sync::Arc<FenceTable>>,
}

impl TableShard {
    pub fn new(heap: Heap) -> Self {
        TableShard { heap, deferred_log: false, fences: None }
    }

    /// Checks `WriteOp::Fence`s against `fences` (the node's lock service publishes there).
    pub fn set_fences(&mut self, fences: std::sync::Arc<FenceTable>) {
        self.fences = Some(fences);
    }

    /// Whether the fence `fence` of `lock` may guard a write now.
    pub fn check_fence(&self, lock: &str, fence: u64) -> Result<(), TableError> {
        match &self.fences {
            Some(t) => t.check(lock, fence).map_err(TableError::StaleFence),
            None => Err(TableError::StaleFence(crate::lock::fence::Stale {
                lock: lock.to_string(),
                presented: fence,
                current: None,
            })),
        }
    }

    /// With `true`, writes only queue their op-log records (`Heap::apply_deferred`); the owner
    /// must call `heap_mut().flush_log()` before acknowledging any of them.
    pub fn set_deferred_log(&mut self, on: bool) {
        self.deferred_log = on;
    }

    /// The value and version stored under `key`.
    pub fn get(&self, key: &Key) -> Result<Option<Versioned>, TableError> {
        read::get(&self.heap, key)
    }

    /// The stored record under `key`, not decoded.
    pub fn get_raw(&self, key: &Key) -> Result<Option<RawRecord<'_>>, TableError> {
        read::get_raw(&self.heap, key)
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &Key) -> Result<bool, TableError> {
        read::contains(&self.heap, key)
    }

    /// Number of keys in this shard.
    pub fn count(&self) -> u64 {
        read::count(&self.heap)
    }

    /// Entries in `range`, in key order (descending if `range.reverse`).
    pub fn scan(&self, range: &ScanRange) -> Result<Vec<(Key, Versioned)>, TableError> {
        read::scan(&self.heap, range)
    }

    /// Applies one write as one op-log record. A compare-and-set that does not match is a
    /// result (`ok: false`, nothing written, `lsn` 0), not an error.
    pub fn write_one(&mut self, op: &WriteOp) -> Result<(u64, WriteResult), TableError> {
        let Some(key) = op.key() else {
            if let WriteOp::Fence { lock, fence } = op {
                self.check_fence(lock, *fence)?;
            }
            return Ok((0, WriteResult::Checked));
        };
        let k = key.encode()?;
        if let WriteOp::Put { key, value } = op {
            // The common case, with one descent: the stored version is read where the new
            // record is written.
            let encoded = value.encode()?;
            let len = RECORD_HEADER_BYTES + encoded.len();
            let mut version = 0;
            let lsn = self.heap.upsert(&k, len, self.deferred_log, |old| {
                let current = old.map(|b| record_version(&k, b)).transpose()?;
                version = next_version(key, current)?;
                let mut rec = Vec::with_capacity(len);
                rec.extend_from_slice(&version.to_le_bytes());
                rec.extend_from_slice(&encoded);
                Ok::<_, TableError>(rec)
            })?;
            return Ok((lsn, WriteResult::Put { version }));
        }
        let mut batch = WriteBatch::new();
        let (result, wrote) = self.plan(op, &k, None, Mismatch::Answers, &mut batch, 0)?;
        if !wrote {
            return Ok((0, result));
        }
        Ok((self.commit(&batch)?, result))
    }

    /// Applies writes together, as one op-log record: each sees the ones before it; if any
    /// fails (a compare-and-set that does not match included) nothing is written.
    pub fn write(&mut self, ops: &[WriteOp]) -> Result<Written, TableError> {
        if ops.len() > TABLE_BATCH_OPS_MAX {
            return Err(TableError::LimitExceeded {
                what: "batch operations",
                got: ops.len() as u64,
                max: TABLE_BATCH_OPS_MAX as u64,
            });
        }
        if ops.is_empty() {
            return Ok(Written { lsn: 0, results: Vec::new() });
        }
        // Read-your-writes inside the batch: the record each touched key will hold.
        let mut overlay: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
        let mut batch = WriteBatch::new();
        let mut results = Vec::with_capacity(ops.len());
        self.check_fences(ops)?;
        for (index, op) in ops.iter().enumerate() {
            let Some(key) = op.key() else {
                results.push(WriteResult::Checked);
                continue;
            };
            let k = key.encode()?;
            let (result, _) =
                self.plan(op, &k, Some(&mut overlay), Mismatch::Fails, &mut batch, index as u64)?;
            results.push(result);
        }
        // A batch of checks only writes nothing: no record.
        let lsn = if batch.is_empty() { 0 } else { self.commit(&batch)? };
        Ok(Written { lsn, results })
    }

    /// Whether `write(ops)` would succeed now, without writing anything.
    pub fn validate(&self, ops: &[WriteOp]) -> Result<(), TableError> {
        if ops.len() > TABLE_BATCH_OPS_MAX {
            return Err(TableError::LimitExceeded {
                what: "batch operations",
                got: ops.len() as u64,
                max: TABLE_BATCH_OPS_MAX as u64,
            });
        }
        let mut overlay: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
        let mut scratch = WriteBatch::new();
        self.check_fences(ops)?;
        for (index, op) in ops.iter().enumerate() {
            let Some(k) = op.key() else { continue };
            let k = k.encode()?;
            self.plan(op, &k, Some(&mut overlay), Mismatch::Fails, &mut scratch, index as u64)?;
        }
        Ok(())
    }

    /// Every `Fence` of a batch, checked before anything is planned: one stale fence and the
    /// batch applies nothing.
    fn check_fences(&self, ops: &[WriteOp]) -> Result<(), TableError> {
        for op in ops {
            if let WriteOp::Fence { lock, fence } = op {
                self.check_fence(lock, *fence)?;
            }
        }
        Ok(())
    }

    fn commit(&mut self, batch: &WriteBatch) -> Result<u64, TableError> {
        Ok(if self.deferred_log { self.heap.apply_deferred(batch)? } else { self.heap.apply(batch)? })
    }

    /// Adds `op` to `batch` against the current state (plus `overlay`, the batch's own earlier
    /// writes); returns its result and whether it writes.
    fn plan(
        &self,
        op: &WriteOp,
        k: &[u8],
        overlay: Option<&mut HashMap<Vec<u8>, Option<Vec<u8>>>>,
        mismatch: Mismatch,
        batch: &mut WriteBatch,
        index: u64,
    ) -> Result<(WriteResult, bool), TableError> {
        let pending = overlay.as_deref().and_then(|o| o.get(k));
        let stored = match pending {
            Some(_) => None,
            None => self.heap.get_ref(k)?,
        };
        let current_bytes: Option<&[u8]> = match pending {
            Some(p) => p.as_deref(),
            None => stored.as_deref(),
        };
        let current_version = current_bytes.map(|b| record_version(k, b)).transpose()?;
        let Some(key) = op.key() else {
            return Ok((WriteResult::Checked, false));
        };
        let next = next_version(key, current_version)?;
        if let WriteOp::Check { expect, .. } = op {
            let current = current_bytes.map(|b| decode_record(k, b)).transpose()?;
            return if expect_holds(expect, current.as_ref()) {
                Ok((WriteResult::Checked, false))
            } else {
                match mismatch {
                    Mismatch::Answers => Ok((WriteResult::Cas { ok: false, current }, false)),
                    Mismatch::Fails => Err(TableError::CasFailed { index }),
                }
            };
        }
        let (record, result) = match op {
            WriteOp::Put { value, .. } => {
                (Some(encode_record(next, value)?), WriteResult::Put { version: next })
            }
            WriteOp::Delete { .. } => (None, WriteResult::Deleted { existed: current_bytes.is_some() }),
            WriteOp::Cas { expect, new, .. } => {
                let current = current_bytes.map(|b| decode_record(k, b)).transpose()?;
                if !expect_holds(expect, current.as_ref()) {
                    return match mismatch {
                        Mismatch::Answers => Ok((WriteResult::Cas { ok: false, current }, false)),
                        Mismatch::Fails => Err(TableError::CasFailed { index }),
                    };
                }
                let record = new.as_ref().map(|v| encode_record(next, v)).transpose()?;
                (record, WriteResult::Cas { ok: true, current })
            }
            WriteOp::Check { .. } | WriteOp::Fence { .. } => unreachable!("answered above"),
            WriteOp::Update { path, update, .. } => {
                let mut doc = match current_bytes {
                    Some(b) => decode_record(k, b)?.value,
                    // Incrementing a whole value that is missing starts from 0 (a counter).
                    None if path.is_empty() && matches!(update, Update::Increment(_)) => Value::Null,
                    None => Value::Map(Default::default()),
                };
                let at = doc.update(path, update)?;
                (Some(encode_record(next, &doc)?), WriteResult::Updated { value: at, version: next })
            }
        };
        match &record {
            Some(r) => batch.put(k, r)?,
            None => batch.delete(k)?,
        };
        if let Some(o) = overlay {
            o.insert(k.to_vec(), record);
        }
        Ok((result, true))
    }
}

/// Whether the stored state `current` matches `expect`.
fn expect_holds(expect: &Expect, current: Option<&Versioned>) -> bool {
    match (expect, current) {
        (Expect::Absent, None) => true,
        (Expect::Value(v), Some(c)) => *v == c.value,
        (Expect::Version(n), Some(c)) => *n == c.version,
        (Expect::Present, Some(_)) | (Expect::Any, _) => true,
        _ => false,
    }
}

crate::gate::impl_heap_owner!(TableShard);

#[cfg(test)]
mod tests {
    use super::*;
    use heapgrid_heap::HeapOptions;
    use heapgrid_heap::storage::{SimDisk, Storage};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn shard() -> TableShard {
        let h = Heap::open_storage(
            Box::new(SimDisk::new().storage()) as Box<dyn Storage>,
            HeapOptions::default(),
        )
        .unwrap();
        TableShard::new(h)
    }

    fn put(k: &str, v: i64) -> WriteOp {
        WriteOp::Put { key: k.into(), value: Value::Int(v) }
    }

    #[test]
    fn versions_cas_and_atomic_batches() {
        let mut s = shard();
        s.write_one(&put("a", 1)).unwrap();
        s.write_one(&put("a", 2)).unwrap();
        assert_eq!(s.get(&"a".into()).unwrap(), Some(Versioned { version: 2, value: Value::Int(2) }));
        let raw = s.get_raw(&"a".into()).unwrap().unwrap();
        assert_eq!((raw.version, Value::decode(&raw.value).unwrap()), (2, Value::Int(2)));
        let cas = |expect, new| WriteOp::Cas { key: "a".into(), expect, new };
        let (lsn, r) = s.write_one(&cas(Expect::Version(1), Some(Value::Int(9)))).unwrap();
        assert_eq!(lsn, 0, "a mismatch writes nothing");
        assert!(matches!(r, WriteResult::Cas { ok: false, .. }));
        s.write_one(&cas(Expect::Value(Value::Int(2)), Some(Value::Int(3)))).unwrap();
        // A batch with a failing CAS writes nothing, not even its earlier puts.
        let b = [put("b", 1), WriteOp::Cas { key: "a".into(), expect: Expect::Absent, new: None }];
        assert!(matches!(s.write(&b), Err(TableError::CasFailed { index: 1 })));
        assert!(!s.contains(&"b".into()).unwrap());
        // Read-your-writes inside a batch, for versions and values.
        let b = [
            put("c", 1),
            WriteOp::Update { key: "c".into(), path: vec![], update: Update::Increment(Value::Int(4)) },
            WriteOp::Cas { key: "c".into(), expect: Expect::Version(2), new: Some(Value::Int(7)) },
        ];
        let w = s.write(&b).unwrap();
        assert_eq!(w.results[0], WriteResult::Put { version: 1 });
        assert_eq!(s.get(&"c".into()).unwrap(), Some(Versioned { version: 3, value: Value::Int(7) }));
        assert_eq!(s.write(&[]).unwrap(), Written { lsn: 0, results: vec![] });
    }

    #[test]
    fn checks_fail_batches_and_validate_writes_nothing() {
        let mut s = shard();
        s.write_one(&put("a", 1)).unwrap();
        let check = |k: &str, expect| WriteOp::Check { key: k.into(), expect };
        // Checks that hold: the batch applies, and a batch of checks alone logs nothing.
        let w = s.write(&[check("a", Expect::Version(1)), check("z", Expect::Absent), put("b", 2)]).unwrap();
        assert_eq!(w.results[0], WriteResult::Checked);
        assert!(s.contains(&"b".into()).unwrap());
        assert_eq!(s.write(&[check("a", Expect::Version(1))]).unwrap().results, vec![WriteResult::Checked]);
        // A check that fails fails the batch: nothing of it is written.
        let b = [put("c", 3), check("a", Expect::Version(7))];
        assert!(matches!(s.write(&b), Err(TableError::CasFailed { index: 1 })));
        assert!(!s.contains(&"c".into()).unwrap());
        // A check sees the batch's own earlier writes.
        s.write(&[put("d", 1), check("d", Expect::Version(1))]).unwrap();
        // validate answers as write would, and writes nothing.
        assert!(matches!(s.validate(&b), Err(TableError::CasFailed { index: 1 })));
        s.validate(&[put("e", 1), check("a", Expect::Version(1))]).unwrap();
        assert!(!s.contains(&"e".into()).unwrap());
        // Alone, a failed check answers like a failed compare-and-set.
        assert!(matches!(
            s.write_one(&check("a", Expect::Absent)).unwrap(),
            (0, WriteResult::Cas { ok: false, .. })
        ));
    }

    #[test]
    fn partial_update_of_a_document() {
        let mut s = shard();
        let op = |path: Vec<PathSeg>, update| WriteOp::Update { key: "bob".into(), path, update };
        s.write_one(&op(vec!["visits".into()], Update::Increment(Value::Int(1)))).unwrap();
        s.write_one(&op(vec!["visits".into()], Update::Increment(Value::Int(1)))).unwrap();
        s.write_one(&op(vec!["friends".into()], Update::Append(Value::Str("amy".into())))).unwrap();
        let v = s.get(&"bob".into()).unwrap().unwrap();
        assert_eq!(v.value.to_json(), serde_json::json!({"visits": 2, "friends": ["amy"]}));
        // A type error leaves the document as it was.
        assert!(s.write_one(&op(vec!["friends".into()], Update::Increment(Value::Int(1)))).is_err());
        assert_eq!(s.get(&"bob".into()).unwrap(), Some(v));
    }

    #[test]
    fn counters_and_swaps() {
        let mut s = shard();
        let incr =
            |by| WriteOp::Update { key: "n".into(), path: vec![], update: Update::Increment(Value::Int(by)) };
        // A missing counter starts at 0; a stored int goes up; overflow fails and changes nothing.
        assert_eq!(
            s.write_one(&incr(5)).unwrap().1,
            WriteResult::Updated { value: Value::Int(5), version: 1 }
        );
        assert_eq!(
            s.write_one(&incr(-7)).unwrap().1,
            WriteResult::Updated { value: Value::Int(-2), version: 2 }
        );
        assert!(s.write_one(&incr(i64::MIN)).is_err());
        assert_eq!(s.get(&"n".into()).unwrap().unwrap().value, Value::Int(-2));
        // A missing key incremented at a path still starts as a map.
        let at = WriteOp::Update {
            key: "d".into(),
            path: vec!["x".into()],
            update: Update::Increment(Value::Int(1)),
        };
        s.write_one(&at).unwrap();
        assert_eq!(s.get(&"d".into()).unwrap().unwrap().value.to_json(), serde_json::json!({"x": 1}));
        // `Present` holds only for an existing key; `Any` always, answering what it replaced.
        let cas =
            |key: &str, expect, v: i64| WriteOp::Cas { key: key.into(), expect, new: Some(Value::Int(v)) };
        let r = s.write_one(&cas("p", Expect::Present, 1)).unwrap().1;
        assert_eq!(r, WriteResult::Cas { ok: false, current: None });
        assert_eq!(s.get(&"p".into()).unwrap(), None);
        let r = s.write_one(&cas("p", Expect::Any, 2)).unwrap().1;
        assert_eq!(r, WriteResult::Cas { ok: true, current: None });
        let r = s.write_one(&cas("p", Expect::Any, 3)).unwrap().1;
        assert_eq!(
            r,
            WriteResult::Cas { ok: true, current: Some(Versioned { version: 1, value: Value::Int(2) }) }
        );
        let r = s.write_one(&cas("p", Expect::Present, 4)).unwrap().1;
        assert!(matches!(r, WriteResult::Cas { ok: true, .. }));
        assert_eq!(s.get(&"p".into()).unwrap().unwrap().value, Value::Int(4));
    }

    #[test]
    fn scans_and_prefixes_with_limits() {
        let mut s = shard();
        for k in ["user:a", "user:b", "user:c", "usez", "other"] {
            s.write_one(&put(k, 1)).unwrap();
        }
        s.write_one(&WriteOp::Put { key: Key::Int(-5), value: Value::Null }).unwrap();
        let keys = |e: Vec<(Key, Versioned)>| e.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        let p = s.scan(&ScanRange::prefix("user:", 10, true)).unwrap();
        assert_eq!(keys(p), vec![Key::from("user:c"), "user:b".into(), "user:a".into()]);
        let all = ScanRange { start: Bound::Unbounded, end: Bound::Unbounded, limit: 2, reverse: false };
        assert_eq!(keys(s.scan(&all).unwrap()), vec![Key::Int(-5), "other".into()]);
        let inverted = ScanRange {
            start: Bound::Included("z".into()),
            end: Bound::Excluded("a".into()),
            limit: 10,
            reverse: false,
        };
        assert!(s.scan(&inverted).unwrap().is_empty());
        let at = ScanRange { limit: SCAN_LIMIT_MAX, ..all.clone() };
        assert!(s.scan(&at).is_ok());
        let over = ScanRange { limit: SCAN_LIMIT_MAX + 1, ..all };
        assert!(matches!(s.scan(&over), Err(TableError::LimitExceeded { .. })));
        let too_many = vec![put("x", 1); TABLE_BATCH_OPS_MAX + 1];
        assert!(matches!(s.write(&too_many), Err(TableError::LimitExceeded { .. })));
        assert!(s.write(&too_many[..TABLE_BATCH_OPS_MAX]).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn shard_matches_a_btreemap(ops in prop::collection::vec((0u8..5, 0i64..30, any::<i32>()), 1..150)) {
            let mut s = shard();
            let mut model: BTreeMap<i64, (u64, i64)> = BTreeMap::new();
            for (kind, k, v) in ops {
                let key = Key::Int(k);
                match kind {
                    0 => {
                        s.write_one(&WriteOp::Put { key, value: Value::Int(v as i64) }).unwrap();
                        let ver = model.get(&k).map_or(1, |e| e.0 + 1);
                        model.insert(k, (ver, v as i64));
                    }
                    1 => {
                        let (_, r) = s.write_one(&WriteOp::Delete { key }).unwrap();
                        prop_assert_eq!(r, WriteResult::Deleted { existed: model.remove(&k).is_some() });
                    }
                    2 => {
                        let op = WriteOp::Update { key, path: vec![], update: Update::Increment(Value::Int(1)) };
                        let r = s.write_one(&op);
                        match model.get(&k).copied() {
                            Some((ver, n)) => { r.unwrap(); model.insert(k, (ver + 1, n + 1)); }
                            // A missing counter starts from 0.
                            None => {
                                prop_assert_eq!(r.unwrap().1, WriteResult::Updated { value: Value::Int(1), version: 1 });
                                model.insert(k, (1, 1));
                            }
                        }
                    }
                    3 => {
                        // Two writes of one key in one batch: the second sees the first.
                        let b = [
                            WriteOp::Put { key: key.clone(), value: Value::Int(v as i64) },
                            WriteOp::Put { key, value: Value::Int(v as i64 + 1) },
                        ];
                        s.write(&b).unwrap();
                        let ver = model.get(&k).map_or(2, |e| e.0 + 2);
                        model.insert(k, (ver, v as i64 + 1));
                    }
                    _ => {
                        let want = model.get(&k).map(|&(version, n)| Versioned { version, value: Value::Int(n) });
                        prop_assert_eq!(s.get(&key).unwrap(), want);
                    }
                }
            }
            let all = ScanRange { start: Bound::Unbounded, end: Bound::Unbounded, limit: 1000, reverse: false };
            let want: Vec<(Key, Versioned)> = model.iter().map(|(&k, &(version, n))| (Key::Int(k), Versioned { version, value: Value::Int(n) })).collect();
            prop_assert_eq!(s.scan(&all).unwrap(), want);
            prop_assert_eq!(s.count(), model.len() as u64);
        }
    }
}
