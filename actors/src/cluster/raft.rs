//! The control plane: the cluster map kept by an openraft group (shared CLUSTER.md, "Control
//! plane"), its RPCs over the node's `Transport`, and `ControlNode`, one node's member of the
//! group.
//!
//! - Every node that listens for peers runs a `ControlNode`: a Raft voter (or a learner while it
//!   joins) whose state machine is the `ClusterMap` (`raft_store.rs`), so every node holds the
//!   map and failover has one answer.
//! - A node started without `--join` initialises a group of itself. A node started with `--join
//!   ADDR` asks the node at ADDR, which answers from the leader (or names it): the leader adds it
//!   as a learner, waits until it caught up, makes it a voter, then records it in the map
//!   (`MapCmd::Join`, with its client address). A restarted node finds its group in its store.
//! - Changes of the map (`propose`, `join`, `remove`) go to the leader: run locally when this
//!   node leads, else sent to the leader it knows (a `NotLeader` answer names a newer one).
//!
//! Frames: a channel byte (`CONTROL_FRAME`), then postcard `Ctl`: `Call { id, addr, req }` answered
//! by `Reply { id, rep }` to the caller (the transport labels frames with their sender; `addr`
//! is where the caller listens, so a node can answer one it did not know). A call not
//! answered within its time is a network error to openraft, which retries.
//!
//! Limits: `CALLS_MAX` calls waiting for answers; `ADMIN_DEADLINE` for a change of the map.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    ClientWriteError, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{
    AnyError, BasicNode, ChangeMembers, Config, Raft, RaftNetwork, RaftNetworkFactory, ServerState,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use super::map::{ClusterMap, MapCmd, Member};
use super::raft_store::RaftStore;
use super::transport::{Inbox, TcpTransport, Transport};
use crate::error::GridError;
use crate::replication::NodeId;

openraft::declare_raft_types!(
    /// The Raft group of the cluster map.
    pub MapRaft: D = MapCmd, R = MapReply
);

/// What applying one command to the map answered.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapReply {
    /// The map's version after it.
    pub version: u64,
    /// Why the map refused it (unchanged).
    pub error: Option<String>,
}

/// The first byte of a control-plane frame (the data plane will use others).
pub const CONTROL_FRAME: u8 = b'C';
/// Calls waiting for their answers; more fail at once.
pub const CALLS_MAX: usize = 4096;
/// How long a change of the map may take (leader changes and joins included).
pub const ADMIN_DEADLINE: Duration = Duration::from_secs(20);
/// How long one forwarded admin request may wait for the leader's answer (a leader that died
/// is not known to have until an election; the caller retries meanwhile).
const ADMIN_CALL: Duration = Duration::from_millis(1500);
/// How often a node checks that the map records it with its current addresses.
const SELF_CHECK: Duration = Duration::from_millis(500);

/// Ids a joining node gives the nodes it knows only by address (`--join`).
const SEED_IDS: u64 = 1 << 63;

#[derive(Debug, Serialize, Deserialize)]
enum Ctl {
    /// `addr`: where the caller listens for peers (its answer goes there).
    Call {
        id: u64,
        addr: String,
        req: Req,
    },
    Reply {
        id: u64,
        rep: Rep,
    },
}

#[derive(Debug, Serialize, Deserialize)]
enum Req {
    Append(AppendEntriesRequest<MapRaft>),
    Vote(VoteRequest<NodeId>),
    Snapshot(InstallSnapshotRequest<MapRaft>),
    Admin(Admin),
}

/// A change of the group or the map, run on the leader.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Admin {
    /// A command for the map.
    Propose(MapCmd),
    /// Make `member` a voter and record it in the map.
    Join(Member),
    /// Take node `id` out of the map and the group (refused while it holds placements).
    Remove(NodeId),
}

#[derive(Debug, Serialize, Deserialize)]
enum Rep {
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    Admin(Result<MapReply, AdminError>),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
enum AdminError {
    /// Ask the leader instead (id and peer address, if known).
    NotLeader(Option<(NodeId, String)>),
    Failed(String),
}

/// What a node knows of the group and the map.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The node answering.
    pub node: NodeId,
    /// Leader, Follower, Candidate or Learner.
    pub role: String,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// The last Raft log index applied to this node's map.
    pub applied: u64,
    pub map: ClusterMap,
    /// Every copy of every shard as this node last heard it report (its detector's view: the
    /// copies' lag behind their primary).
    pub copies: Vec<CopyState>,
}

