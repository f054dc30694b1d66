//! Node-to-node transport (shared CLUSTER.md, "Control plane"): everything one node sends another
//! goes through `Transport`, so tests can put a `Relay` in between that delays, drops or
//! blackholes a link without iptables.
//!
//! - `send` never blocks and may lose a frame (peer down, its queue full, a connection broken):
//!   the protocols above (replication, heartbeats) resend, so loss is their normal case.
//! - `TcpTransport`: one outbound connection per peer, made on first use and remade with backoff
//!   after a failure; inbound connections from any peer that presents the cluster's cookie.
//! - `LocalNet`: an in-process network for tests.
//!
//! Wire format of a TCP connection (either direction is one-way: the dialer sends, the listener
//! reads):
//!
//! ```text
//! hello:  "HGPR" | version u8 (1) | node id u64 LE | cookie length u16 LE | cookie bytes
//! frames: length u32 LE (≤ FRAME_BYTES_MAX) | bytes
//! ```
//!
//! A listener that reads a bad hello (wrong magic, version or cookie) closes the connection
//! without reading further.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::replication::NodeId;

/// Frames to this node: `(sender, bytes)`.
pub type Inbox = mpsc::Receiver<(NodeId, Vec<u8>)>;

type InboxTx = mpsc::Sender<(NodeId, Vec<u8>)>;

/// Largest frame.
pub const FRAME_BYTES_MAX: usize = 64 << 20;
/// Frames queued for one peer before new ones are dropped.
pub const PEER_QUEUE_MAX: usize = 4096;
/// Frames queued in a node's inbox before its connections stop being read.
pub const INBOX_MAX: usize = 16_384;
/// Inbound connections read at once; more are closed at accept (before their hello).
pub const INBOUND_MAX: usize = 1024;
/// Frames a `Relay` holds back for their delay at once; more are dropped (as a lossy link would).
pub const RELAY_DELAYED_MAX: usize = 65_536;
const MAGIC: &[u8; 4] = b"HGPR";
const VERSION: u8 = 1;
const COOKIE_BYTES_MAX: usize = 1024;

/// How nodes reach each other.
pub trait Transport: Send + Sync + 'static {
    /// Queues `frame` for node `to`. Never blocks; the frame may be lost.
    fn send(&self, to: NodeId, frame: Vec<u8>);
    /// Node `id` listens at `addr` (a peer address from the cluster map); transports that route
    /// by id alone ignore it.
    fn set_address(&self, _id: NodeId, _addr: &str) {}
}

/// Constant-time comparison (the cookie is a secret).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

struct Peer {
    tx: mpsc::Sender<Vec<u8>>,
    task: tokio::task::JoinHandle<()>,
}

/// Peers over TCP.
pub struct TcpTransport {
    me: NodeId,
    cookie: Arc<Vec<u8>>,
    addrs: Arc<Mutex<HashMap<NodeId, SocketAddr>>>,
    peers: Mutex<HashMap<NodeId, Peer>>,
    accept: tokio::task::JoinHandle<()>,
    local: SocketAddr,
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.accept.abort();
        for (_, p) in self.peers.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            p.task.abort();
        }
    }
}

impl TcpTransport {
    /// Listens on `listen` as node `me`; peers must present `cookie`.
    pub async fn bind(
        me: NodeId,
        listen: SocketAddr,
        cookie: &str,
    ) -> std::io::Result<(Arc<TcpTransport>, Inbox)> {
        if cookie.is_empty() || cookie.len() > COOKIE_BYTES_MAX {
            return Err(std::io::Error::other(format!("a cluster cookie is 1 to {COOKIE_BYTES_MAX} bytes")));
        }
        let listener = TcpListener::bind(listen).await?;
        let local = listener.local_addr()?;
        let (tx, inbox) = mpsc::channel(INBOX_MAX);
        let cookie = Arc::new(cookie.as_bytes().to_vec());
        let accept = tokio::spawn(accept_loop(listener, cookie.clone(), tx));
        let t = TcpTransport { me, cookie, addrs: Arc::default(), peers: Mutex::default(), accept, local };
        Ok((Arc::new(t), inbox))
    }

