//! The embedded API: `Grid` (a grid in this process) and `Table` (a handle to one table).
//!
//! `Table` talks to a `TableBackend`: in-process it is the table's runtime (messages to its shard
//! actors); the network `Client` provides another backend with the same methods, so code
//! written against `Table` runs over either transport unchanged.

use std::future::Future;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use heapgrid_actors::grid::{GridCore, GridOptions, TableInfo, TableOptions, TableRuntime};
use heapgrid_actors::limits::SCAN_LIMIT_MAX;
use heapgrid_actors::snippet::LimitOverrides;
use heapgrid_actors::{
    EvalRequest, Expect, GridError, Key, PathSeg, ScanRange, Update, Value, Versioned, WriteOp, WriteResult,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Result alias of the public API.
pub type Result<T, E = GridError> = std::result::Result<T, E>;

/// A boxed future, as backends return them.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Executes a table's typed operations: in-process (the table's runtime), or over the network
/// (the `Client`'s remote table).
pub trait TableBackend: Send + Sync + 'static {
    fn get(&self, key: Key) -> BoxFuture<'_, Result<Option<Versioned>>>;
    fn contains(&self, key: Key) -> BoxFuture<'_, Result<bool>>;
    fn count(&self) -> BoxFuture<'_, Result<u64>>;
    fn scan(&self, range: ScanRange) -> BoxFuture<'_, Result<Vec<(Key, Versioned)>>>;
    fn write(&self, op: WriteOp) -> BoxFuture<'_, Result<WriteResult>>;
    fn batch(&self, ops: Vec<WriteOp>) -> BoxFuture<'_, Result<Vec<WriteResult>>>;
    fn eval(&self, req: EvalRequest) -> BoxFuture<'_, Result<Value>>;
}

impl TableBackend for TableRuntime {
    fn get(&self, key: Key) -> BoxFuture<'_, Result<Option<Versioned>>> {
        Box::pin(TableRuntime::get(self, key))
    }
    fn contains(&self, key: Key) -> BoxFuture<'_, Result<bool>> {
        Box::pin(TableRuntime::contains(self, key))
    }
    fn count(&self) -> BoxFuture<'_, Result<u64>> {
        Box::pin(TableRuntime::count(self))
    }
    fn scan(&self, range: ScanRange) -> BoxFuture<'_, Result<Vec<(Key, Versioned)>>> {
        Box::pin(TableRuntime::scan(self, range))
    }
    fn write(&self, op: WriteOp) -> BoxFuture<'_, Result<WriteResult>> {
        Box::pin(async move { Ok(TableRuntime::write(self, op).await?.1) })
    }
    fn batch(&self, ops: Vec<WriteOp>) -> BoxFuture<'_, Result<Vec<WriteResult>>> {
        Box::pin(async move { Ok(TableRuntime::batch(self, ops).await?.results) })
    }
    fn eval(&self, req: EvalRequest) -> BoxFuture<'_, Result<Value>> {
        Box::pin(TableRuntime::eval(self, req))
    }
}

/// A grid running inside this process.
pub struct Grid {
    core: Arc<GridCore>,
}

impl Grid {
    /// Opens (creating if needed) the grid stored in `dir`; every table starts and recovers.
    pub async fn open(dir: impl AsRef<Path>, opts: GridOptions) -> Result<Grid> {
        Ok(Grid { core: GridCore::open(dir, opts).await? })
    }

    /// Creates a table.
    pub async fn create_table(&self, name: &str, opts: TableOptions) -> Result<Table> {
        let rt = self.core.create_table(name, opts).await?;
        Ok(Table::over(rt))
    }

    /// A handle to an existing table.
    pub fn table(&self, name: &str) -> Result<Table> {
        Ok(Table::over(self.core.table(name)?))
    }

    /// Drops a table and deletes its data.
    pub async fn drop_table(&self, name: &str) -> Result<()> {
        self.core.drop_table(name).await
    }

    /// Every table.
    pub fn tables(&self) -> Vec<TableInfo> {
        self.core.list_tables()
    }

    /// Creates a feed (a linked chain of records; see docs/feeds.md).
    pub async fn create_feed(&self, name: &str, opts: crate::feed::FeedOptions) -> Result<crate::feed::Feed> {
        Ok(crate::feed::Feed::over(self.core.create_feed(name, opts).await?))
    }

