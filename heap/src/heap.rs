//! `Heap`: one persistent, memory-mapped B+tree of byte keys to byte values.
//!
//! Lifecycle: `open` maps the file, validates the header and the newest valid meta page, and
//! loads that checkpoint's free list; nothing else is read. Writes (`put`, `delete`, `apply`,
//! `upsert`) change writable pages only (others are copied first); `capture` seals them for a
//! read snapshot; a checkpoint (`begin_checkpoint`, its job, `finish_checkpoint`) seals and
//! flushes them, then writes the other meta page. A crash at any instant therefore leaves the file
//! exactly at the last completed checkpoint.
//!
//! Invariant: a batch either applies completely or the heap is poisoned (it refuses all work until
//! reopened, which recovers the last checkpoint); callers never observe half a batch.
//! Invariant: `check_integrity` finds every page in exactly one of: reachable from the tree,
//! holding the durable free list, free, pending, held, or retired (see `pager`).

use std::borrow::Cow;
use std::ops::{Bound, RangeBounds};
use std::path::Path;

use crate::batch::{BatchOp, WriteBatch, check_key, check_value};
use crate::btree::{self, Cursor, TreeRoot};
use crate::error::{Error, Result, corrupt};
use crate::freelist::{self, FREELIST_IDS_PER_PAGE};
use crate::io_stats::IoStats;
use crate::limits::{FILE_BYTES_MAX, PAGE, PAGE_SIZE};
use crate::meta::{self, FIRST_DATA_PAGE, HEADER_PAGE, Meta};
use crate::oplog::{Durability, FileLogDir, FsyncPolicy, LogDir, OpLog, ReplayProgress, ReplayReport};
use crate::page;
use crate::pager::Pager;
use crate::snapshot::{Pages, Snapshot};
use crate::storage::{FileStorage, Flusher, Storage, sync_dir};
use std::sync::Arc;

/// Most pages a batch reserves up front. A batch whose worst case is larger reserves this much;
/// if the disk then fills mid-batch the heap is poisoned rather than half-applied.
const BATCH_RESERVE_PAGES_MAX: u64 = 1024;
/// Compaction stops after this many rounds of moving pages down.
const COMPACT_ROUNDS_MAX: u32 = 4;
/// Above this many separate dirty runs a checkpoint flushes the whole data area in one call.
const FLUSH_RUNS_MAX: usize = 256;

/// Options for opening a heap.
#[derive(Clone, Debug)]
pub struct HeapOptions {
    /// The file never grows past this many bytes (`Error::HeapFull`).
    pub max_file_bytes: u64,
    /// Keep an op log next to the heap file (`Heap::open`), so committed batches are durable
    /// between checkpoints. Without it only `checkpoint` makes writes durable.
    pub op_log: bool,
    /// When the op log is fsynced.
    pub fsync: FsyncPolicy,
    /// Where opening reports how far its op-log replay got (`None`: nowhere).
    pub progress: Option<Arc<ReplayProgress>>,
    /// Op-log bytes since the last checkpoint past which a checkpoint is due whatever the timer
    /// (`Heap::log_tail_due`): what a crash can leave to replay. Smaller replays faster after a
    /// crash and checkpoints more often under heavy writes (more pages written per byte
    /// logged).
    pub log_tail_bytes_max: u64,
    /// Where its disk work is counted (op-log writes and fsyncs, checkpoints); `None`: nowhere.
    pub io: Option<Arc<IoStats>>,
}

/// `HeapOptions::log_tail_bytes_max` by default: 64 MiB (issue 19's bound on replay;
/// docs/semantics.md, "Checkpoints"). At the servers' default checkpoint interval (10 s) only a
/// write rate above 6.4 MB/s per shard reaches it. Replay speed: the replay rows of
/// `benches/oplog.rs` (one shard replays 50.7 MiB of uniform overwrites in about 0.7 s).
pub const LOG_TAIL_BYTES_MAX_DEFAULT: u64 = 64 << 20;

impl Default for HeapOptions {
    fn default() -> Self {
        HeapOptions {
            max_file_bytes: FILE_BYTES_MAX,
            op_log: true,
            fsync: FsyncPolicy::default(),
            progress: None,
            log_tail_bytes_max: LOG_TAIL_BYTES_MAX_DEFAULT,
            io: None,
        }
    }
}

/// Figures about a heap's space use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeapStats {
    pub entries: u64,
    pub depth: u32,
    /// Pages in use (the high-water mark), including header and meta pages.
    pub page_count: u64,
    pub free_pages: u64,
    /// Freed pages not yet reusable: freed since the last checkpoint (pending) or referenced only
    /// by the older durable checkpoint (held).
    pub pending_pages: u64,
    pub file_bytes: u64,
    pub epoch: u64,
    /// Bytes of the heap file's mapping resident in memory now (`mincore`; 0 where unknown).
    pub resident_bytes: u64,
    /// Bytes the op log's segments take on disk.
    pub log_bytes: u64,
    /// Bytes of op-log records since the last checkpoint began (`Heap::log_tail_bytes`).
    pub log_tail_bytes: u64,
    /// When the last checkpoint since this heap was opened finished (ms since the Unix epoch; 0:
    /// none yet).
    pub last_checkpoint_unix_ms: u64,
}

/// What `Heap::shed` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShedReport {
    /// Bytes of the heap's mapping resident before (0 where the system cannot tell).
    pub resident_bytes: u64,
    /// Bytes dropped.
    pub dropped_bytes: u64,
}

/// What `check_integrity` walked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IntegrityReport {
    pub entries: u64,
    pub tree_pages: u64,
    /// Leaves among `tree_pages`, and the bytes their cells and slots use: the leaves' fill is
    /// `leaf_used_bytes / (leaf_pages * (PAGE_SIZE - 24))`.
    pub leaf_pages: u64,
    pub leaf_used_bytes: u64,
    pub overflow_pages: u64,
    pub freelist_pages: u64,
    pub free_pages: u64,
    /// Pending plus held pages (see `HeapStats::pending_pages`).
    pub pending_pages: u64,
}

impl IntegrityReport {
    /// How full the leaves are, 0.0 to 1.0 (0.0 for an empty tree).
    pub fn leaf_fill(&self) -> f64 {
        let room = self.leaf_pages * (PAGE - crate::page::HEADER_BYTES) as u64;
        if room == 0 { 0.0 } else { self.leaf_used_bytes as f64 / room as f64 }
    }
}

/// The budget and counts of one `compact_step`.
struct Step {
    /// Pages left to read.
    budget: u64,
    visited: u64,
    moved: u64,
    /// Overflow pages the step may still rewrite out of its reservation.
    alloc_left: u64,
}

/// What `compact` achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompactStats {
    pub pages_moved: u64,
    pub file_bytes_before: u64,
    pub file_bytes_after: u64,
}

