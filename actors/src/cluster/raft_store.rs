//! The Raft group's storage: its log, its vote and the cluster map it keeps (the state machine),
//! in one heap file, `<dir>/cluster/raft.heap` (fsync always: openraft requires the vote and
//! the log durable before it goes on).
//!
//! Keys (every value is a format byte, `FORMAT` (2), then postcard, `record.rs`):
//! - `"n"` → the node id the store belongs to (another id is refused at open);
//! - `"v"` → the vote;
//! - `"c"` → the last committed log id;
//! - `"p"` → the last purged log id;
//! - `"l"` + index (u64 BE) → a log entry (`Entry<MapRaft>`: a `MapCmd`, a membership, or blank);
//! - `"m"` → `MachineState`: the map, the last applied log id and membership (written with
//!   every applied group of entries, so a restart needs no replay);
//! - `"s"` → the last built or installed snapshot (`StoredSnapshot`: its meta and bytes).
//!
//! Invariant: the log has no hole (a conflict cut removes the suffix in one batch; a purge
//! records the purged id and removes the prefix in one batch); `"m"` only moves forward.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use heapgrid_heap::{FsyncPolicy, Heap, HeapOptions, WriteBatch};
use openraft::storage::{LogState, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, RaftStorage,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::map::{ClusterMap, MapCmd};
use super::raft::{MapRaft, MapReply};
use crate::error::GridError;
use crate::record;

/// The format byte of every value here: 2 since `Placement::in_sync_version` and
/// `SetInSync::based_on` (2026-12-02). A store of format 1 is refused at open, by name.
const FORMAT: u8 = 2;

fn encode<T: Serialize>(what: &str, v: &T) -> Result<Vec<u8>, GridError> {
    record::encode_as(FORMAT, what, v)
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, b: &[u8]) -> Result<T, GridError> {
    record::decode_as(FORMAT, what, b)
}

type Nid = u64;
type Membership = StoredMembership<Nid, openraft::BasicNode>;
type SErr = StorageError<Nid>;

/// Log writes between checkpoints of the Raft heap (its op log stays short).
const CHECKPOINT_EVERY: u64 = 1024;

/// The state machine as stored under `"m"`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MachineState {
    pub last_applied: Option<LogId<Nid>>,
    pub membership: Membership,
    pub map: ClusterMap,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<Nid, openraft::BasicNode>,
    data: Vec<u8>,
}

struct Inner {
    heap: Heap,
    machine: MachineState,
    writes: u64,
    snapshots: u64,
    /// Every applied change of the map is published here.
    published: watch::Sender<ClusterMap>,
}

/// The store; clones share it (openraft wants a log reader and a snapshot builder beside it).
#[derive(Clone)]
pub struct RaftStore {
    inner: Arc<Mutex<Inner>>,
}

fn io(e: impl Into<GridError>) -> AnyError {
    AnyError::new(&e.into())
}

fn log_key(index: u64) -> [u8; 9] {
    let mut k = [b'l'; 9];
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

impl Inner {
    fn read<T: for<'de> Deserialize<'de>>(&self, key: &[u8], what: &str) -> Result<Option<T>, GridError> {
        match self.heap.get(key)? {
            Some(b) => Ok(Some(decode(what, &b)?)),
            None => Ok(None),
        }
    }

    /// Applies `batch` and waits until it is durable.
    fn commit(&mut self, batch: &WriteBatch) -> Result<(), GridError> {
        let lsn = self.heap.apply(batch)?;
        if let Some(d) = self.heap.durability() {
            d.wait(lsn)?;
        }
        self.writes += 1;
        if self.writes.is_multiple_of(CHECKPOINT_EVERY) {
            self.heap.checkpoint()?;
        }
        Ok(())
    }

    fn put<T: Serialize>(&mut self, key: &[u8], what: &str, v: &T) -> Result<(), GridError> {
        let mut b = WriteBatch::new();
        b.put(key, &encode(what, v)?)?;
        self.commit(&b)
    }

    fn last_log_id(&self) -> Result<Option<LogId<Nid>>, GridError> {
        let last = self.heap.range(&b"l"[..]..&b"m"[..]).next_back();
        match last {
            Some(e) => {
                let (_, v) = e?;
                let entry: Entry<MapRaft> = decode("raft log entry", &v)?;
                Ok(Some(entry.log_id))
            }
            None => Ok(None),
        }
    }

    /// Removes the log entries with indexes in `range`, in one batch.
    fn remove_entries(
        &mut self,
        from: u64,
        to: u64,
        also: Option<(&[u8], Vec<u8>)>,
    ) -> Result<(), GridError> {
        let mut b = WriteBatch::new();
        for e in self.heap.range(&log_key(from)[..]..=&log_key(to)[..]) {
            let (k, _) = e?;
            b.delete(k)?;
        }
        if let Some((k, v)) = also {
            b.put(k, &v)?;
        }
        if b.is_empty() {
            return Ok(());
        }
        self.commit(&b)
    }

    fn snapshot_of_machine(&mut self) -> Result<StoredSnapshot, GridError> {
        self.snapshots += 1;
        let m = &self.machine;
        let id = match &m.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, self.snapshots),
            None => format!("none-{}", self.snapshots),
        };
        let meta = SnapshotMeta {
            last_log_id: m.last_applied,
            last_membership: m.membership.clone(),
            snapshot_id: id,
        };
        let data = encode("raft snapshot", &self.machine)?;
        Ok(StoredSnapshot { meta, data })
    }
}

