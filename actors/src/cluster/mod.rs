//! The cluster's control plane (shared CLUSTER.md, "Control plane"): the cluster map (`map.rs`:
//! members and, for every shard, its primary, replicas and epoch), kept by an openraft group
//! (`raft.rs`: `ControlNode`, RPCs over the transport; `raft_store.rs`: its log, vote and map
//! on disk), the client's requests about it (`ops.rs`), the failure detector the Raft leader
//! will run (`detector.rs`: heartbeats, leases, failover decisions), the node-to-node transport
//! (`transport.rs`: TCP with a cookie, an in-process network, a fault-injecting relay) and the
//! replication runtime of one shard (`node.rs`, with a stand-in controller). Time is an argument
//! of the state machines. Issue 15 is open: shards are not yet placed or replicated by the map,
//! and the detector does not run in the Raft leader yet.

pub mod data;
pub mod detector;
pub mod map;
pub mod ops;
pub mod raft;
pub mod raft_store;
pub mod transport;

#[cfg(test)]
mod tests;
