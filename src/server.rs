//! The TCP server behind `heapgrid serve`: accepts connections, runs the handshake (protocol
//! version, token), then serves pipelined requests concurrently up to a per-connection in-flight
//! limit, writing responses as they complete.
//!
//! Backpressure: with `inflight_max` requests of a connection running, the server stops reading
//! that socket, so a fast client fills its socket buffer instead of the server's memory; requests
//! answered at once (snapshot reads) stop the decoding when the output buffer holds
//! `IO_BUFFER_BYTES`, which is then written (with a client that does not read, the write times
//! out and the connection ends) before more is decoded.
//!
//! Graceful shutdown (`Server::shutdown`): stop accepting, let every connection finish the
//! requests it has read (no new ones are read), flush their responses, then return; the caller
//! then closes the grid, which checkpoints every shard.
//!
//! Invariant: a connection's failure (malformed frame, oversized frame, failed handshake, a peer
//! that disconnects mid-request) ends that connection only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use heapgrid_actors::cluster::map::{LOCKS_SERVICE, QUEUES_SERVICE};
use heapgrid_actors::grid::{AccessCheck, GridCore, TableRuntime};
use heapgrid_actors::heap::Snapshot;
use heapgrid_actors::limits::PIPELINE_OPS_MAX;
use heapgrid_actors::table::actor::{PipelineOp, PipelineReply, RawVersioned};
use heapgrid_actors::table::read;
use heapgrid_actors::{GridError, Key, ScanRange, Value, Versioned};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::auth::{Auth, Permission, Principal, TokenConfig};
use crate::feed::{FeedOp, FeedResult, start_op};
use crate::metrics::{InFlight, ServerMetrics};
use crate::protocol::{
    self, FrameError, Hello, HelloReply, MAGIC, OpResult, PROTOCOL_VERSION, Request, RequestBody, Response,
    ResponseBody, TableOp,
};
use heapgrid_actors::cluster::ops::{CLUSTER, ClusterOp, ClusterResult};
use heapgrid_actors::cluster::raft::Admin;
use heapgrid_actors::feed::actor::AppendReq;
use heapgrid_actors::feed::runtime::FeedRuntime;
use heapgrid_actors::lock::ops::{LockOp, LockResult};
use heapgrid_actors::queue::ops::{QueueOp, QueueOptions, QueueResult};

pub mod resp;

/// Default cap on connections served at once.
pub const CONNECTIONS_MAX_DEFAULT: usize = 10_000;
/// The name a token's permissions give the server's own state (the slow log): reading it
/// needs `admin` on `$server` (which `*` grants; no table can have the name).
pub const SERVER: &str = "$server";
/// Default requests in flight per connection.
pub const INFLIGHT_MAX_DEFAULT: usize = 256;
/// Socket read buffer, and the most response bytes gathered into one write.
const IO_BUFFER_BYTES: usize = 64 * 1024;
/// Largest `Hello` (it carries only a token).
const HELLO_BYTES_MAX: u32 = 4096;
/// A client that does not read its responses for this long is disconnected (so shutdown and
/// memory cannot be held hostage by it).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new connection has to send its `Hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default node-wide budget for connection buffers beyond each connection's own allowance.
pub const BUFFER_BUDGET_BYTES_DEFAULT: u64 = 1 << 30;
/// What a connection's input buffer may hold without drawing on the node-wide budget.
const CONN_BASE_BYTES: usize = 2 * IO_BUFFER_BYTES;
/// Default time a started frame has to arrive whole.
pub const FRAME_DEADLINE_DEFAULT: Duration = Duration::from_secs(30);

/// The node-wide budget for buffered input: every connection's buffer beyond `CONN_BASE_BYTES`
/// (a large frame arriving) is drawn from it, and given back when the frame is consumed. A
/// connection that cannot draw is closed with a reason, so many large half-sent frames cannot
/// take the server's memory.
pub struct BufferBudget {
    used: std::sync::atomic::AtomicU64,
    max: u64,
}

impl BufferBudget {
    pub fn new(max: u64) -> BufferBudget {
        BufferBudget { used: std::sync::atomic::AtomicU64::new(0), max }
    }

    /// Bytes drawn now.
    pub fn used(&self) -> u64 {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn take(&self, n: u64) -> bool {
        use std::sync::atomic::Ordering;
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|&t| t <= self.max)
            })
            .is_ok()
    }

    fn give(&self, n: u64) {
        let before = self.used.fetch_sub(n, std::sync::atomic::Ordering::AcqRel);
        assert!(before >= n, "buffer budget: gave back {n} of {before}");
    }
}

/// What every connection of a server is held to.
#[derive(Clone)]
struct ConnLimits {
    inflight: usize,
    budget: Arc<BufferBudget>,
    frame_deadline: Duration,
    metrics: Arc<ServerMetrics>,
}

/// Why a table request runs through `TableRuntime`'s routing rather than this node's round.
enum Elsewhere {
    /// A shard it needs is served by another node of the cluster.
    Runs(Arc<TableRuntime>),
    /// The cluster map has the table, and this node is still starting it (just created).
    Starting,
}

/// Whether `op` on `table` needs a shard another node serves: its key's shard (a single-key
/// request), any shard (count, scan, prefix); or the table is in the map but not started here.
fn elsewhere(grid: &GridCore, table: &str, op: &TableOp) -> Option<Elsewhere> {
    let node = grid.cluster()?;
    let Ok(rt) = grid.table(table) else {
        return node.has_table(table).then_some(Elsewhere::Starting);
    };
    let remote = match (op, op.routing_key()) {
        (TableOp::Count | TableOp::Scan { .. } | TableOp::Prefix { .. }, _) => {
            (0..rt.def.shards).any(|s| rt.primary_elsewhere(s).is_some())
        }
        (_, Some(key)) => rt.primary_elsewhere(rt.shard_of(key)).is_some(),
        // A keyless snippet needs a routing key on a sharded table (`plan` refuses it).
        (TableOp::Eval(_), None) if rt.def.shards > 1 => false,
        // No key: a one-shard table's snippet, or fences only (checked by shard 0).
        (_, None) => rt.primary_elsewhere(0).is_some(),
    };
    remote.then_some(Elsewhere::Runs(rt))
}

/// How long a request waits for a table the cluster map has to start on this node.
const TABLE_START_WAIT: Duration = Duration::from_secs(5);

/// `table`, once this node started it (`Elsewhere::Starting`).
async fn starting(grid: &GridCore, table: &str) -> Result<Arc<TableRuntime>, GridError> {
    let until = tokio::time::Instant::now() + TABLE_START_WAIT;
    loop {
        match grid.table(table) {
            Ok(rt) => return Ok(rt),
            Err(e) if tokio::time::Instant::now() >= until => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Runs a table request through `TableRuntime` (permissions checked), which sends each
/// shard's part to the node that serves it.
async fn run_routed(rt: Arc<TableRuntime>, op: TableOp) -> Result<ResponseBody, GridError> {
    Ok(ResponseBody::Op(match op {
        TableOp::Get { key } => OpResult::Value(rt.get(key).await?),
        TableOp::GetCopy { key } => OpResult::Value(rt.get_copy(key).await?),
        TableOp::Contains { key } => OpResult::Bool(rt.contains(key).await?),
        TableOp::Count => OpResult::Count(rt.count().await?),
        TableOp::Scan { start, end, limit, reverse } => {
            OpResult::Entries(rt.scan(ScanRange { start, end, limit, reverse }).await?)
        }
        TableOp::Prefix { prefix, limit, reverse } => {
            OpResult::Entries(rt.scan(ScanRange::prefix(&prefix, limit, reverse)).await?)
        }
        TableOp::Write(w) => {
            let (lsn, r) = rt.write(w).await?;
            OpResult::Written { lsn, results: vec![r] }
        }
        TableOp::Batch(ops) => {
            let w = rt.batch(ops).await?;
            OpResult::Written { lsn: w.lsn, results: w.results }
        }
        TableOp::Eval(req) => OpResult::Snippet(rt.eval(req.into()).await?),
    }))
}

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub inflight_max: usize,
    /// Connections served at once; more are refused with an error.
    pub connections_max: usize,
    pub tokens: Vec<TokenConfig>,
    /// Node-wide bytes of connection input buffers beyond each connection's 128 KiB.
    pub buffer_budget_bytes: u64,
    /// A frame that has started must arrive whole within this.
    pub frame_deadline: Duration,
    /// Where to answer Prometheus' scrapes (`None`: nowhere).
    pub metrics_listen: Option<SocketAddr>,
    /// Requests that take at least this long go to the slow log.
    pub slowlog_threshold: Duration,
    /// Where to speak RESP, Redis' protocol (`None`: nowhere); `server::resp`.
    pub resp_listen: Option<SocketAddr>,
    /// Where RESP keys live.
    pub resp: crate::resp::command::RespConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: ([127, 0, 0, 1], 7070).into(),
            inflight_max: INFLIGHT_MAX_DEFAULT,
            connections_max: CONNECTIONS_MAX_DEFAULT,
            tokens: Vec::new(),
            buffer_budget_bytes: BUFFER_BUDGET_BYTES_DEFAULT,
            frame_deadline: FRAME_DEADLINE_DEFAULT,
            metrics_listen: None,
            slowlog_threshold: crate::metrics::SLOWLOG_THRESHOLD_DEFAULT,
            resp_listen: None,
            resp: Default::default(),
        }
    }
}

