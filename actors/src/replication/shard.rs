//! A table shard's replication in a cluster, kept by its shard actor: the `Endpoint` of the
//! shard on this node and the `ReplState` beside its heap, lent the shard's heap for each call
//! (`HeapLog::lend`).
//!
//! - As primary (the map names this node and the Raft leader's detector granted a lease), every
//!   client request first checks the lease (`admit`); the heap's tap then hands over each batch
//!   the request committed (`written`), recorded for shipping; the request's answer is held
//!   (`hold`) until the gate released it (locally written, and synced under `always`) *and* the
//!   `sync(n)` replicas acked its last record, or answered `Indeterminate` at the deadline.
//! - As replica, it refuses client requests (`NotPrimary`, naming the primary) and applies what
//!   the primary ships, acking what its heap holds (synced first under `always`).
//! - Records ship once the op log has them (`synced` after each flush and on every tick).
//! - Every `heartbeat_ms` it reports its position to every member of the map (each node's
//!   detector hears it, so a new Raft leader knows who fell silent when); the leader answers a
//!   primary with a lease (`ReplWire::Lease`).
//!
//! Frames: `REPL_FRAME`, then postcard `ReplFrame { table, shard, wire }`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use heapgrid_heap::{FsyncPolicy, Heap};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::endpoint::{Effect, Endpoint, ShardLog};
use super::heap_log::{HeapLog, ReplState};
use super::primary::{Outcome, WriteRefused};
use super::{Epoch, NodeId, Pos, ToPrimary, ToReplica};
use crate::cluster::map::{ClusterMap, MapCmd, Placement};
use crate::cluster::transport::Transport;
use crate::error::GridError;
use crate::gate::{Answer, Deferred};

/// The first byte of a replication frame.
pub const REPL_FRAME: u8 = b'R';
/// Map changes proposed by the node's primaries and not yet taken by the data plane.
pub const PROPOSALS_MAX: usize = 1024;
/// How long a `sync(n)` write waits for its replicas before it is `Indeterminate`.
pub const SYNC_DEADLINE_MS: u64 = 2_000;
/// How often a replicated shard actor ticks (ships, resends, checks deadlines).
pub const REPL_TICK: Duration = Duration::from_millis(10);

type State = Vec<(Vec<u8>, Vec<u8>)>;

/// What travels between the shards of one table shard on different nodes, and to the leader.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ReplWire {
    Rep(ToReplica<Vec<u8>, (Pos, State)>),
    Prim(ToPrimary),
    /// A shard's position, to every node's detector (the Raft leader's grants leases).
    Status {
        pos: Pos,
        epoch: Epoch,
        primary: bool,
        /// A primary holding a lease now (it serves).
        serving: bool,
        sent_ms: u64,
    },
    /// The detector's lease for the primary of `epoch`, until `until_ms` of the primary's clock.
    Lease {
        epoch: Epoch,
        until_ms: u64,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplFrame {
    pub table: String,
    pub shard: u32,
    pub wire: ReplWire,
}

impl ReplFrame {
    pub fn encode(&self) -> Option<Vec<u8>> {
        let mut out = vec![REPL_FRAME];
        postcard::to_io(self, &mut out).ok()?;
        Some(out)
    }

    /// The frame in `bytes` (after its channel byte).
    pub fn decode(bytes: &[u8]) -> Option<ReplFrame> {
        postcard::from_bytes(bytes).ok()
    }
}

/// The node's side of replication, shared by its shard actors.
pub struct ReplNet {
    pub me: NodeId,
    pub transport: Arc<dyn Transport>,
    /// The cluster map as this node applied it.
    pub map: watch::Receiver<ClusterMap>,
    /// Map changes a primary proposes (in-sync sets; at most `PROPOSALS_MAX` waiting: a
    /// primary proposes again every `resend_ms` until its change is committed, so one dropped
    /// when the queue is full is not lost).
    pub proposals: mpsc::Sender<MapCmd>,
    pub origin: std::time::Instant,
    pub heartbeat_ms: u64,
    /// Records a primary keeps in memory for replicas behind (one further behind gets a
    /// snapshot).
    pub retain_records: usize,
}

impl ReplNet {
    pub fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    fn send(&self, to: NodeId, table: &str, shard: u32, wire: ReplWire) {
        if let Some(b) = (ReplFrame { table: table.to_string(), shard, wire }).encode() {
            self.transport.send(to, b);
        }
    }

    /// The placement of a shard in the map, if the table is replicated.
    pub fn placement(&self, table: &str, shard: u32) -> Option<Placement> {
        self.map.borrow().placement(&(table.to_string(), shard)).cloned()
    }
}

/// A copy of a shard, summarised (`ClusterOp::Digest`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardDigest {
    pub pos: Pos,
    pub keys: u64,
    /// crc32c over each pair as (key length u32 LE, key, value length u32 LE, value), in key
    /// order.
    pub digest: u32,
}

