//! A table shard's state machine: typed operations (`TableOp`) on one heap. Pure and synchronous;
//! the shard actor (`shard.rs`) is a thin translation from messages to `TableShard::execute`.
//!
//! Stored record (the heap value of each key):
//!
//! ```text
//! u64 LE   version: 1 for a new key, +1 on every write of that key (compare-and-set can use it)
//! ..       Value::encode (version byte + postcard)
//! ```
//!
//! Invariant: every write operation, and every `Batch`, is one `WriteBatch` and so one op-log
//! record: it applies completely or not at all. A batch whose operation fails (a
//! compare-and-set that does not match, an update of the wrong type) changes nothing.
//! Invariant: execution is deterministic: the same operations in the same order on the same
//! state give the same state and results (no clock, no randomness), so replicas can replay them.

use std::collections::HashMap;
use std::ops::Bound;

use heapgrid_heap::{Heap, WriteBatch};
use serde::{Deserialize, Serialize};

use crate::key::{Key, KeyTooLong};
use crate::value::{PathSeg, Update, Value, ValueError};

/// Most entries one scan returns.
pub const SCAN_LIMIT_MAX: u32 = 10_000;
/// Most write operations in one batch.
pub const TABLE_BATCH_OPS_MAX: usize = 10_000;
/// Bytes of the record header in front of each stored value.
const RECORD_HEADER_BYTES: usize = 8;

/// A stored value with its per-key version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Versioned {
    pub version: u64,
    pub value: Value,
}

/// What a compare-and-set expects to find.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Expect {
    /// The key must be absent.
    Absent,
    /// The key must hold exactly this value.
    Value(Value),
    /// The key must be at this version.
    Version(u64),
}

/// One write.
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
    /// Changes a path inside the stored document; a missing key starts as an empty map.
    Update {
        key: Key,
        path: Vec<PathSeg>,
        update: Update,
    },
}

impl WriteOp {
    pub fn key(&self) -> &Key {
        match self {
            WriteOp::Put { key, .. }
            | WriteOp::Delete { key }
            | WriteOp::Cas { key, .. }
            | WriteOp::Update { key, .. } => key,
        }
    }
}

/// An operation on one table shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TableOp {
    Get {
        key: Key,
    },
    Contains {
        key: Key,
    },
    Count,
    /// Entries with keys in `[start, end]` per the bounds, at most `limit`, descending if `reverse`.
    Scan {
        start: Bound<Key>,
        end: Bound<Key>,
        limit: u32,
        reverse: bool,
    },
    /// Entries whose string keys start with `prefix`.
    Prefix {
        prefix: String,
        limit: u32,
        reverse: bool,
    },
    Write(WriteOp),
    /// Writes applied together, as one op-log record.
    Batch(Vec<WriteOp>),
    /// A collection-scoped snippet, run inside the shard actor that owns its `key`.
    Eval(Box<EvalRequest>),
}

impl TableOp {
    /// True for operations that change the table.
    pub fn is_write(&self) -> bool {
        matches!(self, TableOp::Write(_) | TableOp::Batch(_))
    }
}

/// A collection-scoped snippet: run inside the shard actor that owns `key` (required on a
/// sharded table): atomic and isolated; its writes are one batch. `read_only` refuses any write
/// (the server sets it for tokens without write permission).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRequest {
    pub src: String,
    /// The routing key; the snippet's `key` variable.
    pub key: Option<Key>,
    /// The snippet's `args` variable.
    pub args: Value,
    pub limits: crate::snippet::LimitOverrides,
    pub read_only: bool,
}

/// The result of one write.
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
}

/// The result of a `TableOp`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum OpResult {
    Value(Option<Versioned>),
    Bool(bool),
    Count(u64),
    Entries(Vec<(Key, Versioned)>),
    /// `lsn` is the op-log record of the writes (0 if nothing was written).
    Written {
        lsn: u64,
        results: Vec<WriteResult>,
    },
    /// A snippet's (shaped) result.
    Snippet(Value),
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
    CasFailed { index: usize },
    #[error("{what} is {got}, the limit is {max}")]
    LimitExceeded { what: &'static str, got: u64, max: u64 },
    #[error("stored record for key {key} is corrupt: {why}")]
    Corrupted { key: String, why: String },
    #[error("{0}")]
    Unsupported(&'static str),
}

fn encode_record(version: u64, value: &Value) -> Result<Vec<u8>, TableError> {
    let v = value.encode()?;
    let mut out = Vec::with_capacity(RECORD_HEADER_BYTES + v.len());
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&v);
    Ok(out)
}

