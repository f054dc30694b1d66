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
//! Sidecar format: a format byte (1), then postcard `ReplMeta { heap_at, repl_at, history,
//! installing }`: replication lsn = `repl_at + (heap lsn − heap_at)`. An install writes
//! `installing: true` first; a sidecar found so at open means the heap may hold part of a
//! snapshot, and the log is emptied (the primary sends a snapshot again).

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

/// A replicated heap's log.
pub struct HeapLog {
    heap: Heap,
    path: PathBuf,
    meta: ReplMeta,
    tail: VecDeque<Record<Vec<u8>>>,
    /// Records kept in memory for replicas behind.
    pub tail_max: usize,
}

fn storage(e: impl std::fmt::Display) -> GridError {
    GridError::Storage(format!("replication sidecar: {e}"))
}

fn sidecar(heap_path: &Path) -> PathBuf {
    let mut p = heap_path.as_os_str().to_owned();
    p.push(".repl");
    PathBuf::from(p)
}

impl HeapLog {
    /// The log of `heap` (opened from `heap_path`), reading its sidecar if it has one (a heap
    /// without one starts the log at its current end).
    pub fn open(heap: Heap, heap_path: &Path) -> Result<HeapLog, GridError> {
        let path = sidecar(heap_path);
        let meta = match std::fs::read(&path) {
            Ok(b) => record::decode(&format!("replication sidecar {}", path.display()), &b)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                ReplMeta { heap_at: heap.last_lsn(), ..ReplMeta::default() }
            }
            Err(e) => return Err(storage(e)),
        };
        let mut log = HeapLog { heap, path, meta, tail: VecDeque::new(), tail_max: 10_000 };
        if log.meta.installing {
            log.clear()?;
        }
        // An epoch noted before its first record was applied (a crash between the two).
        let last = log.last();
        log.meta.history.truncate_after(last);
        Ok(log)
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

    /// Removes every key, in chunks.
    fn empty_heap(&mut self) -> Result<(), GridError> {
        loop {
            let mut keys = Vec::new();
            for e in self.heap.iter().take(CLEAR_CHUNK) {
                keys.push(e?.0.to_vec());
            }
            if keys.is_empty() {
                return Ok(());
            }
            let mut b = WriteBatch::new();
            for k in &keys {
                b.delete(k)?;
            }
            self.heap.apply(&b)?;
        }
    }
}

impl ShardLog for HeapLog {
    type Body = Vec<u8>;
    type State = Vec<(Vec<u8>, Vec<u8>)>;

    fn last(&self) -> Lsn {
        self.meta.repl_at + self.heap.last_lsn().saturating_sub(self.meta.heap_at)
    }

    fn history(&self) -> &EpochHistory {
        &self.meta.history
    }

    fn records(&self) -> VecDeque<Record<Vec<u8>>> {
        self.tail.clone()
    }

    fn append(&mut self, r: Record<Vec<u8>>) -> Result<(), GridError> {
        if r.lsn != self.last() + 1 {
            return Err(GridError::Corrupted(format!("record {} after {}", r.lsn, self.last())));
        }
        let batch = WriteBatch::from_bytes(&r.body)?;
        if batch.is_empty() {
            return Err(GridError::Invalid(format!("record {} is an empty batch", r.lsn)));
        }
        if self.meta.history.last_epoch() != Some(r.epoch) {
            // Durable before the epoch's first record is.
            self.meta.history.note(r.epoch, r.lsn);
            self.save()?;
        }
        self.heap.apply(&batch)?;
        if self.last() != r.lsn {
            return Err(GridError::Corrupted(format!("record {} applied as {}", r.lsn, self.last())));
        }
        self.tail.push_back(r);
        while self.tail.len() > self.tail_max {
            self.tail.pop_front();
        }
        Ok(())
    }

    fn truncate_after(&mut self, lsn: Lsn) -> Result<bool, GridError> {
        // A heap commit cannot be undone: only a cut at the end is a cut.
        Ok(lsn >= self.last())
    }

    fn install(&mut self, upto: Pos, history: EpochHistory, state: Self::State) -> Result<(), GridError> {
        self.meta.installing = true;
        self.save()?;
        self.empty_heap()?;
        for chunk in state.chunks(CLEAR_CHUNK) {
            let mut b = WriteBatch::new();
            for (k, v) in chunk {
                b.put(k, v)?;
            }
            self.heap.apply(&b)?;
        }
        self.tail.clear();
        self.meta = ReplMeta { heap_at: self.heap.last_lsn(), repl_at: upto.lsn, history, installing: false };
        self.save()
    }

    fn clear(&mut self) -> Result<(), GridError> {
        self.empty_heap()?;
        self.tail.clear();
        self.meta = ReplMeta {
            heap_at: self.heap.last_lsn(),
            repl_at: 0,
            history: EpochHistory::default(),
            installing: false,
        };
        self.save()
    }

    fn snapshot(&self) -> Result<Self::State, GridError> {
        let mut out = Vec::new();
        for e in self.heap.iter() {
            let (k, v) = e?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }
}
