//! The table shard actor: a thin wrapper that owns one `TableShard` (one heap) and executes its
//! messages strictly in order.
//!
//! The actor struct is empty; `pre_start` opens the heap, which replays the op log, so a
//! supervisor restart *is* recovery. Writes are applied inside `handle` with their op-log
//! records queued in memory; after the first write of a group the actor sends itself `Flush`,
//! which arrives after everything already in the mailbox and writes all queued records with one
//! write(2). Then, under `FsyncPolicy::Always`, the replies go to the shard's durable-reply task,
//! which makes the highest LSN durable with one fsync and answers them all (group commit with
//! task wake-ups, not thread hand-offs); under the other policies they are sent at once.
//!
//! Invariant: a reply is sent for a write only after its record is durable under the policy.
//! Invariant: if the actor dies, every reply port it held is dropped, so every caller gets an
//! error instead of waiting forever.

use std::path::PathBuf;

use heapgrid_heap::{Durability, FsyncPolicy, Heap, HeapOptions};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::mpsc;

use std::sync::Arc;

use crate::error::GridError;
use crate::key::Key;
use crate::snippet::{Compiled, Limits, ScanQuery, Store};
use crate::table::{OpResult, TableOp, TableShard, WriteOp};
use crate::value::Value;

/// A snippet whose previous run took longer than this runs under `block_in_place`.
const SLOW_SNIPPET_US: u64 = 1_000;

/// How long a (re)starting shard waits for the previous holder of its heap's lock.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Messages a shard actor handles.
pub enum ShardMsg {
    /// Execute one operation.
    Op(TableOp, RpcReplyPort<Result<OpResult, GridError>>),
    /// Run a collection-scoped snippet (compiled by the caller).
    Eval(Box<EvalJob>, RpcReplyPort<Result<OpResult, GridError>>),
    /// Checkpoint the heap (replies if a port is given).
    Checkpoint(Option<RpcReplyPort<Result<(), GridError>>>),
    /// Checkpoint and close the heap (releasing its file lock) before the actor is stopped;
    /// later operations get `GridError::Closed`.
    Close(RpcReplyPort<Result<(), GridError>>),
    /// Write the op-log records queued since the last flush (one write(2)) and answer their
    /// requests. The actor sends it to itself after the first write of a group, so it arrives
    /// after every message already queued: one syscall per drained mailbox.
    Flush,
    /// Test hook: panic inside the handler, as a bug would.
    #[doc(hidden)]
    InjectPanic,
}

/// What a shard actor is started with.
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
    pub out_of_scope: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// A collection-scoped snippet's view: this shard of this table, nothing else.
struct ShardStore<'a> {
    table: &'a mut TableShard,
    job: &'a EvalJob,
}

impl ShardStore<'_> {
    fn refuse(&self, e: GridError) -> Result<(), GridError> {
        if let Some(flag) = &self.job.out_of_scope {
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
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

    fn run(&mut self, op: TableOp) -> Result<OpResult, GridError> {
        self.table.execute(&op).map_err(GridError::from)
    }
}

impl Store for ShardStore<'_> {
    fn check_write(&mut self, coll: &str, key: &Key) -> Result<(), GridError> {
        self.own_key(coll, key)?;
        key.encode().map(|_| ()).map_err(|e| GridError::Invalid(e.to_string()))
    }

    fn get(&mut self, coll: &str, key: &Key) -> Result<Option<Value>, GridError> {
        self.own_key(coll, key)?;
        match self.run(TableOp::Get { key: key.clone() })? {
            OpResult::Value(v) => Ok(v.map(|v| v.value)),
            r => Err(GridError::Corrupted(format!("get answered {r:?}"))),
        }
    }

    fn contains(&mut self, coll: &str, key: &Key) -> Result<bool, GridError> {
        self.own_key(coll, key)?;
        match self.run(TableOp::Contains { key: key.clone() })? {
            OpResult::Bool(b) => Ok(b),
            r => Err(GridError::Corrupted(format!("contains answered {r:?}"))),
        }
    }

    fn count(&mut self, coll: &str) -> Result<u64, GridError> {
        self.whole_table(coll, "len()")?;
        match self.run(TableOp::Count)? {
            OpResult::Count(n) => Ok(n),
            r => Err(GridError::Corrupted(format!("count answered {r:?}"))),
        }
    }

    fn scan(&mut self, coll: &str, q: &ScanQuery) -> Result<Vec<(Key, Value)>, GridError> {
        self.whole_table(coll, "a scan")?;
        match self.run(scan_op(q))? {
            OpResult::Entries(e) => Ok(e.into_iter().map(|(k, v)| (k, v.value)).collect()),
            r => Err(GridError::Corrupted(format!("scan answered {r:?}"))),
        }
    }
}

