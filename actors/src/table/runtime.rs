//! `TableRuntime`: one running table as its callers see it: its definition and where its
//! shards are. It routes each typed request to the shard that owns the key (one message, one
//! typed reply), fans counts and scans out over every shard and merges them in key order, and
//! sends a connection's pipelined requests to a shard as one `Pipeline` message.
//!
//! In a cluster, a shard whose primary is another node is reached through `ShardRpc`
//! (`cluster/shard_rpc.rs`), and a request refused `NotPrimary` (the map was changing) is tried
//! again as the map changes, within `ROUTE_WAIT`; the `*_local` methods serve this node's own
//! shards only (what `ShardRpc` runs for other nodes).
//!
//! Invariant: a message that could not be delivered (the actor had already died) is retried
//! once the supervisor has replaced the actor (for as long as a start is in flight, else within
//! `SHARD_RESTART_WAIT`); messages waiting for a starting shard are sent in the order the calls
//! were made (`TurnQueue`); a message that was delivered is never sent twice (its writes may
//! have applied).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ractor::{MessagingErr, RpcReplyPort};
use tokio::sync::oneshot;

use super::actor::{EvalJob, PipelineOp, PipelineReply, ShardMsg};
use super::def::TableDef;
use super::supervisor::{ShardSlot, SlotState, Turn};
use super::{ScanRange, Versioned, WriteOp, WriteResult, Written, read};
use crate::cluster::shard_rpc::ShardRpc;
use crate::error::GridError;
use crate::key::Key;
use crate::replication::NodeId;
use crate::snippet::{Compiled, LimitOverrides, Limits, Snippets};
use crate::value::Value;
use heapgrid_heap::Snapshot;

/// How long a caller waits for a restarting shard before giving up.
const SHARD_RESTART_WAIT: Duration = Duration::from_secs(5);
/// How long a request follows a shard's primary through changes of the cluster map.
const ROUTE_WAIT: Duration = Duration::from_secs(5);

/// The calls to other nodes' shards, once the grid is in a cluster.
pub type RemoteShards = Arc<std::sync::OnceLock<Arc<ShardRpc>>>;

/// Where a shard's requests go.
enum Target {
    Here,
    There(Arc<ShardRpc>, NodeId),
}

/// A collection-scoped snippet: run inside the shard actor that owns `key` (required on a
/// sharded table): atomic and isolated; its writes are one batch. `read_only` refuses any write
/// (the server sets it for tokens without write permission).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalRequest {
    pub src: String,
    /// The routing key; the snippet's `key` variable.
    pub key: Option<Key>,
    /// The snippet's `args` variable.
    pub args: Value,
    pub limits: LimitOverrides,
    pub read_only: bool,
}

/// The replies of one pipeline message, in request order.
pub type PipelineReplies = Vec<Result<PipelineReply, GridError>>;

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// One table of a running grid: its definition and where its shards are.
pub struct TableRuntime {
    pub def: TableDef,
    slots: Arc<Vec<ShardSlot>>,
    snippets: Arc<Snippets>,
    /// Messages sent to this table's shards (a test hook and a metric).
    messages: AtomicU64,
    remote: RemoteShards,
}

/// Entries of several shards, merged in key order (descending if `reverse`), at most `limit`.
fn merge_entries(parts: Vec<Vec<(Key, Versioned)>>, limit: u32, reverse: bool) -> Vec<(Key, Versioned)> {
    let mut all: Vec<_> = parts.into_iter().flatten().collect();
    all.sort_by(|a, b| if reverse { b.0.cmp(&a.0) } else { a.0.cmp(&b.0) });
    all.truncate(limit as usize);
    all
}

fn lost(table: &str, shard: u32) -> GridError {
    GridError::Unavailable(format!(
        "shard {shard} of {table} stopped while handling the request (a write may or may not have applied)"
    ))
}

