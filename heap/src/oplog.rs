//! The op log: a write-ahead log of committed batches, so acknowledged writes survive a crash
//! without a checkpoint per write.
//!
//! The log is a sequence of segment files `<heap file>.log.<first_lsn, 20 digits>`. A segment
//! starts with a 32-byte header, then records back to back (all little-endian):
//!
//! ```text
//! segment header
//!  0  [u8; 8] magic "HGOPLOG\0"
//!  8  u32     format version (1)
//! 12  u32     crc32c of bytes 16..32
//! 16  u64     heap_id (must equal the heap file's)
//! 24  u64     first_lsn: LSN of the first record in this segment
//!
//! record
//!  0  u32     payload_len
//!  4  u32     crc32c of bytes 8..16+payload_len (lsn and payload)
//!  8  u64     lsn: exactly one more than the previous record's
//! 16  payload: an encoded `WriteBatch` (see batch.rs); applying it is deterministic, so the
//!             record is also the unit of replication
//! ```
//!
//! Appends use write(2) before the batch is acknowledged, under every fsync policy, so a `kill -9`
//! loses nothing acknowledged; `FsyncPolicy` decides what a power cut can lose (see
//! docs/semantics.md). Each checkpoint rotates to a new segment and deletes segments whose records
//! are all at or below the *previous* checkpoint's LSN: if the newest meta page is ever unreadable,
//! open falls back to the older checkpoint and the log still holds everything after it.
//!
//! Recovery replays records above the checkpoint LSN. A torn or corrupt record at the end of the
//! newest segment ends replay cleanly and is truncated away (counted in `ReplayReport`); a bad
//! record followed by a valid one, a gap in LSNs, or damage in an older segment is
//! `Error::Corrupted`: committed data is never silently skipped.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::batch::WriteBatch;
use crate::error::{Error, Result};
use crate::group_commit::GroupCommit;
use crate::io_stats::IoStats;
use crate::storage::sync_dir;

const LOG_MAGIC: [u8; 8] = *b"HGOPLOG\0";
const LOG_VERSION: u32 = 1;
/// Bytes of a segment header.
pub const SEGMENT_HEADER_BYTES: usize = 32;
/// Bytes of a record header.
pub const RECORD_HEADER_BYTES: usize = 16;
/// How far past a bad record replay looks for an LSN that would prove later records exist.
const LSN_LOOKAHEAD: u64 = 1 << 20;

/// When the op log is fsynced. Every policy writes a record with write(2) before the batch is
/// acknowledged, so all of them survive `kill -9`; they differ only under power loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// An acknowledgement waits for an fsync covering its record; concurrent committers share
    /// fsyncs (group commit). Power loss loses nothing acknowledged.
    Always,
    /// A background flusher fsyncs every `n` milliseconds. Power loss can lose the last `n` ms.
    EveryMs(u32),
    /// Never fsync outside checkpoints. Power loss can lose everything since the last checkpoint.
    Never,
}

impl Default for FsyncPolicy {
    fn default() -> Self {
        FsyncPolicy::EveryMs(100)
    }
}

/// What recovery found in the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Records applied on top of the checkpoint.
    pub records_replayed: u64,
    /// Bytes of a torn or corrupt tail that were cut off the newest segment.
    pub torn_tail_bytes: u64,
    /// Highest LSN in the log after recovery.
    pub last_lsn: u64,
}

/// How far a replay got, readable from other threads while it runs (a shard's recovery shown
/// to clients, the stats and the terminal): bytes of the segments it reads, of them the bytes
/// read so far, and whether it is still running.
#[derive(Debug, Default)]
pub struct ReplayProgress {
    total: AtomicU64,
    done: AtomicU64,
    running: AtomicBool,
}

impl ReplayProgress {
    /// `(done, total)` bytes.
    pub fn bytes(&self) -> (u64, u64) {
        (self.done.load(Ordering::Relaxed), self.total.load(Ordering::Relaxed))
    }

    /// Whether a replay is running now.
    pub fn running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// A replay of `total` bytes starts (from nothing done).
    pub fn start(&self, total: u64) {
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        self.running.store(true, Ordering::Release);
    }

