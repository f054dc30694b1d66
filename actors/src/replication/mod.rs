//! Replication of one shard by shipping its op-log records (shared CLUSTER.md, "Data plane"):
//! the pure state machines of the primary (`primary.rs`) and of a replica (`replica.rs`), the
//! epoch history both keep (here), and the messages between them. Time is an argument; nothing
//! here does I/O, so a seeded simulation (`sim.rs`, in `cargo test`) runs them through delays,
//! drops, crashes, pauses and failovers. Not yet wired to the shard actors, the transport or the
//! cluster map (issue 15 is open).
//!
//! - Every record carries `(epoch, lsn)`: `lsn` counts the shard's records (1, 2, 3, ...), and
//!   `epoch` is the primary's term, raised by the cluster map at each failover. One primary per
//!   epoch.
//! - The primary ships records in order; a replica applies them in order and acks the last lsn it
//!   holds durably. A `sync(n)` write is answered when `n` replicas acked it, or `Indeterminate`
//!   at its deadline (no rollback).
//! - A replica refuses a lower epoch (`Refused`: the sender steps down). A replica that meets a
//!   new epoch first aligns its log with the new primary (Kafka KIP-101/279): it asks for the end
//!   of its last epoch in the primary's history and truncates what the primary does not have.
//! - The primary retains a bounded tail of its log; a replica behind it gets a snapshot.
//!
//! Invariant: a log's records have strictly increasing lsns with no gap, and non-decreasing
//! epochs; `EpochHistory` holds the first lsn of every epoch in it.

pub mod endpoint;
pub mod heap_log;
pub mod primary;
pub mod replica;
pub mod service;
pub mod shard;

#[cfg(test)]
mod sim;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub type Epoch = u64;
pub type Lsn = u64;
pub type NodeId = u64;

/// A record's place: its epoch, then its lsn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Pos {
    pub epoch: Epoch,
    pub lsn: Lsn,
}

/// One op-log record as shipped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record<B> {
    pub epoch: Epoch,
    pub lsn: Lsn,
    pub body: B,
}

/// Which epochs a log's records were written in: the first lsn of each (Kafka's leader-epoch
/// cache).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochHistory {
    starts: BTreeMap<Epoch, Lsn>,
}

impl EpochHistory {
    /// Notes record `lsn` of `epoch` (appended at the end of the log).
    pub fn note(&mut self, epoch: Epoch, lsn: Lsn) {
        debug_assert!(self.last_epoch().is_none_or(|e| e <= epoch), "epochs go down in a log");
        self.starts.entry(epoch).or_insert(lsn);
    }

    /// The epoch of the log's last record, if any.
    pub fn last_epoch(&self) -> Option<Epoch> {
        self.starts.keys().next_back().copied()
    }

    /// The largest epoch at or below `epoch` and the last lsn written in it (the lsn before the
    /// next epoch's first, or `last` for the newest) — what a replica aligning its log asks the
    /// primary (KIP-279). `None`: no record of any such epoch.
    pub fn end_of(&self, epoch: Epoch, last: Lsn) -> Option<(Epoch, Lsn)> {
        let (&e, _) = self.starts.range(..=epoch).next_back()?;
        let end = match self.starts.range(e + 1..).next() {
            Some((_, &next_start)) => next_start - 1,
            None => last,
        };
        Some((e, end))
    }

    /// Forgets the epochs of records after `lsn` (the log was cut there).
    pub fn truncate_after(&mut self, lsn: Lsn) {
        self.starts.retain(|_, start| *start <= lsn);
    }

    /// The epoch record `lsn` was written in, if the log has it (`lsn` ≤ its last).
    pub fn epoch_at(&self, lsn: Lsn) -> Option<Epoch> {
        self.starts.iter().rev().find(|(_, s)| **s <= lsn).map(|(e, _)| *e)
    }
}

/// What the primary sends a replica.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToReplica<B, S> {
    /// Records `prev + 1 ..` (possibly none: a heartbeat) of `epoch`.
    Append { epoch: Epoch, prev: Lsn, records: Vec<Record<B>> },
    /// The answer to `EpochEndQuery`: the largest epoch at or below the one asked about in the
    /// primary's history, and its last lsn (`None`: the primary has nothing that old).
    /// `asked` is the `last_epoch` of the query it answers (a replica ignores an answer to a
    /// query it no longer has).
    EpochEnd { epoch: Epoch, asked: Epoch, end: Option<(Epoch, Lsn)> },
    /// The shard's state as of `upto`, for a replica behind the retained log.
    Snapshot { epoch: Epoch, upto: Pos, history: EpochHistory, state: S },
}

impl<B> ToReplica<B, ()> {
    /// The same message typed for a channel that also carries snapshots of state `S` (`None`
    /// for a snapshot, which the primary's `Out::Snapshot` asks the caller to build instead).
    pub fn carry<S>(self) -> Option<ToReplica<B, S>> {
        match self {
            ToReplica::Append { epoch, prev, records } => Some(ToReplica::Append { epoch, prev, records }),
            ToReplica::EpochEnd { epoch, asked, end } => Some(ToReplica::EpochEnd { epoch, asked, end }),
            ToReplica::Snapshot { .. } => None,
        }
    }
}

/// What a replica answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToPrimary {
    /// It holds every record up to `lsn` durably.
    Ack { epoch: Epoch, lsn: Lsn },
    /// The sender's epoch is below `current`: it is no longer the primary.
    Refused { current: Epoch },
    /// Its log ends at `have`, before the records sent: send from `have + 1`.
    Behind { epoch: Epoch, have: Lsn },
    /// It met `epoch`'s primary for the first time: where does its own last epoch `last_epoch`
    /// end in the primary's history?
    EpochEndQuery { epoch: Epoch, last_epoch: Epoch },
}

#[cfg(test)]
mod tests;
