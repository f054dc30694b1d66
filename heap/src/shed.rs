//! Which resident pages a heap drops when the node is over its memory budget: a CLOCK over the
//! heap's pages (issue 16; DESIGN.md "Memory").
//!
//! The reference bit is the heap's own: every read of a page marks it (`PageMarks::referenced`,
//! set in `read_page`, by the writer and by snapshots on any thread). The hand walks the pages
//! in a circle; at each resident page it may drop (the caller decides: durable, clean, not a
//! branch node):
//! - referenced (read since the hand last passed): its mark is cleared, it is spared this turn;
//! - not referenced: dropped.
//!
//! Two turns at most per call: when every page was referenced, the second turn drops them.
//!
//! What did not work (docs/benchmarks.md, "Bigger than the budget"):
//! - one state per extent of 64 pages: with a hot set spread over the key space (every tenth
//!   key of 4 KB values) every extent held hot pages, so hot and cold pages went alike;
//! - the page tables' bits (unmap a page, see in `/proc/self/pagemap` whether a read mapped it
//!   again): the kernel maps up to 16 resident neighbours with every fault ("fault-around"),
//!   so every page near a hot one looked used;
//! - a dropped page read back counting as referenced: a cold page read once looks the same.
//!
//! Pure and synchronous: the pager asks it for page ids, then clears marks and drops pages.
//!
//! Invariant: only pages the caller calls droppable are chosen (to drop or to spare), each at
//! most once per call, and no more than asked for are dropped.

use crate::page::PageBits;

#[derive(Default, Debug)]
pub(crate) struct PageClock {
    hand: u64,
}

/// What one call chose.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Choice {
    /// Pages to drop.
    pub(crate) drop: Vec<u64>,
    /// Pages read since the hand last passed: their marks are cleared, they stay.
    pub(crate) spare: Vec<u64>,
}

impl PageClock {
    /// Chooses up to `want` pages of `first..pages` to drop, walking at most two turns of the
    /// hand. `resident(id)`: whether a page is in memory; `referenced(id)`: whether it was read
    /// since the hand last passed; `droppable(id)`: whether it may be dropped (asked only of
    /// resident pages).
    pub(crate) fn choose(
        &mut self,
        first: u64,
        pages: u64,
        want: u64,
        resident: &dyn Fn(u64) -> bool,
        referenced: &dyn Fn(u64) -> bool,
        droppable: &mut dyn FnMut(u64) -> bool,
    ) -> Choice {
        let mut c = Choice::default();
        if pages <= first || want == 0 {
            return c;
        }
        if self.hand < first || self.hand >= pages {
            self.hand = first;
        }
        let span = pages - first;
        let mut visited = 0;
        // Chosen by this call (to drop or to spare): the marks and residency were read before
        // the call, so a second visit must not count a spared page as referenced again.
        let mut taken = PageBits::default();
        let mut spared = PageBits::default();
        while (c.drop.len() as u64) < want && visited < 2 * span {
            let id = self.hand;
            self.hand = if id + 1 >= pages { first } else { id + 1 };
            visited += 1;
            if !resident(id) || taken.get(id) || !droppable(id) {
                continue;
            }
            if referenced(id) && !spared.get(id) {
                c.spare.push(id);
                spared.set(id);
            } else {
                c.drop.push(id);
                taken.set(id);
            }
        }
        c
    }

