//! Loom models of `CommitQueue`: submitters race to lead; every item is processed exactly once
//! and every submitter returns exactly once with its own result.
#![cfg(heapgrid_loom)]

use heapgrid_heap::commit_queue::CommitQueue;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::thread;

#[test]
fn each_submitter_gets_its_own_result_exactly_once() {
    loom::model(|| {
        let q = Arc::new(CommitQueue::<usize, usize>::new());
        let processed = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (1..=3usize)
            .map(|item| {
                let (q, processed) = (q.clone(), processed.clone());
                thread::spawn(move || {
                    let r = q
                        .submit(item, |items| {
                            processed.fetch_add(items.len(), Ordering::SeqCst);
                            items.into_iter().map(|x| x * 10).collect()
                        })
                        .expect("no leader panics here");
                    assert_eq!(r, item * 10, "got another submitter's result");
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(processed.load(Ordering::SeqCst), 3, "an item was processed twice or never");
        assert!((1..=3).contains(&q.rounds()));
    });
}

/// Two submitters, the second arriving while the first leads: leadership is handed over (or the
/// second's item is taken in the first round) and nobody sleeps forever.
#[test]
fn lead_is_handed_over_without_lost_wakeups() {
    loom::model(|| {
        let q = Arc::new(CommitQueue::<usize, usize>::new());
        let q2 = q.clone();
        let t = thread::spawn(move || q2.submit(2, |items| items).unwrap());
        let a = q.submit(1, |items| items).unwrap();
        let b = t.join().unwrap();
        assert_eq!((a, b), (1, 2));
    });
}
