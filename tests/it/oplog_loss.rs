//! Op-log loss is never silent: `heapgrid check` reads every heap's op log (and fails on a
//! damaged record); a server whose catalogue lost the log segment its checkpoint names refuses
//! to start, and a shard that lost its segment stays failed with the reason, instead of serving
//! without acknowledged writes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use heapgrid::{Client, GridError, TableOptions};

use crate::server::{Server, cli};

fn logs(dir: &Path, name_part: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().contains(".log.") && p.to_string_lossy().contains(name_part) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Serve on `data` and expect the start to fail; returns what it printed.
fn serve_fails(data: &Path) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_heapgrid"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the server started on a damaged directory: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "the server started on a damaged directory");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_or_damaged_op_logs_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &[]);
    let c = Client::connect(server.addr).await.unwrap();
    let t = c.create_table("t", TableOptions { shards: 1, fsync: None }).await.unwrap();
    for i in 0..200i64 {
        t.put(i, &format!("value {i}")).await.unwrap();
    }
    server.kill9(); // the puts live in the shard's op log only
    let data_s = data.to_str().unwrap();
    let (ok, out) = cli(&["check", data_s], None);
    assert!(ok, "{out}");
    assert!(out.contains("records after the checkpoint"), "{out}");

    // A flipped byte in the middle of the shard's log: `check` says which heap is damaged.
    let shard_log = logs(&data, "shard-").pop().expect("a shard log segment");
    let good = std::fs::read(&shard_log).unwrap();
    let mut bad = good.clone();
    let mid = heapgrid::heap::oplog::SEGMENT_HEADER_BYTES + (good.len() - 32) / 2;
    bad[mid] ^= 0x5a;
    std::fs::write(&shard_log, &bad).unwrap();
    let (ok, out) = cli(&["check", data_s], None);
    assert!(!ok && out.contains("CORRUPT") && out.contains("shard-"), "{out}");
    std::fs::write(&shard_log, &good).unwrap();

    // The catalogue's log segments deleted: no start with no tables.
    let saved: Vec<(PathBuf, Vec<u8>)> =
        logs(&data, "catalog").into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect();
    assert!(!saved.is_empty());
    for (p, _) in &saved {
        std::fs::remove_file(p).unwrap();
    }
    let out = serve_fails(&data);
    assert!(out.contains("missing"), "{out}");
    for (p, b) in &saved {
        std::fs::write(p, b).unwrap();
    }

    // The shard's log deleted: the server starts, but that shard does not open without its
    // writes: it ends failed, and says why.
    std::fs::remove_file(&shard_log).unwrap();
    let server = Server::start(&data, &[]);
    let t = Client::connect(server.addr).await.unwrap().table("t");
    let e = t.get::<String>(1i64).await.unwrap_err();
    assert!(matches!(e, GridError::ShardFailed { .. } | GridError::Unavailable(_)), "{e:?}");
    let mut failed = e;
    for _ in 0..200 {
        if let GridError::ShardFailed { .. } = failed {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        failed = t.get::<String>(1i64).await.unwrap_err();
    }
    assert!(
        matches!(&failed, GridError::ShardFailed { reason, .. } if reason.contains("missing")),
        "{failed:?}"
    );
    server.kill9();
    std::fs::write(&shard_log, &good).unwrap();

    // Restored, everything is there.
    let server = Server::start(&data, &[]);
    let t = Client::connect(server.addr).await.unwrap().table("t");
    assert_eq!(t.count().await.unwrap(), 200);
    assert_eq!(t.get::<String>(199i64).await.unwrap().as_deref(), Some("value 199"));
}
