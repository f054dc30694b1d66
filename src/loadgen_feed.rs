//! The feed part of `heapgrid bench`: append-to-delivery latency of a follower at a fixed
//! append rate, against heapgrid (`Feed::follow`) or Redis (`XADD` and `XREAD BLOCK`, over a
//! minimal RESP client written here), measured the same way: one connection appends
//! `rate / 1000` records every millisecond, each carrying its send time (nanoseconds since the
//! run began, in this process); one follower connection tails the stream from its end and
//! records, for each record, the time from its send to its delivery.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use heapgrid_actors::{GridError, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::client::Client;
use crate::loadgen::LoadReport;

pub(crate) fn report(hist: &Histogram<u64>, delivered: u64, errors: u64, seconds: f64) -> LoadReport {
    LoadReport {
        ops: delivered,
        errors,
        seconds,
        ops_per_sec: delivered as f64 / seconds,
        latency_us_p50: hist.value_at_quantile(0.5),
        latency_us_p99: hist.value_at_quantile(0.99),
        latency_us_p999: hist.value_at_quantile(0.999),
        latency_us_max: hist.max(),
    }
}

/// Most appends in flight at once; a tick that finds this many waiting skips its appends and
/// counts them as errors (the server is not keeping up with the rate).
const PACE_INFLIGHT_MAX: usize = 10_000;

/// A latency histogram in µs, 1 µs to 60 s.
pub(crate) fn new_hist() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// One load task's result: its latencies, operations done, and errors.
pub(crate) type Part = (Histogram<u64>, u64, u64);

/// Waits for every load task and adds up their parts into the report (`start`: when the load
/// began).
pub(crate) async fn gather(
    mut tasks: tokio::task::JoinSet<Result<Part, GridError>>,
    start: Instant,
) -> Result<LoadReport, GridError> {
    let (mut hist, mut ops, mut errors) = (new_hist(), 0, 0);
    while let Some(r) = tasks.join_next().await {
        let (h, n, e) = r.map_err(|e| GridError::Unavailable(e.to_string()))??;
        hist.add(&h).map_err(|e| GridError::Unavailable(e.to_string()))?;
        ops += n;
        errors += e;
    }
    Ok(report(&hist, ops, errors, start.elapsed().as_secs_f64()))
}

/// Sends `rate` appends per second for `duration` through `append` (given the send stamp),
/// `rate / 1000` every millisecond, without waiting for one batch before the next.
async fn pace<F, Fut>(rate: u64, duration: Duration, t0: Instant, append: F) -> u64
where
    F: Fn(i64) -> Fut,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let per_ms = rate.div_ceil(1000).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut inflight = tokio::task::JoinSet::new();
    let mut errors = 0;
    let end = t0 + duration;
    while Instant::now() < end {
        tick.tick().await;
        for _ in 0..per_ms {
            if inflight.len() >= PACE_INFLIGHT_MAX {
                errors += 1;
                continue;
            }
            inflight.spawn(append(t0.elapsed().as_nanos() as i64));
        }
        while let Some(r) = inflight.try_join_next() {
            errors += u64::from(!r.unwrap_or(false));
        }
    }
    while let Some(r) = inflight.join_next().await {
        errors += u64::from(!r.unwrap_or(false));
    }
    errors
}

