//! The queue service's requests and answers, as they travel on the wire (protocol version 1,
//! `RequestBody::Queue`): variants append-only, fields fixed (pinned by the golden-bytes test in
//! src/protocol.rs). docs/protocol.md describes each.

use serde::{Deserialize, Serialize};

use crate::lock::SessionId;
use crate::value::Value;

/// Longest queue name, in bytes.
pub const QUEUE_NAME_BYTES_MAX: usize = 256;

/// How a pop hands items out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// At-least-once: the item stays, in flight, until acked (or its visibility ends).
    #[default]
    Ack,
    /// At-most-once: removed at once; lost if the answer never reaches the caller.
    Take,
}

/// Names one delivery of one item: `seq`, then `delivery` (the state machine's type).
pub use super::Receipt;

/// One request to the queue service. Every request names its queue, created with default options
/// on first use.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum QueueOp {
    /// Adds `value`. A `dedup_key` pushed within the queue's dedup window returns the original
    /// seq and adds nothing. `delay_ms`: ready only after this long. `fence`: refused with
    /// `StaleFence` unless it is the current, held grant of the lock.
    Push {
        queue: String,
        value: Value,
        dedup_key: Option<String>,
        delay_ms: u64,
        fence: Option<(String, u64)>,
    },
    /// Up to `n` ready items, waiting up to `wait_ms` (≤ 60 s) for the first. In `Ack` mode each
    /// is in flight for `visibility_ms` (the queue's default if none); `session`: its deliveries
    /// return to ready when that lock session ends.
    Pop {
        queue: String,
        n: u32,
        wait_ms: u64,
        mode: Mode,
        visibility_ms: Option<u64>,
        session: Option<SessionId>,
    },
    /// Removes the delivered item; `StaleReceipt` if the receipt is not its current delivery.
    Ack {
        queue: String,
        receipt: Receipt,
    },
    /// Gives a delivery back: ready now, or after `delay_ms`.
    Nack {
        queue: String,
        receipt: Receipt,
        delay_ms: u64,
    },
    /// Moves a delivery's deadline to `ms` from now.
    Extend {
        queue: String,
        receipt: Receipt,
        ms: u64,
    },
    /// The next `n` ready items, in order, delivering nothing.
    Peek {
        queue: String,
        n: u32,
    },
    Len {
        queue: String,
    },
    /// Drops every item (in flight too: their receipts become stale).
    Purge {
        queue: String,
    },
    /// Sets the queue's options (they apply to later deliveries).
    Configure {
        queue: String,
        options: QueueOptions,
    },
    /// Every queue in memory (with a record, items or blocked pops), and its counts.
    List,
    /// `Push`, waiting up to `wait_ms` (≤ 60 s) for room when the queue is at its `max_len`
    /// (blocked pushes are served in arrival order; `QueueFull` when the wait ends).
    PushWait {
        queue: String,
        value: Value,
        dedup_key: Option<String>,
        delay_ms: u64,
        fence: Option<(String, u64)>,
        wait_ms: u64,
    },
}

impl QueueOp {
    /// The queue named, if any.
    pub fn queue(&self) -> Option<&str> {
        match self {
            QueueOp::Push { queue, .. }
            | QueueOp::Pop { queue, .. }
            | QueueOp::Ack { queue, .. }
            | QueueOp::Nack { queue, .. }
            | QueueOp::Extend { queue, .. }
            | QueueOp::Peek { queue, .. }
            | QueueOp::Len { queue }
            | QueueOp::Purge { queue }
            | QueueOp::Configure { queue, .. }
            | QueueOp::PushWait { queue, .. } => Some(queue),
            QueueOp::List => None,
        }
    }

    /// Whether the request changes the queue (write permission) rather than only reads it.
    pub fn writes(&self) -> bool {
        !matches!(self, QueueOp::Peek { .. } | QueueOp::Len { .. } | QueueOp::List)
    }
}

/// A queue's options.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueOptions {
    /// Most items held (ready, in flight and delayed); a push past it is `QueueFull`.
    pub max_len: Option<u64>,
    /// Deliveries an item gets before it moves to `dead_letter`.
    pub max_deliveries: u32,
    /// Default in-flight time of a delivery.
    pub visibility_ms: u64,
    /// How long a push's dedup key is remembered.
    pub dedup_window_ms: u64,
    /// The dead-letter queue (default `<name>.dead`; none for a queue whose name ends in
    /// `.dead`, or is too long for the suffix). Without one, items are redelivered without
    /// limit.
    pub dead_letter: Option<String>,
}

impl QueueOptions {
    /// The defaults of queue `name`.
    pub fn defaults(name: &str) -> QueueOptions {
        QueueOptions {
            max_len: None,
            max_deliveries: 16,
            visibility_ms: 30_000,
            dedup_window_ms: 300_000,
            dead_letter: (!name.ends_with(".dead") && name.len() + 5 <= QUEUE_NAME_BYTES_MAX)
                .then(|| format!("{name}.dead")),
        }
    }
}

/// One item handed out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub seq: u64,
    /// What `ack`, `nack` and `extend` name (in `Take` mode, informational).
    pub receipt: Receipt,
    /// This delivery's number (1 for the first).
    pub deliveries: u32,
    pub value: Value,
}

/// A queue's counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueLen {
    pub ready: u64,
    pub in_flight: u64,
    pub delayed: u64,
    /// Poppers blocked on it.
    pub waiters: u64,
}

/// The answer to a `QueueOp`. Append-only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum QueueResult {
    /// `duplicate`: the dedup key was seen; `seq` is the original push's.
    Pushed {
        seq: u64,
        duplicate: bool,
    },
    /// Possibly empty (the wait ended).
    Delivered(Vec<Delivery>),
    Done,
    Items(Vec<(u64, Value)>),
    Len(QueueLen),
    Purged {
        items: u64,
    },
    List(Vec<(String, QueueLen)>),
}
