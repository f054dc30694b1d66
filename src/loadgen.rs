//! `heapgrid bench`: a load generator against a running server. Opens `connections` TCP
//! connections, picks keys uniformly from `0..keys`, issues gets or puts (`reads_percent` gets)
//! of `value_bytes`-byte values, or runs a snippet per request (`eval`), for `seconds`, and
//! reports throughput and latency percentiles from an HDR histogram.
//!
//! Gets and puts are driven the way `redis-benchmark -P N` drives Redis, so the two compare
//! exactly: each connection is one task that writes `pipeline` requests with one write, reads
//! their `pipeline` responses, and repeats (a request's latency runs from its batch's write to its
//! response). It speaks the wire protocol directly (one buffer out, one in, no task or channel per
//! request), so its own CPU per request stays small next to the server's. Snippet loads go
//! through the `Client` (`pipeline` tasks per connection).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use heapgrid_actors::GridError;
use heapgrid_actors::grid::{FsyncSetting, TableOptions};
use serde::Serialize;

use crate::client::{Client, ClientOptions};
use crate::protocol::{
    self, Hello, HelloReply, MAGIC, PROTOCOL_VERSION, Request, RequestBody, Response, TableOp,
};
use heapgrid_actors::Value;

/// What to run.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub addr: SocketAddr,
    pub token: Option<String>,
    pub table: String,
    pub shards: u32,
    pub fsync: Option<FsyncSetting>,
    pub connections: usize,
    pub pipeline: usize,
    pub keys: u64,
    /// A hot set: this percent of the keys (spread evenly over the key space) gets
    /// `100 - hot_percent` percent of the requests (10: the 90/10 rule); 0 is uniform.
    pub hot_percent: u32,
    pub value_bytes: usize,
    pub reads_percent: u32,
    pub duration: Duration,
    /// Put every key once before measuring (so gets hit).
    pub preload: bool,
    /// Keys preloaded so far (for a progress display).
    pub preloaded: Arc<std::sync::atomic::AtomicU64>,
    /// Run this snippet per request instead of gets and puts.
    pub eval: Option<EvalLoad>,
    /// Append to the feed named `table` (created if missing) instead of gets and puts.
    pub feed: bool,
    /// With `feed`: instead of appending flat out, append this many records per second from one
    /// connection while one follower tails the feed, and report append-to-delivery latency.
    pub follow_rate: Option<u64>,
    /// With `follow_rate`: run the same follow measurement against Redis at this address
    /// (`XADD` and `XREAD BLOCK` on stream `table`) instead of heapgrid.
    pub redis: Option<SocketAddr>,
    /// Acquire + release pairs of locks instead of gets and puts (`redis`: the Redis lock).
    pub locks: Option<crate::loadgen_lock::LockLoad>,
    /// Push + pop (+ ack) cycles on one queue instead (`redis`: LPUSH/BRPOP or the Streams trio).
    pub queues: Option<crate::loadgen_queue::QueueLoad>,
}

/// A snippet load: the source sees the request's key as `key` (collection scope, routed by it)
/// or as `args` (grid scope).
#[derive(Clone, Debug)]
pub struct EvalLoad {
    pub src: String,
    pub grid_scope: bool,
    /// Make every request's source unique (a trailing comment), so none hits the compile cache.
    pub uncached: bool,
}

/// What came out.
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    pub ops: u64,
    pub errors: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub latency_us_p50: u64,
    pub latency_us_p99: u64,
    pub latency_us_p999: u64,
    pub latency_us_max: u64,
}

/// A key of `0..keys`: uniform, or with a hot set (`LoadSpec::hot_percent`) of every
/// `100 / hot_percent`-th key.
pub fn pick_key(rng: &mut fastrand::Rng, keys: u64, hot_percent: u32) -> u64 {
    if hot_percent == 0 || hot_percent >= 100 || keys < 100 {
        return rng.u64(..keys);
    }
    let stride = 100 / u64::from(hot_percent);
    let hot_keys = keys / stride;
    if rng.u32(..100) >= hot_percent {
        rng.u64(..hot_keys) * stride
    } else {
        // A cold key: any key that is not a multiple of the stride (below hot_keys * stride).
        let k = rng.u64(..hot_keys * (stride - 1));
        (k / (stride - 1)) * stride + 1 + k % (stride - 1)
    }
}

