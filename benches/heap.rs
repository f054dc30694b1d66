//! heapgrid's persistent heap against the two stores a user would otherwise reach for: an
//! in-memory `BTreeMap` (the ceiling: no persistence at all) and redb (an embedded, crash-safe
//! copy-on-write B-tree file). Keys are 16 random bytes, values 100 random bytes.
//!
//! One run does two things:
//! - criterion micro benchmarks: one random get (heapgrid, redb, BTreeMap) and one durable batch of
//!   1000 random puts (heapgrid, redb), on stores holding N keys;
//! - a one-shot comparison over the full N-key workloads (sequential and random-order batched
//!   loads, random gets, full scans, file bytes per key, open times), printed as a markdown table
//!   with the ratio of heapgrid to each baseline, all measured in the same process.
//!
//! Select with `HEAPGRID_BENCH`: `compare` (comparison only), `micro` (criterion only), unset or
//! `all` (both). `HEAPGRID_BENCH_KEYS` overrides N (default 1,000,000; 10,000 under
//! `cargo test --benches`). `HEAPGRID_BENCH_DIR` sets where the files go (default: `bench-tmp` in
//! the cargo target directory, so on the build's disk and never on a tmpfs `/tmp`).
//!
//! Durability is equal: every batch is on disk when its call returns. The heapgrid column is
//! `Heap::apply` + `Heap::checkpoint` per batch (msync of the dirty pages, then the meta page) with
//! the op log off (`HeapOptions::op_log = false`): with a checkpoint per batch a log would only
//! add a write, a segment rotation and its fsyncs. redb commits one write transaction per batch
//! with its default durability (`Durability::Immediate`). An extra row measures the op-log
//! configuration: `FsyncPolicy::Always`, `Durability::wait` per batch (one log fsync), and a
//! checkpoint every `LOG_CHECKPOINT_EVERY` batches. Open times are given for both configurations.

use std::collections::BTreeMap;
use std::error::Error;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use heapgrid::heap::{FsyncPolicy, Heap, HeapOptions, PAGE_SIZE, WriteBatch};
use redb::{Database, ReadableDatabase, ReadableTableMetadata, TableDefinition};

type Res<T> = Result<T, Box<dyn Error>>;

const KEY_BYTES: usize = 16;
const VALUE_BYTES: usize = 100;
const BATCH: usize = 1000;
const KEYS_DEFAULT: usize = 1_000_000;
const KEYS_TEST: usize = 10_000;
/// Heap opened this many times to average the open time.
const OPENS: u32 = 20;
/// Full scans averaged per store (after one warm-up scan).
const SCANS: u32 = 3;
/// Rounds of N random gets per store; the median round is reported.
const GET_ROUNDS: u32 = 3;
/// Gets measured with redb's slower "one read transaction per get" pattern.
const REDB_TXN_GETS: usize = 200_000;
/// Batches between checkpoints in the op-log configuration (100k keys, about 12 MB of log).
const LOG_CHECKPOINT_EVERY: usize = 100;
const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");

/// The checkpoint-per-batch configuration: durability comes from the checkpoint alone.
fn opts_checkpointed() -> HeapOptions {
    HeapOptions { op_log: false, ..HeapOptions::default() }
}

/// The op-log configuration: each batch durable through one log fsync.
fn opts_logged() -> HeapOptions {
    HeapOptions { op_log: true, fsync: FsyncPolicy::Always, ..HeapOptions::default() }
}

type Key = [u8; KEY_BYTES];
type Value = [u8; VALUE_BYTES];

/// The data set: `keys` are sorted ascending and unique; `values[i]` belongs to `keys[i]`.
struct Data {
    keys: Vec<Key>,
    values: Vec<Value>,
    /// A random permutation of `0..n`: the order of the random-order load.
    random_order: Vec<u32>,
    /// Random indexes (with repetition) of existing keys to get.
    probes: Vec<u32>,
}

impl Data {
    fn new(n: usize, seed: u64) -> Data {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut keys: Vec<Key> = (0..n)
            .map(|_| {
                let mut k = [0u8; KEY_BYTES];
                rng.fill(&mut k);
                k
            })
            .collect();
        keys.sort_unstable();
        keys.dedup();
        while keys.len() < n {
            // A 128-bit collision: practically never, but keep n exact.
            let mut k = [0u8; KEY_BYTES];
            rng.fill(&mut k);
            if let Err(at) = keys.binary_search(&k) {
                keys.insert(at, k);
            }
        }
        let values = (0..n)
            .map(|_| {
                let mut v = [0u8; VALUE_BYTES];
                rng.fill(&mut v);
                v
            })
            .collect();
        let mut random_order: Vec<u32> = (0..n as u32).collect();
        rng.shuffle(&mut random_order);
        let probes = (0..n).map(|_| rng.usize(..n) as u32).collect();
        Data { keys, values, random_order, probes }
    }

