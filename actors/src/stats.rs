//! What a node reports about its memory and its heaps (`GridCore::stats`, the `Stats` request,
//! `heapgrid stats`; issue 16's accounting): the process's resident anonymous and file-backed
//! memory (from `/proc/self/status`), and for every shard of every collection on this node its
//! heap's figures, including how much of its mapping is resident (`mincore`).

use serde::{Deserialize, Serialize};

/// One shard's heap.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStats {
    pub shard: u32,
    pub entries: u64,
    /// B+tree depth.
    pub depth: u32,
    /// Pages in use, up to the high-water mark (header and meta pages included).
    pub pages: u64,
    /// Free pages, reusable now.
    pub free_pages: u64,
    /// Freed pages not reusable yet (pending the next checkpoint, or held by the durable one).
    pub held_pages: u64,
    pub file_bytes: u64,
    /// Bytes of the op log's segments.
    pub log_bytes: u64,
    /// Bytes of the heap file's mapping resident in memory now.
    pub resident_bytes: u64,
    /// Checkpoints of the heap since it was created (its meta epoch).
    pub checkpoints: u64,
    /// Op-log bytes since the last checkpoint began: what a crash now leaves to replay.
    pub log_tail_bytes: u64,
    /// Share of its pages in use (not free, not waiting to be freed), in percent.
    pub used_pages_percent: u32,
    /// When its last checkpoint since the shard opened finished (ms since the Unix epoch; 0:
    /// none yet).
    pub last_checkpoint_unix_ms: u64,
    /// Times its supervisor restarted it since the node started (a crash, a failed start).
    pub restarts: u64,
}

impl ShardStats {
    pub fn of(shard: u32, s: &heapgrid_heap::HeapStats) -> ShardStats {
        ShardStats {
            shard,
            entries: s.entries,
            depth: s.depth,
            pages: s.page_count,
            free_pages: s.free_pages,
            held_pages: s.pending_pages,
            file_bytes: s.file_bytes,
            log_bytes: s.log_bytes,
            resident_bytes: s.resident_bytes,
            checkpoints: s.epoch,
            log_tail_bytes: s.log_tail_bytes,
            used_pages_percent: (s.page_count.saturating_sub(s.free_pages + s.pending_pages) * 100)
                .checked_div(s.page_count)
                .unwrap_or(0) as u32,
            last_checkpoint_unix_ms: s.last_checkpoint_unix_ms,
            restarts: 0,
        }
    }
}

/// One collection on this node: a table, a feed, or a service (`$locks`, `$queues`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectionStats {
    pub name: String,
    /// `table`, `feed` or `service`.
    pub kind: String,
    /// The shards running here (a shard that is restarting or failed is left out).
    pub shards: Vec<ShardStats>,
}

/// The node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStats {
    /// Resident anonymous memory of the process (`RssAnon`): allocations, not the heaps' pages.
    pub rss_anon_bytes: u64,
    /// Resident file-backed memory of the process (`RssFile`): mostly the heaps' mapped pages.
    pub rss_file_bytes: u64,
    /// Sums over every shard below.
    pub entries: u64,
    pub heap_resident_bytes: u64,
    pub heap_file_bytes: u64,
    pub log_bytes: u64,
    pub collections: Vec<CollectionStats>,
    /// The memory budget and what its pager did (`None`: the node has no budget).
    #[serde(default)]
    pub memory_budget: Option<BudgetStats>,
    /// Shards still recovering (opening their heap, replaying their op log); their figures are
    /// missing from `collections` until they run.
    #[serde(default)]
    pub recovering: Vec<RecoveringShard>,
}

/// A shard recovering after a restart.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveringShard {
    /// The table or feed (`$locks`, `$queues` for the services).
    pub collection: String,
    pub shard: u32,
    /// Bytes of its op log replayed, of `total_bytes` to replay (both 0 before the replay).
    pub replayed_bytes: u64,
    pub total_bytes: u64,
}

/// A shard's state as its supervisor sees it, and its mailbox (`GridCore::shard_health`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardHealth {
    pub collection: String,
    pub shard: u32,
    /// `starting` (opening, recovering, or waiting to retry a failed start), `running`,
    /// `failed` (given up on: it answers `ShardFailed`) or `stopped`.
    pub state: String,
    /// Messages sent to its actor and not yet taken (table shards; 0 for the others).
    pub mailbox_depth: u64,
}

/// The memory budget's pager (`memory`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetStats {
    pub budget_bytes: u64,
    /// Resident anonymous memory plus the heaps' resident pages at the pager's last look.
    pub used_bytes: u64,
    /// Bytes of clean pages dropped since start.
    pub dropped_bytes: u64,
    /// Looks that found the node over its shedding threshold.
    pub shed_rounds: u64,
}

impl BudgetStats {
    pub fn of(p: &crate::memory::PagerStats) -> Option<BudgetStats> {
        use std::sync::atomic::Ordering::Relaxed;
        let budget_bytes = p.budget_bytes.load(Relaxed);
        (budget_bytes > 0).then(|| BudgetStats {
            budget_bytes,
            used_bytes: p.used_bytes.load(Relaxed),
            dropped_bytes: p.dropped_bytes.load(Relaxed),
            shed_rounds: p.shed_rounds.load(Relaxed),
        })
    }
}

impl NodeStats {
    /// The node's figures from its collections' (sums, and the process's memory).
    pub fn of(collections: Vec<CollectionStats>) -> NodeStats {
        let (rss_anon_bytes, rss_file_bytes) = process_memory();
        let shards = || collections.iter().flat_map(|c| c.shards.iter());
        NodeStats {
            rss_anon_bytes,
            rss_file_bytes,
            entries: shards().map(|s| s.entries).sum(),
            heap_resident_bytes: shards().map(|s| s.resident_bytes).sum(),
            heap_file_bytes: shards().map(|s| s.file_bytes).sum(),
            log_bytes: shards().map(|s| s.log_bytes).sum(),
            collections,
            memory_budget: None,
            recovering: Vec::new(),
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it): the times the
/// node reports (slow-log entries, feed segment times, queue delays).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// `(RssAnon, RssFile)` of this process in bytes (0 where `/proc` does not say).
pub fn process_memory() -> (u64, u64) {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return (0, 0) };
    parse_status(&status)
}

fn parse_status(status: &str) -> (u64, u64) {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("RssAnon:"), field("RssFile:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_memory_lines_are_read_in_bytes() {
        let s = "Name:\theapgrid\nVmRSS:\t  9000 kB\nRssAnon:\t    1200 kB\nRssFile:\t    7800 kB\nRssShmem:\t0 kB\n";
        assert_eq!(parse_status(s), (1200 * 1024, 7800 * 1024));
        assert_eq!(parse_status("nothing here"), (0, 0));
    }

    #[test]
    fn this_process_has_resident_anonymous_memory() {
        let (anon, _) = process_memory();
        assert!(anon > 0, "RssAnon of a running test process");
    }
}