impl TableRuntime {
    pub fn new(
        def: TableDef,
        slots: Arc<Vec<ShardSlot>>,
        snippets: Arc<Snippets>,
        remote: RemoteShards,
    ) -> TableRuntime {
        TableRuntime { def, slots, snippets, messages: AtomicU64::new(0), remote }
    }

    /// The node serving shard `i`, when the cluster map places its primary on another node.
    pub fn primary_elsewhere(&self, i: u32) -> Option<NodeId> {
        self.remote.get()?.primary_elsewhere(&self.def.name, i)
    }

    fn target(&self, i: u32) -> Target {
        match self.remote.get() {
            Some(rpc) => match rpc.primary_elsewhere(&self.def.name, i) {
                Some(node) => Target::There(rpc.clone(), node),
                None => Target::Here,
            },
            None => Target::Here,
        }
    }

    /// Runs `f` for shard `i` where it is served, again while it is refused `NotPrimary` (the
    /// map is changing) for up to `ROUTE_WAIT`.
    async fn routed<T, F, Fut>(&self, i: u32, mut f: F) -> Result<T, GridError>
    where
        F: FnMut(Target) -> Fut,
        Fut: Future<Output = Result<T, GridError>>,
    {
        let deadline = tokio::time::Instant::now() + ROUTE_WAIT;
        loop {
            match f(self.target(i)).await {
                Err(GridError::NotPrimary { .. })
                    if tokio::time::Instant::now() < deadline
                        && let Some(rpc) = self.remote.get() =>
                {
                    rpc.map_changed(Duration::from_millis(100)).await
                }
                r => return r,
            }
        }
    }

    /// `Ok` if this table has a shard `i` (a number from another node is checked).
    fn check_shard(&self, i: u32) -> Result<(), GridError> {
        if i < self.def.shards {
            return Ok(());
        }
        Err(GridError::Invalid(format!("{} has {} shards, not {}", self.def.name, self.def.shards, i + 1)))
    }

    pub(crate) fn slots(&self) -> &[ShardSlot] {
        &self.slots
    }

    /// `Recovering` if shard `i` is (re)opening its heap here (for a caller that does not wait).
    pub fn recovering(&self, i: u32) -> Option<GridError> {
        let (replayed_bytes, total_bytes) = self.slots.get(i as usize)?.recovering()?;
        Some(GridError::Recovering { table: self.def.name.clone(), shard: i, replayed_bytes, total_bytes })
    }

    /// Whether shard `i` is not running here now (starting, recovering or restarting: a
    /// message to it waits; failed or stopped: it is refused).
    pub fn starting(&self, i: u32) -> bool {
        self.slots.get(i as usize).is_some_and(|s| matches!(s.get(), SlotState::Starting))
    }

    /// The shard that owns `key`.
    pub fn shard_of(&self, key: &Key) -> u32 {
        key.shard(self.def.shards)
    }

    /// Shard `i`'s published read snapshot if it holds every write acknowledged so far (`None`
    /// while it is stale or the shard is not running: then reads go to the actor).
    pub fn snapshot(&self, i: u32) -> Option<Arc<Snapshot>> {
        self.slots[i as usize].view.fresh()
    }

    /// Messages sent to this table's shards so far.
    pub fn shard_messages(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }

    /// Sends `payload` to shard `i` and waits for its reply: waits out a restart (bounded),
    /// never hangs on a dead actor. `unwrap` takes the payload back out of a message that
    /// could not be delivered, to send it to the replacement.
    async fn call<P, R>(
        &self,
        i: u32,
        payload: P,
        wrap: fn(P, RpcReplyPort<R>) -> ShardMsg,
        unwrap: fn(ShardMsg) -> Option<P>,
    ) -> Result<R, GridError> {
        let deadline = tokio::time::Instant::now() + SHARD_RESTART_WAIT;
        let slot = &self.slots[i as usize];
        // Behind the callers already waiting for the shard, if any.
        let turn = (!slot.turns.clear()).then(|| slot.turns.take());
        self.call_in_turn(i, (payload, turn), deadline, wrap, unwrap).await
    }

