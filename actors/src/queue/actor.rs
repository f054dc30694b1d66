//! The queue service actor: every queue of the node (the pure `Queue` state machine of each,
//! holding item metadata only), over the queue heap (`store`, holding the values), behind the
//! reply gate (`gate`). It handles its messages strictly in order, so every push, delivery, ack
//! and expiry of a queue has one place in time.
//!
//! One actor holds every queue of the node (a queue shard): a queue is a set of records in its
//! heap and an entry in memory, which is what makes many small queues cheap (DESIGN.md) and lets
//! a dead letter move to its dead-letter queue in the same op-log record that removes it.
//!
//! - Every change is one op-log record, and its answer waits for it (the gate): a push, a
//!   delivery (its number is written before the item is handed out), an ack, a nack.
//! - Time is the actor's monotonic clock (`tokio::time::Instant`); records hold wall-clock times,
//!   converted at load. A tick every `TICK` handles the queues whose next deadline, delay or
//!   dedup expiry is due (`timers`, one entry per queue), so it costs what is due.
//! - Blocked pops wait FIFO per queue, each with its own timer. A waiter whose caller is gone (its
//!   reply port closed: the connection ended) is skipped, never handed an item.
//! - A delivery made in a lock session returns to ready when the session ends (`SessionEnded`,
//!   sent by the lock service).
//! - A queue with no record, no items and no waiters leaves memory after each request.
//!
//! Invariant: an item is in memory (its queue's state machine) iff its value record is stored,
//! and its delivery count in memory is the one recorded (`check_memory` with the heap's checker).
//! Invariant: no reply to a change is sent before the change's record is durable per the policy.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use heapgrid_heap::HeapOptions;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::ops::{
    Delivery, Mode, QUEUE_NAME_BYTES_MAX, QueueLen, QueueOp, QueueOptions, QueueResult, Receipt,
};
use super::store::{
    Attempt, Change, DedupRec, HISTORY_MAX, ItemMeta, LoadedQueue, Outcome, QueueRec, QueueStore, SEQ_BLOCK,
};
use super::{PopMode, Queue, QueueConfig, QueueError};
use crate::error::GridError;
use crate::gate::{Deferred, GatedService, Group, HeapOwner, LogGate, deferred, handle_gated, open_heap};
use crate::lock::SessionId;
use crate::lock::fence::FenceTable;
use crate::replication::service::{ServiceEvent, ServiceRepl, answer_held};
use crate::value::Value;

type Reply<T> = RpcReplyPort<Result<T, GridError>>;

/// How often due deadlines, delays and dedup expiries are handled: a delivery returns to ready
/// within one tick of its deadline.
pub const TICK: Duration = Duration::from_millis(10);
/// Longest wait of one pop.
pub const QUEUE_WAIT_MS_MAX: u64 = 60_000;
/// Most items one pop or peek returns.
pub const QUEUE_POP_MAX: u32 = 1_000;
/// Most poppers blocked on one queue.
pub const QUEUE_WAITERS_MAX: usize = 10_000;
/// Longest dedup key, in bytes.
pub const DEDUP_KEY_BYTES_MAX: usize = 200;
/// Largest item value (encoded), so its dead letter (value + history) always fits a record.
pub const QUEUE_VALUE_BYTES_MAX: usize = 16 << 20;
/// Most queues in memory (with a record, items or waiters).
pub const QUEUES_MAX: usize = 100_000;
/// Longest visibility, delay, extension or dedup window.
pub const QUEUE_TIME_MS_MAX: u64 = 7 * 24 * 3600 * 1000;
/// Most deliveries an item may be configured to get.
pub const MAX_DELIVERIES_MAX: u32 = 1_000_000;
/// Bytes of item values one pop hands out at most (the first item always goes): the answer
/// must fit a frame, and an item handed out must reach its caller.
pub const QUEUE_POP_BYTES_MAX: usize = 24 << 20;
/// Items removed per op-log record by a purge.
const PURGE_CHUNK: usize = 50_000;

pub enum QueueMsg {
    Call(QueueOp, Reply<QueueResult>),
    /// A blocked pop's wait ended.
    WaitOver(u64),
    /// A blocked push's wait ended.
    PushWaitOver(u64),
    Tick,
    /// A lock session ended: its deliveries return to ready.
    SessionEnded(SessionId),
    /// Gives a delivery back uncounted (a snippet's run that took it did not commit): ready at
    /// its seq, its delivery count as before the pop. Internal: not on the wire.
    Release(String, Receipt),
    /// Runs the heap's debug checker and `check_memory`.
    Check(Reply<()>),
    Flush,
    Durable(Vec<Group>),
    Checkpoint(Option<Reply<()>>),
    CheckpointDone,
    Close(Reply<()>),
    /// The heap's figures (handled by the gate).
    Stats(Reply<heapgrid_heap::HeapStats>),
    /// Drop clean resident pages (the memory budget; handled by the gate).
    Shed(u64, Reply<heapgrid_heap::ShedReport>),
    /// The cluster map placed the queue service (a cluster).
    Placement(crate::cluster::map::Placement),
    /// A replication frame from another node.
    Repl(crate::replication::NodeId, crate::replication::shard::ReplWire),
    /// The replication tick.
    ReplTick,
    /// This node's copy of the service's heap, summarised.
    Digest(Reply<crate::replication::shard::ShardDigest>),
    #[doc(hidden)]
    InjectPanic,
}

crate::gate::impl_gate_msg!(QueueMsg);

#[derive(Clone)]
pub struct QueueArgs {
    pub path: PathBuf,
    pub heap: HeapOptions,
    pub fences: Arc<FenceTable>,
    pub view: Arc<crate::gate::ReadView>,
    /// The node's replication network when it is in a cluster: the service is then replicated
    /// (`replication::service`), its heap at `path` is the cluster's copy.
    pub cluster: Option<Arc<crate::replication::shard::ReplNet>>,
}

/// One queue in memory.
struct Q {
    q: Queue<()>,
    rec: QueueRec,
    /// Whether `rec` is stored.
    stored: bool,
    /// Blocked pops, oldest first.
    waiters: VecDeque<u64>,
    /// Pushes waiting for room, oldest first.
    pushers: VecDeque<u64>,
    /// This queue's entry in `QueueState::timers`, if any.
    timer: Option<u64>,
    /// Deliveries made in a lock session.
    sessions: HashMap<u64, SessionId>,
}

fn config_of(rec: &QueueRec) -> QueueConfig {
    QueueConfig {
        max_len: rec.max_len,
        // Without a dead-letter queue nothing is dead-lettered: redelivered without limit.
        max_deliveries: if rec.dead_letter.is_some() { rec.max_deliveries } else { u32::MAX },
        visibility_ms: rec.visibility_ms,
        dedup_window_ms: rec.dedup_window_ms,
    }
}

fn rec_of(o: &QueueOptions, seq_floor: u64) -> QueueRec {
    QueueRec {
        max_len: o.max_len,
        max_deliveries: o.max_deliveries,
        visibility_ms: o.visibility_ms,
        dedup_window_ms: o.dedup_window_ms,
        dead_letter: o.dead_letter.clone(),
        seq_floor,
    }
}