/// A persistent ordered map of byte keys to byte values in one file. Not internally
/// synchronised: one owner (a shard actor) drives it; reads take `&self`, writes `&mut self`.
pub struct Heap {
    pager: Pager,
    tree: TreeRoot,
    durable: Meta,
    /// LSN the next checkpoint records (set by the op log).
    applied_lsn: u64,
    changed: bool,
    /// A checkpoint was begun and not finished (`finish_checkpoint`).
    checkpoint_in_flight: bool,
    poisoned: Option<String>,
    log: Option<OpLog>,
    replay: ReplayReport,
    /// `HeapOptions::log_tail_bytes_max`.
    log_tail_max: u64,
    /// `HeapOptions::io`.
    io: Option<Arc<IoStats>>,
    /// `HeapStats::last_checkpoint_unix_ms`.
    last_checkpoint_unix_ms: u64,
    /// When set (`set_tap`), every batch committed from now on, with its LSN (`take_tapped`):
    /// what replication ships.
    tapped: Option<Vec<(u64, Vec<u8>)>>,
    /// The online compaction pass under way (`compact_step`), if any.
    pass: Option<CompactPass>,
    /// The page count the older durable meta page names (open may fall back to it, so the file
    /// is never cut below it).
    older_page_count: u64,
}

/// An online compaction pass (`Heap::compact_step`): every page at or above `limit` is moved
/// below it, key range by key range, from `resume` (the lower bound of the keys not yet
/// visited; empty at the start).
#[derive(Clone, Debug)]
struct CompactPass {
    limit: u64,
    resume: Vec<u8>,
}

/// What `Heap::compact_step` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactProgress {
    /// Pages moved below the pass's limit (overflow pages rewritten included).
    pub moved: u64,
    /// Pages read.
    pub visited: u64,
    /// A pass is under way after this step (`false`: the step ended it, or none was needed).
    pub in_pass: bool,
}

/// `finish_checkpoint` cuts the file when it extends past its pages by more than two of these
/// (or two sixteenths of the file): the file grows by such steps, so a shorter excess is room
/// for the next writes, not waste.
const GROW_BYTES_MIN_FOR_CUT: u64 = 256 * 1024;

/// Online compaction starts a pass when free pages are at least this share of the file...
const COMPACT_FREE_PERCENT: u64 = 25;
/// ...and at least this many (1 MiB).
const COMPACT_FREE_PAGES_MIN: u64 = 256;

/// Bytes of keys and values a replay gathers before it applies them (`ReplayWindow`).
const REPLAY_WINDOW_BYTES: usize = 8 << 20;

/// Replay applies the op log's records a window at a time: the window's operations in key
/// order, and of each key only its last (a later put or delete of the same key in the window
/// makes the earlier ones moot). The tree is then walked in key order instead of at random,
/// and a key written many times is written once. Nothing reads the heap before its open
/// returns, so only the state at the end counts, and it is the state record-by-record replay
/// gives. Measured in `benches/oplog.rs` (replay rows).
#[derive(Default)]
struct ReplayWindow {
    ops: std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    bytes: usize,
    last_lsn: Option<u64>,
}

impl ReplayWindow {
    fn add(&mut self, lsn: u64, batch: &WriteBatch) {
        for op in batch.iter() {
            let (key, value) = match op {
                BatchOp::Put { key, value } => (key, Some(value.to_vec())),
                BatchOp::Delete { key } => (key, None),
            };
            self.bytes += key.len() + value.as_ref().map_or(0, Vec::len);
            self.ops.insert(key.to_vec(), value);
        }
        self.last_lsn = Some(lsn);
    }

    /// Applies the window's operations (in batches of `WINDOW_BATCH_OPS`) and empties it.
    fn apply(&mut self, heap: &mut Heap) -> Result<()> {
        const WINDOW_BATCH_OPS: usize = 1024;
        let mut b = WriteBatch::new();
        for (key, value) in std::mem::take(&mut self.ops) {
            // A batch stays under the batch limit whatever the window's values (the op log may
            // hold one record near the limit, and the window gathers several).
            let adds = key.len() + value.as_ref().map_or(0, Vec::len) + 16;
            if !b.is_empty() && (b.as_bytes().len() + adds) as u64 > crate::limits::BATCH_BYTES_MAX {
                heap.apply_batch(&b)?;
                b.clear();
            }
            match value {
                Some(v) => b.put(&key, &v)?,
                None => b.delete(&key)?,
            };
            if b.len() >= WINDOW_BATCH_OPS {
                heap.apply_batch(&b)?;
                b.clear();
            }
        }
        if !b.is_empty() {
            heap.apply_batch(&b)?;
        }
        if let Some(lsn) = self.last_lsn.take() {
            heap.applied_lsn = lsn;
        }
        self.bytes = 0;
        Ok(())
    }
}

impl Heap {
    /// Opens the heap file at `path`, creating it if it does not exist.
    pub fn open(path: impl AsRef<Path>, opts: HeapOptions) -> Result<Heap> {
        let path = path.as_ref();
        if !path.exists() {
            create_file(path)?;
        }
        let log: Option<Arc<dyn LogDir>> =
            if opts.op_log { Some(Arc::new(FileLogDir::for_heap(path))) } else { None };
        Heap::open_parts(Box::new(FileStorage::open(path)?), log, opts)
    }

    /// Opens a heap over any storage, without an op log; an empty storage becomes a new heap.
    pub fn open_storage(storage: Box<dyn Storage>, opts: HeapOptions) -> Result<Heap> {
        Heap::open_parts(storage, None, opts)
    }

    /// Opens a heap over any storage and, if given, any op-log directory, replaying the log's
    /// records above the checkpoint.
    pub fn open_parts(
        storage: Box<dyn Storage>,
        log: Option<Arc<dyn LogDir>>,
        opts: HeapOptions,
    ) -> Result<Heap> {
        let mut heap = Heap::open_pages(storage, &opts)?;
        if let Some(dir) = log {
            let progress = opts.progress.as_deref();
            let mut window = ReplayWindow::default();
            let opened = OpLog::open(
                dir,
                heap.durable.heap_id,
                opts.fsync,
                (heap.durable.checkpoint_lsn, heap.durable.log_segment),
                (progress, opts.io.clone()),
                |lsn, batch| {
                    window.add(lsn, batch);
                    if window.bytes >= REPLAY_WINDOW_BYTES {
                        window.apply(&mut heap)?;
                    }
                    Ok(())
                },
            );
            let opened = opened.and_then(|o| window.apply(&mut heap).map(|()| o));
            if let Some(p) = progress {
                p.end();
            }
            let (log, report) = opened?;
            heap.log = Some(log);
            heap.replay = report;
            if heap.durable.log_segment == 0 {
                // A new heap (or one from before the field): checkpoint now, so the meta names
                // the segment its records go to, and its loss can be detected at every open.
                heap.changed = true;
                heap.checkpoint()?;
            }
        }
        Ok(heap)
    }

