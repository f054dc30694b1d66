//! The storage seam: where the heap's bytes live and how they become durable.
//!
//! `Storage` is the flush boundary. `FileStorage` is the real thing: one file mapped with memmap2,
//! grown in extents whose blocks are reserved with `posix_fallocate` *before* they are mapped, so a
//! full disk is `Error::DiskFull` at grow time and never a SIGBUS on a later store. `SimStorage`
//! keeps a live image and a durable image; `flush` copies live to durable, and `SimDisk::crash`
//! produces what a power cut could leave: every page written since its last flush comes back old,
//! new, or torn at 512-byte sector granularity. It can also inject disk-full and fsync errors.
//!
//! Readers on other threads (heap snapshots) see the bytes through a `Region`: the image as it
//! is mapped now, kept mapped for as long as the `Region` lives even after a `grow` maps it
//! anew (and, for a file, keeping the file and its lock open). The single writer changes bytes
//! only through `Storage::bytes_mut` and `copy`, which hand out exactly the bytes asked for, never
//! a reference to the whole image, so a writer and readers of *other* pages never alias.
//!
//! Invariant: after `flush(off, len)` returns `Ok`, those bytes survive a crash.
//! Invariant: a failed `flush` leaves the durable state unknown; callers poison themselves.
//! Invariant: nobody writes bytes a live `Region` reader may read (the heap guarantees it for
//! every page a snapshot can reach); that is what makes `Region::bytes` sound.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Error, Result};
use crate::limits::PAGE_SIZE;

/// Where a heap's pages live.
pub trait Storage: Send + Sync {
    /// Bytes currently reserved and mapped.
    fn len(&self) -> u64;
    /// True when nothing is mapped yet.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The image as mapped now, for reading (also from other threads).
    fn region(&self) -> Arc<Region>;
    /// `len` bytes at `offset`, writable. Panics past the end (a bug: callers reserve first).
    fn bytes_mut(&mut self, offset: u64, len: usize) -> &mut [u8];
    /// Copies `len` bytes from `from` to `to` (ranges that do not overlap).
    fn copy(&mut self, from: u64, to: u64, len: usize);
    /// Reserves space up to `new_len` bytes and maps it. Never shrinks.
    fn grow(&mut self, new_len: u64) -> Result<()>;
    /// Shrinks the file to `new_len` bytes (compaction). Bytes past it are gone.
    fn truncate(&mut self, new_len: u64) -> Result<()>;
    /// Makes `len` bytes at `offset` durable (msync / fsync). Returns after they are on disk.
    fn flush(&mut self, offset: u64, len: u64) -> Result<()>;
    /// Makes the file's length durable (after a grow or truncate).
    fn sync_len(&mut self) -> Result<()>;
    /// A handle that flushes, syncs the length and writes meta pages from another thread (a
    /// checkpoint in the background), while the owner goes on writing other pages.
    fn flusher(&self) -> Arc<dyn Flusher>;
    /// Gives the memory of `len` bytes at `offset` back to the system (free pages nobody reads):
    /// advice only, the bytes stay as they are on disk and are read back from there if ever
    /// read. A storage without memory of its own ignores it.
    fn discard(&mut self, _offset: u64, _len: u64) {}
    /// Drops the memory of `len` bytes at `offset`: pages that are durable and clean (the
    /// memory budget's pager). Advice only: the bytes stay as they are on disk and are read
    /// back from there when next read. A storage without memory of its own ignores it.
    fn page_out(&mut self, _offset: u64, _len: u64) {}
    /// Advises the system that pages are read in random order (no read-around on a fault), for
    /// a heap larger than its memory; `false` restores the default. Kept across grows.
    fn set_random_access(&mut self, _on: bool) {}
    /// Whether `page_out` and `resident_map` mean anything here (a mapped file).
    fn pages_out(&self) -> bool {
        false
    }
}

