//! `kill -9` of a real process that writes and checkpoints a heap in a loop, many times at random
//! moments. Every reopen must pass `check_integrity` and hold exactly the state of a completed
//! checkpoint no older than the last one the child reported.
//!
//! The child is this same test binary, re-run with `HEAPGRID_KILL9_DIR` set: then the test body
//! runs the writer loop instead of the parent.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use heapgrid::heap::{Heap, HeapOptions, WriteBatch};

const CHILD_ENV: &str = "HEAPGRID_KILL9_DIR";
const TEST_NAME: &str = "heap_kill9::kill9_during_checkpoints_leaves_a_checkpointed_state";
const KEYS: u64 = 3000;

/// The batch with number `c`: puts and deletes over a small key space plus the marker key.
fn batch(c: u64) -> WriteBatch {
    let mut b = WriteBatch::new();
    for j in 0..150u64 {
        let k = format!("k{:05}", (c * 7919 + j * 31) % KEYS);
        let len = if j == 0 { 5000 } else { 20 + ((c + j) % 200) as usize };
        let v: Vec<u8> = format!("{c}:{j};").bytes().cycle().take(len).collect();
        b.put(k.as_bytes(), &v).unwrap();
    }
    for j in 0..30u64 {
        b.delete(format!("k{:05}", (c * 104_729 + j * 17) % KEYS).as_bytes()).unwrap();
    }
    b.put(b"ckpt", c.to_string().as_bytes()).unwrap();
    b
}

fn apply_to_model(model: &mut BTreeMap<Vec<u8>, Vec<u8>>, c: u64) {
    for op in batch(c).iter() {
        match op {
            heapgrid::heap::BatchOp::Put { key, value } => {
                model.insert(key.to_vec(), value.to_vec());
            }
            heapgrid::heap::BatchOp::Delete { key } => {
                model.remove(key);
            }
        }
    }
}

fn checkpoint_of(h: &Heap) -> u64 {
    h.get(b"ckpt").unwrap().map_or(0, |v| String::from_utf8(v).unwrap().parse().unwrap())
}

fn child(dir: &Path) -> ! {
    let mut h = Heap::open(dir.join("kill9.heap"), HeapOptions::default()).unwrap();
    let mut c = checkpoint_of(&h);
    loop {
        c += 1;
        h.apply(&batch(c)).unwrap();
        h.checkpoint().unwrap();
        println!("{c}");
    }
}

#[test]
fn kill9_during_checkpoints_leaves_a_checkpointed_state() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        child(Path::new(&dir));
    }
    let dir = tempfile::tempdir().unwrap();
    let (seed, mut next) = crate::child::seeded("kill9");
    let mut model = BTreeMap::new();
    let mut model_at = 0u64;
    let mut reported = 0u64;
    for round in 0..25 {
        let child = crate::child::spawn(TEST_NAME, &[(CHILD_ENV, dir.path().display().to_string())]);
        // Let it complete a few checkpoints, then kill at a random moment.
        let want = 1 + next() % 4;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = 0;
        while seen < want && Instant::now() < deadline {
            if let Some(c) = child.line(Duration::from_millis(100)).and_then(|l| l.trim().parse::<u64>().ok())
            {
                reported = reported.max(c);
                seen += 1;
            }
        }
        assert!(seen > 0, "round {round}: child made no progress (seed {seed})");
        std::thread::sleep(Duration::from_micros(next() % 20_000));
        for c in child.kill().iter().filter_map(|l| l.trim().parse::<u64>().ok()) {
            reported = reported.max(c);
        }

        let h = Heap::open(dir.path().join("kill9.heap"), HeapOptions::default()).unwrap();
        h.check_integrity().unwrap_or_else(|e| panic!("round {round}: {e} (seed {seed})"));
        let c = checkpoint_of(&h);
        assert!(c >= reported, "round {round}: checkpoint {c} older than reported {reported} (seed {seed})");
        while model_at < c {
            model_at += 1;
            apply_to_model(&mut model, model_at);
        }
        let got: BTreeMap<Vec<u8>, Vec<u8>> =
            h.iter().map(|e| e.map(|(k, v)| (k.to_vec(), v.into_owned())).unwrap()).collect();
        assert!(got == model, "round {round}: contents are not checkpoint {c} (seed {seed})");
    }
    assert!(reported >= 25, "too few checkpoints completed: {reported}");
}