/// A running server.
pub struct Server {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    budget: Arc<BufferBudget>,
    metrics: Arc<ServerMetrics>,
    metrics_addr: Option<SocketAddr>,
    resp_addr: Option<SocketAddr>,
}

impl Server {
    /// Binds and starts serving `grid`.
    pub async fn start(grid: Arc<GridCore>, cfg: ServerConfig) -> Result<Server, GridError> {
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = cfg.tokens.iter().find(|t| !seen.insert(t.token.as_str())) {
            let shown: String = dup.token.chars().take(4).collect();
            return Err(GridError::Invalid(format!("token {shown}... is configured twice")));
        }
        let auth = Arc::new(Auth::new(&cfg.tokens));
        if auth.is_trusted() && !cfg.listen.ip().is_loopback() {
            return Err(GridError::Invalid(format!(
                "no auth token is configured (trusted mode), so the server only listens on loopback, not {}",
                cfg.listen
            )));
        }
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| GridError::Storage(format!("bind {}: {e}", cfg.listen)))?;
        let local_addr = listener.local_addr().map_err(|e| GridError::Storage(e.to_string()))?;
        let metrics_listener = match cfg.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| GridError::Storage(format!("bind {addr} (metrics): {e}")))?,
            ),
            None => None,
        };
        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
        let resp = match cfg.resp_listen {
            Some(addr) => {
                if auth.is_trusted() && !addr.ip().is_loopback() {
                    return Err(GridError::Invalid(format!(
                        "no auth token is configured (trusted mode), so RESP only listens on loopback, not {addr}"
                    )));
                }
                let l = TcpListener::bind(addr)
                    .await
                    .map_err(|e| GridError::Storage(format!("bind {addr} (RESP): {e}")))?;
                let at = l.local_addr().map_err(|e| GridError::Storage(e.to_string()))?;
                // The keyspace's table, made now by the server's authority (a cluster makes it
                // through its map once it has a leader: then the first use waits for it).
                if grid.cluster().is_none()
                    && let Err(e) = resp::ensure_table(&grid, &cfg.resp).await
                {
                    return Err(GridError::Invalid(format!("RESP table {:?}: {e}", cfg.resp.table)));
                }
                Some((l, Arc::new(resp::RespShared::new(cfg.resp.clone(), at.port()))))
            }
            None => None,
        };
        let resp_addr = resp.as_ref().and_then(|(l, _)| l.local_addr().ok());
        let (stop, stop_rx) = watch::channel(false);
        let budget = Arc::new(BufferBudget::new(cfg.buffer_budget_bytes));
        let metrics = Arc::new(ServerMetrics::default());
        metrics.set_slow_threshold(cfg.slowlog_threshold);
        if let Some(l) = metrics_listener {
            tokio::spawn(crate::metrics::serve_http(l, grid.clone(), metrics.clone(), stop_rx.clone()));
        }
        let limits = ConnLimits {
            inflight: cfg.inflight_max.max(1),
            budget: budget.clone(),
            frame_deadline: cfg.frame_deadline,
            metrics: metrics.clone(),
        };
        let task = tokio::spawn(accept_loop(
            listener,
            resp,
            grid,
            auth,
            limits,
            cfg.connections_max.max(1),
            stop_rx,
        ));
        Ok(Server { local_addr, stop, task, budget, metrics, metrics_addr, resp_addr })
    }

    /// The server's request counters and slow log (`crate::metrics`).
    pub fn metrics(&self) -> &Arc<ServerMetrics> {
        &self.metrics
    }

    /// Where it answers metrics scrapes, if it does (`ServerConfig::metrics_listen`).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where it speaks RESP, if it does (`ServerConfig::resp_listen`).
    pub fn resp_addr(&self) -> Option<SocketAddr> {
        self.resp_addr
    }

    /// Bytes of connection buffers drawn from the node-wide budget now.
    pub fn buffered_bytes(&self) -> u64 {
        self.budget.used()
    }

    /// Stops accepting, finishes in-flight requests on every connection, then returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    resp: Option<(TcpListener, Arc<resp::RespShared>)>,
    grid: Arc<GridCore>,
    auth: Arc<Auth>,
    limits: ConnLimits,
    connections_max: usize,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((mut sock, peer)) => {
                    if conns.len() >= connections_max {
                        // Refuse with a reason the client can show, without reading anything.
                        limits.metrics.connections.refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%peer, connections_max, "connection refused: at the connection limit");
                        let error = GridError::Unavailable(format!("server is at its limit of {connections_max} connections"));
                        tokio::spawn(async move {
                            let _ = protocol::write_msg(&mut sock, &HelloReply::Refused { error }).await;
                        });
                        continue;
                    }
                    let _ = sock.set_nodelay(true);
                    limits.metrics.connections.accepted.fetch_add(1, Ordering::Relaxed);
                    conns.spawn(connection(sock, peer, grid.clone(), auth.clone(), limits.clone(), stop.clone()));
                }
                // Out of descriptors and the like: back off briefly instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            accepted = async { resp.as_ref().expect("guarded").0.accept().await }, if resp.is_some() => match accepted {
                Ok((mut sock, peer)) => {
                    if conns.len() >= connections_max {
                        limits.metrics.connections.refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%peer, connections_max, "RESP connection refused: at the connection limit");
                        let msg = format!("-ERR max number of clients reached ({connections_max})\r\n");
                        tokio::spawn(async move {
                            let _ = sock.write_all(msg.as_bytes()).await;
                        });
                        continue;
                    }
                    let _ = sock.set_nodelay(true);
                    limits.metrics.connections.accepted.fetch_add(1, Ordering::Relaxed);
                    let shared = resp.as_ref().expect("guarded").1.clone();
                    conns.spawn(resp::connection(sock, peer, grid.clone(), auth.clone(), limits.clone(), stop.clone(), shared));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    drop(resp);
    while conns.join_next().await.is_some() {}
}

/// A connection's input: bytes read so far, split into frames as they complete. Reading with
/// `read_buf` into a buffer that outlives the read makes it safe to abandon a read midway (in a
/// `select!`): nothing already received is lost.
struct Input {
    rd: tokio::net::tcp::OwnedReadHalf,
    buf: Vec<u8>,
    /// Start of the unparsed bytes in `buf`.
    at: usize,
    budget: Arc<BufferBudget>,
    /// Bytes of `buf`'s capacity drawn from `budget`.
    held: u64,
    /// When the frame now partly buffered started arriving.
    partial_since: Option<tokio::time::Instant>,
    metrics: Arc<ServerMetrics>,
}

impl Drop for Input {
    fn drop(&mut self) {
        self.budget.give(self.held);
    }
}

impl Input {
    fn new(rd: tokio::net::tcp::OwnedReadHalf, limits: &ConnLimits) -> Input {
        Input {
            rd,
            buf: Vec::with_capacity(IO_BUFFER_BYTES),
            at: 0,
            budget: limits.budget.clone(),
            held: 0,
            partial_since: None,
            metrics: limits.metrics.clone(),
        }
    }

    /// The next complete frame's payload already buffered, if any.
    fn frame(&mut self) -> Option<Result<Vec<u8>, FrameError>> {
        let avail = &self.buf[self.at..];
        if avail.len() < 4 {
            return None;
        }
        let len = u32::from_le_bytes(avail[..4].try_into().expect("4 bytes"));
        if len > protocol::FRAME_BYTES_MAX {
            return Some(Err(FrameError::TooLarge(len)));
        }
        if avail.len() < 4 + len as usize {
            return None;
        }
        let payload = avail[4..4 + len as usize].to_vec();
        self.at += 4 + len as usize;
        Some(Ok(payload))
    }

    /// Reads more bytes (cancel-safe). `Ok(false)` at end of stream.
    async fn fill(&mut self) -> Result<bool, FrameError> {
        if self.at > 0 && self.at == self.buf.len() {
            self.buf.clear();
            self.at = 0;
            // Give back what a large frame needed.
            self.buf.shrink_to(IO_BUFFER_BYTES);
        } else if self.at > IO_BUFFER_BYTES {
            self.buf.drain(..self.at);
            self.at = 0;
        }
        self.buf.reserve(IO_BUFFER_BYTES);
        self.account()?;
        let n = self.rd.read_buf(&mut self.buf).await?;
        self.metrics.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        self.account()?;
        Ok(n > 0)
    }

