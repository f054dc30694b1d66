//! Locks for users: `Session` (one heartbeat per session), `Lock` and `LockGuard` (the fence of
//! a grant, released on drop, best effort), `Semaphore` and `Permits`, and `Fenced`, a table
//! handle whose writes carry fences (the store refuses them, applying nothing, once a fence is
//! stale). The same types over the embedded grid and the network client (`LockBackend`).
//!
//! Semantics are in docs/locks.md; the service is `heapgrid_actors::lock`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use heapgrid_actors::GridError;
pub use heapgrid_actors::lock::ops::{Holder, LockOp, LockResult, LockStatus, SemStatus};
use heapgrid_actors::lock::supervisor::Locks;
use heapgrid_actors::value::Value;
use heapgrid_actors::{Expect, Key, PathSeg, Update, WriteOp, WriteResult};
use serde::Serialize;

use crate::grid::{BoxFuture, CasOutcome, Result, Table};

/// Where lock requests go: the embedded grid's lock service, or a server.
pub trait LockBackend: Send + Sync + 'static {
    fn lock_op(&self, op: LockOp) -> BoxFuture<'static, Result<LockResult>>;
}

impl LockBackend for Locks {
    fn lock_op(&self, op: LockOp) -> BoxFuture<'static, Result<LockResult>> {
        self.call(op)
    }
}

/// Sends `op` from a `Drop` (best effort: a session's ttl frees everything anyway), when there
/// is a runtime to send it on.
fn send_from_drop(backend: &dyn LockBackend, op: LockOp) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        let f = backend.lock_op(op);
        rt.spawn(async move {
            let _ = f.await;
        });
    }
}

/// Sends `op`, made in session `id`. A server binds a session to the connection that opened or
/// reattached it; when the Client has reconnected since, the request is refused before it
/// reaches the lock service (`PermissionDenied` on "session N"): the session is reattached with
/// its secret on the new connection and the request sent once more.
async fn in_session(backend: &dyn LockBackend, id: u64, secret: u64, op: LockOp) -> Result<LockResult> {
    match backend.lock_op(op.clone()).await {
        Err(GridError::PermissionDenied { collection, .. }) if collection == format!("session {id}") => {
            backend.lock_op(LockOp::Reattach { session: id, secret }).await?;
            backend.lock_op(op).await
        }
        r => r,
    }
}

fn unexpected(r: LockResult) -> GridError {
    GridError::Protocol(format!("a lock request was answered with {r:?}"))
}

struct SessionInner {
    backend: Arc<dyn LockBackend>,
    id: u64,
    secret: u64,
    ttl_ms: u64,
    closed: AtomicBool,
    /// Set when the server said the session is gone (the heartbeat learned it).
    expired: Arc<AtomicBool>,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Drop for SessionInner {
    fn drop(&mut self) {
        self.heartbeat.abort();
        if !self.closed.load(Ordering::Acquire) {
            send_from_drop(&*self.backend, LockOp::Close { session: self.id });
        }
    }
}

/// A lock session: it owns every grant and permit taken through it, and is kept alive by one
/// heartbeat task every ttl/3 (not one per lock). Closing it (or dropping its last handle)
/// releases everything it holds; if the process stops, the server frees them after the ttl.
#[derive(Clone)]
pub struct Session {
    inner: Arc<SessionInner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("id", &self.inner.id).field("ttl_ms", &self.inner.ttl_ms).finish()
    }
}

impl Session {
    /// Opens a session with `ttl` (default 15 s; 1 s to 10 min).
    pub async fn open(backend: Arc<dyn LockBackend>, ttl: Option<Duration>) -> Result<Session> {
        let ttl_ms = ttl.map(|t| t.as_millis() as u64);
        match backend.lock_op(LockOp::Open { ttl_ms }).await? {
            LockResult::Session { session, secret, ttl_ms } => {
                Ok(Session::start(backend, session, secret, ttl_ms))
            }
            r => Err(unexpected(r)),
        }
    }

