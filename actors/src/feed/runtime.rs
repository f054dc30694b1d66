//! `FeedRuntime`: one running feed as its callers see it: its definition and where its shard
//! is. Each typed method is one message to the feed's shard actor with a typed reply.
//!
//! Invariant: a message that could not be delivered (the actor had already died) is retried
//! once the supervisor has replaced the actor, within `RESTART_WAIT`; a message that was
//! delivered is never sent twice (its writes may have applied).

use std::sync::Arc;

use ractor::RpcReplyPort;

use super::actor::{AppendReq, CursorReadReq, FeedMsg, ReadReq};
use super::def::{FeedDef, FeedInfo};
use super::{Appended, CursorInfo, FeedRecord, FeedState, Pos, ReadResult};
use crate::error::GridError;
pub use crate::table::supervisor::BoxFuture;
use crate::table::supervisor::{ShardSlot, SlotState, slot_call};
use crate::value::Value;

/// One feed of a running grid.
pub struct FeedRuntime {
    pub def: FeedDef,
    slot: Arc<ShardSlot<FeedMsg>>,
}

macro_rules! back {
    ($variant:ident) => {
        |m| if let FeedMsg::$variant(p, _) = m { Some(p) } else { None }
    };
}

impl FeedRuntime {
    pub fn new(def: FeedDef, slot: Arc<ShardSlot<FeedMsg>>) -> FeedRuntime {
        FeedRuntime { def, slot }
    }

    /// `Recovering` while the feed's shard is (re)opening its heap (for a caller that does not
    /// wait).
    pub fn recovering(&self) -> Option<GridError> {
        let (replayed_bytes, total_bytes) = self.slot.recovering()?;
        Some(GridError::Recovering { table: self.def.name.clone(), shard: 0, replayed_bytes, total_bytes })
    }

    pub(crate) fn slot(&self) -> &ShardSlot<FeedMsg> {
        &self.slot
    }

    /// Sends `payload` to the feed's shard (`slot_call`).
    fn call<P: Send + 'static, R: Send + 'static>(
        &self,
        payload: P,
        wrap: fn(P, RpcReplyPort<Result<R, GridError>>) -> FeedMsg,
        unwrap: fn(FeedMsg) -> Option<P>,
    ) -> BoxFuture<Result<R, GridError>> {
        slot_call(self.slot.clone(), &self.def.name, "feed", payload, wrap, unwrap)
    }

    /// Appends `value` at the top; `id` is the caller's (see `FeedShard::append`), else the
    /// next. Answered once durable under the feed's fsync policy.
    pub fn append(&self, value: Value, id: Option<u64>) -> BoxFuture<Result<Appended, GridError>> {
        self.call(AppendReq::new(value, id), FeedMsg::Append, back!(Append))
    }

    /// `append`, applied only if every `(lock, fence)` is its lock's current grant
    /// (`StaleFence` otherwise, nothing appended).
    pub fn append_fenced(
        &self,
        value: Value,
        id: Option<u64>,
        fences: Vec<(String, u64)>,
    ) -> BoxFuture<Result<Appended, GridError>> {
        self.call(AppendReq { value, id, fences }, FeedMsg::Append, back!(Append))
    }

    /// Several appends in one message (each its own op-log record, in order), answered
    /// together: how the server sends one connection's pipelined appends.
    pub fn append_many(&self, reqs: Vec<AppendReq>) -> BoxFuture<Vec<Result<Appended, GridError>>> {
        let n = reqs.len();
        let call = self.call(reqs, FeedMsg::Appends, back!(Appends));
        Box::pin(async move {
            match call.await {
                Ok(v) => v,
                Err(e) => (0..n).map(|_| Err(e.clone())).collect(),
            }
        })
    }

    pub fn get(&self, id: u64) -> BoxFuture<Result<Option<FeedRecord>, GridError>> {
        self.call(id, FeedMsg::Get, back!(Get))
    }