    fn sequential_order(&self) -> Vec<u32> {
        (0..self.keys.len() as u32).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Loads

/// How long a load took, and the part of it spent making batches durable (heapgrid's
/// `checkpoint`, redb's `commit`).
#[derive(Clone, Copy)]
struct LoadTime {
    total: Duration,
    durable: Duration,
}

impl LoadTime {
    fn durable_share(&self) -> f64 {
        self.durable.as_secs_f64() / self.total.as_secs_f64()
    }
}

fn load_heapgrid(path: &Path, data: &Data, order: &[u32]) -> Res<(Heap, LoadTime)> {
    let t = Instant::now();
    let mut durable = Duration::ZERO;
    let mut heap = Heap::open(path, opts_checkpointed())?;
    let mut batch = WriteBatch::new();
    for chunk in order.chunks(BATCH) {
        batch.clear();
        for &i in chunk {
            batch.put(&data.keys[i as usize], &data.values[i as usize])?;
        }
        heap.apply(&batch)?;
        let c = Instant::now();
        heap.checkpoint()?;
        durable += c.elapsed();
    }
    let total = t.elapsed();
    assert_eq!(heap.len(), order.len() as u64);
    Ok((heap, LoadTime { total, durable }))
}

/// Op-log configuration: each batch is acknowledged after `Durability::wait` (an fsync of the
/// log); pages are checkpointed every `LOG_CHECKPOINT_EVERY` batches and once at the end.
fn load_heapgrid_logged(path: &Path, data: &Data, order: &[u32]) -> Res<(Heap, LoadTime)> {
    let t = Instant::now();
    let mut durable = Duration::ZERO;
    let mut heap = Heap::open(path, opts_logged())?;
    let sync = heap.durability().ok_or("op log missing")?;
    let mut batch = WriteBatch::new();
    for (b, chunk) in order.chunks(BATCH).enumerate() {
        batch.clear();
        for &i in chunk {
            batch.put(&data.keys[i as usize], &data.values[i as usize])?;
        }
        let lsn = heap.apply(&batch)?;
        let c = Instant::now();
        sync.wait(lsn)?;
        if (b + 1) % LOG_CHECKPOINT_EVERY == 0 {
            heap.checkpoint()?;
        }
        durable += c.elapsed();
    }
    let c = Instant::now();
    heap.checkpoint()?;
    durable += c.elapsed();
    let total = t.elapsed();
    assert_eq!(heap.len(), order.len() as u64);
    Ok((heap, LoadTime { total, durable }))
}

fn load_redb(path: &Path, data: &Data, order: &[u32]) -> Res<(Database, LoadTime)> {
    let t = Instant::now();
    let mut durable = Duration::ZERO;
    let db = Database::create(path)?;
    for chunk in order.chunks(BATCH) {
        let txn = db.begin_write()?;
        {
            let mut table = txn.open_table(TABLE)?;
            for &i in chunk {
                table.insert(&data.keys[i as usize][..], &data.values[i as usize][..])?;
            }
        }
        let c = Instant::now();
        txn.commit()?;
        durable += c.elapsed();
    }
    let total = t.elapsed();
    assert_eq!(db.begin_read()?.open_table(TABLE)?.len()?, order.len() as u64);
    Ok((db, LoadTime { total, durable }))
}

fn load_btree(data: &Data, order: &[u32]) -> (BTreeMap<Vec<u8>, Vec<u8>>, Duration) {
    let t = Instant::now();
    let mut map = BTreeMap::new();
    for &i in order {
        map.insert(data.keys[i as usize].to_vec(), data.values[i as usize].to_vec());
    }
    let took = t.elapsed();
    assert_eq!(map.len(), order.len());
    (map, took)
}

// ---------------------------------------------------------------------------------------------
// Reads

fn gets_heapgrid(heap: &Heap, data: &Data, probes: &[u32]) -> Res<Duration> {
    let t = Instant::now();
    let mut bytes = 0usize;
    for &i in probes {
        bytes += heap.get_ref(&data.keys[i as usize])?.ok_or("missing")?.len();
    }
    let took = t.elapsed();
    assert_eq!(black_box(bytes), probes.len() * VALUE_BYTES);
    Ok(took)
}

/// One read transaction and table handle for all gets: redb's fastest read path.
fn gets_redb(db: &Database, data: &Data, probes: &[u32]) -> Res<Duration> {
    let t = Instant::now();
    let txn = db.begin_read()?;
    let table = txn.open_table(TABLE)?;
    let mut bytes = 0usize;
    for &i in probes {
        bytes += table.get(&data.keys[i as usize][..])?.ok_or("missing")?.value().len();
    }
    let took = t.elapsed();
    assert_eq!(black_box(bytes), probes.len() * VALUE_BYTES);
    Ok(took)
}

/// A read transaction per get: what a request handler that does one lookup per call would do.
fn gets_redb_txn_each(db: &Database, data: &Data, probes: &[u32]) -> Res<Duration> {
    let t = Instant::now();
    let mut bytes = 0usize;
    for &i in probes {
        let txn = db.begin_read()?;
        let table = txn.open_table(TABLE)?;
        bytes += table.get(&data.keys[i as usize][..])?.ok_or("missing")?.value().len();
    }
    let took = t.elapsed();
    assert_eq!(black_box(bytes), probes.len() * VALUE_BYTES);
    Ok(took)
}

fn gets_btree(map: &BTreeMap<Vec<u8>, Vec<u8>>, data: &Data, probes: &[u32]) -> Res<Duration> {
    let t = Instant::now();
    let mut bytes = 0usize;
    for &i in probes {
        bytes += map.get(&data.keys[i as usize][..]).ok_or("missing")?.len();
    }
    let took = t.elapsed();
    assert_eq!(black_box(bytes), probes.len() * VALUE_BYTES);
    Ok(took)
}

fn scan_heapgrid(heap: &Heap, n: usize) -> Res<Duration> {
    let t = Instant::now();
    let (mut count, mut bytes) = (0usize, 0usize);
    for e in heap.iter() {
        let (k, v) = e?;
        count += 1;
        bytes += k.len() + v.len();
    }
    let took = t.elapsed();
    assert_eq!((count, black_box(bytes)), (n, n * (KEY_BYTES + VALUE_BYTES)));
    Ok(took)
}

fn scan_redb(db: &Database, n: usize) -> Res<Duration> {
    let t = Instant::now();
    let txn = db.begin_read()?;
    let table = txn.open_table(TABLE)?;
    let (mut count, mut bytes) = (0usize, 0usize);
    for e in table.range::<&[u8]>(..)? {
        let (k, v) = e?;
        count += 1;
        bytes += k.value().len() + v.value().len();
    }
    let took = t.elapsed();
    assert_eq!((count, black_box(bytes)), (n, n * (KEY_BYTES + VALUE_BYTES)));
    Ok(took)
}

fn scan_btree(map: &BTreeMap<Vec<u8>, Vec<u8>>, n: usize) -> Duration {
    let t = Instant::now();
    let (mut count, mut bytes) = (0usize, 0usize);
    for (k, v) in map {
        count += 1;
        bytes += k.len() + v.len();
    }
    let took = t.elapsed();
    assert_eq!((count, black_box(bytes)), (n, n * (KEY_BYTES + VALUE_BYTES)));
    took
}

/// Average, minimum and maximum time of `Heap::open` of the closed heap at `path`.
fn open_times_heapgrid(path: &Path, opts: &HeapOptions) -> Res<OpenTimes> {
    let mut times = Vec::new();
    let mut stats = None;
    for _ in 0..OPENS {
        let t = Instant::now();
        let heap = Heap::open(path, opts.clone())?;
        times.push(t.elapsed());
        stats = Some(heap.stats());
        // Dropped before the next open: the heap holds an exclusive lock on its file.
        drop(heap);
    }
    let sum: Duration = times.iter().sum();
    let min = *times.iter().min().ok_or("no opens")?;
    let max = *times.iter().max().ok_or("no opens")?;
    let st = stats.ok_or("no opens")?;
    Ok(OpenTimes { avg: sum / OPENS, min, max, page_count: st.page_count, free_pages: st.free_pages })
}

#[derive(Clone, Copy)]
struct OpenTimes {
    avg: Duration,
    min: Duration,
    max: Duration,
    /// Pages of the opened heap, and how many of them the free list (read at open) names.
    page_count: u64,
    free_pages: u64,
}

// ---------------------------------------------------------------------------------------------
// Where the files go

fn bench_base_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HEAPGRID_BENCH_DIR") {
        return d.into();
    }
    // The executable is <target>/<profile>/deps/heap-<hash>: a directory under <target> is on
    // the build's disk. `std::env::temp_dir()` may be a tmpfs, where msync and fsync are free and
    // the durability cost this benchmark measures would vanish.
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.join("bench-tmp")))
        .unwrap_or_else(std::env::temp_dir)
}

