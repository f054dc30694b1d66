//! Tests of the queue state machine: dead-lettering, stale receipts, dedup, `Full`, restart, and
//! a property test against a naive model on virtual time (every item ends acked, taken or
//! dead-lettered exactly once, or is still there; never in two states; `len` matches).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

fn q(max_deliveries: u32) -> Queue<u64> {
    Queue::new(QueueConfig { max_deliveries, visibility_ms: 100, ..QueueConfig::default() })
}

#[test]
fn three_failed_deliveries_move_an_item_to_its_dead_letters() {
    let mut q = q(3);
    let (seq, _) = q.push(7, None, 0, 0).unwrap();
    let d1 = q.pop(1, PopMode::Ack, 0).remove(0);
    assert_eq!(q.nack(d1.receipt, 0, 1).unwrap(), None);
    let d2 = q.pop(1, PopMode::Ack, 1).remove(0);
    assert_eq!(d2.deliveries, 2);
    assert!(q.tick(200).dead.is_empty(), "the second expiry returns it to ready");
    let d3 = q.pop(1, PopMode::Ack, 200).remove(0);
    assert_eq!(d3.deliveries, 3);
    assert_eq!(q.tick(300).dead, vec![DeadLetter { seq, deliveries: 3, value: 7 }]);
    assert!(q.is_empty());
    q.check().unwrap();
}

#[test]
fn a_stale_receipt_changes_nothing_and_redelivery_keeps_the_seq_order() {
    let mut q = q(16);
    q.push(1, None, 0, 0).unwrap();
    q.push(2, None, 0, 0).unwrap();
    let first = q.pop(1, PopMode::Ack, 0).remove(0);
    q.tick(100);
    // Redelivered: the old receipt is stale; the item comes back before item 2.
    let again = q.pop(2, PopMode::Ack, 100);
    assert_eq!(again.iter().map(|d| (d.seq, d.deliveries)).collect::<Vec<_>>(), [(1, 2), (2, 1)]);
    assert_eq!(q.ack(first.receipt), Err(QueueError::StaleReceipt));
    assert_eq!(q.len().in_flight, 2);
    q.ack(again[0].receipt).unwrap();
    assert_eq!(q.ack(again[0].receipt), Err(QueueError::StaleReceipt), "acked twice");
    q.recover();
    assert_eq!(q.len(), Len { ready: 1, in_flight: 0, delayed: 0 });
    assert_eq!(q.pop(1, PopMode::Take, 200)[0].deliveries, 2, "counts survive a restart");
    q.check().unwrap();
}

#[test]
fn dedup_keys_full_queues_delays_and_purge() {
    let mut q: Queue<u64> =
        Queue::new(QueueConfig { max_len: Some(2), dedup_window_ms: 1000, ..Default::default() });
    assert_eq!(q.push(1, Some("a"), 0, 0).unwrap(), (1, false));
    assert_eq!(q.push(9, Some("a"), 0, 10).unwrap(), (1, true), "a retry within the window");
    q.push(2, None, 50, 0).unwrap();
    assert_eq!(q.push(3, None, 0, 0), Err(QueueError::Full { max_len: 2 }));
    assert_eq!(q.len(), Len { ready: 1, in_flight: 0, delayed: 1 });
    assert_eq!(q.peek(5), vec![(1, &1)]);
    q.tick(50);
    assert_eq!(q.peek(5), vec![(1, &1), (2, &2)]);
    assert_eq!(q.purge(), 2);
    assert_eq!(q.push(5, Some("a"), 0, 1000).unwrap(), (3, false), "the window passed");
    q.check().unwrap();
}

/// The model: each item's state, found by scanning.
#[derive(Clone, Debug, PartialEq)]
enum M {
    Ready,
    InFlight { delivery: u32, deadline: u64 },
    Delayed { until: u64 },
}

#[derive(Clone, Debug)]
enum Op {
    Push { delay: u64 },
    Pop { n: usize, take: bool },
    Ack { pick: usize, stale: bool },
    Nack { pick: usize, delay: u64 },
    Extend { pick: usize, ms: u64 },
    Advance(u64),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (prop_oneof![Just(0u64), 1..300u64]).prop_map(|delay| Op::Push { delay }),
        3 => (1..4usize, any::<bool>()).prop_map(|(n, take)| Op::Pop { n, take }),
        3 => (any::<usize>(), prop::bool::weighted(0.2)).prop_map(|(pick, stale)| Op::Ack { pick, stale }),
        1 => (any::<usize>(), prop_oneof![Just(0u64), 1..200u64]).prop_map(|(pick, delay)| Op::Nack { pick, delay }),
        1 => (any::<usize>(), 1..300u64).prop_map(|(pick, ms)| Op::Extend { pick, ms }),
        2 => (1..250u64).prop_map(Op::Advance),
        1 => Just(Op::Restart),
    ]
}

