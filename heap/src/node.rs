//! B+tree node pages: slotted leaf and branch pages.
//!
//! After the common 24-byte page header (see `page`), a node holds a slot array growing up and a
//! cell area growing down from the end of the page:
//!
//! ```text
//! 24 + 2*i   u16 offset of cell i (cells are in key order through the slots)
//! cell_start .. PAGE_SIZE   cells, in any physical order, with `frag_bytes` of holes
//! ```
//!
//! Leaf cell (level 0):
//!
//! ```text
//! 0  u16 key_len
//! 2  u32 value word: bit 31 = value in an overflow chain, bits 0..31 = value length
//! 6  key bytes
//! .. inline value bytes, or u64 first overflow page
//! ```
//!
//! Branch cell (level >= 1): child `i + 1` holds the keys `>= key i`; the link field of the page
//! header holds child 0.
//!
//! ```text
//! 0  u16 key_len
//! 2  u64 child page
//! 10 key bytes
//! ```
//!
//! Invariant: a cell plus its slot never exceeds `CELL_BYTES_MAX`, a quarter of the body, so any
//! node with one extra cell can be split into two nodes that each fit.
//! Invariant: keys in a node are strictly ascending through the slot array.

use std::cmp::Ordering;

use crate::error::{Result, corrupt};
use crate::limits::{KEY_BYTES_MAX, PAGE};
use crate::page::{
    HEADER_BYTES, OFF_CELL_START, OFF_COUNT, OFF_FRAG, OFF_KIND, OFF_LEVEL, OFF_LINK, PageKind, get_u16,
    get_u32, get_u64, put_u16, put_u64,
};

pub(crate) const SLOT_BYTES: usize = 2;
/// Bytes available for slots and cells.
pub(crate) const BODY_BYTES: usize = PAGE - HEADER_BYTES;
/// Largest cell including its slot.
pub(crate) const CELL_BYTES_MAX: usize = BODY_BYTES / 4;
pub(crate) const LEAF_CELL_HEADER: usize = 6;
pub(crate) const BRANCH_CELL_HEADER: usize = 10;
pub(crate) const OVERFLOW_FLAG: u32 = 1 << 31;
/// Most cells a node can hold (every cell is at least a header and a slot).
const COUNT_MAX: usize = BODY_BYTES / (LEAF_CELL_HEADER + SLOT_BYTES);

/// A leaf's value: inline bytes or the head of an overflow chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LeafValue<'a> {
    Inline(&'a [u8]),
    Overflow { first: u64, len: u32 },
}

/// Whether a value of `vlen` bytes is stored inline with a key of `klen` bytes.
pub(crate) fn value_inline(klen: usize, vlen: usize) -> bool {
    LEAF_CELL_HEADER + klen + vlen + SLOT_BYTES <= CELL_BYTES_MAX
}

/// Appends a leaf cell to `out`.
pub(crate) fn encode_leaf_cell(out: &mut Vec<u8>, key: &[u8], value: LeafValue<'_>) {
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    match value {
        LeafValue::Inline(v) => {
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(key);
            out.extend_from_slice(v);
        }
        LeafValue::Overflow { first, len } => {
            out.extend_from_slice(&(len | OVERFLOW_FLAG).to_le_bytes());
            out.extend_from_slice(key);
            out.extend_from_slice(&first.to_le_bytes());
        }
    }
}

/// Appends a branch cell to `out`.
pub(crate) fn encode_branch_cell(out: &mut Vec<u8>, key: &[u8], child: u64) {
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(&child.to_le_bytes());
    out.extend_from_slice(key);
}

/// A validated read-only view of a node page.
#[derive(Clone, Copy)]
pub(crate) struct Node<'a> {
    pub(crate) id: u64,
    p: &'a [u8],
    count: usize,
    leaf: bool,
    level: u8,
}

