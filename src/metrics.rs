//! The node's metrics: the server's own counters (`ServerMetrics`: requests by kind and
//! outcome, latency histograms per kind, errors by kind, connections, bytes in and out, the
//! slow log), and `render`, which writes them and the actor layer's (`GridCore::counters`,
//! the snippet engine's `SnippetStats`, every shard's state and mailbox depth, memory) in the
//! OpenMetrics text format with `prometheus-client`; `serve_http` answers Prometheus' scrapes
//! (`heapgrid serve --metrics-listen ADDR`, docs/operations.md lists every metric).
//!
//! How a request is timed: the connection notes each request's kind and arrival as it decodes
//! it (`InFlight::start`), and just before each write of responses reads the frames it is
//! about to write (`ServerMetrics::observe`: each frame's id and whether it is an error, a few
//! bytes into it) to count the outcome and record the time since arrival. So every way a
//! request can be answered (from a snapshot at once, by a round, on its own) is counted in
//! one place, and the latency is what the server spent: from decoding the request to handing
//! its response to the socket.
//!
//! Invariant: recording is relaxed atomic adds and a direct-mapped slot per request in a
//! per-connection table (about 280 instructions a request, docs/benchmarks.md); nothing
//! on the request path locks, except a slow request's entry in the slow log.

use std::collections::{HashMap, VecDeque};

use heapgrid_actors::GridError;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use heapgrid_actors::grid::GridCore;
use heapgrid_actors::heap::io_stats::{Histogram, HistogramSnapshot, LATENCY_US_BOUNDS};
use heapgrid_actors::snippet::Budget;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use serde::{Deserialize, Serialize};

use crate::protocol::{RequestBody, TableOp};

/// What a request asks for, as metrics count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Ping,
    Catalog,
    Get,
    Contains,
    Count,
    Scan,
    Write,
    Batch,
    /// A collection-scoped snippet (`TableOp::Eval`).
    Eval,
    /// A grid-scoped snippet (`RequestBody::Eval`, `EvalFenced`).
    EvalGrid,
    Fetch,
    Procedures,
    Feed,
    Lock,
    Queue,
    Cluster,
    Stats,
    Session,
    SlowLog,
    /// A response whose request is not known (a protocol error answered with id 0).
    Unknown,
}

/// Every kind, in `Kind as usize` order.
pub const KINDS: [Kind; 20] = [
    Kind::Ping,
    Kind::Catalog,
    Kind::Get,
    Kind::Contains,
    Kind::Count,
    Kind::Scan,
    Kind::Write,
    Kind::Batch,
    Kind::Eval,
    Kind::EvalGrid,
    Kind::Fetch,
    Kind::Procedures,
    Kind::Feed,
    Kind::Lock,
    Kind::Queue,
    Kind::Cluster,
    Kind::Stats,
    Kind::Session,
    Kind::SlowLog,
    Kind::Unknown,
];

impl Kind {
    pub fn of(body: &RequestBody) -> Kind {
        match body {
            RequestBody::Ping => Kind::Ping,
            RequestBody::ListTables
            | RequestBody::CreateTable { .. }
            | RequestBody::DropTable { .. }
            | RequestBody::ListFeeds
            | RequestBody::CreateFeed { .. }
            | RequestBody::DropFeed { .. } => Kind::Catalog,
            RequestBody::Table { op, .. } => match op {
                TableOp::Get { .. } | TableOp::GetCopy { .. } => Kind::Get,
                TableOp::Contains { .. } => Kind::Contains,
                TableOp::Count => Kind::Count,
                TableOp::Scan { .. } | TableOp::Prefix { .. } => Kind::Scan,
                TableOp::Write(_) => Kind::Write,
                TableOp::Batch(_) => Kind::Batch,
                TableOp::Eval(_) => Kind::Eval,
            },
            RequestBody::Eval { .. } | RequestBody::EvalFenced { .. } => Kind::EvalGrid,
            RequestBody::Fetch { .. } => Kind::Fetch,
            RequestBody::PutProcedures { .. } | RequestBody::DropProcedures { .. } => Kind::Procedures,
            RequestBody::Feed { .. } => Kind::Feed,
            RequestBody::Lock { .. } => Kind::Lock,
            RequestBody::Queue { .. } => Kind::Queue,
            RequestBody::Cluster { .. } => Kind::Cluster,
            RequestBody::Stats => Kind::Stats,
            RequestBody::SetSession { .. } => Kind::Session,
            RequestBody::SlowLog { .. } => Kind::SlowLog,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::Ping => "ping",
            Kind::Catalog => "catalog",
            Kind::Get => "get",
            Kind::Contains => "contains",
            Kind::Count => "count",
            Kind::Scan => "scan",
            Kind::Write => "write",
            Kind::Batch => "batch",
            Kind::Eval => "eval",
            Kind::EvalGrid => "eval_grid",
            Kind::Fetch => "fetch",
            Kind::Procedures => "procedures",
            Kind::Feed => "feed",
            Kind::Lock => "lock",
            Kind::Queue => "queue",
            Kind::Cluster => "cluster",
            Kind::Stats => "stats",
            Kind::Session => "session",
            Kind::SlowLog => "slowlog",
            Kind::Unknown => "unknown",
        }
    }
}

