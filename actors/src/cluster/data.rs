//! The data plane of a node in a cluster, as tokio tasks beside its `ControlNode`:
//!
//! - `route`: replication frames from other nodes to the shard actor they are for (a position
//!   report goes to the detector instead), and shard calls to `ShardRpc`;
//! - `place`: the tables of the map run here (created when the map gains one, dropped when it
//!   loses one), and every change of the map's placements reaches the shard actors at once
//!   (they also read the map every heartbeat);
//! - `detect`: the failure detector (`detector.rs`), fed on every node (shards report to every
//!   member); on the Raft leader only it grants leases to primaries that report and commits a
//!   failover to the map for a shard whose primary went silent for `detect_ms` (a new leader
//!   keeps what it heard as a follower, and first waits out the old leader's leases);
//! - `propose`: in-sync set changes primaries ask for, sent to the map.
//!
//! Invariant: nothing here writes a shard's data; it only carries frames, placements and map
//! changes. The shard actors decide what to apply.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::detector::{Detector, Report, Timing};
use super::fences::{self, FENCE_FRAME, FenceMirror, FenceWire};
use super::map::{
    LOCKS_SERVICE, MapCmd, QUEUES_SERVICE, SERVICE_REPLICAS, SERVICES, ShardId, feed_in_map, is_service,
    service_spec,
};
use super::raft::{Admin, ControlNode};
use super::shard_rpc::{SHARD_FRAME, ShardRpc};
use super::transport::Inbox;
use crate::error::GridError;
use crate::feed::actor::FeedMsg;
use crate::grid::GridCore;
use crate::lock::actor::LockMsg;
use crate::queue::actor::QueueMsg;
use crate::replication::NodeId;
use crate::replication::shard::{REPL_FRAME, ReplFrame, ReplNet, ReplWire};
use crate::table::actor::ShardMsg;
use crate::table::def::TableOptions;
use crate::table::supervisor::SlotState;

/// How often the detector decides.
const DECIDE_EVERY: Duration = Duration::from_millis(50);
/// A lease is granted only by a leader that a quorum acknowledged within this. Why that is safe
/// (real time; a lease counts on the primary's own clock from its report's send time, so only
/// clock rates matter): a lease granted at `g` ends by `g + lease_ms` (400). The leader granted
/// it only if a quorum acknowledged it after `g - QUORUM_FRESH_MS`; each of those voters heard
/// the leader after `g - 150 - max_delay_ms` (100). A new leader needs the vote of one of them,
/// which votes for no one until openraft's leader lease (`election_max_ms`, 240) after it last
/// heard the old leader: so no new leader exists before `g - 10`, and its detector decides
/// nothing for `lease_ms + max_delay_ms` (500) after it took the lead (`Detector::took_lead`),
/// so not before `g + 490`: after the lease ended. Leases the new leader grants itself follow
/// the detector's own rule (`detect_ms` > `lease_ms + max_delay_ms`). (Changing these must
/// keep `QUORUM_FRESH_MS < election_max_ms`: `g - QUORUM_FRESH_MS - max_delay_ms +
/// election_max_ms + lease_ms + max_delay_ms > g + lease_ms`.)
const QUORUM_FRESH_MS: u64 = 150;
/// How long a leader waits before it proposes the services' placement again.
const SERVICES_RETRY_MS: u64 = 1_000;
/// How often the map's tables are checked against the running ones even without a change of
/// the map (a table that failed to start is tried again).
const PLACE_EVERY: Duration = Duration::from_millis(500);

/// A planned switch of a shard's primary to `to`, for the leader's detector.
struct Switch {
    shard: ShardId,
    to: NodeId,
    done: oneshot::Sender<Result<u64, GridError>>,
}