    /// A handle to an existing feed.
    pub fn feed(&self, name: &str) -> Result<crate::feed::Feed> {
        Ok(crate::feed::Feed::over(self.core.feed(name)?))
    }

    /// Drops a feed and deletes its records.
    pub async fn drop_feed(&self, name: &str) -> Result<()> {
        self.core.drop_feed(name).await
    }

    /// Every feed, with its container.
    pub async fn feeds(&self) -> Result<Vec<crate::feed::FeedInfo>> {
        let mut out = Vec::new();
        for def in self.core.list_feeds() {
            if let Ok(f) = self.core.feed(&def.name) {
                out.push(f.info().await?);
            }
        }
        Ok(out)
    }

    /// Runs a grid-scoped snippet and returns its (shaped) result. Each collection operation in it
    /// is atomic on its own; its writes are applied at the end, one atomic batch per shard, shard
    /// after shard: the snippet as a whole is not a transaction (docs/snippets.md). For an atomic
    /// read-modify-write use `Table::eval` / `Table::eval_on` (inside one shard).
    pub async fn eval(&self, src: &str) -> Result<Value> {
        self.eval_with(src, Value::Null, LimitOverrides::default()).await
    }

    /// `eval` with arguments (the snippet's `args`) and budget overrides (capped by the grid's
    /// maximums).
    pub async fn eval_with(&self, src: &str, args: Value, limits: LimitOverrides) -> Result<Value> {
        self.core.eval(src, args, &limits, Arc::new(|_: &str, _: bool| Ok(()))).await
    }

    /// A grid-scoped snippet whose writes are fenced by `guards`: one stale fence and the run
    /// writes nothing (`StaleFence`). Inside, `lock_held(name, fence)` tests a fence.
    pub async fn eval_fenced(
        &self,
        src: &str,
        args: Value,
        guards: &[&crate::lock::LockGuard],
    ) -> Result<Value> {
        let fences: Vec<(String, u64)> =
            guards.iter().map(|g| (g.lock_name().to_string(), g.fence())).collect();
        let limits = LimitOverrides::default();
        self.core.eval_fenced(src, args, &limits, Arc::new(|_: &str, _: bool| Ok(())), &fences).await
    }

    /// Entries `offset..offset+limit` of the value a `$ref` from a snippet result names.
    pub async fn fetch(&self, reference: &str, offset: u32, limit: u32) -> Result<Value> {
        self.core.fetch(reference, offset, limit, Arc::new(|_: &str, _: bool| Ok(()))).await
    }

    /// Stores (or replaces) a module of procedures snippets can call; it is compiled first.
    pub fn put_procedures(&self, module: &str, src: &str) -> Result<()> {
        self.core.put_procedures(module, src)
    }

    /// Removes a module of procedures.
    pub fn drop_procedures(&self, module: &str) -> Result<bool> {
        self.core.drop_procedures(module)
    }

    /// The running core (for the server and tests).
    pub fn core(&self) -> &Arc<GridCore> {
        &self.core
    }

    /// Opens a lock session (`ttl`: default 15 s) with its heartbeat.
    pub async fn session(&self, ttl: Option<std::time::Duration>) -> Result<crate::lock::Session> {
        crate::lock::Session::open(self.core.locks().clone(), ttl).await
    }

    /// Takes up a session again with its id and secret (after a restart, within its ttl).
    pub async fn reattach(&self, session: u64, secret: u64) -> Result<crate::lock::Session> {
        crate::lock::Session::reattach(self.core.locks().clone(), session, secret).await
    }

    /// A handle on queue `name` (created with default options on first use).
    pub fn queue(&self, name: &str) -> crate::queue::Queue {
        crate::queue::Queue::new(self.core.queues().clone(), name)
    }

    /// Every queue in memory (with a record, items or waiters) and its counts.
    pub async fn queues(&self) -> Result<Vec<(String, crate::queue::QueueLen)>> {
        match self.core.queues().call(crate::queue::QueueOp::List).await? {
            crate::queue::QueueResult::List(all) => Ok(all),
            r => Err(GridError::Protocol(format!("a queue list was answered with {r:?}"))),
        }
    }