    fn advance(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The replay ended (done or failed).
    pub fn end(&self) {
        self.running.store(false, Ordering::Release);
    }
}

/// The directory of a heap's log segments (the storage seam for the log).
pub trait LogDir: Send + Sync {
    /// First LSNs of the segments present, any order.
    fn list(&self) -> io::Result<Vec<u64>>;
    /// The whole segment.
    fn read(&self, first_lsn: u64) -> io::Result<Vec<u8>>;
    /// The segment's length in bytes.
    fn len(&self, first_lsn: u64) -> io::Result<u64> {
        Ok(self.read(first_lsn)?.len() as u64)
    }
    /// The segment as a stream (what replay reads, a chunk at a time).
    fn open_read(&self, first_lsn: u64) -> io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(io::Cursor::new(self.read(first_lsn)?)))
    }
    /// Creates a segment holding `header`, durable (file and directory entry) on return.
    fn create(&self, first_lsn: u64, header: &[u8]) -> io::Result<Arc<dyn LogSegment>>;
    /// Opens a segment for appending after cutting it to `valid_len` bytes.
    fn open_append(&self, first_lsn: u64, valid_len: u64) -> io::Result<Arc<dyn LogSegment>>;
    /// Deletes a segment.
    fn remove(&self, first_lsn: u64) -> io::Result<()>;
    /// Bytes the segments take (their lengths; 0 where unknown).
    fn bytes(&self) -> u64 {
        0
    }
}

/// One segment open for appending.
pub trait LogSegment: Send + Sync {
    /// Appends `bytes` with write(2). On error nothing of `bytes` remains in the segment.
    fn append(&self, bytes: &[u8]) -> io::Result<()>;
    /// fsyncs what was appended.
    fn sync(&self) -> io::Result<()>;
}

/// Segment files next to the heap file.
pub struct FileLogDir {
    dir: PathBuf,
    stem: String,
}

impl FileLogDir {
    /// The log of the heap file at `heap_path`.
    pub fn for_heap(heap_path: &Path) -> Self {
        let dir =
            heap_path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
        let stem = format!("{}.log.", heap_path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
        FileLogDir { dir, stem }
    }

    fn path(&self, first_lsn: u64) -> PathBuf {
        self.dir.join(format!("{}{first_lsn:020}", self.stem))
    }
}

struct FileSegment {
    file: File,
    /// Length of the valid prefix; a failed append is cut back to it.
    len: Mutex<u64>,
}

impl LogSegment for FileSegment {
    fn append(&self, bytes: &[u8]) -> io::Result<()> {
        let mut len = self.len.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = (&self.file).write_all(bytes) {
            // A partial record would read as corruption in the middle of the log later.
            if let Err(cut) = self.file.set_len(*len) {
                return Err(io::Error::other(format!("{e}; cutting the partial record back failed: {cut}")));
            }
            return Err(e);
        }
        *len += bytes.len() as u64;
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

impl LogDir for FileLogDir {
    fn bytes(&self) -> u64 {
        let Ok(firsts) = self.list() else { return 0 };
        firsts.into_iter().filter_map(|f| std::fs::metadata(self.path(f)).ok()).map(|m| m.len()).sum()
    }
    fn list(&self) -> io::Result<Vec<u64>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            let name = e?.file_name();
            let name = name.to_string_lossy();
            if let Some(n) = name.strip_prefix(&self.stem).and_then(|d| d.parse::<u64>().ok()) {
                out.push(n);
            }
        }
        Ok(out)
    }
    fn read(&self, first_lsn: u64) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        File::open(self.path(first_lsn))?.read_to_end(&mut v)?;
        Ok(v)
    }
    fn len(&self, first_lsn: u64) -> io::Result<u64> {
        Ok(std::fs::metadata(self.path(first_lsn))?.len())
    }
    fn open_read(&self, first_lsn: u64) -> io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(File::open(self.path(first_lsn))?))
    }
    fn create(&self, first_lsn: u64, header: &[u8]) -> io::Result<Arc<dyn LogSegment>> {
        let path = self.path(first_lsn);
        // O_APPEND excludes O_TRUNC in std: empty a leftover file by hand.
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        file.set_len(0)?;
        (&file).write_all(header)?;
        file.sync_all()?;
        sync_dir(&self.dir).map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Arc::new(FileSegment { file, len: Mutex::new(header.len() as u64) }))
    }
    fn open_append(&self, first_lsn: u64, valid_len: u64) -> io::Result<Arc<dyn LogSegment>> {
        let file = OpenOptions::new().append(true).open(self.path(first_lsn))?;
        if file.metadata()?.len() != valid_len {
            file.set_len(valid_len)?;
            file.sync_all()?;
        }
        Ok(Arc::new(FileSegment { file, len: Mutex::new(valid_len) }))
    }
    fn remove(&self, first_lsn: u64) -> io::Result<()> {
        std::fs::remove_file(self.path(first_lsn))
    }
}