impl Q {
    fn new(rec: QueueRec, stored: bool) -> Q {
        let mut q = Queue::new(config_of(&rec));
        q.skip_to(rec.seq_floor.max(1));
        Q {
            q,
            rec,
            stored,
            waiters: VecDeque::new(),
            pushers: VecDeque::new(),
            timer: None,
            sessions: HashMap::new(),
        }
    }

    fn len(&self) -> QueueLen {
        let l = self.q.len();
        QueueLen {
            ready: l.ready,
            in_flight: l.in_flight,
            delayed: l.delayed,
            waiters: self.waiters.len() as u64,
        }
    }
}

/// One failed delivery of item `seq`: its number, how it ended, when it is ready again (none:
/// now), and whether the state machine dead-lettered it.
struct Failed {
    seq: u64,
    delivery: u32,
    outcome: Outcome,
    delay_until: Option<u64>,
    dead: bool,
}

/// A push waiting for room.
struct Pusher {
    queue: String,
    bytes: Vec<u8>,
    dedup_key: Option<String>,
    delay_ms: u64,
    port: Reply<QueueResult>,
    timer: Option<tokio::task::JoinHandle<Result<(), ractor::MessagingErr<QueueMsg>>>>,
}

/// What a push did.
enum Pushed {
    /// Added (or found by its dedup key); answered.
    Done,
    /// The queue is at its `max_len`: nothing was added, the port is handed back.
    Full { max_len: u64, port: Reply<QueueResult> },
}

struct Waiter {
    queue: String,
    n: u32,
    mode: Mode,
    visibility_ms: Option<u64>,
    session: Option<SessionId>,
    port: Reply<QueueResult>,
    timer: Option<tokio::task::JoinHandle<Result<(), ractor::MessagingErr<QueueMsg>>>>,
}

pub struct QueueState {
    gate: LogGate<QueueStore>,
    origin: tokio::time::Instant,
    /// Wall-clock ms at `origin`.
    wall_origin: u64,
    queues: HashMap<String, Q>,
    pending: HashMap<u64, Waiter>,
    pushing: HashMap<u64, Pusher>,
    next_waiter: u64,
    /// `(time, queue)`: when each queue's `tick` next has work, one entry per queue at most.
    timers: BTreeSet<(u64, String)>,
    /// The deliveries made in each lock session: `(queue, seq)`.
    by_session: HashMap<SessionId, HashSet<(String, u64)>>,
    fences: Arc<FenceTable>,
    /// The service's replication, in a cluster.
    cluster: Option<ServiceRepl>,
    /// Memory holds the service (always on a lone node; in a cluster only on its primary).
    loaded: bool,
    /// Replication failed while handling a message: the actor fails after it.
    failed: Option<String>,
}

fn wall_now() -> u64 {
    crate::stats::unix_ms()
}

fn invalid(why: String) -> GridError {
    GridError::Invalid(why)
}

fn check_name(name: &str) -> Result<(), GridError> {
    if name.is_empty() || name.len() > QUEUE_NAME_BYTES_MAX {
        return Err(invalid(format!(
            "a queue name is 1 to {QUEUE_NAME_BYTES_MAX} bytes (got {})",
            name.len()
        )));
    }
    Ok(())
}

fn check_time(what: &str, ms: u64, min: u64) -> Result<(), GridError> {
    if ms < min || ms > QUEUE_TIME_MS_MAX {
        return Err(invalid(format!("{what} is {min} to {QUEUE_TIME_MS_MAX} ms (got {ms})")));
    }
    Ok(())
}

/// What a push must pass before anything changes (also checked at the end of a snippet's run,
/// so its pushes are not refused after its commit); the value, encoded.
pub fn check_push(
    queue: &str,
    value: &Value,
    dedup_key: Option<&str>,
    delay_ms: u64,
) -> Result<Vec<u8>, GridError> {
    check_name(queue)?;
    if dedup_key.is_some_and(|k| k.is_empty() || k.len() > DEDUP_KEY_BYTES_MAX) {
        return Err(invalid(format!("a dedup key is 1 to {DEDUP_KEY_BYTES_MAX} bytes")));
    }
    if delay_ms > 0 {
        check_time("delay_ms", delay_ms, 0)?;
    }
    let bytes = value.encode().map_err(|e| GridError::Value(e.to_string()))?;
    if bytes.len() > QUEUE_VALUE_BYTES_MAX {
        return Err(GridError::LimitExceeded {
            what: "bytes of a queue item".into(),
            got: bytes.len() as u64,
            max: QUEUE_VALUE_BYTES_MAX as u64,
        });
    }
    Ok(bytes)
}

fn stale(queue: &str, r: Receipt) -> GridError {
    GridError::StaleReceipt { queue: queue.to_string(), seq: r.seq, delivery: r.delivery }
}

fn record(meta: &mut ItemMeta, delivery: u32, outcome: Outcome, at_ms: u64) {
    meta.history.push(Attempt { delivery, outcome, at_ms });
    if meta.history.len() > HISTORY_MAX {
        meta.history.remove(0);
    }
}

impl QueueState {
    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// `gate.answer`; in a cluster the answer also waits for the replicas of every write
    /// before it (`replication::service`).
    fn answer(&mut self, myself: &ActorRef<QueueMsg>, wrote: u64, d: impl FnOnce(u64) -> Deferred) {
        let repl = self.cluster.as_mut().and_then(|c| c.repl());
        let r = answer_held(repl, &mut self.gate, myself, wrote, true, || "the queue service".into(), d);
        if let Err(e) = r {
            self.failed = Some(e.to_string());
        }
    }

    /// Memory from what the heap holds, as after a restart: every item ready (one in flight
    /// before keeps its delivery count), dedup keys and delays as recorded; then the repairs a
    /// restart makes (dead-lettering what used up its deliveries, records for orphan items),
    /// queued for the first flush.
    fn restore(&mut self, loaded: BTreeMap<String, LoadedQueue>) -> Result<(), GridError> {
        let (wall_origin, wall) = (self.wall_origin, wall_now());
        let mono = |w: u64| w.saturating_sub(wall_origin);
        for (name, l) in loaded {
            let (rec, stored) = match l.rec {
                Some(r) => (r, true),
                None => (rec_of(&QueueOptions::defaults(&name), 1), false),
            };
            let mut q = Q::new(rec, stored);
            for item in l.items {
                // In flight before the restart: ready again, its count kept.
                let until = item.meta.delayed_until_ms.filter(|&w| w > wall).map(mono);
                q.q.restore(item.seq, (), item.meta.deliveries, until);
            }
            for (k, d) in l.dedup {
                q.q.restore_dedup(k, d.seq, mono(d.until_ms));
            }
            q.q.restored();
            if !q.stored && q.q.next_seq() > 1 {
                // Items without a record (not written by this code): reserve before any push.
                q.rec.seq_floor = q.q.next_seq();
            }
            self.queues.insert(name, q);
        }
        self.loaded = true;
        // Written at the next flush (no answer is released before them).
        self.dead_letter_restarted()?;
        self.record_orphans()?;
        let names: Vec<String> = self.queues.keys().cloned().collect();
        for n in names {
            self.schedule(&n);
        }
        Ok(())
    }

