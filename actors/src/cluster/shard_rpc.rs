//! Table operations on shards whose primary is another node: the node-to-node calls behind a
//! `TableRuntime` in a cluster (a grid-scoped snippet, a count or scan over every shard, any
//! read or write the embedded API or a server makes on a node that is not the key's primary).
//!
//! - The caller checks the user's permissions; the callee trusts its peers (the transport
//!   authenticated them with the cluster cookie) and runs each call on its *local* shard only:
//!   a shard it is not the primary of answers `NotPrimary`, and nothing is forwarded twice.
//!   The caller (`TableRuntime`) then waits for the map to change and tries again, bounded.
//! - A write call that gets no answer in time is `Indeterminate` (it may have applied); a read
//!   is `Unavailable`.
//! - A multi-shard commit's remote part: `Prepare` holds the callee's shard (validated,
//!   nothing else runs there) under a ticket until `Decide`, or until the shard's own bound
//!   (`PREPARE_HOLD_MAX`) lets it go with nothing applied. A caller that stops between the
//!   decisions of two shards leaves the first applied and the other not (docs/cluster.md).
//!
//! Frames: a channel byte (`SHARD_FRAME`), then postcard `Frame`: `Call { id, req }`, answered
//! by `Reply { id, rep }` to the sender the transport names.
//!
//! Limits: `CALLS_MAX` calls waiting for answers, `SERVING_MAX` calls served at once,
//! `HELD_MAX` prepared shards held for other nodes; a reply larger than a frame is refused
//! (`LimitExceeded`) rather than lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, oneshot};

use super::transport::FRAME_BYTES_MAX;
use crate::error::GridError;
use crate::grid::GridCore;
use crate::key::Key;
use crate::replication::NodeId;
use crate::replication::shard::ReplNet;
use crate::table::runtime::EvalRequest;
use crate::table::{ScanRange, Versioned, WriteOp, WriteResult, Written};
use crate::value::Value;

/// The channel byte of shard calls.
pub const SHARD_FRAME: u8 = b'S';
/// Calls waiting for answers.
const CALLS_MAX: usize = 4096;
/// Calls from other nodes served at once (more are answered `Unavailable`).
const SERVING_MAX: usize = 1024;
/// Shards held prepared for other nodes' commits.
const HELD_MAX: usize = 1024;
/// How long a read waits for its answer.
const READ_CALL: Duration = Duration::from_secs(5);
/// How long a write (a batch, a decision) waits: past the replicas' `sync` deadline (2 s) and
/// a prepared shard's hold (5 s).
const WRITE_CALL: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize, Deserialize)]
enum Frame {
    Call { id: u64, req: ShardReq },
    Reply { id: u64, rep: Result<ShardRep, GridError> },
}