fn decode_record(key: &[u8], bytes: &[u8]) -> Result<Versioned, TableError> {
    let corrupt = |why: String| TableError::Corrupted { key: String::from_utf8_lossy(key).into(), why };
    if bytes.len() < RECORD_HEADER_BYTES {
        return Err(corrupt("record shorter than its header".into()));
    }
    let version = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let value = Value::decode(&bytes[8..]).map_err(|e| corrupt(e.to_string()))?;
    Ok(Versioned { version, value })
}

/// The smallest byte string greater than every string starting with `prefix` (None: no bound).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut p = prefix.to_vec();
    while let Some(last) = p.pop() {
        if last < 0xff {
            p.push(last + 1);
            return Some(p);
        }
    }
    None
}

/// One shard of a table: a heap plus the typed operations on it.
pub struct TableShard {
    heap: Heap,
    deferred_log: bool,
}

impl TableShard {
    pub fn new(heap: Heap) -> Self {
        TableShard { heap, deferred_log: false }
    }

    /// With `true`, writes only queue their op-log records (`Heap::apply_deferred`); the owner
    /// must call `heap_mut().flush_log()` before acknowledging any of them.
    pub fn set_deferred_log(&mut self, on: bool) {
        self.deferred_log = on;
    }

    pub fn heap(&self) -> &Heap {
        &self.heap
    }

    pub fn heap_mut(&mut self) -> &mut Heap {
        &mut self.heap
    }

    pub fn into_heap(self) -> Heap {
        self.heap
    }

    fn read(&self, key: &Key) -> Result<Option<Versioned>, TableError> {
        let k = key.encode()?;
        match self.heap.get_ref(&k)? {
            Some(bytes) => Ok(Some(decode_record(&k, &bytes)?)),
            None => Ok(None),
        }
    }

    /// Executes one operation. Writes are applied (and logged) before this returns; under
    /// `FsyncPolicy::Always` the caller acknowledges only after the returned LSN is durable.
    pub fn execute(&mut self, op: &TableOp) -> Result<OpResult, TableError> {
        match op {
            TableOp::Get { key } => Ok(OpResult::Value(self.read(key)?)),
            TableOp::Contains { key } => Ok(OpResult::Bool(self.heap.contains(&key.encode()?)?)),
            TableOp::Count => Ok(OpResult::Count(self.heap.len())),
            TableOp::Scan { start, end, limit, reverse } => {
                let enc = |b: &Bound<Key>| -> Result<Bound<Vec<u8>>, TableError> {
                    Ok(match b {
                        Bound::Included(k) => Bound::Included(k.encode()?),
                        Bound::Excluded(k) => Bound::Excluded(k.encode()?),
                        Bound::Unbounded => Bound::Unbounded,
                    })
                };
                self.scan((enc(start)?, enc(end)?), *limit, *reverse)
            }
            TableOp::Prefix { prefix, limit, reverse } => {
                let start = Key::Str(prefix.clone()).encode()?;
                let end = match prefix_end(&start) {
                    Some(e) => Bound::Excluded(e),
                    None => Bound::Unbounded,
                };
                self.scan((Bound::Included(start), end), *limit, *reverse)
            }
            TableOp::Write(w) => self.write(std::slice::from_ref(w), true),
            TableOp::Batch(ws) => self.write(ws, false),
            TableOp::Eval(_) => {
                Err(TableError::Unsupported("snippets run in the shard actor, not in TableShard"))
            }
        }
    }

    fn scan(
        &self,
        bounds: (Bound<Vec<u8>>, Bound<Vec<u8>>),
        limit: u32,
        reverse: bool,
    ) -> Result<OpResult, TableError> {
        if limit > SCAN_LIMIT_MAX {
            return Err(TableError::LimitExceeded {
                what: "scan limit",
                got: limit as u64,
                max: SCAN_LIMIT_MAX as u64,
            });
        }
        let range = self.heap.range::<Vec<u8>, _>(bounds);
        let iter: Box<dyn Iterator<Item = _>> = if reverse { Box::new(range.rev()) } else { Box::new(range) };
        let mut out = Vec::new();
        for e in iter.take(limit as usize) {
            let (k, v) = e?;
            let key = Key::decode(k).ok_or_else(|| TableError::Corrupted {
                key: String::from_utf8_lossy(k).into(),
                why: "undecodable key".into(),
            })?;
            out.push((key, decode_record(k, &v)?));
        }
        Ok(OpResult::Entries(out))
    }