    /// `call`'s loop, for a caller holding its turn among those waiting (or none, when none
    /// waited as it made the call).
    async fn call_in_turn<P, R>(
        &self,
        i: u32,
        (payload, turn): (P, Option<Turn>),
        deadline: tokio::time::Instant,
        wrap: fn(P, RpcReplyPort<R>) -> ShardMsg,
        unwrap: fn(ShardMsg) -> Option<P>,
    ) -> Result<R, GridError> {
        let slot = &self.slots[i as usize];
        let mut payload = payload;
        let mut turn = turn;
        loop {
            let seen = slot.version();
            match slot.get() {
                SlotState::Running(_) => {
                    if let Some(t) = &turn {
                        t.mine().await;
                    }
                    let SlotState::Running(actor) = slot.get() else { continue };
                    let (tx, rx) = oneshot::channel();
                    self.messages.fetch_add(1, Ordering::Relaxed);
                    // Counted before it is sent, so the actor never takes more than was counted.
                    slot.view.note_sent();
                    match actor.send_message(wrap(payload, tx.into())) {
                        Ok(()) => {
                            // Sent: the next caller in turn may send.
                            drop(turn);
                            return rx.await.map_err(|_| lost(&self.def.name, i));
                        }
                        Err(e) => {
                            slot.view.note_unsent();
                            match e {
                                MessagingErr::SendErr(msg) => match unwrap(msg) {
                                    Some(back) => payload = back,
                                    None => return Err(lost(&self.def.name, i)),
                                },
                                _ => return Err(lost(&self.def.name, i)),
                            }
                        }
                    }
                }
                SlotState::Starting => {
                    // Waiting from now on: behind those already waiting.
                    if turn.is_none() {
                        turn = Some(slot.turns.take());
                    }
                }
                SlotState::Failed(reason) => {
                    return Err(GridError::ShardFailed { table: self.def.name.clone(), shard: i, reason });
                }
                SlotState::Stopped => return Err(GridError::Closed),
            }
            if slot.give_up(deadline) {
                return Err(GridError::Unavailable(format!("shard {i} of {} is restarting", self.def.name)));
            }
            slot.wait_change(seen, deadline).await;
        }
    }

    /// The value and version under `key`: from the shard's published snapshot, without a
    /// message; from the actor only while none is published (the shard is starting).
    pub async fn get(&self, key: Key) -> Result<Option<Versioned>, GridError> {
        self.get_routed(key, false).await
    }

    async fn get_routed(&self, key: Key, fresh: bool) -> Result<Option<Versioned>, GridError> {
        if self.remote.get().is_none() {
            return self.get_local(key, fresh).await;
        }
        let key = &key;
        let shard = self.shard_of(key);
        self.routed(shard, |t| async move {
            match t {
                Target::Here => self.get_local(key.clone(), fresh).await,
                Target::There(rpc, node) => rpc.get(node, &self.def.name, shard, key.clone(), fresh).await,
            }
        })
        .await
    }

    /// The value under `key` from this node's copy of its shard when this node is the primary
    /// or an in-sync replica (a replica's copy may miss the newest writes:
    /// `read_from = replica`); from the primary otherwise, or off a cluster.
    pub async fn get_copy(&self, key: Key) -> Result<Option<Versioned>, GridError> {
        let i = self.shard_of(&key);
        match self.remote.get() {
            Some(rpc)
                if rpc.holds_in_sync_copy(&self.def.name, i)
                    && rpc.primary_elsewhere(&self.def.name, i).is_some() =>
            {
                let unwrap = |m| if let ShardMsg::GetCopy(k, _) = m { Some(k) } else { None };
                self.call(i, key, ShardMsg::GetCopy, unwrap).await?
            }
            _ => self.get(key).await,
        }
    }