/// Entries the slow log keeps (the oldest go first).
pub const SLOWLOG_ENTRIES_MAX: usize = 256;
/// The slow log's threshold by default: requests that took longer are logged.
pub const SLOWLOG_THRESHOLD_DEFAULT: Duration = Duration::from_millis(100);
/// How much of a snippet the slow log keeps.
const SLOWLOG_DETAIL_CHARS: usize = 200;

/// One request the slow log kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlowEntry {
    /// When it was answered (milliseconds since the Unix epoch).
    pub unix_ms: u64,
    /// From decoding it to handing its response to the socket.
    pub latency_us: u64,
    pub kind: String,
    /// The error's kind, if it failed (`GridError::kind`).
    pub error: Option<String>,
    /// The snippet's source (its start) for snippets; the table or collection otherwise.
    pub detail: String,
    /// The client's address.
    pub peer: String,
}

/// Connection counters.
#[derive(Default)]
pub struct Connections {
    pub open: AtomicI64,
    pub accepted: AtomicU64,
    /// Refused at the connection limit.
    pub refused: AtomicU64,
    /// Handshakes that failed for any reason other than the token.
    pub handshake_failures: AtomicU64,
    /// Handshakes with a token that was missing or unknown.
    pub auth_failures: AtomicU64,
}

/// The server's counters.
pub struct ServerMetrics {
    ok: [AtomicU64; KINDS.len()],
    failed: [AtomicU64; KINDS.len()],
    latency_us: Vec<Histogram>,
    /// Errors answered, by `GridError` variant (wire index; the last slot: an index this build
    /// does not know).
    errors: [AtomicU64; GridError::KINDS.len() + 1],
    pub connections: Connections,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    slow_threshold_us: AtomicU64,
    slow: Mutex<VecDeque<SlowEntry>>,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        ServerMetrics {
            ok: Default::default(),
            failed: Default::default(),
            latency_us: KINDS.iter().map(|_| Histogram::new(LATENCY_US_BOUNDS)).collect(),
            errors: Default::default(),
            connections: Connections::default(),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            slow_threshold_us: AtomicU64::new(SLOWLOG_THRESHOLD_DEFAULT.as_micros() as u64),
            slow: Mutex::default(),
        }
    }
}

/// A request a connection decoded and has not answered yet.
pub struct Started {
    kind: Kind,
    /// When it was decoded: microseconds since its connection's `InFlight::epoch`.
    at_us: u64,
    /// What the slow log shows of it.
    detail: Detail,
}

/// What the slow log shows of a request, kept cheaply: a table request names its table by
/// an index into the connection's `tables` (no allocation per request).
enum Detail {
    None,
    Table(u16),
    Text(Box<str>),
}

/// Request ids are the client's: spread them (splitmix64's finalizer) so every bit of the id
/// reaches the low bits that pick a bucket.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ *b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        self.0 = z ^ (z >> 31);
    }
}

/// Slots of `InFlight`'s direct-mapped table (a power of two): a client numbering its requests
/// one after another, with fewer than this in flight, never collides.
const INFLIGHT_SLOTS: usize = 512;
/// Table names a connection's slow-log details remember (past it: no table named).
const CONN_TABLES_MAX: usize = 64;