/// An operation on one shard of a table, run on the node that serves it.
#[derive(Debug, Serialize, Deserialize)]
enum ShardReq {
    /// `fresh`: from the actor rather than the published snapshot (`TableRuntime::get_fresh`).
    Get {
        table: String,
        key: Key,
        fresh: bool,
    },
    Count {
        table: String,
        shard: u32,
    },
    Scan {
        table: String,
        shard: u32,
        range: ScanRange,
    },
    Batch {
        table: String,
        shard: u32,
        ops: Vec<WriteOp>,
    },
    /// A collection-scoped snippet, in the shard its key routes to.
    Eval {
        table: String,
        req: EvalRequest,
    },
    /// Hold `shard` prepared to apply `ops` under the caller's `ticket`.
    Prepare {
        table: String,
        shard: u32,
        ops: Vec<WriteOp>,
        ticket: u64,
    },
    /// Apply (`commit`) or let go of what `ticket` holds.
    Decide {
        ticket: u64,
        commit: bool,
    },
    /// The definition of a feed this node runs (a member starting a feed the map placed).
    FeedDef {
        name: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
enum ShardRep {
    Value(Option<Versioned>),
    Count(u64),
    Entries(Vec<(Key, Versioned)>),
    Written { lsn: u64, results: Vec<WriteResult> },
    Prepared,
    LetGo,
    Snippet(Value),
    FeedDef(crate::feed::def::FeedDef),
}

/// A shard held prepared for another node.
struct Held {
    decide: oneshot::Sender<bool>,
    done: oneshot::Receiver<Result<Written, GridError>>,
    /// Its place among the `HELD_MAX`.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// Removes a call's entry from `pending` when the call ends, however it ends.
struct Forget<'a> {
    rpc: &'a ShardRpc,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.rpc.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

/// This node's side of shard calls: the calls it made, and the shards it holds for others.
pub struct ShardRpc {
    net: Arc<ReplNet>,
    next: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<ShardRep, GridError>>>>,
    held: Mutex<HashMap<(NodeId, u64), Held>>,
    /// `HELD_MAX` places for held shards, taken before a shard is prepared.
    held_slots: Arc<Semaphore>,
    serving: Arc<Semaphore>,
}

fn encode(f: &Frame) -> Option<Vec<u8>> {
    let mut out = vec![SHARD_FRAME];
    postcard::to_io(f, &mut out).ok()?;
    Some(out)
}

fn wrong(rep: ShardRep) -> GridError {
    GridError::Protocol(format!("a shard call was answered with {rep:?}"))
}

impl ShardRpc {
    pub fn new(net: Arc<ReplNet>) -> ShardRpc {
        ShardRpc {
            net,
            next: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            held_slots: Arc::new(Semaphore::new(HELD_MAX)),
            serving: Arc::new(Semaphore::new(SERVING_MAX)),
        }
    }

    /// The node that is the primary of `table`'s shard `shard`, when the map places it on
    /// another node.
    pub fn primary_elsewhere(&self, table: &str, shard: u32) -> Option<NodeId> {
        let map = self.net.map.borrow();
        let p = map.placement(&(table.to_string(), shard))?;
        (p.primary != self.net.me).then_some(p.primary)
    }

    /// Whether this node is an in-sync replica of `table`'s shard `shard` (its copy holds every
    /// completed `sync` write, possibly not the newest ones).
    pub fn holds_in_sync_copy(&self, table: &str, shard: u32) -> bool {
        let map = self.net.map.borrow();
        map.placement(&(table.to_string(), shard)).is_some_and(|p| p.in_sync.contains(&self.net.me))
    }

    /// Waits (at most `max`) for the map to change.
    pub async fn map_changed(&self, max: Duration) {
        let mut map = self.net.map.clone();
        map.borrow_and_update();
        let _ = tokio::time::timeout(max, map.changed()).await;
    }

    /// Sends `req` to `to` and waits for its answer, at most `wait`, and, for a call `on` a
    /// shard, only while the map keeps `to` as that shard's primary (a failover ends it at
    /// once: a write as `Indeterminate`, anything else as `NotPrimary`, which the caller
    /// retries at the new primary).
    async fn call(
        &self,
        to: NodeId,
        req: ShardReq,
        wait: Duration,
        write: bool,
        on: Option<(&str, u32)>,
    ) -> Result<ShardRep, GridError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if p.len() >= CALLS_MAX {
                return Err(GridError::Unavailable(format!(
                    "{CALLS_MAX} shard calls already wait for answers"
                )));
            }
            p.insert(id, tx);
        }
        // However this call ends (answered, timed out, or its caller dropped it), its entry goes.
        let _forget = Forget { rpc: self, id };
        let Some(bytes) = encode(&Frame::Call { id, req }) else {
            return Err(GridError::Invalid("a shard call could not be encoded".into()));
        };
        if bytes.len() > FRAME_BYTES_MAX {
            return Err(GridError::LimitExceeded {
                what: "shard call bytes".into(),
                got: bytes.len() as u64,
                max: FRAME_BYTES_MAX as u64,
            });
        }
        self.net.transport.send(to, bytes);
        let mut map = self.net.map.clone();
        let moved = async {
            let Some((table, shard)) = on else { return std::future::pending::<()>().await };
            loop {
                let still = map
                    .borrow_and_update()
                    .placement(&(table.to_string(), shard))
                    .is_some_and(|p| p.primary == to);
                if !still || map.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            r = tokio::time::timeout(wait, rx) => match r {
                Ok(Ok(rep)) => rep,
                _ => {
                    let why = format!("node {to} did not answer within {wait:?}");
                    Err(if write { GridError::Indeterminate(why) } else { GridError::Unavailable(why) })
                }
            },
            _ = moved => {
                let (table, shard) = on.unwrap_or_default();
                Err(if write {
                    GridError::Indeterminate(format!(
                        "node {to} stopped being the primary of {table} shard {shard} while the write was in flight"
                    ))
                } else {
                    GridError::NotPrimary { table: table.to_string(), shard, primary: None, addr: None }
                })
            }
        }
    }

    pub async fn get(
        &self,
        to: NodeId,
        table: &str,
        shard: u32,
        key: Key,
        fresh: bool,
    ) -> Result<Option<Versioned>, GridError> {
        let req = ShardReq::Get { table: table.into(), key, fresh };
        match self.call(to, req, READ_CALL, false, Some((table, shard))).await? {
            ShardRep::Value(v) => Ok(v),
            r => Err(wrong(r)),
        }
    }

    /// The definition of feed `name` at node `to` (`NoSuchFeed` if it does not run it).
    pub async fn feed_def(&self, to: NodeId, name: &str) -> Result<crate::feed::def::FeedDef, GridError> {
        let req = ShardReq::FeedDef { name: name.into() };
        match self.call(to, req, READ_CALL, false, None).await? {
            ShardRep::FeedDef(d) => Ok(d),
            r => Err(wrong(r)),
        }
    }

    pub async fn count(&self, to: NodeId, table: &str, shard: u32) -> Result<u64, GridError> {
        let req = ShardReq::Count { table: table.into(), shard };
        match self.call(to, req, READ_CALL, false, Some((table, shard))).await? {
            ShardRep::Count(n) => Ok(n),
            r => Err(wrong(r)),
        }
    }

    pub async fn scan(
        &self,
        to: NodeId,
        table: &str,
        shard: u32,
        range: ScanRange,
    ) -> Result<Vec<(Key, Versioned)>, GridError> {
        let req = ShardReq::Scan { table: table.into(), shard, range };
        match self.call(to, req, READ_CALL, false, Some((table, shard))).await? {
            ShardRep::Entries(e) => Ok(e),
            r => Err(wrong(r)),
        }
    }

    pub async fn batch(
        &self,
        to: NodeId,
        table: &str,
        shard: u32,
        ops: Vec<WriteOp>,
    ) -> Result<Written, GridError> {
        let req = ShardReq::Batch { table: table.into(), shard, ops };
        match self.call(to, req, WRITE_CALL, true, Some((table, shard))).await? {
            ShardRep::Written { lsn, results } => Ok(Written { lsn, results }),
            r => Err(wrong(r)),
        }
    }

    /// A snippet runs for as long as its wall budget allows: its answer is awaited that long
    /// beyond a write's wait.
    pub async fn eval(
        &self,
        to: NodeId,
        table: &str,
        shard: u32,
        req: EvalRequest,
    ) -> Result<Value, GridError> {
        let wall = req.limits.wall_ms.unwrap_or(crate::snippet::Limits::default().wall_ms);
        let wait = WRITE_CALL + Duration::from_millis(wall.min(crate::snippet::Limits::server_max().wall_ms));
        let req = ShardReq::Eval { table: table.into(), req };
        match self.call(to, req, wait, true, Some((table, shard))).await? {
            ShardRep::Snippet(v) => Ok(v),
            r => Err(wrong(r)),
        }
    }

    /// Prepares `table`'s shard `shard` on node `to` (see `TableRuntime::prepare`): once this
    /// returns `Ok` that shard is held until the decision is sent (dropping the sender lets it
    /// go), and the receiver answers the applied batch (`Indeterminate` if the decision's
    /// answer was lost).
    pub async fn prepare(
        self: &Arc<Self>,
        to: NodeId,
        table: &str,
        shard: u32,
        ops: Vec<WriteOp>,
    ) -> Result<(oneshot::Sender<bool>, oneshot::Receiver<Result<Written, GridError>>), GridError> {
        let ticket = self.next.fetch_add(1, Ordering::Relaxed);
        let req = ShardReq::Prepare { table: table.into(), shard, ops, ticket };
        match self.call(to, req, WRITE_CALL, false, Some((table, shard))).await {
            Ok(ShardRep::Prepared) => {}
            other => {
                // It may hold the shard all the same (the answer was lost): let go now rather
                // than at its bound.
                let me = self.clone();
                tokio::spawn(async move {
                    let _ =
                        me.call(to, ShardReq::Decide { ticket, commit: false }, READ_CALL, false, None).await;
                });
                return Err(match other {
                    Ok(r) => wrong(r),
                    Err(e) => e,
                });
            }
        }
        let (decide_tx, decide_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let me = self.clone();
        let table = table.to_string();
        tokio::spawn(async move {
            let commit = matches!(decide_rx.await, Ok(true));
            let req = ShardReq::Decide { ticket, commit };
            let r = me.call(to, req, WRITE_CALL, commit, Some((&table, shard))).await;
            let _ = done_tx.send(match r {
                Ok(ShardRep::Written { lsn, results }) => Ok(Written { lsn, results }),
                Ok(r) => Err(wrong(r)),
                Err(e) => Err(e),
            });
        });
        Ok((decide_tx, done_rx))
    }

    /// A frame on `SHARD_FRAME` from node `from` (the channel byte removed).
    pub fn on_frame(self: &Arc<Self>, grid: &Weak<GridCore>, from: NodeId, body: &[u8]) {
        let Ok(frame) = postcard::from_bytes::<Frame>(body) else {
            tracing::warn!(from, "an undecodable shard call was dropped");
            return;
        };
        match frame {
            Frame::Reply { id, rep } => {
                if let Some(tx) = self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id) {
                    let _ = tx.send(rep);
                }
            }
            Frame::Call { id, req } => {
                let Ok(permit) = self.serving.clone().try_acquire_owned() else {
                    let busy = GridError::Unavailable(format!(
                        "node {} serves {SERVING_MAX} shard calls",
                        self.net.me
                    ));
                    self.reply(from, id, Err(busy));
                    return;
                };
                let (me, grid) = (self.clone(), grid.clone());
                tokio::spawn(async move {
                    let rep = match grid.upgrade() {
                        Some(g) => me.serve(&g, from, req).await,
                        None => Err(GridError::Closed),
                    };
                    me.reply(from, id, rep);
                    drop(permit);
                });
            }
        }
    }

    fn reply(&self, to: NodeId, id: u64, rep: Result<ShardRep, GridError>) {
        let Some(mut bytes) = encode(&Frame::Reply { id, rep }) else { return };
        if bytes.len() > FRAME_BYTES_MAX {
            let too_big = GridError::LimitExceeded {
                what: "shard reply bytes (scan with a lower limit)".into(),
                got: bytes.len() as u64,
                max: FRAME_BYTES_MAX as u64,
            };
            let Some(b) = encode(&Frame::Reply { id, rep: Err(too_big) }) else { return };
            bytes = b;
        }
        self.net.transport.send(to, bytes);
    }

    /// Runs `req` on this node's own shards; a table the map has but this node has not
    /// started yet is not served here yet (`NotPrimary`: the caller tries again).
    async fn serve(&self, grid: &GridCore, from: NodeId, req: ShardReq) -> Result<ShardRep, GridError> {
        // The shard it is for (a key's shard by the map's table spec).
        let key_shard = |table: &str, key: Option<&Key>| {
            let shards = self.net.map.borrow().table(table).map_or(1, |t| t.shards);
            key.map_or(0, |k| k.shard(shards))
        };
        let at = match &req {
            ShardReq::Get { table, key, .. } => Some((table.clone(), key_shard(table, Some(key)))),
            ShardReq::Eval { table, req } => Some((table.clone(), key_shard(table, req.key.as_ref()))),
            ShardReq::Count { table, shard }
            | ShardReq::Scan { table, shard, .. }
            | ShardReq::Batch { table, shard, .. }
            | ShardReq::Prepare { table, shard, .. } => Some((table.clone(), *shard)),
            ShardReq::Decide { .. } | ShardReq::FeedDef { .. } => None,
        };
        match self.run(grid, from, req).await {
            Err(GridError::NoSuchTable(_))
                if let Some((t, shard)) = at
                    && self.net.map.borrow().table(&t).is_some() =>
            {
                Err(GridError::NotPrimary { table: t, shard, primary: None, addr: None })
            }
            r => r,
        }
    }

    async fn run(&self, grid: &GridCore, from: NodeId, req: ShardReq) -> Result<ShardRep, GridError> {
        match req {
            ShardReq::Get { table, key, fresh } => {
                Ok(ShardRep::Value(grid.table(&table)?.get_local(key, fresh).await?))
            }
            ShardReq::Count { table, shard } => {
                Ok(ShardRep::Count(grid.table(&table)?.count_local(shard).await?))
            }
            ShardReq::Scan { table, shard, range } => {
                Ok(ShardRep::Entries(grid.table(&table)?.scan_local(shard, &range).await?))
            }
            ShardReq::Batch { table, shard, ops } => {
                let w = grid.table(&table)?.batch_local(shard, ops).await?;
                Ok(ShardRep::Written { lsn: w.lsn, results: w.results })
            }
            ShardReq::Eval { table, req } => {
                Ok(ShardRep::Snippet(grid.table(&table)?.eval_local(req).await?))
            }
            ShardReq::Prepare { table, shard, ops, ticket } => {
                let t = grid.table(&table)?;
                if shard >= t.def.shards {
                    return Err(GridError::Invalid(format!("{table} has {} shards", t.def.shards)));
                }
                // Shards that let go by their own bound are forgotten (their places free).
                self.held.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, h| !h.decide.is_closed());
                let Ok(slot) = self.held_slots.clone().try_acquire_owned() else {
                    return Err(GridError::Unavailable(format!("{HELD_MAX} shards are held prepared here")));
                };
                let (decide, done) = t.prepare_local(shard, ops).await?;
                let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
                held.insert((from, ticket), Held { decide, done, _slot: slot });
                Ok(ShardRep::Prepared)
            }
            ShardReq::FeedDef { name } => Ok(ShardRep::FeedDef(grid.feed(&name)?.def.clone())),
            ShardReq::Decide { ticket, commit } => {
                let h = self.held.lock().unwrap_or_else(|e| e.into_inner()).remove(&(from, ticket));
                let Some(Held { decide, done, .. }) = h else {
                    return if commit {
                        Err(GridError::Unavailable(
                            "the prepared shard had let go (its hold ended) and applied nothing".into(),
                        ))
                    } else {
                        Ok(ShardRep::LetGo)
                    };
                };
                if !commit {
                    let _ = decide.send(false);
                    return Ok(ShardRep::LetGo);
                }
                if decide.send(true).is_err() {
                    return Err(GridError::Unavailable(
                        "the prepared shard had let go (its hold ended) and applied nothing".into(),
                    ));
                }
                let w = done
                    .await
                    .map_err(|_| GridError::Indeterminate("the shard stopped while committing".into()))??;
                Ok(ShardRep::Written { lsn: w.lsn, results: w.results })
            }
        }
    }
}