/// File-system type of the mount holding `dir` (Linux; "unknown" elsewhere).
fn fs_type(dir: &Path) -> String {
    let Ok(dir) = dir.canonicalize() else {
        return "unknown".into();
    };
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return "unknown".into();
    };
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, mnt, ty) = (f.next()?, f.next()?, f.next()?);
            dir.starts_with(mnt).then(|| (mnt.len(), ty.to_string()))
        })
        .max()
        .map_or_else(|| "unknown".into(), |(_, ty)| ty)
}

// ---------------------------------------------------------------------------------------------
// Stores for the micro benchmarks

struct Stores {
    heap: Heap,
    db: Database,
    map: BTreeMap<Vec<u8>, Vec<u8>>,
}

// ---------------------------------------------------------------------------------------------
// The one-shot comparison

/// Space figures of one store after a load.
#[derive(Clone, Copy, Default)]
struct Space {
    /// heapgrid: `HeapStats::file_bytes`; redb: the file's length.
    file_bytes: u64,
    /// heapgrid: `page_count * PAGE_SIZE` (0 for redb).
    page_bytes: u64,
}

struct Report {
    n: usize,
    dir: PathBuf,
    fs: String,
    // Throughputs in operations per second: [heapgrid, redb, BTreeMap].
    seq_put: [f64; 3],
    rand_put: [f64; 3],
    // Share of the load time spent in checkpoint / commit: [heapgrid, redb].
    seq_durable: [f64; 2],
    rand_durable: [f64; 2],
    get: [f64; 3],
    get_redb_txn_each: f64,
    scan: [f64; 3],
    first_scan: [f64; 2],
    // Space: [heapgrid, redb].
    seq_space: [Space; 2],
    rand_space: [Space; 2],
    compacted: [Space; 2],
    hg_stats: String,
    hg_compact: String,
    hg_compacted_stats: String,
    // Op-log configuration: puts in keys/s, share of time in wait + checkpoint, space.
    seq_put_log: f64,
    rand_put_log: f64,
    seq_durable_log: f64,
    rand_durable_log: f64,
    rand_space_log: Space,
    log_bytes: u64,
    // Open times: op log off, then default options (op log on).
    open_big: OpenTimes,
    open_small: OpenTimes,
    open_big_log: OpenTimes,
    open_big_log_pages: OpenTimes,
    open_small_log: OpenTimes,
    small_keys: usize,
    redb_open: Duration,
    total: Duration,
}

