//! Model-based tests: random operation sequences applied to a `Heap` and to a `BTreeMap`,
//! compared after every step. `Crash` drops the heap without a checkpoint and tears every
//! unflushed page of the simulated disk; the heap must then equal the model as of the last
//! checkpoint. `check_integrity` runs after every reopen. `Capture` takes a snapshot (kept with a
//! copy of the model as of that step, up to `SNAPSHOTS_KEPT`), `ReadOld` reads a kept snapshot
//! in full and compares it with its model, whatever the heap did since (writes, checkpoints,
//! compaction, reopen, crash), and `DropOld` lets one go.

use std::collections::BTreeMap;
use std::ops::Bound;

use heapgrid_heap::storage::{SimDisk, Storage};
use heapgrid_heap::{CheckpointJob, Heap, HeapOptions, Snapshot, WriteBatch};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Put(u16, usize),
    /// `Heap::upsert`: the new value records the old one's length; `true`: `f` declines.
    Upsert(u16, usize, bool),
    Delete(u16),
    Get(u16),
    Batch(Vec<(u16, Option<usize>)>),
    Range(u16, u16, bool),
    Checkpoint,
    Reopen,
    Crash(u64),
    Compact,
    /// One step of online compaction reading about this many pages.
    CompactStep(u64),
    Capture,
    ReadOld(usize),
    DropOld(usize),
    /// Begin a checkpoint whose write-back runs later (`CheckpointRun`, `CheckpointEnd`) while
    /// writes go on.
    CheckpointBegin,
    CheckpointRun,
    CheckpointEnd,
}

/// Most snapshots the model keeps at once.
const SNAPSHOTS_KEPT: usize = 4;

fn key(k: u16) -> Vec<u8> {
    // Mostly short keys, some long ones, so nodes hold very different cell counts.
    let mut v = format!("key{:05}", k).into_bytes();
    if k.is_multiple_of(7) {
        v.resize(100 + (k as usize % 400), b'x');
    }
    v
}

fn value(k: u16, len: usize, salt: u64) -> Vec<u8> {
    (0..len).map(|i| (k as u64 ^ salt ^ i as u64).wrapping_mul(31) as u8).collect()
}

fn op() -> impl Strategy<Value = Op> {
    let k = 0u16..400;
    let len = prop_oneof![8 => 0usize..200, 1 => 900usize..1100, 1 => 3000usize..20000];
    prop_oneof![
        30 => (k.clone(), len.clone()).prop_map(|(k, l)| Op::Put(k, l)),
        10 => (k.clone(), len.clone(), prop::bool::weighted(0.2)).prop_map(|(k, l, d)| Op::Upsert(k, l, d)),
        12 => k.clone().prop_map(Op::Delete),
        6 => k.clone().prop_map(Op::Get),
        6 => prop::collection::vec((k.clone(), prop::option::of(len)), 1..40).prop_map(Op::Batch),
        3 => (k.clone(), k, any::<bool>()).prop_map(|(a, b, r)| Op::Range(a, b, r)),
        3 => Just(Op::Checkpoint),
        1 => Just(Op::Reopen),
        2 => any::<u64>().prop_map(Op::Crash),
        1 => Just(Op::Compact),
        3 => (1u64..64).prop_map(Op::CompactStep),
        4 => Just(Op::Capture),
        4 => (0..SNAPSHOTS_KEPT).prop_map(Op::ReadOld),
        2 => (0..SNAPSHOTS_KEPT).prop_map(Op::DropOld),
        2 => Just(Op::CheckpointBegin),
        1 => Just(Op::CheckpointRun),
        2 => Just(Op::CheckpointEnd),
    ]
}

fn open(disk: &SimDisk) -> Heap {
    let h = Heap::open_storage(Box::new(disk.storage()) as Box<dyn Storage>, HeapOptions::default()).unwrap();
    h.check_integrity().unwrap();
    h
}

