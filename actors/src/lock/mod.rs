//! Locks (shared LOCKS.md): the pure state machines behind sessions, lock actors and
//! semaphores. They take the time (`now_ms`, from the server's monotonic clock) and the
//! liveness of sessions as arguments, so they can be tested directly and replayed; the actors
//! that will wrap them (a session registry, one actor per lock under a lock supervisor) are not
//! built yet, nor persistence, fenced writes or the surfaces (issue 13 is open).
//!
//! - `Sessions`: open (ttl bounds), heartbeat, reattach with the secret, close, expiry.
//! - `Lock`: one lock: the holder and its fence, a strictly FIFO queue of waiters (dead ones are
//!   skipped at grant time), leases, renew, optional reentrancy with a limit, optional lock
//!   delay after an expiry (not after a release).
//! - `Semaphore`: permits owned by sessions, strict FIFO (head-of-line blocking accepted).
//!
//! Invariant: a lock's fences strictly increase (`next_fence` only grows; every grant takes a
//! new one), and at most one session holds a lock.
//! Invariant: a semaphore's granted permits never exceed its size.
//! Invariant: nothing here reads a clock.

pub mod actor;
pub mod fence;
pub mod ops;
pub mod store;
pub mod supervisor;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// A session's id.
pub type SessionId = u64;

/// Shortest and longest session ttl.
pub const SESSION_TTL_MS_MIN: u64 = 1_000;
pub const SESSION_TTL_MS_MAX: u64 = 600_000;
pub const SESSION_TTL_MS_DEFAULT: u64 = 15_000;

/// Why a lock operation was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockError {
    /// The fence presented is not the current grant's (or the session does not hold the lock).
    NotHolder {
        current: Option<u64>,
    },
    SessionExpired,
    /// The ttl asked for is outside the bounds.
    BadTtl {
        ttl_ms: u64,
    },
    /// A reentrant acquire past the lock's limit.
    ReentryLimit,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Session {
    secret: u64,
    ttl_ms: u64,
    expires_at_ms: u64,
}

/// The session table: ids are never reused. Deadlines are indexed, so `expire` costs what it
/// removes, not the number of sessions.
#[derive(Clone, Debug, Default)]
pub struct Sessions {
    live: BTreeMap<SessionId, Session>,
    /// `(expires_at_ms, id)` of every live session.
    deadlines: BTreeSet<(u64, SessionId)>,
    next_id: SessionId,
}

impl Sessions {
    fn insert(&mut self, id: SessionId, s: Session) {
        self.deadlines.insert((s.expires_at_ms, id));
        self.live.insert(id, s);
    }

    /// Opens a session; `secret` is chosen by the caller (random, from the actor).
    pub fn open(&mut self, ttl_ms: u64, secret: u64, now_ms: u64) -> Result<SessionId, LockError> {
        if !(SESSION_TTL_MS_MIN..=SESSION_TTL_MS_MAX).contains(&ttl_ms) {
            return Err(LockError::BadTtl { ttl_ms });
        }
        self.next_id += 1;
        let id = self.next_id;
        self.insert(id, Session { secret, ttl_ms, expires_at_ms: now_ms + ttl_ms });
        Ok(id)
    }

    /// A heartbeat (or any request in the session): extends it by its ttl.
    pub fn touch(&mut self, id: SessionId, now_ms: u64) -> Result<(), LockError> {
        match self.live.get_mut(&id) {
            Some(s) if s.expires_at_ms > now_ms => {
                self.deadlines.remove(&(s.expires_at_ms, id));
                s.expires_at_ms = now_ms + s.ttl_ms;
                self.deadlines.insert((s.expires_at_ms, id));
                Ok(())
            }
            _ => Err(LockError::SessionExpired),
        }
    }

    /// Reattaches after a reconnect: the secret must match and the session must be alive.
    pub fn reattach(&mut self, id: SessionId, secret: u64, now_ms: u64) -> Result<(), LockError> {
        match self.live.get(&id) {
            Some(s) if s.secret == secret => self.touch(id, now_ms),
            _ => Err(LockError::SessionExpired),
        }
    }