fn per_sec(ops: usize, d: Duration) -> f64 {
    ops as f64 / d.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn heap_space(heap: &Heap) -> Space {
    let st = heap.stats();
    Space { file_bytes: st.file_bytes, page_bytes: st.page_count * PAGE_SIZE as u64 }
}

fn file_space(path: &Path) -> Res<Space> {
    Ok(Space { file_bytes: std::fs::metadata(path)?.len(), page_bytes: 0 })
}

/// Bytes of the op-log segments of the heap file `heap` (named `<heap file>.log.<lsn>`).
fn log_bytes(heap: &Path) -> Res<u64> {
    let prefix = format!("{}.log.", heap.file_name().ok_or("no file name")?.to_string_lossy());
    let mut total = 0;
    for e in std::fs::read_dir(heap.parent().ok_or("no parent")?)? {
        let e = e?;
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            total += e.metadata()?.len();
        }
    }
    Ok(total)
}

fn compare(data: &Data, dir: &Path) -> Res<(Report, Stores)> {
    let t_all = Instant::now();
    let n = data.keys.len();
    let seq = data.sequential_order();
    let rand = &data.random_order;

    // 1. Sequential batched puts (each store built from empty, then dropped).
    eprintln!("compare: sequential load of {n} keys");
    let (seq_path_h, seq_path_r) = (dir.join("seq.heap"), dir.join("seq.redb"));
    let (heap, hg) = load_heapgrid(&seq_path_h, data, &seq)?;
    let hg_seq_space = heap_space(&heap);
    heap.close()?;
    let (db, rd) = load_redb(&seq_path_r, data, &seq)?;
    drop(db);
    let seq_space = [hg_seq_space, file_space(&seq_path_r)?];
    let (map, bt) = load_btree(data, &seq);
    drop(map);
    let seq_put = [per_sec(n, hg.total), per_sec(n, rd.total), per_sec(n, bt)];
    let seq_durable = [hg.durable_share(), rd.durable_share()];
    std::fs::remove_file(&seq_path_h)?;
    std::fs::remove_file(&seq_path_r)?;
    let seq_log_path = dir.join("seq_log.heap");
    let (heap, hgl) = load_heapgrid_logged(&seq_log_path, data, &seq)?;
    heap.close()?;
    let (seq_put_log, seq_durable_log) = (per_sec(n, hgl.total), hgl.durable_share());

    // 2. Random-order batched puts; these stores serve every later measurement.
    eprintln!("compare: random-order load of {n} keys");
    let heap_path = dir.join("rand.heap");
    let redb_path = dir.join("rand.redb");
    let (heap, hg) = load_heapgrid(&heap_path, data, rand)?;
    let (db, rd) = load_redb(&redb_path, data, rand)?;
    let (map, bt) = load_btree(data, rand);
    let rand_put = [per_sec(n, hg.total), per_sec(n, rd.total), per_sec(n, bt)];
    let rand_durable = [hg.durable_share(), rd.durable_share()];

    // 5. Space after the random load.
    let hg_rand_space = heap_space(&heap);
    let hg_stats = format!("{:?}", heap.stats());
    heap.close()?;
    drop(db);
    let rand_space = [hg_rand_space, file_space(&redb_path)?];
    let rand_log_path = dir.join("rand_log.heap");
    let (heap, hgl) = load_heapgrid_logged(&rand_log_path, data, rand)?;
    let (rand_put_log, rand_durable_log) = (per_sec(n, hgl.total), hgl.durable_share());
    let rand_space_log = heap_space(&heap);
    heap.close()?;
    let log_bytes = log_bytes(&rand_log_path)?;

    // 6. Open times of the closed heaps; redb's for reference.
    eprintln!("compare: open times");
    let open_big = open_times_heapgrid(&heap_path, &opts_checkpointed())?;
    let open_big_log = open_times_heapgrid(&rand_log_path, &HeapOptions::default())?;
    // The same heap without its log: separates page-side cost (free list) from log-side cost.
    let open_big_log_pages = open_times_heapgrid(&rand_log_path, &opts_checkpointed())?;
    let small_keys = (n / 10).max(1);
    let small_path = dir.join("small.heap");
    let (small_heap, _) = load_heapgrid(&small_path, data, &rand[..small_keys])?;
    small_heap.close()?;
    let open_small = open_times_heapgrid(&small_path, &opts_checkpointed())?;
    let small_log_path = dir.join("small_log.heap");
    let (small_heap, _) = load_heapgrid_logged(&small_log_path, data, &rand[..small_keys])?;
    small_heap.close()?;
    let open_small_log = open_times_heapgrid(&small_log_path, &HeapOptions::default())?;
    let t = Instant::now();
    let db = Database::open(&redb_path)?;
    let redb_open = t.elapsed();

    // 3 and 4. Reads on the reopened stores. The first scan after open is timed on its own: it
    // verifies heapgrid's page checksums and fills redb's cache; later reads are warm. Stores
    // take turns within each round so drift on the machine hits all of them alike.
    eprintln!("compare: scans and gets");
    let heap = Heap::open(&heap_path, opts_checkpointed())?;
    let first_scan = [per_sec(n, scan_heapgrid(&heap, n)?), per_sec(n, scan_redb(&db, n)?)];
    scan_btree(&map, n);
    let mut scan_t = [Duration::ZERO; 3];
    for _ in 0..SCANS {
        scan_t[0] += scan_heapgrid(&heap, n)?;
        scan_t[1] += scan_redb(&db, n)?;
        scan_t[2] += scan_btree(&map, n);
    }
    let scan = scan_t.map(|d| per_sec(n * SCANS as usize, d));
    let probes = &data.probes;
    let g = probes.len();
    let mut rounds: [Vec<f64>; 3] = Default::default();
    for _ in 0..GET_ROUNDS {
        rounds[0].push(per_sec(g, gets_heapgrid(&heap, data, probes)?));
        rounds[1].push(per_sec(g, gets_redb(&db, data, probes)?));
        rounds[2].push(per_sec(g, gets_btree(&map, data, probes)?));
    }
    let get = rounds.map(median);
    let few = &probes[..REDB_TXN_GETS.min(g)];
    let get_redb_txn_each = per_sec(few.len(), gets_redb_txn_each(&db, data, few)?);

    // Compaction last (it rewrites both files), on copies so the micro benchmarks get the
    // stores exactly as loaded.
    eprintln!("compare: compaction");
    let heap_copy = dir.join("compact.heap");
    let redb_copy = dir.join("compact.redb");
    std::fs::copy(&heap_path, &heap_copy)?;
    std::fs::copy(&redb_path, &redb_copy)?;
    let mut h = Heap::open(&heap_copy, opts_checkpointed())?;
    let cs = h.compact()?;
    let hg_compact = format!("{cs:?}");
    let hg_compacted = heap_space(&h);
    let hg_compacted_stats = format!("{:?}", h.stats());
    h.close()?;
    let mut d = Database::open(&redb_copy)?;
    while d.compact()? {}
    drop(d);
    let compacted = [hg_compacted, file_space(&redb_copy)?];
    std::fs::remove_file(&heap_copy)?;
    std::fs::remove_file(&redb_copy)?;

    let report = Report {
        n,
        dir: dir.to_path_buf(),
        fs: fs_type(dir),
        seq_put,
        rand_put,
        seq_durable,
        rand_durable,
        get,
        get_redb_txn_each,
        scan,
        first_scan,
        seq_space,
        rand_space,
        compacted,
        hg_stats,
        hg_compact,
        hg_compacted_stats,
        seq_put_log,
        rand_put_log,
        seq_durable_log,
        rand_durable_log,
        rand_space_log,
        log_bytes,
        open_big,
        open_small,
        open_big_log,
        open_big_log_pages,
        open_small_log,
        small_keys,
        redb_open,
        total: t_all.elapsed(),
    };
    Ok((report, Stores { heap, db, map }))
}

