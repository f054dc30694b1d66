//! The replication runtime of one node for one shard, and the controller it reports to, as
//! tokio tasks over a `Transport`: the node task owns an `Endpoint` and its `HeapLog` (ticks, frames in,
//! effects out, heartbeats, writes from `ShardNode::write`); the controller task owns the
//! `ClusterMap` and the `Detector` (leases, in-sync changes, failovers) and sends the map to
//! every member. The controller stands in for the Raft group (issue 15: openraft is not wired
//! yet), so it is a single point of failure here.
//!
//! Frames are postcard `Wire` messages. Times are ms since a shared `origin` (in one process);
//! across processes each side would use its own clock, which leases allow (offset, not rate).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use heapgrid_heap::WriteBatch;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::detector::{Detector, Report};
use super::map::{ClusterMap, MapCmd, Placement, ShardId};
use super::transport::{Inbox, Transport};
use crate::error::GridError;
use crate::replication::endpoint::{Effect, Endpoint, ShardLog};
use crate::replication::heap_log::HeapLog;
use crate::replication::primary::{Outcome, WriteRefused};
use crate::replication::{Epoch, Lsn, NodeId, Pos, ToPrimary, ToReplica};

/// The controller's node id.
pub const CONTROLLER: NodeId = 0;
const TICK: Duration = Duration::from_millis(10);
/// Writes and reads queued for a node's task before `ShardNode::write` waits for room.
pub const NODE_COMMANDS_MAX: usize = 1024;
/// How long a `sync(n)` write waits for its replicas before it is `Indeterminate` (this also
/// bounds the writes waiting in a node's task: at most what arrives in this time).
pub const WRITE_DEADLINE_MS: u64 = 2_000;

type Snapshot = (Pos, Vec<(Vec<u8>, Vec<u8>)>);

/// What `ShardNode::read` answers: the log's end, whether the node is the primary, its state.
pub type NodeView = (Lsn, bool, Vec<(Vec<u8>, Vec<u8>)>);

/// What travels between nodes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Wire {
    Rep(ToReplica<Vec<u8>, Snapshot>),
    Prim(ToPrimary),
    Status { pos: Pos, epoch: Epoch, primary: bool, sent_ms: u64 },
    Map(Placement),
    Lease { epoch: Epoch, until_ms: u64 },
    InSync { epoch: Epoch, in_sync: Vec<NodeId> },
}

fn send(t: &dyn Transport, to: NodeId, w: &Wire) {
    if let Ok(b) = postcard::to_allocvec(w) {
        t.send(to, b);
    }
}

enum Cmd {
    Write(WriteBatch, usize, oneshot::Sender<Result<Outcome, GridError>>),
    Read(oneshot::Sender<NodeView>),
}

/// A node's replication task for one shard.
pub struct ShardNode {
    tx: mpsc::Sender<Cmd>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ShardNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ShardNode {
    /// Starts node `id`'s task over `log`, knowing `epoch`.
    pub fn start(
        id: NodeId,
        log: HeapLog,
        epoch: Epoch,
        transport: Arc<dyn Transport>,
        inbox: Inbox,
        origin: tokio::time::Instant,
        heartbeat_ms: u64,
    ) -> ShardNode {
        let (tx, rx) = mpsc::channel(NODE_COMMANDS_MAX);
        let ep = Endpoint::new(id, &log, epoch);
        let task = tokio::spawn(node_loop(ep, log, transport, inbox, rx, origin, heartbeat_ms));
        ShardNode { tx, task }
    }

    /// A write as primary, waiting for `n` in-sync replicas (its outcome), or why not.
    pub async fn write(&self, batch: WriteBatch, n: usize) -> Result<Outcome, GridError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Cmd::Write(batch, n, tx)).await.map_err(|_| GridError::Closed)?;
        rx.await.map_err(|_| GridError::Unavailable("the node stopped".into()))?
    }

    /// The log's end, whether it is the primary, and its whole state.
    pub async fn read(&self) -> Result<NodeView, GridError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Cmd::Read(tx)).await.map_err(|_| GridError::Closed)?;
        rx.await.map_err(|_| GridError::Closed)
    }
}