/// A connection's requests in flight, by id: a direct-mapped table by `id % INFLIGHT_SLOTS`
/// (two array accesses per request for the usual sequential ids), and a map for the ids that
/// collide in it.
/// Bounded without a limit of its own: a connection decodes only while fewer than its
/// in-flight limit are open, and at most an output buffer's worth answered in the same pass.
pub struct InFlight {
    slots: Box<[Option<(u64, Started)>]>,
    overflow: HashMap<u64, Started, BuildHasherDefault<IdHasher>>,
    /// Table names its requests used, for slow-log entries (`Detail::Table`).
    tables: Vec<Box<str>>,
    peer: String,
    /// Times are microseconds since this (one clock read and one subtraction per read pass,
    /// not per request).
    epoch: Instant,
    /// When the current read pass began (`pass`).
    pass_us: u64,
}

impl InFlight {
    pub fn new(peer: String) -> InFlight {
        InFlight {
            slots: (0..INFLIGHT_SLOTS).map(|_| None).collect(),
            overflow: HashMap::default(),
            tables: Vec::new(),
            peer,
            epoch: Instant::now(),
            pass_us: 0,
        }
    }

    /// A read pass begins: the requests it decodes are timed from now.
    pub fn pass(&mut self) {
        self.pass_us = self.epoch.elapsed().as_micros() as u64;
    }

    /// Notes a request as it is decoded.
    pub fn start(&mut self, id: u64, body: &RequestBody) {
        let kind = Kind::of(body);
        let detail = match body {
            RequestBody::Eval { src, .. } | RequestBody::EvalFenced { src, .. } => Detail::Text(head(src)),
            RequestBody::Table { table, op: TableOp::Eval(e) } => {
                Detail::Text(format!("{table}: {}", head(&e.src)).into())
            }
            RequestBody::Table { table, .. } => match self.tables.iter().position(|t| **t == **table) {
                Some(i) => Detail::Table(i as u16),
                None if self.tables.len() < CONN_TABLES_MAX => {
                    self.tables.push(table.as_str().into());
                    Detail::Table((self.tables.len() - 1) as u16)
                }
                None => Detail::None,
            },
            _ => Detail::None,
        };
        let started = Started { kind, at_us: self.pass_us, detail };
        let slot = &mut self.slots[id as usize % INFLIGHT_SLOTS];
        match slot {
            Some((held, _)) if *held != id => {
                self.overflow.insert(id, started);
            }
            _ => *slot = Some((id, started)),
        }
    }

    fn take(&mut self, id: u64) -> Option<Started> {
        let slot = &mut self.slots[id as usize % INFLIGHT_SLOTS];
        if slot.as_ref().is_some_and(|(held, _)| *held == id) {
            return slot.take().map(|(_, s)| s);
        }
        if self.overflow.is_empty() { None } else { self.overflow.remove(&id) }
    }

    fn detail(&self, d: Detail) -> String {
        match d {
            Detail::None => String::new(),
            Detail::Table(i) => self.tables.get(i as usize).map(|t| t.to_string()).unwrap_or_default(),
            Detail::Text(t) => t.into(),
        }
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.slots.iter().all(Option::is_none) && self.overflow.is_empty()
    }
}

fn head(src: &str) -> Box<str> {
    src.chars().take(SLOWLOG_DETAIL_CHARS).collect::<String>().into()
}

impl ServerMetrics {
    /// Counts the responses in `out` (whole frames, about to be written) against the requests
    /// `inflight` noted, and the bytes written.
    pub fn observe(&self, inflight: &mut InFlight, out: &[u8]) {
        self.bytes_out.fetch_add(out.len() as u64, Relaxed);
        self.observe_frames(inflight, out);
    }

