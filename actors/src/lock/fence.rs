//! The fence table: what every shard reads at commit to check a fenced write (shared LOCKS.md,
//! "Fenced writes"). The lock service publishes each lock's current grant here, `(fence, held)`,
//! and shards read it on their own threads, without a message.
//!
//! One cell per lock ever granted on this node: an `AtomicU64` holding `fence << 1 | held`. The
//! lock service is the only writer of cells; a cell is created once (under the map's write lock)
//! and then only stored to, so a grant or a release is one atomic store.
//!
//! Invariant: a cell's fence never decreases (`publish` asserts it): fences strictly increase per
//! lock, and the table mirrors the newest grant.
//! Invariant (ordering): the lock service publishes a grant before it answers the grant, and a
//! loss of the lock (release, expiry, session end) before it answers or grants anything after
//! it. A store is `Release` and a check's load `Acquire`, so any write that happens after a
//! thread learned of a newer grant (through any synchronising channel: a message, a reply)
//! sees that grant or a later one, and a stale fence is refused. A check that ran before the
//! loss is ordered before it: the shard applies that write before it handles anything sent
//! after the loss (it handles its messages in order), which is what mutual exclusion needs.
//!
//! In a cluster the table of a node that does not serve the locks is a *mirror* of the lock
//! service's (`cluster::fences`): it answers only while it is current, until `valid_until` on
//! its `clock` (a lease the lock service renews); past it every fenced write is refused, as by
//! an unheld lock. The lock service's own table, and a lone node's, are current for good.
//!
//! This file uses only `heapgrid_heap::sync`, so `loom-tests/` compiles it as it is (by path)
//! against loom's primitives.

use std::collections::HashMap;

use heapgrid_heap::sync::atomic::{AtomicU64, Ordering};
use heapgrid_heap::sync::{Arc, RwLock};

/// Why a fenced write was refused: `current` is the lock's fence now, if it is held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stale {
    pub lock: String,
    pub presented: u64,
    pub current: Option<u64>,
}

/// One lock's published grant.
#[derive(Debug, Default)]
pub struct FenceCell(AtomicU64);

impl FenceCell {
    /// Publishes the lock's state: `fence` (the newest grant's) and whether it is held.
    pub fn publish(&self, fence: u64, held: bool) {
        debug_assert!(fence < 1 << 63, "fence {fence} does not fit the cell");
        let before = self.0.swap(fence << 1 | held as u64, Ordering::AcqRel);
        assert!(before >> 1 <= fence, "fence went back from {} to {fence}", before >> 1);
    }

    /// The published `(fence, held)`.
    pub fn load(&self) -> (u64, bool) {
        let v = self.0.load(Ordering::Acquire);
        (v >> 1, v & 1 == 1)
    }
}

/// Every lock's cell, by name.
#[derive(Debug)]
pub struct FenceTable {
    cells: RwLock<HashMap<String, Arc<FenceCell>>>,
    /// The table is current until this time on `clock` (`u64::MAX`: for good).
    valid_until: AtomicU64,
    clock: fn() -> u64,
}

impl Default for FenceTable {
    fn default() -> Self {
        FenceTable::with_clock(|| 0)
    }
}

impl FenceTable {
    /// A table current for good, whose validity (once limited: `set_valid_until`) is read on
    /// `clock` (milliseconds, monotonic).
    pub fn with_clock(clock: fn() -> u64) -> FenceTable {
        FenceTable { cells: RwLock::default(), valid_until: AtomicU64::new(u64::MAX), clock }
    }

    /// The table answers until `until` on its clock (`u64::MAX`: for good; 0: not now).
    pub fn set_valid_until(&self, until: u64) {
        self.valid_until.store(until, Ordering::Release);
    }

    /// Whether the table is current now.
    pub fn valid(&self) -> bool {
        let until = self.valid_until.load(Ordering::Acquire);
        until == u64::MAX || (self.clock)() < until
    }

