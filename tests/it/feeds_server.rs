//! Feeds on the real `heapgrid serve` binary: `kill -9` during a stream of appends from several
//! clients (every acknowledged append present, the chain intact, ids continuing above the
//! highest issued, cursors resuming where they were), a follower over TCP, permissions per feed
//! name, and the CLI's feed commands.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use heapgrid::{Client, ClientOptions, FeedOptions, GridError, Pos, Retention, Value};

use crate::server::{Server, cli};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_appends_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    // Checkpoints every 30 ms race the appends, so recovery meets checkpoint + log states.
    let config = dir.path().join("config.json");
    std::fs::write(&config, r#"{"checkpoint_interval_ms": 30}"#).unwrap();
    let config = config.to_str().unwrap().to_string();
    let data = dir.path().join("data");
    let mut server = Server::start(&data, &["--fsync", "never", "--config", &config]);
    let client = Client::connect(server.addr).await.unwrap();
    let opts = FeedOptions { segment_records: 64, ..Default::default() };
    client.create_feed("events", opts).await.unwrap();
    let mut acked: BTreeSet<u64> = BTreeSet::new();
    let mut issued_max = 0;
    for round in 0..3 {
        let client = Client::connect_with(
            server.addr,
            ClientOptions { connect_attempts: 1, ..ClientOptions::default() },
        )
        .await
        .unwrap();
        let events = client.feed("events");
        if round == 0 {
            events.append("first").await.unwrap();
            events.cursor_set("c", Pos::After(1)).await.unwrap();
        }
        let round_acked = Arc::new(Mutex::new(Vec::new()));
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let (events, round_acked) = (events.clone(), round_acked.clone());
                tokio::spawn(async move {
                    for i in 0.. {
                        match events.append(Value::Int(w * 1_000_000 + i)).await {
                            Ok(id) => round_acked.lock().unwrap().push(id),
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        // The cursor moves while appends stream in.
        let mut cursor_at = events.cursor_get("c").await.unwrap().position;
        tokio::time::sleep(Duration::from_millis(150)).await;
        if let Ok(page) = events.cursor_read("c", 50, 0).await {
            cursor_at = page.next;
        }
        tokio::time::sleep(Duration::from_millis(100 + 50 * round as u64)).await;
        let addr = server.addr.to_string();
        server.kill9();
        for w in writers {
            w.await.unwrap();
        }
        acked.extend(round_acked.lock().unwrap().iter().copied());
        assert!(!round_acked.lock().unwrap().is_empty(), "round {round} appended nothing");
        server = Server::start_at(&data, &addr, &["--fsync", "never", "--config", &config]);
        let client = Client::connect(server.addr).await.unwrap();
        let events = client.feed("events");
        // Every acknowledged append is there; the chain is intact both ways; count agrees.
        let info = events.info().await.unwrap();
        let mut walked = Vec::new();
        let mut at = Pos::Start;
        loop {
            let page = events.read(at, 10_000).await.unwrap();
            if page.records.is_empty() {
                break;
            }
            for w in page.records.windows(2) {
                assert_eq!(
                    (w[0].next, w[1].prev),
                    (w[1].id, w[0].id),
                    "links of {} and {}",
                    w[0].id,
                    w[1].id
                );
            }
            walked.extend(page.records.iter().map(|r| r.id));
            at = Pos::After(page.next);
        }
        assert_eq!(walked.len() as u64, info.state.count);
        assert_eq!(walked.first().copied().unwrap_or(0), info.state.bottom);
        assert_eq!(walked.last().copied().unwrap_or(0), info.state.top);
        let present: BTreeSet<u64> = walked.iter().copied().collect();
        let missing: Vec<_> = acked.difference(&present).collect();
        assert!(missing.is_empty(), "round {round}: acknowledged appends lost: {missing:?}");
        let top = events.get(info.state.top).await.unwrap().unwrap();
        assert_eq!(top.next, 0);
        // Ids continue above the highest ever issued.
        assert!(info.state.next_id > issued_max && info.state.next_id > *acked.last().unwrap());
        issued_max = info.state.next_id - 1;
        let id = events.append("after restart").await.unwrap();
        assert_eq!(id, issued_max + 1);
        acked.insert(id);
        issued_max = id;
        // The cursor resumes where its last acknowledged move left it.
        assert_eq!(events.cursor_get("c").await.unwrap().position, cursor_at, "round {round}");
    }
    // Offline, `heapgrid check` walks the feed's heap as a feed too.
    assert!(server.terminate().success());
    let check =
        std::process::Command::new(env!("CARGO_BIN_EXE_heapgrid")).arg("check").arg(&data).output().unwrap();
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success() && out.contains("feeds"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_over_tcp_permissions_and_cli() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        serde_json::json!({
            "tokens": [
                {"token": "root", "permissions": {"*": ["admin", "read", "write"]}},
                {"token": "reader", "permissions": {"log*": ["read"]}},
                {"token": "blind", "permissions": {"logs": ["write"]}}
            ]
        })
        .to_string(),
    )
    .unwrap();
    let server = Server::start(&dir.path().join("data"), &["--config", config.to_str().unwrap()]);
    let as_ = |t: &str| {
        Client::connect_with(server.addr, ClientOptions { token: Some(t.into()), ..Default::default() })
    };
    let root = as_("root").await.unwrap();
    let log = root
        .create_feed(
            "logs",
            FeedOptions {
                segment_records: 4,
                retention: Retention { keep_segments: Some(2), max_age_ms: None },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    root.create_feed("private", FeedOptions::default()).await.unwrap();
    let reader = as_("reader").await.unwrap();
    let follower = tokio::spawn({
        let f = reader.feed("logs");
        async move { f.follow(Pos::End).take(5).map(|r| r.unwrap().value).collect::<Vec<_>>().await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..5 {
        log.append(i).await.unwrap();
    }
    let seen = tokio::time::timeout(Duration::from_secs(10), follower).await.unwrap().unwrap();
    assert_eq!(seen, (0..5).map(Value::Int).collect::<Vec<_>>());
    // Read-only: reading yes, appending, moving a cursor and other feeds no.
    assert_eq!(reader.feed("logs").read(Pos::FirstAvailable, 10).await.unwrap().records.len(), 5);
    assert!(matches!(reader.feed("logs").append(1).await, Err(GridError::PermissionDenied { .. })));
    assert!(matches!(
        reader.feed("logs").cursor_read("c", 1, 0).await,
        Err(GridError::PermissionDenied { .. })
    ));
    assert!(matches!(
        reader.feed("private").read(Pos::Start, 1).await,
        Err(GridError::PermissionDenied { .. })
    ));
    assert!(matches!(
        reader.create_feed("logs2", FeedOptions::default()).await,
        Err(GridError::PermissionDenied { .. })
    ));
    // Write-only: appending yes; anything whose answer carries records or state no.
    let blind = as_("blind").await.unwrap();
    blind.feed("logs").append(99).await.unwrap();
    assert!(matches!(blind.feed("logs").read(Pos::Start, 1).await, Err(GridError::PermissionDenied { .. })));
    assert!(matches!(
        blind.feed("logs").cursor_read("c", 1, 0).await,
        Err(GridError::PermissionDenied { .. })
    ));
    let listed: Vec<String> = reader.feeds().await.unwrap().into_iter().map(|f| f.name).collect();
    assert_eq!(listed, vec!["logs".to_string()]);
    assert!(matches!(root.feed("nope").append(1).await, Err(GridError::NoSuchFeed(_))));

    // The CLI: create, append, read, cursors and tail.
    let a = server.addr.to_string();
    let a = a.as_str();
    let run = |args: &[&str]| cli(&[&["eval", "--addr", a, "--token", "root"], args].concat(), None);
    assert!(run(&["feed", "create", "cli", "3"]).0);
    for v in [r#"{"n": 1}"#, r#"{"n": 2}"#, r#"{"n": 3}"#, r#"{"n": 4}"#] {
        let (ok, out) = run(&["append", "cli", v]);
        assert!(ok, "{out}");
    }
    let (ok, out) = run(&["feed", "read", "cli", "start", "2"]);
    assert!(ok, "{out}");
    let page: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(page["records"][1]["value"], serde_json::json!({"n": 2}));
    assert_eq!(page["next"], 2);
    let (ok, out) = run(&["tail", "cli", "start", "4"]);
    assert!(ok, "{out}");
    let ids: Vec<u64> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2, 3, 4]);
    let (ok, out) = run(&["feed", "info", "cli"]);
    assert!(ok && out.contains("\"segments\""), "{out}");
    assert!(run(&["feed", "cursor", "cli", "c", "set", "2"]).0);
    let (ok, out) = run(&["feed", "cursor", "cli", "c", "read", "1"]);
    assert!(ok && out.contains("\"n\": 3"), "{out}");
    let (ok, out) = run(&["feed", "cursor", "cli", "c"]);
    assert!(ok && out.contains("\"lag\": 1"), "{out}");
    let (ok, out) =
        cli(&["shell", "--addr", a, "--token", "root"], Some("feeds\nfeed rm cli 4\nfeed back cli 1\n"));
    assert!(ok && out.contains("\"cli\"") && out.contains("removed"), "{out}");
    assert!(out.contains("\"id\": 3"), "{out}");
}