fn assert_same(h: &Heap, model: &BTreeMap<Vec<u8>, Vec<u8>>) {
    assert_eq!(h.len(), model.len() as u64);
    let got: Vec<(Vec<u8>, Vec<u8>)> =
        h.iter().map(|e| e.map(|(k, v)| (k.to_vec(), v.into_owned())).unwrap()).collect();
    let want: Vec<(Vec<u8>, Vec<u8>)> = model.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    assert!(got == want, "contents differ from the model");
}

type Model = BTreeMap<Vec<u8>, Vec<u8>>;

/// A snapshot equals the model as of its capture: every entry, the count, and point reads.
fn assert_snapshot(s: &Snapshot, model: &BTreeMap<Vec<u8>, Vec<u8>>) {
    assert_eq!(s.len(), model.len() as u64);
    let got: Vec<(Vec<u8>, Vec<u8>)> =
        s.range::<[u8], _>(..).map(|e| e.map(|(k, v)| (k.to_vec(), v.into_owned())).unwrap()).collect();
    let want: Vec<(Vec<u8>, Vec<u8>)> = model.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    assert!(got == want, "snapshot {} differs from the model as of its capture", s.generation());
    for k in (0..400u16).step_by(37) {
        assert_eq!(s.get_ref(&key(k)).unwrap().map(|v| v.into_owned()), model.get(&key(k)).cloned());
        assert_eq!(s.contains(&key(k)).unwrap(), model.contains_key(&key(k)));
    }
    s.verify_pages().unwrap();
}

