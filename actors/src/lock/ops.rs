//! The lock service's requests and answers, as they travel on the wire (protocol version 1,
//! `RequestBody::Lock`): variants append-only, fields fixed (pinned by the golden-bytes test in
//! src/protocol.rs). docs/protocol.md describes each.

use serde::{Deserialize, Serialize};

use super::SessionId;

/// One request to the lock service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LockOp {
    /// Opens a session (`ttl_ms`: default 15 s, bounds 1 s..10 min).
    Open {
        ttl_ms: Option<u64>,
    },
    /// Takes a session up again after a reconnect (or a server restart), within its ttl.
    Reattach {
        session: SessionId,
        secret: u64,
    },
    /// Keeps the session alive for another ttl (any request naming it does too).
    Heartbeat {
        session: SessionId,
    },
    /// Ends the session: everything it holds is released at once.
    Close {
        session: SessionId,
    },
    /// Waits up to `wait_ms` (0: try once) for the lock; `lease_ms` caps this grant.
    Acquire {
        lock: String,
        session: SessionId,
        wait_ms: u64,
        lease_ms: Option<u64>,
    },
    /// Releases the grant with this fence (`NotHolder` if it is not the current one).
    Release {
        lock: String,
        session: SessionId,
        fence: u64,
    },
    /// Restarts the grant's lease (`lease_ms`: none means as long as the session lives).
    Renew {
        lock: String,
        session: SessionId,
        fence: u64,
        lease_ms: Option<u64>,
    },
    Status {
        lock: String,
    },
    /// Every lock held, waited for or in its lock delay, and every semaphore in use.
    List,
    /// Per-lock options: reentrant acquires (0: off) and the delay after an expiry.
    Configure {
        lock: String,
        reentry_max: u32,
        lock_delay_ms: u64,
    },
    /// Waits up to `wait_ms` for `permits` of semaphore `sem`, created with `size` permits on
    /// first use (a later `size` must match).
    SemAcquire {
        sem: String,
        session: SessionId,
        size: u32,
        permits: u32,
        wait_ms: u64,
    },
    /// Gives back `permits` of those the session holds.
    SemRelease {
        sem: String,
        session: SessionId,
        permits: u32,
    },
    SemStatus {
        sem: String,
    },
}

impl LockOp {
    /// The session the request is made in, if any (it counts as a heartbeat).
    pub fn session(&self) -> Option<SessionId> {
        match self {
            LockOp::Reattach { session, .. }
            | LockOp::Heartbeat { session }
            | LockOp::Close { session }
            | LockOp::Acquire { session, .. }
            | LockOp::Release { session, .. }
            | LockOp::Renew { session, .. }
            | LockOp::SemAcquire { session, .. }
            | LockOp::SemRelease { session, .. } => Some(*session),
            LockOp::Open { .. }
            | LockOp::Status { .. }
            | LockOp::List
            | LockOp::Configure { .. }
            | LockOp::SemStatus { .. } => None,
        }
    }

    /// The lock or semaphore named (for permissions), if any.
    pub fn name(&self) -> Option<&str> {
        match self {
            LockOp::Acquire { lock, .. }
            | LockOp::Release { lock, .. }
            | LockOp::Renew { lock, .. }
            | LockOp::Status { lock }
            | LockOp::Configure { lock, .. } => Some(lock),
            LockOp::SemAcquire { sem, .. } | LockOp::SemRelease { sem, .. } | LockOp::SemStatus { sem } => {
                Some(sem)
            }
            _ => None,
        }
    }
}

/// The answer to a `LockOp`. Append-only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LockResult {
    Session {
        session: SessionId,
        secret: u64,
        ttl_ms: u64,
    },
    Done,
    /// The lock is the caller's: `fence` guards its writes; it lasts `expires_in_ms` more
    /// unless renewed (the lease's or the session's, whichever ends first).
    Granted {
        fence: u64,
        expires_in_ms: u64,
    },
    /// The wait ended without a grant.
    Timeout,
    Status(LockStatus),
    List {
        locks: Vec<LockStatus>,
        sems: Vec<SemStatus>,
    },
    /// Permits the session now holds of the semaphore.
    Permits {
        held: u32,
    },
    Sem(SemStatus),
}

/// A lock's state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LockStatus {
    pub lock: String,
    pub holder: Option<Holder>,
    /// The newest fence issued (the holder's, if held).
    pub last_fence: u64,
    pub waiters: u32,
    pub reentry_max: u32,
    pub lock_delay_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Holder {
    pub session: SessionId,
    pub fence: u64,
    pub expires_in_ms: u64,
}

/// A semaphore's state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SemStatus {
    pub sem: String,
    pub size: u32,
    pub in_use: u32,
    pub waiters: u32,
    /// Permits held, by session.
    pub holders: Vec<(SessionId, u32)>,
}
