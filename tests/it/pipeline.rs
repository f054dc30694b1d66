//! The request path over TCP: pipelined requests are grouped into one message per shard, keep
//! their order per shard, and no reader sees a write that a crash then loses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use heapgrid::protocol::{self, OpResult, Request, RequestBody, Response, ResponseBody, TableOp};
use heapgrid::server::{Server as InProcess, ServerConfig};
use heapgrid::{Client, FsyncSetting, Grid, GridOptions, Key, TableOptions, Value, WriteOp};
use tokio::io::AsyncWriteExt;

use crate::server::{Server, raw_hello};

fn frame(id: u64, table: &str, op: TableOp) -> Vec<u8> {
    protocol::encode(&Request { id, body: RequestBody::Table { table: table.into(), op } }).unwrap()
}

/// Reads `n` responses, keyed by id.
async fn responses(s: &mut tokio::net::TcpStream, n: usize) -> HashMap<u64, Response> {
    let mut out = HashMap::new();
    let mut buf = Vec::new();
    while out.len() < n {
        tokio::time::timeout(Duration::from_secs(10), protocol::read_frame(s, &mut buf))
            .await
            .expect("server hung")
            .unwrap();
        let r: Response = protocol::decode(&buf).unwrap();
        out.insert(r.id, r);
    }
    out
}

fn value_of(r: &Response) -> Option<Value> {
    match &r.result {
        Ok(ResponseBody::Op(OpResult::Value(v))) => v.as_ref().map(|v| v.value.clone()),
        other => panic!("not a get answer: {other:?}"),
    }
}

async fn in_process(dir: &std::path::Path) -> (Grid, InProcess) {
    start_with(dir, ServerConfig::default()).await
}

/// A grid in `dir` served in this process on a free port with `cfg`'s other settings.
async fn start_with(dir: &std::path::Path, cfg: ServerConfig) -> (Grid, InProcess) {
    let grid = Grid::open(dir, GridOptions::default()).await.unwrap();
    let cfg = ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), ..cfg };
    let server = InProcess::start(grid.core().clone(), cfg).await.unwrap();
    (grid, server)
}

/// 16 gets to a 4-shard table sent in one write are at most 4 shard messages: none when they
/// are served from snapshots, one per shard when writes of the same connection go first (then
/// the gets follow them through the shard actors).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_pipelined_gets_to_four_shards_are_at_most_four_messages() {
    let dir = tempfile::tempdir().unwrap();
    let (grid, server) = in_process(dir.path()).await;
    let t = grid.create_table("t", TableOptions { shards: 4, fsync: None }).await.unwrap();
    for i in 0..16i64 {
        t.put(i, &(i * 10)).await.unwrap();
    }
    let rt = grid.core().table("t").unwrap();
    let mut s = raw_hello(server.local_addr()).await;
    // Several rounds: each must hold, whatever the key spread. Odd rounds start with a write to
    // every key, so every get must follow a write of its shard.
    for round in 0..6u64 {
        let mut bytes = Vec::new();
        let writes = if round % 2 == 1 { 16 } else { 0 };
        for i in 0..writes {
            let put = WriteOp::Put { key: Key::Int(i as i64), value: Value::Int(i as i64 * 10) };
            bytes.extend(frame(round * 100 + 50 + i, "t", TableOp::Write(put)));
        }
        for i in 0..16u64 {
            bytes.extend(frame(round * 100 + i + 1, "t", TableOp::Get { key: Key::Int(i as i64) }));
        }
        let before = rt.shard_messages();
        s.write_all(&bytes).await.unwrap();
        let got = responses(&mut s, 16 + writes as usize).await;
        let sent = rt.shard_messages() - before;
        assert!(sent <= 4, "16 gets (after {writes} writes) to 4 shards took {sent} shard messages");
        // After the first round (whose gets found the shards' snapshots older than the puts
        // above and went to the actors, which then captured fresh ones), gets with no write of
        // their own connection before them are served from snapshots.
        if writes == 0 && round > 0 {
            assert_eq!(sent, 0, "gets with no write before them are served from snapshots");
        }
        for i in 0..16u64 {
            assert_eq!(value_of(&got[&(round * 100 + i + 1)]), Some(Value::Int(i as i64 * 10)));
        }
    }
    drop(s);
    server.shutdown().await;
    grid.close().await.unwrap();
}