    /// `get` (or `get_fresh`) on this node's shard.
    pub(crate) async fn get_local(&self, key: Key, fresh: bool) -> Result<Option<Versioned>, GridError> {
        let i = self.shard_of(&key);
        if !fresh && let Some(s) = self.snapshot(i) {
            return Ok(read::get(&*s, &key)?);
        }
        self.call(i, key, ShardMsg::Get, |m| if let ShardMsg::Get(k, _) = m { Some(k) } else { None }).await?
    }

    /// The heap figures of shard `i` here (any role).
    pub async fn heap_stats(&self, i: u32) -> Result<heapgrid_heap::HeapStats, GridError> {
        self.call(i, (), |(), r| ShardMsg::Stats(r), |_| None).await?
    }

    /// This node's copy of shard `i`, summarised (`ClusterOp::Digest`; any role).
    pub async fn digest(&self, i: u32) -> Result<crate::replication::shard::ShardDigest, GridError> {
        if i >= self.def.shards {
            return Err(GridError::Invalid(format!("{} has {} shards", self.def.name, self.def.shards)));
        }
        self.call(i, (), |(), r| ShardMsg::Digest(r), |_| None).await?
    }

    /// The value and version under `key`, from the shard actor itself: everything it applied,
    /// even before it is published (answered once durable). For optimistic retries.
    pub async fn get_fresh(&self, key: Key) -> Result<Option<Versioned>, GridError> {
        self.get_routed(key, true).await
    }

    /// Prepares shard `shard` to apply `ops` (see `ShardMsg::Prepare`): once this returns `Ok`
    /// the shard is held until `decide` is sent (or dropped: nothing applied), and `done`
    /// answers the applied batch.
    pub async fn prepare(
        &self,
        shard: u32,
        ops: Vec<WriteOp>,
    ) -> Result<(oneshot::Sender<bool>, oneshot::Receiver<Result<Written, GridError>>), GridError> {
        if self.remote.get().is_none() {
            return self.prepare_local(shard, ops).await;
        }
        let ops = &ops;
        self.routed(shard, |t| async move {
            match t {
                Target::Here => self.prepare_local(shard, ops.clone()).await,
                Target::There(rpc, node) => rpc.prepare(node, &self.def.name, shard, ops.clone()).await,
            }
        })
        .await
    }

    /// `prepare` on this node's shard.
    pub(crate) async fn prepare_local(
        &self,
        shard: u32,
        ops: Vec<WriteOp>,
    ) -> Result<(oneshot::Sender<bool>, oneshot::Receiver<Result<Written, GridError>>), GridError> {
        self.check_shard(shard)?;
        if let Some(s) = self.batch_shard(&ops)?
            && s != shard
        {
            return Err(GridError::Invalid(format!("these writes belong to shard {s} of {}", self.def.name)));
        }
        let (decide_tx, decide_rx) = tokio::sync::oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let slot = &self.slots[shard as usize];
        let SlotState::Running(actor) = slot.get() else {
            return Err(GridError::Unavailable(format!("shard {shard} of {} is not running", self.def.name)));
        };
        let p = crate::table::actor::Prepare {
            ops,
            ready: ready_tx.into(),
            decide: decide_rx,
            done: done_tx.into(),
        };
        self.messages.fetch_add(1, Ordering::Relaxed);
        slot.view.note_sent();
        actor.send_message(ShardMsg::Prepare(Box::new(p))).map_err(|_| {
            slot.view.note_unsent();
            GridError::Unavailable(format!("shard {shard} of {} stopped", self.def.name))
        })?;
        ready_rx
            .await
            .map_err(|_| GridError::Unavailable(format!("shard {shard} of {} stopped", self.def.name)))??;
        Ok((decide_tx, done_rx))
    }