    /// Notes when the frame now partly buffered (if any) was first seen incomplete.
    fn track_partial(&mut self) {
        if self.buf.len() > self.at && !self.has_frame() {
            self.partial_since.get_or_insert_with(tokio::time::Instant::now);
        } else {
            self.partial_since = None;
        }
    }

    /// Draws the buffer's capacity beyond `CONN_BASE_BYTES` from the budget, or gives back what
    /// it no longer needs. Over budget: the buffer is released and the connection must end.
    fn account(&mut self) -> Result<(), FrameError> {
        let extra = self.buf.capacity().saturating_sub(CONN_BASE_BYTES) as u64;
        if extra > self.held {
            if !self.budget.take(extra - self.held) {
                self.buf = Vec::new();
                self.at = 0;
                self.budget.give(self.held);
                self.held = 0;
                return Err(FrameError::OverBudget { budget_bytes: self.budget.max });
            }
        } else {
            self.budget.give(self.held - extra);
        }
        self.held = extra;
        Ok(())
    }

    /// Whether a complete frame (or a length over the limit, an error to report) is buffered.
    fn has_frame(&self) -> bool {
        match self.peek_len() {
            Some(len) if len > protocol::FRAME_BYTES_MAX => true,
            Some(len) => self.buf.len() - self.at >= 4 + len as usize,
            None => false,
        }
    }

    /// The length prefix of the next frame, if buffered.
    fn peek_len(&self) -> Option<u32> {
        let avail = &self.buf[self.at..];
        (avail.len() >= 4).then(|| u32::from_le_bytes(avail[..4].try_into().expect("4 bytes")))
    }

    /// The next frame of at most `max` bytes, reading as needed; `Closed` at a clean end.
    async fn next_limited(&mut self, max: u32) -> Result<Vec<u8>, FrameError> {
        loop {
            if let Some(len) = self.peek_len().filter(|&l| l > max) {
                return Err(FrameError::TooLarge(len));
            }
            if let Some(f) = self.frame() {
                return f;
            }
            if !self.fill().await? {
                return Err(if self.at == self.buf.len() {
                    FrameError::Closed
                } else {
                    FrameError::Malformed("truncated frame".into())
                });
            }
        }
    }
}

async fn handshake(input: &mut Input, auth: &Auth) -> Result<Principal, GridError> {
    if let Some(len) = input.peek_len().filter(|&l| l > HELLO_BYTES_MAX) {
        return Err(GridError::Protocol(format!("hello of {len} bytes is over {HELLO_BYTES_MAX}")));
    }
    let payload = match tokio::time::timeout(HANDSHAKE_TIMEOUT, input.next_limited(HELLO_BYTES_MAX)).await {
        Err(_) => return Err(GridError::Protocol("no hello within the handshake timeout".into())),
        Ok(Err(e)) => return Err(GridError::Protocol(e.to_string())),
        Ok(Ok(p)) => p,
    };
    let hello: Hello = protocol::decode(&payload).map_err(|e| GridError::Protocol(format!("hello: {e}")))?;
    if hello.magic != MAGIC {
        return Err(GridError::Protocol("not a heapgrid client (bad magic)".into()));
    }
    if hello.version != PROTOCOL_VERSION {
        return Err(GridError::Protocol(format!(
            "protocol version {} is not supported; this server speaks {PROTOCOL_VERSION}",
            hello.version
        )));
    }
    auth.login(hello.token.as_deref())
}

/// The replies of one group of a round (one `Pipeline` message to one shard).
type GroupReply =
    heapgrid_actors::table::runtime::BoxFuture<heapgrid_actors::table::runtime::PipelineReplies>;

/// What a connection waits on: the responses of a round or of one request that runs on its own.
type Pending = std::pin::Pin<Box<dyn std::future::Future<Output = Done> + Send>>;

/// Encoded responses, how many requests they answer, and the shards written to (whose
/// in-flight count drops).
struct Done {
    bytes: Vec<u8>,
    requests: usize,
    wrote: Vec<ShardKey>,
}

/// A shard of a table by name.
type ShardKey = (String, u32);

/// A connection's settings (`RequestBody::SetSession`).
#[derive(Default)]
struct Session {
    /// Requests for a recovering shard are answered `Recovering` at once.
    no_wait: AtomicBool,
}

/// A connection's writes in flight, per table and shard (at most its in-flight limit of them).
/// Looked up by `&str` on every read, so a read allocates nothing to ask.
#[derive(Default)]
struct Writing {
    tables: HashMap<String, HashMap<u32, u32>>,
}

impl Writing {
    fn add_all(&mut self, keys: Vec<ShardKey>) {
        for k in keys {
            self.add(k);
        }
    }

    fn add(&mut self, (table, shard): ShardKey) {
        *self.tables.entry(table).or_default().entry(shard).or_insert(0) += 1;
    }

    fn remove(&mut self, (table, shard): &ShardKey) {
        let Some(shards) = self.tables.get_mut(table.as_str()) else { return };
        if let Some(n) = shards.get_mut(shard) {
            *n -= 1;
            if *n == 0 {
                shards.remove(shard);
            }
        }
        if shards.is_empty() {
            self.tables.remove(table.as_str());
        }
    }

    fn contains(&self, table: &str, shard: u32) -> bool {
        !self.tables.is_empty() && self.tables.get(table).is_some_and(|s| s.contains_key(&shard))
    }
}

/// One connection. Every complete request a read brings is decoded at once: table operations
/// form a `Round` (one `Pipeline` message per shard, one buffer of responses), the rest
/// (catalogue changes, grid-scoped snippets, fetches) run as futures of their own. All of them
/// are polled by this one task (no task per request, no writer task), and every response that
/// is ready is written with one write.
async fn connection(
    sock: TcpStream,
    peer: SocketAddr,
    grid: Arc<GridCore>,
    auth: Arc<Auth>,
    limits: ConnLimits,
    mut stop: watch::Receiver<bool>,
) {
    let (rd, mut wr) = sock.into_split();
    let inflight = limits.inflight;
    let mut input = Input::new(rd, &limits);
    let metrics = limits.metrics.clone();
    let who = match handshake(&mut input, &auth).await {
        Ok(p) => Arc::new(p),
        Err(error) => {
            // Never the token: only that it was missing or unknown.
            if let GridError::Unauthenticated(why) = &error {
                metrics.connections.auth_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, reason = %why, "authentication failed");
            } else {
                metrics.connections.handshake_failures.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%peer, reason = %error, "handshake failed");
            }
            let _ = protocol::write_msg(&mut wr, &HelloReply::Refused { error }).await;
            let _ = wr.shutdown().await;
            return;
        }
    };
    let welcome = HelloReply::Welcome {
        version: PROTOCOL_VERSION,
        server: format!("heapgrid {}", env!("CARGO_PKG_VERSION")),
    };
    if protocol::write_msg(&mut wr, &welcome).await.is_err() {
        return;
    }
    metrics.connections.open.fetch_add(1, Ordering::Relaxed);
    let _open = OpenConnection(&metrics);
    let mut timing = InFlight::new(peer.to_string());
    let mut running: FuturesUnordered<Pending> = FuturesUnordered::new();
    // Requests read and not yet answered.
    let mut open = 0usize;
    let (mut ctx, gone_tx) = ConnCtx::new();
    let mut out = Vec::with_capacity(IO_BUFFER_BYTES);
    let mut reading = true;
    loop {
        // Start every complete request already buffered, up to the in-flight limit.
        let mut round = ctx.round(&metrics);
        timing.pass();
        // Answers given at once count against the output buffer, not the in-flight limit: stop
        // decoding when it is full, write it, then go on with what is buffered.
        while reading && open < inflight && out.len() < IO_BUFFER_BYTES {
            let Some(frame) = input.frame() else { break };
            let req = frame.and_then(|payload| protocol::decode::<Request>(&payload));
            match req {
                Ok(req) if req.id == 0 => {
                    let e = GridError::Protocol("request id 0 is reserved".into());
                    protocol::append_response(&mut out, &Response { id: 0, result: Err(e) });
                    reading = false;
                }
                Ok(req) => {
                    timing.start(req.id, &req.body);
                    match round.add(&grid, &who, req, &mut out) {
                        Taken::Answered => {}
                        Taken::InRound => open += 1,
                        Taken::Alone(f) => {
                            open += 1;
                            running.push(f);
                        }
                    }
                }
                Err(e) => {
                    let e = GridError::Protocol(e.to_string());
                    protocol::append_response(&mut out, &Response { id: 0, result: Err(e) });
                    reading = false;
                }
            }
        }
        let wrote = send_round(round, &mut running);
        ctx.writing.add_all(wrote);
        // What was answered at once (snapshot reads, refusals) goes out now, in one write,
        // rather than waiting behind the shards' replies.
        if !out.is_empty() {
            metrics.observe(&mut timing, &out);
            if !write_out(&mut wr, &mut out).await {
                return;
            }
        }
        if !reading && running.is_empty() {
            break;
        }
        if reading && open < inflight && input.has_frame() {
            // Stopped on a full output buffer with requests still buffered.
            continue;
        }
        // A frame that started arriving must be whole by then (timed only while this connection
        // is being read: under backpressure the clock restarts).
        if open < inflight {
            input.track_partial();
        } else {
            input.partial_since = None;
        }
        let frame_due = input.partial_since.map(|t| t + limits.frame_deadline);
        tokio::select! {
            done = running.next(), if !running.is_empty() => {
                if let Some(d) = done {
                    // Gather whatever else has finished, then write once.
                    finish_all(d, &mut running, &mut out, &mut open, &mut ctx.writing);
                    metrics.observe(&mut timing, &out);
                    if !write_out(&mut wr, &mut out).await {
                        return;
                    }
                }
            }
            more = input.fill(), if reading && open < inflight => match more {
                Ok(true) => {}
                Ok(false) => {
                    // End of stream: finish what was read (a truncated frame is just dropped),
                    // but stop waiting on behalf of a peer that is gone.
                    reading = false;
                    gone_tx.send_replace(true);
                }
                Err(e) => {
                    // Say why (over budget, say); the peer may be gone, so this may go nowhere.
                    let e = GridError::Unavailable(e.to_string());
                    protocol::append_response(&mut out, &Response { id: 0, result: Err(e) });
                    reading = false;
                    gone_tx.send_replace(true);
                }
            },
            _ = tokio::time::sleep_until(frame_due.unwrap_or_else(tokio::time::Instant::now)),
                if reading && open < inflight && frame_due.is_some() => {
                let e = GridError::Protocol(FrameError::Deadline(limits.frame_deadline).to_string());
                protocol::append_response(&mut out, &Response { id: 0, result: Err(e) });
                reading = false;
                gone_tx.send_replace(true);
            }
            _ = stop.changed(), if reading => reading = false,
        }
    }
    let _ = wr.shutdown().await;
}