    /// Takes up a session again (after a reconnect, or in another process) with its id and
    /// secret, within its ttl; its grants are still its own.
    pub async fn reattach(backend: Arc<dyn LockBackend>, session: u64, secret: u64) -> Result<Session> {
        match backend.lock_op(LockOp::Reattach { session, secret }).await? {
            LockResult::Session { session, secret, ttl_ms } => {
                Ok(Session::start(backend, session, secret, ttl_ms))
            }
            r => Err(unexpected(r)),
        }
    }

    fn start(backend: Arc<dyn LockBackend>, id: u64, secret: u64, ttl_ms: u64) -> Session {
        let expired = Arc::new(AtomicBool::new(false));
        let beat = backend.clone();
        let flag = expired.clone();
        let every = Duration::from_millis((ttl_ms / 3).max(1));
        let heartbeat = tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match in_session(&*beat, id, secret, LockOp::Heartbeat { session: id }).await {
                    Err(GridError::SessionExpired { .. }) => {
                        flag.store(true, Ordering::Release);
                        return;
                    }
                    // A transport error: try again at the next beat (the ttl allows two misses).
                    _ => continue,
                }
            }
        });
        Session {
            inner: Arc::new(SessionInner {
                backend,
                id,
                secret,
                ttl_ms,
                closed: AtomicBool::new(false),
                expired,
                heartbeat,
            }),
        }
    }

    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// What `reattach` needs besides the id. Keep it as secret as the session's grants.
    pub fn secret(&self) -> u64 {
        self.inner.secret
    }

    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.inner.ttl_ms)
    }

    /// Whether the heartbeat learned that the server ended the session (its grants are gone).
    pub fn expired(&self) -> bool {
        self.inner.expired.load(Ordering::Acquire)
    }

    /// Stops heartbeating without closing: the session (and its grants) will expire after its
    /// ttl unless someone reattaches. For tests and for handing a session to another process.
    pub fn abandon(self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.heartbeat.abort();
    }

    /// Ends the session: everything it holds is released at once.
    pub async fn close(self) -> Result<()> {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.heartbeat.abort();
        self.op(LockOp::Close { session: self.inner.id }).await.map(|_| ())
    }

    async fn op(&self, op: LockOp) -> Result<LockResult> {
        in_session(&*self.inner.backend, self.inner.id, self.inner.secret, op).await
    }

    /// The lock `name`, taken in this session.
    pub fn lock(&self, name: &str) -> Lock {
        Lock { session: self.clone(), name: name.to_string() }
    }

    /// The semaphore `name` with `size` permits (created with that size on first use).
    pub fn semaphore(&self, name: &str, size: u32) -> Semaphore {
        Semaphore { session: self.clone(), name: name.to_string(), size }
    }
}

/// A lock, as seen from one session.
#[derive(Clone, Debug)]
pub struct Lock {
    session: Session,
    name: String,
}

impl Lock {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits up to `wait` (FIFO behind earlier waiters) for the lock; `None` if it did not come.
    pub async fn acquire(&self, wait: Duration) -> Result<Option<LockGuard>> {
        self.acquire_with(wait, None).await
    }

    /// Takes the lock only if it is free now.
    pub async fn try_acquire(&self) -> Result<Option<LockGuard>> {
        self.acquire_with(Duration::ZERO, None).await
    }

    /// As `acquire`, with a lease: the grant ends after `lease` unless renewed, even while the
    /// session lives.
    pub async fn acquire_with(&self, wait: Duration, lease: Option<Duration>) -> Result<Option<LockGuard>> {
        let op = LockOp::Acquire {
            lock: self.name.clone(),
            session: self.session.id(),
            wait_ms: wait.as_millis() as u64,
            lease_ms: lease.map(|l| l.as_millis().max(1) as u64),
        };
        match self.session.op(op).await? {
            LockResult::Granted { fence, expires_in_ms } => Ok(Some(LockGuard {
                session: self.session.clone(),
                name: self.name.clone(),
                fence,
                expires_in: Duration::from_millis(expires_in_ms),
                released: false,
            })),
            LockResult::Timeout => Ok(None),
            r => Err(unexpected(r)),
        }
    }