impl<'a> Node<'a> {
    /// Checks the header of a node page; cells are checked as they are read.
    pub(crate) fn parse(id: u64, p: &'a [u8]) -> Result<Self> {
        let leaf = match PageKind::from_u8(p[OFF_KIND]) {
            Some(PageKind::Leaf) => true,
            Some(PageKind::Branch) => false,
            _ => return corrupt(id, "expected a B+tree node"),
        };
        let level = p[OFF_LEVEL];
        if leaf != (level == 0) {
            return corrupt(id, "node kind and level disagree");
        }
        let count = get_u16(p, OFF_COUNT) as usize;
        let cell_start = get_u16(p, OFF_CELL_START) as usize;
        let frag = get_u16(p, OFF_FRAG) as usize;
        if count > COUNT_MAX
            || HEADER_BYTES + count * SLOT_BYTES > cell_start
            || cell_start > PAGE
            || frag > PAGE - cell_start
        {
            return corrupt(id, "node header out of range");
        }
        Ok(Node { id, p, count, leaf, level })
    }

    pub(crate) fn count(&self) -> usize {
        self.count
    }
    pub(crate) fn is_leaf(&self) -> bool {
        self.leaf
    }
    pub(crate) fn level(&self) -> u8 {
        self.level
    }

    fn cell_off(&self, i: usize) -> Result<usize> {
        debug_assert!(i < self.count);
        let off = get_u16(self.p, HEADER_BYTES + i * SLOT_BYTES) as usize;
        let hdr = if self.leaf { LEAF_CELL_HEADER } else { BRANCH_CELL_HEADER };
        if off < HEADER_BYTES + self.count * SLOT_BYTES || off + hdr > PAGE {
            return corrupt(self.id, "cell offset out of range");
        }
        Ok(off)
    }

    /// Cell `i` as raw bytes (for moving between pages).
    pub(crate) fn cell(&self, i: usize) -> Result<&'a [u8]> {
        let off = self.cell_off(i)?;
        let klen = get_u16(self.p, off) as usize;
        let len = if self.leaf {
            let w = get_u32(self.p, off + 2);
            let body = if w & OVERFLOW_FLAG != 0 { 8 } else { w as usize };
            LEAF_CELL_HEADER + klen + body
        } else {
            BRANCH_CELL_HEADER + klen
        };
        if klen > KEY_BYTES_MAX as usize || off + len > PAGE {
            return corrupt(self.id, "cell extends past the page");
        }
        Ok(&self.p[off..off + len])
    }

    pub(crate) fn key(&self, i: usize) -> Result<&'a [u8]> {
        let c = self.cell(i)?;
        let klen = get_u16(c, 0) as usize;
        let h = if self.leaf { LEAF_CELL_HEADER } else { BRANCH_CELL_HEADER };
        Ok(&c[h..h + klen])
    }

    pub(crate) fn value(&self, i: usize) -> Result<LeafValue<'a>> {
        debug_assert!(self.leaf);
        let c = self.cell(i)?;
        Ok(leaf_cell_value(c))
    }

    /// Child `i`, for `i` in `0..=count`.
    pub(crate) fn child(&self, i: usize) -> Result<u64> {
        debug_assert!(!self.leaf && i <= self.count);
        if i == 0 { Ok(get_u64(self.p, OFF_LINK)) } else { Ok(get_u64(self.cell(i - 1)?, 2)) }
    }

    /// Leaf search: `Ok(i)` if key `i` equals `key`, else `Err(insertion point)`.
    pub(crate) fn search(&self, key: &[u8]) -> Result<std::result::Result<usize, usize>> {
        let (mut lo, mut hi) = (0, self.count);
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.key(mid)?.cmp(key) {
                Ordering::Less => lo = mid + 1,
                Ordering::Greater => hi = mid,
                Ordering::Equal => return Ok(Ok(mid)),
            }
        }
        Ok(Err(lo))
    }

    /// Branch search: the child that may hold `key` (number of separators `<= key`).
    pub(crate) fn child_index(&self, key: &[u8]) -> Result<usize> {
        let (mut lo, mut hi) = (0, self.count);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.key(mid)? <= key { lo = mid + 1 } else { hi = mid }
        }
        Ok(lo)
    }

    /// Bytes used by slots and cells (excluding holes).
    pub(crate) fn used_bytes(&self) -> usize {
        BODY_BYTES.saturating_sub(free_space(self.p) + get_u16(self.p, OFF_FRAG) as usize)
    }
}

