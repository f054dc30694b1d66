//! The lock part of `heapgrid bench` (`--locks uncontended|contended`): acquire + release pairs
//! per second, against heapgrid (a session per connection; `Lock::acquire`, then
//! `LockGuard::release`) or against Redis (`--redis`), the usual single-instance Redis lock:
//! `SET key token NX PX 30000` to take it and a Lua compare-and-delete (`EVALSHA`) to give it
//! back.
//!
//! - `uncontended`: every connection has its own lock, so each pair is two round trips that
//!   never wait for anyone.
//! - `contended`: every connection takes the same lock; the rate is the handoff rate. heapgrid's
//!   waiters queue (FIFO) in the server; Redis clients, which have no queue, retry `SET NX` at
//!   once until it succeeds (what a client library's spin does, without its sleep), and the
//!   failed attempts are counted as `errors`.
//!
//! Latency is per pair, from the acquire's send to the release's answer.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use heapgrid_actors::GridError;
use tokio::io::{AsyncWriteExt, BufReader};

use crate::client::{Client, ClientOptions};
use crate::loadgen::{LoadReport, LoadSpec};
use crate::loadgen_feed::{Part, Reply, gather, io, new_hist, read_reply, resp};

/// Which lock load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockLoad {
    Uncontended,
    Contended,
}

fn lock_name(spec: &LoadSpec, load: LockLoad, c: usize) -> String {
    match load {
        LockLoad::Uncontended => format!("{}-{c}", spec.table),
        LockLoad::Contended => spec.table.clone(),
    }
}

/// Runs the lock load against heapgrid, or against Redis when `spec.redis` is set.
pub async fn run(spec: &LoadSpec, load: LockLoad) -> Result<LoadReport, GridError> {
    let deadline = Instant::now() + spec.duration;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..spec.connections.max(1) {
        let name = lock_name(spec, load, c);
        match spec.redis {
            Some(addr) => {
                tasks.spawn(redis_pairs(addr, name, c, deadline));
            }
            None => {
                let opts = ClientOptions { token: spec.token.clone(), ..ClientOptions::default() };
                let client = Client::connect_with(spec.addr, opts).await?;
                tasks.spawn(heapgrid_pairs(client, name, deadline));
            }
        }
    }
    gather(tasks, start).await
}

async fn heapgrid_pairs(client: Client, name: String, deadline: Instant) -> Result<Part, GridError> {
    let session = client.session(None).await?;
    let lock = session.lock(&name);
    let (mut hist, mut n, mut errors) = (new_hist(), 0, 0);
    while Instant::now() < deadline {
        let t = Instant::now();
        match lock.acquire(Duration::from_secs(10)).await? {
            Some(g) => {
                g.release().await?;
                hist.saturating_record(t.elapsed().as_micros().max(1) as u64);
                n += 1;
            }
            None => errors += 1,
        }
    }
    session.close().await?;
    Ok((hist, n, errors))
}

const RELEASE_LUA: &str =
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

async fn redis_pairs(addr: SocketAddr, name: String, c: usize, deadline: Instant) -> Result<Part, GridError> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    wr.write_all(&resp(&[b"SCRIPT", b"LOAD", RELEASE_LUA.as_bytes()])).await.map_err(io)?;
    let sha = match read_reply(&mut rd).await.map_err(io)? {
        Reply::Bulk(Some(sha)) => sha,
        r => return Err(GridError::Unavailable(format!("redis: SCRIPT LOAD answered {r:?}"))),
    };
    let key = format!("lock:{name}");
    let (mut hist, mut n, mut errors) = (new_hist(), 0, 0);
    let mut round = 0u64;
    while Instant::now() < deadline {
        let t = Instant::now();
        round += 1;
        let token = format!("{c}-{round}");
        loop {
            let set = resp(&[b"SET", key.as_bytes(), token.as_bytes(), b"NX", b"PX", b"30000"]);
            wr.write_all(&set).await.map_err(io)?;
            match read_reply(&mut rd).await.map_err(io)? {
                Reply::Bulk(None) => {
                    errors += 1;
                    if Instant::now() >= deadline {
                        return Ok((hist, n, errors));
                    }
                }
                _ => break,
            }
        }
        wr.write_all(&resp(&[b"EVALSHA", &sha, b"1", key.as_bytes(), token.as_bytes()])).await.map_err(io)?;
        read_reply(&mut rd).await.map_err(io)?;
        hist.saturating_record(t.elapsed().as_micros().max(1) as u64);
        n += 1;
    }
    Ok((hist, n, errors))
}
