//! The replication state machines directly: epoch history answers, a replica's alignment
//! (truncating what a new primary lacks), refusal of an old epoch, `sync(n)` completion and
//! `Indeterminate`, leases, and a snapshot for a replica behind the retained log.

use std::collections::VecDeque;

use super::primary::{Out, Outcome, Primary, WriteRefused};
use super::replica::{Action, Replica};
use super::{EpochHistory, Pos, Record, ToPrimary, ToReplica};

fn rec(epoch: u64, lsn: u64) -> Record<u64> {
    Record { epoch, lsn, body: lsn * 10 }
}

#[test]
fn epoch_history_answers_the_end_of_the_largest_epoch_at_or_below() {
    let mut h = EpochHistory::default();
    for (e, l) in [(1, 1), (1, 2), (3, 3), (3, 4), (7, 5)] {
        h.note(e, l);
    }
    assert_eq!(h.end_of(1, 5), Some((1, 2)));
    assert_eq!(h.end_of(2, 5), Some((1, 2)), "no epoch 2: the largest below");
    assert_eq!(h.end_of(5, 5), Some((3, 4)));
    assert_eq!(h.end_of(9, 5), Some((7, 5)));
    assert_eq!(h.end_of(0, 5), None);
    assert_eq!(h.epoch_at(4), Some(3));
    h.truncate_after(3);
    assert_eq!(h.last_epoch(), Some(3));
    assert_eq!(h.end_of(9, 3), Some((3, 3)));
}

#[test]
fn a_returning_old_primary_truncates_what_the_new_primary_does_not_have() {
    // The old primary wrote 1..=4 in epoch 1; only 1..=2 reached the new primary (epoch 2),
    // which then wrote 3..=4 of its own.
    let mut old = EpochHistory::default();
    (1..=4).for_each(|l| old.note(1, l));
    let mut r = Replica::new(1, 4, old);
    let mut newh = EpochHistory::default();
    newh.note(1, 1);
    newh.note(1, 2);
    newh.note(2, 3);
    newh.note(2, 4);
    let append = ToReplica::<u64, ()>::Append { epoch: 2, prev: 4, records: vec![] };
    let (a, reply) = r.on_message(append);
    assert!(a.is_empty());
    assert_eq!(reply, Some(ToPrimary::EpochEndQuery { epoch: 2, last_epoch: 1 }));
    let end = ToReplica::<u64, ()>::EpochEnd { epoch: 2, asked: 1, end: newh.end_of(1, 4) };
    let (a, reply) = r.on_message(end.clone());
    assert_eq!(a, vec![Action::TruncateAfter(2)]);
    assert_eq!(reply, Some(ToPrimary::Ack { epoch: 2, lsn: 2 }));
    // The same answer again (late, duplicated) does nothing.
    assert_eq!(r.on_message(end), (vec![], None));
    // Now it takes epoch 2's records 3 and 4.
    let append = ToReplica::<u64, ()>::Append { epoch: 2, prev: 2, records: vec![rec(2, 3), rec(2, 4)] };
    let (a, reply) = r.on_message(append);
    assert_eq!(a, vec![Action::Apply(rec(2, 3)), Action::Apply(rec(2, 4))]);
    assert_eq!(reply, Some(ToPrimary::Ack { epoch: 2, lsn: 2 }), "acks name only what is durable");
    assert_eq!(r.synced(4), Some(ToPrimary::Ack { epoch: 2, lsn: 4 }));
    assert_eq!(r.synced(4), None);
    assert_eq!(r.pos(), Pos { epoch: 2, lsn: 4 });
    // The old primary's records are refused from now on, and it learns why.
    let stale = ToReplica::<u64, ()>::Append { epoch: 1, prev: 4, records: vec![rec(1, 5)] };
    assert_eq!(r.on_message(stale).1, Some(ToPrimary::Refused { current: 2 }));
}

