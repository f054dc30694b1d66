//! Recovery after `kill -9` on the real binary (issue 19): the server listens at once and each
//! shard serves as soon as its own replay ends; a request for a shard still recovering waits
//! for it, or, for a client that asked not to wait, is answered `Recovering` with its progress.
//! A shard is held in its recovery by the test hook `HEAPGRID_TEST_HOLD_RECOVERY`
//! (`actors/src/gate.rs`), so "still recovering" does not depend on timing.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use heapgrid::{Client, ClientOptions, GridError, TableOptions};
use heapgrid_actors::Key;

const SHARDS: u32 = 4;
/// The shard the hook holds.
const HELD: u32 = 2;

struct Proc {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Proc {
    fn start(dir: &Path, hold: Option<&Path>) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_heapgrid"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data"]).arg(dir);
        if let Some(h) = hold {
            let part = format!("shard-{HELD:04}.heap");
            cmd.env("HEAPGRID_TEST_HOLD_RECOVERY", format!("{part}:{}", h.display()));
        }
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line.trim().strip_prefix("heapgrid listening on ").unwrap_or_else(|| panic!("{line:?}"));
        Proc { child, addr: addr.parse().unwrap() }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn key(i: u64) -> String {
    format!("key{i}")
}

fn shard_of(i: u64) -> u32 {
    Key::from(key(i)).shard(SHARDS)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_held_in_recovery_delays_no_other_and_only_a_client_that_does_not_wait_is_told() {
    let dir = tempfile::tempdir().unwrap();
    let hold = dir.path().join("hold");
    let n = 400u64;
    {
        let server = Proc::start(dir.path(), None);
        let c = Client::connect(server.addr).await.unwrap();
        let t = c.create_table("t", TableOptions { shards: SHARDS, fsync: None }).await.unwrap();
        for i in 0..n {
            t.put(key(i), &(i as i64)).await.unwrap();
        }
        // kill -9 (drop): every write above was acknowledged.
    }
    assert!((0..n).any(|i| shard_of(i) == HELD) && (0..n).any(|i| shard_of(i) != HELD));
    std::fs::write(&hold, b"").unwrap();
    let server = Proc::start(dir.path(), Some(&hold));
    let waits = Client::connect(server.addr).await.unwrap();
    let told = ClientOptions { wait_for_recovery: false, ..ClientOptions::default() };
    let told = Client::connect_with(server.addr, told).await.unwrap();
    let (tw, tt) = (waits.table("t"), told.table("t"));
    let held_key = (0..n).find(|&i| shard_of(i) == HELD).unwrap();
    // A client that waits: its request for the held shard is pending (past the 5 s a restart is
    // waited for: a replay is waited out), not failed.
    let pending = {
        let tw = tw.clone();
        tokio::spawn(async move { tw.get::<i64>(key(held_key)).await })
    };
    // Every other shard serves, to both clients, while the held one recovers.
    for i in (0..n).filter(|&i| shard_of(i) != HELD) {
        assert_eq!(tw.get::<i64>(key(i)).await.unwrap(), Some(i as i64), "key {i}");
        assert_eq!(tt.get::<i64>(key(i)).await.unwrap(), Some(i as i64), "key {i}");
    }
    // The client that does not wait is told, for reads and writes of the held shard's keys and
    // for operations over every shard.
    for r in [
        tt.get::<i64>(key(held_key)).await.map(|_| ()),
        tt.put(key(held_key), &-1i64).await.map(|_| ()),
        tt.count().await.map(|_| ()),
    ] {
        match r {
            Err(GridError::Recovering { table, shard, .. }) => {
                assert_eq!((table.as_str(), shard), ("t", HELD))
            }
            other => panic!("expected Recovering, got {other:?}"),
        }
    }
    let stats = told.stats().await.unwrap();
    assert_eq!(
        stats.recovering.iter().map(|r| (r.collection.as_str(), r.shard)).collect::<Vec<_>>(),
        [("t", HELD)],
        "{stats:?}"
    );
    tokio::time::sleep(Duration::from_millis(5_500)).await;
    assert!(!pending.is_finished(), "the waiting client's request ended before the shard recovered");
    // Writes pipelined to the held shard meanwhile, on one connection, a few milliseconds
    // apart (so they reach the server in separate reads, each waiting on its own): applied in
    // the order they were sent once it runs (each waits its turn behind those sent before it).
    let mut writes = Vec::new();
    for v in 0..40i64 {
        let tw = tw.clone();
        writes.push(tokio::spawn(async move { tw.put(key(held_key), &(1_000 + v)).await }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    std::fs::remove_file(&hold).unwrap();
    // The read sent before them saw the value before them.
    assert_eq!(pending.await.unwrap().unwrap(), Some(held_key as i64));
    let mut versions = Vec::new();
    for w in writes {
        versions.push(w.await.unwrap().unwrap());
    }
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "applied out of order: {versions:?}");
    assert_eq!(tw.get::<i64>(key(held_key)).await.unwrap(), Some(1_039));
    // Recovered: everything acknowledged is there, to both clients.
    for i in (0..n).filter(|&i| i != held_key) {
        assert_eq!(tt.get::<i64>(key(i)).await.unwrap(), Some(i as i64), "key {i}");
    }
    assert!(told.stats().await.unwrap().recovering.is_empty());
}

/// Right after an open (shards still opening), every kind of request waits for the shards it
/// needs: embedded table calls, grid-scoped snippets, feeds, stats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_made_at_once_after_an_open_wait_for_their_shards() {
    use heapgrid::{FeedOptions, Grid, GridOptions};
    let dir = tempfile::tempdir().unwrap();
    {
        let grid = Grid::open(dir.path(), GridOptions::default()).await.unwrap();
        let t = grid.create_table("accounts", TableOptions { shards: SHARDS, fsync: None }).await.unwrap();
        for i in 0..200u64 {
            t.put(key(i), &(i as i64)).await.unwrap();
        }
        let f = grid.create_feed("events", FeedOptions::default()).await.unwrap();
        f.append("one").await.unwrap();
        grid.close().await.unwrap();
    }
    for round in 0..3 {
        let grid = Grid::open(dir.path(), GridOptions::default()).await.unwrap();
        let v = grid.eval("sum([accounts[k] for k in ['key1', 'key2', 'key3']])").await;
        assert_eq!(v.unwrap(), heapgrid::Value::Int(6), "round {round}");
        let t = grid.table("accounts").unwrap();
        assert_eq!(t.count().await.unwrap(), 200, "round {round}");
        assert_eq!(grid.feed("events").unwrap().info().await.unwrap().state.count, 1, "round {round}");
        grid.close().await.unwrap();
    }
}
