//! The cluster map: members and shard placements. Changed only by `apply`ing a `MapCmd`,
//! deterministically, so every copy of the map that applied the same commands in the same order
//! (the Raft log) is the same map; `version` counts the commands applied.
//!
//! The node-wide services, the lock service and the queue service, are placed like one-shard
//! tables under reserved names (`LOCKS_SERVICE`, `QUEUES_SERVICE`; no table name can start
//! with `$`): their primary is the one node that serves them in the cluster, so every client
//! sees one lock service and one set of queues. They are created with no replicas (on the
//! cluster's first member) and the Raft leader adds replicas as members join, up to
//! `SERVICE_REPLICAS`; their writes wait for their in-sync replicas (`replication::service`).
//!
//! Invariant: every placement's primary and replicas are members, all distinct; an epoch only
//! rises; a `Failover` names the epoch it replaces, so a stale or repeated decision changes
//! nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::replication::{Epoch, NodeId};

/// A shard of a collection: (collection, shard index).
pub type ShardId = (String, u32);

/// The map's name for the lock service (placed as a one-shard table with no replicas).
pub const LOCKS_SERVICE: &str = "$locks";
/// The map's name for the queue service.
pub const QUEUES_SERVICE: &str = "$queues";
/// The services the map places.
pub const SERVICES: [&str; 2] = [LOCKS_SERVICE, QUEUES_SERVICE];

/// The map's name for feed `name` is this prefix and the name (no table name holds a ':').
pub const FEED_PREFIX: &str = "feed:";

/// The map's name for feed `name` (placed as a one-shard table).
pub fn feed_map_name(name: &str) -> String {
    format!("{FEED_PREFIX}{name}")
}

/// The feed a map name is for, if it is a feed's.
pub fn feed_in_map(map_name: &str) -> Option<&str> {
    map_name.strip_prefix(FEED_PREFIX)
}

/// Replicas each service gets once there are members enough.
pub const SERVICE_REPLICAS: usize = 2;

/// Whether `name` in the map is a service rather than a table.
pub fn is_service(name: &str) -> bool {
    name.starts_with('$')
}

/// The placement that creates service `name` (its node: the lowest member id; replicas are
/// added afterwards).
pub fn service_spec() -> TableSpec {
    TableSpec { shards: 1, replicas: 0, sync: 0 }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    /// Where clients connect.
    pub addr: String,
    /// Where other nodes connect.
    pub peer_addr: String,
}

/// Where one shard lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub epoch: Epoch,
    pub primary: NodeId,
    pub replicas: Vec<NodeId>,
    /// The replicas that hold every write the primary completed (its proposals, committed
    /// here); only they may take over under `sync`.
    pub in_sync: Vec<NodeId>,
    /// Replicas a write waits for at least (`sync(n)`; 0: `async`).
    pub sync: u32,
    /// Moves on at every change of `in_sync`. A primary's proposal names the version its view
    /// came from and is refused once the set changed since (a compare-and-set, as Kafka's
    /// partition epoch): a proposal delayed, repeated or withdrawn can never land after the
    /// primary saw the set move on, so the primary knows which sets may still become the map's.
    pub in_sync_version: u64,
}

/// One change of the map (one Raft log entry).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MapCmd {
    Join(Member),
    /// Refused while the node holds a placement.
    Leave(NodeId),
    /// Places a shard (a new one, or a planned move: the epoch rises).
    Place {
        shard: ShardId,
        primary: NodeId,
        replicas: Vec<NodeId>,
        sync: u32,
    },
    /// The failure detector's decision: `primary` takes over `shard` from epoch `from_epoch`.
    Failover {
        shard: ShardId,
        from_epoch: Epoch,
        primary: NodeId,
    },
    /// The primary of `epoch` changes the shard's in-sync replicas from those of
    /// `in_sync_version` `based_on` (refused if the set changed since).
    SetInSync {
        shard: ShardId,
        epoch: Epoch,
        based_on: u64,
        in_sync: Vec<NodeId>,
    },
    /// A replicated table: its shards placed over the members (ids in order, shard `i`'s
    /// primary the `i`-th, its replicas the next ones round the ring), each waiting for `sync`
    /// replicas per write. Refused if the table exists or there are too few members.
    CreateTable {
        name: String,
        spec: TableSpec,
    },
    /// Removes a table and its placements.
    DropTable(String),
    /// A new replica for a shard, not in sync (a planned move's first step; the epoch stays).
    AddReplica {
        shard: ShardId,
        node: NodeId,
    },
    /// A replica leaves a shard (a planned move's last step: the old primary); refused if the
    /// in-sync set would fall below `sync`.
    RemoveReplica {
        shard: ShardId,
        node: NodeId,
    },
}