/// The data plane's tasks; they stop when it is dropped.
pub struct DataPlane {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    switches: mpsc::Sender<Switch>,
    /// The detector (the `detect` task's; read for `copies`).
    detector: Arc<std::sync::Mutex<Detector>>,
    net: Arc<ReplNet>,
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl DataPlane {
    pub fn start(
        grid: Weak<GridCore>,
        control: Arc<ControlNode>,
        net: Arc<ReplNet>,
        rpc: Arc<ShardRpc>,
        inbox: Inbox,
        proposals: mpsc::Receiver<MapCmd>,
        timing: Timing,
    ) -> DataPlane {
        let (det_tx, det_rx) = mpsc::channel(super::transport::INBOX_MAX);
        let (switches, switch_rx) = mpsc::channel(SWITCHES_MAX);
        let detector = Arc::new(std::sync::Mutex::new(Detector::new(timing)));
        let mirror = Arc::new(std::sync::Mutex::new(FenceMirror::new(fences_of(&grid))));
        let tasks = vec![
            tokio::spawn(route(grid.clone(), inbox, det_tx, rpc.clone(), net.clone(), mirror.clone())),
            tokio::spawn(ask_fences(net.clone(), mirror)),
            tokio::spawn(place(grid, net.clone(), rpc)),
            tokio::spawn(detect(control.clone(), net.clone(), det_rx, switch_rx, detector.clone())),
            tokio::spawn(propose(control, proposals)),
        ];
        DataPlane { tasks, switches, detector, net }
    }

    /// Every copy of every shard as this node's detector last heard it.
    pub fn copies(&self) -> Vec<super::raft::CopyState> {
        let now = self.net.now_ms();
        let d = self.detector.lock().unwrap_or_else(|e| e.into_inner());
        d.positions()
            .map(|((table, shard), node, at, pos)| super::raft::CopyState {
                table: table.clone(),
                shard: *shard,
                node,
                pos,
                heard_ms_ago: now.saturating_sub(at),
            })
            .collect()
    }

    /// Makes in-sync replica `to` the primary of `shard`, on this node, which must lead the
    /// Raft group: the current primary gets no more leases, and once its last one has ended
    /// the switch is committed (the epoch rises). The map's version after it.
    pub async fn switch(&self, shard: ShardId, to: NodeId) -> Result<u64, GridError> {
        let (done, rx) = oneshot::channel();
        self.switches
            .send(Switch { shard, to, done })
            .await
            .map_err(|_| GridError::Unavailable("the data plane stopped".into()))?;
        rx.await.map_err(|_| GridError::Unavailable("the data plane stopped".into()))?
    }
}

/// The node's fence table (a fresh one if the grid is gone already).
fn fences_of(grid: &Weak<GridCore>) -> Arc<crate::lock::fence::FenceTable> {
    grid.upgrade().map_or_else(Arc::default, |g| g.locks().fences.clone())
}

/// Planned switches queued for the detector.
const SWITCHES_MAX: usize = 64;

/// What the data plane hands a shard actor (a table's, or a service's).
enum Delivery {
    Placement(super::map::Placement),
    Repl(NodeId, ReplWire),
}

/// The actor of `table`'s shard `shard` here (a table shard, or the lock or queue service), if
/// it runs.
fn deliver(grid: &GridCore, table: &str, shard: u32, d: Delivery) {
    match table {
        LOCKS_SERVICE => {
            if let SlotState::Running(a) = grid.locks().slot().get() {
                let _ = a.cast(match d {
                    Delivery::Placement(p) => LockMsg::Placement(p),
                    Delivery::Repl(from, w) => LockMsg::Repl(from, w),
                });
            }
            return;
        }
        QUEUES_SERVICE => {
            if let SlotState::Running(a) = grid.queues().slot().get() {
                let _ = a.cast(match d {
                    Delivery::Placement(p) => QueueMsg::Placement(p),
                    Delivery::Repl(from, w) => QueueMsg::Repl(from, w),
                });
            }
            return;
        }
        _ => {}
    }
    if let Some(feed) = super::map::feed_in_map(table) {
        if let Ok(rt) = grid.feed(feed)
            && let SlotState::Running(a) = rt.slot().get()
        {
            let _ = a.cast(match d {
                Delivery::Placement(p) => FeedMsg::Placement(p),
                Delivery::Repl(from, w) => FeedMsg::Repl(from, w),
            });
        }
        return;
    }
    let msg = match d {
        Delivery::Placement(p) => ShardMsg::Placement(p),
        Delivery::Repl(from, w) => ShardMsg::Repl(from, w),
    };
    let Ok(rt) = grid.table(table) else { return };
    if let Some(slot) = rt.slots().get(shard as usize)
        && let SlotState::Running(a) = slot.get()
    {
        let _ = a.cast(msg);
    }
}

/// A fence frame: a mirror's ask to the lock service (if it runs here), or the lock service
/// primary's answer to this node's mirror (taken only from the node the map names).
fn fence_frame(
    g: &GridCore,
    net: &ReplNet,
    mirror: &std::sync::Mutex<FenceMirror>,
    from: NodeId,
    w: FenceWire,
) {
    if let FenceWire::Ask { epoch, seq, asked_ms } = w {
        if let SlotState::Running(a) = g.locks().slot().get() {
            let _ = a.cast(LockMsg::FenceAsk(from, (epoch, seq, asked_ms)));
        }
        return;
    }
    let primary = net.map.borrow().placement(&(LOCKS_SERVICE.to_string(), 0)).map(|p| p.primary);
    if primary != Some(from) || from == net.me {
        return;
    }
    let mut m = mirror.lock().unwrap_or_else(|e| e.into_inner());
    if m.on_wire(w)
        && let Some(b) = m.ask(fences::now_ms()).encode()
    {
        net.transport.send(from, b);
    }
}

/// This node's mirror asks the lock service's primary every `ASK_EVERY_MS` (for what it lacks,
/// and a lease), unless this node serves the locks.
async fn ask_fences(net: Arc<ReplNet>, mirror: Arc<std::sync::Mutex<FenceMirror>>) {
    let mut every = tokio::time::interval(Duration::from_millis(fences::ASK_EVERY_MS));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        every.tick().await;
        let primary = net.map.borrow().placement(&(LOCKS_SERVICE.to_string(), 0)).map(|p| p.primary);
        let mut m = mirror.lock().unwrap_or_else(|e| e.into_inner());
        match primary {
            Some(p) if p != net.me => {
                if let Some(b) = m.ask(fences::now_ms()).encode() {
                    net.transport.send(p, b);
                }
            }
            // The lock service is here (its table is its own), or not placed yet.
            _ => m.forget(),
        }
    }
}

