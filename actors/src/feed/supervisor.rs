//! The feed supervisor: one per feed (a `OneChild` over `FeedChild`), parent of the feed's shard
//! actor. It restarts a failed shard (one-for-one, `RestartPolicy`; past the limit the slot is
//! marked failed), and it owns the feed's time-driven duties: on each tick it asks the shard to
//! roll its open segment by age and apply retention (`FeedMsg::Maintain`). Rotation by size
//! happens on the append that fills a segment, which then asks for the same retention pass.
//!
//! Invariant: only the supervisor writes the slot (as for tables).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use heapgrid_heap::HeapOptions;
use ractor::RpcReplyPort;

use super::actor::{FeedActor, FeedArgs, FeedMsg};
use super::def::FeedDef;
use crate::error::GridError;
use crate::supervise::{ChildSpec, Periodic};
use crate::table::supervisor::ShardSlot;

/// A feed's shard, as its supervisor starts it.
pub struct FeedChild {
    pub def: FeedDef,
    /// The feed's directory.
    pub dir: PathBuf,
    pub heap: HeapOptions,
    /// Where fenced appends are checked.
    pub fences: Arc<crate::lock::fence::FenceTable>,
    /// The node's replication network, once it is in a cluster.
    pub cluster: crate::grid::ClusterNet,
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

impl ChildSpec for FeedChild {
    type Actor = FeedActor;
    type Msg = FeedMsg;
    type Args = FeedArgs;

    fn what(&self) -> String {
        format!("feed {}", self.def.name)
    }

    fn actor(&self) -> FeedActor {
        FeedActor
    }

    fn args(&self, slot: &ShardSlot<FeedMsg>) -> FeedArgs {
        FeedArgs {
            path: feed_path(&self.dir),
            heap: HeapOptions { progress: Some(slot.recovery.clone()), ..self.heap.clone() },
            policy: self.def.policy(),
            view: slot.view.clone(),
            fences: self.fences.clone(),
            cluster: self.cluster.clone(),
            map_name: crate::cluster::map::feed_map_name(&self.def.name),
        }
    }

    fn close(reply: RpcReplyPort<Result<(), GridError>>) -> FeedMsg {
        FeedMsg::Close(reply)
    }

    fn tick(&self) -> Option<Periodic<FeedMsg>> {
        tick_interval(&self.def).map(|every| (every, (|| FeedMsg::Maintain) as fn() -> FeedMsg))
    }
}
