//! The `heapgrid` binary: `serve` (the server), `shell` and `eval` (commands against a server),
//! `check` (offline integrity check of a data directory).

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use heapgrid::auth::TokenConfig;
use heapgrid::heap::{Heap, HeapOptions};
use heapgrid::server::{INFLIGHT_MAX_DEFAULT, Server, ServerConfig};
use heapgrid::{
    Client, ClientOptions, FsyncPolicy, Grid, GridOptions, Key, LimitOverrides, Limits, TableOptions, Value,
};
use heapgrid_actors::cluster::raft::{ClusterOptions, RaftTiming};
use serde::{Deserialize, Serialize};

#[derive(Parser)]
#[command(name = "heapgrid", version, about = "An actor-based data grid on a persistent paged heap")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the server.
    Serve(ServeArgs),
    /// Reads commands and snippets (type `help`) and runs them against a server: pretty JSON
    /// out, or one line each with --json.
    Shell {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Runs a snippet against a server, e.g. `heapgrid eval "users['bob']"` (`-` reads it from
    /// standard input), or one command, e.g. `heapgrid eval get users bob`. Pretty JSON out, or
    /// one line with --json.
    Eval {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        out: OutArgs,
        /// The snippet, or a command and its arguments.
        command: Vec<String>,
    },
    /// Checks every heap under a data directory (offline; the server must not be running).
    Check { dir: PathBuf },
    /// The cluster a server belongs to: `status`, `add ID PEER_ADDR CLIENT_ADDR`, `remove ID`
    /// (JSON out).
    Cluster {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        op: ClusterCmd,
    },
    /// Load generator against a server: ops/s and latency percentiles.
    Bench(BenchArgs),
    /// The node's memory (resident anonymous and file-backed bytes) and every heap's figures:
    /// entries, pages (in use, free, held), file and op-log bytes, bytes resident (JSON out).
    Stats(StatsArgs),
    /// The tables: name, shards, fsync policy, entries (a table per line; --json for JSON).
    Tables {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        json: bool,
    },
    /// Requests that took at least the server's slow-log threshold, newest first (JSON lines).
    Slowlog {
        #[command(flatten)]
        client: ClientArgs,
        /// Empty the log after reading it.
        #[arg(long)]
        clear: bool,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Members, the Raft leader and term, and every shard placement, as the node knows them.
    Status,
    /// Makes a node a voter and records it in the map (what `serve --join` does itself).
    Add { id: u64, peer_addr: String, client_addr: String },
    /// Takes a node out of the map and the Raft group, alive or dead, placing its shards
    /// elsewhere first (its primaries moved, new replicas caught up).
    Remove { id: u64 },
    /// This node's copy of a shard of a replicated table: position, keys, digest.
    Digest { table: String, shard: u32 },
    /// Makes NODE the primary of a shard (a planned move: it catches up first; sent to the Raft
    /// leader, found through --addr).
    Move { table: String, shard: u32, node: u64 },
}

#[derive(clap::Args)]
struct BenchArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Table to use (created if missing).
    #[arg(long, default_value = "bench")]
    table: String,
    /// Shards of the table if it is created.
    #[arg(long, default_value_t = 2)]
    shards: u32,
    /// fsync policy of the table if it is created: always, never or every:MS.
    #[arg(long)]
    fsync: Option<String>,
    /// TCP connections.
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 1)]
    pipeline: usize,
    /// Key space (keys 0..N).
    #[arg(long, default_value_t = 1_000_000)]
    keys: u64,
    /// A hot set: this percent of the keys (every 100/N-th) gets 100 - N percent of the gets
    /// and puts (10: the 90/10 rule). Default 0: uniform.
    #[arg(long, default_value_t = 0)]
    hot: u32,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Share of gets, in percent (the rest are puts).
    #[arg(long, default_value_t = 50)]
    reads: u32,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Put every key once before measuring.
    #[arg(long)]
    preload: bool,
    /// Run this snippet per request instead of gets and puts; it sees the request's key as
    /// `key` (collection scope, the default) or `args` (with --grid-scope).
    #[arg(long)]
    eval: Option<String>,
    /// Run the snippet grid-scoped.
    #[arg(long)]
    grid_scope: bool,
    /// Append to the feed named by --table instead of gets and puts.
    #[arg(long)]
    feed: bool,
    /// With --feed: append this many records per second while one follower tails the feed, and
    /// report append-to-delivery latency.
    #[arg(long)]
    follow_rate: Option<u64>,
    /// With --follow-rate: measure Redis at this address instead (XADD / XREAD BLOCK); with
    /// --locks, the Redis lock (SET NX PX + a Lua compare-and-delete); with --queues, Redis
    /// lists or streams.
    #[arg(long)]
    redis: Option<std::net::SocketAddr>,
    /// Acquire + release lock pairs instead of gets and puts: `uncontended` (a lock per
    /// connection) or `contended` (one lock for all: the handoff rate). Lock names start with
    /// --table.
    #[arg(long, value_parser = ["uncontended", "contended"])]
    locks: Option<String>,
    /// Push + pop (+ ack) cycles on the queue named by --table, each connection one cycle at a
    /// time: `take` (take mode; with --redis, LPUSH + BRPOP) or `ack` (ack mode; with --redis,
    /// XADD + XREADGROUP + XACK). Items are --value-bytes long.
    #[arg(long, value_parser = ["take", "ack"])]
    queues: Option<String>,
    /// With --redis: `SET` of random keys, each followed by `WAIT N 0` when N > 0 (Redis with
    /// replicas; the baseline of benches/compare-redis-cluster.sh).
    #[arg(long)]
    redis_set_wait: Option<u32>,
    /// Make every snippet's source unique, so none is served from the compile cache.
    #[arg(long)]
    uncached: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// `serve`'s flags. Each is also an environment variable (`HEAPGRID_` and its name) and a key of
/// the config file (its name with `_`); a flag wins over the variable, which wins over the file
/// (`--print-config` shows the result).
#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:7070].
    #[arg(long, env = "HEAPGRID_LISTEN")]
    listen: Option<SocketAddr>,
    /// Data directory [default: ./heapgrid-data].
    #[arg(long, env = "HEAPGRID_DATA")]
    data: Option<PathBuf>,
    /// JSON config file: every flag's name (with `_`) is a key, plus checkpoint_interval_ms,
    /// inflight_max, connections_max, buffer_budget_bytes, frame_deadline_ms, tokens,
    /// snippet_limits, snippet_max, snippet_sandbox and snippet_workers (docs/operations.md).
    #[arg(long, env = "HEAPGRID_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective config (flags, environment, file and defaults merged; secrets
    /// hidden) as JSON, and exit.
    #[arg(long)]
    print_config: bool,
    /// Default fsync policy of new tables: always, never or every:MS [default: every:100].
    #[arg(long, env = "HEAPGRID_FSYNC")]
    fsync: Option<String>,
    /// A module of stored procedures (Python `def`s and classes) to load at start; its name is
    /// the file stem. Repeatable.
    #[arg(long, env = "HEAPGRID_PROCEDURES", value_delimiter = ',')]
    procedures: Vec<PathBuf>,
    /// Run snippets in this process instead of sandbox worker processes: only when every client
    /// with `eval` permission is trusted.
    #[arg(long, env = "HEAPGRID_TRUSTED_SNIPPETS", value_parser = clap::builder::FalseyValueParser::new())]
    trusted_snippets: bool,
    /// This node's id in a cluster (1, 2, ...; needed with --peer-listen).
    #[arg(long, env = "HEAPGRID_NODE_ID")]
    node_id: Option<u64>,
    /// Where to listen for other nodes of the cluster; without it the node is on its own.
    #[arg(long, env = "HEAPGRID_PEER_LISTEN")]
    peer_listen: Option<SocketAddr>,
    /// The peer address other nodes are told (default: the bound --peer-listen).
    #[arg(long, env = "HEAPGRID_ADVERTISE_PEER")]
    advertise_peer: Option<String>,
    /// Peer addresses of nodes of a cluster to join (comma-separated); without it a node with
    /// --peer-listen forms a cluster of itself.
    #[arg(long, env = "HEAPGRID_JOIN", value_delimiter = ',')]
    join: Vec<String>,
    /// The secret every node of the cluster presents to the others.
    #[arg(long, env = "HEAPGRID_CLUSTER_COOKIE", hide_env_values = true)]
    cluster_cookie: Option<String>,
    /// Replicas of each shard of a table created in the cluster (default 2; fewer if there are
    /// fewer other nodes).
    #[arg(long, env = "HEAPGRID_REPLICAS")]
    replicas: Option<u32>,
    /// Replicas a write to such a table waits for: 0 is `async`, N is `sync(N)` (default 1).
    #[arg(long, env = "HEAPGRID_SYNC")]
    sync: Option<u32>,
    /// Records a shard's primary keeps in memory for replicas behind (default 100000); a
    /// replica further behind gets a snapshot of the shard.
    #[arg(long, env = "HEAPGRID_REPL_RETAIN")]
    repl_retain: Option<usize>,
    /// Memory budget of the node: resident anonymous memory plus heap pages in memory are kept
    /// under it by dropping clean heap pages (bytes, or with a K, M, G or T suffix: 512M).
    /// Default: none (the kernel decides).
    #[arg(long, env = "HEAPGRID_MEMORY_BUDGET")]
    memory_budget: Option<String>,
    /// A shard checkpoints once this much op log was written since its last checkpoint (as
    /// --memory-budget: 8M; default 64M, at least 1M): the most a crash leaves it to replay. Smaller
    /// restarts faster after a crash and, under heavy writes, writes more pages per byte logged.
    #[arg(long, env = "HEAPGRID_CHECKPOINT_LOG_BYTES")]
    checkpoint_log_bytes: Option<String>,
    /// Serve Prometheus metrics over HTTP at this address (`GET /metrics`; e.g.
    /// 127.0.0.1:9464). Default: off.
    #[arg(long, env = "HEAPGRID_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Requests taking at least this many milliseconds go to the slow log (`heapgrid slowlog`)
    /// [default: 100].
    #[arg(long, env = "HEAPGRID_SLOWLOG_THRESHOLD_MS")]
    slowlog_threshold_ms: Option<u64>,
    /// Also speak RESP, Redis' protocol, at this address (redis-cli, redis-benchmark, any Redis
    /// client library; e.g. 127.0.0.1:6379; docs/resp.md). Default: off.
    #[arg(long, env = "HEAPGRID_RESP_LISTEN")]
    resp_listen: Option<SocketAddr>,
    /// The table RESP keys live in (created at start if missing) [default: redis].
    #[arg(long, env = "HEAPGRID_RESP_TABLE")]
    resp_table: Option<String>,
    /// A RESP key `table:rest` names key `rest` of table `table`, when that table exists.
    #[arg(long, env = "HEAPGRID_RESP_ROUTE_PREFIXES", value_parser = clap::builder::FalseyValueParser::new())]
    resp_route_prefixes: bool,
    /// Shards of the RESP table when it is created [default: one per core].
    #[arg(long, env = "HEAPGRID_RESP_SHARDS")]
    resp_shards: Option<u32>,
    /// Log lines as `text` or `json` (one object per line) [default: text]; the level comes
    /// from RUST_LOG (default `info`; e.g. RUST_LOG=heapgrid_actors=debug).
    #[arg(long, env = "HEAPGRID_LOG_FORMAT", value_parser = ["text", "json"])]
    log_format: Option<String>,
}

