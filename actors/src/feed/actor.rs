//! The feed shard actor: a thin wrapper that owns one `FeedShard` (one heap) behind the reply
//! gate (`crate::gate`) and executes its messages strictly in order, like a table shard.
//!
//! Tail-follow without polling: a read (or cursor read) with `wait_ms` that finds nothing parks
//! here as a `Waiter`; the append that gives it something answers it (through the gate, so the
//! reader never sees a record before its writer is acknowledged), and a timer message answers
//! it empty at its deadline. Parked waiters are bounded (`FEED_WAITERS_MAX`), and so is their
//! wait (`FEED_WAIT_MS_MAX`).
//!
//! The actor reads the clock (segment open and seal times, retention by age) and hands the time
//! to the state machine; the op-log records carry the result, so replaying them is
//! deterministic.
//!
//! Invariant: every request is answered (or its port dropped, an error to its caller): parked
//! waiters are answered at an append, at their deadline, or with `Closed`/the actor's death.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use heapgrid_heap::HeapOptions;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::{Appended, CursorInfo, FeedRecord, FeedShard, FeedState, Pos, ReadResult, SegmentPolicy};
use crate::error::GridError;
use crate::gate::{
    Deferred, GateCall, GateMsg, Group, HeapOwner, LogGate, ReadView, deferred, fail_if_poisoned, open_heap,
};
use crate::replication::service::answer_held;
use crate::replication::shard::ShardRepl;
use crate::value::Value;

/// Longest a reader may wait for an append.
pub const FEED_WAIT_MS_MAX: u64 = 300_000;
/// Most readers parked on one feed at once.
pub const FEED_WAITERS_MAX: usize = 10_000;

type Reply<T> = RpcReplyPort<Result<T, GridError>>;

/// An append: the value, and the caller's id if it chose one.
pub struct AppendReq {
    pub value: Value,
    pub id: Option<u64>,
    /// `(lock, fence)` pairs that must all be current for the append to apply (docs/locks.md).
    pub fences: Vec<(String, u64)>,
}

impl AppendReq {
    /// An unfenced append.
    pub fn new(value: Value, id: Option<u64>) -> AppendReq {
        AppendReq { value, id, fences: Vec::new() }
    }
}

/// A forward read: after `after`, at most `n`, waiting up to `wait_ms` for a first record.
#[derive(Clone, Copy, Debug)]
pub struct ReadReq {
    pub after: Pos,
    pub n: u32,
    pub wait_ms: u64,
}

/// A cursor read: advance cursor `name` past at most `n` records, waiting up to `wait_ms`.
pub struct CursorReadReq {
    pub name: String,
    pub n: u32,
    pub wait_ms: u64,
}

/// Messages a feed shard actor handles.
pub enum FeedMsg {
    Append(AppendReq, Reply<Appended>),
    /// Several appends of one connection, each its own op-log record, answered together.
    Appends(Vec<AppendReq>, Reply<Vec<Result<Appended, GridError>>>),
    Get(u64, Reply<Option<FeedRecord>>),
    Remove(u64, Reply<()>),
    Read(ReadReq, Reply<ReadResult>),
    /// Newest first, below the id (`None`: from the top).
    ReadBack((Option<u64>, u32), Reply<ReadResult>),
    CursorSet((String, Pos), Reply<CursorInfo>),
    CursorGet(String, Reply<CursorInfo>),
    CursorRead(CursorReadReq, Reply<ReadResult>),
    CursorDelete(String, Reply<bool>),
    Cursors((), Reply<Vec<CursorInfo>>),
    /// Keep the newest n records; answers how many were dropped.
    Trim(u64, Reply<u64>),
    /// Drop the records below the id; answers how many were dropped.
    Cut(u64, Reply<u64>),
    Rotate((), Reply<()>),
    SetVersion(u32, Reply<()>),
    State((), Reply<FeedState>),
    /// Roll by age and apply retention (from the supervisor's tick, or after a segment filled).
    Maintain,
    /// A parked waiter's deadline.
    WaitExpired(u64),
    Checkpoint(Option<Reply<()>>),
    Close(Reply<()>),
    /// The heap's figures (handled by the gate).
    Stats(Reply<heapgrid_heap::HeapStats>),
    /// Drop clean resident pages (the memory budget; handled by the gate).
    Shed(u64, Reply<heapgrid_heap::ShedReport>),
    Flush,
    Durable(Vec<Group>),
    CheckpointDone,
    /// The cluster map placed the feed (a replicated feed).
    Placement(crate::cluster::map::Placement),
    /// A replication frame from another node.
    Repl(crate::replication::NodeId, crate::replication::shard::ReplWire),
    /// The replication tick.
    ReplTick,
    /// This node's copy of the feed, summarised (any role).
    Digest(Reply<crate::replication::shard::ShardDigest>),
    /// Test hook: panic inside the handler, as a bug would.
    #[doc(hidden)]
    InjectPanic,
}