    pub fn remove(&self, id: u64) -> BoxFuture<Result<(), GridError>> {
        self.call(id, FeedMsg::Remove, back!(Remove))
    }

    /// At most `n` records after `after`, ascending; with `wait_ms` > 0 and nothing there yet,
    /// waits (parked in the actor, no polling) for an append.
    pub fn read(&self, after: Pos, n: u32, wait_ms: u64) -> BoxFuture<Result<ReadResult, GridError>> {
        self.call(ReadReq { after, n, wait_ms }, FeedMsg::Read, back!(Read))
    }

    /// At most `n` records below `before` (`None`: from the top), newest first.
    pub fn read_back(&self, before: Option<u64>, n: u32) -> BoxFuture<Result<ReadResult, GridError>> {
        self.call((before, n), FeedMsg::ReadBack, back!(ReadBack))
    }

    pub fn cursor_set(&self, name: &str, at: Pos) -> BoxFuture<Result<CursorInfo, GridError>> {
        self.call((name.to_string(), at), FeedMsg::CursorSet, back!(CursorSet))
    }

    pub fn cursor_get(&self, name: &str) -> BoxFuture<Result<CursorInfo, GridError>> {
        self.call(name.to_string(), FeedMsg::CursorGet, back!(CursorGet))
    }

    /// Reads after cursor `name` and moves it past what it returns, atomically.
    pub fn cursor_read(&self, name: &str, n: u32, wait_ms: u64) -> BoxFuture<Result<ReadResult, GridError>> {
        self.call(
            CursorReadReq { name: name.to_string(), n, wait_ms },
            FeedMsg::CursorRead,
            back!(CursorRead),
        )
    }

    pub fn cursor_delete(&self, name: &str) -> BoxFuture<Result<bool, GridError>> {
        self.call(name.to_string(), FeedMsg::CursorDelete, back!(CursorDelete))
    }

    pub fn cursors(&self) -> BoxFuture<Result<Vec<CursorInfo>, GridError>> {
        self.call((), FeedMsg::Cursors, back!(Cursors))
    }

    /// Keeps the newest `keep` records; returns how many were dropped.
    pub fn trim(&self, keep: u64) -> BoxFuture<Result<u64, GridError>> {
        self.call(keep, FeedMsg::Trim, back!(Trim))
    }

    /// Drops every record below `before`; returns how many were dropped.
    pub fn cut(&self, before: u64) -> BoxFuture<Result<u64, GridError>> {
        self.call(before, FeedMsg::Cut, back!(Cut))
    }

    pub fn rotate(&self) -> BoxFuture<Result<(), GridError>> {
        self.call((), FeedMsg::Rotate, back!(Rotate))
    }

    pub fn set_version(&self, version: u32) -> BoxFuture<Result<(), GridError>> {
        self.call(version, FeedMsg::SetVersion, back!(SetVersion))
    }

    /// The heap figures of the feed's shard here (any role).
    pub fn heap_stats(&self) -> BoxFuture<Result<heapgrid_heap::HeapStats, GridError>> {
        self.call((), |(), r| FeedMsg::Stats(r), |_| None)
    }

    /// This node's copy of the feed, summarised (`ClusterOp::Digest`; any role).
    pub fn digest(&self) -> BoxFuture<Result<crate::replication::shard::ShardDigest, GridError>> {
        self.call((), |(), r| FeedMsg::Digest(r), |_| None)
    }

    pub fn state(&self) -> BoxFuture<Result<FeedState, GridError>> {
        self.call((), FeedMsg::State, back!(State))
    }

    pub fn info(&self) -> BoxFuture<Result<FeedInfo, GridError>> {
        let def = self.def.clone();
        let state = self.state();
        Box::pin(async move { Ok(def.info(state.await?)) })
    }

    /// Test hook: makes the shard actor panic, as a bug would.
    #[doc(hidden)]
    pub fn inject_panic(&self) {
        if let SlotState::Running(a) = self.slot.get() {
            let _ = a.cast(FeedMsg::InjectPanic);
        }
    }
}
