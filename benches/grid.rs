//! Embedded grid benchmark: gets (snapshot reads on the caller's task) and puts (through the shard
//! actors) with 1, 16 and 256 concurrent tasks, against calling the table state machine
//! (`TableShard`) directly on one thread, the effect of batching, and OS context switches per
//! request (how many thread hand-offs a request costs).
//!
//! Run: `cargo bench --bench grid` (`HEAPGRID_BENCH_SECS` sets the time per case).

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use heapgrid::heap::{FsyncPolicy, Heap, HeapOptions};
use heapgrid::{FsyncSetting, Grid, GridOptions, Key, TableOptions, Value, WriteOp};
use heapgrid_actors::TableShard;

const KEYS: i64 = 100_000;

/// Context switches of every thread of this process so far.
fn ctx_switches() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    tasks
        .flatten()
        .map(|t| {
            let s = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            s.lines()
                .filter(|l| {
                    l.starts_with("voluntary_ctxt_switches") || l.starts_with("nonvoluntary_ctxt_switches")
                })
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

fn bench_dir() -> tempfile::TempDir {
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("bench-tmp");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

struct Row {
    name: String,
    ops: u64,
    secs: f64,
    switches: u64,
    hist: Histogram<u64>,
}

fn print(r: &Row, base: Option<f64>) {
    let rate = r.ops as f64 / r.secs;
    println!(
        "| {} | {:.0} | {} | {} | {:.2} | {} |",
        r.name,
        rate,
        r.hist.value_at_quantile(0.5),
        r.hist.value_at_quantile(0.99),
        r.switches as f64 / r.ops.max(1) as f64,
        base.map_or(String::new(), |b| format!("{:.2}x", rate / b)),
    );
}

/// The table state machine called directly: the ceiling the actors are measured against.
fn direct(secs: f64, write: bool) -> Row {
    let dir = bench_dir();
    let heap = Heap::open(
        dir.path().join("d.heap"),
        HeapOptions { fsync: FsyncPolicy::Never, ..HeapOptions::default() },
    )
    .unwrap();
    let mut t = TableShard::new(heap);
    for i in 0..KEYS {
        t.write_one(&WriteOp::Put { key: Key::Int(i), value: Value::Int(i) }).unwrap();
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).unwrap();
    let (start, sw) = (Instant::now(), ctx_switches());
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..1000 {
            let k = Key::Int((n.wrapping_mul(7919) % KEYS as u64) as i64);
            let t0 = Instant::now();
            if write {
                std::hint::black_box(
                    t.write_one(&WriteOp::Put { key: k, value: Value::Int(n as i64) }).unwrap(),
                );
            } else {
                std::hint::black_box(t.get(&k).unwrap());
            }
            hist.record(t0.elapsed().as_nanos().max(1000) as u64 / 1000).unwrap();
            n += 1;
        }
    }
    Row {
        name: format!("direct TableShard {}, 1 thread", if write { "put" } else { "get" }),
        ops: n,
        secs: start.elapsed().as_secs_f64(),
        switches: ctx_switches() - sw,
        hist,
    }
}

async fn grid_case(grid: &Grid, tasks: usize, secs: f64, mode: &str) -> Row {
    grid_case_on(grid, "b", tasks, secs, mode).await
}

async fn grid_case_on(grid: &Grid, table: &str, tasks: usize, secs: f64, mode: &str) -> Row {
    let t = grid.table(table).unwrap();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let (start, sw) = (Instant::now(), ctx_switches());
    let mode = Arc::new(mode.to_string());
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let (t, mode) = (t.clone(), mode.clone());
            tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).unwrap();
                let mut n = 0u64;
                let mut i = task as u64 * 104_729;
                while Instant::now() < deadline {
                    let k = (i.wrapping_mul(7919) % KEYS as u64) as i64;
                    i += 1;
                    let t0 = Instant::now();
                    match mode.as_str() {
                        "get" => {
                            std::hint::black_box(t.get_value(k).await.unwrap());
                            n += 1;
                        }
                        "put" => {
                            t.put_value(k, Value::Int(k)).await.unwrap();
                            n += 1;
                        }
                        _ => {
                            // A batch of 100 puts on one shard: one message, one op-log record.
                            let base = k - k % 100;
                            let ops = (0..100)
                                .map(|j| WriteOp::Put {
                                    key: Key::Str(format!("b{}:{j}", base)),
                                    value: Value::Int(j),
                                })
                                .collect::<Vec<_>>();
                            let shard0: Vec<WriteOp> = ops
                                .into_iter()
                                .filter(|o| {
                                    o.key().map(|k| k.shard(4))
                                        == Some(Key::Str(format!("b{}:0", base)).shard(4))
                                })
                                .collect();
                            n += shard0.len() as u64;
                            t.batch(shard0).await.unwrap();
                        }
                    }
                    hist.record(t0.elapsed().as_micros().max(1) as u64).unwrap();
                }
                (n, hist)
            })
        })
        .collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).unwrap();
    let mut ops = 0;
    for h in handles {
        let (n, hh) = h.await.unwrap();
        ops += n;
        hist.add(hh).unwrap();
    }
    Row {
        name: format!("grid {mode}, {tasks} tasks"),
        ops,
        secs: start.elapsed().as_secs_f64(),
        switches: ctx_switches() - sw,
        hist,
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let secs: f64 = std::env::var("HEAPGRID_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if full { 2.0 } else { 0.05 });
    println!(
        "embedded grid, {KEYS} int keys, table of 4 shards, fsync never, {secs} s per case, 2 tokio workers"
    );
    println!("latencies in us; `ctx sw/op` = OS context switches of the process per operation\n");
    println!("| case | ops/s | p50 | p99 | ctx sw/op | vs direct |");
    println!("|---|---|---|---|---|---|");
    let dg = direct(secs, false);
    print(&dg, None);
    let dp = direct(secs, true);
    print(&dp, None);
    let base_get = dg.ops as f64 / dg.secs;
    let base_put = dp.ops as f64 / dp.secs;

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let dir = bench_dir();
        let grid =
            Grid::open(dir.path(), GridOptions { checkpoint_interval_ms: 1000, ..GridOptions::default() })
                .await
                .unwrap();
        let t = grid
            .create_table("b", TableOptions { shards: 4, fsync: Some(FsyncSetting::Never) })
            .await
            .unwrap();
        for i in 0..KEYS {
            t.put_value(i, Value::Int(i)).await.unwrap();
        }
        for tasks in [1usize, 16, 256] {
            print(&grid_case(&grid, tasks, secs, "get").await, Some(base_get));
        }
        for tasks in [1usize, 16, 256] {
            print(&grid_case(&grid, tasks, secs, "put").await, Some(base_put));
        }
        for tasks in [1usize, 16] {
            print(&grid_case(&grid, tasks, secs, "batch").await, Some(base_put));
        }
        // Durable single puts: the shard's durable-reply task shares one fsync among every reply
        // waiting (group commit with task wake-ups instead of thread wake-ups).
        let d = grid
            .create_table("d", TableOptions { shards: 1, fsync: Some(FsyncSetting::Always) })
            .await
            .unwrap();
        d.put_value(0, Value::Int(0)).await.unwrap();
        grid.close().await.unwrap();
        let grid = Grid::open(dir.path(), GridOptions::default()).await.unwrap();
        for tasks in [1usize, 50] {
            let mut r = grid_case_on(&grid, "d", tasks, secs, "put").await;
            r.name = format!("grid durable put (fsync always, 1 shard), {tasks} tasks");
            print(&r, None);
        }
        grid.close().await.unwrap();
    });
}