    /// Whether `key` is present (snapshot first, as `get`).
    pub async fn contains(&self, key: Key) -> Result<bool, GridError> {
        if self.primary_elsewhere(self.shard_of(&key)).is_some() {
            return Ok(self.get(key).await?.is_some());
        }
        let i = self.shard_of(&key);
        if let Some(s) = self.snapshot(i) {
            return Ok(read::contains(&*s, &key)?);
        }
        let unwrap = |m| if let ShardMsg::Contains(k, _) = m { Some(k) } else { None };
        self.call(i, key, ShardMsg::Contains, unwrap).await?
    }

    /// Keys in the whole table (the sum over its shards).
    pub async fn count(&self) -> Result<u64, GridError> {
        let mut total = 0;
        for i in 0..self.def.shards {
            total += if self.remote.get().is_none() {
                self.count_local(i).await?
            } else {
                self.routed(i, |t| async move {
                    match t {
                        Target::Here => self.count_local(i).await,
                        Target::There(rpc, node) => rpc.count(node, &self.def.name, i).await,
                    }
                })
                .await?
            };
        }
        Ok(total)
    }

    /// The keys in this node's shard `i`.
    pub(crate) async fn count_local(&self, i: u32) -> Result<u64, GridError> {
        self.check_shard(i)?;
        match self.snapshot(i) {
            Some(s) => Ok(read::count(&*s)),
            None => {
                let unwrap = |m| matches!(m, ShardMsg::Count(_)).then_some(());
                self.call(i, (), |(), r| ShardMsg::Count(r), unwrap).await?
            }
        }
    }

    /// Entries in `range` over every shard, merged in key order.
    pub async fn scan(&self, range: ScanRange) -> Result<Vec<(Key, Versioned)>, GridError> {
        let (limit, reverse) = (range.limit, range.reverse);
        let mut parts = Vec::with_capacity(self.def.shards as usize);
        for i in 0..self.def.shards {
            let r = if self.remote.get().is_none() {
                self.scan_local(i, &range).await?
            } else {
                let range = &range;
                self.routed(i, |t| async move {
                    match t {
                        Target::Here => self.scan_local(i, range).await,
                        Target::There(rpc, node) => rpc.scan(node, &self.def.name, i, range.clone()).await,
                    }
                })
                .await?
            };
            parts.push(r);
        }
        if parts.len() == 1 {
            return Ok(parts.pop().unwrap_or_default());
        }
        Ok(merge_entries(parts, limit, reverse))
    }

    /// The entries in `range` of this node's shard `i`.
    pub(crate) async fn scan_local(
        &self,
        i: u32,
        range: &ScanRange,
    ) -> Result<Vec<(Key, Versioned)>, GridError> {
        self.check_shard(i)?;
        match self.snapshot(i) {
            Some(s) => Ok(read::scan(&*s, range)?),
            None => {
                let unwrap = |m| if let ShardMsg::Scan(r, _) = m { Some(r) } else { None };
                self.call(i, range.clone(), ShardMsg::Scan, unwrap).await?
            }
        }
    }

    /// One write; returns its LSN (0 if it wrote nothing) and result.
    pub async fn write(&self, op: WriteOp) -> Result<(u64, WriteResult), GridError> {
        // A lone fence writes nothing: shard 0 checks it.
        let i = op.key().map_or(0, |k| self.shard_of(k));
        if self.primary_elsewhere(i).is_some() {
            let mut w = self.batch(vec![op]).await?;
            let r = w
                .results
                .pop()
                .ok_or_else(|| GridError::Protocol("a write was answered with no result".into()))?;
            return Ok((w.lsn, r));
        }
        self.call(i, op, ShardMsg::Write, |m| if let ShardMsg::Write(op, _) = m { Some(op) } else { None })
            .await?
    }