#[derive(clap::Args)]
struct StatsArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Instead: ask every millisecond until no shard is recovering, printing a JSON line with
    /// the time (`unix_s`) and the shards still recovering at the first answer and whenever
    /// they change (how benches/crash-restart.sh times a restart).
    #[arg(long)]
    until_recovered: bool,
}

#[derive(clap::Args)]
struct OutArgs {
    /// Print each result as one line of compact JSON (for scripts) instead of pretty JSON.
    #[arg(long)]
    json: bool,
}

/// Set by `--json`: results are printed as one line of compact JSON.
static COMPACT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A result as the user asked to see it.
fn show(v: &serde_json::Value) -> Result<String, AnyErr> {
    Ok(if COMPACT.load(std::sync::atomic::Ordering::Relaxed) {
        serde_json::to_string(v)?
    } else {
        serde_json::to_string_pretty(v)?
    })
}

#[derive(clap::Args)]
struct ClientArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    addr: SocketAddr,
    /// Auth token.
    #[arg(long, env = "HEAPGRID_TOKEN")]
    token: Option<String>,
}

/// A size in bytes: a number, optionally followed by K, M, G or T (powers of 1024, an optional
/// `B` or `iB` after it).
fn parse_bytes(s: &str, min: u64) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{s:?}: unknown unit {c:?} (K, M, G or T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("{s:?} is not a size (512M, 2G, 1048576)"))?;
    let bytes = n.checked_mul(1u64 << shift).ok_or_else(|| format!("{s:?} is too large"))?;
    if bytes < min {
        return Err(format!("{s:?} is below the smallest allowed, {} MiB", min >> 20));
    }
    Ok(bytes)
}

/// The config file, and (merged with the flags, the environment and the defaults by `merge`)
/// the effective config.
#[derive(Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    listen: Option<SocketAddr>,
    data: Option<PathBuf>,
    fsync: Option<String>,
    checkpoint_interval_ms: Option<u64>,
    /// As `--checkpoint-log-bytes` (a string with a suffix, or a number of bytes).
    checkpoint_log_bytes: Option<serde_json::Value>,
    /// As `--memory-budget` (a string with a suffix, or a number of bytes).
    memory_budget: Option<serde_json::Value>,
    inflight_max: Option<usize>,
    connections_max: Option<usize>,
    /// Node-wide bytes of connection input buffers (large frames arriving), beyond 128 KiB each.
    buffer_budget_bytes: Option<u64>,
    /// Milliseconds a started frame has to arrive whole.
    frame_deadline_ms: Option<u64>,
    #[serde(default)]
    tokens: Vec<TokenConfig>,
    /// Procedure modules loaded at start (as `--procedures`).
    #[serde(default)]
    procedures: Vec<PathBuf>,
    /// Snippet budgets of a request that sets none (each absent field keeps the built-in).
    snippet_limits: Option<LimitOverrides>,
    /// The most budget a request may ask for.
    snippet_max: Option<LimitOverrides>,
    /// Run snippets in sandbox worker processes (default true; false is `--trusted-snippets`).
    snippet_sandbox: Option<bool>,
    /// Most sandbox workers (snippets running at once); default: 2 × cores.
    snippet_workers: Option<usize>,
    /// As `--node-id`, `--peer-listen`, `--advertise-peer`, `--join` and `--cluster-cookie`.
    node_id: Option<u64>,
    peer_listen: Option<SocketAddr>,
    advertise_peer: Option<String>,
    #[serde(default)]
    join: Vec<String>,
    cluster_cookie: Option<String>,
    /// As `--replicas`, `--sync` and `--repl-retain`.
    replicas: Option<u32>,
    sync: Option<u32>,
    repl_retain: Option<usize>,
    /// As `--metrics-listen`, `--slowlog-threshold-ms` and `--log-format`.
    metrics_listen: Option<SocketAddr>,
    slowlog_threshold_ms: Option<u64>,
    log_format: Option<String>,
    /// As `--resp-listen`, `--resp-table` and `--resp-route-prefixes`.
    resp_listen: Option<SocketAddr>,
    resp_table: Option<String>,
    resp_route_prefixes: Option<bool>,
    resp_shards: Option<u32>,
}

/// Merges `serve`'s flags (and through clap their environment variables) over the config
/// file, then fills in every default: the one config the server runs with.
fn merge(a: ServeArgs, mut f: ConfigFile) -> Result<ConfigFile, AnyErr> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    f.listen = Some(a.listen.or(f.listen).unwrap_or_else(|| ([127, 0, 0, 1], 7070).into()));
    f.data = Some(a.data.or(f.data).unwrap_or_else(|| PathBuf::from("./heapgrid-data")));
    let fsync = a.fsync.or(f.fsync).unwrap_or_else(|| "every:100".into());
    parse_fsync(&fsync)?;
    f.fsync = Some(fsync);
    f.checkpoint_interval_ms =
        Some(f.checkpoint_interval_ms.unwrap_or(heapgrid_actors::grid::CHECKPOINT_INTERVAL_MS_DEFAULT));
    let log_bytes =
        bytes_setting("checkpoint_log_bytes", 1 << 20, a.checkpoint_log_bytes, f.checkpoint_log_bytes)?
            .unwrap_or(heapgrid::heap::LOG_TAIL_BYTES_MAX_DEFAULT);
    f.checkpoint_log_bytes = Some(log_bytes.into());
    f.memory_budget =
        bytes_setting("memory_budget", 16 << 20, a.memory_budget, f.memory_budget)?.map(Into::into);
    f.inflight_max = Some(f.inflight_max.unwrap_or(INFLIGHT_MAX_DEFAULT));
    f.connections_max = Some(f.connections_max.unwrap_or(heapgrid::server::CONNECTIONS_MAX_DEFAULT));
    f.buffer_budget_bytes =
        Some(f.buffer_budget_bytes.unwrap_or(heapgrid::server::BUFFER_BUDGET_BYTES_DEFAULT));
    f.frame_deadline_ms =
        Some(f.frame_deadline_ms.unwrap_or(heapgrid::server::FRAME_DEADLINE_DEFAULT.as_millis() as u64));
    // Modules named by the flag (or its variable) are loaded as well as the file's.
    f.procedures.extend(a.procedures);
    f.snippet_sandbox = Some(!a.trusted_snippets && f.snippet_sandbox.unwrap_or(true));
    f.snippet_workers = Some(f.snippet_workers.unwrap_or(2 * cores).max(1));
    f.node_id = a.node_id.or(f.node_id);
    f.peer_listen = a.peer_listen.or(f.peer_listen);
    f.advertise_peer = a.advertise_peer.or(f.advertise_peer);
    if !a.join.is_empty() {
        f.join = a.join;
    }
    f.cluster_cookie = a.cluster_cookie.or(f.cluster_cookie);
    if f.peer_listen.is_some() {
        if f.node_id.is_none() {
            return Err("--peer-listen needs --node-id".into());
        }
        if f.cluster_cookie.is_none() {
            return Err(
                "--peer-listen needs a cluster cookie (--cluster-cookie or HEAPGRID_CLUSTER_COOKIE): \
                        the secret every node of the cluster presents"
                    .into(),
            );
        }
    }
    f.replicas = Some(a.replicas.or(f.replicas).unwrap_or(2));
    f.sync = Some(a.sync.or(f.sync).unwrap_or(1));
    f.repl_retain = Some(a.repl_retain.or(f.repl_retain).unwrap_or(100_000));
    f.metrics_listen = a.metrics_listen.or(f.metrics_listen);
    f.slowlog_threshold_ms = Some(
        a.slowlog_threshold_ms
            .or(f.slowlog_threshold_ms)
            .unwrap_or(heapgrid::metrics::SLOWLOG_THRESHOLD_DEFAULT.as_millis() as u64),
    );
    let format = a.log_format.or(f.log_format).unwrap_or_else(|| "text".into());
    if !matches!(format.as_str(), "text" | "json") {
        return Err(format!("log_format {format:?}: use text or json").into());
    }
    f.log_format = Some(format);
    f.resp_listen = a.resp_listen.or(f.resp_listen);
    f.resp_table =
        Some(a.resp_table.or(f.resp_table).unwrap_or_else(|| heapgrid::resp::command::TABLE_DEFAULT.into()));
    f.resp_route_prefixes = Some(a.resp_route_prefixes || f.resp_route_prefixes.unwrap_or(false));
    f.resp_shards = Some(a.resp_shards.or(f.resp_shards).unwrap_or(cores as u32).max(1));
    Ok(f)
}

