//! Which resident pages a heap drops when the node is over its memory budget: a CLOCK over the
//! heap's pages (issue 16; DESIGN.md "Memory").
//!
//! The reference bit: a mapped file's pages have one in the page tables that we cannot clear
//! directly, but we can unmap a page (`Storage::unmap`, keeping it in memory) and see later
//! whether an access mapped it again (`Region::mapped_map`, from `/proc/self/pagemap`). The hand
//! walks the pages in a circle; at each resident page it may drop (the caller decides: durable,
//! clean, not a branch node):
//! - mapped (used since the hand last passed): unmapped, spared this turn;
//! - not mapped: dropped.
//!
//! A hot page thus costs a cheap minor fault per turn, never a read from the disk. Where the
//! page tables cannot be read (`accessed` answers `None`), the fallback reference is a page
//! the hand dropped that is resident again (read back from the disk since): spared once. That
//! cannot tell a hot page from a cold one read once, and costs a hot page one read from disk
//! every other turn (0.48× the all-resident GET rate at a 90/10 hot set, docs/benchmarks.md).
//!
//! Why pages, not extents: a first version kept one state per extent of 64 pages. With a hot
//! set spread over the key space (every tenth key of 4 KB values) every extent held hot pages,
//! so every extent looked referenced and hot and cold pages were dropped alike.
//!
//! Pure and synchronous: the pager asks it for page ids, then unmaps and drops them.
//!
//! Invariant: only pages the caller calls droppable are chosen (to drop or to unmap), each at
//! most once per call, and no more than asked for are dropped.

use crate::page::PageBits;

#[derive(Default, Debug)]
pub(crate) struct PageClock {
    hand: u64,
    /// Pages the hand dropped that have not been seen resident since (the fallback reference).
    dropped: PageBits,
}

/// What one turn of the hand chose.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Choice {
    /// Pages to drop.
    pub(crate) drop: Vec<u64>,
    /// Pages used since the hand last passed: unmapped (their reference cleared), kept.
    pub(crate) unmap: Vec<u64>,
}

