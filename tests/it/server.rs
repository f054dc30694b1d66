//! End-to-end tests of `heapgrid serve`: the real binary on a free port, the `Client` over TCP,
//! `kill -9` and restart, graceful SIGTERM, the auth matrix, 200 concurrent connections, and
//! malformed input that must affect only its own connection.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use heapgrid::protocol::{self, Hello, HelloReply, MAGIC, PROTOCOL_VERSION, Request, RequestBody, Response};
use heapgrid::{Client, ClientOptions, GridError, Key, TableOptions, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A `heapgrid serve` process.
pub(crate) struct Server {
    child: Child,
    pub(crate) addr: SocketAddr,
}

impl Server {
    pub(crate) fn start(dir: &Path, extra: &[&str]) -> Server {
        Server::start_at(dir, "127.0.0.1:0", extra)
    }

    pub(crate) fn start_at(dir: &Path, listen: &str, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_heapgrid"))
            .args(["serve", "--listen", listen, "--data"])
            .arg(dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr =
            line.trim().strip_prefix("heapgrid listening on ").unwrap_or_else(|| panic!("bad line {line:?}"));
        Server { addr: addr.parse().unwrap(), child }
    }

    /// The server's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub(crate) fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) of our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_speaks_the_same_table_api_and_survives_kill9() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let client = Client::connect(server.addr).await.unwrap();
    client.ping().await.unwrap();
    let users = client.create_table("users", TableOptions { shards: 4, fsync: None }).await.unwrap();
    users.put("bob", &serde_json::json!({"name": "bob", "visits": 1})).await.unwrap();
    assert_eq!(users.increment("bob", heapgrid::path!["visits"], 2).await.unwrap(), Value::Int(3));
    let bob: serde_json::Value = users.get("bob").await.unwrap().unwrap();
    assert_eq!(bob["visits"], 3);
    assert!(matches!(client.table("nope").get_value("x").await, Err(GridError::NoSuchTable(_))));

    // Many tasks pipelining over one connection; remember what was acknowledged.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..20)
        .map(|t| {
            let (users, acked) = (users.clone(), acked.clone());
            tokio::spawn(async move {
                for i in 0..50i64 {
                    let k = t * 1000 + i;
                    if users.put_value(k, Value::Int(k)).await.is_ok() {
                        acked.lock().unwrap().push(k);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), 1000);
    let streamed: Vec<_> = users.scan(Key::Int(0)..Key::Int(1_000_000), 64, false).collect().await;
    assert_eq!(streamed.len(), 1000);

    let addr = server.addr.to_string();
    server.kill9();
    // The same client notices, and reconnects once the server is back (same address, same data).
    assert!(users.get_value(0i64).await.is_err(), "a dead server cannot answer");
    let server = Server::start_at(dir.path(), &addr, &[]);
    for k in acked {
        assert_eq!(users.get_value(k).await.unwrap(), Some(Value::Int(k)), "acknowledged key {k} lost");
    }
    assert_eq!(users.count().await.unwrap(), 1001);
    let status = server.terminate();
    assert!(status.success(), "graceful shutdown failed: {status:?}");
    let check = Command::new(env!("CARGO_BIN_EXE_heapgrid")).arg("check").arg(dir.path()).output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        serde_json::json!({
            "tokens": [
                {"token": "root", "permissions": {"*": ["admin"]}},
                {"token": "writer", "permissions": {"users": ["read", "write"]}},
                {"token": "reader", "permissions": {"users": ["read"], "log*": ["read"]}},
                {"token": "blind", "permissions": {"users": ["write"]}}
            ]
        })
        .to_string(),
    )
    .unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--config", config.to_str().unwrap()]);
    let as_ = |token: Option<&str>| {
        let opts =
            ClientOptions { token: token.map(String::from), connect_attempts: 1, ..ClientOptions::default() };
        Client::connect_with(server.addr, opts)
    };
    assert!(matches!(as_(None).await, Err(GridError::Unauthenticated(_))));
    assert!(matches!(as_(Some("guess")).await, Err(GridError::Unauthenticated(_))));
    let root = as_(Some("root")).await.unwrap();
    root.create_table("users", TableOptions::default()).await.unwrap();
    root.create_table("secrets", TableOptions::default()).await.unwrap();
    root.table("secrets").put("k", &1).await.unwrap();

    let writer = as_(Some("writer")).await.unwrap();
    writer.table("users").put("bob", &1).await.unwrap();
    assert!(matches!(
        writer.create_table("t2", TableOptions::default()).await,
        Err(GridError::PermissionDenied { .. })
    ));
    assert!(matches!(writer.table("secrets").get_value("k").await, Err(GridError::PermissionDenied { .. })));

    let reader = as_(Some("reader")).await.unwrap();
    assert_eq!(reader.table("users").get::<i64>("bob").await.unwrap(), Some(1));
    let denied = reader.table("users").put("bob", &2).await;
    assert!(
        matches!(denied, Err(GridError::PermissionDenied { ref permission, .. }) if permission == "write"),
        "{denied:?}"
    );
    // The connection stays usable for what it may do.
    assert_eq!(reader.table("users").get::<i64>("bob").await.unwrap(), Some(1));
    let names: Vec<String> = reader.tables().await.unwrap().into_iter().map(|t| t.name).collect();
    assert_eq!(names, vec!["users"], "a reader lists only what it may read");
    assert!(matches!(reader.drop_table("users").await, Err(GridError::PermissionDenied { .. })));
    root.create_table("logs", TableOptions::default()).await.unwrap();
    assert_eq!(reader.table("logs").get_value("x").await.unwrap(), None, "log* covers logs");

    // Write without read: refused, since write results (CAS `current`) would reveal data.
    let blind = as_(Some("blind")).await.unwrap();
    let cas = blind.table("users").cas("bob", heapgrid::Expect::Absent, None).await;
    assert!(
        matches!(cas, Err(GridError::PermissionDenied { ref permission, .. }) if permission == "read"),
        "{cas:?}"
    );
    drop(server);

    // A token configured twice is refused at start.
    let dup = dir.path().join("dup.json");
    std::fs::write(
        &dup,
        serde_json::json!({"tokens": [{"token": "x", "permissions": {}}, {"token": "x", "permissions": {}}]})
            .to_string(),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_heapgrid"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config", dup.to_str().unwrap(), "--data"])
        .arg(dir.path().join("dupdata"))
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("twice"));

    // Trusted mode (no tokens) refuses to listen beyond loopback.
    let out = Command::new(env!("CARGO_BIN_EXE_heapgrid"))
        .args(["serve", "--listen", "0.0.0.0:0", "--data"])
        .arg(dir.path().join("other"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.json");
    std::fs::write(&config, serde_json::json!({"connections_max": 2}).to_string()).unwrap();
    let server = Server::start(&dir.path().join("d"), &["--config", config.to_str().unwrap()]);
    let a = Client::connect(server.addr).await.unwrap();
    let b = Client::connect(server.addr).await.unwrap();
    let opts = ClientOptions { connect_attempts: 1, ..ClientOptions::default() };
    let third = Client::connect_with(server.addr, opts).await;
    assert!(
        matches!(third, Err(GridError::Unavailable(ref m)) if m.contains("limit")),
        "{}",
        third.err().map(|e| e.to_string()).unwrap_or_default()
    );
    a.ping().await.unwrap();
    b.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let admin = Client::connect(server.addr).await.unwrap();
    admin.create_table("t", TableOptions { shards: 2, fsync: None }).await.unwrap();
    let tasks: Vec<_> = (0..200i64)
        .map(|c| {
            let addr = server.addr;
            tokio::spawn(async move {
                let client = Client::connect(addr).await.unwrap();
                let t = client.table("t");
                for i in 0..10i64 {
                    t.put_value(c * 100 + i, Value::Int(i)).await.unwrap();
                }
                for i in 0..10i64 {
                    assert_eq!(t.get_value(c * 100 + i).await.unwrap(), Some(Value::Int(i)));
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(admin.table("t").count().await.unwrap(), 2000);
}

pub(crate) async fn raw_hello(addr: SocketAddr) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let hello = Hello { magic: MAGIC, version: PROTOCOL_VERSION, token: None };
    protocol::write_msg(&mut s, &hello).await.unwrap();
    let mut buf = Vec::new();
    protocol::read_frame(&mut s, &mut buf).await.unwrap();
    assert!(matches!(protocol::decode::<HelloReply>(&buf).unwrap(), HelloReply::Welcome { .. }));
    s
}

/// Reads until the server closes; returns the connection-error response if one came.
async fn closing_error(s: &mut tokio::net::TcpStream) -> Option<Response> {
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), protocol::read_frame(s, &mut buf))
        .await
        .expect("server hung");
    r.ok().map(|_| protocol::decode::<Response>(&buf).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_ends_only_its_own_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let good = Client::connect(server.addr).await.unwrap();
    let t = good.create_table("t", TableOptions::default()).await.unwrap();
    t.put("k", &1).await.unwrap();

    // Garbage instead of a hello: refused.
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    s.write_all(&[5, 0, 0, 0, 1, 2, 3, 4, 5]).await.unwrap();
    let mut buf = Vec::new();
    protocol::read_frame(&mut s, &mut buf).await.unwrap();
    assert!(matches!(protocol::decode::<HelloReply>(&buf).unwrap(), HelloReply::Refused { .. }));

    // An oversized hello: refused without reading it.
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    s.write_all(&(30u32 << 20).to_le_bytes()).await.unwrap();
    protocol::read_frame(&mut s, &mut buf).await.unwrap();
    assert!(matches!(protocol::decode::<HelloReply>(&buf).unwrap(), HelloReply::Refused { .. }));

    // A wrong protocol version: refused with a clear error.
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    protocol::write_msg(&mut s, &Hello { magic: MAGIC, version: 99, token: None }).await.unwrap();
    protocol::read_frame(&mut s, &mut buf).await.unwrap();
    match protocol::decode::<HelloReply>(&buf).unwrap() {
        HelloReply::Refused { error } => assert!(error.to_string().contains("version 99")),
        r => panic!("{r:?}"),
    }

    // An undecodable request, an oversized frame, a truncated frame.
    let mut s = raw_hello(server.addr).await;
    s.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).await.unwrap();
    let r = closing_error(&mut s).await.expect("an error response");
    assert_eq!(r.id, 0);
    assert!(matches!(r.result, Err(GridError::Protocol(_))));
    let mut s = raw_hello(server.addr).await;
    s.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
    assert!(closing_error(&mut s).await.is_some_and(|r| r.id == 0));
    let mut s = raw_hello(server.addr).await;
    s.write_all(&[100, 0, 0, 0, 1, 2]).await.unwrap();
    s.shutdown().await.unwrap();
    let _ = closing_error(&mut s).await;

    // A client that sends a request and vanishes.
    let mut s = raw_hello(server.addr).await;
    let req = Request { id: 9, body: RequestBody::Ping };
    protocol::write_msg(&mut s, &req).await.unwrap();
    drop(s);

    // Random bytes after a hello, many times: never more than that connection is affected.
    let mut rng = fastrand::Rng::with_seed(0x9e37_79b9_7f4a_7c15);
    for _ in 0..50 {
        let mut s = raw_hello(server.addr).await;
        let mut junk = vec![0u8; 64];
        rng.fill(&mut junk);
        junk[..4].copy_from_slice(&60u32.to_le_bytes());
        s.write_all(&junk).await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    }
    assert_eq!(t.get::<i64>("k").await.unwrap(), Some(1), "the well-behaved client is unaffected");
}

pub(crate) fn cli(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_heapgrid"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn eval_shell_and_bench_commands() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let addr = server.addr.to_string();
    let a = addr.as_str();
    assert!(cli(&["eval", "--addr", a, "create", "t", "2"], None).0);
    assert!(cli(&["eval", "--addr", a, "put", "t", "bob", r#"{"visits": 2}"#], None).0);
    let (ok, out) = cli(&["eval", "--addr", a, "get", "t", "bob"], None);
    assert!(ok);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap(), serde_json::json!({"visits": 2}));
    let (ok, out) = cli(&["eval", "--addr", a, "get", "nope", "x"], None);
    assert!(!ok && out.contains("no such table"), "{out}");
    let (ok, out) = cli(&["shell", "--addr", a], Some("count t\nbogus\nscan t\n"));
    assert!(ok, "{out}");
    assert!(out.starts_with("1\n"), "{out}");
    assert!(out.contains("\"error\"") && out.contains("\"bob\""), "{out}");
    let (ok, out) = cli(
        &[
            "bench",
            "--addr",
            a,
            "--table",
            "b",
            "--connections",
            "4",
            "--pipeline",
            "2",
            "--keys",
            "100",
            "--seconds",
            "0.3",
            "--json",
        ],
        None,
    );
    assert!(ok, "{out}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(report["ops"].as_u64().unwrap() > 0 && report["errors"].as_u64() == Some(0), "{report}");
}
