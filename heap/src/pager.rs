//! Page access and allocation over a `Storage`: the copy-on-write discipline lives here.
//!
//! Sets of pages the heap does not currently reach from its tree:
//! - `free`: reusable now: no durable checkpoint references them and no live snapshot can reach
//!   them.
//! - `pending`: freed since the last checkpoint but still referenced by the durable checkpoint.
//! - `held`: referenced only by the *older* of the two durable checkpoints (the one the other meta
//!   page names). Held back one more checkpoint so that, if the newest meta page is ever
//!   unreadable, open can fall back to the older checkpoint and find its pages intact.
//! - `retired`: no checkpoint needs them any more, but a snapshot captured before they were
//!   released may still read them; each carries the newest captured generation at its release,
//!   and becomes free once the `Registry` has no generation at or below it (`reclaim`).
//!
//! At each completed checkpoint: `retired += held; held = pending as of its begin` (pages released
//! while it was in flight stay pending), then `reclaim`.
//! - `durable_freelist`: the pages that hold the durable checkpoint's free list.
//!
//! `fresh` marks pages allocated since the last checkpoint (the dirty pages a checkpoint flushes).
//! `writable` marks pages allocated since the last checkpoint *and* the last capture: the only
//! pages that may be written in place. Every other page belongs to the durable checkpoint or to
//! a snapshot and is copied on first write (`cow`). Without snapshots, `writable == fresh`.
//!
//! Invariant: a page referenced by the durable meta is never written before the next meta is durable.
//! Invariant: a page a live snapshot can reach is never written and never handed out.
//! Invariant: pages are only handed out from `free` or past the high-water mark `page_count`.
//! Invariant: `writable` ⊆ `fresh`; `free`, `pending`, `held`, `retired` and reachable pages never
//! overlap (checked by `check_integrity`).

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::limits::{PAGE, PAGE_SIZE};
use crate::meta::FIRST_DATA_PAGE;
use crate::page::{OFF_KIND, PageBits, PageKind, spans};
use crate::shed::PageClock;
use crate::snapshot::{PageMarks, Pages, Registry, read_page};
use crate::storage::{Region, Storage};

/// Smallest step the file grows by.
const GROW_BYTES_MIN: u64 = 256 * 1024;
/// Largest step the file grows by.
const GROW_BYTES_MAX: u64 = 64 * 1024 * 1024;

pub(crate) struct Pager {
    pub(crate) storage: Box<dyn Storage>,
    /// The storage as mapped now (refreshed after every grow and truncate).
    region: Arc<Region>,
    /// Pages in use, including the header and meta pages (the high-water mark).
    pub(crate) page_count: u64,
    pub(crate) max_pages: u64,
    pub(crate) free: BTreeSet<u64>,
    pub(crate) pending: Vec<u64>,
    pub(crate) held: Vec<u64>,
    /// (generation tag, page): see the module doc.
    pub(crate) retired: Vec<(u64, u64)>,
    pub(crate) durable_freelist: Vec<u64>,
    pub(crate) fresh: PageBits,
    pub(crate) writable: PageBits,
    /// The newest captured generation (0: none yet).
    pub(crate) captured: u64,
    pub(crate) registry: crate::sync::Arc<Registry>,
    /// Shared with every snapshot; replaced by a grown copy that shares its chunks.
    pub(crate) marks: Arc<PageMarks>,
    /// Pages that became free since the last `give_back` (their memory is returned then).
    freed: Vec<u64>,
    /// The pages the checkpoint in flight writes back (dirty until it ends): `fresh` as of its
    /// begin. Empty when none is in flight.
    pub(crate) flushing: PageBits,
    /// Which resident pages `shed` drops next.
    pub(crate) clock: PageClock,
}

impl Pages for Pager {
    fn page(&self, id: u64) -> Result<&[u8]> {
        read_page(&self.region, &self.marks, self.page_count, id)
    }
}

impl Pager {
    pub(crate) fn new(storage: Box<dyn Storage>, page_count: u64, max_pages: u64) -> Self {
        let region = storage.region();
        let mut p = Pager {
            storage,
            region,
            page_count,
            max_pages,
            free: BTreeSet::new(),
            pending: Vec::new(),
            held: Vec::new(),
            retired: Vec::new(),
            durable_freelist: Vec::new(),
            fresh: PageBits::default(),
            writable: PageBits::default(),
            captured: 0,
            registry: crate::sync::Arc::new(Registry::new()),
            marks: Arc::new(PageMarks::empty()),
            freed: Vec::new(),
            flushing: PageBits::default(),
            clock: PageClock::default(),
        };
        p.size_verified();
        p
    }

