//! Fault tests through the storage seam: crashes at every flush of a checkpoint, fsync errors,
//! full disks, corrupted bytes anywhere in the file, and every named limit at and past its value.

use std::collections::BTreeMap;

use heapgrid_heap::limits::{KEY_BYTES_MAX, VALUE_BYTES_MAX};
use heapgrid_heap::storage::{SimDisk, Storage};
use heapgrid_heap::{Error, Heap, HeapOptions, PAGE_SIZE, WriteBatch};

type Model = BTreeMap<Vec<u8>, Vec<u8>>;

fn open(disk: &SimDisk) -> Result<Heap, Error> {
    Heap::open_storage(Box::new(disk.storage()) as Box<dyn Storage>, HeapOptions::default())
}

fn contents(h: &Heap) -> Result<Model, Error> {
    h.iter().map(|e| e.map(|(k, v)| (k.to_vec(), v.into_owned()))).collect()
}

/// Writes `n` keys starting at `from`, some with overflow values.
fn fill(h: &mut Heap, model: &mut Model, from: u32, n: u32) {
    let mut b = WriteBatch::new();
    for i in from..from + n {
        let k = format!("k{:06}", i * 37 % 100_000).into_bytes();
        let len = if i % 50 == 0 { 9000 } else { 60 + (i % 90) as usize };
        let v = vec![(i % 251) as u8; len];
        b.put(&k, &v).unwrap();
        model.insert(k, v);
    }
    h.apply(&b).unwrap();
}

/// A crash after every possible number of flushes inside a checkpoint leaves either the old or
/// the new checkpoint, intact, with whatever the OS wrote back torn arbitrarily.
#[test]
fn crash_at_every_flush_of_a_checkpoint() {
    for cut in 0..40u64 {
        for seed in 0..3u64 {
            let disk = SimDisk::new();
            let mut h = open(&disk).unwrap();
            let mut model = Model::new();
            fill(&mut h, &mut model, 0, 2000);
            h.checkpoint().unwrap();
            let old = model.clone();
            fill(&mut h, &mut model, 2000, 1500);
            for i in 0..300u32 {
                let k = format!("k{:06}", i * 37 % 100_000).into_bytes();
                h.delete(&k).unwrap();
                model.remove(&k);
            }
            let new = model.clone();
            disk.fail_after_flushes(Some(cut));
            let r = h.checkpoint();
            if r.is_err() {
                // Fail closed: the heap refuses work until reopened.
                assert!(matches!(h.get(b"k000000"), Err(Error::Poisoned(_))));
            }
            drop(h);
            disk.fail_after_flushes(None);
            disk.set_fail_flush(false);
            disk.crash(cut * 31 + seed, PAGE_SIZE as usize);
            let h = open(&disk).unwrap();
            h.check_integrity().unwrap();
            let got = contents(&h).unwrap();
            if r.is_ok() {
                assert!(got == new, "cut {cut}: completed checkpoint lost");
            } else {
                assert!(got == old || got == new, "cut {cut}: state is neither checkpoint");
            }
        }
    }
}

#[test]
fn fsync_failure_poisons_and_reopen_recovers_last_checkpoint() {
    let disk = SimDisk::new();
    let mut h = open(&disk).unwrap();
    let mut model = Model::new();
    fill(&mut h, &mut model, 0, 500);
    h.checkpoint().unwrap();
    let durable = model.clone();
    fill(&mut h, &mut model, 500, 500);
    disk.set_fail_flush(true);
    assert!(matches!(h.checkpoint(), Err(Error::Io(_))));
    assert!(matches!(h.put(b"x", b"y"), Err(Error::Poisoned(_))));
    assert!(matches!(h.checkpoint(), Err(Error::Poisoned(_))));
    drop(h);
    disk.set_fail_flush(false);
    disk.crash(1, PAGE_SIZE as usize);
    let h = open(&disk).unwrap();
    h.check_integrity().unwrap();
    assert!(contents(&h).unwrap() == durable);
}

