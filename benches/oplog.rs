//! Op-log durability benchmark: single-put commits per second and commit latency under
//! `FsyncPolicy::Always`, for 1, 8 and 50 concurrent committer threads, in three set-ups:
//! - baseline: one fsync per commit (apply and fsync inside the heap lock, so none is shared);
//! - group commit behind a mutex: apply under the lock, then `Durability::wait` outside it;
//! - `SharedHeap`: a combining commit queue, one leader applies a whole round and fsyncs once;
//!
//! plus `EveryMs(100)` and `Never` throughput; how long a checkpoint stops writers as a
//! function of the pages dirtied since the previous one; and how fast a crash's op-log tail is
//! replayed at open (records/s, against applying the same batches live in the same run).
//!
//! Run: `cargo bench --bench oplog` (set `HEAPGRID_BENCH_SECS` to change the time per case;
//! `cargo bench --bench oplog -- --bench replay` runs the replay rows only).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use heapgrid::heap::{FsyncPolicy, Heap, HeapOptions, SharedHeap, WriteBatch};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    FsyncPerCommit,
    MutexGroupCommit,
    Shared,
}

struct Case {
    commits: u64,
    secs: f64,
    hist: Histogram<u64>,
    syncs: u64,
}

fn bench_dir() -> tempfile::TempDir {
    // Under target/ so the files live on the same disk as the build, never on a tmpfs.
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("bench-tmp");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

/// `committers` threads each commit one 16-byte key / 100-byte value at a time for `secs`.
fn run(policy: FsyncPolicy, committers: usize, secs: f64, mode: Mode) -> Case {
    let dir = bench_dir();
    let opts = HeapOptions { fsync: policy, ..HeapOptions::default() };
    let heap = Heap::open(dir.path().join("b.heap"), opts).unwrap();
    let durability = heap.durability().unwrap();
    let shared = Arc::new(SharedHeap::new(heap, policy));
    let heap = Arc::new(Mutex::new(()));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let threads: Vec<_> = (0..committers)
        .map(|t| {
            let (heap, shared, durability) = (heap.clone(), shared.clone(), durability.clone());
            std::thread::spawn(move || {
                let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).unwrap();
                let mut n = 0u64;
                let value = [7u8; 100];
                while Instant::now() < deadline {
                    let k = (t as u64) << 40 | n;
                    let mut b = WriteBatch::new();
                    b.put(&k.to_be_bytes().repeat(2), &value).unwrap();
                    let t0 = Instant::now();
                    match mode {
                        Mode::FsyncPerCommit => {
                            let _g = heap.lock().unwrap();
                            let lsn = shared.with(|h| h.apply(&b)).unwrap();
                            durability.wait(lsn).unwrap();
                        }
                        Mode::MutexGroupCommit => {
                            let lsn = {
                                let _g = heap.lock().unwrap();
                                shared.with(|h| h.apply(&b)).unwrap()
                            };
                            durability.wait(lsn).unwrap();
                        }
                        Mode::Shared => {
                            shared.commit(b).unwrap();
                        }
                    }
                    hist.record(t0.elapsed().as_micros().max(1) as u64).unwrap();
                    n += 1;
                }
                (n, hist)
            })
        })
        .collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).unwrap();
    let mut commits = 0;
    for t in threads {
        let (n, h) = t.join().unwrap();
        commits += n;
        hist.add(h).unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let syncs = durability.syncs();
    Case { commits, secs, hist, syncs }
}

fn row(name: &str, c: &Case, baseline: Option<&Case>) {
    let rate = c.commits as f64 / c.secs;
    let ratio = baseline.map_or("".to_string(), |b| format!("{:.2}x", rate / (b.commits as f64 / b.secs)));
    println!(
        "| {name} | {:.0} | {} | {} | {} | {:.1} | {ratio} |",
        rate,
        c.hist.value_at_quantile(0.5),
        c.hist.value_at_quantile(0.99),
        c.hist.value_at_quantile(0.999),
        c.commits as f64 / c.syncs.max(1) as f64,
    );
}

/// Puts keys `i * mul` for `i` in `0..keys` (16-byte keys, 100-byte values of `byte`), in
/// batches of 1000.
fn load(heap: &mut Heap, keys: u64, mul: u64, byte: u8) {
    let mut b = WriteBatch::new();
    for i in 0..keys {
        b.put(&(i.wrapping_mul(mul)).to_be_bytes(), &[byte; 100]).unwrap();
        if b.len() == 1000 {
            heap.apply(&b).unwrap();
            b.clear();
        }
    }
    heap.apply(&b).unwrap();
}

