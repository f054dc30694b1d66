//! The lock service actor: the node's sessions, locks and semaphores (the pure state machines of
//! `lock`), over the lock heap (`store`), behind the reply gate (`gate`). It handles its
//! messages strictly in order, so every grant, release and expiry has one place in time.
//!
//! One actor holds every lock of the node (a lock shard; a lock is a record in its heap and, while
//! held or waited for, an entry in memory). A separate actor per lock would put one more hop on
//! every grant (to the heap's owner, to persist it), for state this small; the lock shard is the
//! unit of ordering and persistence instead (ARCHITECTURE.md, "lock").
//!
//! - A grant or a release is one op-log record, and its answer waits for it (the gate); the new
//!   state is published to the fence table *before* anything is answered (`fence.rs`).
//! - Time is the actor's monotonic clock (`tokio::time::Instant`, so tests can pause it): a tick
//!   every `TICK` expires sessions (indexed by deadline) and the leases and lock delays due
//!   (`timers`); a waiter's wait has its own timer. A tick costs what is due, not the number of
//!   sessions or locks.
//! - A queued waiter whose caller is gone (its reply port closed: the connection dropped) or
//!   whose session ended is skipped at grant time.
//! - A session's end finds what it holds in `holdings`/`sem_holdings`, not by a scan.
//! - A lock or semaphore that becomes idle leaves memory at once (`settle`), its fence cell too;
//!   it lives on as its record.
//!
//! Invariant: the fence table shows each lock in memory's current grant (held) or last fence
//! (not held); a lock not in memory has no cell (and is not held).
//! Invariant: memory holds only locks and semaphores in use, and the holding indexes are exactly
//! their holders (`check_memory`, run with the heap's checker by `LockMsg::Check`).
//! Invariant: no reply to a grant is sent before the grant's record is durable per the policy.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use heapgrid_heap::HeapOptions;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::fence::{FenceCell, FenceTable};
use super::ops::{Holder, LockOp, LockResult, LockStatus, SemStatus};
use super::store::{Change, Loaded, LockRec, LockStore, SemRec, SessionRec, fence_floor};
use super::{
    Acquired, Grant, Lock, LockError, SESSION_TTL_MS_DEFAULT, SESSION_TTL_MS_MAX, Semaphore, SessionId,
    Sessions, Waiter,
};
use crate::cluster::fences::FenceFanout;
use crate::error::GridError;
use crate::gate::{Deferred, GatedService, Group, HeapOwner, LogGate, deferred, handle_gated, open_heap};
use crate::replication::service::{ServiceEvent, ServiceRepl, answer_held};

type Reply<T> = RpcReplyPort<Result<T, GridError>>;

/// How often sessions, leases and lock delays are checked: a lock frees within one tick of its
/// deadline.
pub const TICK: Duration = Duration::from_millis(20);
/// Longest wait of one acquire.
pub const LOCK_WAIT_MS_MAX: u64 = 300_000;
/// Most waiters queued on one lock or semaphore.
pub const LOCK_WAITERS_MAX: usize = 10_000;
/// Longest lock or semaphore name, in bytes.
pub const LOCK_NAME_BYTES_MAX: usize = 512;
/// Most reentrant acquires a lock may allow.
pub const REENTRY_MAX: u32 = 1_000;
/// Most sessions open at once on a node.
pub const LOCK_SESSIONS_MAX: usize = 1_000_000;
/// Most locks in memory at once (held, waited for, or in a lock delay), and most semaphores
/// with permits out or waiters. Idle ones live only as records and do not count.
pub const LOCKS_ACTIVE_MAX: usize = 1_000_000;

pub enum LockMsg {
    Call(LockOp, Reply<LockResult>),
    /// A waiter's wait ended.
    WaitOver(u64),
    Tick,
    /// Runs the heap's debug checker (`LockStore::check`).
    Check(Reply<()>),
    Flush,
    Durable(Vec<Group>),
    Checkpoint(Option<Reply<()>>),
    CheckpointDone,
    Close(Reply<()>),
    /// The heap's figures (handled by the gate).
    Stats(Reply<heapgrid_heap::HeapStats>),
    /// Drop clean resident pages (the memory budget; handled by the gate).
    Shed(u64, Reply<heapgrid_heap::ShedReport>),
    /// The cluster map placed the lock service (a cluster).
    Placement(crate::cluster::map::Placement),
    /// A replication frame from another node.
    Repl(crate::replication::NodeId, crate::replication::shard::ReplWire),
    /// The replication tick.
    ReplTick,
    /// This node's copy of the service's heap, summarised.
    Digest(Reply<crate::replication::shard::ShardDigest>),
    /// A node's fence mirror asks (`cluster::fences`): `(epoch, seq, asked_ms)`.
    FenceAsk(crate::replication::NodeId, (u64, u64, u64)),
    #[doc(hidden)]
    InjectPanic,
}

crate::gate::impl_gate_msg!(LockMsg);

/// Called with every session that ends (closed or expired), after its grants are released.
pub type SessionEnded = Arc<dyn Fn(SessionId) + Send + Sync>;

#[derive(Clone)]
pub struct LockArgs {
    pub path: PathBuf,
    pub heap: HeapOptions,
    pub fences: Arc<FenceTable>,
    pub view: Arc<crate::gate::ReadView>,
    pub ended: SessionEnded,
    /// The node's replication network when it is in a cluster: the service is then replicated
    /// (`replication::service`), its heap at `path` is the cluster's copy.
    pub cluster: Option<Arc<crate::replication::shard::ReplNet>>,
}

/// A lock in memory (held, waited for, or in its lock delay).
struct Active {
    lock: Lock,
    cell: Arc<FenceCell>,
    /// The holder as last recorded (`persist_lock`), for `LockState::holdings`.
    recorded: Option<SessionId>,
    /// This lock's entry in `LockState::timers`, if any (one at most).
    timer: Option<u64>,
}

/// What a queued waiter waits for.
enum Wants {
    Lock(String),
    Sem(String),
}

struct Pending {
    session: SessionId,
    wants: Wants,
    port: Reply<LockResult>,
    timer: Option<tokio::task::JoinHandle<Result<(), ractor::MessagingErr<LockMsg>>>>,
}

