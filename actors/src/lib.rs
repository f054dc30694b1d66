//! heapgrid-actors: the actor layer. It owns the value model, the table shard actors (ractor),
//! each owning one `heapgrid_heap::Heap`, the supervisor tree, the catalogue and the snippet
//! engine, feeds (state machine, shard actor, supervisor), the lock service (sessions, locks,
//! semaphores, the fence table shards check fenced writes against), the queue service (state
//! machine, store, actor), and the cluster's foundations: replication of a shard's op log
//! (`replication`) and the control plane (`cluster`: map, failure detector, transport), not yet
//! wired into the shards or the server.
//!
//! Invariant: depends on `heapgrid-heap`, never on the `heapgrid` crate.

pub use heapgrid_heap as heap;

pub mod cluster;
pub mod error;
pub mod feed;
pub mod gate;
pub mod grid;
pub mod key;
pub mod limits;
pub mod lock;
pub mod memory;
pub mod metrics;
pub mod queue;
pub mod record;
pub mod replication;
pub mod restart;
pub mod snippet;
pub mod stats;
pub mod supervise;
pub mod table;
pub mod value;

pub use error::GridError;
pub use key::Key;
pub use table::runtime::EvalRequest;
pub use table::{Expect, ScanRange, TableError, TableShard, Versioned, WriteOp, WriteResult, Written};
pub use value::{PathSeg, Update, Value, ValueError};
