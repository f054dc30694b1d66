//! The queue service's heap: every queue's options, items, delivery counts and dedup keys. One
//! heap for the node (`<dir>/queues/shard-0000.heap`; in a cluster
//! `<dir>/replicated/queues/shard-0000.heap`, the service's replicated copy), owned by the queue service actor; every
//! change is one `WriteBatch`, so one op-log record.
//!
//! Keys and values (`q` is the queue name as `u16` BE length + bytes, so one queue's records
//! are contiguous and no name is a prefix of another's key; `seq` is `u64` BE, so items are in
//! seq order):
//!
//! ```text
//! "C" + name         QueueRec { max_len, max_deliveries, visibility_ms, dedup_window_ms,
//!                               dead_letter, seq_floor }        (format byte 1, then postcard)
//! "I" + q + seq      the item's value (`Value::encode`)
//! "M" + q + seq      ItemMeta { deliveries, delayed_until_ms, history }   (format byte 1, postcard)
//!                    absent: never delivered, not delayed
//! "K" + q + key      DedupRec { seq, until_ms }                 (format byte 1, postcard)
//! ```
//!
//! Times in records are wall-clock milliseconds since the Unix epoch (they must survive a
//! restart); the actor converts them to its monotonic clock when it loads them.
//!
//! Seqs never repeat: a push at or past `seq_floor` raises it by `SEQ_BLOCK` in the same record,
//! and an open starts at `max(seq_floor, last item + 1)`. A delivery's number is written before
//! the delivery is answered, so a restart brings an in-flight item back with its count kept, and
//! a receipt from before the restart is stale.

use std::collections::BTreeMap;

use heapgrid_heap::{Heap, WriteBatch};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::GridError;
use crate::record;
use crate::value::Value;

/// Seqs reserved by one write of a queue's record.
pub const SEQ_BLOCK: u64 = 4096;
/// Most attempts one item's history keeps (the newest).
pub const HISTORY_MAX: usize = 32;

/// A queue's stored options and seq reservation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRec {
    pub max_len: Option<u64>,
    pub max_deliveries: u32,
    pub visibility_ms: u64,
    pub dedup_window_ms: u64,
    /// Where items that used up their deliveries go (`None`: they are redelivered forever).
    pub dead_letter: Option<String>,
    /// Seqs below this may have been issued.
    pub seq_floor: u64,
}

/// How one delivery ended, short of an ack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Nacked,
    /// Its visibility deadline passed.
    Expired,
    /// Its session ended.
    SessionEnded,
    /// The node restarted while it was in flight.
    Restarted,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Nacked => "nacked",
            Outcome::Expired => "expired",
            Outcome::SessionEnded => "session ended",
            Outcome::Restarted => "restarted",
        }
    }
}