    /// Memory emptied (this node is no longer the service's primary): blocked pops and pushes
    /// are answered `why` (nothing was done for them).
    fn drop_memory(&mut self, why: &GridError) {
        for (_, w) in self.pending.drain() {
            if let Some(t) = w.timer {
                t.abort();
            }
            let _ = w.port.send(Err(why.clone()));
        }
        for (_, p) in self.pushing.drain() {
            if let Some(t) = p.timer {
                t.abort();
            }
            let _ = p.port.send(Err(why.clone()));
        }
        self.queues.clear();
        self.timers.clear();
        self.by_session.clear();
        self.loaded = false;
    }

    /// In a cluster: starts replicating once the map places the service.
    fn replicate(&mut self, myself: &ActorRef<QueueMsg>) -> Result<(), GridError> {
        let Some(c) = self.cluster.as_mut() else { return Ok(()) };
        let me = myself.clone();
        c.ensure(self.gate.shard.as_mut(), move || me.cast(QueueMsg::ReplTick).is_ok())
    }

    /// In a cluster: a placement, a frame or the replication tick, then the role it leaves.
    fn replicated(&mut self, myself: &ActorRef<QueueMsg>, ev: ServiceEvent) -> Result<(), GridError> {
        let Some(c) = self.cluster.as_mut() else { return Ok(()) };
        let me = myself.clone();
        c.on(self.gate.shard.as_mut(), ev, move || me.cast(QueueMsg::ReplTick).is_ok())?;
        self.roles(myself)
    }

    /// Whether the service runs here now: a lone node, or the cluster's leased primary.
    fn serving_now(&mut self) -> bool {
        self.loaded && self.cluster.as_mut().is_none_or(|c| c.admit().is_ok())
    }

    /// After each message: a failure of replication fails the actor; what was written is
    /// recorded for shipping (a timer's writes too) and shipped once the op log has it.
    fn after(&mut self) -> Result<(), GridError> {
        if let Some(why) = self.failed.take() {
            return Err(GridError::Unavailable(why));
        }
        match self.cluster.as_mut() {
            Some(c) => c.after(self.gate.shard.as_mut()),
            None => Ok(()),
        }
    }

    /// In a cluster: loads the service on becoming its leased primary, drops it on ceasing to
    /// be the primary.
    fn roles(&mut self, myself: &ActorRef<QueueMsg>) -> Result<(), GridError> {
        let Some(c) = self.cluster.as_mut() else { return Ok(()) };
        if c.should_load(self.loaded) {
            let loaded = super::store::load(self.store_ref()?.heap())?;
            tracing::info!(queues = loaded.len(), "the queue service is served here now");
            self.restore(loaded)?;
            self.answer(myself, 0, |lsn| Deferred { lsn, answer: Box::new(|_| {}) });
        } else if c.should_drop(self.loaded) {
            let why = c.not_primary();
            tracing::info!("the queue service moved to another node");
            self.drop_memory(&why);
        }
        Ok(())
    }

    fn wall(&self, now: u64) -> u64 {
        self.wall_origin + now
    }

    fn store(&mut self) -> Result<&mut QueueStore, GridError> {
        self.gate.shard.as_mut().ok_or(GridError::Closed)
    }

    fn store_ref(&self) -> Result<&QueueStore, GridError> {
        self.gate.shard.as_ref().ok_or(GridError::Closed)
    }

    /// Queue `name` in memory, with default options if it is new.
    fn activate(&mut self, name: &str) -> Result<&mut Q, GridError> {
        if !self.queues.contains_key(name) {
            if self.queues.len() >= QUEUES_MAX {
                return Err(GridError::LimitExceeded {
                    what: "queues in memory (with a record, items or waiters)".into(),
                    got: QUEUES_MAX as u64 + 1,
                    max: QUEUES_MAX as u64,
                });
            }
            let q = Q::new(rec_of(&QueueOptions::defaults(name), 1), false);
            self.queues.insert(name.to_string(), q);
        }
        Ok(self.queues.get_mut(name).expect("inserted above"))
    }

    /// Dead-letter queue `name` in memory, past `QUEUES_MAX` if need be: a dead letter is never
    /// refused (it is not the caller's item to lose).
    fn activate_dead_letters(&mut self, name: &str) -> &mut Q {
        self.queues
            .entry(name.to_string())
            .or_insert_with(|| Q::new(rec_of(&QueueOptions::defaults(name), 1), false))
    }

    /// The next ready items of `name` one pop or peek hands out, with their values (read once):
    /// up to `n`, as many as fit `QUEUE_POP_BYTES_MAX`, and at least one.
    fn next_ready(&self, name: &str, n: u32) -> Result<Vec<(u64, Value)>, GridError> {
        let Some(q) = self.queues.get(name) else { return Ok(Vec::new()) };
        let store = self.store_ref()?;
        let (mut bytes, mut out) = (0usize, Vec::new());
        for (seq, ()) in q.q.peek(n as usize) {
            let (value, len) = store.value_sized(name, seq)?;
            bytes += len;
            if !out.is_empty() && bytes > QUEUE_POP_BYTES_MAX {
                break;
            }
            out.push((seq, value));
        }
        Ok(out)
    }

    /// Adds a record of the queue's options to `c` if the next seq needs a new reservation (or
    /// the queue has no record yet).
    fn reserve(q: &mut Q, name: &str, c: &mut Change) -> Result<(), GridError> {
        let next = q.q.next_seq();
        if !q.stored || next >= q.rec.seq_floor {
            q.rec.seq_floor = next + SEQ_BLOCK;
            q.stored = true;
            c.queue(name, &q.rec)?;
        }
        Ok(())
    }

    /// Keeps the one timer entry of queue `name` at its next due time.
    fn schedule(&mut self, name: &str) {
        let Some(q) = self.queues.get_mut(name) else { return };
        let want = q.q.next_due();
        if q.timer != want {
            if let Some(t) = q.timer {
                self.timers.remove(&(t, name.to_string()));
            }
            if let Some(t) = want {
                self.timers.insert((t, name.to_string()));
            }
            q.timer = want;
        }
    }

    /// Queue `name` leaves memory if nothing keeps it there.
    fn settle(&mut self, name: &str) {
        if self
            .queues
            .get(name)
            .is_some_and(|q| !q.stored && q.q.is_empty() && q.waiters.is_empty() && q.pushers.is_empty())
            && let Some(q) = self.queues.remove(name)
            && let Some(t) = q.timer
        {
            self.timers.remove(&(t, name.to_string()));
        }
    }