    /// A guard for a grant this session already holds with `fence` (after `reattach`, in
    /// another process or after a restart): no request is made; its release reports
    /// `NotHolder` if the fence is not the current grant.
    pub fn adopt(&self, fence: u64) -> LockGuard {
        LockGuard {
            session: self.session.clone(),
            name: self.name.clone(),
            fence,
            expires_in: self.session.ttl(),
            released: false,
        }
    }

    /// Holder, fence, waiters and time left.
    pub async fn status(&self) -> Result<LockStatus> {
        match self.session.op(LockOp::Status { lock: self.name.clone() }).await? {
            LockResult::Status(s) => Ok(s),
            r => Err(unexpected(r)),
        }
    }

    /// Allows `reentry_max` nested acquires by the holder's session (0: not reentrant), and holds
    /// the lock back for `lock_delay` after an expiry (not after a release).
    pub async fn configure(&self, reentry_max: u32, lock_delay: Duration) -> Result<()> {
        let op = LockOp::Configure {
            lock: self.name.clone(),
            reentry_max,
            lock_delay_ms: lock_delay.as_millis() as u64,
        };
        self.session.op(op).await.map(|_| ())
    }
}

/// A grant of a lock: its fence guards writes (`Fenced`, `fence_op`). Dropping it releases the
/// lock in the background (best effort); `release` does it and reports the outcome.
#[derive(Debug)]
pub struct LockGuard {
    session: Session,
    name: String,
    fence: u64,
    expires_in: Duration,
    released: bool,
}

impl LockGuard {
    pub fn fence(&self) -> u64 {
        self.fence
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn lock_name(&self) -> &str {
        &self.name
    }

    /// How long the grant lasted when it was given (lease or session, whichever ends first).
    pub fn expires_in(&self) -> Duration {
        self.expires_in
    }

    /// The batch operation that checks this fence (put it in any batch).
    pub fn fence_op(&self) -> WriteOp {
        WriteOp::Fence { lock: self.name.clone(), fence: self.fence }
    }

    /// Restarts the lease (`None`: the grant lasts as long as the session).
    pub async fn renew(&mut self, lease: Option<Duration>) -> Result<()> {
        let op = LockOp::Renew {
            lock: self.name.clone(),
            session: self.session.id(),
            fence: self.fence,
            lease_ms: lease.map(|l| l.as_millis().max(1) as u64),
        };
        match self.session.op(op).await? {
            LockResult::Granted { expires_in_ms, .. } => {
                self.expires_in = Duration::from_millis(expires_in_ms);
                Ok(())
            }
            r => Err(unexpected(r)),
        }
    }

    fn release_op(&self) -> LockOp {
        LockOp::Release { lock: self.name.clone(), session: self.session.id(), fence: self.fence }
    }

    /// Releases the grant: `NotHolder` if it was lost (expired) meanwhile.
    pub async fn release(mut self) -> Result<()> {
        self.released = true;
        self.session.op(self.release_op()).await.map(|_| ())
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if !self.released {
            send_from_drop(&*self.session.inner.backend, self.release_op());
        }
    }
}

/// A counting semaphore, as seen from one session.
#[derive(Clone, Debug)]
pub struct Semaphore {
    session: Session,
    name: String,
    size: u32,
}

impl Semaphore {
    /// Waits up to `wait` (strictly FIFO) for `permits`; `None` if they did not come.
    pub async fn acquire(&self, permits: u32, wait: Duration) -> Result<Option<Permits>> {
        let op = LockOp::SemAcquire {
            sem: self.name.clone(),
            session: self.session.id(),
            size: self.size,
            permits,
            wait_ms: wait.as_millis() as u64,
        };
        match self.session.op(op).await? {
            LockResult::Permits { .. } => Ok(Some(Permits { sem: self.clone(), permits, released: false })),
            LockResult::Timeout => Ok(None),
            r => Err(unexpected(r)),
        }
    }