    /// The table as stored: `last_id` issued so far, and the sessions recorded, each alive for
    /// one ttl from `now_ms` (a restart: only a reattach keeps them longer).
    pub fn restore(
        last_id: SessionId,
        sessions: impl IntoIterator<Item = (SessionId, u64, u64)>,
        now_ms: u64,
    ) -> Sessions {
        let mut out = Sessions { next_id: last_id, ..Sessions::default() };
        for (id, secret, ttl_ms) in sessions {
            out.insert(id, Session { secret, ttl_ms, expires_at_ms: now_ms + ttl_ms });
        }
        out
    }

    /// The last id issued.
    pub fn last_id(&self) -> SessionId {
        self.next_id
    }

    /// `(secret, ttl_ms, expires_at_ms)` of a live (or not yet swept) session.
    pub fn get(&self, id: SessionId) -> Option<(u64, u64, u64)> {
        self.live.get(&id).map(|s| (s.secret, s.ttl_ms, s.expires_at_ms))
    }

    /// Sessions not yet closed or swept.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Whether the session is alive at `now_ms`.
    pub fn alive(&self, id: SessionId, now_ms: u64) -> bool {
        self.live.get(&id).is_some_and(|s| s.expires_at_ms > now_ms)
    }

    /// Ends a session; whether it was alive.
    pub fn close(&mut self, id: SessionId) -> bool {
        match self.live.remove(&id) {
            Some(s) => {
                self.deadlines.remove(&(s.expires_at_ms, id));
                true
            }
            None => false,
        }
    }

    /// Removes and returns every session expired at `now_ms` (their grants must be released),
    /// in deadline order.
    pub fn expire(&mut self, now_ms: u64) -> Vec<SessionId> {
        let mut dead = Vec::new();
        while let Some(&(at, id)) = self.deadlines.first()
            && at <= now_ms
        {
            self.deadlines.pop_first();
            self.live.remove(&id);
            dead.push(id);
        }
        dead
    }
}

/// A grant of a lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    pub session: SessionId,
    pub fence: u64,
    /// When the grant's lease ends (`None`: it lasts as long as the session).
    pub lease_until_ms: Option<u64>,
    /// Nested acquires on a reentrant lock.
    pub depth: u32,
}

/// A queued acquire: `waiter` identifies the caller's request (its reply), `lease_ms` its lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waiter {
    pub waiter: u64,
    pub session: SessionId,
    pub lease_ms: Option<u64>,
}

/// What an acquire did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acquired {
    Granted(Grant),
    Queued,
}

/// One lock's state.
#[derive(Clone, Debug, Default)]
pub struct Lock {
    holder: Option<Grant>,
    waiters: VecDeque<Waiter>,
    /// The last fence issued (fences start at 1).
    last_fence: u64,
    /// Reentrant acquires allowed per holder (0: not reentrant).
    pub reentry_max: u32,
    /// After an expiry, the lock is not granted again before this time.
    pub lock_delay_ms: u64,
    delayed_until_ms: u64,
}

impl Lock {
    /// A lock whose fences continue above `last_fence` (as persisted).
    pub fn resume(last_fence: u64) -> Lock {
        Lock { last_fence, ..Lock::default() }
    }

    /// A lock as stored: its last fence, and the holder recorded (restored with depth 1 and no
    /// lease: after a restart it lasts as long as its session).
    pub fn restore(last_fence: u64, holder: Option<(SessionId, u64)>) -> Lock {
        let holder = holder.map(|(session, fence)| Grant { session, fence, lease_until_ms: None, depth: 1 });
        Lock { last_fence, holder, ..Lock::default() }
    }

    /// No holder and nobody waiting: the lock can leave memory (its last fence is stored).
    pub fn is_idle(&self, now_ms: u64) -> bool {
        self.holder.is_none() && self.waiters.is_empty() && now_ms >= self.delayed_until_ms
    }

    /// Until when an expiry holds the lock back (`lock_delay_ms`).
    pub fn delayed_until_ms(&self) -> u64 {
        self.delayed_until_ms
    }

    /// Drops queued waiters `dead` says are gone (their connection closed): called before a
    /// grant, so the lock never goes to one.
    pub fn drop_waiters(&mut self, dead: impl Fn(&Waiter) -> bool) -> Vec<u64> {
        let mut gone = Vec::new();
        self.waiters.retain(|w| {
            let d = dead(w);
            if d {
                gone.push(w.waiter);
            }
            !d
        });
        gone
    }

    pub fn holder(&self) -> Option<Grant> {
        self.holder
    }

    pub fn last_fence(&self) -> u64 {
        self.last_fence
    }

    pub fn waiters(&self) -> impl Iterator<Item = &Waiter> {
        self.waiters.iter()
    }