pub struct LockState {
    gate: LogGate<LockStore>,
    origin: tokio::time::Instant,
    epoch: u64,
    sessions: Sessions,
    locks: HashMap<String, Active>,
    sems: HashMap<String, Semaphore>,
    pending: HashMap<u64, Pending>,
    next_waiter: u64,
    fences: Arc<FenceTable>,
    /// `(time, lock)`: when the lease or the lock delay of a lock in memory ends, one entry per
    /// lock at most (`schedule`). The tick looks only at these, not at every lock.
    timers: BTreeSet<(u64, String)>,
    /// The locks each session holds, as recorded (kept by `persist_lock`).
    holdings: HashMap<SessionId, HashSet<String>>,
    /// The semaphores each session holds permits of, as recorded (kept by `persist_sem`), and
    /// each semaphore's recorded holders (to update the first without a scan).
    sem_holdings: HashMap<SessionId, HashSet<String>>,
    sem_recorded: HashMap<String, Vec<SessionId>>,
    ended: SessionEnded,
    /// The service's replication, in a cluster.
    cluster: Option<ServiceRepl>,
    /// Memory holds the service (always on a lone node; in a cluster only on its primary).
    loaded: bool,
    /// Replication failed while handling a message: the actor fails after it.
    failed: Option<String>,
    /// In a cluster, on the primary: the changes of the fence table, pushed to every node's
    /// mirror (`cluster::fences`).
    fanout: Option<FenceFanout>,
    /// Answers waiting for every mirror to hold the fence changes before them.
    barrier: Arc<std::sync::Mutex<Barrier>>,
}

/// Answers held until the mirrors hold a seq of the fence fanout. Not bounded here: each is an
/// answer of a request in flight, which the connections' in-flight limits bound, and a mirror
/// that does not ack stops holding them when its lease ends (`MIRROR_LEASE_MS`).
#[derive(Default)]
pub struct Barrier {
    /// Every mirror holding a lease has this seq.
    cleared: u64,
    waiting: Vec<(u64, Option<GridError>, crate::gate::Answer)>,
}

/// A random 64-bit secret from the OS.
fn secret() -> Result<u64, GridError> {
    use std::io::Read;
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| GridError::Storage(format!("no randomness for a session secret: {e}")))?;
    Ok(u64::from_le_bytes(b))
}

fn from_lock_error(lock: &str, session: SessionId, e: LockError) -> GridError {
    match e {
        LockError::NotHolder { current } => GridError::NotHolder { lock: lock.to_string(), current },
        LockError::SessionExpired => GridError::SessionExpired { session },
        LockError::BadTtl { ttl_ms } => GridError::Invalid(format!(
            "session ttl {ttl_ms} ms is outside [{}, {}] ms",
            super::SESSION_TTL_MS_MIN,
            SESSION_TTL_MS_MAX
        )),
        // Answered where the lock's limit is known (`Acquire`).
        LockError::ReentryLimit => {
            GridError::Invalid(format!("a nested acquire of lock {lock} past its limit"))
        }
    }
}

fn too_many_active(what: &str) -> GridError {
    GridError::LimitExceeded {
        what: format!("{what} in memory (held, waited for, or in a lock delay)"),
        got: LOCKS_ACTIVE_MAX as u64 + 1,
        max: LOCKS_ACTIVE_MAX as u64,
    }
}

fn check_name(name: &str) -> Result<(), GridError> {
    if name.is_empty() || name.len() > LOCK_NAME_BYTES_MAX {
        return Err(GridError::Invalid(format!(
            "a lock or semaphore name is 1 to {LOCK_NAME_BYTES_MAX} bytes (got {})",
            name.len()
        )));
    }
    Ok(())
}

impl LockState {
    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// `gate.answer`; in a cluster the answer also waits for the replicas of every write
    /// before it (`replication::service`).
    fn answer(
        &mut self,
        myself: &ActorRef<LockMsg>,
        wrote: u64,
        d: impl FnOnce(u64) -> Deferred + Send + 'static,
    ) {
        // On a lone node, or with every mirror current, the gate's answer as it is (no clock
        // read, no allocation: this is every lock answer's path).
        let need = self.fanout.as_ref().and_then(|f| {
            let seq = f.seq();
            (f.cleared(crate::cluster::fences::now_ms()) < seq).then_some(seq)
        });
        let repl = self.cluster.as_mut().and_then(|c| c.repl());
        let what = || "the lock service".to_string();
        let r = match need {
            None => answer_held(repl, &mut self.gate, myself, wrote, true, what, d),
            // After a fence change not every mirror holds yet: held until they do.
            Some(need) => {
                let barrier = self.barrier.clone();
                answer_held(repl, &mut self.gate, myself, wrote, true, what, move |lsn| {
                    let inner = d(lsn);
                    let answer = inner.answer;
                    Deferred {
                        lsn: inner.lsn,
                        answer: Box::new(move |err| {
                            let mut b = barrier.lock().unwrap_or_else(|e| e.into_inner());
                            if b.cleared >= need {
                                drop(b);
                                answer(err);
                            } else {
                                b.waiting.push((need, err.cloned(), answer));
                            }
                        }),
                    }
                })
            }
        };
        if let Err(e) = r {
            self.failed = Some(e.to_string());
        }
    }

    /// Memory from what the heap holds (`loaded`), as after a restart: held locks and
    /// semaphores with permits out come in, with their recorded holders' sessions alive for
    /// one ttl from now; the others live as records.
    fn restore(&mut self, loaded: Loaded) {
        let now = self.now_ms();
        self.epoch = loaded.epoch;
        self.sessions = Sessions::restore(
            loaded.last_session,
            loaded.sessions.iter().map(|(id, r)| (*id, r.secret, r.ttl_ms)),
            now,
        );
        // The previous life's grants are void unless recorded: republish from the records.
        self.fences.reset();
        for (name, rec) in loaded.locks {
            let Some((session, fence)) = rec.holder.filter(|(s, _)| self.sessions.alive(*s, now)) else {
                continue;
            };
            let cell = self.fences.cell(&name);
            cell.publish(fence, true);
            let mut lock =
                Lock::restore(rec.last_fence.max(fence_floor(loaded.epoch)), Some((session, fence)));
            lock.reentry_max = rec.reentry_max;
            lock.lock_delay_ms = rec.lock_delay_ms;
            self.holdings.entry(session).or_default().insert(name.clone());
            self.locks.insert(name, Active { lock, cell, recorded: Some(session), timer: None });
        }
        for (name, r) in loaded.sems {
            let s = Semaphore::restore(r.size, r.held.into_iter().filter(|h| self.sessions.alive(h.0, now)));
            if s.is_idle() {
                continue;
            }
            let held: Vec<SessionId> = s.holders().into_iter().map(|h| h.0).collect();
            for session in &held {
                self.sem_holdings.entry(*session).or_default().insert(name.clone());
            }
            self.sem_recorded.insert(name.clone(), held);
            self.sems.insert(name, s);
        }
        if self.cluster.is_some() {
            // A new epoch of fences: every mirror takes the whole table again.
            self.fanout = Some(FenceFanout::new(self.epoch));
            *self.barrier.lock().unwrap_or_else(|e| e.into_inner()) = Barrier::default();
        }
        self.fences.set_valid_until(u64::MAX);
        self.loaded = true;
    }