/// heapgrid: the appender through the `Client`, the follower through `Feed::follow`.
pub async fn follow(
    client: &Client,
    addr: SocketAddr,
    opts: crate::client::ClientOptions,
    feed: &str,
    rate: u64,
    duration: Duration,
) -> Result<LoadReport, GridError> {
    let t0 = Instant::now();
    let follower_client = Client::connect_with(addr, opts).await?;
    let mut stream = Box::pin(follower_client.feed(feed).follow(crate::feed::Pos::End));
    // The follower's first read parks before the first append.
    let follower = tokio::spawn(async move {
        let mut hist = new_hist();
        let mut n = 0u64;
        let idle = Duration::from_millis(500);
        while let Ok(Some(r)) = tokio::time::timeout(idle, stream.next()).await {
            let Ok(r) = r else { break };
            if let Value::Int(sent) = r.value {
                let lat = (t0.elapsed().as_nanos() as i64 - sent).max(1000) as u64 / 1000;
                let _ = hist.record(lat);
                n += 1;
            }
        }
        (hist, n)
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let f = Arc::new(client.feed(feed));
    let started = Instant::now();
    let errors = pace(rate, duration, t0, |stamp| {
        let f = f.clone();
        async move { f.append(stamp).await.is_ok() }
    })
    .await;
    let seconds = started.elapsed().as_secs_f64();
    let (hist, n) = follower.await.map_err(|e| GridError::Unavailable(e.to_string()))?;
    Ok(report(&hist, n, errors, seconds))
}

/// One RESP command.
pub(crate) fn resp(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A RESP reply, as far as this benchmark needs one.
#[derive(Debug)]
pub(crate) enum Reply {
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
    Int(i64),
    Other,
}

pub(crate) async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<Reply> {
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line).await?;
    if line.len() < 3 {
        return Err(std::io::Error::other("connection closed"));
    }
    let head = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
    let n: i64 = head.parse().unwrap_or(0);
    Ok(match line[0] {
        b'$' if n < 0 => Reply::Bulk(None),
        b'$' => {
            let mut buf = vec![0; n as usize + 2];
            tokio::io::AsyncReadExt::read_exact(r, &mut buf).await?;
            buf.truncate(n as usize);
            Reply::Bulk(Some(buf))
        }
        b'*' if n < 0 => Reply::Array(None),
        b'*' => {
            let mut items = Vec::with_capacity(n as usize);
            for _ in 0..n {
                items.push(Box::pin(read_reply(r)).await?);
            }
            Reply::Array(Some(items))
        }
        b'-' => return Err(std::io::Error::other(head)),
        b':' => Reply::Int(n),
        _ => Reply::Other,
    })
}

pub(crate) fn io(e: std::io::Error) -> GridError {
    GridError::Unavailable(format!("redis: {e}"))
}

/// Redis: the appender sends `XADD stream * t STAMP` (pipelined, replies read by a reader task);
/// the follower loops `XREAD BLOCK 10000 STREAMS stream LAST`.
pub async fn redis_follow(
    addr: SocketAddr,
    stream: &str,
    rate: u64,
    duration: Duration,
) -> Result<LoadReport, GridError> {
    let t0 = Instant::now();
    let key = stream.as_bytes().to_vec();
    let mut f = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
    let _ = f.set_nodelay(true);
    let k = key.clone();
    let follower = tokio::spawn(async move {
        let (rd, mut wr) = f.split();
        let mut rd = BufReader::new(rd);
        let mut hist = new_hist();
        let (mut n, mut last) = (0u64, b"$".to_vec());
        loop {
            let cmd = resp(&[b"XREAD", b"BLOCK", b"500", b"COUNT", b"1000", b"STREAMS", &k, &last]);
            if wr.write_all(&cmd).await.is_err() {
                break;
            }
            let Ok(reply) = read_reply(&mut rd).await else { break };
            let Reply::Array(Some(streams)) = reply else { break }; // a timeout: nothing came
            let now = t0.elapsed().as_nanos() as i64;
            for s in streams {
                let Reply::Array(Some(mut parts)) = s else { continue };
                let Some(Reply::Array(Some(entries))) = parts.pop() else { continue };
                for e in entries {
                    let Reply::Array(Some(mut e)) = e else { continue };
                    let (Some(Reply::Array(Some(fields))), Some(Reply::Bulk(Some(id)))) = (e.pop(), e.pop())
                    else {
                        continue;
                    };
                    last = id;
                    if let Some(Reply::Bulk(Some(v))) = fields.get(1)
                        && let Ok(sent) = String::from_utf8_lossy(v).parse::<i64>()
                    {
                        let _ = hist.record((now - sent).max(1000) as u64 / 1000);
                        n += 1;
                    }
                }
            }
        }
        (hist, n)
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let sock = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
    let _ = sock.set_nodelay(true);
    let (rd, wr) = sock.into_split();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(PACE_INFLIGHT_MAX);
    let writer = tokio::spawn(async move {
        let mut wr = wr;
        while let Some(cmd) = rx.recv().await {
            if wr.write_all(&cmd).await.is_err() {
                break;
            }
        }
    });
    // XADD's replies (the new ids) are drained, not used: delivery is what is measured.
    let acks = tokio::spawn(async move {
        let mut rd = BufReader::new(rd);
        while read_reply(&mut rd).await.is_ok() {}
    });
    let started = Instant::now();
    let tx2 = tx.clone();
    let errors = pace(rate, duration, t0, move |stamp| {
        let cmd = resp(&[b"XADD", &key, b"*", b"t", stamp.to_string().as_bytes()]);
        let ok = tx2.try_send(cmd).is_ok();
        async move { ok }
    })
    .await;
    let seconds = started.elapsed().as_secs_f64();
    drop(tx);
    let _ = writer.await;
    let (hist, n) = follower.await.map_err(|e| GridError::Unavailable(e.to_string()))?;
    acks.abort();
    Ok(report(&hist, n, errors, seconds))
}