#[test]
fn full_disk_is_a_typed_error_and_loses_nothing() {
    let disk = SimDisk::new();
    let mut h = open(&disk).unwrap();
    let mut model = Model::new();
    fill(&mut h, &mut model, 0, 200);
    h.checkpoint().unwrap();
    disk.set_space_left(Some(0));
    // Keep writing until the reservation runs out: the failing write is refused whole.
    let mut refused = None;
    for i in 0..200_000u32 {
        let k = format!("z{i:08}").into_bytes();
        match h.put(&k, &[1u8; 100]) {
            Ok(()) => {
                model.insert(k, vec![1u8; 100]);
            }
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    assert!(matches!(refused, Some(Error::DiskFull { .. })), "{refused:?}");
    // The heap is still usable: reads work, and the model matches exactly.
    assert!(contents(&h).unwrap() == model);
    h.check_integrity().unwrap();
    disk.set_space_left(None);
    h.checkpoint().unwrap();
    drop(h);
    let h = open(&disk).unwrap();
    assert!(contents(&h).unwrap() == model);
}

#[test]
fn max_file_bytes_is_heap_full() {
    let disk = SimDisk::new();
    let opts = HeapOptions { max_file_bytes: 64 * PAGE_SIZE as u64, ..HeapOptions::default() };
    let mut h = Heap::open_storage(Box::new(disk.storage()) as Box<dyn Storage>, opts).unwrap();
    let mut n = 0u32;
    let err = loop {
        match h.put(&n.to_be_bytes(), &[0u8; 500]) {
            Ok(()) => n += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, Error::HeapFull { .. }), "{err:?}");
    assert!(n > 100, "only {n} keys fit in 64 pages");
    assert_eq!(h.len(), n as u64);
    h.check_integrity().unwrap();
}

#[test]
fn limits_at_and_one_past() {
    let disk = SimDisk::new();
    let mut h = open(&disk).unwrap();
    let key_max = vec![b'k'; KEY_BYTES_MAX as usize];
    let key_over = vec![b'k'; KEY_BYTES_MAX as usize + 1];
    h.put(&key_max, b"v").unwrap();
    assert_eq!(h.get(&key_max).unwrap().as_deref(), Some(&b"v"[..]));
    assert!(matches!(h.put(&key_over, b"v"), Err(Error::LimitExceeded { what: "key bytes", .. })));
    assert!(matches!(h.delete(&key_over), Err(Error::LimitExceeded { .. })));

    let value_max = vec![7u8; VALUE_BYTES_MAX as usize];
    h.put(b"big", &value_max).unwrap();
    assert_eq!(h.get(b"big").unwrap().map(|v| v.len()), Some(VALUE_BYTES_MAX as usize));
    let value_over = vec![7u8; VALUE_BYTES_MAX as usize + 1];
    assert!(matches!(h.put(b"big2", &value_over), Err(Error::LimitExceeded { what: "value bytes", .. })));
    let mut b = WriteBatch::new();
    assert!(b.put(b"x", &value_over).is_err());
    assert!(b.is_empty(), "a refused op leaves the batch unchanged");
    h.checkpoint().unwrap();
    h.check_integrity().unwrap();
    assert!(h.delete(b"big").unwrap());
    h.check_integrity().unwrap();
}

/// Flips bytes all over a checkpointed file: every open, read and integrity check either fails
/// with a typed error or returns exactly the checkpointed contents. Nothing panics.
#[test]
fn flipped_bytes_are_detected_never_wrong_data() {
    let disk = SimDisk::new();
    let mut h = open(&disk).unwrap();
    let mut model = Model::new();
    fill(&mut h, &mut model, 0, 3000);
    h.checkpoint().unwrap();
    let older = model.clone();
    for i in 0..200u32 {
        h.delete(format!("k{:06}", i * 37 % 100_000).as_bytes()).unwrap();
        model.remove(format!("k{:06}", i * 37 % 100_000).as_bytes());
    }
    h.checkpoint().unwrap();
    // Flip only inside the pages in use; the reserved tail of the file holds nothing.
    let pages = h.stats().page_count as usize;
    let free = (h.stats().free_pages + h.stats().pending_pages) as usize;
    h.close().unwrap();
    let image = disk.durable();
    let mut detected = 0;
    let mut rng = fastrand::Rng::with_seed(0x2545_f491_4f6c_dd1d);
    for trial in 0..600 {
        let page = if trial < pages { trial } else { rng.usize(..pages) };
        let off = rng.usize(..PAGE_SIZE as usize);
        let mut bad = image.clone();
        bad[page * PAGE_SIZE as usize + off] ^= 1 << rng.u8(..8);
        let d = SimDisk::new();
        d.set_durable(bad);
        let outcome = std::panic::catch_unwind(|| {
            let h = open(&d)?;
            let got = contents(&h)?;
            for (k, v) in &model {
                if h.get(k)?.as_ref() != Some(v) {
                    return Err(Error::Format("get disagrees".into()));
                }
            }
            h.check_integrity()?;
            Ok(got)
        });
        match outcome {
            Err(_) => panic!("panic with a flipped bit at page {page} offset {off}"),
            // A damaged newest meta page is indistinguishable from one torn by a crash: open
            // falls back to the previous checkpoint, which must then be intact. (The op log keeps
            // records back to that checkpoint so nothing acknowledged is lost.)
            Ok(Ok(got)) => assert!(
                got == model || (page == 1 || page == 2) && got == older,
                "wrong data with a flip at page {page} offset {off}"
            ),
            Ok(Err(Error::Corrupted { .. })) | Ok(Err(Error::Format(_))) => detected += 1,
            Ok(Err(e)) => panic!("unexpected error kind {e:?}"),
        }
    }
    // Flips in free pages and in the older meta page are harmless; all others must be caught.
    let harmless = 600 * (free + 1) / pages;
    assert!(
        detected + harmless + 20 >= 600,
        "only {detected} of 600 flips detected ({free} free of {pages} pages)"
    );
}
