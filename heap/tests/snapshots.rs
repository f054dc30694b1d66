//! Readers on other threads against a writer that keeps rewriting: every snapshot a reader
//! loads is whole (each batch rewrote every key with one round number, so a snapshot shows one
//! round everywhere), its values intact, and every page it reaches passes its checksum, while
//! the writer copies, frees, reuses pages, checkpoints (in the foreground, and in the background
//! with a write-back thread while it goes on writing), grows the file and compacts. At the end
//! the heap reopens to its last round.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use heapgrid_heap::{FsyncPolicy, Heap, HeapOptions, Published, Snapshot, WriteBatch};

const KEYS: u32 = 300;
const ROUNDS: u64 = 400;

fn key(k: u32) -> [u8; 4] {
    k.to_be_bytes()
}

/// Round `r`'s value of key `k`: some inline, some in overflow chains.
fn value(k: u32, r: u64) -> Vec<u8> {
    let len = match k % 10 {
        0 => 5000,
        1 => 1500,
        _ => 40 + (k as usize % 60),
    };
    let mut v = r.to_le_bytes().to_vec();
    v.extend((0..len).map(|i| (k as u64 ^ r ^ i as u64).wrapping_mul(131) as u8));
    v
}

fn check(s: &Snapshot) -> u64 {
    s.verify_pages().unwrap();
    let mut round = None;
    let mut n = 0;
    for e in s.range::<[u8], _>(..) {
        let (k, v) = e.unwrap();
        let k = u32::from_be_bytes(k.try_into().unwrap());
        let r = u64::from_le_bytes(v[..8].try_into().unwrap());
        assert_eq!(*round.get_or_insert(r), r, "snapshot {} mixes rounds", s.generation());
        assert!(v.as_ref() == value(k, r).as_slice(), "key {k} damaged in snapshot {}", s.generation());
        n += 1;
    }
    assert_eq!(n, s.len());
    assert!(n == 0 || n == KEYS as u64, "snapshot {} holds {n} keys", s.generation());
    s.generation()
}

#[test]
fn readers_see_whole_intact_snapshots_while_the_writer_rewrites() {
    let dir = tempfile::tempdir().unwrap();
    let opts = HeapOptions { fsync: FsyncPolicy::Never, ..HeapOptions::default() };
    let mut heap = Heap::open(dir.path().join("h.heap"), opts.clone()).unwrap();
    let published = Arc::new(Published::<Snapshot>::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut writeback = None;
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (published, stop) = (published.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut seen, mut last) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    if let Some(s) = published.load() {
                        let g = check(&s);
                        assert!(g >= last, "generations went back: {g} after {last}");
                        last = g;
                        seen += 1;
                    }
                }
                seen
            })
        })
        .collect();
    for r in 0..ROUNDS {
        let mut b = WriteBatch::new();
        // Every key, in a round-dependent order, so different pages split and merge.
        for i in 0..KEYS {
            let k = (i * 7 + r as u32 * 13) % KEYS;
            b.put(&key(k), &value(k, r)).unwrap();
        }
        if r % 50 == 25 {
            // Deletes then re-inserts: merges and splits, leaves freed and reused.
            let mut d = WriteBatch::new();
            for k in (0..KEYS).filter(|k| k % 3 == 0) {
                d.delete(&key(k)).unwrap();
            }
            heap.apply(&d).unwrap();
        }
        heap.apply(&b).unwrap();
        published.publish(Arc::new(heap.capture().unwrap()));
        // Background checkpoints: begun at round 3 (mod 20), written back on another thread,
        // finished at round 13, with ten rounds of writes in between.
        if r % 20 == 3 {
            let job = heap.begin_checkpoint().unwrap().expect("changes to checkpoint");
            writeback = Some(std::thread::spawn(move || {
                let r = job.run();
                (job, r)
            }));
        }
        if r % 20 == 13
            && let Some(t) = writeback.take()
        {
            let (job, res) = t.join().unwrap();
            heap.finish_checkpoint(job, res).unwrap();
            heap.check_integrity().unwrap();
        }
        if r % 20 == 19 {
            heap.checkpoint().unwrap();
        }
        if r % 100 == 99 {
            heap.compact().unwrap();
        }
    }
    assert!(writeback.is_none());
    stop.store(true, Ordering::Relaxed);
    let seen: u64 = readers.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(seen > 0, "no reader loaded a snapshot");
    heap.check_integrity().unwrap();
    // With every snapshot gone, everything retired is reusable again.
    published.clear();
    heap.checkpoint().unwrap();
    heap.check_integrity().unwrap();
    let s = heap.capture().unwrap();
    assert_eq!(check(&s), s.generation());
    drop(s);
    // Reopened (checkpoint plus op log), the heap holds the last round.
    heap.close().unwrap();
    let mut heap = Heap::open(dir.path().join("h.heap"), opts).unwrap();
    heap.check_integrity().unwrap();
    let s = heap.capture().unwrap();
    check(&s);
    let (_, v) = s.range::<[u8], _>(..).next().unwrap().unwrap();
    assert_eq!(u64::from_le_bytes(v[..8].try_into().unwrap()), ROUNDS - 1);
}
