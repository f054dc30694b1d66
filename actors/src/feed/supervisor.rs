//! The feed supervisor: one per feed, parent of the feed's shard actor. It restarts a failed
//! shard (one-for-one, `RestartPolicy`; past the limit the slot is marked failed), and it owns
//! the feed's time-driven duties: on each tick it asks the shard to roll its open segment by age
//! and apply retention (`FeedMsg::Maintain`). Rotation by size happens on the append that fills
//! a segment, which then asks for the same retention pass.
//!
//! Invariant: only the supervisor writes the slot (as for tables).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use heapgrid_heap::HeapOptions;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::actor::{FeedActor, FeedArgs, FeedMsg};
use super::def::FeedDef;
use crate::error::GridError;
use crate::restart::{Decision, RestartPolicy, RestartTracker};
use crate::table::supervisor::{ShardSlot, SlotState, child_down};

const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
const START_RETRY_DELAY: Duration = Duration::from_millis(100);

/// What a feed supervisor is started with.
pub struct FeedSupArgs {
    pub def: FeedDef,
    pub dir: PathBuf,
    pub heap: HeapOptions,
    pub policy: RestartPolicy,
    pub slot: Arc<ShardSlot<FeedMsg>>,
    /// Where fenced appends are checked.
    pub fences: Arc<crate::lock::fence::FenceTable>,
}

pub enum FeedSupMsg {
    /// Close (checkpoint and release) the shard, then stop it.
    Shutdown(RpcReplyPort<Result<(), GridError>>),
    Retry,
    /// Time for the shard's roll-by-age and retention pass.
    Tick,
}

pub struct FeedSupState {
    args: FeedSupArgs,
    child: Option<ractor::ActorId>,
    tracker: RestartTracker,
    started: Instant,
    stopping: bool,
}

/// The feed's heap file.
pub fn feed_path(dir: &std::path::Path) -> PathBuf {
    dir.join("shard-0000.heap")
}

/// How often the supervisor asks for a maintenance pass: often enough to roll a segment within
/// a quarter of `roll_after_ms` of its due time (at least every 10 ms, at most every second);
/// never when nothing is time-driven.
pub fn tick_interval(def: &FeedDef) -> Option<Duration> {
    let shortest = [def.roll_after_ms, def.retention.max_age_ms].into_iter().flatten().min()?;
    Some(Duration::from_millis((shortest / 4).clamp(10, 1000)))
}

async fn spawn_shard(myself: &ActorRef<FeedSupMsg>, st: &mut FeedSupState) {
    st.args.slot.set(SlotState::Starting);
    let args = FeedArgs {
        path: feed_path(&st.args.dir),
        heap: st.args.heap.clone(),
        policy: st.args.def.policy(),
        view: st.args.slot.view.clone(),
        fences: st.args.fences.clone(),
    };
    match FeedActor::spawn_linked(None, FeedActor, args, myself.get_cell()).await {
        Ok((actor, _)) => {
            st.child = Some(actor.get_id());
            st.args.slot.set(SlotState::Running(actor));
        }
        Err(e) => {
            let why = format!("could not open feed: {e}");
            let now_ms = st.started.elapsed().as_millis() as u64;
            match st.tracker.on_failure(st.args.policy, now_ms) {
                Decision::Restart if !st.stopping => {
                    myself.send_after(START_RETRY_DELAY, || FeedSupMsg::Retry);
                }
                _ => st.args.slot.set(SlotState::Failed(why)),
            }
        }
    }
}

/// The feed supervisor actor.
pub struct FeedSupervisor;

impl FeedSupervisor {
    async fn on_child_down(
        myself: &ActorRef<FeedSupMsg>,
        st: &mut FeedSupState,
        id: ractor::ActorId,
        why: String,
    ) {
        if st.child != Some(id) {
            return;
        }
        st.child = None;
        if st.stopping {
            st.args.slot.set(SlotState::Stopped);
            return;
        }
        let now_ms = st.started.elapsed().as_millis() as u64;
        match st.tracker.on_failure(st.args.policy, now_ms) {
            Decision::Restart => spawn_shard(myself, st).await,
            Decision::GiveUp => st.args.slot.set(SlotState::Failed(st.args.policy.gave_up(&why))),
        }
    }
}

impl Actor for FeedSupervisor {
    type Msg = FeedSupMsg;
    type State = FeedSupState;
    type Arguments = FeedSupArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<FeedSupMsg>,
        args: FeedSupArgs,
    ) -> Result<FeedSupState, ActorProcessingErr> {
        if let Some(every) = tick_interval(&args.def) {
            myself.send_interval(every, || FeedSupMsg::Tick);
        }
        let mut st = FeedSupState {
            args,
            child: None,
            tracker: RestartTracker::default(),
            started: Instant::now(),
            stopping: false,
        };
        spawn_shard(&myself, &mut st).await;
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<FeedSupMsg>,
        msg: FeedSupMsg,
        st: &mut FeedSupState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            FeedSupMsg::Retry => {
                if !st.stopping && matches!(st.args.slot.get(), SlotState::Starting) {
                    spawn_shard(&myself, st).await;
                }
            }
            FeedSupMsg::Tick => {
                if let SlotState::Running(a) = st.args.slot.get() {
                    let _ = a.cast(FeedMsg::Maintain);
                }
            }
            FeedSupMsg::Shutdown(reply) => {
                st.stopping = true;
                let mut result = Ok(());
                if let SlotState::Running(actor) = st.args.slot.get() {
                    match actor.call(FeedMsg::Close, Some(SHUTDOWN_TIMEOUT)).await {
                        Ok(ractor::rpc::CallResult::Success(r)) => result = r,
                        _ => result = Err(GridError::Unavailable("feed shard did not close".into())),
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
        myself: ActorRef<FeedSupMsg>,
        evt: SupervisionEvent,
        st: &mut FeedSupState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some((id, why)) = child_down(evt) {
            Self::on_child_down(&myself, st, id, why).await;
        }
        Ok(())
    }
}