    /// The shard every write of a batch belongs to (a batch is one op-log record of one shard).
    /// Fences go with the batch's shard; a batch of fences only is checked by shard 0.
    pub fn batch_shard(&self, ops: &[WriteOp]) -> Result<Option<u32>, GridError> {
        let mut shard = None;
        for op in ops {
            let Some(key) = op.key() else { continue };
            let s = self.shard_of(key);
            match shard {
                None => shard = Some(s),
                Some(t) if t == s => {}
                Some(_) => {
                    return Err(GridError::Invalid(format!(
                        "a batch on sharded table {} must stay within one shard",
                        self.def.name
                    )));
                }
            }
        }
        if shard.is_none() && !ops.is_empty() {
            return Ok(Some(0));
        }
        Ok(shard)
    }

    /// Writes applied together as one op-log record; every key must map to one shard.
    pub async fn batch(&self, ops: Vec<WriteOp>) -> Result<Written, GridError> {
        let Some(i) = self.batch_shard(&ops)? else {
            return Ok(Written { lsn: 0, results: Vec::new() });
        };
        if self.remote.get().is_none() {
            return self.batch_local(i, ops).await;
        }
        let ops = &ops;
        self.routed(i, |t| async move {
            match t {
                Target::Here => self.batch_local(i, ops.clone()).await,
                Target::There(rpc, node) => rpc.batch(node, &self.def.name, i, ops.clone()).await,
            }
        })
        .await
    }

    /// `batch` on this node's shard `i` (every key of `ops` must belong to it).
    pub(crate) async fn batch_local(&self, i: u32, ops: Vec<WriteOp>) -> Result<Written, GridError> {
        self.check_shard(i)?;
        if let Some(s) = self.batch_shard(&ops)?
            && s != i
        {
            return Err(GridError::Invalid(format!("these writes belong to shard {s} of {}", self.def.name)));
        }
        if ops.is_empty() {
            return Ok(Written { lsn: 0, results: Vec::new() });
        }
        self.call(i, ops, ShardMsg::Batch, |m| if let ShardMsg::Batch(ops, _) = m { Some(ops) } else { None })
            .await?
    }

    /// A job running `compiled` in shard `shard` of this table, with no key, no arguments,
    /// writes allowed, and no fallback flag (set the public fields to change them).
    pub fn eval_job(&self, shard: u32, compiled: Arc<Compiled>, limits: Limits) -> EvalJob {
        EvalJob {
            compiled,
            key: None,
            args: Value::Null,
            limits,
            read_only: false,
            table: self.def.name.clone(),
            shard,
            shards: self.def.shards,
            out_of_scope: None,
            fences: Vec::new(),
            printed: None,
        }
    }

    /// Compiles a collection-scoped snippet into a job for the shard its key routes to.
    pub fn prepare_eval(&self, req: EvalRequest) -> Result<EvalJob, GridError> {
        let shard = match &req.key {
            Some(k) => self.shard_of(k),
            None if self.def.shards == 1 => 0,
            None => {
                return Err(GridError::Invalid(format!(
                    "a snippet on sharded table {} needs a routing key (it runs in that key's shard)",
                    self.def.name
                )));
            }
        };
        let compiled = self.snippets.engine.compile(&req.src)?;
        let limits = self.snippets.defaults.with_overrides(&req.limits, &self.snippets.max);
        Ok(EvalJob {
            key: req.key,
            args: req.args,
            read_only: req.read_only,
            ..self.eval_job(shard, compiled, limits)
        })
    }

    /// Runs a collection-scoped snippet in the shard its key routes to.
    pub async fn eval(&self, req: EvalRequest) -> Result<Value, GridError> {
        if self.remote.get().is_none() {
            return self.eval_local(req).await;
        }
        let shard = self.prepare_eval(req.clone())?.shard;
        let req = &req;
        self.routed(shard, |t| async move {
            match t {
                Target::Here => self.eval_local(req.clone()).await,
                Target::There(rpc, node) => rpc.eval(node, &self.def.name, shard, req.clone()).await,
            }
        })
        .await
    }