    /// A change of the fence table, pushed to the mirrors (in a cluster, on the primary).
    fn fence_changed(&mut self, name: &str, change: Option<(u64, bool)>) {
        let (Some(f), Some(c)) = (self.fanout.as_mut(), self.cluster.as_ref()) else { return };
        let (_, sends) = f.changed((name.to_string(), change), crate::cluster::fences::now_ms());
        for (to, w) in sends {
            if let Some(b) = w.encode() {
                c.net().transport.send(to, b);
            }
        }
    }

    /// Sends the answers whose fence changes every mirror holds now (or whose mirrors' leases
    /// ran out).
    fn clear_barrier(&mut self) {
        let Some(f) = self.fanout.as_mut() else { return };
        let now = crate::cluster::fences::now_ms();
        f.prune(now);
        let cleared = f.cleared(now);
        let ready: Vec<_> = {
            let mut b = self.barrier.lock().unwrap_or_else(|e| e.into_inner());
            b.cleared = cleared;
            let (ready, wait) =
                std::mem::take(&mut b.waiting).into_iter().partition(|(s, _, _)| *s <= cleared);
            b.waiting = wait;
            ready
        };
        for (_, err, answer) in ready {
            answer(err.as_ref());
        }
    }

    /// A mirror's ask (on the primary): what it lacks, and its lease.
    fn fence_ask(&mut self, from: crate::replication::NodeId, ask: (u64, u64, u64)) {
        let (Some(f), Some(c)) = (self.fanout.as_mut(), self.cluster.as_ref()) else { return };
        let fences = &self.fences;
        for w in f.on_ask(from, ask, crate::cluster::fences::now_ms(), || fences.snapshot()) {
            if let Some(b) = w.encode() {
                c.net().transport.send(from, b);
            }
        }
        self.clear_barrier();
    }

    /// Memory emptied (this node is no longer the service's primary): waiters are answered
    /// `NotPrimary` (nothing was granted to them), fences published here are withdrawn.
    fn drop_memory(&mut self, why: &GridError) {
        for (_, p) in self.pending.drain() {
            if let Some(t) = p.timer {
                t.abort();
            }
            let _ = p.port.send(Err(why.clone()));
        }
        self.sessions = Sessions::restore(0, std::iter::empty(), 0);
        self.locks.clear();
        self.sems.clear();
        self.timers.clear();
        self.holdings.clear();
        self.sem_holdings.clear();
        self.sem_recorded.clear();
        // The table becomes this node's mirror of the new primary's (which replaces it whole):
        // it answers nothing until then.
        self.fences.set_valid_until(0);
        self.fanout = None;
        let waiting = std::mem::take(&mut self.barrier.lock().unwrap_or_else(|e| e.into_inner()).waiting);
        let e = GridError::Indeterminate(
            "the lock service moved to another node before every node's copy of the fences was current"
                .into(),
        );
        for (_, _, answer) in waiting {
            answer(Some(&e));
        }
        self.loaded = false;
    }

    /// In a cluster: starts replicating once the map places the service.
    fn replicate(&mut self, myself: &ActorRef<LockMsg>) -> Result<(), GridError> {
        let Some(c) = self.cluster.as_mut() else { return Ok(()) };
        let me = myself.clone();
        c.ensure(self.gate.shard.as_mut(), move || me.cast(LockMsg::ReplTick).is_ok())
    }

    /// In a cluster: a placement, a frame or the replication tick, then the role it leaves.
    fn replicated(&mut self, myself: &ActorRef<LockMsg>, ev: ServiceEvent) -> Result<(), GridError> {
        let Some(c) = self.cluster.as_mut() else { return Ok(()) };
        let me = myself.clone();
        c.on(self.gate.shard.as_mut(), ev, move || me.cast(LockMsg::ReplTick).is_ok())?;
        self.roles(myself)
    }

    /// Whether the service runs here now: a lone node, or the cluster's leased primary.
    fn serving_now(&mut self) -> bool {
        self.loaded && self.cluster.as_mut().is_none_or(|c| c.admit().is_ok())
    }

    /// After each message: a failure of replication fails the actor; what was written is
    /// recorded for shipping (a timer's writes too) and shipped once the op log has it.
    fn after(&mut self) -> Result<(), GridError> {
        if let Some(why) = self.failed.take() {
            return Err(GridError::Unavailable(why));
        }
        match self.cluster.as_mut() {
            Some(c) => c.after(self.gate.shard.as_mut()),
            None => Ok(()),
        }
    }

    /// In a cluster: loads the service on becoming its leased primary (raising the epoch, a
    /// replicated record), drops it on ceasing to be the primary.
    fn roles(&mut self, myself: &ActorRef<LockMsg>) -> Result<(), GridError> {
        let Some(c) = self.cluster.as_mut() else { return Ok(()) };
        if c.should_load(self.loaded) {
            let at_least = c.map_epoch();
            let loaded = self.store()?.promote(at_least)?;
            tracing::info!(
                epoch = loaded.epoch,
                sessions = loaded.sessions.len(),
                locks = loaded.locks.len(),
                "the lock service is served here now"
            );
            self.restore(loaded);
            // The epoch's record goes out now, not with the next answer.
            self.answer(myself, 0, |lsn| Deferred { lsn, answer: Box::new(|_| {}) });
        } else if c.should_drop(self.loaded) {
            let why = c.not_primary();
            tracing::info!("the lock service moved to another node");
            self.drop_memory(&why);
        }
        Ok(())
    }

    fn store(&mut self) -> Result<&mut LockStore, GridError> {
        self.gate.shard.as_mut().ok_or(GridError::Closed)
    }

