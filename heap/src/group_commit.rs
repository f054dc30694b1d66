//! Group commit: many committers, one fsync per group, no dedicated thread.
//!
//! A committer appends its op-log record (write(2)), calls `record_written(lsn)`, then
//! `wait_durable(lsn, sync)`. The first waiter that finds no sync running becomes the leader: it
//! notes the highest written LSN, runs `sync` (one fsync) outside the lock, publishes that LSN as
//! durable and wakes everyone; the others sleep until an LSN at least theirs is durable. A leader
//! sync that fails fails closed: every present and future waiter gets the error.
//!
//! Leader/follower rather than a flusher thread because on the target machines a thread hand-off
//! costs 7–65 µs (the tables issue's figure), more than the fsync of a small record on a fast device.
//!
//! Invariant: `wait_durable(lsn)` returns `Ok(d)` only after a sync that began after `lsn` was
//! written has completed, and then `d >= lsn` (no early ack).
//! Invariant: every waiter returns exactly once (no lost wake-up): `syncing` is cleared and
//! `notify_all` called under the lock after every sync.

use crate::error::{Error, Result};
use crate::sync::{Condvar, Mutex, MutexGuard};

#[derive(Debug)]
struct State {
    written: u64,
    durable: u64,
    syncing: bool,
    failed: Option<String>,
    syncs: u64,
}

/// Coordinates durable acknowledgement of op-log records; see the module docs.
#[derive(Debug)]
pub struct GroupCommit {
    state: Mutex<State>,
    cond: Condvar,
}

impl GroupCommit {
    /// A group whose records up to `durable` are already durable.
    pub fn new(durable: u64) -> Self {
        GroupCommit {
            state: Mutex::new(State { written: durable, durable, syncing: false, failed: None, syncs: 0 }),
            cond: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Err(Poisoned)` once a sync has failed.
    pub fn check(&self) -> Result<()> {
        match &self.lock().failed {
            Some(why) => Err(Error::Poisoned(why.clone())),
            None => Ok(()),
        }
    }

    /// Highest LSN recorded as written.
    pub fn written_lsn(&self) -> u64 {
        self.lock().written
    }

    /// Records that every record up to `lsn` has been written (not yet synced).
    pub fn record_written(&self, lsn: u64) {
        let mut st = self.lock();
        if lsn > st.written {
            st.written = lsn;
        }
    }

    /// Fails the group: every present and future waiter gets `Error::Poisoned(why)`.
    pub fn fail(&self, why: String) {
        let mut st = self.lock();
        st.failed.get_or_insert(why);
        drop(st);
        self.cond.notify_all();
    }

    /// Records that everything written is durable without a sync (e.g. the fsync policy
    /// `never`, or a sync done elsewhere).
    pub fn mark_durable(&self, lsn: u64) {
        let mut st = self.lock();
        if lsn > st.durable {
            st.durable = lsn;
        }
        drop(st);
        self.cond.notify_all();
    }

    /// Highest durable LSN.
    pub fn durable(&self) -> u64 {
        self.lock().durable
    }

    /// Syncs performed by leaders so far.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// Blocks until `lsn` is durable, leading a sync if none is running. Returns the durable LSN.
    pub fn wait_durable<F>(&self, lsn: u64, sync: F) -> Result<u64>
    where
        F: FnOnce() -> std::io::Result<()>,
    {
        let mut sync = Some(sync);
        let mut st = self.lock();
        assert!(lsn <= st.written, "waiting for LSN {lsn} before it was written");
        loop {
            if let Some(why) = &st.failed {
                return Err(Error::Poisoned(why.clone()));
            }
            if st.durable >= lsn {
                return Ok(st.durable);
            }
            if !st.syncing {
                let f = sync.take().expect("a committer leads at most one sync");
                st.syncing = true;
                let target = st.written;
                drop(st);
                // If `f` panics, the guard fails the group so no follower waits forever.
                let mut guard = LeaderGuard { gc: self, armed: true };
                let r = f();
                guard.armed = false;
                st = self.lock();
                st.syncing = false;
                st.syncs += 1;
                match r {
                    Ok(()) => st.durable = st.durable.max(target),
                    Err(e) => st.failed = Some(format!("op log sync failed: {e}")),
                }
                self.cond.notify_all();
                continue;
            }
            st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Fails the group if a leader's sync panics, so followers wake with an error.
struct LeaderGuard<'a> {
    gc: &'a GroupCommit,
    armed: bool,
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut st = self.gc.lock();
            st.syncing = false;
            st.failed.get_or_insert_with(|| "op log sync panicked".to_string());
            drop(st);
            self.gc.cond.notify_all();
        }
    }
}

#[cfg(all(test, not(heapgrid_loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn threads_share_syncs_and_never_ack_early() {
        let gc = Arc::new(GroupCommit::new(0));
        let log = Arc::new(std::sync::Mutex::new(0u64));
        let synced = Arc::new(AtomicU64::new(0));
        let written = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (gc, log, synced, written) = (gc.clone(), log.clone(), synced.clone(), written.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let lsn = {
                            let mut g = log.lock().unwrap();
                            *g += 1;
                            written.store(*g, Ordering::SeqCst);
                            gc.record_written(*g);
                            *g
                        };
                        let d = gc
                            .wait_durable(lsn, || {
                                synced.fetch_max(written.load(Ordering::SeqCst), Ordering::SeqCst);
                                std::thread::sleep(std::time::Duration::from_micros(50));
                                Ok(())
                            })
                            .unwrap();
                        assert!(d >= lsn && synced.load(Ordering::SeqCst) >= lsn);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(gc.durable(), 1600);
        assert!(gc.syncs() < 1600, "syncs were shared: {}", gc.syncs());
    }

    #[test]
    fn panicking_sync_fails_the_group_instead_of_hanging() {
        let gc = Arc::new(GroupCommit::new(0));
        gc.record_written(1);
        let g2 = gc.clone();
        let r = std::thread::spawn(move || g2.wait_durable(1, || panic!("sync exploded"))).join();
        assert!(r.is_err(), "the leader's panic propagates to its own thread");
        assert!(matches!(gc.wait_durable(1, || Ok(())), Err(Error::Poisoned(_))));
    }

    #[test]
    fn failed_sync_fails_every_waiter() {
        let gc = GroupCommit::new(0);
        gc.record_written(1);
        assert!(gc.wait_durable(1, || Err(std::io::Error::other("EIO"))).is_err());
        gc.record_written(2);
        assert!(matches!(gc.wait_durable(2, || Ok(())), Err(Error::Poisoned(_))));
    }
}
