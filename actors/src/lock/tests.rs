//! Tests of the lock state machines: sessions, FIFO grants skipping dead waiters, leases and
//! lock delay, reentrancy, and property tests of the fence history (Jepsen's FencedMutex rule)
//! and of semaphore permits under expiries.

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;

fn w(waiter: u64, session: SessionId) -> Waiter {
    Waiter { waiter, session, lease_ms: None }
}

#[test]
fn sessions_expire_by_ttl_and_reattach_with_their_secret() {
    let mut s = Sessions::default();
    assert_eq!(s.open(999, 1, 0), Err(LockError::BadTtl { ttl_ms: 999 }));
    assert_eq!(
        s.open(SESSION_TTL_MS_MAX + 1, 1, 0),
        Err(LockError::BadTtl { ttl_ms: SESSION_TTL_MS_MAX + 1 })
    );
    let a = s.open(1_000, 7, 0).unwrap();
    let b = s.open(1_000, 8, 0).unwrap();
    assert_ne!(a, b);
    s.touch(a, 900).unwrap();
    assert!(s.alive(a, 1_899) && !s.alive(b, 1_000));
    assert_eq!(s.reattach(a, 8, 1_000), Err(LockError::SessionExpired), "wrong secret");
    s.reattach(a, 7, 1_000).unwrap();
    assert_eq!(s.expire(1_500), vec![b]);
    assert_eq!(s.touch(b, 1_500), Err(LockError::SessionExpired));
    assert!(s.close(a));
    assert!(!s.alive(a, 1_500));
}

#[test]
fn fifty_waiters_are_granted_in_arrival_order_skipping_dead_ones() {
    let mut l = Lock::default();
    let Acquired::Granted(first) = l.acquire(w(0, 0), 0).unwrap() else { panic!("free lock not granted") };
    for i in 1..=50 {
        assert_eq!(l.acquire(w(i, i), 0).unwrap(), Acquired::Queued);
    }
    // Session 7 expires while queued: it is never granted.
    let alive = |s: SessionId| s != 7;
    let mut order = Vec::new();
    let mut holder = first;
    while let Some((waiter, g)) = l.release(holder.session, holder.fence, 1, alive).unwrap() {
        assert!(g.fence > holder.fence);
        order.push(waiter);
        holder = g;
    }
    assert_eq!(order, (1..=50).filter(|&i| i != 7).collect::<Vec<_>>());
}

#[test]
fn stale_fences_are_errors_and_leases_expire_with_lock_delay() {
    let mut l = Lock { lock_delay_ms: 100, ..Lock::default() };
    let Acquired::Granted(g) = l.acquire(Waiter { waiter: 1, session: 1, lease_ms: Some(50) }, 0).unwrap()
    else {
        panic!()
    };
    assert_eq!(l.release(1, g.fence + 1, 0, |_| true), Err(LockError::NotHolder { current: Some(g.fence) }));
    assert_eq!(l.release(2, g.fence, 0, |_| true), Err(LockError::NotHolder { current: Some(g.fence) }));
    assert_eq!(l.acquire(w(2, 2), 10).unwrap(), Acquired::Queued);
    assert_eq!(l.tick(49, |_| true), None);
    // The lease ends at 50: the lock delay holds it back until 150, then the waiter gets it.
    assert_eq!(l.tick(50, |_| true), None);
    assert_eq!(l.holder(), None);
    assert_eq!(l.tick(149, |_| true), None);
    let (waiter, g2) = l.tick(150, |_| true).unwrap();
    assert_eq!((waiter, g2.session), (2, 2));
    assert!(g2.fence > g.fence);
    // The old holder's release is stale now.
    assert_eq!(l.release(1, g.fence, 151, |_| true), Err(LockError::NotHolder { current: Some(g2.fence) }));
    // A release (not an expiry) has no delay.
    assert_eq!(l.acquire(w(3, 3), 151).unwrap(), Acquired::Queued);
    let (_, g3) = l.release(2, g2.fence, 152, |_| true).unwrap().unwrap();
    assert_eq!(g3.session, 3);
}

#[test]
fn reentrant_locks_nest_to_their_limit_with_one_fence() {
    let mut l = Lock { reentry_max: 2, ..Lock::default() };
    let Acquired::Granted(g) = l.acquire(w(1, 1), 0).unwrap() else { panic!() };
    let Acquired::Granted(g2) = l.acquire(w(2, 1), 0).unwrap() else { panic!() };
    assert_eq!((g2.fence, g2.depth), (g.fence, 2));
    l.acquire(w(3, 1), 0).unwrap();
    assert_eq!(l.acquire(w(4, 1), 0), Err(LockError::ReentryLimit));
    assert_eq!(l.acquire(w(5, 2), 0).unwrap(), Acquired::Queued);
    assert_eq!(l.release(1, g.fence, 0, |_| true).unwrap(), None);
    assert_eq!(l.release(1, g.fence, 0, |_| true).unwrap(), None);
    let (_, next) = l.release(1, g.fence, 0, |_| true).unwrap().unwrap();
    assert_eq!(next.session, 2);
    // Fences continue above a persisted one after a restart.
    assert_eq!(
        Lock::resume(41).acquire(w(1, 1), 0).unwrap(),
        Acquired::Granted(Grant { session: 1, fence: 42, lease_until_ms: None, depth: 1 })
    );
}