    /// The lock `name` in memory, loaded from its record if it was idle.
    fn activate(&mut self, name: &str) -> Result<&mut Active, GridError> {
        if !self.locks.contains_key(name) {
            let rec = self.store()?.lock_rec(name)?;
            let mut lock = Lock::resume(rec.last_fence.max(fence_floor(self.epoch)));
            lock.reentry_max = rec.reentry_max;
            lock.lock_delay_ms = rec.lock_delay_ms;
            let cell = self.fences.cell(name);
            self.locks.insert(name.to_string(), Active { lock, cell, recorded: None, timer: None });
        }
        Ok(self.locks.get_mut(name).expect("inserted above"))
    }

    /// The record of `name` as it is now, written as one op-log record; the fence table shows
    /// the new state before this returns. Returns the LSN.
    fn persist_lock(&mut self, name: &str) -> Result<u64, GridError> {
        let now = self.now_ms();
        let Some(a) = self.locks.get_mut(name) else { return Ok(0) };
        let holder = a.lock.holder();
        let now_held = holder.map(|h| h.session);
        if a.recorded != now_held {
            if let Some(s) = a.recorded
                && let Some(set) = self.holdings.get_mut(&s)
            {
                set.remove(name);
                if set.is_empty() {
                    self.holdings.remove(&s);
                }
            }
            if let Some(s) = now_held {
                self.holdings.entry(s).or_default().insert(name.to_string());
            }
            a.recorded = now_held;
        }
        self.schedule(name, now);
        let Some(a) = self.locks.get(name) else { return Ok(0) };
        let rec = LockRec {
            last_fence: a.lock.last_fence(),
            holder: holder.map(|h| (h.session, h.fence)),
            reentry_max: a.lock.reentry_max,
            lock_delay_ms: a.lock.lock_delay_ms,
        };
        let published = (holder.map_or(rec.last_fence, |h| h.fence), holder.is_some());
        a.cell.publish(published.0, published.1);
        self.fence_changed(name, Some(published));
        let mut c = Change::default();
        c.lock(name, &rec)?;
        self.store()?.commit(&c)
    }

    fn persist_sem(&mut self, name: &str) -> Result<u64, GridError> {
        let Some(s) = self.sems.get(name) else { return Ok(0) };
        let rec = SemRec { size: s.size(), held: s.holders() };
        let now_held: Vec<SessionId> = rec.held.iter().map(|h| h.0).collect();
        let before = self.sem_recorded.insert(name.to_string(), now_held.clone()).unwrap_or_default();
        for s in before.iter().filter(|s| !now_held.contains(s)) {
            if let Some(set) = self.sem_holdings.get_mut(s) {
                set.remove(name);
                if set.is_empty() {
                    self.sem_holdings.remove(s);
                }
            }
        }
        for s in now_held {
            self.sem_holdings.entry(s).or_default().insert(name.to_string());
        }
        let mut c = Change::default();
        c.sem(name, &rec)?;
        self.store()?.commit(&c)
    }

    /// How long grant `g` lasts from now: its lease or its session, whichever ends first.
    fn expires_in(&self, g: &Grant, now: u64) -> u64 {
        let session_end = self.sessions.get(g.session).map_or(now, |s| s.2);
        g.lease_until_ms.map_or(session_end, |l| l.min(session_end)).saturating_sub(now)
    }

    /// Drops queued waiters of `name` whose callers are gone (so a grant never goes to one).
    fn prune(&mut self, name: &str) {
        let pending = &self.pending;
        let gone = |w: u64| pending.get(&w).is_none_or(|p| p.port.is_closed());
        let mut dropped = Vec::new();
        if let Some(a) = self.locks.get_mut(name) {
            dropped = a.lock.drop_waiters(|w| gone(w.waiter));
        }
        if let Some(s) = self.sems.get_mut(name) {
            s.drop_waiters(|w| {
                let g = gone(w);
                if g {
                    dropped.push(w);
                }
                g
            });
        }
        for w in dropped {
            if let Some(p) = self.pending.remove(&w)
                && let Some(t) = p.timer
            {
                t.abort();
            }
        }
    }

    /// Answers the waiter a lock change granted (through the gate, after `lsn`).
    fn hand_over(&mut self, myself: &ActorRef<LockMsg>, granted: Option<(u64, Grant)>, lsn: u64) {
        let Some((waiter, g)) = granted else { return };
        let Some(p) = self.pending.remove(&waiter) else { return };
        if let Some(t) = p.timer {
            t.abort();
        }
        let now = self.now_ms();
        let r = Ok(LockResult::Granted { fence: g.fence, expires_in_ms: self.expires_in(&g, now) });
        self.answer(myself, lsn, |lsn| deferred(lsn, p.port, r));
    }

    /// Answers the semaphore waiters `granted`.
    fn hand_permits(&mut self, myself: &ActorRef<LockMsg>, sem: &str, granted: Vec<u64>, lsn: u64) {
        for waiter in granted {
            let Some(p) = self.pending.remove(&waiter) else { continue };
            if let Some(t) = p.timer {
                t.abort();
            }
            let held = self.sems.get(sem).map_or(0, |s| s.held_by(p.session));
            self.answer(myself, lsn, move |lsn| deferred(lsn, p.port, Ok(LockResult::Permits { held })));
        }
    }

    /// A session ended: its locks and permits go to the next live waiters, its queued requests
    /// are answered `SessionExpired`, and its record is deleted.
    fn end_session(
        &mut self,
        myself: &ActorRef<LockMsg>,
        session: SessionId,
        expired: bool,
    ) -> Result<(), GridError> {
        let now = self.now_ms();
        // What it holds, from the indexes; what it waits for is answered below and skipped at
        // grant time (its session is no longer alive).
        let names: Vec<String> = self.holdings.get(&session).into_iter().flatten().cloned().collect();
        let waits: Vec<u64> =
            self.pending.iter().filter(|(_, p)| p.session == session).map(|(w, _)| *w).collect();
        for w in waits {
            if let Some(p) = self.pending.remove(&w) {
                if let Some(t) = p.timer {
                    t.abort();
                }
                let _ = p.port.send(Err(GridError::SessionExpired { session }));
            }
        }
        for name in names {
            self.prune(&name);
            let sessions = &self.sessions;
            let Some(a) = self.locks.get_mut(&name) else { continue };
            let granted = a.lock.revoke(session, expired, now, |s| sessions.alive(s, now));
            let lsn = self.persist_lock(&name)?;
            self.hand_over(myself, granted, lsn);
            self.settle(&name);
        }
        let sem_names: Vec<String> = self.sem_holdings.get(&session).into_iter().flatten().cloned().collect();
        for name in sem_names {
            self.prune(&name);
            let sessions = &self.sessions;
            let Some(s) = self.sems.get_mut(&name) else { continue };
            let granted = s.session_gone(session, |x| sessions.alive(x, now));
            let lsn = self.persist_sem(&name)?;
            self.hand_permits(myself, &name, granted, lsn);
            self.settle(&name);
        }
        let mut c = Change::default();
        c.session_gone(session)?;
        self.store()?.commit(&c)?;
        (self.ended)(session);
        Ok(())
    }