    /// Where this node listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Where node `id` listens (a changed address takes effect on the next connection).
    pub fn set_peer(&self, id: NodeId, addr: SocketAddr) {
        self.addrs.lock().unwrap_or_else(|e| e.into_inner()).insert(id, addr);
    }
}

impl Transport for TcpTransport {
    fn set_address(&self, id: NodeId, addr: &str) {
        use std::net::ToSocketAddrs;
        match addr.parse::<SocketAddr>() {
            Ok(a) => self.set_peer(id, a),
            // A host name: resolved now (later changes need a new address in the map).
            Err(_) => match addr.to_socket_addrs().map(|mut a| a.next()) {
                Ok(Some(a)) => self.set_peer(id, a),
                _ => tracing::warn!(node = id, addr, "a peer address that does not resolve"),
            },
        }
    }

    fn send(&self, to: NodeId, frame: Vec<u8>) {
        if frame.len() > FRAME_BYTES_MAX {
            return;
        }
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let peer = peers.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(PEER_QUEUE_MAX);
            let task = tokio::spawn(dial_loop(self.me, to, self.addrs.clone(), self.cookie.clone(), rx));
            Peer { tx, task }
        });
        // Full: dropped (the protocols resend).
        let _ = peer.tx.try_send(frame);
    }
}

