//! `SharedHeap`: one heap used by many threads. Commits go through a `CommitQueue`: the leader of
//! a round applies every queued batch under the heap lock, releases it, then makes the whole
//! round durable with one op-log fsync (under `FsyncPolicy::Always`) before handing each
//! committer its LSN. Reads take the heap lock briefly; they never wait for an fsync.
//!
//! Invariant: `commit` returns `Ok(lsn)` only when the batch is acknowledged under the heap's
//! fsync policy (for `Always`: after an fsync that covers it).

use crate::batch::WriteBatch;
use crate::commit_queue::CommitQueue;
use crate::error::{Error, Result};
use crate::heap::Heap;
use crate::oplog::FsyncPolicy;
use crate::sync::Mutex;

/// See the module docs.
pub struct SharedHeap {
    heap: Mutex<Heap>,
    queue: CommitQueue<WriteBatch, Result<u64>>,
    policy: FsyncPolicy,
}

impl SharedHeap {
    /// Shares `heap`, whose op log was opened with `policy`.
    pub fn new(heap: Heap, policy: FsyncPolicy) -> Self {
        SharedHeap { heap: Mutex::new(heap), queue: CommitQueue::new(), policy }
    }

    fn lock(&self) -> crate::sync::MutexGuard<'_, Heap> {
        self.heap.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Commits `batch` and returns its LSN once it is acknowledged under the fsync policy.
    pub fn commit(&self, batch: WriteBatch) -> Result<u64> {
        let r = self.queue.submit(batch, |batches| {
            let (mut results, durability) = {
                let mut h = self.lock();
                let results: Vec<Result<u64>> = batches.iter().map(|b| h.apply(b)).collect();
                (results, h.durability())
            };
            let last = results.iter().filter_map(|r| r.as_ref().ok()).copied().max();
            if let (FsyncPolicy::Always, Some(d), Some(last)) = (self.policy, durability, last)
                && let Err(e) = d.wait(last)
            {
                let why = e.to_string();
                for r in results.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(Error::Poisoned(why.clone()));
                }
            }
            results
        });
        r.unwrap_or_else(|_| Err(Error::Poisoned("a commit round panicked".into())))
    }

    /// Runs `f` with shared access (reads).
    pub fn read<R>(&self, f: impl FnOnce(&Heap) -> R) -> R {
        f(&self.lock())
    }

    /// Runs `f` with exclusive access (checkpoint, compaction).
    pub fn with<R>(&self, f: impl FnOnce(&mut Heap) -> R) -> R {
        f(&mut self.lock())
    }

    /// The heap back.
    pub fn into_inner(self) -> Heap {
        self.heap.into_inner().unwrap_or_else(|e| e.into_inner())
    }
}