/// Counts an open connection until it is dropped.
struct OpenConnection<'a>(&'a ServerMetrics);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.connections.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Takes a finished round or request into the connection's output and counts.
fn finish(d: Done, out: &mut Vec<u8>, open: &mut usize, writing: &mut Writing) {
    out.extend_from_slice(&d.bytes);
    *open -= d.requests;
    for k in &d.wrote {
        writing.remove(k);
    }
}

/// `finish`es `d` and every other request or round that has finished by now.
fn finish_all(
    d: Done,
    running: &mut FuturesUnordered<Pending>,
    out: &mut Vec<u8>,
    open: &mut usize,
    writing: &mut Writing,
) {
    finish(d, out, open, writing);
    while let Some(Some(d)) = running.next().now_or_never() {
        finish(d, out, open, writing);
    }
}

/// Writes `out` (bounded by `WRITE_TIMEOUT`: a client that does not read is dropped) and
/// empties it; `false` if the connection is done for.
async fn write_out(wr: &mut tokio::net::tcp::OwnedWriteHalf, out: &mut Vec<u8>) -> bool {
    if !matches!(tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(out)).await, Ok(Ok(()))) {
        return false;
    }
    out.clear();
    if out.capacity() > 4 * IO_BUFFER_BYTES {
        out.shrink_to(IO_BUFFER_BYTES);
    }
    true
}

/// What a connection's rounds read: its state that outlives one round.
struct ConnCtx {
    /// Writes (and collection-scoped snippets) of this connection in flight, per shard: a read
    /// of such a shard goes to its actor, behind them; a read of any other is served from the
    /// shard's published snapshot at once.
    writing: Writing,
    /// Lock sessions this connection opened or reattached: the only ones it may act in.
    sessions: ConnSessions,
    session: Session,
    /// Requests run at other nodes' primaries go one after another, in arrival order (each
    /// waits for the one before): a read follows the writes the connection sent before it.
    routed: RoutedChain,
    /// Set when the peer ended its stream: blocked pops and lock waits of this connection are
    /// dropped then (their reply ports close), so nothing is handed to a caller that is gone.
    gone: watch::Receiver<bool>,
}

impl ConnCtx {
    /// A new connection's state, and the sender that says the peer is gone.
    fn new() -> (ConnCtx, watch::Sender<bool>) {
        let (gone_tx, gone) = watch::channel(false);
        let ctx = ConnCtx {
            writing: Writing::default(),
            sessions: ConnSessions::default(),
            session: Session::default(),
            routed: RoutedChain::default(),
            gone,
        };
        (ctx, gone_tx)
    }

    fn round<'c>(&'c self, metrics: &'c Arc<ServerMetrics>) -> Round<'c> {
        Round::new(&self.writing, &self.session, &self.sessions, &self.gone, &self.routed, metrics)
    }
}

/// Sends a round's messages (appends, then one per shard); its futures join `running`.
/// Answers the shards it writes to (for `Writing::add_all`).
fn send_round(mut round: Round<'_>, running: &mut FuturesUnordered<Pending>) -> Vec<ShardKey> {
    round.send_appends();
    running.extend(std::mem::take(&mut round.sent));
    if round.requests == 0 {
        return Vec::new();
    }
    let (pending, wrote) = round.dispatch();
    running.extend(pending);
    wrote
}

/// How a round builds one request's response from its shards' replies.
enum Slot {
    /// One reply, at `pos` in group `group`.
    One { id: u64, group: usize, pos: usize },
    /// A count over several shards: the sum of their replies.
    Count { id: u64, parts: Vec<(usize, usize)> },
    /// A scan over several shards: their entries merged in key order.
    Scan { id: u64, parts: Vec<(usize, usize)>, limit: u32, reverse: bool },
}

impl Slot {
    /// The groups whose replies it needs.
    fn groups(&self) -> Vec<usize> {
        match self {
            Slot::One { group, .. } => vec![*group],
            Slot::Count { parts, .. } | Slot::Scan { parts, .. } => parts.iter().map(|(g, _)| *g).collect(),
        }
    }
}

/// The table operations of one read: grouped by shard, one `Pipeline` message per shard, their
/// responses encoded into one buffer in request order. Requests to one shard keep the order in
/// which they arrived: they are in one message, or in messages sent in turn.
/// What a grid-scoped snippet of `who` may touch: `eval` and `read` on every collection it
/// uses, and `write` on those it writes.
fn eval_access(who: Arc<Principal>) -> AccessCheck {
    Arc::new(move |coll: &str, write: bool| {
        who.require(coll, Permission::Eval)?;
        who.require(coll, Permission::Read)?;
        if write {
            who.require(coll, Permission::Write)?;
        }
        Ok(())
    })
}

/// Most lock sessions one connection may own (open or reattach) at once. A session leaves the
/// count when it is closed, or when a request in it learns that it expired.
pub const CONN_SESSIONS_MAX: usize = 10_000;

/// The lock sessions a connection proved it owns (opened, or reattached with the secret).
type ConnSessions = Arc<std::sync::Mutex<std::collections::HashSet<u64>>>;

/// The end of a connection's chain of routed requests: dropped (or sent) when the last one
/// ends. Bounds: the chain holds at most the connection's in-flight limit (each link is a
/// request counted in it), and each link ends by its own bounds (`ROUTE_WAIT` of following
/// the map, a shard call's 5 s read or 10 s write wait, or at once when the map names another
/// primary). Unrelated shards' requests wait for each other too: ordering over pipelining,
/// for requests sent to a node that does not serve their shard.
type RoutedChain = std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>;

/// Whether `who` may make lock request `op`: `write` on the lock's (or semaphore's) name to
/// take, give back or configure it, `read` to see its status; session requests need a login
/// only (the session is checked against the connection's own).
fn lock_allowed(who: &Principal, op: &LockOp) -> Result<(), GridError> {
    match (op, op.name()) {
        (LockOp::Status { .. } | LockOp::SemStatus { .. }, Some(n)) => who.require(n, Permission::Read),
        (_, Some(n)) => who.require(n, Permission::Write),
        (_, None) => Ok(()),
    }
}

/// Whether `who` may make queue request `op`: `read` on the queue's name to see its items
/// (`pop`, `peek`, `len`), `write` to change it (`pop` changes it too); `configure` also needs
/// `write` on the dead-letter queue it names. The list shows only queues it may read.
fn queue_allowed(who: &Principal, op: &QueueOp) -> Result<(), GridError> {
    let Some(q) = op.queue() else { return Ok(()) };
    if !matches!(
        op,
        QueueOp::Push { .. }
            | QueueOp::PushWait { .. }
            | QueueOp::Ack { .. }
            | QueueOp::Nack { .. }
            | QueueOp::Extend { .. }
    ) {
        who.require(q, Permission::Read)?;
    }
    if op.writes() {
        who.require(q, Permission::Write)?;
    }
    if let QueueOp::Configure { options: QueueOptions { dead_letter: Some(d), .. }, .. } = op {
        who.require(d, Permission::Write)?;
    }
    Ok(())
}

