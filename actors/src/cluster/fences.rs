//! Fences across a cluster (shared LOCKS.md, "Fenced writes": in a cluster the lock service
//! pushes each new fence to the guarded shards before answering the grant). Every node's shards
//! check fenced writes against their node's `FenceTable`; on the node that serves the locks it
//! is the lock service's own, on every other node it is a **mirror** kept by this protocol.
//!
//! Peer frames: `FENCE_FRAME`, then postcard `FenceWire`.
//! - A node that does not serve the locks asks the lock service's primary every `ASK_EVERY_MS`:
//!   `Ask { epoch, seq, asked_ms }`: where its mirror is, and a lease asked at `asked_ms` of its
//!   own clock. It asks at once after applying changes (that is its ack) or seeing a gap.
//! - The primary answers with what the mirror lacks (`Changes` after its seq, or the whole table,
//!   `after: None`, when the mirror is of another epoch or behind what the primary keeps), then
//!   `Lease { epoch, seq, asked_ms }`. A mirror that holds that `(epoch, seq)` answers fenced
//!   writes until `asked_ms + MIRROR_VALID_MS` of its clock (`FenceTable::set_valid_until`), and
//!   refuses them after (an unheld lock's answer: `StaleFence` with no current fence).
//! - Each change of the primary's table (a grant, a release, an expiry, an idle lock leaving
//!   memory) takes the next seq and goes to every mirror holding a lease at once; a mirror
//!   applies changes in seq order only.
//! - The lock service answers nothing that follows change `s` until every mirror holding a
//!   lease acked `s` or its lease ran out (`FenceFanout::cleared`). The primary counts a
//!   mirror's lease as `MIRROR_LEASE_MS` from the arrival of its `Ask`; the mirror counted the
//!   shorter `MIRROR_VALID_MS` from before it sent it, so the primary's bound is the later one.
//!
//! What it promises: once a grant is answered, no node accepts a write fenced with an earlier
//! grant of that lock (its mirror holds the new grant, or is not current). Every change holds
//! the answers after it the same way, a release's own included; an expiry answers nobody, so
//! a node may accept the former holder's write until its mirror learns of the expiry (a round
//! trip), never after the next grant of the lock was answered. A new primary of the lock service (a failover) starts a new epoch,
//! and every mirror takes its whole table before it answers again.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::lock::fence::FenceTable;
use crate::replication::NodeId;

/// The first byte of a fence frame.
pub const FENCE_FRAME: u8 = b'F';
/// How often a mirror asks the lock service's primary (and renews its lease).
pub const ASK_EVERY_MS: u64 = 200;
/// How long a mirror answers after asking, by its clock.
pub const MIRROR_VALID_MS: u64 = 800;
/// How long the primary counts a mirror's lease from its `Ask`'s arrival.
pub const MIRROR_LEASE_MS: u64 = 1_000;
/// Changes the primary keeps for mirrors behind (one further behind gets the whole table).
pub const CHANGES_KEPT: usize = 10_000;

/// One lock's change: its `(fence, held)`, or `None`: its cell was forgotten (an idle lock).
pub type Change = (String, Option<(u64, bool)>);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FenceWire {
    /// Mirror → primary: its `(epoch, seq)`, and a lease asked at `asked_ms` (its clock).
    Ask { epoch: u64, seq: u64, asked_ms: u64 },
    /// Primary → mirror: the changes after `after` up to `upto` (`after: None`: the whole table).
    Changes { epoch: u64, after: Option<u64>, upto: u64, changes: Vec<Change> },
    /// Primary → mirror: a mirror at `(epoch, seq)` or later answers until `asked_ms` + `MIRROR_VALID_MS`.
    Lease { epoch: u64, seq: u64, asked_ms: u64 },
}

impl FenceWire {
    pub fn encode(&self) -> Option<Vec<u8>> {
        let mut out = vec![FENCE_FRAME];
        postcard::to_io(self, &mut out).ok()?;
        Some(out)
    }