/// The effective config as JSON, with the secrets (tokens, the cluster cookie) hidden.
fn config_json(c: &ConfigFile) -> Result<String, AnyErr> {
    let mut v = serde_json::to_value(c)?;
    if let Some(tokens) = v.get_mut("tokens").and_then(|t| t.as_array_mut()) {
        for t in tokens {
            t["token"] = "<hidden>".into();
        }
    }
    if v.get("cluster_cookie").is_some_and(|c| !c.is_null()) {
        v["cluster_cookie"] = "<hidden>".into();
    }
    Ok(serde_json::to_string_pretty(&v)?)
}

/// Log lines to stderr as text or JSON, at the level RUST_LOG gives (default `info`).
fn init_logs(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_writer(std::io::stderr).with_target(false).with_env_filter(filter);
    if format == "json" {
        b.json().with_current_span(false).init();
    } else {
        b.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init();
    }
}

/// A size given as a flag (a string: `512M`) or in the config file (such a string, or a number
/// of bytes); the flag wins.
fn bytes_setting(
    name: &str,
    min: u64,
    flag: Option<String>,
    file: Option<serde_json::Value>,
) -> Result<Option<u64>, AnyErr> {
    let s = match (flag, file) {
        (Some(s), _) => s,
        (None, Some(serde_json::Value::String(s))) => s,
        (None, Some(serde_json::Value::Number(n))) => n.to_string(),
        (None, Some(v)) => {
            return Err(format!("{name}: expected bytes or a string like \"512M\", got {v}").into());
        }
        (None, None) => return Ok(None),
    };
    Ok(Some(parse_bytes(&s, min).map_err(|e| format!("{name}: {e}"))?))
}

fn parse_fsync(s: &str) -> Result<FsyncPolicy, String> {
    match s {
        "always" => Ok(FsyncPolicy::Always),
        "never" => Ok(FsyncPolicy::Never),
        _ => s
            .strip_prefix("every:")
            .and_then(|ms| ms.parse().ok())
            .map(FsyncPolicy::EveryMs)
            .ok_or_else(|| format!("fsync policy {s:?}: use always, never or every:MS")),
    }
}

