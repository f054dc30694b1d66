//! `GridError`: what the actor layer and its clients see. Typed, cloneable (it crosses actor and
//! network boundaries), and specific about whether a write may have applied.

use serde::{Deserialize, Serialize};

use crate::table::TableError;

/// Every way a grid operation can fail. On the wire as it is (protocol version 1): variants
/// are append-only, pinned by the golden-bytes test in src/protocol.rs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum GridError {
    #[error("no such table: {0}")]
    NoSuchTable(String),
    #[error("table already exists: {0}")]
    TableExists(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("compare-and-set {index} in the batch did not match; nothing was written")]
    CasFailed { index: u64 },
    #[error("{what} is {got}, the limit is {max}")]
    LimitExceeded { what: String, got: u64, max: u64 },
    #[error("value error: {0}")]
    Value(String),
    #[error("data corrupted: {0}")]
    Corrupted(String),
    #[error("storage error: {0}")]
    Storage(String),
    /// The shard failed and was restarted too often; it refuses requests until the grid reopens.
    #[error("table {table} shard {shard} has failed: {reason}")]
    ShardFailed { table: String, shard: u32, reason: String },
    /// The request could not be answered (the shard died while handling it, or is restarting).
    /// A write may or may not have been applied.
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("grid is closed")]
    Closed,
    /// The connection's token was missing or unknown.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The token lacks a permission for a collection.
    #[error("permission denied: {permission} on {collection}")]
    PermissionDenied { collection: String, permission: String },
    /// A protocol violation by the peer (malformed frame, wrong version).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A snippet failed (syntax, name, type, value, `fail`, or a budget), with its position.
    /// Nothing it would have written was written.
    #[error("snippet {0}")]
    Snippet(crate::snippet::SnippetFailure),
    /// The sandbox worker running a snippet died (killed, crashed) before it finished; nothing
    /// the snippet would have written was written. The pool replaces the worker.
    #[error("snippet worker died: {0}")]
    WorkerDied(String),
    /// A grid-scoped snippet kept meeting concurrent changes to what it read and gave up after
    /// `attempts` runs; nothing it would have written was written.
    #[error("snippet conflicted with concurrent writes {attempts} times; nothing was written")]
    Conflict { attempts: u32 },
    #[error("no such feed: {0}")]
    NoSuchFeed(String),
    /// A feed or table of that name exists (they share one namespace: snippets name both).
    #[error("a feed or table named {0} exists")]
    FeedExists(String),
    /// A caller-supplied feed id that is already taken by a different value ("exists").
    #[error("feed record {id} exists")]
    IdExists { id: u64 },
    /// No feed record with this id ("not_found").
    #[error("no feed record {id}")]
    NoSuchRecord { id: u64 },
    /// Retention dropped records this read or cursor would have returned; the oldest kept id
    /// is `first_available` (read from `FirstAvailable` to skip to it).
    #[error("position trimmed by retention; first available id is {first_available}")]
    Trimmed { first_available: u64 },
    #[error("no such cursor: {0}")]
    NoSuchCursor(String),
    /// A fenced write whose fence is not the current grant of its lock (or the lock is no longer
    /// held): nothing of the request was applied. `current` is the fence now, if held.
    #[error("fence {presented} of lock {lock} is stale (current: {current:?}); nothing was written")]
    StaleFence { lock: String, presented: u64, current: Option<u64> },
    /// A release or renew with a fence that is not the holder's (`current`: the holder's now).
    #[error("not the holder of lock {lock} (current fence: {current:?})")]
    NotHolder { lock: String, current: Option<u64> },
    /// The session is closed, expired, or its secret did not match.
    #[error("session {session} has expired or does not exist")]
    SessionExpired { session: u64 },
    /// A push found the queue at its `max_len`; nothing was added.
    #[error("queue {queue} is full ({max_len} items); nothing was added")]
    QueueFull { queue: String, max_len: u64 },
    /// The receipt is not the item's current delivery (it was acked, redelivered or purged);
    /// nothing changed.
    #[error("receipt {seq}/{delivery} of queue {queue} is stale; nothing changed")]
    StaleReceipt { queue: String, seq: u64, delivery: u32 },
    /// A replicated write was applied and logged by the primary, but not acknowledged by the
    /// replicas its `sync(n)` asks for in time: it may survive a failover or not (no rollback).
    #[error("indeterminate: {0}")]
    Indeterminate(String),
    /// This node does not serve this shard now (it is a replica, or no primary is known):
    /// ask `primary` (its client address in `addr`), after refreshing the cluster map.
    #[error("shard {shard} of {table} is not served here (primary: {primary:?} at {addr:?})")]
    NotPrimary { table: String, shard: u32, primary: Option<u64>, addr: Option<String> },
    /// The shard is recovering (replaying its op log after a restart) and the client asked not
    /// to wait for it (`SetSession { wait_for_recovery: false }`); nothing was done. Bytes of
    /// the op log replayed of those to replay (both 0 before the replay began).
    #[error(
        "shard {shard} of {table} is recovering ({replayed_bytes} of {total_bytes} bytes of its op log replayed)"
    )]
    Recovering { table: String, shard: u32, replayed_bytes: u64, total_bytes: u64 },
}

