//! The one place the heap takes its concurrency primitives from. Under `--cfg heapgrid_loom` they
//! are loom's, so `loom-tests/` can model-check the code that uses them; otherwise std's. (A global
//! `--cfg loom` would also switch tokio's internals and break its net and fs, hence our own cfg.)

#[cfg(not(heapgrid_loom))]
pub use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, atomic};

#[cfg(heapgrid_loom)]
pub use loom::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, atomic};