async fn route(
    grid: Weak<GridCore>,
    mut inbox: Inbox,
    detector: mpsc::Sender<(NodeId, ReplFrame)>,
    rpc: Arc<ShardRpc>,
    net: Arc<ReplNet>,
    mirror: Arc<std::sync::Mutex<FenceMirror>>,
) {
    while let Some((from, bytes)) = inbox.recv().await {
        let body = match bytes.split_first() {
            Some((&REPL_FRAME, body)) => body,
            Some((&SHARD_FRAME, body)) => {
                rpc.on_frame(&grid, from, body);
                continue;
            }
            Some((&FENCE_FRAME, body)) => {
                let Some(w) = FenceWire::decode(body) else {
                    tracing::warn!(from, "an undecodable fence frame was dropped");
                    continue;
                };
                let Some(g) = grid.upgrade() else { return };
                fence_frame(&g, &net, &mirror, from, w);
                continue;
            }
            _ => continue,
        };
        let Some(frame) = ReplFrame::decode(body) else {
            tracing::warn!(from, "an undecodable replication frame was dropped");
            continue;
        };
        if matches!(frame.wire, ReplWire::Status { .. }) {
            let _ = detector.try_send((from, frame));
            continue;
        }
        let Some(grid) = grid.upgrade() else { return };
        deliver(&grid, &frame.table, frame.shard, Delivery::Repl(from, frame.wire));
    }
}

/// Starts feed `name`, which the map places here, with its definition from a node that runs
/// it (the one that created it, at first); the next pass of `place` tries again if none did.
async fn start_feed(grid: &Weak<GridCore>, rpc: &ShardRpc, name: &str, holders: &[NodeId]) {
    let mut def = None;
    for &h in holders {
        match rpc.feed_def(h, name).await {
            Ok(d) => {
                def = Some(d);
                break;
            }
            Err(e) => tracing::debug!(feed = %name, node = h, "no feed definition there yet: {e}"),
        }
    }
    let (Some(def), Some(g)) = (def, grid.upgrade()) else { return };
    match g.create_feed_local(def).await {
        Ok(_) => tracing::info!(feed = %name, "replicated feed started here"),
        Err(GridError::FeedExists(_)) => {}
        Err(e) => tracing::warn!(feed = %name, "could not start a replicated feed: {e}"),
    }
}