/// `f`, dropped (its reply port closes, so the service skips it) if the peer goes away first.
async fn unless_gone<T>(
    f: impl std::future::Future<Output = Result<T, GridError>>,
    mut gone: watch::Receiver<bool>,
) -> Result<T, GridError> {
    tokio::select! {
        r = f => r,
        _ = gone.wait_for(|g| *g) => Err(GridError::Unavailable("the connection ended".into())),
    }
}

struct Round<'c> {
    /// The connection's writes in flight from earlier rounds.
    writing: &'c Writing,
    /// The connection's settings (`SetSession`).
    session: &'c Session,
    /// The connection's lock sessions.
    sessions: &'c ConnSessions,
    /// True once the peer ended its stream.
    gone: &'c watch::Receiver<bool>,
    /// The end of the connection's chain of requests run through the cluster's routing.
    routed: &'c RoutedChain,
    /// Shards this round writes to (by table index).
    wrote: Vec<(usize, u32)>,
    /// Tables named in this round, resolved once.
    tables: Vec<Arc<TableRuntime>>,
    /// (table index, shard, operations).
    groups: Vec<(usize, u32, Vec<PipelineOp>)>,
    slots: Vec<Slot>,
    /// Requests this round answers (through `slots`).
    requests: usize,
    /// Consecutive appends to one feed, not yet sent: sent as one message when a request of
    /// any other kind arrives, or at the end of the round (so a connection's requests reach the
    /// feed in arrival order). At most the connection's in-flight limit of them.
    appends: Option<(Arc<FeedRuntime>, Vec<u64>, Vec<AppendReq>)>,
    /// Sent append batches awaiting their replies.
    sent: Vec<Pending>,
    /// The server's metrics (the slow log).
    metrics: &'c Arc<ServerMetrics>,
}

/// What became of a request a round was given.
enum Taken {
    /// Answered at once (refused, or needing no shard).
    Answered,
    /// Joined the round.
    InRound,
    /// Runs on its own (not a table operation).
    Alone(Pending),
}

