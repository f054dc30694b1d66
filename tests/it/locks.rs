//! Locks through the embedded grid (shared LOCKS.md, "Tests a correct implementation passes"):
//! the 16 × 200 fenced counter with the FencedMutex history check, FIFO grants skipping a waiter
//! whose session expired, expiry on tokio's paused clock, the all-or-nothing stale batch,
//! semaphores, and a restart (fences keep rising; a reattached holder keeps its lock; an
//! abandoned one frees within its ttl).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use heapgrid::{Expect, FsyncPolicy, GridError, GridOptions, TableOptions, Value, WriteOp};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Event {
    Acquired { session: u64, fence: u64 },
    Released { session: u64, fence: u64 },
}

/// Jepsen's FencedMutex rule over a history in real-time order: an acquire is legal only when
/// the lock is free and its fence exceeds every earlier fence; only the owner releases.
fn check_fenced_mutex(history: &[Event]) {
    let mut holder: Option<(u64, u64)> = None;
    let mut max_fence = 0;
    for (i, e) in history.iter().enumerate() {
        match *e {
            Event::Acquired { session, fence } => {
                assert!(holder.is_none(), "event {i}: {e:?} while {holder:?} holds the lock");
                assert!(fence > max_fence, "event {i}: fence {fence} not above {max_fence}");
                max_fence = fence;
                holder = Some((session, fence));
            }
            Event::Released { session, fence } => {
                assert_eq!(holder, Some((session, fence)), "event {i}: {e:?} by a non-owner");
                holder = None;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_tasks_fenced_counter_obeys_the_fenced_mutex_rule() {
    let dir = tempfile::tempdir().unwrap();
    let grid = heapgrid::Grid::open(dir.path(), GridOptions::default()).await.unwrap();
    let t = grid.create_table("c", TableOptions::default()).await.unwrap();
    t.put("n", &0).await.unwrap();
    let history = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let session = grid.session(None).await.unwrap();
        let (t, history) = (t.clone(), history.clone());
        tasks.push(tokio::spawn(async move {
            let lock = session.lock("counter");
            let mut done = 0u64;
            for _ in 0..200 {
                let g = lock.acquire(Duration::from_secs(60)).await.unwrap().expect("granted within 60 s");
                history.lock().unwrap().push(Event::Acquired { session: session.id(), fence: g.fence() });
                let n: i64 = t.get("n").await.unwrap().unwrap();
                t.fenced(&[&g]).put("n", &(n + 1)).await.unwrap();
                done += 1;
                history.lock().unwrap().push(Event::Released { session: session.id(), fence: g.fence() });
                g.release().await.unwrap();
            }
            session.close().await.unwrap();
            done
        }));
    }
    let mut rounds = 0;
    for task in tasks {
        rounds += task.await.unwrap();
    }
    assert_eq!(rounds, 3200);
    assert_eq!(t.get::<i64>("n").await.unwrap(), Some(3200), "the counter equals the successful rounds");
    let history = history.lock().unwrap().clone();
    assert_eq!(history.len(), 6400);
    check_fenced_mutex(&history);
    grid.core().locks().check().await.unwrap();
    grid.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_waiters_are_granted_in_arrival_order_and_an_expired_one_never() {
    let dir = tempfile::tempdir().unwrap();
    let grid = heapgrid::Grid::open(dir.path(), GridOptions::default()).await.unwrap();
    let first = grid.session(None).await.unwrap();
    let holder = first.lock("l").try_acquire().await.unwrap().unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for i in 1..=50u32 {
        // Waiter 7's session has a short ttl and no heartbeat: it expires while queued.
        let s = grid.session(Some(Duration::from_secs(if i == 7 { 2 } else { 60 }))).await.unwrap();
        if i == 7 {
            s.clone().abandon();
        }
        let lock = s.lock("l");
        let order = order.clone();
        waiters.push(tokio::spawn(async move {
            let r = lock.acquire(Duration::from_secs(60)).await;
            match r {
                Ok(Some(g)) => {
                    order.lock().unwrap().push(i);
                    g.release().await.unwrap();
                    Ok(())
                }
                Ok(None) => panic!("waiter {i} timed out"),
                Err(e) => Err(e),
            }
        }));
        // Arrival order: the next waiter asks only once this one is queued.
        while (first.lock("l").status().await.unwrap().waiters as usize) < waiters.len() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    // Waiter 7 is answered SessionExpired by its expiry, while still queued.
    let seventh = waiters.remove(6);
    match tokio::time::timeout(Duration::from_secs(10), seventh).await.unwrap().unwrap() {
        Err(GridError::SessionExpired { .. }) => {}
        r => panic!("the expired waiter got {r:?}"),
    }
    holder.release().await.unwrap();
    for w in waiters {
        w.await.unwrap().unwrap();
    }
    let want: Vec<u32> = (1..=50).filter(|&i| i != 7).collect();
    assert_eq!(*order.lock().unwrap(), want);
    grid.core().locks().check().await.unwrap();
    grid.close().await.unwrap();
}

/// With tokio's clock paused and no heartbeat, a lock frees when its session's ttl ends (within
/// one tick), and the next grant has a larger fence.
#[tokio::test(start_paused = true)]
async fn an_abandoned_session_frees_its_lock_at_its_ttl_on_paused_time() {
    let dir = tempfile::tempdir().unwrap();
    // No fsync on the blocking pool: paused time must not run ahead while a reply waits for one.
    let opts = GridOptions { fsync: FsyncPolicy::Never, ..GridOptions::default() };
    let grid = heapgrid::Grid::open(dir.path(), opts).await.unwrap();
    let ttl = Duration::from_secs(3);
    let a = grid.session(Some(ttl)).await.unwrap();
    let started = tokio::time::Instant::now();
    let g = a.lock("l").try_acquire().await.unwrap().unwrap();
    let fence = g.fence();
    std::mem::forget(g);
    a.abandon();
    let b = grid.session(Some(Duration::from_secs(60))).await.unwrap();
    loop {
        if b.lock("l").status().await.unwrap().holder.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let freed = started.elapsed();
    let tick = heapgrid_actors::lock::actor::TICK;
    assert!(freed + tick >= ttl && freed <= ttl + 2 * tick, "freed after {freed:?}, ttl {ttl:?}");
    let g2 = b.lock("l").try_acquire().await.unwrap().unwrap();
    assert!(g2.fence() > fence);
    g2.release().await.unwrap();
    b.close().await.unwrap();
    grid.core().locks().check().await.unwrap();
    grid.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_one_stale_fence_applies_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let grid = heapgrid::Grid::open(dir.path(), GridOptions::default()).await.unwrap();
    let t = grid.create_table("t", TableOptions::default()).await.unwrap();
    let s = grid.session(None).await.unwrap();
    let a = s.lock("a").try_acquire().await.unwrap().unwrap();
    let b = s.lock("b").try_acquire().await.unwrap().unwrap();
    let (a_fence, b_fence) = (a.fence(), b.fence());
    let writes = |tag: &str| -> Vec<WriteOp> {
        (0..10).map(|i| WriteOp::Put { key: format!("k{i}").into(), value: Value::from(tag) }).collect()
    };
    // Both fences current: all ten apply.
    t.fenced(&[&a, &b]).batch(writes("first")).await.unwrap();
    b.release().await.unwrap();
    // `b`'s fence is stale now (released): nothing of the ten applies.
    let stale = heapgrid::Fenced::with(&t, &[("a", a_fence), ("b", b_fence)]);
    match stale.batch(writes("second")).await {
        Err(GridError::StaleFence { lock, presented, current }) => {
            assert_eq!((lock.as_str(), presented, current), ("b", b_fence, None));
        }
        r => panic!("a stale batch got {r:?}"),
    }
    for i in 0..10 {
        assert_eq!(t.get_value(format!("k{i}")).await.unwrap(), Some(Value::from("first")));
    }
    // A newer grant of `b` makes the old fence stale with a current one to report.
    let b2 = s.lock("b").try_acquire().await.unwrap().unwrap();
    match stale.put("k0", &"third").await {
        Err(GridError::StaleFence { current, .. }) => assert_eq!(current, Some(b2.fence())),
        r => panic!("{r:?}"),
    }
    // Every write path carries fences: delete, compare-and-set, update.
    let f = t.fenced(&[&a, &b2]);
    assert!(f.delete("k1").await.unwrap());
    assert!(f.cas("k2", Expect::Value(Value::from("first")), Some(Value::from("cas"))).await.unwrap().ok);
    a.release().await.unwrap();
    assert!(matches!(f.delete("k3").await, Err(GridError::StaleFence { .. })));
    assert!(t.contains("k3").await.unwrap());
    b2.release().await.unwrap();
    s.close().await.unwrap();
    grid.core().locks().check().await.unwrap();
    grid.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semaphore_permits_are_bounded_fifo_and_return_when_a_session_closes() {
    let dir = tempfile::tempdir().unwrap();
    let grid = heapgrid::Grid::open(dir.path(), GridOptions::default()).await.unwrap();
    let s1 = grid.session(None).await.unwrap();
    let s2 = grid.session(None).await.unwrap();
    let p1 = s1.semaphore("pool", 3).acquire(2, Duration::ZERO).await.unwrap().unwrap();
    assert!(s2.semaphore("pool", 3).acquire(2, Duration::ZERO).await.unwrap().is_none());
    let sem = s2.semaphore("pool", 3);
    let waiting = tokio::spawn(async move { sem.acquire(2, Duration::from_secs(30)).await });
    while s1.semaphore("pool", 3).status().await.unwrap().waiters == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Strict FIFO: one free permit does not go to a later, smaller request.
    assert!(s1.semaphore("pool", 3).acquire(1, Duration::ZERO).await.unwrap().is_none());
    assert!(matches!(s1.semaphore("pool", 4).acquire(1, Duration::ZERO).await, Err(GridError::Invalid(_))));
    drop(p1);
    s1.close().await.unwrap();
    let p2 = waiting.await.unwrap().unwrap().unwrap();
    assert_eq!(p2.count(), 2);
    let st = s2.semaphore("pool", 3).status().await.unwrap();
    assert_eq!((st.in_use, st.holders), (2, vec![(s2.id(), 2)]));
    p2.release().await.unwrap();
    s2.close().await.unwrap();
    grid.core().locks().check().await.unwrap();
    grid.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_fences_rise_a_reattached_holder_keeps_its_lock_and_an_abandoned_one_frees() {
    let dir = tempfile::tempdir().unwrap();
    let grid = heapgrid::Grid::open(dir.path(), GridOptions::default()).await.unwrap();
    let kept = grid.session(Some(Duration::from_secs(30))).await.unwrap();
    let left = grid.session(Some(Duration::from_secs(1))).await.unwrap();
    let k = kept.lock("kept").try_acquire().await.unwrap().unwrap();
    let l = left.lock("left").try_acquire().await.unwrap().unwrap();
    let (kept_id, kept_secret, k_fence, l_fence) = (kept.id(), kept.secret(), k.fence(), l.fence());
    std::mem::forget(k);
    std::mem::forget(l);
    kept.abandon();
    left.abandon();
    grid.close().await.unwrap();

    let grid = heapgrid::Grid::open(dir.path(), GridOptions::default()).await.unwrap();
    let again = grid.reattach(kept_id, kept_secret).await.unwrap();
    let st = again.lock("kept").status().await.unwrap();
    assert_eq!(st.holder.map(|h| (h.session, h.fence)), Some((kept_id, k_fence)), "the holder survived");
    assert!(
        heapgrid::Fenced::with(
            &grid.create_table("t", TableOptions::default()).await.unwrap(),
            &[("kept", k_fence)]
        )
        .put("x", &1)
        .await
        .is_ok()
    );
    // The abandoned session's lock frees within its ttl after the restart.
    let other = grid.session(None).await.unwrap();
    let g = other.lock("left").acquire(Duration::from_secs(5)).await.unwrap().expect("freed within the ttl");
    assert!(g.fence() > l_fence, "fences rise across restarts");
    g.release().await.unwrap();
    // The kept lock is still held: another session cannot take it.
    assert!(other.lock("kept").try_acquire().await.unwrap().is_none());
    assert!(grid.reattach(kept_id, kept_secret ^ 1).await.is_err(), "a wrong secret is refused");
    // The reattached session takes its grant up again and releases it.
    again.lock("kept").adopt(k_fence).release().await.unwrap();
    assert!(again.lock("kept").status().await.unwrap().holder.is_none());
    other.close().await.unwrap();
    again.close().await.unwrap();
    grid.core().locks().check().await.unwrap();
    grid.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_snippet_commits_only_while_its_fences_are_current() {
    let dir = tempfile::tempdir().unwrap();
    let grid = heapgrid::Grid::open(dir.path(), GridOptions::default()).await.unwrap();
    grid.create_table("t", TableOptions::default()).await.unwrap();
    let wide = grid.create_table("wide", TableOptions { shards: 4, ..Default::default() }).await.unwrap();
    let s = grid.session(None).await.unwrap();
    let g = s.lock("l").try_acquire().await.unwrap().unwrap();
    let fence = Value::from(g.fence() as i64);
    // One table (its shard's fast path) and two shards of another (a prepared commit).
    let src = "t['x'] = lock_held('l', args)\nwide['a'] = 1\nwide['b'] = 2\nwide['c'] = 3\nlock_held('l', args + 1)";
    assert_eq!(grid.eval_fenced(src, fence.clone(), &[&g]).await.unwrap(), Value::Bool(false));
    assert_eq!(grid.table("t").unwrap().get_value("x").await.unwrap(), Some(Value::Bool(true)));
    assert_eq!(wide.count().await.unwrap(), 3);
    assert_eq!(grid.eval_fenced("t['only'] = 1", Value::Null, &[&g]).await.unwrap(), Value::Null);
    // The lease ends: the same fences now fail every commit, with nothing written.
    let mut short =
        s.lock("short").acquire_with(Duration::ZERO, Some(Duration::from_millis(50))).await.unwrap().unwrap();
    short.renew(Some(Duration::from_millis(50))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for src in ["t['y'] = 1", "wide['d'] = 4\nwide['e'] = 5\nwide['f'] = 6\nwide['g'] = 7"] {
        match grid.eval_fenced(src, Value::Null, &[&g, &short]).await {
            Err(GridError::StaleFence { lock, current: None, .. }) => assert_eq!(lock, "short"),
            r => panic!("{src}: {r:?}"),
        }
    }
    assert!(!grid.table("t").unwrap().contains("y").await.unwrap());
    assert_eq!(wide.count().await.unwrap(), 3);
    assert!(short.release().await.is_err(), "the expired grant is not the holder's");
    g.release().await.unwrap();
    s.close().await.unwrap();
    grid.core().locks().check().await.unwrap();
    grid.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_feed_append_applies_only_while_its_fence_is_current() {
    let dir = tempfile::tempdir().unwrap();
    let grid = heapgrid::Grid::open(dir.path(), GridOptions::default()).await.unwrap();
    let feed = grid.create_feed("events", Default::default()).await.unwrap();
    let s = grid.session(None).await.unwrap();
    let g = s.lock("writer").try_acquire().await.unwrap().unwrap();
    let id = feed.append_fenced("mine", &[&g]).await.unwrap();
    let lock = s.lock("writer");
    let stale = lock.adopt(g.fence());
    g.release().await.unwrap();
    match feed.append_fenced("late", &[&stale]).await {
        Err(GridError::StaleFence { lock, current: None, .. }) => assert_eq!(lock, "writer"),
        r => panic!("a stale fenced append got {r:?}"),
    }
    std::mem::forget(stale);
    assert_eq!(feed.info().await.unwrap().state.count, 1);
    assert_eq!(feed.get(id).await.unwrap().map(|r| r.value), Some(Value::from("mine")));
    s.close().await.unwrap();
    grid.core().locks().check().await.unwrap();
    grid.close().await.unwrap();
}

/// An idle lock leaves memory (and the fence table) and comes back from its record: its fences
/// go on rising, and the released grant's fence stays stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_lock_leaves_memory_and_comes_back_with_rising_fences() {
    let dir = tempfile::tempdir().unwrap();
    let grid = heapgrid::Grid::open(dir.path(), GridOptions::default()).await.unwrap();
    let t = grid.create_table("t", TableOptions::default()).await.unwrap();
    let s = grid.session(None).await.unwrap();
    let g = s.lock("idle").try_acquire().await.unwrap().unwrap();
    let first = g.fence();
    g.release().await.unwrap();
    let mut waited = 0;
    while grid.locks().await.unwrap().0.iter().any(|l| l.lock == "idle") {
        assert!(waited < 1000, "the idle lock never left memory");
        tokio::time::sleep(Duration::from_millis(5)).await;
        waited += 1;
    }
    assert_eq!(s.lock("idle").status().await.unwrap().last_fence, first, "read from its record");
    assert!(matches!(
        heapgrid::Fenced::with(&t, &[("idle", first)]).put("k", &1).await,
        Err(GridError::StaleFence { current: None, .. })
    ));
    let g = s.lock("idle").try_acquire().await.unwrap().unwrap();
    assert!(g.fence() > first);
    heapgrid::Fenced::with(&t, &[("idle", g.fence())]).put("k", &2).await.unwrap();
    g.release().await.unwrap();
    s.close().await.unwrap();
    grid.core().locks().check().await.unwrap();
    grid.close().await.unwrap();
}

/// Per-lock options through the service: a reentrant lock's nested acquires keep the fence up to
/// the limit (then `LimitExceeded`) and only the outermost release frees it; a lock delay holds
/// the lock back after an expiry, not after a release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reentrancy_and_lock_delay_are_per_lock_options() {
    let dir = tempfile::tempdir().unwrap();
    let grid = heapgrid::Grid::open(dir.path(), GridOptions::default()).await.unwrap();
    let a = grid.session(None).await.unwrap();
    let b = grid.session(None).await.unwrap();
    let lock = a.lock("r");
    lock.configure(2, Duration::ZERO).await.unwrap();
    let g1 = lock.try_acquire().await.unwrap().unwrap();
    let g2 = lock.try_acquire().await.unwrap().unwrap();
    let g3 = lock.try_acquire().await.unwrap().unwrap();
    assert_eq!((g2.fence(), g3.fence()), (g1.fence(), g1.fence()));
    match lock.try_acquire().await {
        Err(GridError::LimitExceeded { max: 2, .. }) => {}
        r => panic!("past the reentry limit: {r:?}"),
    }
    g3.release().await.unwrap();
    g2.release().await.unwrap();
    assert!(b.lock("r").try_acquire().await.unwrap().is_none(), "still held once");
    g1.release().await.unwrap();
    b.lock("r").try_acquire().await.unwrap().unwrap().release().await.unwrap();

    let d = a.lock("d");
    d.configure(0, Duration::from_millis(400)).await.unwrap();
    let g = d.acquire_with(Duration::ZERO, Some(Duration::from_millis(50))).await.unwrap().unwrap();
    let expired_after = std::time::Instant::now() + Duration::from_millis(50);
    // The lease ends; for the lock delay nobody gets it, then b does.
    let got = b.lock("d").acquire(Duration::from_secs(5)).await.unwrap().expect("granted after the delay");
    assert!(
        std::time::Instant::now() >= expired_after + Duration::from_millis(400 - 40),
        "granted before the delay ended"
    );
    assert!(got.fence() > g.fence());
    std::mem::forget(g);
    got.release().await.unwrap();
    a.close().await.unwrap();
    b.close().await.unwrap();
    grid.core().locks().check().await.unwrap();
    grid.close().await.unwrap();
}

/// Records the lock service writes with no answer waiting (a session's expiry and its release)
/// are flushed before anything answered after them: under `always`, reads after an expiry are
/// answered (they used to wait on a record that was never written, and the fsync task failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_is_written_before_later_reads_under_always() {
    let dir = tempfile::tempdir().unwrap();
    let opts = GridOptions { fsync: FsyncPolicy::Always, ..GridOptions::default() };
    let grid = heapgrid::Grid::open(dir.path(), opts).await.unwrap();
    let a = grid.session(Some(Duration::from_secs(1))).await.unwrap();
    let g = a.lock("l").try_acquire().await.unwrap().unwrap();
    std::mem::forget(g);
    a.abandon();
    let b = grid.session(Some(Duration::from_secs(60))).await.unwrap();
    let started = std::time::Instant::now();
    while b.lock("l").status().await.unwrap().holder.is_some() {
        assert!(started.elapsed() < Duration::from_secs(10), "never freed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for _ in 0..20 {
        b.lock("l").status().await.unwrap();
    }
    b.close().await.unwrap();
    grid.core().locks().check().await.unwrap();
    grid.close().await.unwrap();
}