    /// Computes every write against the current state plus the batch's own earlier writes, then
    /// applies them as one heap batch. `single`: a lone compare-and-set that does not match is a
    /// result (`ok: false`), not an error.
    fn write(&mut self, ops: &[WriteOp], single: bool) -> Result<OpResult, TableError> {
        if ops.len() > TABLE_BATCH_OPS_MAX {
            return Err(TableError::LimitExceeded {
                what: "batch operations",
                got: ops.len() as u64,
                max: TABLE_BATCH_OPS_MAX as u64,
            });
        }
        // Read-your-writes inside the batch.
        let mut overlay: HashMap<Vec<u8>, Option<Versioned>> = HashMap::new();
        let mut batch = WriteBatch::new();
        let mut results = Vec::with_capacity(ops.len());
        for (index, op) in ops.iter().enumerate() {
            let k = op.key().encode()?;
            let current = match overlay.get(&k) {
                Some(v) => v.clone(),
                None => self.read(op.key())?,
            };
            let next_version = match &current {
                None => 1,
                Some(c) => c.version.checked_add(1).ok_or_else(|| TableError::Corrupted {
                    key: op.key().to_string(),
                    why: "version counter at its maximum".into(),
                })?,
            };
            let (new, result) = match op {
                WriteOp::Put { value, .. } => (
                    Some(Versioned { version: next_version, value: value.clone() }),
                    WriteResult::Put { version: next_version },
                ),
                WriteOp::Delete { .. } => (None, WriteResult::Deleted { existed: current.is_some() }),
                WriteOp::Cas { expect, new, .. } => {
                    let ok = match (expect, &current) {
                        (Expect::Absent, None) => true,
                        (Expect::Value(v), Some(c)) => *v == c.value,
                        (Expect::Version(n), Some(c)) => *n == c.version,
                        _ => false,
                    };
                    if !ok {
                        if single {
                            return Ok(OpResult::Written {
                                lsn: 0,
                                results: vec![WriteResult::Cas { ok: false, current }],
                            });
                        }
                        return Err(TableError::CasFailed { index });
                    }
                    let new = new.clone().map(|value| Versioned { version: next_version, value });
                    (new, WriteResult::Cas { ok: true, current })
                }
                WriteOp::Update { path, update, .. } => {
                    let mut doc = current.map_or_else(|| Value::Map(Default::default()), |c| c.value);
                    let at = doc.update(path, update)?;
                    (
                        Some(Versioned { version: next_version, value: doc }),
                        WriteResult::Updated { value: at, version: next_version },
                    )
                }
            };
            match &new {
                Some(v) => {
                    let rec = encode_record(v.version, &v.value)?;
                    batch.put(&k, &rec)?;
                }
                None => {
                    batch.delete(&k)?;
                }
            }
            overlay.insert(k, new);
            results.push(result);
        }
        let lsn =
            if self.deferred_log { self.heap.apply_deferred(&batch)? } else { self.heap.apply(&batch)? };
        Ok(OpResult::Written { lsn, results })
    }
}

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
        s.execute(&TableOp::Write(put("a", 1))).unwrap();
        s.execute(&TableOp::Write(put("a", 2))).unwrap();
        let got = s.execute(&TableOp::Get { key: "a".into() }).unwrap();
        assert_eq!(got, OpResult::Value(Some(Versioned { version: 2, value: Value::Int(2) })));
        let cas = |expect, new| TableOp::Write(WriteOp::Cas { key: "a".into(), expect, new });
        match s.execute(&cas(Expect::Version(1), Some(Value::Int(9)))).unwrap() {
            OpResult::Written { results, .. } => {
                assert!(matches!(results[0], WriteResult::Cas { ok: false, .. }))
            }
            r => panic!("{r:?}"),
        }
        s.execute(&cas(Expect::Value(Value::Int(2)), Some(Value::Int(3)))).unwrap();
        // A batch with a failing CAS writes nothing, not even its earlier puts.
        let b = TableOp::Batch(vec![
            put("b", 1),
            WriteOp::Cas { key: "a".into(), expect: Expect::Absent, new: None },
        ]);
        assert!(matches!(s.execute(&b), Err(TableError::CasFailed { index: 1 })));
        assert_eq!(s.execute(&TableOp::Contains { key: "b".into() }).unwrap(), OpResult::Bool(false));
        // Read-your-writes inside a batch.
        let b = TableOp::Batch(vec![
            put("c", 1),
            WriteOp::Update { key: "c".into(), path: vec![], update: Update::Increment(Value::Int(4)) },
        ]);
        s.execute(&b).unwrap();
        let got = s.execute(&TableOp::Get { key: "c".into() }).unwrap();
        assert_eq!(got, OpResult::Value(Some(Versioned { version: 2, value: Value::Int(5) })));
    }

    #[test]
    fn partial_update_of_a_document() {
        let mut s = shard();
        let op =
            |path: Vec<PathSeg>, update| TableOp::Write(WriteOp::Update { key: "bob".into(), path, update });
        s.execute(&op(vec!["visits".into()], Update::Increment(Value::Int(1)))).unwrap();
        s.execute(&op(vec!["visits".into()], Update::Increment(Value::Int(1)))).unwrap();
        s.execute(&op(vec!["friends".into()], Update::Append(Value::Str("amy".into())))).unwrap();
        let r = s.execute(&TableOp::Get { key: "bob".into() }).unwrap();
        let OpResult::Value(Some(v)) = r else { panic!() };
        assert_eq!(v.value.to_json(), serde_json::json!({"visits": 2, "friends": ["amy"]}));
        // A type error leaves the document as it was.
        assert!(s.execute(&op(vec!["friends".into()], Update::Increment(Value::Int(1)))).is_err());
        assert_eq!(s.execute(&TableOp::Get { key: "bob".into() }).unwrap(), OpResult::Value(Some(v)));
    }

    #[test]
    fn scans_and_prefixes_with_limits() {
        let mut s = shard();
        for k in ["user:a", "user:b", "user:c", "usez", "other"] {
            s.execute(&TableOp::Write(put(k, 1))).unwrap();
        }
        s.execute(&TableOp::Write(WriteOp::Put { key: Key::Int(-5), value: Value::Null })).unwrap();
        let keys = |r: OpResult| match r {
            OpResult::Entries(e) => e.into_iter().map(|(k, _)| k).collect::<Vec<_>>(),
            r => panic!("{r:?}"),
        };
        let p = s.execute(&TableOp::Prefix { prefix: "user:".into(), limit: 10, reverse: true }).unwrap();
        assert_eq!(keys(p), vec![Key::from("user:c"), "user:b".into(), "user:a".into()]);
        let all = s
            .execute(&TableOp::Scan {
                start: Bound::Unbounded,
                end: Bound::Unbounded,
                limit: 2,
                reverse: false,
            })
            .unwrap();
        assert_eq!(keys(all), vec![Key::Int(-5), "other".into()]);
        let over = TableOp::Scan {
            start: Bound::Unbounded,
            end: Bound::Unbounded,
            limit: SCAN_LIMIT_MAX + 1,
            reverse: false,
        };
        assert!(matches!(s.execute(&over), Err(TableError::LimitExceeded { .. })));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn shard_matches_a_btreemap(ops in prop::collection::vec((0u8..4, 0i64..30, any::<i32>()), 1..150)) {
            let mut s = shard();
            let mut model: BTreeMap<i64, (u64, i64)> = BTreeMap::new();
            for (kind, k, v) in ops {
                let key = Key::Int(k);
                match kind {
                    0 => {
                        s.execute(&TableOp::Write(WriteOp::Put { key, value: Value::Int(v as i64) })).unwrap();
                        let ver = model.get(&k).map_or(1, |e| e.0 + 1);
                        model.insert(k, (ver, v as i64));
                    }
                    1 => {
                        s.execute(&TableOp::Write(WriteOp::Delete { key })).unwrap();
                        model.remove(&k);
                    }
                    2 => {
                        let op = WriteOp::Update { key, path: vec![], update: Update::Increment(Value::Int(1)) };
                        let r = s.execute(&TableOp::Write(op));
                        match model.get(&k).copied() {
                            Some((ver, n)) => { r.unwrap(); model.insert(k, (ver + 1, n + 1)); }
                            // A missing key starts as an empty map: incrementing it is a type error.
                            None => prop_assert!(r.is_err()),
                        }
                    }
                    _ => {
                        let got = s.execute(&TableOp::Get { key }).unwrap();
                        let want = model.get(&k).map(|&(version, n)| Versioned { version, value: Value::Int(n) });
                        prop_assert_eq!(got, OpResult::Value(want));
                    }
                }
            }
            let all = s.execute(&TableOp::Scan { start: Bound::Unbounded, end: Bound::Unbounded, limit: 1000, reverse: false }).unwrap();
            let want: Vec<(Key, Versioned)> = model.iter().map(|(&k, &(version, n))| (Key::Int(k), Versioned { version, value: Value::Int(n) })).collect();
            prop_assert_eq!(all, OpResult::Entries(want));
            prop_assert_eq!(s.execute(&TableOp::Count).unwrap(), OpResult::Count(model.len() as u64));
        }
    }
}