    fn open_pages(mut storage: Box<dyn Storage>, opts: &HeapOptions) -> Result<Heap> {
        if storage.is_empty() {
            init_storage(storage.as_mut(), new_heap_id())?;
        }
        let file_pages = storage.len() / PAGE_SIZE as u64;
        if file_pages < FIRST_DATA_PAGE {
            return Err(Error::Format("file shorter than a heap header".into()));
        }
        let region = storage.region();
        let Some(bytes) = region.bytes(0, FIRST_DATA_PAGE as usize * PAGE) else {
            return Err(Error::Format("file shorter than a heap header".into()));
        };
        let header = &bytes[..PAGE];
        let heap_id = match meta::read_header(header) {
            Ok(id) => id,
            Err(Error::Format(why)) => {
                // A foreign file has no magic anywhere; a heap whose header was damaged still has
                // it in a meta page.
                let meta_magic = (1..=2).any(|m| bytes[m * PAGE + 8..m * PAGE + 16] == meta::MAGIC);
                if meta_magic {
                    return corrupt(HEADER_PAGE, "file header damaged");
                }
                return Err(Error::Format(why));
            }
            Err(e) => return Err(e),
        };
        let mut best: Option<Meta> = None;
        let mut first_err = None;
        for slot in 1..=2u64 {
            let p = &bytes[slot as usize * PAGE..(slot as usize + 1) * PAGE];
            match meta::read_meta(slot, p, heap_id, file_pages) {
                Ok(m) if best.is_none_or(|b| m.epoch > b.epoch) => best = Some(m),
                Ok(_) => {}
                // Report damage over "not ours": a never-written slot reads as bad magic.
                Err(e) if first_err.as_ref().is_none_or(|f: &Error| !f.is_corruption()) => {
                    first_err = Some(e)
                }
                Err(_) => {}
            }
        }
        let Some(m) = best else {
            return Err(first_err.unwrap_or_else(|| Error::corrupted(1, "no valid meta page")));
        };
        let max_pages = (opts.max_file_bytes / PAGE_SIZE as u64).max(m.page_count);
        let mut pager = Pager::new(storage, m.page_count, max_pages);
        let (free, chain) = freelist::read(&pager, m.freelist_head, m.freelist_count, m.page_count)?;
        pager.free = free;
        pager.durable_freelist = chain;
        Ok(Heap {
            pager,
            tree: TreeRoot { root: m.root, depth: m.depth, len: m.entry_count },
            durable: m,
            applied_lsn: m.checkpoint_lsn,
            changed: false,
            checkpoint_in_flight: false,
            pass: None,
            older_page_count: m.page_count,
            poisoned: None,
            log: None,
            replay: ReplayReport::default(),
            log_tail_max: opts.log_tail_bytes_max,
            io: opts.io.clone(),
            last_checkpoint_unix_ms: 0,
            tapped: None,
        })
    }

    /// Why the heap refuses work, if an earlier failure poisoned it (reopening recovers).
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    /// What recovery replayed from the op log when this heap was opened.
    pub fn replay_report(&self) -> ReplayReport {
        self.replay
    }

    /// A handle to wait for durability of committed LSNs (`None` without an op log).
    pub fn durability(&self) -> Option<Durability> {
        self.log.as_ref().map(OpLog::durability)
    }

    /// LSN of the last committed batch (0 before any, or without an op log).
    pub fn last_lsn(&self) -> u64 {
        self.log.as_ref().map_or(self.applied_lsn, OpLog::last_lsn)
    }

    /// Whether batches were applied whose op-log records are queued and not yet written
    /// (`apply_deferred` before `flush_log`): a capture now would show them.
    pub fn has_unlogged(&self) -> bool {
        self.log.as_ref().is_some_and(OpLog::has_deferred)
    }

    /// Checks this heap's op log in `dir` without changing it (see `oplog::verify`): for a heap
    /// opened without its log, as `heapgrid check` does.
    pub fn verify_log(&self, dir: &dyn LogDir) -> Result<ReplayReport> {
        crate::oplog::verify(dir, self.durable.heap_id, self.durable.checkpoint_lsn, self.durable.log_segment)
    }

    /// Bytes of op-log records written since the last checkpoint began (since open: every
    /// segment's bytes): what a crash now would leave to replay. 0 without an op log.
    pub fn log_tail_bytes(&self) -> u64 {
        self.log.as_ref().map_or(0, OpLog::tail_bytes)
    }

    /// Whether the op log since the last checkpoint passed `HeapOptions::log_tail_bytes_max`:
    /// a checkpoint is due now, whatever the owner's timer says.
    pub fn log_tail_due(&self) -> bool {
        self.log_tail_bytes() > self.log_tail_max
    }

    /// Op-log segment files currently kept.
    pub fn log_segments(&self) -> usize {
        self.log.as_ref().map_or(0, OpLog::segment_count)
    }

    fn usable(&self) -> Result<()> {
        match &self.poisoned {
            Some(why) => Err(Error::Poisoned(why.clone())),
            None => Ok(()),
        }
    }

    fn poison<T>(&mut self, e: Error) -> Result<T> {
        if self.poisoned.is_none() {
            self.poisoned = Some(e.to_string());
        }
        Err(e)
    }