    fn untie(&mut self, name: &str, seq: u64) {
        if let Some(q) = self.queues.get_mut(name)
            && let Some(s) = q.sessions.remove(&seq)
            && let Some(set) = self.by_session.get_mut(&s)
        {
            set.remove(&(name.to_string(), seq));
            if set.is_empty() {
                self.by_session.remove(&s);
            }
        }
    }

    /// Hands out up to `n` ready items of `name`, recording each delivery in `c`.
    fn deliver(
        &mut self,
        name: &str,
        n: u32,
        mode: Mode,
        visibility_ms: Option<u64>,
        session: Option<SessionId>,
        c: &mut Change,
    ) -> Result<Vec<Delivery>, GridError> {
        let now = self.now_ms();
        let values = self.next_ready(name, n)?;
        let Some(q) = self.queues.get_mut(name) else { return Ok(Vec::new()) };
        let pop_mode = match mode {
            Mode::Ack => PopMode::Ack,
            Mode::Take => PopMode::Take,
        };
        // The same items, in the same (seq) order, as `next_ready` read.
        let ds = q.q.pop(values.len(), pop_mode, now);
        if let (Mode::Ack, Some(v)) = (mode, visibility_ms) {
            for d in &ds {
                q.q.extend(d.receipt, v, now).expect("just delivered");
            }
        }
        let mut out = Vec::with_capacity(ds.len());
        for (d, (seq, value)) in ds.into_iter().zip(values) {
            debug_assert_eq!(d.seq, seq);
            let store = self.gate.shard.as_ref().ok_or(GridError::Closed)?;
            match mode {
                Mode::Take => {
                    c.item_gone(name, d.seq)?;
                }
                Mode::Ack => {
                    let mut meta = store.meta(name, d.seq)?;
                    meta.deliveries = d.deliveries;
                    meta.delayed_until_ms = None;
                    c.meta(name, d.seq, &meta)?;
                    if let Some(s) = session {
                        let q = self.queues.get_mut(name).expect("delivering from it");
                        q.sessions.insert(d.seq, s);
                        self.by_session.entry(s).or_default().insert((name.to_string(), d.seq));
                    }
                }
            }
            let receipt = d.receipt;
            out.push(Delivery { seq: d.seq, receipt, deliveries: d.deliveries, value });
        }
        Ok(out)
    }

    /// Moves item `seq` of `from` (already out of its state machine) to `from`'s dead-letter
    /// queue, as a record of where it came from and its history, in `c`.
    fn dead_letter(
        &mut self,
        from: &str,
        seq: u64,
        deliveries: u32,
        meta: &ItemMeta,
        c: &mut Change,
    ) -> Result<Option<String>, GridError> {
        let value = self.store_ref()?.value(from, seq)?;
        c.item_gone(from, seq)?;
        self.untie(from, seq);
        let Some(dlq) = self.queues.get(from).and_then(|q| q.rec.dead_letter.clone()) else {
            return Ok(None);
        };
        let history = meta
            .history
            .iter()
            .map(|a| {
                Value::Map(
                    [
                        ("delivery".to_string(), Value::Int(i64::from(a.delivery))),
                        ("outcome".to_string(), Value::Str(a.outcome.name().into())),
                        ("at_ms".to_string(), Value::Int(a.at_ms as i64)),
                    ]
                    .into_iter()
                    .collect(),
                )
            })
            .collect();
        let letter = Value::Map(
            [
                ("queue".to_string(), Value::Str(from.to_string())),
                ("seq".to_string(), Value::Int(seq as i64)),
                ("deliveries".to_string(), Value::Int(i64::from(deliveries))),
                ("history".to_string(), Value::List(history)),
                ("value".to_string(), value),
            ]
            .into_iter()
            .collect(),
        );
        let bytes = letter.encode().map_err(|e| GridError::Value(e.to_string()))?;
        let q = self.activate_dead_letters(&dlq);
        // Nor by the dead-letter queue's `max_len`.
        let dseq = q.q.next_seq();
        q.q.restore(dseq, (), 0, None);
        Self::reserve(q, &dlq, c)?;
        c.item(&dlq, dseq, &bytes)?;
        Ok(Some(dlq))
    }

    /// Answers the blocked pops of `name` while it has ready items, oldest first, skipping
    /// those whose callers are gone.
    fn serve_waiters(&mut self, myself: &ActorRef<QueueMsg>, name: &str) -> Result<(), GridError> {
        loop {
            let Some(q) = self.queues.get_mut(name) else { return Ok(()) };
            if q.q.len().ready == 0 {
                return Ok(());
            }
            let Some(w) = q.waiters.pop_front() else { return Ok(()) };
            let Some(p) = self.pending.remove(&w) else { continue };
            if let Some(t) = &p.timer {
                t.abort();
            }
            if p.port.is_closed() {
                continue;
            }
            let mut c = Change::default();
            let ds = self.deliver(name, p.n, p.mode, p.visibility_ms, p.session, &mut c)?;
            let lsn = self.store()?.commit(&c)?;
            self.answer(myself, lsn, |lsn| deferred(lsn, p.port, Ok(QueueResult::Delivered(ds))));
        }
    }

    /// Wakes whoever waits on the queues in `woken`, then reschedules them.
    fn wake(&mut self, myself: &ActorRef<QueueMsg>, woken: &[String]) -> Result<(), GridError> {
        for name in woken {
            self.serve_waiters(myself, name)?;
            self.serve_pushers(myself, name)?;
            self.schedule(name);
        }
        Ok(())
    }

    /// A failed delivery (nack, expiry, session end, restart) recorded in `c`; the dead-letter
    /// queue it went to, if it used up its deliveries.
    fn failed(&mut self, name: &str, f: Failed, c: &mut Change) -> Result<Option<String>, GridError> {
        let Failed { seq, delivery, outcome, delay_until, dead } = f;
        let now = self.now_ms();
        let at = self.wall(now);
        let mut meta = self.store_ref()?.meta(name, seq)?;
        meta.deliveries = delivery;
        record(&mut meta, delivery, outcome, at);
        if dead {
            return self.dead_letter(name, seq, delivery, &meta, c);
        }
        self.untie(name, seq);
        meta.delayed_until_ms = delay_until.map(|t| self.wall(t));
        c.meta(name, seq, &meta)?;
        Ok(None)
    }

