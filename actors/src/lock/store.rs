//! The lock service's heap: sessions, each lock's last fence and holder, each semaphore's size
//! and permits, and the node's lock epoch. One heap for the node (`<dir>/locks/shard-0000.heap`;
//! in a cluster `<dir>/replicated/locks/shard-0000.heap`, the service's replicated copy),
//! owned by the lock service actor; every change is one `WriteBatch`, so one op-log record.
//!
//! Keys and values (every value is a format byte, 1, then postcard):
//!
//! ```text
//! "E"              u64 LE: the lock epoch, +1 on every open (synced before anything is granted)
//! "N"              u64 LE: the last session id issued (ids are never reused)
//! "S" + id (BE)    SessionRec { secret, ttl_ms }
//! "L" + name       LockRec { last_fence, holder: Option<(session, fence)>, reentry_max, lock_delay_ms }
//! "P" + name       SemRec { size, held: [(session, permits)] }
//! ```
//!
//! Fences are `epoch << EPOCH_SHIFT | counter` at least: a lock opened in epoch `e` issues fences
//! above `e << EPOCH_SHIFT` (`fence_floor`). A grant whose record was lost with the page cache
//! (power loss under a non-`always` policy) can therefore never be issued again: the next open
//! has a larger epoch. The first open has epoch 0, so a node that never restarts issues 1, 2, 3.
//! In a cluster nothing is written at open (`open_replicated`): the epoch rises when the node
//! becomes the service's primary (`promote`), to at least the service's epoch in the map, as a
//! replicated record.
//!
//! Lease deadlines, session deadlines and waiters are not stored: after a restart a recorded
//! holder keeps its grant for one session ttl counted from the restart, and for good only if its
//! session reattaches (shared LOCKS.md, "Restart").

use heapgrid_heap::{Heap, WriteBatch};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::SessionId;
use crate::error::GridError;
use crate::record;

/// Fences issued in epoch `e` are above `e << EPOCH_SHIFT`.
pub const EPOCH_SHIFT: u32 = 40;