impl<'c> Round<'c> {
    fn new(
        writing: &'c Writing,
        session: &'c Session,
        sessions: &'c ConnSessions,
        gone: &'c watch::Receiver<bool>,
        routed: &'c RoutedChain,
        metrics: &'c Arc<ServerMetrics>,
    ) -> Round<'c> {
        Round {
            writing,
            session,
            sessions,
            gone,
            routed,
            wrote: Vec::new(),
            tables: Vec::new(),
            groups: Vec::new(),
            slots: Vec::new(),
            requests: 0,
            appends: None,
            sent: Vec::new(),
            metrics,
        }
    }

    /// Sends the pending appends, if any, as one message.
    fn send_appends(&mut self) {
        let Some((feed, ids, mut reqs)) = self.appends.take() else { return };
        // A lone append goes as the plain `Append` message: measured with compare-redis-feeds.sh
        // at 1 in flight, through `Appends` it cost 13.7-14.4 µs of server CPU per append, this
        // way 11.4-11.7 µs (0.81-0.88x against 0.94-1.05x Redis XADD, two runs each). Why the
        // batch message costs that much more for one append is not understood yet.
        if let [id] = ids.as_slice()
            && let Some(req) = reqs.pop()
        {
            let (id, reply) = (*id, feed.append(req.value, req.id));
            self.sent.push(Box::pin(async move {
                let mut bytes = Vec::new();
                let result = reply.await.map(|a| ResponseBody::Feed(FeedResult::Appended { id: a.id }));
                protocol::append_response(&mut bytes, &Response { id, result });
                Done { bytes, requests: 1, wrote: Vec::new() }
            }));
            return;
        }
        let replies = feed.append_many(reqs);
        self.sent.push(Box::pin(async move {
            let mut bytes = Vec::new();
            let n = ids.len();
            for (id, r) in ids.into_iter().zip(replies.await) {
                let result = r.map(|a| ResponseBody::Feed(FeedResult::Appended { id: a.id }));
                protocol::append_response(&mut bytes, &Response { id, result });
            }
            Done { bytes, requests: n, wrote: Vec::new() }
        }));
    }

    /// Takes one request: into the round (a table operation), answered at once into `out`
    /// (refused, or needing no shard), or as a future of its own.
    fn add(&mut self, grid: &Arc<GridCore>, who: &Arc<Principal>, req: Request, out: &mut Vec<u8>) -> Taken {
        let id = req.id;
        let req = match req.body {
            RequestBody::Feed { feed, op: FeedOp::Append { value, id: at } } => {
                let same = self.appends.as_ref().is_some_and(|(f, _, _)| f.def.name == feed);
                if !same {
                    self.send_appends();
                    let found = who.require(&feed, Permission::Write).and_then(|_| grid.feed(&feed));
                    match found {
                        Ok(f) => self.appends = Some((f, Vec::new(), Vec::new())),
                        Err(e) => {
                            protocol::append_response(out, &Response { id, result: Err(e) });
                            return Taken::Answered;
                        }
                    }
                }
                if let Some((_, ids, reqs)) = self.appends.as_mut() {
                    ids.push(id);
                    reqs.push(AppendReq::new(value, at));
                }
                return Taken::InRound;
            }
            body => {
                self.send_appends();
                Request { id, body }
            }
        };
        let (grid, who) = (grid.clone(), who.clone());
        let (table, op) = match req.body {
            RequestBody::Table { table, op } => (table, op),
            RequestBody::Ping => {
                protocol::append_response(out, &Response { id, result: Ok(ResponseBody::Pong) });
                return Taken::Answered;
            }
            RequestBody::ListTables => {
                let tables = grid.list_tables().into_iter().filter(|t| who.allows(&t.name, Permission::Read));
                let result = Ok(ResponseBody::Tables(tables.collect()));
                protocol::append_response(out, &Response { id, result });
                return Taken::Answered;
            }
            // Catalogue changes run as their own tasks: a connection that goes away cannot cancel
            // them halfway (between the catalogue and the running tables).
            RequestBody::CreateTable { name, options } => {
                return alone(id, async move {
                    who.require(&name, Permission::Admin)?;
                    detached(
                        async move { grid.create_table(&name, options).await.map(|_| ResponseBody::Done) },
                    )
                    .await
                });
            }
            RequestBody::DropTable { name } => {
                return alone(id, async move {
                    who.require(&name, Permission::Admin)?;
                    detached(async move { grid.drop_table(&name).await.map(|_| ResponseBody::Done) }).await
                });
            }
            RequestBody::EvalFenced { src, args, limits, fences } => {
                let access = eval_access(who);
                return alone(id, async move {
                    let sink = heapgrid_actors::snippet::PrintSink::default();
                    let v =
                        grid.eval_printing(&src, args, &limits, access, &fences, Some(sink.clone())).await?;
                    Ok(with_printed(v, &sink))
                });
            }
            RequestBody::Eval { src, args, limits } => {
                let access = eval_access(who);
                return alone(id, async move {
                    let sink = heapgrid_actors::snippet::PrintSink::default();
                    let v = grid.eval_printing(&src, args, &limits, access, &[], Some(sink.clone())).await?;
                    Ok(with_printed(v, &sink))
                });
            }
            RequestBody::Fetch { reference, offset, limit } => {
                let access: AccessCheck = Arc::new(move |coll: &str, _| who.require(coll, Permission::Read));
                return alone(id, async move {
                    Ok(ResponseBody::Value(grid.fetch(&reference, offset, limit, access).await?))
                });
            }
            RequestBody::PutProcedures { module, src } => {
                return alone(id, async move {
                    who.require(PROCEDURES, Permission::Admin)?;
                    grid.put_procedures(&module, &src)?;
                    Ok(ResponseBody::Done)
                });
            }
            RequestBody::DropProcedures { module } => {
                return alone(id, async move {
                    who.require(PROCEDURES, Permission::Admin)?;
                    grid.drop_procedures(&module)?;
                    Ok(ResponseBody::Done)
                });
            }
            RequestBody::ListFeeds => {
                return alone(id, async move {
                    let mut out = Vec::new();
                    for def in grid.list_feeds() {
                        if !who.allows(&def.name, Permission::Read) {
                            continue;
                        }
                        if let Ok(f) = grid.feed(&def.name) {
                            out.push(f.info().await?);
                        }
                    }
                    Ok(ResponseBody::Feeds(out))
                });
            }
            RequestBody::CreateFeed { name, options } => {
                return alone(id, async move {
                    who.require(&name, Permission::Admin)?;
                    detached(
                        async move { grid.create_feed(&name, options).await.map(|_| ResponseBody::Done) },
                    )
                    .await
                });
            }
            RequestBody::DropFeed { name } => {
                return alone(id, async move {
                    who.require(&name, Permission::Admin)?;
                    detached(async move { grid.drop_feed(&name).await.map(|_| ResponseBody::Done) }).await
                });
            }
            RequestBody::Lock { op } => {
                // Sent now, so one connection's lock requests keep their order.
                let session = op.session();
                let refused = {
                    let own = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
                    match (&op, session) {
                        (LockOp::Reattach { .. }, _) | (LockOp::Open { .. }, _)
                            if own.len() >= CONN_SESSIONS_MAX =>
                        {
                            Some(GridError::LimitExceeded {
                                what: "lock sessions owned by one connection".into(),
                                got: CONN_SESSIONS_MAX as u64 + 1,
                                max: CONN_SESSIONS_MAX as u64,
                            })
                        }
                        (LockOp::Reattach { .. }, _) | (_, None) => None,
                        (_, Some(s)) if own.contains(&s) => None,
                        (_, Some(s)) => Some(GridError::PermissionDenied {
                            collection: format!("session {s}"),
                            permission: "owner (open it, or reattach it with its secret, on this connection)"
                                .into(),
                        }),
                    }
                };
                let closes = matches!(op, LockOp::Close { .. }).then_some(session).flatten();
                let waits = matches!(
                    op,
                    LockOp::Acquire { wait_ms: 1.., .. } | LockOp::SemAcquire { wait_ms: 1.., .. }
                );
                let gone = self.gone.clone();
                let started = lock_allowed(&who, &op)
                    .and_then(|_| grid.service_here(LOCKS_SERVICE))
                    .and_then(|_| match refused {
                        Some(e) => Err(e),
                        None => Ok(grid.locks().call(op)),
                    });
                let sessions = self.sessions.clone();
                return alone(id, async move {
                    let r = if waits { unless_gone(started?, gone).await } else { started?.await };
                    {
                        let mut own = sessions.lock().unwrap_or_else(|e| e.into_inner());
                        match &r {
                            Ok(LockResult::Session { session, .. }) => {
                                own.insert(*session);
                            }
                            // A session that ended no longer counts against the connection.
                            Err(GridError::SessionExpired { session }) => {
                                own.remove(session);
                            }
                            _ => {}
                        }
                        if let Some(s) = closes {
                            own.remove(&s);
                        }
                    }
                    let r = r?;
                    let r = match r {
                        LockResult::List { locks, sems } => LockResult::List {
                            locks: locks
                                .into_iter()
                                .filter(|l| who.allows(&l.lock, Permission::Read))
                                .collect(),
                            sems: sems.into_iter().filter(|s| who.allows(&s.sem, Permission::Read)).collect(),
                        },
                        r => r,
                    };
                    Ok(ResponseBody::Lock(r))
                });
            }
            RequestBody::Queue { op } => {
                // Sent now, so one connection's queue requests keep their order. A delivery may
                // be tied only to a lock session this connection owns.
                let allowed = queue_allowed(&who, &op).and_then(|_| match &op {
                    QueueOp::Pop { session: Some(s), .. }
                        if !self.sessions.lock().unwrap_or_else(|e| e.into_inner()).contains(s) =>
                    {
                        Err(GridError::PermissionDenied {
                            collection: format!("session {s}"),
                            permission: "owner (open it, or reattach it with its secret, on this connection)"
                                .into(),
                        })
                    }
                    _ => Ok(()),
                });
                let waits =
                    matches!(op, QueueOp::Pop { wait_ms: 1.., .. } | QueueOp::PushWait { wait_ms: 1.., .. });
                let started =
                    allowed.and_then(|_| grid.service_here(QUEUES_SERVICE)).map(|_| grid.queues().call(op));
                let gone = self.gone.clone();
                return alone(id, async move {
                    let started = started?;
                    let r = if waits { unless_gone(started, gone).await? } else { started.await? };
                    let r = match r {
                        QueueResult::List(all) => QueueResult::List(
                            all.into_iter().filter(|(n, _)| who.allows(n, Permission::Read)).collect(),
                        ),
                        r => r,
                    };
                    Ok(ResponseBody::Queue(r))
                });
            }
            RequestBody::SetSession { wait_for_recovery } => {
                self.session.no_wait.store(!wait_for_recovery, Ordering::Relaxed);
                protocol::append_response(out, &Response { id, result: Ok(ResponseBody::Done) });
                return Taken::Answered;
            }
            RequestBody::SlowLog { clear } => {
                let m = self.metrics.clone();
                return alone(id, async move {
                    who.require(SERVER, Permission::Admin)?;
                    Ok(ResponseBody::SlowLog(m.slowlog(clear)))
                });
            }
            RequestBody::Stats => {
                return alone(id, async move {
                    let mut s = grid.stats().await;
                    s.collections.retain(|c| who.allows(&c.name, Permission::Read));
                    Ok(ResponseBody::Stats(s))
                });
            }
            RequestBody::Cluster { op } => {
                let need = if op.changes() { Permission::Admin } else { Permission::Read };
                return alone(id, async move {
                    who.require(CLUSTER, need)?;
                    if let ClusterOp::Digest { table, .. } = &op {
                        who.require(table, Permission::Read)?;
                    }
                    let Some(node) = grid.cluster().cloned() else {
                        return Err(GridError::Invalid(
                            "this node is not in a cluster (start it with --node-id and --peer-listen)"
                                .into(),
                        ));
                    };
                    // Its own task: a connection that goes away does not cancel a change halfway.
                    detached(async move {
                        Ok(ResponseBody::Cluster(match op {
                            ClusterOp::Status => {
                                ClusterResult::Status(grid.cluster_status().ok_or(GridError::Closed)?)
                            }
                            ClusterOp::Add(m) => {
                                ClusterResult::Changed { version: node.admin(Admin::Join(m)).await?.version }
                            }
                            ClusterOp::Remove { node: n } => {
                                ClusterResult::Changed { version: grid.cluster_remove(n).await? }
                            }
                            ClusterOp::Digest { table, shard } => {
                                use heapgrid_actors::cluster::map::{LOCKS_SERVICE, QUEUES_SERVICE};
                                let d = match table.as_str() {
                                    LOCKS_SERVICE => grid.locks().digest().await?,
                                    QUEUES_SERVICE => grid.queues().digest().await?,
                                    t => match heapgrid_actors::cluster::map::feed_in_map(t) {
                                        Some(feed) => grid.feed(feed)?.digest().await?,
                                        None => grid.table(&table)?.digest(shard).await?,
                                    },
                                };
                                ClusterResult::Digest(d)
                            }
                            ClusterOp::Move { table, shard, node: to } => ClusterResult::Changed {
                                version: grid.cluster_move(&table, shard, to).await?,
                            },
                        }))
                    })
                    .await
                });
            }
            RequestBody::Feed { feed, op } => {
                // Sent to the feed now, so one connection's feed operations keep their order.
                // `read` for answers that carry the feed's contents, `write` for changes.
                let allowed = (if op.reads() { who.require(&feed, Permission::Read) } else { Ok(()) })
                    .and_then(|_| if op.writes() { who.require(&feed, Permission::Write) } else { Ok(()) });
                let no_wait = self.session.no_wait.load(Ordering::Relaxed);
                let started = allowed
                    .and_then(|_| grid.feed(&feed))
                    .and_then(|f| match f.recovering().filter(|_| no_wait) {
                        Some(e) => Err(e),
                        None => Ok(f),
                    })
                    .map(|f| start_op(&f, op));
                return alone(id, async move { Ok(ResponseBody::Feed(started?.await?)) });
            }
        };
        if let Some(at) = elsewhere(&grid, &table, &op) {
            // Run through `TableRuntime`, which reaches the shards other nodes serve over the
            // cluster's transport. Checked here as `plan` would (the node that runs it trusts
            // its peers).
            let allowed = who
                .require(&table, Permission::Read)
                .and_then(|_| if op.is_write() { who.require(&table, Permission::Write) } else { Ok(()) })
                .and_then(|_| match op {
                    TableOp::Eval(_) => who.require(&table, Permission::Eval),
                    _ => Ok(()),
                });
            if let Err(e) = allowed {
                protocol::append_response(out, &Response { id, result: Err(e) });
                return Taken::Answered;
            }
            let op = match op {
                TableOp::Eval(mut req) => {
                    req.read_only |= !who.allows(&table, Permission::Write);
                    TableOp::Eval(req)
                }
                op => op,
            };
            self.send_appends();
            let (done, next) = tokio::sync::oneshot::channel::<()>();
            let before = self.routed.lock().unwrap_or_else(|e| e.into_inner()).replace(next);
            return alone(id, async move {
                if let Some(before) = before {
                    let _ = before.await;
                }
                let _done = done;
                let rt = match at {
                    Elsewhere::Runs(rt) => rt,
                    Elsewhere::Starting => starting(&grid, &table).await?,
                };
                run_routed(rt, op).await
            });
        }
        match self.plan(&grid, &who, id, &table, op, out) {
            Ok(true) => {
                self.requests += 1;
                Taken::InRound
            }
            Ok(false) => Taken::Answered,
            Err(e) => {
                protocol::append_response(out, &Response { id, result: Err(e) });
                Taken::Answered
            }
        }
    }

    /// The operations of table `t`'s shard `shard` that a new one joins.
    fn group(&mut self, t: usize, shard: u32) -> (usize, &mut Vec<PipelineOp>) {
        // Only the newest group of a shard may grow: a full one is followed by a new one, sent
        // after it, so order is kept.
        let at = self.groups.iter().rposition(|(gt, gs, _)| *gt == t && *gs == shard);
        let at = match at {
            Some(i) if self.groups[i].2.len() < PIPELINE_OPS_MAX => i,
            _ => {
                self.groups.push((t, shard, Vec::new()));
                self.groups.len() - 1
            }
        };
        (at, &mut self.groups[at].2)
    }

    fn push(&mut self, t: usize, shard: u32, op: PipelineOp) -> (usize, usize) {
        let (g, ops) = self.group(t, shard);
        ops.push(op);
        (g, ops.len() - 1)
    }

    fn table(&mut self, grid: &GridCore, name: &str) -> Result<usize, GridError> {
        if let Some(i) = self.tables.iter().position(|t| t.def.name == name) {
            return Ok(i);
        }
        self.tables.push(grid.table(name)?);
        Ok(self.tables.len() - 1)
    }

    /// Whether this connection has a write in flight to shard `shard` of table `t` (earlier in
    /// this round or in an unanswered earlier one).
    fn writes_to(&self, t: usize, shard: u32) -> bool {
        self.wrote.contains(&(t, shard)) || self.writing.contains(&self.tables[t].def.name, shard)
    }

    /// The snapshot a read of shard `shard` of table `t` may use now: none while this
    /// connection has a write in flight there (the read must follow it).
    fn snapshot(&self, t: usize, shard: u32) -> Option<Arc<Snapshot>> {
        if self.writes_to(t, shard) { None } else { self.tables[t].snapshot(shard) }
    }

    /// Adds `op` to the groups of the shards it needs (`Ok(true)`), or answers it into `out`
    /// at once (`Ok(false)`): from snapshots, or needing no shard.
    fn plan(
        &mut self,
        grid: &GridCore,
        who: &Principal,
        id: u64,
        table: &str,
        op: TableOp,
        out: &mut Vec<u8>,
    ) -> Result<bool, GridError> {
        // Write results carry data (CAS `current`, updated values, existence), so a write needs
        // read as well.
        who.require(table, Permission::Read)?;
        if op.is_write() {
            who.require(table, Permission::Write)?;
        }
        let t = self.table(grid, table)?;
        let rt = self.tables[t].clone();
        let shards = rt.def.shards;
        if self.session.no_wait.load(Ordering::Relaxed) {
            // The shards the operation needs: its keys', or every one.
            let keys: Option<Vec<&heapgrid_actors::Key>> = match &op {
                TableOp::Get { key } | TableOp::GetCopy { key } | TableOp::Contains { key } => {
                    Some(vec![key])
                }
                TableOp::Write(w) => w.key().map(|k| vec![k]),
                TableOp::Batch(ws) => ws.iter().map(|w| w.key()).collect(),
                _ => None,
            };
            let needed: Vec<u32> = match keys {
                Some(keys) => keys.into_iter().map(|k| rt.shard_of(k)).collect(),
                None => (0..shards).collect(),
            };
            if let Some(e) = needed.into_iter().find_map(|i| rt.recovering(i)) {
                return Err(e);
            }
        }
        let one = |round: &mut Round, shard: u32, op: PipelineOp| {
            let (group, pos) = round.push(t, shard, op);
            round.slots.push(Slot::One { id, group, pos });
        };
        let answer = |out: &mut Vec<u8>, result: Result<OpResult, GridError>| {
            protocol::append_response(out, &Response { id, result: result.map(ResponseBody::Op) });
            Ok(false)
        };
        match op {
            // Planned here, this node serves the key's shard: a read of its copy is a read.
            TableOp::Get { key } | TableOp::GetCopy { key } => {
                let shard = rt.shard_of(&key);
                match self.snapshot(t, shard) {
                    Some(s) => {
                        let r = read::get_raw(&*s, &key)?;
                        let r = r.map(|r| RawVersioned { version: r.version, value: r.value.into_owned() });
                        protocol::append_get_response(out, id, r.as_ref());
                        return Ok(false);
                    }
                    None => one(self, shard, PipelineOp::Get(key)),
                }
            }
            TableOp::Contains { key } => {
                let shard = rt.shard_of(&key);
                match self.snapshot(t, shard) {
                    Some(s) => {
                        return answer(
                            out,
                            read::contains(&*s, &key).map(OpResult::Bool).map_err(Into::into),
                        );
                    }
                    None => one(self, shard, PipelineOp::Contains(key)),
                }
            }
            TableOp::Write(w) => {
                let shard = w.key().map_or(0, |k| rt.shard_of(k));
                self.wrote.push((t, shard));
                one(self, shard, PipelineOp::Write(w));
            }
            TableOp::Batch(ws) => match rt.batch_shard(&ws)? {
                Some(shard) => {
                    self.wrote.push((t, shard));
                    one(self, shard, PipelineOp::Batch(ws));
                }
                // Nothing to write: no shard to ask.
                None => return answer(out, Ok(OpResult::Written { lsn: 0, results: Vec::new() })),
            },
            TableOp::Eval(req) => {
                who.require(table, Permission::Eval)?;
                let mut req: heapgrid_actors::EvalRequest = req.into();
                req.read_only |= !who.allows(table, Permission::Write);
                let job = rt.prepare_eval(req)?;
                // A snippet may write: later reads of its shard follow it.
                self.wrote.push((t, job.shard));
                one(self, job.shard, PipelineOp::Eval(Box::new(job)));
            }
            TableOp::Count => {
                let snaps: Option<Vec<_>> = (0..shards).map(|s| self.snapshot(t, s)).collect();
                if let Some(snaps) = snaps {
                    return answer(out, Ok(OpResult::Count(snaps.iter().map(|s| read::count(&**s)).sum())));
                }
                if shards == 1 {
                    one(self, 0, PipelineOp::Count);
                } else {
                    let parts = (0..shards).map(|s| self.push(t, s, PipelineOp::Count)).collect();
                    self.slots.push(Slot::Count { id, parts });
                }
            }
            TableOp::Scan { start, end, limit, reverse } => {
                return self.scan(t, shards, id, ScanRange { start, end, limit, reverse }, out);
            }
            TableOp::Prefix { prefix, limit, reverse } => {
                return self.scan(t, shards, id, ScanRange::prefix(&prefix, limit, reverse), out);
            }
        }
        Ok(true)
    }

    fn scan(
        &mut self,
        t: usize,
        shards: u32,
        id: u64,
        range: ScanRange,
        out: &mut Vec<u8>,
    ) -> Result<bool, GridError> {
        let (limit, reverse) = (range.limit, range.reverse);
        let snaps: Option<Vec<_>> = (0..shards).map(|s| self.snapshot(t, s)).collect();
        if let Some(snaps) = snaps {
            let mut parts = Vec::with_capacity(snaps.len());
            for s in &snaps {
                parts.push(read::scan(&**s, &range)?);
            }
            let entries = merge(parts, limit, reverse);
            protocol::append_response(
                out,
                &Response { id, result: Ok(ResponseBody::Op(OpResult::Entries(entries))) },
            );
            return Ok(false);
        }
        if shards == 1 {
            let (group, pos) = self.push(t, 0, PipelineOp::Scan(range));
            self.slots.push(Slot::One { id, group, pos });
            return Ok(true);
        }
        let parts = (0..shards).map(|s| self.push(t, s, PipelineOp::Scan(range.clone()))).collect();
        self.slots.push(Slot::Scan { id, parts, limit, reverse });
        Ok(true)
    }

    /// Sends one message per group (now, in order) and returns the futures of the round's
    /// encoded responses: one for the requests whose shards all run, and one for each set of
    /// requests that need a shard still starting (recovering after a restart, or restarting),
    /// so a shard that replays its op log holds up only the requests that need it, not the
    /// round, nor requests waiting for another starting shard.
    fn dispatch(self) -> (Vec<Pending>, Vec<ShardKey>) {
        let Round { tables, groups, slots, wrote, .. } = self;
        let n = groups.len();
        let late: Vec<bool> = groups.iter().map(|(t, s, _)| tables[*t].starting(*s)).collect();
        if !late.contains(&true) {
            // Every shard runs (the usual case): one future for the whole round.
            let wrote: Vec<ShardKey> =
                wrote.into_iter().map(|(t, s)| (tables[t].def.name.clone(), s)).collect();
            let calls =
                groups.into_iter().enumerate().map(|(g, (t, s, ops))| (g, tables[t].pipeline(s, ops)));
            let pending: Pending = Box::pin(answer_round(slots, calls.collect(), n, wrote.clone()));
            return (vec![pending], wrote);
        }
        // Groups joined by a request that needs them both (a count or scan) are answered together.
        let mut parent: Vec<usize> = (0..n).collect();
        fn root(parent: &mut [usize], mut g: usize) -> usize {
            while parent[g] != g {
                parent[g] = parent[parent[g]];
                g = parent[g];
            }
            g
        }
        // So are the groups of one shard (more than one past `PIPELINE_OPS_MAX` operations): the
        // connection's mark of a write in flight to the shard goes with the last of them.
        let mut joins: Vec<(usize, usize)> = Vec::new();
        for slot in &slots {
            joins.extend(slot.groups().windows(2).map(|w| (w[0], w[1])));
        }
        for (a, (t, s, _)) in groups.iter().enumerate() {
            if let Some(b) = groups[a + 1..].iter().position(|(gt, gs, _)| gt == t && gs == s) {
                joins.push((a, a + 1 + b));
            }
        }
        for (a, b) in joins {
            let (a, b) = (root(&mut parent, a), root(&mut parent, b));
            parent[a] = b;
        }
        let mut late_root = vec![false; n];
        for (g, &l) in late.iter().enumerate() {
            let r = root(&mut parent, g);
            late_root[r] |= l;
        }
        // Every group's answer: `READY` for those with no starting shard, else its root.
        const READY: usize = usize::MAX;
        let bucket_of: Vec<usize> = (0..n)
            .map(|g| {
                let r = root(&mut parent, g);
                if late_root[r] { r } else { READY }
            })
            .collect();
        type Bucket = (Vec<Slot>, Vec<(usize, GroupReply)>, Vec<ShardKey>);
        let mut buckets: std::collections::BTreeMap<usize, Bucket> = std::collections::BTreeMap::new();
        let mut all_wrote = Vec::with_capacity(wrote.len());
        for (t, s) in wrote {
            let key = (tables[t].def.name.clone(), s);
            let b =
                groups.iter().position(|(gt, gs, _)| *gt == t && *gs == s).map_or(READY, |g| bucket_of[g]);
            buckets.entry(b).or_default().2.push(key.clone());
            all_wrote.push(key);
        }
        for (g, (t, shard, ops)) in groups.into_iter().enumerate() {
            buckets.entry(bucket_of[g]).or_default().1.push((g, tables[t].pipeline(shard, ops)));
        }
        for slot in slots {
            let b = slot.groups().first().map_or(READY, |&g| bucket_of[g]);
            buckets.entry(b).or_default().0.push(slot);
        }
        let pending = buckets
            .into_values()
            .filter(|(slots, _, _)| !slots.is_empty())
            .map(|(slots, calls, wrote)| Box::pin(answer_round(slots, calls, n, wrote)) as Pending)
            .collect();
        (pending, all_wrote)
    }
}

