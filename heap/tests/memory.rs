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
    // Freed pages become free over the next checkpoints (pending, then held, then free); a
    // checkpoint with nothing new to write is skipped, so each follows a small write.
    for round in 0..3u8 {
        h.put(b"tick", &[round]).unwrap();
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