type AnyErr = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // HEAPGRID_THREADS=1 runs everything on one thread (no cross-thread wake-ups at all).
    let mut threads =
        std::env::var("HEAPGRID_THREADS").ok().and_then(|s| s.parse::<usize>().ok()).filter(|&n| n > 0);
    // A server's config is read before its runtime starts: a memory budget asks for more threads.
    let (cmd, config) = match cli.cmd {
        Cmd::Serve(a) => {
            let print = a.print_config;
            match read_config(&a).and_then(|file| merge(a, file)) {
                Ok(c) if print => {
                    return match config_json(&c).and_then(|j| emit(&j)) {
                        Ok(()) => ExitCode::SUCCESS,
                        Err(e) => fail(&e),
                    };
                }
                Ok(c) => {
                    if threads.is_none() && c.memory_budget.is_some() {
                        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
                        threads = Some(BUDGET_THREADS_MIN.max(4 * cores));
                    }
                    (None, Some(c))
                }
                Err(e) => {
                    eprintln!("heapgrid: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            }
        }
        other => (Some(other), None),
    };
    let built = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
        None => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
    };
    let rt = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("heapgrid: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r: Result<(), AnyErr> = match (cmd, config) {
        (_, Some(c)) => rt.block_on(serve(c)),
        (Some(Cmd::Shell { client, out }), _) => {
            COMPACT.store(out.json, std::sync::atomic::Ordering::Relaxed);
            IN_SHELL.store(true, std::sync::atomic::Ordering::Relaxed);
            rt.block_on(shell(client))
        }
        (Some(Cmd::Eval { client, out, command }), _) => {
            COMPACT.store(out.json, std::sync::atomic::Ordering::Relaxed);
            rt.block_on(eval(client, command))
        }
        (Some(Cmd::Check { dir }), _) => check(&dir),
        (Some(Cmd::Cluster { client, op }), _) => rt.block_on(cluster(client, op)),
        (Some(Cmd::Bench(b)), _) => rt.block_on(bench(b)),
        (Some(Cmd::Stats(s)), _) => rt.block_on(stats(s)),
        (Some(Cmd::Tables { client, json }), _) => rt.block_on(tables(client, json)),
        (Some(Cmd::Slowlog { client, clear }), _) => rt.block_on(slowlog(client, clear)),
        (Some(Cmd::Serve(_)) | None, None) => Err("serve without a config".into()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// Exit codes (docs/operations.md): 0 success; 1 the operation failed (the server answered
/// an error: a snippet's error, a missing table, a refused permission...); 2 a usage or
/// config error (clap's own code for bad flags); 3 the server could not be reached or the
/// connection was lost; 4 `check` found a corrupt heap.
const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_UNREACHABLE: u8 = 3;
const EXIT_CORRUPT: u8 = 4;

/// An error that ends the command with a particular exit code.
#[derive(Debug)]
struct Exit(u8, String);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.1)
    }
}

impl std::error::Error for Exit {}

/// Prints the error and gives its exit code.
fn fail(e: &AnyErr) -> ExitCode {
    eprintln!("heapgrid: {e}");
    match e.downcast_ref::<Exit>() {
        Some(Exit(code, _)) => ExitCode::from(*code),
        None => ExitCode::from(EXIT_FAILED),
    }
}

/// The `--config` file of `serve`, or the defaults without one.
fn read_config(a: &ServeArgs) -> Result<ConfigFile, AnyErr> {
    Ok(match &a.config {
        Some(p) => {
            serde_json::from_str(&std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?)
                .map_err(|e| format!("{}: {e}", p.display()))?
        }
        None => ConfigFile::default(),
    })
}

/// Runtime threads of a server with a memory budget when `HEAPGRID_THREADS` names none: a read
/// of a page the budget dropped waits for the disk on the thread that serves it, so more
/// threads keep more reads in flight (measured in docs/benchmarks.md, "Bigger than the budget").
const BUDGET_THREADS_MIN: usize = 16;

async fn serve(c: ConfigFile) -> Result<(), AnyErr> {
    init_logs(c.log_format.as_deref().unwrap_or("text"));
    let data = c.data.clone().unwrap_or_default();
    let listen = c.listen.ok_or("no listen address")?;
    let mut gopts = GridOptions {
        fsync: parse_fsync(c.fsync.as_deref().unwrap_or("every:100"))?,
        ..GridOptions::default()
    };
    if let Some(ms) = c.checkpoint_interval_ms {
        gopts.checkpoint_interval_ms = ms;
    }
    if let Some(bytes) = bytes_setting("checkpoint_log_bytes", 1 << 20, None, c.checkpoint_log_bytes.clone())?
    {
        gopts.checkpoint_log_bytes = bytes.max(1);
    }
    if let Some(bytes) = bytes_setting("memory_budget", 16 << 20, None, c.memory_budget.clone())? {
        tracing::info!(budget_bytes = bytes, "memory budget: clean heap pages are dropped to stay under it");
        gopts.memory_budget = Some(bytes);
    }
    let builtin_max = Limits::server_max();
    if let Some(m) = &c.snippet_max {
        gopts.snippet_max = builtin_max.with_overrides(m, &builtin_max);
    }
    if let Some(l) = &c.snippet_limits {
        gopts.snippet_limits = Limits::default().with_overrides(l, &gopts.snippet_max);
    }
    if c.snippet_sandbox.unwrap_or(true) {
        let exe = heapgrid_actors::snippet::worker::WorkerPool::default_exe().ok_or(
            "the snippet sandbox needs the heapgrid-worker binary next to heapgrid (or pass --trusted-snippets)",
        )?;
        let workers = c.snippet_workers.unwrap_or(2).max(1);
        tracing::info!(worker = %exe.display(), workers, "snippets run in sandbox workers");
        gopts.snippet_sandbox = Some(heapgrid_actors::grid::SandboxOptions { exe, workers });
    }
    let cluster = match c.peer_listen {
        None => None,
        Some(peer_listen) => {
            let node_id = c.node_id.ok_or("--peer-listen needs --node-id")?;
            let cookie = c.cluster_cookie.clone().ok_or(
                "--peer-listen needs a cluster cookie (--cluster-cookie or HEAPGRID_CLUSTER_COOKIE): \
                 the secret every node of the cluster presents",
            )?;
            Some(ClusterOptions {
                node_id,
                peer_listen,
                advertise_peer: c.advertise_peer.clone(),
                client_addr: String::new(),
                join: c.join.clone(),
                cookie,
                timing: RaftTiming::default(),
                replicas: c.replicas.unwrap_or(2),
                sync: c.sync.unwrap_or(1),
                detector: heapgrid_actors::cluster::detector::Timing::default(),
                retain_records: c.repl_retain.unwrap_or(100_000),
            })
        }
    };
    let grid = Grid::open(&data, gopts).await?;
    tracing::info!(data = %data.display(), tables = grid.tables().len(), "grid opened");
    for p in &c.procedures {
        let loaded =
            std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display())).and_then(|src| {
                let module = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                grid.core()
                    .snippets()
                    .engine
                    .set_procedures(&module, &src)
                    .map_err(|e| format!("{}: {e}", p.display()))
            });
        if let Err(e) = loaded {
            grid.close().await?;
            return Err(e.into());
        }
        tracing::info!(file = %p.display(), "procedures loaded");
    }
    let cfg = ServerConfig {
        listen,
        inflight_max: c.inflight_max.unwrap_or(INFLIGHT_MAX_DEFAULT),
        connections_max: c.connections_max.unwrap_or(heapgrid::server::CONNECTIONS_MAX_DEFAULT),
        tokens: c.tokens,
        buffer_budget_bytes: c.buffer_budget_bytes.unwrap_or(heapgrid::server::BUFFER_BUDGET_BYTES_DEFAULT),
        frame_deadline: c
            .frame_deadline_ms
            .map_or(heapgrid::server::FRAME_DEADLINE_DEFAULT, std::time::Duration::from_millis),
        metrics_listen: c.metrics_listen,
        slowlog_threshold: c
            .slowlog_threshold_ms
            .map_or(heapgrid::metrics::SLOWLOG_THRESHOLD_DEFAULT, std::time::Duration::from_millis),
        resp_listen: c.resp_listen,
        // (`merge` filled in every default.)
        resp: heapgrid::resp::command::RespConfig {
            table: c.resp_table.unwrap_or_default(),
            route_prefixes: c.resp_route_prefixes.unwrap_or(false),
            shards: c.resp_shards.unwrap_or(0),
        },
    };
    let trusted = cfg.tokens.is_empty();
    let server = match Server::start(grid.core().clone(), cfg).await {
        Ok(s) => s,
        Err(e) => {
            grid.close().await?;
            return Err(e.into());
        }
    };
    if let Some(mut c) = cluster {
        c.client_addr = server.local_addr().to_string();
        if let Err(e) = grid.core().start_cluster(&c).await {
            server.shutdown().await;
            grid.close().await?;
            return Err(e.into());
        }
        if let Some(n) = grid.core().cluster() {
            tracing::info!(node = c.node_id, peers = n.peer_addr(), join = ?c.join, "cluster node started");
            // Tests read this line to learn the peer port (with --peer-listen 127.0.0.1:0).
            emit(&format!("heapgrid peers on {}", n.peer_addr()))?;
        }
    }
    if let Some(addr) = server.metrics_addr() {
        tracing::info!(%addr, "metrics served at http://{addr}/metrics");
        // Tests read this line to learn the metrics port (with --metrics-listen 127.0.0.1:0).
        emit(&format!("heapgrid metrics on {addr}"))?;
    }
    if let Some(addr) = server.resp_addr() {
        tracing::info!(%addr, "RESP (Redis protocol) served");
        // Tests read this line to learn the RESP port (with --resp-listen 127.0.0.1:0).
        emit(&format!("heapgrid resp on {addr}"))?;
    }
    // Tests and scripts read this line to learn the port (with --listen 127.0.0.1:0).
    emit(&format!("heapgrid listening on {}", server.local_addr()))?;
    tracing::info!(addr = %server.local_addr(), trusted, "listening");
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        tokio::spawn(recovery_bar(std::sync::Arc::downgrade(grid.core())));
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: finishing in-flight requests");
    server.shutdown().await;
    grid.close().await?;
    tracing::info!("checkpointed and closed");
    Ok(())
}

/// While shards recover after a restart (they serve one by one as each finishes), a progress
/// bar on a terminal: op-log bytes replayed of those to replay, and shards left. (Off a
/// terminal the grid logs the same every few seconds: `watch_recovery`.)
async fn recovery_bar(core: std::sync::Weak<heapgrid_actors::grid::GridCore>) {
    let mut bar: Option<indicatif::ProgressBar> = None;
    loop {
        let Some(c) = core.upgrade() else { return };
        let r = c.recovering();
        drop(c);
        if r.is_empty() {
            if let Some(b) = bar {
                b.finish_with_message("recovered: every shard serves");
            }
            return;
        }
        let (done, total) =
            r.iter().fold((0u64, 0u64), |(d, t), s| (d + s.replayed_bytes, t + s.total_bytes));
        let b = bar.get_or_insert_with(|| {
            progress_bar(
                total,
                "recovering {bar:30} {binary_bytes}/{binary_total_bytes} of op log replayed, {msg}",
            )
        });
        b.set_length(total.max(done));
        b.set_position(done);
        b.set_message(format!("{} shard(s) left", r.len()));
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// A progress bar on standard error with `template` (indicatif's), drawn ten times a second.
fn progress_bar(len: u64, template: &str) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        b.set_style(style);
    }
    b
}

/// Progress of long work: a bar on a terminal, else a line on standard error every
/// `PROGRESS_LINE_EVERY` (so a log collector sees it move).
enum Progress {
    Bar(indicatif::ProgressBar),
    Lines { what: String, total: u64, last: std::time::Instant },
}

const PROGRESS_LINE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

impl Progress {
    fn new(total: u64, what: &str) -> Progress {
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            Progress::Bar(progress_bar(total, &format!("{what} {{bar:30}} {{pos}}/{{len}} {{msg}}")))
        } else {
            Progress::Lines { what: what.into(), total, last: std::time::Instant::now() }
        }
    }

    fn set(&mut self, pos: u64) {
        match self {
            Progress::Bar(b) => b.set_position(pos),
            Progress::Lines { what, total, last } => {
                if last.elapsed() >= PROGRESS_LINE_EVERY {
                    *last = std::time::Instant::now();
                    eprintln!("heapgrid: {what}: {pos} of {total}");
                }
            }
        }
    }

    /// Prints a line without tearing the bar.
    fn println(&self, line: &str) -> Result<(), AnyErr> {
        match self {
            Progress::Bar(b) => b.suspend(|| emit(line)),
            Progress::Lines { .. } => emit(line),
        }
    }

    fn finish(self) {
        if let Progress::Bar(b) = self {
            b.finish_and_clear();
        }
    }
}

async fn stats(a: StatsArgs) -> Result<(), AnyErr> {
    let client = connect(&a.client).await?;
    if !a.until_recovered {
        let s = client.stats().await?;
        return emit(&serde_json::to_string_pretty(&s)?);
    }
    let mut last = None;
    loop {
        let s = client.stats().await?;
        let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
        if last.as_ref() != Some(&s.recovering) {
            emit(&serde_json::json!({ "unix_s": at, "recovering": s.recovering }).to_string())?;
        }
        if s.recovering.is_empty() {
            return Ok(());
        }
        last = Some(s.recovering);
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

async fn tables(c: ClientArgs, json: bool) -> Result<(), AnyErr> {
    let client = connect(&c).await?;
    let tables = client.tables().await?;
    let stats = client.stats().await?;
    let entries = |name: &str| {
        stats
            .collections
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.shards.iter().map(|s| s.entries).sum::<u64>())
    };
    if json {
        let v: Vec<_> = tables
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name, "shards": t.shards, "fsync": format!("{:?}", t.fsync).to_lowercase(),
                    "entries": entries(&t.name),
                })
            })
            .collect();
        return emit(&serde_json::to_string_pretty(&v)?);
    }
    if tables.is_empty() {
        return emit("no tables (create one: heapgrid eval create NAME [SHARDS])");
    }
    emit(&format!("{:<32} {:>6} {:>12} {:>12}", "TABLE", "SHARDS", "FSYNC", "ENTRIES"))?;
    for t in &tables {
        let n = entries(&t.name).map_or_else(|| "-".to_string(), |n| n.to_string());
        let fsync = format!("{:?}", t.fsync).to_lowercase();
        emit(&format!("{:<32} {:>6} {:>12} {:>12}", t.name, t.shards, fsync, n))?;
    }
    Ok(())
}