    /// The frame in `bytes` (after its channel byte).
    pub fn decode(bytes: &[u8]) -> Option<FenceWire> {
        postcard::from_bytes(bytes).ok()
    }
}

/// Milliseconds on the process's monotonic clock (what mirrors' validity is counted on).
pub fn now_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64
}

#[derive(Clone, Copy, Debug)]
struct Mirror {
    /// The last seq it holds (as it said).
    acked: u64,
    /// Its lease ends before this (the primary's clock).
    lease_end_ms: u64,
}

/// The lock service primary's side: the changes of its table, in seq order, and what each
/// mirror holds. Pure: time is an argument, and it returns the frames to send.
#[derive(Debug)]
pub struct FenceFanout {
    epoch: u64,
    seq: u64,
    kept: VecDeque<(u64, Change)>,
    mirrors: BTreeMap<NodeId, Mirror>,
}

impl FenceFanout {
    /// The fanout of a primary in `epoch` (the lock epoch: every primary's is another).
    pub fn new(epoch: u64) -> FenceFanout {
        FenceFanout { epoch, seq: 0, kept: VecDeque::new(), mirrors: BTreeMap::new() }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The last change's seq.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// A change of the table: its seq, and the frames for the mirrors holding a lease.
    pub fn changed(&mut self, change: Change, now_ms: u64) -> (u64, Vec<(NodeId, FenceWire)>) {
        self.seq += 1;
        let seq = self.seq;
        let mut out = Vec::new();
        for (&id, m) in &self.mirrors {
            if m.lease_end_ms > now_ms {
                let w = FenceWire::Changes {
                    epoch: self.epoch,
                    after: Some(seq - 1),
                    upto: seq,
                    changes: vec![change.clone()],
                };
                out.push((id, w));
            }
        }
        self.kept.push_back((seq, change));
        while self.kept.len() > CHANGES_KEPT {
            self.kept.pop_front();
        }
        (seq, out)
    }

    /// An `Ask` from mirror `from`: the frames to send it back. `table` is the whole table now
    /// (read only when the mirror needs all of it).
    pub fn on_ask(
        &mut self,
        from: NodeId,
        (epoch, seq, asked_ms): (u64, u64, u64),
        now_ms: u64,
        table: impl FnOnce() -> Vec<(String, u64, bool)>,
    ) -> Vec<FenceWire> {
        let ours = epoch == self.epoch && seq <= self.seq;
        let m = self.mirrors.entry(from).or_insert(Mirror { acked: 0, lease_end_ms: 0 });
        m.lease_end_ms = now_ms + MIRROR_LEASE_MS;
        m.acked = if ours { seq } else { 0 };
        let mut out = Vec::new();
        let kept_from = self.kept.front().map_or(self.seq + 1, |(s, _)| *s);
        if !ours || seq + 1 < kept_from {
            let changes = table().into_iter().map(|(n, f, h)| (n, Some((f, h)))).collect();
            out.push(FenceWire::Changes { epoch: self.epoch, after: None, upto: self.seq, changes });
        } else if seq < self.seq {
            let changes = self.kept.iter().filter(|(s, _)| *s > seq).map(|(_, c)| c.clone()).collect();
            out.push(FenceWire::Changes { epoch: self.epoch, after: Some(seq), upto: self.seq, changes });
        }
        out.push(FenceWire::Lease { epoch: self.epoch, seq: self.seq, asked_ms });
        out
    }

    /// The last seq every mirror still holding a lease has: an answer that follows a later
    /// change waits.
    pub fn cleared(&self, now_ms: u64) -> u64 {
        self.mirrors
            .values()
            .filter(|m| m.lease_end_ms > now_ms)
            .map(|m| m.acked)
            .min()
            .map_or(self.seq, |a| a.min(self.seq))
    }

    /// Mirrors whose lease ended are forgotten (they ask again, and get the whole table).
    pub fn prune(&mut self, now_ms: u64) {
        self.mirrors.retain(|_, m| m.lease_end_ms > now_ms);
    }
}

/// A node's mirror of the lock service's table: its own `FenceTable`, which its shards check.
#[derive(Debug)]
pub struct FenceMirror {
    epoch: u64,
    seq: u64,
    table: Arc<FenceTable>,
}

impl FenceMirror {
    /// A mirror over `table` (not current until the primary's first lease).
    pub fn new(table: Arc<FenceTable>) -> FenceMirror {
        FenceMirror { epoch: 0, seq: 0, table }
    }

