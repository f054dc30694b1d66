//! One node's replication endpoint for one shard: the shard's log (`ShardLog`, owned by the
//! caller's storage) and its role, `Primary` or `Replica`, switched by the cluster map and by
//! what replicas answer. It turns the messages, map updates, leases and ticks it is given into
//! `Effect`s for the caller to carry out (send, answer a write, propose an in-sync set); it does
//! no I/O and reads no clock, so the simulation (`sim.rs`) runs the same code a node will.
//!
//! Rules it keeps:
//! - A primary that restarted takes its epoch up again while the map still names it (it shipped
//!   only durable records, so its log extends every replica's); it writes only once the detector
//!   grants it a lease.
//! - A message of a newer epoch makes a primary a replica; one of an older epoch is answered
//!   `Refused` (its sender steps down).
//! - A cut below an installed snapshot cannot be undone: the log starts over and the primary is
//!   told (`Behind { have: 0 }`), which sends a snapshot.
//!
//! Invariant: the role's view of the log (last lsn, epochs) is the log's.

use std::collections::VecDeque;

use super::primary::{Done, Out, Primary, WriteRefused};
use super::replica::{Action, Replica};
use super::{Epoch, EpochHistory, Lsn, NodeId, Pos, Record, ToPrimary, ToReplica};
use crate::cluster::map::Placement;
use crate::error::GridError;

/// A shard's log as replication sees it: records after an optional installed snapshot.
pub trait ShardLog {
    type Body: Clone;
    type State: Clone;
    /// The lsn of the last record (or of the installed snapshot).
    fn last(&self) -> Lsn;
    /// The epochs of the log's records.
    fn history(&self) -> &EpochHistory;
    /// The records kept after the snapshot (what a new primary can ship).
    fn records(&self) -> VecDeque<Record<Self::Body>>;
    /// Appends the next record.
    fn append(&mut self, r: Record<Self::Body>) -> Result<(), GridError>;
    /// The caller's storage applied record `r` itself, as the log's last: keep it as `append`
    /// would have (a log whose storage never does so refuses it).
    fn wrote(&mut self, r: Record<Self::Body>) -> Result<(), GridError> {
        Err(GridError::Invalid(format!("record {}: this log applies records only itself", r.lsn)))
    }
    /// Cuts the log after `lsn`; false if it cannot (below an installed snapshot, or a log that
    /// cannot undo records): the endpoint then starts over from a snapshot.
    fn truncate_after(&mut self, lsn: Lsn) -> Result<bool, GridError>;
    /// Replaces everything with a snapshot's state.
    fn install(&mut self, upto: Pos, history: EpochHistory, state: Self::State) -> Result<(), GridError>;
    /// Empties the log.
    fn clear(&mut self) -> Result<(), GridError>;
    /// The state as of `last()`.
    fn snapshot(&self) -> Result<Self::State, GridError>;
}

/// What the caller does.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect<B, S> {
    /// Send to a replica.
    ToReplica(NodeId, ToReplica<B, S>),
    /// Send to a primary.
    ToPrimary(NodeId, ToPrimary),
    /// A `sync(n)` write ended.
    Done(Done),
    /// Propose the shard's in-sync set to the map (as primary of `epoch`), replacing the set of
    /// `in_sync_version` `based_on`.
    ProposeInSync { epoch: Epoch, based_on: u64, in_sync: Vec<NodeId> },
}

enum Role<B> {
    Primary(Box<Primary<B>>),
    Replica(Replica),
}

/// Tunables a new primary gets.
#[derive(Clone, Copy, Debug)]
pub struct PrimaryTuning {
    pub retain_max: usize,
    pub batch_max: usize,
    /// `Primary::acks_in_sync`.
    pub acks_in_sync: bool,
}

impl Default for PrimaryTuning {
    fn default() -> Self {
        PrimaryTuning { retain_max: 100_000, batch_max: 256, acks_in_sync: false }
    }
}

/// The endpoint of one shard on one node, over records of body `B`. The log is the caller's:
/// every method that reads or changes it takes it (so the shard's owner keeps its storage and
/// lends it for each call).
pub struct Endpoint<B> {
    pub id: NodeId,
    /// The highest epoch known (the caller persists it).
    pub epoch: Epoch,
    role: Role<B>,
    pub tuning: PrimaryTuning,
}

type Effects<L> = Vec<Effect<<L as ShardLog>::Body, (Pos, <L as ShardLog>::State)>>;

impl<B: Clone> Endpoint<B> {
    /// Node `id` over `log`, knowing `epoch`: a replica until the map says otherwise (also what
    /// a restart is).
    pub fn new<L: ShardLog<Body = B>>(id: NodeId, log: &L, epoch: Epoch) -> Endpoint<B> {
        let mut e =
            Endpoint { id, epoch, role: Role::Replica(Replica::default()), tuning: PrimaryTuning::default() };
        e.become_replica(log);
        e
    }