async fn slowlog(c: ClientArgs, clear: bool) -> Result<(), AnyErr> {
    let client = connect(&c).await?;
    for e in client.slowlog(clear).await? {
        emit(&serde_json::to_string(&e)?)?;
    }
    Ok(())
}

async fn cluster(c: ClientArgs, cmd: ClusterCmd) -> Result<(), AnyErr> {
    use heapgrid_actors::cluster::map::Member;
    use heapgrid_actors::cluster::ops::{ClusterOp, ClusterResult};
    let client = connect(&c).await?;
    let op = match cmd {
        ClusterCmd::Status => ClusterOp::Status,
        ClusterCmd::Add { id, peer_addr, client_addr } => {
            ClusterOp::Add(Member { id, addr: client_addr, peer_addr })
        }
        ClusterCmd::Remove { id } => ClusterOp::Remove { node: id },
        ClusterCmd::Digest { table, shard } => ClusterOp::Digest { table, shard },
        ClusterCmd::Move { table, shard, node } => ClusterOp::Move { table, shard, node },
    };
    // A move runs on the Raft leader: asked through the node given.
    let client = match &op {
        ClusterOp::Move { .. } => {
            let s = client.cluster_status().await?;
            let leader = s.leader.and_then(|l| s.map.member(l)).and_then(|m| m.addr.parse().ok());
            match leader {
                Some(addr) => connect(&ClientArgs { addr, token: c.token.clone() }).await?,
                None => return Err("no Raft leader is known now; try again".into()),
            }
        }
        _ => client,
    };
    let out = match client.cluster(op).await? {
        ClusterResult::Status(s) => serde_json::to_string_pretty(&status_json(&s))?,
        ClusterResult::Changed { version } => serde_json::json!({ "version": version }).to_string(),
        ClusterResult::Digest(d) => serde_json::json!({
            "epoch": d.pos.epoch, "lsn": d.pos.lsn, "keys": d.keys, "digest": format!("{:08x}", d.digest),
        })
        .to_string(),
    };
    emit(&out)
}

/// A cluster status as JSON (the map's shard keys are pairs, which JSON objects cannot key by).
fn status_json(s: &heapgrid_actors::cluster::raft::ClusterStatus) -> serde_json::Value {
    let members: Vec<_> = s.map.members().collect();
    let shards: Vec<_> = s
        .map
        .placements()
        .map(|((coll, shard), p)| {
            // Each copy as the answering node last heard it: its position, and how many
            // records it is behind the primary's last report.
            let heard: Vec<_> = s.copies.iter().filter(|c| &c.table == coll && c.shard == *shard).collect();
            let primary_lsn = heard.iter().find(|c| c.node == p.primary).map(|c| c.pos.lsn);
            let copies: Vec<_> = heard
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "node": c.node, "epoch": c.pos.epoch, "lsn": c.pos.lsn,
                        "behind": primary_lsn.map(|l| l.saturating_sub(c.pos.lsn)),
                        "heard_ms_ago": c.heard_ms_ago,
                    })
                })
                .collect();
            serde_json::json!({
                "collection": coll, "shard": shard, "epoch": p.epoch, "primary": p.primary,
                "replicas": p.replicas, "in_sync": p.in_sync, "sync": p.sync, "copies": copies,
            })
        })
        .collect();
    serde_json::json!({
        "node": s.node, "role": s.role, "leader": s.leader, "term": s.term,
        "voters": s.voters, "learners": s.learners, "applied": s.applied,
        "map_version": s.map.version, "members": members, "shards": shards,
    })
}

async fn connect(c: &ClientArgs) -> Result<Client, AnyErr> {
    let opts = ClientOptions { token: c.token.clone(), ..ClientOptions::default() };
    Client::connect_with(c.addr, opts).await.map_err(|e| match e {
        // Refused by the server (a bad token): the operation failed, the server is there.
        heapgrid::GridError::Unauthenticated(_) | heapgrid::GridError::Protocol(_) => e.into(),
        e => Exit(EXIT_UNREACHABLE, format!("cannot reach the server at {}: {e}", c.addr)).into(),
    })
}

/// Writes a line to stdout; a closed stdout is an error, not a panic.
fn emit(line: &str) -> Result<(), AnyErr> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

fn parse_key(s: &str) -> Key {
    s.parse::<i64>().map(Key::Int).unwrap_or_else(|_| Key::Str(s.to_string()))
}

fn key_json(k: &Key) -> serde_json::Value {
    match k {
        Key::Int(i) => (*i).into(),
        Key::Str(s) => s.clone().into(),
    }
}