crate::gate::impl_gate_msg!(FeedMsg);

#[derive(Clone)]
pub struct FeedArgs {
    pub path: PathBuf,
    pub heap: HeapOptions,
    pub policy: SegmentPolicy,
    pub view: Arc<ReadView>,
    /// Where fenced appends are checked.
    pub fences: Arc<crate::lock::fence::FenceTable>,
    /// The node's replication network, once it is in a cluster: a feed the map places is
    /// replicated (a feed created before the node joined stays local).
    pub cluster: crate::grid::ClusterNet,
    /// The feed's name in the cluster map (`cluster::map::feed_map_name`).
    pub map_name: String,
}

enum Waiting {
    Read { after: u64, n: u32, reply: Reply<ReadResult> },
    Cursor { name: String, n: u32, reply: Reply<ReadResult> },
}

struct Waiter {
    id: u64,
    what: Waiting,
    /// The deadline's timer task, aborted when an append answers the waiter first (so a
    /// follower re-parking after every record leaves no sleeping tasks behind).
    timer: tokio::task::AbortHandle,
}

pub struct FeedShardState {
    gate: LogGate<FeedShard>,
    waiters: Vec<Waiter>,
    next_waiter: u64,
    /// Whether retention or rolling can ever drop or seal anything (else `Maintain` is moot).
    maintains: bool,
    fences: Arc<crate::lock::fence::FenceTable>,
    /// The feed's replication, once the map places it.
    repl: Option<Box<ShardRepl>>,
    args: FeedArgs,
    /// Replication failed while handling a message: the actor fails after it (restart =
    /// recovery).
    failed: Option<String>,
}

/// Appends `req` unless one of its fences is stale (then nothing is appended: `StaleFence`).
/// Checked and applied in one message of the feed's actor, so no grant can change between.
fn append_fenced(
    feed: &mut FeedShard,
    fences: &crate::lock::fence::FenceTable,
    req: &AppendReq,
    now: u64,
) -> Result<Appended, GridError> {
    for (lock, fence) in &req.fences {
        fences.check(lock, *fence)?;
    }
    feed.append(&req.value, req.id, now)
}

/// Wall-clock milliseconds since the epoch (segment times).
fn now_ms() -> u64 {
    crate::stats::unix_ms()
}

fn closed<T>() -> Result<T, GridError> {
    Err(GridError::Closed)
}

impl FeedShardState {
    /// `gate.answer`, holding a replicated write's answer for its replicas too.
    fn answer(&mut self, myself: &ActorRef<FeedMsg>, wrote: u64, d: impl FnOnce(u64) -> Deferred) {
        let name = &self.args.map_name;
        let r =
            answer_held(self.repl.as_deref_mut(), &mut self.gate, myself, wrote, false, || name.clone(), d);
        if let Err(e) = r {
            self.failed = Some(e.to_string());
        }
    }

    /// Starts replicating once the map places this feed (and the node is in a cluster).
    fn replicate(&mut self, myself: &ActorRef<FeedMsg>) -> Result<(), GridError> {
        let (Some(net), None) = (self.args.cluster.get(), &self.repl) else { return Ok(()) };
        if net.placement(&self.args.map_name, 0).is_none() {
            return Ok(());
        }
        let Some(feed) = self.gate.shard.as_mut() else { return Ok(()) };
        let me = myself.clone();
        let repl = ShardRepl::open(
            net.clone(),
            &self.args.map_name,
            0,
            feed.heap_mut(),
            &self.args.path,
            self.args.heap.fsync,
            move || me.cast(FeedMsg::ReplTick).is_ok(),
        )?;
        self.repl = Some(Box::new(repl));
        Ok(())
    }

