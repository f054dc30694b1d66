//! The primary of one shard in one epoch: appends records, ships them to its replicas in order,
//! answers `sync(n)` writes once `n` replicas and every in-sync replica acked them (or
//! `Indeterminate` at their deadline), proposes changes of the in-sync set to the cluster map
//! (a lagging replica leaves it, a caught-up one joins: Kafka's ISR),
//! answers replicas aligning their logs, and steps down when a replica knows a newer epoch. It
//! accepts writes only under a lease (granted by the cluster map, shorter than failure
//! detection), so an isolated or paused primary stops before a new one starts.
//!
//! Invariant: `log` is the tail of the primary's log, contiguous, ending at `last`; every
//! follower's `acked` ≤ `last`; `waiting` is in lsn order.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::{Epoch, EpochHistory, Lsn, NodeId, Pos, Record, ToPrimary, ToReplica};

/// Why a write was not taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteRefused {
    /// The lease ran out (or was never granted): this node may not be the primary any more.
    NoLease,
    /// A replica knows a newer epoch: this node is no longer the primary.
    SteppedDown { current: Epoch },
}

/// A write that ended: its token and how.
pub type Done = (u64, Outcome);

/// How a `sync(n)` write ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `n` replicas hold it.
    Replicated,
    /// Its deadline passed first: it may or may not survive a failover.
    Indeterminate,
}

#[derive(Clone, Debug)]
struct Follower {
    /// The last lsn it holds (acked in this epoch).
    acked: Lsn,
    /// The next lsn to send.
    next: Lsn,
    /// When it last answered.
    heard_ms: u64,
    /// When records were last sent to it (for a resend after silence).
    sent_ms: u64,
    /// A snapshot sent and not yet acked: its end and when it went. Nothing else is sent
    /// meanwhile (until `snapshot_retry_ms`), so a slow transfer is not answered with more.
    snapshot: Option<(Lsn, u64)>,
}

/// A write waiting for its replicas.
#[derive(Clone, Debug)]
struct Waiting {
    lsn: Lsn,
    written_ms: u64,
    token: u64,
    n: usize,
    deadline_ms: u64,
}

/// What the primary sends, to whom: a message, or "send it a snapshot" (the caller builds it).
#[derive(Clone, Debug, PartialEq)]
pub enum Out<B> {
    Send(NodeId, ToReplica<B, ()>),
    /// `NodeId` is behind the retained log: send it `ToReplica::Snapshot` of the state now.
    Snapshot(NodeId),
}

pub struct Primary<B> {
    pub epoch: Epoch,
    last: Lsn,
    history: EpochHistory,
    log: VecDeque<Record<B>>,
    /// Records up to here are durable in this node's own op log: only they are shipped (a
    /// replica must never hold a record its primary could lose in a crash).
    durable: Lsn,
    followers: BTreeMap<NodeId, Follower>,
    /// The in-sync replicas as the cluster map has them (committed): a write completes only
    /// once every one of them holds it, so any of them can take over without losing it.
    isr: BTreeSet<NodeId>,
    /// The map's `in_sync_version` of `isr` (maps older than it are ignored).
    isr_version: u64,
    /// A change of `isr` proposed to the map, based on `isr_version`: it may still be committed
    /// until a map of a later version arrives, so it stays (resent as it is, never replaced or
    /// withdrawn) until then. Additions count at once (they must ack too), removals only once
    /// committed. Found by the simulation: a proposed addition withdrawn a moment later (the
    /// replica fell a record behind) was committed all the same, and writes the primary then
    /// answered without that replica were lost when it took over.
    proposed: Option<BTreeSet<NodeId>>,
    proposed_ms: u64,
    waiting: VecDeque<Waiting>,
    lease_until_ms: u64,
    stepped_down: Option<Epoch>,
    /// Most records kept for replicas behind; older ones are reached by snapshot.
    pub retain_max: usize,
    /// Most records in one `Append`.
    pub batch_max: usize,
    /// A follower not heard from for this long is sent its records again (from its ack).
    pub resend_ms: u64,
    /// An in-sync replica that has not acked a write this long after it was written is proposed
    /// for removal from the in-sync set.
    pub lag_ms: u64,
    /// How long a snapshot may go unacked before another is sent.
    pub snapshot_retry_ms: u64,
    /// The in-sync set never shrinks below this (the shard's `sync(n)`): under it no replica
    /// could be known to hold every completed write, and a failover would have no candidate.
    /// A laggard that cannot leave holds writes up until it acks or they end `Indeterminate`.
    pub min_in_sync: usize,
    /// Every write, whatever its `n`, waits for every in-sync replica (Kafka's `acks=all` with
    /// `min.insync.replicas=1`): a write is answered at once only while the in-sync set is
    /// empty (no failover could then take the shard elsewhere). The services use it.
    pub acks_in_sync: bool,
}