    /// `eval` in this node's shard.
    pub(crate) async fn eval_local(&self, req: EvalRequest) -> Result<Value, GridError> {
        let job = self.prepare_eval(req)?;
        self.eval_in(job).await
    }

    /// Runs a snippet job in its shard (collection scope).
    pub async fn eval_in(&self, job: EvalJob) -> Result<Value, GridError> {
        let i = job.shard;
        self.call(
            i,
            Box::new(job),
            ShardMsg::Eval,
            |m| if let ShardMsg::Eval(j, _) = m { Some(j) } else { None },
        )
        .await?
    }

    /// Sends `ops` to shard `i` as one message, now if the shard is running (so messages sent
    /// in turn reach its mailbox in that order), else once it is; the future gives one reply
    /// per op, in order.
    pub fn pipeline(self: &Arc<Self>, i: u32, ops: Vec<PipelineOp>) -> BoxFuture<PipelineReplies> {
        debug_assert!(ops.len() <= crate::limits::PIPELINE_OPS_MAX);
        let n = ops.len();
        let mut ops = ops;
        let slot = &self.slots[i as usize];
        if slot.turns.clear()
            && let SlotState::Running(actor) = slot.get()
        {
            let (tx, rx) = oneshot::channel();
            self.messages.fetch_add(1, Ordering::Relaxed);
            slot.view.note_sent();
            match actor.send_message(ShardMsg::Pipeline(ops, tx.into())) {
                Ok(()) => {
                    let me = self.clone();
                    return Box::pin(async move {
                        rx.await.unwrap_or_else(|_| (0..n).map(|_| Err(lost(&me.def.name, i))).collect())
                    });
                }
                Err(MessagingErr::SendErr(ShardMsg::Pipeline(back, _))) => {
                    slot.view.note_unsent();
                    ops = back
                }
                Err(_) => {
                    slot.view.note_unsent();
                    let e = lost(&self.def.name, i);
                    return Box::pin(async move { (0..n).map(|_| Err(e.clone())).collect() });
                }
            }
        }
        // Starting, restarting or failed: wait (bounded) for the shard, as single calls do, in
        // turn behind the callers already waiting (the turn is taken now, as the call is made).
        // The wait runs on a task of its own: the turn is released when the message is sent,
        // not when the caller next polls (a connection that stops reading would otherwise hold
        // every later caller of the shard back).
        let turn = slot.turns.take();
        let me = self.clone();
        let sent = tokio::spawn(async move {
            let unwrap = |m| if let ShardMsg::Pipeline(ops, _) = m { Some(ops) } else { None };
            let deadline = tokio::time::Instant::now() + SHARD_RESTART_WAIT;
            match me.call_in_turn(i, (ops, Some(turn)), deadline, ShardMsg::Pipeline, unwrap).await {
                Ok(replies) => replies,
                Err(e) => (0..n).map(|_| Err(e.clone())).collect(),
            }
        });
        let name = self.def.name.clone();
        Box::pin(async move { sent.await.unwrap_or_else(|_| (0..n).map(|_| Err(lost(&name, i))).collect()) })
    }

    /// Test hook: makes shard `i` panic inside its handler.
    #[doc(hidden)]
    pub fn inject_panic(&self, i: u32) {
        if let SlotState::Running(a) = self.slots[i as usize].get() {
            let _ = a.cast(ShardMsg::InjectPanic);
        }
    }

    /// The id of shard `i`'s current actor, if it has one (changes on every restart).
    pub fn shard_actor(&self, i: u32) -> Option<ractor::ActorId> {
        match self.slots[i as usize].get() {
            SlotState::Running(a) => Some(a.get_id()),
            _ => None,
        }
    }

    /// Whether shard `i` has a live actor (test and health checks).
    pub fn shard_running(&self, i: u32) -> bool {
        match self.slots[i as usize].get() {
            SlotState::Running(a) => a.get_status() == ractor::ActorStatus::Running,
            _ => false,
        }
    }
}