    /// The tick: expired sessions end, expired leases and lock delays move their locks on, idle
    /// locks leave memory.
    fn tick(&mut self, myself: &ActorRef<LockMsg>) -> Result<(), GridError> {
        let now = self.now_ms();
        for s in self.sessions.expire(now) {
            self.end_session(myself, s, true)?;
        }
        let mut due = Vec::new();
        while let Some((at, _)) = self.timers.first()
            && *at <= now
        {
            let (_, name) = self.timers.pop_first().expect("first exists");
            if let Some(a) = self.locks.get_mut(&name) {
                a.timer = None;
            }
            due.push(name);
        }
        due.dedup();
        for name in due {
            self.prune(&name);
            let sessions = &self.sessions;
            let Some(a) = self.locks.get_mut(&name) else { continue };
            let before = a.lock.holder();
            let granted = a.lock.tick(now, |s| sessions.alive(s, now));
            if before != a.lock.holder() || granted.is_some() {
                let lsn = self.persist_lock(&name)?;
                self.hand_over(myself, granted, lsn);
            }
            self.schedule(&name, now);
            self.settle(&name);
        }
        Ok(())
    }

    /// The debug checker of what is in memory: every lock and semaphore there is in use (none
    /// idle: `settle` ran after everything), each lock's fence cell shows its state, and the
    /// holding indexes are exactly the holders.
    fn check_memory(&self) -> Result<(), GridError> {
        let now = self.now_ms();
        let bad = |why: String| Err(GridError::Corrupted(format!("lock service memory: {why}")));
        let mut holdings: HashMap<SessionId, HashSet<String>> = HashMap::new();
        for (name, a) in &self.locks {
            if a.lock.is_idle(now) && a.timer.is_none() {
                return bad(format!("lock {name} is idle but in memory"));
            }
            let want = a.lock.holder().map_or((a.lock.last_fence(), false), |h| (h.fence, true));
            if self.fences.current(name) != want || a.recorded != a.lock.holder().map(|h| h.session) {
                return bad(format!("lock {name}: cell or record disagrees with {want:?}"));
            }
            if let Some(h) = a.lock.holder() {
                holdings.entry(h.session).or_default().insert(name.clone());
            }
        }
        if holdings != self.holdings {
            return bad(format!("lock holdings index {:?}, holders {holdings:?}", self.holdings));
        }
        let timers: BTreeSet<(u64, String)> =
            self.locks.iter().filter_map(|(n, a)| a.timer.map(|t| (t, n.clone()))).collect();
        if timers != self.timers {
            return bad(format!("{} timers, {} locks with one", self.timers.len(), timers.len()));
        }
        let mut sem_holdings: HashMap<SessionId, HashSet<String>> = HashMap::new();
        for (name, s) in &self.sems {
            if s.is_idle() {
                return bad(format!("semaphore {name} is idle but in memory"));
            }
            for (session, _) in s.holders() {
                sem_holdings.entry(session).or_default().insert(name.clone());
            }
        }
        if sem_holdings != self.sem_holdings {
            return bad(format!(
                "semaphore holdings index {:?}, holders {sem_holdings:?}",
                self.sem_holdings
            ));
        }
        Ok(())
    }

    /// Keeps the one timer of lock `name`: at its holder's lease end, or at the end of its lock
    /// delay, or none.
    fn schedule(&mut self, name: &str, now: u64) {
        let Some(a) = self.locks.get_mut(name) else { return };
        let want = match a.lock.holder() {
            Some(h) => h.lease_until_ms,
            None => Some(a.lock.delayed_until_ms()).filter(|&t| t > now),
        };
        if a.timer != want {
            if let Some(t) = a.timer {
                self.timers.remove(&(t, name.to_string()));
            }
            if let Some(t) = want {
                self.timers.insert((t, name.to_string()));
            }
            a.timer = want;
        }
    }

    /// An idle lock or semaphore `name` leaves memory (its record stays), the lock's fence cell
    /// with it. Called after anything that can leave one idle, so memory holds only locks and
    /// semaphores in use and no scan is needed.
    fn settle(&mut self, name: &str) {
        let now = self.now_ms();
        if self.locks.get(name).is_some_and(|a| a.lock.is_idle(now))
            && let Some(a) = self.locks.remove(name)
        {
            if let Some(t) = a.timer {
                self.timers.remove(&(t, name.to_string()));
            }
            self.fences.forget(name);
            self.fence_changed(name, None);
        }
        if self.sems.get(name).is_some_and(|s| s.is_idle()) {
            self.sems.remove(name);
            self.sem_recorded.remove(name);
        }
    }

    fn touch(&mut self, session: SessionId) -> Result<(), GridError> {
        let now = self.now_ms();
        self.sessions.touch(session, now).map_err(|_| GridError::SessionExpired { session })
    }

    fn status(&self, name: &str, a: &Active, now: u64) -> LockStatus {
        LockStatus {
            lock: name.to_string(),
            holder: a.lock.holder().map(|h| Holder {
                session: h.session,
                fence: h.fence,
                expires_in_ms: self.expires_in(&h, now),
            }),
            last_fence: a.lock.last_fence(),
            waiters: a.lock.waiting() as u32,
            reentry_max: a.lock.reentry_max,
            lock_delay_ms: a.lock.lock_delay_ms,
        }
    }

    fn sem_status(name: &str, s: &Semaphore) -> SemStatus {
        SemStatus {
            sem: name.to_string(),
            size: s.size(),
            in_use: s.in_use(),
            waiters: s.waiting() as u32,
            holders: s.holders(),
        }
    }