    /// The value stored under `key`, borrowed from the map when it is inline.
    pub fn get_ref(&self, key: &[u8]) -> Result<Option<Cow<'_, [u8]>>> {
        self.usable()?;
        match btree::get(&self.pager, &self.tree, key)? {
            Some(v) => Ok(Some(btree::load(&self.pager, v)?)),
            None => Ok(None),
        }
    }

    /// The value stored under `key`.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.get_ref(key)?.map(Cow::into_owned))
    }

    /// Whether `key` is present (reads no overflow pages).
    pub fn contains(&self, key: &[u8]) -> Result<bool> {
        self.usable()?;
        Ok(btree::get(&self.pager, &self.tree, key)?.is_some())
    }

    /// Number of keys.
    pub fn len(&self) -> u64 {
        self.tree.len
    }

    pub fn is_empty(&self) -> bool {
        self.tree.len == 0
    }

    /// Inserts or replaces one key. With an op log this is a one-operation batch.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        self.usable()?;
        check_key(key)?;
        check_value(value)?;
        if self.log.is_some() {
            let mut b = WriteBatch::new();
            b.put(key, value)?;
            return self.apply(&b).map(|_| ());
        }
        self.pager.reserve(btree::put_pages_max(&self.tree, value.len()))?;
        self.changed = true;
        match btree::insert(&mut self.pager, &mut self.tree, key, value) {
            Ok(_) => Ok(()),
            Err(e) => self.poison(e),
        }
    }

    /// Deletes one key; returns whether it was present. A missing key logs nothing.
    pub fn delete(&mut self, key: &[u8]) -> Result<bool> {
        self.usable()?;
        check_key(key)?;
        if self.log.is_some() {
            if !self.contains(key)? {
                return Ok(false);
            }
            let mut b = WriteBatch::new();
            b.delete(key)?;
            return self.apply(&b).map(|_| true);
        }
        self.pager.reserve(btree::delete_pages_max(&self.tree))?;
        match btree::delete(&mut self.pager, &mut self.tree, key) {
            Ok(found) => {
                self.changed |= found;
                Ok(found)
            }
            Err(e) => self.poison(e),
        }
    }

    /// Commits every operation of `batch`, in order, as one unit: first appended to the op log
    /// (if any) with write(2), then applied. Returns the batch's LSN (without an op log: the last
    /// LSN, unchanged). Under `FsyncPolicy::Always` the caller acknowledges only after
    /// `durability().wait(lsn)`.
    pub fn apply(&mut self, batch: &WriteBatch) -> Result<u64> {
        self.commit(batch, false)
    }

    /// Like `apply`, but the op-log record is only queued in memory: one `flush_log` then writes
    /// every queued record with a single write(2) (an owner draining a mailbox of writes pays one
    /// syscall for all of them). Nothing applied this way may be acknowledged before `flush_log`
    /// returns `Ok`. Without an op log this is `apply`.
    pub fn apply_deferred(&mut self, batch: &WriteBatch) -> Result<u64> {
        self.commit(batch, true)
    }

    fn commit(&mut self, batch: &WriteBatch, deferred: bool) -> Result<u64> {
        self.usable()?;
        self.reserve_for(batch)?;
        let lsn = match self.log.as_mut() {
            Some(log) if deferred => log.append_deferred(batch)?,
            Some(log) => log.append(batch)?,
            None => self.applied_lsn,
        };
        if let Err(e) = self.apply_reserved(batch) {
            return self.poison(e);
        }
        self.applied_lsn = lsn;
        if let Some(t) = self.tapped.as_mut() {
            t.push((lsn, batch.as_bytes().to_vec()));
        }
        Ok(lsn)
    }

    /// Starts keeping a copy of every batch committed from now on, with its LSN, for
    /// `take_tapped` (a replicated shard's primary ships them), or stops, dropping what it held.
    /// Turning it on while on keeps what it holds.
    pub fn set_tap(&mut self, on: bool) {
        match (on, self.tapped.is_some()) {
            (true, false) => self.tapped = Some(Vec::new()),
            (false, true) => self.tapped = None,
            _ => {}
        }
    }

    /// The batches committed since the last call (oldest first), while the tap is on.
    pub fn take_tapped(&mut self) -> Vec<(u64, Vec<u8>)> {
        self.tapped.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Sets `key` to what `f` computes from its current value (`None`: absent) as a
    /// one-operation batch (one op-log record, queued as by `apply_deferred` when `deferred`),
    /// descending the tree once. `value_len_max` bounds the new value (its pages are reserved
    /// first). Returns the batch's LSN. An error from `f`, or a value over `value_len_max` or the
    /// limits, changes nothing (the path it copied holds the same contents); a failure after the
    /// record is queued poisons the heap, as for `apply`.
    pub fn upsert<E: From<Error>>(
        &mut self,
        key: &[u8],
        value_len_max: usize,
        deferred: bool,
        f: impl FnOnce(Option<&[u8]>) -> std::result::Result<Vec<u8>, E>,
    ) -> std::result::Result<u64, E> {
        self.usable()?;
        check_key(key)?;
        let worst = btree::put_pages_max(&self.tree, value_len_max).min(BATCH_RESERVE_PAGES_MAX);
        self.pager.reserve(worst)?;
        let mut declined: Option<E> = None;
        let mut lsn = self.applied_lsn;
        let log = &mut self.log;
        let tapped = &mut self.tapped;
        let r = btree::upsert(&mut self.pager, &mut self.tree, key, |old| {
            let new = match f(old) {
                Ok(v) => v,
                Err(e) => {
                    declined = Some(e);
                    return Ok(None);
                }
            };
            if let Err(e) = check_value(&new) {
                declined = Some(e.into());
                return Ok(None);
            }
            assert!(
                new.len() <= value_len_max,
                "upsert value of {} bytes over its bound {value_len_max}",
                new.len()
            );
            let mut b = WriteBatch::new();
            b.put(key, &new)?;
            lsn = match log.as_mut() {
                Some(l) if deferred => l.append_deferred(&b)?,
                Some(l) => l.append(&b)?,
                None => lsn,
            };
            if let Some(t) = tapped.as_mut() {
                t.push((lsn, b.as_bytes().to_vec()));
            }
            Ok(Some(new))
        });
        match r {
            Ok(Some(_)) => {
                self.changed = true;
                self.applied_lsn = lsn;
                Ok(lsn)
            }
            Ok(None) => {
                // The path may have been copied: the tree in memory moved to the copies.
                self.changed = true;
                Err(declined
                    .unwrap_or_else(|| Error::Poisoned("upsert declined without a reason".into()).into()))
            }
            Err(e) => Err(self.poison::<()>(e).unwrap_err().into()),
        }
    }

    /// Writes every record queued by `apply_deferred`. On failure the heap is poisoned: those
    /// batches are applied in memory but have no log record (reopening recovers without them).
    pub fn flush_log(&mut self) -> Result<()> {
        self.usable()?;
        let r = match self.log.as_mut() {
            Some(log) => log.flush(),
            None => Ok(()),
        };
        match r {
            Ok(()) => Ok(()),
            Err(e) => self.poison(e),
        }
    }

    fn reserve_for(&mut self, batch: &WriteBatch) -> Result<()> {
        let worst: u64 = batch
            .iter()
            .map(|op| match op {
                BatchOp::Put { value, .. } => btree::put_pages_max(&self.tree, value.len()),
                BatchOp::Delete { .. } => btree::delete_pages_max(&self.tree),
            })
            .sum();
        self.pager.reserve(worst.min(BATCH_RESERVE_PAGES_MAX))
    }

    /// Applies a batch that is already logged (or needs no log).
    fn apply_batch(&mut self, batch: &WriteBatch) -> Result<()> {
        self.reserve_for(batch)?;
        self.apply_reserved(batch)
    }

    fn apply_reserved(&mut self, batch: &WriteBatch) -> Result<()> {
        self.changed = true;
        for op in batch.iter() {
            match op {
                BatchOp::Put { key, value } => {
                    btree::insert(&mut self.pager, &mut self.tree, key, value)?;
                }
                BatchOp::Delete { key } => {
                    btree::delete(&mut self.pager, &mut self.tree, key)?;
                }
            }
        }
        Ok(())
    }

    /// Captures the tree as it stands (every batch applied so far, up to `last_lsn`) as a
    /// snapshot other threads can read while this heap goes on writing. The pages it reaches
    /// are sealed now and never written or reused while it lives; retired pages no live
    /// snapshot reaches any more are reclaimed.
    pub fn capture(&mut self) -> Result<Snapshot> {
        self.usable()?;
        let generation = self.pager.capture();
        let pin = crate::snapshot::Registry::pin(&self.pager.registry, generation);
        self.pager.reclaim();
        Ok(Snapshot {
            region: self.pager.region(),
            marks: self.pager.marks.clone(),
            page_count: self.pager.page_count,
            tree: self.tree,
            lsn: self.last_lsn(),
            pin,
        })
    }

    /// LSN recorded by the last durable checkpoint.
    pub fn checkpoint_lsn(&self) -> u64 {
        self.durable.checkpoint_lsn
    }

    /// Entries whose keys fall in `range`, in key order; iterate from either end.
    /// Accepts any range of byte-like keys: `a..b`, `a..`, `..=b`, `(Bound, Bound)`.
    pub fn range<'a, K: AsRef<[u8]> + ?Sized, R: RangeBounds<K>>(&'a self, range: R) -> Range<'a> {
        fn as_bytes<K: AsRef<[u8]> + ?Sized>(b: Bound<&K>) -> Bound<&[u8]> {
            match b {
                Bound::Included(k) => Bound::Included(k.as_ref()),
                Bound::Excluded(k) => Bound::Excluded(k.as_ref()),
                Bound::Unbounded => Bound::Unbounded,
            }
        }
        match self.usable() {
            Ok(()) => {
                Range::new(&self.pager, self.tree, as_bytes(range.start_bound()), as_bytes(range.end_bound()))
            }
            Err(e) => Range::failed(&self.pager, self.tree, e),
        }
    }

    /// All entries in key order.
    pub fn iter(&self) -> Range<'_> {
        self.range::<[u8], _>(..)
    }

    /// Makes every applied write durable. Crash-safe at every step: the previous checkpoint
    /// stays valid until the new meta page is on disk. The same as `begin_checkpoint`, running
    /// the job on this thread, and `finish_checkpoint`.
    pub fn checkpoint(&mut self) -> Result<()> {
        match self.begin_checkpoint()? {
            Some(job) => {
                let r = job.run();
                self.finish_checkpoint(job, r)
            }
            None => Ok(()),
        }
    }

    /// Starts a checkpoint of every batch applied so far, without writing back any page: seals
    /// the pages written since the last capture (from now on they are copied on write), writes
    /// the new free list, and prepares the meta page. The returned job flushes the pages and
    /// writes the meta page; it may run on another thread while this heap goes on applying
    /// batches (none of which it flushes or names). `None`: nothing changed since the last
    /// checkpoint. Only one checkpoint is in flight at a time.
    pub fn begin_checkpoint(&mut self) -> Result<Option<CheckpointJob>> {
        let start = std::time::Instant::now();
        let job = self.begin_checkpoint_inner()?;
        if let (Some(io), Some(_)) = (&self.io, &job) {
            io.checkpoint_pause_us.record_since(start);
        }
        Ok(job)
    }

    fn begin_checkpoint_inner(&mut self) -> Result<Option<CheckpointJob>> {
        self.usable()?;
        if self.checkpoint_in_flight {
            return Err(Error::Poisoned("a checkpoint is already in flight".into()));
        }
        // Nothing new to write, and no freed pages waiting for checkpoints to become free
        // (beyond the previous free lists' own pages, which every checkpoint frees again: waiting
        // for those alone would checkpoint for ever).
        let waiting = self.pager.pending.len() + self.pager.held.len();
        let lists = 2 * (self.pager.durable_freelist.len() + 1);
        // A free page at the end, or a file the older checkpoint still holds long: one more
        // checkpoint lets the file shrink.
        let tail_free = self.pager.free.contains(&(self.pager.page_count.saturating_sub(1)));
        let cut_waits = self.older_page_count > self.pager.page_count || self.cut_due().is_some();
        if !self.changed
            && self.applied_lsn == self.durable.checkpoint_lsn
            && waiting <= lists
            && !tail_free
            && !cut_waits
        {
            return Ok(None);
        }
        // Free pages at the end of the file leave it (online compaction empties the tail): the
        // new checkpoint names a shorter file, which `finish_checkpoint` then cuts.
        let pager = &mut self.pager;
        while pager.page_count > FIRST_DATA_PAGE && pager.free.remove(&(pager.page_count - 1)) {
            pager.page_count -= 1;
        }
        // Reserve room for the free list before changing anything, so a full disk is a plain error.
        let listed = self.pager.free.len()
            + self.pager.pending.len()
            + self.pager.held.len()
            + self.pager.retired.len()
            + self.pager.durable_freelist.len();
        self.pager.reserve((listed.div_ceil(FREELIST_IDS_PER_PAGE) + 1) as u64)?;
        let previous_lsn = self.durable.checkpoint_lsn;
        let r = match self.log.as_mut() {
            Some(log) => log.rotate(),
            None => Ok(()),
        };
        match r.and_then(|_| self.prepare_checkpoint(previous_lsn)) {
            Ok(job) => {
                self.checkpoint_in_flight = true;
                Ok(Some(job))
            }
            Err(e) => self.poison(e),
        }
    }

    fn prepare_checkpoint(&mut self, previous_lsn: u64) -> Result<CheckpointJob> {
        let pager = &mut self.pager;
        // The durable free list's own pages are free once the next checkpoint stands.
        let old_chain = std::mem::take(&mut pager.durable_freelist);
        pager.pending.extend(old_chain);
        let total = pager.free.len() + pager.pending.len() + pager.held.len() + pager.retired.len();
        let k = total.div_ceil(FREELIST_IDS_PER_PAGE);
        let mut chain = Vec::with_capacity(k);
        for _ in 0..k {
            // From `free` or past the high-water mark, never from `pending`, `held` or `retired`.
            chain.push(pager.alloc()?);
        }
        // Retired pages are free to a reopened heap (it has no snapshots).
        let mut ids: Vec<u64> = pager
            .free
            .iter()
            .chain(pager.pending.iter())
            .chain(pager.held.iter())
            .chain(pager.retired.iter().map(|(_, id)| id))
            .copied()
            .collect();
        ids.sort_unstable();
        freelist::write(pager, &chain, &ids);

        // Seal every page written since the last capture (captured ones are sealed already and
        // may be read by snapshots: they are not touched); none is writable from now on, so
        // nothing changes the pages this checkpoint names while it is written back.
        let unsealed: Vec<u64> = pager.writable.iter().collect();
        for id in unsealed {
            page::seal(pager.raw_mut(id));
        }
        pager.writable.clear_all();
        // Every page written since the last checkpoint is flushed; they belong to this one now
        // (a write copies them, a release sends them to pending).
        let dirty: Vec<u64> = pager.fresh.iter().collect();
        // Dirty until the job ends: `shed` leaves them alone meanwhile.
        pager.flushing = std::mem::take(&mut pager.fresh);
        let mut runs: Vec<(u64, u64)> = page::spans(dirty, |_| false)
            .into_iter()
            .map(|(first, n)| (first * PAGE_SIZE as u64, n * PAGE_SIZE as u64))
            .collect();
        if runs.len() > FLUSH_RUNS_MAX {
            let start = FIRST_DATA_PAGE * PAGE_SIZE as u64;
            runs = vec![(start, pager.page_count * PAGE_SIZE as u64 - start)];
        }
        let m = Meta {
            heap_id: self.durable.heap_id,
            epoch: self.durable.epoch + 1,
            root: self.tree.root,
            depth: self.tree.depth,
            page_count: pager.page_count,
            freelist_head: chain.first().copied().unwrap_or(0),
            freelist_count: ids.len() as u64,
            entry_count: self.tree.len,
            checkpoint_lsn: self.applied_lsn,
            // The log was just rotated: the records after this checkpoint start there.
            log_segment: self.log.as_ref().map_or(0, OpLog::current_first),
        };
        let mut meta_page = vec![0u8; PAGE];
        meta::write_meta(&mut meta_page, &m);
        // Pages freed before now are referenced by the durable checkpoint only; the ones freed
        // while this one is in flight may be referenced by this one too (`finish_checkpoint`).
        let pending_at_start = pager.pending.len();
        pager.durable_freelist = chain;
        self.changed = false;
        Ok(CheckpointJob {
            flusher: pager.storage.flusher(),
            runs,
            sync_len: pager.page_count > self.durable.page_count,
            meta: m,
            meta_page,
            previous_lsn,
            pending_at_start,
            io: self.io.clone(),
        })
    }

    /// Completes a checkpoint whose job ran with result `r`: the new checkpoint stands (or, on
    /// an error, the heap is poisoned: the state of the page cache is unknown). Pages only the
    /// previous-but-one checkpoint referenced are retired (free once no snapshot can reach
    /// them); pages only the previous one references are held until the next checkpoint.
    pub fn finish_checkpoint(&mut self, job: CheckpointJob, r: Result<()>) -> Result<()> {
        assert!(self.checkpoint_in_flight, "finish_checkpoint without a checkpoint in flight");
        self.checkpoint_in_flight = false;
        self.pager.flushing.clear_all();
        if let Err(e) = r {
            return self.poison(e);
        }
        assert_eq!(job.meta.epoch, self.durable.epoch + 1, "checkpoints finish in order");
        let pager = &mut self.pager;
        let held = std::mem::take(&mut pager.held);
        let tag = pager.captured;
        pager.retired.extend(held.into_iter().map(|id| (tag, id)));
        pager.held = pager.pending.drain(..job.pending_at_start).collect();
        pager.reclaim();
        // Free pages' memory goes back to the system (issue 16: free pages stayed resident).
        pager.give_back();
        self.older_page_count = self.durable.page_count;
        self.durable = job.meta;
        self.last_checkpoint_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // The pages past both durable checkpoints' page counts are free in both, and no snapshot
        // reads them: a file longer than that by more than two growth steps is cut back (online
        // compaction). Not below the older checkpoint's count: open may fall back to it.
        if let Some(keep_pages) = self.cut_due()
            && let Err(e) = self.pager.truncate_to(keep_pages).and_then(|_| self.pager.storage.sync_len())
        {
            return self.poison(e);
        }
        // Keep the log back to the previous checkpoint: open may fall back to it.
        if let Some(log) = self.log.as_mut() {
            log.retire(job.previous_lsn)?;
        }
        Ok(())
    }

    /// The page count to cut the file to, when it is longer than both durable checkpoints'
    /// pages by more than two growth steps (online compaction emptied its end).
    fn cut_due(&self) -> Option<u64> {
        let keep_pages = self.pager.page_count.max(self.older_page_count);
        let (len, keep) = (self.pager.storage.len(), keep_pages * PAGE_SIZE as u64);
        (len > keep && len - keep > 2 * GROW_BYTES_MIN_FOR_CUT.max(keep / 16)).then_some(keep_pages)
    }

    /// Whether a checkpoint was begun and not finished.
    pub fn checkpoint_in_flight(&self) -> bool {
        self.checkpoint_in_flight
    }

    /// Checkpoints, then moves pages down into free space and shrinks the file. Runs in rounds:
    /// each round frees everything freeable (two checkpoints), cuts free pages off the end of the
    /// file, and copies the pages above the new target size into free pages below it.
    pub fn compact(&mut self) -> Result<CompactStats> {
        self.usable()?;
        // Pages move: what the shedding clock learnt of the old places is moot, and an online
        // pass under way is done by this one.
        self.pager.clock.reset();
        self.pass = None;
        let before = self.pager.storage.len();
        let mut moved = 0;
        for _round in 0..COMPACT_ROUNDS_MAX {
            self.settle()?;
            self.cut_tail()?;
            if self.tree.root == 0 {
                break;
            }
            // Moving a page rewrites its parent, so every branch page may need a fresh copy too:
            // leave room for them below the target.
            let used = self.pager.page_count - self.pager.free.len() as u64;
            let limit = used + self.branch_pages()? + self.tree.depth as u64 + 1;
            if limit >= self.pager.page_count {
                break;
            }
            let mut round = 0;
            self.pager.reserve(self.pager.page_count - limit + self.branch_pages()? + 1)?;
            match self.relocate(self.tree.root, self.tree.depth - 1, limit, &mut round, None) {
                Ok(root) => self.tree.root = root,
                Err(e) => return self.poison(e),
            }
            moved += round;
            if round == 0 {
                break;
            }
        }
        self.settle()?;
        self.cut_tail()?;
        Ok(CompactStats {
            pages_moved: moved,
            file_bytes_before: before,
            file_bytes_after: self.pager.storage.len(),
        })
    }

    /// Two checkpoints: the first turns pending pages into held ones, the second frees them.
    fn settle(&mut self) -> Result<()> {
        for _ in 0..2 {
            self.changed = true;
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Cuts the free pages at the end of the file off the high-water mark (checkpoints also do),
    /// checkpoints twice so neither meta page names them, then shrinks the file to its pages.
    fn cut_tail(&mut self) -> Result<()> {
        let mut count = self.pager.page_count;
        while count > FIRST_DATA_PAGE && self.pager.free.contains(&(count - 1)) {
            count -= 1;
            self.pager.free.remove(&count);
        }
        if count == self.pager.page_count && self.pager.storage.len() == count * PAGE_SIZE as u64 {
            return Ok(());
        }
        self.pager.page_count = count;
        // Until both meta pages name the same count (a checkpoint may cut more of the tail, if a
        // snapshot let go of pages meanwhile), and never below the older one's.
        for _ in 0..4 {
            self.changed = true;
            self.checkpoint()?;
            if self.older_page_count == self.pager.page_count {
                break;
            }
        }
        let keep = self.pager.page_count.max(self.older_page_count);
        let r = self.pager.truncate_to(keep).and_then(|_| self.pager.storage.sync_len());
        match r {
            Ok(()) => Ok(()),
            Err(e) => self.poison(e),
        }
    }

    /// Branch pages in the tree (a walk of every level above the leaves).
    fn branch_pages(&self) -> Result<u64> {
        if self.tree.depth < 2 {
            return Ok(0);
        }
        let mut n = 0;
        let mut stack = vec![(self.tree.root, self.tree.depth - 1)];
        while let Some((id, level)) = stack.pop() {
            let node = btree::node_at(&self.pager, id, level)?;
            n += 1;
            if level >= 2 {
                for i in 0..=node.count() {
                    stack.push((node.child(i)?, level - 1));
                }
            }
        }
        Ok(n)
    }

    /// Copies every page of the subtree at `id` that lies at or above `limit` to a lower page.
    /// Returns the subtree's new root page.
    /// With `bounds` (an online step's pages left to read and overflow pages left to write), an
    /// overflow chain is only walked and rewritten while they last: a chain longer than what is
    /// left is left where it is (a later step or pass, or offline `compact`, moves it).
    fn relocate(
        &mut self,
        id: u64,
        level: u32,
        limit: u64,
        moved: &mut u64,
        mut bounds: Option<(&mut u64, &mut u64)>,
    ) -> Result<u64> {
        let (leaf, children) = {
            let n = btree::node_at(&self.pager, id, level)?;
            let children: Vec<u64> = if n.is_leaf() {
                Vec::new()
            } else {
                (0..=n.count()).map(|i| n.child(i)).collect::<Result<_>>()?
            };
            (n.is_leaf(), children)
        };
        let mut cur = id;
        if id >= limit {
            cur = self.pager.cow(id)?;
            // A page written since the last capture is its own copy: it stays where it is.
            if cur != id {
                *moved += 1;
            }
        }
        if leaf {
            // Overflow chains with any page above the limit are rewritten low.
            let mut rewrite = Vec::new();
            {
                let n = node::Node::parse(cur, self.pager.page(cur)?)?;
                for i in 0..n.count() {
                    if let node::LeafValue::Overflow { first, len } = n.value(i)? {
                        let pages = overflow::pages_for(len as usize);
                        if let Some((read, alloc)) = bounds.as_mut() {
                            if pages > **read || pages > **alloc {
                                continue;
                            }
                            **read -= pages;
                        }
                        let mut high = false;
                        overflow::walk(&self.pager, first, len, |pg, _| {
                            high |= pg >= limit;
                            Ok(())
                        })?;
                        if high {
                            if let Some((_, alloc)) = bounds.as_mut() {
                                **alloc -= pages;
                            }
                            rewrite.push((i, n.key(i)?.to_vec(), first, len));
                        }
                    }
                }
            }
            if !rewrite.is_empty() {
                cur = self.pager.cow(cur)?;
            }
            for (i, key, first, len) in rewrite {
                let value = overflow::read(&self.pager, first, len)?;
                let new_first = overflow::write(&mut self.pager, &value)?;
                overflow::release(&mut self.pager, first, len)?;
                let mut cell = Vec::new();
                node::encode_leaf_cell(&mut cell, &key, node::LeafValue::Overflow { first: new_first, len });
                node::overwrite_cell(self.pager.page_mut(cur), i, &cell);
                *moved += overflow::pages_for(len as usize);
            }
            return Ok(cur);
        }
        for (i, child) in children.into_iter().enumerate() {
            let new = self.relocate(child, level - 1, limit, moved, None)?;
            if new != child {
                cur = self.pager.cow(cur)?;
                node::set_child(self.pager.page_mut(cur), i, new);
            }
        }
        Ok(cur)
    }

    /// One bounded step of online compaction: the file's tail is emptied a key range at a
    /// time, while readers go on reading their snapshots and writers wait for one step only.
    ///
    /// A pass starts when at least `COMPACT_FREE_PERCENT` of the pages (and
    /// `COMPACT_FREE_PAGES_MIN`) are free: its limit is the pages in use plus an eighth. Each
    /// step reads about `visits` pages, in key order from where the last one stopped, and
    /// copies every page at or above the limit into the lowest free pages (copy on write: the
    /// old page is released as any copied page is). Pages written since the last checkpoint are
    /// left where they are (a later pass moves them). Free pages at the end of the file are cut
    /// off at the next checkpoint, and the file is shortened when it ends (`finish_checkpoint`).
    pub fn compact_step(&mut self, visits: u64) -> Result<CompactProgress> {
        self.usable()?;
        if self.tree.root == 0 {
            // Emptied since the pass began: nothing is left to move.
            self.pass = None;
            return Ok(CompactProgress::default());
        }
        if self.pass.is_none() {
            let total = self.pager.page_count;
            let free = self.pager.free.len() as u64;
            if self.tree.root == 0
                || free < COMPACT_FREE_PAGES_MIN
                || free * 100 < total * COMPACT_FREE_PERCENT
            {
                return Ok(CompactProgress::default());
            }
            let used = total - free;
            let limit = used + used / 8 + self.tree.depth as u64 + 1;
            if limit >= total {
                return Ok(CompactProgress::default());
            }
            self.pass = Some(CompactPass { limit, resume: Vec::new() });
        }
        let CompactPass { limit, resume } = self.pass.clone().expect("a pass was just set");
        // Copies go to the lowest free pages: with none left below the limit, the pass would
        // only move pages about the tail. It ends; a later one starts from what is free then.
        if self.pager.free.first().is_none_or(|&f| f >= limit) {
            self.pass = None;
            return Ok(CompactProgress::default());
        }
        // Every visit may copy its page, and a branch is copied once when a child moves: the
        // copies come from free pages, so a step visits at most half of those left after a
        // path's worth (reserving more would grow the file the pass is shrinking).
        let depth = self.tree.depth as u64;
        let visits = visits.min((self.pager.free.len() as u64).saturating_sub(depth + 1) / 2);
        if visits == 0 {
            return Ok(CompactProgress { in_pass: true, ..CompactProgress::default() });
        }
        self.pager.reserve(2 * visits + depth + 1)?;
        let mut step = Step { budget: visits, visited: 0, moved: 0, alloc_left: visits };
        let r = self.relocate_from(self.tree.root, self.tree.depth - 1, limit, Some(&resume), &mut step);
        let (root, next) = match r {
            Ok(x) => x,
            Err(e) => return self.poison(e),
        };
        self.tree.root = root;
        if step.moved > 0 {
            self.changed = true;
        }
        self.pass = next.map(|resume| CompactPass { limit, resume });
        Ok(CompactProgress { moved: step.moved, visited: step.visited, in_pass: self.pass.is_some() })
    }

    /// `relocate` for the keys from `from` on (`None`: the whole subtree), reading about
    /// `step.budget` pages (at least one path down to a leaf). Returns the subtree's new root
    /// and, when the budget ran out first, the lower bound of the keys not visited.
    fn relocate_from(
        &mut self,
        id: u64,
        level: u32,
        limit: u64,
        from: Option<&[u8]>,
        step: &mut Step,
    ) -> Result<(u64, Option<Vec<u8>>)> {
        let (leaf, children, seps, start) = {
            let n = btree::node_at(&self.pager, id, level)?;
            if n.is_leaf() {
                (true, Vec::new(), Vec::new(), 0)
            } else {
                let children: Vec<u64> = (0..=n.count()).map(|i| n.child(i)).collect::<Result<_>>()?;
                let seps: Vec<Vec<u8>> =
                    (0..n.count()).map(|i| n.key(i).map(<[u8]>::to_vec)).collect::<Result<_>>()?;
                let start = match from {
                    Some(k) => n.child_index(k)?,
                    None => 0,
                };
                (false, children, seps, start)
            }
        };
        step.visited += 1;
        step.budget = step.budget.saturating_sub(1);
        if leaf {
            let new = self.relocate(
                id,
                level,
                limit,
                &mut step.moved,
                Some((&mut step.budget, &mut step.alloc_left)),
            )?;
            return Ok((new, None));
        }
        let mut cur = id;
        if id >= limit {
            cur = self.pager.cow(id)?;
            if cur != id {
                step.moved += 1;
            }
        }
        for i in start..children.len() {
            // The first child is always visited, so every step gets down to a leaf.
            if i > start && step.budget == 0 {
                // Resume at child i: its keys start at the separator before it.
                return Ok((cur, Some(seps[i - 1].clone())));
            }
            let sub_from = if i == start { from } else { None };
            let (new, more) = self.relocate_from(children[i], level - 1, limit, sub_from, step)?;
            if new != children[i] {
                cur = self.pager.cow(cur)?;
                node::set_child(self.pager.page_mut(cur), i, new);
            }
            if more.is_some() {
                return Ok((cur, more));
            }
        }
        Ok((cur, None))
    }

    /// Checkpoints and closes the heap.
    pub fn close(mut self) -> Result<()> {
        self.checkpoint()
    }

    /// Drops the memory of up to `want_bytes` of this heap's resident pages that are durable
    /// and clean (the memory budget's pager; see `Pager::shed` for which pages, and the
    /// module `shed` for the order). Dropped pages are read back from the file, their checksums
    /// checked again, when next read. A poisoned heap drops nothing.
    pub fn shed(&mut self, want_bytes: u64) -> ShedReport {
        let want = if self.poisoned.is_some() { 0 } else { want_bytes / PAGE_SIZE as u64 };
        let (resident, dropped) = self.pager.shed(want);
        ShedReport { resident_bytes: resident * PAGE_SIZE as u64, dropped_bytes: dropped * PAGE_SIZE as u64 }
    }

    /// Advises the system that this heap's pages are read in random order (no read-around when
    /// a dropped page is read back): for heaps larger than their memory budget.
    pub fn set_random_access(&mut self, on: bool) {
        self.pager.storage.set_random_access(on);
    }

    /// Space figures.
    pub fn stats(&self) -> HeapStats {
        HeapStats {
            entries: self.tree.len,
            depth: self.tree.depth,
            page_count: self.pager.page_count,
            free_pages: self.pager.free.len() as u64,
            pending_pages: (self.pager.pending.len() + self.pager.held.len() + self.pager.retired.len())
                as u64,
            file_bytes: self.pager.storage.len(),
            epoch: self.durable.epoch,
            resident_bytes: self.pager.storage.region().resident_bytes().unwrap_or(0),
            log_bytes: self.log.as_ref().map_or(0, |l| l.disk_bytes()),
            log_tail_bytes: self.log_tail_bytes(),
            last_checkpoint_unix_ms: self.last_checkpoint_unix_ms,
        }
    }

    /// Walks every reachable page and checks checksums (of pages not written since the last
    /// checkpoint), node structure, key order and separator bounds, overflow chains, the entry
    /// count, and that tree, free-list, free and pending pages partition the file.
    pub fn check_integrity(&self) -> Result<IntegrityReport> {
        crate::check::check(&self.pager, &self.tree)
    }
}

use crate::{node, overflow};

fn new_heap_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// Writes the header and the first meta page into an empty storage and flushes them.
fn init_storage(storage: &mut dyn Storage, heap_id: u64) -> Result<()> {
    storage.grow(FIRST_DATA_PAGE * PAGE_SIZE as u64)?;
    let bytes = storage.bytes_mut(0, FIRST_DATA_PAGE as usize * PAGE);
    meta::write_header(&mut bytes[..PAGE], heap_id);
    let m = Meta {
        heap_id,
        epoch: 1,
        root: 0,
        depth: 0,
        page_count: FIRST_DATA_PAGE,
        freelist_head: 0,
        freelist_count: 0,
        entry_count: 0,
        checkpoint_lsn: 0,
        log_segment: 0,
    };
    let slot = Meta::slot(1) as usize;
    meta::write_meta(&mut bytes[slot * PAGE..(slot + 1) * PAGE], &m);
    storage.flush(0, FIRST_DATA_PAGE * PAGE_SIZE as u64)?;
    storage.sync_len()
}

/// Creates a new heap file atomically: written and synced under a unique temporary name, then
/// hard-linked into place, which fails if another process created the file first (then we simply
/// open theirs).
fn create_file(path: &Path) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".creating.{}.{:x}", std::process::id(), new_heap_id()));
    let tmp = std::path::PathBuf::from(tmp);
    let r = (|| {
        {
            let mut s = FileStorage::open(&tmp)?;
            init_storage(&mut s, new_heap_id())?;
        }
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::Io(e)),
        }
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        sync_dir(dir)
    })();
    let _ = std::fs::remove_file(&tmp);
    r
}

