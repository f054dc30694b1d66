//! The TCP server behind `heapgrid serve`: accepts connections, runs the handshake (protocol
//! version, token), then serves pipelined requests concurrently up to a per-connection in-flight
//! limit, writing responses as they complete.
//!
//! Backpressure: with `inflight_max` requests of a connection running, the server stops reading
//! that socket, so a fast client fills its socket buffer instead of the server's memory.
//!
//! Graceful shutdown (`Server::shutdown`): stop accepting, let every connection finish the
//! requests it has read (no new ones are read), flush their responses, then return; the caller
//! then closes the grid, which checkpoints every shard.
//!
//! Invariant: a connection's failure (malformed frame, oversized frame, failed handshake, a peer
//! that disconnects mid-request) ends that connection only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use heapgrid_actors::grid::{AccessCheck, GridCore};
use heapgrid_actors::{GridError, TableOp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::auth::{Auth, Permission, Principal, TokenConfig};
use crate::protocol::{
    self, FrameError, Hello, HelloReply, MAGIC, PROTOCOL_VERSION, Request, RequestBody, Response,
    ResponseBody,
};

/// Default cap on connections served at once.
pub const CONNECTIONS_MAX_DEFAULT: usize = 10_000;
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

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub inflight_max: usize,
    /// Connections served at once; more are refused with an error.
    pub connections_max: usize,
    pub tokens: Vec<TokenConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: ([127, 0, 0, 1], 7070).into(),
            inflight_max: INFLIGHT_MAX_DEFAULT,
            connections_max: CONNECTIONS_MAX_DEFAULT,
            tokens: Vec::new(),
        }
    }
}

