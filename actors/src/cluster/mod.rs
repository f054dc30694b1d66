//! The cluster (shared CLUSTER.md): the cluster map (`map.rs`: members, the replicated tables,
//! and for every shard its primary, replicas and epoch), kept by an openraft group (`raft.rs`:
//! `ControlNode`, RPCs over the transport; `raft_store.rs`: its log, vote and map on disk), the
//! client's requests about it (`ops.rs`), the failure detector the Raft leader runs
//! (`detector.rs`: leases, failover decisions, drained primaries), the node's data plane
//! (`data.rs`: frames to shard actors, the map's tables started here, the detector on the
//! leader, planned switches), table operations on other nodes' shards (`shard_rpc.rs`), every
//! node's mirror of the lock service's fences (`fences.rs`) and the
//! node-to-node transport (`transport.rs`: TCP with a cookie,
//! an in-process network, a fault-injecting relay). Time is an argument of the state machines.
//! A shard's own replication is `replication/shard.rs`, inside its actor.

pub mod data;
pub mod detector;
pub mod fences;
pub mod map;
pub mod ops;
pub mod raft;
pub mod raft_store;
pub mod shard_rpc;
pub mod transport;

#[cfg(test)]
mod tests;
