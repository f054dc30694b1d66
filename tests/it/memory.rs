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
    // The server listens while its shards (here the services') still open: they are listed as
    // recovering until they run.
    let mut before = c.stats().await.unwrap();
    for _ in 0..200 {
        if before.recovering.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        before = c.stats().await.unwrap();
    }
    assert!(before.recovering.is_empty(), "{before:?}");
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

/// Keys of the budget tests, each with a value of `VALUE_BYTES` (overflow pages: the data is
/// mostly leaf-free pages the pager may drop).
const BUDGET_KEYS: usize = 6_000;
const VALUE_BYTES: usize = 16 * 1024;

fn budget_value(i: usize) -> String {
    let c = char::from(b'a' + (i % 26) as u8);
    format!("{i:08}{}", c.to_string().repeat(VALUE_BYTES - 8))
}

/// A config file that checkpoints every 300 ms, so written pages are soon clean and droppable.
fn fast_checkpoints(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("fast-checkpoints.json");
    std::fs::write(&p, r#"{"checkpoint_interval_ms": 300}"#).unwrap();
    p
}

/// Writes the budget tests' data set (about 100 MB) over 4 shards, 32 writes in flight.
async fn load(c: &Client) -> heapgrid::Table {
    let t = c.create_table("big", TableOptions { shards: 4, fsync: None }).await.unwrap();
    for chunk in (0..BUDGET_KEYS).collect::<Vec<_>>().chunks(32) {
        let puts = chunk.iter().map(|&i| {
            let t = t.clone();
            async move { t.put(format!("k{i:06}"), &budget_value(i)).await }
        });
        for r in futures_util::future::join_all(puts).await {
            r.unwrap();
        }
    }
    t
}

/// Reads every key back and compares it with what was written.
async fn read_all(t: &heapgrid::Table) {
    for chunk in (0..BUDGET_KEYS).collect::<Vec<_>>().chunks(32) {
        let gets = chunk.iter().map(|&i| {
            let t = t.clone();
            async move { (i, t.get::<String>(format!("k{i:06}")).await) }
        });
        for (i, r) in futures_util::future::join_all(gets).await {
            assert_eq!(r.unwrap().as_deref(), Some(budget_value(i).as_str()), "key {i}");
        }
    }
}

/// Polls the node's stats until the pager reports it within 10% of its budget.
async fn within_budget(c: &Client) -> heapgrid_actors::stats::BudgetStats {
    let mut last = None;
    for _ in 0..200 {
        let s = c.stats().await.unwrap();
        let b = s.memory_budget.expect("the node reports its budget");
        if b.used_bytes > 0 && b.used_bytes <= b.budget_bytes / 10 * 11 {
            return b;
        }
        last = Some((b, s.heap_resident_bytes, s.rss_anon_bytes));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the node stayed over its budget: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_budget_holds_the_node_under_it_and_every_write_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = fast_checkpoints(dir.path());
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--memory-budget", "40M", "--config", cfg.to_str().unwrap()]);
    let c = Client::connect(server.addr).await.unwrap();
    let t = load(&c).await;
    let b = within_budget(&c).await;
    assert_eq!(b.budget_bytes, 40 << 20);
    assert!(b.dropped_bytes > 50_000_000, "about 100 MB written under a 40 MB budget: {b:?}");
    let s = c.stats().await.unwrap();
    let big = s.collections.iter().find(|c| c.name == "big").unwrap();
    let file: u64 = big.shards.iter().map(|s| s.file_bytes).sum();
    assert!(file > 90_000_000, "{big:?}");
    // Every write reads back whole from dropped pages (checksums checked again), and reading
    // it all does not take the node over its budget.
    read_all(&t).await;
    within_budget(&c).await;
    // Across a kill -9 too.
    server.kill9();
    let server = Server::start(&data, &["--memory-budget", "40M", "--config", cfg.to_str().unwrap()]);
    let c = Client::connect(server.addr).await.unwrap();
    read_all(&c.table("big")).await;
    within_budget(&c).await;
    server.kill9();
}

/// A memory cgroup of this test's own (v1 `memory.limit_in_bytes` or v2 `memory.max`), removed
/// when dropped; `None` where neither is writable here.
struct Cgroup {
    dir: std::path::PathBuf,
}

impl Cgroup {
    fn create(limit: u64) -> Option<Cgroup> {
        let name = format!("heapgrid-test-{}", std::process::id());
        for (root, file) in
            [("/sys/fs/cgroup/memory", "memory.limit_in_bytes"), ("/sys/fs/cgroup", "memory.max")]
        {
            let dir = std::path::Path::new(root).join(&name);
            if std::fs::create_dir(&dir).is_err() {
                continue;
            }
            if std::fs::write(dir.join(file), limit.to_string()).is_ok() {
                return Some(Cgroup { dir });
            }
            let _ = std::fs::remove_dir(&dir);
        }
        None
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).unwrap();
    }

    /// Whether the kernel killed a process of the group for memory (v1 `oom_kill` in
    /// `memory.oom_control`, v2 `oom_kill` in `memory.events`).
    fn oom_kills(&self) -> u64 {
        ["memory.oom_control", "memory.events"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(self.dir.join(f)).ok())
            .flat_map(|s| s.lines().map(str::to_owned).collect::<Vec<_>>())
            .filter_map(|l| l.strip_prefix("oom_kill ").and_then(|n| n.trim().parse::<u64>().ok()))
            .sum()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The server was killed and reaped before; the group is empty.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_memory_cgroup_below_the_data_size_the_server_is_not_killed_and_loses_nothing() {
    const LIMIT: u64 = 64 << 20;
    let Some(group) = Cgroup::create(LIMIT) else {
        eprintln!("SKIPPED: no writable memory cgroup here (v1 memory.limit_in_bytes or v2 memory.max)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = fast_checkpoints(dir.path());
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--memory-budget", "40M", "--config", cfg.to_str().unwrap()]);
    group.add(server.pid());
    let c = Client::connect(server.addr).await.unwrap();
    let t = load(&c).await;
    read_all(&t).await;
    within_budget(&c).await;
    c.ping().await.unwrap();
    assert_eq!(group.oom_kills(), 0, "the server's group saw an OOM kill");
    server.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_op_log_tail_checkpoints_without_waiting_for_the_timer() {
    let dir = tempfile::tempdir().unwrap();
    // The timer would not checkpoint within the test.
    let opts =
        heapgrid::GridOptions { checkpoint_interval_ms: 3_600_000, ..heapgrid::GridOptions::default() };
    let grid = heapgrid::Grid::open(dir.path(), opts).await.unwrap();
    let t = grid.create_table("t", TableOptions { shards: 1, fsync: None }).await.unwrap();
    let shard = |s: &heapgrid_actors::stats::NodeStats| {
        s.collections.iter().find(|c| c.name == "t").unwrap().shards[0].clone()
    };
    let before = shard(&grid.core().stats().await);
    // 80 values of 1 MiB: past the 64 MiB bound once.
    let value = heapgrid::Value::Bytes(vec![7u8; 1 << 20]);
    for i in 0..80 {
        t.put(format!("k{i}"), &value).await.unwrap();
    }
    let mut after = shard(&grid.core().stats().await);
    for _ in 0..100 {
        if after.checkpoints > before.checkpoints {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        after = shard(&grid.core().stats().await);
    }
    assert!(after.checkpoints > before.checkpoints, "no checkpoint: {before:?} then {after:?}");
    assert!(
        after.log_tail_bytes < heapgrid_actors::heap::LOG_TAIL_BYTES_MAX_DEFAULT,
        "the tail since the checkpoint is below the bound: {after:?}"
    );
    grid.close().await.unwrap();
}
