//! What a heap's disk work costs, counted as it happens: op-log writes and fsyncs (latency and
//! how many records each covered), checkpoints (the owner's pause to begin one, the write-back's
//! time, pages written). `IoStats` is shared by every heap opened with it
//! (`HeapOptions::io`), so a node's metrics sum its shards; nothing here allocates or locks on
//! the recording side. `Histogram` is the fixed-bucket, lock-free histogram the actor layer's
//! metrics use too.
//!
//! Invariant: recording is a handful of relaxed atomic adds. A reader (a metrics scrape) sees
//! each counter exactly, but the buckets, sum and count of a histogram are read one by one, so
//! a snapshot taken while a value is being recorded may count it in some and not yet in others
//! (`HistogramSnapshot::count` is the sum of its buckets, so it is consistent with them).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Bucket upper bounds of latencies in microseconds: 50 µs to 10 s.
pub const LATENCY_US_BOUNDS: &[u64] = &[
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 10_000_000,
];

/// Bucket upper bounds of sizes counted in items (records per fsync, pages per checkpoint).
pub const COUNT_BOUNDS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 1_024, 4_096, 16_384, 65_536];

/// A histogram of `u64` observations over fixed bucket upper bounds (each bucket counts the
/// values `<=` its bound and above the previous one; one more bucket takes the rest).
pub struct Histogram {
    bounds: &'static [u64],
    /// `bounds.len() + 1` buckets, not cumulative.
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
}

/// A histogram read at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// `(upper bound, observations in this bucket)` (not cumulative), ascending; the last
    /// bound is `u64::MAX` (`+Inf`).
    pub buckets: Vec<(u64, u64)>,
    pub sum: u64,
    pub count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [u64]) -> Histogram {
        assert!(bounds.windows(2).all(|w| w[0] < w[1]), "histogram bounds must ascend");
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    pub fn record(&self, v: u64) {
        // Few bounds: a linear scan beats a binary search here.
        let i = self.bounds.iter().position(|&b| v <= b).unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum.fetch_add(v, Relaxed);
    }

    /// Records the time since `start` in microseconds.
    pub fn record_since(&self, start: std::time::Instant) {
        self.record(start.elapsed().as_micros().min(u64::MAX as u128) as u64);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<(u64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(u64::MAX))
            .zip(self.buckets.iter())
            .map(|(bound, n)| (bound, n.load(Relaxed)))
            .collect();
        let count = buckets.iter().map(|b| b.1).sum();
        HistogramSnapshot { buckets, sum: self.sum.load(Relaxed), count }
    }
}

/// The disk work of the heaps opened with it.
pub struct IoStats {
    /// Op-log fsyncs: each one's latency in µs.
    pub fsync_us: Histogram,
    /// Op-log fsyncs: records each one made durable (the group commit's group size).
    pub fsync_records: Histogram,
    /// Op-log writes (one write(2) per group of records) and their bytes.
    pub log_writes: AtomicU64,
    pub log_write_bytes: AtomicU64,
    /// Checkpoints begun: the heap owner's pause to begin one, in µs (it serves nothing then).
    pub checkpoint_pause_us: Histogram,
    /// Checkpoint write-backs: time in µs (on another thread; the owner goes on serving).
    pub checkpoint_write_us: Histogram,
    /// Checkpoint write-backs: pages written by each.
    pub checkpoint_pages: Histogram,
}

impl Default for IoStats {
    fn default() -> Self {
        IoStats {
            fsync_us: Histogram::new(LATENCY_US_BOUNDS),
            fsync_records: Histogram::new(COUNT_BOUNDS),
            log_writes: AtomicU64::new(0),
            log_write_bytes: AtomicU64::new(0),
            checkpoint_pause_us: Histogram::new(LATENCY_US_BOUNDS),
            checkpoint_write_us: Histogram::new(LATENCY_US_BOUNDS),
            checkpoint_pages: Histogram::new(COUNT_BOUNDS),
        }
    }
}

impl std::fmt::Debug for IoStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoStats")
            .field("fsyncs", &self.fsync_us.snapshot().count)
            .field("log_writes", &self.log_writes.load(Relaxed))
            .field("checkpoints", &self.checkpoint_write_us.snapshot().count)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_inclusive_and_the_last_bucket_takes_the_rest() {
        let h = Histogram::new(&[10, 100]);
        for v in [0, 10, 11, 100, 101, u64::MAX / 4] {
            h.record(v);
        }
        let s = h.snapshot();
        assert_eq!(s.buckets, vec![(10, 2), (100, 2), (u64::MAX, 2)]);
        assert_eq!(s.count, 6);
        assert_eq!(s.sum, 10 + 11 + 100 + 101 + u64::MAX / 4);
    }

    #[test]
    #[should_panic(expected = "ascend")]
    fn bounds_must_ascend() {
        let _ = Histogram::new(&[5, 5]);
    }
}
