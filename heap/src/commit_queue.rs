//! A combining commit queue: many threads submit work, one of them (the leader) processes
//! everything queued in one go (apply every batch, then one fsync) and hands each submitter its
//! own result.
//!
//! Why: with a plain mutex around the heap, every commit under contention is a park/unpark of a
//! thread (7–65 µs on the target machines, per the tables issue), and a group commit can only gather the commits that
//! made it through the mutex during one fsync. Combining makes the mutex hand-offs disappear: a
//! submitter pushes its item and either leads (no leader active) or sleeps on its own slot until
//! its result is there, so each commit costs one wake-up and each round one fsync.
//!
//! Protocol (all under the queue lock): `submit` pushes `(item, slot)`. If nobody leads, the
//! submitter becomes the leader (`leading = true`), takes the whole queue, processes it outside
//! the lock and fills every slot. Then, under the lock, it either hands leadership to the owner of
//! the first queued item (that slot becomes `Lead`) or clears `leading`. A slot is `Waiting`,
//! `Lead` or `Done`.
//!
//! Invariant: at most one leader at a time; `leading` is true exactly while a leader exists or
//! leadership is being handed to a slot marked `Lead`.
//! Invariant: every submitted item is processed exactly once and its submitter returns exactly once
//! with that item's result (no lost wake-up: hand-over and `leading = false` happen under the
//! same lock that `submit` pushes under).
//! Invariant: if `process` panics, every item it held gets `Failed` and the leader role passes on.

use std::collections::VecDeque;
use std::mem;

use crate::sync::{Arc, Condvar, Mutex, MutexGuard};

enum SlotState<R> {
    Waiting,
    Lead,
    Done(R),
    /// The leader processing this item panicked.
    Failed,
    Taken,
}

struct Slot<R> {
    state: Mutex<SlotState<R>>,
    cond: Condvar,
}

impl<R> Slot<R> {
    fn lock(&self) -> MutexGuard<'_, SlotState<R>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn set(&self, s: SlotState<R>) {
        *self.lock() = s;
        self.cond.notify_one();
    }
}

struct Queue<T, R> {
    items: VecDeque<(T, Arc<Slot<R>>)>,
    leading: bool,
    rounds: u64,
}

/// See the module docs.
pub struct CommitQueue<T, R> {
    queue: Mutex<Queue<T, R>>,
}

/// Outcome of a submit whose leader panicked while processing it.
#[derive(Debug, PartialEq, Eq)]
pub struct LeaderPanicked;

impl<T, R> Default for CommitQueue<T, R> {
    fn default() -> Self {
        CommitQueue { queue: Mutex::new(Queue { items: VecDeque::new(), leading: false, rounds: 0 }) }
    }
}

impl<T, R> CommitQueue<T, R> {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Queue<T, R>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rounds processed so far (each is one call of a leader's `process`).
    pub fn rounds(&self) -> u64 {
        self.lock().rounds
    }

    /// Submits `item` and returns its result. `process` receives every queued item in submission
    /// order (possibly including other threads' items) and must return one result per item, in
    /// the same order; it runs only if this thread becomes a leader.
    pub fn submit<F>(&self, item: T, process: F) -> Result<R, LeaderPanicked>
    where
        F: FnOnce(Vec<T>) -> Vec<R>,
    {
        let own = Arc::new(Slot { state: Mutex::new(SlotState::Waiting), cond: Condvar::new() });
        let lead_now = {
            let mut q = self.lock();
            q.items.push_back((item, own.clone()));
            !mem::replace(&mut q.leading, true)
        };
        if !lead_now {
            let mut st = own.lock();
            loop {
                match mem::replace(&mut *st, SlotState::Taken) {
                    SlotState::Done(r) => return Ok(r),
                    SlotState::Failed => return Err(LeaderPanicked),
                    SlotState::Lead => break,
                    waiting => {
                        *st = waiting;
                        st = own.cond.wait(st).unwrap_or_else(|e| e.into_inner());
                    }
                }
            }
        }
        // We lead. Our own item is queued: it was pushed before anyone could take it, or we were
        // handed the lead because it was first in the queue.
        let (items, slots): (Vec<T>, Vec<Arc<Slot<R>>>) = {
            let mut q = self.lock();
            q.rounds += 1;
            q.items.drain(..).unzip()
        };
        debug_assert!(slots.iter().any(|s| Arc::ptr_eq(s, &own)));
        let mut guard = PanicGuard { queue: self, slots: &slots, armed: true };
        let results = process(items);
        guard.armed = false;
        assert_eq!(results.len(), slots.len(), "process must return one result per item");
        // Hand the lead on first: the next leader's round (its fsync) then overlaps with the
        // wake-ups below, which cost a syscall and a context switch each.
        self.pass_lead();
        let mut mine = None;
        for (slot, r) in slots.iter().zip(results) {
            if Arc::ptr_eq(slot, &own) {
                mine = Some(r);
            } else {
                slot.set(SlotState::Done(r));
            }
        }
        mine.ok_or(LeaderPanicked)
    }

    /// Hands leadership to the first queued submitter, or ends it if the queue is empty.
    fn pass_lead(&self) {
        let mut q = self.lock();
        match q.items.front() {
            Some((_, next)) => next.set(SlotState::Lead),
            None => q.leading = false,
        }
    }
}

/// Fails the items of a leader whose `process` panicked, and passes the lead on.
struct PanicGuard<'a, T, R> {
    queue: &'a CommitQueue<T, R>,
    slots: &'a [Arc<Slot<R>>],
    armed: bool,
}

impl<T, R> Drop for PanicGuard<'_, T, R> {
    fn drop(&mut self) {
        if self.armed {
            for s in self.slots {
                s.set(SlotState::Failed);
            }
            self.queue.pass_lead();
        }
    }
}

#[cfg(all(test, not(heapgrid_loom)))]
mod tests {
    use super::*;

    #[test]
    fn every_submitter_gets_its_own_result_and_rounds_combine() {
        let q = std::sync::Arc::new(CommitQueue::<u64, u64>::new());
        let processed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let (q, processed) = (q.clone(), processed.clone());
                std::thread::spawn(move || {
                    for i in 0..500u64 {
                        let item = t * 1_000_000 + i;
                        let p = processed.clone();
                        let r = q
                            .submit(item, move |items| {
                                std::thread::sleep(std::time::Duration::from_micros(20));
                                p.fetch_add(items.len() as u64, std::sync::atomic::Ordering::SeqCst);
                                items.into_iter().map(|x| x * 2).collect()
                            })
                            .unwrap();
                        assert_eq!(r, item * 2);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(processed.load(std::sync::atomic::Ordering::SeqCst), 4000);
        assert!(q.rounds() < 4000, "no combining happened: {} rounds", q.rounds());
    }

    #[test]
    fn a_panicking_leader_fails_its_round_and_the_queue_goes_on() {
        let q = CommitQueue::<u32, u32>::new();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| q.submit(1, |_| panic!("boom"))));
        assert!(r.is_err());
        assert_eq!(q.submit(2, |v| v).unwrap(), 2);
    }
}
