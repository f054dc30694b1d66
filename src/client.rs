//! The network client: `Client::connect(addr)` gives the same `Table` handles as the embedded
//! `Grid`. One TCP connection carries many tasks' requests at once (pipelined, matched by id);
//! if it breaks, the requests in flight fail with `GridError::Unavailable` and the next request
//! reconnects with exponential backoff.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use heapgrid_actors::grid::{TableInfo, TableOptions};
use heapgrid_actors::snippet::LimitOverrides;
use heapgrid_actors::{EvalRequest, GridError, Key, ScanRange, Value, Versioned, WriteOp, WriteResult};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::feed::{Feed, FeedBackend, FeedInfo, FeedOp, FeedOptions, FeedResult};
use crate::grid::{BoxFuture, Table, TableBackend};
use crate::protocol::{
    self, Hello, HelloReply, MAGIC, OpResult, PROTOCOL_VERSION, Request, RequestBody, Response, ResponseBody,
    TableOp,
};

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Auth token, if the server wants one.
    pub token: Option<String>,
    /// How long one request may take, from sending to its response.
    pub request_timeout: Duration,
    /// How many times a request tries to (re)connect before failing.
    pub connect_attempts: u32,
    /// First backoff between connection attempts; doubles up to one second.
    pub backoff: Duration,
    /// Where a table's `get` is answered in a cluster (docs/cluster.md, "Reads").
    pub read_from: ReadFrom,
    /// Whether a request for a shard that is recovering after a restart waits for its replay
    /// (`true`, the default) or fails at once with `GridError::Recovering` and its progress.
    pub wait_for_recovery: bool,
}

/// Where a cluster answers reads of one key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReadFrom {
    /// The key's primary: every acknowledged write is seen.
    #[default]
    Primary,
    /// The primary or an in-sync replica of the key's shard (a `ClusterClient` picks one at
    /// random; a server a client reached answers from its own copy when it holds an in-sync
    /// one): spreads reads, but may miss writes acknowledged moments before.
    Replica,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            token: None,
            request_timeout: Duration::from_secs(30),
            connect_attempts: 5,
            backoff: Duration::from_millis(20),
            read_from: ReadFrom::Primary,
            wait_for_recovery: true,
        }
    }
}

/// Longest a connection attempt (TCP connect + handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Socket read buffer, and the most request bytes gathered into one write.
const IO_BUFFER_BYTES: usize = 64 * 1024;

/// Requests awaiting responses; `None` once the connection's reader has ended, so a request can
/// never be registered on a dead connection after its waiters were failed.
type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Result<ResponseBody, GridError>>>>>>;

/// One live connection: a writer queue and the map of requests awaiting responses.
struct Conn {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    pending: Pending,
}

impl Conn {
    /// False once the reader ended (it closes `pending`) or the writer did.
    fn is_alive(&self) -> bool {
        !self.tx.is_closed() && self.pending.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }
}

struct Inner {
    addr: SocketAddr,
    opts: ClientOptions,
    /// The live connection; read on every request under a short std lock (no await inside).
    conn: Mutex<Option<Arc<Conn>>>,
    /// Held only while (re)connecting, so one task connects and the others wait for it.
    connecting: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
}

/// A connection to a heapgrid server; cheap to clone and share between tasks.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

fn fail_all(pending: &Pending, why: &str) {
    let waiting = pending.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
    for (_, tx) in waiting {
        let _ = tx.send(Err(GridError::Unavailable(why.into())));
    }
}