    /// Whether a request may run here now (always, unless the feed is replicated and this
    /// node is not its primary holding a lease).
    fn admit(&mut self) -> Result<(), GridError> {
        match self.repl.as_mut() {
            Some(r) => r.admit(),
            None => Ok(()),
        }
    }

    /// After replication changed the heap or the role: the container is read again (a
    /// replica's records were applied to the heap directly), and readers parked at a node that
    /// is no longer the primary are answered `NotPrimary`.
    fn replicated(&mut self) -> Result<(), GridError> {
        if let Some(f) = self.gate.shard.as_mut() {
            f.reload()?;
        }
        if self.repl.as_ref().is_some_and(|r| !r.serving()) && !self.waiters.is_empty() {
            let e = self.repl.as_mut().and_then(|r| r.admit().err());
            let e = e.unwrap_or_else(|| GridError::Unavailable("the feed moved to another node".into()));
            for w in std::mem::take(&mut self.waiters) {
                w.timer.abort();
                match w.what {
                    Waiting::Read { reply, .. } | Waiting::Cursor { reply, .. } => {
                        drop(reply.send(Err(e.clone())))
                    }
                }
            }
        }
        Ok(())
    }

    /// Parks a reader until an append gives it records, or `wait_ms` passes.
    fn park(&mut self, myself: &ActorRef<FeedMsg>, what: Waiting, wait_ms: u64) {
        if self.waiters.len() >= FEED_WAITERS_MAX {
            let e = Err(GridError::LimitExceeded {
                what: "readers waiting on one feed".into(),
                got: self.waiters.len() as u64 + 1,
                max: FEED_WAITERS_MAX as u64,
            });
            match what {
                Waiting::Read { reply, .. } | Waiting::Cursor { reply, .. } => drop(reply.send(e)),
            }
            return;
        }
        let id = self.next_waiter;
        self.next_waiter += 1;
        let wait = Duration::from_millis(wait_ms.min(FEED_WAIT_MS_MAX));
        let timer = myself.send_after(wait, move || FeedMsg::WaitExpired(id)).abort_handle();
        self.waiters.push(Waiter { id, what, timer });
    }

    /// After an append: answers every parked reader that now has records.
    fn wake(&mut self, myself: &ActorRef<FeedMsg>) {
        if self.waiters.is_empty() {
            return;
        }
        let top = self.gate.shard.as_ref().map_or(0, |f| f.top());
        let waiters = std::mem::take(&mut self.waiters);
        for w in waiters {
            let ready = match &w.what {
                Waiting::Read { after, .. } => *after < top,
                // A cursor's position may have moved (another reader of the same cursor).
                Waiting::Cursor { name, .. } => self
                    .gate
                    .shard
                    .as_ref()
                    .and_then(|f| f.cursor_pos(name).ok().flatten())
                    .is_none_or(|at| at < top),
            };
            if !ready {
                self.waiters.push(w);
                continue;
            }
            w.timer.abort();
            self.serve(myself, w.what);
        }
    }

    /// Answers a waiter now with whatever is there (maybe nothing).
    fn serve(&mut self, myself: &ActorRef<FeedMsg>, what: Waiting) {
        let Some(f) = self.gate.shard.as_mut() else {
            match what {
                Waiting::Read { reply, .. } | Waiting::Cursor { reply, .. } => drop(reply.send(closed())),
            }
            return;
        };
        match what {
            Waiting::Read { after, n, reply } => {
                let r = f.read_after(after, n);
                self.answer(myself, 0, |lsn| deferred(lsn, reply, r));
            }
            Waiting::Cursor { name, n, reply } => {
                let r = f.cursor_read(&name, n);
                let wrote = r.as_ref().map_or(0, |(_, l)| *l);
                self.answer(myself, wrote, |lsn| deferred(lsn, reply, r.map(|(r, _)| r)));
            }
        }
    }
}

/// The feed shard actor (empty: everything lives in its state).
pub struct FeedActor;

