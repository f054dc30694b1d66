//! The on-disk free list written at each checkpoint: the ids of pages the checkpoint does not
//! reference, in a chain of pages (kind FreeList):
//!
//! ```text
//!  6  u16 count: ids in this page (at most FREELIST_IDS_PER_PAGE)
//! 16  u64 next free-list page (0 in the last page)
//! 24  count x u64 page ids
//! ```
//!
//! Invariant: the pages holding the list are themselves referenced by the checkpoint (they are
//! not in it), and become reusable only after the next checkpoint.

use std::collections::BTreeSet;

use crate::error::{Result, corrupt};
use crate::limits::PAGE;
use crate::meta::FIRST_DATA_PAGE;
use crate::page::{
    HEADER_BYTES, OFF_COUNT, OFF_KIND, OFF_LINK, PageKind, get_u16, get_u64, put_u16, put_u64,
};
use crate::pager::Pager;

/// Page ids one free-list page holds.
pub(crate) const FREELIST_IDS_PER_PAGE: usize = (PAGE - HEADER_BYTES) / 8;

/// Writes `ids` into the (fresh) pages `chain`, which must have room for them.
pub(crate) fn write(pager: &mut Pager, chain: &[u64], ids: &[u64]) {
    assert!(chain.len() * FREELIST_IDS_PER_PAGE >= ids.len(), "free list chain too short");
    let mut chunks = ids.chunks(FREELIST_IDS_PER_PAGE);
    for (i, &pg) in chain.iter().enumerate() {
        let chunk = chunks.next().unwrap_or(&[]);
        let next = chain.get(i + 1).copied().unwrap_or(0);
        let p = pager.page_mut(pg);
        p.fill(0);
        p[OFF_KIND] = PageKind::FreeList as u8;
        put_u16(p, OFF_COUNT, chunk.len() as u16);
        put_u64(p, OFF_LINK, next);
        for (j, id) in chunk.iter().enumerate() {
            put_u64(p, HEADER_BYTES + j * 8, *id);
        }
    }
}

/// Reads the free list of a checkpoint: returns (free ids, pages of the chain). `count` ids are
/// expected; every id must be a data page below `page_count` and appear once.
pub(crate) fn read(
    pager: &Pager,
    head: u64,
    count: u64,
    page_count: u64,
) -> Result<(BTreeSet<u64>, Vec<u64>)> {
    let mut free = BTreeSet::new();
    let mut chain = Vec::new();
    let mut id = head;
    // Bounded: a valid chain has at most one page per id plus slack pages; anything longer
    // than the file is a cycle.
    while id != 0 {
        if chain.len() as u64 > page_count {
            return corrupt(id, "free list chain longer than the file (cycle)");
        }
        let p = pager.page(id)?;
        if p[OFF_KIND] != PageKind::FreeList as u8 {
            return corrupt(id, "expected a free-list page");
        }
        let n = get_u16(p, OFF_COUNT) as usize;
        if n > FREELIST_IDS_PER_PAGE {
            return corrupt(id, "free-list page count out of range");
        }
        for j in 0..n {
            let f = get_u64(p, HEADER_BYTES + j * 8);
            if f < FIRST_DATA_PAGE || f >= page_count || !free.insert(f) {
                return corrupt(id, "free-list entry out of range or repeated");
            }
        }
        chain.push(id);
        id = get_u64(p, OFF_LINK);
    }
    if free.len() as u64 != count {
        return corrupt(head, "free list holds a different number of ids than the meta says");
    }
    if chain.iter().any(|c| free.contains(c)) {
        return corrupt(head, "free-list page lists itself as free");
    }
    Ok((free, chain))
}