    /// What it asks the primary now (at `now_ms` of its clock).
    pub fn ask(&self, now_ms: u64) -> FenceWire {
        FenceWire::Ask { epoch: self.epoch, seq: self.seq, asked_ms: now_ms }
    }

    /// A frame from the lock service's primary; whether to ask again now (it applied changes:
    /// an ack; or it saw a gap).
    pub fn on_wire(&mut self, w: FenceWire) -> bool {
        match w {
            FenceWire::Changes { epoch, .. } if epoch < self.epoch => false,
            FenceWire::Changes { epoch, after: None, upto, changes } => {
                self.table.set_valid_until(0);
                self.table.reset();
                for (name, c) in changes {
                    if let Some((fence, held)) = c {
                        self.table.cell(&name).publish(fence, held);
                    }
                }
                (self.epoch, self.seq) = (epoch, upto);
                true
            }
            FenceWire::Changes { epoch, after: Some(after), upto, changes }
                if epoch == self.epoch && after == self.seq =>
            {
                for (name, c) in changes {
                    match c {
                        Some((fence, held)) => self.table.cell(&name).publish(fence, held),
                        None => self.table.forget(&name),
                    }
                }
                self.seq = upto;
                true
            }
            // A gap, or a new epoch's changes before its table: ask (the primary sends what
            // is missing).
            FenceWire::Changes { .. } => true,
            FenceWire::Lease { epoch, seq, asked_ms } if epoch == self.epoch && self.seq >= seq => {
                self.table.set_valid_until(asked_ms + MIRROR_VALID_MS);
                false
            }
            FenceWire::Lease { .. } | FenceWire::Ask { .. } => false,
        }
    }

