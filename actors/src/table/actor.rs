//! The table shard actor: a thin wrapper that owns one `TableShard` (one heap) and executes its
//! messages strictly in order. Each message is typed and carries a typed reply port; a
//! `Pipeline` carries several requests of one connection at once (one hop for all of them).
//!
//! The actor struct is empty; `pre_start` opens the heap, which replays the op log, so a
//! supervisor restart *is* recovery. Writes are applied inside `handle` with their op-log
//! records queued in memory; after the first write of a group the actor sends itself `Flush`,
//! which arrives after everything already in the mailbox and writes all queued records with one
//! write(2). Then, under `FsyncPolicy::Always`, the group goes to the shard's durable-reply task,
//! which makes its highest LSN durable with one fsync on the blocking pool and hands it back
//! (`ShardMsg::Durable`); the actor publishes the group's snapshot, raises the acknowledged LSN
//! and answers. Under the other policies that happens at the `Flush`.
//!
//! Invariant: a reply is sent for a write only after its record is durable under the policy.
//! Invariant: a read is answered only once every write it could see is as durable as a write's
//! acknowledgement requires: after the group's op-log write, and under `Always` after its fsync.
//! So no reader ever sees a write that a crash could then lose without its writer having been
//! told so.
//! Invariant: if the actor dies, every reply port it held is dropped, so every caller gets an
//! error instead of waiting forever.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use heapgrid_heap::HeapOptions;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::{ScanRange, TableShard, Versioned, WriteOp, WriteResult, Written};
use crate::error::GridError;
pub use crate::gate::ReadView;
use crate::gate::{
    Deferred, GateMsg, Group, HeapOwner, LogGate, blocking, deferred, fail_if_poisoned, open_heap,
};
use crate::key::Key;
use crate::replication::shard::{ReplWire, ShardRepl};
use crate::snippet::{Compiled, Limits, ScanQuery, Store};
use crate::value::Value;

/// A snippet whose previous run took longer than this runs under `block_in_place`.
const SLOW_SNIPPET_US: u64 = 1_000;

type Reply<T> = RpcReplyPort<Result<T, GridError>>;

/// One request inside a `Pipeline`.
pub enum PipelineOp {
    /// Answered with `PipelineReply::Record`: the stored bytes, not decoded.
    Get(Key),
    Contains(Key),
    Count,
    Scan(ScanRange),
    Write(WriteOp),
    Batch(Vec<WriteOp>),
    Eval(Box<EvalJob>),
}

/// A stored record copied out of the heap: its version and `Value::encode` bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct RawVersioned {
    pub version: u64,
    pub value: Vec<u8>,
}

/// The answer to one `PipelineOp`, in the same position.
#[derive(Debug)]
pub enum PipelineReply {
    Record(Option<RawVersioned>),
    Bool(bool),
    Count(u64),
    Entries(Vec<(Key, Versioned)>),
    Written(Written),
    Snippet(Value),
}

/// Messages a shard actor handles.
pub enum ShardMsg {
    Get(Key, Reply<Option<Versioned>>),
    Contains(Key, Reply<bool>),
    Count(Reply<u64>),
    Scan(ScanRange, Reply<Vec<(Key, Versioned)>>),
    /// One write; the reply carries its LSN (0 if it wrote nothing) and result.
    Write(WriteOp, Reply<(u64, WriteResult)>),
    /// Writes applied together as one op-log record.
    Batch(Vec<WriteOp>, Reply<Written>),
    /// Run a collection-scoped snippet (compiled by the caller).
    Eval(Box<EvalJob>, Reply<Value>),
    /// One shard's part of a commit over several shards: validate `ops`, answer `ready`, then
    /// hold this shard (no other message is handled) until the coordinator decides, at most
    /// `PREPARE_HOLD_MAX`; on `true` apply them as one batch and answer `done`.
    Prepare(Box<Prepare>),
    /// Several requests, executed in order and answered together, one result per request.
    Pipeline(Vec<PipelineOp>, RpcReplyPort<Vec<Result<PipelineReply, GridError>>>),
    /// Checkpoint the heap (replies if a port is given).
    Checkpoint(Option<Reply<()>>),
    /// Checkpoint and close the heap (releasing its file lock) before the actor is stopped;
    /// later operations get `GridError::Closed`.
    Close(Reply<()>),
    /// The heap's figures (handled by the gate).
    Stats(Reply<heapgrid_heap::HeapStats>),
    /// Drop clean resident pages (the memory budget; handled by the gate).
    Shed(u64, Reply<heapgrid_heap::ShedReport>),
    /// Write the op-log records queued since the last flush (one write(2)) and answer their
    /// requests. The actor sends it to itself after the first write of a group, so it arrives
    /// after every message already queued: one syscall per drained mailbox.
    Flush,
    /// From the durable-reply task (`Always`): these groups are synced; publish their newest
    /// snapshot, then answer them.
    Durable(Vec<Group>),
    /// The background checkpoint's write-back ended: finish it.
    CheckpointDone,
    /// Test hook: panic inside the handler, as a bug would.
    #[doc(hidden)]
    InjectPanic,
    /// The cluster map placed this shard (a replicated table).
    Placement(crate::cluster::map::Placement),
    /// A replication frame from another node.
    Repl(crate::replication::NodeId, ReplWire),
    /// The replication tick (`REPL_TICK`).
    ReplTick,
    /// This node's copy of the shard, summarised (whatever its role; `ClusterOp::Digest`).
    Digest(Reply<crate::replication::shard::ShardDigest>),
    /// The value under a key in this node's copy, whatever its role: a replica answers with
    /// what it has applied (`read_from = replica`: possibly behind its primary).
    GetCopy(Key, Reply<Option<Versioned>>),
}