    /// The tick: the due queues' deadlines, delays and dedup expiries.
    fn tick(&mut self, myself: &ActorRef<QueueMsg>) -> Result<(), GridError> {
        let now = self.now_ms();
        let mut due = Vec::new();
        while let Some((at, _)) = self.timers.first()
            && *at <= now
        {
            let (_, name) = self.timers.pop_first().expect("first exists");
            if let Some(q) = self.queues.get_mut(&name) {
                q.timer = None;
            }
            due.push(name);
        }
        if due.is_empty() {
            return Ok(());
        }
        let mut c = Change::default();
        let mut woken = Vec::new();
        for name in &due {
            let Some(q) = self.queues.get_mut(name) else { continue };
            let t = q.q.tick(now);
            for (seq, delivery) in t.expired {
                self.failed(
                    name,
                    Failed { seq, delivery, outcome: Outcome::Expired, delay_until: None, dead: false },
                    &mut c,
                )?;
            }
            for d in t.dead {
                if let Some(dlq) = self.failed(
                    name,
                    Failed {
                        seq: d.seq,
                        delivery: d.deliveries,
                        outcome: Outcome::Expired,
                        delay_until: None,
                        dead: true,
                    },
                    &mut c,
                )? {
                    woken.push(dlq);
                }
                self.commit_if_large(&mut c)?;
            }
            for k in t.forgotten {
                c.dedup_gone(name, &k)?;
            }
            if t.readied > 0 {
                woken.push(name.clone());
            }
        }
        self.store()?.commit(&c)?;
        self.wake(myself, &woken)?;
        for name in &due {
            // Dead letters left: room.
            self.serve_pushers(myself, name)?;
        }
        for name in due {
            self.schedule(&name);
            self.settle(&name);
        }
        Ok(())
    }

    /// A lock session ended: its deliveries still in flight return to ready (or to their
    /// dead-letter queue).
    fn session_ended(&mut self, myself: &ActorRef<QueueMsg>, session: SessionId) -> Result<(), GridError> {
        let Some(held) = self.by_session.remove(&session) else { return Ok(()) };
        let now = self.now_ms();
        let mut c = Change::default();
        let mut woken = Vec::new();
        for (name, seq) in held {
            let Some(q) = self.queues.get_mut(&name) else { continue };
            q.sessions.remove(&seq);
            let Some(delivery) = q.q.deliveries(seq).filter(|_| q.q.in_flight(seq)) else { continue };
            let dead = q.q.nack(Receipt { seq, delivery }, 0, now).expect("in flight").is_some();
            if let Some(dlq) = self.failed(
                &name,
                Failed { seq, delivery, outcome: Outcome::SessionEnded, delay_until: None, dead },
                &mut c,
            )? {
                woken.push(dlq);
            }
            woken.push(name);
            self.commit_if_large(&mut c)?;
        }
        self.store()?.commit(&c)?;
        self.wake(myself, &woken)
    }

    /// The debug checker of memory against the heap: the same items, the same counts.
    fn check_memory(&self) -> Result<(), GridError> {
        let bad = |why: String| Err(GridError::Corrupted(format!("queue service memory: {why}")));
        let store = self.store_ref()?;
        for (name, q) in &self.queues {
            q.q.check().map_err(|e| GridError::Corrupted(format!("queue {name}: {e}")))?;
            for seq in q.q.seqs() {
                store.value(name, seq)?;
                let meta = store.meta(name, seq)?;
                if Some(meta.deliveries) != q.q.deliveries(seq) {
                    return bad(format!(
                        "queue {name} item {seq}: {} deliveries recorded, {:?} in memory",
                        meta.deliveries,
                        q.q.deliveries(seq)
                    ));
                }
            }
            if q.q.next_seq() > q.rec.seq_floor && q.stored {
                return bad(format!("queue {name}: next seq {} past its reservation", q.q.next_seq()));
            }
            for w in &q.waiters {
                if !self.pending.contains_key(w) {
                    return bad(format!("queue {name}: waiter {w} is not pending"));
                }
            }
            for w in &q.pushers {
                if self.pushing.get(w).is_none_or(|p| p.queue != *name) {
                    return bad(format!("queue {name}: blocked push {w} is not pending"));
                }
            }
            if !q.waiters.is_empty() && q.q.len().ready > 0 {
                return bad(format!("queue {name} has ready items and blocked pops"));
            }
        }
        let timers: BTreeSet<(u64, String)> =
            self.queues.iter().filter_map(|(n, q)| q.timer.map(|t| (t, n.clone()))).collect();
        if timers != self.timers {
            return bad(format!("{} timers, {} queues with one", self.timers.len(), timers.len()));
        }
        Ok(())
    }

    fn call(
        &mut self,
        myself: &ActorRef<QueueMsg>,
        op: QueueOp,
        reply: Reply<QueueResult>,
    ) -> Result<(), GridError> {
        let name = op.queue().map(str::to_string);
        let r = self.serve(myself, op, reply);
        let r = match (&name, r) {
            // What it did may have made room (an ack, a take, a purge, a larger max_len).
            (Some(name), Ok(())) => self.serve_pushers(myself, name),
            (_, r) => r,
        };
        if let Some(name) = name {
            self.schedule(&name);
            self.settle(&name);
        }
        r
    }

