//! The integrity checker: walks every page the heap references and verifies it.
//!
//! Checks: checksums of every page that is sealed (not writable: not written since the last
//! capture or checkpoint); node kinds, levels and cell bounds; strictly ascending keys inside
//! nodes and within the separator bounds of their parents; overflow chain lengths; the entry
//! count; and that tree pages, overflow pages, the durable free list's pages, free, pending, held
//! and retired pages partition `FIRST_DATA_PAGE..page_count`
//! with no page reached twice. Every walk is bounded by the tree depth and the page count.

use crate::btree::{TreeRoot, node_at};
use crate::error::{Result, corrupt};
use crate::heap::IntegrityReport;
use crate::meta::FIRST_DATA_PAGE;
use crate::node::LeafValue;
use crate::overflow;
use crate::page::{self, PageBits};
use crate::pager::Pager;

struct Walk<'a> {
    pager: &'a Pager,
    seen: PageBits,
    report: IntegrityReport,
}

impl<'a> Walk<'a> {
    fn visit(&mut self, id: u64) -> Result<&'a [u8]> {
        let p = self.pager.page(id)?;
        if self.seen.get(id) {
            return corrupt(id, "page reachable twice");
        }
        self.seen.set(id);
        if !self.pager.writable.get(id) {
            page::verify(id, p)?;
        }
        Ok(p)
    }

    /// Checks the subtree at `id`, whose keys must lie in `[lo, hi)`.
    fn node(&mut self, id: u64, level: u32, lo: Option<&'a [u8]>, hi: Option<&'a [u8]>) -> Result<()> {
        self.visit(id)?;
        let n = node_at(self.pager, id, level)?;
        self.report.tree_pages += 1;
        let mut prev: Option<&[u8]> = None;
        for i in 0..n.count() {
            let k = n.key(i)?;
            if prev.is_some_and(|p| p >= k) {
                return corrupt(id, "keys out of order");
            }
            if lo.is_some_and(|l| k < l) || hi.is_some_and(|h| k >= h) {
                return corrupt(id, "key outside its parent's separators");
            }
            prev = Some(k);
        }
        if n.is_leaf() {
            self.report.leaf_pages += 1;
            self.report.leaf_used_bytes += n.used_bytes() as u64;
            for i in 0..n.count() {
                if let LeafValue::Overflow { first, len } = n.value(i)? {
                    if len == 0 {
                        return corrupt(id, "empty overflow value");
                    }
                    let mut pages = Vec::new();
                    overflow::walk(self.pager, first, len, |pg, _| {
                        pages.push(pg);
                        Ok(())
                    })?;
                    for pg in pages {
                        self.visit(pg)?;
                        self.report.overflow_pages += 1;
                    }
                }
            }
            self.report.entries += n.count() as u64;
            return Ok(());
        }
        for i in 0..=n.count() {
            let clo = if i == 0 { lo } else { Some(n.key(i - 1)?) };
            let chi = if i == n.count() { hi } else { Some(n.key(i)?) };
            self.node(n.child(i)?, level - 1, clo, chi)?;
        }
        Ok(())
    }
}

pub(crate) fn check(pager: &Pager, tree: &TreeRoot) -> Result<IntegrityReport> {
    let mut w = Walk { pager, seen: PageBits::default(), report: IntegrityReport::default() };
    if tree.root != 0 {
        w.node(tree.root, tree.depth - 1, None, None)?;
    }
    if w.report.entries != tree.len {
        return corrupt(tree.root, "entry count disagrees with the tree");
    }
    for &id in &pager.durable_freelist {
        w.visit(id)?;
        w.report.freelist_pages += 1;
    }
    let retired = pager.retired.iter().map(|(_, id)| id);
    for &id in pager.free.iter().chain(pager.pending.iter()).chain(pager.held.iter()).chain(retired) {
        if id < FIRST_DATA_PAGE || id >= pager.page_count {
            return corrupt(id, "free page outside the file");
        }
        if w.seen.get(id) {
            return corrupt(id, "page both free and in use");
        }
        w.seen.set(id);
    }
    w.report.free_pages = pager.free.len() as u64;
    w.report.pending_pages = (pager.pending.len() + pager.held.len() + pager.retired.len()) as u64;
    let accounted = w.seen.count();
    let expected = pager.page_count - FIRST_DATA_PAGE;
    if accounted != expected {
        return corrupt(
            pager.page_count,
            &format!("{accounted} pages accounted for, {expected} in the file (leak)"),
        );
    }
    Ok(w.report)
}
