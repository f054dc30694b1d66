//! heapgrid's integration tests, linked into one binary: they run the real API (and, as the
//! server lands, the real binary) and crash real processes.

mod child;
mod cluster;
mod feeds;
mod feeds_server;
mod grid;
mod heap_kill9;
mod locks;
mod locks_server;
mod memory;
mod operability;
mod oplog_kill9;
mod oplog_loss;
mod pipeline;
mod queues;
mod queues_server;
mod recovery;
mod relay;
mod resp;
mod server;
mod snippet_sandbox;
mod snippets;
mod tidy;
