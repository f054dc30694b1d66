//! Op-log tests through the storage seams: replay after crashes under each fsync policy, torn
//! tails, mid-log corruption, a full disk and fsync errors, segment retirement, and recovery
//! from the older meta page with the log filling the gap.

use std::collections::BTreeMap;
use std::sync::Arc;

use heapgrid_heap::oplog::{LogDir, SimLogDir};
use heapgrid_heap::storage::{SimDisk, Storage};
use heapgrid_heap::{Error, FsyncPolicy, Heap, HeapOptions, PAGE_SIZE, WriteBatch};

type Model = BTreeMap<Vec<u8>, Vec<u8>>;

fn open(disk: &SimDisk, log: &SimLogDir, fsync: FsyncPolicy) -> Result<Heap, Error> {
    let opts = HeapOptions { fsync, ..HeapOptions::default() };
    Heap::open_parts(
        Box::new(disk.storage()) as Box<dyn Storage>,
        Some(Arc::new(log.clone()) as Arc<dyn LogDir>),
        opts,
    )
}

fn contents(h: &Heap) -> Model {
    h.iter().map(|e| e.map(|(k, v)| (k.to_vec(), v.into_owned())).unwrap()).collect()
}

fn batch(i: u32, model: &mut Model) -> WriteBatch {
    let mut b = WriteBatch::new();
    for j in 0..20u32 {
        let k = format!("k{:04}", (i * 131 + j * 7) % 2000).into_bytes();
        let v = format!("{i}.{j}").into_bytes().repeat(1 + (j as usize % 5) * 40);
        b.put(&k, &v).unwrap();
        model.insert(k, v);
    }
    let d = format!("k{:04}", (i * 17) % 2000).into_bytes();
    b.delete(&d).unwrap();
    model.remove(&d);
    b
}

/// Under `Always`, every batch whose wait returned survives a power cut that also tears the heap
/// file's unflushed pages and the log's unsynced tail.
#[test]
fn always_survives_power_loss_with_replay() {
    for seed in 0..8u64 {
        let (disk, log) = (SimDisk::new(), SimLogDir::new());
        let mut h = open(&disk, &log, FsyncPolicy::Always).unwrap();
        let mut model = Model::new();
        for i in 0..120u32 {
            let lsn = h.apply(&batch(i, &mut model)).unwrap();
            h.durability().unwrap().wait(lsn).unwrap();
            if i % 50 == 49 {
                h.checkpoint().unwrap();
            }
        }
        drop(h);
        disk.crash(seed, PAGE_SIZE as usize);
        log.crash(seed);
        let h = open(&disk, &log, FsyncPolicy::Always).unwrap();
        h.check_integrity().unwrap();
        assert!(contents(&h) == model, "seed {seed}: acknowledged batches lost");
        assert_eq!(h.replay_report().records_replayed, 20);
    }
}

/// Under `Never`, a process crash (page cache intact) loses nothing; a power cut returns a
/// prefix of the committed batches, never half a batch.
#[test]
fn never_survives_process_crash_and_power_loss_gives_a_prefix() {
    let (disk, log) = (SimDisk::new(), SimLogDir::new());
    let mut h = open(&disk, &log, FsyncPolicy::Never).unwrap();
    let mut model = Model::new();
    let mut states = vec![model.clone()];
    for i in 0..60u32 {
        h.apply(&batch(i, &mut model)).unwrap();
        states.push(model.clone());
        if i == 20 {
            h.checkpoint().unwrap();
        }
    }
    drop(h);
    // Process crash: heap pages torn, log untouched (written with write(2)).
    disk.crash(3, PAGE_SIZE as usize);
    let mut h = open(&disk, &log, FsyncPolicy::Never).unwrap();
    assert!(contents(&h) == model);
    for i in 60..90u32 {
        h.apply(&batch(i, &mut model)).unwrap();
        states.push(model.clone());
    }
    drop(h);
    disk.crash(4, PAGE_SIZE as usize);
    log.crash(4);
    let h = open(&disk, &log, FsyncPolicy::Never).unwrap();
    h.check_integrity().unwrap();
    let got = contents(&h);
    let at = states.iter().position(|s| *s == got).expect("state is not a prefix of committed batches");
    assert!(at >= 61, "lost batches synced by open: state after {at} batches");
}