/// A running server.
pub struct Server {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
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
        let (stop, stop_rx) = watch::channel(false);
        let inflight = cfg.inflight_max.max(1);
        let task =
            tokio::spawn(accept_loop(listener, grid, auth, inflight, cfg.connections_max.max(1), stop_rx));
        Ok(Server { local_addr, stop, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, finishes in-flight requests on every connection, then returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    grid: Arc<GridCore>,
    auth: Arc<Auth>,
    inflight: usize,
    connections_max: usize,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((mut sock, _peer)) => {
                    if conns.len() >= connections_max {
                        // Refuse with a reason the client can show, without reading anything.
                        let error = GridError::Unavailable(format!("server is at its limit of {connections_max} connections"));
                        tokio::spawn(async move {
                            let _ = protocol::write_msg(&mut sock, &HelloReply::Refused { error }).await;
                        });
                        continue;
                    }
                    let _ = sock.set_nodelay(true);
                    conns.spawn(connection(sock, grid.clone(), auth.clone(), inflight, stop.clone()));
                }
                // Out of descriptors and the like: back off briefly instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
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
}

impl Input {
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
        let n = self.rd.read_buf(&mut self.buf).await?;
        Ok(n > 0)
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

type Pending = std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>>;

/// One connection. Its requests run as futures polled by this one task (no task per request,
/// no writer task): a shard's reply wakes this task, which gathers every finished response into
/// one write.
async fn connection(
    sock: TcpStream,
    grid: Arc<GridCore>,
    auth: Arc<Auth>,
    inflight: usize,
    mut stop: watch::Receiver<bool>,
) {
    let (rd, mut wr) = sock.into_split();
    let mut input = Input { rd, buf: Vec::with_capacity(IO_BUFFER_BYTES), at: 0 };
    let who = match handshake(&mut input, &auth).await {
        Ok(p) => Arc::new(p),
        Err(error) => {
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
    let mut running: FuturesUnordered<Pending> = FuturesUnordered::new();
    let mut out = Vec::with_capacity(IO_BUFFER_BYTES);
    let mut reading = true;
    loop {
        // Start every complete request already buffered, up to the in-flight limit.
        while reading && running.len() < inflight {
            match input.frame() {
                None => break,
                Some(Ok(payload)) => match protocol::decode::<Request>(&payload) {
                    Ok(req) if req.id == 0 => {
                        append_response(
                            &mut out,
                            &Response {
                                id: 0,
                                result: Err(GridError::Protocol("request id 0 is reserved".into())),
                            },
                        );
                        reading = false;
                    }
                    Ok(req) => {
                        let (grid, who) = (grid.clone(), who.clone());
                        running.push(Box::pin(async move {
                            Response { id: req.id, result: handle(&grid, &who, req.body).await }
                        }));
                    }
                    Err(e) => {
                        append_response(
                            &mut out,
                            &Response { id: 0, result: Err(GridError::Protocol(e.to_string())) },
                        );
                        reading = false;
                    }
                },
                Some(Err(e)) => {
                    append_response(
                        &mut out,
                        &Response { id: 0, result: Err(GridError::Protocol(e.to_string())) },
                    );
                    reading = false;
                }
            }
        }
        if !out.is_empty() && (running.is_empty() || out.len() >= IO_BUFFER_BYTES) {
            if !matches!(tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&out)).await, Ok(Ok(()))) {
                return;
            }
            out.clear();
        }
        if !reading && running.is_empty() {
            break;
        }
        tokio::select! {
            done = running.next(), if !running.is_empty() => {
                if let Some(resp) = done {
                    append_response(&mut out, &resp);
                    // Gather whatever else has finished, then write once.
                    while let Some(Some(resp)) = running.next().now_or_never() {
                        append_response(&mut out, &resp);
                    }
                    if !matches!(tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&out)).await, Ok(Ok(()))) {
                        return;
                    }
                    out.clear();
                }
            }
            more = input.fill(), if reading && running.len() < inflight => match more {
                Ok(true) => {}
                Ok(false) => {
                    // End of stream: finish what was read (a truncated frame is just dropped).
                    reading = false;
                }
                Err(_) => reading = false,
            },
            _ = stop.changed(), if reading => reading = false,
        }
    }
    let _ = wr.shutdown().await;
}

/// Appends one response frame (or, if it cannot be encoded, an error frame for its id).
fn append_response(out: &mut Vec<u8>, resp: &Response) {
    let frame = protocol::encode(resp).or_else(|e| {
        protocol::encode(&Response { id: resp.id, result: Err(GridError::Protocol(e.to_string())) })
    });
    if let Ok(f) = frame {
        out.extend_from_slice(&f);
    }
}

async fn detached<F>(f: F) -> Result<ResponseBody, GridError>
where
    F: std::future::Future<Output = Result<ResponseBody, GridError>> + Send + 'static,
{
    tokio::spawn(f).await.unwrap_or_else(|e| Err(GridError::Unavailable(format!("admin task failed: {e}"))))
}

/// The name permissions use for stored procedures.
pub const PROCEDURES: &str = "procedures";

async fn handle(grid: &Arc<GridCore>, who: &Principal, body: RequestBody) -> Result<ResponseBody, GridError> {
    match body {
        RequestBody::Ping => Ok(ResponseBody::Pong),
        RequestBody::ListTables => Ok(ResponseBody::Tables(
            grid.list_tables().into_iter().filter(|t| who.allows(&t.name, Permission::Read)).collect(),
        )),
        // Catalogue changes run as their own tasks: a connection that goes away cannot cancel
        // them halfway (between the catalogue and the running tables).
        RequestBody::CreateTable { name, options } => {
            who.require(&name, Permission::Admin)?;
            let grid = grid.clone();
            detached(async move { grid.create_table(&name, options).await.map(|_| ResponseBody::Done) }).await
        }
        RequestBody::DropTable { name } => {
            who.require(&name, Permission::Admin)?;
            let grid = grid.clone();
            detached(async move { grid.drop_table(&name).await.map(|_| ResponseBody::Done) }).await
        }
        RequestBody::Table { table, mut op } => {
            // Write results carry data (CAS `current`, updated values, existence), so a write
            // needs read as well.
            who.require(&table, Permission::Read)?;
            if op.is_write() {
                who.require(&table, Permission::Write)?;
            }
            if let TableOp::Eval(req) = &mut op {
                who.require(&table, Permission::Eval)?;
                req.read_only |= !who.allows(&table, Permission::Write);
            }
            Ok(ResponseBody::Op(grid.table(&table)?.execute(op).await?))
        }
        RequestBody::Eval { src, args, limits } => {
            let who = who.clone();
            let access: AccessCheck = Arc::new(move |coll: &str, write: bool| {
                who.require(coll, Permission::Eval)?;
                who.require(coll, Permission::Read)?;
                if write {
                    who.require(coll, Permission::Write)?;
                }
                Ok(())
            });
            Ok(ResponseBody::Value(grid.eval(&src, args, &limits, access).await?))
        }
        RequestBody::Fetch { reference, offset, limit } => {
            let who = who.clone();
            let access: AccessCheck = Arc::new(move |coll: &str, _| who.require(coll, Permission::Read));
            Ok(ResponseBody::Value(grid.fetch(&reference, offset, limit, access).await?))
        }
        RequestBody::PutProcedures { module, src } => {
            who.require(PROCEDURES, Permission::Admin)?;
            grid.put_procedures(&module, &src)?;
            Ok(ResponseBody::Done)
        }
        RequestBody::DropProcedures { module } => {
            who.require(PROCEDURES, Permission::Admin)?;
            grid.drop_procedures(&module)?;
            Ok(ResponseBody::Done)
        }
    }
}