    /// Every lock held, waited for or in its lock delay, and every semaphore in use.
    pub async fn locks(&self) -> Result<(Vec<crate::lock::LockStatus>, Vec<crate::lock::SemStatus>)> {
        match self.core.locks().call(crate::lock::LockOp::List).await? {
            crate::lock::LockResult::List { locks, sems } => Ok((locks, sems)),
            r => Err(GridError::Protocol(format!("a lock list was answered with {r:?}"))),
        }
    }

    /// Checkpoints every shard and stops the grid.
    pub async fn close(self) -> Result<()> {
        self.core.close().await
    }
}

/// Outcome of a compare-and-set.
#[derive(Clone, Debug, PartialEq)]
pub struct CasOutcome {
    pub ok: bool,
    /// The state the comparison saw.
    pub current: Option<Versioned>,
}

/// A write answered with the result of another kind of write: only a misbehaving server (or
/// backend) can do that.
fn mismatch(r: WriteResult) -> GridError {
    GridError::Protocol(format!("a write was answered with {r:?}"))
}

fn to_value<T: Serialize + ?Sized>(v: &T) -> Result<Value> {
    Value::from_serde(v).map_err(|e| GridError::Value(e.to_string()))
}

/// A handle to one table; cheap to clone and to share between tasks.
#[derive(Clone)]
pub struct Table {
    backend: Arc<dyn TableBackend>,
}

impl Table {
    /// A handle over any backend.
    pub fn over(backend: Arc<dyn TableBackend>) -> Table {
        Table { backend }
    }

    /// Runs a collection-scoped snippet inside this (single-shard) table's actor: atomic and
    /// isolated from every other request to it; its writes are one op-log batch, or none.
    pub async fn eval(&self, src: &str) -> Result<Value> {
        self.eval_at(None, src, Value::Null, LimitOverrides::default()).await
    }

    /// Like `eval`, in the shard that owns `key` (required on a sharded table).
    pub async fn eval_on(&self, key: impl Into<Key>, src: &str) -> Result<Value> {
        self.eval_at(Some(key.into()), src, Value::Null, LimitOverrides::default()).await
    }

    /// `eval` with an optional routing key (the snippet's `key`), arguments (`args`) and budget
    /// overrides.
    pub async fn eval_at(
        &self,
        key: Option<Key>,
        src: &str,
        args: Value,
        limits: LimitOverrides,
    ) -> Result<Value> {
        self.backend.eval(EvalRequest { src: src.into(), key, args, limits, read_only: false }).await
    }

    /// The value and version stored under `key`.
    pub async fn get_versioned(&self, key: impl Into<Key>) -> Result<Option<Versioned>> {
        self.backend.get(key.into()).await
    }

    /// The value stored under `key`.
    pub async fn get_value(&self, key: impl Into<Key>) -> Result<Option<Value>> {
        Ok(self.get_versioned(key).await?.map(|v| v.value))
    }

    /// The value under `key`, converted to `T`.
    pub async fn get<T: DeserializeOwned>(&self, key: impl Into<Key>) -> Result<Option<T>> {
        match self.get_value(key).await? {
            Some(v) => Ok(Some(v.to_serde().map_err(|e| GridError::Value(e.to_string()))?)),
            None => Ok(None),
        }
    }

    /// Stores `value` (any serde type) under `key`; returns the key's new version.
    pub async fn put<T: Serialize + ?Sized>(&self, key: impl Into<Key>, value: &T) -> Result<u64> {
        self.put_value(key, to_value(value)?).await
    }

    /// Stores a `Value`; returns the key's new version.
    pub async fn put_value(&self, key: impl Into<Key>, value: Value) -> Result<u64> {
        match self.backend.write(WriteOp::Put { key: key.into(), value }).await? {
            WriteResult::Put { version } => Ok(version),
            r => Err(mismatch(r)),
        }
    }

    /// Deletes `key`; returns whether it existed.
    pub async fn delete(&self, key: impl Into<Key>) -> Result<bool> {
        match self.backend.write(WriteOp::Delete { key: key.into() }).await? {
            WriteResult::Deleted { existed } => Ok(existed),
            r => Err(mismatch(r)),
        }
    }

    /// Whether `key` is present.
    pub async fn contains(&self, key: impl Into<Key>) -> Result<bool> {
        self.backend.contains(key.into()).await
    }