impl<B: Clone> Primary<B> {
    /// The primary of `epoch` over a log ending at `last` (with `history` and, of it, the tail
    /// `log`), shipping to `replicas`. It has no lease yet.
    pub fn new(
        epoch: Epoch,
        last: Lsn,
        history: EpochHistory,
        log: VecDeque<Record<B>>,
        replicas: &[NodeId],
        now_ms: u64,
    ) -> Primary<B> {
        debug_assert!(log.back().is_none_or(|r| r.lsn == last));
        let followers = replicas
            .iter()
            .map(|&id| {
                (id, Follower { acked: 0, next: last + 1, heard_ms: now_ms, sent_ms: 0, snapshot: None })
            })
            .collect();
        // Until the map's in-sync set is known (`set_in_sync`), every replica must ack.
        let isr = replicas.iter().copied().collect();
        Primary {
            epoch,
            last,
            history,
            log,
            durable: last,
            followers,
            isr,
            isr_version: 0,
            proposed: None,
            proposed_ms: 0,
            waiting: VecDeque::new(),
            lease_until_ms: 0,
            stepped_down: None,
            retain_max: 100_000,
            batch_max: 256,
            resend_ms: 200,
            lag_ms: 300,
            snapshot_retry_ms: 1_000,
            min_in_sync: 0,
            acks_in_sync: false,
        }
    }

    /// The map's replicas for this epoch changed (a planned move adds one, then removes the old
    /// primary): a new one starts from nothing (the log, or a snapshot), a gone one is
    /// forgotten and no longer holds writes up.
    pub fn set_replicas(&mut self, replicas: &[NodeId], now_ms: u64) {
        let last = self.last;
        for &id in replicas {
            self.followers.entry(id).or_insert(Follower {
                acked: 0,
                next: last + 1,
                heard_ms: now_ms,
                sent_ms: 0,
                snapshot: None,
            });
        }
        self.followers.retain(|id, _| replicas.contains(id));
        self.isr.retain(|id| replicas.contains(id));
        if let Some(p) = self.proposed.as_mut() {
            p.retain(|id| replicas.contains(id));
        }
    }

    /// The in-sync set the cluster map committed, at its `in_sync_version` `version` (an older
    /// one than already seen is ignored). A proposal based on an older version can no longer be
    /// committed: it is settled (landed or refused) and a new one may follow.
    pub fn set_in_sync(&mut self, in_sync: &[NodeId], version: u64) {
        if version < self.isr_version {
            return;
        }
        self.isr = in_sync.iter().copied().filter(|id| self.followers.contains_key(id)).collect();
        if version > self.isr_version || self.proposed.as_ref() == Some(&self.isr) {
            self.proposed = None;
        }
        self.isr_version = version;
    }

    /// Who must hold a write before it completes: the committed in-sync set and any proposed
    /// additions.
    fn required(&self) -> BTreeSet<NodeId> {
        let mut r = self.isr.clone();
        if let Some(p) = &self.proposed {
            r.extend(p.iter().copied());
        }
        r
    }

    /// A change of the in-sync set to propose to the map, and the `in_sync_version` it is
    /// based on, if one is due: in-sync replicas lagging a waiting write by `lag_ms` leave,
    /// replicas that hold the whole log join. A proposal not yet settled is sent again as it
    /// is every `resend_ms`, whatever the replicas did since.
    pub fn propose_in_sync(&mut self, now_ms: u64) -> Option<(Vec<NodeId>, u64)> {
        if let Some(p) = &self.proposed {
            if now_ms.saturating_sub(self.proposed_ms) < self.resend_ms {
                return None;
            }
            self.proposed_ms = now_ms;
            return Some((p.iter().copied().collect(), self.isr_version));
        }
        let oldest = self.waiting.front().filter(|w| now_ms.saturating_sub(w.written_ms) >= self.lag_ms);
        let mut want = BTreeSet::new();
        let mut laggards = Vec::new();
        for (&id, f) in &self.followers {
            let lagging = oldest.is_some_and(|w| f.acked < w.lsn);
            let member = self.isr.contains(&id);
            if (member && !lagging) || (!member && f.acked >= self.last) {
                want.insert(id);
            } else if member {
                laggards.push(id);
            }
        }
        if want.len() < self.min_in_sync {
            // Not below the floor: the laggards stay.
            want.extend(laggards);
        }
        if want == self.isr {
            return None;
        }
        self.proposed = Some(want.clone());
        self.proposed_ms = now_ms;
        Some((want.into_iter().collect(), self.isr_version))
    }