#[test]
fn a_replica_behind_says_where_it_is_and_ignores_what_it_has() {
    let mut r = Replica::default();
    let far = ToReplica::<u64, ()>::Append { epoch: 1, prev: 3, records: vec![rec(1, 4)] };
    assert_eq!(r.on_message(far).1, Some(ToPrimary::Behind { epoch: 1, have: 0 }));
    let from_start = ToReplica::<u64, ()>::Append { epoch: 1, prev: 0, records: vec![rec(1, 1), rec(1, 2)] };
    assert_eq!(r.on_message(from_start.clone()).0.len(), 2);
    r.synced(2);
    let (again, reply) = r.on_message(from_start);
    assert!(again.is_empty(), "a resend applies nothing twice");
    assert_eq!(reply, Some(ToPrimary::Ack { epoch: 1, lsn: 2 }));
}

#[test]
fn sync_writes_complete_on_enough_acks_or_end_indeterminate() {
    let mut p: Primary<u64> = Primary::new(1, 0, EpochHistory::default(), VecDeque::new(), &[2, 3], 0);
    // Replica 3 is out of sync: only the count `n` and replica 2 matter.
    p.set_in_sync(&[2], 1);
    assert_eq!(p.write(1, 1, 100, 1_000, 0), Err(WriteRefused::NoLease));
    p.grant_lease(500);
    assert_eq!(p.write(1, 1, 100, 1_000, 0), Ok(1));
    assert_eq!(p.write(2, 2, 101, 1_000, 0), Ok(2));
    assert!(
        p.outbox(1)
            .iter()
            .all(|o| matches!(o, Out::Send(_, ToReplica::Append { records, .. }) if records.is_empty())),
        "nothing ships before it is durable here"
    );
    p.synced(2);
    let out = p.outbox(300);
    assert_eq!(out.len(), 2, "both replicas get the records: {out:?}");
    let (done, _) = p.on_reply(2, ToPrimary::Ack { epoch: 1, lsn: 2 }, 5);
    assert_eq!(done, vec![(100, Outcome::Replicated)], "sync(1) done; sync(2) waits");
    assert_eq!(p.tick(999), vec![]);
    assert_eq!(p.tick(1_000), vec![(101, Outcome::Indeterminate)]);
    // No writes past the lease.
    assert_eq!(p.write(3, 1, 102, 2_000, 500), Err(WriteRefused::NoLease));
    // A replica that knows a newer epoch makes it step down.
    p.on_reply(3, ToPrimary::Refused { current: 4 }, 10);
    assert_eq!(p.stepped_down(), Some(4));
    p.grant_lease(10_000);
    assert_eq!(p.write(4, 0, 103, 2_000, 20), Err(WriteRefused::SteppedDown { current: 4 }));
}

#[test]
fn a_replica_behind_the_retained_log_gets_a_snapshot() {
    let mut p: Primary<u64> = Primary::new(1, 0, EpochHistory::default(), VecDeque::new(), &[2], 0);
    p.retain_max = 3;
    p.grant_lease(1_000);
    for i in 1..=10 {
        p.write(i, 0, i, 1_000, 0).unwrap();
    }
    p.synced(10);
    p.retain();
    assert_eq!(p.log().len(), 3);
    // The replica says it has nothing.
    p.on_reply(2, ToPrimary::Behind { epoch: 1, have: 0 }, 1);
    assert_eq!(p.outbox(2), vec![Out::Snapshot(2)]);
    // While it is in flight: no more snapshots, and a `Behind` sent before it arrived is ignored.
    p.on_reply(2, ToPrimary::Behind { epoch: 1, have: 0 }, 3);
    assert_eq!(p.outbox(500), vec![], "no snapshot storm");
    p.on_reply(2, ToPrimary::Ack { epoch: 1, lsn: 10 }, 600);
    assert_eq!(p.acked(), vec![(2, 10)]);
    // Unacked for `snapshot_retry_ms`, it is sent again.
    p.on_reply(2, ToPrimary::Behind { epoch: 1, have: 0 }, 700);
    assert_eq!(p.outbox(800), vec![Out::Snapshot(2)]);
    assert_eq!(p.outbox(900), vec![]);
    assert_eq!(p.outbox(900 + p.snapshot_retry_ms), vec![Out::Snapshot(2)]);
}

