//! Queues for users: `Queue` (push, pop, ack, nack, extend, peek, len, purge, configure) and
//! `Consumer` (deliveries one by one, acked when the handler succeeds), the same over the
//! embedded grid and the network client (`QueueBackend`).
//!
//! Semantics are in docs/queues.md; the service is `heapgrid_actors::queue`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use heapgrid_actors::GridError;
pub use heapgrid_actors::queue::ops::{
    Delivery, Mode, QueueLen, QueueOp, QueueOptions, QueueResult, Receipt,
};
use heapgrid_actors::queue::supervisor::Queues;
use heapgrid_actors::value::Value;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::grid::{BoxFuture, Result};
use crate::lock::{LockGuard, Session};

/// Where queue requests go: the embedded grid's queue service, or a server.
pub trait QueueBackend: Send + Sync + 'static {
    fn queue_op(&self, op: QueueOp) -> BoxFuture<'static, Result<QueueResult>>;
}

impl QueueBackend for Queues {
    fn queue_op(&self, op: QueueOp) -> BoxFuture<'static, Result<QueueResult>> {
        self.call(op)
    }
}

fn unexpected(r: QueueResult) -> GridError {
    GridError::Protocol(format!("a queue request was answered with {r:?}"))
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// How a push is made.
#[derive(Clone, Debug, Default)]
pub struct Push {
    /// A retry with the same key within the queue's dedup window returns the first push's seq.
    pub dedup_key: Option<String>,
    /// Ready only after this long.
    pub delay: Option<Duration>,
    /// Refused (`StaleFence`, nothing added) unless this is the lock's current grant.
    pub fence: Option<(String, u64)>,
    /// At the queue's `max_len`, wait this long (at most 60 s) for room instead of answering
    /// `QueueFull` at once.
    pub wait: Option<Duration>,
}

impl Push {
    pub fn dedup(key: impl Into<String>) -> Push {
        Push { dedup_key: Some(key.into()), ..Push::default() }
    }
    pub fn delay(d: Duration) -> Push {
        Push { delay: Some(d), ..Push::default() }
    }
    /// Waits up to `d` for room in a full queue.
    pub fn wait(d: Duration) -> Push {
        Push { wait: Some(d), ..Push::default() }
    }
    /// Fenced by `guard`'s grant.
    pub fn fenced(mut self, guard: &LockGuard) -> Push {
        self.fence = Some((guard.name().to_string(), guard.fence()));
        self
    }
}

/// How a pop is made.
#[derive(Clone, Debug)]
pub struct Pop {
    /// Most items.
    pub n: u32,
    /// How long to wait for the first (at most 60 s; zero: do not wait).
    pub wait: Duration,
    pub mode: Mode,
    /// In-flight time of each delivery (`Ack` mode; the queue's default if none).
    pub visibility: Option<Duration>,
    /// The deliveries return to ready when this lock session ends.
    pub session: Option<u64>,
}

impl Default for Pop {
    fn default() -> Self {
        Pop { n: 1, wait: Duration::ZERO, mode: Mode::Ack, visibility: None, session: None }
    }
}

/// A handle on one queue (created with default options on first use).
#[derive(Clone)]
pub struct Queue {
    backend: Arc<dyn QueueBackend>,
    name: Arc<str>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("name", &self.name).finish()
    }
}