    /// Refreshes the mapping and the verified set after the storage changed size.
    fn size_verified(&mut self) {
        self.region = self.storage.region();
        let pages = self.storage.len() / PAGE_SIZE as u64;
        if !self.marks.covers(pages) {
            self.marks = Arc::new(self.marks.grown(pages));
        }
    }

    /// The mapping readers of a capture taken now use.
    pub(crate) fn region(&self) -> Arc<Region> {
        self.region.clone()
    }

    /// A data page, bounds-checked, its checksum verified on first access since open.
    pub(crate) fn page(&self, id: u64) -> Result<&[u8]> {
        Pages::page(self, id)
    }

    pub(crate) fn raw_mut(&mut self, id: u64) -> &mut [u8] {
        self.storage.bytes_mut(id * PAGE_SIZE as u64, PAGE)
    }

    /// A page allocated since the last checkpoint and capture, for writing in place.
    pub(crate) fn page_mut(&mut self, id: u64) -> &mut [u8] {
        assert!(self.writable.get(id), "writing page {id}, which a checkpoint or a snapshot may still read");
        self.raw_mut(id)
    }

    /// Makes sure `n` more pages can be allocated without growing the file mid-operation.
    pub(crate) fn reserve(&mut self, n: u64) -> Result<()> {
        if (self.free.len() as u64) < n && !self.retired.is_empty() {
            self.reclaim();
        }
        let from_free = self.free.len() as u64;
        let new_pages = n.saturating_sub(from_free);
        let want = self.page_count + new_pages;
        if want > self.max_pages {
            return Err(Error::HeapFull { max_bytes: self.max_pages * PAGE_SIZE as u64 });
        }
        self.ensure_len(want)
    }

    /// Grows the storage (in extents) to hold at least `pages` pages.
    pub(crate) fn ensure_len(&mut self, pages: u64) -> Result<()> {
        let need = pages * PAGE_SIZE as u64;
        let have = self.storage.len();
        if need <= have {
            return Ok(());
        }
        let step = (have / 16).clamp(GROW_BYTES_MIN, GROW_BYTES_MAX);
        let cap = self.max_pages * PAGE_SIZE as u64;
        let target = need.max(have + step).min(cap.max(need));
        let target = target.next_multiple_of(PAGE_SIZE as u64);
        self.storage.grow(target)?;
        self.size_verified();
        Ok(())
    }

    /// Shrinks the storage to `pages` pages, at least `page_count` (the pages cut are free).
    pub(crate) fn truncate_to(&mut self, pages: u64) -> Result<()> {
        assert!(pages >= self.page_count, "cutting pages in use");
        self.storage.truncate(pages * PAGE_SIZE as u64)?;
        self.size_verified();
        Ok(())
    }

    /// Allocates a page: the lowest free page, else a new one past the high-water mark.
    pub(crate) fn alloc(&mut self) -> Result<u64> {
        let id = match self.free.pop_first() {
            Some(id) => id,
            None => {
                if self.page_count >= self.max_pages {
                    return Err(Error::HeapFull { max_bytes: self.max_pages * PAGE_SIZE as u64 });
                }
                self.ensure_len(self.page_count + 1)?;
                self.page_count += 1;
                self.page_count - 1
            }
        };
        debug_assert!(!self.fresh.get(id), "page {id} handed out twice");
        self.fresh.set(id);
        self.writable.set(id);
        self.marks.verified.set(id);
        Ok(id)
    }

    /// Releases a page the tree no longer reaches.
    pub(crate) fn release(&mut self, id: u64) {
        assert!(id >= crate::meta::FIRST_DATA_PAGE && id < self.page_count, "releasing page {id}");
        if self.writable.get(id) {
            // Never durable and never captured: nobody can need its old contents.
            self.writable.clear(id);
            self.fresh.clear(id);
            self.free.insert(id);
            self.note_freed(id);
        } else if self.fresh.get(id) {
            // Not durable, but a snapshot may reach it.
            self.fresh.clear(id);
            self.retired.push((self.captured, id));
        } else {
            self.pending.push(id);
        }
    }

    /// Moves every retired page no live snapshot can reach into `free`.
    pub(crate) fn reclaim(&mut self) {
        let oldest = self.registry.oldest();
        let (free, freed) = (&mut self.free, &mut self.freed);
        self.retired.retain(|&(tag, id)| {
            let reusable = oldest.is_none_or(|o| o > tag);
            if reusable {
                free.insert(id);
                freed.push(id);
            }
            !reusable
        });
    }

