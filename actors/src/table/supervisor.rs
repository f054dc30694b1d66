//! The table supervisor: one per table, parent of the table's shard actors. One-for-one
//! restarts with an intensity limit (`RestartPolicy`, default 5 in 10 s); past it the shard's slot
//! is marked failed and every request to it gets `GridError::ShardFailed`.
//!
//! Callers find shard actors through `ShardSlot`s shared with the supervisor: `Starting` while a
//! shard (re)opens its heap, `Running` with its actor, `Failed` with the reason, `Stopped` after
//! shutdown. ractor has no restart strategies of its own; this is the small one we need.
//!
//! Invariant: only the supervisor writes slots; a slot is `Running` only with a live actor's ref
//! (a dead one is noticed by the caller's send failing, then by the supervisor's event).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use heapgrid_heap::{HeapOptions, ReplayProgress};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::actor::{ReadView, ShardActor, ShardArgs, ShardMsg};
use crate::error::GridError;
use crate::restart::{Decision, RestartPolicy, RestartTracker};

/// How long a checkpoint or stop of one shard may take at shutdown.
const SHUTDOWN_SHARD_TIMEOUT: Duration = Duration::from_secs(30);

/// Where callers find one shard.
pub enum SlotState<M = ShardMsg> {
    Starting,
    Running(ActorRef<M>),
    Failed(String),
    Stopped,
}

impl<M> Clone for SlotState<M> {
    fn clone(&self) -> Self {
        match self {
            SlotState::Starting => SlotState::Starting,
            SlotState::Running(a) => SlotState::Running(a.clone()),
            SlotState::Failed(why) => SlotState::Failed(why.clone()),
            SlotState::Stopped => SlotState::Stopped,
        }
    }
}

/// A shard's slot, shared between its supervisor (writer) and callers (readers): of a table
/// shard by default, of any shard actor with messages `M` (feed shards). Callers that find it
/// `Starting` wait for the next change (`wait_change`) instead of polling.
pub struct ShardSlot<M = ShardMsg> {
    state: RwLock<SlotState<M>>,
    /// What readers see of the running shard (no snapshot while it is not running).
    pub view: Arc<ReadView>,
    /// How far the shard's heap got replaying its op log, while it (re)opens.
    pub recovery: Arc<ReplayProgress>,
    /// Callers that found the shard not running, in the order they came.
    pub turns: Arc<TurnQueue>,
    /// Set by the supervisor while a start (the heap's open and replay, and the actor's own
    /// start after it) is in flight; cleared when it ends.
    opening: std::sync::atomic::AtomicBool,
    version: std::sync::atomic::AtomicU64,
    changed: tokio::sync::Notify,
    /// Restarts since the node started (`restarted`).
    restarts: std::sync::atomic::AtomicU64,
}

