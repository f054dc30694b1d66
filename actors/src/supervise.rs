//! `OneChild`: the supervisor of one shard actor (a feed's shard, the lock service), generic over
//! what it supervises (`ChildSpec`). It starts the child, restarts it when it fails (one-for-one,
//! `RestartPolicy`; past the limit the slot is marked failed with the reason), retries a start
//! that failed after `START_RETRY_DELAY` (counted like a crash), sends the child its periodic
//! message if it has one (`ChildSpec::tick`), and on `Shutdown` closes the child (checkpoint and
//! release of its heap) and stops it. A restart is recovery: the child reopens its heap.
//!
//! Table supervisors, which own several shards, keep their own loop (`table::supervisor`).
//! `shut_down` is the root's one way to stop any of its supervisors.
//!
//! Invariant: only the supervisor writes the slot.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::error::GridError;
use crate::restart::{Decision, RestartPolicy, RestartTracker};
use crate::table::supervisor::{ShardSlot, SlotState, child_down};

/// How long closing the child at shutdown may take, and stopping a supervisor.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause before a failed start is tried again.
const START_RETRY_DELAY: Duration = Duration::from_millis(100);

type Reply<T> = RpcReplyPort<Result<T, GridError>>;

/// A message sent every interval.
pub type Periodic<M> = (Duration, fn() -> M);

/// What a `OneChild` supervises.
pub trait ChildSpec: Send + Sync + 'static {
    type Actor: Actor<Msg = Self::Msg, Arguments = Self::Args>;
    type Msg: ractor::Message;
    type Args: ractor::State;
    /// What the child is, for logs and errors ("feed events", "the lock service").
    fn what(&self) -> String;
    fn actor(&self) -> Self::Actor;
    /// The child's start arguments; `slot` is where it is published.
    fn args(&self, slot: &ShardSlot<Self::Msg>) -> Self::Args;
    /// The message that checkpoints and closes the child's heap.
    fn close(reply: Reply<()>) -> Self::Msg;
    /// A message the supervisor sends the running child every interval, if any.
    fn tick(&self) -> Option<Periodic<Self::Msg>> {
        None
    }
}

pub struct OneChildArgs<C: ChildSpec> {
    pub spec: C,
    pub policy: RestartPolicy,
    pub slot: Arc<ShardSlot<C::Msg>>,
    /// Where restarts and failures are counted.
    pub counters: Arc<crate::metrics::NodeCounters>,
}

pub enum OneChildMsg {
    /// Close (checkpoint and release) the child, then stop it (once a start in flight ended).
    Shutdown(Reply<()>),
    Retry,
    Tick,
    /// The child's start (its heap's open and recovery, on a task of its own) ended: the
    /// child's cell (an `ActorRef<C::Msg>`), or why it did not start.
    Started(Result<ractor::ActorCell, String>),
}

pub struct OneChildState<C: ChildSpec> {
    args: OneChildArgs<C>,
    child: Option<ractor::ActorId>,
    tracker: RestartTracker,
    started: Instant,
    stopping: bool,
    /// A start is in flight (its `Started` not yet handled).
    opening: bool,
    /// The child reported down before its `Started` was handled.
    down_early: Option<(ractor::ActorId, String)>,
    /// A `Shutdown` waiting for the start in flight.
    shutdown: Option<Reply<()>>,
}

/// The supervisor actor (its state is `OneChildState`).
pub struct OneChild<C>(PhantomData<fn() -> C>);

impl<C> Default for OneChild<C> {
    fn default() -> Self {
        OneChild(PhantomData)
    }
}

impl<C: ChildSpec> OneChildState<C> {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Starts the child on a task of its own (its heap opens and replays its op log there);
    /// `Started` reports the end.
    fn spawn_child(&mut self, myself: &ActorRef<OneChildMsg>) {
        self.args.slot.set(SlotState::Starting);
        self.opening = true;
        self.args.slot.set_opening(true);
        let spec = &self.args.spec;
        let (actor, args, me) = (spec.actor(), spec.args(&self.args.slot), myself.clone());
        let cell = myself.get_cell();
        tokio::spawn(async move {
            // On a task of its own, so that a panic in it is a failed start, reported like one.
            let start = tokio::spawn(async move { Actor::spawn_linked(None, actor, args, cell).await });
            let r = match start.await {
                Ok(r) => r.map(|(a, _)| a.get_cell()).map_err(|e| e.to_string()),
                Err(e) => Err(format!("the start task ended: {e}")),
            };
            if let Err(ractor::MessagingErr::SendErr(OneChildMsg::Started(Ok(cell)))) =
                me.send_message(OneChildMsg::Started(r))
            {
                // The supervisor is gone: nobody will close the child but itself.
                cell.stop(None);
            }
        });
    }

