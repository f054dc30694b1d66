//! Memory accounting on the real binary (issue 16): `heapgrid stats` and `Client::stats` report
//! the process's resident anonymous and file-backed memory and every heap's figures, which move
//! with the data.

use std::process::Command;

use heapgrid::{Client, TableOptions};

use crate::server::Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_report_the_node_s_memory_and_every_heap() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let c = Client::connect(server.addr).await.unwrap();
    let before = c.stats().await.unwrap();
    assert!(before.rss_anon_bytes > 0 && before.rss_file_bytes > 0, "{before:?}");
    let names: Vec<&str> = before.collections.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["$locks", "$queues"], "a fresh node has its services only");
    let t = c.create_table("users", TableOptions { shards: 2, fsync: None }).await.unwrap();
    let value = "x".repeat(1000);
    for i in 0..2_000 {
        t.put(format!("user{i}"), &value).await.unwrap();
    }
    let after = c.stats().await.unwrap();
    let users = after.collections.iter().find(|c| c.name == "users").expect("the table is listed");
    assert_eq!(users.kind, "table");
    assert_eq!(users.shards.len(), 2);
    assert_eq!(users.shards.iter().map(|s| s.entries).sum::<u64>(), 2_000);
    for s in &users.shards {
        // About 1000 values of 1 KB each: pages in use, in a file at least that large, most of
        // them resident (just written), and an op log holding the writes since the checkpoint.
        assert!(s.pages * 4096 >= 900_000, "{s:?}");
        assert!(s.file_bytes >= s.pages * 4096, "{s:?}");
        assert!(s.resident_bytes >= 500_000 && s.resident_bytes <= s.file_bytes, "{s:?}");
        assert!(s.log_bytes > 0, "{s:?}");
    }
    assert_eq!(after.entries - before.entries, 2_000, "the services hold their own records");
    assert!(after.heap_resident_bytes > before.heap_resident_bytes + 1_000_000, "{before:?} {after:?}");
    assert!(after.rss_file_bytes > before.rss_file_bytes, "mapped heap pages count as file-backed memory");
    // The CLI prints the same, as JSON.
    let out = Command::new(env!("CARGO_BIN_EXE_heapgrid"))
        .args(["stats", "--addr", &server.addr.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["entries"], after.entries);
    assert!(json["rss_anon_bytes"].as_u64().unwrap() > 0);
    server.kill9();
}
