//! The failure detector the Raft leader runs over the cluster map: nodes' heartbeats carry, for
//! every shard they hold, their log position and whether they are its primary; the detector
//! grants primaries their leases and decides failovers (`MapCmd::Failover`, to be committed
//! through Raft).
//!
//! The rules (shared CLUSTER.md, "Failover"):
//! - A lease runs `lease_ms` from when the primary *sent* the heartbeat, by its own clock, so
//!   it ends before the detector, counting from when it *heard* that heartbeat, can act
//!   (`detect_ms` > `lease_ms` + the network's delay). Clocks may differ in offset, not much in
//!   rate.
//! - A primary not heard from for `detect_ms` is replaced by a live replica (one heard since the
//!   primary fell silent) that is *in sync* under `sync(n)` (any replica under `async`): the
//!   primary completes a write only once every in-sync replica holds it, so any of them holds
//!   every completed write, whatever the timing of the reports. Among them the most up-to-date
//!   (highest `(epoch, lsn)`) takes over. With no live in-sync replica the shard waits (no
//!   unclean election).
//!
//! - Every node keeps a detector fed with every node's heartbeats (shards report to all
//!   members), but only the Raft leader grants leases and decides. A node that becomes leader
//!   keeps what it heard as a follower, so a primary that died with the old leader is replaced
//!   `detect_ms` after it fell silent, not `detect_ms` after the election; a lease the *old*
//!   leader granted is waited out instead (`took_lead`: no decision for `lease_ms +
//!   max_delay_ms` after leadership began; the arithmetic is in `cluster/data.rs`).
//!
//! - A primary that keeps reporting but holds no lease (the leases sent to it are lost: a
//!   one-way partition) for `detect_ms` gets no more leases (`stuck`), and once every lease
//!   granted to it before has ended (`lease_ms + max_delay_ms` later) is replaced like a
//!   silent one: otherwise its shard would wait, unserved, for as long as the partition.
//!
//! Invariant: `primary_heard` counts from the start of the current epoch at the earliest, so a
//! new primary gets a full `detect_ms` to take up its epoch.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use super::map::{ClusterMap, MapCmd, ShardId};
use crate::replication::{Epoch, NodeId, Pos};

/// The detector's timings, in ms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub heartbeat_ms: u64,
    pub lease_ms: u64,
    pub detect_ms: u64,
    /// The longest a message takes, for the purpose of the failover rule.
    pub max_delay_ms: u64,
}

impl Default for Timing {
    /// Reports every 100 ms; a primary silent for 600 ms is replaced; leases of 400 ms (plus
    /// 100 ms of delay allowance: 500 < 600).
    fn default() -> Self {
        Timing { heartbeat_ms: 100, lease_ms: 400, detect_ms: 600, max_delay_ms: 100 }
    }
}

impl Timing {
    /// Whether a lease always ends before the detector may act.
    pub fn is_safe(&self) -> bool {
        self.lease_ms + self.max_delay_ms < self.detect_ms
    }
}

/// What a node says of one shard it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub shard: ShardId,
    /// Its log's last record.
    pub pos: Pos,
    /// `Some(e)` if it is the shard's primary in epoch `e`.
    pub primary_of: Option<Epoch>,
    /// For a primary: whether it holds a lease now (it serves).
    pub serving: bool,
}

/// A lease granted: the primary of `shard` in `epoch` may write until `until_ms` by its clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub shard: ShardId,
    pub epoch: Epoch,
    pub until_ms: u64,
}

#[derive(Clone, Debug)]
pub struct Detector {
    pub timing: Timing,
    /// Per shard: the epoch and when its primary was last heard (or the epoch began).
    primary_heard: BTreeMap<ShardId, (Epoch, u64)>,
    /// Per shard and node: when it last reported, and its position.
    positions: BTreeMap<(ShardId, NodeId), (u64, Pos)>,
    /// Shards whose primary of this epoch gets no more leases (a planned switch is under way).
    drained: BTreeMap<ShardId, Epoch>,
    /// No failover is decided before this (a lease an earlier leader granted may still run).
    quiet_until_ms: u64,
    /// Per shard: the epoch and since when its primary reports but holds no lease (the leases
    /// sent to it are lost: a one-way partition).
    unleased: BTreeMap<ShardId, (Epoch, u64)>,
    /// Shards whose unleased primary gets no more leases, and when the failover may commit
    /// (once every lease granted before has ended).
    stuck: BTreeMap<ShardId, (Epoch, u64)>,
}

impl Detector {
    pub fn new(timing: Timing) -> Detector {
        debug_assert!(timing.is_safe(), "{timing:?}: a lease could outlive detection");
        Detector {
            timing,
            primary_heard: BTreeMap::new(),
            positions: BTreeMap::new(),
            drained: BTreeMap::new(),
            quiet_until_ms: 0,
            unleased: BTreeMap::new(),
            stuck: BTreeMap::new(),
        }
    }

    /// This node became the Raft leader at `now_ms`: it keeps what it heard, and decides no
    /// failover until every lease the previous leader may have granted has ended.
    pub fn took_lead(&mut self, now_ms: u64) {
        self.quiet_until_ms = now_ms + self.timing.lease_ms + self.timing.max_delay_ms;
    }

    /// This node stopped leading: planned switches it was draining are not its to finish.
    pub fn lost_lead(&mut self) {
        self.drained.clear();
        self.stuck.clear();
    }