    fn serve(
        &mut self,
        myself: &ActorRef<QueueMsg>,
        op: QueueOp,
        reply: Reply<QueueResult>,
    ) -> Result<(), GridError> {
        if let Some(n) = op.queue()
            && let Err(e) = check_name(n)
        {
            let _ = reply.send(Err(e));
            return Ok(());
        }
        let now = self.now_ms();
        match op {
            QueueOp::Push { queue, value, dedup_key, delay_ms, fence } => {
                self.push_or_wait(myself, queue, value, dedup_key, delay_ms, fence, 0, reply)?;
            }
            QueueOp::PushWait { queue, value, dedup_key, delay_ms, fence, wait_ms } => {
                if wait_ms > QUEUE_WAIT_MS_MAX {
                    let e = invalid(format!("wait_ms is at most {QUEUE_WAIT_MS_MAX} (got {wait_ms})"));
                    let _ = reply.send(Err(e));
                    return Ok(());
                }
                self.push_or_wait(myself, queue, value, dedup_key, delay_ms, fence, wait_ms, reply)?;
            }
            QueueOp::Pop { queue, n, wait_ms, mode, visibility_ms, session } => {
                let checked = (|| {
                    if n == 0 || n > QUEUE_POP_MAX {
                        return Err(invalid(format!("a pop takes 1 to {QUEUE_POP_MAX} items (got {n})")));
                    }
                    if wait_ms > QUEUE_WAIT_MS_MAX {
                        return Err(invalid(format!(
                            "wait_ms is at most {QUEUE_WAIT_MS_MAX} (got {wait_ms})"
                        )));
                    }
                    if let Some(v) = visibility_ms {
                        check_time("visibility_ms", v, 1)?;
                    }
                    Ok(())
                })();
                if let Err(e) = checked.and_then(|()| self.activate(&queue).map(|_| ())) {
                    let _ = reply.send(Err(e));
                    return Ok(());
                }
                let q = self.queues.get_mut(&queue).expect("activated above");
                if q.q.len().ready > 0 {
                    let mut c = Change::default();
                    let ds = self.deliver(&queue, n, mode, visibility_ms, session, &mut c)?;
                    let lsn = self.store()?.commit(&c)?;
                    self.answer(myself, lsn, |lsn| deferred(lsn, reply, Ok(QueueResult::Delivered(ds))));
                } else if wait_ms == 0 {
                    self.answer(myself, 0, |lsn| {
                        deferred(lsn, reply, Ok(QueueResult::Delivered(Vec::new())))
                    });
                } else {
                    if q.waiters.len() >= QUEUE_WAITERS_MAX {
                        let pending = &self.pending;
                        q.waiters.retain(|w| pending.get(w).is_some_and(|p| !p.port.is_closed()));
                    }
                    if q.waiters.len() >= QUEUE_WAITERS_MAX {
                        let _ = reply.send(Err(GridError::LimitExceeded {
                            what: format!("pops blocked on queue {queue}"),
                            got: QUEUE_WAITERS_MAX as u64 + 1,
                            max: QUEUE_WAITERS_MAX as u64,
                        }));
                        return Ok(());
                    }
                    let w = self.next_waiter;
                    self.next_waiter += 1;
                    q.waiters.push_back(w);
                    let timer = Some(
                        myself.send_after(Duration::from_millis(wait_ms), move || QueueMsg::WaitOver(w)),
                    );
                    self.pending
                        .insert(w, Waiter { queue, n, mode, visibility_ms, session, port: reply, timer });
                }
            }
            QueueOp::Ack { queue, receipt } => {
                let r = self.queues.get_mut(&queue).map(|q| q.q.ack(receipt));
                match r {
                    Some(Ok(())) => {
                        let mut c = Change::default();
                        c.item_gone(&queue, receipt.seq)?;
                        self.untie(&queue, receipt.seq);
                        let lsn = self.store()?.commit(&c)?;
                        self.answer(myself, lsn, |lsn| deferred(lsn, reply, Ok(QueueResult::Done)));
                    }
                    _ => {
                        // Through the gate: what made it stale may not be written yet.
                        let r = Err(stale(&queue, receipt));
                        self.answer(myself, 0, |lsn| deferred(lsn, reply, r));
                    }
                }
            }
            QueueOp::Nack { queue, receipt, delay_ms } => {
                if let Err(e) = check_time("delay_ms", delay_ms, 0) {
                    let _ = reply.send(Err(e));
                    return Ok(());
                }
                let r = self.queues.get_mut(&queue).map(|q| q.q.nack(receipt, delay_ms, now));
                match r {
                    Some(Ok(dead)) => {
                        let mut c = Change::default();
                        let until = (delay_ms > 0).then_some(now + delay_ms);
                        let dlq = self.failed(
                            &queue,
                            Failed {
                                seq: receipt.seq,
                                delivery: receipt.delivery,
                                outcome: Outcome::Nacked,
                                delay_until: until,
                                dead: dead.is_some(),
                            },
                            &mut c,
                        )?;
                        let lsn = self.store()?.commit(&c)?;
                        self.answer(myself, lsn, |lsn| deferred(lsn, reply, Ok(QueueResult::Done)));
                        let mut woken: Vec<String> = dlq.into_iter().collect();
                        woken.push(queue);
                        self.wake(myself, &woken)?;
                    }
                    _ => {
                        // Through the gate: what made it stale may not be written yet.
                        let r = Err(stale(&queue, receipt));
                        self.answer(myself, 0, |lsn| deferred(lsn, reply, r));
                    }
                }
            }
            QueueOp::Extend { queue, receipt, ms } => {
                if let Err(e) = check_time("ms", ms, 1) {
                    let _ = reply.send(Err(e));
                    return Ok(());
                }
                let r = self.queues.get_mut(&queue).map(|q| q.q.extend(receipt, ms, now));
                let r = match r {
                    Some(Ok(())) => Ok(QueueResult::Done),
                    _ => Err(stale(&queue, receipt)),
                };
                self.answer(myself, 0, |lsn| deferred(lsn, reply, r));
            }
            QueueOp::Peek { queue, n } => {
                if n == 0 || n > QUEUE_POP_MAX {
                    let _ = reply
                        .send(Err(invalid(format!("a peek takes 1 to {QUEUE_POP_MAX} items (got {n})"))));
                    return Ok(());
                }
                // As much as a pop would hand out (the answer must fit a frame).
                let items = self.next_ready(&queue, n)?;
                self.answer(myself, 0, |lsn| deferred(lsn, reply, Ok(QueueResult::Items(items))));
            }
            QueueOp::Len { queue } => {
                let l = self.queues.get(&queue).map_or_else(QueueLen::default, |q| self.live_len(q));
                self.answer(myself, 0, |lsn| deferred(lsn, reply, Ok(QueueResult::Len(l))));
            }
            QueueOp::Purge { queue } => {
                let seqs: Vec<u64> =
                    self.queues.get(&queue).map(|q| q.q.seqs().collect()).unwrap_or_default();
                let mut lsn = 0;
                for chunk in seqs.chunks(PURGE_CHUNK) {
                    let mut c = Change::default();
                    for &seq in chunk {
                        c.item_gone(&queue, seq)?;
                        self.untie(&queue, seq);
                    }
                    lsn = self.store()?.commit(&c)?;
                }
                if let Some(q) = self.queues.get_mut(&queue) {
                    q.q.purge();
                }
                let items = seqs.len() as u64;
                self.answer(myself, lsn, |lsn| deferred(lsn, reply, Ok(QueueResult::Purged { items })));
            }
            QueueOp::Configure { queue, options } => {
                let checked = (|| {
                    if options.max_deliveries == 0 || options.max_deliveries > MAX_DELIVERIES_MAX {
                        return Err(invalid(format!("max_deliveries is 1 to {MAX_DELIVERIES_MAX}")));
                    }
                    check_time("visibility_ms", options.visibility_ms, 1)?;
                    check_time("dedup_window_ms", options.dedup_window_ms, 0)?;
                    if options.max_len == Some(0) {
                        return Err(invalid("max_len is at least 1".into()));
                    }
                    if let Some(d) = &options.dead_letter {
                        check_name(d)?;
                        if *d == queue {
                            return Err(invalid(format!(
                                "queue {queue} cannot be its own dead-letter queue"
                            )));
                        }
                    }
                    Ok(())
                })();
                if let Err(e) = checked.and_then(|()| self.activate(&queue).map(|_| ())) {
                    let _ = reply.send(Err(e));
                    return Ok(());
                }
                let q = self.queues.get_mut(&queue).expect("activated above");
                let floor = q.rec.seq_floor.max(q.q.next_seq());
                q.rec = rec_of(&options, floor);
                q.q.config = config_of(&q.rec);
                q.stored = true;
                let mut c = Change::default();
                c.queue(&queue, &q.rec)?;
                let lsn = self.store()?.commit(&c)?;
                self.answer(myself, lsn, |lsn| deferred(lsn, reply, Ok(QueueResult::Done)));
            }
            QueueOp::List => {
                let mut all: Vec<(String, QueueLen)> =
                    self.queues.iter().map(|(n, q)| (n.clone(), self.live_len(q))).collect();
                all.sort_by(|a, b| a.0.cmp(&b.0));
                self.answer(myself, 0, |lsn| deferred(lsn, reply, Ok(QueueResult::List(all))));
            }
        }
        Ok(())
    }