    /// This node serves the locks now, or stopped: the mirror starts over (the lock service
    /// sets its own table's validity).
    pub fn forget(&mut self) {
        (self.epoch, self.seq) = (0, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror() -> (FenceMirror, Arc<FenceTable>) {
        let t = Arc::new(FenceTable::with_clock(now_ms));
        t.set_valid_until(0);
        (FenceMirror::new(t.clone()), t)
    }

    /// Delivers what the primary answers an ask, as the transport would; whether the mirror
    /// asked again.
    fn exchange(
        p: &mut FenceFanout,
        m: &mut FenceMirror,
        from: NodeId,
        now: u64,
        table: &FenceTable,
    ) -> bool {
        let FenceWire::Ask { epoch, seq, asked_ms } = m.ask(now) else { unreachable!() };
        let mut again = false;
        for w in p.on_ask(from, (epoch, seq, asked_ms), now, || table.snapshot()) {
            again |= m.on_wire(w);
        }
        again
    }

    #[test]
    fn a_mirror_answers_only_once_it_holds_the_primary_s_table_under_a_lease() {
        let primary = FenceTable::default();
        primary.cell("a").publish(5, true);
        let mut p = FenceFanout::new(3);
        p.changed(("a".into(), Some((5, true))), 0);
        let (mut m, t) = mirror();
        assert!(t.check("a", 5).is_err(), "a mirror never synced answered");
        assert!(exchange(&mut p, &mut m, 2, now_ms(), &primary), "the whole table is acked by asking");
        assert!(t.check("a", 5).is_ok());
        assert!(t.check("a", 4).is_err());
        // Its lease is what it asked for: from long ago, it has run out.
        t.set_valid_until(0);
        assert!(t.check("a", 5).is_err(), "an expired mirror answered");
    }

    #[test]
    fn a_grant_waits_for_every_leased_mirror_or_its_lease_end() {
        let primary = FenceTable::default();
        let mut p = FenceFanout::new(1);
        let (mut m2, t2) = mirror();
        let (mut m3, _t3) = mirror();
        let b = now_ms();
        exchange(&mut p, &mut m2, 2, b, &primary);
        exchange(&mut p, &mut m3, 3, b, &primary);
        assert_eq!(p.cleared(b + 10), 0);
        // A grant: sent to both; cleared only once both acked.
        let (seq, sends) = p.changed(("job".into(), Some((7, true))), b + 10);
        assert_eq!(seq, 1);
        assert_eq!(sends.len(), 2);
        assert!(p.cleared(b + 10) < seq);
        for (to, w) in sends {
            let m = if to == 2 { &mut m2 } else { &mut m3 };
            assert!(m.on_wire(w), "applied changes are acked by asking");
            if to == 2 {
                exchange(&mut p, &mut m2, 2, b + 20, &primary);
            }
        }
        assert!(t2.check("job", 7).is_ok());
        assert!(p.cleared(b + 20) < seq, "node 3 has not acked");
        // Node 3 never acks: its lease (from its ask at b) ends at b + MIRROR_LEASE_MS.
        assert!(p.cleared(b + MIRROR_LEASE_MS - 1) < seq);
        assert_eq!(p.cleared(b + MIRROR_LEASE_MS), seq);
    }

    #[test]
    fn a_mirror_skips_nothing_a_gap_or_a_stale_epoch_is_refused_and_repaired() {
        let primary = FenceTable::default();
        let mut p = FenceFanout::new(4);
        let (mut m, t) = mirror();
        exchange(&mut p, &mut m, 2, 0, &primary);
        primary.cell("a").publish(1, true);
        let (_, first) = p.changed(("a".into(), Some((1, true))), 1);
        primary.cell("a").publish(1, false);
        let (_, second) = p.changed(("a".into(), Some((1, false))), 2);
        // The first is lost: the second is a gap, not applied; asking repairs it.
        assert!(m.on_wire(second[0].1.clone()));
        assert_eq!(t.current("a"), (0, false));
        exchange(&mut p, &mut m, 2, 3, &primary);
        assert_eq!(t.current("a"), (1, false));
        drop(first);
        // A frame of an older epoch (a former primary's) changes nothing.
        let old = FenceWire::Changes {
            epoch: 3,
            after: None,
            upto: 9,
            changes: vec![("a".into(), Some((9, true)))],
        };
        assert!(!m.on_wire(old));
        assert_eq!(t.current("a"), (1, false));
        // A new epoch (a new primary): the whole table replaces the mirror's.
        let mut p2 = FenceFanout::new(5);
        let fresh = FenceTable::default();
        fresh.cell("b").publish(2, true);
        exchange(&mut p2, &mut m, 2, 4, &fresh);
        assert_eq!(t.current("a"), (0, false));
        assert_eq!(t.current("b"), (2, true));
    }

    #[test]
    fn a_mirror_too_far_behind_gets_the_whole_table() {
        let primary = FenceTable::default();
        let mut p = FenceFanout::new(1);
        let (mut m, t) = mirror();
        exchange(&mut p, &mut m, 2, 0, &primary);
        for i in 1..=(CHANGES_KEPT as u64 + 5) {
            primary.cell("x").publish(i, true);
            p.changed(("x".into(), Some((i, true))), 1);
        }
        exchange(&mut p, &mut m, 2, 2, &primary);
        assert_eq!(t.current("x"), (CHANGES_KEPT as u64 + 5, true));
    }
}
