//! The cluster's control plane, as pure state machines (shared CLUSTER.md, "Control plane"):
//! the cluster map (`map.rs`: members and, for every shard, its primary, replicas and epoch; the
//! state machine a Raft group will replicate) and the failure detector the Raft leader runs
//! (`detector.rs`: heartbeats, leases, failover decisions). Time is an argument. Not yet wired
//! to openraft, a transport or the server (issue 15 is open); the replication simulation
//! (`replication/sim.rs`) drives both.

pub mod detector;
pub mod map;

#[cfg(test)]
mod tests;
