//! Page access and allocation over a `Storage`: the copy-on-write discipline lives here.
//!
//! Three sets partition the pages a heap does not currently reach from its tree:
//! - `free`: reusable now; no durable checkpoint references them.
//! - `pending`: freed since the last checkpoint but still referenced by the durable checkpoint.
//! - `held`: referenced only by the *older* of the two durable checkpoints (the one the other meta
//!   page names). Held back one more checkpoint so that, if the newest meta page is ever
//!   unreadable, open can fall back to the older checkpoint and find its pages intact.
//!
//! At each completed checkpoint: `free += held; held = pending; pending = []`.
//! - `durable_freelist`: the pages that hold the durable checkpoint's free list.
//!
//! `fresh` marks pages allocated since the last checkpoint: the only pages that may be written in
//! place. Every other page belongs to the durable checkpoint and is copied on first write (`cow`).
//!
//! Invariant: a page referenced by the durable meta is never written before the next meta is durable.
//! Invariant: pages are only handed out from `free` or past the high-water mark `page_count`.
//! Invariant: `free` pages and reachable pages never overlap (checked by `check_integrity`).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result, corrupt};
use crate::limits::{PAGE, PAGE_SIZE};
use crate::meta::FIRST_DATA_PAGE;
use crate::page::{self, PageBits};
use crate::storage::Storage;

/// Smallest step the file grows by.
const GROW_BYTES_MIN: u64 = 256 * 1024;
/// Largest step the file grows by.
const GROW_BYTES_MAX: u64 = 64 * 1024 * 1024;

pub(crate) struct Pager {
    pub(crate) storage: Box<dyn Storage>,
    /// Pages in use, including the header and meta pages (the high-water mark).
    pub(crate) page_count: u64,
    pub(crate) max_pages: u64,
    pub(crate) free: BTreeSet<u64>,
    pub(crate) pending: Vec<u64>,
    pub(crate) held: Vec<u64>,
    pub(crate) durable_freelist: Vec<u64>,
    pub(crate) fresh: PageBits,
    /// Pages whose checksum has been verified since open (or that we wrote). A benign cache:
    /// setting a bit twice is harmless, so relaxed std atomics suffice and reads stay `&self`.
    verified: Vec<AtomicU64>,
}

impl Pager {
    pub(crate) fn new(storage: Box<dyn Storage>, page_count: u64, max_pages: u64) -> Self {
        let mut p = Pager {
            storage,
            page_count,
            max_pages,
            free: BTreeSet::new(),
            pending: Vec::new(),
            held: Vec::new(),
            durable_freelist: Vec::new(),
            fresh: PageBits::default(),
            verified: Vec::new(),
        };
        p.size_verified();
        p
    }

    fn size_verified(&mut self) {
        let words = (self.storage.len() / PAGE_SIZE as u64).div_ceil(64) as usize;
        self.verified.resize_with(words, || AtomicU64::new(0));
    }

    fn is_verified(&self, id: u64) -> bool {
        let w = (id / 64) as usize;
        w < self.verified.len() && self.verified[w].load(Ordering::Relaxed) & (1 << (id % 64)) != 0
    }

    fn mark_verified(&self, id: u64) {
        if let Some(w) = self.verified.get((id / 64) as usize) {
            w.fetch_or(1 << (id % 64), Ordering::Relaxed);
        }
    }

    pub(crate) fn raw_mut(&mut self, id: u64) -> &mut [u8] {
        let at = id as usize * PAGE;
        &mut self.storage.bytes_mut()[at..at + PAGE]
    }

    /// A data page, bounds-checked, its checksum verified on first access since open.
    pub(crate) fn page(&self, id: u64) -> Result<&[u8]> {
        if id < FIRST_DATA_PAGE || id >= self.page_count {
            return corrupt(id, "page pointer outside the file");
        }
        let at = id as usize * PAGE;
        let Some(p) = self.storage.bytes().get(at..at + PAGE) else {
            return Err(Error::Poisoned(format!("page {id} is not mapped (a failed grow or truncate)")));
        };
        if !self.is_verified(id) {
            page::verify(id, p)?;
            self.mark_verified(id);
        }
        Ok(p)
    }

    pub(crate) fn is_fresh(&self, id: u64) -> bool {
        self.fresh.get(id)
    }

    /// A page allocated since the last checkpoint, for writing in place.
    pub(crate) fn page_mut(&mut self, id: u64) -> &mut [u8] {
        assert!(self.fresh.get(id), "writing page {id}, which belongs to the durable checkpoint");
        self.raw_mut(id)
    }

    /// Makes sure `n` more pages can be allocated without growing the file mid-operation.
    pub(crate) fn reserve(&mut self, n: u64) -> Result<()> {
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
        self.fresh.set(id);
        self.mark_verified(id);
        Ok(id)
    }

    /// Releases a page the tree no longer reaches.
    pub(crate) fn release(&mut self, id: u64) {
        debug_assert!(id >= FIRST_DATA_PAGE && id < self.page_count);
        if self.fresh.get(id) {
            // Never durable: nobody can need its old contents.
            self.fresh.clear(id);
            self.free.insert(id);
        } else {
            self.pending.push(id);
        }
    }

    /// Returns a page that may be written: `id` itself if fresh, else a fresh copy of it (the
    /// original is released once the copy exists).
    pub(crate) fn cow(&mut self, id: u64) -> Result<u64> {
        if self.fresh.get(id) {
            return Ok(id);
        }
        self.page(id)?;
        let new = self.alloc()?;
        let bytes = self.storage.bytes_mut();
        bytes.copy_within(id as usize * PAGE..(id as usize + 1) * PAGE, new as usize * PAGE);
        self.release(id);
        Ok(new)
    }
}