    /// Notes a page that became free, keeping the notes no more than about twice the free set
    /// (a page freed, reused and freed again is noted once).
    fn note_freed(&mut self, id: u64) {
        self.freed.push(id);
        if self.freed.len() > 2 * self.free.len() + 1024 {
            let free = &self.free;
            self.freed.retain(|id| free.contains(id));
            self.freed.sort_unstable();
            self.freed.dedup();
        }
    }

    /// Returns the memory of the pages that became free since the last call and are still
    /// free (runs of them, one `Storage::discard` each) to the system; they are read back from
    /// the file if ever handed out again.
    pub(crate) fn give_back(&mut self) {
        let mut ids: Vec<u64> = std::mem::take(&mut self.freed);
        ids.retain(|id| self.free.contains(id) && *id < self.page_count);
        for (first, n) in spans(ids, |_| false) {
            self.storage.discard(first * PAGE_SIZE as u64, n * PAGE_SIZE as u64);
        }
    }

    /// Drops the memory of up to `want` resident pages that are durable and clean, chosen by
    /// the page clock (`shed`): never a page written since the last checkpoint or being
    /// written back by the one in flight, never a free page (`give_back` returns those), never
    /// a branch node (the tree's upper levels stay resident). Their checksums are checked again
    /// when they are next read. Pages read since the hand last passed are spared, unmarked.
    /// Returns the pages resident before and the pages dropped.
    ///
    /// A reader on another thread that checked a page's verified bit just before it is cleared
    /// may read the page as it comes back from the file unchecked; a later read checks it.
    pub(crate) fn shed(&mut self, want: u64) -> (u64, u64) {
        if !self.storage.pages_out() {
            return (0, 0);
        }
        let region = self.region.clone();
        let Some((map, os_page)) = region.resident_map() else { return (0, 0) };
        let resident = map.iter().filter(|b| **b & 1 == 1).count() as u64 * os_page as u64 / PAGE as u64;
        if os_page != PAGE || want == 0 {
            return (resident, 0);
        }
        let pages = self.page_count.min(map.len() as u64);
        let marks = self.marks.clone();
        let (fresh, flushing, free) = (&self.fresh, &self.flushing, &self.free);
        let choice = self.clock.choose(
            FIRST_DATA_PAGE,
            pages,
            want,
            &|id| map[id as usize] & 1 == 1,
            &|id| marks.referenced.get(id),
            &mut |id| {
                !fresh.get(id)
                    && !flushing.get(id)
                    && !free.contains(&id)
                    && region
                        .bytes(id * PAGE_SIZE as u64, PAGE)
                        .is_some_and(|p| p[OFF_KIND] != PageKind::Branch as u8)
            },
        );
        // Read since the hand last passed: they stay, unmarked.
        for &id in &choice.spare {
            marks.referenced.clear(id);
        }
        let dropped = choice.drop.len() as u64;
        // One call per stretch of chosen pages, across pages that were not resident (a page
        // read back into such a gap since goes too, and its marks are cleared) and are not
        // written since the last checkpoint: such a page the kernel wrote back and evicted by
        // itself is unsealed (its checksum is stale), so it must keep its verified bit.
        let (fresh, flushing) = (&self.fresh, &self.flushing);
        let stretches = spans(choice.drop, |id| {
            map.get(id as usize).is_some_and(|b| b & 1 == 0) && !fresh.get(id) && !flushing.get(id)
        });
        for &(first, n) in &stretches {
            // Cleared before the pages go, so a read after this point checks what comes back.
            for id in first..first + n {
                marks.verified.clear(id);
                marks.referenced.clear(id);
            }
        }
        for (first, n) in stretches {
            self.storage.page_out(first * PAGE_SIZE as u64, n * PAGE_SIZE as u64);
        }
        (resident, dropped)
    }

    /// Seals every page written since the last capture and makes it read-only: after this, the
    /// tree as it stands can be read by a snapshot of generation `captured + 1`. Returns it.
    pub(crate) fn capture(&mut self) -> u64 {
        let ids: Vec<u64> = self.writable.iter().collect();
        for id in ids {
            crate::page::seal(self.raw_mut(id));
        }
        self.writable.clear_all();
        self.captured += 1;
        self.captured
    }

    /// Returns a page that may be written: `id` itself if writable, else a fresh copy of it (the
    /// original is released once the copy exists).
    pub(crate) fn cow(&mut self, id: u64) -> Result<u64> {
        if self.writable.get(id) {
            return Ok(id);
        }
        self.page(id)?;
        let new = self.alloc()?;
        self.storage.copy(id * PAGE_SIZE as u64, new * PAGE_SIZE as u64, PAGE);
        self.release(id);
        Ok(new)
    }
}