/// Runs the load and returns the report.
pub async fn run(spec: LoadSpec) -> Result<LoadReport, GridError> {
    if let Some(load) = spec.locks {
        return crate::loadgen_lock::run(&spec, load).await;
    }
    if let Some(load) = spec.queues {
        return crate::loadgen_queue::run(&spec, load).await;
    }
    if let (Some(rate), Some(redis)) = (spec.follow_rate, spec.redis) {
        return crate::loadgen_feed::redis_follow(redis, &spec.table, rate, spec.duration).await;
    }
    let opts = ClientOptions { token: spec.token.clone(), ..ClientOptions::default() };
    let admin = Client::connect_with(spec.addr, opts.clone()).await?;
    if spec.feed {
        match admin.create_feed(&spec.table, Default::default()).await {
            Ok(_) | Err(GridError::FeedExists(_)) => {}
            Err(e) => return Err(e),
        }
        if let Some(rate) = spec.follow_rate {
            return crate::loadgen_feed::follow(&admin, spec.addr, opts, &spec.table, rate, spec.duration)
                .await;
        }
    }
    if !spec.feed {
        match admin.create_table(&spec.table, TableOptions { shards: spec.shards, fsync: spec.fsync }).await {
            Ok(_) | Err(GridError::TableExists(_)) => {}
            Err(e) => return Err(e),
        }
    }
    let value = Value::Bytes(vec![b'x'; spec.value_bytes]);
    if spec.preload {
        let t = admin.table(&spec.table);
        let mut tasks = tokio::task::JoinSet::new();
        let per = spec.keys.div_ceil(64);
        for w in 0..64u64 {
            let (t, value, done) = (t.clone(), value.clone(), spec.preloaded.clone());
            tasks.spawn(async move {
                for k in (w * per)..((w + 1) * per).min(spec.keys) {
                    t.put_value(k as i64, value.clone()).await?;
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok::<_, GridError>(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.map_err(|e| GridError::Unavailable(e.to_string()))??;
        }
    }
    let deadline = Instant::now() + spec.duration;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    if spec.eval.is_none() {
        for c in 0..spec.connections {
            tasks.spawn(pipelined(spec.clone(), c as u64, deadline));
        }
    }
    for c in 0..spec.connections {
        let Some(e) = spec.eval.clone() else { break };
        let client = Client::connect_with(spec.addr, opts.clone()).await?;
        for p in 0..spec.pipeline.max(1) {
            let t = client.table(&spec.table);
            let (client, e) = (client.clone(), e.clone());
            let keys = spec.keys.max(1);
            tasks.spawn(async move {
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
                let (mut ops, mut errors) = (0u64, 0u64);
                let mut rng = fastrand::Rng::with_seed((c as u64) << 20 | p as u64);
                while Instant::now() < deadline {
                    let k = rng.u64(..keys) as i64;
                    let t0 = Instant::now();
                    let src = if e.uncached {
                        std::borrow::Cow::Owned(format!("{}\n# {c}.{p}.{ops}.{errors}", e.src))
                    } else {
                        std::borrow::Cow::Borrowed(e.src.as_str())
                    };
                    let r = if e.grid_scope {
                        client.eval_with(&src, Value::Int(k), Default::default()).await.map(|_| ())
                    } else {
                        t.eval_at(Some(k.into()), &src, Value::Null, Default::default()).await.map(|_| ())
                    };
                    match r {
                        Ok(()) => {
                            ops += 1;
                            let _ = hist.record(t0.elapsed().as_micros().max(1) as u64);
                        }
                        Err(_) => errors += 1,
                    }
                }
                Ok((ops, errors, hist))
            });
        }
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let (mut ops, mut errors) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let (o, e, h) = r.map_err(|e| GridError::Unavailable(e.to_string()))??;
        ops += o;
        errors += e;
        let _ = hist.add(h);
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(LoadReport {
        ops,
        errors,
        seconds,
        ops_per_sec: ops as f64 / seconds,
        latency_us_p50: hist.value_at_quantile(0.5),
        latency_us_p99: hist.value_at_quantile(0.99),
        latency_us_p999: hist.value_at_quantile(0.999),
        latency_us_max: hist.max(),
    })
}

/// One connection's share of a get/put load, pipelined as `redis-benchmark -P` does: a batch of
/// `pipeline` requests in one write, then all their responses.
async fn pipelined(
    spec: LoadSpec,
    c: u64,
    deadline: Instant,
) -> Result<(u64, u64, Histogram<u64>), GridError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let unavailable = |e: std::io::Error| GridError::Unavailable(e.to_string());
    let mut sock = tokio::net::TcpStream::connect(spec.addr).await.map_err(unavailable)?;
    let _ = sock.set_nodelay(true);
    let hello = Hello { magic: MAGIC, version: PROTOCOL_VERSION, token: spec.token.clone() };
    protocol::write_msg(&mut sock, &hello).await.map_err(|e| GridError::Unavailable(e.to_string()))?;
    let mut inbuf = Vec::with_capacity(64 * 1024);
    protocol::read_frame(&mut sock, &mut inbuf).await.map_err(|e| GridError::Unavailable(e.to_string()))?;
    if let HelloReply::Refused { error } =
        protocol::decode(&inbuf).map_err(|e| GridError::Protocol(e.to_string()))?
    {
        return Err(error);
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let (mut ops, mut errors) = (0u64, 0u64);
    let mut rng = fastrand::Rng::with_seed(c << 20);
    let value = Value::Bytes(vec![b'x'; spec.value_bytes]);
    let (keys, pipeline) = (spec.keys.max(1), spec.pipeline.max(1));
    let mut out = Vec::with_capacity(pipeline * (64 + spec.value_bytes));
    let mut id = 0u64;
    inbuf.clear();
    while Instant::now() < deadline {
        out.clear();
        let first = id + 1;
        for _ in 0..pipeline {
            id += 1;
            let key = heapgrid_actors::Key::Int(pick_key(&mut rng, keys, spec.hot_percent) as i64);
            let body = if spec.feed {
                let op = crate::feed::FeedOp::Append { value: value.clone(), id: None };
                RequestBody::Feed { feed: spec.table.clone(), op }
            } else {
                let op = if rng.u32(..100) < spec.reads_percent {
                    TableOp::Get { key }
                } else {
                    TableOp::Write(heapgrid_actors::WriteOp::Put { key, value: value.clone() })
                };
                RequestBody::Table { table: spec.table.clone(), op }
            };
            let req = Request { id, body };
            protocol::append_msg(&mut out, &req).map_err(|e| GridError::Invalid(e.to_string()))?;
        }
        let t0 = Instant::now();
        sock.write_all(&out).await.map_err(unavailable)?;
        let mut left = pipeline;
        let mut at = 0;
        while left > 0 {
            // Every complete frame buffered, then read more.
            while let Some(len) =
                inbuf.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
            {
                if inbuf.len() < at + 4 + len {
                    break;
                }
                let resp: Response = protocol::decode(&inbuf[at + 4..at + 4 + len])
                    .map_err(|e| GridError::Protocol(e.to_string()))?;
                at += 4 + len;
                if resp.id < first || resp.id > id {
                    return Err(GridError::Protocol(format!("response to unknown request {}", resp.id)));
                }
                match resp.result {
                    Ok(_) => {
                        ops += 1;
                        let _ = hist.record(t0.elapsed().as_micros().max(1) as u64);
                    }
                    Err(_) => errors += 1,
                }
                left -= 1;
            }
            if left == 0 {
                break;
            }
            inbuf.drain(..at);
            at = 0;
            if sock.read_buf(&mut inbuf).await.map_err(unavailable)? == 0 {
                return Err(GridError::Unavailable("server closed the connection".into()));
            }
        }
        inbuf.drain(..at);
    }
    Ok((ops, errors, hist))
}

#[cfg(test)]
mod tests {
    use super::pick_key;

    #[test]
    fn a_hot_set_gets_its_share_and_every_key_is_in_range() {
        let mut rng = fastrand::Rng::with_seed(7);
        let n = 100_000;
        let picks: Vec<u64> = (0..n).map(|_| pick_key(&mut rng, 1000, 10)).collect();
        assert!(picks.iter().all(|&k| k < 1000));
        let hot = picks.iter().filter(|&&k| k.is_multiple_of(10)).count();
        assert!((88_000..92_000).contains(&hot), "{hot} of {n} hot");
        // Cold picks cover the cold keys (not just a few of them).
        let cold: std::collections::BTreeSet<u64> =
            picks.iter().copied().filter(|k| !k.is_multiple_of(10)).collect();
        assert_eq!(cold.len(), 900);
        // Uniform without a hot set.
        let mut rng = fastrand::Rng::with_seed(7);
        let hot = (0..n).filter(|_| pick_key(&mut rng, 1000, 0).is_multiple_of(10)).count();
        assert!((9_000..11_000).contains(&hot), "{hot}");
    }
}
