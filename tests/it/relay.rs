//! A TCP relay between cluster processes, for partitions without iptables (shared
//! CLUSTER.md: "tests can put a relay in between"): each node advertises its relay's address
//! as its peer address (`--advertise-peer`), so every connection *to* that node passes through
//! the relay, which reads the connecting node's id from the transport's hello
//! (`"HGPR" | version u8 | node id u64 LE | ...`).
//!
//! - `block(sources)`: connections from those nodes (or from every node, `None`) are held open
//!   and what they send is dropped, as a partition drops packets.
//! - `heal()`: ends every connection (so no stream resumes mid-frame), then relays again.
//!
//! Every change of mode closes the connections open before it, which therefore reconnect under
//! the new mode.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Who may not reach the node behind the relay: `None` is nobody blocked; `Some(None)`
/// everyone; `Some(Some(ids))` those nodes.
type Blocked = Option<Option<HashSet<u64>>>;

#[derive(Default)]
struct Mode {
    blocked: Blocked,
}

pub struct TcpRelay {
    pub addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    /// Bumped at every change of mode: connections of an older generation close.
    generation: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const HELLO_PREFIX: usize = 4 + 1 + 8;

impl TcpRelay {
    /// A relay on a free port of 127.0.0.1, to `target`.
    pub async fn start(target: SocketAddr) -> TcpRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(Mutex::new(Mode::default()));
        let (generation, gen_rx) = watch::channel(0u64);
        let m = mode.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else { continue };
                tokio::spawn(relay_one(s, target, m.clone(), gen_rx.clone()));
            }
        });
        TcpRelay { addr, mode, generation, task }
    }

    /// Drops what `sources` (every node: `None`) send to the node behind this relay.
    pub fn block(&self, sources: Option<&[u64]>) {
        self.mode.lock().unwrap().blocked = Some(sources.map(|s| s.iter().copied().collect()));
        self.generation.send_modify(|g| *g += 1);
    }

    /// Relays everything again (after closing every connection).
    pub fn heal(&self) {
        self.mode.lock().unwrap().blocked = None;
        self.generation.send_modify(|g| *g += 1);
    }
}

async fn relay_one(
    mut from: TcpStream,
    target: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    mut generation: watch::Receiver<u64>,
) {
    let born = *generation.borrow_and_update();
    let mut hello = [0u8; HELLO_PREFIX];
    let read = tokio::select! {
        r = from.read_exact(&mut hello) => r.is_ok(),
        _ = generation.changed() => false,
    };
    if !read || &hello[..4] != b"HGPR" {
        return;
    }
    let node = u64::from_le_bytes(hello[5..13].try_into().unwrap());
    let blocked = match &mode.lock().unwrap().blocked {
        None => false,
        Some(None) => true,
        Some(Some(ids)) => ids.contains(&node),
    };
    if *generation.borrow() != born {
        return;
    }
    if blocked {
        // Held open; whatever arrives is dropped, until the mode changes.
        let mut sink = vec![0u8; 64 * 1024];
        loop {
            tokio::select! {
                r = from.read(&mut sink) => if matches!(r, Ok(0) | Err(_)) { return },
                _ = generation.changed() => return,
            }
        }
    }
    let Ok(mut to) = TcpStream::connect(target).await else { return };
    let _ = to.set_nodelay(true);
    if to.write_all(&hello).await.is_err() {
        return;
    }
    let (fr, fw) = from.into_split();
    let (tr, tw) = to.into_split();
    tokio::select! {
        _ = pipe(fr, tw) => {}
        _ = pipe(tr, fw) => {}
        _ = generation.changed() => {}
    }
}

/// Copies `from` to `to` until either ends.
async fn pipe(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