#[test]
fn torn_tail_ends_replay_cleanly_and_appends_continue() {
    let (disk, log) = (SimDisk::new(), SimLogDir::new());
    let mut h = open(&disk, &log, FsyncPolicy::Never).unwrap();
    let mut model = Model::new();
    for i in 0..10u32 {
        h.apply(&batch(i, &mut model)).unwrap();
    }
    drop(h);
    let seg = *log.segments().last().unwrap();
    let mut full = Vec::new();
    log.edit(seg, |b| full = b.clone());
    // Cut the last record short: it was never acknowledged under any policy after a power cut.
    log.edit(seg, |b| b.truncate(b.len() - 7));
    let mut model9 = Model::new();
    for i in 0..9u32 {
        batch(i, &mut model9);
    }
    let mut h = open(&disk, &log, FsyncPolicy::Never).unwrap();
    assert!(contents(&h) == model9);
    assert!(h.replay_report().torn_tail_bytes > 0);
    h.apply(&batch(100, &mut model9)).unwrap();
    drop(h);
    let h = open(&disk, &log, FsyncPolicy::Never).unwrap();
    assert!(contents(&h) == model9, "appends after a torn tail replay");
    assert_eq!(h.replay_report().torn_tail_bytes, 0);
    // Garbage appended after valid records is a torn tail too.
    drop(h);
    let seg = *log.segments().last().unwrap();
    log.edit(seg, |b| b.extend_from_slice(&[0xAB; 100]));
    let h = open(&disk, &log, FsyncPolicy::Never).unwrap();
    assert!(contents(&h) == model9);
    assert_eq!(h.replay_report().torn_tail_bytes, 100);
}

#[test]
fn corrupt_record_before_valid_ones_is_an_error() {
    let (disk, log) = (SimDisk::new(), SimLogDir::new());
    let mut h = open(&disk, &log, FsyncPolicy::Never).unwrap();
    let mut model = Model::new();
    for i in 0..10u32 {
        h.apply(&batch(i, &mut model)).unwrap();
    }
    drop(h);
    let seg = *log.segments().last().unwrap();
    let mut len = 0;
    log.edit(seg, |b| len = b.len());
    for at in [40usize, len / 3, len / 2] {
        let (d2, l2) = (SimDisk::new(), SimLogDir::new());
        d2.set_durable(disk.durable());
        let mut bytes = Vec::new();
        log.edit(seg, |b| bytes = b.clone());
        bytes[at] ^= 0x10;
        // Rebuild the damaged log in a fresh directory.
        let seg2 = l2.create(seg, &bytes[..32]).unwrap();
        seg2.append(&bytes[32..]).unwrap();
        seg2.sync().unwrap();
        match open(&d2, &l2, FsyncPolicy::Never) {
            Err(e) => assert!(e.is_corruption(), "byte {at}: {e:?}"),
            Ok(_) => panic!("byte {at}: a damaged record before valid ones was skipped"),
        }
    }
}

#[test]
fn full_disk_refuses_the_batch_and_keeps_the_rest() {
    let (disk, log) = (SimDisk::new(), SimLogDir::new());
    let mut h = open(&disk, &log, FsyncPolicy::Always).unwrap();
    let mut model = Model::new();
    for i in 0..5u32 {
        let lsn = h.apply(&batch(i, &mut model)).unwrap();
        h.durability().unwrap().wait(lsn).unwrap();
    }
    log.set_space_left(Some(10));
    let mut scratch = model.clone();
    let err = h.apply(&batch(5, &mut scratch)).unwrap_err();
    assert!(matches!(err, Error::DiskFull { .. }), "{err:?}");
    assert!(contents(&h) == model, "a refused batch left a trace");
    log.set_space_left(None);
    let lsn = h.apply(&batch(6, &mut model)).unwrap();
    h.durability().unwrap().wait(lsn).unwrap();
    drop(h);
    log.crash(1);
    disk.crash(1, PAGE_SIZE as usize);
    let h = open(&disk, &log, FsyncPolicy::Always).unwrap();
    assert!(contents(&h) == model);
}

#[test]
fn fsync_error_fails_closed() {
    let (disk, log) = (SimDisk::new(), SimLogDir::new());
    let mut h = open(&disk, &log, FsyncPolicy::Always).unwrap();
    let mut model = Model::new();
    let lsn = h.apply(&batch(0, &mut model)).unwrap();
    h.durability().unwrap().wait(lsn).unwrap();
    let acked = model.clone();
    log.set_fail_sync(true);
    let lsn = h.apply(&batch(1, &mut model)).unwrap();
    assert!(h.durability().unwrap().wait(lsn).is_err(), "acked without a successful fsync");
    assert!(matches!(h.apply(&batch(2, &mut model)), Err(Error::Poisoned(_))));
    drop(h);
    log.set_fail_sync(false);
    log.crash(9);
    disk.crash(9, PAGE_SIZE as usize);
    let h = open(&disk, &log, FsyncPolicy::Always).unwrap();
    let got = contents(&h);
    assert!(acked.iter().all(|(k, _)| got.contains_key(k)), "an acknowledged batch was lost");
}

