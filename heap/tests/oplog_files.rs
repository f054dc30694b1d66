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
