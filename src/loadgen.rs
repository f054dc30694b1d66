//! `heapgrid bench`: a load generator against a running server. Opens `connections` TCP
//! connections, keeps `pipeline` requests in flight on each, picks keys uniformly from
//! `0..keys`, issues gets or puts (`reads_percent` gets) of `value_bytes`-byte values, or runs a
//! snippet per request (`eval`), for `seconds`, and reports throughput and latency percentiles
//! from an HDR histogram.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use heapgrid_actors::GridError;
use heapgrid_actors::grid::{FsyncSetting, TableOptions};
use serde::Serialize;

use crate::client::{Client, ClientOptions};
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
    pub value_bytes: usize,
    pub reads_percent: u32,
    pub duration: Duration,
    /// Put every key once before measuring (so gets hit).
    pub preload: bool,
    /// Run this snippet per request instead of gets and puts.
    pub eval: Option<EvalLoad>,
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

/// Runs the load and returns the report.
pub async fn run(spec: LoadSpec) -> Result<LoadReport, GridError> {
    let opts = ClientOptions { token: spec.token.clone(), ..ClientOptions::default() };
    let admin = Client::connect_with(spec.addr, opts.clone()).await?;
    match admin.create_table(&spec.table, TableOptions { shards: spec.shards, fsync: spec.fsync }).await {
        Ok(_) | Err(GridError::TableExists(_)) => {}
        Err(e) => return Err(e),
    }
    let value = Value::Bytes(vec![b'x'; spec.value_bytes]);
    if spec.preload {
        let t = admin.table(&spec.table);
        let mut tasks = tokio::task::JoinSet::new();
        let per = spec.keys.div_ceil(64);
        for w in 0..64u64 {
            let (t, value) = (t.clone(), value.clone());
            tasks.spawn(async move {
                for k in (w * per)..((w + 1) * per).min(spec.keys) {
                    t.put_value(k as i64, value.clone()).await?;
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
    for c in 0..spec.connections {
        let client = Client::connect_with(spec.addr, opts.clone()).await?;
        for p in 0..spec.pipeline.max(1) {
            let t = client.table(&spec.table);
            let value = value.clone();
            let (client, eval) = (client.clone(), spec.eval.clone());
            let (keys, reads) = (spec.keys.max(1), spec.reads_percent);
            tasks.spawn(async move {
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
                let (mut ops, mut errors) = (0u64, 0u64);
                let mut rng = fastrand::Rng::with_seed((c as u64) << 20 | p as u64);
                while Instant::now() < deadline {
                    let k = rng.u64(..keys) as i64;
                    let read = rng.u32(..100) < reads;
                    let t0 = Instant::now();
                    let r = if let Some(e) = &eval {
                        let src = if e.uncached {
                            std::borrow::Cow::Owned(format!("{}\n# {c}.{p}.{ops}.{errors}", e.src))
                        } else {
                            std::borrow::Cow::Borrowed(e.src.as_str())
                        };
                        if e.grid_scope {
                            client.eval_with(&src, Value::Int(k), Default::default()).await.map(|_| ())
                        } else {
                            t.eval_at(Some(k.into()), &src, Value::Null, Default::default()).await.map(|_| ())
                        }
                    } else if read {
                        t.get_value(k).await.map(|_| ())
                    } else {
                        t.put_value(k, value.clone()).await.map(|_| ())
                    };
                    match r {
                        Ok(()) => {
                            ops += 1;
                            let _ = hist.record(t0.elapsed().as_micros().max(1) as u64);
                        }
                        Err(_) => errors += 1,
                    }
                }
                (ops, errors, hist)
            });
        }
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let (mut ops, mut errors) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let (o, e, h) = r.map_err(|e| GridError::Unavailable(e.to_string()))?;
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
