//! heapgrid: an actor-based in-memory data grid whose data lives in a persistent, memory-mapped
//! paged heap.
//!
//! This crate is the public face: today it re-exports the persistent heap (`heap`); the embedded
//! `Grid`, the network `Client`, the wire protocol and the server join it as the actor layer
//! lands (see ARCHITECTURE.md).
//!
//! Invariant: this crate depends on `heapgrid-actors` and `heapgrid-heap`, never the reverse.

pub use heapgrid_heap as heap;
