//! A `ShardLog` over a `Heap` (a replicated shard's data): each record's body is a `WriteBatch`
//! (its bytes), applied as one heap commit, so the replication lsn follows the heap's own lsn
//! from a recorded base. The base and the epoch history are kept in a sidecar file next to the
//! heap, `<heap>.repl`, rewritten (temporary file, fsync, rename) when they change: before the
//! first record of a new epoch, and around a snapshot install or a start over.
//!
//! The heap cannot undo a batch: a cut below the log's end is refused (`truncate_after` answers
//! false) and the endpoint starts over from a snapshot. The records kept for replicas behind are
//! the last `tail_max`, in memory (none after a restart: a replica behind then gets a snapshot).
//!
//! `HeapLog` owns its heap and its `ReplState`; `HeapLog::lend` makes one over a heap and a
//! state owned elsewhere (a table shard actor keeps both and lends them for each call). A
//! primary whose storage applies a write itself (the table shard) reports it with `wrote`.
//!
//! Sidecar format: a format byte (1), then postcard `ReplMeta { heap_at, repl_at, history,
//! installing }`: replication lsn = `repl_at + (heap lsn − heap_at)`. An install writes
//! `installing: true` first; a sidecar found so at open means the heap may hold part of a
//! snapshot, and the log is emptied (the primary sends a snapshot again).

use std::borrow::BorrowMut;
use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};

use heapgrid_heap::{Heap, WriteBatch};
use serde::{Deserialize, Serialize};

use super::endpoint::ShardLog;
use super::{EpochHistory, Lsn, Pos, Record};
use crate::error::GridError;
use crate::record;

/// Keys removed per heap commit when the log is emptied.
const CLEAR_CHUNK: usize = 10_000;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct ReplMeta {
    heap_at: u64,
    repl_at: u64,
    history: EpochHistory,
    installing: bool,
}

/// What a replicated heap keeps beside it: the sidecar's contents and the records kept for
/// replicas behind.
pub struct ReplState {
    path: PathBuf,
    meta: ReplMeta,
    tail: VecDeque<Record<Vec<u8>>>,
    /// Records kept in memory for replicas behind.
    pub tail_max: usize,
}

/// A replicated heap's log: a heap and its `ReplState`, owned (`HeapLog`) or lent.
pub struct HeapLog<H = Heap, S = ReplState> {
    heap: H,
    st: S,
}

fn storage(e: impl std::fmt::Display) -> GridError {
    GridError::Storage(format!("replication sidecar: {e}"))
}

fn sidecar(heap_path: &Path) -> PathBuf {
    let mut p = heap_path.as_os_str().to_owned();
    p.push(".repl");
    PathBuf::from(p)
}

impl ReplState {
    /// The state of `heap` (opened from `heap_path`), read from its sidecar if it has one (a
    /// heap without one starts the log at its current end). A heap found in the middle of a
    /// snapshot install is emptied.
    pub fn open(heap: &mut Heap, heap_path: &Path) -> Result<ReplState, GridError> {
        let path = sidecar(heap_path);
        let meta = match std::fs::read(&path) {
            Ok(b) => record::decode(&format!("replication sidecar {}", path.display()), &b)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                ReplMeta { heap_at: heap.last_lsn(), ..ReplMeta::default() }
            }
            Err(e) => return Err(storage(e)),
        };
        let mut st = ReplState { path, meta, tail: VecDeque::new(), tail_max: 10_000 };
        if st.meta.installing {
            HeapLog::lend(heap, &mut st).clear()?;
        }
        // An epoch noted before its first record was applied (a crash between the two).
        let last = HeapLog::lend(heap, &mut st).last();
        st.meta.history.truncate_after(last);
        Ok(st)
    }

    /// The newest epoch the log holds records of (0: none).
    pub fn last_epoch(&self) -> u64 {
        self.meta.history.last_epoch().unwrap_or(0)
    }

    fn save(&self) -> Result<(), GridError> {
        let bytes = record::encode("replication sidecar", &self.meta)?;
        let tmp = self.path.with_extension("repl.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(storage)?;
        f.write_all(&bytes).map_err(storage)?;
        f.sync_all().map_err(storage)?;
        std::fs::rename(&tmp, &self.path).map_err(storage)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(storage)?;
        }
        Ok(())
    }

    /// The replication lsn of heap lsn `heap_lsn`.
    pub fn lsn_of(&self, heap_lsn: u64) -> Lsn {
        self.meta.repl_at + heap_lsn.saturating_sub(self.meta.heap_at)
    }

    fn keep(&mut self, r: Record<Vec<u8>>) {
        self.tail.push_back(r);
        while self.tail.len() > self.tail_max {
            self.tail.pop_front();
        }
    }
}

impl HeapLog {
    /// The log of `heap` (opened from `heap_path`), reading its sidecar if it has one.
    pub fn open(mut heap: Heap, heap_path: &Path) -> Result<HeapLog, GridError> {
        let st = ReplState::open(&mut heap, heap_path)?;
        Ok(HeapLog { heap, st })
    }
}