#[derive(Clone, Debug)]
enum Op {
    Acquire(u8, Option<u8>),
    Release(u8, bool),
    Kill(u8),
    Tick(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..6, prop::option::of(1u8..50)).prop_map(|(s, l)| Op::Acquire(s, l)),
        (0u8..6, any::<bool>()).prop_map(|(s, stale)| Op::Release(s, stale)),
        (0u8..6).prop_map(Op::Kill),
        (0u8..40).prop_map(Op::Tick),
    ]
}

proptest! {
    /// The grant history obeys the FencedMutex rule: a grant happens only when the lock is free,
    /// with a fence above every earlier one; only the holder's own fence releases; a dead
    /// session is never granted.
    #[test]
    fn grant_history_obeys_the_fenced_mutex_rule(ops in prop::collection::vec(op(), 1..200)) {
        let mut l = Lock { lock_delay_ms: 5, ..Lock::default() };
        let mut dead: BTreeSet<SessionId> = BTreeSet::new();
        let (mut now, mut waiter, mut max_fence) = (0u64, 0u64, 0u64);
        let mut check = |g: Grant, dead: &BTreeSet<SessionId>| -> Result<(), TestCaseError> {
            prop_assert!(g.fence > max_fence, "fence {} not above {}", g.fence, max_fence);
            prop_assert!(!dead.contains(&g.session), "granted to dead session {}", g.session);
            max_fence = g.fence;
            Ok(())
        };
        for op in ops {
            let before = l.holder();
            match op {
                Op::Acquire(s, lease) => {
                    let s = s as u64;
                    if dead.contains(&s) { continue; }
                    waiter += 1;
                    match l.acquire(Waiter { waiter, session: s, lease_ms: lease.map(u64::from) }, now).unwrap() {
                        Acquired::Granted(g) => {
                            prop_assert!(before.is_none(), "granted while held by {before:?}");
                            check(g, &dead)?;
                        }
                        Acquired::Queued => {}
                    }
                }
                Op::Release(s, stale) => {
                    let s = s as u64;
                    let fence = before.map_or(1, |h| if stale { h.fence.wrapping_sub(1) } else { h.fence });
                    let dead2 = dead.clone();
                    match l.release(s, fence, now, |x| !dead2.contains(&x)) {
                        Ok(next) => {
                            let h = before.expect("a release succeeded on a free lock");
                            prop_assert!(h.session == s && h.fence == fence && !stale);
                            if let Some((_, g)) = next { check(g, &dead)?; }
                        }
                        Err(LockError::NotHolder { current }) => {
                            prop_assert_eq!(current, before.map(|h| h.fence));
                            prop_assert!(before.is_none_or(|h| h.session != s || h.fence != fence));
                            prop_assert_eq!(l.holder(), before);
                        }
                        Err(e) => prop_assert!(false, "unexpected {e:?}"),
                    }
                }
                Op::Kill(s) => { dead.insert(s as u64); }
                Op::Tick(dt) => {
                    now += dt as u64;
                    let dead2 = dead.clone();
                    if let Some((_, g)) = l.tick(now, |x| !dead2.contains(&x)) {
                        check(g, &dead)?;
                    }
                    if let Some(h) = l.holder() {
                        prop_assert!(!dead.contains(&h.session));
                        prop_assert!(h.lease_until_ms.is_none_or(|t| t > now));
                    }
                }
            }
        }
    }

    /// Permits granted never exceed the size; a dead session's permits come back and queued
    /// acquires are granted strictly in order.
    #[test]
    fn semaphore_permits_stay_within_size(
        size in 1u32..6,
        ops in prop::collection::vec((0u8..3, 0u64..5, 1u32..4), 1..150),
    ) {
        let mut sem = Semaphore::new(size);
        let mut dead: BTreeSet<SessionId> = BTreeSet::new();
        let mut queued: Vec<(u64, SessionId)> = Vec::new();
        for (i, (kind, s, n)) in ops.into_iter().enumerate() {
            let i = i as u64;
            match kind {
                0 if !dead.contains(&s) => match sem.acquire(i, s, n) {
                    Some(true) => prop_assert!(queued.is_empty(), "granted past a queue"),
                    Some(false) => queued.push((i, s)),
                    None => prop_assert!(n > size),
                },
                1 => {
                    let d = dead.clone();
                    let granted = sem.release(s, n, |x| !d.contains(&x));
                    // Granted in queue order: exactly a prefix of the queue.
                    let head: Vec<u64> = queued.iter().take(granted.len()).map(|q| q.0).collect();
                    prop_assert_eq!(&granted, &head);
                    queued.retain(|q| !granted.contains(&q.0));
                }
                _ => {
                    dead.insert(s);
                    let d = dead.clone();
                    let granted = sem.session_gone(s, |x| !d.contains(&x));
                    prop_assert_eq!(sem.held_by(s), 0);
                    queued.retain(|q| q.1 != s);
                    let head: Vec<u64> = queued.iter().take(granted.len()).map(|q| q.0).collect();
                    prop_assert_eq!(&granted, &head);
                    queued.retain(|q| !granted.contains(&q.0));
                }
            }
            prop_assert!(sem.in_use() <= size, "{} permits of {}", sem.in_use(), size);
        }
    }
}
