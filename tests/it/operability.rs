//! Operating the real binary (issue 17): the Prometheus endpoint (scraped over HTTP, counters
//! that move), JSON log lines for a shard that cannot start (a corrupt heap: retried, then given
//! up, with the reason), the slow log, `tables`, `--print-config` with flags, environment and
//! file merged, the shell's `help` and `print()` through its standard input, the unknown-
//! collection hint, and the documented exit codes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use heapgrid::{Client, LimitOverrides, TableOptions, Value};

const BIN: &str = env!("CARGO_BIN_EXE_heapgrid");

/// A `heapgrid serve` with metrics on, its log (JSON lines) going to a file.
struct Served {
    child: std::process::Child,
    addr: SocketAddr,
    metrics: SocketAddr,
    log: std::path::PathBuf,
}

impl Served {
    fn start(dir: &Path, extra: &[&str]) -> Served {
        let log = dir.join("server.log");
        let child = Command::new(BIN)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
            ])
            .arg("--data")
            .arg(dir.join("data"))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // Dropped (the process killed and reaped) however this ends.
        let unset: SocketAddr = ([0, 0, 0, 0], 0).into();
        let mut s = Served { child, addr: unset, metrics: unset, log };
        let mut out = BufReader::new(s.child.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "the server ended early");
            if let Some(a) = line.trim().strip_prefix("heapgrid metrics on ") {
                s.metrics = a.parse().unwrap();
            } else if let Some(a) = line.trim().strip_prefix("heapgrid listening on ") {
                s.addr = a.parse().unwrap();
                assert_ne!(s.metrics, unset, "the metrics line comes first");
                return s;
            }
        }
    }

    fn log_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}")))
            .collect()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `path` over plain HTTP/1.1: (status line, body).
fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    let (head, body) = all.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// The value of the sample `name{labels}` (labels exactly as written) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped_over_http_and_move_and_the_slow_log_keeps_requests() {
    let dir = tempfile::tempdir().unwrap();
    let server = Served::start(dir.path(), &["--slowlog-threshold-ms", "0"]);
    let c = Client::connect(server.addr).await.unwrap();
    let t = c.create_table("users", TableOptions { shards: 2, fsync: None }).await.unwrap();
    for i in 0..50i64 {
        t.put(format!("k{i}"), &i).await.unwrap();
    }
    for i in 0..20i64 {
        let _: Option<i64> = t.get(format!("k{i}")).await.unwrap();
    }
    assert!(t.get_value("missing").await.unwrap().is_none());
    assert!(c.table("nope").get_value("x").await.is_err());
    // A snippet that prints, and one stopped by its step budget.
    let (v, printed) =
        c.eval_output("print('hello', 42)\nlen(users)", Value::Null, Default::default()).await.unwrap();
    assert_eq!((v, printed.as_str()), (Value::Int(50), "hello 42\n"));
    let tight = LimitOverrides { wall_ms: Some(100), ..Default::default() };
    let stopped = c.eval_with("n = 0\nwhile True:\n    n += 1", Value::Null, tight).await;
    assert!(stopped.is_err(), "{stopped:?}");

    let (status, text) = http_get(server.metrics, "/metrics");
    assert!(status.contains("200"), "{status}");
    assert!(text.ends_with("# EOF\n"), "not OpenMetrics text");
    for name in [
        "heapgrid_requests_total",
        "heapgrid_request_duration_seconds_bucket",
        "heapgrid_errors_total",
        "heapgrid_connections_open",
        "heapgrid_received_bytes_total",
        "heapgrid_sent_bytes_total",
        "heapgrid_oplog_fsync_duration_seconds_count",
        "heapgrid_oplog_writes_total",
        "heapgrid_checkpoint_duration_seconds_count",
        "heapgrid_snippet_runs_total",
        "heapgrid_snippet_compiles_total",
        "heapgrid_snippet_cache_hits_total",
        "heapgrid_snippet_budget_stops_total",
        "heapgrid_shard_restarts_total",
        "heapgrid_shards",
        "heapgrid_shard_mailbox_depth",
        "heapgrid_memory_anon_bytes",
        "heapgrid_memory_file_bytes",
        "heapgrid_heap_resident_bytes",
        "heapgrid_collection_entries",
    ] {
        assert!(text.contains(name), "{name} missing from the scrape:\n{text}");
    }
    let puts = sample(&text, r#"heapgrid_requests_total{kind="write",outcome="ok"}"#).unwrap();
    assert!(puts >= 50.0, "{puts}");
    let gets = sample(&text, r#"heapgrid_requests_total{kind="get",outcome="ok"}"#).unwrap();
    assert!(gets >= 21.0, "{gets}");
    assert!(sample(&text, r#"heapgrid_requests_total{kind="get",outcome="error"}"#).unwrap() >= 1.0);
    assert!(sample(&text, r#"heapgrid_errors_total{error="no_such_table"}"#).unwrap() >= 1.0);
    assert!(sample(&text, r#"heapgrid_snippet_budget_stops_total{budget="wall_time"}"#).unwrap() >= 1.0);
    assert!(sample(&text, "heapgrid_oplog_writes_total").unwrap() >= 50.0);
    assert!(sample(&text, "heapgrid_connections_open").unwrap() >= 1.0);
    assert!(
        sample(&text, r#"heapgrid_collection_entries{collection="users",kind="table"}"#).unwrap() == 50.0
    );
    assert!(sample(&text, r#"heapgrid_shards{state="running"}"#).unwrap() >= 2.0);
    assert!(sample(&text, "heapgrid_memory_anon_bytes").unwrap() > 0.0);

    // Counters move.
    for i in 50..60i64 {
        t.put(format!("k{i}"), &i).await.unwrap();
    }
    let (_, again) = http_get(server.metrics, "/metrics");
    let puts2 = sample(&again, r#"heapgrid_requests_total{kind="write",outcome="ok"}"#).unwrap();
    assert!(puts2 >= puts + 10.0, "{puts} -> {puts2}");
    assert!(
        sample(&again, "heapgrid_received_bytes_total").unwrap()
            > sample(&text, "heapgrid_received_bytes_total").unwrap()
    );
    assert!(http_get(server.metrics, "/nope").0.contains("404"));

    // The slow log (threshold 0: every request), newest first, the snippet's text kept.
    let slow = c.slowlog(false).await.unwrap();
    assert!(slow.len() > 20, "{}", slow.len());
    assert!(slow.windows(2).all(|w| w[0].unix_ms >= w[1].unix_ms));
    assert!(
        slow.iter().any(|e| e.kind == "eval_grid" && e.detail.contains("print('hello', 42)")),
        "{slow:?}"
    );
    assert!(slow.iter().any(|e| e.kind == "get" && e.error.as_deref() == Some("no_such_table")), "{slow:?}");
    let out = Command::new(BIN)
        .args(["slowlog", "--clear", "--addr"])
        .arg(server.addr.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = String::from_utf8(out.stdout).unwrap();
    assert!(lines.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()), "{lines}");
    let after = c.slowlog(false).await.unwrap();
    assert!(after.len() < slow.len(), "cleared: {} then {}", slow.len(), after.len());

    // `heapgrid tables`.
    let out =
        Command::new(BIN).args(["tables", "--json", "--addr"]).arg(server.addr.to_string()).output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["name"], "users");
    assert_eq!(v[0]["shards"], 2);
    assert_eq!(v[0]["entries"], 60);

    // `heapgrid stats`: every shard's figures, with its fill, last checkpoint and restarts.
    let out = Command::new(BIN).args(["stats", "--addr"]).arg(server.addr.to_string()).output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let users = v["collections"].as_array().unwrap().iter().find(|c| c["name"] == "users").unwrap();
    for shard in users["shards"].as_array().unwrap() {
        assert!(shard["used_pages_percent"].as_u64().unwrap() > 0, "{shard}");
        assert_eq!(shard["restarts"], 0, "{shard}");
        assert!(shard["last_checkpoint_unix_ms"].is_u64(), "{shard}");
    }

    // The budget stop was logged as a structured event.
    let logs = server.log_lines();
    assert!(
        logs.iter().any(|l| l["fields"]["message"] == "snippet stopped by its budget"
            && l["fields"]["budget"] == "wall_time"),
        "{logs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_cannot_start_is_logged_retried_given_up_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    {
        let server = Served::start(dir.path(), &[]);
        let c = Client::connect(server.addr).await.unwrap();
        let t = c.create_table("t", TableOptions { shards: 2, fsync: None }).await.unwrap();
        for i in 0..20i64 {
            t.put(i, &i).await.unwrap();
        }
    }
    // Corrupt the header page of one shard's heap.
    let mut heaps = Vec::new();
    find(&dir.path().join("data").join("tables"), &mut heaps);
    let victim =
        heaps.iter().find(|p| p.to_string_lossy().ends_with("shard-0000.heap")).expect("shard 0's heap");
    let mut f = std::fs::OpenOptions::new().write(true).open(victim).unwrap();
    f.write_all(&[0xA5; 8192]).unwrap();
    drop(f);

    let server = Served::start(dir.path(), &[]);
    // The supervisor retries the start (5 in 10 s), then gives up: the shard answers
    // ShardFailed, and the other serves.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let text = loop {
        let (_, text) = http_get(server.metrics, "/metrics");
        if sample(&text, r#"heapgrid_shards{state="failed"}"#) == Some(1.0) {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "the shard was not given up:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(sample(&text, "heapgrid_shard_restarts_total").unwrap() >= 1.0, "{text}");
    assert!(sample(&text, "heapgrid_shards_given_up_total").unwrap() >= 1.0, "{text}");
    let logs = server.log_lines();
    let retried =
        logs.iter().find(|l| l["fields"]["message"] == "shard start failed; retrying").expect("a retry line");
    assert_eq!(retried["level"], "WARN");
    assert_eq!(retried["fields"]["table"], "t");
    assert_eq!(retried["fields"]["shard"], 0);
    assert!(retried["fields"]["reason"].as_str().unwrap().contains("could not open shard"), "{retried}");
    assert!(logs.iter().any(|l| l["level"] == "ERROR"
        && l["fields"]["message"].as_str().unwrap().contains("giving up")
        && l["fields"]["table"] == "t"));
}

fn find(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            find(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn print_config_merges_flags_environment_and_file_and_hides_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("heapgrid.json");
    std::fs::write(
        &cfg,
        r#"{"tokens": [{"token": "s3cret-token-value", "permissions": {"*": ["read"]}}],
            "inflight_max": 64, "listen": "127.0.0.1:7000", "memory_budget": "1G"}"#,
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--print-config", "--listen", "127.0.0.1:7999", "--config"])
        .arg(&cfg)
        .env("HEAPGRID_MEMORY_BUDGET", "64M")
        .env("HEAPGRID_SLOWLOG_THRESHOLD_MS", "250")
        .env("HEAPGRID_CLUSTER_COOKIE", "cookie-value")
        .env("HEAPGRID_TRUSTED_SNIPPETS", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains("s3cret") && !text.contains("cookie-value"), "a secret was printed: {text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["listen"], "127.0.0.1:7999", "the flag wins over the file");
    assert_eq!(v["memory_budget"], 64 << 20, "the environment wins over the file");
    assert_eq!(v["inflight_max"], 64, "the file");
    assert_eq!(v["slowlog_threshold_ms"], 250);
    assert_eq!(v["fsync"], "every:100", "a default");
    assert_eq!(v["tokens"][0]["token"], "<hidden>");
    assert_eq!(v["snippet_sandbox"], false, "HEAPGRID_TRUSTED_SNIPPETS=1");

    // A config error is a usage error: exit code 2.
    std::fs::write(&cfg, r#"{"no_such_key": 1}"#).unwrap();
    let out = Command::new(BIN).args(["serve", "--print-config", "--config"]).arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shell_helps_prints_and_hints_and_exit_codes_hold() {
    let dir = tempfile::tempdir().unwrap();
    let server = Served::start(dir.path(), &[]);
    let addr = server.addr.to_string();

    // The shell, fed on standard input.
    let mut shell = Command::new(BIN)
        .args(["shell", "--json", "--addr", &addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    shell
        .stdin
        .take()
        .unwrap()
        .write_all(b"help\ncreate people 2\ntables\npeople['amy'] = {'age': 30}\nfor k in people.keys():\n    print('saw', k)\n\nnobody['x']\n")
        .unwrap();
    let out = shell.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("Commands") && text.contains("Snippets run next to the data"), "{text}");
    assert!(text.contains(r#"[{"name":"people","shards":2,"fsync":"#), "{text}");
    // With --json, what a snippet printed goes to standard error: standard output is results.
    assert!(!text.contains("saw amy"), "{text}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "saw amy\n");
    assert!(text.contains("no collection is named \\\"nobody\\\" (there are: people)"), "{text}");

    // eval: the result alone on standard output, the printed text on standard error.
    let out = Command::new(BIN)
        .args(["eval", "--json", "--addr", &addr, "print('n', len(people))\npeople['amy']['age']"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "30\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "n 1\n");

    // Exit codes: 1 the server answered an error; 3 no server there.
    let out = Command::new(BIN).args(["eval", "--addr", &addr, "orders['x']"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("heapgrid eval create orders"), "{err}");
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let out = Command::new(BIN).args(["eval", "--addr", &dead.to_string(), "ping"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
}