#[test]
fn an_older_snapshot_arriving_late_is_ignored() {
    let mut r = Replica::default();
    let snap = |lsn| {
        let mut h = EpochHistory::default();
        h.note(1, 1);
        ToReplica::<u64, u64>::Snapshot { epoch: 1, upto: Pos { epoch: 1, lsn }, history: h, state: lsn }
    };
    let (a, reply) = r.on_message(snap(20));
    assert_eq!(a.len(), 1);
    assert_eq!(reply, None, "acked once installed and synced");
    assert_eq!(r.synced(20), Some(ToPrimary::Ack { epoch: 1, lsn: 20 }));
    let (a, reply) = r.on_message(snap(15));
    assert!(a.is_empty(), "installing it would take back lsns 16..=20, already acked");
    assert_eq!(reply, Some(ToPrimary::Ack { epoch: 1, lsn: 20 }));
    assert_eq!(r.pos().lsn, 20);
}

#[test]
fn alignment_asks_again_when_this_log_lacks_the_primarys_epoch() {
    // A wrote 1..=5 in epoch 1 and (3, 6) in epoch 3; the primary B has epoch 1 up to 3, then
    // epoch 2 from 4 to 6, and epoch 4 after: A's 4, 5 (epoch 1) and 6 (epoch 3) must go.
    let mut a = EpochHistory::default();
    (1..=5).for_each(|l| a.note(1, l));
    a.note(3, 6);
    let mut b = EpochHistory::default();
    (1..=3).for_each(|l| b.note(1, l));
    (4..=6).for_each(|l| b.note(2, l));
    b.note(4, 7);
    let mut r = Replica::new(3, 6, a);
    let hb = ToReplica::<u64, ()>::Append { epoch: 4, prev: 7, records: vec![] };
    assert_eq!(r.on_message(hb).1, Some(ToPrimary::EpochEndQuery { epoch: 4, last_epoch: 3 }));
    // B has no epoch 3: its largest below is 2, ending at 6. A lacks epoch 2: cut after A's
    // epoch 1 (5) and ask about epoch 1.
    let answer = ToReplica::<u64, ()>::EpochEnd { epoch: 4, asked: 3, end: b.end_of(3, 7) };
    let (acts, reply) = r.on_message(answer);
    assert_eq!(acts, vec![Action::TruncateAfter(5)]);
    assert_eq!(reply, Some(ToPrimary::EpochEndQuery { epoch: 4, last_epoch: 1 }));
    let answer = ToReplica::<u64, ()>::EpochEnd { epoch: 4, asked: 1, end: b.end_of(1, 7) };
    let (acts, reply) = r.on_message(answer);
    assert_eq!(acts, vec![Action::TruncateAfter(3)]);
    assert_eq!(reply, Some(ToPrimary::Ack { epoch: 4, lsn: 3 }));
    assert_eq!(r.pos(), Pos { epoch: 1, lsn: 3 });
}

#[test]
fn a_write_waits_for_every_in_sync_replica_and_a_laggard_is_proposed_out() {
    let mut p: Primary<u64> = Primary::new(1, 0, EpochHistory::default(), VecDeque::new(), &[2, 3], 0);
    p.set_in_sync(&[2, 3], 0);
    p.grant_lease(10_000);
    p.write(1, 1, 100, 5_000, 0).unwrap();
    p.synced(1);
    let (done, _) = p.on_reply(2, ToPrimary::Ack { epoch: 1, lsn: 1 }, 10);
    assert!(done.is_empty(), "sync(1) has its one ack, but in-sync replica 3 has not acked");
    assert_eq!(p.propose_in_sync(100), None, "not lagging yet");
    assert_eq!(p.propose_in_sync(300), Some((vec![2], 0)), "3 lags the write by lag_ms");
    assert!(p.tick(301).is_empty(), "a removal counts only once the map committed it");
    p.set_in_sync(&[2], 1);
    assert_eq!(p.tick(302), vec![(100, Outcome::Replicated)]);
    // Caught up, 3 is proposed back in, and counts from the proposal on.
    p.on_reply(3, ToPrimary::Ack { epoch: 1, lsn: 1 }, 400);
    assert_eq!(p.propose_in_sync(400), Some((vec![2, 3], 1)));
    p.write(2, 1, 101, 5_000, 410).unwrap();
    p.synced(2);
    let (done, _) = p.on_reply(2, ToPrimary::Ack { epoch: 1, lsn: 2 }, 420);
    assert!(done.is_empty(), "the proposed member must ack too");
    let (done, _) = p.on_reply(3, ToPrimary::Ack { epoch: 1, lsn: 2 }, 430);
    assert_eq!(done, vec![(101, Outcome::Replicated)]);
}