    pub fn pos(&self) -> Pos {
        Pos { epoch: self.history.epoch_at(self.last).unwrap_or(0), lsn: self.last }
    }

    pub fn history(&self) -> &EpochHistory {
        &self.history
    }

    /// The retained log tail (what a primary stepping down keeps).
    pub fn log(&self) -> &VecDeque<Record<B>> {
        &self.log
    }

    /// Writes are accepted until `until_ms` (the cluster map's lease, counted from when the
    /// primary asked for it).
    pub fn grant_lease(&mut self, until_ms: u64) {
        self.lease_until_ms = self.lease_until_ms.max(until_ms);
    }

    /// Whether it may accept a write now.
    pub fn may_write(&self, now_ms: u64) -> bool {
        self.stepped_down.is_none() && now_ms < self.lease_until_ms
    }

    /// A newer epoch this primary learned of (it must stop), if any.
    pub fn stepped_down(&self) -> Option<Epoch> {
        self.stepped_down
    }

    /// Appends a write: its lsn. With `n` > 0 the write waits for `n` replicas (`token` names
    /// it in the `Outcome`s of `on_reply` and `tick`) until `deadline_ms`.
    pub fn write(
        &mut self,
        body: B,
        n: usize,
        token: u64,
        deadline_ms: u64,
        now_ms: u64,
    ) -> Result<Lsn, WriteRefused> {
        if let Some(current) = self.stepped_down {
            return Err(WriteRefused::SteppedDown { current });
        }
        if !self.may_write(now_ms) {
            return Err(WriteRefused::NoLease);
        }
        self.last += 1;
        self.history.note(self.epoch, self.last);
        self.log.push_back(Record { epoch: self.epoch, lsn: self.last, body });
        if n > 0 || (self.acks_in_sync && !self.required().is_empty()) {
            self.waiting.push_back(Waiting { lsn: self.last, written_ms: now_ms, token, n, deadline_ms });
        }
        Ok(self.last)
    }

    /// Whether the last write waits for replicas (its token will come back in an `Outcome`).
    pub fn last_waits(&self) -> bool {
        self.waiting.back().is_some_and(|w| w.lsn == self.last)
    }

    /// This node's own op log holds every record up to `lsn` durably (they may be shipped).
    pub fn synced(&mut self, lsn: Lsn) {
        self.durable = self.durable.max(lsn.min(self.last));
    }

    /// What to send now: each follower's unsent durable records (or a snapshot), and a
    /// heartbeat to any follower not sent to for `resend_ms`.
    pub fn outbox(&mut self, now_ms: u64) -> Vec<Out<B>> {
        let first = self.log.front().map_or(self.last + 1, |r| r.lsn);
        let durable = self.durable;
        let mut out = Vec::new();
        for (&id, f) in &mut self.followers {
            if let Some((_, sent)) = f.snapshot {
                if now_ms.saturating_sub(sent) < self.snapshot_retry_ms {
                    continue;
                }
                f.snapshot = None;
            }
            // Silence: send again from what it acked.
            if now_ms.saturating_sub(f.heard_ms) >= self.resend_ms
                && now_ms.saturating_sub(f.sent_ms) >= self.resend_ms
            {
                f.next = f.next.min(f.acked + 1);
            }
            let due = f.next <= durable || now_ms.saturating_sub(f.sent_ms) >= self.resend_ms;
            if !due {
                continue;
            }
            if f.next < first {
                out.push(Out::Snapshot(id));
                f.sent_ms = now_ms;
                f.snapshot = Some((durable, now_ms));
                // Sent from the snapshot's end on its ack.
                f.next = durable + 1;
                continue;
            }
            let from = (f.next - first) as usize;
            let room = durable.saturating_sub(f.next - 1).min(self.batch_max as u64) as usize;
            let records: Vec<Record<B>> = self.log.iter().skip(from).take(room).cloned().collect();
            let prev = f.next - 1;
            f.next += records.len() as u64;
            f.sent_ms = now_ms;
            out.push(Out::Send(id, ToReplica::Append { epoch: self.epoch, prev, records }));
        }
        out
    }

