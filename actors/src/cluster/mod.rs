//! The cluster's control plane, as pure state machines (shared CLUSTER.md, "Control plane"):
//! the cluster map (`map.rs`: members and, for every shard, its primary, replicas and epoch; the
//! state machine a Raft group will replicate) and the failure detector the Raft leader runs
//! (`detector.rs`: heartbeats, leases, failover decisions), and the node-to-node transport
//! (`transport.rs`: TCP with a cookie, an in-process network, a fault-injecting relay). Time is
//! an argument of the state machines. Not yet wired to openraft or the server (issue 15 is
//! open); the replication simulation (`replication/sim.rs`) drives the map and the detector.

pub mod detector;
pub mod map;
pub mod node;
pub mod raft;
pub mod raft_store;
pub mod transport;

#[cfg(test)]
mod tests;