/// The digest of `heap`'s contents at `pos`.
pub fn digest_of(heap: &Heap, pos: Pos) -> Result<ShardDigest, GridError> {
    let (mut crc, mut keys) = (0u32, 0u64);
    for e in heap.iter() {
        let (k, v) = e?;
        for part in [&(k.len() as u32).to_le_bytes()[..], k, &(v.len() as u32).to_le_bytes()[..], &v[..]] {
            crc = crc32c::crc32c_append(crc, part);
        }
        keys += 1;
    }
    Ok(ShardDigest { pos, keys, digest: crc })
}

/// The answers waiting on one write's replicas.
#[derive(Default)]
struct Join {
    /// Answers held on it (`ShardRepl::hold`) and not sent yet.
    expected: usize,
    /// Answers released locally (each with its local error, if any), waiting for the replicas.
    released: Vec<(Option<GridError>, Answer)>,
    /// How the replicas ended it.
    repl: Option<Outcome>,
}

/// Every write waiting for its replicas, by token: an entry from `written` until its outcome
/// is known and every answer held on it was sent.
#[derive(Default)]
struct Joins {
    waiting: HashMap<u64, Join>,
}

impl Joins {
    /// Whether `token`'s replicas have not answered yet.
    fn pending(&self, token: u64) -> bool {
        self.waiting.get(&token).is_some_and(|j| j.repl.is_none())
    }

    /// Sends what can be sent: a local failure at once; the others once the replicas answered.
    fn settle(&mut self, token: u64) {
        let Some(j) = self.waiting.get_mut(&token) else { return };
        let mut i = 0;
        while i < j.released.len() {
            if j.released[i].0.is_some() {
                let (e, answer) = j.released.swap_remove(i);
                answer(e.as_ref());
                j.expected -= 1;
            } else {
                i += 1;
            }
        }
        let Some(outcome) = &j.repl else { return };
        let err = match outcome {
            Outcome::Replicated => None,
            Outcome::Indeterminate => Some(GridError::Indeterminate(format!(
                "the write was applied by the primary, but its replicas did not ack it within {SYNC_DEADLINE_MS} ms"
            ))),
        };
        for (_, answer) in j.released.drain(..) {
            answer(err.as_ref());
            j.expected -= 1;
        }
        if j.expected == 0 {
            self.waiting.remove(&token);
        }
    }
}

/// One table shard's replication on this node.
pub struct ShardRepl {
    table: String,
    shard: u32,
    net: Arc<ReplNet>,
    ep: Endpoint<Vec<u8>>,
    st: ReplState,
    fsync: FsyncPolicy,
    sync_n: usize,
    next_token: u64,
    /// The token of the last write that waits for replicas (`written_or_pending`).
    last_token: Option<u64>,
    joins: Arc<Mutex<Joins>>,
    last_status_ms: u64,
    /// The time `admit` checked the lease at: `written` uses the same.
    admitted_ms: u64,
    ticker: tokio::task::JoinHandle<()>,
}

impl Drop for ShardRepl {
    fn drop(&mut self) {
        self.ticker.abort();
    }
}

