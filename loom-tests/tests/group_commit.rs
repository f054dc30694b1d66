//! Loom models of `GroupCommit`: many committers, leader-led syncs.
#![cfg(heapgrid_loom)]

use heapgrid_heap::GroupCommit;
use loom::sync::Arc;
use loom::sync::Mutex;
use loom::sync::atomic::{AtomicU64, Ordering};
use loom::thread;

/// A fake op log: `appended` is the highest LSN written, `synced` the highest LSN a sync covered.
struct Log {
    next: Mutex<u64>,
    appended: AtomicU64,
    synced: AtomicU64,
}

fn committer(gc: &GroupCommit, log: &Log, fail: bool) -> Result<(u64, u64), ()> {
    let lsn = {
        let mut n = log.next.lock().unwrap();
        *n += 1;
        log.appended.store(*n, Ordering::SeqCst);
        gc.record_written(*n);
        *n
    };
    let r = gc.wait_durable(lsn, || {
        if fail {
            return Err(std::io::Error::other("EIO"));
        }
        let upto = log.appended.load(Ordering::SeqCst);
        log.synced.fetch_max(upto, Ordering::SeqCst);
        Ok(())
    });
    match r {
        Ok(d) => Ok((lsn, d)),
        Err(_) => Err(()),
    }
}

/// Every committer is acknowledged exactly once, never before a sync covered its record, with a
/// durable LSN at least its own; at the end everything is durable.
#[test]
fn every_committer_acked_once_never_early() {
    loom::model(|| {
        let gc = Arc::new(GroupCommit::new(0));
        let log =
            Arc::new(Log { next: Mutex::new(0), appended: AtomicU64::new(0), synced: AtomicU64::new(0) });
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let (gc, log) = (gc.clone(), log.clone());
                thread::spawn(move || {
                    let (lsn, d) = committer(&gc, &log, false).expect("no sync fails here");
                    assert!(d >= lsn, "acked with durable {d} < own lsn {lsn}");
                    assert!(
                        log.synced.load(Ordering::SeqCst) >= lsn,
                        "acked before a sync covered lsn {lsn}"
                    );
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(gc.durable(), 3);
        assert!(gc.syncs() >= 1 && gc.syncs() <= 3);
    });
}

/// A failing sync wakes every waiter with an error; nobody hangs and nobody is acked.
#[test]
fn failed_sync_wakes_everyone_with_an_error() {
    loom::model(|| {
        let gc = Arc::new(GroupCommit::new(0));
        let log =
            Arc::new(Log { next: Mutex::new(0), appended: AtomicU64::new(0), synced: AtomicU64::new(0) });
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let (gc, log) = (gc.clone(), log.clone());
                thread::spawn(move || committer(&gc, &log, true))
            })
            .collect();
        for h in handles {
            assert!(h.join().unwrap().is_err(), "a committer was acked although every sync failed");
        }
    });
}
