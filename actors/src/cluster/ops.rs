//! The client's requests about the cluster and their answers (wire types; append-only).
//! Permissions (checked by the server): `read` on `cluster` to look, `admin` on `cluster` to
//! change.

use serde::{Deserialize, Serialize};

use super::map::Member;
use super::raft::ClusterStatus;
use crate::replication::NodeId;

/// The name permissions about the cluster are granted on.
pub const CLUSTER: &str = "cluster";

/// A request about the cluster. Append-only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ClusterOp {
    /// What the node asked knows: the Raft group and the map.
    Status,
    /// Makes a node a voter of the group and records it in the map (what `--join` does
    /// itself; for a node whose own join could not reach a seed).
    Add(Member),
    /// Takes a node out of the map and the group, placing its shards elsewhere first
    /// (`GridCore::cluster_remove`); refused when it serves the lock or queue service.
    Remove { node: NodeId },
    /// This node's copy of a replicated table's shard, summarised (equal copies have equal
    /// digests): for comparing replicas.
    Digest { table: String, shard: u32 },
    /// Makes `node` the primary of a shard (a planned move; `GridCore::cluster_move`). Sent to
    /// the Raft leader.
    Move { table: String, shard: u32, node: NodeId },
}

impl ClusterOp {
    /// Whether it changes the cluster (`admin`) or only looks (`read`).
    pub fn changes(&self) -> bool {
        !matches!(self, ClusterOp::Status | ClusterOp::Digest { .. })
    }
}

/// An answer. Append-only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ClusterResult {
    Status(ClusterStatus),
    /// The map changed; its version now.
    Changed {
        version: u64,
    },
    Digest(crate::replication::shard::ShardDigest),
}
