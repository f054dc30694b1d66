//! The embedded `Grid` through its public API: a model test against a `BTreeMap` on a sharded
//! table, restarts of the whole grid, panics injected into shard actors (restart = recovery),
//! crash loops ending in the failed state, and concurrent increments.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use heapgrid::{
    Expect, FsyncSetting, Grid, GridError, GridOptions, Key, RestartPolicy, TableOptions, Update, Value,
    WriteOp, path,
};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

fn opts() -> GridOptions {
    GridOptions { checkpoint_interval_ms: 50, ..GridOptions::default() }
}

/// Waits until shard `shard` runs an actor other than `before` (a restart happened).
async fn wait_restarted(grid: &Grid, table: &str, shard: u32, before: Option<ractor::ActorId>) {
    let rt = grid.core().table(table).unwrap();
    for _ in 0..2000 {
        let now = rt.shard_actor(shard);
        if rt.shard_running(shard) && now.is_some() && now != before {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("shard {shard} of {table} did not come back");
}

#[derive(Clone, Debug)]
enum Op {
    Put(i64, i64),
    Delete(i64),
    Incr(i64),
    Get(i64),
    Scan(i64, i64, bool),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let k = 0i64..60;
    prop_oneof![
        6 => (k.clone(), any::<i64>()).prop_map(|(k, v)| Op::Put(k, v)),
        2 => k.clone().prop_map(Op::Delete),
        2 => k.clone().prop_map(Op::Incr),
        3 => k.clone().prop_map(Op::Get),
        1 => (k.clone(), k, any::<bool>()).prop_map(|(a, b, r)| Op::Scan(a, b, r)),
        1 => Just(Op::Reopen),
    ]
}

async fn run_model(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut grid = Grid::open(dir.path(), opts()).await.unwrap();
    let mut t =
        grid.create_table("m", TableOptions { shards: 3, fsync: Some(FsyncSetting::Never) }).await.unwrap();
    let mut model: BTreeMap<i64, i64> = BTreeMap::new();
    for op in ops {
        match op {
            Op::Put(k, v) => {
                t.put(k, &v).await.unwrap();
                model.insert(k, v);
            }
            Op::Delete(k) => assert_eq!(t.delete(k).await.unwrap(), model.remove(&k).is_some()),
            Op::Incr(k) => {
                let r = t.update(k, vec![], Update::Increment(Value::Int(1))).await;
                match model.get_mut(&k) {
                    Some(v) if *v < i64::MAX => {
                        *v += 1;
                        assert_eq!(r.unwrap(), Value::Int(*v));
                    }
                    // A missing counter starts from 0.
                    None => {
                        model.insert(k, 1);
                        assert_eq!(r.unwrap(), Value::Int(1));
                    }
                    Some(_) => assert!(r.is_err(), "overflow"),
                }
            }
            Op::Get(k) => assert_eq!(t.get::<i64>(k).await.unwrap(), model.get(&k).copied()),
            Op::Scan(a, b, rev) => {
                let (lo, hi) = (a.min(b), a.max(b));
                let got: Vec<(Key, Value)> =
                    t.scan(Key::Int(lo)..Key::Int(hi), 4, rev).map(|r| r.unwrap()).collect().await;
                let mut want: Vec<(Key, Value)> =
                    model.range(lo..hi).map(|(&k, &v)| (Key::Int(k), Value::Int(v))).collect();
                if rev {
                    want.reverse();
                }
                assert_eq!(got, want);
            }
            Op::Reopen => {
                grid.close().await.unwrap();
                grid = Grid::open(dir.path(), opts()).await.unwrap();
                t = grid.table("m").unwrap();
            }
        }
    }
    assert_eq!(t.count().await.unwrap(), model.len() as u64);
    grid.close().await.unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
    #[test]
    fn grid_matches_a_btreemap(ops in prop::collection::vec(op(), 1..80)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run_model(ops));
    }
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
struct User {
    name: String,
    visits: i64,
    friends: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_values_partial_updates_and_restart_keep_acknowledged_writes() {
    let dir = tempfile::tempdir().unwrap();
    let grid = Grid::open(dir.path(), opts()).await.unwrap();
    let users = grid
        .create_table("users", TableOptions { shards: 2, fsync: Some(FsyncSetting::Always) })
        .await
        .unwrap();
    let bob = User { name: "bob".into(), visits: 0, friends: vec!["amy".into()] };
    users.put("bob", &bob).await.unwrap();
    assert_eq!(users.increment("bob", path!["visits"], 5).await.unwrap(), Value::Int(5));
    users.update("bob", path!["friends"], Update::Append(Value::Str("cy".into()))).await.unwrap();
    let cas = users.cas("ann", Expect::Absent, Some(Value::Int(1))).await.unwrap();
    assert!(cas.ok);
    assert!(!users.cas("ann", Expect::Absent, Some(Value::Int(2))).await.unwrap().ok);
    assert!(matches!(
        grid.create_table("users", TableOptions::default()).await,
        Err(GridError::TableExists(_))
    ));
    assert!(matches!(
        grid.create_table("bad name!", TableOptions::default()).await,
        Err(GridError::Invalid(_))
    ));
    // A second grid on the same directory is refused while this one runs.
    assert!(Grid::open(dir.path(), opts()).await.is_err());
    grid.close().await.unwrap();

    let grid = Grid::open(dir.path(), opts()).await.unwrap();
    let users = grid.table("users").unwrap();
    let got: User = users.get("bob").await.unwrap().unwrap();
    assert_eq!(got, User { visits: 5, friends: vec!["amy".into(), "cy".into()], ..bob });
    assert_eq!(users.get_value("ann").await.unwrap(), Some(Value::Int(1)));
    assert_eq!(grid.tables().len(), 1);
    grid.drop_table("users").await.unwrap();
    assert!(grid.table("users").is_err());
    // A table created again under the same name starts empty: the old incarnation's files are
    // neither reused nor able to delete the new one's.
    let again = grid.create_table("users", TableOptions { shards: 3, fsync: None }).await.unwrap();
    assert_eq!(again.count().await.unwrap(), 0);
    again.put("new", &1).await.unwrap();
    grid.close().await.unwrap();
    let grid = Grid::open(dir.path(), opts()).await.unwrap();
    let again = grid.table("users").unwrap();
    assert_eq!(again.count().await.unwrap(), 1);
    assert_eq!(again.get::<i64>("new").await.unwrap(), Some(1));
    grid.drop_table("users").await.unwrap();
    grid.close().await.unwrap();
    let grid = Grid::open(dir.path(), opts()).await.unwrap();
    assert!(grid.tables().is_empty(), "a dropped table stays dropped");
    grid.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_shard_restarts_and_recovers_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    // No checkpoint runs during the test: the restart must recover every write from the op log.
    let grid =
        Grid::open(dir.path(), GridOptions { checkpoint_interval_ms: 3_600_000, ..opts() }).await.unwrap();
    let t =
        grid.create_table("t", TableOptions { shards: 1, fsync: Some(FsyncSetting::Never) }).await.unwrap();
    for i in 0..500i64 {
        t.put(i, &format!("v{i}")).await.unwrap();
    }
    let before = grid.core().table("t").unwrap().shard_actor(0);
    grid.core().table("t").unwrap().inject_panic(0);
    // A request racing with the crash gets an answer or an error, never a hang.
    let r = tokio::time::timeout(Duration::from_secs(10), t.get::<String>(7i64)).await.expect("request hung");
    assert!(matches!(r, Ok(Some(_)) | Err(GridError::Unavailable(_))), "{r:?}");
    wait_restarted(&grid, "t", 0, before).await;
    for i in 0..500i64 {
        assert_eq!(t.get::<String>(i).await.unwrap(), Some(format!("v{i}")), "key {i} lost in the restart");
    }
    t.put(1000i64, &"after").await.unwrap();
    assert_eq!(t.count().await.unwrap(), 501);
    grid.close().await.unwrap();
}

/// Shards that panic again and again while writers write, readers read from snapshots and
/// checkpoints are written back in the background: every acknowledged write survives every
/// restart, and no reader ever sees a key go back to an older value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_under_load_with_snapshot_readers_and_background_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let o = GridOptions {
        checkpoint_interval_ms: 5,
        restart: RestartPolicy { max_restarts: 50, window_ms: 60_000 },
        ..opts()
    };
    let grid = Grid::open(dir.path(), o).await.unwrap();
    let t =
        grid.create_table("t", TableOptions { shards: 2, fsync: Some(FsyncSetting::Never) }).await.unwrap();
    const KEYS: i64 = 64;
    let acked: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<i64, i64>>> = Default::default();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (t, acked, stop) = (t.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let k = i % KEYS;
                if t.put(k, &i).await.is_ok() {
                    acked.lock().unwrap().insert(k, i);
                }
            }
        })
    };
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let (t, stop) = (t.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seen = std::collections::HashMap::new();
                let mut k = r;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    k = (k + 7) % KEYS;
                    if let Ok(Some(v)) = t.get::<i64>(k).await {
                        let last = seen.insert(k, v).unwrap_or(0);
                        assert!(v >= last, "key {k} went back from {last} to {v}");
                    }
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let rt = grid.core().table("t").unwrap();
    for round in 0..8u32 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        let shard = round % 2;
        let before = rt.shard_actor(shard);
        rt.inject_panic(shard);
        wait_restarted(&grid, "t", shard, before).await;
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    for r in readers {
        r.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    for (k, v) in acked {
        let now = t.get::<i64>(k).await.unwrap().unwrap();
        assert!(now >= v, "key {k}: acknowledged {v}, now {now}");
    }
    grid.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_ends_in_the_failed_state() {
    let dir = tempfile::tempdir().unwrap();
    let o = GridOptions { restart: RestartPolicy { max_restarts: 3, window_ms: 60_000 }, ..opts() };
    let grid = Grid::open(dir.path(), o).await.unwrap();
    let t = grid.create_table("t", TableOptions::default()).await.unwrap();
    t.put("k", &1).await.unwrap();
    let rt = grid.core().table("t").unwrap();
    for _ in 0..3 {
        let before = rt.shard_actor(0);
        rt.inject_panic(0);
        wait_restarted(&grid, "t", 0, before).await;
    }
    rt.inject_panic(0);
    let mut failed = None;
    let mut last = None;
    for _ in 0..2000 {
        match t.get::<i64>("k").await {
            Err(e @ GridError::ShardFailed { .. }) => {
                failed = Some(e);
                break;
            }
            other => {
                last = Some(format!("{other:?}"));
                tokio::time::sleep(Duration::from_millis(1)).await
            }
        }
    }
    let e = failed.unwrap_or_else(|| panic!("shard never reported failure; last answer {last:?}"));
    assert!(e.to_string().contains("restarted 3 times"), "{e}");
    grid.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_increments_give_the_models_result() {
    let dir = tempfile::tempdir().unwrap();
    let grid = Grid::open(dir.path(), opts()).await.unwrap();
    let t = grid
        .create_table("c", TableOptions { shards: 4, fsync: Some(FsyncSetting::EveryMs(10)) })
        .await
        .unwrap();
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let t = t.clone();
            tokio::spawn(async move {
                for _ in 0..20 {
                    t.increment("counter", path!["n"], 1).await.unwrap();
                    t.increment(i % 7, path!["n"], 2).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(t.get_value("counter").await.unwrap().unwrap().at(&["n".into()]), Some(&Value::Int(2000)));
    let mut total = 0;
    for k in 0..7i64 {
        if let Some(Value::Int(n)) = t.get_value(k).await.unwrap().unwrap().at(&["n".into()]) {
            total += n;
        }
    }
    assert_eq!(total, 100 * 20 * 2);
    // A batch within one shard applies whole; one spanning shards is refused and applies
    // nothing. Pick the keys so both cases always run (placement is deterministic).
    let keys: Vec<Key> = (0..64).map(|i| Key::Str(format!("b{i}"))).collect();
    let a = &keys[0];
    let same = keys.iter().skip(1).find(|k| k.shard(4) == a.shard(4)).unwrap();
    let other = keys.iter().find(|k| k.shard(4) != a.shard(4)).unwrap();
    let put = |k: &Key| WriteOp::Put { key: k.clone(), value: Value::Int(7) };
    let r = t.batch(vec![put(a), WriteOp::Delete { key: same.clone() }]).await.unwrap();
    assert_eq!(r.len(), 2);
    assert!(t.contains(a.clone()).await.unwrap());
    let refused = t.batch(vec![put(same), put(other)]).await;
    assert!(matches!(refused, Err(GridError::Invalid(_))), "{refused:?}");
    assert!(!t.contains(same.clone()).await.unwrap(), "a refused batch left a write behind");
    assert!(!t.contains(other.clone()).await.unwrap(), "a refused batch left a write behind");
    grid.close().await.unwrap();
}

/// A shard whose heap cannot be opened is retried within its restart limit, then reported
/// failed with the reason; the grid itself opens and other tables work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_cannot_open_ends_failed_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let grid = Grid::open(dir.path(), opts()).await.unwrap();
    let bad = grid.create_table("bad", TableOptions::default()).await.unwrap();
    bad.put("k", &1).await.unwrap();
    let good = grid.create_table("good", TableOptions::default()).await.unwrap();
    good.put("k", &2).await.unwrap();
    grid.close().await.unwrap();
    // Damage the header page of bad's only shard.
    let tables = dir.path().join("tables");
    let shard_dir = std::fs::read_dir(&tables)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("bad-"))
        .unwrap()
        .path();
    let heap = shard_dir.join("shard-0000.heap");
    let mut bytes = std::fs::read(&heap).unwrap();
    bytes[20] ^= 0xff;
    std::fs::write(&heap, bytes).unwrap();

    let o = GridOptions { restart: RestartPolicy { max_restarts: 3, window_ms: 60_000 }, ..opts() };
    let grid = Grid::open(dir.path(), o).await.unwrap();
    let r = grid.table("bad").unwrap().get::<i64>("k").await;
    match r {
        Err(GridError::ShardFailed { reason, .. }) => {
            assert!(reason.contains("could not open shard"), "{reason}")
        }
        r => panic!("expected ShardFailed, got {r:?}"),
    }
    assert_eq!(grid.table("good").unwrap().get::<i64>("k").await.unwrap(), Some(2));
    grid.close().await.unwrap();
}