fn run(ops: Vec<Op>) {
    let disk = SimDisk::new();
    let mut h = Some(open(&disk));
    let mut snaps: Vec<(Snapshot, Model)> = Vec::new();
    // A checkpoint in flight: its job, the model as of its begin, and whether it ran.
    let mut in_flight: Option<(CheckpointJob, Model, bool)> = None;
    let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut durable = model.clone();
    for (step, op) in ops.into_iter().enumerate() {
        let heap = h.as_mut().unwrap();
        let salt = step as u64;
        // Everything but writes, reads, captures and a crash needs the checkpoint in flight ended.
        let ends_checkpoint =
            matches!(op, Op::Checkpoint | Op::Reopen | Op::Compact | Op::CheckpointEnd | Op::CheckpointBegin);
        if ends_checkpoint && let Some((job, at_begin, ran)) = in_flight.take() {
            if !ran {
                job.run().unwrap();
            }
            heap.finish_checkpoint(job, Ok(())).unwrap();
            durable = at_begin;
            heap.check_integrity().unwrap();
        }
        match op {
            Op::Put(k, l) => {
                let v = value(k, l, salt);
                heap.put(&key(k), &v).unwrap();
                model.insert(key(k), v);
            }
            Op::Upsert(k, l, decline) => {
                let want_old = model.get(&key(k)).cloned();
                let mut v = value(k, l, salt);
                let r = heap.upsert(&key(k), v.len() + 8, false, |old| {
                    assert_eq!(old.map(<[u8]>::to_vec), want_old, "upsert saw another old value");
                    if decline {
                        return Err(heapgrid_heap::Error::Format("declined".into()));
                    }
                    v.extend_from_slice(&(old.map_or(0, <[u8]>::len) as u64).to_le_bytes());
                    Ok(v.clone())
                });
                match (decline, r) {
                    (true, Err(_)) => {}
                    (false, Ok(_)) => {
                        model.insert(key(k), v);
                    }
                    (d, r) => panic!("upsert (decline {d}) gave {r:?}"),
                }
            }
            Op::Delete(k) => {
                assert_eq!(heap.delete(&key(k)).unwrap(), model.remove(&key(k)).is_some());
            }
            Op::Get(k) => assert_eq!(heap.get(&key(k)).unwrap(), model.get(&key(k)).cloned()),
            Op::Batch(ops) => {
                let mut b = WriteBatch::new();
                for (k, l) in ops {
                    match l {
                        Some(l) => {
                            let v = value(k, l, salt);
                            b.put(&key(k), &v).unwrap();
                            model.insert(key(k), v);
                        }
                        None => {
                            b.delete(&key(k)).unwrap();
                            model.remove(&key(k));
                        }
                    }
                }
                heap.apply(&b).unwrap();
            }
            Op::Range(a, b, rev) => {
                let (lo, hi) = (key(a.min(b)), key(a.max(b)));
                let bounds = (Bound::Included(lo.as_slice()), Bound::Excluded(hi.as_slice()));
                let mut got: Vec<Vec<u8>> = if rev {
                    heap.range::<[u8], _>(bounds).rev().map(|e| e.unwrap().0.to_vec()).collect()
                } else {
                    heap.range::<[u8], _>(bounds).map(|e| e.unwrap().0.to_vec()).collect()
                };
                if rev {
                    got.reverse();
                }
                let want: Vec<Vec<u8>> = model
                    .range::<Vec<u8>, _>((Bound::Included(lo.clone()), Bound::Excluded(hi.clone())))
                    .map(|(k, _)| k.clone())
                    .collect();
                assert_eq!(got, want);
            }
            Op::Checkpoint => {
                heap.checkpoint().unwrap();
                durable = model.clone();
            }
            Op::Reopen => {
                h.take().unwrap().close().unwrap();
                durable = model.clone();
                h = Some(open(&disk));
            }
            Op::Crash(seed) => {
                // A write-back that ran made its checkpoint durable; one that did not, did not.
                if let Some((_, at_begin, true)) = in_flight.take() {
                    durable = at_begin;
                }
                drop(h.take());
                disk.crash(seed, heapgrid_heap::PAGE_SIZE as usize);
                model = durable.clone();
                h = Some(open(&disk));
            }
            Op::Compact => {
                heap.compact().unwrap();
                durable = model.clone();
                heap.check_integrity().unwrap();
            }
            Op::CompactStep(visits) => {
                heap.compact_step(visits).unwrap();
                heap.check_integrity().unwrap();
            }
            Op::Capture => {
                let s = heap.capture().unwrap();
                assert_snapshot(&s, &model);
                if snaps.len() == SNAPSHOTS_KEPT {
                    snaps.remove(0);
                }
                snaps.push((s, model.clone()));
                heap.check_integrity().unwrap();
            }
            Op::ReadOld(i) => {
                if let Some((s, m)) = snaps.get(i) {
                    assert_snapshot(s, m);
                }
            }
            Op::DropOld(i) => {
                if i < snaps.len() {
                    snaps.remove(i);
                }
            }
            Op::CheckpointBegin => {
                if let Some(job) = heap.begin_checkpoint().unwrap() {
                    assert!(heap.begin_checkpoint().is_err(), "two checkpoints in flight");
                    in_flight = Some((job, model.clone(), false));
                    heap.check_integrity().unwrap();
                }
            }
            Op::CheckpointRun => {
                if let Some((job, _, ran)) = in_flight.as_mut()
                    && !*ran
                {
                    job.run().unwrap();
                    *ran = true;
                }
            }
            Op::CheckpointEnd => {}
        }
        assert_same(h.as_ref().unwrap(), &model);
    }
    for (s, m) in &snaps {
        assert_snapshot(s, m);
    }
    let mut heap = h.unwrap();
    if let Some((job, _, _)) = in_flight {
        let r = job.run();
        heap.finish_checkpoint(job, r).unwrap();
    }
    heap.check_integrity().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn heap_matches_btreemap(ops in prop::collection::vec(op(), 1..300)) {
        run(ops);
    }
}

/// Enough keys for a tree of depth 3, then deletes of all of them: merges all the way down.
#[test]
fn grow_deep_then_empty_and_compact() {
    let disk = SimDisk::new();
    let mut h = open(&disk);
    let n = 30_000u32;
    let mut b = WriteBatch::new();
    for i in 0..n {
        b.put(&i.to_be_bytes(), &[7u8; 100]).unwrap();
        if b.len() == 1000 {
            h.apply(&b).unwrap();
            h.checkpoint().unwrap();
            b.clear();
        }
    }
    assert!(h.stats().depth >= 3, "depth {}", h.stats().depth);
    h.check_integrity().unwrap();
    let full = h.stats().file_bytes;
    // Delete in a scattered order so both merge and redistribute paths run.
    for i in (0..n).map(|i| (i * 7919) % n) {
        assert!(h.delete(&i.to_be_bytes()).unwrap());
        if i.is_multiple_of(5000) {
            h.check_integrity().unwrap();
        }
    }
    assert!(h.is_empty());
    h.check_integrity().unwrap();
    let s = h.compact().unwrap();
    assert!(s.file_bytes_after < full / 10, "{s:?} full={full}");
    h.check_integrity().unwrap();
    drop(h);
    let h = open(&disk);
    assert!(h.is_empty());
}