    /// How many wait.
    pub fn waiting(&self) -> usize {
        self.waiters.len()
    }

    fn grant(&mut self, w: Waiter, now_ms: u64) -> Grant {
        self.last_fence += 1;
        let g = Grant {
            session: w.session,
            fence: self.last_fence,
            lease_until_ms: w.lease_ms.map(|l| now_ms + l),
            depth: 1,
        };
        self.holder = Some(g);
        g
    }

    /// Asks for the lock. Free (and not delayed, and nobody queued ahead): granted with a new
    /// fence. Held by the same session on a reentrant lock: the same fence, one level deeper.
    /// Else queued at the back.
    pub fn acquire(&mut self, w: Waiter, now_ms: u64) -> Result<Acquired, LockError> {
        if let Some(h) = self.holder.as_mut()
            && h.session == w.session
            && self.reentry_max > 0
        {
            if h.depth > self.reentry_max {
                return Err(LockError::ReentryLimit);
            }
            h.depth += 1;
            return Ok(Acquired::Granted(*h));
        }
        if self.holder.is_none() && self.waiters.is_empty() && now_ms >= self.delayed_until_ms {
            return Ok(Acquired::Granted(self.grant(w, now_ms)));
        }
        self.waiters.push_back(w);
        Ok(Acquired::Queued)
    }

    /// Withdraws a queued acquire (its wait ended); whether it was queued.
    pub fn cancel(&mut self, waiter: u64) -> bool {
        let before = self.waiters.len();
        self.waiters.retain(|w| w.waiter != waiter);
        self.waiters.len() != before
    }

    /// Releases with the fence of the grant. A stale fence (or another session) is
    /// `NotHolder`. On a reentrant lock a nested release only unwinds one level. Returns the
    /// next grant, if a live waiter got the lock.
    pub fn release(
        &mut self,
        session: SessionId,
        fence: u64,
        now_ms: u64,
        alive: impl Fn(SessionId) -> bool,
    ) -> Result<Option<(u64, Grant)>, LockError> {
        match self.holder.as_mut() {
            Some(h) if h.session == session && h.fence == fence => {
                if h.depth > 1 {
                    h.depth -= 1;
                    return Ok(None);
                }
                self.holder = None;
                Ok(self.grant_next(now_ms, alive))
            }
            h => Err(LockError::NotHolder { current: h.map(|h| h.fence) }),
        }
    }

    /// Extends the holder's lease by `lease_ms` from now.
    pub fn renew(
        &mut self,
        session: SessionId,
        fence: u64,
        lease_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<Grant, LockError> {
        match self.holder.as_mut() {
            Some(h) if h.session == session && h.fence == fence => {
                h.lease_until_ms = lease_ms.map(|l| now_ms + l);
                Ok(*h)
            }
            h => Err(LockError::NotHolder { current: h.map(|h| h.fence) }),
        }
    }

    /// The session ended (`expired`: by its ttl, which starts the lock delay; else closed, a
    /// release): if it holds the lock, whatever its depth, the lock goes to the next live waiter.
    pub fn revoke(
        &mut self,
        session: SessionId,
        expired: bool,
        now_ms: u64,
        alive: impl Fn(SessionId) -> bool,
    ) -> Option<(u64, Grant)> {
        if self.holder.is_some_and(|h| h.session == session) {
            self.holder = None;
            if expired {
                self.delayed_until_ms = now_ms + self.lock_delay_ms;
            }
        }
        self.waiters.retain(|w| w.session != session);
        self.grant_next(now_ms, alive)
    }

    /// Time passes: a holder whose lease ended or whose session died loses the lock (starting
    /// the lock delay, if any); then, if the lock is free and not delayed, the first live waiter
    /// gets it (dead waiters ahead of it are dropped). Returns the new grant with its waiter id.
    pub fn tick(&mut self, now_ms: u64, alive: impl Fn(SessionId) -> bool) -> Option<(u64, Grant)> {
        if let Some(h) = self.holder
            && (h.lease_until_ms.is_some_and(|t| t <= now_ms) || !alive(h.session))
        {
            self.holder = None;
            self.delayed_until_ms = now_ms + self.lock_delay_ms;
        }
        self.grant_next(now_ms, alive)
    }

    fn grant_next(&mut self, now_ms: u64, alive: impl Fn(SessionId) -> bool) -> Option<(u64, Grant)> {
        if self.holder.is_some() || now_ms < self.delayed_until_ms {
            return None;
        }
        while let Some(w) = self.waiters.pop_front() {
            if alive(w.session) {
                return Some((w.waiter, self.grant(w, now_ms)));
            }
        }
        None
    }
}

/// A counting semaphore whose permits belong to sessions.
#[derive(Clone, Debug)]
pub struct Semaphore {
    size: u32,
    held: HashMap<SessionId, u32>,
    waiters: VecDeque<(u64, SessionId, u32)>,
}

impl Semaphore {
    pub fn new(size: u32) -> Semaphore {
        Semaphore { size, held: HashMap::new(), waiters: VecDeque::new() }
    }