fn fmt_rate(r: f64) -> String {
    if r >= 1e6 { format!("{:.2} M/s", r / 1e6) } else { format!("{:.1} k/s", r / 1e3) }
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

fn fmt_keys(n: usize) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

fn fmt_open(o: &OpenTimes) -> String {
    format!("{} ({} / {})", ms(o.avg), ms(o.min), ms(o.max))
}

fn fmt_open_pages(o: &OpenTimes) -> String {
    format!("{} pages, {} free", o.page_count, o.free_pages)
}

impl Report {
    fn print(&self) {
        let n = self.n as f64;
        let per_key = |b: u64| b as f64 / n;
        let keys = fmt_keys(self.n);
        let small = fmt_keys(self.small_keys);
        println!();
        println!(
            "## heapgrid heap vs redb vs BTreeMap: {keys} keys of {KEY_BYTES} B, values of {VALUE_BYTES} B"
        );
        println!("files in {} ({})", self.dir.display(), self.fs);
        println!();
        println!(
            "| workload ({keys} keys) | heapgrid | redb | BTreeMap | heapgrid / redb | heapgrid / BTreeMap |"
        );
        println!("|---|---:|---:|---:|---:|---:|");
        let row = |name: &str, r: [f64; 3]| {
            println!(
                "| {name} | {} | {} | {} | {:.2}x | {:.2}x |",
                fmt_rate(r[0]),
                fmt_rate(r[1]),
                fmt_rate(r[2]),
                r[0] / r[1],
                r[0] / r[2]
            );
        };
        let row2 = |name: &str, hg: String, rd: String, ratio: f64| {
            println!("| {name} | {hg} | {rd} | | {ratio:.2}x | |");
        };
        let row1 = |name: &str, hg: String| println!("| {name} | {hg} | | | | |");
        row("sequential put, batch = apply + checkpoint (keys/s)", self.seq_put);
        row("random-order put, batch = apply + checkpoint (keys/s)", self.rand_put);
        let log = format!("op log Always, checkpoint every {LOG_CHECKPOINT_EVERY} batches");
        row(&format!("sequential put, {log} (keys/s)"), [self.seq_put_log, self.seq_put[1], self.seq_put[2]]);
        row(
            &format!("random-order put, {log} (keys/s)"),
            [self.rand_put_log, self.rand_put[1], self.rand_put[2]],
        );
        row(&format!("random get (gets/s, median of {GET_ROUNDS} rounds)"), self.get);
        row2(
            "random get vs redb with a read txn per get (gets/s)",
            fmt_rate(self.get[0]),
            fmt_rate(self.get_redb_txn_each),
            self.get[0] / self.get_redb_txn_each,
        );
        row(&format!("full scan in key order, warm (keys/s, {SCANS} scans)"), self.scan);
        row2(
            "first full scan after open (keys/s)",
            fmt_rate(self.first_scan[0]),
            fmt_rate(self.first_scan[1]),
            self.first_scan[0] / self.first_scan[1],
        );
        let bytes_row = |name: &str, h: u64, r: u64| {
            row2(name, format!("{:.1}", per_key(h)), format!("{:.1}", per_key(r)), h as f64 / r as f64);
        };
        let [h, r] = self.rand_space;
        bytes_row("file bytes / key after random load", h.file_bytes, r.file_bytes);
        row1("page_count x 4096 / key after random load", format!("{:.1}", per_key(h.page_bytes)));
        let [h, r] = self.seq_space;
        bytes_row("file bytes / key after sequential load", h.file_bytes, r.file_bytes);
        row1("page_count x 4096 / key after sequential load", format!("{:.1}", per_key(h.page_bytes)));
        let [h, r] = self.compacted;
        bytes_row("file bytes / key after compacting the random load", h.file_bytes, r.file_bytes);
        let h = self.rand_space_log;
        row1(
            "op-log config, random load: file bytes / key; page_count x 4096 / key; log bytes / key",
            format!(
                "{:.1}; {:.1}; {:.1}",
                per_key(h.file_bytes),
                per_key(h.page_bytes),
                per_key(self.log_bytes)
            ),
        );
        println!(
            "| open, {keys} keys, op log off (avg of {OPENS}; min / max) | {} | {} (one open) | | | |",
            fmt_open(&self.open_big),
            ms(self.redb_open)
        );
        row1(
            &format!("open, {small} keys, op log off (avg of {OPENS}; min / max)"),
            fmt_open(&self.open_small),
        );
        row1(
            &format!("open, {keys} keys, default options = op log on (avg of {OPENS}; min / max)"),
            fmt_open(&self.open_big_log),
        );
        row1(
            &format!("open, {small} keys, default options = op log on (avg of {OPENS}; min / max)"),
            fmt_open(&self.open_small_log),
        );
        row1(
            &format!(
                "open, {keys} keys, that op-log heap opened with op log off (avg of {OPENS}; min / max)"
            ),
            fmt_open(&self.open_big_log_pages),
        );
        println!();
        let pct = |x: f64| format!("{:.0}%", x * 100.0);
        println!(
            "share of load time making batches durable: checkpoint per batch (heapgrid) / commit (redb): \
             sequential {} / {}, random-order {} / {}; op-log config (wait + checkpoints): sequential {}, \
             random-order {}",
            pct(self.seq_durable[0]),
            pct(self.seq_durable[1]),
            pct(self.rand_durable[0]),
            pct(self.rand_durable[1]),
            pct(self.seq_durable_log),
            pct(self.rand_durable_log)
        );
        println!(
            "heaps opened: op log off {keys}: {}, {small}: {}; op log on {keys}: {}, {small}: {} \
             (op-log segments kept: {} bytes for {keys})",
            fmt_open_pages(&self.open_big),
            fmt_open_pages(&self.open_small),
            fmt_open_pages(&self.open_big_log),
            fmt_open_pages(&self.open_small_log),
            self.log_bytes
        );
        println!("heapgrid stats after the random load: {}", self.hg_stats);
        println!("heapgrid compaction of a copy: {}", self.hg_compact);
        println!("heapgrid stats after that compaction: {}", self.hg_compacted_stats);
        println!();
        println!("Goals:");
        let get_ratio = self.get[0] / self.get[1];
        println!("- random get >= 1.0x redb: {get_ratio:.2}x -> {}", verdict(get_ratio >= 1.0));
        let (sr, rr) = (self.seq_put[0] / self.seq_put[1], self.rand_put[0] / self.rand_put[1]);
        println!(
            "- batched put >= 2x redb, checkpoint per batch: sequential {sr:.2}x -> {}, random-order {rr:.2}x -> {}",
            verdict(sr >= 2.0),
            verdict(rr >= 2.0)
        );
        let (sr, rr) = (self.seq_put_log / self.seq_put[1], self.rand_put_log / self.rand_put[1]);
        println!(
            "- batched put >= 2x redb, op-log config: sequential {sr:.2}x -> {}, random-order {rr:.2}x -> {}",
            verdict(sr >= 2.0),
            verdict(rr >= 2.0)
        );
        let [h, _] = self.rand_space;
        let (fb, pb) = (per_key(h.file_bytes), per_key(h.page_bytes));
        println!(
            "- file bytes per key <= 140 (random load): file_bytes {fb:.1} -> {}, page_count x 4096 {pb:.1} -> {}",
            verdict(fb <= 140.0),
            verdict(pb <= 140.0)
        );
        for (what, big, small_t) in [
            ("op log off", self.open_big.avg, self.open_small.avg),
            ("default options", self.open_big_log.avg, self.open_small_log.avg),
        ] {
            println!(
                "- open <= 50 ms and flat ({what}): {keys} keys {} -> {}; {small} keys {}; ratio {:.2}x",
                ms(big),
                verdict(big <= Duration::from_millis(50)),
                ms(small_t),
                big.as_secs_f64() / small_t.as_secs_f64()
            );
        }
        println!("comparison took {:.1} s", self.total.as_secs_f64());
    }
}

// ---------------------------------------------------------------------------------------------
// Criterion micro benchmarks

fn micro(c: &mut Criterion, data: &Data, stores: &mut Stores) {
    let keys = &data.keys;
    let probes = &data.probes;

    let mut g = c.benchmark_group("random_get");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("heapgrid", |b| {
        b.iter(|| {
            i = (i + 1) % probes.len();
            let k = &keys[probes[i] as usize];
            black_box(stores.heap.get_ref(black_box(k)).unwrap().map(|v| v.len()))
        })
    });
    let txn = stores.db.begin_read().unwrap();
    let table = txn.open_table(TABLE).unwrap();
    g.bench_function("redb", |b| {
        b.iter(|| {
            i = (i + 1) % probes.len();
            let k = &keys[probes[i] as usize][..];
            black_box(table.get(black_box(k)).unwrap().map(|v| v.value().len()))
        })
    });
    drop(table);
    drop(txn);
    g.bench_function("btreemap", |b| {
        b.iter(|| {
            i = (i + 1) % probes.len();
            let k = &keys[probes[i] as usize][..];
            black_box(stores.map.get(black_box(k)).map(Vec::len))
        })
    });
    g.finish();

    // New random keys (a fresh seed: practically never one of the loaded keys), each batch
    // durable. The stores grow by 1000 keys per iteration while this runs.
    let mut g = c.benchmark_group("random_put_batch_1000");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sampling_mode(SamplingMode::Flat);
    let mut rng = fastrand::Rng::with_seed(0x05EE_D0FB_A7C4);
    let value = data.values[0];
    let mut fresh_keys = move |out: &mut Vec<Key>| {
        out.clear();
        for _ in 0..BATCH {
            let mut k = [0u8; KEY_BYTES];
            rng.fill(&mut k);
            out.push(k);
        }
    };
    let mut batch_keys = Vec::with_capacity(BATCH);
    let mut batch = WriteBatch::new();
    g.bench_function("heapgrid", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                fresh_keys(&mut batch_keys);
                let t = Instant::now();
                batch.clear();
                for k in &batch_keys {
                    batch.put(k, &value).unwrap();
                }
                stores.heap.apply(&batch).unwrap();
                stores.heap.checkpoint().unwrap();
                total += t.elapsed();
            }
            total
        })
    });
    g.bench_function("redb", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                fresh_keys(&mut batch_keys);
                let t = Instant::now();
                let txn = stores.db.begin_write().unwrap();
                {
                    let mut table = txn.open_table(TABLE).unwrap();
                    for k in &batch_keys {
                        table.insert(&k[..], &value[..]).unwrap();
                    }
                }
                txn.commit().unwrap();
                total += t.elapsed();
            }
            total
        })
    });
    g.finish();
}