/// Longest a prepared shard waits for its coordinator's decision before it lets go (applying
/// nothing).
pub const PREPARE_HOLD_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// See `ShardMsg::Prepare`.
pub struct Prepare {
    pub ops: Vec<WriteOp>,
    pub ready: Reply<()>,
    pub decide: tokio::sync::oneshot::Receiver<bool>,
    pub done: Reply<Written>,
}

/// A snippet for one shard: what to run, under which budgets, and where it is.
pub struct EvalJob {
    pub compiled: Arc<Compiled>,
    /// The routing key (the snippet's `key`) and arguments (`args`).
    pub key: Option<Key>,
    pub args: Value,
    pub limits: Limits,
    pub read_only: bool,
    pub table: String,
    pub shard: u32,
    pub shards: u32,
    /// Set when the snippet reached outside this shard (another table, another shard's key, a
    /// whole-table operation): the run then failed with no effect, and a caller that was only
    /// trying this shard runs it grid-scoped instead.
    pub out_of_scope: Option<Arc<AtomicBool>>,
    /// `WriteOp::Fence`s every write of the run is checked with (at its commit, with it).
    pub fences: Vec<WriteOp>,
    /// Where what the run printed goes (`None`: nowhere).
    pub printed: Option<crate::snippet::PrintSink>,
}

/// A collection-scoped snippet's view: this shard of this table, nothing else.
struct ShardStore<'a> {
    table: &'a mut TableShard,
    job: &'a EvalJob,
}

impl ShardStore<'_> {
    fn refuse(&self, e: GridError) -> Result<(), GridError> {
        if let Some(flag) = &self.job.out_of_scope {
            flag.store(true, Ordering::Relaxed);
        }
        Err(e)
    }

    fn own(&self, coll: &str) -> Result<(), GridError> {
        if coll != self.job.table {
            return self.refuse(GridError::Invalid(format!(
                "a snippet scoped to {} cannot use {coll}; run it grid-scoped (grid.eval)",
                self.job.table
            )));
        }
        Ok(())
    }

    fn own_key(&self, coll: &str, key: &Key) -> Result<(), GridError> {
        self.own(coll)?;
        let s = key.shard(self.job.shards);
        if s != self.job.shard {
            return self.refuse(GridError::Invalid(format!(
                "key {key} of {coll} lives in shard {s}; this snippet runs in shard {} (route it by that key)",
                self.job.shard
            )));
        }
        Ok(())
    }

    fn whole_table(&self, coll: &str, what: &str) -> Result<(), GridError> {
        self.own(coll)?;
        if self.job.shards > 1 {
            return self.refuse(GridError::Invalid(format!(
                "{what} of sharded table {coll} needs every shard; a collection-scoped snippet sees one (use grid.eval)"
            )));
        }
        Ok(())
    }
}

