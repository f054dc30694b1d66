//! Queues on the real `heapgrid serve` binary (shared QUEUES.md): a killed consumer's deliveries
//! reach another consumer within visibility + 50 ms; 1000 blocked poppers whose sockets closed
//! are never handed an item and take mode loses none; 100 × `kill -9` under load with fsync
//! `always` loses no acknowledged push, never redelivers an acked item, and brings in-flight
//! items back with higher delivery counts; the shell's queue commands.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use heapgrid::protocol::{self, Request, RequestBody};
use heapgrid::queue::{Mode, QueueOp};
use heapgrid::{Client, ClientOptions, Pop, Value};

use crate::server::Server;

const CHILD_ENV: &str = "HEAPGRID_QUEUE_CHILD";
const TEST_NAME: &str = "queues_server::a_killed_consumers_delivery_reaches_another_within_visibility";
const VISIBILITY_MS: u64 = 500;

/// The consumer to be killed: pops one item with a 500 ms visibility, says so, and hangs.
async fn child(addr: &str) -> ! {
    let client = Client::connect(addr.parse().unwrap()).await.unwrap();
    let how = Pop { visibility: Some(Duration::from_millis(VISIBILITY_MS)), ..Pop::default() };
    match client.queue("jobs").pop_with(how).await {
        Ok(ds) if ds.len() == 1 => println!("got {}", ds[0].seq),
        r => println!("pop failed {r:?}"),
    }
    tokio::time::sleep(Duration::from_secs(600)).await;
    std::process::exit(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_consumers_delivery_reaches_another_within_visibility() {
    if let Ok(addr) = std::env::var(CHILD_ENV) {
        child(&addr).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let client = Client::connect(server.addr).await.unwrap();
    let q = client.queue("jobs");
    let seq = q.push(&"work").await.unwrap();
    let consumer = crate::child::spawn(TEST_NAME, &[(CHILD_ENV, server.addr.to_string())]);
    let line = loop {
        let line = consumer.line(Duration::from_secs(30)).expect("the consumer said nothing");
        // The harness's "test NAME ... " may lead the child's first line.
        if let Some(at) = line.find("got ").or_else(|| line.find("pop failed")) {
            break line[at..].to_string();
        }
    };
    // The visibility began before the consumer printed this line: timing from here
    // over-counts nothing.
    let delivered = Instant::now();
    assert_eq!(line, format!("got {seq}"));
    consumer.kill();
    let d = q.pop(Duration::from_secs(10)).await.unwrap().expect("redelivered");
    let took = delivered.elapsed();
    assert_eq!((d.seq, d.deliveries), (seq, 2));
    assert!(
        took <= Duration::from_millis(VISIBILITY_MS + 50),
        "redelivered {took:?} after the first delivery (visibility {VISIBILITY_MS} ms)"
    );
    q.ack(d.receipt).await.unwrap();
    server.terminate();
}

/// Raises this process's open-file limit (the server, started after, inherits it) so a
/// thousand connections fit on both sides.
fn enough_files(want: u64) {
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit we own.
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        assert!(r.rlim_max >= want, "this test needs {want} open files; the hard limit is {}", r.rlim_max);
        if r.rlim_cur < want {
            r.rlim_cur = want;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &r), 0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_closed_blocked_poppers_get_nothing_and_take_mode_loses_none() {
    enough_files(4096);
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let client = Client::connect(server.addr).await.unwrap();
    let q = client.queue("q");
    let mut sockets = Vec::new();
    for i in 0..1000u64 {
        let mut s = crate::server::raw_hello(server.addr).await;
        let mode = if i % 2 == 0 { Mode::Take } else { Mode::Ack };
        let op = QueueOp::Pop {
            queue: "q".into(),
            n: 1,
            wait_ms: 60_000,
            mode,
            visibility_ms: None,
            session: None,
        };
        protocol::write_msg(&mut s, &Request { id: 1, body: RequestBody::Queue { op } }).await.unwrap();
        sockets.push(s);
    }
    let until = |want: u64| {
        let q = q.clone();
        async move {
            let t = Instant::now();
            loop {
                let w = q.len().await.unwrap().waiters;
                if w == want {
                    return;
                }
                assert!(t.elapsed() < Duration::from_secs(60), "{w} live waiters, waiting for {want}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    until(1000).await;
    drop(sockets);
    until(0).await;
    for i in 0..1000 {
        q.push(&i).await.unwrap();
    }
    // Nothing went to a dead connection: every item is still ready, none in flight.
    let l = q.len().await.unwrap();
    assert_eq!((l.ready, l.in_flight), (1000, 0), "{l:?}");
    let mut got = BTreeSet::new();
    while got.len() < 1000 {
        let ds = q.pop_with(Pop { n: 1000, mode: Mode::Take, ..Pop::default() }).await.unwrap();
        assert!(!ds.is_empty(), "only {} of 1000 taken", got.len());
        got.extend(ds.into_iter().map(|d| d.value.to_serde::<i64>().unwrap()));
    }
    assert_eq!(got, (0..1000).collect::<BTreeSet<i64>>());
    server.terminate();
}

#[derive(Clone, Copy, Debug)]
enum Event {
    Delivered {
        n: i64,
        deliveries: u32,
    },
    Acked {
        n: i64,
    },
    /// The ack was sent and the connection died before its answer: it may have been applied.
    AckLost {
        n: i64,
    },
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_under_load_loses_no_acknowledged_push_and_redelivers_no_acked_item() {
    let dir = tempfile::tempdir().unwrap();
    let (seed, mut next) = crate::child::seeded("queues-kill9");
    let connect = |addr| async move {
        Client::connect_with(addr, ClientOptions { connect_attempts: 1, ..ClientOptions::default() })
            .await
            .unwrap()
    };
    let pushed: Arc<Mutex<Vec<i64>>> = Arc::default();
    let log: Arc<Mutex<Vec<Event>>> = Arc::default();
    let counter = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let consume = |client: Client, log: Arc<Mutex<Vec<Event>>>, wait_ms: u64, leave: bool| async move {
        let q = client.queue("load");
        loop {
            let how = Pop { n: 4, wait: Duration::from_millis(wait_ms), ..Pop::default() };
            let Ok(ds) = q.pop_with(how).await else { return };
            if ds.is_empty() {
                return;
            }
            for d in ds {
                let n = d.value.to_serde::<i64>().unwrap();
                log.lock().unwrap().push(Event::Delivered { n, deliveries: d.deliveries });
                // Every fifth first delivery is left in flight (the kill or a restart returns it).
                if leave && d.deliveries == 1 && n % 5 == 0 {
                    continue;
                }
                match q.ack(d.receipt).await {
                    Ok(()) => log.lock().unwrap().push(Event::Acked { n }),
                    Err(heapgrid::GridError::StaleReceipt { .. }) => {}
                    Err(_) => {
                        log.lock().unwrap().push(Event::AckLost { n });
                        return;
                    }
                }
            }
        }
    };
    for _round in 0..100 {
        let server = Server::start(dir.path(), &["--fsync", "always"]);
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let client = connect(server.addr).await;
            let (pushed, counter) = (pushed.clone(), counter.clone());
            tasks.push(tokio::spawn(async move {
                let q = client.queue("load");
                loop {
                    let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    match q.push(&n).await {
                        Ok(_) => pushed.lock().unwrap().push(n),
                        Err(_) => return,
                    }
                }
            }));
            tasks.push(tokio::spawn(consume(connect(server.addr).await, log.clone(), 2_000, true)));
        }
        tokio::time::sleep(Duration::from_millis(20 + next() % 150)).await;
        server.kill9();
        for t in tasks {
            t.await.unwrap();
        }
    }
    // Drain: everything left comes out (in flight before the last kill: ready again), acked.
    let server = Server::start(dir.path(), &["--fsync", "always"]);
    consume(connect(server.addr).await, log.clone(), 300, false).await;
    let client = connect(server.addr).await;
    assert_eq!(client.queue("load").len().await.unwrap(), Default::default());
    server.terminate();
    let (ok, out) = crate::server::cli(&["check", dir.path().to_str().unwrap()], None);
    assert!(ok && out.contains("queues/shard-0000.heap"), "{out}");

    let log = log.lock().unwrap();
    let mut acked: BTreeMap<i64, usize> = BTreeMap::new();
    let mut maybe_acked = BTreeSet::new();
    let mut last: BTreeMap<i64, u32> = BTreeMap::new();
    for (i, e) in log.iter().enumerate() {
        match *e {
            Event::Delivered { n, deliveries } => {
                assert!(!acked.contains_key(&n), "event {i}: item {n} delivered after its ack (seed {seed})");
                if let Some(&before) = last.get(&n) {
                    assert!(
                        deliveries > before,
                        "event {i}: item {n} delivery {deliveries} after delivery {before} (seed {seed})"
                    );
                }
                last.insert(n, deliveries);
            }
            Event::Acked { n } => {
                assert!(acked.insert(n, i).is_none(), "event {i}: item {n} acked twice (seed {seed})");
            }
            Event::AckLost { n } => {
                maybe_acked.insert(n);
            }
        }
    }
    let pushed = pushed.lock().unwrap();
    assert!(pushed.len() > 100, "only {} pushes acknowledged (seed {seed})", pushed.len());
    for n in pushed.iter() {
        assert!(
            acked.contains_key(n) || maybe_acked.contains(n),
            "acknowledged push {n} was lost: never acked, no ack in doubt (seed {seed})"
        );
    }
    // Acks in doubt are few (one per consumer per kill at most).
    assert!(maybe_acked.len() <= 2 * 100, "{} acks in doubt (seed {seed})", maybe_acked.len());
    let redelivered = last.values().filter(|&&d| d > 1).count();
    assert!(redelivered > 0, "no item was redelivered: the test did not exercise restarts (seed {seed})");
}

/// The shell's `push`, `pop`, `ack`, `qlen` (and `peek`, `nack`, `queues`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shell_pushes_pops_acks_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let client = Client::connect(server.addr).await.unwrap();
    let a = server.addr.to_string();
    let script = "push mail.out {\"to\": \"bob\"}\npush mail.out 2\npeek mail.out\npop mail.out\nack mail.out 1/1\nack mail.out 1/1\nqlen mail.out\npop mail.out 1 0 take\nqueues\n";
    let (ok, out) = crate::server::cli(&["shell", "--addr", &a], Some(script));
    assert!(ok, "{out}");
    assert!(out.contains("\"seq\": 2"), "{out}");
    assert!(out.contains("\"receipt\": \"1/1\""), "{out}");
    assert!(out.contains("acked"), "{out}");
    assert!(out.contains("stale"), "the second ack: {out}");
    assert!(out.contains("\"ready\": 1"), "{out}");
    assert!(out.contains("\"queue\": \"mail.out\""), "{out}");
    let l = client.queue("mail.out").len().await.unwrap();
    assert_eq!((l.ready, l.in_flight), (0, 0), "{l:?}");
    assert_eq!(client.queue("mail.out").peek(1).await.unwrap(), Vec::<(u64, Value)>::new());
    server.terminate();
}