/// One copy of a shard, as a node's detector last heard it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyState {
    pub table: String,
    pub shard: u32,
    pub node: NodeId,
    /// Its log's last record.
    pub pos: crate::replication::Pos,
    /// How long ago its report arrived.
    pub heard_ms_ago: u64,
}

/// Calls to other nodes and their pending answers.
struct Rpc {
    t: Arc<dyn Transport>,
    /// This node's peer address, sent with every call.
    addr: String,
    next: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Rep>>>,
}

fn frame(c: &Ctl) -> Option<Vec<u8>> {
    let mut out = vec![CONTROL_FRAME];
    postcard::to_io(c, &mut out).ok()?;
    Some(out)
}

impl Rpc {
    async fn call(&self, to: NodeId, req: Req, wait: Duration) -> Result<Rep, String> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if p.len() >= CALLS_MAX {
                return Err(format!("{CALLS_MAX} calls already wait for answers"));
            }
            p.insert(id, tx);
        }
        let Some(bytes) = frame(&Ctl::Call { id, addr: self.addr.clone(), req }) else {
            self.forget(id);
            return Err("a call could not be encoded".into());
        };
        self.t.send(to, bytes);
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(rep)) => Ok(rep),
            _ => {
                self.forget(id);
                Err(format!("node {to} did not answer within {wait:?}"))
            }
        }
    }

    fn forget(&self, id: u64) {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }

    fn answered(&self, id: u64, rep: Rep) {
        if let Some(tx) = self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id) {
            let _ = tx.send(rep);
        }
    }

    fn reply(&self, to: NodeId, id: u64, rep: Rep) {
        if let Some(bytes) = frame(&Ctl::Reply { id, rep }) {
            self.t.send(to, bytes);
        }
    }
}

/// openraft's network: one `Conn` per target, over the shared `Rpc`.
pub struct Net {
    rpc: Arc<Rpc>,
}

pub struct Conn {
    target: NodeId,
    rpc: Arc<Rpc>,
}

impl RaftNetworkFactory<MapRaft> for Net {
    type Network = Conn;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Conn {
        self.rpc.t.set_address(target, &node.addr);
        Conn { target, rpc: self.rpc.clone() }
    }
}

fn unreached<E: std::error::Error>(why: String) -> RPCError<NodeId, BasicNode, E> {
    RPCError::Network(NetworkError::new(&AnyError::error(why)))
}

/// A remote node's answer to a Raft RPC.
type Remote<T, E> = Result<T, RaftError<NodeId, E>>;

impl Conn {
    /// Sends `req` and takes the answer `pick` expects: the remote's error as a `RemoteError`,
    /// anything else (no answer in time, a reply of another kind) as a network error, which
    /// openraft retries.
    async fn call<T, E: std::error::Error>(
        &self,
        req: Req,
        option: &RPCOption,
        pick: fn(Rep) -> Option<Remote<T, E>>,
    ) -> Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>> {
        match self.rpc.call(self.target, req, option.hard_ttl()).await.map(pick) {
            Ok(Some(Ok(r))) => Ok(r),
            Ok(Some(Err(e))) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Ok(None) => Err(unreached("a reply of the wrong kind".into())),
            Err(why) => Err(unreached(why)),
        }
    }
}

impl RaftNetwork<MapRaft> for Conn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<MapRaft>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Req::Append(rpc), &option, |r| if let Rep::Append(r) = r { Some(r) } else { None }).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<MapRaft>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Req::Snapshot(rpc), &option, |r| if let Rep::Snapshot(r) = r { Some(r) } else { None })
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Req::Vote(rpc), &option, |r| if let Rep::Vote(r) = r { Some(r) } else { None }).await
    }
}