impl Store for ShardStore<'_> {
    fn feed_read(&mut self, feed: &str, _: Option<u64>, _: u32, _: bool) -> Result<Vec<Value>, GridError> {
        self.own(feed)?;
        Err(GridError::Invalid(format!("{feed} is not a feed")))
    }

    fn feed_state(&mut self, feed: &str) -> Result<Value, GridError> {
        self.own(feed)?;
        Err(GridError::Invalid(format!("{feed} is not a feed")))
    }

    fn check_feed_write(&mut self, feed: &str) -> Result<(), GridError> {
        self.own(feed)?;
        Err(GridError::Invalid(format!("{feed} is not a feed")))
    }

    fn lock_held(&mut self, lock: &str, fence: u64) -> Result<bool, GridError> {
        Ok(self.table.check_fence(lock, fence).is_ok())
    }

    fn check_write(&mut self, coll: &str, key: &Key) -> Result<(), GridError> {
        self.own_key(coll, key)?;
        key.encode().map(|_| ()).map_err(|e| GridError::Invalid(e.to_string()))
    }

    fn get(&mut self, coll: &str, key: &Key) -> Result<Option<Value>, GridError> {
        self.own_key(coll, key)?;
        Ok(self.table.get(key)?.map(|v| v.value))
    }

    fn contains(&mut self, coll: &str, key: &Key) -> Result<bool, GridError> {
        self.own_key(coll, key)?;
        Ok(self.table.contains(key)?)
    }

    fn count(&mut self, coll: &str) -> Result<u64, GridError> {
        self.whole_table(coll, "len()")?;
        Ok(self.table.count())
    }

    fn scan(&mut self, coll: &str, q: &ScanQuery) -> Result<Vec<(Key, Value)>, GridError> {
        self.whole_table(coll, "a scan")?;
        Ok(self.table.scan(&scan_range(q))?.into_iter().map(|(k, v)| (k, v.value)).collect())
    }
}

/// The range behind a snippet's scan: exactly the keys `ScanQuery::matches`, at most `limit` of
/// them, in its order.
pub fn scan_range(q: &ScanQuery) -> ScanRange {
    use std::ops::Bound;
    match &q.prefix {
        Some(p) if q.start.is_none() && q.end.is_none() => ScanRange::prefix(p, q.limit, q.reverse),
        Some(p) => {
            // The keys with prefix `p` are exactly [p, successor(p)): narrow both bounds to them.
            let lo = Key::Str(p.clone());
            let start = q.start.clone().filter(|s| *s > lo).unwrap_or(lo);
            let end = match (q.end.clone(), crate::key::str_successor(p).map(Key::Str)) {
                (Some(e), Some(s)) => Bound::Excluded(e.min(s)),
                (Some(e), None) | (None, Some(e)) => Bound::Excluded(e),
                (None, None) => Bound::Unbounded,
            };
            ScanRange { start: Bound::Included(start), end, limit: q.limit, reverse: q.reverse }
        }
        None => ScanRange {
            start: q.start.clone().map_or(Bound::Unbounded, Bound::Included),
            end: q.end.clone().map_or(Bound::Unbounded, Bound::Excluded),
            limit: q.limit,
            reverse: q.reverse,
        },
    }
}

/// Runs a snippet in the shard: its writes become one batch (one op-log record), or nothing.
/// Returns the result and the batch's LSN (0 if it wrote nothing).
fn run_snippet(table: &mut TableShard, job: &EvalJob) -> Result<(Value, u64), GridError> {
    let mut outcome =
        job.compiled.run(&mut ShardStore { table, job }, &job.limits, job.key.as_ref(), &job.args)?;
    if let Some(sink) = &job.printed {
        *sink.lock().unwrap_or_else(|e| e.into_inner()) = std::mem::take(&mut outcome.printed);
    }
    if outcome.writes.is_empty() {
        return Ok((outcome.value, 0));
    }
    if job.read_only {
        return Err(GridError::PermissionDenied {
            collection: job.table.clone(),
            permission: "write".into(),
        });
    }
    // Every write is of this table and shard: `Compiled::run` asked `ShardStore::check_write`.
    // The run's fences lead the batch: one stale and nothing is written.
    let ops: Vec<WriteOp> = job
        .fences
        .iter()
        .cloned()
        .chain(outcome.writes.into_iter().map(|w| match w.value {
            Some(value) => WriteOp::Put { key: w.key, value },
            None => WriteOp::Delete { key: w.key },
        }))
        .collect();
    let written = table.write(&ops)?;
    Ok((outcome.value, written.lsn))
}