async fn open_conn(addr: SocketAddr, opts: &ClientOptions) -> Result<Arc<Conn>, GridError> {
    let token = opts.token.clone();
    let sock =
        TcpStream::connect(addr).await.map_err(|e| GridError::Unavailable(format!("connect {addr}: {e}")))?;
    let _ = sock.set_nodelay(true);
    let (rd, mut wr) = sock.into_split();
    let mut rd = tokio::io::BufReader::with_capacity(IO_BUFFER_BYTES, rd);
    let hello = Hello { magic: MAGIC, version: PROTOCOL_VERSION, token };
    protocol::write_msg(&mut wr, &hello).await.map_err(|e| GridError::Unavailable(e.to_string()))?;
    let mut buf = Vec::new();
    protocol::read_frame(&mut rd, &mut buf)
        .await
        .map_err(|e| GridError::Unavailable(format!("handshake: {e}")))?;
    match protocol::decode::<HelloReply>(&buf).map_err(|e| GridError::Protocol(e.to_string()))? {
        HelloReply::Welcome { .. } => {}
        HelloReply::Refused { error } => return Err(error),
    }
    if !opts.wait_for_recovery {
        // Set before any request of the caller's, answered before the connection is handed out.
        let set = Request { id: u64::MAX, body: RequestBody::SetSession { wait_for_recovery: false } };
        protocol::write_msg(&mut wr, &set).await.map_err(|e| GridError::Unavailable(e.to_string()))?;
        protocol::read_frame(&mut rd, &mut buf)
            .await
            .map_err(|e| GridError::Unavailable(format!("session settings: {e}")))?;
        let r: Response = protocol::decode(&buf).map_err(|e| GridError::Protocol(e.to_string()))?;
        r.result?;
    }
    let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::spawn(async move {
        let mut out = Vec::with_capacity(IO_BUFFER_BYTES);
        while let Some(frame) = rx.recv().await {
            // Gather every request that is ready into one write (pipelining).
            out.clear();
            out.extend_from_slice(&frame);
            while out.len() < IO_BUFFER_BYTES {
                match rx.try_recv() {
                    Ok(more) => out.extend_from_slice(&more),
                    Err(_) => break,
                }
            }
            if wr.write_all(&out).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let p = pending.clone();
    tokio::spawn(async move {
        let mut buf = Vec::new();
        let why = loop {
            if let Err(e) = protocol::read_frame(&mut rd, &mut buf).await {
                break format!("connection lost: {e}");
            }
            let resp: Response = match protocol::decode(&buf) {
                Ok(r) => r,
                Err(e) => break format!("undecodable response: {e}"),
            };
            if resp.id == 0 {
                break format!("server closed the connection: {:?}", resp.result.err());
            }
            let waiter =
                p.lock().unwrap_or_else(|e| e.into_inner()).as_mut().and_then(|m| m.remove(&resp.id));
            if let Some(waiter) = waiter {
                let _ = waiter.send(resp.result);
            }
        };
        fail_all(&p, &why);
        writer.abort();
    });
    Ok(Arc::new(Conn { tx, pending }))
}

impl Client {
    /// Connects (with backoff) and performs the handshake.
    pub async fn connect(addr: SocketAddr) -> Result<Client, GridError> {
        Client::connect_with(addr, ClientOptions::default()).await
    }

    /// Connects with options (token, timeouts, backoff).
    pub async fn connect_with(addr: SocketAddr, opts: ClientOptions) -> Result<Client, GridError> {
        let c = Client {
            inner: Arc::new(Inner {
                addr,
                opts,
                conn: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                next_id: AtomicU64::new(1),
            }),
        };
        c.conn().await?;
        Ok(c)
    }

    fn live_conn(&self) -> Option<Arc<Conn>> {
        self.inner.conn.lock().unwrap_or_else(|e| e.into_inner()).as_ref().filter(|c| c.is_alive()).cloned()
    }

    /// The live connection, reconnecting if needed.
    async fn conn(&self) -> Result<Arc<Conn>, GridError> {
        if let Some(c) = self.live_conn() {
            return Ok(c);
        }
        let _connecting = self.inner.connecting.lock().await;
        // Another task may have connected while this one waited.
        if let Some(c) = self.live_conn() {
            return Ok(c);
        }
        let mut backoff = self.inner.opts.backoff;
        let mut last = GridError::Unavailable("no connection attempt".into());
        for attempt in 0..self.inner.opts.connect_attempts.max(1) {
            if attempt > 0 {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            let opened = tokio::time::timeout(CONNECT_TIMEOUT, open_conn(self.inner.addr, &self.inner.opts))
                .await
                .unwrap_or_else(|_| {
                    Err(GridError::Unavailable(format!("connecting to {} timed out", self.inner.addr)))
                });
            match opened {
                Ok(c) => {
                    *self.inner.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
                    return Ok(c);
                }
                // A refusal (bad token, wrong version) will not change by retrying.
                Err(e @ (GridError::Unauthenticated(_) | GridError::Protocol(_))) => return Err(e),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Sends one request and waits for its response.
    pub async fn request(&self, body: RequestBody) -> Result<ResponseBody, GridError> {
        let conn = self.conn().await?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = protocol::encode(&Request { id, body }).map_err(|e| GridError::Invalid(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        match conn.pending.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            Some(m) => m.insert(id, tx),
            None => return Err(GridError::Unavailable("connection lost before sending".into())),
        };
        if conn.tx.send(frame).is_err() {
            if let Some(m) = conn.pending.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                m.remove(&id);
            }
            return Err(GridError::Unavailable("connection lost before sending".into()));
        }
        match tokio::time::timeout(self.inner.opts.request_timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(GridError::Unavailable("connection lost".into())),
            Err(_) => {
                if let Some(m) = conn.pending.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                    m.remove(&id);
                }
                Err(GridError::Unavailable(format!(
                    "no response within {:?} (a write may or may not have applied)",
                    self.inner.opts.request_timeout
                )))
            }
        }
    }

    /// Round trip without touching data.
    pub async fn ping(&self) -> Result<(), GridError> {
        match self.request(RequestBody::Ping).await? {
            ResponseBody::Pong => Ok(()),
            r => Err(GridError::Protocol(format!("unexpected {r:?}"))),
        }
    }

    /// Tables this token may read.
    pub async fn tables(&self) -> Result<Vec<TableInfo>, GridError> {
        match self.request(RequestBody::ListTables).await? {
            ResponseBody::Tables(t) => Ok(t),
            r => Err(GridError::Protocol(format!("unexpected {r:?}"))),
        }
    }

    /// Creates a table (needs `admin` on it).
    pub async fn create_table(&self, name: &str, options: TableOptions) -> Result<Table, GridError> {
        match self.request(RequestBody::CreateTable { name: name.into(), options }).await? {
            ResponseBody::Done => Ok(self.table(name)),
            r => Err(GridError::Protocol(format!("unexpected {r:?}"))),
        }
    }

    /// Drops a table (needs `admin` on it).
    pub async fn drop_table(&self, name: &str) -> Result<(), GridError> {
        match self.request(RequestBody::DropTable { name: name.into() }).await? {
            ResponseBody::Done => Ok(()),
            r => Err(GridError::Protocol(format!("unexpected {r:?}"))),
        }
    }

    /// Runs a grid-scoped snippet (see `Grid::eval`).
    pub async fn eval(&self, src: &str) -> Result<Value, GridError> {
        self.eval_with(src, Value::Null, LimitOverrides::default()).await
    }

    /// `eval` with arguments (the snippet's `args`) and budget overrides (capped by the
    /// server's maximums).
    pub async fn eval_with(
        &self,
        src: &str,
        args: Value,
        limits: LimitOverrides,
    ) -> Result<Value, GridError> {
        Ok(self.eval_output(src, args, limits).await?.0)
    }

    /// `eval_with` that also returns what the snippet printed (`print()`; empty if nothing).
    pub async fn eval_output(
        &self,
        src: &str,
        args: Value,
        limits: LimitOverrides,
    ) -> Result<(Value, String), GridError> {
        printed(self.request(RequestBody::Eval { src: src.into(), args, limits }).await?)
    }

    /// `eval_fenced` that also returns what the snippet printed.
    pub async fn eval_fenced_output(
        &self,
        src: &str,
        args: Value,
        guards: &[&crate::lock::LockGuard],
    ) -> Result<(Value, String), GridError> {
        let fences = guards.iter().map(|g| (g.lock_name().to_string(), g.fence())).collect();
        let body =
            RequestBody::EvalFenced { src: src.into(), args, limits: LimitOverrides::default(), fences };
        printed(self.request(body).await?)
    }

    /// A grid-scoped snippet whose writes are fenced by `guards` (see `Grid::eval_fenced`).
    pub async fn eval_fenced(
        &self,
        src: &str,
        args: Value,
        guards: &[&crate::lock::LockGuard],
    ) -> Result<Value, GridError> {
        Ok(self.eval_fenced_output(src, args, guards).await?.0)
    }

    /// Entries `offset..offset+limit` of the value a `$ref` names.
    pub async fn fetch(&self, reference: &str, offset: u32, limit: u32) -> Result<Value, GridError> {
        match self.request(RequestBody::Fetch { reference: reference.into(), offset, limit }).await? {
            ResponseBody::Value(v) => Ok(v),
            r => Err(GridError::Protocol(format!("unexpected {r:?}"))),
        }
    }

    /// Stores (or replaces) a module of procedures snippets can call.
    pub async fn put_procedures(&self, module: &str, src: &str) -> Result<(), GridError> {
        match self.request(RequestBody::PutProcedures { module: module.into(), src: src.into() }).await? {
            ResponseBody::Done => Ok(()),
            r => Err(GridError::Protocol(format!("unexpected {r:?}"))),
        }
    }

    /// Removes a module of procedures.
    pub async fn drop_procedures(&self, module: &str) -> Result<(), GridError> {
        match self.request(RequestBody::DropProcedures { module: module.into() }).await? {
            ResponseBody::Done => Ok(()),
            r => Err(GridError::Protocol(format!("unexpected {r:?}"))),
        }
    }

    /// A request about the cluster (docs/cluster.md): `read` on `cluster` to look, `admin` to
    /// change. A node on its own answers `Invalid`.
    pub async fn cluster(
        &self,
        op: heapgrid_actors::cluster::ops::ClusterOp,
    ) -> Result<heapgrid_actors::cluster::ops::ClusterResult, GridError> {
        match self.request(RequestBody::Cluster { op }).await? {
            ResponseBody::Cluster(c) => Ok(c),
            r => Err(GridError::Protocol(format!("unexpected {r:?}"))),
        }
    }

    /// The node's memory (resident anonymous and file-backed bytes) and every heap's figures
    /// (pages, file and log bytes, bytes resident), for the collections this token may read.
    pub async fn stats(&self) -> Result<heapgrid_actors::stats::NodeStats, GridError> {
        match self.request(RequestBody::Stats).await? {
            ResponseBody::Stats(s) => Ok(s),
            r => Err(GridError::Protocol(format!("unexpected {r:?}"))),
        }
    }

    /// The server's slow log, newest first: requests that took at least its threshold
    /// (`serve --slowlog-threshold-ms`); `clear` empties it. Needs admin on `server`.
    pub async fn slowlog(&self, clear: bool) -> Result<Vec<crate::metrics::SlowEntry>, GridError> {
        match self.request(RequestBody::SlowLog { clear }).await? {
            ResponseBody::SlowLog(v) => Ok(v),
            r => Err(GridError::Protocol(format!("unexpected {r:?}"))),
        }
    }

    /// What the node knows of the cluster: its Raft group and the map.
    pub async fn cluster_status(&self) -> Result<heapgrid_actors::cluster::raft::ClusterStatus, GridError> {
        use heapgrid_actors::cluster::ops::{ClusterOp, ClusterResult};
        match self.cluster(ClusterOp::Status).await? {
            ClusterResult::Status(s) => Ok(s),
            r => Err(GridError::Protocol(format!("unexpected {r:?}"))),
        }
    }

    /// Feeds this token may read, with their containers.
    pub async fn feeds(&self) -> Result<Vec<FeedInfo>, GridError> {
        match self.request(RequestBody::ListFeeds).await? {
            ResponseBody::Feeds(f) => Ok(f),
            r => Err(GridError::Protocol(format!("unexpected {r:?}"))),
        }
    }

    /// Creates a feed (needs `admin` on its name).
    pub async fn create_feed(&self, name: &str, options: FeedOptions) -> Result<Feed, GridError> {
        match self.request(RequestBody::CreateFeed { name: name.into(), options }).await? {
            ResponseBody::Done => Ok(self.feed(name)),
            r => Err(GridError::Protocol(format!("unexpected {r:?}"))),
        }
    }

    /// Drops a feed (needs `admin` on its name).
    pub async fn drop_feed(&self, name: &str) -> Result<(), GridError> {
        match self.request(RequestBody::DropFeed { name: name.into() }).await? {
            ResponseBody::Done => Ok(()),
            r => Err(GridError::Protocol(format!("unexpected {r:?}"))),
        }
    }

    /// A handle to a feed on the server: the same `Feed` type as the embedded grid's.
    pub fn feed(&self, name: &str) -> Feed {
        Feed::over(Arc::new(RemoteFeed { client: self.clone(), name: name.into() }))
    }

    /// A handle to a table on the server: the same `Table` type as the embedded grid's.
    pub fn table(&self, name: &str) -> Table {
        Table::over(Arc::new(RemoteTable::new(self.clone(), name)))
    }
}

struct RemoteFeed {
    client: Client,
    name: String,
}

/// The lock service behind a client's connection.
struct RemoteLocks(Client);

impl crate::lock::LockBackend for RemoteLocks {
    fn lock_op(
        &self,
        op: crate::lock::LockOp,
    ) -> BoxFuture<'static, Result<crate::lock::LockResult, GridError>> {
        let client = self.0.clone();
        Box::pin(async move {
            match client.request(RequestBody::Lock { op }).await? {
                ResponseBody::Lock(r) => Ok(r),
                r => Err(GridError::Protocol(format!("a lock request was answered with {r:?}"))),
            }
        })
    }
}

/// The queue service behind a client's connection.
struct RemoteQueues(Client);

impl crate::queue::QueueBackend for RemoteQueues {
    fn queue_op(
        &self,
        op: crate::queue::QueueOp,
    ) -> BoxFuture<'static, Result<crate::queue::QueueResult, GridError>> {
        let client = self.0.clone();
        Box::pin(async move {
            match client.request(RequestBody::Queue { op }).await? {
                ResponseBody::Queue(r) => Ok(r),
                r => Err(GridError::Protocol(format!("a queue request was answered with {r:?}"))),
            }
        })
    }
}

impl Client {
    /// A handle on queue `name` on the server (created with default options on first use).
    pub fn queue(&self, name: &str) -> crate::queue::Queue {
        crate::queue::Queue::new(Arc::new(RemoteQueues(self.clone())), name)
    }

    /// A request to the queue service as it is (the shell, tests).
    pub async fn queue_op(&self, op: crate::queue::QueueOp) -> Result<crate::queue::QueueResult, GridError> {
        crate::queue::QueueBackend::queue_op(&RemoteQueues(self.clone()), op).await
    }

    /// Opens a lock session (`ttl`: default 15 s) with its heartbeat on this connection.
    pub async fn session(&self, ttl: Option<std::time::Duration>) -> Result<crate::lock::Session, GridError> {
        crate::lock::Session::open(Arc::new(RemoteLocks(self.clone())), ttl).await
    }

    /// Takes up a session again with its id and secret (after a reconnect or a server
    /// restart, within its ttl): its grants are still its own.
    pub async fn reattach(&self, session: u64, secret: u64) -> Result<crate::lock::Session, GridError> {
        crate::lock::Session::reattach(Arc::new(RemoteLocks(self.clone())), session, secret).await
    }

    /// A request to the lock service as it is (the shell's `locks`, tests).
    pub async fn lock_op(&self, op: crate::lock::LockOp) -> Result<crate::lock::LockResult, GridError> {
        crate::lock::LockBackend::lock_op(&RemoteLocks(self.clone()), op).await
    }
}

impl FeedBackend for RemoteFeed {
    fn op(&self, op: FeedOp) -> BoxFuture<'_, Result<FeedResult, GridError>> {
        Box::pin(async move {
            match self.client.request(RequestBody::Feed { feed: self.name.clone(), op }).await? {
                ResponseBody::Feed(r) => Ok(r),
                r => Err(GridError::Protocol(format!("a feed operation was answered with {r:?}"))),
            }
        })
    }
}

/// Where a remote table's operations go: one server (`Client`), or the primary of each
/// operation's shard (`ClusterClient`).
pub(crate) trait OpRoute: Send + Sync + 'static {
    fn send<'a>(&'a self, table: &'a str, op: TableOp) -> BoxFuture<'a, Result<OpResult, GridError>>;
    /// Where gets are answered.
    fn read_from(&self) -> ReadFrom;
}

impl OpRoute for Client {
    fn send<'a>(&'a self, table: &'a str, op: TableOp) -> BoxFuture<'a, Result<OpResult, GridError>> {
        Box::pin(async move {
            match self.request(RequestBody::Table { table: table.into(), op }).await? {
                ResponseBody::Op(r) => Ok(r),
                r => Err(GridError::Protocol(format!("a table operation was answered with {r:?}"))),
            }
        })
    }

    fn read_from(&self) -> ReadFrom {
        self.inner.opts.read_from
    }
}

/// A table over the wire: each typed operation becomes one `TableOp` sent by `R`.
pub(crate) struct RemoteTable<R> {
    route: R,
    name: String,
}

impl<R: OpRoute> RemoteTable<R> {
    pub(crate) fn new(route: R, name: &str) -> RemoteTable<R> {
        RemoteTable { route, name: name.into() }
    }

    async fn op(&self, op: TableOp) -> Result<OpResult, GridError> {
        self.route.send(&self.name, op).await
    }
}

/// The server answered with another kind of result than the operation calls for.
fn unexpected(r: OpResult) -> GridError {
    GridError::Protocol(format!("unexpected answer {r:?}"))
}

fn one_result(r: OpResult) -> Result<WriteResult, GridError> {
    match r {
        OpResult::Written { mut results, .. } if results.len() == 1 => Ok(results.remove(0)),
        r => Err(unexpected(r)),
    }
}

impl<R: OpRoute> TableBackend for RemoteTable<R> {
    fn get(&self, key: Key) -> BoxFuture<'_, Result<Option<Versioned>, GridError>> {
        Box::pin(async move {
            let op = match self.route.read_from() {
                ReadFrom::Primary => TableOp::Get { key },
                ReadFrom::Replica => TableOp::GetCopy { key },
            };
            match self.op(op).await? {
                OpResult::Value(v) => Ok(v),
                r => Err(unexpected(r)),
            }
        })
    }

    fn contains(&self, key: Key) -> BoxFuture<'_, Result<bool, GridError>> {
        Box::pin(async move {
            match self.op(TableOp::Contains { key }).await? {
                OpResult::Bool(b) => Ok(b),
                r => Err(unexpected(r)),
            }
        })
    }

    fn count(&self) -> BoxFuture<'_, Result<u64, GridError>> {
        Box::pin(async move {
            match self.op(TableOp::Count).await? {
                OpResult::Count(n) => Ok(n),
                r => Err(unexpected(r)),
            }
        })
    }

    fn scan(&self, range: ScanRange) -> BoxFuture<'_, Result<Vec<(Key, Versioned)>, GridError>> {
        Box::pin(async move {
            let ScanRange { start, end, limit, reverse } = range;
            match self.op(TableOp::Scan { start, end, limit, reverse }).await? {
                OpResult::Entries(e) => Ok(e),
                r => Err(unexpected(r)),
            }
        })
    }

    fn write(&self, op: WriteOp) -> BoxFuture<'_, Result<WriteResult, GridError>> {
        Box::pin(async move { one_result(self.op(TableOp::Write(op)).await?) })
    }

    fn batch(&self, ops: Vec<WriteOp>) -> BoxFuture<'_, Result<Vec<WriteResult>, GridError>> {
        Box::pin(async move {
            match self.op(TableOp::Batch(ops)).await? {
                OpResult::Written { results, .. } => Ok(results),
                r => Err(unexpected(r)),
            }
        })
    }

    fn eval(&self, req: EvalRequest) -> BoxFuture<'_, Result<Value, GridError>> {
        Box::pin(async move {
            let EvalRequest { src, key, args, limits, read_only } = req;
            let req = protocol::EvalRequest { src, key, args, limits, read_only };
            match self.op(TableOp::Eval(req)).await? {
                OpResult::Snippet(v) => Ok(v),
                r => Err(unexpected(r)),
            }
        })
    }
}

/// A snippet's answer: its value and what it printed.
fn printed(r: ResponseBody) -> Result<(Value, String), GridError> {
    match r {
        ResponseBody::Value(v) => Ok((v, String::new())),
        ResponseBody::Printed { value, printed } => Ok((value, printed)),
        r => Err(GridError::Protocol(format!("unexpected {r:?}"))),
    }
}