async fn place(grid: Weak<GridCore>, net: Arc<ReplNet>, rpc: Arc<ShardRpc>) {
    let mut map = net.map.clone();
    let mut known: HashSet<String> = HashSet::new();
    let mut known_feeds: HashSet<String> = HashSet::new();
    // Feeds being started here (`start_feed` tasks).
    let starting: Arc<std::sync::Mutex<HashSet<String>>> = Arc::default();
    // The map version whose placements the shard actors were sent (they also read the map on
    // every heartbeat; this only makes a change reach them at once).
    let mut delivered = None;
    loop {
        let (tables, feeds, placements) = {
            let m = map.borrow_and_update();
            // Services (`$locks`, `$queues`) are placed, not started as tables; feeds are
            // started as feeds, each with the nodes that hold it (to ask for its definition).
            let tables: Vec<(String, u32)> = m
                .tables()
                .filter(|(n, _)| !is_service(n) && feed_in_map(n).is_none())
                .map(|(n, s)| (n.clone(), s.shards))
                .collect();
            let feeds: Vec<(String, Vec<NodeId>)> = m
                .tables()
                .filter_map(|(n, _)| feed_in_map(n).map(|f| (f.to_string(), n)))
                .map(|(f, n)| {
                    let holders = m.placement(&(n.clone(), 0)).map_or(Vec::new(), |p| {
                        std::iter::once(p.primary)
                            .chain(p.replicas.iter().copied())
                            .filter(|&h| h != net.me)
                            .collect()
                    });
                    (f, holders)
                })
                .collect();
            let fresh = delivered != Some(m.version);
            delivered = Some(m.version);
            let placements: Vec<_> = if fresh {
                m.placements().map(|(id, p)| (id.clone(), p.clone())).collect()
            } else {
                Vec::new()
            };
            (tables, feeds, placements)
        };
        let Some(g) = grid.upgrade() else { return };
        let names: HashSet<String> = tables.iter().map(|(n, _)| n.clone()).collect();
        for (name, shards) in &tables {
            if g.table(name).is_err() {
                let opts = TableOptions { shards: *shards, fsync: None };
                match g.create_table_local(name, opts).await {
                    Ok(_) => tracing::info!(table = %name, shards, "replicated table started here"),
                    Err(e) => tracing::warn!(table = %name, "could not start a replicated table: {e}"),
                }
            }
        }
        for gone in known.difference(&names) {
            if g.table(gone).is_ok()
                && let Err(e) = g.drop_table_local(gone).await
            {
                tracing::warn!(table = %gone, "could not drop a table the map dropped: {e}");
            }
        }
        known = names;
        let feed_names: HashSet<String> = feeds.iter().map(|(n, _)| n.clone()).collect();
        for (name, holders) in feeds {
            // Started on its own task (a definition asked of a dead node waits `READ_CALL`), at
            // most one per feed, so placements are never held up here.
            if g.feed(&name).is_ok()
                || !starting.lock().unwrap_or_else(|e| e.into_inner()).insert(name.clone())
            {
                continue;
            }
            let (grid, rpc, starting) = (grid.clone(), rpc.clone(), starting.clone());
            tokio::spawn(async move {
                start_feed(&grid, &rpc, &name, &holders).await;
                starting.lock().unwrap_or_else(|e| e.into_inner()).remove(&name);
            });
        }
        for gone in known_feeds.difference(&feed_names) {
            match g.drop_feed_local(gone).await {
                Ok(()) | Err(GridError::NoSuchFeed(_)) => {}
                Err(e) => tracing::warn!(feed = %gone, "could not drop a feed the map dropped: {e}"),
            }
        }
        known_feeds = feed_names;
        for ((table, shard), p) in placements {
            deliver(&g, &table, shard, Delivery::Placement(p));
        }
        drop(g);
        tokio::select! {
            r = map.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(PLACE_EVERY) => {}
        }
    }
}

