//! Which resident pages a heap drops when the node is over its memory budget: a coarse CLOCK
//! over extents of `EXTENT_PAGES` pages (issue 16; DESIGN.md "Memory").
//!
//! A mapped file's pages carry no reference bit we can read, but a dropped page that is read
//! again comes back resident: an extent holding more resident pages than were left after the
//! hand's last visit was read since (a *reference*). The hand walks the extents in a circle; at
//! each one it either gives a referenced extent a second chance (remembering its residency as
//! the new baseline) or drops its droppable pages (the caller decides which: durable, clean,
//! not a branch node). An extent the hand has not visited yet counts as unreferenced.
//!
//! Pure and synchronous: the pager asks it for page ids, then drops them.
//!
//! Invariant: only pages the caller calls droppable are chosen, each at most once per call, and
//! no more than asked for.

/// Pages per extent (256 KiB of 4 KiB pages): coarse enough that the state is one byte per
/// extent, fine enough that a hot leaf keeps little cold data resident beside it.
pub(crate) const EXTENT_PAGES: u64 = 64;

/// An extent the hand has not visited since the heap opened.
const UNSEEN: u8 = u8::MAX;

#[derive(Default, Debug)]
pub(crate) struct ExtentClock {
    hand: u64,
    /// Per extent: the resident pages left after the hand's last visit (`UNSEEN` before one).
    left: Vec<u8>,
}

impl ExtentClock {
    /// Chooses up to `want` pages of `first..pages` to drop, walking at most two turns of the
    /// hand (a referenced extent is spared once per turn). `resident(id)` says whether a page is
    /// resident; `droppable(id)` whether it may be dropped (asked only of resident pages).
    pub(crate) fn choose(
        &mut self,
        first: u64,
        pages: u64,
        want: u64,
        resident: &dyn Fn(u64) -> bool,
        droppable: &mut dyn FnMut(u64) -> bool,
    ) -> Vec<u64> {
        let extents = pages.div_ceil(EXTENT_PAGES);
        self.left.resize(extents as usize, UNSEEN);
        let mut chosen = Vec::new();
        if extents == 0 || want == 0 {
            return chosen;
        }
        if self.hand >= extents {
            self.hand = 0;
        }
        let mut visited = 0;
        while (chosen.len() as u64) < want && visited < 2 * extents {
            let e = self.hand;
            self.hand = (self.hand + 1) % extents;
            visited += 1;
            let lo = (e * EXTENT_PAGES).max(first);
            let hi = ((e + 1) * EXTENT_PAGES).min(pages);
            let res: Vec<u64> = (lo..hi).filter(|&id| resident(id)).collect();
            let n = res.len() as u8; // at most EXTENT_PAGES < UNSEEN
            let left = &mut self.left[e as usize];
            if *left != UNSEEN && n > *left {
                // Read since the last visit: spared this turn.
                *left = n;
                continue;
            }
            let mut dropped = 0u8;
            for id in res {
                if (chosen.len() as u64) >= want {
                    break;
                }
                if droppable(id) {
                    chosen.push(id);
                    dropped += 1;
                }
            }
            *left = n - dropped;
        }
        chosen
    }

    /// Forgets what the hand learnt (after the heap's pages moved, a compaction).
    pub(crate) fn reset(&mut self) {
        self.left.clear();
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
        pinned: BTreeSet<u64>,
    }

    impl Model {
        fn new(pages: u64, pinned: &[u64]) -> Model {
            Model { resident: RefCell::new((0..pages).collect()), pinned: pinned.iter().copied().collect() }
        }
        fn shed(&self, clock: &mut ExtentClock, first: u64, pages: u64, want: u64) -> Vec<u64> {
            let snapshot = self.resident.borrow().clone();
            let ids = clock.choose(first, pages, want, &|id| snapshot.contains(&id), &mut |id| {
                !self.pinned.contains(&id)
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
        let mut c = ExtentClock::default();
        let ids = m.shed(&mut c, 2, 300, 100);
        assert_eq!(ids.len(), 100);
        let set: BTreeSet<u64> = ids.iter().copied().collect();
        assert_eq!(set.len(), ids.len(), "each page once");
        assert!(ids.iter().all(|&id| id >= 2 && !m.pinned.contains(&id)));
        // Everything droppable goes in the end; pinned and below-first pages stay.
        let rest = m.shed(&mut c, 2, 300, 1000);
        assert_eq!(ids.len() + rest.len(), 300 - 2 - 3);
        assert!(m.shed(&mut c, 2, 300, 1000).is_empty());
    }

    #[test]
    fn a_referenced_extent_gets_a_second_chance() {
        let pages = 2 * EXTENT_PAGES;
        let half = EXTENT_PAGES / 2;
        let m = Model::new(pages, &[]);
        let mut c = ExtentClock::default();
        // Half of each extent goes, one extent per call.
        assert!(m.shed(&mut c, 0, pages, half).iter().all(|&id| id < EXTENT_PAGES));
        assert!(m.shed(&mut c, 0, pages, half).iter().all(|&id| id >= EXTENT_PAGES));
        // A dropped page of extent 0 is read again: extent 0 was referenced, extent 1 was not.
        m.touch(0);
        let ids = m.shed(&mut c, 0, pages, half);
        assert_eq!(ids.len() as u64, half);
        assert!(ids.iter().all(|&id| id >= EXTENT_PAGES), "the referenced extent is spared: {ids:?}");
        // With nothing else left to drop, the next turn takes it after all.
        let ids = m.shed(&mut c, 0, pages, 10);
        assert_eq!(ids.len(), 10);
        assert!(ids.iter().all(|&id| id < EXTENT_PAGES));
    }

    #[test]
    fn an_empty_heap_or_no_want_chooses_nothing() {
        let mut c = ExtentClock::default();
        assert!(c.choose(2, 0, 10, &|_| true, &mut |_| true).is_empty());
        assert!(c.choose(2, 100, 0, &|_| true, &mut |_| true).is_empty());
        assert!(c.choose(2, 100, 10, &|_| false, &mut |_| true).is_empty());
    }

    #[test]
    fn the_hand_survives_a_shrinking_heap() {
        let mut c = ExtentClock::default();
        let _ = c.choose(0, 10 * EXTENT_PAGES, 9 * EXTENT_PAGES, &|_| true, &mut |_| true);
        let ids = c.choose(0, EXTENT_PAGES, 5, &|_| true, &mut |_| true);
        assert_eq!(ids.len(), 5);
        assert!(ids.iter().all(|&id| id < EXTENT_PAGES));
    }
}