    /// `observe` without counting the bytes (a RESP connection writes other bytes than these
    /// native frames, and counts those).
    pub fn observe_frames(&self, inflight: &mut InFlight, out: &[u8]) {
        let now_us = inflight.epoch.elapsed().as_micros() as u64;
        let mut rest = out;
        while rest.len() >= 4 {
            let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
            let Some(frame) = rest.get(4..4 + len) else { break };
            rest = &rest[4 + len..];
            let Some((id, outcome)) = crate::protocol::response_outcome(frame) else { continue };
            let started = inflight.take(id);
            let kind = started.as_ref().map_or(Kind::Unknown, |s| s.kind);
            let us = started.as_ref().map_or(0, |s| now_us.saturating_sub(s.at_us));
            let i = kind as usize;
            match &outcome {
                Ok(()) => self.ok[i].fetch_add(1, Relaxed),
                Err(_) => self.failed[i].fetch_add(1, Relaxed),
            };
            self.latency_us[i].record(us);
            let error = outcome.err().map(|index| (index as usize).min(GridError::KINDS.len()));
            if let Some(e) = error {
                self.errors[e].fetch_add(1, Relaxed);
            }
            if us >= self.slow_threshold_us.load(Relaxed) && started.is_some() {
                self.slow(SlowEntry {
                    unix_ms: heapgrid_actors::stats::unix_ms(),
                    latency_us: us,
                    kind: kind.label().into(),
                    error: error.map(|e| error_name(e).into()),
                    detail: started.map(|s| inflight.detail(s.detail)).unwrap_or_default(),
                    peer: inflight.peer.clone(),
                });
            }
        }
    }

    fn slow(&self, e: SlowEntry) {
        let mut slow = self.slow.lock().unwrap_or_else(|e| e.into_inner());
        if slow.len() >= SLOWLOG_ENTRIES_MAX {
            slow.pop_front();
        }
        slow.push_back(e);
    }

    /// The slow log, newest first; with `clear`, emptied.
    pub fn slowlog(&self, clear: bool) -> Vec<SlowEntry> {
        let mut slow = self.slow.lock().unwrap_or_else(|e| e.into_inner());
        let v = slow.iter().rev().cloned().collect();
        if clear {
            slow.clear();
        }
        v
    }

    /// Requests that take at least this long go to the slow log.
    pub fn set_slow_threshold(&self, t: Duration) {
        self.slow_threshold_us.store(t.as_micros().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// Requests answered so far, of a kind, ok and failed.
    pub fn requests(&self, kind: Kind) -> (u64, u64) {
        (self.ok[kind as usize].load(Relaxed), self.failed[kind as usize].load(Relaxed))
    }
}

/// An error's name by `GridError` wire index (`unknown` past this build's variants).
fn error_name(index: usize) -> &'static str {
    GridError::KINDS.get(index).copied().unwrap_or("unknown")
}

/// How long a scrape waits for the heaps' figures before leaving them out of its answer.
const SCRAPE_STATS_WAIT: Duration = Duration::from_secs(5);

/// Every metric of the node as OpenMetrics text. Asks the grid for its heaps' figures (a
/// message to every shard, one after another); if they take longer than `SCRAPE_STATS_WAIT`,
/// the heap gauges are left out of this scrape (the counters are always there).
pub async fn render(core: &GridCore, server: &Arc<ServerMetrics>) -> String {
    let stats = tokio::time::timeout(SCRAPE_STATS_WAIT, core.stats()).await.ok();
    let (rss_anon, rss_file) = heapgrid_actors::stats::process_memory();
    let snap = Snapshot {
        stats,
        rss_anon,
        rss_file,
        health: core.shard_health(),
        counters: core.counters().clone(),
        snippets: core.snippets().engine.stats().clone(),
        server: server.clone(),
    };
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(snap));
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// What one scrape reads: the collector `render` registers for it.
struct Snapshot {
    stats: Option<heapgrid_actors::stats::NodeStats>,
    rss_anon: u64,
    rss_file: u64,
    health: Vec<heapgrid_actors::stats::ShardHealth>,
    counters: Arc<heapgrid_actors::metrics::NodeCounters>,
    snippets: Arc<heapgrid_actors::snippet::engine::SnippetStats>,
    server: Arc<ServerMetrics>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").finish_non_exhaustive()
    }
}

impl prometheus_client::collector::Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        write_all(self, &mut e)
    }
}

fn counter(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// A histogram of microseconds as seconds (`scale` 1e-6), or of counts (`scale` 1).
fn histogram_of(
    m: &mut prometheus_client::encoding::MetricEncoder<'_>,
    h: &HistogramSnapshot,
    scale: f64,
) -> std::fmt::Result {
    let buckets: Vec<(f64, u64)> = h
        .buckets
        .iter()
        .map(|&(b, n)| (if b == u64::MAX { f64::MAX } else { b as f64 * scale }, n))
        .collect();
    m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
        h.sum as f64 * scale,
        h.count,
        &buckets,
        None,
    )
}