impl ShardRepl {
    /// Replication of shard `shard` of `table` over `heap` (opened from `heap_path`); `tick`
    /// sends the actor its periodic message. Starts as a replica until the map says otherwise.
    pub fn open(
        net: Arc<ReplNet>,
        table: &str,
        shard: u32,
        heap: &mut Heap,
        heap_path: &Path,
        fsync: FsyncPolicy,
        tick: impl Fn() -> bool + Send + 'static,
    ) -> Result<ShardRepl, GridError> {
        let mut st = ReplState::open(heap, heap_path)?;
        let epoch = st.last_epoch();
        let mut ep = Endpoint::new(net.me, &HeapLog::lend(heap, &mut st), epoch);
        ep.tuning.retain_max = net.retain_records.max(1);
        // A service's every write waits for its in-sync replicas (a lock grant or a delivery
        // acknowledged is never lost in a failover), and is answered at once while it has none.
        ep.tuning.acks_in_sync = crate::cluster::map::is_service(table);
        st.tail_max = net.retain_records.max(1);
        // A replica until the map says otherwise: the heap's tap stays off (`stepped`).
        heap.set_tap(false);
        let ticker = tokio::spawn(async move {
            let mut every = tokio::time::interval(REPL_TICK);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                every.tick().await;
                if !tick() {
                    return;
                }
            }
        });
        Ok(ShardRepl {
            table: table.to_string(),
            shard,
            net,
            ep,
            st,
            fsync,
            sync_n: 0,
            next_token: 1,
            last_token: None,
            joins: Arc::default(),
            last_status_ms: 0,
            admitted_ms: 0,
            ticker,
        })
    }

    /// Whether this node serves the shard (its primary).
    pub fn serving(&self) -> bool {
        self.ep.is_primary()
    }

    /// This node's copy of the shard: its position, its keys, and a digest of its sorted
    /// key/value pairs (equal copies have equal digests), whatever its role.
    pub fn digest(&self, heap: &Heap) -> Result<ShardDigest, GridError> {
        digest_of(heap, self.ep.pos())
    }

    fn not_primary(&self) -> GridError {
        let map = self.net.map.borrow();
        let primary = map.placement(&(self.table.clone(), self.shard)).map(|p| p.primary);
        let addr = primary.and_then(|p| map.member(p)).map(|m| m.addr.clone());
        GridError::NotPrimary { table: self.table.clone(), shard: self.shard, primary, addr }
    }

    /// Whether a client request may run now: this node is the primary and holds a lease.
    pub fn admit(&mut self) -> Result<(), GridError> {
        let now = self.net.now_ms();
        match self.ep.may_write(now) {
            Ok(_) => {
                self.admitted_ms = now;
                Ok(())
            }
            // Not served now (a failover may be under way): nothing ran, so a retry is safe.
            Err(WriteRefused::NoLease) if self.ep.is_primary() => Err(GridError::NotPrimary {
                table: self.table.clone(),
                shard: self.shard,
                primary: None,
                addr: None,
            }),
            Err(_) => Err(self.not_primary()),
        }
    }

    /// Records the batches the request admitted last committed; the token its answer waits on
    /// (none: nothing written, or `async`).
    pub fn written(&mut self, heap: &mut Heap) -> Result<Option<u64>, GridError> {
        let tapped = heap.take_tapped();
        let count = tapped.len();
        let mut token = None;
        let now = self.admitted_ms;
        for (i, (heap_lsn, body)) in tapped.into_iter().enumerate() {
            let n = if i + 1 == count { self.sync_n } else { 0 };
            let t = self.next_token;
            self.next_token += 1;
            let want = self.st.lsn_of(heap_lsn);
            let mut log = HeapLog::lend(heap, &mut self.st);
            match self.ep.written(&mut log, body, n, t, now + SYNC_DEADLINE_MS, now)? {
                Ok((lsn, _)) if lsn == want => {}
                Ok((lsn, _)) => {
                    return Err(GridError::Corrupted(format!(
                        "shard {} of {}: record {lsn} is heap commit {heap_lsn} (lsn {want})",
                        self.shard, self.table
                    )));
                }
                // `admit` checked the same lease at the same time: unreachable but not trusted.
                Err(e) => {
                    return Err(GridError::Unavailable(format!(
                        "shard {} of {}: a write applied without the right to ship it ({e:?})",
                        self.shard, self.table
                    )));
                }
            }
            if n > 0 || self.ep.last_waits() {
                self.joins.lock().unwrap_or_else(|e| e.into_inner()).waiting.entry(t).or_default();
                self.last_token = Some(t);
                token = Some(t);
            }
        }
        Ok(token)
    }

    /// `written`, or else the token of the last write still waiting for its replicas: an
    /// answer that depends on everything written before it (a service's: a grant handed over
    /// by a release written a moment ago) waits for that too.
    pub fn written_or_pending(&mut self, heap: &mut Heap) -> Result<Option<u64>, GridError> {
        if let Some(t) = self.written(heap)? {
            return Ok(Some(t));
        }
        let js = self.joins.lock().unwrap_or_else(|e| e.into_inner());
        Ok(self.last_token.filter(|t| js.pending(*t)))
    }

    /// `d`, answered only once its replicas acked `token` too (a token `written` returned).
    pub fn hold(&self, token: u64, d: Deferred) -> Deferred {
        {
            let mut js = self.joins.lock().unwrap_or_else(|e| e.into_inner());
            match js.waiting.get_mut(&token) {
                Some(j) => j.expected += 1,
                // Not a token `written` returned, or one long settled: nothing to wait for.
                None => return d,
            }
        }
        let joins = self.joins.clone();
        let answer = d.answer;
        Deferred {
            lsn: d.lsn,
            answer: Box::new(move |err| {
                let mut js = joins.lock().unwrap_or_else(|e| e.into_inner());
                match js.waiting.get_mut(&token) {
                    Some(j) => {
                        j.released.push((err.cloned(), answer));
                        js.settle(token);
                    }
                    None => answer(err),
                }
            }),
        }
    }

    fn lend<'a>(heap: &'a mut Heap, st: &'a mut ReplState) -> HeapLog<&'a mut Heap, &'a mut ReplState> {
        HeapLog::lend(heap, st)
    }

    /// The op log holds what the heap applied (after a flush, and on ticks): ship it.
    pub fn synced(&mut self, heap: &mut Heap) {
        if heap.has_unlogged() {
            return;
        }
        let upto = match (self.fsync, heap.durability()) {
            (FsyncPolicy::Always, Some(d)) => d.durable_lsn(),
            _ => heap.last_lsn(),
        };
        let lsn = self.st.lsn_of(upto);
        let e = self.ep.synced::<HeapLog>(lsn, None);
        self.dispatch(e);
    }

    /// The periodic work: position to every member, shipping, resends, deadlines.
    pub fn tick(&mut self, heap: &mut Heap) -> Result<(), GridError> {
        let now = self.net.now_ms();
        if now.saturating_sub(self.last_status_ms) >= self.net.heartbeat_ms {
            self.last_status_ms = now;
            let members: Vec<NodeId> = self.net.map.borrow().members().map(|m| m.id).collect();
            let w = ReplWire::Status {
                pos: self.ep.pos(),
                epoch: self.ep.epoch,
                primary: self.ep.is_primary(),
                serving: self.ep.may_write(now).is_ok(),
                sent_ms: now,
            };
            if let Some(b) = (ReplFrame { table: self.table.clone(), shard: self.shard, wire: w }).encode() {
                for m in members {
                    self.net.transport.send(m, b.clone());
                }
            }
            // The map is also read here, so a missed change is caught up.
            if let Some(p) = self.net.placement(&self.table, self.shard) {
                self.on_placement(heap, &p);
            }
        }
        self.ship(heap)
    }

    /// Ships what the op log holds now (and resends, and ends writes past their deadline).
    pub fn ship(&mut self, heap: &mut Heap) -> Result<(), GridError> {
        self.synced(heap);
        let now = self.net.now_ms();
        let log = Self::lend(heap, &mut self.st);
        let e = self.ep.tick(&log, now)?;
        self.dispatch(e);
        Ok(())
    }

    /// The map placed the shard.
    pub fn on_placement(&mut self, heap: &mut Heap, p: &Placement) {
        let was = self.ep.is_primary();
        self.sync_n = p.sync as usize;
        let now = self.net.now_ms();
        self.ep.on_map(&Self::lend(heap, &mut self.st), p, now);
        if !was && self.ep.is_primary() {
            tracing::info!(table = %self.table, shard = self.shard, epoch = self.ep.epoch, "primary of this shard now");
        }
        self.stepped(heap, was);
    }

    /// A frame for this shard from node `from`.
    pub fn on_frame(&mut self, heap: &mut Heap, from: NodeId, wire: ReplWire) -> Result<(), GridError> {
        let was = self.ep.is_primary();
        let now = self.net.now_ms();
        let effects = match wire {
            ReplWire::Rep(m) => {
                if let ToReplica::Snapshot { upto, state, .. } = &m {
                    tracing::info!(table = %self.table, shard = self.shard, from, lsn = upto.lsn,
                        keys = state.1.len(), "installing a snapshot (behind the primary's retained log)");
                }
                let mut log = Self::lend(heap, &mut self.st);
                let mut e = self.ep.on_replica_msg(&mut log, from, m)?;
                log.flush()?;
                let last = log.last();
                if self.fsync == FsyncPolicy::Always
                    && let Some(d) = heap.durability()
                {
                    d.wait(heap.last_lsn())?;
                }
                e.extend(self.ep.synced::<HeapLog>(last, Some(from)));
                e
            }
            ReplWire::Prim(m) => self.ep.on_primary_msg(&Self::lend(heap, &mut self.st), from, m, now),
            ReplWire::Lease { epoch, until_ms } => {
                let had = self.ep.may_write(now).is_ok();
                self.ep.on_lease(epoch, until_ms);
                if !had && self.ep.may_write(now).is_ok() {
                    tracing::info!(table = %self.table, shard = self.shard, epoch, "serving under a lease");
                }
                Vec::new()
            }
            ReplWire::Status { .. } => Vec::new(),
        };
        self.dispatch(effects);
        self.stepped(heap, was);
        Ok(())
    }

    /// After anything that may change the role: the heap's tap is on exactly while this node
    /// is the primary (what a replica applies is not its to ship); a primary that stepped down
    /// answers what waits on its replicas `Indeterminate`.
    fn stepped(&mut self, heap: &mut Heap, was_primary: bool) {
        heap.set_tap(self.ep.is_primary());
        if was_primary && !self.ep.is_primary() {
            tracing::info!(table = %self.table, shard = self.shard, epoch = self.ep.epoch, "no longer the primary");
            let mut js = self.joins.lock().unwrap_or_else(|e| e.into_inner());
            let tokens: Vec<u64> = js.waiting.keys().copied().collect();
            for t in tokens {
                if let Some(j) = js.waiting.get_mut(&t)
                    && j.repl.is_none()
                {
                    j.repl = Some(Outcome::Indeterminate);
                }
                js.settle(t);
            }
        }
    }

    fn dispatch(&mut self, effects: Vec<Effect<Vec<u8>, (Pos, State)>>) {
        for e in effects {
            match e {
                Effect::ToReplica(to, m) => self.net.send(to, &self.table, self.shard, ReplWire::Rep(m)),
                Effect::ToPrimary(to, m) => self.net.send(to, &self.table, self.shard, ReplWire::Prim(m)),
                Effect::Done((token, outcome)) => {
                    let mut js = self.joins.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(j) = js.waiting.get_mut(&token) {
                        j.repl = Some(outcome);
                        js.settle(token);
                    }
                }
                Effect::ProposeInSync { epoch, based_on, in_sync } => {
                    let shard = (self.table.clone(), self.shard);
                    let cmd = MapCmd::SetInSync { shard, epoch, based_on, in_sync };
                    let _ = self.net.proposals.try_send(cmd);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// An answer that records what it was given.
    fn answer(seen: &Arc<Mutex<Vec<Option<String>>>>) -> Answer {
        let seen = seen.clone();
        Box::new(move |e: Option<&GridError>| seen.lock().unwrap().push(e.map(|e| e.to_string())))
    }

    /// A join as `written` opens it and `hold` registers `answers` answers on it.
    fn held(js: &mut Joins, token: u64, answers: usize) {
        js.waiting.entry(token).or_default().expected += answers;
    }

    fn release(js: &mut Joins, token: u64, err: Option<GridError>, a: Answer) {
        js.waiting.get_mut(&token).unwrap().released.push((err, a));
        js.settle(token);
    }

    #[test]
    fn an_answer_waits_for_both_its_release_and_its_replicas_in_either_order() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut js = Joins::default();
        // Released first, then replicated.
        held(&mut js, 1, 1);
        release(&mut js, 1, None, answer(&seen));
        assert!(seen.lock().unwrap().is_empty(), "answered before its replicas acked");
        assert!(js.pending(1));
        js.waiting.get_mut(&1).unwrap().repl = Some(Outcome::Replicated);
        js.settle(1);
        assert_eq!(*seen.lock().unwrap(), vec![None]);
        assert!(js.waiting.is_empty());
        // Replicated first, then released: answered at its release.
        held(&mut js, 2, 1);
        js.waiting.get_mut(&2).unwrap().repl = Some(Outcome::Replicated);
        js.settle(2);
        assert!(!js.pending(2));
        assert_eq!(seen.lock().unwrap().len(), 1);
        release(&mut js, 2, None, answer(&seen));
        assert_eq!(seen.lock().unwrap().len(), 2);
        assert!(js.waiting.is_empty());
    }

    #[test]
    fn several_answers_on_one_write_each_wait_and_the_entry_goes_with_the_last() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut js = Joins::default();
        // A release and the grant it handed over, both on one record.
        held(&mut js, 7, 2);
        release(&mut js, 7, None, answer(&seen));
        js.waiting.get_mut(&7).unwrap().repl = Some(Outcome::Replicated);
        js.settle(7);
        assert_eq!(seen.lock().unwrap().len(), 1);
        assert!(js.waiting.contains_key(&7), "the second answer would find nothing to wait on");
        release(&mut js, 7, None, answer(&seen));
        assert_eq!(*seen.lock().unwrap(), vec![None, None]);
        assert!(js.waiting.is_empty());
        // A write no answer holds on (a timer's): its outcome just clears it.
        held(&mut js, 8, 0);
        assert!(js.pending(8));
        js.waiting.get_mut(&8).unwrap().repl = Some(Outcome::Indeterminate);
        js.settle(8);
        assert!(js.waiting.is_empty());
    }

    #[test]
    fn a_local_failure_answers_at_once_and_a_late_outcome_only_clears_the_entry() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut js = Joins::default();
        held(&mut js, 1, 1);
        release(&mut js, 1, Some(GridError::Unavailable("heap failed".into())), answer(&seen));
        assert_eq!(seen.lock().unwrap().len(), 1);
        assert!(seen.lock().unwrap()[0].as_deref().unwrap().contains("heap failed"));
        // The replicas' outcome arrives later: nothing is answered twice, the entry goes.
        js.waiting.get_mut(&1).unwrap().repl = Some(Outcome::Replicated);
        js.settle(1);
        assert_eq!(seen.lock().unwrap().len(), 1);
        assert!(js.waiting.is_empty());
        // Indeterminate: released locally, not acked in time.
        held(&mut js, 2, 1);
        js.waiting.get_mut(&2).unwrap().repl = Some(Outcome::Indeterminate);
        release(&mut js, 2, None, answer(&seen));
        assert!(seen.lock().unwrap()[1].as_deref().unwrap().starts_with("indeterminate"));
        assert!(js.waiting.is_empty());
    }

    #[test]
    fn a_digest_is_equal_for_equal_contents_and_differs_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let open = |n: &str| Heap::open(dir.path().join(n), heapgrid_heap::HeapOptions::default()).unwrap();
        let (mut a, mut b) = (open("a.heap"), open("b.heap"));
        // The same pairs written in another order.
        for (k, v) in [("x", "1"), ("y", "2"), ("z", "3")] {
            a.put(k.as_bytes(), v.as_bytes()).unwrap();
        }
        for (k, v) in [("z", "3"), ("x", "1"), ("y", "2")] {
            b.put(k.as_bytes(), v.as_bytes()).unwrap();
        }
        let d = |h: &Heap| digest_of(h, Pos::default()).unwrap();
        assert_eq!(d(&a), d(&b));
        assert_eq!(d(&a).keys, 3);
        b.put(b"y", b"two").unwrap();
        assert_ne!(d(&a).digest, d(&b).digest);
        // A pair split differently is another content: lengths are part of the digest.
        let (mut c, mut e) = (open("c.heap"), open("e.heap"));
        c.put(b"ab", b"c").unwrap();
        e.put(b"a", b"bc").unwrap();
        assert_ne!(d(&c).digest, d(&e).digest);
    }
}