#[test]
fn a_proposed_addition_holds_writes_up_until_a_later_map_settles_it() {
    let mut p: Primary<u64> = Primary::new(1, 0, EpochHistory::default(), VecDeque::new(), &[2], 0);
    p.acks_in_sync = true;
    p.set_in_sync(&[], 4);
    p.grant_lease(10_000);
    // Nobody in sync: a write is answered at once.
    p.write(1, 0, 100, 5_000, 0).unwrap();
    assert!(!p.last_waits());
    p.synced(1);
    p.on_reply(2, ToPrimary::Ack { epoch: 1, lsn: 1 }, 10);
    assert_eq!(p.propose_in_sync(10), Some((vec![2], 4)), "2 holds the whole log: it joins");
    // 2 falls a record behind before the map answers: the proposal may be committed all the
    // same, so it is neither withdrawn nor replaced, and writes wait for 2.
    p.write(2, 0, 101, 5_000, 20).unwrap();
    assert!(p.last_waits(), "a proposed member must ack too");
    assert_eq!(p.propose_in_sync(30), None, "not withdrawn");
    assert_eq!(p.propose_in_sync(400), Some((vec![2], 4)), "sent again as it was");
    // A map older than the one seen changes nothing.
    p.set_in_sync(&[], 3);
    p.write(3, 0, 102, 5_000, 410).unwrap();
    assert!(p.last_waits());
    // The map committed it (version 5); 2 is in sync, and then proposed out as a laggard.
    p.set_in_sync(&[2], 5);
    assert_eq!(p.propose_in_sync(800), Some((vec![], 5)));
    p.write(4, 0, 103, 5_000, 810).unwrap();
    assert!(p.last_waits(), "a removal counts only once committed");
    // Refused (the set moved on meanwhile, version 6 put 2 out another way): settled too.
    p.set_in_sync(&[], 6);
    assert_eq!(p.propose_in_sync(820), None);
    p.write(5, 0, 104, 5_000, 830).unwrap();
    assert!(!p.last_waits(), "no one in sync, no proposal pending");
}

mod heap_log {
    //! Two heaps kept equal by the endpoint over `HeapLog`: messages carried by hand (in order,
    //! with a replica that misses some, restarts, and falls behind the retained log).

    use std::collections::VecDeque;

    use heapgrid_heap::{Heap, HeapOptions, WriteBatch};

    use crate::cluster::map::Placement;
    use crate::replication::endpoint::{Effect, Endpoint, PrimaryTuning, ShardLog};
    use crate::replication::heap_log::HeapLog;
    use crate::replication::{Pos, ToPrimary, ToReplica};

    type Msg = (u64, u64, Result<ToReplica<Vec<u8>, (Pos, Vec<(Vec<u8>, Vec<u8>)>)>, ToPrimary>);

    /// A node: its endpoint and the log it lends it.
    struct N {
        ep: Endpoint<Vec<u8>>,
        log: HeapLog,
    }

