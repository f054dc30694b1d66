//! The storage seam: where the heap's bytes live and how they become durable.
//!
//! `Storage` is the flush boundary. `FileStorage` is the real thing: one file mapped with memmap2,
//! grown in extents whose blocks are reserved with `posix_fallocate` *before* they are mapped, so a
//! full disk is `Error::DiskFull` at grow time and never a SIGBUS on a later store. `SimStorage`
//! keeps a live image and a durable image; `flush` copies live to durable, and `SimDisk::crash`
//! produces what a power cut could leave: every page written since its last flush comes back old,
//! new, or torn at 512-byte sector granularity. It can also inject disk-full and fsync errors.
//!
//! Invariant: after `flush(off, len)` returns `Ok`, those bytes survive a crash.
//! Invariant: a failed `flush` leaves the durable state unknown; callers poison themselves.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use memmap2::{MmapMut, MmapOptions};

use crate::error::{Error, Result};

/// Where a heap's pages live. The heap reads and writes `bytes()`/`bytes_mut()` directly.
pub trait Storage: Send + Sync {
    /// Bytes currently reserved and mapped.
    fn len(&self) -> u64;
    /// True when nothing is mapped yet.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The whole mapped image.
    fn bytes(&self) -> &[u8];
    /// The whole mapped image, writable.
    fn bytes_mut(&mut self) -> &mut [u8];
    /// Reserves space up to `new_len` bytes and maps it. Never shrinks.
    fn grow(&mut self, new_len: u64) -> Result<()>;
    /// Shrinks the file to `new_len` bytes (compaction). Bytes past it are gone.
    fn truncate(&mut self, new_len: u64) -> Result<()>;
    /// Makes `len` bytes at `offset` durable (msync / fsync). Returns after they are on disk.
    fn flush(&mut self, offset: u64, len: u64) -> Result<()>;
    /// Makes the file's length durable (after a grow or truncate).
    fn sync_len(&mut self) -> Result<()>;
}

/// One heap file, memory-mapped.
pub struct FileStorage {
    file: File,
    map: Option<MmapMut>,
    len: u64,
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
        let mut s = FileStorage { file, map: None, len };
        s.remap()?;
        Ok(s)
    }

    fn remap(&mut self) -> Result<()> {
        self.map = None;
        if self.len > 0 {
            // SAFETY: the file is ours alone (exclusive flock) and its blocks are reserved, so the
            // mapping is never truncated under us and stores cannot fault for lack of space.
            let map = unsafe { MmapOptions::new().len(self.len as usize).map_mut(&self.file)? };
            self.map = Some(map);
        }
        Ok(())
    }
}

impl Storage for FileStorage {
    fn len(&self) -> u64 {
        self.len
    }
    fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.map.as_deref_mut().unwrap_or(&mut [])
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
        self.file.set_len(new_len)?;
        self.len = new_len;
        self.remap()
    }
    fn flush(&mut self, offset: u64, len: u64) -> Result<()> {
        if let Some(map) = &self.map {
            map.flush_range(offset as usize, len as usize)?;
        }
        Ok(())
    }
    fn sync_len(&mut self) -> Result<()> {
        self.file.sync_all()?;
        Ok(())
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
        SimStorage { live, disk: self.clone() }
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

/// Storage over a `SimDisk`: writes go to a private live image until flushed.
pub struct SimStorage {
    live: Vec<u8>,
    disk: SimDisk,
}

impl Drop for SimStorage {
    fn drop(&mut self) {
        self.disk.lock().last_live = Some(std::mem::take(&mut self.live));
    }
}

impl Storage for SimStorage {
    fn len(&self) -> u64 {
        self.live.len() as u64
    }
    fn bytes(&self) -> &[u8] {
        &self.live
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.live
    }
    fn grow(&mut self, new_len: u64) -> Result<()> {
        let cur = self.live.len() as u64;
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
        self.live.resize(new_len as usize, 0);
        Ok(())
    }
    fn truncate(&mut self, new_len: u64) -> Result<()> {
        if new_len < self.live.len() as u64 {
            self.live.truncate(new_len as usize);
            let mut st = self.disk.lock();
            st.durable.truncate(new_len as usize);
        }
        Ok(())
    }
    fn flush(&mut self, offset: u64, len: u64) -> Result<()> {
        let mut st = self.disk.lock();
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
        st.durable[offset as usize..end].copy_from_slice(&self.live[offset as usize..end]);
        Ok(())
    }
    fn sync_len(&mut self) -> Result<()> {
        let mut st = self.disk.lock();
        if st.fail_flush {
            return Err(Error::Io(std::io::Error::other("injected fsync failure")));
        }
        let n = self.live.len();
        if st.durable.len() < n {
            st.durable.resize(n, 0);
        }
        Ok(())
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
        s.bytes_mut()[..4096].fill(1);
        s.flush(0, 4096).unwrap();
        s.bytes_mut()[4096..8192].fill(2);
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
        s.bytes_mut()[5] = 9;
        s.flush(0, 4096).unwrap();
        assert!(matches!(FileStorage::open(&path), Err(Error::Locked(_))));
        drop(s);
        let s2 = FileStorage::open(&path).unwrap();
        assert_eq!(s2.len(), 3 * 4096);
        assert_eq!(s2.bytes()[5], 9);
    }
}