proptest! {
    #[test]
    fn the_queue_matches_a_naive_model_on_virtual_time(ops in prop::collection::vec(op(), 1..120)) {
        const MAX: u32 = 3;
        const VIS: u64 = 100;
        let mut q: Queue<u64> = Queue::new(QueueConfig { max_deliveries: MAX, visibility_ms: VIS, ..Default::default() });
        // seq -> (deliveries, state)
        let mut model: BTreeMap<u64, (u32, M)> = BTreeMap::new();
        let (mut now, mut next) = (0u64, 1u64);
        let mut outstanding: Vec<Receipt> = Vec::new();
        let (mut pushed, mut gone) = (BTreeSet::new(), BTreeSet::new());
        let model_fail = |model: &mut BTreeMap<u64, (u32, M)>, seq: u64, delay: u64, now: u64, gone: &mut BTreeSet<u64>| {
            let d = model[&seq].0;
            if d >= MAX {
                model.remove(&seq);
                assert!(gone.insert(seq), "seq {seq} left twice");
                Some(seq)
            } else {
                model.get_mut(&seq).unwrap().1 = if delay > 0 { M::Delayed { until: now + delay } } else { M::Ready };
                None
            }
        };
        for op in ops {
            match op {
                Op::Push { delay } => {
                    let (seq, dup) = q.push(next, None, delay, now).unwrap();
                    prop_assert_eq!((seq, dup), (next, false));
                    model.insert(seq, (0, if delay > 0 { M::Delayed { until: now + delay } } else { M::Ready }));
                    pushed.insert(seq);
                    next += 1;
                }
                Op::Pop { n, take } => {
                    let got = q.pop(n, if take { PopMode::Take } else { PopMode::Ack }, now);
                    let want: Vec<u64> = model.iter().filter(|(_, (_, s))| *s == M::Ready).map(|(s, _)| *s).take(n).collect();
                    prop_assert_eq!(got.iter().map(|d| d.seq).collect::<Vec<_>>(), want.clone());
                    for d in &got {
                        prop_assert_eq!(d.value, d.seq, "values travel with their item");
                        let e = model.get_mut(&d.seq).unwrap();
                        e.0 += 1;
                        prop_assert_eq!(d.deliveries, e.0);
                        if take {
                            model.remove(&d.seq);
                            prop_assert!(gone.insert(d.seq));
                        } else {
                            e.1 = M::InFlight { delivery: e.0, deadline: now + VIS };
                            outstanding.push(d.receipt);
                        }
                    }
                }
                Op::Ack { pick, stale } => {
                    if outstanding.is_empty() { continue; }
                    let mut r = outstanding[pick % outstanding.len()];
                    if stale { r.delivery += 1; }
                    let current = matches!(model.get(&r.seq), Some((_, M::InFlight { delivery, .. })) if *delivery == r.delivery);
                    let got = q.ack(r);
                    prop_assert_eq!(got.is_ok(), current);
                    if current {
                        model.remove(&r.seq);
                        prop_assert!(gone.insert(r.seq), "acked twice");
                    }
                }
                Op::Nack { pick, delay } => {
                    if outstanding.is_empty() { continue; }
                    let r = outstanding[pick % outstanding.len()];
                    let current = matches!(model.get(&r.seq), Some((_, M::InFlight { delivery, .. })) if *delivery == r.delivery);
                    match q.nack(r, delay, now) {
                        Ok(dead) => {
                            prop_assert!(current);
                            let want = model_fail(&mut model, r.seq, delay, now, &mut gone);
                            prop_assert_eq!(dead.map(|d| d.seq), want);
                        }
                        Err(e) => { prop_assert!(!current); prop_assert_eq!(e, QueueError::StaleReceipt); }
                    }
                }
                Op::Extend { pick, ms } => {
                    if outstanding.is_empty() { continue; }
                    let r = outstanding[pick % outstanding.len()];
                    let current = matches!(model.get(&r.seq), Some((_, M::InFlight { delivery, .. })) if *delivery == r.delivery);
                    prop_assert_eq!(q.extend(r, ms, now).is_ok(), current);
                    if current {
                        model.get_mut(&r.seq).unwrap().1 = M::InFlight { delivery: r.delivery, deadline: now + ms };
                    }
                }
                Op::Advance(dt) => {
                    now += dt;
                    let mut dead: Vec<u64> = q.tick(now).dead.into_iter().map(|d| d.seq).collect();
                    dead.sort_unstable();
                    let mut want = Vec::new();
                    let due: Vec<u64> = model.iter().filter(|(_, (_, s))| matches!(s, M::InFlight { deadline, .. } if *deadline <= now)).map(|(s, _)| *s).collect();
                    for seq in due {
                        if let Some(s) = model_fail(&mut model, seq, 0, now, &mut gone) { want.push(s); }
                    }
                    for (_, (_, s)) in model.iter_mut() {
                        if matches!(s, M::Delayed { until } if *until <= now) { *s = M::Ready; }
                    }
                    want.sort_unstable();
                    prop_assert_eq!(dead, want);
                }
                Op::Restart => {
                    q.recover();
                    for (_, (_, s)) in model.iter_mut() {
                        if matches!(s, M::InFlight { .. }) { *s = M::Ready; }
                    }
                }
            }
            q.check().map_err(TestCaseError::fail)?;
            let count = |f: fn(&M) -> bool| model.values().filter(|(_, s)| f(s)).count() as u64;
            prop_assert_eq!(q.len(), Len {
                ready: count(|s| *s == M::Ready),
                in_flight: count(|s| matches!(s, M::InFlight { .. })),
                delayed: count(|s| matches!(s, M::Delayed { .. })),
            });
            // Conservation: every push is still there or left exactly once.
            let present: BTreeSet<u64> = model.keys().copied().collect();
            prop_assert!(present.is_disjoint(&gone));
            prop_assert_eq!(present.union(&gone).copied().collect::<BTreeSet<_>>(), pushed.clone());
        }
    }
}