    /// A heartbeat from `from`, sent at `sent_ms` by its clock and heard at `now_ms`: the leases
    /// it earns (for the shards it is the primary of, in the map's epoch).
    pub fn heartbeat(
        &mut self,
        map: &ClusterMap,
        from: NodeId,
        sent_ms: u64,
        reports: &[Report],
        now_ms: u64,
    ) -> Vec<Lease> {
        let mut leases = Vec::new();
        for r in reports {
            // Only copies the map places are tracked (every node runs every table's shards).
            let Some(p) = map.placement(&r.shard) else { continue };
            if p.primary != from && !p.replicas.contains(&from) {
                continue;
            }
            self.positions.insert((r.shard.clone(), from), (now_ms, r.pos));
            let draining = self.drained.get(&r.shard) == Some(&p.epoch)
                || self.stuck.get(&r.shard).is_some_and(|&(e, _)| e == p.epoch);
            if p.primary == from && r.primary_of == Some(p.epoch) {
                self.primary_heard.insert(r.shard.clone(), (p.epoch, now_ms));
                if r.serving {
                    self.unleased.remove(&r.shard);
                } else {
                    match self.unleased.get(&r.shard) {
                        Some(&(e, _)) if e == p.epoch => {}
                        _ => {
                            self.unleased.insert(r.shard.clone(), (p.epoch, now_ms));
                        }
                    }
                }
                if draining {
                    continue;
                }
                leases.push(Lease {
                    shard: r.shard.clone(),
                    epoch: p.epoch,
                    until_ms: sent_ms + self.timing.lease_ms,
                });
            }
        }
        leases
    }

    /// Forgets what it keeps of shards the map no longer places (or places in another epoch),
    /// and of nodes that no longer hold a copy: its maps stay as large as the map's placements.
    pub fn retain_placed(&mut self, map: &ClusterMap) {
        let same_epoch = |s: &ShardId, e: Epoch| map.placement(s).is_some_and(|p| p.epoch == e);
        self.primary_heard.retain(|s, (e, _)| same_epoch(s, *e));
        self.drained.retain(|s, e| same_epoch(s, *e));
        self.unleased.retain(|s, (e, _)| same_epoch(s, *e));
        self.stuck.retain(|s, (e, _)| same_epoch(s, *e));
        self.positions
            .retain(|(s, n), _| map.placement(s).is_some_and(|p| p.primary == *n || p.replicas.contains(n)));
    }

    /// Every copy heard from: (shard, node) → (when its report arrived, its position).
    pub fn positions(&self) -> impl Iterator<Item = (&ShardId, NodeId, u64, Pos)> {
        self.positions.iter().map(|((s, n), &(at, pos))| (s, *n, at, pos))
    }

    /// Grants the primary of `epoch` of `shard` no more leases (a planned switch): once the
    /// last lease granted has ended (`lease_ms + max_delay_ms` from now), another node may be
    /// made primary without two epochs writing at once.
    pub fn drain(&mut self, shard: ShardId, epoch: Epoch) {
        self.drained.insert(shard, epoch);
    }

    /// Lets leases flow again for `shard` (a planned switch gave up).
    pub fn undrain(&mut self, shard: &ShardId) {
        self.drained.remove(shard);
    }

    /// The failovers due now.
    pub fn decide(&mut self, map: &ClusterMap, now_ms: u64) -> Vec<MapCmd> {
        let t = self.timing;
        let mut out = Vec::new();
        let quiet = now_ms < self.quiet_until_ms;
        for (shard, p) in map.placements() {
            let heard = match self.primary_heard.get(shard) {
                Some(&(e, at)) if e == p.epoch => at,
                _ => {
                    // A new epoch (or a new detector): its primary gets a full detection time.
                    self.primary_heard.insert(shard.clone(), (p.epoch, now_ms));
                    continue;
                }
            };
            if quiet {
                continue;
            }
            // A primary that reports but holds no lease for `detect_ms` (its leases are lost on
            // the way) is replaced too, but only once it got no lease for `lease_ms +
            // max_delay_ms` (`stuck`), so every lease granted to it before has ended.
            let silent = now_ms.saturating_sub(heard) > t.detect_ms;
            let unleased_long = self
                .unleased
                .get(shard)
                .is_some_and(|&(e, since)| e == p.epoch && now_ms.saturating_sub(since) > t.detect_ms);
            if !silent {
                if !unleased_long {
                    continue;
                }
                match self.stuck.get(shard) {
                    Some(&(e, at)) if e == p.epoch && now_ms >= at => {}
                    Some(&(e, _)) if e == p.epoch => continue,
                    _ => {
                        self.stuck.insert(shard.clone(), (p.epoch, now_ms + t.lease_ms + t.max_delay_ms));
                        continue;
                    }
                }
            }
            // Under `sync(n)`, and for a service (whose writes wait for the in-sync replicas),
            // only an in-sync replica holds every acknowledged write.
            let eligible =
                if p.sync > 0 || super::map::is_service(&shard.0) { &p.in_sync } else { &p.replicas };
            // Live: heard since the primary fell silent, or (an unleased primary, still heard)
            // within the detection time.
            let since = if silent { heard } else { now_ms.saturating_sub(t.detect_ms) };
            let live: Vec<(NodeId, Pos)> = eligible
                .iter()
                .filter_map(|&id| {
                    let &(at, pos) = self.positions.get(&(shard.clone(), id))?;
                    (at > since).then_some((id, pos))
                })
                .collect();
            let Some(&(best, _)) = live.iter().max_by_key(|(id, pos)| (*pos, Reverse(*id))) else { continue };
            out.push(MapCmd::Failover { shard: shard.clone(), from_epoch: p.epoch, primary: best });
        }
        out
    }
}
