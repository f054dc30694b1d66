//! The file header (page 0) and the two alternating meta pages (pages 1 and 2).
//!
//! Page 0, written once when the file is created:
//!
//! ```text
//! offset size field
//!      0    4 crc32c of bytes 4..PAGE_SIZE
//!      4    1 kind = FileHeader (1)
//!      8    8 magic "HEAPGRD\0"
//!     16    4 format_version
//!     20    4 page_size
//!     24    8 heap_id: random at creation; pairs the file with its op log
//! ```
//!
//! Pages 1 and 2, the meta pages. Checkpoint epoch `e` is written to page `1 + e % 2`, so the
//! previous checkpoint's meta is never overwritten by the next one:
//!
//! ```text
//! offset size field
//!      0    4 crc32c of bytes 4..PAGE_SIZE
//!      4    1 kind = Meta (2)
//!      8    8 magic "HEAPGRD\0"
//!     16    4 format_version
//!     20    4 page_size
//!     24    8 heap_id (must equal the header's)
//!     32    8 epoch: checkpoint number, starts at 1
//!     40    8 root page of the B+tree (0 = empty tree)
//!     48    4 depth: levels of the B+tree (0 = empty)
//!     56    8 page_count: pages in use, including pages 0..=2 (the high-water mark)
//!     64    8 freelist_head: first free-list page (0 = none)
//!     72    8 freelist_count: page ids recorded in the free list
//!     80    8 entry_count: keys in the B+tree
//!     88    8 checkpoint_lsn: highest op-log LSN whose effects this checkpoint contains
//!     96    8 log_segment: first LSN of the op-log segment that must exist for this checkpoint
//!             (its records follow checkpoint_lsn); 0 = the heap keeps no op log, or the
//!             checkpoint predates the field
//! ```

use crate::error::{Error, Result, corrupt};
use crate::limits::{PAGE, PAGE_SIZE, TREE_DEPTH_MAX};
use crate::page::{self, PageKind, get_u32, get_u64, put_u32, put_u64};

pub(crate) const MAGIC: [u8; 8] = *b"HEAPGRD\0";
/// Bumped on any change to the byte layout; see docs/format.md's version log.
pub const FORMAT_VERSION: u32 = 1;

pub(crate) const HEADER_PAGE: u64 = 0;
/// First page that can hold data; pages below it are the header and the meta pages.
pub(crate) const FIRST_DATA_PAGE: u64 = 3;

const OFF_MAGIC: usize = 8;
const OFF_VERSION: usize = 16;
const OFF_PAGE_SIZE: usize = 20;
const OFF_HEAP_ID: usize = 24;
const OFF_EPOCH: usize = 32;
const OFF_ROOT: usize = 40;
const OFF_DEPTH: usize = 48;
const OFF_PAGE_COUNT: usize = 56;
const OFF_FREELIST_HEAD: usize = 64;
const OFF_FREELIST_COUNT: usize = 72;
const OFF_ENTRY_COUNT: usize = 80;
const OFF_CHECKPOINT_LSN: usize = 88;
const OFF_LOG_SEGMENT: usize = 96;

/// Contents of a meta page: the root of one durable checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    pub heap_id: u64,
    pub epoch: u64,
    pub root: u64,
    pub depth: u32,
    pub page_count: u64,
    pub freelist_head: u64,
    pub freelist_count: u64,
    pub entry_count: u64,
    pub checkpoint_lsn: u64,
    /// First LSN of the op-log segment this checkpoint's successors are logged in (0: none).
    pub log_segment: u64,
}

impl Meta {
    /// The meta page this epoch is written to.
    pub(crate) fn slot(epoch: u64) -> u64 {
        1 + epoch % 2
    }
}

fn write_common(p: &mut [u8], kind: PageKind, heap_id: u64) {
    p.fill(0);
    p[page::OFF_KIND] = kind as u8;
    p[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&MAGIC);
    put_u32(p, OFF_VERSION, FORMAT_VERSION);
    put_u32(p, OFF_PAGE_SIZE, PAGE_SIZE);
    put_u64(p, OFF_HEAP_ID, heap_id);
}

/// Fills `p` with a sealed file header.
pub(crate) fn write_header(p: &mut [u8], heap_id: u64) {
    write_common(p, PageKind::FileHeader, heap_id);
    page::seal(p);
}

fn check_common(page_id: u64, p: &[u8], want: PageKind) -> Result<u64> {
    if p.len() < PAGE || p[OFF_MAGIC..OFF_MAGIC + 8] != MAGIC {
        return Err(Error::Format("bad magic".into()));
    }
    // Magic present. Another format version or page size is `Format` whether or not our checksum
    // matches (another version may checksum differently); with ours, a bad checksum is damage.
    let version = get_u32(p, OFF_VERSION);
    let ps = get_u32(p, OFF_PAGE_SIZE);
    let kind = match page::verify(page_id, p) {
        Ok(kind) if version == FORMAT_VERSION && ps == PAGE_SIZE => kind,
        Err(e) if version == FORMAT_VERSION && ps == PAGE_SIZE => return Err(e),
        _ if version != FORMAT_VERSION => {
            return Err(Error::Format(format!(
                "format version {version}, this build reads {FORMAT_VERSION}"
            )));
        }
        _ => return Err(Error::Format(format!("page size {ps}, this build uses {PAGE_SIZE}"))),
    };
    if kind != want {
        return corrupt(page_id, "wrong page kind");
    }
    Ok(get_u64(p, OFF_HEAP_ID))
}