/// The part of a checkpoint that writes back: flush the pages it names, sync the file length
/// if it grew, then write and flush the meta page. Runs on any thread; `Heap::finish_checkpoint`
/// takes its result.
pub struct CheckpointJob {
    flusher: Arc<dyn Flusher>,
    /// Byte ranges to flush.
    runs: Vec<(u64, u64)>,
    sync_len: bool,
    meta: Meta,
    meta_page: Vec<u8>,
    previous_lsn: u64,
    /// How many of the pending pages were pending when the checkpoint began.
    pending_at_start: usize,
    io: Option<Arc<IoStats>>,
}

impl CheckpointJob {
    /// Writes the checkpoint back. Crash-safe at every step: the meta page goes last.
    pub fn run(&self) -> Result<()> {
        let start = std::time::Instant::now();
        let r = self.write_back();
        if let Some(io) = &self.io {
            io.checkpoint_write_us.record_since(start);
            io.checkpoint_pages.record(self.bytes() / PAGE_SIZE as u64 + 1);
        }
        r
    }

    fn write_back(&self) -> Result<()> {
        for &(offset, len) in &self.runs {
            self.flusher.flush(offset, len)?;
        }
        if self.sync_len {
            self.flusher.sync_len()?;
        }
        let slot = Meta::slot(self.meta.epoch);
        self.flusher.write(slot * PAGE_SIZE as u64, &self.meta_page);
        self.flusher.flush(slot * PAGE_SIZE as u64, PAGE_SIZE as u64)
    }