    /// A restart: the role is gone; the log and the epoch stay.
    pub fn restart<L: ShardLog<Body = B>>(&mut self, log: &L) {
        self.become_replica(log);
    }

    pub fn is_primary(&self) -> bool {
        matches!(self.role, Role::Primary(_))
    }

    /// The log's last position, as its role sees it.
    pub fn pos(&self) -> Pos {
        match &self.role {
            Role::Primary(p) => p.pos(),
            Role::Replica(r) => r.pos(),
        }
    }

    fn become_replica<L: ShardLog<Body = B>>(&mut self, log: &L) {
        let mut r = Replica::new(self.epoch, log.last(), log.history().clone());
        r.saw_epoch(self.epoch);
        self.role = Role::Replica(r);
    }

    fn become_primary<L: ShardLog<Body = B>>(&mut self, log: &L, map: &Placement, now_ms: u64) {
        let mut p =
            Primary::new(map.epoch, log.last(), log.history().clone(), log.records(), &map.replicas, now_ms);
        p.retain_max = self.tuning.retain_max;
        p.batch_max = self.tuning.batch_max;
        p.acks_in_sync = self.tuning.acks_in_sync;
        p.set_in_sync(&map.in_sync, map.in_sync_version);
        p.min_in_sync = map.sync as usize;
        self.role = Role::Primary(Box::new(p));
    }

    /// The map's placement of this shard.
    pub fn on_map<L: ShardLog<Body = B>>(&mut self, log: &L, map: &Placement, now_ms: u64) {
        if map.epoch == self.epoch
            && let Role::Primary(p) = &mut self.role
        {
            p.set_replicas(&map.replicas, now_ms);
            p.set_in_sync(&map.in_sync, map.in_sync_version);
            p.min_in_sync = map.sync as usize;
        }
        let resume = map.epoch == self.epoch && map.primary == self.id && !self.is_primary();
        if map.epoch < self.epoch || (map.epoch == self.epoch && !resume) {
            return;
        }
        self.epoch = map.epoch;
        if map.primary == self.id {
            self.become_primary(log, map, now_ms);
        } else {
            match &mut self.role {
                Role::Replica(r) => r.saw_epoch(map.epoch),
                Role::Primary(_) => self.become_replica(log),
            }
        }
    }

    /// A lease from the detector for `epoch`.
    pub fn on_lease(&mut self, epoch: Epoch, until_ms: u64) {
        if let Role::Primary(p) = &mut self.role
            && p.epoch == epoch
        {
            p.grant_lease(until_ms);
        }
    }

    /// A write (as primary): appended to the log; the caller calls `synced` once it is durable.
    /// Its lsn and epoch.
    pub fn write<L: ShardLog<Body = B>>(
        &mut self,
        log: &mut L,
        body: B,
        n: usize,
        token: u64,
        deadline_ms: u64,
        now_ms: u64,
    ) -> Result<Result<(Lsn, Epoch), WriteRefused>, GridError> {
        let (record, epoch) = match self.record(body, n, token, deadline_ms, now_ms) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let lsn = record.lsn;
        log.append(record)?;
        Ok(Ok((lsn, epoch)))
    }

    /// Whether the last write (as primary) waits for replicas: its token comes back in an
    /// `Effect::Done`.
    pub fn last_waits(&self) -> bool {
        matches!(&self.role, Role::Primary(p) if p.last_waits())
    }

    /// Whether a write may be made now (as primary, under a lease): checked before a storage
    /// that applies writes itself applies one (`written`).
    pub fn may_write(&self, now_ms: u64) -> Result<Epoch, WriteRefused> {
        match &self.role {
            Role::Primary(p) if p.may_write(now_ms) => Ok(p.epoch),
            Role::Primary(p) => match p.stepped_down() {
                Some(current) => Err(WriteRefused::SteppedDown { current }),
                None => Err(WriteRefused::NoLease),
            },
            Role::Replica(_) => Err(WriteRefused::SteppedDown { current: self.epoch }),
        }
    }

    /// A write (as primary) the caller's storage already applied as the log's next record:
    /// recorded for shipping as `write` would, and kept by the log (`ShardLog::wrote`). The
    /// caller checked `may_write` first, in the same step.
    pub fn written<L: ShardLog<Body = B>>(
        &mut self,
        log: &mut L,
        body: B,
        n: usize,
        token: u64,
        deadline_ms: u64,
        now_ms: u64,
    ) -> Result<Result<(Lsn, Epoch), WriteRefused>, GridError> {
        let (record, epoch) = match self.record(body, n, token, deadline_ms, now_ms) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let lsn = record.lsn;
        log.wrote(record)?;
        Ok(Ok((lsn, epoch)))
    }

