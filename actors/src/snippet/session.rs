//! What a run reads through: the `Store` trait (implemented by the shard actor for
//! collection-scoped runs and by the grid for grid-scoped ones) and its scan query.

use crate::error::GridError;
use crate::key::Key;
use crate::value::Value;

/// A range or prefix query of a collection from a snippet.
#[derive(Clone, Debug, PartialEq)]
pub struct ScanQuery {
    pub prefix: Option<String>,
    pub start: Option<Key>,
    /// Exclusive.
    pub end: Option<Key>,
    pub limit: u32,
    pub reverse: bool,
}

impl ScanQuery {
    pub fn matches(&self, k: &Key) -> bool {
        if let Some(p) = &self.prefix {
            match k {
                Key::Str(s) if s.starts_with(p.as_str()) => {}
                _ => return false,
            }
        }
        self.start.as_ref().is_none_or(|s| k >= s) && self.end.as_ref().is_none_or(|e| k < e)
    }
}

/// Where a snippet's reads come from. Implemented by the shard actor (collection scope: its own
/// heap, only its own collection and shard) and by the grid (grid scope: messages to actors).
pub trait Store {
    fn get(&mut self, coll: &str, key: &Key) -> Result<Option<Value>, GridError>;
    fn contains(&mut self, coll: &str, key: &Key) -> Result<bool, GridError>;
    fn count(&mut self, coll: &str) -> Result<u64, GridError>;
    fn scan(&mut self, coll: &str, q: &ScanQuery) -> Result<Vec<(Key, Value)>, GridError>;
    /// Whether the run may write `key` of `coll`: asked for every write when the run ends,
    /// before its outcome is returned (a refusal fails the run, with no position).
    fn check_write(&mut self, coll: &str, key: &Key) -> Result<(), GridError>;
    /// At most `n` records of feed `feed` after id `at` (from the oldest if `None`), or, if
    /// `back`, before it (from the newest if `None`), as `{id, prev, next, version, value}`.
    fn feed_read(
        &mut self,
        feed: &str,
        at: Option<u64>,
        n: u32,
        back: bool,
    ) -> Result<Vec<Value>, GridError> {
        let _ = (at, n, back);
        Err(not_a_feed(feed))
    }
    /// Feed `feed`'s container: `{top, bottom, count, next_id, version}`.
    fn feed_state(&mut self, feed: &str) -> Result<Value, GridError> {
        Err(not_a_feed(feed))
    }
    /// Whether `fence` is the current, held grant of lock `lock` (`lock_held` in a snippet).
    fn lock_held(&mut self, lock: &str, fence: u64) -> Result<bool, GridError> {
        let _ = (lock, fence);
        Err(GridError::Invalid("lock_held is not available here".into()))
    }
    /// Whether the run may append to or remove from feed `feed` (asked when the run ends).
    fn check_feed_write(&mut self, feed: &str) -> Result<(), GridError> {
        Err(not_a_feed(feed))
    }
    /// Takes up to `n` ready items of queue `queue` now (`queue(q).take(n)`): handed out for
    /// good only if the run commits (the caller acks them then, and gives them back if not).
    fn queue_take(&mut self, queue: &str, n: u32) -> Result<Vec<Value>, GridError> {
        let _ = n;
        Err(no_queues(queue))
    }
    /// The next `n` ready items of queue `queue`, delivering nothing.
    fn queue_peek(&mut self, queue: &str, n: u32) -> Result<Vec<Value>, GridError> {
        let _ = n;
        Err(no_queues(queue))
    }
    /// Queue `queue`'s counts: `{ready, in_flight, delayed, waiters}`.
    fn queue_len(&mut self, queue: &str) -> Result<Value, GridError> {
        Err(no_queues(queue))
    }
    /// Whether the run may push to queue `queue` (asked when the run ends).
    fn check_queue_write(&mut self, queue: &str) -> Result<(), GridError> {
        Err(no_queues(queue))
    }
}

fn no_queues(name: &str) -> GridError {
    GridError::Invalid(format!(
        "queue {name} cannot be used here (queues are used from grid-scoped snippets)"
    ))
}

fn not_a_feed(name: &str) -> GridError {
    GridError::Invalid(format!(
        "{name} is not a feed this snippet can use (feeds are used from grid-scoped snippets)"
    ))
}