/// Many pipelined gets of a large value, answered from the snapshot: the server writes its
/// output buffer whenever it fills and goes on with what is buffered (no stall, nothing lost),
/// instead of decoding everything the socket holds into memory first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_gets_of_a_large_value_are_all_answered() {
    let dir = tempfile::tempdir().unwrap();
    let (grid, server) = in_process(dir.path()).await;
    let t = grid.create_table("t", TableOptions { shards: 1, fsync: None }).await.unwrap();
    let big = Value::Bytes(vec![7u8; 100_000]);
    t.put_value("big", big.clone()).await.unwrap();
    t.get_value("big").await.unwrap(); // a read through the actor makes the snapshot fresh
    let mut s = raw_hello(server.local_addr()).await;
    let n = 200u64;
    let mut bytes = Vec::new();
    for id in 1..=n {
        bytes.extend(frame(id, "t", TableOp::Get { key: Key::from("big") }));
    }
    // Write and read concurrently: the responses (20 MB) are far more than socket buffers hold.
    let (mut rd, mut wr) = s.split();
    let send = async move { wr.write_all(&bytes).await.unwrap() };
    let recv = async move {
        let mut got = 0;
        let mut buf = Vec::new();
        while got < n {
            tokio::time::timeout(Duration::from_secs(20), protocol::read_frame(&mut rd, &mut buf))
                .await
                .expect("server stalled")
                .unwrap();
            let r: Response = protocol::decode(&buf).unwrap();
            assert_eq!(value_of(&r), Some(big.clone()));
            got += 1;
        }
    };
    tokio::join!(send, recv);
    server.shutdown().await;
    grid.close().await.unwrap();
}