    /// A replica's answer: the writes it completed, and a message to send back (to `from`).
    pub fn on_reply(
        &mut self,
        from: NodeId,
        msg: ToPrimary,
        now_ms: u64,
    ) -> (Vec<Done>, Option<ToReplica<B, ()>>) {
        let Some(f) = self.followers.get_mut(&from) else { return (Vec::new(), None) };
        f.heard_ms = now_ms;
        match msg {
            ToPrimary::Refused { current } if current > self.epoch => {
                self.stepped_down = Some(current);
                (Vec::new(), None)
            }
            ToPrimary::Refused { .. } => (Vec::new(), None),
            ToPrimary::Ack { epoch, lsn } if epoch == self.epoch => {
                let lsn = lsn.min(self.last);
                f.acked = f.acked.max(lsn);
                // Any ack answers the snapshot: installed (up to its end), or not taken (the
                // replica said where it is instead); either way the normal flow resumes.
                f.snapshot = None;
                if f.next <= lsn {
                    f.next = lsn + 1;
                }
                (self.complete(now_ms), None)
            }
            // Sent before the snapshot arrived: it answers that.
            ToPrimary::Behind { epoch, have }
                if epoch == self.epoch && f.snapshot.is_some_and(|(upto, _)| have < upto) =>
            {
                (Vec::new(), None)
            }
            ToPrimary::Behind { epoch, have } if epoch == self.epoch => {
                f.next = have + 1;
                f.acked = f.acked.min(have);
                (Vec::new(), None)
            }
            ToPrimary::EpochEndQuery { epoch, last_epoch } if epoch == self.epoch => {
                f.snapshot = None;
                let end = self.history.end_of(last_epoch, self.last);
                (Vec::new(), Some(ToReplica::EpochEnd { epoch, asked: last_epoch, end }))
            }
            // Answers to an older epoch of this node's: stale.
            _ => (Vec::new(), None),
        }
    }

    /// Writes now held by enough replicas and by every in-sync one, in lsn order — only under
    /// the lease: an ack that
    /// arrives after it may come from a replica that has not yet heard of a newer epoch whose
    /// primary lacks the record (the record would then be cut), so such writes wait for a
    /// renewed lease or their deadline (`Indeterminate`). Found by the simulation: a paused
    /// primary, resumed, resent its last records to a replica that had not yet met the new
    /// primary, and answered them `Replicated`.
    fn complete(&mut self, now_ms: u64) -> Vec<(u64, Outcome)> {
        let mut done = Vec::new();
        if !self.may_write(now_ms) {
            return done;
        }
        let required = self.required();
        let mut i = 0;
        while i < self.waiting.len() {
            let w = &self.waiting[i];
            // Every in-sync replica, and at least `n` of them: an ack from a replica out of sync
            // does not count (a failover could not know to pick it).
            let all_in_sync =
                required.iter().all(|id| self.followers.get(id).is_some_and(|f| f.acked >= w.lsn));
            if required.len() >= w.n && all_in_sync {
                done.push((w.token, Outcome::Replicated));
                self.waiting.remove(i);
            } else {
                i += 1;
            }
        }
        self.trim();
        done
    }

    /// Time passes: writes held by enough replicas complete (under the lease), writes past their
    /// deadline are `Indeterminate`.
    pub fn tick(&mut self, now_ms: u64) -> Vec<(u64, Outcome)> {
        // Acks that came while the lease had lapsed count once it is renewed.
        let mut done = self.complete(now_ms);
        self.waiting.retain(|w| {
            let late = w.deadline_ms <= now_ms;
            if late {
                done.push((w.token, Outcome::Indeterminate));
            }
            !late
        });
        done
    }

    /// Drops log records every follower holds, and any beyond `retain_max` (those followers will
    /// need a snapshot).
    fn trim(&mut self) {
        let held = self.followers.values().map(|f| f.acked).min().unwrap_or(self.last);
        while let Some(r) = self.log.front()
            && (r.lsn <= held || self.log.len() > self.retain_max)
        {
            self.log.pop_front();
        }
    }

    /// Trims now (after writes without replicas to ack them).
    pub fn retain(&mut self) {
        self.trim();
    }

    /// Each follower's acked lsn (its lag is `pos().lsn` minus it).
    pub fn acked(&self) -> Vec<(NodeId, Lsn)> {
        self.followers.iter().map(|(id, f)| (*id, f.acked)).collect()
    }
}
