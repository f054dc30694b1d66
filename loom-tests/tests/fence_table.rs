//! Loom models of the fence table (`actors/src/lock/fence.rs`, compiled here as it is, by path,
//! against loom's primitives): the lock service publishes each lock's `(fence, held)` into a cell
//! and shards check fenced writes against it on their own threads.
//!
//! - `a_shard_told_of_a_newer_grant_refuses_the_older_fence`: the lock service grants fence 1,
//!   releases it, grants fence 2 and then tells the next holder (a `Release` flag standing for the
//!   grant reply). A shard that was told must refuse fence 1 and accept fence 2; a shard checking
//!   fence 1 concurrently accepts it only while `(1, held)` is published, and never sees the
//!   published state go backwards across its loads.
//! - `racing_cell_creations_share_one_cell`: two threads create the same lock's cell at once while
//!   a third checks it: both get the same cell, and a publish through it is what `check` sees.
//! - `a_check_that_sees_a_grant_sees_what_preceded_it`: the cell is itself the only channel (no
//!   told flag, no lock taken after the data write): a check that accepts a grant sees what the lock
//!   service wrote before publishing it. This is the model that needs the cell's `Release` store and
//!   `Acquire` load; the first one holds through its own flag even with `Relaxed` cells.
#![cfg(heapgrid_loom)]

#[allow(dead_code)] // compiled as it is: not every item is used by the models
#[path = "../../actors/src/lock/fence.rs"]
mod fence;

use fence::{FenceTable, Stale};
use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use loom::thread;

/// The position of a published state in the lock service's sequence in the first model.
fn rank(state: (u64, bool)) -> u8 {
    match state {
        (0, false) => 0,
        (1, true) => 1,
        (1, false) => 2,
        (2, true) => 3,
        other => panic!("never published: {other:?}"),
    }
}

#[test]
fn a_shard_told_of_a_newer_grant_refuses_the_older_fence() {
    loom::model(|| {
        let table = Arc::new(FenceTable::default());
        let cell = table.cell("l");
        let told = Arc::new(AtomicBool::new(false));

        let service = {
            let told = told.clone();
            thread::spawn(move || {
                cell.publish(1, true);
                cell.publish(1, false);
                cell.publish(2, true);
                // The grant reply to fence 2's holder: sent only after fence 2 is published.
                told.store(true, Ordering::Release);
            })
        };
        let next_holder = {
            let (table, told) = (table.clone(), told.clone());
            thread::spawn(move || {
                if told.load(Ordering::Acquire) {
                    assert_eq!(table.check("l", 1).unwrap_err().current, Some(2), "a stale fence passed");
                    table.check("l", 2).expect("the holder's own fence was refused");
                }
            })
        };
        let old_holder = {
            let table = table.clone();
            thread::spawn(move || {
                let before = rank(table.current("l"));
                let passed = table.check("l", 1).is_ok();
                let after = rank(table.current("l"));
                assert!(before <= after, "the published state went back");
                if passed {
                    // It read (1, held) between the two loads: neither may be past it.
                    assert!(before <= 1 && after >= 1, "fence 1 passed out of its grant");
                }
            })
        };
        for h in [service, next_holder, old_holder] {
            h.join().unwrap();
        }
        assert_eq!(table.current("l"), (2, true));
    });
}

#[test]
fn racing_cell_creations_share_one_cell() {
    loom::model(|| {
        let table = Arc::new(FenceTable::default());

        let publisher = {
            let table = table.clone();
            thread::spawn(move || {
                let c = table.cell("x");
                c.publish(1, true);
                c
            })
        };
        let other = {
            let table = table.clone();
            thread::spawn(move || table.cell("x"))
        };
        let checker = {
            let table = table.clone();
            thread::spawn(move || table.check("x", 1))
        };
        let a = publisher.join().unwrap();
        let b = other.join().unwrap();
        match checker.join().unwrap() {
            Ok(()) => {}
            // Before the cell or the publish: unheld, fence 0, never anything else.
            Err(Stale { current, .. }) => assert_eq!(current, None, "check saw a grant never made"),
        }
        assert!(Arc::ptr_eq(&a, &b), "two cells for one lock");
        assert!(Arc::ptr_eq(&a, &table.cell("x")), "the table kept another cell");
        table.check("x", 1).expect("the publish through the shared cell was not seen");
    });
}

#[test]
fn a_check_that_sees_a_grant_sees_what_preceded_it() {
    loom::model(|| {
        let table = Arc::new(FenceTable::default());
        // Created up front so the service takes no lock between its write and its publish.
        let cell = table.cell("l");
        let record = Arc::new(AtomicU64::new(0));

        let service = {
            let record = record.clone();
            thread::spawn(move || {
                record.store(7, Ordering::Relaxed);
                cell.publish(1, true);
            })
        };
        let shard = {
            let (table, record) = (table.clone(), record.clone());
            thread::spawn(move || {
                if table.check("l", 1).is_ok() {
                    assert_eq!(record.load(Ordering::Relaxed), 7, "the grant was seen before its record");
                }
            })
        };
        service.join().unwrap();
        shard.join().unwrap();
    });
}
