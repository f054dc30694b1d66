//! The queue supervisor (a `OneChild` over `QueueChild`, under the root) and `Queues`, the queue
//! service as callers see it.
//!
//! The supervisor restarts a failed queue service actor (one-for-one, `RestartPolicy`; past the
//! limit the slot is marked failed and queue requests answer `ShardFailed`). A restart is
//! recovery: the actor reopens the queue heap, and every delivery in flight is ready again with
//! its count kept.
//!
//! Invariant: only the supervisor writes the slot (as for tables, feeds and locks).

use std::path::PathBuf;
use std::sync::Arc;

use heapgrid_heap::HeapOptions;
use ractor::RpcReplyPort;

use super::actor::{QueueActor, QueueArgs, QueueMsg};
use super::ops::{QueueOp, QueueResult};
use crate::error::GridError;
use crate::lock::SessionId;
use crate::lock::fence::FenceTable;
use crate::supervise::ChildSpec;
use crate::table::supervisor::{BoxFuture, ShardSlot, SlotState, slot_call};

/// The queue heap under a grid's directory.
pub fn queue_path(dir: &std::path::Path) -> PathBuf {
    dir.join("queues").join("shard-0000.heap")
}

/// The queue heap of a node in a cluster (the replicated copy of the cluster's queue service).
pub fn cluster_queue_path(dir: &std::path::Path) -> PathBuf {
    crate::replication::service::cluster_path(dir, crate::cluster::map::QUEUES_SERVICE, "shard-0000.heap")
}

/// The queue service, as its supervisor starts it.
pub struct QueueChild {
    /// The grid's directory.
    pub dir: PathBuf,
    pub heap: HeapOptions,
    pub fences: Arc<FenceTable>,
    /// The node's replication network, once it is in a cluster (the service is replicated
    /// there, over another heap: `replication::service::cluster_path`).
    pub cluster: crate::grid::ClusterNet,
}

impl ChildSpec for QueueChild {
    type Actor = QueueActor;
    type Msg = QueueMsg;
    type Args = QueueArgs;

    fn what(&self) -> String {
        "the queue service".into()
    }

    fn actor(&self) -> QueueActor {
        QueueActor
    }

    fn args(&self, slot: &ShardSlot<QueueMsg>) -> QueueArgs {
        let cluster = self.cluster.get().cloned();
        QueueArgs {
            path: match cluster {
                Some(_) => cluster_queue_path(&self.dir),
                None => queue_path(&self.dir),
            },
            cluster,
            heap: HeapOptions { progress: Some(slot.recovery.clone()), ..self.heap.clone() },
            fences: self.fences.clone(),
            view: slot.view.clone(),
        }
    }

    fn close(reply: RpcReplyPort<Result<(), GridError>>) -> QueueMsg {
        QueueMsg::Close(reply)
    }
}

/// The node's queue service as callers see it.
#[derive(Default)]
pub struct Queues {
    slot: Arc<ShardSlot<QueueMsg>>,
}

impl Queues {
    pub(crate) fn slot(&self) -> &Arc<ShardSlot<QueueMsg>> {
        &self.slot
    }

    /// One request; sent before this returns, answered by the future.
    pub fn call(&self, op: QueueOp) -> BoxFuture<Result<QueueResult, GridError>> {
        slot_call(self.slot.clone(), "queues", "queue service", op, QueueMsg::Call, |m| match m {
            QueueMsg::Call(op, _) => Some(op),
            _ => None,
        })
    }

    /// Runs the queue heap's debug checker and the actor's memory checker.
    pub fn check(&self) -> BoxFuture<Result<(), GridError>> {
        slot_call(self.slot.clone(), "queues", "queue service", (), |(), r| QueueMsg::Check(r), |_| Some(()))
    }

    /// The queue heap's figures.
    pub fn heap_stats(&self) -> BoxFuture<Result<heapgrid_heap::HeapStats, GridError>> {
        slot_call(self.slot.clone(), "queues", "queue service", (), |(), r| QueueMsg::Stats(r), |_| Some(()))
    }

    /// This node's copy of the queue heap, summarised (in a cluster; any role).
    pub fn digest(&self) -> BoxFuture<Result<crate::replication::shard::ShardDigest, GridError>> {
        slot_call(self.slot.clone(), "queues", "queue service", (), |(), r| QueueMsg::Digest(r), |_| Some(()))
    }

    /// A lock session ended (the lock service says so): its deliveries return to ready.
    pub fn session_ended(&self, session: SessionId) {
        if let SlotState::Running(a) = self.slot.get() {
            let _ = a.cast(QueueMsg::SessionEnded(session));
        }
    }

    /// Gives a delivery back uncounted (a snippet run that took it did not commit). Sent now;
    /// nothing answers it (a stale receipt changes nothing).
    pub fn release(&self, queue: String, receipt: super::ops::Receipt) {
        if let SlotState::Running(a) = self.slot.get() {
            let _ = a.cast(QueueMsg::Release(queue, receipt));
        }
    }

    /// Test hook: makes the queue service panic, as a bug would.
    #[doc(hidden)]
    pub fn inject_panic(&self) {
        if let SlotState::Running(a) = self.slot.get() {
            let _ = a.cast(QueueMsg::InjectPanic);
        }
    }
}