    /// The primary's side of a write: the record it ships (for the log to keep) and its epoch.
    fn record(
        &mut self,
        body: B,
        n: usize,
        token: u64,
        deadline_ms: u64,
        now_ms: u64,
    ) -> Result<(Record<B>, Epoch), WriteRefused> {
        let Role::Primary(p) = &mut self.role else {
            return Err(WriteRefused::SteppedDown { current: self.epoch });
        };
        p.write(body, n, token, deadline_ms, now_ms)?;
        let record = p.log().back().expect("just written").clone();
        if n == 0 {
            p.retain();
        }
        Ok((record, p.epoch))
    }

    /// The log is durable up to `lsn`: a primary may ship it, a replica acks it.
    pub fn synced<L: ShardLog<Body = B>>(&mut self, lsn: Lsn, primary: Option<NodeId>) -> Effects<L> {
        match &mut self.role {
            Role::Primary(p) => {
                p.synced(lsn);
                Vec::new()
            }
            Role::Replica(r) => match (r.synced(lsn), primary) {
                (Some(ack), Some(to)) => vec![Effect::ToPrimary(to, ack)],
                _ => Vec::new(),
            },
        }
    }

    /// Time passes (as primary: what to ship, writes past their deadline, in-sync proposals).
    /// `Err`: the log could not be read for a snapshot.
    pub fn tick<L: ShardLog<Body = B>>(&mut self, log: &L, now_ms: u64) -> Result<Effects<L>, GridError> {
        let Role::Primary(p) = &mut self.role else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        let mut snapshots = Vec::new();
        for o in p.outbox(now_ms) {
            match o {
                Out::Send(to, m) => out.extend(m.carry().map(|m| Effect::ToReplica(to, m))),
                Out::Snapshot(to) => snapshots.push(to),
            }
        }
        out.extend(p.tick(now_ms).into_iter().map(Effect::Done));
        if let Some((in_sync, based_on)) = p.propose_in_sync(now_ms) {
            out.push(Effect::ProposeInSync { epoch: p.epoch, based_on, in_sync });
        }
        let epoch = p.epoch;
        for to in snapshots {
            let last = log.last();
            let history = log.history().clone();
            let upto = Pos { epoch: history.epoch_at(last).unwrap_or(0), lsn: last };
            let state = (upto, log.snapshot()?);
            out.push(Effect::ToReplica(to, ToReplica::Snapshot { epoch, upto, history, state }));
        }
        Ok(out)
    }

    /// A message from a primary.
    pub fn on_replica_msg<L: ShardLog<Body = B>>(
        &mut self,
        log: &mut L,
        from: NodeId,
        m: ToReplica<B, (Pos, L::State)>,
    ) -> Result<Effects<L>, GridError> {
        let epoch_of = match &m {
            ToReplica::Append { epoch, .. }
            | ToReplica::EpochEnd { epoch, .. }
            | ToReplica::Snapshot { epoch, .. } => *epoch,
        };
        if let Role::Primary(p) = &self.role {
            if epoch_of > p.epoch {
                self.epoch = self.epoch.max(epoch_of);
                self.become_replica(log);
            } else if epoch_of < p.epoch {
                let current = self.epoch.max(p.epoch);
                return Ok(vec![Effect::ToPrimary(from, ToPrimary::Refused { current })]);
            } else {
                return Ok(Vec::new());
            }
        }
        let Role::Replica(r) = &mut self.role else { return Ok(Vec::new()) };
        let (actions, reply) = r.on_message(m);
        self.epoch = self.epoch.max(r.epoch);
        for a in actions {
            match a {
                Action::Apply(rec) => {
                    debug_assert_eq!(rec.lsn, log.last() + 1, "a gap");
                    log.append(rec)?;
                }
                Action::TruncateAfter(lsn) => {
                    if !log.truncate_after(lsn)? {
                        // The log cannot undo it: start over from a snapshot.
                        log.clear()?;
                        if let Role::Replica(r) = &mut self.role {
                            r.start_over();
                        }
                        let epoch = self.epoch;
                        return Ok(vec![Effect::ToPrimary(from, ToPrimary::Behind { epoch, have: 0 })]);
                    }
                }
                Action::Install { upto, state } => {
                    let history = match &self.role {
                        Role::Replica(r) => r.history().clone(),
                        Role::Primary(_) => EpochHistory::default(),
                    };
                    log.install(upto, history, state.1)?;
                }
            }
        }
        Ok(reply.map(|r| vec![Effect::ToPrimary(from, r)]).unwrap_or_default())
    }

    /// A message from a replica.
    pub fn on_primary_msg<L: ShardLog<Body = B>>(
        &mut self,
        log: &L,
        from: NodeId,
        m: ToPrimary,
        now_ms: u64,
    ) -> Effects<L> {
        let Role::Primary(p) = &mut self.role else { return Vec::new() };
        let (done, back) = p.on_reply(from, m, now_ms);
        let mut out: Effects<L> = done.into_iter().map(Effect::Done).collect();
        if let Some(b) = back.and_then(ToReplica::carry) {
            out.push(Effect::ToReplica(from, b));
        }
        if let Some(current) = p.stepped_down() {
            self.epoch = self.epoch.max(current);
            self.become_replica(log);
        }
        out
    }
}