impl Actor for FeedActor {
    type Msg = FeedMsg;
    type State = FeedShardState;
    type Arguments = FeedArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<FeedMsg>,
        args: FeedArgs,
    ) -> Result<FeedShardState, ActorProcessingErr> {
        let heap = open_heap(&args.path, &args.heap).await?;
        let maintains = args.policy.roll_after_ms.is_some()
            || args.policy.retention.keep_segments.is_some()
            || args.policy.retention.max_age_ms.is_some();
        let mut feed = FeedShard::open(heap, args.policy.clone())?;
        feed.set_deferred_log(true);
        let gate = LogGate::new(feed, args.heap.fsync, args.view.clone(), myself.clone())?
            .named(args.path.display().to_string());
        let fences = args.fences.clone();
        let mut st = FeedShardState {
            gate,
            waiters: Vec::new(),
            next_waiter: 0,
            maintains,
            fences,
            repl: None,
            args,
            failed: None,
        };
        st.replicate(&myself)?;
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<FeedMsg>,
        msg: FeedMsg,
        state: &mut FeedShardState,
    ) -> Result<(), ActorProcessingErr> {
        let msg = match msg.into_gate() {
            Ok(call) => {
                let closing = matches!(call, GateCall::Close(_));
                state.gate.handle(&myself, call).await?;
                // What the flush wrote may ship now.
                if let (Some(repl), Some(f)) = (state.repl.as_mut(), state.gate.shard.as_mut()) {
                    repl.ship(f.heap_mut())?;
                }
                if closing {
                    for w in std::mem::take(&mut state.waiters) {
                        w.timer.abort();
                        state.serve(&myself, w.what);
                    }
                }
                return Ok(());
            }
            Err(msg) => msg,
        };
        let msg = match msg {
            FeedMsg::WaitExpired(id) => {
                if let Some(i) = state.waiters.iter().position(|w| w.id == id) {
                    let w = state.waiters.swap_remove(i);
                    state.serve(&myself, w.what);
                }
                return fail_if_poisoned(&mut state.gate);
            }
            FeedMsg::InjectPanic => panic!("injected panic (test hook)"),
            FeedMsg::Placement(p) => {
                state.replicate(&myself)?;
                if let (Some(repl), Some(f)) = (state.repl.as_mut(), state.gate.shard.as_mut()) {
                    repl.on_placement(f.heap_mut(), &p);
                }
                state.replicated()?;
                return fail_if_poisoned(&mut state.gate);
            }
            FeedMsg::Repl(from, wire) => {
                state.replicate(&myself)?;
                if let (Some(repl), Some(f)) = (state.repl.as_mut(), state.gate.shard.as_mut()) {
                    repl.on_frame(f.heap_mut(), from, wire)?;
                }
                state.replicated()?;
                return fail_if_poisoned(&mut state.gate);
            }
            FeedMsg::ReplTick => {
                if let (Some(repl), Some(f)) = (state.repl.as_mut(), state.gate.shard.as_mut()) {
                    repl.tick(f.heap_mut())?;
                }
                return fail_if_poisoned(&mut state.gate);
            }
            FeedMsg::Digest(reply) => {
                let r = match (state.repl.as_ref(), state.gate.shard.as_ref()) {
                    (Some(repl), Some(f)) => repl.digest(f.heap()),
                    (None, Some(f)) => crate::replication::shard::digest_of(f.heap(), Default::default()),
                    _ => Err(GridError::Closed),
                };
                state.gate.answer(&myself, 0, |lsn| deferred(lsn, reply, r));
                return Ok(());
            }
            // Retention and rolling run at the primary only (a replica applies their records).
            FeedMsg::Maintain if state.admit().is_err() => return Ok(()),
            msg => msg,
        };
        state.replicate(&myself)?;
        if let Err(e) = state.admit() {
            refuse(msg, e);
            return Ok(());
        }
        let gate = &mut state.gate;
        let Some(feed) = gate.shard.as_mut() else {
            refuse_closed(msg);
            return Ok(());
        };
        match msg {
            FeedMsg::Append(req, reply) => {
                let r = append_fenced(feed, &state.fences, &req, now_ms());
                let (wrote, sealed) = r.as_ref().map_or((0, false), |a| (a.lsn, a.sealed));
                state.answer(&myself, wrote, |lsn| deferred(lsn, reply, r));
                if sealed && state.maintains {
                    let _ = myself.cast(FeedMsg::Maintain);
                }
                if wrote != 0 {
                    state.wake(&myself);
                }
            }
            FeedMsg::Appends(reqs, reply) => {
                let now = now_ms();
                let (mut wrote, mut sealed) = (0, false);
                let results: Vec<Result<Appended, GridError>> = reqs
                    .into_iter()
                    .map(|req| {
                        let r = append_fenced(feed, &state.fences, &req, now);
                        if let Ok(a) = &r {
                            wrote = wrote.max(a.lsn);
                            sealed |= a.sealed;
                        }
                        r
                    })
                    .collect();
                state.answer(&myself, wrote, |lsn| crate::gate::Deferred {
                    lsn,
                    answer: Box::new(move |err| {
                        let _ = reply.send(match err {
                            None => Ok(results),
                            Some(e) => Err(e.clone()),
                        });
                    }),
                });
                if sealed && state.maintains {
                    let _ = myself.cast(FeedMsg::Maintain);
                }
                if wrote != 0 {
                    state.wake(&myself);
                }
            }
            FeedMsg::Get(id, reply) => {
                let r = feed.get(id);
                state.answer(&myself, 0, |lsn| deferred(lsn, reply, r));
            }
            FeedMsg::Remove(id, reply) => {
                let r = feed.remove(id);
                let wrote = *r.as_ref().unwrap_or(&0);
                state.answer(&myself, wrote, |lsn| deferred(lsn, reply, r.map(|_| ())));
            }
            FeedMsg::Read(req, reply) => match feed.resolve(req.after) {
                Err(e) => drop(reply.send(Err(e))),
                Ok(after) => {
                    let r = feed.read_after(after, req.n);
                    let empty = r.as_ref().is_ok_and(|r| r.records.is_empty());
                    if empty && req.wait_ms > 0 && req.n > 0 {
                        state.park(&myself, Waiting::Read { after, n: req.n, reply }, req.wait_ms);
                    } else {
                        state.answer(&myself, 0, |lsn| deferred(lsn, reply, r));
                    }
                }
            },
            FeedMsg::ReadBack((before, n), reply) => {
                let r = feed.read_back(before, n);
                state.answer(&myself, 0, |lsn| deferred(lsn, reply, r));
            }
            FeedMsg::CursorSet((name, pos), reply) => {
                let r = feed.cursor_set(&name, pos);
                let wrote = r.as_ref().map_or(0, |(_, l)| *l);
                state.answer(&myself, wrote, |lsn| deferred(lsn, reply, r.map(|(c, _)| c)));
            }
            FeedMsg::CursorGet(name, reply) => {
                let r = feed.cursor_get(&name);
                state.answer(&myself, 0, |lsn| deferred(lsn, reply, r));
            }
            FeedMsg::CursorRead(req, reply) => {
                let r = feed.cursor_read(&req.name, req.n);
                let empty = r.as_ref().is_ok_and(|(r, _)| r.records.is_empty());
                if empty && req.wait_ms > 0 && req.n > 0 {
                    state.park(&myself, Waiting::Cursor { name: req.name, n: req.n, reply }, req.wait_ms);
                } else {
                    let wrote = r.as_ref().map_or(0, |(_, l)| *l);
                    state.answer(&myself, wrote, |lsn| deferred(lsn, reply, r.map(|(r, _)| r)));
                }
            }
            FeedMsg::CursorDelete(name, reply) => {
                let r = feed.cursor_delete(&name);
                let wrote = r.as_ref().map_or(0, |(_, l)| *l);
                state.answer(&myself, wrote, |lsn| deferred(lsn, reply, r.map(|(b, _)| b)));
            }
            FeedMsg::Cursors((), reply) => {
                let r = feed.cursors();
                state.answer(&myself, 0, |lsn| deferred(lsn, reply, r));
            }
            FeedMsg::Trim(keep, reply) => {
                let r = feed.trim(keep);
                let wrote = r.as_ref().map_or(0, |(_, l)| *l);
                state.answer(&myself, wrote, |lsn| deferred(lsn, reply, r.map(|(d, _)| d)));
            }
            FeedMsg::Cut(before, reply) => {
                let r = feed.cut(before);
                let wrote = r.as_ref().map_or(0, |(_, l)| *l);
                state.answer(&myself, wrote, |lsn| deferred(lsn, reply, r.map(|(d, _)| d)));
            }
            FeedMsg::Rotate((), reply) => {
                let r = feed.rotate(now_ms());
                let wrote = *r.as_ref().unwrap_or(&0);
                state.answer(&myself, wrote, |lsn| deferred(lsn, reply, r.map(|_| ())));
            }
            FeedMsg::SetVersion(v, reply) => {
                let r = feed.set_version(v, now_ms());
                let wrote = *r.as_ref().unwrap_or(&0);
                state.answer(&myself, wrote, |lsn| deferred(lsn, reply, r.map(|_| ())));
            }
            FeedMsg::State((), reply) => {
                let r = feed.state();
                state.answer(&myself, 0, |lsn| deferred(lsn, reply, r));
            }
            FeedMsg::Maintain => {
                // A failure here (a full disk) leaves the feed as it was; the next tick retries.
                if let Ok((_, lsn)) = feed.maintain(now_ms())
                    && lsn != 0
                {
                    state.answer(&myself, lsn, |lsn| crate::gate::Deferred { lsn, answer: Box::new(|_| {}) });
                }
            }
            FeedMsg::Flush
            | FeedMsg::Durable(_)
            | FeedMsg::CheckpointDone
            | FeedMsg::Checkpoint(_)
            | FeedMsg::Close(_)
            | FeedMsg::WaitExpired(_)
            | FeedMsg::Placement(_)
            | FeedMsg::Repl(..)
            | FeedMsg::ReplTick
            | FeedMsg::Digest(_)
            | FeedMsg::Stats(_)
            | FeedMsg::Shed(..)
            | FeedMsg::InjectPanic => {}
        }
        if let Some(why) = state.failed.take() {
            return Err(why.into());
        }
        // What the flush wrote may ship now.
        if let (Some(repl), Some(f)) = (state.repl.as_mut(), state.gate.shard.as_mut()) {
            repl.ship(f.heap_mut())?;
        }
        fail_if_poisoned(&mut state.gate)
    }
}