impl Queue {
    pub fn new(backend: Arc<dyn QueueBackend>, name: &str) -> Queue {
        Queue { backend, name: name.into() }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    async fn op(&self, op: QueueOp) -> Result<QueueResult> {
        self.backend.queue_op(op).await
    }

    /// Adds `value`; its seq.
    pub async fn push<T: Serialize + ?Sized>(&self, value: &T) -> Result<u64> {
        self.push_with(value, Push::default()).await.map(|(seq, _)| seq)
    }

    /// Adds `value` as `how` says; its seq, and whether it was a duplicate of an earlier push
    /// with the same dedup key (then nothing was added).
    pub async fn push_with<T: Serialize + ?Sized>(&self, value: &T, how: Push) -> Result<(u64, bool)> {
        let value = Value::from_serde(value).map_err(|e| GridError::Value(e.to_string()))?;
        let (queue, dedup_key, delay_ms, fence) =
            (self.name.to_string(), how.dedup_key, how.delay.map_or(0, ms), how.fence);
        let op = match how.wait {
            Some(w) => QueueOp::PushWait { queue, value, dedup_key, delay_ms, fence, wait_ms: ms(w) },
            None => QueueOp::Push { queue, value, dedup_key, delay_ms, fence },
        };
        match self.op(op).await? {
            QueueResult::Pushed { seq, duplicate } => Ok((seq, duplicate)),
            r => Err(unexpected(r)),
        }
    }

    /// Up to `how.n` items (possibly none, when the wait ended).
    pub async fn pop_with(&self, how: Pop) -> Result<Vec<Delivery>> {
        let op = QueueOp::Pop {
            queue: self.name.to_string(),
            n: how.n,
            wait_ms: ms(how.wait),
            mode: how.mode,
            visibility_ms: how.visibility.map(ms),
            session: how.session,
        };
        match self.op(op).await? {
            QueueResult::Delivered(ds) => Ok(ds),
            r => Err(unexpected(r)),
        }
    }

    /// One delivery (ack mode), waiting up to `wait` for it.
    pub async fn pop(&self, wait: Duration) -> Result<Option<Delivery>> {
        Ok(self.pop_with(Pop { wait, ..Pop::default() }).await?.pop())
    }

    /// One item removed at once (take mode: at-most-once), waiting up to `wait` for it.
    pub async fn take(&self, wait: Duration) -> Result<Option<Value>> {
        let ds = self.pop_with(Pop { wait, mode: Mode::Take, ..Pop::default() }).await?;
        Ok(ds.into_iter().next().map(|d| d.value))
    }

    /// One delivery made in `session`: it returns to ready when the session ends.
    pub async fn pop_in(&self, session: &Session, wait: Duration) -> Result<Option<Delivery>> {
        Ok(self.pop_with(Pop { wait, session: Some(session.id()), ..Pop::default() }).await?.pop())
    }

    /// Removes a delivered item (`StaleReceipt` if the receipt is no longer current).
    pub async fn ack(&self, receipt: Receipt) -> Result<()> {
        match self.op(QueueOp::Ack { queue: self.name.to_string(), receipt }).await? {
            QueueResult::Done => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    /// Gives a delivery back: ready now, or after `delay`.
    pub async fn nack(&self, receipt: Receipt, delay: Option<Duration>) -> Result<()> {
        let op = QueueOp::Nack { queue: self.name.to_string(), receipt, delay_ms: delay.map_or(0, ms) };
        match self.op(op).await? {
            QueueResult::Done => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    /// Moves a delivery's deadline to `by` from now.
    pub async fn extend(&self, receipt: Receipt, by: Duration) -> Result<()> {
        match self.op(QueueOp::Extend { queue: self.name.to_string(), receipt, ms: ms(by) }).await? {
            QueueResult::Done => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    /// The next `n` ready items, delivering nothing.
    pub async fn peek(&self, n: u32) -> Result<Vec<(u64, Value)>> {
        match self.op(QueueOp::Peek { queue: self.name.to_string(), n }).await? {
            QueueResult::Items(items) => Ok(items),
            r => Err(unexpected(r)),
        }
    }

    /// Ready, in-flight and delayed items, and blocked pops.
    pub async fn len(&self) -> Result<QueueLen> {
        match self.op(QueueOp::Len { queue: self.name.to_string() }).await? {
            QueueResult::Len(l) => Ok(l),
            r => Err(unexpected(r)),
        }
    }

    /// Drops every item; how many.
    pub async fn purge(&self) -> Result<u64> {
        match self.op(QueueOp::Purge { queue: self.name.to_string() }).await? {
            QueueResult::Purged { items } => Ok(items),
            r => Err(unexpected(r)),
        }
    }

    /// Sets the queue's options.
    pub async fn configure(&self, options: QueueOptions) -> Result<()> {
        match self.op(QueueOp::Configure { queue: self.name.to_string(), options }).await? {
            QueueResult::Done => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    /// A consumer: deliveries one at a time, popped `n` at a time with `visibility` each.
    pub fn consume(&self, n: u32, visibility: Duration) -> Consumer {
        Consumer { queue: self.clone(), n: n.max(1), visibility, buffered: VecDeque::new() }
    }
}

/// Deliveries of one queue, one at a time (ack mode). Each comes as a `Message` to ack or nack;
/// `run` acks on the handler's success and nacks on its failure. A message neither acked nor
/// nacked returns to ready when its visibility ends.
///
/// Deliveries popped together are in flight together: one not reached before its visibility
/// ends is redelivered (its late ack is then `StaleReceipt`). Pick `n` and `visibility` so a
/// batch is handled in time.
pub struct Consumer {
    queue: Queue,
    n: u32,
    visibility: Duration,
    buffered: VecDeque<Delivery>,
}

impl Consumer {
    /// The next delivery, waiting as long as it takes.
    pub async fn next(&mut self) -> Result<Message> {
        loop {
            if let Some(d) = self.buffered.pop_front() {
                return Ok(Message { queue: self.queue.clone(), delivery: d });
            }
            // Well inside a client's request timeout (30 s by default).
            let how = Pop {
                n: self.n,
                wait: Duration::from_secs(10),
                mode: Mode::Ack,
                visibility: Some(self.visibility),
                session: None,
            };
            self.buffered.extend(self.queue.pop_with(how).await?);
        }
    }

    /// Hands every delivery's value to `handle`, acking it when `handle` succeeds and nacking
    /// it when it fails, until a request fails (a late ack, `StaleReceipt`, is not a failure:
    /// the item was redelivered). Never returns `Ok`.
    pub async fn run<T, F, Fut, E>(&mut self, mut handle: F) -> Result<()>
    where
        T: DeserializeOwned,
        F: FnMut(T) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<(), E>>,
    {
        loop {
            let m = self.next().await?;
            let value: T = match m.value() {
                Ok(v) => v,
                Err(_) => {
                    // Not what this consumer reads: back, so it ends in the dead-letter queue.
                    m.nack(None).await?;
                    continue;
                }
            };
            let r = match handle(value).await {
                Ok(()) => m.ack().await,
                Err(_) => m.nack(None).await,
            };
            match r {
                // Too late: its visibility ended and it was redelivered (to this consumer or
                // another); the current delivery is untouched.
                Ok(()) | Err(GridError::StaleReceipt { .. }) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// One delivery from a `Consumer`.
#[derive(Debug)]
pub struct Message {
    queue: Queue,
    pub delivery: Delivery,
}

impl Message {
    /// The value, as `T`.
    pub fn value<T: DeserializeOwned>(&self) -> Result<T> {
        self.delivery.value.to_serde().map_err(|e| GridError::Value(e.to_string()))
    }
    pub async fn ack(self) -> Result<()> {
        self.queue.ack(self.delivery.receipt).await
    }
    pub async fn nack(self, delay: Option<Duration>) -> Result<()> {
        self.queue.nack(self.delivery.receipt, delay).await
    }
    pub async fn extend(&self, by: Duration) -> Result<()> {
        self.queue.extend(self.delivery.receipt, by).await
    }
}