/// Waits for `calls` (of the round's `n` groups, by index) and encodes the responses of
/// `slots`, in order.
async fn answer_round(
    slots: Vec<Slot>,
    calls: Vec<(usize, GroupReply)>,
    n: usize,
    wrote: Vec<ShardKey>,
) -> Done {
    let requests = slots.len();
    let mut replies: Vec<Vec<Option<Result<PipelineReply, GridError>>>> =
        (0..n).map(|_| Vec::new()).collect();
    let (index, futures): (Vec<usize>, Vec<_>) = calls.into_iter().unzip();
    for (g, r) in index.into_iter().zip(futures_util::future::join_all(futures).await) {
        replies[g] = r.into_iter().map(Some).collect();
    }
    let mut take = |(g, p): (usize, usize)| {
        replies[g]
            .get_mut(p)
            .and_then(Option::take)
            .unwrap_or_else(|| Err(GridError::Unavailable("reply missing".into())))
    };
    let mut out = Vec::new();
    for slot in slots {
        match slot {
            Slot::One { id, group, pos } => match take((group, pos)) {
                Ok(PipelineReply::Record(r)) => protocol::append_get_response(&mut out, id, r.as_ref()),
                r => protocol::append_response(&mut out, &Response { id, result: r.and_then(wire_result) }),
            },
            Slot::Count { id, parts } => {
                let mut total = Ok(0u64);
                for part in parts {
                    total = match (total, take(part)) {
                        (Ok(n), Ok(PipelineReply::Count(c))) => Ok(n + c),
                        (Err(e), _) | (_, Err(e)) => Err(e),
                        (Ok(_), Ok(r)) => Err(mismatch(&r)),
                    };
                }
                let result = total.map(|n| ResponseBody::Op(OpResult::Count(n)));
                protocol::append_response(&mut out, &Response { id, result });
            }
            Slot::Scan { id, parts, limit, reverse } => {
                let mut all = Ok(Vec::new());
                for part in parts {
                    all = match (all, take(part)) {
                        (Ok(mut v), Ok(PipelineReply::Entries(e))) => {
                            v.extend(e);
                            Ok(v)
                        }
                        (Err(e), _) | (_, Err(e)) => Err(e),
                        (Ok(_), Ok(r)) => Err(mismatch(&r)),
                    };
                }
                let result = all.map(|v| ResponseBody::Op(OpResult::Entries(merge([v], limit, reverse))));
                protocol::append_response(&mut out, &Response { id, result });
            }
        }
    }
    Done { bytes: out, requests, wrote }
}