fn histogram(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    h: &Histogram,
    scale: f64,
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
    histogram_of(&mut m, &h.snapshot(), scale)
}

fn write_all(s: &Snapshot, e: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
    const US: f64 = 1e-6;
    let srv = &*s.server;
    // Requests.
    {
        let mut m = e.encode_descriptor(
            "heapgrid_requests",
            "Requests answered, by kind and outcome (ok, error).",
            None,
            MetricType::Counter,
        )?;
        for k in KINDS {
            let (ok, failed) = srv.requests(k);
            for (outcome, n) in [("ok", ok), ("error", failed)] {
                if n > 0 || k != Kind::Unknown {
                    ConstCounter::new(n)
                        .encode(m.encode_family(&[("kind", k.label()), ("outcome", outcome)])?)?;
                }
            }
        }
    }
    {
        let mut m = e.encode_descriptor(
            "heapgrid_request_duration_seconds",
            "Time from decoding a request to handing its response to the socket, by kind.",
            None,
            MetricType::Histogram,
        )?;
        for k in KINDS {
            let h = srv.latency_us[k as usize].snapshot();
            if h.count > 0 {
                histogram_of(&mut m.encode_family(&[("kind", k.label())])?, &h, US)?;
            }
        }
    }
    {
        let mut m = e.encode_descriptor(
            "heapgrid_errors",
            "Errors answered, by error kind.",
            None,
            MetricType::Counter,
        )?;
        for (i, n) in srv.errors.iter().enumerate() {
            let n = n.load(Relaxed);
            if n > 0 {
                ConstCounter::new(n).encode(m.encode_family(&[("error", error_name(i))])?)?;
            }
        }
    }
    let c = &srv.connections;
    gauge(e, "heapgrid_connections_open", "Client connections open now.", c.open.load(Relaxed))?;
    let (io, sn) = (&s.counters.io, &*s.snippets);
    let counters: [(&str, &str, &AtomicU64); 14] = [
        ("heapgrid_connections_accepted", "Client connections accepted.", &c.accepted),
        ("heapgrid_connections_refused", "Connections refused at the connection limit.", &c.refused),
        ("heapgrid_auth_failures", "Handshakes refused for a missing or unknown token.", &c.auth_failures),
        (
            "heapgrid_handshake_failures",
            "Handshakes that failed otherwise (bad magic, version, timeout).",
            &c.handshake_failures,
        ),
        ("heapgrid_received_bytes", "Bytes read from client connections.", &srv.bytes_in),
        ("heapgrid_sent_bytes", "Bytes of responses written to client connections.", &srv.bytes_out),
        ("heapgrid_oplog_writes", "Op-log writes (one write(2) per group of records).", &io.log_writes),
        ("heapgrid_oplog_written_bytes", "Bytes written to op logs.", &io.log_write_bytes),
        ("heapgrid_snippet_runs", "Snippet runs.", &sn.runs),
        ("heapgrid_snippet_errors", "Snippet runs that failed (budget stops included).", &sn.errors),
        ("heapgrid_snippet_compiles", "Snippets compiled (compile-cache misses).", &sn.compiles),
        ("heapgrid_snippet_cache_hits", "Snippets found compiled in the cache.", &sn.cache_hits),
        (
            "heapgrid_shard_restarts",
            "Shards restarted after a failure (recovery).",
            &s.counters.shard_restarts,
        ),
        (
            "heapgrid_shards_given_up",
            "Times a shard reached its restart limit and was marked failed.",
            &s.counters.shards_given_up,
        ),
    ];
    for (name, help, v) in counters {
        counter(e, name, help, v.load(Relaxed))?;
    }
    // The heaps' disk work: latencies in seconds, sizes in items.
    let histograms: [(&str, &str, &Histogram, f64); 5] = [
        ("heapgrid_oplog_fsync_duration_seconds", "Op-log fsyncs: latency.", &io.fsync_us, US),
        (
            "heapgrid_oplog_fsync_records",
            "Op-log fsyncs: records each made durable (group size).",
            &io.fsync_records,
            1.0,
        ),
        (
            "heapgrid_checkpoint_pause_seconds",
            "Checkpoints: the shard's pause to begin one (it serves nothing meanwhile).",
            &io.checkpoint_pause_us,
            US,
        ),
        (
            "heapgrid_checkpoint_duration_seconds",
            "Checkpoints: the write-back's time (in the background).",
            &io.checkpoint_write_us,
            US,
        ),
        ("heapgrid_checkpoint_pages", "Checkpoints: pages each wrote back.", &io.checkpoint_pages, 1.0),
    ];
    for (name, help, h, scale) in histograms {
        histogram(e, name, help, h, scale)?;
    }
    {
        let mut m = e.encode_descriptor(
            "heapgrid_snippet_budget_stops",
            "Snippet runs a budget stopped, by budget.",
            None,
            MetricType::Counter,
        )?;
        for b in Budget::ALL {
            ConstCounter::new(sn.budget_stops[b.index()].load(Relaxed))
                .encode(m.encode_family(&[("budget", b.label())])?)?;
        }
    }

    // Shards.
    {
        let mut by_state: std::collections::BTreeMap<&str, i64> =
            ["starting", "running", "failed", "stopped"].into_iter().map(|k| (k, 0)).collect();
        for h in &s.health {
            *by_state.entry(h.state.as_str()).or_default() += 1;
        }
        let mut m = e.encode_descriptor(
            "heapgrid_shards",
            "Shards on this node, by state.",
            None,
            MetricType::Gauge,
        )?;
        for (state, n) in by_state {
            ConstGauge::new(n).encode(m.encode_family(&[("state", state)])?)?;
        }
    }
    {
        let mut m = e.encode_descriptor(
            "heapgrid_shard_mailbox_depth",
            "Messages sent to a table shard's actor and not yet taken (0 for feeds and services).",
            None,
            MetricType::Gauge,
        )?;
        for h in &s.health {
            let shard = h.shard.to_string();
            ConstGauge::new(h.mailbox_depth as i64).encode(
                m.encode_family(&[("collection", h.collection.as_str()), ("shard", shard.as_str())])?,
            )?;
        }
    }

    // Memory.
    let mut gauges: Vec<(&str, &str, u64)> = vec![
        ("heapgrid_memory_anon_bytes", "Resident anonymous memory of the process (RssAnon).", s.rss_anon),
        ("heapgrid_memory_file_bytes", "Resident file-backed memory of the process (RssFile).", s.rss_file),
    ];
    if let Some(st) = &s.stats {
        gauges.extend([
            (
                "heapgrid_heap_resident_bytes",
                "Bytes of the heaps' mappings resident in memory.",
                st.heap_resident_bytes,
            ),
            ("heapgrid_heap_file_bytes", "Bytes of the heap files.", st.heap_file_bytes),
            ("heapgrid_oplog_bytes", "Bytes of the op logs' segments.", st.log_bytes),
            ("heapgrid_entries", "Entries stored on this node (every shard).", st.entries),
        ]);
    }
    for (name, help, v) in gauges {
        gauge(e, name, help, v as i64)?;
    }
    if let Some(st) = &s.stats {
        if let Some(b) = &st.memory_budget {
            gauge(e, "heapgrid_memory_budget_bytes", "The node's memory budget.", b.budget_bytes as i64)?;
            gauge(
                e,
                "heapgrid_memory_budget_used_bytes",
                "What the budget counts, at the pager's last look.",
                b.used_bytes as i64,
            )?;
            counter(
                e,
                "heapgrid_memory_dropped_bytes",
                "Bytes of clean heap pages dropped to stay under the budget.",
                b.dropped_bytes,
            )?;
        }
        let mut m = e.encode_descriptor(
            "heapgrid_collection_entries",
            "Entries of each collection on this node.",
            None,
            MetricType::Gauge,
        )?;
        for c in &st.collections {
            let n: u64 = c.shards.iter().map(|s| s.entries).sum();
            ConstGauge::new(n as i64)
                .encode(m.encode_family(&[("collection", c.name.as_str()), ("kind", c.kind.as_str())])?)?;
        }
    }
    Ok(())
}