    /// Queues a waiter with its wait timer.
    fn park(&mut self, myself: &ActorRef<LockMsg>, waiter: u64, p: Pending, wait_ms: u64) {
        let mut p = p;
        p.timer = Some(myself.send_after(Duration::from_millis(wait_ms), move || LockMsg::WaitOver(waiter)));
        self.pending.insert(waiter, p);
    }

    /// One request; then the lock or semaphore it named leaves memory if it is idle now.
    fn call(
        &mut self,
        myself: &ActorRef<LockMsg>,
        op: LockOp,
        reply: Reply<LockResult>,
    ) -> Result<(), GridError> {
        let name = op.name().map(str::to_string);
        let r = self.serve(myself, op, reply);
        if let Some(name) = name {
            self.settle(&name);
        }
        r
    }

    fn serve(
        &mut self,
        myself: &ActorRef<LockMsg>,
        op: LockOp,
        reply: Reply<LockResult>,
    ) -> Result<(), GridError> {
        if let Some(s) = op.session()
            && !matches!(op, LockOp::Reattach { .. } | LockOp::Release { .. } | LockOp::Close { .. })
            && let Err(e) = self.touch(s)
        {
            let _ = reply.send(Err(e));
            return Ok(());
        }
        if let Some(n) = op.name()
            && let Err(e) = check_name(n)
        {
            let _ = reply.send(Err(e));
            return Ok(());
        }
        let now = self.now_ms();
        match op {
            LockOp::Open { .. } if self.sessions.len() >= LOCK_SESSIONS_MAX => {
                let _ = reply.send(Err(GridError::LimitExceeded {
                    what: "open lock sessions".into(),
                    got: LOCK_SESSIONS_MAX as u64 + 1,
                    max: LOCK_SESSIONS_MAX as u64,
                }));
            }
            LockOp::Acquire { ref lock, .. }
                if !self.locks.contains_key(lock) && self.locks.len() >= LOCKS_ACTIVE_MAX =>
            {
                let _ = reply.send(Err(too_many_active("locks")));
            }
            LockOp::SemAcquire { ref sem, .. }
                if !self.sems.contains_key(sem) && self.sems.len() >= LOCKS_ACTIVE_MAX =>
            {
                let _ = reply.send(Err(too_many_active("semaphores")));
            }
            LockOp::Open { ttl_ms } => {
                let ttl_ms = ttl_ms.unwrap_or(SESSION_TTL_MS_DEFAULT);
                let secret = secret()?;
                let r = self.sessions.open(ttl_ms, secret, now);
                let (r, lsn) = match r {
                    Ok(session) => {
                        let mut c = Change::default();
                        c.session(session, &SessionRec { secret, ttl_ms })?.last_session(session)?;
                        let lsn = self.store()?.commit(&c)?;
                        (Ok(LockResult::Session { session, secret, ttl_ms }), lsn)
                    }
                    Err(e) => (Err(from_lock_error("", 0, e)), 0),
                };
                self.answer(myself, lsn, |lsn| deferred(lsn, reply, r));
            }
            LockOp::Reattach { session, secret } => {
                let r = match self.sessions.reattach(session, secret, now) {
                    Ok(()) => {
                        let (_, ttl_ms, _) = self.sessions.get(session).unwrap_or_default();
                        Ok(LockResult::Session { session, secret, ttl_ms })
                    }
                    Err(_) => Err(GridError::SessionExpired { session }),
                };
                self.answer(myself, 0, |lsn| deferred(lsn, reply, r));
            }
            LockOp::Heartbeat { .. } => {
                self.answer(myself, 0, |lsn| deferred(lsn, reply, Ok(LockResult::Done)))
            }
            LockOp::Close { session } => {
                let r = if self.sessions.close(session) {
                    self.end_session(myself, session, false)?;
                    Ok(LockResult::Done)
                } else {
                    Err(GridError::SessionExpired { session })
                };
                let lsn = self.store()?.heap().last_lsn();
                self.answer(myself, lsn, |lsn| deferred(lsn, reply, r));
            }
            LockOp::Acquire { lock, session, wait_ms, lease_ms } => {
                if wait_ms > LOCK_WAIT_MS_MAX || lease_ms.is_some_and(|l| l == 0 || l > SESSION_TTL_MS_MAX) {
                    let _ = reply.send(Err(GridError::Invalid(format!(
                        "wait_ms is at most {LOCK_WAIT_MS_MAX} and lease_ms 1..={SESSION_TTL_MS_MAX}"
                    ))));
                    return Ok(());
                }
                self.prune(&lock);
                let waiter = self.next_waiter;
                self.next_waiter += 1;
                let a = self.activate(&lock)?;
                if let Some(h) = a.lock.holder()
                    && h.session == session
                    && a.lock.reentry_max == 0
                {
                    let e = GridError::Invalid(format!(
                        "session {session} already holds lock {lock} (fence {}); the lock is not reentrant",
                        h.fence
                    ));
                    let _ = reply.send(Err(e));
                    return Ok(());
                }
                if a.lock.waiting() >= LOCK_WAITERS_MAX {
                    let _ = reply.send(Err(GridError::LimitExceeded {
                        what: format!("waiters on lock {lock}"),
                        got: LOCK_WAITERS_MAX as u64 + 1,
                        max: LOCK_WAITERS_MAX as u64,
                    }));
                    return Ok(());
                }
                match a.lock.acquire(Waiter { waiter, session, lease_ms }, now) {
                    Ok(Acquired::Granted(g)) => {
                        let lsn = if g.depth == 1 { self.persist_lock(&lock)? } else { 0 };
                        let r = Ok(LockResult::Granted {
                            fence: g.fence,
                            expires_in_ms: self.expires_in(&g, now),
                        });
                        self.answer(myself, lsn, |lsn| deferred(lsn, reply, r));
                    }
                    Ok(Acquired::Queued) if wait_ms == 0 => {
                        a.lock.cancel(waiter);
                        self.answer(myself, 0, |lsn| deferred(lsn, reply, Ok(LockResult::Timeout)));
                    }
                    Ok(Acquired::Queued) => {
                        let p = Pending { session, wants: Wants::Lock(lock), port: reply, timer: None };
                        self.park(myself, waiter, p, wait_ms);
                    }
                    Err(LockError::ReentryLimit) => {
                        let max = u64::from(a.lock.reentry_max);
                        let what = format!("nested acquires of lock {lock} (its reentry_max)");
                        let _ = reply.send(Err(GridError::LimitExceeded { what, got: max + 1, max }));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(from_lock_error(&lock, session, e)));
                    }
                }
            }
            LockOp::Release { lock, session, fence } => {
                self.prune(&lock);
                self.activate(&lock)?;
                let (locks, sessions) = (&mut self.locks, &self.sessions);
                let a = locks.get_mut(&lock).expect("activated above");
                match a.lock.release(session, fence, now, |s| sessions.alive(s, now)) {
                    Ok(granted) => {
                        let still = a.lock.holder().is_some_and(|h| h.fence == fence);
                        let lsn = if still { 0 } else { self.persist_lock(&lock)? };
                        self.hand_over(myself, granted, lsn);
                        self.answer(myself, lsn, |lsn| deferred(lsn, reply, Ok(LockResult::Done)));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(from_lock_error(&lock, session, e)));
                    }
                }
            }
            LockOp::Renew { lock, session, fence, lease_ms } => {
                if lease_ms.is_some_and(|l| l == 0 || l > SESSION_TTL_MS_MAX) {
                    let _ =
                        reply.send(Err(GridError::Invalid(format!("lease_ms is 1..={SESSION_TTL_MS_MAX}"))));
                    return Ok(());
                }
                let a = self.activate(&lock)?;
                let r = a.lock.renew(session, fence, lease_ms, now);
                self.schedule(&lock, now);
                let r = r
                    .map(|g| LockResult::Granted { fence: g.fence, expires_in_ms: self.expires_in(&g, now) })
                    .map_err(|e| from_lock_error(&lock, session, e));
                self.answer(myself, 0, |lsn| deferred(lsn, reply, r));
            }
            LockOp::Status { lock } => {
                let r = match self.locks.get(&lock) {
                    Some(a) => self.status(&lock, a, now),
                    None => {
                        let rec = self.store()?.lock_rec(&lock)?;
                        LockStatus {
                            lock,
                            holder: None,
                            last_fence: rec.last_fence,
                            waiters: 0,
                            reentry_max: rec.reentry_max,
                            lock_delay_ms: rec.lock_delay_ms,
                        }
                    }
                };
                self.answer(myself, 0, |lsn| deferred(lsn, reply, Ok(LockResult::Status(r))));
            }
            LockOp::List => {
                let mut locks: Vec<LockStatus> =
                    self.locks.iter().map(|(n, a)| self.status(n, a, now)).collect();
                locks.sort_by(|a, b| a.lock.cmp(&b.lock));
                let mut sems: Vec<SemStatus> =
                    self.sems.iter().map(|(n, s)| Self::sem_status(n, s)).collect();
                sems.sort_by(|a, b| a.sem.cmp(&b.sem));
                self.answer(myself, 0, |lsn| deferred(lsn, reply, Ok(LockResult::List { locks, sems })));
            }
            LockOp::Configure { lock, reentry_max, lock_delay_ms } => {
                if reentry_max > REENTRY_MAX || lock_delay_ms > SESSION_TTL_MS_MAX {
                    let _ = reply.send(Err(GridError::Invalid(format!(
                        "reentry_max is at most {REENTRY_MAX} and lock_delay_ms at most {SESSION_TTL_MS_MAX}"
                    ))));
                    return Ok(());
                }
                let a = self.activate(&lock)?;
                a.lock.reentry_max = reentry_max;
                a.lock.lock_delay_ms = lock_delay_ms;
                let lsn = self.persist_lock(&lock)?;
                self.answer(myself, lsn, |lsn| deferred(lsn, reply, Ok(LockResult::Done)));
            }
            LockOp::SemAcquire { sem, session, size, permits, wait_ms } => {
                if wait_ms > LOCK_WAIT_MS_MAX || size == 0 || permits == 0 || permits > size {
                    let _ = reply.send(Err(GridError::Invalid(format!(
                        "a semaphore needs size ≥ 1 and 1 ≤ permits ≤ size (got {permits} of {size}), wait_ms ≤ {LOCK_WAIT_MS_MAX}"
                    ))));
                    return Ok(());
                }
                if !self.sems.contains_key(&sem) {
                    let s = match self.store()?.sem_rec(&sem)? {
                        Some(rec) => Semaphore::restore(rec.size, rec.held),
                        None => Semaphore::new(size),
                    };
                    self.sems.insert(sem.clone(), s);
                }
                self.prune(&sem);
                let waiter = self.next_waiter;
                self.next_waiter += 1;
                let s = self.sems.get_mut(&sem).expect("inserted above");
                if s.size() != size {
                    let e =
                        GridError::Invalid(format!("semaphore {sem} has {} permits, not {size}", s.size()));
                    let _ = reply.send(Err(e));
                    return Ok(());
                }
                if s.waiting() >= LOCK_WAITERS_MAX {
                    let _ = reply.send(Err(GridError::LimitExceeded {
                        what: format!("waiters on semaphore {sem}"),
                        got: LOCK_WAITERS_MAX as u64 + 1,
                        max: LOCK_WAITERS_MAX as u64,
                    }));
                    return Ok(());
                }
                match s.acquire(waiter, session, permits) {
                    Some(true) => {
                        let held = s.held_by(session);
                        let lsn = self.persist_sem(&sem)?;
                        self.answer(myself, lsn, move |lsn| {
                            deferred(lsn, reply, Ok(LockResult::Permits { held }))
                        });
                    }
                    Some(false) if wait_ms == 0 => {
                        s.cancel(waiter);
                        self.answer(myself, 0, |lsn| deferred(lsn, reply, Ok(LockResult::Timeout)));
                    }
                    Some(false) => {
                        let p = Pending { session, wants: Wants::Sem(sem), port: reply, timer: None };
                        self.park(myself, waiter, p, wait_ms);
                    }
                    None => unreachable!("permits checked against the size above"),
                }
            }
            LockOp::SemRelease { sem, session, permits } => {
                self.prune(&sem);
                let sessions = &self.sessions;
                let r = match self.sems.get_mut(&sem) {
                    Some(s) if s.held_by(session) >= permits => {
                        let granted = s.release(session, permits, |x| sessions.alive(x, now));
                        let held = s.held_by(session);
                        let lsn = self.persist_sem(&sem)?;
                        self.hand_permits(myself, &sem, granted, lsn);
                        Ok((LockResult::Permits { held }, lsn))
                    }
                    s => Err(GridError::Invalid(format!(
                        "session {session} holds {} permits of semaphore {sem}, fewer than {permits}",
                        s.map_or(0, |s| s.held_by(session))
                    ))),
                };
                let (r, lsn) = match r {
                    Ok((r, lsn)) => (Ok(r), lsn),
                    Err(e) => (Err(e), 0),
                };
                self.answer(myself, lsn, |lsn| deferred(lsn, reply, r));
            }
            LockOp::SemStatus { sem } => {
                let r = match self.sems.get(&sem) {
                    Some(s) => Ok(Self::sem_status(&sem, s)),
                    None => match self.store()?.sem_rec(&sem)? {
                        Some(rec) => Ok(Self::sem_status(&sem, &Semaphore::restore(rec.size, rec.held))),
                        None => Err(GridError::Invalid(format!("no semaphore {sem}"))),
                    },
                };
                self.answer(myself, 0, |lsn| deferred(lsn, reply, r.map(LockResult::Sem)));
            }
        }
        Ok(())
    }

    /// A waiter's wait ended without a grant.
    fn wait_over(&mut self, myself: &ActorRef<LockMsg>, waiter: u64) {
        let Some(p) = self.pending.remove(&waiter) else { return };
        match &p.wants {
            Wants::Lock(name) => {
                if let Some(a) = self.locks.get_mut(name) {
                    a.lock.cancel(waiter);
                }
            }
            Wants::Sem(name) => {
                if let Some(s) = self.sems.get_mut(name) {
                    s.cancel(waiter);
                }
            }
        }
        self.answer(myself, 0, |lsn| deferred(lsn, p.port, Ok(LockResult::Timeout)));
        match &p.wants {
            Wants::Lock(name) | Wants::Sem(name) => self.settle(name),
        }
    }
}