impl<'a> HeapLog<&'a mut Heap, &'a mut ReplState> {
    /// The log over a heap and a state kept elsewhere.
    pub fn lend(heap: &'a mut Heap, st: &'a mut ReplState) -> Self {
        HeapLog { heap, st }
    }
}

impl<H: BorrowMut<Heap>, S: BorrowMut<ReplState>> HeapLog<H, S> {
    /// Writes the op-log records of what `append` applied (one write(2)); call it before the
    /// log's end is acknowledged.
    pub fn flush(&mut self) -> Result<(), GridError> {
        Ok(self.heap.borrow_mut().flush_log()?)
    }

    fn heap(&self) -> &Heap {
        self.heap.borrow()
    }

    fn st(&self) -> &ReplState {
        self.st.borrow()
    }

    /// Removes every key, in chunks.
    fn empty_heap(&mut self) -> Result<(), GridError> {
        let heap = self.heap.borrow_mut();
        loop {
            let mut keys = Vec::new();
            for e in heap.iter().take(CLEAR_CHUNK) {
                keys.push(e?.0.to_vec());
            }
            if keys.is_empty() {
                return Ok(());
            }
            let mut b = WriteBatch::new();
            for k in &keys {
                b.delete(k)?;
            }
            heap.apply(&b)?;
        }
    }

    /// Notes that the next record is of `epoch`, durably, before that record is.
    fn note_epoch(&mut self, epoch: u64, lsn: Lsn) -> Result<(), GridError> {
        let st = self.st.borrow_mut();
        if st.meta.history.last_epoch() != Some(epoch) {
            st.meta.history.note(epoch, lsn);
            st.save()?;
        }
        Ok(())
    }
}

impl<H: BorrowMut<Heap>, S: BorrowMut<ReplState>> ShardLog for HeapLog<H, S> {
    type Body = Vec<u8>;
    type State = Vec<(Vec<u8>, Vec<u8>)>;

    fn last(&self) -> Lsn {
        self.st().lsn_of(self.heap().last_lsn())
    }

    fn history(&self) -> &EpochHistory {
        &self.st().meta.history
    }

    fn records(&self) -> VecDeque<Record<Vec<u8>>> {
        self.st().tail.clone()
    }

    fn append(&mut self, r: Record<Vec<u8>>) -> Result<(), GridError> {
        if r.lsn != self.last() + 1 {
            return Err(GridError::Corrupted(format!("record {} after {}", r.lsn, self.last())));
        }
        let batch = WriteBatch::from_bytes(&r.body)?;
        if batch.is_empty() {
            return Err(GridError::Invalid(format!("record {} is an empty batch", r.lsn)));
        }
        // Durable before the epoch's first record is.
        self.note_epoch(r.epoch, r.lsn)?;
        // Its op-log record is queued: `flush` writes a message's records with one write(2).
        self.heap.borrow_mut().apply_deferred(&batch)?;
        if self.last() != r.lsn {
            return Err(GridError::Corrupted(format!("record {} applied as {}", r.lsn, self.last())));
        }
        self.st.borrow_mut().keep(r);
        Ok(())
    }

    fn wrote(&mut self, r: Record<Vec<u8>>) -> Result<(), GridError> {
        // Several writes may be applied before they are reported, in order.
        if r.lsn > self.last() {
            return Err(GridError::Corrupted(format!("record {} reported at {}", r.lsn, self.last())));
        }
        self.note_epoch(r.epoch, r.lsn)?;
        self.st.borrow_mut().keep(r);
        Ok(())
    }

    fn truncate_after(&mut self, lsn: Lsn) -> Result<bool, GridError> {
        // A heap commit cannot be undone: only a cut at the end is a cut.
        Ok(lsn >= self.last())
    }

    fn install(&mut self, upto: Pos, history: EpochHistory, state: Self::State) -> Result<(), GridError> {
        self.flush()?;
        self.st.borrow_mut().meta.installing = true;
        self.st().save()?;
        self.empty_heap()?;
        let heap = self.heap.borrow_mut();
        for chunk in state.chunks(CLEAR_CHUNK) {
            let mut b = WriteBatch::new();
            for (k, v) in chunk {
                b.put(k, v)?;
            }
            heap.apply(&b)?;
        }
        let heap_at = heap.last_lsn();
        let st = self.st.borrow_mut();
        st.tail.clear();
        st.meta = ReplMeta { heap_at, repl_at: upto.lsn, history, installing: false };
        st.save()
    }

    fn clear(&mut self) -> Result<(), GridError> {
        self.flush()?;
        self.empty_heap()?;
        let heap_at = self.heap().last_lsn();
        let st = self.st.borrow_mut();
        st.tail.clear();
        st.meta = ReplMeta { heap_at, repl_at: 0, history: EpochHistory::default(), installing: false };
        st.save()
    }

    fn snapshot(&self) -> Result<Self::State, GridError> {
        let mut out = Vec::new();
        for e in self.heap().iter() {
            let (k, v) = e?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }
}
