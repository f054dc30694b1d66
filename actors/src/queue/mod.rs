//! Queues (shared QUEUES.md): the pure state machine of one queue. It takes the time (`now_ms`)
//! as an argument and reads no clock, so it can be tested directly on virtual time and replayed.
//! The queue service actor (`actor.rs`) wraps one per queue; `store.rs` is its heap format,
//! `ops.rs` its wire requests.
//!
//! - Items get a `seq` that never repeats. Each item is in exactly one of: ready (delivered in
//!   seq order; a redelivered item re-enters at its original seq), in flight (a delivery with a
//!   receipt and a deadline), or delayed (until a time).
//! - `push` (with a dedup key seen within the window: the original seq, not a new item; at
//!   `max_len`: `Full`), `pop` in `Ack` mode (to in flight, with a receipt `(seq, delivery)`) or
//!   `Take` mode (removed at once), `ack` (removes; a receipt that is not the current delivery
//!   is `StaleReceipt` and changes nothing), `nack` (back to ready, now or after a delay),
//!   `extend`, `tick` (deadlines and delays), `recover` (a restart: in flight back to ready,
//!   counts kept), `peek`, `len`, `purge`.
//! - An item whose delivery number reached `max_deliveries` and then fails (nack or expiry)
//!   leaves the queue as a `DeadLetter` for its dead-letter queue.
//!
//! Invariant: ready, in flight and delayed partition the items (`check`).

pub mod actor;
pub mod ops;
pub mod store;
pub mod supervisor;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// A queue's options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// Most items held (ready + in flight + delayed); `None`: unbounded.
    pub max_len: Option<u64>,
    /// Deliveries an item gets before it is dead-lettered.
    pub max_deliveries: u32,
    /// How long a delivery stays in flight before it returns to ready.
    pub visibility_ms: u64,
    /// How long a dedup key is remembered.
    pub dedup_window_ms: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig { max_len: None, max_deliveries: 16, visibility_ms: 30_000, dedup_window_ms: 300_000 }
    }
}

/// Names one delivery of an item (also on the wire: `ops.rs` uses this type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Receipt {
    pub seq: u64,
    pub delivery: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Delivery<V> {
    pub seq: u64,
    pub receipt: Receipt,
    /// This delivery's number (1 for the first).
    pub deliveries: u32,
    pub value: V,
}

/// What passing time did (`Queue::tick`).
#[derive(Clone, Debug, PartialEq)]
pub struct Ticked<V> {
    /// Deliveries whose deadline passed and that went back to ready: `(seq, deliveries)`.
    pub expired: Vec<(u64, u32)>,
    /// Items that used up their deliveries.
    pub dead: Vec<DeadLetter<V>>,
    /// Items that became ready (expired or delayed ones).
    pub readied: usize,
    /// Dedup keys whose window passed.
    pub forgotten: Vec<String>,
}

