//! The snippet engine in-process, without actors or the network: what a snippet costs on top of
//! the read it does. Baseline: the same read straight from the store (a `BTreeMap`) in the same
//! run. Cases: `t[key]` compiled once and run (the cache hit), compiled per request (a miss),
//! and a read-modify-write.
//!
//! Run: `cargo bench --bench snippet` (`HEAPGRID_BENCH_ITERS` sets iterations per case).

use std::collections::BTreeMap;
use std::time::Instant;

use heapgrid::{GridError, Key, Limits, Value};
use heapgrid_actors::snippet::{Engine, ScanQuery, Store};

struct Mem(BTreeMap<Key, Value>);

impl Store for Mem {
    fn get(&mut self, _: &str, key: &Key) -> Result<Option<Value>, GridError> {
        Ok(self.0.get(key).cloned())
    }
    fn contains(&mut self, _: &str, key: &Key) -> Result<bool, GridError> {
        Ok(self.0.contains_key(key))
    }
    fn count(&mut self, _: &str) -> Result<u64, GridError> {
        Ok(self.0.len() as u64)
    }
    fn scan(&mut self, _: &str, _: &ScanQuery) -> Result<Vec<(Key, Value)>, GridError> {
        Ok(Vec::new())
    }
    fn check_write(&mut self, _: &str, _: &Key) -> Result<(), GridError> {
        Ok(())
    }
}

fn per_op(iters: u64, mut f: impl FnMut(u64)) -> f64 {
    for i in 0..iters / 10 {
        f(i);
    }
    let t = Instant::now();
    for i in 0..iters {
        f(i);
    }
    t.elapsed().as_nanos() as f64 / iters as f64
}

fn main() {
    let iters: u64 =
        std::env::var("HEAPGRID_BENCH_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let keys = 100_000u64;
    let mut store = Mem((0..keys).map(|k| (Key::Int(k as i64), Value::Bytes(vec![b'x'; 100]))).collect());
    let engine = Engine::new();
    engine.set_collections(["t".to_string()]);
    let limits = Limits::default();
    let key = |i: u64| Key::Int((i.wrapping_mul(2654435761) % keys) as i64);

    // `HEAPGRID_BENCH_CASE=uncached` runs only the compile-per-request case (for profiling).
    if std::env::var("HEAPGRID_BENCH_CASE").as_deref() == Ok("uncached") {
        let ns = per_op(iters, |i| {
            let c = engine.compile(&format!("t[key]\n# {i}")).unwrap();
            std::hint::black_box(c.run(&mut store, &limits, Some(&key(i)), &Value::Null).unwrap());
        });
        println!("compiled per request: {ns:.0} ns/op");
        return;
    }
    let direct = per_op(iters, |i| {
        std::hint::black_box(store.get("t", &key(i)).unwrap());
    });
    let read = engine.compile("t[key]").unwrap();
    let cached = per_op(iters, |i| {
        std::hint::black_box(read.run(&mut store, &limits, Some(&key(i)), &Value::Null).unwrap());
    });
    let uncached = per_op(iters / 10, |i| {
        let c = engine.compile(&format!("t[key]\n# {i}")).unwrap();
        std::hint::black_box(c.run(&mut store, &limits, Some(&key(i)), &Value::Null).unwrap());
    });
    let rmw =
        engine.compile("n = t.get(key, 0)\nt[key] = (n if type(n) == 'int' else 0) + 1\nt[key]").unwrap();
    let mut counters = Mem(BTreeMap::new());
    let rmw_ns = per_op(iters, |i| {
        std::hint::black_box(rmw.run(&mut counters, &limits, Some(&key(i)), &Value::Null).unwrap());
    });
    println!("| case | ns/op | / direct read |");
    println!("|---|---:|---:|");
    println!("| direct store read (baseline) | {direct:.0} | 1.00x |");
    println!("| `t[key]`, compiled once (cache hit) | {cached:.0} | {:.1}x |", cached / direct);
    println!("| `t[key]`, compiled per request (cache miss) | {uncached:.0} | {:.1}x |", uncached / direct);
    println!("| read-modify-write, compiled once | {rmw_ns:.0} | {:.1}x |", rmw_ns / direct);
}