/// Runs a snippet job, under `block_in_place` when its last run was slow.
fn eval(table: &mut TableShard, job: &EvalJob) -> Result<(Value, u64), GridError> {
    // A snippet in a sandbox worker (this thread waits on another process, up to the wall
    // budget), or whose last run in process took over 1 ms, runs under `block_in_place`, so the
    // runtime moves other tasks off this worker meanwhile; quick in-process ones run inline.
    if job.compiled.sandboxed() || job.compiled.last_run_us() > SLOW_SNIPPET_US {
        blocking(|| run_snippet(table, job))
    } else {
        run_snippet(table, job)
    }
}

/// Executes one pipelined request; returns its reply and the LSN it wrote (0: none).
fn execute(table: &mut TableShard, op: PipelineOp) -> (Result<PipelineReply, GridError>, u64) {
    let read = |r: Result<PipelineReply, crate::table::TableError>| (r.map_err(GridError::from), 0);
    match op {
        PipelineOp::Get(key) => read(table.get_raw(&key).map(|r| {
            PipelineReply::Record(r.map(|r| RawVersioned { version: r.version, value: r.value.into_owned() }))
        })),
        PipelineOp::Contains(key) => read(table.contains(&key).map(PipelineReply::Bool)),
        PipelineOp::Count => (Ok(PipelineReply::Count(table.count())), 0),
        PipelineOp::Scan(range) => read(table.scan(&range).map(PipelineReply::Entries)),
        PipelineOp::Write(op) => match table.write_one(&op) {
            Ok((lsn, r)) => (Ok(PipelineReply::Written(Written { lsn, results: vec![r] })), lsn),
            Err(e) => (Err(e.into()), 0),
        },
        PipelineOp::Batch(ops) => match table.write(&ops) {
            Ok(w) => {
                let lsn = w.lsn;
                (Ok(PipelineReply::Written(w)), lsn)
            }
            Err(e) => (Err(e.into()), 0),
        },
        PipelineOp::Eval(job) => match eval(table, &job) {
            Ok((v, lsn)) => (Ok(PipelineReply::Snippet(v)), lsn),
            Err(e) => (Err(e), 0),
        },
    }
}

#[derive(Clone)]
pub struct ShardArgs {
    pub path: PathBuf,
    pub heap: HeapOptions,
    /// Where this shard publishes its read snapshots (shared with the table's callers).
    pub view: Arc<ReadView>,
    /// Where fenced writes are checked.
    pub fences: Arc<crate::lock::fence::FenceTable>,
    pub table: String,
    pub shard: u32,
    /// The node's replication network, once it is in a cluster.
    pub cluster: crate::grid::ClusterNet,
}

/// The state of a table shard actor: its table behind the reply gate, and its replication
/// when the cluster map places it.
pub struct ShardState {
    gate: LogGate<TableShard>,
    repl: Option<Box<ShardRepl>>,
    args: ShardArgs,
    /// Replication failed while handling a message: the actor fails after it (restart =
    /// recovery).
    failed: Option<String>,
}

impl ShardState {
    /// Starts replicating once the map places this shard (and the node is in a cluster).
    fn replicate(&mut self, myself: &ActorRef<ShardMsg>) -> Result<(), GridError> {
        let (Some(net), None) = (self.args.cluster.get(), &self.repl) else { return Ok(()) };
        if net.placement(&self.args.table, self.args.shard).is_none() {
            return Ok(());
        }
        let Some(table) = self.gate.shard.as_mut() else { return Ok(()) };
        let me = myself.clone();
        let repl = ShardRepl::open(
            net.clone(),
            &self.args.table,
            self.args.shard,
            table.heap_mut(),
            &self.args.path,
            self.args.heap.fsync,
            move || me.cast(ShardMsg::ReplTick).is_ok(),
        )?;
        self.repl = Some(Box::new(repl));
        self.args.view.set_serving(false);
        Ok(())
    }

    /// Whether a client request may run here now (always, unless the shard is replicated and
    /// this node is not its primary holding a lease).
    fn admit(&mut self) -> Result<(), GridError> {
        match self.repl.as_mut() {
            Some(r) => r.admit(),
            None => Ok(()),
        }
    }