/// A replicated table as the map knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSpec {
    pub shards: u32,
    /// Replicas of each shard (besides its primary).
    pub replicas: u32,
    /// Replicas a write waits for (0: `async`).
    pub sync: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapError {
    NoSuchMember(NodeId),
    NoSuchShard(ShardId),
    TableExists(String),
    NoSuchTable(String),
    /// The member still holds placements.
    InUse(NodeId),
    /// A placement names a node twice, or `sync` exceeds its replicas.
    BadPlacement(String),
    /// The decision was about an epoch that has passed (or the new primary is not a replica).
    Stale {
        shard: ShardId,
        epoch: Epoch,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    pub version: u64,
    members: BTreeMap<NodeId, Member>,
    shards: BTreeMap<ShardId, Placement>,
    tables: BTreeMap<String, TableSpec>,
}

impl ClusterMap {
    pub fn member(&self, id: NodeId) -> Option<&Member> {
        self.members.get(&id)
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    pub fn placement(&self, shard: &ShardId) -> Option<&Placement> {
        self.shards.get(shard)
    }

    pub fn placements(&self) -> impl Iterator<Item = (&ShardId, &Placement)> {
        self.shards.iter()
    }

    /// The replicated tables.
    pub fn tables(&self) -> impl Iterator<Item = (&String, &TableSpec)> {
        self.tables.iter()
    }

    pub fn table(&self, name: &str) -> Option<&TableSpec> {
        self.tables.get(name)
    }

    /// Applies one command; the map changes only on `Ok` (and `version` counts those).
    pub fn apply(&mut self, cmd: MapCmd) -> Result<(), MapError> {
        match cmd {
            MapCmd::Join(m) => {
                self.members.insert(m.id, m);
            }
            MapCmd::Leave(id) => {
                if !self.members.contains_key(&id) {
                    return Err(MapError::NoSuchMember(id));
                }
                if self.shards.values().any(|p| p.primary == id || p.replicas.contains(&id)) {
                    return Err(MapError::InUse(id));
                }
                self.members.remove(&id);
            }
            MapCmd::Place { shard, primary, replicas, sync } => {
                let mut all = replicas.clone();
                all.push(primary);
                if let Some(&id) = all.iter().find(|id| !self.members.contains_key(id)) {
                    return Err(MapError::NoSuchMember(id));
                }
                all.sort_unstable();
                all.dedup();
                if all.len() != replicas.len() + 1 || sync as usize > replicas.len() {
                    return Err(MapError::BadPlacement(format!(
                        "primary {primary}, replicas {replicas:?}, sync {sync}"
                    )));
                }
                let (epoch, in_sync_version) =
                    self.shards.get(&shard).map_or((1, 0), |p| (p.epoch + 1, p.in_sync_version + 1));
                let in_sync = replicas.clone();
                let placement = Placement { epoch, primary, replicas, in_sync, sync, in_sync_version };
                self.shards.insert(shard, placement);
            }
            MapCmd::Failover { shard, from_epoch, primary } => {
                let Some(p) = self.shards.get_mut(&shard) else { return Err(MapError::NoSuchShard(shard)) };
                // Under `sync`, only an in-sync replica holds every completed write.
                let eligible =
                    if p.sync > 0 { p.in_sync.contains(&primary) } else { p.replicas.contains(&primary) };
                if p.epoch != from_epoch || !eligible {
                    let epoch = p.epoch;
                    return Err(MapError::Stale { shard, epoch });
                }
                let old = p.primary;
                p.replicas.retain(|&r| r != primary);
                p.replicas.push(old);
                p.replicas.sort_unstable();
                // The old primary is not in sync (it may hold writes no one else has); it
                // rejoins once it caught up with the new one.
                p.in_sync.retain(|&r| r != primary);
                p.in_sync_version += 1;
                p.primary = primary;
                p.epoch += 1;
            }
            MapCmd::CreateTable { name, spec } => {
                if self.tables.contains_key(&name) {
                    return Err(MapError::TableExists(name));
                }
                let ids: Vec<NodeId> = self.members.keys().copied().collect();
                if ids.is_empty()
                    || spec.shards == 0
                    || spec.sync > spec.replicas
                    || spec.replicas as usize >= ids.len()
                {
                    return Err(MapError::BadPlacement(format!(
                        "{} shards, {} replicas, sync {} over {} members",
                        spec.shards,
                        spec.replicas,
                        spec.sync,
                        ids.len()
                    )));
                }
                for i in 0..spec.shards {
                    let at = |k: u32| ids[(i as usize + k as usize) % ids.len()];
                    let replicas: Vec<NodeId> = (1..=spec.replicas).map(at).collect();
                    let placement = Placement {
                        epoch: 1,
                        primary: at(0),
                        in_sync: replicas.clone(),
                        replicas,
                        sync: spec.sync,
                        in_sync_version: 0,
                    };
                    self.shards.insert((name.clone(), i), placement);
                }
                self.tables.insert(name, spec);
            }
            MapCmd::DropTable(name) => {
                if self.tables.remove(&name).is_none() {
                    return Err(MapError::NoSuchTable(name));
                }
                self.shards.retain(|(t, _), _| *t != name);
            }
            MapCmd::AddReplica { shard, node } => {
                if !self.members.contains_key(&node) {
                    return Err(MapError::NoSuchMember(node));
                }
                let Some(p) = self.shards.get_mut(&shard) else { return Err(MapError::NoSuchShard(shard)) };
                if p.primary == node || p.replicas.contains(&node) {
                    return Err(MapError::BadPlacement(format!("node {node} already holds {shard:?}")));
                }
                p.replicas.push(node);
            }
            MapCmd::RemoveReplica { shard, node } => {
                let Some(p) = self.shards.get_mut(&shard) else { return Err(MapError::NoSuchShard(shard)) };
                let in_sync_after = p.in_sync.iter().filter(|&&id| id != node).count();
                if !p.replicas.contains(&node) || in_sync_after < p.sync as usize {
                    return Err(MapError::BadPlacement(format!(
                        "node {node} is not a replica of {shard:?}, or the in-sync set would fall below {}",
                        p.sync
                    )));
                }
                p.replicas.retain(|&id| id != node);
                if p.in_sync.contains(&node) {
                    p.in_sync.retain(|&id| id != node);
                    p.in_sync_version += 1;
                }
            }
            MapCmd::SetInSync { shard, epoch, based_on, mut in_sync } => {
                let Some(p) = self.shards.get_mut(&shard) else { return Err(MapError::NoSuchShard(shard)) };
                if p.epoch != epoch || p.in_sync_version != based_on {
                    let epoch = p.epoch;
                    return Err(MapError::Stale { shard, epoch });
                }
                in_sync.sort_unstable();
                in_sync.dedup();
                if in_sync.len() < p.sync as usize || in_sync.iter().any(|id| !p.replicas.contains(id)) {
                    return Err(MapError::BadPlacement(format!(
                        "in-sync {in_sync:?}: fewer than sync {} or not all replicas",
                        p.sync
                    )));
                }
                if p.in_sync != in_sync {
                    p.in_sync = in_sync;
                    p.in_sync_version += 1;
                }
            }
        }
        self.version += 1;
        Ok(())
    }
}
