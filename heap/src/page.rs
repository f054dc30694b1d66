//! The common page header and page checksums.
//!
//! Every page of a heap file starts with the same 24-byte header (all integers little-endian):
//!
//! ```text
//! offset size field
//!      0    4 crc32c of bytes 4..PAGE_SIZE (written at checkpoint)
//!      4    1 kind (PageKind)
//!      5    1 level: B+tree height of the node, 0 = leaf; 0 for other kinds
//!      6    2 count: cells in a node, ids in a free-list page
//!      8    2 cell_start: lowest byte of the cell area (node pages)
//!     10    2 frag_bytes: unused bytes inside the cell area (node pages)
//!     12    4 used_bytes: payload bytes (overflow pages)
//!     16    8 link: leftmost child (branch), next page (overflow, free list)
//!     24      body
//! ```

use crate::error::{Result, corrupt};
use crate::limits::PAGE;

pub(crate) const OFF_CRC: usize = 0;
pub(crate) const OFF_KIND: usize = 4;
pub(crate) const OFF_LEVEL: usize = 5;
pub(crate) const OFF_COUNT: usize = 6;
pub(crate) const OFF_CELL_START: usize = 8;
pub(crate) const OFF_FRAG: usize = 10;
pub(crate) const OFF_USED: usize = 12;
pub(crate) const OFF_LINK: usize = 16;
/// Size of the common header; the body starts here.
pub(crate) const HEADER_BYTES: usize = 24;

/// What a page holds. Zero is never a valid kind, so a zeroed page is detected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PageKind {
    FileHeader = 1,
    Meta = 2,
    Leaf = 3,
    Branch = 4,
    Overflow = 5,
    FreeList = 6,
}

impl PageKind {
    pub(crate) fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => PageKind::FileHeader,
            2 => PageKind::Meta,
            3 => PageKind::Leaf,
            4 => PageKind::Branch,
            5 => PageKind::Overflow,
            6 => PageKind::FreeList,
            _ => return None,
        })
    }
}

#[inline]
pub(crate) fn get_u16(p: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([p[off], p[off + 1]])
}
#[inline]
pub(crate) fn get_u32(p: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(p[off..off + 4].try_into().expect("4 bytes"))
}
#[inline]
pub(crate) fn get_u64(p: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(p[off..off + 8].try_into().expect("8 bytes"))
}
#[inline]
pub(crate) fn put_u16(p: &mut [u8], off: usize, v: u16) {
    p[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
#[inline]
pub(crate) fn put_u32(p: &mut [u8], off: usize, v: u32) {
    p[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
#[inline]
pub(crate) fn put_u64(p: &mut [u8], off: usize, v: u64) {
    p[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// The checksum a page should carry.
pub(crate) fn compute_crc(page: &[u8]) -> u32 {
    debug_assert_eq!(page.len(), PAGE);
    crc32c::crc32c(&page[4..])
}

/// Writes the page's checksum into its header.
pub(crate) fn seal(page: &mut [u8]) {
    let crc = compute_crc(page);
    put_u32(page, OFF_CRC, crc);
}

/// Checks the page's checksum and kind byte.
pub(crate) fn verify(page_id: u64, page: &[u8]) -> Result<PageKind> {
    let stored = get_u32(page, OFF_CRC);
    if stored != compute_crc(page) {
        return corrupt(page_id, "checksum mismatch");
    }
    match PageKind::from_u8(page[OFF_KIND]) {
        Some(k) => Ok(k),
        None => corrupt(page_id, "unknown page kind"),
    }
}

/// A growable bitset over page ids.
#[derive(Default, Clone, Debug)]
pub(crate) struct PageBits {
    words: Vec<u64>,
}

impl PageBits {
    pub(crate) fn get(&self, id: u64) -> bool {
        let w = (id / 64) as usize;
        w < self.words.len() && self.words[w] & (1 << (id % 64)) != 0
    }
    pub(crate) fn set(&mut self, id: u64) {
        let w = (id / 64) as usize;
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        self.words[w] |= 1 << (id % 64);
    }
    pub(crate) fn clear(&mut self, id: u64) {
        let w = (id / 64) as usize;
        if w < self.words.len() {
            self.words[w] &= !(1 << (id % 64));
        }
    }
    pub(crate) fn clear_all(&mut self) {
        self.words.clear();
    }
    /// Ids set, ascending.
    pub(crate) fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(w, &bits)| {
            let mut b = bits;
            std::iter::from_fn(move || {
                if b == 0 {
                    return None;
                }
                let t = b.trailing_zeros() as u64;
                b &= b - 1;
                Some(w as u64 * 64 + t)
            })
        })
    }
    pub(crate) fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }
}

/// Stretches of page ids (sorted first) as (first, count), each covering consecutive ids of
/// `ids` and the ids between them for which `gap` holds.
pub(crate) fn spans(mut ids: Vec<u64>, gap: impl Fn(u64) -> bool) -> Vec<(u64, u64)> {
    ids.sort_unstable();
    ids.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for id in ids {
        match out.last_mut() {
            Some((first, n)) if (*first + *n..id).all(&gap) => *n = id + 1 - *first,
            _ => out.push((id, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_verify_and_detect_flip() {
        let mut p = vec![0u8; PAGE];
        p[OFF_KIND] = PageKind::Leaf as u8;
        p[100] = 7;
        seal(&mut p);
        assert_eq!(verify(9, &p).unwrap(), PageKind::Leaf);
        p[4000] ^= 1;
        assert!(verify(9, &p).unwrap_err().is_corruption());
    }

    #[test]
    fn zero_page_is_not_valid() {
        let p = vec![0u8; PAGE];
        assert!(verify(3, &p).is_err());
    }

    #[test]
    fn spans_join_across_gaps_only() {
        let gap = |id: u64| (10..20).contains(&id);
        assert_eq!(spans(vec![3, 1, 2, 9, 20, 22], gap), vec![(1, 3), (9, 12), (22, 1)]);
        assert_eq!(spans(vec![], gap), vec![]);
        assert_eq!(spans(vec![5, 5], |_| false), vec![(5, 1)]);
    }

    #[test]
    fn bits_roundtrip() {
        let mut b = PageBits::default();
        for id in [0, 3, 64, 65, 1000] {
            b.set(id);
        }
        b.clear(3);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, 64, 65, 1000]);
        assert_eq!(b.count(), 4);
        assert!(b.get(1000) && !b.get(3) && !b.get(5000));
    }
}
