//! Free pages give their memory back to the system (issue 16): once a checkpoint makes pages
//! free, they leave the process's resident memory (`RssFile`), and their clean cached copies
//! leave the page cache (`HeapStats::resident_bytes`, by `mincore`; copies still dirty stay
//! cached until the kernel writes them back, and are reclaimable after); they come back from
//! the file, intact for what is written on them, when they are handed out again.

use heapgrid_heap::{Heap, HeapOptions};

const KEYS: u32 = 20_000;

/// The tests of this file run one at a time: one of them measures the process's `RssFile`,
/// which the others' heaps would move.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// This process's resident file-backed memory, in bytes.
fn rss_file() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("RssFile:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[test]
fn free_pages_stop_being_resident_and_are_reused_whole() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.heap");
    let mut h = Heap::open(&path, HeapOptions::default()).unwrap();
    let value = vec![7u8; 1000];
    for i in 0..KEYS {
        h.put(&i.to_be_bytes(), &value).unwrap();
    }
    h.checkpoint().unwrap();
    let full = h.stats();
    let full_rss = rss_file();
    assert!(full.resident_bytes > 15_000_000, "{full:?}");
    assert!(full_rss > 15_000_000, "the heap's pages are mapped: {full_rss}");
    for i in 0..KEYS {
        assert!(h.delete(&i.to_be_bytes()).unwrap());
    }
    // Freed pages become free over the next checkpoints (pending, then held, then free), with
    // nothing else written: a checkpoint is not skipped while freed pages wait for it.
    for _ in 0..3 {
        h.checkpoint().unwrap();
    }
    let emptied = h.stats();
    assert!(emptied.free_pages * 4096 > 15_000_000, "{emptied:?}");
    let emptied_rss = rss_file();
    assert!(
        emptied_rss + emptied.free_pages * 4096 * 9 / 10 <= full_rss,
        "free pages stayed mapped: RssFile {full_rss} then {emptied_rss}, {emptied:?}"
    );
    assert!(
        emptied.resident_bytes < full.resident_bytes,
        "no free page left the page cache: {full:?} then {emptied:?}"
    );
    // Handed out again: written and read back whole, across a reopen.
    let other = vec![9u8; 1000];
    for i in 0..KEYS {
        h.put(&i.to_be_bytes(), &other).unwrap();
    }
    let refilled = h.stats();
    assert!(refilled.free_pages < emptied.free_pages / 10, "the free pages were not reused: {refilled:?}");
    h.checkpoint().unwrap();
    drop(h);
    let h = Heap::open(&path, HeapOptions::default()).unwrap();
    for i in 0..KEYS {
        assert_eq!(h.get(&i.to_be_bytes()).unwrap().as_deref(), Some(&other[..]), "key {i}");
    }
    h.check_integrity().unwrap();
}

#[test]
fn checkpoints_with_nothing_written_free_what_waits_then_stop() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Heap::open(dir.path().join("q.heap"), HeapOptions::default()).unwrap();
    for i in 0..5_000u32 {
        h.put(&i.to_be_bytes(), &[1u8; 500]).unwrap();
    }
    h.checkpoint().unwrap();
    for i in 0..5_000u32 {
        h.delete(&i.to_be_bytes()).unwrap();
    }
    h.checkpoint().unwrap();
    let mut rounds = 0;
    while let Some(job) = h.begin_checkpoint().unwrap() {
        let r = job.run();
        h.finish_checkpoint(job, r).unwrap();
        rounds += 1;
        assert!(rounds <= 6, "checkpoints with nothing written never stop: {:?}", h.stats());
    }
    let s = h.stats();
    assert!(s.free_pages > 500, "{s:?}");
    assert!(s.pending_pages <= 8, "freed pages still wait: {s:?}");
    h.check_integrity().unwrap();
}

/// A heap of `KEYS` keys of 1000-byte values, every value readable and checked.
fn filled(path: &std::path::Path) -> Heap {
    let mut h = Heap::open(path, HeapOptions::default()).unwrap();
    for i in 0..KEYS {
        h.put(&i.to_be_bytes(), &value_of(i)).unwrap();
    }
    h
}

fn value_of(i: u32) -> Vec<u8> {
    let mut v = vec![(i % 251) as u8; 1000];
    v[..4].copy_from_slice(&i.to_le_bytes());
    v
}