async fn detect(
    control: Arc<ControlNode>,
    net: Arc<ReplNet>,
    mut reports: mpsc::Receiver<(NodeId, ReplFrame)>,
    mut switches: mpsc::Receiver<Switch>,
    shared: Arc<std::sync::Mutex<Detector>>,
) {
    // Locked for each step only (`DataPlane::copies` reads it between them).
    let detector = || shared.lock().unwrap_or_else(|e| e.into_inner());
    let timing = detector().timing;
    let mut leading = false;
    let mut every = tokio::time::interval(DECIDE_EVERY);
    // Failovers sent and not yet seen in the map: (shard, epoch they replace).
    let mut pending: BTreeSet<((String, u32), u64)> = BTreeSet::new();
    // Planned switches whose old primary is draining: (switch, its epoch, when to commit).
    let mut draining: Vec<(Switch, u64, u64)> = Vec::new();
    // Switches committed or not, back from their tasks (at most `SWITCHES_MAX` in flight).
    let (ended_tx, mut ended) = mpsc::channel::<(ShardId, bool)>(SWITCHES_MAX);
    // When the services were last proposed to the map (they are placed once, by a leader).
    let mut services_asked_ms: Option<u64> = None;
    // The map version the detector was last pruned to (`Detector::retain_placed`).
    let mut pruned_at = None;
    loop {
        tokio::select! {
            s = switches.recv() => {
                let Some(s) = s else { return };
                let placed = net.map.borrow().placement(&s.shard).cloned();
                let refused = match &placed {
                    _ if !control.leads_with_quorum(QUORUM_FRESH_MS) => Some(format!(
                        "only the Raft leader switches primaries (this is node {}; the leader is {:?})",
                        net.me,
                        *control.leader().borrow()
                    )),
                    None => Some(format!("{:?} is not placed", s.shard)),
                    Some(p) if p.primary == s.to => None,
                    Some(p) if !p.in_sync.contains(&s.to) => {
                        Some(format!("node {} is not an in-sync replica of {:?} (in sync: {:?})", s.to, s.shard, p.in_sync))
                    }
                    Some(_) => None,
                };
                match (refused, placed) {
                    (Some(why), _) => drop(s.done.send(Err(GridError::Invalid(why)))),
                    (None, Some(p)) if p.primary == s.to => drop(s.done.send(Ok(net.map.borrow().version))),
                    (None, Some(p)) => {
                        detector().drain(s.shard.clone(), p.epoch);
                        let at = net.now_ms() + timing.lease_ms + timing.max_delay_ms;
                        tracing::info!(table = %s.shard.0, shard = s.shard.1, epoch = p.epoch, to = s.to,
                            "planned switch: the primary gets no more leases");
                        draining.push((s, p.epoch, at));
                    }
                    (None, None) => {}
                }
            }
            e = ended.recv() => {
                // A switch that was not committed: leases flow again (else the primary,
                // unleased, would be failed over).
                if let Some((shard, false)) = e {
                    detector().undrain(&shard);
                }
            }
            r = reports.recv() => {
                let Some((from, frame)) = r else { return };
                let ReplWire::Status { pos, epoch, primary, serving, sent_ms } = frame.wire else { continue };
                let shard = (frame.table, frame.shard);
                let report = Report { shard, pos, primary_of: primary.then_some(epoch), serving };
                // Every node hears every report (a new leader then knows who fell silent when);
                // leases only from a leader a quorum heard from lately (see `QUORUM_FRESH_MS`).
                let leases = {
                    let map = net.map.borrow();
                    detector().heartbeat(&map, from, sent_ms, &[report], net.now_ms())
                };
                if !control.leads_with_quorum(QUORUM_FRESH_MS) {
                    continue;
                }
                for l in leases {
                    let lease = ReplWire::Lease { epoch: l.epoch, until_ms: l.until_ms };
                    if let Some(b) = (ReplFrame { table: l.shard.0, shard: l.shard.1, wire: lease }).encode() {
                        net.transport.send(from, b);
                    }
                }
            }
            _ = every.tick() => {
                {
                    let map = net.map.borrow();
                    if pruned_at != Some(map.version) {
                        pruned_at = Some(map.version);
                        detector().retain_placed(&map);
                    }
                }
                let now_leading = control.is_leader();
                if now_leading != leading {
                    // A new term of leadership keeps what was heard, and waits out the leases
                    // an earlier leader may have granted.
                    if now_leading {
                        detector().took_lead(net.now_ms());
                    } else {
                        detector().lost_lead();
                    }
                    pending.clear();
                    leading = now_leading;
                }
                if !leading {
                    for (s, _, _) in draining.drain(..) {
                        let _ = s.done.send(Err(GridError::Unavailable("leadership moved during the switch".into())));
                    }
                    continue;
                }
                let now = net.now_ms();
                // Placed once this node (the leader) is a recorded member.
                // Each service also gets replicas as members join (`SERVICE_REPLICAS`).
                let missing: Vec<MapCmd> = {
                    let map = net.map.borrow();
                    if map.member(net.me).is_some() {
                        let mut cmds: Vec<MapCmd> = SERVICES
                            .into_iter()
                            .filter(|s| map.table(s).is_none())
                            .map(|s| MapCmd::CreateTable { name: s.to_string(), spec: service_spec() })
                            .collect();
                        cmds.extend(service_replicas(&map));
                        cmds
                    } else {
                        Vec::new()
                    }
                };
                if !missing.is_empty() && services_asked_ms.is_none_or(|at| now.saturating_sub(at) >= SERVICES_RETRY_MS) {
                    services_asked_ms = Some(now);
                    for cmd in missing {
                        let c = control.clone();
                        tokio::spawn(async move {
                            if let Err(e) = c.admin(Admin::Propose(cmd)).await {
                                tracing::debug!("a service was not placed yet: {e}");
                            }
                        });
                    }
                }
                let (due, wait): (Vec<_>, Vec<_>) = draining.drain(..).partition(|(_, _, at)| *at <= now);
                draining = wait;
                for (s, epoch, _) in due {
                    let cmd = MapCmd::Failover { shard: s.shard.clone(), from_epoch: epoch, primary: s.to };
                    pending.insert((s.shard.clone(), epoch));
                    let (c, ended) = (control.clone(), ended_tx.clone());
                    tokio::spawn(async move {
                        let r = c.admin(Admin::Propose(cmd)).await.map(|r| r.version);
                        let _ = ended.send((s.shard, r.is_ok())).await;
                        let _ = s.done.send(r);
                    });
                }
                let cmds = {
                    let map = net.map.borrow();
                    pending.retain(|(shard, epoch)| map.placement(shard).is_some_and(|p| p.epoch == *epoch));
                    detector().decide(&map, net.now_ms())
                };
                for cmd in cmds {
                    let MapCmd::Failover { shard, from_epoch, primary } = &cmd else { continue };
                    if !pending.insert((shard.clone(), *from_epoch)) {
                        continue;
                    }
                    tracing::warn!(table = %shard.0, shard = shard.1, epoch = from_epoch, new_primary = primary,
                        "primary silent: failing over");
                    let c = control.clone();
                    tokio::spawn(async move {
                        if let Err(e) = c.admin(Admin::Propose(cmd)).await {
                            tracing::warn!("a failover was not committed: {e}");
                        }
                    });
                }
            }
        }
    }
}

