//! `FeedRuntime`: one running feed as its callers see it: its definition and where its shard
//! is. Each typed method is one message to the feed's shard actor with a typed reply.
//!
//! Invariant: a message that could not be delivered (the actor had already died) is retried
//! once the supervisor has replaced the actor, within `RESTART_WAIT`; a message that was
//! delivered is never sent twice (its writes may have applied).

use std::sync::Arc;
use std::time::Duration;

use ractor::{MessagingErr, RpcReplyPort};
use tokio::sync::oneshot;

use super::actor::{AppendReq, CursorReadReq, FeedMsg, ReadReq};
use super::def::{FeedDef, FeedInfo};
use super::{Appended, CursorInfo, FeedRecord, FeedState, Pos, ReadResult};
use crate::error::GridError;
use crate::table::supervisor::{ShardSlot, SlotState};
use crate::value::Value;

/// How long a caller waits for a restarting feed shard before giving up.
const RESTART_WAIT: Duration = Duration::from_secs(5);

/// One feed of a running grid.
pub struct FeedRuntime {
    pub def: FeedDef,
    slot: Arc<ShardSlot<FeedMsg>>,
}

fn lost(feed: &str) -> GridError {
    GridError::Unavailable(format!(
        "feed {feed} stopped while handling the request (a write may or may not have applied)"
    ))
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

    pub(crate) fn slot(&self) -> &ShardSlot<FeedMsg> {
        &self.slot
    }

    /// Sends `payload` and waits for the reply: waits out a restart (bounded), never hangs on a
    /// dead actor.
    async fn call<P, R>(
        &self,
        payload: P,
        wrap: fn(P, RpcReplyPort<Result<R, GridError>>) -> FeedMsg,
        unwrap: fn(FeedMsg) -> Option<P>,
    ) -> Result<R, GridError> {
        let deadline = tokio::time::Instant::now() + RESTART_WAIT;
        let mut payload = payload;
        loop {
            let seen = self.slot.version();
            match self.slot.get() {
                SlotState::Running(actor) => {
                    let (tx, rx) = oneshot::channel();
                    match actor.send_message(wrap(payload, tx.into())) {
                        Ok(()) => return rx.await.map_err(|_| lost(&self.def.name))?,
                        Err(MessagingErr::SendErr(msg)) => match unwrap(msg) {
                            Some(back) => payload = back,
                            None => return Err(lost(&self.def.name)),
                        },
                        Err(_) => return Err(lost(&self.def.name)),
                    }
                }
                SlotState::Starting => {}
                SlotState::Failed(reason) => {
                    return Err(GridError::ShardFailed { table: self.def.name.clone(), shard: 0, reason });
                }
                SlotState::Stopped => return Err(GridError::Closed),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(GridError::Unavailable(format!("feed {} is restarting", self.def.name)));
            }
            self.slot.wait_change(seen, deadline).await;
        }
    }

    /// Appends `value` at the top; `id` is the caller's (see `FeedShard::append`), else the
    /// next. Answered once durable under the feed's fsync policy.
    pub async fn append(&self, value: Value, id: Option<u64>) -> Result<Appended, GridError> {
        self.call(AppendReq { value, id }, FeedMsg::Append, back!(Append)).await
    }

    pub async fn get(&self, id: u64) -> Result<Option<FeedRecord>, GridError> {
        self.call(id, FeedMsg::Get, back!(Get)).await
    }

    pub async fn remove(&self, id: u64) -> Result<(), GridError> {
        self.call(id, FeedMsg::Remove, back!(Remove)).await
    }

    /// At most `n` records after `after`, ascending; with `wait_ms` > 0 and nothing there yet,
    /// waits (parked in the actor, no polling) for an append.
    pub async fn read(&self, after: Pos, n: u32, wait_ms: u64) -> Result<ReadResult, GridError> {
        self.call(ReadReq { after, n, wait_ms }, FeedMsg::Read, back!(Read)).await
    }

    /// At most `n` records below `before` (`None`: from the top), newest first.
    pub async fn read_back(&self, before: Option<u64>, n: u32) -> Result<ReadResult, GridError> {
        self.call((before, n), FeedMsg::ReadBack, back!(ReadBack)).await
    }

    pub async fn cursor_set(&self, name: &str, at: Pos) -> Result<CursorInfo, GridError> {
        self.call((name.to_string(), at), FeedMsg::CursorSet, back!(CursorSet)).await
    }

    pub async fn cursor_get(&self, name: &str) -> Result<CursorInfo, GridError> {
        self.call(name.to_string(), FeedMsg::CursorGet, back!(CursorGet)).await
    }

    /// Reads after cursor `name` and moves it past what it returns, atomically.
    pub async fn cursor_read(&self, name: &str, n: u32, wait_ms: u64) -> Result<ReadResult, GridError> {
        self.call(
            CursorReadReq { name: name.to_string(), n, wait_ms },
            FeedMsg::CursorRead,
            back!(CursorRead),
        )
        .await
    }

    pub async fn cursor_delete(&self, name: &str) -> Result<bool, GridError> {
        self.call(name.to_string(), FeedMsg::CursorDelete, back!(CursorDelete)).await
    }

    pub async fn cursors(&self) -> Result<Vec<CursorInfo>, GridError> {
        self.call((), FeedMsg::Cursors, back!(Cursors)).await
    }

    /// Keeps the newest `keep` records; returns how many were dropped.
    pub async fn trim(&self, keep: u64) -> Result<u64, GridError> {
        self.call(keep, FeedMsg::Trim, back!(Trim)).await
    }

    /// Drops every record below `before`; returns how many were dropped.
    pub async fn cut(&self, before: u64) -> Result<u64, GridError> {
        self.call(before, FeedMsg::Cut, back!(Cut)).await
    }

    pub async fn rotate(&self) -> Result<(), GridError> {
        self.call((), FeedMsg::Rotate, back!(Rotate)).await
    }

    pub async fn set_version(&self, version: u32) -> Result<(), GridError> {
        self.call(version, FeedMsg::SetVersion, back!(SetVersion)).await
    }

    pub async fn state(&self) -> Result<FeedState, GridError> {
        self.call((), FeedMsg::State, back!(State)).await
    }

    pub async fn info(&self) -> Result<FeedInfo, GridError> {
        Ok(self.def.info(self.state().await?))
    }

    /// Test hook: makes the shard actor panic, as a bug would.
    #[doc(hidden)]
    pub fn inject_panic(&self) {
        if let SlotState::Running(a) = self.slot.get() {
            let _ = a.cast(FeedMsg::InjectPanic);
        }
    }
}