impl<M> ShardSlot<M> {
    pub fn new() -> Self {
        ShardSlot {
            state: RwLock::new(SlotState::Starting),
            view: Arc::new(ReadView::default()),
            recovery: Arc::default(),
            turns: Arc::default(),
            opening: std::sync::atomic::AtomicBool::new(false),
            version: std::sync::atomic::AtomicU64::new(0),
            changed: tokio::sync::Notify::new(),
            restarts: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Its supervisor restarts it (after a crash or a failed start); counted here and in the
    /// node's counters.
    pub fn restarted(&self, counters: &crate::metrics::NodeCounters) {
        self.restarts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        counters.restarted();
    }

    /// Restarts since the node started.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(std::sync::atomic::Ordering::Relaxed)
    }
    pub fn get(&self) -> SlotState<M> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
    /// Bumped on every change.
    pub fn version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::Acquire)
    }
    pub(crate) fn set(&self, s: SlotState<M>) {
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = s;
        self.version.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.changed.notify_waiters();
    }
    /// Marks a start of the shard in flight (`true`, by its supervisor as it begins one) or
    /// ended (`false`, as the supervisor learns how it ended).
    pub(crate) fn set_opening(&self, opening: bool) {
        self.opening.store(opening, std::sync::atomic::Ordering::Release);
    }

    fn is_opening(&self) -> bool {
        self.opening.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits until the slot changes after version `seen`, or until `deadline` (while a start
    /// is in flight, at least `RECOVERY_POLL`: the caller then looks again).
    pub async fn wait_change(&self, seen: u64, deadline: tokio::time::Instant) {
        let notified = self.changed.notified();
        tokio::pin!(notified);
        // Registered before the check, so a change between the check and the await wakes us.
        notified.as_mut().enable();
        if self.version() != seen {
            return;
        }
        let until = if self.is_opening() {
            deadline.max(tokio::time::Instant::now() + RECOVERY_POLL)
        } else {
            deadline
        };
        let _ = tokio::time::timeout_at(until, notified).await;
    }

    /// Whether a caller waiting for this slot to start since before `deadline` gives up: past
    /// it, unless a start is in flight (its replay's length is bounded by the checkpoint tail,
    /// docs/semantics.md, not by a caller's timer: the caller waits it out). The 5 s apply
    /// between a failed start and its retry, so a shard failing to start is not waited on.
    pub fn give_up(&self, deadline: tokio::time::Instant) -> bool {
        tokio::time::Instant::now() >= deadline && !self.is_opening()
    }

    /// `Some((replayed, total))` bytes of its op log while the shard is starting (recovering;
    /// both 0 before its replay began), `None` once it runs, failed or stopped.
    pub fn recovering(&self) -> Option<(u64, u64)> {
        matches!(self.get(), SlotState::Starting).then(|| self.recovery.bytes())
    }
}

/// The callers waiting for a shard to run, in the order they came: each sends its message once
/// every earlier one sent (or gave up), so the messages one caller (a connection) made in turn
/// reach the new actor in that order, however the waiting tasks are woken. A caller sends at
/// once only while nobody waits (`clear`); otherwise it takes a turn (`take`, synchronously,
/// when it makes the call) and waits for it (`Turn::mine`). Turns out are at most the callers
/// waiting: for the server, each connection's in-flight limit (`inflight_max`) bounds its own.
#[derive(Default)]
pub struct TurnQueue {
    /// Turns taken and not yet released.
    waiting: std::sync::atomic::AtomicU64,
    inner: std::sync::Mutex<Turns>,
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct Turns {
    issued: u64,
    /// The turn whose holder may send now.
    next: u64,
    /// Turns released ahead of `next`.
    released: std::collections::BTreeSet<u64>,
}

impl TurnQueue {
    /// Whether nobody waits: a caller may send at once.
    pub fn clear(&self) -> bool {
        self.waiting.load(std::sync::atomic::Ordering::Acquire) == 0
    }

    /// The next turn (taken when the call is made, so turns follow the calls' order).
    pub fn take(self: &Arc<Self>) -> Turn {
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let n = t.issued;
        t.issued += 1;
        self.waiting.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Turn { queue: self.clone(), n }
    }

    fn release(&self, n: u64) {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let t = &mut *guard;
        t.released.insert(n);
        while t.released.remove(&t.next) {
            t.next += 1;
        }
        drop(guard);
        self.waiting.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.changed.notify_waiters();
    }
}

/// A caller's place among those waiting for a shard; released when dropped (sent, or gave up).
pub struct Turn {
    queue: Arc<TurnQueue>,
    n: u64,
}

impl Turn {
    /// Waits until every earlier turn was released.
    pub async fn mine(&self) {
        loop {
            let notified = self.queue.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.queue.inner.lock().unwrap_or_else(|e| e.into_inner()).next == self.n {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.queue.release(self.n);
    }
}

impl<M> Default for ShardSlot<M> {
    fn default() -> Self {
        Self::new()
    }
}

/// How long a caller waits for a restarting shard (feed, lock service) before giving up (while
/// it is not replaying its op log: `ShardSlot::give_up`).
const RESTART_WAIT: Duration = Duration::from_secs(5);
/// How often a caller waiting for a shard that replays its op log looks at it again.
const RECOVERY_POLL: Duration = Duration::from_millis(100);

/// A reply on its way: the message is already sent (or the wait for a restart is in it).
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

/// Sends `payload` to the actor in `slot` now if it is running (so one caller's messages reach
/// the mailbox in the order it made the calls), and returns the future of the reply: it waits
/// out a restart (within `RESTART_WAIT`), and never hangs on a dead actor. A message that could
/// not be delivered is retried on the successor; one that was delivered is never sent twice
/// (its writes may have applied). `kind` and `name` say what the slot holds, for errors.
pub fn slot_call<M: ractor::Message, P: Send + 'static, R: Send + 'static>(
    slot: Arc<ShardSlot<M>>,
    name: &str,
    kind: &'static str,
    payload: P,
    wrap: fn(P, ractor::RpcReplyPort<Result<R, GridError>>) -> M,
    unwrap: fn(M) -> Option<P>,
) -> BoxFuture<Result<R, GridError>> {
    use ractor::MessagingErr;
    use tokio::sync::oneshot;
    let name = name.to_string();
    let lost = move |name: &str| {
        GridError::Unavailable(format!(
            "{kind} {name} stopped while handling the request (a write may or may not have applied)"
        ))
    };
    let mut payload = payload;
    if slot.turns.clear()
        && let SlotState::Running(actor) = slot.get()
    {
        let (tx, rx) = oneshot::channel();
        match actor.send_message(wrap(payload, tx.into())) {
            Ok(()) => return Box::pin(async move { rx.await.map_err(|_| lost(&name))? }),
            Err(MessagingErr::SendErr(msg)) => match unwrap(msg) {
                Some(back) => payload = back,
                None => return Box::pin(async move { Err(lost(&name)) }),
            },
            Err(_) => return Box::pin(async move { Err(lost(&name)) }),
        }
    }
    // The wait runs on a task of its own: the turn is released when the message is sent, not
    // when the caller next polls.
    let turn = slot.turns.take();
    let task_name = name.clone();
    let sent = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + RESTART_WAIT;
        loop {
            let seen = slot.version();
            match slot.get() {
                SlotState::Running(_) => {
                    turn.mine().await;
                    // The actor as it is now (it may have been replaced meanwhile).
                    let SlotState::Running(actor) = slot.get() else { continue };
                    let (tx, rx) = oneshot::channel();
                    match actor.send_message(wrap(payload, tx.into())) {
                        Ok(()) => {
                            // Sent: the next caller in turn may send.
                            drop(turn);
                            return rx.await.map_err(|_| lost(&name))?;
                        }
                        Err(MessagingErr::SendErr(msg)) => match unwrap(msg) {
                            Some(back) => payload = back,
                            None => return Err(lost(&name)),
                        },
                        Err(_) => return Err(lost(&name)),
                    }
                }
                SlotState::Starting => {}
                SlotState::Failed(reason) => {
                    return Err(GridError::ShardFailed { table: name, shard: 0, reason });
                }
                SlotState::Stopped => return Err(GridError::Closed),
            }
            if slot.give_up(deadline) {
                return Err(GridError::Unavailable(format!("{kind} {name} is restarting")));
            }
            slot.wait_change(seen, deadline).await;
        }
    });
    Box::pin(async move {
        sent.await.unwrap_or_else(|e| {
            Err(GridError::Unavailable(format!("{kind} {task_name}: the request's task ended: {e}")))
        })
    })
}

/// The child a supervision event reports down (failed or stopped), and why; `None` for other
/// events. Shared by the table and feed supervisors.
pub(crate) fn child_down(evt: SupervisionEvent) -> Option<(ActorId, String)> {
    match evt {
        SupervisionEvent::ActorFailed(cell, err) => Some((cell.get_id(), err.to_string())),
        SupervisionEvent::ActorTerminated(cell, _, reason) => {
            Some((cell.get_id(), reason.unwrap_or_else(|| "stopped".into())))
        }
        _ => None,
    }
}

/// What a table supervisor is started with.
pub struct TableSupArgs {
    pub table: String,
    pub dir: PathBuf,
    pub heap: HeapOptions,
    pub policy: RestartPolicy,
    pub slots: Arc<Vec<ShardSlot>>,
    /// Where the shards check fenced writes.
    pub fences: Arc<crate::lock::fence::FenceTable>,
    /// The node's replication network, once it is in a cluster.
    pub cluster: crate::grid::ClusterNet,
    /// Where restarts and failures are counted.
    pub counters: Arc<crate::metrics::NodeCounters>,
}

/// Messages of a table supervisor.
pub enum TableSupMsg {
    /// Close (checkpoint and release) every running shard, then stop them all (once the shards
    /// still opening have opened).
    Shutdown(RpcReplyPort<Result<(), GridError>>),
    /// Try again to start shard `i`, whose last start failed.
    Retry(usize),
    /// Shard `i`'s start (its heap's open and recovery, on a task of its own) ended.
    Started(usize, Result<ActorRef<ShardMsg>, String>),
}

/// Pause before starting a shard again after its start failed (a transient error such as a
/// lock still held or too many open files gets a moment to clear).
const START_RETRY_DELAY: Duration = Duration::from_millis(100);

type Reply = RpcReplyPort<Result<(), GridError>>;

pub struct TableSupState {
    args: TableSupArgs,
    children: HashMap<ActorId, usize>,
    trackers: Vec<RestartTracker>,
    started: Instant,
    stopping: bool,
    /// Starts in flight (`Started` not yet handled).
    opening: usize,
    /// Children reported down before their `Started` was handled.
    down_early: HashMap<ActorId, String>,
    /// A `Shutdown` waiting for the starts in flight, with what closing the others gave.
    shutdown: Option<(Reply, Result<(), GridError>)>,
}

/// The table supervisor actor.
pub struct TableSupervisor;

/// The heap file of shard `i`.
pub fn shard_path(dir: &std::path::Path, i: usize) -> PathBuf {
    dir.join(format!("shard-{i:04}.heap"))
}

/// Starts shard `i` on a task of its own: its heap opens and replays its op log there while
/// the supervisor (and every other shard) goes on; `Started` reports the end. Callers of a
/// starting shard wait for it (`ShardSlot::give_up`) or, if they asked not to wait, are told
/// it is recovering. A failed start counts against the shard's restart limit like a crash: it
/// is retried after `START_RETRY_DELAY` until the limit marks the shard failed.
fn spawn_shard(myself: &ActorRef<TableSupMsg>, st: &mut TableSupState, i: usize) {
    let (args, me) = (shard_args(st, i), myself.clone());
    st.opening += 1;
    st.args.slots[i].set_opening(true);
    let cell = myself.get_cell();
    tokio::spawn(async move {
        // On a task of its own, so that a panic in it is a failed start, reported like one.
        let start = tokio::spawn(async move { ShardActor::spawn_linked(None, ShardActor, args, cell).await });
        let r = match start.await {
            Ok(r) => r.map(|(actor, _)| actor).map_err(|e| e.to_string()),
            Err(e) => Err(format!("the start task ended: {e}")),
        };
        if let Err(ractor::MessagingErr::SendErr(TableSupMsg::Started(_, Ok(actor)))) =
            me.send_message(TableSupMsg::Started(i, r))
        {
            // The supervisor is gone: nobody will close this shard but itself.
            actor.stop(None);
        }
    });
}

/// Marks shard `i` starting and gives the arguments of its actor.
fn shard_args(st: &TableSupState, i: usize) -> ShardArgs {
    let slot = &st.args.slots[i];
    slot.set(SlotState::Starting);
    ShardArgs {
        path: shard_path(&st.args.dir, i),
        heap: HeapOptions { progress: Some(slot.recovery.clone()), ..st.args.heap.clone() },
        view: st.args.slots[i].view.clone(),
        fences: st.args.fences.clone(),
        table: st.args.table.clone(),
        shard: i as u32,
        cluster: st.args.cluster.clone(),
    }
}

/// Records how shard `i`'s start ended: running, or failed (retried after a delay while the
/// restart policy allows).
fn shard_started(
    myself: &ActorRef<TableSupMsg>,
    st: &mut TableSupState,
    i: usize,
    r: Result<ActorRef<ShardMsg>, String>,
) {
    match r {
        Ok(actor) => {
            st.children.insert(actor.get_id(), i);
            st.args.slots[i].set(SlotState::Running(actor));
        }
        Err(e) => {
            let why = format!("could not open shard: {e}");
            let now_ms = st.started.elapsed().as_millis() as u64;
            let table = &st.args.table;
            match st.trackers[i].on_failure(st.args.policy, now_ms) {
                Decision::Restart if !st.stopping => {
                    tracing::warn!(table = %table, shard = i, reason = %why, "shard start failed; retrying");
                    st.args.slots[i].restarted(&st.args.counters);
                    myself.send_after(START_RETRY_DELAY, move || TableSupMsg::Retry(i));
                }
                _ => {
                    tracing::error!(table = %table, shard = i, reason = %why, "shard start failed; giving up (it answers ShardFailed)");
                    st.args.counters.gave_up();
                    st.args.slots[i].set(SlotState::Failed(why))
                }
            }
        }
    }
}

/// Checkpoints a running shard and stops it.
async fn close_shard(actor: &ActorRef<ShardMsg>) -> Result<(), GridError> {
    let r = actor.call(|p| ShardMsg::Checkpoint(Some(p)), Some(SHUTDOWN_SHARD_TIMEOUT)).await;
    let result = match r {
        Ok(ractor::rpc::CallResult::Success(r)) => r,
        Ok(_) | Err(_) => Err(GridError::Unavailable("shard did not checkpoint".into())),
    };
    let _ = actor.stop_and_wait(None, Some(SHUTDOWN_SHARD_TIMEOUT)).await;
    result
}

impl TableSupervisor {
    async fn on_child_down(
        &self,
        myself: &ActorRef<TableSupMsg>,
        st: &mut TableSupState,
        id: ActorId,
        why: String,
    ) {
        let Some(i) = st.children.remove(&id) else {
            // A child whose `Started` is still on its way: handled with it.
            if st.opening > 0 {
                st.down_early.insert(id, why);
            }
            return;
        };
        if st.stopping {
            st.args.slots[i].set(SlotState::Stopped);
            return;
        }
        let now_ms = st.started.elapsed().as_millis() as u64;
        let table = st.args.table.clone();
        match st.trackers[i].on_failure(st.args.policy, now_ms) {
            Decision::Restart => {
                tracing::warn!(table = %table, shard = i, reason = %why, "shard failed; restarting it (recovery)");
                st.args.slots[i].restarted(&st.args.counters);
                spawn_shard(myself, st, i)
            }
            Decision::GiveUp => {
                let why = st.args.policy.gave_up(&why);
                tracing::error!(table = %table, shard = i, reason = %why, "shard failed; giving up (it answers ShardFailed)");
                st.args.counters.gave_up();
                st.args.slots[i].set(SlotState::Failed(why))
            }
        }
    }
}

impl Actor for TableSupervisor {
    type Msg = TableSupMsg;
    type State = TableSupState;
    type Arguments = TableSupArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<TableSupMsg>,
        args: TableSupArgs,
    ) -> Result<TableSupState, ActorProcessingErr> {
        let n = args.slots.len();
        let mut st = TableSupState {
            args,
            children: HashMap::new(),
            trackers: vec![RestartTracker::default(); n],
            started: Instant::now(),
            stopping: false,
            opening: 0,
            down_early: HashMap::new(),
            shutdown: None,
        };
        // Every shard opens (recovers) at once, each on its own task, and the table is there
        // at once: a shard serves as soon as its own recovery ends.
        for i in 0..n {
            spawn_shard(&myself, &mut st, i);
        }
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<TableSupMsg>,
        msg: TableSupMsg,
        st: &mut TableSupState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TableSupMsg::Retry(i) => {
                if !st.stopping && matches!(st.args.slots[i].get(), SlotState::Starting) {
                    spawn_shard(&myself, st, i);
                }
            }
            TableSupMsg::Started(i, r) => {
                st.opening -= 1;
                st.args.slots[i].set_opening(false);
                if st.stopping {
                    if let Ok(actor) = r {
                        let closed = close_shard(&actor).await;
                        if let Some((_, result)) = st.shutdown.as_mut() {
                            *result = std::mem::replace(result, Ok(())).and(closed);
                        }
                    }
                    st.args.slots[i].set(SlotState::Stopped);
                } else {
                    let early = r.as_ref().ok().and_then(|a| st.down_early.remove(&a.get_id()));
                    shard_started(&myself, st, i, r);
                    if let (Some(why), SlotState::Running(a)) = (early, st.args.slots[i].get()) {
                        self.on_child_down(&myself, st, a.get_id(), why).await;
                    }
                }
                if st.opening == 0 {
                    st.down_early.clear();
                    if st.stopping {
                        // Shards that were waiting to retry their start.
                        for slot in st.args.slots.iter() {
                            if matches!(slot.get(), SlotState::Starting) {
                                slot.set(SlotState::Stopped);
                            }
                        }
                    }
                    if let Some((reply, result)) = st.shutdown.take() {
                        let _ = reply.send(result);
                    }
                }
            }
            TableSupMsg::Shutdown(reply) => {
                st.stopping = true;
                let mut result = Ok(());
                for slot in st.args.slots.iter() {
                    match slot.get() {
                        SlotState::Running(actor) => {
                            result = result.and(close_shard(&actor).await);
                            slot.set(SlotState::Stopped);
                        }
                        // Closed when its start ends (the reply waits for it).
                        SlotState::Starting if st.opening > 0 => {}
                        _ => slot.set(SlotState::Stopped),
                    }
                }
                if st.opening > 0 {
                    st.shutdown = Some((reply, result));
                } else {
                    let _ = reply.send(result);
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<TableSupMsg>,
        evt: SupervisionEvent,
        st: &mut TableSupState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some((id, why)) = child_down(evt) {
            self.on_child_down(&myself, st, id, why).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::TurnQueue;

    /// Turns taken in order are served in that order, whatever order their holders wait in; a
    /// turn given up (dropped) lets the next one go; with no turn out, callers go at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn turns_are_served_in_the_order_they_were_taken() {
        let q = Arc::new(TurnQueue::default());
        assert!(q.clear());
        let turns: Vec<_> = (0..6).map(|_| q.take()).collect();
        assert!(!q.clear());
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // Waiting in reverse order; turn 2 gives up.
        for (n, t) in turns.into_iter().enumerate().rev() {
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                if n == 2 {
                    drop(t);
                    return;
                }
                t.mine().await;
                order.lock().unwrap().push(n);
                tokio::task::yield_now().await;
                drop(t);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), [0, 1, 3, 4, 5]);
        assert!(q.clear());
    }
}
