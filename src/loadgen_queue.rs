//! The queue part of `heapgrid bench` (`--queues take|ack`): push + pop (+ ack) cycles per
//! second on one queue shared by every connection, each connection one cycle at a time (so
//! `--connections` is the number in flight), against heapgrid or against Redis (`--redis`):
//!
//! - `take`: heapgrid `push`, then `pop` in take mode (waiting up to 1 s); Redis `LPUSH`, then
//!   `BRPOP` (timeout 1 s). Both at-most-once.
//! - `ack`: heapgrid `push`, `pop` in ack mode (waiting up to 1 s), `ack`; Redis Streams `XADD`,
//!   `XREADGROUP GROUP g c COUNT 1 BLOCK 1000 STREAMS key >`, `XACK`. Both at-least-once.
//!
//! A cycle's pop may return another connection's item (one shared queue); a pop that found
//! nothing in its wait counts as an error. Latency is per cycle, from the push's send to the
//! last answer.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use heapgrid_actors::GridError;
use tokio::io::{AsyncWriteExt, BufReader};

use crate::client::{Client, ClientOptions};
use crate::loadgen::{LoadReport, LoadSpec};
use crate::loadgen_feed::{Part, Reply, gather, io, new_hist, read_reply, resp};
use crate::queue::{Mode, Pop};

/// Which queue load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueLoad {
    Take,
    Ack,
}

/// Runs the queue load against heapgrid, or against Redis when `spec.redis` is set.
pub async fn run(spec: &LoadSpec, load: QueueLoad) -> Result<LoadReport, GridError> {
    let deadline = Instant::now() + spec.duration;
    let start = Instant::now();
    let value = vec![b'x'; spec.value_bytes];
    let mut tasks = tokio::task::JoinSet::new();
    if let (Some(addr), QueueLoad::Ack) = (spec.redis, load) {
        // The stream and its group, once.
        let mut c = RedisConn::connect(addr).await?;
        let key = format!("q:{}", spec.table);
        let _ = c.call(&[b"XGROUP", b"CREATE", key.as_bytes(), b"g", b"$", b"MKSTREAM"]).await;
    }
    for c in 0..spec.connections.max(1) {
        let (name, value) = (spec.table.clone(), value.clone());
        match spec.redis {
            Some(addr) => {
                tasks.spawn(redis_cycles(addr, name, c, load, value, deadline));
            }
            None => {
                let opts = ClientOptions { token: spec.token.clone(), ..ClientOptions::default() };
                let client = Client::connect_with(spec.addr, opts).await?;
                tasks.spawn(heapgrid_cycles(client, name, load, value, deadline));
            }
        }
    }
    gather(tasks, start).await
}

async fn heapgrid_cycles(
    client: Client,
    name: String,
    load: QueueLoad,
    value: Vec<u8>,
    deadline: Instant,
) -> Result<Part, GridError> {
    let q = client.queue(&name);
    let value = heapgrid_actors::Value::Bytes(value);
    let mode = if load == QueueLoad::Take { Mode::Take } else { Mode::Ack };
    let (mut hist, mut n, mut errors) = (new_hist(), 0, 0);
    while Instant::now() < deadline {
        let t = Instant::now();
        q.push(&value).await?;
        let ds = q.pop_with(Pop { wait: Duration::from_secs(1), mode, ..Pop::default() }).await?;
        let Some(d) = ds.into_iter().next() else {
            errors += 1;
            continue;
        };
        if load == QueueLoad::Ack {
            q.ack(d.receipt).await?;
        }
        hist.saturating_record(t.elapsed().as_micros().max(1) as u64);
        n += 1;
    }
    Ok((hist, n, errors))
}

/// One Redis connection (also the cluster benchmark's, `loadgen_repl.rs`).
pub(crate) struct RedisConn {
    rd: BufReader<tokio::net::tcp::OwnedReadHalf>,
    wr: tokio::net::tcp::OwnedWriteHalf,
}

impl RedisConn {
    pub(crate) async fn connect(addr: SocketAddr) -> Result<RedisConn, GridError> {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        let (rd, wr) = stream.into_split();
        Ok(RedisConn { rd: BufReader::new(rd), wr })
    }

    async fn call(&mut self, args: &[&[u8]]) -> Result<Reply, GridError> {
        self.wr.write_all(&resp(args)).await.map_err(io)?;
        read_reply(&mut self.rd).await.map_err(io)
    }

    /// Sends `cmds` with one write, then reads their replies in order.
    pub(crate) async fn pipeline(&mut self, cmds: &[&[&[u8]]]) -> Result<Vec<Reply>, GridError> {
        let mut req = Vec::new();
        for c in cmds {
            req.extend_from_slice(&resp(c));
        }
        self.wr.write_all(&req).await.map_err(io)?;
        let mut out = Vec::with_capacity(cmds.len());
        for _ in cmds {
            out.push(read_reply(&mut self.rd).await.map_err(io)?);
        }
        Ok(out)
    }
}

/// The id of the one entry of an `XREADGROUP` answer, if it has one.
fn entry_id(r: Reply) -> Option<Vec<u8>> {
    let Reply::Array(Some(streams)) = r else { return None };
    let Reply::Array(Some(mut stream)) = streams.into_iter().next()? else { return None };
    let Reply::Array(Some(entries)) = stream.pop()? else { return None };
    let Reply::Array(Some(entry)) = entries.into_iter().next()? else { return None };
    match entry.into_iter().next()? {
        Reply::Bulk(Some(id)) => Some(id),
        _ => None,
    }
}

async fn redis_cycles(
    addr: SocketAddr,
    name: String,
    c: usize,
    load: QueueLoad,
    value: Vec<u8>,
    deadline: Instant,
) -> Result<Part, GridError> {
    let mut conn = RedisConn::connect(addr).await?;
    let key = format!("q:{name}");
    let consumer = format!("c{c}");
    let (mut hist, mut n, mut errors) = (new_hist(), 0, 0);
    while Instant::now() < deadline {
        let t = Instant::now();
        let got = match load {
            QueueLoad::Take => {
                conn.call(&[b"LPUSH", key.as_bytes(), &value]).await?;
                matches!(conn.call(&[b"BRPOP", key.as_bytes(), b"1"]).await?, Reply::Array(Some(_)))
            }
            QueueLoad::Ack => {
                conn.call(&[b"XADD", key.as_bytes(), b"*", b"v", &value]).await?;
                let r = conn
                    .call(&[
                        b"XREADGROUP",
                        b"GROUP",
                        b"g",
                        consumer.as_bytes(),
                        b"COUNT",
                        b"1",
                        b"BLOCK",
                        b"1000",
                        b"STREAMS",
                        key.as_bytes(),
                        b">",
                    ])
                    .await?;
                match entry_id(r) {
                    Some(id) => {
                        conn.call(&[b"XACK", key.as_bytes(), b"g", &id]).await?;
                        true
                    }
                    None => false,
                }
            }
        };
        if got {
            hist.saturating_record(t.elapsed().as_micros().max(1) as u64);
            n += 1;
        } else {
            errors += 1;
        }
    }
    Ok((hist, n, errors))
}