/// Flushes a storage from another thread. Only for bytes the owner does not write meanwhile:
/// pages frozen by a capture, and meta pages (which only checkpoints write). A checkpoint of
/// many scattered pages flushes the whole data area at once: harmless for a file (msync reads
/// nothing in user space), but `SimStorage`'s flusher copies bytes, so its jobs run on the
/// owner's thread (as the tests do).
pub trait Flusher: Send + Sync {
    /// Makes `len` bytes at `offset` durable.
    fn flush(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes the storage's length durable.
    fn sync_len(&self) -> Result<()>;
    /// Writes `bytes` at `offset` (a meta page nobody else writes), not yet durable.
    fn write(&self, offset: u64, bytes: &[u8]);
}

/// A mapped image of a storage's bytes, readable from any thread while it lives.
pub struct Region {
    ptr: *mut u8,
    len: usize,
    /// Keeps the memory mapped (and a file open and locked) while the region lives.
    _owner: Option<Arc<dyn Send + Sync>>,
}

// SAFETY: a `Region` is a pointer to memory kept alive by `_owner`; the module invariant (no
// writes to bytes a reader may read) is what makes sharing it sound.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    fn empty() -> Region {
        Region { ptr: std::ptr::NonNull::dangling().as_ptr(), len: 0, _owner: None }
    }

    /// Bytes mapped.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// True when nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of the mapping resident in memory now (`mincore`), or `None` where the system
    /// cannot tell (memory that is not page-aligned, a failed call).
    pub fn resident_bytes(&self) -> Option<u64> {
        let (map, page) = self.resident_map()?;
        Some(map.iter().filter(|b| **b & 1 == 1).count() as u64 * page as u64)
    }

    /// Which pages of the mapping are resident now (`mincore`: one byte per system page, bit 0
    /// set when resident) and the system's page size, or `None` where the system cannot tell.
    /// Resident means in the page cache, mapped here or not.
    pub fn resident_map(&self) -> Option<(Vec<u8>, usize)> {
        if self.len == 0 {
            return Some((Vec::new(), PAGE_SIZE as usize));
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page = usize::try_from(page).ok().filter(|&p| p > 0)?;
        if !(self.ptr as usize).is_multiple_of(page) {
            return None;
        }
        let mut vec = vec![0u8; self.len.div_ceil(page)];
        // SAFETY: `ptr..ptr+len` is this live mapping, page-aligned; `vec` has one byte per page.
        let rc = unsafe { libc::mincore(self.ptr.cast(), self.len, vec.as_mut_ptr().cast()) };
        if rc != 0 {
            return None;
        }
        Some((vec, page))
    }

    /// `len` bytes at `offset`, or `None` past the end.
    pub fn bytes(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let end = (offset as usize).checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: in bounds of a live mapping; nobody writes these bytes while a reader can
        // read them (module invariant).
        Some(unsafe { std::slice::from_raw_parts(self.ptr.add(offset as usize), len) })
    }

    /// Where `len` bytes at `offset` start, for writing; panics past the end (callers reserve
    /// first). Turning it into a slice is the single writer's business (`Storage::bytes_mut`).
    fn write_ptr(&self, offset: u64, len: usize) -> *mut u8 {
        let end = (offset as usize).checked_add(len).expect("range overflows");
        assert!(end <= self.len, "write of {len} bytes at {offset} past the mapped {} bytes", self.len);
        // SAFETY: in bounds of the mapping.
        unsafe { self.ptr.add(offset as usize) }
    }

    fn copy(&self, from: u64, to: u64, len: usize) {
        let (f, t) = (from as usize, to as usize);
        assert!(f.max(t) + len <= self.len && (f + len <= t || t + len <= f), "bad copy");
        // SAFETY: both ranges in bounds and disjoint; single writer as for `bytes_mut`.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(f), self.ptr.add(t), len) }
    }
}

/// A file's mapping together with the file, so the file (and its lock) outlives every reader.
struct FileMap {
    map: MmapRaw,
    _file: Arc<File>,
}

/// One heap file, memory-mapped.
pub struct FileStorage {
    file: Arc<File>,
    map: Option<Arc<FileMap>>,
    region: Arc<Region>,
    len: u64,
    /// `set_random_access`: advised on every mapping made.
    random: bool,
}

