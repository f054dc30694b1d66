//! The TCP server behind `heapgrid serve`: accepts connections, runs the handshake (protocol
//! version, token), then serves pipelined requests concurrently up to a per-connection in-flight
//! limit, writing responses as they complete.
//!
//! Backpressure: a connection's reader takes a permit before reading each request; with
//! `inflight_max` requests running it stops reading, so a fast client fills its socket buffer
//! instead of the server's memory.
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

use heapgrid_actors::GridError;
use heapgrid_actors::grid::GridCore;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use crate::auth::{Auth, Permission, Principal, TokenConfig};
use crate::protocol::{
    self, FrameError, Hello, HelloReply, MAGIC, PROTOCOL_VERSION, Request, RequestBody, Response,
    ResponseBody,
};

/// Default requests in flight per connection.
pub const INFLIGHT_MAX_DEFAULT: usize = 256;
/// Socket read buffer, and the most response bytes gathered into one write.
const IO_BUFFER_BYTES: usize = 64 * 1024;
/// How long a new connection has to send its `Hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub inflight_max: usize,
    pub tokens: Vec<TokenConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: ([127, 0, 0, 1], 7070).into(),
            inflight_max: INFLIGHT_MAX_DEFAULT,
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
        let task = tokio::spawn(accept_loop(listener, grid, auth, inflight, stop_rx));
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
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((sock, _peer)) => {
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

async fn handshake<R: tokio::io::AsyncRead + Unpin>(rd: &mut R, auth: &Auth) -> Result<Principal, GridError> {
    let mut buf = Vec::new();
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, protocol::read_frame(rd, &mut buf)).await {
        Err(_) => return Err(GridError::Protocol("no hello within the handshake timeout".into())),
        Ok(Err(e)) => return Err(GridError::Protocol(e.to_string())),
        Ok(Ok(())) => {}
    }
    let hello: Hello = protocol::decode(&buf).map_err(|e| GridError::Protocol(format!("hello: {e}")))?;
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

async fn connection(
    sock: TcpStream,
    grid: Arc<GridCore>,
    auth: Arc<Auth>,
    inflight: usize,
    mut stop: watch::Receiver<bool>,
) {
    let (rd, mut wr) = sock.into_split();
    // Buffered reads: one syscall serves many pipelined frames.
    let mut rd = tokio::io::BufReader::with_capacity(IO_BUFFER_BYTES, rd);
    let who = match handshake(&mut rd, &auth).await {
        Ok(p) => p,
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
    // The writer owns the socket's write half; responses arrive in completion order.
    let (tx, mut rx) = mpsc::channel::<Response>(inflight);
    let writer = tokio::spawn(async move {
        let mut out = Vec::with_capacity(IO_BUFFER_BYTES);
        while let Some(resp) = rx.recv().await {
            // Gather every response that is ready into one write.
            out.clear();
            append_response(&mut out, &resp);
            while out.len() < IO_BUFFER_BYTES {
                match rx.try_recv() {
                    Ok(more) => append_response(&mut out, &more),
                    Err(_) => break,
                }
            }
            if wr.write_all(&out).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let permits = Arc::new(Semaphore::new(inflight));
    let who = Arc::new(who);
    let mut buf = Vec::new();
    loop {
        let permit = tokio::select! {
            _ = stop.changed() => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let read = tokio::select! {
            _ = stop.changed() => break,
            r = protocol::read_frame(&mut rd, &mut buf) => r,
        };
        let req: Request = match read.and_then(|_| protocol::decode(&buf)) {
            Ok(r) => r,
            Err(FrameError::Closed) => break,
            Err(e) => {
                let _ = tx.send(Response { id: 0, result: Err(GridError::Protocol(e.to_string())) }).await;
                break;
            }
        };
        let (grid, who, tx) = (grid.clone(), who.clone(), tx.clone());
        tokio::spawn(async move {
            let result = handle(&grid, &who, req.body).await;
            let _ = tx.send(Response { id: req.id, result }).await;
            drop(permit);
        });
    }
    // Let the requests already read finish (each holds a permit), then close.
    let _ = permits.acquire_many(inflight as u32).await;
    drop(tx);
    let _ = writer.await;
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

async fn handle(grid: &GridCore, who: &Principal, body: RequestBody) -> Result<ResponseBody, GridError> {
    match body {
        RequestBody::Ping => Ok(ResponseBody::Pong),
        RequestBody::ListTables => Ok(ResponseBody::Tables(
            grid.list_tables().into_iter().filter(|t| who.allows(&t.name, Permission::Read)).collect(),
        )),
        RequestBody::CreateTable { name, options } => {
            who.require(&name, Permission::Admin)?;
            grid.create_table(&name, options).await?;
            Ok(ResponseBody::Done)
        }
        RequestBody::DropTable { name } => {
            who.require(&name, Permission::Admin)?;
            grid.drop_table(&name).await?;
            Ok(ResponseBody::Done)
        }
        RequestBody::Table { table, op } => {
            let need = if op.is_write() { Permission::Write } else { Permission::Read };
            who.require(&table, need)?;
            Ok(ResponseBody::Op(grid.table(&table)?.execute(op).await?))
        }
    }
}