fn checkpoint_pauses() {
    println!("\n| pages dirtied since last checkpoint | checkpoint pause (ms) | per dirty page (us) |");
    println!("|---|---|---|");
    for keys in [1_000u64, 10_000, 100_000] {
        let dir = bench_dir();
        let opts = HeapOptions { fsync: FsyncPolicy::Never, ..HeapOptions::default() };
        let mut heap = Heap::open(dir.path().join("c.heap"), opts).unwrap();
        // A base of 200k keys, checkpointed; then `keys` random puts dirty a share of the leaves.
        load(&mut heap, 200_000, 0x9E37_79B9_7F4A_7C15, 1);
        heap.checkpoint().unwrap();
        let before = heap.stats().page_count;
        load(&mut heap, keys, 0x2545_F491_4F6C_DD1D, 2);
        let dirty = heap.stats().page_count - before + heap.stats().pending_pages;
        let t = Instant::now();
        heap.checkpoint().unwrap();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        println!("| {dirty} | {ms:.1} | {:.1} |", ms * 1e3 / dirty.max(1) as f64);
    }
}

/// A crash's replay: a heap of `base` keys (16-byte keys, 100-byte values) checkpointed, then
/// `tail` single-put batches overwriting random keys among the first `hot` (the op log since the
/// checkpoint), then dropped without a checkpoint (a crash: every record was written) and
/// opened again. Baseline: applying the same batches live (`Never`: no fsync).
fn replay(base: u64, tail: u64, hot: u64) {
    let dir = bench_dir();
    let path = dir.path().join("r.heap");
    let opts = HeapOptions { fsync: FsyncPolicy::Never, ..HeapOptions::default() };
    let mut heap = Heap::open(&path, opts.clone()).unwrap();
    load(&mut heap, base, 0x9E37_79B9_7F4A_7C15, 1);
    heap.checkpoint().unwrap();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let t = Instant::now();
    for _ in 0..tail {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let k = (x % hot).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut one = WriteBatch::new();
        one.put(&k.to_be_bytes(), &[2u8; 100]).unwrap();
        heap.apply(&one).unwrap();
    }
    let live = t.elapsed().as_secs_f64();
    let log_mib = heap.log_tail_bytes() as f64 / (1 << 20) as f64;
    drop(heap);
    let t = Instant::now();
    let heap = Heap::open(&path, opts).unwrap();
    let replay = t.elapsed().as_secs_f64();
    assert_eq!(heap.replay_report().records_replayed, tail);
    println!(
        "| {base} | {tail} | {hot} | {log_mib:.1} | {:.0} | {:.0} | {:.0} | {:.2} |",
        live * 1e3,
        replay * 1e3,
        tail as f64 / replay,
        live / replay
    );
}

fn replay_rows() {
    println!(
        "\n| base keys | tail records | keys written | tail MiB | live apply ms | replay ms | replayed records/s | replay vs live |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    replay(1_000_000, 400_000, 1_000_000);
    replay(1_000_000, 400_000, 10_000);
}

fn main() {
    // `cargo bench` passes `--bench`; a plain `cargo test --benches` run passes nothing: keep it short.
    let full = std::env::args().any(|a| a == "--bench");
    let secs: f64 = std::env::var("HEAPGRID_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if full { 3.0 } else { 0.05 });
    if full && std::env::args().any(|a| a == "replay") {
        replay_rows();
        return;
    }
    println!("single-put commits, 16-byte keys, 100-byte values, {secs} s per case");
    println!("\n| case | commits/s | p50 us | p99 us | p99.9 us | commits per fsync | vs fsync per commit |");
    println!("|---|---|---|---|---|---|---|");
    for committers in [1usize, 8, 50] {
        let base = run(FsyncPolicy::Always, committers, secs, Mode::FsyncPerCommit);
        row(&format!("always, fsync per commit, {committers} committers"), &base, None);
        let gc = run(FsyncPolicy::Always, committers, secs, Mode::MutexGroupCommit);
        row(&format!("always, mutex + group commit, {committers} committers"), &gc, Some(&base));
        let sh = run(FsyncPolicy::Always, committers, secs, Mode::Shared);
        row(&format!("always, SharedHeap (combining), {committers} committers"), &sh, Some(&base));
    }
    let base50 = run(FsyncPolicy::Always, 50, secs, Mode::FsyncPerCommit);
    for (name, policy) in [("every(100ms)", FsyncPolicy::EveryMs(100)), ("never", FsyncPolicy::Never)] {
        for committers in [1usize, 50] {
            let c = run(policy, committers, secs, Mode::Shared);
            row(&format!("{name}, SharedHeap, {committers} committers"), &c, Some(&base50));
        }
    }
    if full {
        checkpoint_pauses();
        replay_rows();
    } else {
        replay(10_000, 2_000, 10_000);
    }
}