impl FileStorage {
    /// Opens (creating if missing) the file at `path` and maps its current length.
    /// Takes an exclusive advisory lock so two processes never write one heap.
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        // SAFETY: flock on a valid fd has no memory-safety preconditions.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            return Err(Error::Locked(format!("{}: {err}", path.display())));
        }
        let len = file.metadata()?.len();
        let mut s = FileStorage {
            file: Arc::new(file),
            map: None,
            region: Arc::new(Region::empty()),
            len,
            random: false,
        };
        s.remap()?;
        Ok(s)
    }

    /// Maps the file's current length anew. Readers of the previous mapping keep it.
    fn remap(&mut self) -> Result<()> {
        self.map = None;
        self.region = Arc::new(Region::empty());
        if self.len > 0 {
            // The file is ours alone (exclusive flock) and its blocks are reserved, so stores
            // cannot fault for lack of space; `truncate` only cuts pages no reader can reach.
            let map = MmapOptions::new().len(self.len as usize).map_raw(&*self.file)?;
            let fm = Arc::new(FileMap { map, _file: self.file.clone() });
            self.region = Arc::new(Region {
                ptr: fm.map.as_mut_ptr(),
                len: self.len as usize,
                _owner: Some(fm.clone()),
            });
            self.map = Some(fm);
            self.advise_access();
        }
        Ok(())
    }

    /// Gives the memory of `len` bytes at `offset` back (`Storage::discard`, `Storage::page_out`):
    /// unmapped here (`MADV_PAGEOUT` first when `reclaim`, which frees pages mapped only here
    /// at once; `MADV_DONTNEED` otherwise or where the kernel lacks it), then their clean cached
    /// copies dropped (`POSIX_FADV_DONTNEED`; dirty ones stay until written back). Advice only.
    fn release_memory(&self, offset: u64, len: u64, reclaim: bool) {
        let end = offset.saturating_add(len).min(self.region.len());
        if offset >= end {
            return;
        }
        let n = (end - offset) as usize;
        let p = self.region.write_ptr(offset, n);
        // SAFETY: page-aligned (callers pass whole pages of a page-aligned mapping), in bounds.
        // On a shared file mapping MADV_PAGEOUT and MADV_DONTNEED only unmap (and reclaim what
        // is clean): nothing written is lost, and a later read faults the page back in.
        unsafe {
            if !reclaim || libc::madvise(p.cast(), n, libc::MADV_PAGEOUT) != 0 {
                libc::madvise(p.cast(), n, libc::MADV_DONTNEED);
            }
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                n as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            );
        }
    }

    /// Applies `random` to the current mapping.
    fn advise_access(&self) {
        if self.region.len == 0 {
            return;
        }
        let advice = if self.random { libc::MADV_RANDOM } else { libc::MADV_NORMAL };
        // SAFETY: the whole live mapping, page-aligned (mmap returns it so); advice only.
        unsafe { libc::madvise(self.region.ptr.cast(), self.region.len, advice) };
    }
}

impl Storage for FileStorage {
    fn len(&self) -> u64 {
        self.len
    }
    fn region(&self) -> Arc<Region> {
        self.region.clone()
    }
    fn bytes_mut(&mut self, offset: u64, len: usize) -> &mut [u8] {
        let p = self.region.write_ptr(offset, len);
        // SAFETY: in bounds; `&mut self` makes us the single writer and ties the slice to this
        // borrow; readers never read bytes the heap writes (module invariant).
        unsafe { std::slice::from_raw_parts_mut(p, len) }
    }
    fn copy(&mut self, from: u64, to: u64, len: usize) {
        self.region.copy(from, to, len)
    }
    fn grow(&mut self, new_len: u64) -> Result<()> {
        if new_len <= self.len {
            return Ok(());
        }
        let extra = (new_len - self.len) as libc::off_t;
        // SAFETY: plain syscall on a valid fd.
        let rc = unsafe { libc::posix_fallocate(self.file.as_raw_fd(), self.len as libc::off_t, extra) };
        match rc {
            0 => {}
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => {
                return Err(Error::DiskFull { wanted_bytes: new_len });
            }
            libc::EOPNOTSUPP | libc::EINVAL => {
                // The file system cannot reserve: write zeros so the blocks exist before mapping.
                write_zeros(&self.file, self.len, new_len).map_err(|e| match e.raw_os_error() {
                    Some(libc::ENOSPC) | Some(libc::EDQUOT) => Error::DiskFull { wanted_bytes: new_len },
                    _ => Error::Io(e),
                })?;
            }
            errno => return Err(Error::Io(std::io::Error::from_raw_os_error(errno))),
        }
        self.len = new_len;
        self.remap()
    }
    fn truncate(&mut self, new_len: u64) -> Result<()> {
        if new_len >= self.len {
            return Ok(());
        }
        self.map = None;
        self.region = Arc::new(Region::empty());
        self.file.set_len(new_len)?;
        self.len = new_len;
        self.remap()
    }
    fn flush(&mut self, offset: u64, len: u64) -> Result<()> {
        if let Some(fm) = &self.map {
            fm.map.flush_range(offset as usize, len as usize)?;
        }
        Ok(())
    }
    fn sync_len(&mut self) -> Result<()> {
        self.file.sync_all()?;
        Ok(())
    }
    fn flusher(&self) -> Arc<dyn Flusher> {
        Arc::new(FileFlusher { map: self.map.clone(), region: self.region.clone(), file: self.file.clone() })
    }
    fn discard(&mut self, offset: u64, len: u64) {
        // The pages are free: no reader reads them and the heap does not write them before
        // handing them out again (when they are read back from the file).
        self.release_memory(offset, len, false);
    }
    fn page_out(&mut self, offset: u64, len: u64) {
        // The pages are durable and clean (the caller's promise), so reclaiming them loses
        // nothing: readers on other threads fault them back in from the file.
        self.release_memory(offset, len, true);
    }
    fn set_random_access(&mut self, on: bool) {
        if self.random != on {
            self.random = on;
            self.advise_access();
        }
    }
    fn pages_out(&self) -> bool {
        true
    }
}

