//! heapgrid-heap: the bytes on disk. One `Heap` is one file of fixed-size checksummed pages,
//! memory-mapped, holding a copy-on-write B+tree of byte keys to byte values, made durable by
//! shadow-paging checkpoints (two alternating meta pages).
//!
//! This crate owns: the file format (see docs/format.md), the storage seam (`storage`), page
//! allocation, the B+tree, overflow chains, the free list, checkpoints, compaction, and the
//! integrity checker. It knows nothing of values, feeds, actors or async runtimes.
//!
//! Invariant: no tokio, no ractor, no knowledge of what keys and values mean.
//! Invariant: bytes read from disk are untrusted; a bad page is `Error::Corrupted`, never a panic.

mod batch;
mod btree;
mod check;
pub mod commit_queue;
mod error;
mod freelist;
pub mod group_commit;
mod heap;
pub mod io_stats;
pub mod limits;
mod meta;
mod node;
pub mod oplog;
mod overflow;
mod page;
mod pager;
mod shared;
mod shed;
pub mod snapshot;
pub mod storage;
pub mod sync;

pub use batch::{BatchOp, WriteBatch};
pub use error::{Error, Result};
pub use group_commit::GroupCommit;
pub use heap::{
    CheckpointJob, CompactProgress, CompactStats, Entry, Heap, HeapOptions, HeapStats, IntegrityReport,
    LOG_TAIL_BYTES_MAX_DEFAULT, Range, ShedReport,
};
pub use io_stats::{Histogram, IoStats};
pub use limits::PAGE_SIZE;
pub use meta::FORMAT_VERSION;
pub use oplog::{Durability, FsyncPolicy, ReplayProgress, ReplayReport};
pub use shared::SharedHeap;
pub use snapshot::{Published, Registry, Snapshot};