/// A snippet's answer: its value, with what it printed if it printed anything (`Printed`).
fn with_printed(value: Value, sink: &heapgrid_actors::snippet::PrintSink) -> ResponseBody {
    let printed = std::mem::take(&mut *sink.lock().unwrap_or_else(|e| e.into_inner()));
    if printed.is_empty() { ResponseBody::Value(value) } else { ResponseBody::Printed { value, printed } }
}

async fn detached<F>(f: F) -> Result<ResponseBody, GridError>
where
    F: std::future::Future<Output = Result<ResponseBody, GridError>> + Send + 'static,
{
    tokio::spawn(f).await.unwrap_or_else(|e| Err(GridError::Unavailable(format!("admin task failed: {e}"))))
}

/// A request that runs as a future of its own, answering one response.
fn alone<F>(id: u64, f: F) -> Taken
where
    F: std::future::Future<Output = Result<ResponseBody, GridError>> + Send + 'static,
{
    Taken::Alone(Box::pin(async move {
        let mut bytes = Vec::new();
        protocol::append_response(&mut bytes, &Response { id, result: f.await });
        Done { bytes, requests: 1, wrote: Vec::new() }
    }))
}

/// A shard's reply as the wire's answer. A `Record` is normally written by
/// `append_get_response` straight from its bytes; here it is decoded.
fn wire_result(r: PipelineReply) -> Result<ResponseBody, GridError> {
    Ok(ResponseBody::Op(match r {
        PipelineReply::Record(r) => OpResult::Value(
            r.map(|r| {
                Value::decode(&r.value)
                    .map(|value| Versioned { version: r.version, value })
                    .map_err(|e| GridError::Corrupted(format!("stored value: {e}")))
            })
            .transpose()?,
        ),
        PipelineReply::Bool(b) => OpResult::Bool(b),
        PipelineReply::Count(n) => OpResult::Count(n),
        PipelineReply::Entries(e) => OpResult::Entries(e),
        PipelineReply::Written(w) => OpResult::Written { lsn: w.lsn, results: w.results },
        PipelineReply::Snippet(v) => OpResult::Snippet(v),
    }))
}

/// Entries of several shards in key order (descending if `reverse`), at most `limit`.
fn merge(
    parts: impl IntoIterator<Item = Vec<(Key, Versioned)>>,
    limit: u32,
    reverse: bool,
) -> Vec<(Key, Versioned)> {
    let mut all: Vec<(Key, Versioned)> = parts.into_iter().flatten().collect();
    all.sort_by(|a, b| if reverse { b.0.cmp(&a.0) } else { a.0.cmp(&b.0) });
    all.truncate(limit as usize);
    all
}

/// A shard answered a merged request with another kind of reply (a bug, not a user error).
fn mismatch(r: &PipelineReply) -> GridError {
    GridError::Corrupted(format!("a shard answered a merged request with {r:?}"))
}

/// The name permissions use for stored procedures.
pub const PROCEDURES: &str = "procedures";