/// How a node takes part in a cluster (`heapgrid serve --node-id --peer-listen --join`).
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub node_id: NodeId,
    /// Where this node listens for other nodes.
    pub peer_listen: std::net::SocketAddr,
    /// The peer address other nodes are told (default: the bound `peer_listen`).
    pub advertise_peer: Option<String>,
    /// Where clients reach this node (recorded in the map).
    pub client_addr: String,
    /// Peer addresses of nodes of the cluster to join (none: form a cluster of this node).
    pub join: Vec<String>,
    /// The secret every node of the cluster presents.
    pub cookie: String,
    pub timing: RaftTiming,
    /// Replicas of each shard of a table created in the cluster (fewer if there are fewer
    /// other members), and how many of them a write waits for (`sync`; 0: `async`).
    pub replicas: u32,
    pub sync: u32,
    /// The failure detector's heartbeats, leases and detection time.
    pub detector: super::detector::Timing,
    /// Records a shard's primary keeps in memory for replicas behind (`--repl-retain`).
    pub retain_records: usize,
}

/// Timing of the Raft group.
#[derive(Clone, Copy, Debug)]
pub struct RaftTiming {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
}

impl Default for RaftTiming {
    fn default() -> Self {
        RaftTiming { heartbeat_ms: 40, election_min_ms: 120, election_max_ms: 240 }
    }
}