    /// Bytes of pages this checkpoint writes back.
    pub fn bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.1).sum()
    }
}

/// A double-ended iterator over a key range. Yields `(key, value)`; keys are borrowed from the
/// map, values too unless they live in an overflow chain.
pub struct Range<'a> {
    pager: &'a dyn Pages,
    front: Cursor<'a>,
    back: Cursor<'a>,
    pending_err: Option<Error>,
    done: bool,
}

/// One entry of a range.
pub type Entry<'a> = (&'a [u8], Cow<'a, [u8]>);

impl<'a> Range<'a> {
    /// The entries of `pages`' tree `tree` between the bounds.
    pub(crate) fn new(
        pages: &'a dyn Pages,
        tree: TreeRoot,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
    ) -> Range<'a> {
        let mut front = Cursor::new(pages, tree);
        let mut back = Cursor::new(pages, tree);
        let mut pending_err = front.seek_lower(start).and_then(|_| back.seek_upper(end)).err();
        let mut done = false;
        if pending_err.is_none() && front.is_valid() && back.is_valid() {
            match (front.key(), back.key()) {
                (Ok(f), Ok(b)) => done = f > b,
                (Err(e), _) | (_, Err(e)) => pending_err = Some(e),
            }
        }
        Range { pager: pages, front, back, pending_err, done }
    }

    /// A range that yields `e` and ends.
    fn failed(pages: &'a dyn Pages, tree: TreeRoot, e: Error) -> Range<'a> {
        let (front, back) = (Cursor::new(pages, tree), Cursor::new(pages, tree));
        Range { pager: pages, front, back, pending_err: Some(e), done: false }
    }

    fn step(&mut self, forward: bool) -> Option<Result<Entry<'a>>> {
        if let Some(e) = self.pending_err.take() {
            self.done = true;
            return Some(Err(e));
        }
        if self.done || !self.front.is_valid() || !self.back.is_valid() {
            return None;
        }
        let r = (|| {
            // The two ends meet at one entry: yield it, then stop. (Keys were compared once at
            // construction, so an empty range never gets here.)
            let last = self.front.position() == self.back.position();
            let c = if forward { &mut self.front } else { &mut self.back };
            let (k, v) = c.entry()?;
            if last {
                self.done = true;
            } else if forward {
                c.next()?
            } else {
                c.prev()?
            }
            Ok(Some((k, btree::load(self.pager, v)?)))
        })();
        match r {
            Ok(Some(e)) => Some(Ok(e)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

impl<'a> Iterator for Range<'a> {
    type Item = Result<Entry<'a>>;
    fn next(&mut self) -> Option<Self::Item> {
        self.step(true)
    }
}

impl DoubleEndedIterator for Range<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.step(false)
    }
}