impl From<TableError> for GridError {
    fn from(e: TableError) -> Self {
        match e {
            TableError::Key(k) => GridError::Invalid(k.to_string()),
            TableError::Value(v) => GridError::Value(v.to_string()),
            TableError::Heap(h) => h.into(),
            TableError::CasFailed { index } => GridError::CasFailed { index },
            TableError::LimitExceeded { what, got, max } => {
                GridError::LimitExceeded { what: what.into(), got, max }
            }
            e @ TableError::Corrupted { .. } => GridError::Corrupted(e.to_string()),
            TableError::StaleFence(s) => s.into(),
        }
    }
}

impl From<heapgrid_heap::Error> for GridError {
    fn from(e: heapgrid_heap::Error) -> Self {
        use heapgrid_heap::Error as H;
        match e {
            H::Corrupted { .. } | H::Format(_) => GridError::Corrupted(e.to_string()),
            H::LimitExceeded { what, got, max } => GridError::LimitExceeded { what: what.into(), got, max },
            e => GridError::Storage(e.to_string()),
        }
    }
}

impl From<crate::lock::fence::Stale> for GridError {
    fn from(s: crate::lock::fence::Stale) -> Self {
        GridError::StaleFence { lock: s.lock, presented: s.presented, current: s.current }
    }
}

impl GridError {
    /// Every variant's `kind`, by its wire index (pinned by the protocol's golden test).
    pub const KINDS: [&'static str; 31] = [
        "no_such_table",
        "table_exists",
        "invalid",
        "cas_failed",
        "limit_exceeded",
        "value",
        "corrupted",
        "storage",
        "shard_failed",
        "unavailable",
        "closed",
        "unauthenticated",
        "permission_denied",
        "protocol",
        "snippet",
        "worker_died",
        "conflict",
        "no_such_feed",
        "feed_exists",
        "id_exists",
        "no_such_record",
        "trimmed",
        "no_such_cursor",
        "stale_fence",
        "not_holder",
        "session_expired",
        "queue_full",
        "stale_receipt",
        "indeterminate",
        "not_primary",
        "recovering",
    ];

    /// The variant's name in metrics and logs (snake case, stable).
    pub fn kind(&self) -> &'static str {
        match self {
            GridError::NoSuchTable { .. } => "no_such_table",
            GridError::TableExists { .. } => "table_exists",
            GridError::Invalid { .. } => "invalid",
            GridError::CasFailed { .. } => "cas_failed",
            GridError::LimitExceeded { .. } => "limit_exceeded",
            GridError::Value { .. } => "value",
            GridError::Corrupted { .. } => "corrupted",
            GridError::Storage { .. } => "storage",
            GridError::ShardFailed { .. } => "shard_failed",
            GridError::Unavailable { .. } => "unavailable",
            GridError::Closed => "closed",
            GridError::Unauthenticated { .. } => "unauthenticated",
            GridError::PermissionDenied { .. } => "permission_denied",
            GridError::Protocol { .. } => "protocol",
            GridError::Snippet { .. } => "snippet",
            GridError::WorkerDied { .. } => "worker_died",
            GridError::Conflict { .. } => "conflict",
            GridError::NoSuchFeed { .. } => "no_such_feed",
            GridError::FeedExists { .. } => "feed_exists",
            GridError::IdExists { .. } => "id_exists",
            GridError::NoSuchRecord { .. } => "no_such_record",
            GridError::Trimmed { .. } => "trimmed",
            GridError::NoSuchCursor { .. } => "no_such_cursor",
            GridError::StaleFence { .. } => "stale_fence",
            GridError::NotHolder { .. } => "not_holder",
            GridError::SessionExpired { .. } => "session_expired",
            GridError::QueueFull { .. } => "queue_full",
            GridError::StaleReceipt { .. } => "stale_receipt",
            GridError::Indeterminate { .. } => "indeterminate",
            GridError::NotPrimary { .. } => "not_primary",
            GridError::Recovering { .. } => "recovering",
        }
    }
}