/// Longest request head a scrape may send.
const HTTP_REQUEST_BYTES_MAX: usize = 8192;

/// Scrapes answered at once; more wait their turn (each scrape asks every shard for its
/// figures, so a flood of scrapes must not become a flood of shard messages).
const SCRAPES_AT_ONCE: usize = 2;
/// Scrape connections open at once; past it new ones are closed at once.
const SCRAPE_CONNECTIONS_MAX: usize = 64;

/// Answers HTTP scrapes on `listener` until `stop` changes: `GET /metrics` (or `/`) gets the
/// node's metrics; anything else, 404. One request per connection (the response closes it),
/// which is how Prometheus scrapes; a head over 8 KiB or a connection open over 10 s is
/// dropped. There is no authentication: bind it where only the monitoring system reaches.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    core: Arc<GridCore>,
    server: Arc<ServerMetrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut conns = tokio::task::JoinSet::new();
    let turns = Arc::new(tokio::sync::Semaphore::new(SCRAPES_AT_ONCE));
    loop {
        tokio::select! {
                    _ = stop.changed() => break,
                    accepted = listener.accept() => match accepted {
        Ok((sock, _)) if conns.len() < SCRAPE_CONNECTIONS_MAX => {
                            let (core, server, turns) = (core.clone(), server.clone(), turns.clone());
                            conns.spawn(async move {
                                let _ = tokio::time::timeout(Duration::from_secs(10), scrape(sock, &core, &server, &turns)).await;
                            });
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    },
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
    }
}

async fn scrape(
    mut sock: tokio::net::TcpStream,
    core: &GridCore,
    server: &Arc<ServerMetrics>,
    turns: &tokio::sync::Semaphore,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut buf).await?;
        if n == 0 || head.len() + n > HTTP_REQUEST_BYTES_MAX {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut words = line.split(|&b| b == b' ');
    let (method, path) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    let (status, ctype, body) = match (method, path) {
        (b"GET", b"/metrics" | b"/") => {
            let _turn = turns.acquire().await.map_err(std::io::Error::other)?;
            (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                render(core, server).await,
            )
        }
        (b"GET", _) => ("404 Not Found", "text/plain; charset=utf-8", "try /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain; charset=utf-8", "GET only\n".to_string()),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(resp.as_bytes()).await?;
    sock.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_listed_in_their_order() {
        for (i, k) in KINDS.iter().enumerate() {
            assert_eq!(*k as usize, i, "{k:?}");
        }
    }

    #[test]
    fn ids_that_collide_in_the_slots_are_both_kept() {
        let mut f = InFlight::new("peer".into());
        let ids = [5, 5 + INFLIGHT_SLOTS as u64, 5 + 7 * INFLIGHT_SLOTS as u64, u64::MAX];
        for id in ids {
            f.start(id, &RequestBody::Table { table: format!("t{id}"), op: TableOp::Count });
        }
        for id in ids.iter().rev() {
            let s = f.take(*id).expect("kept");
            assert_eq!(s.kind, Kind::Count);
            assert_eq!(f.detail(s.detail), format!("t{id}"));
            assert!(f.take(*id).is_none(), "taken once");
        }
        assert!(f.is_empty());
    }

    #[test]
    fn responses_are_counted_by_kind_outcome_and_error() {
        let m = ServerMetrics::default();
        m.set_slow_threshold(Duration::ZERO);
        let mut f = InFlight::new("peer".into());
        f.start(1, &RequestBody::Ping);
        f.start(2, &RequestBody::Table { table: "t".into(), op: TableOp::Count });
        let mut out = Vec::new();
        crate::protocol::append_response(
            &mut out,
            &crate::protocol::Response { id: 1, result: Ok(crate::protocol::ResponseBody::Pong) },
        );
        crate::protocol::append_response(
            &mut out,
            &crate::protocol::Response { id: 2, result: Err(GridError::NoSuchTable("t".into())) },
        );
        m.observe(&mut f, &out);
        assert_eq!(m.requests(Kind::Ping), (1, 0));
        assert_eq!(m.requests(Kind::Count), (0, 1));
        assert!(f.is_empty());
        assert_eq!(m.bytes_out.load(Relaxed), out.len() as u64);
        let slow = m.slowlog(true);
        assert_eq!(slow.len(), 2);
        assert_eq!(slow[0].kind, "count");
        assert_eq!(slow[0].error.as_deref(), Some("no_such_table"));
        assert_eq!(slow[0].detail, "t");
        assert!(m.slowlog(false).is_empty());
        assert_eq!(m.errors[0].load(Relaxed), 1, "NoSuchTable is wire index 0");
    }
}