/// `FileStorage`'s background flusher: the mapping of when it was made (every mapping of the
/// file shares its pages, so flushing through an older one flushes the same file pages).
struct FileFlusher {
    map: Option<Arc<FileMap>>,
    region: Arc<Region>,
    file: Arc<File>,
}

impl Flusher for FileFlusher {
    fn flush(&self, offset: u64, len: u64) -> Result<()> {
        if let Some(fm) = &self.map {
            fm.map.flush_range(offset as usize, len as usize)?;
        }
        Ok(())
    }
    fn sync_len(&self) -> Result<()> {
        self.file.sync_all()?;
        Ok(())
    }
    fn write(&self, offset: u64, bytes: &[u8]) {
        let p = self.region.write_ptr(offset, bytes.len());
        // SAFETY: in bounds; these bytes (a meta page) are written by no one else and read by no
        // reader (module invariant).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) }
    }
}

fn write_zeros(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; 1 << 20];
    let mut at = from;
    while at < to {
        let n = ((to - at) as usize).min(zeros.len());
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Fsyncs a directory so a rename or a new file in it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Sector size the simulated disk tears at.
pub const SIM_SECTOR_BYTES: usize = 512;

/// Shared state of a simulated disk: what survives a crash, and the faults to inject.
#[derive(Default, Debug)]
struct SimDiskState {
    durable: Vec<u8>,
    /// The live image of the last storage dropped without being flushed completely.
    last_live: Option<Vec<u8>>,
    /// Remaining bytes the disk may still grow by; `None` = unlimited.
    space_left: Option<u64>,
    /// Fail every flush from now on.
    fail_flush: bool,
    /// Let this many more flushes succeed, then fail every later one (a crash mid-checkpoint).
    flushes_left: Option<u64>,
    flushes: u64,
}

/// A simulated disk shared between the test and the `SimStorage` a heap runs on.
#[derive(Clone, Default, Debug)]
pub struct SimDisk {
    state: Arc<Mutex<SimDiskState>>,
}

impl SimDisk {
    /// An empty disk.
    pub fn new() -> Self {
        Self::default()
    }
    /// A storage over this disk whose live image starts as the durable image.
    pub fn storage(&self) -> SimStorage {
        let live = self.lock().durable.clone();
        SimStorage::with_image(live, self.clone())
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, SimDiskState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// The durable image.
    pub fn durable(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }
    /// Replaces the durable image (e.g. to inject corruption).
    pub fn set_durable(&self, bytes: Vec<u8>) {
        self.lock().durable = bytes;
    }
    /// Limits how many more bytes the disk can grow by.
    pub fn set_space_left(&self, bytes: Option<u64>) {
        self.lock().space_left = bytes;
    }
    /// Makes every later flush fail (an fsync error).
    pub fn set_fail_flush(&self, fail: bool) {
        self.lock().fail_flush = fail;
    }
    /// Lets `n` more flushes succeed; every later flush fails and persists nothing.
    pub fn fail_after_flushes(&self, n: Option<u64>) {
        self.lock().flushes_left = n;
    }
    /// Flushes performed so far.
    pub fn flushes(&self) -> u64 {
        self.lock().flushes
    }
    /// Simulates a power cut after the last storage was dropped: every page (of `page_bytes`)
    /// whose live bytes differ from the durable bytes comes back old, new, or torn, chosen by
    /// `seed`. Returns how many pages were left old, new and torn.
    pub fn crash(&self, seed: u64, page_bytes: usize) -> (u64, u64, u64) {
        let mut st = self.lock();
        let Some(live) = st.last_live.take() else {
            return (0, 0, 0);
        };
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut out = st.durable.clone();
        if out.len() < live.len() {
            out.resize(live.len(), 0);
        }
        let (mut old, mut new, mut torn) = (0, 0, 0);
        for (i, chunk) in live.chunks(page_bytes).enumerate() {
            let at = i * page_bytes;
            if out[at..at + chunk.len()] == *chunk {
                continue;
            }
            match rng.u8(0..3) {
                0 => old += 1,
                1 => {
                    out[at..at + chunk.len()].copy_from_slice(chunk);
                    new += 1;
                }
                _ => {
                    for (s, sector) in chunk.chunks(SIM_SECTOR_BYTES).enumerate() {
                        if rng.bool() {
                            let o = at + s * SIM_SECTOR_BYTES;
                            out[o..o + sector.len()].copy_from_slice(sector);
                        }
                    }
                    torn += 1;
                }
            }
        }
        st.durable = out;
        (old, new, torn)
    }
}

/// A heap-allocated image that stays allocated while any `Region` of it lives.
struct SimBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: owned memory; access follows the module invariant.
unsafe impl Send for SimBuf {}
// SAFETY: as above.
unsafe impl Sync for SimBuf {}

impl SimBuf {
    fn new(bytes: Vec<u8>) -> Arc<SimBuf> {
        let b = bytes.into_boxed_slice();
        let len = b.len();
        Arc::new(SimBuf { ptr: Box::into_raw(b).cast::<u8>(), len })
    }
}

impl Drop for SimBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` came from `Box::into_raw` of a boxed slice of exactly `len` bytes.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, self.len)) });
    }
}

/// Storage over a `SimDisk`: writes go to a private live image until flushed.
pub struct SimStorage {
    /// The live image (the same as `shared.live`, kept here for the owner's writes).
    live: Arc<Region>,
    shared: Arc<SimShared>,
    disk: SimDisk,
}

/// What a `SimStorage` shares with its background flushers: the current live image. Replacing
/// it (a grow) and a flusher's meta write or flush hold the lock, so neither sees the other
/// half done.
struct SimShared {
    live: Mutex<Arc<Region>>,
}

fn image_of(r: &Region) -> Vec<u8> {
    r.bytes(0, r.len).map(<[u8]>::to_vec).unwrap_or_default()
}

fn sim_region(bytes: Vec<u8>) -> Arc<Region> {
    let buf = SimBuf::new(bytes);
    Arc::new(Region { ptr: buf.ptr, len: buf.len, _owner: Some(buf) })
}

impl SimStorage {
    fn with_image(bytes: Vec<u8>, disk: SimDisk) -> SimStorage {
        let live = sim_region(bytes);
        let shared = Arc::new(SimShared { live: Mutex::new(live.clone()) });
        SimStorage { live, shared, disk }
    }

    /// Replaces the live image with a copy resized to `len` (readers keep the old one).
    fn resize(&mut self, len: usize) {
        let mut cur = self.shared.live.lock().unwrap_or_else(|e| e.into_inner());
        let mut img = image_of(&cur);
        img.resize(len, 0);
        *cur = sim_region(img);
        self.live = cur.clone();
    }
}

impl Drop for SimStorage {
    fn drop(&mut self) {
        let img = image_of(&self.shared.live.lock().unwrap_or_else(|e| e.into_inner()));
        self.disk.lock().last_live = Some(img);
    }
}

/// Copies `len` live bytes at `offset` to the durable image, failing as the disk is told to.
fn sim_flush(disk: &SimDisk, live: &Region, offset: u64, len: u64) -> Result<()> {
    let mut st = disk.lock();
    if st.flushes_left == Some(0) {
        st.fail_flush = true;
    }
    if st.fail_flush {
        return Err(Error::Io(std::io::Error::other("injected fsync failure")));
    }
    if let Some(n) = st.flushes_left.as_mut() {
        *n -= 1;
    }
    st.flushes += 1;
    let end = (offset + len) as usize;
    if st.durable.len() < end {
        st.durable.resize(end, 0);
    }
    let bytes = live.bytes(offset, len as usize).expect("flush within the image");
    st.durable[offset as usize..end].copy_from_slice(bytes);
    Ok(())
}

fn sim_sync_len(disk: &SimDisk, n: usize) -> Result<()> {
    let mut st = disk.lock();
    if st.fail_flush {
        return Err(Error::Io(std::io::Error::other("injected fsync failure")));
    }
    if st.durable.len() < n {
        st.durable.resize(n, 0);
    }
    Ok(())
}

/// `SimStorage`'s background flusher.
struct SimFlusher {
    shared: Arc<SimShared>,
    disk: SimDisk,
}

impl Flusher for SimFlusher {
    fn flush(&self, offset: u64, len: u64) -> Result<()> {
        let live = self.shared.live.lock().unwrap_or_else(|e| e.into_inner());
        sim_flush(&self.disk, &live, offset, len)
    }
    fn sync_len(&self) -> Result<()> {
        let n = self.shared.live.lock().unwrap_or_else(|e| e.into_inner()).len;
        sim_sync_len(&self.disk, n)
    }
    fn write(&self, offset: u64, bytes: &[u8]) {
        let live = self.shared.live.lock().unwrap_or_else(|e| e.into_inner());
        let p = live.write_ptr(offset, bytes.len());
        // SAFETY: in bounds; a meta page nobody else writes; the lock keeps the image current.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) }
    }
}

impl Storage for SimStorage {
    fn len(&self) -> u64 {
        self.live.len()
    }
    fn region(&self) -> Arc<Region> {
        self.live.clone()
    }
    fn bytes_mut(&mut self, offset: u64, len: usize) -> &mut [u8] {
        let p = self.live.write_ptr(offset, len);
        // SAFETY: as for `FileStorage::bytes_mut`.
        unsafe { std::slice::from_raw_parts_mut(p, len) }
    }
    fn copy(&mut self, from: u64, to: u64, len: usize) {
        self.live.copy(from, to, len)
    }
    fn grow(&mut self, new_len: u64) -> Result<()> {
        let cur = self.live.len();
        if new_len <= cur {
            return Ok(());
        }
        let mut st = self.disk.lock();
        if let Some(left) = st.space_left {
            if new_len - cur > left {
                return Err(Error::DiskFull { wanted_bytes: new_len });
            }
            st.space_left = Some(left - (new_len - cur));
        }
        drop(st);
        self.resize(new_len as usize);
        Ok(())
    }
    fn truncate(&mut self, new_len: u64) -> Result<()> {
        if new_len < self.live.len() {
            self.resize(new_len as usize);
            let mut st = self.disk.lock();
            st.durable.truncate(new_len as usize);
        }
        Ok(())
    }
    fn flush(&mut self, offset: u64, len: u64) -> Result<()> {
        sim_flush(&self.disk, &self.live, offset, len)
    }
    fn sync_len(&mut self) -> Result<()> {
        sim_sync_len(&self.disk, self.live.len)
    }
    fn flusher(&self) -> Arc<dyn Flusher> {
        Arc::new(SimFlusher { shared: self.shared.clone(), disk: self.disk.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_flush_and_crash_tears_only_unflushed_pages() {
        let disk = SimDisk::new();
        let mut s = disk.storage();
        s.grow(4 * 4096).unwrap();
        s.bytes_mut(0, 4096).fill(1);
        s.flush(0, 4096).unwrap();
        s.bytes_mut(4096, 4096).fill(2);
        drop(s);
        let (old, new, torn) = disk.crash(7, 4096);
        assert_eq!(old + new + torn, 1);
        let d = disk.durable();
        assert!(d[..4096].iter().all(|&b| b == 1), "flushed page survives intact");
    }

    #[test]
    fn sim_disk_full_and_fsync_failure() {
        let disk = SimDisk::new();
        disk.set_space_left(Some(8192));
        let mut s = disk.storage();
        s.grow(8192).unwrap();
        assert!(matches!(s.grow(8193), Err(Error::DiskFull { .. })));
        disk.set_fail_flush(true);
        assert!(matches!(s.flush(0, 10), Err(Error::Io(_))));
    }

    #[test]
    fn file_storage_grows_and_locks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut s = FileStorage::open(&path).unwrap();
        s.grow(3 * 4096).unwrap();
        s.bytes_mut(5, 1)[0] = 9;
        let before = s.region();
        s.grow(4 * 4096).unwrap();
        // A region taken before the grow still reads the same bytes.
        assert_eq!(before.bytes(5, 1), Some(&[9u8][..]));
        assert_eq!(before.bytes(3 * 4096, 1), None);
        s.flush(0, 4096).unwrap();
        assert!(matches!(FileStorage::open(&path), Err(Error::Locked(_))));
        drop(s);
        // A live region keeps the file (and its lock) open.
        assert!(matches!(FileStorage::open(&path), Err(Error::Locked(_))));
        drop(before);
        let s2 = FileStorage::open(&path).unwrap();
        assert_eq!(s2.len(), 4 * 4096);
        assert_eq!(s2.region().bytes(5, 1), Some(&[9u8][..]));
    }
}