/// The value of a leaf cell whose bounds were already checked.
pub(crate) fn leaf_cell_value(c: &[u8]) -> LeafValue<'_> {
    let klen = get_u16(c, 0) as usize;
    let w = get_u32(c, 2);
    let at = LEAF_CELL_HEADER + klen;
    if w & OVERFLOW_FLAG != 0 {
        LeafValue::Overflow { first: get_u64(c, at), len: w & !OVERFLOW_FLAG }
    } else {
        LeafValue::Inline(&c[at..at + w as usize])
    }
}

/// Key of a leaf cell (bounds already checked).
pub(crate) fn leaf_cell_key(c: &[u8]) -> &[u8] {
    let klen = get_u16(c, 0) as usize;
    &c[LEAF_CELL_HEADER..LEAF_CELL_HEADER + klen]
}

/// Key and child of a branch cell (bounds already checked).
pub(crate) fn branch_cell_parts(c: &[u8]) -> (&[u8], u64) {
    let klen = get_u16(c, 0) as usize;
    (&c[BRANCH_CELL_HEADER..BRANCH_CELL_HEADER + klen], get_u64(c, 2))
}

/// Contiguous free bytes between the slot array and the cell area.
pub(crate) fn free_space(p: &[u8]) -> usize {
    let count = get_u16(p, OFF_COUNT) as usize;
    get_u16(p, OFF_CELL_START) as usize - HEADER_BYTES - count * SLOT_BYTES
}

/// Makes `p` an empty node.
pub(crate) fn init(p: &mut [u8], leaf: bool, level: u8, leftmost: u64) {
    debug_assert_eq!(leaf, level == 0);
    p[..HEADER_BYTES].fill(0);
    p[OFF_KIND] = if leaf { PageKind::Leaf as u8 } else { PageKind::Branch as u8 };
    p[OFF_LEVEL] = level;
    put_u16(p, OFF_CELL_START, PAGE as u16);
    put_u64(p, OFF_LINK, leftmost);
}

/// Replaces the contents of `p` with the given cells, in order.
pub(crate) fn build<'c>(
    p: &mut [u8],
    leaf: bool,
    level: u8,
    leftmost: u64,
    cells: impl IntoIterator<Item = &'c [u8]>,
) {
    init(p, leaf, level, leftmost);
    let mut end = PAGE;
    let mut n = 0;
    for c in cells {
        end -= c.len();
        p[end..end + c.len()].copy_from_slice(c);
        put_u16(p, HEADER_BYTES + n * SLOT_BYTES, end as u16);
        n += 1;
    }
    assert!(HEADER_BYTES + n * SLOT_BYTES <= end, "node overfilled by build");
    put_u16(p, OFF_COUNT, n as u16);
    put_u16(p, OFF_CELL_START, end as u16);
}

/// Inserts `cell` as cell `idx`. Returns false, leaving the page unchanged, if it does not fit.
pub(crate) fn insert_cell(p: &mut [u8], idx: usize, cell: &[u8]) -> bool {
    let count = get_u16(p, OFF_COUNT) as usize;
    debug_assert!(idx <= count);
    let need = cell.len() + SLOT_BYTES;
    let frag = get_u16(p, OFF_FRAG) as usize;
    if need > free_space(p) + frag {
        return false;
    }
    if need > free_space(p) {
        defragment(p);
    }
    let start = get_u16(p, OFF_CELL_START) as usize - cell.len();
    p[start..start + cell.len()].copy_from_slice(cell);
    let s = HEADER_BYTES + idx * SLOT_BYTES;
    p.copy_within(s..HEADER_BYTES + count * SLOT_BYTES, s + SLOT_BYTES);
    put_u16(p, s, start as u16);
    put_u16(p, OFF_COUNT, (count + 1) as u16);
    put_u16(p, OFF_CELL_START, start as u16);
    true
}

