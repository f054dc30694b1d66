//! heapgrid-actors: the actor layer. It will own values, table/feed/queue/lock shard actors
//! (ractor), snippets and the supervisor tree, each shard actor owning one `heapgrid_heap::Heap`.
//!
//! Empty until the tables issue lands; it exists now so the workspace's dependency direction
//! (heapgrid → heapgrid-actors → heapgrid-heap) is fixed from the start.
//!
//! Invariant: depends on `heapgrid-heap`, never on the `heapgrid` crate.

pub use heapgrid_heap as heap;

pub mod error;
pub mod grid;
pub mod key;
pub mod restart;
pub mod shard;
pub mod snippet;
pub mod supervisor;
pub mod table;
pub mod value;

pub use error::GridError;
pub use key::Key;
pub use table::{
    EvalRequest, Expect, OpResult, TableError, TableOp, TableShard, Versioned, WriteOp, WriteResult,
};
pub use value::{PathSeg, Update, Value, ValueError};