    /// The counts of `q`, its blocked pops only those whose callers are still there.
    fn live_len(&self, q: &Q) -> QueueLen {
        let live = q.waiters.iter().filter(|w| self.pending.get(w).is_some_and(|p| !p.port.is_closed()));
        QueueLen { waiters: live.count() as u64, ..q.len() }
    }

    /// After a restart: an item whose last delivery was its last allowed one, cut off by the
    /// restart, failed that delivery, and moves to its dead-letter queue (as a nack would have
    /// moved it), one op-log record for all.
    fn dead_letter_restarted(&mut self) -> Result<(), GridError> {
        let mut due = Vec::new();
        for (name, q) in &self.queues {
            let max = q.q.config.max_deliveries;
            due.extend(
                q.q.seqs()
                    .filter(|&s| q.q.deliveries(s).is_some_and(|d| d >= max))
                    .map(|s| (name.clone(), s)),
            );
        }
        if due.is_empty() {
            return Ok(());
        }
        let mut c = Change::default();
        for (name, seq) in due {
            let Some(q) = self.queues.get_mut(&name) else { continue };
            let delivery = q.q.deliveries(seq).unwrap_or(0);
            q.q.drop_item(seq);
            self.failed(
                &name,
                Failed { seq, delivery, outcome: Outcome::Restarted, delay_until: None, dead: true },
                &mut c,
            )?;
            self.commit_if_large(&mut c)?;
        }
        self.store()?.commit(&c)?;
        Ok(())
    }

    /// Queues loaded with items but no record (not written by this code) get one now, so
    /// their seqs are reserved before they could leave memory.
    fn record_orphans(&mut self) -> Result<(), GridError> {
        let mut c = Change::default();
        for (name, q) in &mut self.queues {
            if !q.stored && !q.q.is_empty() {
                Self::reserve(q, name, &mut c)?;
            }
        }
        self.store()?.commit(&c)?;
        Ok(())
    }

    /// Gives a delivery back uncounted (`QueueMsg::Release`); a stale receipt changes nothing.
    fn release(&mut self, myself: &ActorRef<QueueMsg>, name: &str, r: Receipt) -> Result<(), GridError> {
        let Some(q) = self.queues.get_mut(name) else { return Ok(()) };
        if q.q.release(r).is_err() {
            return Ok(());
        }
        self.untie(name, r.seq);
        let mut meta = self.store_ref()?.meta(name, r.seq)?;
        meta.deliveries = r.delivery.saturating_sub(1);
        let mut c = Change::default();
        c.meta(name, r.seq, &meta)?;
        self.store()?.commit(&c)?;
        self.wake(myself, &[name.to_string()])
    }

    /// Commits `c` now if it has grown large (a batch has limits in ops and bytes; dead letters
    /// carry whole values), leaving it empty for what follows.
    fn commit_if_large(&mut self, c: &mut Change) -> Result<(), GridError> {
        if c.len() >= 10_000 || c.bytes() >= 64 << 20 {
            self.store()?.commit(c)?;
            *c = Change::default();
        }
        Ok(())
    }

    /// A push: checked, then added now, or (at `max_len`, or behind earlier blocked pushes)
    /// parked for up to `wait_ms`, or refused `QueueFull`.
    #[allow(clippy::too_many_arguments)]
    fn push_or_wait(
        &mut self,
        myself: &ActorRef<QueueMsg>,
        queue: String,
        value: Value,
        dedup_key: Option<String>,
        delay_ms: u64,
        fence: Option<(String, u64)>,
        wait_ms: u64,
        reply: Reply<QueueResult>,
    ) -> Result<(), GridError> {
        let checked = (|| {
            if let Some((lock, f)) = &fence {
                self.fences.check(lock, *f)?;
            }
            check_push(&queue, &value, dedup_key.as_deref(), delay_ms)
        })();
        let bytes = match checked.and_then(|b| self.activate(&queue).map(|_| b)) {
            Ok(b) => b,
            Err(e) => {
                let _ = reply.send(Err(e));
                return Ok(());
            }
        };
        // Earlier blocked pushes go first.
        let behind = self.queues.get(&queue).is_some_and(|q| !q.pushers.is_empty());
        let full = if behind {
            let max_len = self.queues.get(&queue).and_then(|q| q.q.config.max_len).unwrap_or(0);
            Pushed::Full { max_len, port: reply }
        } else {
            self.push_now(myself, &queue, &bytes, dedup_key.as_deref(), delay_ms, reply)?
        };
        let Pushed::Full { max_len, port } = full else { return Ok(()) };
        let q = self.queues.get_mut(&queue).expect("activated above");
        if wait_ms == 0 || q.pushers.len() >= QUEUE_WAITERS_MAX {
            let r = Err(GridError::QueueFull { queue, max_len });
            self.answer(myself, 0, |lsn| deferred(lsn, port, r));
            return Ok(());
        }
        let w = self.next_waiter;
        self.next_waiter += 1;
        q.pushers.push_back(w);
        let timer =
            Some(myself.send_after(Duration::from_millis(wait_ms), move || QueueMsg::PushWaitOver(w)));
        self.pushing.insert(w, Pusher { queue, bytes, dedup_key, delay_ms, port, timer });
        Ok(())
    }

    /// Adds an item now if there is room (answering `port`), or hands `port` back.
    fn push_now(
        &mut self,
        myself: &ActorRef<QueueMsg>,
        queue: &str,
        bytes: &[u8],
        dedup_key: Option<&str>,
        delay_ms: u64,
        port: Reply<QueueResult>,
    ) -> Result<Pushed, GridError> {
        let now = self.now_ms();
        let wall = self.wall(now);
        let Some(q) = self.queues.get_mut(queue) else { return Err(GridError::Closed) };
        match q.q.push((), dedup_key, delay_ms, now) {
            Err(QueueError::Full { max_len }) => Ok(Pushed::Full { max_len, port }),
            Err(QueueError::StaleReceipt) => unreachable!("a push names no receipt"),
            Ok((seq, true)) => {
                let r = Ok(QueueResult::Pushed { seq, duplicate: true });
                self.answer(myself, 0, |lsn| deferred(lsn, port, r));
                Ok(Pushed::Done)
            }
            Ok((seq, false)) => {
                let mut c = Change::default();
                Self::reserve(q, queue, &mut c)?;
                c.item(queue, seq, bytes)?;
                if delay_ms > 0 {
                    let meta = ItemMeta { delayed_until_ms: Some(wall + delay_ms), ..ItemMeta::default() };
                    c.meta(queue, seq, &meta)?;
                }
                if let Some(k) = dedup_key {
                    c.dedup(queue, k, &DedupRec { seq, until_ms: wall + q.rec.dedup_window_ms })?;
                }
                let lsn = self.store()?.commit(&c)?;
                let r = Ok(QueueResult::Pushed { seq, duplicate: false });
                self.answer(myself, lsn, |lsn| deferred(lsn, port, r));
                if delay_ms == 0 {
                    self.serve_waiters(myself, queue)?;
                }
                Ok(Pushed::Done)
            }
        }
    }

