//! Locks on the real `heapgrid serve` binary and real client processes (shared LOCKS.md): a
//! client paused with SIGSTOP past its ttl loses the lock, and its fenced write after SIGCONT is
//! refused (`StaleFence`) with the new holder's value kept; 100 × `kill -9` of the server under
//! lock traffic never repeats or lowers a fence, a reattached session keeps its lock, an
//! abandoned one frees within its ttl after the restart.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use heapgrid::{Client, ClientOptions, Fenced, GridError, TableOptions, Value};

use crate::server::Server;

const CHILD_ENV: &str = "HEAPGRID_LOCK_CHILD";
const TEST_NAME: &str = "locks_server::a_paused_holder_loses_its_lock_and_its_stale_write_is_refused";

/// Client A: takes lock `l` in a 1 s session, says its fence, then (after the parent has paused
/// and resumed it) writes `x = "A"` fenced with it and says how that went.
async fn child(addr: &str) -> ! {
    // Failures are said on stdout (the parent reads nothing else).
    fn or_say<T, E: std::fmt::Debug>(r: Result<T, E>) -> T {
        r.unwrap_or_else(|e| {
            println!("fence error {e:?}");
            std::process::exit(1)
        })
    }
    {
        let client = or_say(Client::connect(addr.parse().unwrap()).await);
        let s = or_say(client.session(Some(Duration::from_secs(1))).await);
        let g = or_say(s.lock("l").acquire(Duration::from_secs(10)).await).unwrap();
        println!("fence {}", g.fence());
        // The parent stops this process here, for twice the ttl.
        tokio::time::sleep(Duration::from_millis(500)).await;
        match Fenced::with(&client.table("t"), &[("l", g.fence())]).put("x", &"A").await {
            Ok(_) => println!("write ok"),
            Err(GridError::StaleFence { current, .. }) => println!("write stale {current:?}"),
            Err(e) => println!("write error {e}"),
        }
        std::mem::forget(g);
    }
    std::process::exit(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_holder_loses_its_lock_and_its_stale_write_is_refused() {
    if let Ok(addr) = std::env::var(CHILD_ENV) {
        child(&addr).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let client = Client::connect(server.addr).await.unwrap();
    let t = client.create_table("t", TableOptions::default()).await.unwrap();
    let a = crate::child::spawn(TEST_NAME, &[(CHILD_ENV, server.addr.to_string())]);
    // The child's lines, past the test harness's own.
    let said = |prefix: &str| loop {
        let line = a.line(Duration::from_secs(30)).unwrap_or_else(|| panic!("client A said no {prefix:?}"));
        // The harness's "test NAME ... " may lead the child's first line.
        if let Some(at) = line.find(prefix) {
            return line[at..].to_string();
        }
    };
    let line = said("fence ");
    let a_fence: u64 =
        line.strip_prefix("fence ").unwrap().parse().unwrap_or_else(|_| panic!("client A: {line}"));
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    unsafe { libc::kill(a.pid() as i32, libc::SIGSTOP) };
    let stopped = Instant::now();
    let b = client.session(Some(Duration::from_secs(10))).await.unwrap();
    let g = b
        .lock("l")
        .acquire(Duration::from_secs(10))
        .await
        .unwrap()
        .expect("B gets the lock once A's ttl ends");
    assert!(g.fence() > a_fence);
    t.fenced(&[&g]).put("x", &"B").await.unwrap();
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(stopped.elapsed())).await;
    // SAFETY: as above.
    unsafe { libc::kill(a.pid() as i32, libc::SIGCONT) };
    assert_eq!(said("write "), format!("write stale Some({})", g.fence()), "A's write with its old fence");
    assert_eq!(t.get_value("x").await.unwrap(), Some(Value::from("B")), "the stored value is B's");
    g.release().await.unwrap();
    a.kill();
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_under_lock_traffic_never_repeats_or_lowers_a_fence() {
    let dir = tempfile::tempdir().unwrap();
    let (seed, mut next) = crate::child::seeded("locks-kill9");
    let connect = |addr| async move {
        Client::connect_with(addr, ClientOptions { connect_attempts: 1, ..ClientOptions::default() })
            .await
            .unwrap()
    };
    // Every fence of lock `hot` in grant order (a holder records it before it releases).
    let fences: Arc<Mutex<Vec<u64>>> = Arc::default();
    let mut keeper: Option<(u64, u64, u64)> = None;
    let mut abandoned: Option<u64> = None;
    for round in 0..100 {
        let server = Server::start(dir.path(), &[]);
        let client = connect(server.addr).await;
        // The keeper reattaches each round and still holds `kept` with the same fence.
        match keeper {
            None => {
                let s = client.session(Some(Duration::from_secs(30))).await.unwrap();
                let g = s.lock("kept").try_acquire().await.unwrap().unwrap();
                keeper = Some((s.id(), s.secret(), g.fence()));
                std::mem::forget(g);
                s.abandon();
            }
            Some((id, secret, fence)) => {
                let s = client
                    .reattach(id, secret)
                    .await
                    .unwrap_or_else(|e| panic!("round {round}: {e} (seed {seed})"));
                let st = s.lock("kept").status().await.unwrap();
                assert_eq!(
                    st.holder.map(|h| (h.session, h.fence)),
                    Some((id, fence)),
                    "round {round} (seed {seed})"
                );
                s.abandon();
            }
        }
        // A lock abandoned before the last kill frees within its ttl (1 s) after the restart.
        if let Some(before) = abandoned.take() {
            let s = client.session(None).await.unwrap();
            let g = s.lock("ab").acquire(Duration::from_secs(3)).await.unwrap();
            let g = g.unwrap_or_else(|| panic!("round {round}: abandoned lock not freed (seed {seed})"));
            assert!(g.fence() > before, "round {round}: fence {} after {before} (seed {seed})", g.fence());
            g.release().await.unwrap();
            s.close().await.unwrap();
        }
        if round % 10 == 5 {
            let s = client.session(Some(Duration::from_secs(1))).await.unwrap();
            let g = s.lock("ab").try_acquire().await.unwrap().unwrap();
            abandoned = Some(g.fence());
            std::mem::forget(g);
            s.abandon();
        }
        // Lock traffic from four sessions until the kill.
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let client = connect(server.addr).await;
            let fences = fences.clone();
            tasks.push(tokio::spawn(async move {
                let Ok(s) = client.session(Some(Duration::from_secs(1))).await else { return };
                let lock = s.lock("hot");
                while let Ok(Some(g)) = lock.acquire(Duration::from_secs(2)).await {
                    fences.lock().unwrap().push(g.fence());
                    if g.release().await.is_err() {
                        break;
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(20 + next() % 200)).await;
        server.kill9();
        for t in tasks {
            t.await.unwrap();
        }
    }
    // The lock heap after a hundred kills walks clean (`heapgrid check` runs its checker).
    let (ok, out) = crate::server::cli(&["check", dir.path().to_str().unwrap()], None);
    assert!(ok && out.contains("locks/shard-0000.heap"), "{out}");
    let fences = fences.lock().unwrap();
    assert!(fences.len() > 100, "only {} grants (seed {seed})", fences.len());
    for w in fences.windows(2) {
        assert!(w[1] > w[0], "fence {} after {} (seed {seed})", w[1], w[0]);
    }
}

/// The shell's `lock`, `unlock` and `locks`: while it holds a lock, its snippets are fenced by
/// it (a read-modify-write that another holder's grant would refuse).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shell_locks_fences_its_snippets_and_unlocks() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let client = Client::connect(server.addr).await.unwrap();
    client.create_table("t", TableOptions::default()).await.unwrap();
    let a = server.addr.to_string();
    let script = "lock counter 5\nt['n'] = lock_held('counter', 1)\nlocks\nunlock counter\nunlock counter\n";
    let (ok, out) = crate::server::cli(&["shell", "--addr", &a], Some(script));
    assert!(ok, "{out}");
    assert!(out.contains("\"fence\": 1"), "{out}");
    assert!(out.contains("\"lock\": \"counter\""), "{out}");
    assert!(out.contains("released"), "{out}");
    assert!(out.contains("does not hold counter"), "{out}");
    assert_eq!(client.table("t").get_value("n").await.unwrap(), Some(Value::Bool(true)));
    // One-shot `eval` cannot hold a lock; it can list them.
    let (ok, out) = crate::server::cli(&["eval", "--addr", &a, "lock", "x"], None);
    assert!(!ok && out.contains("heapgrid shell"), "{out}");
    let (ok, out) = crate::server::cli(&["eval", "--addr", &a, "locks"], None);
    assert!(ok && out.contains("\"locks\""), "{out}");
    server.terminate();
}

/// A Client that reconnects (here: to a restarted server at the same address) keeps using its
/// sessions: a request refused on the new connection for want of the session reattaches it with
/// its secret and is sent again; the holder recorded before the restart is still the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnected_client_reattaches_its_session_and_keeps_its_lock() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let addr = server.addr.to_string();
    let client = Client::connect(server.addr).await.unwrap();
    let s = client.session(Some(Duration::from_secs(30))).await.unwrap();
    let g = s.lock("l").try_acquire().await.unwrap().unwrap();
    server.kill9();
    let server = Server::start_at(dir.path(), &addr, &[]);
    let st = s.lock("l").status().await.unwrap();
    assert_eq!(st.holder.map(|h| (h.session, h.fence)), Some((s.id(), g.fence())));
    g.release().await.unwrap();
    assert!(s.lock("l").status().await.unwrap().holder.is_none());
    s.close().await.unwrap();
    server.terminate();
}
