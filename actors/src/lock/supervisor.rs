//! The lock supervisor (a `OneChild` over `LockChild`, under the root) and `Locks`, the lock
//! service as callers see it.
//!
//! The supervisor restarts a failed lock service actor (one-for-one, `RestartPolicy`; past the
//! limit the slot is marked failed and lock requests answer `ShardFailed`). A restart is
//! recovery: the actor reopens the lock heap, starts a new epoch and republishes the recorded
//! grants to the fence table.
//!
//! Invariant: only the supervisor writes the slot (as for tables and feeds).

use std::path::PathBuf;
use std::sync::Arc;

use heapgrid_heap::HeapOptions;
use ractor::RpcReplyPort;

use super::actor::{LockActor, LockArgs, LockMsg};
use super::fence::FenceTable;
use super::ops::{LockOp, LockResult};
use crate::error::GridError;
use crate::supervise::ChildSpec;
use crate::table::supervisor::{BoxFuture, ShardSlot, SlotState, slot_call};

/// The lock heap under a grid's directory.
pub fn lock_path(dir: &std::path::Path) -> PathBuf {
    dir.join("locks").join("shard-0000.heap")
}

/// The lock heap of a node in a cluster (the replicated copy of the cluster's lock service).
pub fn cluster_lock_path(dir: &std::path::Path) -> PathBuf {
    crate::replication::service::cluster_path(dir, crate::cluster::map::LOCKS_SERVICE, "shard-0000.heap")
}

/// The lock service, as its supervisor starts it.
pub struct LockChild {
    /// The grid's directory.
    pub dir: PathBuf,
    pub heap: HeapOptions,
    pub fences: Arc<FenceTable>,
    /// Told of every session that ends (the queue service returns its deliveries).
    pub ended: super::actor::SessionEnded,
    /// The node's replication network, once it is in a cluster (the service is replicated
    /// there, over another heap: `replication::service::cluster_path`).
    pub cluster: crate::grid::ClusterNet,
}

impl ChildSpec for LockChild {
    type Actor = LockActor;
    type Msg = LockMsg;
    type Args = LockArgs;

    fn what(&self) -> String {
        "the lock service".into()
    }

    fn actor(&self) -> LockActor {
        LockActor
    }

    fn args(&self, slot: &ShardSlot<LockMsg>) -> LockArgs {
        let cluster = self.cluster.get().cloned();
        LockArgs {
            path: match cluster {
                Some(_) => cluster_lock_path(&self.dir),
                None => lock_path(&self.dir),
            },
            cluster,
            heap: HeapOptions { progress: Some(slot.recovery.clone()), ..self.heap.clone() },
            fences: self.fences.clone(),
            view: slot.view.clone(),
            ended: self.ended.clone(),
        }
    }

    fn close(reply: RpcReplyPort<Result<(), GridError>>) -> LockMsg {
        LockMsg::Close(reply)
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

    /// The lock heap's figures.
    pub fn heap_stats(&self) -> BoxFuture<Result<heapgrid_heap::HeapStats, GridError>> {
        slot_call(self.slot.clone(), "locks", "lock service", (), |(), r| LockMsg::Stats(r), |_| Some(()))
    }

    /// This node's copy of the lock heap, summarised (in a cluster; any role).
    pub fn digest(&self) -> BoxFuture<Result<crate::replication::shard::ShardDigest, GridError>> {
        slot_call(self.slot.clone(), "locks", "lock service", (), |(), r| LockMsg::Digest(r), |_| Some(()))
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