    /// A semaphore as stored: its size and the permits each session holds.
    pub fn restore(size: u32, held: impl IntoIterator<Item = (SessionId, u32)>) -> Semaphore {
        Semaphore { size, held: held.into_iter().filter(|h| h.1 > 0).collect(), waiters: VecDeque::new() }
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    /// Permits held, by session, in session order.
    pub fn holders(&self) -> Vec<(SessionId, u32)> {
        let mut h: Vec<_> = self.held.iter().map(|(s, n)| (*s, *n)).collect();
        h.sort_unstable();
        h
    }

    pub fn waiting(&self) -> usize {
        self.waiters.len()
    }

    /// No permits out and nobody waiting: the semaphore can leave memory (its record stays).
    pub fn is_idle(&self) -> bool {
        self.held.is_empty() && self.waiters.is_empty()
    }

    /// Drops queued waiters whose callers are gone; then grants those now at the head.
    pub fn drop_waiters(&mut self, mut dead: impl FnMut(u64) -> bool) {
        self.waiters.retain(|w| !dead(w.0));
    }

    /// Grants waiters now at the head of the queue (after a drop or an expiry).
    pub fn grant(&mut self, alive: impl Fn(SessionId) -> bool) -> Vec<u64> {
        self.grant_waiters(alive)
    }

    /// Permits granted now.
    pub fn in_use(&self) -> u32 {
        self.held.values().sum()
    }

    pub fn held_by(&self, session: SessionId) -> u32 {
        self.held.get(&session).copied().unwrap_or(0)
    }

    /// Asks for `permits`: granted at once if they are free and nobody waits ahead (strict
    /// FIFO), else queued. More permits than the semaphore has can never be granted: `None`.
    pub fn acquire(&mut self, waiter: u64, session: SessionId, permits: u32) -> Option<bool> {
        if permits == 0 || permits > self.size {
            return None;
        }
        if self.waiters.is_empty() && self.in_use() + permits <= self.size {
            *self.held.entry(session).or_default() += permits;
            return Some(true);
        }
        self.waiters.push_back((waiter, session, permits));
        Some(false)
    }

    /// Withdraws a queued acquire; whether it was queued.
    pub fn cancel(&mut self, waiter: u64) -> bool {
        let before = self.waiters.len();
        self.waiters.retain(|w| w.0 != waiter);
        self.waiters.len() != before
    }

    /// Returns `permits` of the session's (at most what it holds); then grants waiters in order.
    pub fn release(
        &mut self,
        session: SessionId,
        permits: u32,
        alive: impl Fn(SessionId) -> bool,
    ) -> Vec<u64> {
        if let Some(h) = self.held.get_mut(&session) {
            *h -= permits.min(*h);
            if *h == 0 {
                self.held.remove(&session);
            }
        }
        self.grant_waiters(alive)
    }

    /// A session ended: its permits come back; waiters are granted in order.
    pub fn session_gone(&mut self, session: SessionId, alive: impl Fn(SessionId) -> bool) -> Vec<u64> {
        self.held.remove(&session);
        self.waiters.retain(|w| w.1 != session);
        self.grant_waiters(alive)
    }

    fn grant_waiters(&mut self, alive: impl Fn(SessionId) -> bool) -> Vec<u64> {
        let mut granted = Vec::new();
        while let Some(&(waiter, session, permits)) = self.waiters.front() {
            if !alive(session) {
                self.waiters.pop_front();
                continue;
            }
            if self.in_use() + permits > self.size {
                break;
            }
            self.waiters.pop_front();
            *self.held.entry(session).or_default() += permits;
            granted.push(waiter);
        }
        granted
    }
}

#[cfg(test)]
mod tests;
