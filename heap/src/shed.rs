//! Which resident pages a heap drops when the node is over its memory budget: a CLOCK over the
//! heap's pages (issue 16; DESIGN.md "Memory").
//!
//! A mapped file's pages carry no reference bit we can read (`mincore` tells residency only),
//! but a page we dropped that is resident again was read since: that is the reference. The hand
//! walks the pages in a circle; at each resident page it either gives a page read back since
//! its drop a second chance (forgetting the drop) or drops it, if the caller says it may
//! (durable, clean, not a branch node). A page the hand has not dropped yet counts as
//! unreferenced. One bit per page (`PageBits`): 32 KiB per GiB of heap.
//!
//! Why pages, not extents: the first version kept one state per extent of 64 pages. With a hot
//! set spread over the key space (every tenth key of 4 KB values), every extent held some hot
//! pages, so every extent looked referenced and the clock dropped hot and cold pages alike
//! (0.48× the all-resident GET rate at a 90/10 hot set, docs/benchmarks.md).
//!
//! Pure and synchronous: the pager asks it for page ids, then drops them.
//!
//! Invariant: only pages the caller calls droppable are chosen, each at most once per call, and
//! no more than asked for.

use crate::page::PageBits;

#[derive(Default, Debug)]
pub(crate) struct PageClock {
    hand: u64,
    /// Pages the hand dropped that have not been seen resident since.
    dropped: PageBits,
}

impl PageClock {
    /// Chooses up to `want` pages of `first..pages` to drop, walking at most two turns of the
    /// hand (a page read back since its drop is spared once per turn). `resident(id)` says
    /// whether a page is resident; `droppable(id)` whether it may be dropped (asked only of
    /// resident pages the hand does not spare).
    pub(crate) fn choose(
        &mut self,
        first: u64,
        pages: u64,
        want: u64,
        resident: &dyn Fn(u64) -> bool,
        droppable: &mut dyn FnMut(u64) -> bool,
    ) -> Vec<u64> {
        let mut chosen = Vec::new();
        if pages <= first || want == 0 {
            return chosen;
        }
        if self.hand < first || self.hand >= pages {
            self.hand = first;
        }
        let span = pages - first;
        let mut visited = 0;
        // Chosen by this call: `resident` still says resident (it was read before the call).
        let mut taken = PageBits::default();
        while (chosen.len() as u64) < want && visited < 2 * span {
            let id = self.hand;
            self.hand = if id + 1 >= pages { first } else { id + 1 };
            visited += 1;
            if !resident(id) || taken.get(id) {
                continue;
            }
            if self.dropped.get(id) {
                // Read back since the hand dropped it: spared this turn.
                self.dropped.clear(id);
                continue;
            }
            if droppable(id) {
                chosen.push(id);
                taken.set(id);
                self.dropped.set(id);
            }
        }
        chosen
    }

    /// Forgets what the hand learnt (after the heap's pages moved, a compaction).
    pub(crate) fn reset(&mut self) {
        self.dropped.clear_all();
        self.hand = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    /// A heap of `pages` pages, all resident, all droppable except `pinned`.
    struct Model {
        resident: RefCell<BTreeSet<u64>>,
        pinned: RefCell<BTreeSet<u64>>,
    }

    impl Model {
        fn new(pages: u64, pinned: &[u64]) -> Model {
            Model {
                resident: RefCell::new((0..pages).collect()),
                pinned: RefCell::new(pinned.iter().copied().collect()),
            }
        }
        fn shed(&self, clock: &mut PageClock, first: u64, pages: u64, want: u64) -> Vec<u64> {
            let snapshot = self.resident.borrow().clone();
            let ids = clock.choose(first, pages, want, &|id| snapshot.contains(&id), &mut |id| {
                !self.pinned.borrow().contains(&id)
            });
            for id in &ids {
                self.resident.borrow_mut().remove(id);
            }
            ids
        }
        fn touch(&self, id: u64) {
            self.resident.borrow_mut().insert(id);
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
    }

    #[test]
    fn a_page_read_back_gets_a_second_chance() {
        // Pages 50.. may not be dropped yet (written since the checkpoint, say).
        let m = Model::new(100, &(50..100).collect::<Vec<_>>());
        let mut c = PageClock::default();
        assert_eq!(m.shed(&mut c, 0, 100, 100), (0..50).collect::<Vec<_>>());
        // Every page dropped is read back (hot); the others become droppable.
        for id in 0..50 {
            m.touch(id);
        }
        m.pinned.borrow_mut().clear();
        // The pages read back since their drop are spared; the others go first.
        assert_eq!(m.shed(&mut c, 0, 100, 50), (50..100).collect::<Vec<_>>());
        // A second chance is one turn: with nothing else resident, they go next.
        assert_eq!(m.shed(&mut c, 0, 100, 3), vec![0, 1, 2]);
    }

    #[test]
    fn an_empty_heap_or_no_want_chooses_nothing() {
        let mut c = PageClock::default();
        assert!(c.choose(2, 0, 10, &|_| true, &mut |_| true).is_empty());
        assert!(c.choose(2, 2, 10, &|_| true, &mut |_| true).is_empty());
        assert!(c.choose(2, 100, 0, &|_| true, &mut |_| true).is_empty());
        assert!(c.choose(2, 100, 10, &|_| false, &mut |_| true).is_empty());
    }

    #[test]
    fn the_hand_survives_a_shrinking_heap() {
        let mut c = PageClock::default();
        let _ = c.choose(0, 1000, 900, &|_| true, &mut |_| true);
        let ids = c.choose(0, 64, 5, &|_| true, &mut |_| true);
        assert_eq!(ids.len(), 5);
        assert!(ids.iter().all(|&id| id < 64));
    }
}
