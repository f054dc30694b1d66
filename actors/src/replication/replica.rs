//! A replica of one shard: applies the primary's records in order, refuses older epochs, and
//! aligns its log with a new epoch's primary before applying anything from it (truncating what
//! that primary does not have: KIP-101/279). It decides; the caller applies (`Action`) to its
//! heap and op log, and acks only what is durable.
//!
//! Invariant: `last` is the lsn of the log's last record; `history` holds its epochs; once
//! `aligned` for `epoch`, the log is a prefix of that epoch's primary's log.

use super::{Epoch, EpochHistory, Lsn, Pos, Record, ToPrimary, ToReplica};

/// What the caller does to its log and state.
#[derive(Clone, Debug, PartialEq)]
pub enum Action<B, S> {
    /// Append and apply this record (the next lsn).
    Apply(Record<B>),
    /// Cut the log after `lsn` and undo what follows it.
    TruncateAfter(Lsn),
    /// Replace everything with this state, as of `upto`.
    Install { upto: Pos, state: S },
}

#[derive(Clone, Debug, Default)]
pub struct Replica {
    /// The highest epoch seen.
    pub epoch: Epoch,
    last: Lsn,
    history: EpochHistory,
    /// The log was aligned with `epoch`'s primary.
    aligned: bool,
    /// The caller made the log durable up to here (`synced`): acks never name more.
    durable: Lsn,
}

impl Replica {
    /// A replica over a log ending at `last` with `history` (a restart: not aligned with anyone).
    pub fn new(epoch: Epoch, last: Lsn, history: EpochHistory) -> Replica {
        // What a restart finds in the log is durable.
        Replica { epoch, last, history, aligned: false, durable: last }
    }

    /// The position of the log's last record.
    pub fn pos(&self) -> Pos {
        Pos { epoch: self.history.epoch_at(self.last).unwrap_or(0), lsn: self.last }
    }

    pub fn history(&self) -> &EpochHistory {
        &self.history
    }

    /// Starts over with an empty log (the caller could not undo a cut below a snapshot it
    /// installed): the primary then sends a snapshot and what follows.
    pub fn start_over(&mut self) {
        self.last = 0;
        self.durable = 0;
        self.history = EpochHistory::default();
        self.aligned = true;
    }

    /// The caller made its log durable up to `lsn` (its op log synced per its policy): the ack
    /// to send, if that acks more than before.
    pub fn synced(&mut self, lsn: Lsn) -> Option<ToPrimary> {
        let lsn = lsn.min(self.last);
        if lsn <= self.durable || !self.aligned {
            self.durable = self.durable.max(lsn);
            return None;
        }
        self.durable = lsn;
        Some(ToPrimary::Ack { epoch: self.epoch, lsn })
    }

    fn ack(&self) -> ToPrimary {
        ToPrimary::Ack { epoch: self.epoch, lsn: self.durable.min(self.last) }
    }

    /// Cuts the log after `lsn`.
    fn cut(&mut self, lsn: Lsn) -> Option<Lsn> {
        if lsn >= self.last {
            return None;
        }
        self.last = lsn;
        self.durable = self.durable.min(lsn);
        self.history.truncate_after(lsn);
        Some(lsn)
    }

    /// A newer epoch became known (from the cluster map): the log must be aligned with its
    /// primary before it applies anything from it.
    pub fn saw_epoch(&mut self, epoch: Epoch) {
        if epoch > self.epoch {
            self.epoch = epoch;
            self.aligned = false;
        }
    }

    /// One message from a primary: what to do, and the answer.
    pub fn on_message<B: Clone, S>(
        &mut self,
        msg: ToReplica<B, S>,
    ) -> (Vec<Action<B, S>>, Option<ToPrimary>) {
        match msg {
            ToReplica::Append { epoch, prev, records } => self.on_append(epoch, prev, records),
            ToReplica::EpochEnd { epoch, asked, end } => {
                if epoch != self.epoch || self.aligned || Some(asked) != self.history.last_epoch() {
                    // Not an answer to the query outstanding (a late one, or one from before a
                    // restart): acting on it could cut acked records.
                    return (Vec::new(), None);
                }
                let mut actions = Vec::new();
                match end.map(|(e, their_end)| (e, their_end, self.history.end_of(e, self.last))) {
                    // Both logs have epoch `e`: they agree up to the smaller of its two ends
                    // (one primary per epoch), and may differ after it.
                    Some((e, their_end, Some((mine, my_end)))) if mine == e => {
                        actions.extend(self.cut(their_end.min(my_end)).map(Action::TruncateAfter));
                        self.aligned = true;
                    }
                    // This log lacks epoch `e`: what follows its own largest epoch below `e`
                    // is in epochs the primary does not have. Cut it and ask again about that
                    // epoch (Kafka's fetcher does the same).
                    Some((_, _, Some((mine, my_end)))) => {
                        actions.extend(self.cut(my_end).map(Action::TruncateAfter));
                        return (actions, Some(ToPrimary::EpochEndQuery { epoch, last_epoch: mine }));
                    }
                    // Nothing in common.
                    Some((_, _, None)) | None => {
                        actions.extend(self.cut(0).map(Action::TruncateAfter));
                        self.aligned = true;
                    }
                }
                (actions, Some(self.ack()))
            }
            ToReplica::Snapshot { epoch, upto, history, state } => {
                if epoch < self.epoch {
                    return (Vec::new(), Some(ToPrimary::Refused { current: self.epoch }));
                }
                // Not newer than this log: overtaken by a newer snapshot or records (found by the
                // simulation), or from before a restart. Installing it could take back acked
                // records: ack, or align first.
                if epoch == self.epoch && self.aligned && upto.lsn <= self.last {
                    return (Vec::new(), Some(self.ack()));
                }
                if epoch == self.epoch
                    && !self.aligned
                    && upto.lsn < self.last
                    && let Some(last_epoch) = self.history.last_epoch()
                {
                    return (Vec::new(), Some(ToPrimary::EpochEndQuery { epoch, last_epoch }));
                }
                self.epoch = epoch;
                self.aligned = true;
                self.last = upto.lsn;
                // Durable once the caller installed it (`synced`).
                self.durable = 0;
                self.history = history;
                (vec![Action::Install { upto, state }], None)
            }
        }
    }

    fn on_append<B: Clone, S>(
        &mut self,
        epoch: Epoch,
        prev: Lsn,
        records: Vec<Record<B>>,
    ) -> (Vec<Action<B, S>>, Option<ToPrimary>) {
        if epoch < self.epoch {
            return (Vec::new(), Some(ToPrimary::Refused { current: self.epoch }));
        }
        self.saw_epoch(epoch);
        if !self.aligned {
            match self.history.last_epoch() {
                // Nothing to align: an empty log is a prefix of every log.
                None => self.aligned = true,
                Some(last_epoch) => {
                    return (Vec::new(), Some(ToPrimary::EpochEndQuery { epoch, last_epoch }));
                }
            }
        }
        if prev > self.last {
            return (Vec::new(), Some(ToPrimary::Behind { epoch, have: self.last }));
        }
        let mut actions = Vec::new();
        for r in records {
            // Records at or before `last` are already here (the log is aligned: the same ones).
            if r.lsn <= self.last {
                continue;
            }
            if r.lsn != self.last + 1 || r.epoch > epoch {
                break;
            }
            self.last = r.lsn;
            self.history.note(r.epoch, r.lsn);
            actions.push(Action::Apply(r));
        }
        // What is durable (the caller's `synced` acks the rest once it is).
        (actions, Some(self.ack()))
    }
}