    /// Every cell: `(lock, fence, held)`.
    pub fn snapshot(&self) -> Vec<(String, u64, bool)> {
        let cells = self.cells.read().unwrap_or_else(|e| e.into_inner());
        cells
            .iter()
            .map(|(n, c)| {
                let (f, h) = c.load();
                (n.clone(), f, h)
            })
            .collect()
    }

    /// The cell of `lock`, created (unheld, fence 0) if it has none: the lock service keeps it.
    pub fn cell(&self, lock: &str) -> Arc<FenceCell> {
        if let Some(c) = self.cells.read().unwrap_or_else(|e| e.into_inner()).get(lock) {
            return c.clone();
        }
        let mut cells = self.cells.write().unwrap_or_else(|e| e.into_inner());
        cells.entry(lock.to_string()).or_default().clone()
    }

    /// The published `(fence, held)` of `lock` (`(0, false)`: never granted).
    pub fn current(&self, lock: &str) -> (u64, bool) {
        self.cells.read().unwrap_or_else(|e| e.into_inner()).get(lock).map_or((0, false), |c| c.load())
    }

    /// Whether a write fenced with `presented` on `lock` may apply now: only if `presented` is
    /// the current grant's fence and the lock is still held.
    pub fn check(&self, lock: &str, presented: u64) -> Result<(), Stale> {
        if !self.valid() {
            return Err(Stale { lock: lock.to_string(), presented, current: None });
        }
        match self.current(lock) {
            (fence, true) if fence == presented => Ok(()),
            (fence, held) => Err(Stale { lock: lock.to_string(), presented, current: held.then_some(fence) }),
        }
    }

    /// Forgets the cell of `lock`, which is not held (the lock service passivates an idle lock):
    /// a check then finds no cell, which answers as an unheld lock does (stale, no current
    /// fence), and the next grant starts a new cell. This keeps the table as large as the set of
    /// locks in memory, not of every lock ever granted.
    pub fn forget(&self, lock: &str) {
        self.cells.write().unwrap_or_else(|e| e.into_inner()).remove(lock);
    }

    /// Forgets every cell: a restarted lock service republishes what it recovered, in new
    /// cells. (A cell may show a grant whose record was never written, and whose reply was
    /// therefore never sent; the recovered holder's lower fence must become current again.
    /// Fences issued after the restart are above every earlier one: a new epoch.)
    pub fn reset(&self) {
        self.cells.write().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

#[cfg(all(test, not(heapgrid_loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_fence_is_accepted_only_while_it_is_the_held_grant() {
        let t = FenceTable::default();
        assert_eq!(t.check("l", 0), Err(Stale { lock: "l".into(), presented: 0, current: None }));
        let c = t.cell("l");
        c.publish(1, true);
        t.check("l", 1).unwrap();
        assert_eq!(t.check("l", 2).unwrap_err().current, Some(1));
        c.publish(1, false);
        assert_eq!(t.check("l", 1).unwrap_err().current, None);
        c.publish(2, true);
        assert_eq!(t.check("l", 1).unwrap_err().current, Some(2));
        t.reset();
        assert_eq!(t.current("l"), (0, false));
        assert!(t.check("other", 2).is_err());
    }

    #[test]
    fn a_forgotten_cell_reads_as_unheld_and_a_new_one_starts_over() {
        let t = FenceTable::default();
        t.cell("l").publish(3, false);
        t.forget("l");
        assert_eq!(t.check("l", 3), Err(Stale { lock: "l".into(), presented: 3, current: None }));
        t.cell("l").publish(4, true);
        t.check("l", 4).unwrap();
    }

    #[test]
    #[should_panic(expected = "fence went back")]
    fn a_fence_never_goes_back() {
        let t = FenceTable::default();
        t.cell("l").publish(5, true);
        t.cell("l").publish(4, true);
    }
}