/// Removes cell `idx` (its bytes become a hole). `cell_len` is its length.
pub(crate) fn remove_cell(p: &mut [u8], idx: usize, cell_len: usize) {
    let count = get_u16(p, OFF_COUNT) as usize;
    debug_assert!(idx < count);
    let s = HEADER_BYTES + idx * SLOT_BYTES;
    let off = get_u16(p, s) as usize;
    p.copy_within(s + SLOT_BYTES..HEADER_BYTES + count * SLOT_BYTES, s);
    put_u16(p, OFF_COUNT, (count - 1) as u16);
    if off == get_u16(p, OFF_CELL_START) as usize {
        put_u16(p, OFF_CELL_START, (off + cell_len) as u16);
    } else {
        let frag = get_u16(p, OFF_FRAG) as usize + cell_len;
        put_u16(p, OFF_FRAG, frag as u16);
    }
}

/// Rewrites the value of leaf cell `idx` in place; the new cell must have the same length.
pub(crate) fn overwrite_cell(p: &mut [u8], idx: usize, cell: &[u8]) {
    let off = get_u16(p, HEADER_BYTES + idx * SLOT_BYTES) as usize;
    p[off..off + cell.len()].copy_from_slice(cell);
}

/// Sets child `i` of a branch page.
pub(crate) fn set_child(p: &mut [u8], i: usize, child: u64) {
    if i == 0 {
        put_u64(p, OFF_LINK, child);
    } else {
        let off = get_u16(p, HEADER_BYTES + (i - 1) * SLOT_BYTES) as usize;
        put_u64(p, off + 2, child);
    }
}

/// Compacts the cell area so all free space is contiguous.
fn defragment(p: &mut [u8]) {
    let mut copy = [0u8; PAGE];
    copy.copy_from_slice(p);
    let leaf = p[OFF_KIND] == PageKind::Leaf as u8;
    let node = Node::parse(0, &copy).expect("defragmenting a node we wrote");
    let cells = (0..node.count()).map(|i| node.cell(i).expect("cell of a node we wrote"));
    build(p, leaf, copy[OFF_LEVEL], get_u64(&copy, OFF_LINK), cells);
}

/// Where to split `sizes` (cell lengths in order, slots included) so each side fits in a node.
/// For a leaf the split is `left = ..m, right = m..`; for a branch cell `m` moves up, so
/// `left = ..m, right = m+1..`. `append` asks for a full left side (sequential inserts).
pub(crate) fn split_point(sizes: &[usize], branch: bool, append: bool) -> usize {
    assert!(sizes.len() >= 2 + branch as usize, "splitting a node with too few cells");
    try_split_point(sizes, branch, append).expect("a node with one extra cell always has a valid split")
}

