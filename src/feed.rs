//! Feeds for users: the `Feed` handle (the same type over the embedded grid and the network
//! client), its wire operations (`FeedOp`, `FeedResult`: append-only, pinned in
//! src/protocol.rs's tests), `follow` as an async stream, the KVS-style `Reader`, and typed
//! reads with registered upgrade steps between schema versions (`Upgrades`).
//!
//! Semantics are in docs/feeds.md; the state machine is `heapgrid_actors::feed`.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::Stream;
use heapgrid_actors::GridError;
use heapgrid_actors::feed::runtime::FeedRuntime;
pub use heapgrid_actors::feed::{CursorInfo, FeedRecord, FeedState, Pos, ReadResult, SegmentInfo};
pub use heapgrid_actors::grid::{FeedInfo, FeedOptions, Retention};
use heapgrid_actors::value::Value;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::grid::{BoxFuture, Result};

/// One operation on a feed. On the wire: append-only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum FeedOp {
    Append {
        value: Value,
        id: Option<u64>,
    },
    Get {
        id: u64,
    },
    Remove {
        id: u64,
    },
    Read {
        after: Pos,
        n: u32,
        wait_ms: u64,
    },
    ReadBack {
        before: Option<u64>,
        n: u32,
    },
    CursorSet {
        name: String,
        at: Pos,
    },
    CursorGet {
        name: String,
    },
    CursorRead {
        name: String,
        n: u32,
        wait_ms: u64,
    },
    CursorDelete {
        name: String,
    },
    Cursors,
    Trim {
        keep: u64,
    },
    Cut {
        before: u64,
    },
    Rotate,
    SetVersion {
        version: u32,
    },
    Info,
    /// `Append`, applied only if every `(lock, fence)` is its lock's current grant.
    AppendFenced {
        value: Value,
        id: Option<u64>,
        fences: Vec<(String, u64)>,
    },
}

impl FeedOp {
    /// Whether the operation changes the feed (needs `write`). A cursor read moves its cursor,
    /// so it writes.
    pub fn writes(&self) -> bool {
        !matches!(
            self,
            FeedOp::Get { .. }
                | FeedOp::Read { .. }
                | FeedOp::ReadBack { .. }
                | FeedOp::CursorGet { .. }
                | FeedOp::Cursors
                | FeedOp::Info
        )
    }

    /// Whether the answer carries the feed's contents or state (needs `read`): everything but
    /// the writes that answer only an id, a count or `Done`. A cursor read needs both.
    pub fn reads(&self) -> bool {
        !matches!(
            self,
            FeedOp::Append { .. }
                | FeedOp::AppendFenced { .. }
                | FeedOp::Remove { .. }
                | FeedOp::CursorDelete { .. }
                | FeedOp::Trim { .. }
                | FeedOp::Cut { .. }
                | FeedOp::Rotate
                | FeedOp::SetVersion { .. }
        )
    }
}

/// The answer to one `FeedOp`. On the wire: append-only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum FeedResult {
    Appended { id: u64 },
    Record(Option<FeedRecord>),
    Done,
    Records(ReadResult),
    Cursor(CursorInfo),
    Cursors(Vec<CursorInfo>),
    Bool(bool),
    Count(u64),
    Info(FeedInfo),
}

/// Executes a feed's operations: in-process (the feed's runtime), or over the network (the
/// `Client`'s remote feed).
pub trait FeedBackend: Send + Sync + 'static {
    fn op(&self, op: FeedOp) -> BoxFuture<'_, Result<FeedResult>>;
}