/// Runs one command; returns its JSON result.
async fn run_command(client: &Client, words: &[String]) -> Result<serde_json::Value, AnyErr> {
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    let usage = "commands: tables | create T [SHARDS] | drop T | get T K | put T K JSON | del T K | \
                 count T | scan T [PREFIX] [LIMIT] | fetch REF [OFFSET] [LIMIT] | \
                 procedures put NAME FILE | procedures drop NAME | ping | feeds | append F JSON | \
                 tail F [AFTER] [N] | feed create F [SEGMENT_RECORDS] [KEEP_SEGMENTS] | feed drop F | \
                 feed info F | feed get F ID | feed rm F ID | feed read F [AFTER] [N] | feed back F [N] | \
                 feed trim F KEEP | feed rotate F | feed version F V | feed cursors F | \
                 feed cursor F NAME [set AFTER | read N | del]; AFTER is start, end, first or an id; \
                 push Q JSON | pop Q [N] [WAIT_MS] [take] | ack Q SEQ/DELIVERY | \
                 nack Q SEQ/DELIVERY [DELAY_MS] | qlen Q | peek Q [N] | purge Q | queues; \
                 anything else is a snippet";
    Ok(match w.as_slice() {
        ["ping"] => {
            client.ping().await?;
            "pong".into()
        }
        ["tables"] => serde_json::to_value(client.tables().await?)?,
        ["create", t, rest @ ..] => {
            let shards = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(1);
            client.create_table(t, TableOptions { shards, fsync: None }).await?;
            "created".into()
        }
        ["drop", t] => {
            client.drop_table(t).await?;
            "dropped".into()
        }
        ["get", t, k] => {
            client.table(t).get_value(parse_key(k)).await?.map_or(serde_json::Value::Null, |v| v.to_json())
        }
        ["put", t, k, json @ ..] => {
            let j: serde_json::Value = serde_json::from_str(&json.join(" "))?;
            let version = client.table(t).put_value(parse_key(k), Value::from_json(&j)?).await?;
            serde_json::json!({ "version": version })
        }
        ["del", t, k] => client.table(t).delete(parse_key(k)).await?.into(),
        ["count", t] => client.table(t).count().await?.into(),
        ["scan", t, rest @ ..] => {
            let limit = rest.get(1).map(|s| s.parse()).transpose()?.unwrap_or(100);
            let table = client.table(t);
            let entries = match rest.first() {
                Some(prefix) => table.prefix(prefix, limit, false).await?,
                None => table.scan_page(.., limit, false).await?,
            };
            serde_json::Value::Array(
                entries
                    .iter()
                    .map(|(k, v)| serde_json::json!({ "key": key_json(k), "value": v.to_json() }))
                    .collect(),
            )
        }
        ["fetch", r, rest @ ..] => {
            let offset = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(0);
            let limit = rest.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1000);
            client.fetch(r, offset, limit).await?.to_json()
        }
        ["procedures", "put", module, file] => {
            let src = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
            client.put_procedures(module, &src).await?;
            "stored".into()
        }
        ["procedures", "drop", module] => {
            client.drop_procedures(module).await?;
            "dropped".into()
        }
        ["feeds"] => serde_json::to_value(client.feeds().await?)?,
        ["locks"] => match client.lock_op(heapgrid::lock::LockOp::List).await? {
            heapgrid::lock::LockResult::List { locks, sems } => {
                serde_json::json!({ "locks": serde_json::to_value(locks)?, "semaphores": serde_json::to_value(sems)? })
            }
            r => return Err(format!("unexpected answer {r:?}").into()),
        },
        ["push", q, json @ ..] if !json.is_empty() => {
            let j: serde_json::Value = serde_json::from_str(&json.join(" "))?;
            serde_json::json!({ "seq": client.queue(q).push(&j).await? })
        }
        ["pop", q, rest @ ..] => {
            // pop Q [N] [WAIT_MS] [take]
            let take = rest.last() == Some(&"take");
            let rest = if take { &rest[..rest.len() - 1] } else { rest };
            let n = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(1);
            let wait =
                std::time::Duration::from_millis(rest.get(1).map(|s| s.parse()).transpose()?.unwrap_or(0));
            let mode = if take { heapgrid::queue::Mode::Take } else { heapgrid::queue::Mode::Ack };
            let ds = client.queue(q).pop_with(heapgrid::Pop { n, wait, mode, ..Default::default() }).await?;
            serde_json::Value::Array(
                ds.iter()
                    .map(|d| {
                        serde_json::json!({
                            "seq": d.seq,
                            "receipt": format!("{}/{}", d.receipt.seq, d.receipt.delivery),
                            "deliveries": d.deliveries,
                            "value": d.value.to_json(),
                        })
                    })
                    .collect(),
            )
        }
        ["ack", q, receipt] => {
            client.queue(q).ack(parse_receipt(receipt)?).await?;
            "acked".into()
        }
        ["nack", q, receipt, rest @ ..] => {
            let delay = rest.first().map(|s| s.parse().map(std::time::Duration::from_millis)).transpose()?;
            client.queue(q).nack(parse_receipt(receipt)?, delay).await?;
            "nacked".into()
        }
        ["qlen", q] => serde_json::to_value(client.queue(q).len().await?)?,
        ["peek", q, rest @ ..] => {
            let n = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(10);
            serde_json::Value::Array(
                client
                    .queue(q)
                    .peek(n)
                    .await?
                    .iter()
                    .map(|(seq, v)| serde_json::json!({ "seq": seq, "value": v.to_json() }))
                    .collect(),
            )
        }
        ["purge", q] => serde_json::json!({ "purged": client.queue(q).purge().await? }),
        ["queues"] => match client.queue_op(heapgrid::queue::QueueOp::List).await? {
            heapgrid::queue::QueueResult::List(all) => serde_json::Value::Array(
                all.iter()
                    .map(|(n, l)| Ok(serde_json::json!({ "queue": n, "len": serde_json::to_value(l)? })))
                    .collect::<Result<Vec<_>, AnyErr>>()?,
            ),
            r => return Err(format!("unexpected answer {r:?}").into()),
        },
        ["lock" | "unlock", ..] => {
            return Err("lock and unlock hold a session: use them in `heapgrid shell`".into());
        }
        ["append", f, json @ ..] if !json.is_empty() => {
            let j: serde_json::Value = serde_json::from_str(&json.join(" "))?;
            serde_json::json!({ "id": client.feed(f).append(Value::from_json(&j)?).await? })
        }
        ["feed", "create", f, rest @ ..] => {
            let segment_records = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(0);
            let keep_segments = rest.get(1).map(|s| s.parse()).transpose()?;
            let retention = heapgrid::Retention { keep_segments, max_age_ms: None };
            client
                .create_feed(f, heapgrid::FeedOptions { segment_records, retention, ..Default::default() })
                .await?;
            "created".into()
        }
        ["feed", "drop", f] => {
            client.drop_feed(f).await?;
            "dropped".into()
        }
        ["feed", "info", f] => serde_json::to_value(client.feed(f).info().await?)?,
        ["feed", "get", f, id] => {
            client.feed(f).get(id.parse()?).await?.map_or(serde_json::Value::Null, |r| record_json(&r))
        }
        ["feed", "rm", f, id] => {
            client.feed(f).remove(id.parse()?).await?;
            "removed".into()
        }
        ["feed", "read", f, rest @ ..] => {
            let after = rest.first().map(|s| parse_pos(s)).transpose()?.unwrap_or(heapgrid::Pos::Start);
            let n = rest.get(1).map(|s| s.parse()).transpose()?.unwrap_or(100);
            page_json(&client.feed(f).read(after, n).await?)
        }
        ["feed", "back", f, rest @ ..] => {
            let n = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(100);
            page_json(&client.feed(f).read_back(None, n).await?)
        }
        ["feed", "trim", f, keep] => {
            serde_json::json!({ "dropped": client.feed(f).trim(keep.parse()?).await? })
        }
        ["feed", "rotate", f] => {
            client.feed(f).rotate().await?;
            "rotated".into()
        }
        ["feed", "version", f, v] => {
            client.feed(f).set_version(v.parse()?).await?;
            "set".into()
        }
        ["feed", "cursors", f] => serde_json::to_value(client.feed(f).cursors().await?)?,
        ["feed", "cursor", f, name] => serde_json::to_value(client.feed(f).cursor_get(name).await?)?,
        ["feed", "cursor", f, name, "set", at] => {
            serde_json::to_value(client.feed(f).cursor_set(name, parse_pos(at)?).await?)?
        }
        ["feed", "cursor", f, name, "read", n] => {
            page_json(&client.feed(f).cursor_read(name, n.parse()?, 0).await?)
        }
        ["feed", "cursor", f, name, "del"] => client.feed(f).cursor_delete(name).await?.into(),
        _ => return Err(usage.into()),
    })
}

/// A receipt as the shell prints it: `SEQ/DELIVERY`.
fn parse_receipt(s: &str) -> Result<heapgrid::queue::Receipt, AnyErr> {
    let (seq, delivery) =
        s.split_once('/').ok_or_else(|| format!("{s:?} is not a receipt (SEQ/DELIVERY)"))?;
    Ok(heapgrid::queue::Receipt { seq: seq.parse()?, delivery: delivery.parse()? })
}

/// A feed position on the command line: `start`, `end`, `first` (the first available) or an id.
fn parse_pos(s: &str) -> Result<heapgrid::Pos, AnyErr> {
    Ok(match s {
        "start" => heapgrid::Pos::Start,
        "end" => heapgrid::Pos::End,
        "first" => heapgrid::Pos::FirstAvailable,
        id => {
            heapgrid::Pos::After(id.parse().map_err(|_| format!("{id:?} is not start, end, first or an id"))?)
        }
    })
}

fn record_json(r: &heapgrid::FeedRecord) -> serde_json::Value {
    serde_json::json!({ "id": r.id, "prev": r.prev, "next": r.next, "version": r.version, "value": r.value.to_json() })
}

fn page_json(p: &heapgrid::ReadResult) -> serde_json::Value {
    serde_json::json!({ "records": p.records.iter().map(record_json).collect::<Vec<_>>(), "next": p.next })
}

/// `tail F [AFTER] [N]`: prints each record after AFTER (default: the end, i.e. new ones) as a
/// JSON line as it is appended, until N were printed (default: until interrupted).
async fn tail(client: &Client, words: &[String]) -> Result<(), AnyErr> {
    use futures_util::StreamExt;
    let feed = words.get(1).ok_or("usage: tail F [AFTER] [N]")?;
    let after = words.get(2).map(|s| parse_pos(s)).transpose()?.unwrap_or(heapgrid::Pos::End);
    let n: Option<u64> = words.get(3).map(|s| s.parse()).transpose()?;
    let mut s = Box::pin(client.feed(feed).follow(after));
    let mut printed = 0;
    while n.is_none_or(|n| printed < n) {
        match s.next().await {
            Some(r) => emit(&record_json(&r?).to_string())?,
            None => break,
        }
        printed += 1;
    }
    Ok(())
}

/// First words that make a line a command rather than a snippet.
const COMMANDS: &[&str] = &[
    "ping",
    "tables",
    "create",
    "drop",
    "get",
    "put",
    "del",
    "count",
    "scan",
    "fetch",
    "procedures",
    "feeds",
    "feed",
    "append",
    "tail",
    "lock",
    "unlock",
    "locks",
    "push",
    "pop",
    "ack",
    "nack",
    "qlen",
    "peek",
    "purge",
    "queues",
];

/// Commands whose first argument is a queue name.
const QUEUE_COMMANDS: &[&str] = &["push", "pop", "ack", "nack", "qlen", "peek", "purge"];

/// The shell's lock session (opened by the first `lock`) and the locks it holds. While it holds
/// any, every snippet the shell runs is fenced by all of them (`eval_fenced`): a lock lost
/// meanwhile makes the snippet fail with `StaleFence`, writing nothing.
#[derive(Default)]
struct ShellLocks {
    session: Option<heapgrid::Session>,
    held: std::collections::BTreeMap<String, heapgrid::LockGuard>,
}