    fn open(dir: &std::path::Path, id: u64) -> N {
        let path = dir.join(format!("n{id}.heap"));
        let heap = Heap::open(&path, HeapOptions::default()).unwrap();
        let log = HeapLog::open(heap, &path).unwrap();
        let mut ep = Endpoint::new(id, &log, 1);
        ep.tuning = PrimaryTuning { retain_max: 20, batch_max: 8, acks_in_sync: false };
        N { ep, log }
    }

    fn placement() -> Placement {
        Placement { epoch: 1, primary: 1, replicas: vec![2], in_sync: vec![2], sync: 1, in_sync_version: 0 }
    }

    /// Runs the exchange until quiet; `deliver` says whether a message reaches the replica.
    fn pump(p: &mut N, r: &mut N, now: &mut u64, deliver: &mut dyn FnMut(u64) -> bool) {
        let mut queue: VecDeque<Msg> = VecDeque::new();
        for _ in 0..200 {
            *now += 50;
            for e in p.ep.tick(&p.log, *now).unwrap() {
                if let Effect::ToReplica(to, m) = e {
                    queue.push_back((1, to, Ok(m)));
                }
            }
            while let Some((_, to, m)) = queue.pop_front() {
                match (to, m) {
                    (2, Ok(m)) => {
                        if !deliver(*now) {
                            continue;
                        }
                        let mut effects = r.ep.on_replica_msg(&mut r.log, 1, m).unwrap();
                        r.log.flush().unwrap();
                        let last = r.log.last();
                        effects.extend(r.ep.synced::<HeapLog>(last, Some(1)));
                        for e in effects {
                            if let Effect::ToPrimary(to, m) = e {
                                queue.push_back((2, to, Err(m)));
                            }
                        }
                    }
                    (1, Err(m)) => {
                        for e in p.ep.on_primary_msg(&p.log, 2, m, *now) {
                            if let Effect::ToReplica(to, m) = e {
                                queue.push_back((1, to, Ok(m)));
                            }
                        }
                    }
                    _ => {}
                }
            }
            if r.log.last() == p.log.last() && *now > 1_000 {
                return;
            }
        }
    }

    fn write(p: &mut N, i: u32, now: u64) {
        let mut b = WriteBatch::new();
        b.put(format!("k{i:05}").as_bytes(), &i.to_le_bytes()).unwrap();
        let (lsn, _) =
            p.ep.write(&mut p.log, b.as_bytes().to_vec(), 0, u64::from(i), now + 10_000, now)
                .unwrap()
                .unwrap();
        p.log.flush().unwrap();
        p.ep.synced::<HeapLog>(lsn, None);
    }

    fn same(p: &N, r: &N) {
        assert_eq!(r.log.last(), p.log.last());
        assert_eq!(r.log.snapshot().unwrap(), p.log.snapshot().unwrap(), "the heaps differ");
    }

    #[test]
    fn a_replica_heap_follows_through_losses_a_restart_and_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (mut p, mut r) = (open(dir.path(), 1), open(dir.path(), 2));
        let mut now = 0;
        p.ep.on_map(&p.log, &placement(), now);
        r.ep.on_map(&r.log, &placement(), now);
        p.ep.on_lease(1, u64::MAX);
        for i in 0..15 {
            write(&mut p, i, now);
        }
        // Every third message lost.
        let mut n = 0;
        pump(&mut p, &mut r, &mut now, &mut |_| {
            n += 1;
            n % 3 != 0
        });
        same(&p, &r);
        // The replica restarts (its heap and sidecar reopened) and more is written.
        drop(r);
        let mut r = open(dir.path(), 2);
        r.ep.on_map(&r.log, &placement(), now);
        for i in 15..30 {
            write(&mut p, i, now);
        }
        pump(&mut p, &mut r, &mut now, &mut |_| true);
        same(&p, &r);
        // It misses more than the primary retains: a snapshot brings it back.
        for i in 30..100 {
            write(&mut p, i, now);
        }
        p.ep.tick(&p.log, now).unwrap();
        pump(&mut p, &mut r, &mut now, &mut |_| true);
        same(&p, &r);
        assert_eq!(r.log.snapshot().unwrap().len(), 100);
    }
}