/// Starts one wire operation on a running feed: its message is sent now (so one connection's
/// operations reach the feed in the order they arrived), and the returned future awaits the
/// answer. The embedded backend and the server use it.
pub fn start_op(rt: &FeedRuntime, op: FeedOp) -> BoxFuture<'static, Result<FeedResult>> {
    fn map<T: Send + 'static>(
        f: heapgrid_actors::feed::runtime::BoxFuture<Result<T>>,
        to: impl FnOnce(T) -> FeedResult + Send + 'static,
    ) -> BoxFuture<'static, Result<FeedResult>> {
        Box::pin(async move { f.await.map(to) })
    }
    match op {
        FeedOp::Append { value, id } => map(rt.append(value, id), |a| FeedResult::Appended { id: a.id }),
        FeedOp::Get { id } => map(rt.get(id), FeedResult::Record),
        FeedOp::Remove { id } => map(rt.remove(id), |_| FeedResult::Done),
        FeedOp::Read { after, n, wait_ms } => map(rt.read(after, n, wait_ms), FeedResult::Records),
        FeedOp::ReadBack { before, n } => map(rt.read_back(before, n), FeedResult::Records),
        FeedOp::CursorSet { name, at } => map(rt.cursor_set(&name, at), FeedResult::Cursor),
        FeedOp::CursorGet { name } => map(rt.cursor_get(&name), FeedResult::Cursor),
        FeedOp::CursorRead { name, n, wait_ms } => {
            map(rt.cursor_read(&name, n, wait_ms), FeedResult::Records)
        }
        FeedOp::CursorDelete { name } => map(rt.cursor_delete(&name), FeedResult::Bool),
        FeedOp::Cursors => map(rt.cursors(), FeedResult::Cursors),
        FeedOp::Trim { keep } => map(rt.trim(keep), FeedResult::Count),
        FeedOp::Cut { before } => map(rt.cut(before), FeedResult::Count),
        FeedOp::Rotate => map(rt.rotate(), |_| FeedResult::Done),
        FeedOp::SetVersion { version } => map(rt.set_version(version), |_| FeedResult::Done),
        FeedOp::Info => map(rt.info(), FeedResult::Info),
        FeedOp::AppendFenced { value, id, fences } => {
            map(rt.append_fenced(value, id, fences), |a| FeedResult::Appended { id: a.id })
        }
    }
}

impl FeedBackend for FeedRuntime {
    fn op(&self, op: FeedOp) -> BoxFuture<'_, Result<FeedResult>> {
        start_op(self, op)
    }
}

fn unexpected(r: FeedResult) -> GridError {
    GridError::Protocol(format!("a feed operation was answered with {r:?}"))
}

/// Longest one `follow` request waits before asking again (below the client's request timeout).
const FOLLOW_WAIT_MS: u64 = 10_000;
/// Records one `follow` request asks for.
const FOLLOW_BATCH: u32 = 1000;

/// A handle to one feed; cheap to clone and to share between tasks.
#[derive(Clone)]
pub struct Feed {
    backend: Arc<dyn FeedBackend>,
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Feed")
    }
}

impl Feed {
    /// A handle over any backend.
    pub fn over(backend: Arc<dyn FeedBackend>) -> Feed {
        Feed { backend }
    }

    async fn op(&self, op: FeedOp) -> Result<FeedResult> {
        self.backend.op(op).await
    }

    /// Appends `value` at the top; returns its id.
    pub async fn append(&self, value: impl Into<Value>) -> Result<u64> {
        self.append_at(None, value.into()).await
    }

    /// Appends a serde value at the top.
    pub async fn append_typed<T: Serialize + ?Sized>(&self, value: &T) -> Result<u64> {
        self.append_at(None, Value::from_serde(value).map_err(|e| GridError::Value(e.to_string()))?).await
    }

    /// Appends with the caller's id (at least the feed's next id). An id that exists is
    /// `IdExists`, unless it holds exactly `value`: then this is a successful retry.
    pub async fn append_with_id(&self, id: u64, value: impl Into<Value>) -> Result<u64> {
        self.append_at(Some(id), value.into()).await
    }

    /// Appends `value` only if every guard's fence is its lock's current grant (else
    /// `StaleFence`, nothing appended); returns the new id.
    pub async fn append_fenced(
        &self,
        value: impl Into<Value>,
        guards: &[&crate::lock::LockGuard],
    ) -> Result<u64> {
        let fences = guards.iter().map(|g| (g.lock_name().to_string(), g.fence())).collect();
        match self.op(FeedOp::AppendFenced { value: value.into(), id: None, fences }).await? {
            FeedResult::Appended { id } => Ok(id),
            r => Err(unexpected(r)),
        }
    }

    async fn append_at(&self, id: Option<u64>, value: Value) -> Result<u64> {
        match self.op(FeedOp::Append { value, id }).await? {
            FeedResult::Appended { id } => Ok(id),
            r => Err(unexpected(r)),
        }
    }