/// A heap loaded in random order, then mostly deleted, shrinks under compaction although its
/// remaining pages are scattered over the whole file.
#[test]
fn compact_after_random_deletes_shrinks_the_file() {
    let disk = SimDisk::new();
    let mut h = open(&disk);
    let n = 40_000u64;
    let key = |i: u64| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_be_bytes();
    let mut b = WriteBatch::new();
    for i in 0..n {
        b.put(&key(i), &[3u8; 100]).unwrap();
        if b.len() == 1000 {
            h.apply(&b).unwrap();
            h.checkpoint().unwrap();
            b.clear();
        }
    }
    for i in (0..n).filter(|i| i % 5 != 0) {
        assert!(h.delete(&key(i)).unwrap());
    }
    h.checkpoint().unwrap();
    let before = h.stats();
    let s = h.compact().unwrap();
    let after = h.stats();
    assert!(
        after.page_count * 2 < before.page_count,
        "compaction kept {} of {} pages ({s:?})",
        after.page_count,
        before.page_count
    );
    assert!(s.file_bytes_after < s.file_bytes_before / 2, "{s:?}");
    h.check_integrity().unwrap();
    assert_eq!(h.len(), n / 5);
    drop(h);
    let h = open(&disk);
    assert_eq!(h.len(), n / 5);
    assert!(h.iter().all(|e| e.unwrap().1.as_ref() == [3u8; 100]));
}

/// Compacting a heap with little free space never makes it bigger (moving a page rewrites its
/// parents, which must not spill past the end).
#[test]
fn compact_never_grows_the_file() {
    let disk = SimDisk::new();
    let mut h = open(&disk);
    let key = |i: u64| (i.wrapping_mul(0x2545_F491_4F6C_DD1D)).to_be_bytes();
    let mut b = WriteBatch::new();
    for i in 0..60_000u64 {
        b.put(&key(i), &[5u8; 100]).unwrap();
        if b.len() == 1000 {
            h.apply(&b).unwrap();
            h.checkpoint().unwrap();
            b.clear();
        }
    }
    h.checkpoint().unwrap();
    let before = h.stats();
    h.compact().unwrap();
    let after = h.stats();
    assert!(after.page_count <= before.page_count, "compaction grew the heap: {before:?} -> {after:?}");
    h.check_integrity().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    /// Inserts of cells of every size, up to the largest inline one, against a `BTreeMap`: full
    /// leaves shift cells into siblings (`shift_to_sibling`) or split, whatever the mix of sizes.
    #[test]
    fn inserts_of_every_cell_size_match_btreemap(
        puts in prop::collection::vec((any::<u32>(), 1usize..300, 0usize..1100), 1..600),
    ) {
        let disk = SimDisk::new();
        let mut h = open(&disk);
        let mut model = std::collections::BTreeMap::new();
        for (i, (k, klen, vlen)) in puts.into_iter().enumerate() {
            let mut key = k.to_be_bytes().to_vec();
            key.resize(klen.max(4), (k % 251) as u8);
            let v = vec![(i % 256) as u8; vlen];
            h.put(&key, &v).unwrap();
            model.insert(key, v);
        }
        h.check_integrity().unwrap();
        let got: Vec<(Vec<u8>, Vec<u8>)> =
            h.iter().map(|e| e.map(|(k, v)| (k.to_vec(), v.into_owned())).unwrap()).collect();
        let want: Vec<(Vec<u8>, Vec<u8>)> = model.into_iter().collect();
        prop_assert_eq!(got, want);
    }
}