    /// Records how the child's start ended.
    async fn started(&mut self, myself: &ActorRef<OneChildMsg>, r: Result<ractor::ActorCell, String>) {
        self.opening = false;
        self.args.slot.set_opening(false);
        let early = self.down_early.take();
        if self.stopping {
            if let Ok(cell) = r {
                let actor: ActorRef<C::Msg> = cell.into();
                let closed = close_child::<C>(&actor, &self.args.spec.what()).await;
                if let Some(reply) = self.shutdown.take() {
                    let _ = reply.send(closed);
                }
            }
            self.args.slot.set(SlotState::Stopped);
            if let Some(reply) = self.shutdown.take() {
                let _ = reply.send(Ok(()));
            }
            return;
        }
        match r {
            Ok(cell) => {
                let id = cell.get_id();
                self.child = Some(id);
                self.args.slot.set(SlotState::Running(cell.into()));
                if let Some((down, why)) = early
                    && down == id
                {
                    self.child_down(myself, id, why).await;
                }
            }
            Err(e) => {
                let spec = &self.args.spec;
                let why = format!("could not open {}: {e}", spec.what());
                match self.tracker.on_failure(self.args.policy, self.now_ms()) {
                    Decision::Restart if !self.stopping => {
                        tracing::warn!(child = %spec.what(), reason = %why, "start failed; retrying");
                        self.args.slot.restarted(&self.args.counters);
                        myself.send_after(START_RETRY_DELAY, || OneChildMsg::Retry);
                    }
                    _ => {
                        tracing::error!(child = %spec.what(), reason = %why, "start failed; giving up (it answers ShardFailed)");
                        self.args.counters.gave_up();
                        self.args.slot.set(SlotState::Failed(why))
                    }
                }
            }
        }
    }

    /// The child `id` went down: restarted while the policy allows.
    async fn child_down(&mut self, myself: &ActorRef<OneChildMsg>, id: ractor::ActorId, why: String) {
        if self.child != Some(id) {
            if self.opening {
                self.down_early = Some((id, why));
            }
            return;
        }
        self.child = None;
        if self.stopping {
            self.args.slot.set(SlotState::Stopped);
            return;
        }
        match self.tracker.on_failure(self.args.policy, self.now_ms()) {
            Decision::Restart => {
                tracing::warn!(child = %self.args.spec.what(), reason = %why, "failed; restarting it (recovery)");
                self.args.slot.restarted(&self.args.counters);
                self.spawn_child(myself)
            }
            Decision::GiveUp => {
                let why = self.args.policy.gave_up(&why);
                tracing::error!(child = %self.args.spec.what(), reason = %why, "failed; giving up (it answers ShardFailed)");
                self.args.counters.gave_up();
                self.args.slot.set(SlotState::Failed(why))
            }
        }
    }
}

/// Closes a running child (checkpoint and release of its heap) and stops it.
async fn close_child<C: ChildSpec>(actor: &ActorRef<C::Msg>, what: &str) -> Result<(), GridError> {
    let result = match actor.call(C::close, Some(SHUTDOWN_TIMEOUT)).await {
        Ok(ractor::rpc::CallResult::Success(r)) => r,
        _ => Err(GridError::Unavailable(format!("{what} did not close"))),
    };
    let _ = actor.stop_and_wait(None, Some(SHUTDOWN_TIMEOUT)).await;
    result
}

impl<C: ChildSpec> Actor for OneChild<C> {
    type Msg = OneChildMsg;
    type State = OneChildState<C>;
    type Arguments = OneChildArgs<C>;

    async fn pre_start(
        &self,
        myself: ActorRef<OneChildMsg>,
        args: OneChildArgs<C>,
    ) -> Result<OneChildState<C>, ActorProcessingErr> {
        if let Some((every, _)) = args.spec.tick() {
            myself.send_interval(every, || OneChildMsg::Tick);
        }
        let mut st = OneChildState {
            args,
            child: None,
            tracker: RestartTracker::default(),
            started: Instant::now(),
            stopping: false,
            opening: false,
            down_early: None,
            shutdown: None,
        };
        st.spawn_child(&myself);
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<OneChildMsg>,
        msg: OneChildMsg,
        st: &mut OneChildState<C>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            OneChildMsg::Retry => {
                if !st.stopping && matches!(st.args.slot.get(), SlotState::Starting) {
                    st.spawn_child(&myself);
                }
            }
            OneChildMsg::Started(r) => st.started(&myself, r).await,
            OneChildMsg::Tick => {
                if let (SlotState::Running(a), Some((_, tick))) = (st.args.slot.get(), st.args.spec.tick()) {
                    let _ = a.cast(tick());
                }
            }
            OneChildMsg::Shutdown(reply) => {
                st.stopping = true;
                if st.opening {
                    // Answered once the start in flight ends (the child is closed then).
                    st.shutdown = Some(reply);
                    return Ok(());
                }
                let mut result = Ok(());
                if let SlotState::Running(actor) = st.args.slot.get() {
                    result = close_child::<C>(&actor, &st.args.spec.what()).await;
                }
                st.args.slot.set(SlotState::Stopped);
                let _ = reply.send(result);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<OneChildMsg>,
        evt: SupervisionEvent,
        st: &mut OneChildState<C>,
    ) -> Result<(), ActorProcessingErr> {
        if let Some((id, why)) = child_down(evt) {
            st.child_down(&myself, id, why).await;
        }
        Ok(())
    }
}

/// Asks a supervisor to shut its children down (`shutdown` wraps the reply port in its message),
/// then stops it. `what` names it in the error when it does not answer.
pub async fn shut_down<M: ractor::Message>(
    sup: ActorRef<M>,
    shutdown: fn(Reply<()>) -> M,
    what: &str,
) -> Result<(), GridError> {
    let r = match sup.call(shutdown, None).await {
        Ok(ractor::rpc::CallResult::Success(r)) => r,
        _ => Err(GridError::Unavailable(format!("{what} did not shut down cleanly"))),
    };
    let _ = sup.stop_and_wait(None, Some(SHUTDOWN_TIMEOUT)).await;
    r
}