    /// Record `id`, with its neighbours and version.
    pub async fn get(&self, id: u64) -> Result<Option<FeedRecord>> {
        match self.op(FeedOp::Get { id }).await? {
            FeedResult::Record(r) => Ok(r),
            r => Err(unexpected(r)),
        }
    }

    /// Unlinks and deletes record `id` (`NoSuchRecord` if it is not there).
    pub async fn remove(&self, id: u64) -> Result<()> {
        match self.op(FeedOp::Remove { id }).await? {
            FeedResult::Done => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    /// At most `n` records after `after`, oldest first, and the position to continue from.
    pub async fn read(&self, after: Pos, n: u32) -> Result<ReadResult> {
        self.read_wait(after, n, 0).await
    }

    /// `read`, waiting up to `wait_ms` for a first record if there is none yet.
    pub async fn read_wait(&self, after: Pos, n: u32, wait_ms: u64) -> Result<ReadResult> {
        match self.op(FeedOp::Read { after, n, wait_ms }).await? {
            FeedResult::Records(r) => Ok(r),
            r => Err(unexpected(r)),
        }
    }

    /// At most `n` records below `before` (`None`: from the top), newest first.
    pub async fn read_back(&self, before: Option<u64>, n: u32) -> Result<ReadResult> {
        match self.op(FeedOp::ReadBack { before, n }).await? {
            FeedResult::Records(r) => Ok(r),
            r => Err(unexpected(r)),
        }
    }

    /// The newest `n` records, newest first (KVS `entries`).
    pub async fn entries(&self, n: u32) -> Result<Vec<FeedRecord>> {
        Ok(self.read_back(None, n).await?.records)
    }

    /// Folds over at most `n` records from `from` (inclusive) forwards (`newer`) or backwards.
    pub async fn fold<A>(
        &self,
        from: u64,
        n: u64,
        newer: bool,
        init: A,
        mut f: impl FnMut(A, &FeedRecord) -> A,
    ) -> Result<A> {
        let mut acc = init;
        let mut left = n;
        let mut at = if newer { from.saturating_sub(1) } else { from.saturating_add(1) };
        while left > 0 {
            let want = left.min(FOLLOW_BATCH as u64) as u32;
            let page = if newer {
                self.read(Pos::After(at), want).await?
            } else {
                self.read_back(Some(at), want).await?
            };
            if page.records.is_empty() {
                break;
            }
            for r in &page.records {
                acc = f(acc, r);
            }
            left -= page.records.len() as u64;
            at = page.next;
        }
        Ok(acc)
    }

    /// Every record after `after`, then each new one as it is appended: a stream that waits in
    /// the feed (no polling). Ends with the error if one occurs (`Trimmed` if retention passes
    /// the position).
    pub fn follow(&self, after: Pos) -> impl Stream<Item = Result<FeedRecord>> + Send + 'static {
        struct St {
            feed: Feed,
            at: Pos,
            buf: std::collections::VecDeque<FeedRecord>,
            done: bool,
        }
        let st = St { feed: self.clone(), at: after, buf: Default::default(), done: false };
        futures_util::stream::unfold(st, |mut st| async move {
            loop {
                if let Some(r) = st.buf.pop_front() {
                    return Some((Ok(r), st));
                }
                if st.done {
                    return None;
                }
                match st.feed.read_wait(st.at, FOLLOW_BATCH, FOLLOW_WAIT_MS).await {
                    Ok(page) => {
                        st.at = Pos::After(page.next);
                        st.buf.extend(page.records);
                    }
                    Err(e) => {
                        st.done = true;
                        return Some((Err(e), st));
                    }
                }
            }
        })
    }

    /// Sets (creating) the named cursor at `at` (`End`: the top now).
    pub async fn cursor_set(&self, name: &str, at: Pos) -> Result<CursorInfo> {
        match self.op(FeedOp::CursorSet { name: name.into(), at }).await? {
            FeedResult::Cursor(c) => Ok(c),
            r => Err(unexpected(r)),
        }
    }

    /// The named cursor's position and lag.
    pub async fn cursor_get(&self, name: &str) -> Result<CursorInfo> {
        match self.op(FeedOp::CursorGet { name: name.into() }).await? {
            FeedResult::Cursor(c) => Ok(c),
            r => Err(unexpected(r)),
        }
    }

    /// Reads at most `n` records after the named cursor and moves it past them, atomically;
    /// waits up to `wait_ms` for a first record.
    pub async fn cursor_read(&self, name: &str, n: u32, wait_ms: u64) -> Result<ReadResult> {
        match self.op(FeedOp::CursorRead { name: name.into(), n, wait_ms }).await? {
            FeedResult::Records(r) => Ok(r),
            r => Err(unexpected(r)),
        }
    }

    /// Deletes the named cursor; whether it existed.
    pub async fn cursor_delete(&self, name: &str) -> Result<bool> {
        match self.op(FeedOp::CursorDelete { name: name.into() }).await? {
            FeedResult::Bool(b) => Ok(b),
            r => Err(unexpected(r)),
        }
    }

    /// Every cursor with its position and lag.
    pub async fn cursors(&self) -> Result<Vec<CursorInfo>> {
        match self.op(FeedOp::Cursors).await? {
            FeedResult::Cursors(c) => Ok(c),
            r => Err(unexpected(r)),
        }
    }

    /// Keeps the newest `keep` records; returns how many were dropped.
    pub async fn trim(&self, keep: u64) -> Result<u64> {
        match self.op(FeedOp::Trim { keep }).await? {
            FeedResult::Count(n) => Ok(n),
            r => Err(unexpected(r)),
        }
    }

    /// Drops every record below `before`; returns how many were dropped.
    pub async fn cut(&self, before: u64) -> Result<u64> {
        match self.op(FeedOp::Cut { before }).await? {
            FeedResult::Count(n) => Ok(n),
            r => Err(unexpected(r)),
        }
    }

    /// Seals the open segment now.
    pub async fn rotate(&self) -> Result<()> {
        match self.op(FeedOp::Rotate).await? {
            FeedResult::Done => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    /// Changes the schema version new records are appended under (starts a new segment).
    pub async fn set_version(&self, version: u32) -> Result<()> {
        match self.op(FeedOp::SetVersion { version }).await? {
            FeedResult::Done => Ok(()),
            r => Err(unexpected(r)),
        }
    }

    /// The feed's options, container and segments.
    pub async fn info(&self) -> Result<FeedInfo> {
        match self.op(FeedOp::Info).await? {
            FeedResult::Info(i) => Ok(i),
            r => Err(unexpected(r)),
        }
    }

    /// Records in the feed.
    pub async fn len(&self) -> Result<u64> {
        Ok(self.info().await?.state.count)
    }

    pub async fn is_empty(&self) -> Result<bool> {
        Ok(self.len().await? == 0)
    }

    /// A KVS-style reader positioned before the oldest record.
    pub fn reader(&self) -> Reader {
        Reader { feed: self.clone(), at: 0 }
    }
}

/// A movable position in a feed (KVS's reader): `top`/`bottom`, `next`/`prev`, `take`/`skip`,
/// and `save` as a named cursor (`Reader::resume` loads one).
#[derive(Clone)]
pub struct Reader {
    feed: Feed,
    /// The id the reader is on (0: before the oldest record).
    at: u64,
}

impl Reader {
    /// The id the reader is on (0: before the oldest).
    pub fn position(&self) -> u64 {
        self.at
    }

    /// To the newest record.
    pub async fn top(&mut self) -> Result<u64> {
        self.at = self.feed.info().await?.state.top;
        Ok(self.at)
    }

    /// Before the oldest record (the next `next` returns it).
    pub async fn bottom(&mut self) -> Result<u64> {
        let s = self.feed.info().await?.state;
        self.at = if s.bottom == 0 { 0 } else { s.bottom - 1 };
        Ok(self.at)
    }

    /// The next newer record, moving onto it.
    pub async fn next(&mut self) -> Result<Option<FeedRecord>> {
        let page = self.feed.read(Pos::After(self.at), 1).await?;
        self.at = page.next;
        Ok(page.records.into_iter().next())
    }

    /// The next older record, moving onto it.
    pub async fn prev(&mut self) -> Result<Option<FeedRecord>> {
        let page = self.feed.read_back(Some(self.at), 1).await?;
        let r = page.records.into_iter().next();
        if let Some(r) = &r {
            self.at = r.id;
        }
        Ok(r)
    }

    /// The next `n` newer records, moving past them.
    pub async fn take(&mut self, n: u32) -> Result<Vec<FeedRecord>> {
        let page = self.feed.read(Pos::After(self.at), n).await?;
        self.at = page.next;
        Ok(page.records)
    }

    /// Moves past `n` records without returning them.
    pub async fn skip(&mut self, n: u32) -> Result<()> {
        self.take(n).await.map(|_| ())
    }

    /// Saves the position as the named cursor.
    pub async fn save(&self, name: &str) -> Result<CursorInfo> {
        self.feed.cursor_set(name, Pos::After(self.at)).await
    }

    /// A reader at the named cursor's position.
    pub async fn resume(feed: &Feed, name: &str) -> Result<Reader> {
        Ok(Reader { feed: feed.clone(), at: feed.cursor_get(name).await?.position })
    }
}

/// Upgrade steps between schema versions: `step(v, f)` turns a version-`v` value into a
/// version-`v + 1` one. A record is read as the newest type by applying every step from its
/// version on.
pub struct Upgrades<T> {
    steps: BTreeMap<u32, Box<dyn Fn(Value) -> Result<Value> + Send + Sync>>,
    latest: u32,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> Upgrades<T> {
    /// Records of version `latest` are `T` as they are.
    pub fn new(latest: u32) -> Self {
        Upgrades { steps: BTreeMap::new(), latest, _t: std::marker::PhantomData }
    }

    /// Registers the step from version `from` to `from + 1`.
    pub fn step(mut self, from: u32, f: impl Fn(Value) -> Result<Value> + Send + Sync + 'static) -> Self {
        self.steps.insert(from, Box::new(f));
        self
    }

    /// A record's value as `T`: upgraded step by step from its version to `latest`.
    pub fn read(&self, record: &FeedRecord) -> Result<T> {
        if record.version > self.latest {
            return Err(GridError::Value(format!(
                "record {} has version {}, newer than this reader's {}",
                record.id, record.version, self.latest
            )));
        }
        let mut v = record.value.clone();
        for from in record.version..self.latest {
            let step = self.steps.get(&from).ok_or_else(|| {
                GridError::Value(format!("no upgrade step from version {from} (record {})", record.id))
            })?;
            v = step(v)?;
        }
        v.to_serde::<T>().map_err(|e| GridError::Value(format!("record {}: {e}", record.id)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Deserialize)]
    struct V3 {
        name: String,
        email: String,
        age: i64,
    }

    #[test]
    fn upgrades_apply_every_step_from_a_records_version() {
        let up = Upgrades::<V3>::new(3)
            .step(1, |v| {
                // v1 {"n": name} -> v2 {"name": name, "email": ""}
                let Value::Map(mut m) = v else { return Err(GridError::Value("not a map".into())) };
                let name = m.shift_remove("n").unwrap_or(Value::Null);
                m.insert("name".into(), name);
                m.insert("email".into(), Value::Str(String::new()));
                Ok(Value::Map(m))
            })
            .step(2, |v| {
                let Value::Map(mut m) = v else { return Err(GridError::Value("not a map".into())) };
                m.insert("age".into(), Value::Int(0));
                Ok(Value::Map(m))
            });
        let rec = |version, json: serde_json::Value| FeedRecord {
            id: 1,
            prev: 0,
            next: 0,
            version,
            value: Value::from_json(&json).unwrap(),
        };
        let want = V3 { name: "ann".into(), email: "".into(), age: 0 };
        assert_eq!(up.read(&rec(1, serde_json::json!({"n": "ann"}))).unwrap(), want);
        assert_eq!(up.read(&rec(2, serde_json::json!({"name": "ann", "email": ""}))).unwrap(), want);
        let v3 = up.read(&rec(3, serde_json::json!({"name": "bo", "email": "b@x", "age": 3}))).unwrap();
        assert_eq!(v3, V3 { name: "bo".into(), email: "b@x".into(), age: 3 });
        assert!(matches!(up.read(&rec(4, serde_json::json!({}))), Err(GridError::Value(_))));
        let missing = Upgrades::<V3>::new(3).step(2, Ok);
        assert!(matches!(missing.read(&rec(1, serde_json::json!({}))), Err(GridError::Value(_))));
    }
}
