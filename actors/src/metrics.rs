//! The node's own counters that the actor layer keeps (`GridCore::counters`): its heaps' disk
//! work (`IoStats`, handed to every heap it opens), and the supervisors' restarts and failures.
//! The snippet engine keeps its own (`snippet::engine::SnippetStats`), every shard's mailbox
//! depth is on its `ReadView`, and the wire's request counters live with the server
//! (`heapgrid::metrics`), which also renders all of them in Prometheus' text format. Nothing
//! here knows that format.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use heapgrid_heap::IoStats;

/// Counters of the whole node, shared by every supervisor and heap of one grid.
#[derive(Debug, Default)]
pub struct NodeCounters {
    pub io: Arc<IoStats>,
    /// Shards (of tables, feeds, the services) restarted after they failed: a crash, a heap
    /// that failed closed, a failed start retried.
    pub shard_restarts: AtomicU64,
    /// Times a shard was given up on (its restart limit was reached): it answers `ShardFailed`.
    pub shards_given_up: AtomicU64,
}

impl NodeCounters {
    pub fn restarted(&self) {
        self.shard_restarts.fetch_add(1, Relaxed);
    }

    pub fn gave_up(&self) {
        self.shards_given_up.fetch_add(1, Relaxed);
    }
}