/// One failed delivery.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub delivery: u32,
    pub outcome: Outcome,
    /// Wall-clock ms.
    pub at_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemMeta {
    pub deliveries: u32,
    /// Wall-clock ms the item waits until (a delayed push or nack).
    pub delayed_until_ms: Option<u64>,
    /// The newest failed deliveries, oldest first (at most `HISTORY_MAX`).
    pub history: Vec<Attempt>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupRec {
    pub seq: u64,
    /// Wall-clock ms.
    pub until_ms: u64,
}

/// One stored item, read at open.
#[derive(Debug)]
pub struct LoadedItem {
    pub seq: u64,
    pub meta: ItemMeta,
}

/// One queue, read at open.
#[derive(Debug, Default)]
pub struct LoadedQueue {
    pub rec: Option<QueueRec>,
    pub items: Vec<LoadedItem>,
    pub dedup: Vec<(String, DedupRec)>,
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> GridError {
    GridError::Corrupted(format!("queue store {what}: {e}"))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, GridError> {
    record::encode("queue record", v)
}

fn decode<T: DeserializeOwned>(what: &str, b: &[u8]) -> Result<T, GridError> {
    record::decode(&format!("queue store {what}"), b)
}

/// `prefix` + the queue name, length-prefixed.
fn qkey(prefix: u8, queue: &str, extra: usize) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + queue.len() + extra);
    k.push(prefix);
    k.extend_from_slice(&(queue.len() as u16).to_be_bytes());
    k.extend_from_slice(queue.as_bytes());
    k
}

fn item_key(prefix: u8, queue: &str, seq: u64) -> Vec<u8> {
    let mut k = qkey(prefix, queue, 8);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn dedup_key(queue: &str, key: &str) -> Vec<u8> {
    let mut k = qkey(b'K', queue, key.len());
    k.extend_from_slice(key.as_bytes());
    k
}

/// Splits `q + rest` into the queue name and the rest.
fn split_q(k: &[u8]) -> Result<(String, &[u8]), GridError> {
    let (len, rest) = k.split_at_checked(2).ok_or_else(|| corrupt("key", "short"))?;
    let len = u16::from_be_bytes([len[0], len[1]]) as usize;
    let (name, rest) = rest.split_at_checked(len).ok_or_else(|| corrupt("key", "short name"))?;
    let name = String::from_utf8(name.to_vec()).map_err(|e| corrupt("queue name", e))?;
    Ok((name, rest))
}

fn seq_of(b: &[u8]) -> Result<u64, GridError> {
    b.try_into().map(u64::from_be_bytes).map_err(|_| corrupt("item key", "seq is not 8 bytes"))
}

/// Every queue's records.
pub fn load(heap: &Heap) -> Result<BTreeMap<String, LoadedQueue>, GridError> {
    let mut out: BTreeMap<String, LoadedQueue> = BTreeMap::new();
    for e in heap.iter() {
        let (k, v) = e?;
        match k.split_first() {
            Some((b'C', name)) => {
                let name = String::from_utf8(name.to_vec()).map_err(|e| corrupt("queue name", e))?;
                out.entry(name).or_default().rec = Some(decode("queue", &v)?);
            }
            Some((b'I', rest)) => {
                let (name, seq) = split_q(rest)?;
                let seq = seq_of(seq)?;
                Value::decode(&v).map_err(|e| corrupt("item value", e))?;
                out.entry(name).or_default().items.push(LoadedItem { seq, meta: ItemMeta::default() });
            }
            Some((b'M', rest)) => {
                let (name, seq) = split_q(rest)?;
                let seq = seq_of(seq)?;
                let meta: ItemMeta = decode("item meta", &v)?;
                // Items come before their meta ("I" < "M"), each queue's in seq order.
                let q = out.entry(name.clone()).or_default();
                match q.items.binary_search_by_key(&seq, |i| i.seq) {
                    Ok(i) => q.items[i].meta = meta,
                    Err(_) => {
                        return Err(corrupt("item meta", format!("queue {name} item {seq} has no value")));
                    }
                }
            }
            Some((b'K', rest)) => {
                let (name, key) = split_q(rest)?;
                let key = String::from_utf8(key.to_vec()).map_err(|e| corrupt("dedup key", e))?;
                out.entry(name).or_default().dedup.push((key, decode("dedup", &v)?));
            }
            _ => return Err(corrupt("key", String::from_utf8_lossy(k))),
        }
    }
    Ok(out)
}

/// One change: the records it puts and deletes, applied as one op-log record by `commit`.
#[derive(Default)]
pub struct Change {
    batch: WriteBatch,
    bytes: usize,
}

impl Change {
    pub fn queue(&mut self, name: &str, rec: &QueueRec) -> Result<&mut Self, GridError> {
        let mut k = Vec::with_capacity(1 + name.len());
        k.push(b'C');
        k.extend_from_slice(name.as_bytes());
        self.batch.put(&k, &encode(rec)?)?;
        Ok(self)
    }
    pub fn item(&mut self, queue: &str, seq: u64, value: &[u8]) -> Result<&mut Self, GridError> {
        self.batch.put(&item_key(b'I', queue, seq), value)?;
        self.bytes += value.len() + queue.len() + 11;
        Ok(self)
    }
    pub fn meta(&mut self, queue: &str, seq: u64, meta: &ItemMeta) -> Result<&mut Self, GridError> {
        self.batch.put(&item_key(b'M', queue, seq), &encode(meta)?)?;
        Ok(self)
    }
    /// Deletes the item and its meta record.
    pub fn item_gone(&mut self, queue: &str, seq: u64) -> Result<&mut Self, GridError> {
        self.batch.delete(&item_key(b'I', queue, seq))?;
        self.batch.delete(&item_key(b'M', queue, seq))?;
        Ok(self)
    }
    pub fn dedup(&mut self, queue: &str, key: &str, rec: &DedupRec) -> Result<&mut Self, GridError> {
        self.batch.put(&dedup_key(queue, key), &encode(rec)?)?;
        Ok(self)
    }
    pub fn dedup_gone(&mut self, queue: &str, key: &str) -> Result<&mut Self, GridError> {
        self.batch.delete(&dedup_key(queue, key))?;
        Ok(self)
    }
    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }
    /// Operations so far.
    pub fn len(&self) -> usize {
        self.batch.len()
    }
    /// Bytes of keys and values so far (about).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// The queue service's heap and its record codecs.
pub struct QueueStore {
    heap: Heap,
}

impl QueueStore {
    /// Reads every queue.
    pub fn open(heap: Heap) -> Result<(QueueStore, BTreeMap<String, LoadedQueue>), GridError> {
        let loaded = load(&heap)?;
        Ok((QueueStore { heap }, loaded))
    }

    /// The stored value of an item.
    pub fn value(&self, queue: &str, seq: u64) -> Result<Value, GridError> {
        match self.heap.get_ref(&item_key(b'I', queue, seq))? {
            Some(v) => Value::decode(&v).map_err(|e| corrupt("item value", e)),
            None => Err(corrupt("item", format!("queue {queue} item {seq} has no value"))),
        }
    }

    /// The stored value of an item and its encoded length.
    pub fn value_sized(&self, queue: &str, seq: u64) -> Result<(Value, usize), GridError> {
        match self.heap.get_ref(&item_key(b'I', queue, seq))? {
            Some(v) => Ok((Value::decode(&v).map_err(|e| corrupt("item value", e))?, v.len())),
            None => Err(corrupt("item", format!("queue {queue} item {seq} has no value"))),
        }
    }

    /// An item's meta record (the default if it has none).
    pub fn meta(&self, queue: &str, seq: u64) -> Result<ItemMeta, GridError> {
        match self.heap.get_ref(&item_key(b'M', queue, seq))? {
            Some(v) => decode("item meta", &v),
            None => Ok(ItemMeta::default()),
        }
    }

    /// Applies `change` as one op-log record (queued: the gate writes it); its LSN.
    pub fn commit(&mut self, change: &Change) -> Result<u64, GridError> {
        if change.is_empty() {
            return Ok(0);
        }
        Ok(self.heap.apply_deferred(&change.batch)?)
    }

    /// The debug checker (`check_heap` over this store's heap).
    pub fn check(&self) -> Result<(), GridError> {
        check_heap(&self.heap)
    }
}

/// The debug checker of a queue heap (`heapgrid check` runs it): every record decodes, every
/// meta has an item, every item and dedup key belongs to a queue with a record and names a seq
/// below its `seq_floor`, and no history is longer than `HISTORY_MAX`.
pub fn check_heap(heap: &Heap) -> Result<(), GridError> {
    let queues = load(heap)?;
    for (name, q) in &queues {
        let Some(rec) = &q.rec else {
            if q.items.is_empty() && q.dedup.is_empty() {
                continue;
            }
            return Err(corrupt("queue", format!("{name} has items but no record")));
        };
        if let Some(i) = q.items.iter().find(|i| i.seq >= rec.seq_floor) {
            return Err(corrupt(
                "item",
                format!("queue {name} item {} is at or past its floor {}", i.seq, rec.seq_floor),
            ));
        }
        if let Some((k, d)) = q.dedup.iter().find(|(_, d)| d.seq >= rec.seq_floor) {
            return Err(corrupt("dedup", format!("queue {name} key {k} names seq {} past the floor", d.seq)));
        }
        if let Some(i) = q.items.iter().find(|i| i.meta.history.len() > HISTORY_MAX) {
            return Err(corrupt("item meta", format!("queue {name} item {} has a history too long", i.seq)));
        }
    }
    Ok(())
}

crate::gate::impl_heap_owner!(QueueStore);
