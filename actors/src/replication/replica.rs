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
}

impl Replica {
    /// A replica over a log ending at `last` with `history` (a restart: not aligned with anyone).
    pub fn new(epoch: Epoch, last: Lsn, history: EpochHistory) -> Replica {
        Replica { epoch, last, history, aligned: false }
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
        self.history = EpochHistory::default();
        self.aligned = true;
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
            ToReplica::EpochEnd { epoch, end } => {
                if epoch != self.epoch || self.aligned {
                    return (Vec::new(), None);
                }
                // The largest epoch both logs have, and the smaller of its two ends: after it the
                // logs may differ.
                let cut = match end {
                    Some((e, their_end)) => {
                        let mine = self.history.end_of(e, self.last).map_or(0, |(_, end)| end);
                        their_end.min(mine).min(self.last)
                    }
                    None => 0,
                };
                self.aligned = true;
                let mut actions = Vec::new();
                if cut < self.last {
                    self.last = cut;
                    self.history.truncate_after(cut);
                    actions.push(Action::TruncateAfter(cut));
                }
                (actions, Some(ToPrimary::Ack { epoch, lsn: self.last }))
            }
            ToReplica::Snapshot { epoch, upto, history, state } => {
                if epoch < self.epoch {
                    return (Vec::new(), Some(ToPrimary::Refused { current: self.epoch }));
                }
                if epoch == self.epoch && self.aligned && upto.lsn <= self.last {
                    // An older snapshot overtaken by a newer one (or by records): installing it
                    // would take back what this replica already acked. Found by the simulation.
                    return (Vec::new(), Some(ToPrimary::Ack { epoch, lsn: self.last }));
                }
                self.epoch = epoch;
                self.aligned = true;
                self.last = upto.lsn;
                self.history = history;
                (vec![Action::Install { upto, state }], Some(ToPrimary::Ack { epoch, lsn: self.last }))
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
        (actions, Some(ToPrimary::Ack { epoch, lsn: self.last }))
    }
}