/// This node's member of the control group.
pub struct ControlNode {
    me: Member,
    raft: Raft<MapRaft>,
    store: RaftStore,
    rpc: Arc<Rpc>,
    /// The map as this node applies it (one receiver, read on the request path).
    map: watch::Receiver<ClusterMap>,
    /// Frames of the other channels (replication), until the data plane takes them.
    data: Mutex<Option<Inbox>>,
    leader: watch::Receiver<Option<NodeId>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for ControlNode {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn failed(e: impl std::fmt::Display) -> GridError {
    GridError::Unavailable(format!("cluster: {e}"))
}

impl ControlNode {
    /// Listens for peers as `opts` says and starts this node's member of the group, with its
    /// Raft state in `dir` (`<data>/cluster`).
    pub async fn listen(opts: &ClusterOptions, dir: &std::path::Path) -> Result<ControlNode, GridError> {
        let (t, inbox) = TcpTransport::bind(opts.node_id, opts.peer_listen, &opts.cookie)
            .await
            .map_err(|e| GridError::Storage(format!("peer listener on {}: {e}", opts.peer_listen)))?;
        let peer_addr = opts.advertise_peer.clone().unwrap_or_else(|| t.local_addr().to_string());
        let me = Member { id: opts.node_id, addr: opts.client_addr.clone(), peer_addr };
        ControlNode::start(me, dir, t, inbox, opts.join.clone(), opts.timing).await
    }

    /// Starts node `me` of the group over `transport` (whose frames arrive in `inbox`), with its
    /// Raft state in `dir`. With no `join`, a node that has no group yet forms one of itself;
    /// with `join`, it asks those nodes (by peer address) to add it, in the background, until
    /// one has (an operator's `cluster add` does the same from the other side).
    pub async fn start(
        me: Member,
        dir: &std::path::Path,
        transport: Arc<dyn Transport>,
        inbox: Inbox,
        join: Vec<String>,
        timing: RaftTiming,
    ) -> Result<ControlNode, GridError> {
        if me.id == 0 || me.id >= SEED_IDS {
            return Err(GridError::Invalid(format!("a node id is 1 to {}", SEED_IDS - 1)));
        }
        let store = RaftStore::open(dir, me.id)?;
        let config = Config {
            cluster_name: "heapgrid".into(),
            heartbeat_interval: timing.heartbeat_ms,
            election_timeout_min: timing.election_min_ms,
            election_timeout_max: timing.election_max_ms,
            ..Config::default()
        };
        let config = Arc::new(config.validate().map_err(failed)?);
        let rpc = Arc::new(Rpc {
            t: transport,
            addr: me.peer_addr.clone(),
            next: AtomicU64::new(1),
            pending: Mutex::default(),
        });
        let (log, machine) = openraft::storage::Adaptor::new(store.clone());
        let raft = Raft::new(me.id, config, Net { rpc: rpc.clone() }, log, machine).await.map_err(failed)?;
        // The addresses of the group's members, for the transport.
        for (id, node) in raft.metrics().borrow().membership_config.nodes() {
            rpc.t.set_address(*id, &node.addr);
        }
        let (data_tx, data) = tokio::sync::mpsc::channel(super::transport::INBOX_MAX);
        let (leader_tx, leader) = watch::channel(None);
        let map = store.watch();
        let mut node = ControlNode {
            me,
            raft,
            store,
            rpc,
            map,
            data: Mutex::new(Some(data)),
            leader,
            tasks: Vec::new(),
        };
        let serving = serve(node.raft.clone(), node.rpc.clone(), node.store.clone(), inbox, data_tx);
        node.tasks.push(tokio::spawn(serving));
        let mut metrics = node.raft.metrics();
        node.tasks.push(tokio::spawn(async move {
            loop {
                let l = metrics.borrow_and_update().current_leader;
                leader_tx.send_if_modified(|old| std::mem::replace(old, l) != l);
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        }));
        let initialized = node.raft.is_initialized().await.map_err(failed)?;
        if !initialized {
            if join.is_empty() {
                let mut members = BTreeMap::new();
                members.insert(node.me.id, BasicNode::new(&node.me.peer_addr));
                node.raft.initialize(members).await.map_err(failed)?;
            } else {
                node.tasks.push(tokio::spawn(join_through(node.rpc.clone(), node.me.clone(), join)));
            }
        }
        let keep = keep_recorded(node.raft.clone(), node.rpc.clone(), node.store.clone(), node.me.clone());
        node.tasks.push(tokio::spawn(keep));
        Ok(node)
    }

    pub fn id(&self) -> NodeId {
        self.me.id
    }

    /// The peer address other nodes are told.
    pub fn peer_addr(&self) -> &str {
        &self.me.peer_addr
    }

    /// Whether the map lists table `name` (borrowed, not cloned).
    pub fn has_table(&self, name: &str) -> bool {
        self.map.borrow().table(name).is_some()
    }

    /// The transport to the other nodes.
    pub fn transport(&self) -> Arc<dyn Transport> {
        self.rpc.t.clone()
    }

    /// The frames other nodes send on channels other than the control plane's (once).
    pub fn take_data_inbox(&self) -> Option<Inbox> {
        self.data.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// The Raft leader this node knows, as it changes.
    pub fn leader(&self) -> watch::Receiver<Option<NodeId>> {
        self.leader.clone()
    }

    /// Whether this node leads the group now.
    pub fn is_leader(&self) -> bool {
        *self.leader.borrow() == Some(self.me.id)
    }

    /// Whether this node leads the group and a quorum acknowledged it within `max_ms`: a leader
    /// cut off from the others still believes it leads until it hears of a newer term, so
    /// leases are granted only under this (see `data.rs`).
    pub fn leads_with_quorum(&self, max_ms: u64) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        m.state == ServerState::Leader && m.millis_since_quorum_ack.is_some_and(|ms| ms <= max_ms)
    }

    /// The map as this node last applied it.
    pub fn map(&self) -> ClusterMap {
        self.map.borrow().clone()
    }

    /// The map's changes as this node applies them.
    pub fn watch(&self) -> watch::Receiver<ClusterMap> {
        self.map.clone()
    }

    /// What this node knows of the group.
    pub fn status(&self) -> ClusterStatus {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let learners: Vec<NodeId> = membership.learner_ids().collect();
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shut down",
        };
        ClusterStatus {
            node: self.me.id,
            role: role.into(),
            leader: m.current_leader,
            term: m.current_term,
            voters,
            learners,
            applied: m.last_applied.map_or(0, |l| l.index),
            map: self.map(),
            copies: Vec::new(),
        }
    }

    /// Runs `a` on the leader (here, or sent to it), retrying through leader changes until
    /// `ADMIN_DEADLINE`.
    pub async fn admin(&self, a: Admin) -> Result<MapReply, GridError> {
        admin(&self.raft, &self.rpc, &self.store, self.me.id, a).await.and_then(reply_result_map)
    }

    /// Stops the Raft node.
    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }
}

/// Asks the nodes at `seeds` (peer addresses) to add this one, trying them in turn (and the
/// leader one names) until one has; a refusal by the map ends it.
async fn join_through(rpc: Arc<Rpc>, me: Member, seeds: Vec<String>) {
    let mut tried = 0usize;
    let mut complained = tokio::time::Instant::now();
    loop {
        let i = tried % seeds.len();
        let seed_id = SEED_IDS + i as u64;
        rpc.t.set_address(seed_id, &seeds[i]);
        let mut r = admin_at(&rpc, seed_id, Admin::Join(me.clone())).await;
        if let Err(AdminError::NotLeader(Some((id, addr)))) = &r {
            rpc.t.set_address(*id, addr);
            r = admin_at(&rpc, *id, Admin::Join(me.clone())).await;
        }
        match r {
            Ok(MapReply { error: None, version }) => {
                tracing::info!(node = me.id, version, "joined the cluster");
                return;
            }
            Ok(MapReply { error: Some(e), .. }) => {
                tracing::error!(node = me.id, "the cluster map refused this node: {e}");
                return;
            }
            Err(e) if complained.elapsed() >= ADMIN_DEADLINE => {
                complained = tokio::time::Instant::now();
                tracing::warn!(node = me.id, ?seeds, "still joining the cluster: {e:?}");
            }
            Err(_) => {}
        }
        tried += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn reply_result_map(r: MapReply) -> Result<MapReply, GridError> {
    match r.error {
        Some(e) => Err(GridError::Invalid(format!("the cluster map refused it: {e}"))),
        None => Ok(r),
    }
}

async fn admin_at(rpc: &Rpc, to: NodeId, a: Admin) -> Result<MapReply, AdminError> {
    match rpc.call(to, Req::Admin(a), ADMIN_CALL).await {
        Ok(Rep::Admin(r)) => r,
        Ok(_) => Err(AdminError::Failed("a reply of the wrong kind".into())),
        Err(why) => Err(AdminError::Failed(why)),
    }
}

async fn admin(
    raft: &Raft<MapRaft>,
    rpc: &Rpc,
    store: &RaftStore,
    me: NodeId,
    a: Admin,
) -> Result<MapReply, GridError> {
    let until = tokio::time::Instant::now() + ADMIN_DEADLINE;
    let mut last;
    loop {
        let leader = raft.metrics().borrow().current_leader;
        let r = match leader {
            Some(l) if l == me => lead_admin(raft, rpc, store, a.clone()).await,
            Some(l) => admin_at(rpc, l, a.clone()).await,
            None => Err(AdminError::NotLeader(None)),
        };
        match r {
            Ok(r) => return Ok(r),
            Err(AdminError::NotLeader(Some((id, addr)))) => {
                rpc.t.set_address(id, &addr);
                last = format!("node {id} leads");
            }
            Err(AdminError::NotLeader(None)) => last = "no leader known".into(),
            Err(AdminError::Failed(why)) => last = why,
        }
        if tokio::time::Instant::now() >= until {
            return Err(failed(format!("the map could not be changed within {ADMIN_DEADLINE:?}: {last}")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> AdminError {
    match e.forward_to_leader() {
        Some(f) => AdminError::NotLeader(f.leader_id.zip(f.leader_node.as_ref().map(|n| n.addr.clone()))),
        None => AdminError::Failed(e.to_string()),
    }
}

fn in_group(raft: &Raft<MapRaft>, id: NodeId) -> bool {
    raft.metrics().borrow().membership_config.membership().get_node(&id).is_some()
}

/// Runs an admin request as the leader (a `NotLeader` if this node is not, or stopped being).
async fn lead_admin(
    raft: &Raft<MapRaft>,
    rpc: &Rpc,
    store: &RaftStore,
    a: Admin,
) -> Result<MapReply, AdminError> {
    match a {
        Admin::Propose(MapCmd::Join(m)) if !in_group(raft, m.id) => {
            // A node records itself only while it is in the group (not after its removal).
            Err(AdminError::Failed(format!("node {} is not in the Raft group", m.id)))
        }
        Admin::Propose(cmd) => raft.client_write(cmd).await.map(|r| r.data).map_err(write_error),
        Admin::Join(member) => {
            rpc.t.set_address(member.id, &member.peer_addr);
            let voters: BTreeSet<NodeId> =
                raft.metrics().borrow().membership_config.membership().voter_ids().collect();
            if !voters.contains(&member.id) {
                raft.add_learner(member.id, BasicNode::new(&member.peer_addr), true)
                    .await
                    .map_err(write_error)?;
                let add = ChangeMembers::AddVoterIds(BTreeSet::from([member.id]));
                raft.change_membership(add, false).await.map_err(write_error)?;
            }
            raft.client_write(MapCmd::Join(member)).await.map(|r| r.data).map_err(write_error)
        }
        Admin::Remove(id) => {
            // Refused while it holds placements, before the group changes.
            let mut probe = store.map();
            if let Err(e @ super::map::MapError::InUse(_)) = probe.apply(MapCmd::Leave(id)) {
                return Ok(MapReply { version: probe.version, error: Some(format!("{e:?}")) });
            }
            // Out of the group first: a node still in it records itself in the map again.
            let m = raft.metrics().borrow().membership_config.membership().clone();
            if m.voter_ids().any(|v| v == id) {
                let drop = ChangeMembers::RemoveVoters(BTreeSet::from([id]));
                raft.change_membership(drop, false).await.map_err(write_error)?;
            } else if m.learner_ids().any(|v| v == id) {
                let drop = ChangeMembers::RemoveNodes(BTreeSet::from([id]));
                raft.change_membership(drop, false).await.map_err(write_error)?;
            }
            raft.client_write(MapCmd::Leave(id)).await.map(|r| r.data).map_err(write_error)
        }
    }
}

/// Serves the frames other nodes send: Raft RPCs and admin requests (each on its own task, so a
/// slow one holds up nothing), and the answers to this node's calls.
async fn serve(
    raft: Raft<MapRaft>,
    rpc: Arc<Rpc>,
    store: RaftStore,
    mut inbox: Inbox,
    data: tokio::sync::mpsc::Sender<(NodeId, Vec<u8>)>,
) {
    while let Some((from, bytes)) = inbox.recv().await {
        let body = match bytes.split_first() {
            Some((&CONTROL_FRAME, body)) => body,
            Some(_) => {
                // Full: dropped (the replication protocol resends).
                let _ = data.try_send((from, bytes));
                continue;
            }
            None => continue,
        };
        let Ok(ctl) = postcard::from_bytes::<Ctl>(body) else {
            tracing::warn!(from, "an undecodable control frame was dropped");
            continue;
        };
        match ctl {
            Ctl::Reply { id, rep } => rpc.answered(id, rep),
            Ctl::Call { id, addr, req } => {
                rpc.t.set_address(from, &addr);
                let (raft, rpc, store) = (raft.clone(), rpc.clone(), store.clone());
                tokio::spawn(async move {
                    let rep = match req {
                        Req::Append(r) => Rep::Append(raft.append_entries(r).await),
                        Req::Vote(r) => Rep::Vote(raft.vote(r).await),
                        Req::Snapshot(r) => Rep::Snapshot(raft.install_snapshot(r).await),
                        Req::Admin(a) => {
                            let me = raft.metrics().borrow().id;
                            let leader = raft.metrics().borrow().current_leader;
                            Rep::Admin(match leader {
                                Some(l) if l == me => lead_admin(&raft, &rpc, &store, a).await,
                                Some(l) => {
                                    let addr = raft
                                        .metrics()
                                        .borrow()
                                        .membership_config
                                        .membership()
                                        .get_node(&l)
                                        .map(|n| n.addr.clone());
                                    Err(AdminError::NotLeader(addr.map(|a| (l, a))))
                                }
                                None => Err(AdminError::NotLeader(None)),
                            })
                        }
                    };
                    rpc.reply(from, id, rep);
                });
            }
        }
    }
}

/// Keeps this node recorded in the map with its current addresses (after it formed a group of
/// itself, or restarted with new addresses), and the transport told where the group's members
/// are.
async fn keep_recorded(raft: Raft<MapRaft>, rpc: Arc<Rpc>, store: RaftStore, me: Member) {
    let mut metrics = raft.metrics();
    loop {
        let (leader, voter) = {
            let m = metrics.borrow_and_update();
            for (id, node) in m.membership_config.nodes() {
                rpc.t.set_address(*id, &node.addr);
            }
            (m.current_leader, m.membership_config.membership().voter_ids().any(|v| v == me.id))
        };
        if voter && leader.is_some() && store.map().member(me.id) != Some(&me) {
            let cmd = Admin::Propose(MapCmd::Join(me.clone()));
            if let Err(e) = admin(&raft, &rpc, &store, me.id, cmd).await {
                tracing::warn!(node = me.id, "could not record this node in the cluster map: {e}");
            }
        }
        tokio::select! {
            _ = metrics.changed() => {}
            _ = tokio::time::sleep(SELF_CHECK) => {}
        }
    }
}