impl PageClock {
    /// Chooses up to `want` pages of `first..pages` to drop, walking at most two turns of the
    /// hand (a referenced page is spared once per turn). `resident(id)`: whether a page is in
    /// memory; `accessed(id)`: whether it is mapped (used since the hand unmapped it), `None`
    /// where unknown; `droppable(id)`: whether it may be dropped or unmapped (asked only of
    /// resident pages).
    pub(crate) fn choose(
        &mut self,
        first: u64,
        pages: u64,
        want: u64,
        resident: &dyn Fn(u64) -> bool,
        accessed: &dyn Fn(u64) -> Option<bool>,
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
        // Chosen by this call (to drop, or to unmap: `accessed` still says mapped, as
        // `resident` still says resident; both were read before the call).
        let mut taken = PageBits::default();
        let mut spared = PageBits::default();
        while (c.drop.len() as u64) < want && visited < 2 * span {
            let id = self.hand;
            self.hand = if id + 1 >= pages { first } else { id + 1 };
            visited += 1;
            if !resident(id) || taken.get(id) {
                continue;
            }
            let referenced = match accessed(id) {
                Some(mapped) => mapped && !spared.get(id),
                None => {
                    if self.dropped.get(id) && !spared.get(id) {
                        // Read back since the hand dropped it.
                        self.dropped.clear(id);
                        spared.set(id);
                        continue;
                    }
                    false
                }
            };
            if !droppable(id) {
                continue;
            }
            if referenced {
                c.unmap.push(id);
                spared.set(id);
            } else {
                c.drop.push(id);
                taken.set(id);
                self.dropped.set(id);
            }
        }
        c
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

    /// A heap of `pages` pages, all resident and mapped, all droppable except `pinned`.
    struct Model {
        resident: RefCell<BTreeSet<u64>>,
        mapped: RefCell<BTreeSet<u64>>,
        pinned: RefCell<BTreeSet<u64>>,
        /// Whether the page tables can be read.
        tables: bool,
    }

    impl Model {
        fn new(pages: u64, pinned: &[u64], tables: bool) -> Model {
            Model {
                resident: RefCell::new((0..pages).collect()),
                mapped: RefCell::new((0..pages).collect()),
                pinned: RefCell::new(pinned.iter().copied().collect()),
                tables,
            }
        }
        /// One shed: returns the pages dropped, and unmaps and drops as the pager does.
        fn shed(&self, clock: &mut PageClock, first: u64, pages: u64, want: u64) -> Vec<u64> {
            let (resident, mapped) = (self.resident.borrow().clone(), self.mapped.borrow().clone());
            let c = clock.choose(
                first,
                pages,
                want,
                &|id| resident.contains(&id),
                &|id| self.tables.then(|| mapped.contains(&id)),
                &mut |id| !self.pinned.borrow().contains(&id),
            );
            for id in c.unmap.iter().chain(&c.drop) {
                self.mapped.borrow_mut().remove(id);
            }
            for id in &c.drop {
                self.resident.borrow_mut().remove(id);
            }
            c.drop
        }
        /// A read: the page comes back into memory and is mapped.
        fn touch(&self, id: u64) {
            self.resident.borrow_mut().insert(id);
            self.mapped.borrow_mut().insert(id);
        }
    }

    #[test]
    fn drops_no_more_than_asked_and_only_droppable_pages() {
        for tables in [true, false] {
            let m = Model::new(300, &[5, 70, 71], tables);
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
            assert!(m.mapped.borrow().contains(&5), "a page that may not be dropped is not unmapped either");
        }
    }

    #[test]
    fn a_page_used_since_the_hand_passed_is_kept() {
        let m = Model::new(100, &[], true);
        let mut c = PageClock::default();
        // Every page was mapped (used): the first turn only unmaps, the second drops.
        assert_eq!(m.shed(&mut c, 0, 100, 50), (0..50).collect::<Vec<_>>());
        assert!(m.mapped.borrow().is_empty(), "every page visited was unmapped");
        // Every tenth page is read (hot, interleaved with cold ones), staying in memory.
        for id in (50..100).step_by(10) {
            m.touch(id);
        }
        let ids = m.shed(&mut c, 0, 100, 45);
        assert_eq!(ids, (50..100).filter(|id| id % 10 != 0).collect::<Vec<_>>());
        assert_eq!(*m.resident.borrow(), (50..100).step_by(10).collect::<BTreeSet<_>>());
        // Used again: still kept while anything else may go; unmapped each time the hand passes.
        for id in (50..100).step_by(10) {
            m.touch(id);
        }
        m.touch(3);
        m.mapped.borrow_mut().remove(&3);
        assert_eq!(m.shed(&mut c, 0, 100, 1), vec![3]);
    }

    #[test]
    fn without_page_tables_a_page_read_back_gets_a_second_chance() {
        // Pages 50.. may not be dropped yet (written since the checkpoint, say).
        let m = Model::new(100, &(50..100).collect::<Vec<_>>(), false);
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
        let all = |_| true;
        let none = |_| None;
        assert_eq!(c.choose(2, 0, 10, &all, &none, &mut |_| true), Choice::default());
        assert_eq!(c.choose(2, 2, 10, &all, &none, &mut |_| true), Choice::default());
        assert_eq!(c.choose(2, 100, 0, &all, &none, &mut |_| true), Choice::default());
        assert_eq!(c.choose(2, 100, 10, &|_| false, &none, &mut |_| true), Choice::default());
    }

    #[test]
    fn the_hand_survives_a_shrinking_heap() {
        let mut c = PageClock::default();
        let _ = c.choose(0, 1000, 900, &|_| true, &|_| None, &mut |_| true);
        let ids = c.choose(0, 64, 5, &|_| true, &|_| Some(false), &mut |_| true).drop;
        assert_eq!(ids.len(), 5);
        assert!(ids.iter().all(|&id| id < 64));
    }
}