#[test]
fn shedding_drops_clean_pages_only_and_they_read_back_whole() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.heap");
    let mut h = filled(&path);
    // Nothing is durable yet: every page is dirty, and none is dropped.
    let r = h.shed(u64::MAX);
    assert!(r.resident_bytes > 15_000_000, "{r:?}");
    assert_eq!(r.dropped_bytes, 0, "dirty pages were dropped: {r:?}");
    h.checkpoint().unwrap();
    // Durable now: all but the branch nodes (and the meta pages) go.
    let r = h.shed(u64::MAX);
    assert!(r.dropped_bytes > r.resident_bytes * 9 / 10, "{r:?}");
    let after = h.stats().resident_bytes;
    assert!(after < r.resident_bytes / 10, "resident {} then {after}", r.resident_bytes);
    // A bounded request drops no more than asked.
    for i in 0..KEYS {
        assert_eq!(h.get(&i.to_be_bytes()).unwrap().unwrap(), value_of(i), "key {i}");
    }
    let r = h.shed(40 * 4096);
    assert!(r.dropped_bytes > 0 && r.dropped_bytes <= 40 * 4096, "{r:?}");
    // Written after shedding (copy on write of dropped pages), then reopened: all intact.
    for i in (0..KEYS).step_by(7) {
        h.put(&i.to_be_bytes(), &value_of(i + 1)).unwrap();
    }
    h.checkpoint().unwrap();
    h.shed(u64::MAX);
    drop(h);
    let h = Heap::open(&path, HeapOptions::default()).unwrap();
    for i in 0..KEYS {
        let want = if i % 7 == 0 { value_of(i + 1) } else { value_of(i) };
        assert_eq!(h.get(&i.to_be_bytes()).unwrap().unwrap(), want, "key {i}");
    }
    h.check_integrity().unwrap();
}

#[test]
fn a_byte_flipped_on_disk_under_a_dropped_page_is_corrupted_not_wrong_data() {
    let _serial = serial();
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.heap");
    let mut h = filled(&path);
    h.checkpoint().unwrap();
    // Every page read (and its checksum verified) once, then dropped.
    for i in 0..KEYS {
        assert_eq!(h.get(&i.to_be_bytes()).unwrap().unwrap(), value_of(i));
    }
    assert!(h.shed(u64::MAX).dropped_bytes > 0);
    // Flip one byte of every tenth leaf page (kind 3 at offset 4), through another descriptor.
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let len = file.metadata().unwrap().len();
    let mut flipped = 0;
    let mut page = vec![0u8; 4096];
    for id in 2..len / 4096 {
        file.read_exact_at(&mut page, id * 4096).unwrap();
        if page[4] == 3 && id % 10 == 0 {
            let at = id * 4096 + 2000;
            let mut b = [0u8];
            file.read_exact_at(&mut b, at).unwrap();
            file.write_all_at(&[b[0] ^ 0x40], at).unwrap();
            flipped += 1;
        }
    }
    assert!(flipped > 5, "no leaf pages found");
    let mut corrupted = 0;
    for i in 0..KEYS {
        match h.get(&i.to_be_bytes()) {
            Ok(v) => assert_eq!(v.unwrap(), value_of(i), "key {i}: wrong data instead of an error"),
            Err(e) => {
                assert!(e.is_corruption(), "key {i}: {e}");
                corrupted += 1;
            }
        }
    }
    assert!(corrupted > 0, "a flipped byte in a dropped page was read back unchecked");
}

/// A 64-bit mix (splitmix64), for a random key order without a dependency.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[test]
fn leaves_stay_about_four_fifths_full_after_random_inserts() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut h = Heap::open(dir.path().join("f.heap"), HeapOptions::default()).unwrap();
    const N: u64 = 60_000;
    // 16-byte keys in random order, 100-byte values: the bytes-per-key benchmark's shape.
    let key = |i: u64| format!("{:016x}", mix(i)).into_bytes();
    for i in 0..N {
        h.put(&key(i), &[(i % 256) as u8; 100]).unwrap();
    }
    let r = h.check_integrity().unwrap();
    assert_eq!(r.entries, N);
    // Splitting alone leaves them 67% full; shifting into siblings first, 82%.
    assert!(r.leaf_fill() > 0.79, "leaves {:.3} full: {r:?}", r.leaf_fill());
    for i in 0..N {
        assert_eq!(h.get(&key(i)).unwrap().unwrap(), vec![(i % 256) as u8; 100]);
    }
    // Deletes still merge and redistribute (every other key goes).
    for i in (0..N).step_by(2) {
        assert!(h.delete(&key(i)).unwrap());
    }
    let r = h.check_integrity().unwrap();
    assert_eq!(r.entries, N / 2);
    assert!(r.leaf_fill() > 0.4, "leaves {:.3} full after deletes: {r:?}", r.leaf_fill());
}