/// The lock service actor (empty: everything lives in `LockState`).
pub struct LockActor;

impl Actor for LockActor {
    type Msg = LockMsg;
    type State = LockState;
    type Arguments = LockArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<LockMsg>,
        args: LockArgs,
    ) -> Result<LockState, ActorProcessingErr> {
        let heap = open_heap(&args.path, &args.heap).await?;
        let (store, loaded) = match &args.cluster {
            // Nothing is written until this node is the primary (`roles`).
            Some(_) => (LockStore::open_replicated(heap), None),
            None => {
                let (store, loaded) = LockStore::open(heap)?;
                (store, Some(loaded))
            }
        };
        myself.send_interval(TICK, || LockMsg::Tick);
        let gate = LogGate::new(store, args.heap.fsync, args.view, myself.clone())?
            .named(args.path.display().to_string());
        let cluster = args.cluster.map(|net| {
            let service = crate::cluster::map::LOCKS_SERVICE;
            ServiceRepl::new(service, net, args.path.clone(), args.heap.fsync)
        });
        let mut st = LockState {
            gate,
            origin: tokio::time::Instant::now(),
            epoch: 0,
            sessions: Sessions::restore(0, std::iter::empty(), 0),
            locks: HashMap::new(),
            sems: HashMap::new(),
            pending: HashMap::new(),
            next_waiter: 1,
            fences: args.fences,
            timers: BTreeSet::new(),
            holdings: HashMap::new(),
            sem_holdings: HashMap::new(),
            sem_recorded: HashMap::new(),
            ended: args.ended,
            cluster,
            loaded: false,
            failed: None,
            fanout: None,
            barrier: Arc::default(),
        };
        match loaded {
            Some(loaded) => st.restore(loaded),
            None => {
                // This node's mirror of the cluster's fences until it serves the locks itself.
                st.fences.set_valid_until(0);
                st.replicate(&myself)?;
            }
        }
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<LockMsg>,
        msg: LockMsg,
        st: &mut LockState,
    ) -> Result<(), ActorProcessingErr> {
        handle_gated(st, &myself, msg).await?;
        st.after().map_err(|e| format!("the lock service: {e}"))?;
        Ok(())
    }
}

