//! heapgrid-loom-tests: loom models of the shared-memory concurrency in `heapgrid-heap`, and of
//! the lock service's fence table (`actors/src/lock/fence.rs`, included by path: it uses only
//! `heapgrid_heap::sync`).
//!
//! Built and run only with `RUSTFLAGS="--cfg heapgrid_loom"` (see scripts/test-all.sh), which
//! switches `heapgrid_heap::sync` to loom's primitives. Without that cfg this crate is empty and
//! its models do not exist; the test script fails if the loom run executed no model.