/// The replicas the services lack: one `AddReplica` per service short of `SERVICE_REPLICAS`
/// (or of every other member, in a smaller cluster), on the lowest member not holding it.
fn service_replicas(map: &super::map::ClusterMap) -> Vec<MapCmd> {
    let mut out = Vec::new();
    for svc in SERVICES {
        let shard = (svc.to_string(), 0);
        let Some(p) = map.placement(&shard) else { continue };
        let others = map.members().filter(|m| m.id != p.primary).count();
        if p.replicas.len() >= SERVICE_REPLICAS.min(others) {
            continue;
        }
        if let Some(m) = map.members().find(|m| m.id != p.primary && !p.replicas.contains(&m.id)) {
            out.push(MapCmd::AddReplica { shard, node: m.id });
        }
    }
    out
}

/// In-sync changes, newest per shard (a primary proposes again until its change is committed,
/// so older ones waiting here are dropped), each committed on its own task; at most one task
/// per shard at a time (a shard whose change is still being committed skips the newer one: its
/// primary proposes it again), so the tasks are bounded by the shards.
async fn propose(control: Arc<ControlNode>, mut proposals: mpsc::Receiver<MapCmd>) {
    let in_flight: Arc<std::sync::Mutex<HashSet<ShardId>>> = Arc::default();
    while let Some(first) = proposals.recv().await {
        let mut newest = std::collections::BTreeMap::new();
        let mut next = Some(first);
        while let Some(cmd) = next {
            if let MapCmd::SetInSync { shard, .. } = &cmd {
                newest.insert(shard.clone(), cmd);
            }
            next = proposals.try_recv().ok();
        }
        for (shard, cmd) in newest {
            if !in_flight.lock().unwrap_or_else(|e| e.into_inner()).insert(shard.clone()) {
                continue;
            }
            let (c, in_flight) = (control.clone(), in_flight.clone());
            tokio::spawn(async move {
                if let Err(e) = c.admin(Admin::Propose(cmd)).await {
                    tracing::debug!("an in-sync change was not committed: {e}");
                }
                in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&shard);
            });
        }
    }
}
