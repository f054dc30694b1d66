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

use heapgrid_heap::HeapOptions;
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
    version: std::sync::atomic::AtomicU64,
    changed: tokio::sync::Notify,
}

impl<M> ShardSlot<M> {
    pub fn new() -> Self {
        ShardSlot {
            state: RwLock::new(SlotState::Starting),
            view: Arc::new(ReadView::default()),
            version: std::sync::atomic::AtomicU64::new(0),
            changed: tokio::sync::Notify::new(),
        }
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
    /// Waits until the slot changes after version `seen`, or until `deadline`.
    pub async fn wait_change(&self, seen: u64, deadline: tokio::time::Instant) {
        let notified = self.changed.notified();
        tokio::pin!(notified);
        // Registered before the check, so a change between the check and the await wakes us.
        notified.as_mut().enable();
        if self.version() != seen {
            return;
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

impl<M> Default for ShardSlot<M> {
    fn default() -> Self {
        Self::new()
    }
}

/// How long a caller waits for a restarting shard (feed, lock service) before giving up.
const RESTART_WAIT: Duration = Duration::from_secs(5);

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
    if let SlotState::Running(actor) = slot.get() {
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
    Box::pin(async move {
        let deadline = tokio::time::Instant::now() + RESTART_WAIT;
        loop {
            let seen = slot.version();
            match slot.get() {
                SlotState::Running(actor) => {
                    let (tx, rx) = oneshot::channel();
                    match actor.send_message(wrap(payload, tx.into())) {
                        Ok(()) => return rx.await.map_err(|_| lost(&name))?,
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
            if tokio::time::Instant::now() >= deadline {
                return Err(GridError::Unavailable(format!("{kind} {name} is restarting")));
            }
            slot.wait_change(seen, deadline).await;
        }
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
}

/// Messages of a table supervisor.
pub enum TableSupMsg {
    /// Close (checkpoint and release) every running shard, then stop them all.
    Shutdown(RpcReplyPort<Result<(), GridError>>),
    /// Try again to start shard `i`, whose last start failed.
    Retry(usize),
}

/// Pause before starting a shard again after its start failed (a transient error such as a
/// lock still held or too many open files gets a moment to clear).
const START_RETRY_DELAY: Duration = Duration::from_millis(100);

pub struct TableSupState {
    args: TableSupArgs,
    children: HashMap<ActorId, usize>,
    trackers: Vec<RestartTracker>,
    started: Instant,
    stopping: bool,
}

/// The table supervisor actor.
pub struct TableSupervisor;

/// The heap file of shard `i`.
pub fn shard_path(dir: &std::path::Path, i: usize) -> PathBuf {
    dir.join(format!("shard-{i:04}.heap"))
}

/// Starts shard `i`. A failed start counts against the shard's restart limit like a crash: it
/// is retried after `START_RETRY_DELAY` until the limit marks the shard failed.
async fn spawn_shard(myself: &ActorRef<TableSupMsg>, st: &mut TableSupState, i: usize) {
    let args = shard_args(st, i);
    let r = ShardActor::spawn_linked(None, ShardActor, args, myself.get_cell()).await;
    shard_started(myself, st, i, r);
}

/// Marks shard `i` starting and gives the arguments of its actor.
fn shard_args(st: &TableSupState, i: usize) -> ShardArgs {
    st.args.slots[i].set(SlotState::Starting);
    ShardArgs {
        path: shard_path(&st.args.dir, i),
        heap: st.args.heap.clone(),
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
    r: Result<(ActorRef<ShardMsg>, tokio::task::JoinHandle<()>), ractor::SpawnErr>,
) {
    match r {
        Ok((actor, _)) => {
            st.children.insert(actor.get_id(), i);
            st.args.slots[i].set(SlotState::Running(actor));
        }
        Err(e) => {
            let why = format!("could not open shard: {e}");
            let now_ms = st.started.elapsed().as_millis() as u64;
            match st.trackers[i].on_failure(st.args.policy, now_ms) {
                Decision::Restart if !st.stopping => {
                    myself.send_after(START_RETRY_DELAY, move || TableSupMsg::Retry(i));
                }
                _ => st.args.slots[i].set(SlotState::Failed(why)),
            }
        }
    }
}

impl TableSupervisor {
    async fn on_child_down(
        &self,
        myself: &ActorRef<TableSupMsg>,
        st: &mut TableSupState,
        id: ActorId,
        why: String,
    ) {
        let Some(i) = st.children.remove(&id) else { return };
        if st.stopping {
            st.args.slots[i].set(SlotState::Stopped);
            return;
        }
        let now_ms = st.started.elapsed().as_millis() as u64;
        match st.trackers[i].on_failure(st.args.policy, now_ms) {
            Decision::Restart => spawn_shard(myself, st, i).await,
            Decision::GiveUp => st.args.slots[i].set(SlotState::Failed(st.args.policy.gave_up(&why))),
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
        };
        // Every shard opens (recovers) at once, each on its own task: a table's restart takes
        // its slowest shard's recovery, not the sum of them.
        let starts: Vec<_> = (0..n)
            .map(|i| {
                let (args, cell) = (shard_args(&st, i), myself.get_cell());
                tokio::spawn(async move { ShardActor::spawn_linked(None, ShardActor, args, cell).await })
            })
            .collect();
        for (i, start) in starts.into_iter().enumerate() {
            let r =
                start.await.map_err(|e| ractor::SpawnErr::StartupFailed(format!("shard {i}: {e}").into()));
            shard_started(&myself, &mut st, i, r.and_then(|r| r));
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
                    spawn_shard(&myself, st, i).await;
                }
            }
            TableSupMsg::Shutdown(reply) => {
                st.stopping = true;
                let mut result = Ok(());
                for slot in st.args.slots.iter() {
                    if let SlotState::Running(actor) = slot.get() {
                        let r =
                            actor.call(|p| ShardMsg::Checkpoint(Some(p)), Some(SHUTDOWN_SHARD_TIMEOUT)).await;
                        match r {
                            Ok(ractor::rpc::CallResult::Success(Ok(()))) => {}
                            Ok(ractor::rpc::CallResult::Success(Err(e))) => result = result.and(Err(e)),
                            Ok(_) | Err(_) => {
                                result =
                                    result.and(Err(GridError::Unavailable("shard did not checkpoint".into())))
                            }
                        }
                        let _ = actor.stop_and_wait(None, Some(SHUTDOWN_SHARD_TIMEOUT)).await;
                    }
                    slot.set(SlotState::Stopped);
                }
                let _ = reply.send(result);
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