    /// `state.gate.answer`, holding a replicated write's answer for its replicas too.
    fn answer(&mut self, myself: &ActorRef<ShardMsg>, wrote: u64, d: impl FnOnce(u64) -> Deferred) {
        let (table, shard) = (&self.args.table, self.args.shard);
        let r = crate::replication::service::answer_held(
            self.repl.as_deref_mut(),
            &mut self.gate,
            myself,
            wrote,
            false,
            || format!("shard {shard} of {table}"),
            d,
        );
        // Applied here but not recorded for shipping: never answered as a success (the actor
        // then fails, and its restart recovers from the op log).
        if let Err(e) = r {
            self.failed = Some(e.to_string());
        }
    }
}

crate::gate::impl_gate_msg!(ShardMsg);

impl ShardMsg {
    /// Whether `TableRuntime` sends it (and counted it as sent on the shard's `ReadView`):
    /// what the shard's mailbox depth counts.
    fn sent_by_callers(&self) -> bool {
        matches!(
            self,
            ShardMsg::Get(..)
                | ShardMsg::Contains(..)
                | ShardMsg::Count(..)
                | ShardMsg::Scan(..)
                | ShardMsg::Write(..)
                | ShardMsg::Batch(..)
                | ShardMsg::Eval(..)
                | ShardMsg::Prepare(..)
                | ShardMsg::Pipeline(..)
                | ShardMsg::Stats(..)
                | ShardMsg::Digest(..)
                | ShardMsg::GetCopy(..)
        )
    }
}

/// The shard actor (empty: everything lives in `ShardState`).
pub struct ShardActor;