impl ShellLocks {
    /// `lock NAME [WAIT_SECONDS] [LEASE_SECONDS]`, `unlock NAME`.
    async fn command(&mut self, client: &Client, words: &[String]) -> Result<serde_json::Value, AnyErr> {
        let w: Vec<&str> = words.iter().map(String::as_str).collect();
        match w.as_slice() {
            ["lock", name, rest @ ..] => {
                let secs = |i: usize| -> Result<Option<std::time::Duration>, AnyErr> {
                    Ok(rest
                        .get(i)
                        .map(|s| s.parse::<f64>())
                        .transpose()?
                        .map(std::time::Duration::from_secs_f64))
                };
                let (wait, lease) = (secs(0)?.unwrap_or_default(), secs(1)?);
                if self.held.contains_key(*name) {
                    return Err(format!("this shell already holds {name}").into());
                }
                if self.session.is_none() {
                    self.session = Some(client.session(None).await?);
                }
                let session = self.session.as_ref().ok_or("no session")?;
                match session.lock(name).acquire_with(wait, lease).await? {
                    Some(g) => {
                        let out = serde_json::json!({
                            "lock": name, "fence": g.fence(), "session": session.id(),
                            "expires_in_ms": g.expires_in().as_millis() as u64,
                        });
                        self.held.insert(name.to_string(), g);
                        Ok(out)
                    }
                    None => Ok(serde_json::json!({ "lock": name, "timeout": true })),
                }
            }
            ["unlock", name] => {
                let g = self.held.remove(*name).ok_or_else(|| format!("this shell does not hold {name}"))?;
                g.release().await?;
                Ok("released".into())
            }
            _ => Err("usage: lock NAME [WAIT_SECONDS] [LEASE_SECONDS] | unlock NAME".into()),
        }
    }

    async fn run_snippet(&self, client: &Client, src: &str) -> Result<serde_json::Value, AnyErr> {
        if self.held.is_empty() {
            return run_snippet(client, src).await;
        }
        let guards: Vec<&heapgrid::LockGuard> = self.held.values().collect();
        let (v, printed) = client.eval_fenced_output(src, Value::Null, &guards).await?;
        show_printed(&printed)?;
        Ok(v.to_json())
    }
}

/// A command: a command word followed by plain words (`del users bob`), not code
/// (`del users['bob']`, `count = len(users)`).
fn is_command(words: &[String]) -> bool {
    // A queue name may have dots (`mail.dead`); no snippet starts with `push NAME` or the like.
    let queue = words.first().is_some_and(|w| QUEUE_COMMANDS.contains(&w.as_str()));
    let name = |w: &String| !w.contains(['[', '(', '=', ':']) && (queue || !w.contains('.'));
    let plain = |w: &String| name(w) || w.starts_with(['{', '['].as_ref());
    words.first().is_some_and(|w| COMMANDS.contains(&w.as_str()))
        && words.get(1).is_none_or(name)
        && words.iter().skip(1).take(2).all(plain)
}

async fn run_snippet(client: &Client, src: &str) -> Result<serde_json::Value, AnyErr> {
    let (v, printed) = client.eval_output(src, Value::Null, LimitOverrides::default()).await?;
    show_printed(&printed)?;
    Ok(v.to_json())
}

/// What a snippet printed, before its result: on standard output in the shell, on standard
/// error for `eval` (whose standard output is the result alone, for scripts).
fn show_printed(printed: &str) -> Result<(), AnyErr> {
    if printed.is_empty() {
        return Ok(());
    }
    let text = printed.strip_suffix('\n').unwrap_or(printed);
    // With --json standard output holds results only.
    if IN_SHELL.load(std::sync::atomic::Ordering::Relaxed)
        && !COMPACT.load(std::sync::atomic::Ordering::Relaxed)
    {
        emit(text)
    } else {
        eprintln!("{text}");
        Ok(())
    }
}

/// Set while the shell runs (see `show_printed`).
static IN_SHELL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

async fn eval(c: ClientArgs, command: Vec<String>) -> Result<(), AnyErr> {
    let client = connect(&c).await?;
    if command.first().is_some_and(|w| w == "tail") && is_command(&command) {
        return tail(&client, &command).await;
    }
    let out = if is_command(&command) {
        run_command(&client, &command).await?
    } else {
        let src = if command == ["-"] {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
            s
        } else {
            command.join(" ")
        };
        run_snippet(&client, &src).await?
    };
    emit(&show(&out)?)?;
    Ok(())
}

async fn shell(c: ClientArgs) -> Result<(), AnyErr> {
    let client = connect(&c).await?;
    let mut pending = String::new();
    let mut locks = ShellLocks::default();
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        // Piped input: one command per line, no prompt.
        let mut line = String::new();
        loop {
            line.clear();
            if std::io::stdin().lock().read_line(&mut line)? == 0 {
                if !pending.is_empty() {
                    shell_line(&client, &mut locks, &mut pending, "").await?;
                }
                return Ok(());
            }
            if !shell_line(&client, &mut locks, &mut pending, &line).await? {
                return Ok(());
            }
        }
    }
    // Interactive: line editing, a block edited as a whole (`ShellHelper`), history (kept in
    // ~/.heapgrid_history, searched with Ctrl-R), Tab completion of commands and names.
    let mut editor = rustyline::Editor::<ShellHelper, rustyline::history::FileHistory>::new()?;
    let names = client.tables().await.map(|t| t.into_iter().map(|t| t.name).collect()).unwrap_or_default();
    editor.set_helper(Some(ShellHelper { names }));
    let history = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".heapgrid_history"));
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    loop {
        match editor.readline("heapgrid> ") {
            Ok(input) => {
                let _ = editor.add_history_entry(input.as_str());
                let go_on = if input.contains('\n') {
                    // A block, whole: run it as one snippet.
                    report(locks.run_snippet(&client, &input).await)?;
                    true
                } else {
                    shell_line(&client, &mut locks, &mut pending, &input).await?
                };
                if !go_on {
                    break;
                }
                if matches!(input.split_whitespace().next(), Some("create" | "drop" | "tables"))
                    && let (Some(h), Ok(t)) = (editor.helper_mut(), client.tables().await)
                {
                    h.names = t.into_iter().map(|t| t.name).collect();
                }
            }
            Err(rustyline::error::ReadlineError::Interrupted | rustyline::error::ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    Ok(())
}

/// The interactive shell's editor helper: a line ending in `:` (a `def`, `for`, `if`, `class`)
/// or with brackets open keeps the input open for more lines, all editable, until an empty line
/// (or the closing bracket); Tab completes command words and table names.
struct ShellHelper {
    names: Vec<String>,
}

impl rustyline::Helper for ShellHelper {}
impl rustyline::highlight::Highlighter for ShellHelper {}
impl rustyline::hint::Hinter for ShellHelper {
    type Hint = String;
}

impl rustyline::validate::Validator for ShellHelper {
    fn validate(
        &self,
        ctx: &mut rustyline::validate::ValidationContext,
    ) -> rustyline::Result<rustyline::validate::ValidationResult> {
        use rustyline::validate::ValidationResult;
        Ok(if block_open(ctx.input()) { ValidationResult::Incomplete } else { ValidationResult::Valid(None) })
    }
}

/// Whether the shell's input needs more lines: brackets still open, or a block (its first line
/// ends in `:`) not yet ended by an empty line.
fn block_open(input: &str) -> bool {
    let mut depth = 0i64;
    let mut quote: Option<char> = None;
    for c in input.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '(' | '[' | '{') => depth += 1,
            (None, ')' | ']' | '}') => depth -= 1,
            _ => {}
        }
    }
    if depth > 0 {
        return true;
    }
    let starts_block = input.lines().any(|l| l.trim_end().ends_with(':'));
    starts_block && !input.ends_with('\n') && !input.lines().last().is_some_and(|l| l.trim().is_empty())
}

impl rustyline::completion::Completer for ShellHelper {
    type Candidate = String;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _: &rustyline::Context<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        let start =
            line[..pos].rfind(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.')).map_or(0, |i| i + 1);
        let word = &line[start..pos];
        let first = line[..start].trim().is_empty();
        let pool: Box<dyn Iterator<Item = &str>> = if first {
            Box::new(
                COMMANDS.iter().copied().chain(["help", "quit"]).chain(self.names.iter().map(String::as_str)),
            )
        } else {
            Box::new(self.names.iter().map(String::as_str))
        };
        let mut found: Vec<String> = pool.filter(|c| c.starts_with(word)).map(String::from).collect();
        found.sort();
        found.dedup();
        Ok((start, found))
    }
}

/// What `help` prints in the shell.
const SHELL_HELP: &str = r#"heapgrid shell: type a command or a Python snippet; `quit` (or Ctrl-D) leaves.

Commands (NAME is a table, feed or queue; KEY a string or an integer):
  tables | create T [SHARDS] | drop T            list, create, drop tables
  get T KEY | put T KEY JSON | del T KEY         one key
  count T | scan T [PREFIX] [LIMIT]              many keys
  feeds | feed create F | append F JSON | tail F [AFTER] [N] | feed read F [AFTER] [N]
  push Q JSON | pop Q [N] [WAIT_MS] [take] | ack Q SEQ/DELIVERY | qlen Q | queues
  lock NAME [WAIT_S] [LEASE_S] | unlock NAME     while held, snippets are fenced by it
  procedures put MODULE FILE | fetch REF | ping | help | quit

Snippets run next to the data; a table is a dict, the last expression is the answer:
  users['bob'] = {'name': 'Bob', 'visits': 1}
  users['bob']['visits'] += 1
  [k for k in users.keys(prefix='b')]
  len(users)
  print('debug', users['bob'])     # printed text comes back beside the result
A line ending in `:` opens a block (def, for, if, class), edited as a whole; an empty line
runs it. Tab completes commands and table names.
History: Up/Down, Ctrl-R searches it (kept in ~/.heapgrid_history).
More: docs/snippets.md, docs/operations.md."#;

