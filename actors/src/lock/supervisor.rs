//! The lock supervisor (under the root) and `Locks`, the lock service as callers see it.
//!
//! The supervisor restarts a failed lock service actor (one-for-one, `RestartPolicy`; past the
//! limit the slot is marked failed and lock requests answer `ShardFailed`). A restart is
//! recovery: the actor reopens the lock heap, starts a new epoch and republishes the recorded
//! grants to the fence table.
//!
//! Invariant: only the supervisor writes the slot (as for tables and feeds).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use heapgrid_heap::HeapOptions;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::actor::{LockActor, LockArgs, LockMsg};
use super::fence::FenceTable;
use super::ops::{LockOp, LockResult};
use crate::error::GridError;
use crate::restart::{Decision, RestartPolicy, RestartTracker};
use crate::table::supervisor::{BoxFuture, ShardSlot, SlotState, child_down, slot_call};

const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
const START_RETRY_DELAY: Duration = Duration::from_millis(100);

/// The lock heap under a grid's directory.
pub fn lock_path(dir: &std::path::Path) -> PathBuf {
    dir.join("locks").join("shard-0000.heap")
}

pub struct LockSupArgs {
    /// The grid's directory.
    pub dir: PathBuf,
    pub heap: HeapOptions,
    pub policy: RestartPolicy,
    pub slot: Arc<ShardSlot<LockMsg>>,
    pub fences: Arc<FenceTable>,
}

pub enum LockSupMsg {
    /// Close (checkpoint and release) the lock heap, then stop the actor.
    Shutdown(RpcReplyPort<Result<(), GridError>>),
    Retry,
}

pub struct LockSupState {
    args: LockSupArgs,
    child: Option<ractor::ActorId>,
    tracker: RestartTracker,
    started: Instant,
    stopping: bool,
}

async fn spawn_service(myself: &ActorRef<LockSupMsg>, st: &mut LockSupState) {
    st.args.slot.set(SlotState::Starting);
    let args = LockArgs {
        path: lock_path(&st.args.dir),
        heap: st.args.heap.clone(),
        fences: st.args.fences.clone(),
        view: st.args.slot.view.clone(),
    };
    match LockActor::spawn_linked(None, LockActor, args, myself.get_cell()).await {
        Ok((actor, _)) => {
            st.child = Some(actor.get_id());
            st.args.slot.set(SlotState::Running(actor));
        }
        Err(e) => {
            let why = format!("could not open the lock service: {e}");
            tracing::warn!(%why, "lock service start failed");
            let now_ms = st.started.elapsed().as_millis() as u64;
            match st.tracker.on_failure(st.args.policy, now_ms) {
                Decision::Restart if !st.stopping => {
                    myself.send_after(START_RETRY_DELAY, || LockSupMsg::Retry);
                }
                _ => st.args.slot.set(SlotState::Failed(why)),
            }
        }
    }
}

pub struct LockSupervisor;

impl Actor for LockSupervisor {
    type Msg = LockSupMsg;
    type State = LockSupState;
    type Arguments = LockSupArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<LockSupMsg>,
        args: LockSupArgs,
    ) -> Result<LockSupState, ActorProcessingErr> {
        let mut st = LockSupState {
            args,
            child: None,
            tracker: RestartTracker::default(),
            started: Instant::now(),
            stopping: false,
        };
        spawn_service(&myself, &mut st).await;
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<LockSupMsg>,
        msg: LockSupMsg,
        st: &mut LockSupState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            LockSupMsg::Retry => {
                if !st.stopping && matches!(st.args.slot.get(), SlotState::Starting) {
                    spawn_service(&myself, st).await;
                }
            }
            LockSupMsg::Shutdown(reply) => {
                st.stopping = true;
                let mut result = Ok(());
                if let SlotState::Running(actor) = st.args.slot.get() {
                    match actor.call(LockMsg::Close, Some(SHUTDOWN_TIMEOUT)).await {
                        Ok(ractor::rpc::CallResult::Success(r)) => result = r,
                        _ => result = Err(GridError::Unavailable("lock service did not close".into())),
                    }
                    let _ = actor.stop_and_wait(None, Some(SHUTDOWN_TIMEOUT)).await;
                }
                st.args.slot.set(SlotState::Stopped);
                let _ = reply.send(result);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<LockSupMsg>,
        evt: SupervisionEvent,
        st: &mut LockSupState,
    ) -> Result<(), ActorProcessingErr> {
        let Some((id, why)) = child_down(evt) else { return Ok(()) };
        if st.child != Some(id) {
            return Ok(());
        }
        st.child = None;
        if st.stopping {
            st.args.slot.set(SlotState::Stopped);
            return Ok(());
        }
        tracing::warn!(%why, "lock service failed; restarting it (recovery)");
        let now_ms = st.started.elapsed().as_millis() as u64;
        match st.tracker.on_failure(st.args.policy, now_ms) {
            Decision::Restart => spawn_service(&myself, st).await,
            Decision::GiveUp => st.args.slot.set(SlotState::Failed(st.args.policy.gave_up(&why))),
        }
        Ok(())
    }
}

/// The node's lock service as callers see it: requests go to the actor in the slot; fenced
/// writes read `fences` directly.
pub struct Locks {
    slot: Arc<ShardSlot<LockMsg>>,
    pub fences: Arc<FenceTable>,
}

impl Locks {
    pub fn new(slot: Arc<ShardSlot<LockMsg>>, fences: Arc<FenceTable>) -> Locks {
        Locks { slot, fences }
    }

    pub(crate) fn slot(&self) -> &Arc<ShardSlot<LockMsg>> {
        &self.slot
    }

    /// One request; sent before this returns, answered by the future.
    pub fn call(&self, op: LockOp) -> BoxFuture<Result<LockResult, GridError>> {
        slot_call(self.slot.clone(), "locks", "lock service", op, LockMsg::Call, |m| match m {
            LockMsg::Call(op, _) => Some(op),
            _ => None,
        })
    }

    /// Runs the lock heap's debug checker.
    pub fn check(&self) -> BoxFuture<Result<(), GridError>> {
        slot_call(self.slot.clone(), "locks", "lock service", (), |(), r| LockMsg::Check(r), |_| Some(()))
    }

    /// Whether `fence` is the current, held grant of `lock` (what a fenced write checks).
    pub fn held(&self, lock: &str, fence: u64) -> bool {
        self.fences.check(lock, fence).is_ok()
    }

    /// Test hook: makes the lock service panic, as a bug would.
    #[doc(hidden)]
    pub fn inject_panic(&self) {
        if let SlotState::Running(a) = self.slot.get() {
            let _ = a.cast(LockMsg::InjectPanic);
        }
    }
}