impl Actor for ShardActor {
    type Msg = ShardMsg;
    type State = ShardState;
    type Arguments = ShardArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ShardMsg>,
        args: ShardArgs,
    ) -> Result<ShardState, ActorProcessingErr> {
        let heap = open_heap(&args.path, &args.heap).await?;
        let mut table = TableShard::new(heap);
        table.set_deferred_log(true);
        table.set_fences(args.fences.clone());
        let gate = LogGate::new(table, args.heap.fsync, args.view.clone(), myself.clone())?
            .named(args.path.display().to_string());
        args.view.reset_mailbox();
        let mut state = ShardState { gate, repl: None, args, failed: None };
        state.replicate(&myself)?;
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<ShardMsg>,
        msg: ShardMsg,
        state: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        if msg.sent_by_callers() {
            state.args.view.note_handled();
        }
        let msg = match msg.into_gate() {
            Ok(call) => {
                let r = state.gate.handle(&myself, call).await;
                // What the flush wrote may ship now.
                if let (Some(repl), Some(t)) = (state.repl.as_mut(), state.gate.shard.as_mut()) {
                    repl.ship(t.heap_mut())?;
                }
                return r;
            }
            Err(ShardMsg::InjectPanic) => panic!("injected panic (test hook)"),
            Err(msg) => msg,
        };
        if state.gate.shard.is_none() {
            refuse(msg, GridError::Closed);
            return Ok(());
        }
        let msg = match msg {
            ShardMsg::Placement(p) => {
                state.replicate(&myself)?;
                if let (Some(repl), Some(t)) = (state.repl.as_mut(), state.gate.shard.as_mut()) {
                    repl.on_placement(t.heap_mut(), &p);
                    state.args.view.set_serving(repl.admit().is_ok());
                }
                return fail_if_poisoned(&mut state.gate);
            }
            ShardMsg::Repl(from, wire) => {
                state.replicate(&myself)?;
                if let (Some(repl), Some(t)) = (state.repl.as_mut(), state.gate.shard.as_mut()) {
                    repl.on_frame(t.heap_mut(), from, wire)?;
                    state.args.view.set_serving(repl.admit().is_ok());
                }
                return fail_if_poisoned(&mut state.gate);
            }
            ShardMsg::ReplTick => {
                if let (Some(repl), Some(t)) = (state.repl.as_mut(), state.gate.shard.as_mut()) {
                    repl.tick(t.heap_mut())?;
                    state.args.view.set_serving(repl.admit().is_ok());
                }
                return fail_if_poisoned(&mut state.gate);
            }
            ShardMsg::Digest(reply) => {
                let r = match (state.repl.as_ref(), state.gate.shard.as_ref()) {
                    (Some(repl), Some(t)) => repl.digest(t.heap()),
                    (None, Some(t)) => crate::replication::shard::digest_of(t.heap(), Default::default()),
                    _ => Err(GridError::Closed),
                };
                // What it read is written (the digest is of records the op log has).
                state.gate.answer(&myself, 0, |lsn| deferred(lsn, reply, r));
                return Ok(());
            }
            ShardMsg::GetCopy(key, reply) => {
                let r = match state.gate.shard.as_ref() {
                    Some(t) => t.get(&key).map_err(GridError::from),
                    None => Err(GridError::Closed),
                };
                state.gate.answer(&myself, 0, |lsn| deferred(lsn, reply, r));
                return Ok(());
            }
            msg => msg,
        };
        if let Err(e) = state.admit() {
            refuse(msg, e);
            return Ok(());
        }
        let Some(table) = state.gate.shard.as_mut() else {
            refuse(msg, GridError::Closed);
            return Ok(());
        };
        match msg {
            ShardMsg::Get(key, reply) => {
                let r = table.get(&key).map_err(GridError::from);
                state.gate.read_seen();
                state.answer(&myself, 0, |lsn| deferred(lsn, reply, r));
            }
            ShardMsg::Contains(key, reply) => {
                let r = table.contains(&key).map_err(GridError::from);
                state.gate.read_seen();
                state.answer(&myself, 0, |lsn| deferred(lsn, reply, r));
            }
            ShardMsg::Count(reply) => {
                let r = Ok(table.count());
                state.gate.read_seen();
                state.answer(&myself, 0, |lsn| deferred(lsn, reply, r));
            }
            ShardMsg::Scan(range, reply) => {
                let r = table.scan(&range).map_err(GridError::from);
                state.gate.read_seen();
                state.answer(&myself, 0, |lsn| deferred(lsn, reply, r));
            }
            ShardMsg::Write(op, reply) => {
                let r = table.write_one(&op).map_err(GridError::from);
                let wrote = r.as_ref().map_or(0, |(lsn, _)| *lsn);
                state.answer(&myself, wrote, |lsn| deferred(lsn, reply, r));
            }
            ShardMsg::Batch(ops, reply) => {
                let r = table.write(&ops).map_err(GridError::from);
                let wrote = r.as_ref().map_or(0, |w| w.lsn);
                state.answer(&myself, wrote, |lsn| deferred(lsn, reply, r));
            }
            ShardMsg::Eval(job, reply) => {
                let (r, wrote) = match eval(table, &job) {
                    Ok((v, lsn)) => (Ok(v), lsn),
                    Err(e) => (Err(e), 0),
                };
                state.answer(&myself, wrote, |lsn| deferred(lsn, reply, r));
            }
            ShardMsg::Prepare(p) => {
                let Prepare { ops, ready, decide, done } = *p;
                if let Err(e) = table.validate(&ops) {
                    let _ = ready.send(Err(e.into()));
                    return fail_if_poisoned(&mut state.gate);
                }
                if ready.send(Ok(())).is_err() {
                    return Ok(());
                }
                // Held: this shard handles nothing else until the decision (or the bound).
                if let Ok(Ok(true)) = tokio::time::timeout(PREPARE_HOLD_MAX, decide).await {
                    // The lease is checked again: the hold may have outlived it.
                    if let Err(e) = state.admit() {
                        let _ = done.send(Err(e));
                        return Ok(());
                    }
                    let Some(table) = state.gate.shard.as_mut() else { return Ok(()) };
                    let r = table.write(&ops).map_err(GridError::from);
                    let wrote = r.as_ref().map_or(0, |w| w.lsn);
                    state.answer(&myself, wrote, |lsn| deferred(lsn, done, r));
                }
            }
            ShardMsg::Pipeline(ops, reply) => {
                let mut results = Vec::with_capacity(ops.len());
                let (mut wrote, mut read) = (0, false);
                for op in ops {
                    read |= matches!(
                        op,
                        PipelineOp::Get(_)
                            | PipelineOp::Contains(_)
                            | PipelineOp::Count
                            | PipelineOp::Scan(_)
                    );
                    let (r, lsn) = execute(table, op);
                    wrote = wrote.max(lsn);
                    results.push(r);
                }
                state.answer(&myself, wrote, |lsn| Deferred {
                    lsn,
                    answer: Box::new(move |err| {
                        let _ = reply.send(match err {
                            None => results,
                            Some(e) => results.into_iter().map(|_| Err(e.clone())).collect(),
                        });
                    }),
                });
                // After `answer`, which schedules the flush of what this pipeline wrote.
                if read {
                    state.gate.read_seen();
                }
            }
            // Handled above, by the gate or as the test hook.
            ShardMsg::Flush
            | ShardMsg::Durable(_)
            | ShardMsg::CheckpointDone
            | ShardMsg::Checkpoint(_)
            | ShardMsg::Close(_)
            | ShardMsg::InjectPanic
            | ShardMsg::Placement(_)
            | ShardMsg::Repl(..)
            | ShardMsg::ReplTick
            | ShardMsg::Digest(_)
            | ShardMsg::Stats(_)
            | ShardMsg::Shed(..)
            | ShardMsg::GetCopy(..) => {}
        }
        if let Some(why) = state.failed.take() {
            return Err(why.into());
        }
        // A heap that failed closed (fsync error, corrupt page met mid-write) is recovered by a
        // restart: the request was answered (or its reply dropped, which is an error to its
        // caller); fail so the supervisor reopens it.
        fail_if_poisoned(&mut state.gate)
    }
}