    pub async fn status(&self) -> Result<SemStatus> {
        match self.session.op(LockOp::SemStatus { sem: self.name.clone() }).await? {
            LockResult::Sem(s) => Ok(s),
            r => Err(unexpected(r)),
        }
    }
}

/// Permits of a semaphore held by a session; given back on drop (best effort) or by `release`.
#[derive(Debug)]
pub struct Permits {
    sem: Semaphore,
    permits: u32,
    released: bool,
}

impl Permits {
    pub fn count(&self) -> u32 {
        self.permits
    }

    fn op(&self) -> LockOp {
        LockOp::SemRelease {
            sem: self.sem.name.clone(),
            session: self.sem.session.id(),
            permits: self.permits,
        }
    }

    pub async fn release(mut self) -> Result<()> {
        self.released = true;
        self.sem.session.op(self.op()).await.map(|_| ())
    }
}

impl Drop for Permits {
    fn drop(&mut self) {
        if !self.released {
            send_from_drop(&*self.sem.session.inner.backend, self.op());
        }
    }
}

/// A table whose writes carry fences: each is sent as one batch led by the fences, and applies
/// only if every fence is its lock's current grant (else `StaleFence`, nothing applied).
#[derive(Clone)]
pub struct Fenced {
    table: Table,
    fences: Vec<WriteOp>,
}

impl Table {
    /// This table, with every write guarded by `guards`' fences.
    pub fn fenced(&self, guards: &[&LockGuard]) -> Fenced {
        Fenced { table: self.clone(), fences: guards.iter().map(|g| g.fence_op()).collect() }
    }
}

impl Fenced {
    /// The fences given explicitly, as `(lock, fence)` (another process's grant).
    pub fn with(table: &Table, fences: &[(&str, u64)]) -> Fenced {
        let fences = fences.iter().map(|(l, f)| WriteOp::Fence { lock: l.to_string(), fence: *f }).collect();
        Fenced { table: table.clone(), fences }
    }

    /// Writes `ops` as one batch after the fences; their results (the fences' are left out).
    pub async fn batch(&self, ops: Vec<WriteOp>) -> Result<Vec<WriteResult>> {
        let n = self.fences.len();
        let mut all = self.fences.clone();
        all.extend(ops);
        let mut r = self.table.batch(all).await?;
        Ok(r.split_off(n.min(r.len())))
    }

    async fn one(&self, op: WriteOp) -> Result<WriteResult> {
        self.batch(vec![op])
            .await?
            .pop()
            .ok_or_else(|| GridError::Protocol("a fenced write was answered with no result".into()))
    }

    pub async fn put<T: Serialize + ?Sized>(&self, key: impl Into<Key>, value: &T) -> Result<u64> {
        let value = Value::from_serde(value).map_err(|e| GridError::Value(e.to_string()))?;
        self.put_value(key, value).await
    }

    pub async fn put_value(&self, key: impl Into<Key>, value: Value) -> Result<u64> {
        match self.one(WriteOp::Put { key: key.into(), value }).await? {
            WriteResult::Put { version } => Ok(version),
            r => Err(GridError::Protocol(format!("a put was answered with {r:?}"))),
        }
    }

    pub async fn delete(&self, key: impl Into<Key>) -> Result<bool> {
        match self.one(WriteOp::Delete { key: key.into() }).await? {
            WriteResult::Deleted { existed } => Ok(existed),
            r => Err(GridError::Protocol(format!("a delete was answered with {r:?}"))),
        }
    }

    /// A fenced compare-and-set. In a batch a mismatch fails the batch: `CasFailed`.
    pub async fn cas(&self, key: impl Into<Key>, expect: Expect, new: Option<Value>) -> Result<CasOutcome> {
        match self.one(WriteOp::Cas { key: key.into(), expect, new }).await? {
            WriteResult::Cas { ok, current } => Ok(CasOutcome { ok, current }),
            r => Err(GridError::Protocol(format!("a compare-and-set was answered with {r:?}"))),
        }
    }

    pub async fn update(&self, key: impl Into<Key>, path: Vec<PathSeg>, update: Update) -> Result<Value> {
        match self.one(WriteOp::Update { key: key.into(), path, update }).await? {
            WriteResult::Updated { value, .. } => Ok(value),
            r => Err(GridError::Protocol(format!("an update was answered with {r:?}"))),
        }
    }
}