#[test]
fn checkpoints_retire_segments() {
    let (disk, log) = (SimDisk::new(), SimLogDir::new());
    let mut h = open(&disk, &log, FsyncPolicy::EveryMs(5)).unwrap();
    let mut model = Model::new();
    for i in 0..100u32 {
        h.apply(&batch(i, &mut model)).unwrap();
        if i % 10 == 9 {
            h.checkpoint().unwrap();
            assert!(h.log_segments() <= 3, "{} segments kept", h.log_segments());
        }
    }
    assert!(log.segments().len() <= 3);
    drop(h);
    let h = open(&disk, &log, FsyncPolicy::Never).unwrap();
    assert!(contents(&h) == model);
}

/// A damaged newest meta page makes open fall back to the older checkpoint; the log still holds
/// every record after it, so nothing committed is lost. Writes after the newest checkpoint (whose
/// pages the OS may write back) must not have reused pages the older checkpoint needs.
#[test]
fn older_meta_plus_log_recovers_everything() {
    for seed in 0..6u64 {
        let (disk, log) = (SimDisk::new(), SimLogDir::new());
        let mut h = open(&disk, &log, FsyncPolicy::Never).unwrap();
        let mut model = Model::new();
        for i in 0..40u32 {
            h.apply(&batch(i, &mut model)).unwrap();
            if i % 10 == 9 {
                h.checkpoint().unwrap();
            }
        }
        for i in 40..70u32 {
            h.apply(&batch(i, &mut model)).unwrap();
        }
        let epoch = h.stats().epoch;
        drop(h);
        disk.crash(seed, PAGE_SIZE as usize);
        let mut img = disk.durable();
        let newest = (1 + epoch % 2) as usize;
        img[newest * PAGE_SIZE as usize + 100] ^= 1;
        disk.set_durable(img);
        let h = open(&disk, &log, FsyncPolicy::Never).unwrap();
        assert!(h.replay_report().records_replayed > 30, "fell back without replaying");
        h.check_integrity().unwrap();
        assert!(contents(&h) == model, "seed {seed}");
    }
}

/// Deferred records: one write for many batches; nothing of them survives without `flush_log`,
/// everything does with it, and a failed flush fails the heap closed.
#[test]
fn deferred_records_are_written_by_flush_only() {
    let (disk, log) = (SimDisk::new(), SimLogDir::new());
    let mut h = open(&disk, &log, FsyncPolicy::Never).unwrap();
    let mut model = Model::new();
    for i in 0..5u32 {
        h.apply(&batch(i, &mut model)).unwrap();
    }
    let logged = model.clone();
    let mut scratch = model.clone();
    for i in 5..8u32 {
        h.apply_deferred(&batch(i, &mut scratch)).unwrap();
    }
    assert!(contents(&h) == scratch, "deferred batches are applied in memory at once");
    drop(h); // a crash before the flush: those batches were never acknowledged
    disk.crash(2, PAGE_SIZE as usize);
    let mut h = open(&disk, &log, FsyncPolicy::Never).unwrap();
    assert!(contents(&h) == logged);
    let segments_before = log.segments();
    for i in 8..11u32 {
        h.apply_deferred(&batch(i, &mut model)).unwrap();
    }
    h.flush_log().unwrap();
    assert_eq!(log.segments(), segments_before);
    drop(h);
    disk.crash(3, PAGE_SIZE as usize);
    let mut h = open(&disk, &log, FsyncPolicy::Never).unwrap();
    assert!(contents(&h) == model, "flushed deferred batches survive");
    let mut scratch = model.clone();
    h.apply_deferred(&batch(20, &mut scratch)).unwrap();
    log.set_space_left(Some(0));
    assert!(h.flush_log().is_err());
    assert!(
        matches!(h.get(b"k0000"), Err(Error::Poisoned(_))),
        "an unlogged applied batch fails the heap closed"
    );
    drop(h);
    log.set_space_left(None);
    let h = open(&disk, &log, FsyncPolicy::Never).unwrap();
    assert!(contents(&h) == model);
}
