//! Read snapshots: a heap's tree as of one moment, readable from any thread while the heap's
//! single writer goes on (LMDB's reader rule, in process).
//!
//! - `Heap::capture` seals every page written since the previous capture (checksums) and returns
//!   a `Snapshot`: the root, the page count, the storage `Region` mapped then, the shared
//!   verified-page bits, the LSN it contains and a generation number. From then on the writer
//!   never writes those pages in place (`Pager::cow` copies them).
//! - Every live `Snapshot` holds a `Pin` of its generation in the heap's `Registry`. A page the
//!   writer releases while the newest captured generation is `g` is *retired* with tag `g`; it
//!   is reused only once every generation `<= g` is unpinned (`Registry::oldest`), because only
//!   those snapshots can reach it.
//! - `Published` is where an owner hands the newest snapshot to readers: `load` clones it under
//!   a short lock, `publish` replaces it (generations only go up).
//!
//! Invariant: a page reachable from a live snapshot is never written and never reused.
//! Invariant: a generation is pinned before its snapshot is visible to anyone, and unpinned only
//! when the last handle to it is dropped.
//! The `Registry` and `Published` use the `sync` shim, so `loom-tests/` model them.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::{Bound, RangeBounds};

use crate::btree::{self, TreeRoot};
use crate::error::{Error, Result, corrupt};
use crate::limits::{PAGE, PAGE_SIZE};
use crate::meta::FIRST_DATA_PAGE;
use crate::page;
use crate::storage::Region;
use crate::sync::{Arc, Mutex};

/// Pages per chunk of a `SharedBits` (a chunk is 8 KiB of bits).
const VERIFIED_CHUNK_PAGES: u64 = 64 * 1024;

/// What every read of a page marks, shared by the writer and every snapshot:
/// - `verified`: which pages' checksums have been checked since open (or which we wrote, or
///   since the memory budget dropped them): a benign cache.
/// - `referenced`: which pages were read since the memory budget's clock hand last passed
///   them (`shed`): the reference bit of its CLOCK, exact per page (the page tables' own bits
///   are not readable, and the kernel maps 16 neighbours with every fault).
pub(crate) struct PageMarks {
    pub(crate) verified: SharedBits,
    pub(crate) referenced: SharedBits,
}

impl PageMarks {
    pub(crate) fn empty() -> PageMarks {
        PageMarks { verified: SharedBits::empty(), referenced: SharedBits::empty() }
    }

    /// Marks covering at least `pages` pages that share `self`'s bits.
    pub(crate) fn grown(&self, pages: u64) -> PageMarks {
        PageMarks { verified: self.verified.grown(pages), referenced: self.referenced.grown(pages) }
    }

    pub(crate) fn covers(&self, pages: u64) -> bool {
        self.verified.covers(pages) && self.referenced.covers(pages)
    }
}

/// A set of page ids any thread may set and clear: setting a bit twice is harmless, so relaxed
/// std atomics suffice. It grows by whole chunks that never move, and a grown set shares the
/// old chunks, so a snapshot keeps reading the set it was captured with.
pub(crate) struct SharedBits {
    chunks: Vec<std::sync::Arc<[std::sync::atomic::AtomicU64]>>,
}

impl SharedBits {
    fn chunk() -> std::sync::Arc<[std::sync::atomic::AtomicU64]> {
        (0..VERIFIED_CHUNK_PAGES / 64).map(|_| std::sync::atomic::AtomicU64::new(0)).collect()
    }

    /// A set covering at least `pages` pages that shares `self`'s bits.
    pub(crate) fn grown(&self, pages: u64) -> SharedBits {
        let mut chunks = self.chunks.clone();
        while (chunks.len() as u64) * VERIFIED_CHUNK_PAGES < pages {
            chunks.push(Self::chunk());
        }
        SharedBits { chunks }
    }

    pub(crate) fn empty() -> SharedBits {
        SharedBits { chunks: Vec::new() }
    }

    pub(crate) fn covers(&self, pages: u64) -> bool {
        (self.chunks.len() as u64) * VERIFIED_CHUNK_PAGES >= pages
    }

