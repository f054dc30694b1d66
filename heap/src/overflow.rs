//! Overflow chains: values too large to sit inline in a leaf.
//!
//! A value of `len` bytes occupies `ceil(len / OVERFLOW_DATA_BYTES)` pages linked through the
//! header's link field. Each page (kind Overflow):
//!
//! ```text
//! 12  u32 used_bytes: payload bytes in this page (OVERFLOW_DATA_BYTES except in the last page)
//! 16  u64 next page (0 in the last page)
//! 24  payload
//! ```
//!
//! Invariant: a chain is written once and never modified; replacing a value writes a new chain.
//! Invariant: walks are bounded by the page count implied by the length in the leaf cell.

use crate::error::{Result, corrupt};
use crate::limits::PAGE;
use crate::page::{HEADER_BYTES, OFF_KIND, OFF_LINK, OFF_USED, PageKind, get_u32, get_u64, put_u32, put_u64};
use crate::pager::Pager;
use crate::snapshot::Pages;

/// Payload bytes per overflow page.
pub(crate) const OVERFLOW_DATA_BYTES: usize = PAGE - HEADER_BYTES;

/// Pages a value of `len` bytes needs.
pub(crate) fn pages_for(len: usize) -> u64 {
    len.div_ceil(OVERFLOW_DATA_BYTES) as u64
}

/// Writes `data` into a new chain and returns its first page.
pub(crate) fn write(pager: &mut Pager, data: &[u8]) -> Result<u64> {
    debug_assert!(!data.is_empty());
    let n = pages_for(data.len()) as usize;
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(pager.alloc()?);
    }
    for (i, chunk) in data.chunks(OVERFLOW_DATA_BYTES).enumerate() {
        let next = ids.get(i + 1).copied().unwrap_or(0);
        let p = pager.page_mut(ids[i]);
        p[..HEADER_BYTES].fill(0);
        p[OFF_KIND] = PageKind::Overflow as u8;
        put_u32(p, OFF_USED, chunk.len() as u32);
        put_u64(p, OFF_LINK, next);
        p[HEADER_BYTES..HEADER_BYTES + chunk.len()].copy_from_slice(chunk);
        p[HEADER_BYTES + chunk.len()..].fill(0);
    }
    Ok(ids[0])
}

/// Visits the pages of a chain in order with their payloads, validating every link.
pub(crate) fn walk<'a, P: Pages + ?Sized>(
    pager: &'a P,
    first: u64,
    len: u32,
    mut visit: impl FnMut(u64, &'a [u8]) -> Result<()>,
) -> Result<()> {
    if len as u64 > crate::limits::VALUE_BYTES_MAX as u64 || len == 0 {
        return corrupt(first, "overflow value length out of range");
    }
    let n = pages_for(len as usize);
    let mut id = first;
    let mut left = len as usize;
    for i in 0..n {
        let p = pager.page(id)?;
        if p[OFF_KIND] != PageKind::Overflow as u8 {
            return corrupt(id, "expected an overflow page");
        }
        let used = get_u32(p, OFF_USED) as usize;
        let want = left.min(OVERFLOW_DATA_BYTES);
        if used != want {
            return corrupt(id, "overflow page length disagrees with the value length");
        }
        visit(id, &p[HEADER_BYTES..HEADER_BYTES + used])?;
        left -= used;
        let next = get_u64(p, OFF_LINK);
        if (i + 1 == n) != (next == 0) {
            return corrupt(id, "overflow chain length disagrees with the value length");
        }
        id = next;
    }
    Ok(())
}

/// Reads a whole chain.
pub(crate) fn read<P: Pages + ?Sized>(pager: &P, first: u64, len: u32) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(len as usize);
    walk(pager, first, len, |_, d| {
        out.extend_from_slice(d);
        Ok(())
    })?;
    Ok(out)
}

/// Releases every page of a chain.
pub(crate) fn release(pager: &mut Pager, first: u64, len: u32) -> Result<()> {
    let mut ids = Vec::with_capacity(pages_for(len as usize) as usize);
    walk(pager, first, len, |id, _| {
        ids.push(id);
        Ok(())
    })?;
    for id in ids {
        pager.release(id);
    }
    Ok(())
}