    /// Number of keys.
    pub async fn count(&self) -> Result<u64> {
        self.backend.count().await
    }

    /// Writes `new` (deletes, if `None`) only if the key's state matches `expect`.
    pub async fn cas(&self, key: impl Into<Key>, expect: Expect, new: Option<Value>) -> Result<CasOutcome> {
        match self.backend.write(WriteOp::Cas { key: key.into(), expect, new }).await? {
            WriteResult::Cas { ok, current } => Ok(CasOutcome { ok, current }),
            r => Err(mismatch(r)),
        }
    }

    /// Changes one path inside the stored document without shipping it; returns the value now
    /// at the path.
    pub async fn update(&self, key: impl Into<Key>, path: Vec<PathSeg>, update: Update) -> Result<Value> {
        match self.backend.write(WriteOp::Update { key: key.into(), path, update }).await? {
            WriteResult::Updated { value, .. } => Ok(value),
            r => Err(mismatch(r)),
        }
    }

    /// Adds `by` to the number at `path` (a missing field counts as 0; with an empty path, a
    /// missing key is a counter from 0); returns the new value (an int, or a float if the field
    /// held a float).
    pub async fn increment(&self, key: impl Into<Key>, path: Vec<PathSeg>, by: i64) -> Result<Value> {
        self.update(key, path, Update::Increment(Value::Int(by))).await
    }

    /// Applies writes atomically (one op-log record). On a sharded table every key must map to
    /// the same shard.
    pub async fn batch(&self, ops: Vec<WriteOp>) -> Result<Vec<WriteResult>> {
        self.backend.batch(ops).await
    }

    /// Up to `limit` entries in `range`, ascending (or descending with `reverse`).
    pub async fn scan_page(
        &self,
        range: impl RangeBounds<Key>,
        limit: u32,
        reverse: bool,
    ) -> Result<Vec<(Key, Value)>> {
        let range = ScanRange {
            start: range.start_bound().cloned(),
            end: range.end_bound().cloned(),
            limit,
            reverse,
        };
        Ok(self.backend.scan(range).await?.into_iter().map(|(k, v)| (k, v.value)).collect())
    }

    /// Up to `limit` entries whose string keys start with `prefix`.
    pub async fn prefix(&self, prefix: &str, limit: u32, reverse: bool) -> Result<Vec<(Key, Value)>> {
        let entries = self.backend.scan(ScanRange::prefix(prefix, limit, reverse)).await?;
        Ok(entries.into_iter().map(|(k, v)| (k, v.value)).collect())
    }

    /// Every entry in `range` as an async stream, fetched in pages of `page` entries. Each page
    /// is consistent on its own; the stream as a whole is not a snapshot.
    pub fn scan(
        &self,
        range: impl RangeBounds<Key>,
        page: u32,
        reverse: bool,
    ) -> impl Stream<Item = Result<(Key, Value)>> + Send + 'static {
        let page = page.clamp(1, SCAN_LIMIT_MAX);
        let table = self.clone();
        let (start, end) = (range.start_bound().cloned(), range.end_bound().cloned());
        let state = (table, start, end, Vec::<(Key, Value)>::new().into_iter(), false);
        futures_util::stream::unfold(state, move |(table, start, end, mut buf, done)| async move {
            if let Some(item) = buf.next() {
                return Some((Ok(item), (table, start, end, buf, done)));
            }
            if done {
                return None;
            }
            match table.scan_page((start.clone(), end.clone()), page, reverse).await {
                Err(e) => Some((Err(e), (table, start, end, buf, true))),
                Ok(entries) => {
                    let done = (entries.len() as u32) < page;
                    let (mut start, mut end) = (start, end);
                    if let Some((last, _)) = entries.last() {
                        // Continue after the last key seen, in the scan's direction.
                        if reverse {
                            end = Bound::Excluded(last.clone());
                        } else {
                            start = Bound::Excluded(last.clone());
                        }
                    }
                    let mut buf = entries.into_iter();
                    let item = buf.next()?;
                    Some((Ok(item), (table, start, end, buf, done)))
                }
            }
        })
    }
}

/// Shorthand for a path: `path!["friends", 3]`.
#[macro_export]
macro_rules! path {
    ($($seg:expr),* $(,)?) => { vec![$($crate::PathSeg::from($seg)),*] };
}