impl RaftStore {
    /// Opens (creating) the store of node `node` in `dir` (a `cluster` directory of the node's
    /// data); a store another node id created is refused.
    pub fn open(dir: &Path, node: Nid) -> Result<RaftStore, GridError> {
        std::fs::create_dir_all(dir).map_err(|e| GridError::Storage(format!("{}: {e}", dir.display())))?;
        let opts = HeapOptions { fsync: FsyncPolicy::Always, ..HeapOptions::default() };
        let mut heap = Heap::open(dir.join("raft.heap"), opts)?;
        match heap.get(b"n")? {
            Some(b) => {
                let owner: Nid = decode("raft node id", &b)?;
                if owner != node {
                    return Err(GridError::Invalid(format!(
                        "{} holds the cluster state of node {owner}, not node {node}",
                        dir.display()
                    )));
                }
            }
            None => {
                let mut b = WriteBatch::new();
                b.put(b"n", &encode("raft node id", &node)?)?;
                let lsn = heap.apply(&b)?;
                if let Some(d) = heap.durability() {
                    d.wait(lsn)?;
                }
            }
        }
        let machine = match heap.get(b"m")? {
            Some(b) => decode("raft state machine", &b)?,
            None => MachineState::default(),
        };
        let (published, _) = watch::channel(machine.map.clone());
        let inner = Inner { heap, machine, writes: 0, snapshots: 0, published };
        Ok(RaftStore { inner: Arc::new(Mutex::new(inner)) })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The map as last applied, and its changes.
    pub fn watch(&self) -> watch::Receiver<ClusterMap> {
        self.lock().published.subscribe()
    }

    /// The map as last applied.
    pub fn map(&self) -> ClusterMap {
        self.lock().machine.map.clone()
    }
}

fn bound_index(b: Bound<&u64>, start: bool) -> Option<u64> {
    match (b, start) {
        (Bound::Included(&i), _) => Some(i),
        (Bound::Excluded(&i), true) => i.checked_add(1),
        (Bound::Excluded(&i), false) => i.checked_sub(1),
        (Bound::Unbounded, true) => Some(0),
        (Bound::Unbounded, false) => Some(u64::MAX),
    }
}

impl RaftLogReader<MapRaft> for RaftStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<MapRaft>>, SErr> {
        let (Some(from), Some(to)) =
            (bound_index(range.start_bound(), true), bound_index(range.end_bound(), false))
        else {
            return Ok(Vec::new());
        };
        if from > to {
            return Ok(Vec::new());
        }
        let inner = self.lock();
        let mut out = Vec::new();
        for e in inner.heap.range(&log_key(from)[..]..=&log_key(to)[..]) {
            let (_, v) = e.map_err(|e| StorageIOError::read_logs(io(e)))?;
            out.push(decode("raft log entry", &v).map_err(|e| StorageIOError::read_logs(io(e)))?);
        }
        Ok(out)
    }
}

impl RaftSnapshotBuilder<MapRaft> for RaftStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<MapRaft>, SErr> {
        let mut inner = self.lock();
        let snap = inner.snapshot_of_machine().map_err(|e| StorageIOError::write_snapshot(None, io(e)))?;
        inner.put(b"s", "raft snapshot", &snap).map_err(|e| StorageIOError::write_snapshot(None, io(e)))?;
        Ok(Snapshot { meta: snap.meta, snapshot: Box::new(Cursor::new(snap.data)) })
    }
}

impl RaftStorage<MapRaft> for RaftStore {
    type LogReader = RaftStore;
    type SnapshotBuilder = RaftStore;