    /// Starts the hand over (after the heap's pages moved, a compaction).
    pub(crate) fn reset(&mut self) {
        self.hand = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    /// A heap of `pages` pages, all resident and referenced, all droppable except `pinned`.
    struct Model {
        resident: RefCell<BTreeSet<u64>>,
        referenced: RefCell<BTreeSet<u64>>,
        pinned: RefCell<BTreeSet<u64>>,
    }

    impl Model {
        fn new(pages: u64, pinned: &[u64]) -> Model {
            Model {
                resident: RefCell::new((0..pages).collect()),
                referenced: RefCell::new((0..pages).collect()),
                pinned: RefCell::new(pinned.iter().copied().collect()),
            }
        }
        /// One shed: returns the pages dropped, and clears marks and drops as the pager does.
        fn shed(&self, clock: &mut PageClock, first: u64, pages: u64, want: u64) -> Vec<u64> {
            let (resident, referenced) = (self.resident.borrow().clone(), self.referenced.borrow().clone());
            let c = clock.choose(
                first,
                pages,
                want,
                &|id| resident.contains(&id),
                &|id| referenced.contains(&id),
                &mut |id| !self.pinned.borrow().contains(&id),
            );
            for id in c.spare.iter().chain(&c.drop) {
                self.referenced.borrow_mut().remove(id);
            }
            for id in &c.drop {
                self.resident.borrow_mut().remove(id);
            }
            c.drop
        }
        /// A read: the page comes back into memory, marked.
        fn touch(&self, id: u64) {
            self.resident.borrow_mut().insert(id);
            self.referenced.borrow_mut().insert(id);
        }
    }

    #[test]
    fn drops_no_more_than_asked_and_only_droppable_pages() {
        let m = Model::new(300, &[5, 70, 71]);
        let mut c = PageClock::default();
        let ids = m.shed(&mut c, 2, 300, 100);
        assert_eq!(ids.len(), 100);
        let set: BTreeSet<u64> = ids.iter().copied().collect();
        assert_eq!(set.len(), ids.len(), "each page once");
        assert!(ids.iter().all(|&id| id >= 2 && !m.pinned.borrow().contains(&id)));
        // Everything droppable goes in the end; pinned and below-first pages stay.
        let rest = m.shed(&mut c, 2, 300, 1000);
        assert_eq!(ids.len() + rest.len(), 300 - 2 - 3);
        assert!(m.shed(&mut c, 2, 300, 1000).is_empty());
        assert!(m.referenced.borrow().contains(&5), "a page that may not be dropped keeps its mark");
    }

    #[test]
    fn a_page_read_since_the_hand_passed_is_kept() {
        let m = Model::new(100, &[]);
        let mut c = PageClock::default();
        // Every page was read: the first turn only clears marks, the second drops.
        assert_eq!(m.shed(&mut c, 0, 100, 50), (0..50).collect::<Vec<_>>());
        assert!(m.referenced.borrow().is_empty(), "every page visited lost its mark");
        // Every tenth page is read (hot, interleaved with cold ones), staying in memory.
        for id in (50..100).step_by(10) {
            m.touch(id);
        }
        let ids = m.shed(&mut c, 0, 100, 45);
        assert_eq!(ids, (50..100).filter(|id| id % 10 != 0).collect::<Vec<_>>());
        assert_eq!(*m.resident.borrow(), (50..100).step_by(10).collect::<BTreeSet<_>>());
        // Read again: kept while anything else may go.
        for id in (50..100).step_by(10) {
            m.touch(id);
        }
        m.touch(3);
        m.referenced.borrow_mut().remove(&3);
        assert_eq!(m.shed(&mut c, 0, 100, 1), vec![3]);
        // Not read since: they go.
        assert_eq!(m.shed(&mut c, 0, 100, 2), vec![50, 60]);
    }

    #[test]
    fn an_empty_heap_or_no_want_chooses_nothing() {
        let mut c = PageClock::default();
        let all = |_| true;
        let no = |_| false;
        assert_eq!(c.choose(2, 0, 10, &all, &no, &mut |_| true), Choice::default());
        assert_eq!(c.choose(2, 2, 10, &all, &no, &mut |_| true), Choice::default());
        assert_eq!(c.choose(2, 100, 0, &all, &no, &mut |_| true), Choice::default());
        assert_eq!(c.choose(2, 100, 10, &no, &no, &mut |_| true), Choice::default());
    }

    #[test]
    fn the_hand_survives_a_shrinking_heap() {
        let mut c = PageClock::default();
        let _ = c.choose(0, 1000, 900, &|_| true, &|_| false, &mut |_| true);
        let ids = c.choose(0, 64, 5, &|_| true, &|_| false, &mut |_| true).drop;
        assert_eq!(ids.len(), 5);
        assert!(ids.iter().all(|&id| id < 64));
    }
}