/// As `split_point`, or `None` when no split fits both sides in a node (cells of two nodes
/// and more: `btree::shift_to_sibling` tries one, and splits instead when none fits).
pub(crate) fn try_split_point(sizes: &[usize], branch: bool, append: bool) -> Option<usize> {
    let n = sizes.len();
    if n < 2 + branch as usize {
        return None;
    }
    let total: usize = sizes.iter().sum();
    let fits = |m: usize| {
        let left: usize = sizes[..m].iter().sum();
        let right = total - left - if branch { sizes[m] } else { 0 };
        left <= BODY_BYTES && right <= BODY_BYTES && m >= 1 && m + (branch as usize) < n
    };
    if append {
        let m = n - 1 - branch as usize;
        if fits(m) {
            return Some(m);
        }
    }
    // The most even split that fits; the cell-size limit guarantees one exists.
    let mut best = None;
    let mut left = 0;
    for m in 1..n - branch as usize {
        left += sizes[m - 1];
        if fits(m) {
            let right = total - left;
            let skew = left.abs_diff(right);
            if best.is_none_or(|(_, s)| skew < s) {
                best = Some((m, skew));
            }
        }
    }
    best.map(|(m, _)| m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf_with(keys: &[&[u8]]) -> Vec<u8> {
        let mut p = vec![0u8; PAGE];
        init(&mut p, true, 0, 0);
        for (i, k) in keys.iter().enumerate() {
            let mut c = Vec::new();
            encode_leaf_cell(&mut c, k, LeafValue::Inline(b"v"));
            assert!(insert_cell(&mut p, i, &c));
        }
        p
    }

    #[test]
    fn insert_search_remove() {
        let mut p = leaf_with(&[b"a", b"c", b"e"]);
        let n = Node::parse(5, &p).unwrap();
        assert_eq!(n.search(b"c").unwrap(), Ok(1));
        assert_eq!(n.search(b"d").unwrap(), Err(2));
        let len = n.cell(1).unwrap().len();
        remove_cell(&mut p, 1, len);
        let n = Node::parse(5, &p).unwrap();
        assert_eq!(n.count(), 2);
        assert_eq!(n.key(1).unwrap(), b"e");
        assert_eq!(n.value(0).unwrap(), LeafValue::Inline(b"v"));
    }

    #[test]
    fn fills_then_defragments() {
        let mut p = vec![0u8; PAGE];
        init(&mut p, true, 0, 0);
        let mut c = Vec::new();
        encode_leaf_cell(&mut c, &[1; 100], LeafValue::Inline(&[2; 100]));
        let mut n = 0;
        while insert_cell(&mut p, n, &c) {
            n += 1;
        }
        assert_eq!(n, BODY_BYTES / (c.len() + SLOT_BYTES));
        // Punch holes, then an insert must defragment to fit.
        remove_cell(&mut p, 3, c.len());
        remove_cell(&mut p, 5, c.len());
        assert!(free_space(&p) < c.len() + SLOT_BYTES);
        assert!(insert_cell(&mut p, 0, &c));
        assert_eq!(Node::parse(1, &p).unwrap().count(), n - 1);
    }

    #[test]
    fn corrupt_offsets_are_errors() {
        let mut p = leaf_with(&[b"a"]);
        put_u16(&mut p, HEADER_BYTES, 4095);
        assert!(Node::parse(1, &p).unwrap().key(0).is_err());
        put_u16(&mut p, OFF_COUNT, 5000);
        assert!(Node::parse(1, &p).is_err());
    }

    #[test]
    fn split_point_balances_and_appends() {
        let sizes = vec![100; 41];
        let m = split_point(&sizes, false, false);
        assert!((20..=21).contains(&m));
        assert_eq!(split_point(&sizes, false, true), 40);
        let big = vec![CELL_BYTES_MAX; 5];
        let m = split_point(&big, true, false);
        assert!((1..4).contains(&m));
    }

    #[test]
    fn branch_children() {
        let mut p = vec![0u8; PAGE];
        init(&mut p, false, 1, 10);
        let mut c = Vec::new();
        encode_branch_cell(&mut c, b"m", 11);
        assert!(insert_cell(&mut p, 0, &c));
        let n = Node::parse(2, &p).unwrap();
        assert_eq!((n.child(0).unwrap(), n.child(1).unwrap()), (10, 11));
        assert_eq!(n.child_index(b"a").unwrap(), 0);
        assert_eq!(n.child_index(b"m").unwrap(), 1);
        set_child(&mut p, 1, 12);
        assert_eq!(Node::parse(2, &p).unwrap().child(1).unwrap(), 12);
    }
}
