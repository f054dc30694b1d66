//! `kill -9` of a real process committing batches from several threads, under each fsync
//! policy. The child prints a batch's id only after its commit was acknowledged (after
//! `Durability::wait`), so every printed id must be present after reopen; every batch writes two
//! keys, so nothing may be half-applied; `check_integrity` must pass.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use heapgrid::heap::{FsyncPolicy, Heap, HeapOptions, WriteBatch};

const DIR_ENV: &str = "HEAPGRID_OPLOG_KILL9_DIR";
const POLICY_ENV: &str = "HEAPGRID_OPLOG_KILL9_POLICY";
const ROUND_ENV: &str = "HEAPGRID_OPLOG_KILL9_ROUND";
const TEST_NAME: &str = "oplog_kill9::kill9_under_concurrent_commits_loses_no_ack";
const THREADS: u32 = 4;

fn policy(name: &str) -> FsyncPolicy {
    match name {
        "always" => FsyncPolicy::Always,
        "every" => FsyncPolicy::EveryMs(100),
        _ => FsyncPolicy::Never,
    }
}

fn child(dir: &Path, policy_name: &str, round: u32) -> ! {
    let opts = HeapOptions { fsync: policy(policy_name), ..HeapOptions::default() };
    let heap = Heap::open(dir.join("oplog.heap"), opts).unwrap();
    let durability = heap.durability().unwrap();
    let heap = Arc::new(Mutex::new(heap));
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let mut threads = Vec::new();
    for t in 0..THREADS {
        let (heap, durability, out) = (heap.clone(), durability.clone(), out.clone());
        threads.push(std::thread::spawn(move || {
            for seq in 0u64.. {
                let mut b = WriteBatch::new();
                let v = vec![t as u8; 50 + (seq % 300) as usize];
                b.put(format!("r{round}:t{t}:{seq:08}:a").as_bytes(), &v).unwrap();
                b.put(format!("r{round}:t{t}:{seq:08}:b").as_bytes(), &v).unwrap();
                let lsn = heap.lock().unwrap().apply(&b).unwrap();
                durability.wait(lsn).unwrap();
                let mut o = out.lock().unwrap();
                writeln!(o, "{t} {seq}").unwrap();
                o.flush().unwrap();
            }
        }));
    }
    loop {
        std::thread::sleep(Duration::from_millis(30));
        heap.lock().unwrap().checkpoint().unwrap();
    }
}

#[test]
fn kill9_under_concurrent_commits_loses_no_ack() {
    if let Some(dir) = std::env::var_os(DIR_ENV) {
        let p = std::env::var(POLICY_ENV).unwrap();
        let r = std::env::var(ROUND_ENV).unwrap().parse().unwrap();
        child(Path::new(&dir), &p, r);
    }
    let (seed, mut next) = crate::child::seeded("oplog kill9");
    let parse = |line: &str| {
        let mut it = line.split(' ').map(|x| x.parse::<u64>());
        match (it.next(), it.next()) {
            (Some(Ok(t)), Some(Ok(s))) => Some((t as u32, s)),
            _ => None,
        }
    };
    for policy_name in ["always", "every", "never"] {
        let dir = tempfile::tempdir().unwrap();
        let mut acked: BTreeSet<(u32, u32, u64)> = BTreeSet::new();
        for round in 0..10u32 {
            let envs = [
                (DIR_ENV, dir.path().display().to_string()),
                (POLICY_ENV, policy_name.to_string()),
                (ROUND_ENV, round.to_string()),
            ];
            let child = crate::child::spawn(TEST_NAME, &envs);
            let want = 20 + next() % 500;
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut seen = 0;
            while seen < want && Instant::now() < deadline {
                if let Some((t, s)) = child.line(Duration::from_millis(100)).as_deref().and_then(parse) {
                    acked.insert((round, t, s));
                    seen += 1;
                }
            }
            assert!(seen > 0, "{policy_name} round {round}: no commit acknowledged (seed {seed})");
            std::thread::sleep(Duration::from_micros(next() % 30_000));
            for (t, s) in child.kill().iter().filter_map(|l| parse(l)) {
                acked.insert((round, t, s));
            }

            let opts = HeapOptions { fsync: policy(policy_name), ..HeapOptions::default() };
            let h = Heap::open(dir.path().join("oplog.heap"), opts).unwrap();
            h.check_integrity().unwrap_or_else(|e| panic!("{policy_name} round {round}: {e} (seed {seed})"));
            for &(r, t, s) in &acked {
                for half in ["a", "b"] {
                    let k = format!("r{r}:t{t}:{s:08}:{half}");
                    assert!(
                        h.contains(k.as_bytes()).unwrap(),
                        "{policy_name} round {round}: acknowledged {k} lost (seed {seed})"
                    );
                }
            }
            let keys: Vec<Vec<u8>> = h.iter().map(|e| e.unwrap().0.to_vec()).collect();
            for k in &keys {
                let s = String::from_utf8(k.clone()).unwrap();
                let other =
                    if let Some(p) = s.strip_suffix(":a") { format!("{p}:b") } else { s.replace(":b", ":a") };
                assert!(
                    h.contains(other.as_bytes()).unwrap(),
                    "{policy_name}: half a batch: {s} without {other}"
                );
            }
            drop(h);
        }
    }
}
