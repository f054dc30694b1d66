//! Free pages give their memory back to the system (issue 16): once a checkpoint makes pages
//! free, they leave the process's resident memory (`RssFile`), and their clean cached copies
//! leave the page cache (`HeapStats::resident_bytes`, by `mincore`; copies still dirty stay
//! cached until the kernel writes them back, and are reclaimable after); they come back from
//! the file, intact for what is written on them, when they are handed out again.

use heapgrid_heap::{Heap, HeapOptions};

const KEYS: u32 = 20_000;

/// This process's resident file-backed memory, in bytes.
fn rss_file() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("RssFile:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[test]
fn free_pages_stop_being_resident_and_are_reused_whole() {
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