const EPOCH_KEY: &[u8] = b"E";
const NEXT_SESSION_KEY: &[u8] = b"N";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRec {
    pub secret: u64,
    pub ttl_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRec {
    pub last_fence: u64,
    pub holder: Option<(SessionId, u64)>,
    pub reentry_max: u32,
    pub lock_delay_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SemRec {
    pub size: u32,
    pub held: Vec<(SessionId, u32)>,
}

/// Everything the heap holds, read at open.
#[derive(Debug, Default)]
pub struct Loaded {
    pub epoch: u64,
    pub last_session: SessionId,
    pub sessions: Vec<(SessionId, SessionRec)>,
    pub locks: Vec<(String, LockRec)>,
    pub sems: Vec<(String, SemRec)>,
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> GridError {
    GridError::Corrupted(format!("lock store {what}: {e}"))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, GridError> {
    record::encode("lock record", v)
}

fn decode<T: DeserializeOwned>(what: &str, b: &[u8]) -> Result<T, GridError> {
    record::decode(&format!("lock store {what}"), b)
}

fn u64_of(what: &str, b: &[u8]) -> Result<u64, GridError> {
    b.try_into().map(u64::from_le_bytes).map_err(|_| corrupt(what, "not 8 bytes"))
}

fn key(prefix: u8, name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(prefix);
    k.extend_from_slice(name);
    k
}

/// The smallest fence a lock may issue in `epoch` is above this.
pub fn fence_floor(epoch: u64) -> u64 {
    epoch << EPOCH_SHIFT
}

/// The lock service's heap and its record codecs.
pub struct LockStore {
    heap: Heap,
}

/// One change: the records it puts and deletes, applied as one op-log record by `commit`.
#[derive(Default)]
pub struct Change {
    batch: WriteBatch,
}

impl Change {
    pub fn session(&mut self, id: SessionId, rec: &SessionRec) -> Result<&mut Self, GridError> {
        self.batch.put(&key(b'S', &id.to_be_bytes()), &encode(rec)?)?;
        Ok(self)
    }
    pub fn last_session(&mut self, id: SessionId) -> Result<&mut Self, GridError> {
        self.batch.put(NEXT_SESSION_KEY, &id.to_le_bytes())?;
        Ok(self)
    }
    pub fn session_gone(&mut self, id: SessionId) -> Result<&mut Self, GridError> {
        self.batch.delete(&key(b'S', &id.to_be_bytes()))?;
        Ok(self)
    }
    pub fn lock(&mut self, name: &str, rec: &LockRec) -> Result<&mut Self, GridError> {
        self.batch.put(&key(b'L', name.as_bytes()), &encode(rec)?)?;
        Ok(self)
    }
    pub fn sem(&mut self, name: &str, rec: &SemRec) -> Result<&mut Self, GridError> {
        self.batch.put(&key(b'P', name.as_bytes()), &encode(rec)?)?;
        Ok(self)
    }
    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }
}

impl LockStore {
    /// Reads everything and starts a new epoch: the raised epoch is applied and made durable
    /// (a checkpoint) before this returns, so no fence of this life can repeat one of a
    /// previous life, even one whose record a power loss took.
    pub fn open(mut heap: Heap) -> Result<(LockStore, Loaded), GridError> {
        let mut loaded = read(&heap)?;
        if !heap.is_empty() || heap.last_lsn() > 0 {
            loaded.epoch += 1;
        }
        check_epoch(loaded.epoch)?;
        let mut b = WriteBatch::new();
        b.put(EPOCH_KEY, &loaded.epoch.to_le_bytes())?;
        heap.apply(&b)?;
        heap.checkpoint()?;
        Ok((LockStore { heap }, loaded))
    }

    /// The store over a replicated heap (a cluster's lock service), opened without writing
    /// anything: the epoch rises when this node becomes the primary (`promote`).
    pub fn open_replicated(heap: Heap) -> LockStore {
        LockStore { heap }
    }

    /// Reads everything (a new primary loading the service) and raises the epoch to the larger
    /// of one above the stored one and `at_least` (the map's epoch of the service), as one
    /// record queued for the gate: fences issued from now on are above every fence any earlier
    /// primary or life issued that a client was answered with (its record precedes the answer,
    /// so a replica that took over holds it).
    pub fn promote(&mut self, at_least: u64) -> Result<Loaded, GridError> {
        let mut loaded = read(&self.heap)?;
        loaded.epoch = (loaded.epoch + 1).max(at_least);
        check_epoch(loaded.epoch)?;
        let mut b = WriteBatch::new();
        b.put(EPOCH_KEY, &loaded.epoch.to_le_bytes())?;
        self.heap.apply_deferred(&b)?;
        Ok(loaded)
    }
}

/// Everything a lock heap holds.
fn read(heap: &Heap) -> Result<Loaded, GridError> {
    let mut loaded = Loaded::default();
    for e in heap.iter() {
        let (k, v) = e?;
        match k.split_first() {
            Some((b'E', [])) => loaded.epoch = u64_of("epoch", &v)?,
            Some((b'N', [])) => loaded.last_session = u64_of("session counter", &v)?,
            Some((b'S', id)) => {
                let id = u64::from_be_bytes(id.try_into().map_err(|_| corrupt("session key", "length"))?);
                loaded.sessions.push((id, decode("session", &v)?));
            }
            Some((b'L', name)) => {
                let name = String::from_utf8(name.to_vec()).map_err(|e| corrupt("lock name", e))?;
                loaded.locks.push((name, decode("lock", &v)?));
            }
            Some((b'P', name)) => {
                let name = String::from_utf8(name.to_vec()).map_err(|e| corrupt("semaphore name", e))?;
                loaded.sems.push((name, decode("semaphore", &v)?));
            }
            _ => return Err(corrupt("key", String::from_utf8_lossy(k))),
        }
    }
    Ok(loaded)
}

fn check_epoch(epoch: u64) -> Result<(), GridError> {
    if epoch >= 1 << (63 - EPOCH_SHIFT) {
        return Err(GridError::LimitExceeded {
            what: "lock epochs".into(),
            got: epoch,
            max: (1 << (63 - EPOCH_SHIFT)) - 1,
        });
    }
    Ok(())
}

impl LockStore {
    /// The stored record of `name` (a default one if it was never granted).
    pub fn lock_rec(&self, name: &str) -> Result<LockRec, GridError> {
        match self.heap.get_ref(&key(b'L', name.as_bytes()))? {
            Some(v) => decode("lock", &v),
            None => Ok(LockRec::default()),
        }
    }

    /// The stored record of semaphore `name`, if any.
    pub fn sem_rec(&self, name: &str) -> Result<Option<SemRec>, GridError> {
        self.heap.get_ref(&key(b'P', name.as_bytes()))?.map(|v| decode("semaphore", &v)).transpose()
    }

    /// Names of every lock ever granted here, in order.
    pub fn lock_names(&self) -> Result<Vec<String>, GridError> {
        let mut out = Vec::new();
        for e in self.heap.range(&b"L"[..]..&b"M"[..]) {
            let (k, _) = e?;
            out.push(String::from_utf8_lossy(&k[1..]).into_owned());
        }
        Ok(out)
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

/// The debug checker of a lock heap (`heapgrid check` runs it): every record decodes, no holder's
/// fence is above its lock's last fence, no semaphore has more permits out than its size, and
/// every holder and permit names a stored session.
pub fn check_heap(heap: &Heap) -> Result<(), GridError> {
    let mut sessions = std::collections::HashSet::new();
    let mut holders = Vec::new();
    for e in heap.iter() {
        let (k, v) = e?;
        match k.first() {
            Some(b'S') => {
                decode::<SessionRec>("session", &v)?;
                sessions.insert(u64::from_be_bytes(
                    k[1..].try_into().map_err(|_| corrupt("session key", "length"))?,
                ));
            }
            Some(b'L') => {
                let r: LockRec = decode("lock", &v)?;
                if let Some((s, f)) = r.holder {
                    if f > r.last_fence {
                        return Err(corrupt(
                            "lock",
                            format!("holder fence {f} above last fence {}", r.last_fence),
                        ));
                    }
                    holders.push(s);
                }
            }
            Some(b'P') => {
                let r: SemRec = decode("semaphore", &v)?;
                let used: u64 = r.held.iter().map(|h| u64::from(h.1)).sum();
                if used > u64::from(r.size) {
                    return Err(corrupt("semaphore", format!("{used} permits held of {}", r.size)));
                }
                holders.extend(r.held.iter().map(|h| h.0));
            }
            _ => {}
        }
    }
    match holders.into_iter().find(|s| !sessions.contains(s)) {
        Some(s) => Err(corrupt("grant", format!("held by session {s}, which is not stored"))),
        None => Ok(()),
    }
}

crate::gate::impl_heap_owner!(LockStore);