async fn node_loop(
    mut ep: Endpoint<Vec<u8>>,
    mut log: HeapLog,
    t: Arc<dyn Transport>,
    mut inbox: Inbox,
    mut cmds: mpsc::Receiver<Cmd>,
    origin: tokio::time::Instant,
    heartbeat_ms: u64,
) {
    let now = || origin.elapsed().as_millis() as u64;
    let mut pending: HashMap<u64, oneshot::Sender<Result<Outcome, GridError>>> = HashMap::new();
    let mut next_token = 1u64;
    let mut last_status = 0u64;
    let mut tick = tokio::time::interval(TICK);
    let id = ep.id;
    loop {
        let effects = tokio::select! {
            _ = tick.tick() => {
                let at = now();
                if at.saturating_sub(last_status) >= heartbeat_ms {
                    last_status = at;
                    let w = Wire::Status { pos: ep.pos(), epoch: ep.epoch, primary: ep.is_primary(), sent_ms: at };
                    send(&*t, CONTROLLER, &w);
                }
                match ep.tick(&log, at) {
                    Ok(e) => e,
                    Err(_) => return,
                }
            }
            frame = inbox.recv() => {
                let Some((from, bytes)) = frame else { return };
                let Ok(w) = postcard::from_bytes::<Wire>(&bytes) else { continue };
                match w {
                    Wire::Rep(m) => {
                        let Ok(mut e) = ep.on_replica_msg(&mut log, from, m) else { return };
                        if log.flush().is_err() {
                            return;
                        }
                        // `HeapLog` applies with write(2) per the heap's policy: acked as written.
                        let last = log.last();
                        e.extend(ep.synced::<HeapLog>(last, Some(from)));
                        e
                    }
                    Wire::Prim(m) => ep.on_primary_msg(&log, from, m, now()),
                    Wire::Map(p) => {
                        ep.on_map(&log, &p, now());
                        Vec::new()
                    }
                    Wire::Lease { epoch, until_ms } => {
                        ep.on_lease(epoch, until_ms);
                        Vec::new()
                    }
                    Wire::Status { .. } | Wire::InSync { .. } => Vec::new(),
                }
            }
            cmd = cmds.recv() => {
                let Some(cmd) = cmd else { return };
                match cmd {
                    Cmd::Read(tx) => {
                        let state = log.snapshot().unwrap_or_default();
                        let _ = tx.send((log.last(), ep.is_primary(), state));
                        Vec::new()
                    }
                    Cmd::Write(batch, n, tx) => {
                        let token = next_token;
                        next_token += 1;
                        let at = now();
                        let wrote = ep.write(&mut log, batch.as_bytes().to_vec(), n, token, at + WRITE_DEADLINE_MS, at);
                        if log.flush().is_err() {
                            return;
                        }
                        match wrote {
                            Ok(Ok((lsn, _))) => {
                                let e = ep.synced::<HeapLog>(lsn, None);
                                if n == 0 {
                                    let _ = tx.send(Ok(Outcome::Replicated));
                                } else {
                                    pending.insert(token, tx);
                                }
                                e
                            }
                            Ok(Err(WriteRefused::NoLease)) => {
                                let _ = tx.send(Err(GridError::Unavailable(format!("node {id} holds no lease"))));
                                Vec::new()
                            }
                            Ok(Err(WriteRefused::SteppedDown { current })) => {
                                let why = format!("node {id} is not the primary (epoch {current})");
                                let _ = tx.send(Err(GridError::Unavailable(why)));
                                Vec::new()
                            }
                            Err(e) => {
                                let _ = tx.send(Err(e));
                                return;
                            }
                        }
                    }
                }
            }
        };
        for e in effects {
            match e {
                Effect::ToReplica(to, m) => send(&*t, to, &Wire::Rep(m)),
                Effect::ToPrimary(to, m) => send(&*t, to, &Wire::Prim(m)),
                Effect::Done((token, outcome)) => {
                    if let Some(tx) = pending.remove(&token) {
                        let _ = tx.send(Ok(outcome));
                    }
                }
                Effect::ProposeInSync { epoch, in_sync } => {
                    send(&*t, CONTROLLER, &Wire::InSync { epoch, in_sync })
                }
            }
        }
    }
}

/// The controller's task: the map of one shard, the detector, leases and failovers.
pub fn start_controller(
    mut map: ClusterMap,
    shard: ShardId,
    mut detector: Detector,
    t: Arc<dyn Transport>,
    mut inbox: Inbox,
    origin: tokio::time::Instant,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let now = || origin.elapsed().as_millis() as u64;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    for cmd in detector.decide(&map, now()) {
                        let _ = map.apply(cmd);
                    }
                    if let Some(p) = map.placement(&shard).cloned() {
                        let members: Vec<NodeId> = map.members().map(|m| m.id).collect();
                        for id in members {
                            send(&*t, id, &Wire::Map(p.clone()));
                        }
                    }
                }
                frame = inbox.recv() => {
                    let Some((from, bytes)) = frame else { return };
                    match postcard::from_bytes::<Wire>(&bytes) {
                        Ok(Wire::Status { pos, epoch, primary, sent_ms }) => {
                            let report = Report { shard: shard.clone(), pos, primary_of: primary.then_some(epoch) };
                            for l in detector.heartbeat(&map, from, sent_ms, &[report], now()) {
                                send(&*t, from, &Wire::Lease { epoch: l.epoch, until_ms: l.until_ms });
                            }
                        }
                        Ok(Wire::InSync { epoch, in_sync }) => {
                            if map.apply(MapCmd::SetInSync { shard: shard.clone(), epoch, in_sync }).is_ok()
                                && let Some(p) = map.placement(&shard).cloned()
                            {
                                send(&*t, p.primary, &Wire::Map(p.clone()));
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    })
}