/// `SET k v2` then `GET k` pipelined on one connection always returns v2: across many shards,
/// many keys, and while other connections write to the same table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_get_sees_the_set_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let (grid, server) = in_process(dir.path()).await;
    grid.create_table("t", TableOptions { shards: 8, fsync: Some(FsyncSetting::Never) }).await.unwrap();
    let addr = server.local_addr();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Background load on the same shards (other keys).
    let mut load = Vec::new();
    for w in 0..4i64 {
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let c = Client::connect(addr).await.unwrap();
            let t = c.table("t");
            let mut n = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                t.put(format!("load-{w}-{}", n % 50), &n).await.unwrap();
                n += 1;
            }
        }));
    }
    let mut s = raw_hello(addr).await;
    let mut id = 1u64;
    for round in 0..40i64 {
        let mut bytes = Vec::new();
        let mut gets = Vec::new();
        for k in 0..64i64 {
            let key = Key::Int(k);
            let v = Value::Int(round * 1000 + k);
            bytes.extend(frame(id, "t", TableOp::Write(WriteOp::Put { key: key.clone(), value: v.clone() })));
            bytes.extend(frame(id + 1, "t", TableOp::Get { key }));
            gets.push((id + 1, v));
            id += 2;
        }
        s.write_all(&bytes).await.unwrap();
        let got = responses(&mut s, 128).await;
        for (gid, want) in gets {
            assert_eq!(value_of(&got[&gid]), Some(want), "round {round}");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    drop(s);
    server.shutdown().await;
    grid.close().await.unwrap();
}

/// Readers are answered only once what they saw is as durable as an acknowledgement: after a
/// `kill -9`, every value any reader saw (and every acknowledged write) is still there, under
/// fsync `always` and `never`. Readers run on their own connections and on the writers' (so a
/// read and a write share a pipeline), and the server checkpoints every 20 ms, so kills also land
/// inside background checkpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reader_sees_a_write_that_kill9_then_loses() {
    let seed = std::env::var("HEAPGRID_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("HEAPGRID_TEST_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("config.json");
    std::fs::write(&config, r#"{"checkpoint_interval_ms": 20}"#).unwrap();
    let config = config.to_str().unwrap();
    for attempt in 0..4 {
        let policy = if attempt % 2 == 0 { "always" } else { "never" };
        let server = Server::start(&data, &["--fsync", policy, "--config", config]);
        let addr = server.addr;
        let admin = Client::connect(addr).await.unwrap();
        // A table per policy: its fsync setting is fixed at creation.
        let table = format!("t-{policy}");
        if attempt < 2 {
            admin.create_table(&table, TableOptions { shards: 2, fsync: None }).await.unwrap();
        }
        // Per key: the highest value acknowledged to a writer, and the highest any reader saw.
        let acked: Arc<Mutex<HashMap<i64, i64>>> = Arc::default();
        let seen: Arc<Mutex<HashMap<i64, i64>>> = Arc::default();
        let mut tasks = Vec::new();
        let readers_on = |t: heapgrid::Table, seen: Arc<Mutex<HashMap<i64, i64>>>| async move {
            loop {
                for k in 0..4i64 {
                    match t.get::<i64>(k).await {
                        Ok(Some(n)) => {
                            let mut s = seen.lock().unwrap();
                            let e = s.entry(k).or_insert(n);
                            *e = (*e).max(n);
                        }
                        Ok(None) => {}
                        Err(_) => return,
                    }
                }
            }
        };
        for w in 0..4i64 {
            let acked = acked.clone();
            let c = Client::connect(addr).await.unwrap();
            tasks.push(tokio::spawn(readers_on(c.table(&table), seen.clone())));
            let table = table.clone();
            tasks.push(tokio::spawn(async move {
                let t = c.table(&table);
                for n in (attempt as i64 * 1_000_000).. {
                    if t.put(w, &n).await.is_err() {
                        return;
                    }
                    acked.lock().unwrap().insert(w, n);
                }
            }));
        }
        for _ in 0..4 {
            let t = Client::connect(addr).await.unwrap().table(&table);
            tasks.push(tokio::spawn(readers_on(t, seen.clone())));
        }
        tokio::time::sleep(Duration::from_millis(200 + rng.u64(0..400))).await;
        server.kill9();
        for t in tasks {
            t.await.unwrap();
        }
        let server = Server::start(&data, &[]);
        let t = Client::connect(server.addr).await.unwrap().table(&table);
        for k in 0..4i64 {
            let now = t.get::<i64>(k).await.unwrap().unwrap_or(i64::MIN);
            if let Some(&a) = acked.lock().unwrap().get(&k) {
                assert!(now >= a, "key {k}: acknowledged {a}, after kill -9 {now} (seed {seed})");
            }
            if let Some(&r) = seen.lock().unwrap().get(&k) {
                assert!(now >= r, "key {k}: a reader saw {r}, after kill -9 {now} (seed {seed})");
            }
        }
        server.kill9();
    }
}

async fn with_limits(dir: &std::path::Path, budget: u64, deadline: Duration) -> (Grid, InProcess) {
    let cfg =
        ServerConfig { buffer_budget_bytes: budget, frame_deadline: deadline, ..ServerConfig::default() };
    start_with(dir, cfg).await
}

/// Connections that each send half of a large frame draw on one node-wide budget: past it they
/// are closed with a reason, other clients are still served, and the budget is given back when
/// the connections go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_large_frames_share_one_budget() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 4 << 20;
    let (grid, server) = with_limits(dir.path(), budget, Duration::from_secs(60)).await;
    grid.create_table("t", TableOptions::default()).await.unwrap().put("k", &1).await.unwrap();
    let mut conns = Vec::new();
    let mut refused = 0;
    for _ in 0..12 {
        let mut s = raw_hello(server.local_addr()).await;
        // A 30 MiB frame, of which 1 MiB is sent.
        let mut bytes = (30u32 << 20).to_le_bytes().to_vec();
        bytes.extend(std::iter::repeat_n(0u8, 1 << 20));
        if s.write_all(&bytes).await.is_err() {
            refused += 1;
            continue;
        }
        conns.push(s);
    }
    // Poll the connections until enough were refused (those within the budget never answer).
    let mut pending: Vec<_> = conns.into_iter().map(Some).collect();
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while refused < 6 && std::time::Instant::now() < until {
        for slot in pending.iter_mut() {
            let Some(s) = slot.as_mut() else { continue };
            let mut buf = Vec::new();
            match tokio::time::timeout(Duration::from_millis(20), protocol::read_frame(s, &mut buf)).await {
                Ok(Ok(())) => {
                    let r: Response = protocol::decode(&buf).unwrap();
                    assert_eq!(r.id, 0);
                    let why = format!("{:?}", r.result);
                    assert!(why.contains("budget"), "{why}");
                    refused += 1;
                    *slot = None;
                }
                Ok(Err(_)) => {
                    refused += 1;
                    *slot = None;
                }
                Err(_) => {} // still waiting for the rest of its frame
            }
        }
        assert!(server.buffered_bytes() <= budget, "{} bytes drawn of {budget}", server.buffered_bytes());
    }
    assert!(refused >= 6, "12 MiB of half frames against a 4 MiB budget: only {refused} refused");
    let conns: Vec<_> = pending.into_iter().flatten().collect();
    // Everyone else is served meanwhile.
    let c = Client::connect(server.local_addr()).await.unwrap();
    assert_eq!(c.table("t").get::<i64>("k").await.unwrap(), Some(1));
    drop(conns);
    for _ in 0..100 {
        if server.buffered_bytes() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.buffered_bytes(), 0, "the budget was not given back");
    drop(c);
    server.shutdown().await;
    grid.close().await.unwrap();
}

/// A frame that starts and does not finish within the deadline ends its connection, with a
/// reason; a frame that finishes in time is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_left_half_sent_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let (grid, server) = with_limits(dir.path(), 1 << 30, Duration::from_millis(300)).await;
    grid.create_table("t", TableOptions::default()).await.unwrap();
    let mut s = raw_hello(server.local_addr()).await;
    let whole = frame(1, "t", TableOp::Count);
    // Sent in two parts, 100 ms apart: in time.
    s.write_all(&whole[..5]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(&whole[5..]).await.unwrap();
    let got = responses(&mut s, 1).await;
    assert!(matches!(got[&1].result, Ok(ResponseBody::Op(OpResult::Count(0)))), "{:?}", got[&1]);
    // Half a frame, then nothing.
    s.write_all(&whole[..5]).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), protocol::read_frame(&mut s, &mut buf))
        .await
        .expect("the server kept waiting for the frame")
        .unwrap();
    let r: Response = protocol::decode(&buf).unwrap();
    assert_eq!(r.id, 0);
    assert!(format!("{:?}", r.result).contains("not completed"), "{r:?}");
    assert!(started.elapsed() >= Duration::from_millis(250), "closed after {:?}", started.elapsed());
    server.shutdown().await;
    grid.close().await.unwrap();
}
