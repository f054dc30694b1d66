//! heapgrid: an actor-based data grid whose data lives in a persistent, memory-mapped paged heap.
//!
//! This crate is the public face: the embedded `Grid` and its `Table` handles (`grid`), the
//! network `Client` with the same handles (`client`), the wire protocol, the server and its auth,
//! the load generator, the value model re-exported from `heapgrid-actors`, and the persistent
//! heap (`heap`). See ARCHITECTURE.md.
//!
//! ```no_run
//! use heapgrid::{Grid, GridOptions, TableOptions, path};
//!
//! async fn example() -> heapgrid::Result<()> {
//!     let grid = Grid::open("./heapgrid-data", GridOptions::default()).await?;
//!     let users = grid.create_table("users", TableOptions { shards: 4, ..Default::default() }).await?;
//!     users.put("bob", &serde_json::json!({"name": "bob", "visits": 0})).await?;
//!     users.increment("bob", path!["visits"], 1).await?; // no read-modify-write round trip
//!     let bob: Option<serde_json::Value> = users.get("bob").await?;
//!     println!("{bob:?}");
//!     grid.close().await
//! }
//! ```
//!
//! Invariant: this crate depends on `heapgrid-actors` and `heapgrid-heap`, never the reverse.

pub mod auth;
pub mod client;
pub mod cluster_client;
pub mod feed;
pub mod grid;
pub mod loadgen;
pub mod loadgen_feed;
pub mod loadgen_lock;
pub mod loadgen_queue;
pub mod loadgen_repl;
pub mod lock;
pub mod metrics;
pub mod protocol;
pub mod queue;
pub mod resp;
pub mod server;

pub use client::{Client, ClientOptions, ReadFrom};
pub use cluster_client::ClusterClient;
pub use feed::{Feed, FeedBackend, Reader, Upgrades};
pub use grid::{CasOutcome, Grid, Result, Table, TableBackend};
pub use heapgrid_actors::feed::{CursorInfo, FeedRecord, Pos, ReadResult};
pub use heapgrid_actors::grid::{FeedInfo, FeedOptions, Retention};
pub use heapgrid_actors::grid::{FsyncSetting, GridOptions, TableInfo, TableOptions};
pub use heapgrid_actors::restart::RestartPolicy;
pub use heapgrid_actors::snippet::{Budget, LimitOverrides, Limits, SnippetErrorKind, SnippetFailure};
pub use heapgrid_actors::{
    Expect, GridError, Key, PathSeg, ScanRange, Update, Value, Versioned, WriteOp, WriteResult, Written,
};
pub use heapgrid_heap as heap;
pub use heapgrid_heap::FsyncPolicy;
pub use lock::{Fenced, Lock, LockBackend, LockGuard, Permits, Semaphore, Session};
pub use queue::{Consumer, Message, Pop, Push, Queue, QueueBackend};

/// The grid's error type.
pub type Error = GridError;