/// Runs one shell line; false to quit. A line ending in `:` opens a multi-line snippet, which
/// an empty line ends.
async fn shell_line(
    client: &Client,
    locks: &mut ShellLocks,
    pending: &mut String,
    line: &str,
) -> Result<bool, AnyErr> {
    let line = line.trim_end_matches(['\n', '\r']);
    if !pending.is_empty() || line.trim_end().ends_with(':') {
        if !line.trim().is_empty() {
            pending.push_str(line);
            pending.push('\n');
            return Ok(true);
        }
        let src = std::mem::take(pending);
        report(locks.run_snippet(client, &src).await)?;
        return Ok(true);
    }
    let words: Vec<String> = line.split_whitespace().map(String::from).collect();
    match words.first().map(String::as_str) {
        None => {}
        Some("quit" | "exit") => return Ok(false),
        Some("help" | "?") if words.len() == 1 => emit(SHELL_HELP)?,
        Some("tail") if is_command(&words) => {
            if let Err(e) = tail(client, &words).await {
                emit(&serde_json::json!({ "error": e.to_string() }).to_string())?;
            }
        }
        Some("lock" | "unlock") if is_command(&words) => report(locks.command(client, &words).await)?,
        _ if is_command(&words) => report(run_command(client, &words).await)?,
        _ => report(locks.run_snippet(client, line).await)?,
    }
    Ok(true)
}

fn report(r: Result<serde_json::Value, AnyErr>) -> Result<(), AnyErr> {
    match r {
        Ok(v) => emit(&show(&v)?),
        Err(e) => emit(&serde_json::json!({ "error": e.to_string() }).to_string()),
    }
}

async fn bench(b: BenchArgs) -> Result<(), AnyErr> {
    // Whether the server is there at all (exit code 3 if not), before any load starts.
    if b.redis.is_none() {
        connect(&b.client).await?.ping().await?;
    }
    let preloaded = Arc::new(std::sync::atomic::AtomicU64::new(0));
    if b.preload {
        let (done, keys) = (preloaded.clone(), b.keys);
        tokio::spawn(async move {
            let mut p = Progress::new(keys, "preloading keys");
            loop {
                let n = done.load(std::sync::atomic::Ordering::Relaxed);
                p.set(n);
                if n >= keys {
                    p.finish();
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        });
    }
    let fsync = b.fsync.as_deref().map(parse_fsync).transpose()?.map(heapgrid::FsyncSetting::from);
    let spec = heapgrid::loadgen::LoadSpec {
        addr: b.client.addr,
        token: b.client.token.clone(),
        table: b.table,
        shards: b.shards,
        fsync,
        connections: b.connections.max(1),
        pipeline: b.pipeline.max(1),
        keys: b.keys,
        hot_percent: b.hot.min(99),
        value_bytes: b.value_bytes,
        reads_percent: b.reads.min(100),
        duration: std::time::Duration::from_secs_f64(b.seconds.max(0.01)),
        preload: b.preload,
        preloaded: preloaded.clone(),
        feed: b.feed,
        follow_rate: b.follow_rate,
        redis: b.redis,
        locks: b.locks.as_deref().map(|l| match l {
            "contended" => heapgrid::loadgen_lock::LockLoad::Contended,
            _ => heapgrid::loadgen_lock::LockLoad::Uncontended,
        }),
        queues: b.queues.as_deref().map(|l| match l {
            "ack" => heapgrid::loadgen_queue::QueueLoad::Ack,
            _ => heapgrid::loadgen_queue::QueueLoad::Take,
        }),
        eval: b.eval.map(|src| heapgrid::loadgen::EvalLoad {
            src,
            grid_scope: b.grid_scope,
            uncached: b.uncached,
        }),
    };
    let r = match (b.redis_set_wait, b.redis) {
        (Some(wait), Some(addr)) => heapgrid::loadgen_repl::run(&spec, addr, wait).await?,
        (Some(_), None) => return Err("--redis-set-wait needs --redis ADDR".into()),
        _ => heapgrid::loadgen::run(spec).await?,
    };
    if b.json {
        emit(&serde_json::to_string(&r)?)?;
    } else {
        emit(&format!(
            "{} ops in {:.2} s: {:.0} ops/s, latency p50 {} us, p99 {} us, p99.9 {} us, max {} us, {} errors",
            r.ops,
            r.seconds,
            r.ops_per_sec,
            r.latency_us_p50,
            r.latency_us_p99,
            r.latency_us_p999,
            r.latency_us_max,
            r.errors
        ))?;
    }
    Ok(())
}

/// Every `*.heap` file under `dir`.
fn heaps(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            heaps(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "heap") {
            out.push(p);
        }
    }
    Ok(())
}

fn check(dir: &Path) -> Result<(), AnyErr> {
    // Refuse while a server has the directory (its heaps would read as locked, not corrupt).
    if let Ok(lock) = std::fs::File::open(dir.join("LOCK")) {
        lock.try_lock()
            .map_err(|_| format!("{} is in use by a running server; stop it first", dir.display()))?;
    }
    let mut files = Vec::new();
    heaps(dir, &mut files).map_err(|e| format!("{}: {e}", dir.display()))?;
    if files.is_empty() {
        return Err(format!("{}: no heap files", dir.display()).into());
    }
    let mut bad = 0;
    let mut progress = Progress::new(files.len() as u64, "checking heaps");
    for (i, f) in files.iter().enumerate() {
        progress.set(i as u64);
        // No op-log replay: nothing is written; this checks the last checkpoint on disk, then
        // reads (without applying) the op log it names.
        let r = Heap::open(f, HeapOptions { op_log: false, ..HeapOptions::default() })
            .map_err(|e| e.to_string())
            .and_then(|h| {
                let rep = h.check_integrity().map_err(|e| e.to_string())?;
                let log = h
                    .verify_log(&heapgrid::heap::oplog::FileLogDir::for_heap(f))
                    .map_err(|e| e.to_string())?;
                // A feed's heap is also walked as a feed: container, records and segments agree.
                // The lock heap: records decode, holders and permits name stored sessions.
                if f.components().any(|c| c.as_os_str() == "locks") {
                    heapgrid_actors::lock::store::check_heap(&h).map_err(|e| e.to_string())?;
                }
                // The queue heap: records decode, every item and key below its queue's floor.
                if f.components().any(|c| c.as_os_str() == "queues") {
                    heapgrid_actors::queue::store::check_heap(&h).map_err(|e| e.to_string())?;
                }
                if f.components().any(|c| c.as_os_str() == "feeds") {
                    heapgrid_actors::feed::FeedShard::check_heap(h).map_err(|e| e.to_string())?;
                }
                Ok((rep, log))
            });
        match r {
            Ok((rep, log)) => progress.println(&format!(
                "ok       {} ({} entries, {} tree pages, leaves {:.0}% full; op log: {} records after the checkpoint{})",
                f.display(),
                rep.entries,
                rep.tree_pages,
                rep.leaf_fill() * 100.0,
                log.records_replayed,
                if log.torn_tail_bytes > 0 {
                    format!(", a torn tail of {} bytes", log.torn_tail_bytes)
                } else {
                    String::new()
                }
            ))?,
            Err(e) => {
                bad += 1;
                progress.println(&format!("CORRUPT  {}: {e}", f.display()))?;
            }
        }
    }
    progress.finish();
    if bad > 0 {
        return Err(Exit(EXIT_CORRUPT, format!("{bad} of {} heaps failed the check", files.len())).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn a_block_stays_open_until_an_empty_line_or_its_brackets_close() {
        use super::block_open;
        assert!(!block_open("users['bob']"));
        assert!(block_open("for k in users.keys():"));
        assert!(block_open("for k in users.keys():\n    print(k)"));
        assert!(!block_open("for k in users.keys():\n    print(k)\n"));
        assert!(!block_open("for k in users.keys():\n    print(k)\n   "));
        assert!(block_open("users['x'] = {'a': [1,"));
        assert!(!block_open("users['x'] = {'a': [1,\n 2]}"));
        assert!(!block_open("s = '(:'"), "brackets and colons in strings do not count");
    }

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(parse_bytes("512M", 16 << 20).unwrap(), 512 << 20);
        assert_eq!(parse_bytes("2g", 16 << 20).unwrap(), 2 << 30);
        assert_eq!(parse_bytes("1GiB", 16 << 20).unwrap(), 1 << 30);
        assert_eq!(parse_bytes("64MB", 16 << 20).unwrap(), 64 << 20);
        assert_eq!(parse_bytes("33554432", 16 << 20).unwrap(), 32 << 20);
        assert!(parse_bytes("1M", 16 << 20).unwrap_err().contains("smallest"));
        assert_eq!(parse_bytes("1M", 1 << 20).unwrap(), 1 << 20);
        assert!(parse_bytes("12X", 16 << 20).unwrap_err().contains("unknown unit"));
        assert!(parse_bytes("lots", 16 << 20).is_err());
        assert!(parse_bytes("99999999999T", 16 << 20).unwrap_err().contains("too large"));
    }
}