/// Answers a request that arrived after `Close`.
fn refuse_closed(msg: FeedMsg) {
    refuse(msg, GridError::Closed)
}

/// Answers a request with `e` (nothing ran).
fn refuse(msg: FeedMsg, e: GridError) {
    match msg {
        FeedMsg::Append(_, r) => drop(r.send(Err(e.clone()))),
        FeedMsg::Appends(_, r) => drop(r.send(Err(e.clone()))),
        FeedMsg::Get(_, r) => drop(r.send(Err(e.clone()))),
        FeedMsg::Remove(_, r) => drop(r.send(Err(e.clone()))),
        FeedMsg::Read(_, r) | FeedMsg::ReadBack(_, r) | FeedMsg::CursorRead(_, r) => {
            drop(r.send(Err(e.clone())))
        }
        FeedMsg::CursorSet(_, r) | FeedMsg::CursorGet(_, r) => drop(r.send(Err(e.clone()))),
        FeedMsg::CursorDelete(_, r) => drop(r.send(Err(e.clone()))),
        FeedMsg::Cursors(_, r) => drop(r.send(Err(e.clone()))),
        FeedMsg::Trim(_, r) | FeedMsg::Cut(_, r) => drop(r.send(Err(e.clone()))),
        FeedMsg::Rotate(_, r) | FeedMsg::SetVersion(_, r) => drop(r.send(Err(e.clone()))),
        FeedMsg::State(_, r) => drop(r.send(Err(e.clone()))),
        FeedMsg::Digest(r) => drop(r.send(Err(e.clone()))),
        FeedMsg::Stats(r) => drop(r.send(Err(e.clone()))),
        FeedMsg::Shed(_, r) => drop(r.send(Err(e.clone()))),
        // The gate's own messages never get here (`GateMsg::into_gate`).
        FeedMsg::Checkpoint(_)
        | FeedMsg::Close(_)
        | FeedMsg::Durable(_)
        | FeedMsg::CheckpointDone
        | FeedMsg::Flush
        | FeedMsg::Maintain
        | FeedMsg::WaitExpired(_)
        | FeedMsg::Placement(_)
        | FeedMsg::Repl(..)
        | FeedMsg::ReplTick
        | FeedMsg::InjectPanic => {}
    }
}