fn segment_header(heap_id: u64, first_lsn: u64) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES];
    h[..8].copy_from_slice(&LOG_MAGIC);
    h[8..12].copy_from_slice(&LOG_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&heap_id.to_le_bytes());
    h[24..32].copy_from_slice(&first_lsn.to_le_bytes());
    let crc = crc32c::crc32c(&h[16..32]);
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

fn log_corrupt(first_lsn: u64, reason: String) -> Error {
    // Page 0 stands for "not a heap page"; the reason names the segment.
    Error::Corrupted { page: 0, reason: format!("op log segment {first_lsn}: {reason}") }
}

/// Appends one record for `batch` at `lsn` to `out`.
pub fn encode_record(out: &mut Vec<u8>, lsn: u64, payload: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// A record that validates at `pos`: (lsn, payload, length).
fn record_at(seg: &[u8], pos: usize) -> Option<(u64, &[u8], usize)> {
    let h = seg.get(pos..pos + RECORD_HEADER_BYTES)?;
    let plen = u32::from_le_bytes(h[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(h[4..8].try_into().ok()?);
    let lsn = u64::from_le_bytes(h[8..16].try_into().ok()?);
    let body = seg.get(pos + 8..pos + RECORD_HEADER_BYTES + plen)?;
    (crc32c::crc32c(body) == crc).then(|| (lsn, &body[8..], RECORD_HEADER_BYTES + plen))
}

/// Whether any valid record with an LSN in `(after, after + LSN_LOOKAHEAD]` starts past `pos`.
fn valid_record_after(seg: &[u8], pos: usize, after: u64) -> bool {
    (pos + 1..seg.len().saturating_sub(RECORD_HEADER_BYTES - 1)).any(|p| {
        let lsn = u64::from_le_bytes(seg[p + 8..p + 16].try_into().expect("8 bytes"));
        lsn > after && lsn <= after + LSN_LOOKAHEAD && record_at(seg, p).is_some()
    })
}

/// Shared between the log owner, `Durability` handles and the flusher thread.
struct Shared {
    gc: GroupCommit,
    current: Mutex<Arc<dyn LogSegment>>,
    io: Option<Arc<IoStats>>,
}

impl Shared {
    fn segment(&self) -> Arc<dyn LogSegment> {
        self.current.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A group commit's fsync of the current segment, counted in `io` (its latency, and the
    /// records written and not yet durable when it began: the group it makes durable).
    fn sync(&self) -> io::Result<()> {
        let Some(io) = &self.io else { return self.segment().sync() };
        let group = self.gc.written_lsn().saturating_sub(self.gc.durable());
        let start = std::time::Instant::now();
        let r = self.segment().sync();
        io.fsync_us.record_since(start);
        io.fsync_records.record(group);
        r
    }
}

/// Waits for op-log records to become durable; clone it freely and use it without the heap.
#[derive(Clone)]
pub struct Durability {
    shared: Arc<Shared>,
    policy: FsyncPolicy,
}

impl Durability {
    /// Returns once the record at `lsn` is acknowledged-durable under the heap's policy: under
    /// `Always` after an fsync covering it (shared with concurrent committers); otherwise at once.
    pub fn wait(&self, lsn: u64) -> Result<u64> {
        match self.policy {
            FsyncPolicy::Always => {
                let shared = self.shared.clone();
                self.shared.gc.wait_durable(lsn, move || shared.sync())
            }
            _ => Ok(lsn),
        }
    }

    /// Highest LSN known fsynced.
    pub fn durable_lsn(&self) -> u64 {
        self.shared.gc.durable()
    }

    /// fsyncs performed by group-commit leaders and the flusher.
    pub fn syncs(&self) -> u64 {
        self.shared.gc.syncs()
    }
}

struct Flusher {
    stop: mpsc::Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Flusher {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The op log of one heap.
pub(crate) struct OpLog {
    dir: Arc<dyn LogDir>,
    heap_id: u64,
    policy: FsyncPolicy,
    /// First LSNs of the segments, ascending; the last is being appended to.
    segments: Vec<u64>,
    shared: Arc<Shared>,
    next_lsn: u64,
    buf: Vec<u8>,
    /// Records queued by `append_deferred`, not yet written.
    deferred: Vec<u8>,
    /// Bytes of records written to the current segment (since the last `rotate`, which every
    /// checkpoint begins with).
    tail_bytes: u64,
    _flusher: Option<Flusher>,
}

impl OpLog {
    /// Bytes its segments take on disk.
    pub(crate) fn disk_bytes(&self) -> u64 {
        self.dir.bytes()
    }

    /// Opens the log and replays every record above `checkpoint_lsn` through `apply`.
    /// `expected_segment` (0: none) is the segment the checkpoint names: its loss is corruption.
    pub(crate) fn open(
        dir: Arc<dyn LogDir>,
        heap_id: u64,
        policy: FsyncPolicy,
        (checkpoint_lsn, expected_segment): (u64, u64),
        (progress, io): (Option<&ReplayProgress>, Option<Arc<IoStats>>),
        apply: impl FnMut(u64, &WriteBatch) -> Result<()>,
    ) -> Result<(OpLog, ReplayReport)> {
        let Scan { mut segments, report, expected, tail_len } =
            scan(&*dir, heap_id, checkpoint_lsn, expected_segment, progress, apply)?;
        let next_lsn = report.last_lsn + 1;
        let current = match (segments.last(), tail_len) {
            (Some(&first), Some(len)) if len >= SEGMENT_HEADER_BYTES as u64 && expected == Some(next_lsn) => {
                dir.open_append(first, len)?
            }
            (Some(&first), Some(len)) if len < SEGMENT_HEADER_BYTES as u64 => {
                dir.remove(first)?;
                segments.pop();
                let s = dir.create(next_lsn, &segment_header(heap_id, next_lsn))?;
                segments.push(next_lsn);
                s
            }
            _ => {
                let s = dir.create(next_lsn, &segment_header(heap_id, next_lsn))?;
                segments.push(next_lsn);
                s
            }
        };
        // What replay read may sit only in the page cache; make it durable before acking more.
        current.sync()?;
        let shared =
            Arc::new(Shared { gc: GroupCommit::new(report.last_lsn), current: Mutex::new(current), io });
        let flusher = match policy {
            FsyncPolicy::EveryMs(ms) => Some(spawn_flusher(shared.clone(), ms)),
            _ => None,
        };
        // What a crash left to replay counts as tail until the next checkpoint (all segments: an
        // upper bound, as the one kept back for the previous checkpoint is counted too).
        let tail_bytes = dir.bytes();
        let log = OpLog {
            dir,
            heap_id,
            policy,
            segments,
            shared,
            next_lsn,
            buf: Vec::new(),
            deferred: Vec::new(),
            tail_bytes,
            _flusher: flusher,
        };
        Ok((log, report))
    }

    /// Writes `batch` as the next record with write(2) and returns its LSN. On error nothing was
    /// logged.
    pub(crate) fn append(&mut self, batch: &WriteBatch) -> Result<u64> {
        self.flush()?;
        self.shared.gc.check()?;
        let lsn = self.next_lsn;
        self.buf.clear();
        encode_record(&mut self.buf, lsn, batch.as_bytes());
        if let Err(e) = self.shared.segment().append(&self.buf) {
            return Err(match e.raw_os_error() {
                // The partial record was cut back: the log is intact and usable.
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
                    Error::DiskFull { wanted_bytes: self.buf.len() as u64 }
                }
                _ => {
                    // The log's tail is unknown: fail closed.
                    self.shared.gc.fail(format!("op log append failed: {e}"));
                    Error::Io(e)
                }
            });
        }
        self.next_lsn += 1;
        self.tail_bytes += self.buf.len() as u64;
        self.count_write(self.buf.len());
        self.written(lsn);
        Ok(lsn)
    }

    /// Bytes of records written since the last checkpoint began (replay's length after a crash).
    pub(crate) fn tail_bytes(&self) -> u64 {
        self.tail_bytes + self.deferred.len() as u64
    }

    fn count_write(&self, bytes: usize) {
        if let Some(io) = &self.shared.io {
            io.log_writes.fetch_add(1, Ordering::Relaxed);
            io.log_write_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }

    fn written(&self, lsn: u64) {
        self.shared.gc.record_written(lsn);
        if self.policy == FsyncPolicy::Never {
            self.shared.gc.mark_durable(lsn);
        }
    }

    /// Queues `batch` as the next record in memory and returns its LSN; `flush` writes every
    /// queued record with one write(2). Nothing queued may be acknowledged before `flush`.
    pub(crate) fn append_deferred(&mut self, batch: &WriteBatch) -> Result<u64> {
        self.shared.gc.check()?;
        let lsn = self.next_lsn;
        encode_record(&mut self.deferred, lsn, batch.as_bytes());
        self.next_lsn += 1;
        Ok(lsn)
    }

    /// Writes the queued records. On error the group is failed: those records' batches were
    /// already applied in memory, so the heap must fail closed.
    pub(crate) fn flush(&mut self) -> Result<()> {
        if self.deferred.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.shared.segment().append(&self.deferred) {
            self.shared.gc.fail(format!("op log append failed: {e}"));
            self.deferred.clear();
            return Err(Error::Io(e));
        }
        self.tail_bytes += self.deferred.len() as u64;
        self.count_write(self.deferred.len());
        self.deferred.clear();
        self.written(self.next_lsn - 1);
        Ok(())
    }

    /// Whether records are queued (`append_deferred`) and not yet written.
    pub(crate) fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }

    pub(crate) fn last_lsn(&self) -> u64 {
        self.next_lsn - 1
    }

    pub(crate) fn durability(&self) -> Durability {
        Durability { shared: self.shared.clone(), policy: self.policy }
    }

    /// Before a checkpoint: fsync the current segment and start a new one, so the checkpoint's
    /// records are sealed in older segments.
    pub(crate) fn rotate(&mut self) -> Result<()> {
        self.flush()?;
        let current_first = *self.segments.last().expect("a log has a segment");
        if self.next_lsn == current_first {
            return Ok(());
        }
        let old = self.shared.segment();
        let upto = self.last_lsn();
        old.sync().inspect_err(|e| self.shared.gc.fail(format!("op log sync failed: {e}")))?;
        self.shared.gc.mark_durable(upto);
        let new = self.dir.create(self.next_lsn, &segment_header(self.heap_id, self.next_lsn))?;
        *self.shared.current.lock().unwrap_or_else(|e| e.into_inner()) = new;
        self.segments.push(self.next_lsn);
        self.tail_bytes = 0;
        Ok(())
    }

    /// After a checkpoint: delete segments whose records are all at or below `keep_after`
    /// (the previous checkpoint's LSN). Never deletes the current segment.
    pub(crate) fn retire(&mut self, keep_after: u64) -> Result<()> {
        while self.segments.len() > 1 && self.segments[1] - 1 <= keep_after {
            self.dir.remove(self.segments[0])?;
            self.segments.remove(0);
        }
        Ok(())
    }

    /// First LSN of the segment being appended to.
    pub(crate) fn current_first(&self) -> u64 {
        *self.segments.last().expect("a log has a segment")
    }

    pub(crate) fn segment_count(&self) -> usize {
        self.segments.len()
    }
}

/// How much of a segment replay reads at a time.
const READ_CHUNK: usize = 1 << 20;

/// A segment read a chunk at a time, so replay holds about `READ_CHUNK` (and one record) of it
/// in memory, not the whole segment: `buf[at..]` is read and not yet consumed, and `base` is
/// the segment offset of `buf[0]`.
struct SegmentReader {
    rd: Box<dyn Read + Send>,
    buf: Vec<u8>,
    at: usize,
    base: usize,
    eof: bool,
}

impl SegmentReader {
    fn new(rd: Box<dyn Read + Send>) -> SegmentReader {
        SegmentReader { rd, buf: Vec::new(), at: 0, base: 0, eof: false }
    }

    /// The segment offset of the next unconsumed byte.
    fn pos(&self) -> usize {
        self.base + self.at
    }

    fn available(&self) -> &[u8] {
        &self.buf[self.at..]
    }

    /// Reads until `n` bytes are available or the segment ends; whether they are.
    fn fill(&mut self, n: usize) -> io::Result<bool> {
        while self.buf.len() - self.at < n && !self.eof {
            if self.at > 0 {
                self.buf.drain(..self.at);
                self.base += self.at;
                self.at = 0;
            }
            let old = self.buf.len();
            self.buf.resize(old + READ_CHUNK, 0);
            let got = loop {
                match self.rd.read(&mut self.buf[old..]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r,
                }
            };
            self.buf.truncate(old + *got.as_ref().unwrap_or(&0));
            if got? == 0 {
                self.eof = true;
            }
        }
        Ok(self.buf.len() - self.at >= n)
    }

    /// Everything from the next unconsumed byte to the segment's end (read whole: only after a
    /// bad record, to tell a torn tail from damage before valid records).
    fn rest(&mut self) -> io::Result<&[u8]> {
        self.rd.read_to_end(&mut self.buf)?;
        self.eof = true;
        Ok(&self.buf[self.at..])
    }

    fn consume(&mut self, n: usize) {
        self.at += n;
    }
}

/// What reading a log's segments found.
struct Scan {
    /// First LSNs of the segments, ascending.
    segments: Vec<u64>,
    report: ReplayReport,
    /// The LSN the next record must have.
    expected: Option<u64>,
    /// Valid bytes of the last segment (`None`: it was not read).
    tail_len: Option<u64>,
}

/// Reads every segment whose records may lie above `checkpoint_lsn`, checking headers, record
/// checksums and LSN order, and hands each record above the checkpoint to `apply`. Changes
/// nothing on disk.
fn scan(
    dir: &dyn LogDir,
    heap_id: u64,
    checkpoint_lsn: u64,
    expected_segment: u64,
    progress: Option<&ReplayProgress>,
    mut apply: impl FnMut(u64, &WriteBatch) -> Result<()>,
) -> Result<Scan> {
    let mut segments = dir.list()?;
    segments.sort_unstable();
    if let Some(p) = progress {
        // The segments replay reads: from the one holding the record after the checkpoint on.
        let from = segments.iter().rposition(|&f| f <= checkpoint_lsn + 1).unwrap_or(0);
        let total = segments[from.min(segments.len())..].iter().map(|&f| dir.len(f).unwrap_or(0)).sum();
        p.start(total);
    }
    if expected_segment != 0 && !segments.contains(&expected_segment) {
        return Err(log_corrupt(
            expected_segment,
            format!("the segment checkpoint LSN {checkpoint_lsn} names is missing: its records may be lost"),
        ));
    }
    let mut report = ReplayReport { last_lsn: checkpoint_lsn, ..ReplayReport::default() };
    let mut expected = None::<u64>;
    let mut tail_len = None;
    for (i, &first) in segments.iter().enumerate() {
        let last_segment = i + 1 == segments.len();
        // A segment whose records all lie at or below the checkpoint holds nothing to replay
        // (it is kept only for a fallback to the older checkpoint): do not read it.
        if let Some(&next) = segments.get(i + 1)
            && next <= checkpoint_lsn + 1
        {
            expected = Some(next);
            report.last_lsn = report.last_lsn.max(next - 1);
            continue;
        }
        let mut seg = SegmentReader::new(dir.open_read(first)?);
        let hdr = segment_header(heap_id, first);
        let whole_header = seg.fill(SEGMENT_HEADER_BYTES)?;
        if !whole_header || seg.available()[..SEGMENT_HEADER_BYTES] != hdr {
            // A segment a checkpoint names had its header synced before the checkpoint.
            if last_segment && !whole_header && hdr.starts_with(seg.available()) && first != expected_segment
            {
                // Crashed while creating the segment: it holds nothing.
                tail_len = Some(0);
                break;
            }
            return Err(log_corrupt(first, "bad segment header".into()));
        }
        seg.consume(SEGMENT_HEADER_BYTES);
        // Gaps below the checkpoint are harmless (those records are in the heap already).
        if first > checkpoint_lsn + 1 && expected != Some(first) {
            return Err(log_corrupt(
                first,
                format!("records between {checkpoint_lsn} and {first} are missing"),
            ));
        }
        let mut lsn = first;
        loop {
            let pos = seg.pos();
            if !seg.fill(RECORD_HEADER_BYTES)? && seg.available().is_empty() {
                break;
            }
            let plen = seg.available().get(..4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            // A length no batch can have is damage: not read on (it may claim gigabytes).
            let whole = u64::from(plen) <= crate::limits::BATCH_BYTES_MAX
                && seg.fill(RECORD_HEADER_BYTES + plen as usize)?;
            let record = if whole { record_at(seg.available(), 0) } else { None };
            let Some((rec_lsn, payload, len)) = record else {
                let rest = seg.rest()?;
                if !last_segment || valid_record_after(rest, 0, lsn.saturating_sub(1)) {
                    return Err(log_corrupt(first, format!("bad record at byte {pos} before valid ones")));
                }
                report.torn_tail_bytes = rest.len() as u64;
                break;
            };
            if rec_lsn != lsn {
                return Err(log_corrupt(
                    first,
                    format!("record at byte {pos} has LSN {rec_lsn}, expected {lsn}"),
                ));
            }
            if lsn > checkpoint_lsn {
                let batch = WriteBatch::from_bytes(payload)
                    .map_err(|e| log_corrupt(first, format!("record {lsn}: {e}")))?;
                apply(lsn, &batch)?;
                report.records_replayed += 1;
            }
            report.last_lsn = report.last_lsn.max(lsn);
            lsn += 1;
            seg.consume(len);
            if let Some(p) = progress {
                p.advance(len as u64);
            }
        }
        expected = Some(lsn);
        if last_segment {
            tail_len = Some(seg.pos() as u64);
        }
    }
    Ok(Scan { segments, report, expected, tail_len })
}

/// Checks a heap's op log without changing it (for `heapgrid check`): the segment the
/// checkpoint names exists, every header and record checksum is valid, LSNs follow each other,
/// and every record above the checkpoint decodes. A torn tail is reported, not an error.
pub fn verify(
    dir: &dyn LogDir,
    heap_id: u64,
    checkpoint_lsn: u64,
    expected_segment: u64,
) -> Result<ReplayReport> {
    Ok(scan(dir, heap_id, checkpoint_lsn, expected_segment, None, |_, _| Ok(()))?.report)
}

fn spawn_flusher(shared: Arc<Shared>, ms: u32) -> Flusher {
    let (stop, rx) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("heapgrid-log-flusher".into())
        .spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) =
                rx.recv_timeout(Duration::from_millis(ms.max(1) as u64))
            {
                let written = shared.gc.written_lsn();
                if written > shared.gc.durable() {
                    let s = shared.clone();
                    if shared.gc.wait_durable(written, move || s.sync()).is_err() {
                        return; // The group is failed; committers see the error.
                    }
                }
            }
        })
        .expect("spawning the log flusher thread");
    Flusher { stop, thread: Some(thread) }
}

/// A simulated log directory for fault tests: appends land in a live image; `sync` makes them
/// durable; `crash` keeps the durable prefix plus a random part of the unsynced tail.
#[derive(Clone, Default)]
pub struct SimLogDir {
    state: Arc<Mutex<SimLogState>>,
}

#[derive(Default)]
struct SimLogState {
    /// first_lsn -> (live bytes, durable length)
    files: std::collections::BTreeMap<u64, (Vec<u8>, usize)>,
    space_left: Option<u64>,
    fail_sync: bool,
}

impl SimLogDir {
    pub fn new() -> Self {
        Self::default()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, SimLogState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Limits further appends to `bytes` in total (`None`: unlimited).
    pub fn set_space_left(&self, bytes: Option<u64>) {
        self.lock().space_left = bytes;
    }
    /// Makes every later sync fail.
    pub fn set_fail_sync(&self, fail: bool) {
        self.lock().fail_sync = fail;
    }
    /// A power cut: each segment keeps its synced prefix plus the first `keep` of its unsynced
    /// bytes, `keep` drawn from `seed`.
    pub fn crash(&self, seed: u64) {
        let mut st = self.lock();
        let mut x = seed | 1;
        for (live, durable) in st.files.values_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let unsynced = live.len() - *durable;
            let keep = if unsynced == 0 { 0 } else { (x % (unsynced as u64 + 1)) as usize };
            live.truncate(*durable + keep);
            *durable = live.len();
        }
    }
    /// Direct access to a segment's bytes (to inject corruption).
    pub fn edit(&self, first_lsn: u64, f: impl FnOnce(&mut Vec<u8>)) {
        let mut st = self.lock();
        if let Some((live, durable)) = st.files.get_mut(&first_lsn) {
            f(live);
            *durable = (*durable).min(live.len());
        }
    }
    /// First LSNs of the segments present.
    pub fn segments(&self) -> Vec<u64> {
        self.lock().files.keys().copied().collect()
    }
}

struct SimSegment {
    dir: SimLogDir,
    first: u64,
}

impl LogSegment for SimSegment {
    fn append(&self, bytes: &[u8]) -> io::Result<()> {
        let mut st = self.dir.lock();
        if let Some(left) = st.space_left {
            if (bytes.len() as u64) > left {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            st.space_left = Some(left - bytes.len() as u64);
        }
        let f = st.files.get_mut(&self.first).ok_or_else(|| io::Error::other("segment removed"))?;
        f.0.extend_from_slice(bytes);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        let mut st = self.dir.lock();
        if st.fail_sync {
            return Err(io::Error::other("injected fsync failure"));
        }
        if let Some(f) = st.files.get_mut(&self.first) {
            f.1 = f.0.len();
        }
        Ok(())
    }
}

impl LogDir for SimLogDir {
    fn list(&self) -> io::Result<Vec<u64>> {
        Ok(self.segments())
    }
    fn read(&self, first_lsn: u64) -> io::Result<Vec<u8>> {
        self.lock()
            .files
            .get(&first_lsn)
            .map(|f| f.0.clone())
            .ok_or_else(|| io::Error::other("no such segment"))
    }
    fn create(&self, first_lsn: u64, header: &[u8]) -> io::Result<Arc<dyn LogSegment>> {
        let mut st = self.lock();
        if st.fail_sync {
            return Err(io::Error::other("injected fsync failure"));
        }
        st.files.insert(first_lsn, (header.to_vec(), header.len()));
        Ok(Arc::new(SimSegment { dir: self.clone(), first: first_lsn }))
    }
    fn open_append(&self, first_lsn: u64, valid_len: u64) -> io::Result<Arc<dyn LogSegment>> {
        let mut st = self.lock();
        let f = st.files.get_mut(&first_lsn).ok_or_else(|| io::Error::other("no such segment"))?;
        f.0.truncate(valid_len as usize);
        f.1 = f.1.min(f.0.len());
        Ok(Arc::new(SimSegment { dir: self.clone(), first: first_lsn }))
    }
    fn remove(&self, first_lsn: u64) -> io::Result<()> {
        self.lock().files.remove(&first_lsn);
        Ok(())
    }
}