    async fn save_vote(&mut self, vote: &Vote<Nid>) -> Result<(), SErr> {
        self.lock().put(b"v", "raft vote", vote).map_err(|e| StorageIOError::write_vote(io(e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<Nid>>, SErr> {
        self.lock().read(b"v", "raft vote").map_err(|e| StorageIOError::read_vote(io(e)).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId<Nid>>) -> Result<(), SErr> {
        self.lock().put(b"c", "raft committed", &committed).map_err(|e| StorageIOError::write(io(e)).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<Nid>>, SErr> {
        let c: Option<Option<LogId<Nid>>> =
            self.lock().read(b"c", "raft committed").map_err(|e| StorageIOError::read(io(e)))?;
        Ok(c.flatten())
    }

    async fn get_log_state(&mut self) -> Result<LogState<MapRaft>, SErr> {
        let inner = self.lock();
        let purged: Option<LogId<Nid>> =
            inner.read(b"p", "raft purged").map_err(|e| StorageIOError::read_logs(io(e)))?;
        let last = inner.last_log_id().map_err(|e| StorageIOError::read_logs(io(e)))?.or(purged);
        Ok(LogState { last_purged_log_id: purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn append_to_log<I>(&mut self, entries: I) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<MapRaft>> + OptionalSend,
    {
        let mut inner = self.lock();
        let mut b = WriteBatch::new();
        for e in entries {
            let bytes = encode("raft log entry", &e).map_err(|e| StorageIOError::write_logs(io(e)))?;
            b.put(&log_key(e.log_id.index), &bytes).map_err(|e| StorageIOError::write_logs(io(e)))?;
        }
        if b.is_empty() {
            return Ok(());
        }
        inner.commit(&b).map_err(|e| StorageIOError::write_logs(io(e)).into())
    }

    async fn delete_conflict_logs_since(&mut self, log_id: LogId<Nid>) -> Result<(), SErr> {
        self.lock()
            .remove_entries(log_id.index, u64::MAX, None)
            .map_err(|e| StorageIOError::write_logs(io(e)).into())
    }

    async fn purge_logs_upto(&mut self, log_id: LogId<Nid>) -> Result<(), SErr> {
        let mut inner = self.lock();
        let purged = encode("raft purged", &Some(log_id)).map_err(|e| StorageIOError::write_logs(io(e)))?;
        inner
            .remove_entries(0, log_id.index, Some((b"p", purged)))
            .map_err(|e| StorageIOError::write_logs(io(e)).into())
    }

    async fn last_applied_state(&mut self) -> Result<(Option<LogId<Nid>>, Membership), SErr> {
        let inner = self.lock();
        Ok((inner.machine.last_applied, inner.machine.membership.clone()))
    }

    async fn apply_to_state_machine(&mut self, entries: &[Entry<MapRaft>]) -> Result<Vec<MapReply>, SErr> {
        let mut inner = self.lock();
        let mut replies = Vec::with_capacity(entries.len());
        let mut machine = inner.machine.clone();
        for e in entries {
            machine.last_applied = Some(e.log_id);
            let reply = match &e.payload {
                EntryPayload::Blank => MapReply { version: machine.map.version, error: None },
                EntryPayload::Normal(cmd) => apply_cmd(&mut machine.map, cmd.clone()),
                EntryPayload::Membership(m) => {
                    machine.membership = StoredMembership::new(Some(e.log_id), m.clone());
                    MapReply { version: machine.map.version, error: None }
                }
            };
            replies.push(reply);
        }
        inner
            .put(b"m", "raft state machine", &machine)
            .map_err(|e| StorageIOError::write_state_machine(io(e)))?;
        let changed = machine.map != inner.machine.map;
        inner.machine = machine;
        if changed {
            let map = inner.machine.map.clone();
            inner.published.send_replace(map);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<Nid, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        let data = snapshot.into_inner();
        let machine: MachineState = decode("raft snapshot", &data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), io(e)))?;
        let mut inner = self.lock();
        let stored = StoredSnapshot { meta: meta.clone(), data };
        let mut b = WriteBatch::new();
        let err = |e: GridError| StorageIOError::write_snapshot(Some(meta.signature()), io(e));
        b.put(b"s", &encode("raft snapshot", &stored).map_err(err)?).map_err(|e| err(e.into()))?;
        b.put(b"m", &encode("raft state machine", &machine).map_err(err)?).map_err(|e| err(e.into()))?;
        inner.commit(&b).map_err(err)?;
        inner.machine = machine;
        let map = inner.machine.map.clone();
        inner.published.send_replace(map);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<MapRaft>>, SErr> {
        let inner = self.lock();
        let s: Option<StoredSnapshot> =
            inner.read(b"s", "raft snapshot").map_err(|e| StorageIOError::read_snapshot(None, io(e)))?;
        Ok(s.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}

/// One command applied to the map; a refused one leaves it unchanged and says why.
fn apply_cmd(map: &mut ClusterMap, cmd: MapCmd) -> MapReply {
    match map.apply(cmd) {
        Ok(()) => MapReply { version: map.version, error: None },
        Err(e) => MapReply { version: map.version, error: Some(format!("{e:?}")) },
    }
}