/// Answers a request with `e` instead of running it (closed, or not served here).
fn refuse(msg: ShardMsg, e: GridError) {
    let e = &e;
    fn err<T>(e: &GridError) -> Result<T, GridError> {
        Err(e.clone())
    }
    match msg {
        ShardMsg::Get(_, r) => drop(r.send(err(e))),
        ShardMsg::Contains(_, r) => drop(r.send(err(e))),
        ShardMsg::Count(r) => drop(r.send(err(e))),
        ShardMsg::Scan(_, r) => drop(r.send(err(e))),
        ShardMsg::Write(_, r) => drop(r.send(err(e))),
        ShardMsg::Batch(_, r) => drop(r.send(err(e))),
        ShardMsg::Eval(_, r) => drop(r.send(err(e))),
        ShardMsg::Prepare(p) => drop(p.ready.send(err(e))),
        ShardMsg::Pipeline(ops, r) => drop(r.send(ops.iter().map(|_| err(e)).collect())),
        // The gate's own messages never get here (`GateMsg::into_gate`).
        ShardMsg::Checkpoint(_)
        | ShardMsg::Close(_)
        | ShardMsg::Durable(_)
        | ShardMsg::CheckpointDone
        | ShardMsg::Flush
        | ShardMsg::InjectPanic
        | ShardMsg::Placement(_)
        | ShardMsg::Repl(..)
        | ShardMsg::ReplTick => {}
        ShardMsg::Digest(r) => drop(r.send(err(e))),
        ShardMsg::Stats(r) => drop(r.send(err(e))),
        ShardMsg::Shed(_, r) => drop(r.send(err(e))),
        ShardMsg::GetCopy(_, r) => drop(r.send(err(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// `scan_range` selects exactly the keys `ScanQuery::matches`, so its results need no filter.
        #[test]
        fn scan_range_selects_exactly_the_matching_keys(
            keys in prop::collection::btree_set("[ab]{0,3}", 0..20),
            prefix in prop::option::of("[ab]{0,2}"),
            start in prop::option::of("[ab]{0,3}"),
            end in prop::option::of("[ab]{0,3}"),
            reverse in any::<bool>(),
        ) {
            let q = ScanQuery {
                prefix,
                start: start.map(Key::Str),
                end: end.map(Key::Str),
                limit: crate::limits::SCAN_LIMIT_MAX,
                reverse,
            };
            let h = heapgrid_heap::Heap::open_storage(
                Box::new(heapgrid_heap::storage::SimDisk::new().storage()) as Box<dyn heapgrid_heap::storage::Storage>,
                HeapOptions::default(),
            ).unwrap();
            let mut t = TableShard::new(h);
            let puts: Vec<WriteOp> = keys.iter().map(|k| WriteOp::Put { key: Key::Str(k.clone()), value: Value::Null }).collect();
            t.write(&puts).unwrap();
            let got: Vec<Key> = t.scan(&scan_range(&q)).unwrap().into_iter().map(|(k, _)| k).collect();
            let mut want: Vec<Key> = keys.iter().map(|k| Key::Str(k.clone())).filter(|k| q.matches(k)).collect();
            if reverse {
                want.reverse();
            }
            prop_assert_eq!(got, want);
        }
    }
}
