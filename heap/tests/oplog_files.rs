//! The op log on real files: commit, reopen, replay, rotate and retire segment files.

use heapgrid_heap::{FsyncPolicy, Heap, HeapOptions};

#[test]
fn file_log_replays_after_drop_without_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.heap");
    for policy in [FsyncPolicy::Always, FsyncPolicy::EveryMs(10), FsyncPolicy::Never] {
        let _ = std::fs::remove_file(&path);
        for e in std::fs::read_dir(dir.path()).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
        let opts = HeapOptions { fsync: policy, ..HeapOptions::default() };
        let mut h = Heap::open(&path, opts.clone()).unwrap();
        for i in 0..300u32 {
            h.put(&i.to_be_bytes(), &[i as u8; 40]).unwrap();
            if i == 100 || i == 200 {
                h.checkpoint().unwrap();
            }
        }
        let lsn = h.last_lsn();
        h.durability().unwrap().wait(lsn).unwrap();
        drop(h); // no checkpoint: the last 99 puts live only in the log
        let h = Heap::open(&path, opts).unwrap();
        assert_eq!(h.len(), 300, "{policy:?}");
        assert_eq!(h.replay_report().records_replayed, 99, "{policy:?}");
        assert_eq!(h.get(&299u32.to_be_bytes()).unwrap(), Some(vec![299u32 as u8; 40]));
        let segments = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains(".log."))
            .count();
        assert!((1..=3).contains(&segments), "{policy:?}: {segments} segment files");
        h.check_integrity().unwrap();
    }
}

fn segments(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".log."))
        .collect();
    v.sort();
    v
}

/// A heap with 50 puts after its last checkpoint, dropped without a checkpoint (as `kill -9`).
fn heap_with_a_log_tail(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("t.heap");
    let opts = HeapOptions { fsync: FsyncPolicy::Never, ..HeapOptions::default() };
    let mut h = Heap::open(&path, opts).unwrap();
    for i in 0..100u32 {
        h.put(&i.to_be_bytes(), &[i as u8; 40]).unwrap();
        if i == 49 {
            h.checkpoint().unwrap();
        }
    }
    drop(h);
    path
}

/// The segment a checkpoint names must be there: deleting it, or cutting it below its header,
/// is `Corrupted` at open, not a heap that silently lost its acknowledged writes.
#[test]
fn a_missing_or_emptied_named_segment_is_corruption() {
    for cut in [None, Some(10u64)] {
        let dir = tempfile::tempdir().unwrap();
        let path = heap_with_a_log_tail(dir.path());
        let newest = segments(dir.path()).pop().unwrap();
        match cut {
            None => std::fs::remove_file(&newest).unwrap(),
            Some(n) => std::fs::OpenOptions::new().write(true).open(&newest).unwrap().set_len(n).unwrap(),
        }
        let r = Heap::open(&path, HeapOptions::default());
        assert!(matches!(r, Err(ref e) if e.is_corruption()), "cut {cut:?}: {:?}", r.err());
    }
    // Untouched, the same heap opens with every write.
    let dir = tempfile::tempdir().unwrap();
    let path = heap_with_a_log_tail(dir.path());
    let h = Heap::open(&path, HeapOptions::default()).unwrap();
    assert_eq!(h.len(), 100);
}

/// `verify_log` (what `heapgrid check` runs) reads the log without changing it: a damaged
/// record before valid ones is `Corrupted`, a damaged last record is a torn tail.
#[test]
fn verify_log_finds_damage_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let path = heap_with_a_log_tail(dir.path());
    let newest = segments(dir.path()).pop().unwrap();
    let before = std::fs::read(&newest).unwrap();
    let ro = HeapOptions { op_log: false, ..HeapOptions::default() };
    let log = heapgrid_heap::oplog::FileLogDir::for_heap(&path);
    let h = Heap::open(&path, ro.clone()).unwrap();
    let rep = h.verify_log(&log).unwrap();
    assert_eq!((rep.records_replayed, rep.torn_tail_bytes), (50, 0));
    drop(h);
    // A byte flipped in the first record after the header: damage before valid records.
    let mut bytes = before.clone();
    bytes[heapgrid_heap::oplog::SEGMENT_HEADER_BYTES + 20] ^= 0xff;
    std::fs::write(&newest, &bytes).unwrap();
    let h = Heap::open(&path, ro.clone()).unwrap();
    assert!(matches!(h.verify_log(&log), Err(ref e) if e.is_corruption()));
    assert_eq!(std::fs::read(&newest).unwrap(), bytes, "verify_log changed the segment");
    drop(h);
    // The last byte flipped: a torn tail, reported.
    let mut bytes = before;
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&newest, &bytes).unwrap();
    let h = Heap::open(&path, ro).unwrap();
    let rep = h.verify_log(&log).unwrap();
    assert!(rep.torn_tail_bytes > 0 && rep.records_replayed == 49, "{rep:?}");
}