    /// Serves the blocked pushes of `name` while it has room, oldest first, skipping those whose
    /// callers are gone.
    fn serve_pushers(&mut self, myself: &ActorRef<QueueMsg>, name: &str) -> Result<(), GridError> {
        loop {
            let Some(&w) = self.queues.get(name).and_then(|q| q.pushers.front()) else { return Ok(()) };
            let Some(p) = self.pushing.remove(&w) else {
                if let Some(q) = self.queues.get_mut(name) {
                    q.pushers.pop_front();
                }
                continue;
            };
            if p.port.is_closed() {
                if let Some(t) = &p.timer {
                    t.abort();
                }
                if let Some(q) = self.queues.get_mut(name) {
                    q.pushers.pop_front();
                }
                continue;
            }
            match self.push_now(myself, name, &p.bytes, p.dedup_key.as_deref(), p.delay_ms, p.port)? {
                Pushed::Done => {
                    if let Some(t) = &p.timer {
                        t.abort();
                    }
                    if let Some(q) = self.queues.get_mut(name) {
                        q.pushers.pop_front();
                    }
                }
                Pushed::Full { port, .. } => {
                    // Still no room: it keeps its place.
                    self.pushing.insert(w, Pusher { port, ..p });
                    return Ok(());
                }
            }
        }
    }

    /// A blocked push's wait ended without room.
    fn push_wait_over(&mut self, myself: &ActorRef<QueueMsg>, w: u64) {
        let Some(p) = self.pushing.remove(&w) else { return };
        let max_len = self.queues.get(&p.queue).and_then(|q| q.q.config.max_len).unwrap_or(0);
        if let Some(q) = self.queues.get_mut(&p.queue) {
            q.pushers.retain(|x| *x != w);
        }
        let r = Err(GridError::QueueFull { queue: p.queue.clone(), max_len });
        self.answer(myself, 0, |lsn| deferred(lsn, p.port, r));
        self.settle(&p.queue);
    }

    /// A blocked pop's wait ended with nothing.
    fn wait_over(&mut self, myself: &ActorRef<QueueMsg>, w: u64) {
        let Some(p) = self.pending.remove(&w) else { return };
        if let Some(q) = self.queues.get_mut(&p.queue) {
            q.waiters.retain(|x| *x != w);
        }
        self.answer(myself, 0, |lsn| deferred(lsn, p.port, Ok(QueueResult::Delivered(Vec::new()))));
        self.settle(&p.queue);
    }
}

/// The queue service actor (empty: everything lives in `QueueState`).
pub struct QueueActor;

impl Actor for QueueActor {
    type Msg = QueueMsg;
    type State = QueueState;
    type Arguments = QueueArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<QueueMsg>,
        args: QueueArgs,
    ) -> Result<QueueState, ActorProcessingErr> {
        let heap = open_heap(&args.path, &args.heap).await?;
        let (store, loaded) = QueueStore::open(heap)?;
        myself.send_interval(TICK, || QueueMsg::Tick);
        let gate = LogGate::new(store, args.heap.fsync, args.view, myself.clone())?
            .named(args.path.display().to_string());
        let cluster = args.cluster.map(|net| {
            let service = crate::cluster::map::QUEUES_SERVICE;
            ServiceRepl::new(service, net, args.path.clone(), args.heap.fsync)
        });
        let in_cluster = cluster.is_some();
        let mut st = QueueState {
            gate,
            origin: tokio::time::Instant::now(),
            wall_origin: wall_now(),
            queues: HashMap::new(),
            pending: HashMap::new(),
            pushing: HashMap::new(),
            next_waiter: 1,
            timers: BTreeSet::new(),
            by_session: HashMap::new(),
            fences: args.fences,
            cluster,
            loaded: false,
            failed: None,
        };
        if in_cluster {
            // Nothing is loaded or written until this node is the primary (`roles`).
            st.replicate(&myself)?;
        } else {
            st.restore(loaded)?;
        }
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<QueueMsg>,
        msg: QueueMsg,
        st: &mut QueueState,
    ) -> Result<(), ActorProcessingErr> {
        handle_gated(st, &myself, msg).await?;
        st.after().map_err(|e| format!("the queue service: {e}"))?;
        Ok(())
    }
}

impl GatedService for QueueState {
    type Store = QueueStore;
    type Msg = QueueMsg;
    const WHAT: &'static str = "queue service";

    fn gate(&mut self) -> &mut LogGate<QueueStore> {
        &mut self.gate
    }

    fn refuse(msg: QueueMsg) {
        match msg {
            QueueMsg::Call(_, r) => drop(r.send(Err(GridError::Closed))),
            QueueMsg::Check(r) => drop(r.send(Err(GridError::Closed))),
            QueueMsg::Digest(r) => drop(r.send(Err(GridError::Closed))),
            _ => {}
        }
    }

    fn serve(&mut self, myself: &ActorRef<QueueMsg>, msg: QueueMsg) -> Result<(), GridError> {
        match msg {
            QueueMsg::Call(op, reply) => {
                if self.cluster.is_some() {
                    self.roles(myself)?;
                    if !self.serving_now() {
                        let c = self.cluster.as_mut().expect("in a cluster");
                        let e = c.admit().err().unwrap_or_else(|| c.not_primary());
                        let _ = reply.send(Err(e));
                        return Ok(());
                    }
                }
                self.call(myself, op, reply)
            }
            // Not loaded (a replica): there is nothing to release or end here.
            QueueMsg::Release(..) | QueueMsg::SessionEnded(_) | QueueMsg::Tick if !self.serving_now() => {
                Ok(())
            }
            QueueMsg::Release(queue, receipt) => self.release(myself, &queue, receipt),
            QueueMsg::WaitOver(w) => {
                self.wait_over(myself, w);
                Ok(())
            }
            QueueMsg::PushWaitOver(w) => {
                self.push_wait_over(myself, w);
                Ok(())
            }
            QueueMsg::Tick => self.tick(myself),
            QueueMsg::SessionEnded(s) => self.session_ended(myself, s),
            QueueMsg::Check(reply) => {
                let r = self.store_ref().and_then(|s| s.check()).and_then(|()| self.check_memory());
                let _ = reply.send(r);
                Ok(())
            }
            QueueMsg::Placement(p) => self.replicated(myself, ServiceEvent::Placement(p)),
            QueueMsg::Repl(from, wire) => self.replicated(myself, ServiceEvent::Frame(from, wire)),
            QueueMsg::ReplTick => self.replicated(myself, ServiceEvent::Tick),
            QueueMsg::Digest(reply) => {
                let r = match self.cluster.as_ref() {
                    Some(c) => c.digest(self.gate.shard.as_ref()),
                    None => Err(GridError::Invalid(
                        "the queue service is not replicated (not in a cluster)".into(),
                    )),
                };
                self.answer(myself, 0, |lsn| deferred(lsn, reply, r));
                Ok(())
            }
            QueueMsg::InjectPanic => panic!("injected panic (test hook)"),
            _ => Ok(()),
        }
    }
}
