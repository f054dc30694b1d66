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

/// A new heap `t.heap` in `dir` with fsync `Never`: its path, options and the heap.
fn never_heap(dir: &std::path::Path) -> (std::path::PathBuf, HeapOptions, Heap) {
    let path = dir.join("t.heap");
    let opts = HeapOptions { fsync: FsyncPolicy::Never, ..HeapOptions::default() };
    let h = Heap::open(&path, opts.clone()).unwrap();
    (path, opts, h)
}

/// Replay reads a segment a chunk (1 MiB) at a time: records that straddle chunks, a torn
/// record past the first chunk, and damage past the first chunk with valid records after it
/// are all found as in a segment read whole; the progress counts every record's bytes.
#[test]
fn a_segment_larger_than_a_read_chunk_replays_across_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let (path, opts, mut h) = never_heap(dir.path());
    h.checkpoint().unwrap();
    // About 4 MiB of records of uneven sizes, so chunk edges fall inside records.
    let n = 2_000u32;
    let value = |i: u32| vec![(i % 251) as u8; 700 + (i as usize * 37) % 2_900];
    for i in 0..n {
        h.put(&i.to_be_bytes(), &value(i)).unwrap();
    }
    drop(h);
    let seg = segments(dir.path()).pop().unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    assert!(len > 3 << 20, "{len}");
    let progress = std::sync::Arc::new(heapgrid_heap::ReplayProgress::default());
    let with = HeapOptions { progress: Some(progress.clone()), ..opts.clone() };
    let h = Heap::open(&path, with).unwrap();
    assert_eq!(h.replay_report().records_replayed, u64::from(n));
    assert_eq!(h.replay_report().torn_tail_bytes, 0);
    for i in [0, 1_234, n - 1] {
        assert_eq!(h.get(&i.to_be_bytes()).unwrap(), Some(value(i)), "key {i}");
    }
    let (done, total) = progress.bytes();
    assert_eq!((done, total), (len - 32, len), "every record's bytes, of the segment's");
    assert!(!progress.running());
    drop(h);
    // Torn: the last record cut in half (well past the first chunk).
    let bytes = std::fs::read(&seg).unwrap();
    std::fs::write(&seg, &bytes[..bytes.len() - 500]).unwrap();
    let h = Heap::open(&path, opts.clone()).unwrap();
    assert_eq!(h.replay_report().records_replayed, u64::from(n - 1));
    assert!(h.replay_report().torn_tail_bytes > 0);
    assert_eq!(h.get(&(n - 2).to_be_bytes()).unwrap(), Some(value(n - 2)));
    assert_eq!(h.get(&(n - 1).to_be_bytes()).unwrap(), None);
    drop(h);
    // Damage in the middle, past the first chunk, with valid records after it: corruption.
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = (2 << 20) + 100;
    bytes[at] ^= 0xff;
    bytes[at + 1] ^= 0xff;
    std::fs::write(&seg, &bytes).unwrap();
    match Heap::open(&path, opts) {
        Err(e) => assert!(e.is_corruption(), "{e}"),
        Ok(_) => panic!("damage before valid records opened"),
    }
}

/// Replay applies records in windows (sorted by key, each key's last operation only): across
/// several windows, with keys put, overwritten, deleted and put again in and across windows
/// and batches, the reopened heap equals a model of record-by-record application.
#[test]
fn windowed_replay_ends_in_the_state_of_record_by_record_replay() {
    let dir = tempfile::tempdir().unwrap();
    let (path, opts, mut h) = never_heap(dir.path());
    let mut model = std::collections::BTreeMap::new();
    for i in 0..500u32 {
        h.put(&i.to_be_bytes(), b"base").unwrap();
        model.insert(i.to_be_bytes().to_vec(), b"base".to_vec());
    }
    h.checkpoint().unwrap();
    // About 30 MiB of records: several 8 MiB windows.
    let mut x = 7u64;
    for round in 0..12_000u32 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut b = heapgrid_heap::WriteBatch::new();
        for j in 0..3u64 {
            let k = ((x >> (j * 9)) % 700) as u32;
            let key = k.to_be_bytes();
            if (x >> (40 + j)).is_multiple_of(5) {
                b.delete(&key).unwrap();
                model.remove(key.as_slice());
            } else {
                let v = vec![(round % 251) as u8; 800 + (k as usize % 1700)];
                b.put(&key, &v).unwrap();
                model.insert(key.to_vec(), v);
            }
        }
        h.apply(&b).unwrap();
    }
    drop(h);
    let h = Heap::open(&path, opts).unwrap();
    assert_eq!(h.replay_report().records_replayed, 12_000);
    let got: Vec<(Vec<u8>, Vec<u8>)> =
        h.iter().map(|e| e.map(|(k, v)| (k.to_vec(), v.into_owned())).unwrap()).collect();
    let want: Vec<(Vec<u8>, Vec<u8>)> = model.into_iter().collect();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "the replayed heap differs from the model");
    h.check_integrity().unwrap();
}
