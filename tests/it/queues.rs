//! Queues through the embedded grid (shared QUEUES.md, "Tests a correct implementation
//! passes"): receipts and redelivery in seq order, dedup across a restart, dead letters with
//! their history, 50 blocked poppers served FIFO and timing out on time, visibility expiry,
//! take mode, delays, fenced pushes, deliveries tied to a lock session, a restart bringing
//! in-flight items back with their counts, and concurrent producers and consumers acking every
//! item exactly once. Each ends with the queue service's checker.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use heapgrid::queue::{Mode, QueueOptions};
use heapgrid::{GridError, GridOptions, Pop, Push, Value};

async fn open(dir: &std::path::Path) -> heapgrid::Grid {
    heapgrid::Grid::open(dir, GridOptions::default()).await.unwrap()
}

const NO_WAIT: Duration = Duration::ZERO;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_acks_nacks_and_redelivery_in_seq_order() {
    let dir = tempfile::tempdir().unwrap();
    let grid = open(dir.path()).await;
    let q = grid.queue("jobs");
    for i in 1..=3 {
        assert_eq!(q.push(&i).await.unwrap(), i as u64);
    }
    let a = q.pop(NO_WAIT).await.unwrap().unwrap();
    assert_eq!((a.seq, a.deliveries, a.value.clone()), (1, 1, Value::Int(1)));
    let b = q.pop(NO_WAIT).await.unwrap().unwrap();
    assert_eq!(b.seq, 2);
    let l = q.len().await.unwrap();
    assert_eq!((l.ready, l.in_flight, l.delayed), (1, 2, 0));
    // A nacked item re-enters at its original seq: before item 3.
    q.nack(a.receipt, None).await.unwrap();
    let again = q.pop(NO_WAIT).await.unwrap().unwrap();
    assert_eq!((again.seq, again.deliveries), (1, 2));
    // The first receipt is stale now, and acking with it changes nothing.
    let e = q.ack(a.receipt).await.unwrap_err();
    assert!(matches!(e, GridError::StaleReceipt { seq: 1, delivery: 1, .. }), "{e:?}");
    assert_eq!(q.len().await.unwrap().in_flight, 2);
    q.ack(again.receipt).await.unwrap();
    q.ack(b.receipt).await.unwrap();
    assert!(matches!(q.ack(b.receipt).await, Err(GridError::StaleReceipt { .. })), "acked twice");
    assert_eq!(q.peek(10).await.unwrap(), vec![(3, Value::Int(3))]);
    let l = q.len().await.unwrap();
    assert_eq!((l.ready, l.in_flight), (1, 0));
    // Take mode removes at once.
    assert_eq!(q.take(NO_WAIT).await.unwrap(), Some(Value::Int(3)));
    assert_eq!(q.take(NO_WAIT).await.unwrap(), None);
    assert!(grid.queues().await.unwrap().iter().any(|(n, _)| n == "jobs"));
    grid.core().queues().check().await.unwrap();
    grid.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedup_key_returns_the_first_seq_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let grid = open(dir.path()).await;
    let q = grid.queue("q");
    let (seq, dup) = q.push_with(&"x", Push::dedup("order-7")).await.unwrap();
    assert!(!dup);
    assert_eq!(q.push_with(&"x again", Push::dedup("order-7")).await.unwrap(), (seq, true));
    grid.close().await.unwrap();
    let grid = open(dir.path()).await;
    let q = grid.queue("q");
    assert_eq!(q.push_with(&"x", Push::dedup("order-7")).await.unwrap(), (seq, true));
    assert_eq!(q.len().await.unwrap().ready, 1);
    // Seqs never repeat across restarts.
    let d = q.pop(NO_WAIT).await.unwrap().unwrap();
    q.ack(d.receipt).await.unwrap();
    grid.close().await.unwrap();
    let grid = open(dir.path()).await;
    let q = grid.queue("q");
    assert!(q.push(&"y").await.unwrap() > seq);
    // A window of 100 ms: a key is forgotten after it.
    let mut o = QueueOptions::defaults("w");
    o.dedup_window_ms = 100;
    let w = grid.queue("w");
    w.configure(o).await.unwrap();
    let (s1, _) = w.push_with(&1, Push::dedup("k")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let (s2, dup) = w.push_with(&2, Push::dedup("k")).await.unwrap();
    assert!(!dup && s2 > s1);
    grid.core().queues().check().await.unwrap();
    grid.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_failed_deliveries_move_an_item_to_its_dead_letter_queue() {
    let dir = tempfile::tempdir().unwrap();
    let grid = open(dir.path()).await;
    let q = grid.queue("mail");
    let mut o = QueueOptions::defaults("mail");
    o.max_deliveries = 3;
    q.configure(o).await.unwrap();
    q.push(&"hello").await.unwrap();
    let vis = Some(Duration::from_millis(100));
    // Nacked, expired, nacked.
    let d = q.pop(NO_WAIT).await.unwrap().unwrap();
    q.nack(d.receipt, None).await.unwrap();
    let d = q.pop_with(Pop { visibility: vis, ..Pop::default() }).await.unwrap().remove(0);
    assert_eq!(d.deliveries, 2);
    let d = q.pop(Duration::from_secs(5)).await.unwrap().expect("back after its visibility");
    assert_eq!(d.deliveries, 3);
    q.nack(d.receipt, None).await.unwrap();
    let l = q.len().await.unwrap();
    assert_eq!((l.ready, l.in_flight, l.delayed), (0, 0, 0));
    let dead = grid.queue("mail.dead");
    let letter = dead.take(NO_WAIT).await.unwrap().expect("dead-lettered");
    let j = letter.to_json();
    assert_eq!(j["queue"], "mail");
    assert_eq!(j["deliveries"], 3);
    assert_eq!(j["value"], "hello");
    let outcomes: Vec<&str> =
        j["history"].as_array().unwrap().iter().map(|a| a["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["nacked", "expired", "nacked"]);
    grid.core().queues().check().await.unwrap();
    grid.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_blocked_poppers_get_one_item_each_in_arrival_order_and_timeouts_fire_on_time() {
    let dir = tempfile::tempdir().unwrap();
    let grid = Arc::new(open(dir.path()).await);
    let q = grid.queue("fifo");
    let mut poppers = Vec::new();
    for i in 0..50u64 {
        let popper = q.clone();
        poppers.push(tokio::spawn(async move {
            let q = popper;
            let mode = if i % 2 == 0 { Mode::Ack } else { Mode::Take };
            let how = Pop { wait: Duration::from_secs(30), mode, ..Pop::default() };
            (i, q.pop_with(how).await.unwrap())
        }));
        // Arrival order is the order of these requests at the service.
        while q.len().await.unwrap().waiters < i + 1 {
            tokio::task::yield_now().await;
        }
    }
    for i in 0..50u64 {
        q.push(&i).await.unwrap();
    }
    for p in poppers {
        let (i, got) = p.await.unwrap();
        assert_eq!(got.len(), 1, "popper {i}");
        assert_eq!(got[0].value, Value::Int(i as i64), "popper {i} got another's item");
    }
    // Timeouts: each waiter answers empty no sooner than its wait, and not long after.
    let mut timed = Vec::new();
    for wait_ms in [50u64, 150, 300] {
        let q = grid.queue("empty");
        timed.push(tokio::spawn(async move {
            let t = Instant::now();
            let got = q.pop(Duration::from_millis(wait_ms)).await.unwrap();
            (wait_ms, t.elapsed(), got)
        }));
    }
    for t in timed {
        let (wait_ms, took, got) = t.await.unwrap();
        assert!(got.is_none());
        assert!(took >= Duration::from_millis(wait_ms), "answered after {took:?} of {wait_ms} ms");
        assert!(took < Duration::from_millis(wait_ms + 1_000), "answered after {took:?} of {wait_ms} ms");
    }
    assert_eq!(grid.queue("empty").len().await.unwrap().waiters, 0);
    grid.core().queues().check().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delays_extensions_purges_and_fenced_pushes() {
    let dir = tempfile::tempdir().unwrap();
    let grid = open(dir.path()).await;
    let q = grid.queue("d");
    q.push_with(&"later", Push::delay(Duration::from_millis(200))).await.unwrap();
    assert_eq!(q.len().await.unwrap().delayed, 1);
    assert!(q.pop(NO_WAIT).await.unwrap().is_none(), "not ready yet");
    let t = Instant::now();
    let d = q.pop(Duration::from_secs(5)).await.unwrap().expect("ready after its delay");
    assert!(t.elapsed() >= Duration::from_millis(150), "{:?}", t.elapsed());
    // Extended past its visibility, it is not redelivered.
    q.extend(d.receipt, Duration::from_secs(60)).await.unwrap();
    assert!(q.pop(Duration::from_millis(100)).await.unwrap().is_none());
    q.ack(d.receipt).await.unwrap();
    // A nack with a delay.
    q.push(&1).await.unwrap();
    let d = q.pop(NO_WAIT).await.unwrap().unwrap();
    q.nack(d.receipt, Some(Duration::from_millis(100))).await.unwrap();
    assert_eq!(q.len().await.unwrap().delayed, 1);
    assert_eq!(q.pop(Duration::from_secs(5)).await.unwrap().unwrap().deliveries, 2);
    // Purge: in-flight items too; their receipts are stale.
    for i in 0..10 {
        q.push(&i).await.unwrap();
    }
    assert_eq!(q.purge().await.unwrap(), 11);
    assert_eq!(q.len().await.unwrap(), Default::default());
    // A push fenced by a lock grant is refused once the grant is gone.
    let s = grid.session(None).await.unwrap();
    let g = s.lock("producer").acquire(Duration::from_secs(1)).await.unwrap().unwrap();
    q.push_with(&"ok", Push::default().fenced(&g)).await.unwrap();
    let stale = Push { fence: Some(("producer".into(), g.fence())), ..Push::default() };
    g.release().await.unwrap();
    let e = q.push_with(&"late", stale).await.unwrap_err();
    assert!(matches!(e, GridError::StaleFence { .. }), "{e:?}");
    assert_eq!(q.len().await.unwrap().ready, 1);
    // Bad input: typed errors, nothing changed.
    assert!(matches!(grid.queue("").push(&1).await, Err(GridError::Invalid(_))));
    let e = q.pop_with(Pop { n: 0, ..Pop::default() }).await.unwrap_err();
    assert!(matches!(e, GridError::Invalid(_)));
    let e = q.pop_with(Pop { wait: Duration::from_secs(61), ..Pop::default() }).await.unwrap_err();
    assert!(matches!(e, GridError::Invalid(_)));
    let mut o = QueueOptions::defaults("full");
    o.max_len = Some(2);
    let full = grid.queue("full");
    full.configure(o).await.unwrap();
    full.push(&1).await.unwrap();
    full.push(&2).await.unwrap();
    assert!(matches!(full.push(&3).await, Err(GridError::QueueFull { max_len: 2, .. })));
    grid.core().queues().check().await.unwrap();
    grid.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_in_a_session_return_to_ready_when_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let grid = open(dir.path()).await;
    let q = grid.queue("s");
    q.push(&"a").await.unwrap();
    let s = grid.session(None).await.unwrap();
    let d = q.pop_in(&s, NO_WAIT).await.unwrap().unwrap();
    assert_eq!(q.len().await.unwrap().in_flight, 1);
    s.close().await.unwrap();
    let again = q.pop(Duration::from_secs(5)).await.unwrap().expect("back when the session ended");
    assert_eq!((again.seq, again.deliveries), (d.seq, 2));
    grid.core().queues().check().await.unwrap();
    grid.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_brings_in_flight_items_back_with_their_counts() {
    let dir = tempfile::tempdir().unwrap();
    let grid = open(dir.path()).await;
    let q = grid.queue("r");
    for i in 0..5 {
        q.push(&i).await.unwrap();
    }
    let ds = q.pop_with(Pop { n: 3, ..Pop::default() }).await.unwrap();
    assert_eq!(ds.len(), 3);
    q.ack(ds[0].receipt).await.unwrap();
    grid.close().await.unwrap();
    let grid = open(dir.path()).await;
    let q = grid.queue("r");
    let l = q.len().await.unwrap();
    assert_eq!((l.ready, l.in_flight), (4, 0), "in flight before: ready now");
    // Receipts from before the restart are stale.
    assert!(matches!(q.ack(ds[1].receipt).await, Err(GridError::StaleReceipt { .. })));
    let again = q.pop_with(Pop { n: 10, ..Pop::default() }).await.unwrap();
    let got: Vec<(u64, u32)> = again.iter().map(|d| (d.seq, d.deliveries)).collect();
    assert_eq!(got, [(2, 2), (3, 2), (4, 1), (5, 1)]);
    grid.core().queues().check().await.unwrap();
    grid.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_producers_and_consumers_ack_every_item_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let grid = Arc::new(open(dir.path()).await);
    let mut producers = Vec::new();
    for p in 0..4i64 {
        let q = grid.queue("work");
        producers.push(tokio::spawn(async move {
            for i in 0..250 {
                q.push(&(p * 1000 + i)).await.unwrap();
            }
        }));
    }
    let mut consumers = Vec::new();
    for c in 0..4 {
        let q = grid.queue("work");
        consumers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            loop {
                let how = Pop { n: 8, wait: Duration::from_millis(500), ..Pop::default() };
                let ds = q.pop_with(how).await.unwrap();
                if ds.is_empty() {
                    return acked;
                }
                for d in ds {
                    // Every third delivery of consumer 0 fails once.
                    if c == 0 && d.deliveries == 1 && d.seq % 3 == 0 {
                        q.nack(d.receipt, None).await.unwrap();
                        continue;
                    }
                    q.ack(d.receipt).await.unwrap();
                    acked.push(d.value.to_serde::<i64>().unwrap());
                }
            }
        }));
    }
    for p in producers {
        p.await.unwrap();
    }
    let mut seen: BTreeMap<i64, u32> = BTreeMap::new();
    for c in consumers {
        for v in c.await.unwrap() {
            *seen.entry(v).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), 1000);
    assert!(seen.values().all(|&n| n == 1), "acked more than once");
    assert_eq!(grid.queue("work").len().await.unwrap(), Default::default());
    grid.core().queues().check().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snippets_push_after_commit_and_take_for_good_only_when_they_commit() {
    let dir = tempfile::tempdir().unwrap();
    let grid = open(dir.path()).await;
    let t = grid.create_table("t", heapgrid::TableOptions::default()).await.unwrap();
    let q = grid.queue("jobs");
    // Pushes are applied after the commit, in program order.
    let v = grid
        .eval("q = queue('jobs')\nq.push({'n': 1})\nq.push({'n': 2}, dedup_key='two')\nt['x'] = 1\nq.len()")
        .await
        .unwrap();
    assert_eq!(v.to_json()["ready"], 0, "nothing is pushed while the run runs");
    assert_eq!(q.len().await.unwrap().ready, 2);
    // A failing run pushes nothing and gives back what it took, uncounted: runs that fail (or
    // conflict and retry) never use up an item's deliveries.
    let mut o = QueueOptions::defaults("jobs");
    o.max_deliveries = 2;
    q.configure(o).await.unwrap();
    for _ in 0..3 {
        let e = grid
            .eval("q = queue('jobs')\nq.push(3)\ngot = q.take(2)\nt['y'] = got\nfail('no')")
            .await
            .unwrap_err();
        assert!(matches!(e, GridError::Snippet(_)), "{e:?}");
        let l = q.len().await.unwrap();
        assert_eq!((l.ready, l.in_flight), (2, 0), "given back at once: {l:?}");
    }
    assert_eq!(grid.queue("jobs.dead").len().await.unwrap().ready, 0, "nothing dead-lettered");
    assert_eq!(t.get_value("y").await.unwrap(), None);
    // A committing run takes for good, and sees values, peeks and counts.
    let v = grid.eval("q = queue('jobs')\npeeked = q.peek(1)\ngot = q.take(5)\nt['y'] = got\n[peeked, got, q.len()['ready']]").await.unwrap();
    let j = v.to_json();
    assert_eq!(j[0], serde_json::json!([{"n": 1}]));
    assert_eq!(j[1], serde_json::json!([{"n": 1}, {"n": 2}]));
    assert_eq!(j[2], 0);
    assert_eq!(q.len().await.unwrap(), Default::default());
    assert!(t.get_value("y").await.unwrap().is_some());
    // Bad input is a typed snippet error.
    assert!(grid.eval("queue('jobs').take(0)").await.is_err());
    assert!(grid.eval("queue('jobs').push(1, delay_ms=-5)").await.is_err());
    grid.core().queues().check().await.unwrap();
    grid.close().await.unwrap();
}

/// Records no answer waits for (a tick's expiries and forgotten dedup keys) are written before
/// anything answered after them: under `always`, a read after them is answered (it used to
/// wait on a record that was never flushed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_records_are_flushed_before_later_answers_under_always() {
    let dir = tempfile::tempdir().unwrap();
    let opts = GridOptions { fsync: heapgrid::FsyncPolicy::Always, ..GridOptions::default() };
    let grid = heapgrid::Grid::open(dir.path(), opts).await.unwrap();
    let q = grid.queue("bg");
    let mut o = QueueOptions::defaults("bg");
    o.dedup_window_ms = 20;
    q.configure(o).await.unwrap();
    for i in 0..5 {
        q.push_with(&i, Push::dedup(format!("k{i}"))).await.unwrap();
        let d =
            q.pop_with(Pop { visibility: Some(Duration::from_millis(20)), ..Pop::default() }).await.unwrap();
        // The dedup key is forgotten and the delivery expires by the tick, with no answer
        // waiting; then only reads and an extend follow.
        tokio::time::sleep(Duration::from_millis(80)).await;
        let l = q.len().await.unwrap();
        assert_eq!(l.ready, (i + 1) as u64, "round {i}: {l:?}");
        let e = q.extend(d[0].receipt, Duration::from_secs(1)).await;
        assert!(matches!(e, Err(GridError::StaleReceipt { .. })), "{e:?}");
        assert_eq!(q.peek(1).await.unwrap().len(), 1);
    }
    grid.core().queues().check().await.unwrap();
    grid.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_a_full_queue_waits_for_room_in_arrival_order_or_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let grid = Arc::new(open(dir.path()).await);
    let q = grid.queue("small");
    let mut o = QueueOptions::defaults("small");
    o.max_len = Some(1);
    q.configure(o).await.unwrap();
    q.push(&0).await.unwrap();
    // Three blocked pushes, in this order.
    let mut blocked = Vec::new();
    for i in 1..=3 {
        let q2 = q.clone();
        blocked
            .push(tokio::spawn(async move { q2.push_with(&i, Push::wait(Duration::from_secs(30))).await }));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // A push without a wait does not overtake them.
    assert!(matches!(q.push(&9).await, Err(GridError::QueueFull { max_len: 1, .. })));
    // Each take makes room for the next blocked push, in arrival order.
    for want in 0..=3i64 {
        let got = q.take(Duration::from_secs(5)).await.unwrap().expect("an item");
        assert_eq!(got, Value::Int(want));
    }
    for b in blocked {
        b.await.unwrap().unwrap();
    }
    // A wait that ends without room answers QueueFull on time.
    q.push(&4).await.unwrap();
    let t = Instant::now();
    let e = q.push_with(&5, Push::wait(Duration::from_millis(150))).await.unwrap_err();
    assert!(matches!(e, GridError::QueueFull { .. }), "{e:?}");
    assert!(t.elapsed() >= Duration::from_millis(150));
    assert_eq!(q.len().await.unwrap().ready, 1);
    grid.core().queues().check().await.unwrap();
}

/// The queue service fails (a panic, as a bug would) and its supervisor restarts it: the restart
/// is recovery, so in-flight items are ready again with their counts and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_queue_service_restarts_and_recovers_its_queues() {
    let dir = tempfile::tempdir().unwrap();
    let grid = open(dir.path()).await;
    let q = grid.queue("crashy");
    for i in 0..3 {
        q.push(&i).await.unwrap();
    }
    let d = q.pop(NO_WAIT).await.unwrap().unwrap();
    grid.core().queues().inject_panic();
    // Requests made while it restarts wait it out.
    let t0 = Instant::now();
    let l = loop {
        match q.len().await {
            Ok(l) => break l,
            Err(e) => {
                assert!(t0.elapsed() < Duration::from_secs(10), "{e:?}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    assert_eq!((l.ready, l.in_flight), (3, 0), "in flight before the failure: ready after it");
    assert!(matches!(q.ack(d.receipt).await, Err(GridError::StaleReceipt { .. })));
    let again = q.pop(NO_WAIT).await.unwrap().unwrap();
    assert_eq!((again.seq, again.deliveries), (d.seq, 2));
    grid.core().queues().check().await.unwrap();
    grid.close().await.unwrap();
}