#[test]
fn online_compaction_empties_the_tail_step_by_step_while_snapshots_read() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.heap");
    let mut h = filled(&path);
    h.checkpoint().unwrap();
    // Three keys in four go, all over the key space: the file is mostly free pages, in holes.
    for i in (0..KEYS).filter(|i| i % 4 != 0) {
        assert!(h.delete(&i.to_be_bytes()).unwrap());
    }
    for _ in 0..3 {
        h.checkpoint().unwrap();
    }
    let before = h.stats();
    assert!(before.free_pages * 2 > before.page_count, "{before:?}");
    // A snapshot taken before compaction reads its keys whole while the steps run.
    let snap = h.capture().unwrap();
    let mut steps = 0;
    loop {
        let p = h.compact_step(200).unwrap();
        assert!(p.visited <= 200 + 8, "a step reads about its budget: {p:?}");
        steps += 1;
        // Readers are never stopped: the old snapshot and the heap itself read on between steps.
        for i in (0..KEYS).step_by(100) {
            assert_eq!(
                snap.get_ref(&i.to_be_bytes()).unwrap().unwrap().as_ref(),
                value_of(i),
                "snapshot, key {i}"
            );
        }
        // So are writers: a write between steps.
        h.put(&4u32.to_be_bytes(), &value_of(4)).unwrap();
        h.checkpoint().unwrap();
        if !p.in_pass {
            break;
        }
        assert!(steps < 1000, "the pass never ended");
    }
    assert!(steps > 5, "a pass over this heap takes several steps of 200 pages: {steps}");
    // The snapshot holds the pages it reaches; once it is gone they become free, the pass that
    // follows moves what was written since, and checkpoints cut the free tail off.
    drop(snap);
    for _ in 0..20 {
        while h.compact_step(1_000).unwrap().in_pass {}
        h.checkpoint().unwrap();
    }
    let after = h.stats();
    assert!(
        after.file_bytes * 2 < before.file_bytes,
        "the file did not shrink by half: {} then {} bytes ({before:?} then {after:?})",
        before.file_bytes,
        after.file_bytes
    );
    // Nor is the file left longer than its pages by more than two growth steps.
    assert!(after.file_bytes <= after.page_count * 4096 * 9 / 8 + 512 * 1024, "{after:?}");
    h.check_integrity().unwrap();
    drop(h);
    let h = Heap::open(&path, HeapOptions::default()).unwrap();
    for i in 0..KEYS {
        let got = h.get(&i.to_be_bytes()).unwrap();
        if i % 4 == 0 {
            assert_eq!(got.unwrap(), value_of(i), "key {i}");
        } else {
            assert!(got.is_none(), "key {i} came back");
        }
    }
    h.check_integrity().unwrap();
}

#[test]
fn a_heap_emptied_in_the_middle_of_a_compaction_pass_stays_usable() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut h = filled(&dir.path().join("e.heap"));
    h.checkpoint().unwrap();
    for i in (0..KEYS).filter(|i| i % 4 != 0) {
        h.delete(&i.to_be_bytes()).unwrap();
    }
    for _ in 0..3 {
        h.checkpoint().unwrap();
    }
    assert!(h.compact_step(10).unwrap().in_pass, "a pass started");
    for i in (0..KEYS).step_by(4) {
        h.delete(&i.to_be_bytes()).unwrap();
    }
    assert!(h.is_empty());
    let p = h.compact_step(10).unwrap();
    assert!(!p.in_pass, "{p:?}");
    h.put(b"again", b"v").unwrap();
    h.checkpoint().unwrap();
    assert_eq!(h.get(b"again").unwrap().unwrap(), b"v");
    h.check_integrity().unwrap();
}