impl GatedService for LockState {
    type Store = LockStore;
    type Msg = LockMsg;
    const WHAT: &'static str = "lock service";

    fn gate(&mut self) -> &mut LogGate<LockStore> {
        &mut self.gate
    }

    fn refuse(msg: LockMsg) {
        match msg {
            LockMsg::Call(_, r) => drop(r.send(Err(GridError::Closed))),
            LockMsg::Check(r) => drop(r.send(Err(GridError::Closed))),
            LockMsg::Digest(r) => drop(r.send(Err(GridError::Closed))),
            _ => {}
        }
    }

    fn serve(&mut self, myself: &ActorRef<LockMsg>, msg: LockMsg) -> Result<(), GridError> {
        match msg {
            LockMsg::Call(op, reply) => {
                if self.cluster.is_some() {
                    self.roles(myself)?;
                    if !self.serving_now() {
                        let c = self.cluster.as_mut().expect("in a cluster");
                        let e = c.admit().err().unwrap_or_else(|| c.not_primary());
                        let _ = reply.send(Err(e));
                        return Ok(());
                    }
                }
                self.call(myself, op, reply)
            }
            LockMsg::WaitOver(w) => {
                self.wait_over(myself, w);
                Ok(())
            }
            LockMsg::Tick => {
                self.clear_barrier();
                // Nothing expires while another node may be the primary (its own clock runs).
                if !self.serving_now() {
                    return Ok(());
                }
                self.tick(myself)
            }
            LockMsg::FenceAsk(from, ask) => {
                self.fence_ask(from, ask);
                Ok(())
            }
            LockMsg::Placement(p) => self.replicated(myself, ServiceEvent::Placement(p)),
            LockMsg::Repl(from, wire) => self.replicated(myself, ServiceEvent::Frame(from, wire)),
            LockMsg::ReplTick => self.replicated(myself, ServiceEvent::Tick),
            LockMsg::Digest(reply) => {
                let r = match self.cluster.as_ref() {
                    Some(c) => c.digest(self.gate.shard.as_ref()),
                    None => Err(GridError::Invalid(
                        "the lock service is not replicated (not in a cluster)".into(),
                    )),
                };
                self.answer(myself, 0, |lsn| deferred(lsn, reply, r));
                Ok(())
            }
            LockMsg::Check(reply) => {
                let r = self.store().and_then(|s| s.check()).and_then(|()| self.check_memory());
                let _ = reply.send(r);
                Ok(())
            }
            LockMsg::InjectPanic => panic!("injected panic (test hook)"),
            _ => Ok(()),
        }
    }
}