/// An item that used up its deliveries.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter<V> {
    pub seq: u64,
    pub deliveries: u32,
    pub value: V,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PopMode {
    /// At-least-once: the item stays, in flight, until acked.
    Ack,
    /// At-most-once: removed at once.
    Take,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueError {
    Full {
        max_len: u64,
    },
    /// The receipt is not the item's current delivery (it was redelivered, acked or dropped).
    StaleReceipt,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Len {
    pub ready: u64,
    pub in_flight: u64,
    pub delayed: u64,
}

#[derive(Clone, Debug)]
struct Item<V> {
    value: V,
    /// Deliveries so far.
    deliveries: u32,
    state: State,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Ready,
    InFlight { deadline_ms: u64 },
    Delayed { until_ms: u64 },
}

/// One queue.
#[derive(Clone, Debug)]
pub struct Queue<V> {
    pub config: QueueConfig,
    items: BTreeMap<u64, Item<V>>,
    ready: BTreeSet<u64>,
    deadlines: BTreeSet<(u64, u64)>,
    delays: BTreeSet<(u64, u64)>,
    next_seq: u64,
    dedup: HashMap<String, (u64, u64)>,
    dedup_order: VecDeque<(u64, String)>,
}

impl<V: Clone> Queue<V> {
    pub fn new(config: QueueConfig) -> Queue<V> {
        Queue {
            config,
            items: BTreeMap::new(),
            ready: BTreeSet::new(),
            deadlines: BTreeSet::new(),
            delays: BTreeSet::new(),
            next_seq: 1,
            dedup: HashMap::new(),
            dedup_order: VecDeque::new(),
        }
    }

    fn set_state(&mut self, seq: u64, to: State) {
        let Some(item) = self.items.get_mut(&seq) else { return };
        match item.state {
            State::Ready => self.ready.remove(&seq),
            State::InFlight { deadline_ms } => self.deadlines.remove(&(deadline_ms, seq)),
            State::Delayed { until_ms } => self.delays.remove(&(until_ms, seq)),
        };
        item.state = to;
        match to {
            State::Ready => self.ready.insert(seq),
            State::InFlight { deadline_ms } => self.deadlines.insert((deadline_ms, seq)),
            State::Delayed { until_ms } => self.delays.insert((until_ms, seq)),
        };
    }

    fn remove(&mut self, seq: u64) -> Option<Item<V>> {
        let item = self.items.remove(&seq)?;
        match item.state {
            State::Ready => self.ready.remove(&seq),
            State::InFlight { deadline_ms } => self.deadlines.remove(&(deadline_ms, seq)),
            State::Delayed { until_ms } => self.delays.remove(&(until_ms, seq)),
        };
        Some(item)
    }

    /// Adds `value`; returns its seq and whether it is a duplicate of an earlier push with the
    /// same `dedup_key` within the window (then nothing was added).
    pub fn push(
        &mut self,
        value: V,
        dedup_key: Option<&str>,
        delay_ms: u64,
        now_ms: u64,
    ) -> Result<(u64, bool), QueueError> {
        if let Some(k) = dedup_key
            && let Some(&(seq, until)) = self.dedup.get(k)
            && until > now_ms
        {
            return Ok((seq, true));
        }
        if let Some(max_len) = self.config.max_len
            && self.items.len() as u64 >= max_len
        {
            return Err(QueueError::Full { max_len });
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let state = if delay_ms > 0 { State::Delayed { until_ms: now_ms + delay_ms } } else { State::Ready };
        self.items.insert(seq, Item { value, deliveries: 0, state: State::Ready });
        self.ready.insert(seq);
        self.set_state(seq, state);
        if let Some(k) = dedup_key {
            let until = now_ms + self.config.dedup_window_ms;
            self.dedup.insert(k.to_string(), (seq, until));
            self.dedup_order.push_back((until, k.to_string()));
        }
        Ok((seq, false))
    }

    /// Forgets the dedup keys whose window passed; returns them.
    fn forget_dedup(&mut self, now_ms: u64) -> Vec<String> {
        let mut out = Vec::new();
        while let Some((until, _)) = self.dedup_order.front()
            && *until <= now_ms
        {
            let (until, k) = self.dedup_order.pop_front().expect("front exists");
            if self.dedup.get(&k).is_some_and(|e| e.1 == until) {
                self.dedup.remove(&k);
                out.push(k);
            }
        }
        out
    }

    /// The seq the next push gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Seqs from here on only (a restart: seqs never repeat).
    pub fn skip_to(&mut self, seq: u64) {
        self.next_seq = self.next_seq.max(seq);
    }

    /// Puts back a stored item (a restart): ready, or delayed until `until_ms`, with the
    /// deliveries it had.
    pub fn restore(&mut self, seq: u64, value: V, deliveries: u32, until_ms: Option<u64>) {
        self.remove(seq);
        self.items.insert(seq, Item { value, deliveries, state: State::Ready });
        self.ready.insert(seq);
        if let Some(until_ms) = until_ms {
            self.set_state(seq, State::Delayed { until_ms });
        }
        self.skip_to(seq + 1);
    }

    /// Puts back a stored dedup key (a restart).
    /// `restored` must follow the last one.
    pub fn restore_dedup(&mut self, key: String, seq: u64, until_ms: u64) {
        self.dedup.insert(key.clone(), (seq, until_ms));
        self.dedup_order.push_back((until_ms, key));
    }

    /// Ends a restore: the dedup keys in expiry order.
    pub fn restored(&mut self) {
        self.dedup_order.make_contiguous().sort();
    }

    /// Gives a delivery back uncounted: ready at its seq, its count as before the delivery
    /// (the caller never had it: a run that took it did not commit).
    pub fn release(&mut self, r: Receipt) -> Result<(), QueueError> {
        self.current(r)?;
        if let Some(item) = self.items.get_mut(&r.seq) {
            item.deliveries = item.deliveries.saturating_sub(1);
        }
        self.set_state(r.seq, State::Ready);
        Ok(())
    }

    /// Deliveries the item has had, if it is here.
    pub fn deliveries(&self, seq: u64) -> Option<u32> {
        self.items.get(&seq).map(|i| i.deliveries)
    }

    /// Whether the item is in flight.
    pub fn in_flight(&self, seq: u64) -> bool {
        self.items.get(&seq).is_some_and(|i| matches!(i.state, State::InFlight { .. }))
    }

    /// When `tick` next has something to do.
    pub fn next_due(&self) -> Option<u64> {
        [
            self.deadlines.first().map(|d| d.0),
            self.delays.first().map(|d| d.0),
            self.dedup_order.front().map(|d| d.0),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Up to `n` ready items, in seq order.
    pub fn pop(&mut self, n: usize, mode: PopMode, now_ms: u64) -> Vec<Delivery<V>> {
        let seqs: Vec<u64> = self.ready.iter().take(n).copied().collect();
        let mut out = Vec::with_capacity(seqs.len());
        for seq in seqs {
            match mode {
                PopMode::Take => {
                    let item = self.remove(seq).expect("ready items exist");
                    let deliveries = item.deliveries + 1;
                    let receipt = Receipt { seq, delivery: deliveries };
                    out.push(Delivery { seq, receipt, deliveries, value: item.value });
                }
                PopMode::Ack => {
                    let deadline_ms = now_ms + self.config.visibility_ms;
                    self.set_state(seq, State::InFlight { deadline_ms });
                    let item = self.items.get_mut(&seq).expect("ready items exist");
                    item.deliveries += 1;
                    let receipt = Receipt { seq, delivery: item.deliveries };
                    out.push(Delivery {
                        seq,
                        receipt,
                        deliveries: item.deliveries,
                        value: item.value.clone(),
                    });
                }
            }
        }
        out
    }

    fn current(&self, r: Receipt) -> Result<(), QueueError> {
        match self.items.get(&r.seq) {
            Some(i) if matches!(i.state, State::InFlight { .. }) && i.deliveries == r.delivery => Ok(()),
            _ => Err(QueueError::StaleReceipt),
        }
    }

    /// Removes the delivered item.
    pub fn ack(&mut self, r: Receipt) -> Result<(), QueueError> {
        self.current(r)?;
        self.remove(r.seq);
        Ok(())
    }

    /// Gives a delivery back: ready now, or after `delay_ms`; dead-lettered if it used up its
    /// deliveries.
    pub fn nack(
        &mut self,
        r: Receipt,
        delay_ms: u64,
        now_ms: u64,
    ) -> Result<Option<DeadLetter<V>>, QueueError> {
        self.current(r)?;
        Ok(self.fail(r.seq, delay_ms, now_ms))
    }

    fn fail(&mut self, seq: u64, delay_ms: u64, now_ms: u64) -> Option<DeadLetter<V>> {
        let deliveries = self.items.get(&seq)?.deliveries;
        if deliveries >= self.config.max_deliveries {
            let item = self.remove(seq)?;
            return Some(DeadLetter { seq, deliveries, value: item.value });
        }
        let to = if delay_ms > 0 { State::Delayed { until_ms: now_ms + delay_ms } } else { State::Ready };
        self.set_state(seq, to);
        None
    }

    /// Moves a delivery's deadline to `ms` from now.
    pub fn extend(&mut self, r: Receipt, ms: u64, now_ms: u64) -> Result<(), QueueError> {
        self.current(r)?;
        self.set_state(r.seq, State::InFlight { deadline_ms: now_ms + ms });
        Ok(())
    }

    /// Time passes: deliveries past their deadline return to ready (or are dead-lettered),
    /// delayed items whose time came become ready.
    pub fn tick(&mut self, now_ms: u64) -> Ticked<V> {
        let mut t = Ticked { expired: Vec::new(), dead: Vec::new(), readied: 0, forgotten: Vec::new() };
        while let Some(&(deadline, seq)) = self.deadlines.first()
            && deadline <= now_ms
        {
            let deliveries = self.items[&seq].deliveries;
            match self.fail(seq, 0, now_ms) {
                Some(d) => t.dead.push(d),
                None => {
                    t.expired.push((seq, deliveries));
                    t.readied += 1;
                }
            }
        }
        while let Some(&(until, seq)) = self.delays.first()
            && until <= now_ms
        {
            self.set_state(seq, State::Ready);
            t.readied += 1;
        }
        t.forgotten = self.forget_dedup(now_ms);
        t
    }

    /// After a restart: every delivery in flight is ready again, its count kept.
    pub fn recover(&mut self) {
        let in_flight: Vec<u64> = self.deadlines.iter().map(|&(_, s)| s).collect();
        for seq in in_flight {
            self.set_state(seq, State::Ready);
        }
    }

    /// The next `n` ready items, in order, without delivering them.
    pub fn peek(&self, n: usize) -> Vec<(u64, &V)> {
        self.ready.iter().take(n).map(|s| (*s, &self.items[s].value)).collect()
    }

    pub fn len(&self) -> Len {
        Len {
            ready: self.ready.len() as u64,
            in_flight: self.deadlines.len() as u64,
            delayed: self.delays.len() as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Every item's seq, in order.
    pub fn seqs(&self) -> impl Iterator<Item = u64> + '_ {
        self.items.keys().copied()
    }

    /// Removes one item wherever it is (a purge of it, a dead letter moved by the caller).
    pub fn drop_item(&mut self, seq: u64) -> Option<V> {
        self.remove(seq).map(|i| i.value)
    }

    /// Drops every item; how many.
    pub fn purge(&mut self) -> u64 {
        let n = self.items.len() as u64;
        self.items.clear();
        self.ready.clear();
        self.deadlines.clear();
        self.delays.clear();
        n
    }

    /// The invariant: the three sets partition the items, each item in the set its state names.
    pub fn check(&self) -> Result<(), String> {
        let l = self.len();
        if l.ready + l.in_flight + l.delayed != self.items.len() as u64 {
            return Err(format!("{l:?} does not add up to {} items", self.items.len()));
        }
        for (seq, item) in &self.items {
            let ok = match item.state {
                State::Ready => self.ready.contains(seq),
                State::InFlight { deadline_ms } => self.deadlines.contains(&(deadline_ms, *seq)),
                State::Delayed { until_ms } => self.delays.contains(&(until_ms, *seq)),
            };
            if !ok || *seq >= self.next_seq {
                return Err(format!("item {seq} ({:?}) is not where its state says", item.state));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