// ---------------------------------------------------------------------------------------------

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let has = |f: &str| args.iter().any(|a| a == f);
    // As criterion decides: `cargo bench` passes --bench; `cargo test --benches` does not.
    let bench_mode = has("--bench") && !has("--test");
    let listing = has("--list");
    let which = std::env::var("HEAPGRID_BENCH").unwrap_or_else(|_| "all".into());
    let (mut run_compare, run_micro) = match which.as_str() {
        "compare" => (true, false),
        "micro" => (false, true),
        "all" | "" => (true, true),
        other => return Err(format!("HEAPGRID_BENCH={other}: use compare, micro or all").into()),
    };
    let mut n = match std::env::var("HEAPGRID_BENCH_KEYS") {
        Ok(s) => s.parse()?,
        Err(_) if bench_mode => KEYS_DEFAULT,
        Err(_) => KEYS_TEST,
    };
    if listing {
        // Criterion only prints the benchmark names; build the smallest stores that satisfy it.
        run_compare = false;
        n = BATCH;
    }
    if n < BATCH {
        return Err(format!("HEAPGRID_BENCH_KEYS={n}: need at least {BATCH}").into());
    }

    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let base = bench_base_dir();
    std::fs::create_dir_all(&base)?;
    let dir = tempfile::Builder::new().prefix("heap-").tempdir_in(&base)?;
    eprintln!(
        "heapgrid bench: {n} keys, files in {} ({}), HEAPGRID_BENCH={which}",
        dir.path().display(),
        fs_type(dir.path())
    );
    let data = Data::new(n, 0x4EA9_6121_D000_0001);

    let (report, mut stores) = if run_compare {
        let (r, s) = compare(&data, dir.path())?;
        (Some(r), s)
    } else {
        let (heap, _) = load_heapgrid(&dir.path().join("rand.heap"), &data, &data.random_order)?;
        let (db, _) = load_redb(&dir.path().join("rand.redb"), &data, &data.random_order)?;
        let (map, _) = load_btree(&data, &data.random_order);
        (None, Stores { heap, db, map })
    };
    if run_micro {
        micro(&mut criterion, &data, &mut stores);
        criterion.final_summary();
    }
    // Last, so the table is the end of the output.
    if let Some(r) = &report {
        r.print();
    }
    Ok(())
}