/// Validates the file header and returns the heap id.
pub(crate) fn read_header(p: &[u8]) -> Result<u64> {
    check_common(HEADER_PAGE, p, PageKind::FileHeader)
}

/// Fills `p` with a sealed meta page.
pub(crate) fn write_meta(p: &mut [u8], m: &Meta) {
    write_common(p, PageKind::Meta, m.heap_id);
    put_u64(p, OFF_EPOCH, m.epoch);
    put_u64(p, OFF_ROOT, m.root);
    put_u32(p, OFF_DEPTH, m.depth);
    put_u64(p, OFF_PAGE_COUNT, m.page_count);
    put_u64(p, OFF_FREELIST_HEAD, m.freelist_head);
    put_u64(p, OFF_FREELIST_COUNT, m.freelist_count);
    put_u64(p, OFF_ENTRY_COUNT, m.entry_count);
    put_u64(p, OFF_CHECKPOINT_LSN, m.checkpoint_lsn);
    put_u64(p, OFF_LOG_SEGMENT, m.log_segment);
    page::seal(p);
}

/// Decodes and validates one meta page. `file_pages` is the file's length in pages.
pub(crate) fn read_meta(page_id: u64, p: &[u8], heap_id: u64, file_pages: u64) -> Result<Meta> {
    let id = check_common(page_id, p, PageKind::Meta)?;
    let m = Meta {
        heap_id: id,
        epoch: get_u64(p, OFF_EPOCH),
        root: get_u64(p, OFF_ROOT),
        depth: get_u32(p, OFF_DEPTH),
        page_count: get_u64(p, OFF_PAGE_COUNT),
        freelist_head: get_u64(p, OFF_FREELIST_HEAD),
        freelist_count: get_u64(p, OFF_FREELIST_COUNT),
        entry_count: get_u64(p, OFF_ENTRY_COUNT),
        checkpoint_lsn: get_u64(p, OFF_CHECKPOINT_LSN),
        log_segment: get_u64(p, OFF_LOG_SEGMENT),
    };
    if m.heap_id != heap_id {
        return corrupt(page_id, "meta belongs to another heap");
    }
    if m.epoch == 0 || Meta::slot(m.epoch) != page_id {
        return corrupt(page_id, "epoch does not match meta slot");
    }
    if m.page_count < FIRST_DATA_PAGE || m.page_count > file_pages {
        return corrupt(page_id, "page count outside the file");
    }
    let in_range = |pg: u64| pg == 0 || (pg >= FIRST_DATA_PAGE && pg < m.page_count);
    if !in_range(m.root) || !in_range(m.freelist_head) {
        return corrupt(page_id, "root or free list outside the file");
    }
    if m.log_segment != 0 && m.log_segment > m.checkpoint_lsn.saturating_add(1) {
        return corrupt(page_id, "op-log segment named past the checkpoint");
    }
    if m.depth > TREE_DEPTH_MAX || (m.root == 0) != (m.depth == 0) {
        return corrupt(page_id, "tree depth inconsistent");
    }
    if m.freelist_count > m.page_count || (m.root == 0 && m.entry_count != 0) {
        return corrupt(page_id, "counts inconsistent");
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Meta {
        Meta {
            heap_id: 42,
            epoch: 5,
            root: 7,
            depth: 2,
            page_count: 10,
            freelist_head: 0,
            freelist_count: 0,
            entry_count: 99,
            checkpoint_lsn: 12,
            log_segment: 13,
        }
    }

    #[test]
    fn meta_roundtrip() {
        let mut p = vec![0u8; PAGE];
        let m = sample();
        write_meta(&mut p, &m);
        assert_eq!(read_meta(Meta::slot(5), &p, 42, 10).unwrap(), m);
    }

    #[test]
    fn meta_rejects_wrong_slot_heap_and_range() {
        let mut p = vec![0u8; PAGE];
        write_meta(&mut p, &sample());
        assert!(read_meta(1, &p, 42, 10).is_err(), "epoch 5 lives in slot 2");
        assert!(read_meta(2, &p, 43, 10).is_err(), "other heap");
        assert!(read_meta(2, &p, 42, 9).is_err(), "page count beyond the file");
    }

    #[test]
    fn header_roundtrip_and_foreign_file() {
        let mut p = vec![0u8; PAGE];
        write_header(&mut p, 77);
        assert_eq!(read_header(&p).unwrap(), 77);
        p[30] ^= 0xff;
        assert!(read_header(&p).unwrap_err().is_corruption());
        let junk = vec![0x41u8; PAGE];
        assert!(matches!(read_header(&junk), Err(Error::Format(_))));
    }
}