/// Keeps one connection to `to` and writes its queued frames, reconnecting with backoff. A
/// frame being written when the connection breaks is lost.
async fn dial_loop(
    me: NodeId,
    to: NodeId,
    addrs: Arc<Mutex<HashMap<NodeId, SocketAddr>>>,
    cookie: Arc<Vec<u8>>,
    mut rx: mpsc::Receiver<Vec<u8>>,
) {
    let mut backoff = Duration::from_millis(20);
    loop {
        // Looked up at every attempt: the address may be learned (or change) later.
        let addr = addrs.lock().unwrap_or_else(|e| e.into_inner()).get(&to).copied();
        let connected = match addr {
            Some(a) => TcpStream::connect(a).await,
            None => Err(std::io::Error::other("no address yet")),
        };
        let mut s = match connected {
            Ok(s) => s,
            Err(_) => {
                // Frames queued meanwhile are kept (up to the queue's bound).
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        let mut hello = Vec::with_capacity(15 + cookie.len());
        hello.extend_from_slice(MAGIC);
        hello.push(VERSION);
        hello.extend_from_slice(&me.to_le_bytes());
        hello.extend_from_slice(&(cookie.len() as u16).to_le_bytes());
        hello.extend_from_slice(&cookie);
        if s.write_all(&hello).await.is_err() {
            continue;
        }
        backoff = Duration::from_millis(20);
        let mut buf = Vec::new();
        while let Some(frame) = rx.recv().await {
            buf.clear();
            buf.extend_from_slice(&(frame.len() as u32).to_le_bytes());
            buf.extend_from_slice(&frame);
            // More that is ready goes in the same write.
            while buf.len() < 1 << 20
                && let Ok(more) = rx.try_recv()
            {
                buf.extend_from_slice(&(more.len() as u32).to_le_bytes());
                buf.extend_from_slice(&more);
            }
            if s.write_all(&buf).await.is_err() {
                break;
            }
        }
        if rx.is_closed() {
            return;
        }
    }
}

async fn accept_loop(listener: TcpListener, cookie: Arc<Vec<u8>>, inbox: mpsc::Sender<(NodeId, Vec<u8>)>) {
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let Ok((s, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if open.load(std::sync::atomic::Ordering::Relaxed) >= INBOUND_MAX {
            drop(s);
            continue;
        }
        let _ = s.set_nodelay(true);
        open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (cookie, inbox, open) = (cookie.clone(), inbox.clone(), open.clone());
        tokio::spawn(async move {
            read_peer(s, cookie, inbox).await;
            open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        });
    }
}

/// Reads one inbound connection: its hello, then frames into the inbox.
async fn read_peer(mut s: TcpStream, cookie: Arc<Vec<u8>>, inbox: mpsc::Sender<(NodeId, Vec<u8>)>) {
    let mut head = [0u8; 15];
    let hello = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head)).await;
    if !matches!(hello, Ok(Ok(_))) || &head[..4] != MAGIC || head[4] != VERSION {
        return;
    }
    let from = u64::from_le_bytes(head[5..13].try_into().expect("8 bytes"));
    let len = u16::from_le_bytes([head[13], head[14]]) as usize;
    if len > COOKIE_BYTES_MAX {
        return;
    }
    let mut presented = vec![0u8; len];
    if s.read_exact(&mut presented).await.is_err() || !same(&presented, &cookie) {
        return;
    }
    loop {
        let mut len = [0u8; 4];
        if s.read_exact(&mut len).await.is_err() {
            return;
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > FRAME_BYTES_MAX {
            return;
        }
        let mut frame = vec![0u8; len];
        if s.read_exact(&mut frame).await.is_err() || inbox.send((from, frame)).await.is_err() {
            return;
        }
    }
}

/// The faults a `Relay` applies to one link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkFault {
    /// Frames dropped per thousand.
    pub drop_per_mille: u32,
    /// Added to every frame (frames may overtake each other).
    pub delay_ms: u64,
    /// Everything dropped.
    pub blackhole: bool,
}

/// A transport with faults on chosen links, for tests.
pub struct Relay<T: Transport> {
    inner: Arc<T>,
    faults: Mutex<HashMap<NodeId, LinkFault>>,
    rng: Mutex<u64>,
    delayed: Arc<std::sync::atomic::AtomicUsize>,
}

impl<T: Transport> Relay<T> {
    pub fn new(inner: Arc<T>, seed: u64) -> Relay<T> {
        Relay { inner, faults: Mutex::default(), rng: Mutex::new(seed | 1), delayed: Arc::default() }
    }

    /// Sets the faults of the link to `to` (the default: none).
    pub fn set(&self, to: NodeId, fault: LinkFault) {
        self.faults.lock().unwrap_or_else(|e| e.into_inner()).insert(to, fault);
    }

    fn roll(&self) -> u32 {
        let mut x = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        (*x % 1000) as u32
    }
}

impl<T: Transport> Transport for Relay<T> {
    fn set_address(&self, id: NodeId, addr: &str) {
        self.inner.set_address(id, addr);
    }

    fn send(&self, to: NodeId, frame: Vec<u8>) {
        let f = self.faults.lock().unwrap_or_else(|e| e.into_inner()).get(&to).copied().unwrap_or_default();
        if f.blackhole || (f.drop_per_mille > 0 && self.roll() < f.drop_per_mille) {
            return;
        }
        if f.delay_ms == 0 {
            return self.inner.send(to, frame);
        }
        use std::sync::atomic::Ordering;
        if self.delayed.load(Ordering::Relaxed) >= RELAY_DELAYED_MAX {
            return;
        }
        self.delayed.fetch_add(1, Ordering::Relaxed);
        let (inner, delayed) = (self.inner.clone(), self.delayed.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(f.delay_ms)).await;
            inner.send(to, frame);
            delayed.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// An in-process network: every node joined gets an inbox.
#[derive(Default)]
pub struct LocalNet {
    inboxes: Mutex<HashMap<NodeId, InboxTx>>,
}

/// One node's side of a `LocalNet`.
pub struct LocalTransport {
    me: NodeId,
    net: Arc<LocalNet>,
}

impl LocalNet {
    /// Node `id` joins (again: its old inbox is replaced, as after a restart).
    pub fn join(self: &Arc<Self>, id: NodeId) -> (LocalTransport, Inbox) {
        let (tx, rx) = mpsc::channel(INBOX_MAX);
        self.inboxes.lock().unwrap_or_else(|e| e.into_inner()).insert(id, tx);
        (LocalTransport { me: id, net: self.clone() }, rx)
    }
}

impl Transport for LocalTransport {
    fn send(&self, to: NodeId, frame: Vec<u8>) {
        if let Some(tx) = self.net.inboxes.lock().unwrap_or_else(|e| e.into_inner()).get(&to) {
            let _ = tx.try_send((self.me, frame));
        }
    }
}