    fn word(&self, id: u64) -> Option<&std::sync::atomic::AtomicU64> {
        let c = self.chunks.get((id / VERIFIED_CHUNK_PAGES) as usize)?;
        c.get(((id % VERIFIED_CHUNK_PAGES) / 64) as usize)
    }

    pub(crate) fn get(&self, id: u64) -> bool {
        self.word(id).is_some_and(|w| w.load(std::sync::atomic::Ordering::Relaxed) & (1 << (id % 64)) != 0)
    }

    pub(crate) fn set(&self, id: u64) {
        if let Some(w) = self.word(id) {
            w.fetch_or(1 << (id % 64), std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Makes the next read of page `id` check its checksum again (its memory was dropped).
    pub(crate) fn clear(&self, id: u64) {
        if let Some(w) = self.word(id) {
            w.fetch_and(!(1 << (id % 64)), std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Read access to pages: the writer's `Pager` and a `Snapshot`'s view.
pub(crate) trait Pages {
    /// A data page, bounds-checked, its checksum verified on first access since open.
    fn page(&self, id: u64) -> Result<&[u8]>;
}

/// Reads page `id` of `region`, below `page_count`, verifying it the first time and marking it
/// referenced.
pub(crate) fn read_page<'a>(
    region: &'a Region,
    marks: &PageMarks,
    page_count: u64,
    id: u64,
) -> Result<&'a [u8]> {
    if id < FIRST_DATA_PAGE || id >= page_count {
        return corrupt(id, "page pointer outside the file");
    }
    let Some(p) = region.bytes(id * PAGE_SIZE as u64, PAGE) else {
        return Err(Error::Poisoned(format!("page {id} is not mapped (a failed grow or truncate)")));
    };
    if !marks.verified.get(id) {
        page::verify(id, p)?;
        marks.verified.set(id);
    }
    // A load first: a hot page's bit is set already, and its cache line stays shared.
    if !marks.referenced.get(id) {
        marks.referenced.set(id);
    }
    Ok(p)
}

/// Which snapshot generations are alive. The writer asks for the oldest before reusing a
/// retired page.
#[derive(Default)]
pub struct Registry {
    live: Mutex<BTreeMap<u64, u64>>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Pins generation `generation` of `registry` until the returned `Pin` is dropped.
    pub fn pin(registry: &Arc<Registry>, generation: u64) -> Pin {
        *registry.live.lock().unwrap_or_else(|e| e.into_inner()).entry(generation).or_insert(0) += 1;
        Pin { registry: registry.clone(), generation }
    }

    /// The oldest pinned generation (`None`: none is).
    pub fn oldest(&self) -> Option<u64> {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).keys().next().copied()
    }

    /// Whether a page retired with tag `tag` may be reused now.
    pub fn reusable(&self, tag: u64) -> bool {
        self.oldest().is_none_or(|oldest| oldest > tag)
    }
}

/// Keeps one generation pinned in its registry.
pub struct Pin {
    registry: Arc<Registry>,
    generation: u64,
}

impl Pin {
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut live = self.registry.live.lock().unwrap_or_else(|e| e.into_inner());
        let n = live.get_mut(&self.generation).expect("a pinned generation is registered");
        assert!(*n > 0, "generation {} unpinned more often than pinned", self.generation);
        *n -= 1;
        if *n == 0 {
            live.remove(&self.generation);
        }
    }
}

/// Something with a generation, as `Published` holds.
pub trait Generation {
    fn generation(&self) -> u64;
}

/// The newest published value (a snapshot) for readers: `load` clones it under a short lock.
pub struct Published<T> {
    current: Mutex<Option<Arc<T>>>,
}

impl<T: Generation> Published<T> {
    pub fn new() -> Published<T> {
        Published { current: Mutex::new(None) }
    }

    /// The newest published value, if any.
    pub fn load(&self) -> Option<Arc<T>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Publishes `v` unless a newer generation is already published; returns whether it was.
    pub fn publish(&self, v: Arc<T>) -> bool {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if cur.as_ref().is_some_and(|c| c.generation() >= v.generation()) {
            return false;
        }
        // The old value is dropped outside the lock (its drop may unpin a generation).
        let old = cur.replace(v);
        drop(cur);
        drop(old);
        true
    }

    /// Withdraws the published value (its owner stops): later loads get `None`.
    pub fn clear(&self) {
        let old = self.current.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(old);
    }
}

impl<T: Generation> Default for Published<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// A heap's tree as of one capture: readable from any thread, unchanged by later writes.
pub struct Snapshot {
    pub(crate) region: std::sync::Arc<Region>,
    pub(crate) marks: std::sync::Arc<PageMarks>,
    pub(crate) page_count: u64,
    pub(crate) tree: TreeRoot,
    pub(crate) lsn: u64,
    pub(crate) pin: Pin,
}

impl Pages for Snapshot {
    fn page(&self, id: u64) -> Result<&[u8]> {
        read_page(&self.region, &self.marks, self.page_count, id)
    }
}

impl Generation for Snapshot {
    fn generation(&self) -> u64 {
        self.pin.generation()
    }
}

impl Snapshot {
    /// The LSN of the last batch this snapshot contains.
    pub fn lsn(&self) -> u64 {
        self.lsn
    }

    /// The capture's generation (increases with every capture of a heap).
    pub fn generation(&self) -> u64 {
        self.pin.generation()
    }

    /// The value stored under `key`, borrowed from the map when it is inline.
    pub fn get_ref(&self, key: &[u8]) -> Result<Option<Cow<'_, [u8]>>> {
        match btree::get(self, &self.tree, key)? {
            Some(v) => Ok(Some(btree::load(self, v)?)),
            None => Ok(None),
        }
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &[u8]) -> Result<bool> {
        Ok(btree::get(self, &self.tree, key)?.is_some())
    }

    /// Number of keys.
    pub fn len(&self) -> u64 {
        self.tree.len
    }

    pub fn is_empty(&self) -> bool {
        self.tree.len == 0
    }

    /// Re-checks the checksum of every page this snapshot reaches (tree and overflow pages),
    /// whether or not it was verified before: a debug checker for readers racing the writer.
    pub fn verify_pages(&self) -> Result<u64> {
        if self.tree.root == 0 {
            return Ok(0);
        }
        let mut pages = 0u64;
        let mut stack = vec![(self.tree.root, self.tree.depth - 1)];
        while let Some((id, level)) = stack.pop() {
            let n = btree::node_at(self, id, level)?;
            page::verify(id, self.page(id)?)?;
            pages += 1;
            if n.is_leaf() {
                for i in 0..n.count() {
                    if let crate::node::LeafValue::Overflow { first, len } = n.value(i)? {
                        crate::overflow::walk(self, first, len, |pg, _| {
                            pages += 1;
                            page::verify(pg, self.page(pg)?).map(|_| ())
                        })?;
                    }
                }
            } else {
                for i in 0..=n.count() {
                    stack.push((n.child(i)?, level - 1));
                }
            }
            if pages > self.page_count {
                return corrupt(id, "snapshot reaches more pages than it has (a cycle)");
            }
        }
        Ok(pages)
    }

    /// Entries whose keys fall in `range`, in key order; iterate from either end.
    pub fn range<'a, K: AsRef<[u8]> + ?Sized, R: RangeBounds<K>>(
        &'a self,
        range: R,
    ) -> crate::heap::Range<'a> {
        fn as_bytes<K: AsRef<[u8]> + ?Sized>(b: Bound<&K>) -> Bound<&[u8]> {
            match b {
                Bound::Included(k) => Bound::Included(k.as_ref()),
                Bound::Excluded(k) => Bound::Excluded(k.as_ref()),
                Bound::Unbounded => Bound::Unbounded,
            }
        }
        crate::heap::Range::new(self, self.tree, as_bytes(range.start_bound()), as_bytes(range.end_bound()))
    }
}