/// The smallest string greater than every string starting with `p` (`None`: there is none).
fn str_successor(p: &str) -> Option<String> {
    let mut chars: Vec<char> = p.chars().collect();
    while let Some(last) = chars.pop() {
        let next = (last as u32 + 1..=char::MAX as u32).find_map(char::from_u32);
        if let Some(n) = next {
            chars.push(n);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// The table operation behind a snippet's scan: exactly the keys `ScanQuery::matches`, at most
/// `limit` of them, in its order.
pub fn scan_op(q: &ScanQuery) -> TableOp {
    use std::ops::Bound;
    match &q.prefix {
        Some(p) if q.start.is_none() && q.end.is_none() => {
            TableOp::Prefix { prefix: p.clone(), limit: q.limit, reverse: q.reverse }
        }
        Some(p) => {
            // The keys with prefix `p` are exactly [p, successor(p)): narrow both bounds to them.
            let lo = Key::Str(p.clone());
            let start = q.start.clone().filter(|s| *s > lo).unwrap_or(lo);
            let end = match (q.end.clone(), str_successor(p).map(Key::Str)) {
                (Some(e), Some(s)) => Bound::Excluded(e.min(s)),
                (Some(e), None) | (None, Some(e)) => Bound::Excluded(e),
                (None, None) => Bound::Unbounded,
            };
            TableOp::Scan { start: Bound::Included(start), end, limit: q.limit, reverse: q.reverse }
        }
        None => TableOp::Scan {
            start: q.start.clone().map_or(Bound::Unbounded, Bound::Included),
            end: q.end.clone().map_or(Bound::Unbounded, Bound::Excluded),
            limit: q.limit,
            reverse: q.reverse,
        },
    }
}

/// Runs a snippet in the shard: its writes become one batch (one op-log record), or nothing.
/// Returns the result and the batch's LSN (0 if it wrote nothing).
fn run_snippet(table: &mut TableShard, job: &EvalJob) -> Result<(OpResult, u64), GridError> {
    let outcome =
        job.compiled.run(&mut ShardStore { table, job }, &job.limits, job.key.as_ref(), &job.args)?;
    if outcome.writes.is_empty() {
        return Ok((OpResult::Snippet(outcome.value), 0));
    }
    if job.read_only {
        return Err(GridError::PermissionDenied {
            collection: job.table.clone(),
            permission: "write".into(),
        });
    }
    // Every write was checked at its assignment; checked again here, where it is committed.
    if let Some(w) =
        outcome.writes.iter().find(|w| w.collection != job.table || w.key.shard(job.shards) != job.shard)
    {
        return Err(GridError::Invalid(format!(
            "a snippet in shard {} of {} cannot write {}[{}]",
            job.shard, job.table, w.collection, w.key
        )));
    }
    let ops = outcome
        .writes
        .into_iter()
        .map(|w| match w.value {
            Some(value) => WriteOp::Put { key: w.key, value },
            None => WriteOp::Delete { key: w.key },
        })
        .collect();
    match table.execute(&TableOp::Batch(ops)).map_err(GridError::from)? {
        OpResult::Written { lsn, .. } => Ok((OpResult::Snippet(outcome.value), lsn)),
        r => Err(GridError::Corrupted(format!("batch answered {r:?}"))),
    }
}

#[derive(Clone)]
pub struct ShardArgs {
    pub path: PathBuf,
    pub heap: HeapOptions,
}

type Waiting = (u64, Result<OpResult, GridError>, RpcReplyPort<Result<OpResult, GridError>>);

/// The shard's state: its table and, under `Always`, the queue of replies awaiting an fsync.
pub struct ShardState {
    /// `None` once closed.
    table: Option<TableShard>,
    durable_tx: Option<mpsc::UnboundedSender<Waiting>>,
    /// Writes applied whose op-log records are queued, with their replies (sent after `Flush`).
    unflushed: Vec<Waiting>,
    flush_scheduled: bool,
}

impl ShardState {
    /// Writes the queued op-log records, then answers (or, under `Always`, hands to the
    /// durable-reply task) every request they belong to. On failure every one of them gets the
    /// error, and the caller fails the actor: the heap is poisoned and a restart recovers it.
    fn flush(&mut self) -> Result<(), ActorProcessingErr> {
        self.flush_scheduled = false;
        let r = match self.table.as_mut() {
            Some(t) => t.heap_mut().flush_log().map_err(GridError::from),
            None => Ok(()),
        };
        let waiting = std::mem::take(&mut self.unflushed);
        if let Err(e) = r {
            for (_, _, reply) in waiting {
                let _ = reply.send(Err(GridError::Unavailable(format!("write not logged: {e}"))));
            }
            return Err(format!("op log write failed: {e}").into());
        }
        for (lsn, r, reply) in waiting {
            match &self.durable_tx {
                Some(tx) => {
                    if let Err(mpsc::error::SendError((_, r, reply))) = tx.send((lsn, r, reply)) {
                        let _ =
                            reply.send(r.and(Err(GridError::Unavailable("durable-reply task ended".into()))));
                    }
                }
                None => {
                    let _ = reply.send(r);
                }
            }
        }
        Ok(())
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
        _myself: ActorRef<ShardMsg>,
        args: ShardArgs,
    ) -> Result<ShardState, ActorProcessingErr> {
        if let Some(dir) = args.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // After a crash the previous incarnation's state (and its file lock) may still be being
        // dropped while we start: wait for it briefly rather than fail the restart.
        let started = tokio::time::Instant::now();
        let heap = loop {
            match Heap::open(&args.path, args.heap.clone()) {
                Err(heapgrid_heap::Error::Locked(_)) if started.elapsed() < LOCK_WAIT => {
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
                r => break r?,
            }
        };
        let durable_tx = match (args.heap.fsync, heap.durability()) {
            (FsyncPolicy::Always, Some(d)) => Some(spawn_durable_replies(d)),
            _ => None,
        };
        let mut table = TableShard::new(heap);
        table.set_deferred_log(true);
        Ok(ShardState { table: Some(table), durable_tx, unflushed: Vec::new(), flush_scheduled: false })
    }

    async fn handle(
        &self,
        myself: ActorRef<ShardMsg>,
        msg: ShardMsg,
        state: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ShardMsg::Op(..) | ShardMsg::Eval(..) => {
                let Some(table) = state.table.as_mut() else {
                    match msg {
                        ShardMsg::Op(_, reply) | ShardMsg::Eval(_, reply) => {
                            let _ = reply.send(Err(GridError::Closed));
                        }
                        _ => {}
                    }
                    return Ok(());
                };
                // Each answer with the LSN of what it wrote (0: nothing to wait for).
                let (r, reply) = match msg {
                    ShardMsg::Op(op, reply) => (
                        table.execute(&op).map_err(GridError::from).map(|r| {
                            let lsn = if let OpResult::Written { lsn, .. } = &r { *lsn } else { 0 };
                            (r, lsn)
                        }),
                        reply,
                    ),
                    // A snippet whose last run took over 1 ms runs under `block_in_place`, so the
                    // runtime moves other tasks off this worker meanwhile; quick ones run inline.
                    ShardMsg::Eval(job, reply) if job.compiled.last_run_us() > SLOW_SNIPPET_US => {
                        (blocking(|| run_snippet(table, &job)), reply)
                    }
                    ShardMsg::Eval(job, reply) => (run_snippet(table, &job), reply),
                    _ => return Ok(()),
                };
                let (r, lsn) = match r {
                    Ok((r, lsn)) => (Ok(r), lsn),
                    Err(e) => (Err(e), 0),
                };
                // A heap that failed closed (fsync error, corrupt page met mid-write) is recovered by
                // a restart: answer this request, then fail so the supervisor reopens it.
                if let Some(why) = table.heap().poisoned().map(str::to_string) {
                    let _ = reply.send(r);
                    return Err(format!("heap failed closed: {why}").into());
                }
                if lsn > 0 {
                    // Answered after the group's op-log write (`Flush`).
                    state.unflushed.push((lsn, r, reply));
                    if !state.flush_scheduled {
                        state.flush_scheduled = true;
                        if myself.cast(ShardMsg::Flush).is_err() {
                            state.flush()?;
                        }
                    }
                } else {
                    let _ = reply.send(r);
                }
            }
            ShardMsg::Flush => state.flush()?,
            ShardMsg::Checkpoint(reply) => {
                // A checkpoint flushes and fsyncs: let the runtime move other tasks off this worker.
                let r = match state.table.as_mut() {
                    Some(t) => blocking(|| t.heap_mut().checkpoint()).map_err(GridError::from),
                    None => Err(GridError::Closed),
                };
                let poisoned = state.table.as_ref().and_then(|t| t.heap().poisoned().map(str::to_string));
                if let Some(reply) = reply {
                    let _ = reply.send(r);
                }
                if let Some(why) = poisoned {
                    return Err(format!("heap failed closed: {why}").into());
                }
            }
            ShardMsg::Close(reply) => {
                state.flush()?;
                let r = match state.table.take() {
                    Some(t) => t.into_heap().close().map_err(GridError::from),
                    None => Ok(()),
                };
                state.durable_tx = None;
                let _ = reply.send(r);
            }
            ShardMsg::InjectPanic => panic!("injected panic (test hook)"),
        }
        Ok(())
    }
}

/// Runs blocking work (a checkpoint's flushes) so the runtime can move other tasks off this
/// worker; on a current-thread runtime there is nowhere to move them, so it just runs.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The durable-reply task of a shard under `FsyncPolicy::Always`: one fsync per drained group.
fn spawn_durable_replies(durability: Durability) -> mpsc::UnboundedSender<Waiting> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Waiting>();
    tokio::spawn(async move {
        let mut group = Vec::new();
        while let Some(first) = rx.recv().await {
            group.push(first);
            while let Ok(more) = rx.try_recv() {
                group.push(more);
            }
            let upto = group.iter().map(|(lsn, _, _)| *lsn).max().unwrap_or(0);
            let d = durability.clone();
            let synced = tokio::task::spawn_blocking(move || d.wait(upto)).await;
            let err = match synced {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(GridError::from(e).to_string()),
                Err(e) => Some(format!("fsync task failed: {e}")),
            };
            for (_, r, reply) in group.drain(..) {
                let r = match &err {
                    None => r,
                    Some(why) => Err(GridError::Unavailable(format!("write not durable: {why}"))),
                };
                let _ = reply.send(r);
            }
        }
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// `scan_op` selects exactly the keys `ScanQuery::matches`, so its results need no filter.
        #[test]
        fn scan_op_selects_exactly_the_matching_keys(
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
                limit: crate::table::SCAN_LIMIT_MAX,
                reverse,
            };
            let h = heapgrid_heap::Heap::open_storage(
                Box::new(heapgrid_heap::storage::SimDisk::new().storage()) as Box<dyn heapgrid_heap::storage::Storage>,
                HeapOptions::default(),
            ).unwrap();
            let mut t = TableShard::new(h);
            let puts = keys.iter().map(|k| WriteOp::Put { key: Key::Str(k.clone()), value: Value::Null }).collect();
            t.execute(&TableOp::Batch(puts)).unwrap();
            let got: Vec<Key> = match t.execute(&scan_op(&q)).unwrap() {
                OpResult::Entries(e) => e.into_iter().map(|(k, _)| k).collect(),
                r => panic!("{r:?}"),
            };
            let mut want: Vec<Key> = keys.iter().map(|k| Key::Str(k.clone())).filter(|k| q.matches(k)).collect();
            if reverse {
                want.reverse();
            }
            prop_assert_eq!(got, want);
        }
    }
}
