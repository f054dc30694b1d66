//! The control plane on the real binary: one `heapgrid serve` process per node on 127.0.0.1,
//! a three-node Raft group formed by `--join`, the leader killed with `kill -9` (the map stays
//! available: a fourth node joins through a survivor), the killed node restarted from its data
//! directory with a new client address (it catches up and the map records the new address),
//! `cluster remove`, and the CLI's `cluster status`. Every wait is bounded.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use heapgrid::{Client, GridError};
use heapgrid_actors::cluster::ops::{ClusterOp, ClusterResult};
use heapgrid_actors::cluster::raft::ClusterStatus;

const COOKIE: &str = "test-cookie";

struct Node {
    id: u64,
    child: Child,
    addr: SocketAddr,
    peer: String,
    dir: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(id: u64, dir: &Path, peer_listen: &str, join: Option<&str>) -> Node {
    start_with(id, dir, peer_listen, join, &[])
}

fn start_with(id: u64, dir: &Path, peer_listen: &str, join: Option<&str>, extra: &[&str]) -> Node {
    start_on("127.0.0.1:0", id, dir, peer_listen, join, extra)
}

/// A node restarted where it was (client and peer addresses), as `kill9` left it.
fn restart(gone: &(u64, PathBuf, String, SocketAddr)) -> Node {
    start_on(&gone.3.to_string(), gone.0, &gone.1, &gone.2, None, &[])
}

fn start_on(
    listen: &str,
    id: u64,
    dir: &Path,
    peer_listen: &str,
    join: Option<&str>,
    extra: &[&str],
) -> Node {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_heapgrid"));
    cmd.args(["serve", "--listen", listen, "--trusted-snippets", "--data"])
        .arg(dir)
        .args(["--node-id", &id.to_string(), "--peer-listen", peer_listen])
        .args(extra)
        .env("HEAPGRID_CLUSTER_COOKIE", COOKIE);
    if let Some(j) = join {
        cmd.args(["--join", j]);
    }
    // HEAPGRID_TEST_LOGS=DIR keeps each node's log there (`node-ID.log`, appended).
    let stderr = match std::env::var_os("HEAPGRID_TEST_LOGS") {
        Some(d) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(Path::new(&d).join(format!("node-{id}.log")))
                .unwrap();
            Stdio::from(f)
        }
        None => Stdio::null(),
    };
    let mut child = cmd.stdout(Stdio::piped()).stderr(stderr).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let (mut peer, mut addr) = (None, None);
    for _ in 0..2 {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        if let Some(p) = line.trim().strip_prefix("heapgrid peers on ") {
            peer = Some(p.to_string());
        } else if let Some(a) = line.trim().strip_prefix("heapgrid listening on ") {
            addr = Some(a.parse().unwrap());
        } else {
            panic!("node {id}: unexpected line {line:?}");
        }
    }
    Node { id, child, addr: addr.unwrap(), peer: peer.unwrap(), dir: dir.to_path_buf() }
}

impl Node {
    /// `kill -9`; what it takes to restart it.
    fn kill9(mut self) -> (u64, PathBuf, String, SocketAddr) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        (self.id, self.dir.clone(), self.peer.clone(), self.addr)
    }
}

async fn status(n: &Node) -> Option<ClusterStatus> {
    let c = Client::connect(n.addr).await.ok()?;
    c.cluster_status().await.ok()
}

/// Polls until every node's status satisfies `f` (given all of them), at most `secs`.
async fn until(
    what: &str,
    nodes: &[&Node],
    secs: u64,
    f: impl Fn(&[ClusterStatus]) -> bool,
) -> Vec<ClusterStatus> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = Vec::new();
    while Instant::now() < deadline {
        let mut all = Vec::new();
        for n in nodes {
            if let Some(s) = status(n).await {
                all.push(s);
            }
        }
        if all.len() == nodes.len() && f(&all) {
            return all;
        }
        last = all;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("not within {secs} s: {what}; last status {last:#?}");
}

/// Every node names the same leader, has `voters` voters and the same map of `voters` members.
fn agree(s: &[ClusterStatus], voters: usize) -> bool {
    s[0].leader.is_some()
        && s.iter().all(|x| x.leader == s[0].leader && x.voters.len() == voters && x.map == s[0].map)
        && s[0].map.members().count() == voters
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_map_survives_the_raft_leader_killed_and_a_restarted_node_catches_up() {
    let root = tempfile::tempdir().unwrap();
    let d = |i: u64| root.path().join(format!("n{i}"));
    let n1 = start(1, &d(1), "127.0.0.1:0", None);
    let n2 = start(2, &d(2), "127.0.0.1:0", Some(&n1.peer));
    let n3 = start(3, &d(3), "127.0.0.1:0", Some(&format!("127.0.0.1:1,{}", n1.peer)));
    let s = until("three nodes agree", &[&n1, &n2, &n3], 30, |s| agree(s, 3)).await;
    let (leader, term) = (s[0].leader.unwrap(), s[0].term);

    // The CLI shows the same.
    let out = Command::new(env!("CARGO_BIN_EXE_heapgrid"))
        .args(["cluster", "--addr", &n2.addr.to_string(), "status"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["node"], 2);
    assert_eq!(json["voters"].as_array().unwrap().len(), 3);
    assert_eq!(json["leader"], leader);

    // kill -9 of the leader: the others elect a new one.
    let mut nodes = vec![n1, n2, n3];
    let at = nodes.iter().position(|n| n.id == leader).unwrap();
    let killed_at = Instant::now();
    let (dead, dead_dir, dead_peer, _) = nodes.remove(at).kill9();
    let rest: Vec<&Node> = nodes.iter().collect();
    until("a new leader among the survivors", &rest, 20, |s| {
        s.iter().all(|x| x.leader.is_some_and(|l| l != dead) && x.leader == s[0].leader && x.term > term)
    })
    .await;
    eprintln!("a new Raft leader {} ms after the kill", killed_at.elapsed().as_millis());

    // The map still takes changes: a fourth node joins through a survivor.
    let n4 = start(4, &d(4), "127.0.0.1:0", Some(&nodes[0].peer));
    let mut live: Vec<&Node> = nodes.iter().collect();
    live.push(&n4);
    until("four voters with one down", &live, 30, |s| agree(s, 4)).await;

    // The killed node restarts from its directory (a new client port): it catches up, and the
    // map records its new address.
    let back = start(dead, &dead_dir, &dead_peer, None);
    let mut all = live.clone();
    all.push(&back);
    let s = until("the restarted node catches up", &all, 30, |s| {
        agree(s, 4) && s[0].map.member(dead).is_some_and(|m| m.addr == back.addr.to_string())
    })
    .await;
    assert!(s.iter().all(|x| x.map.version == s[0].map.version));

    // `cluster remove` takes node 4 out of the group and the map.
    let c = Client::connect(back.addr).await.unwrap();
    match c.cluster(ClusterOp::Remove { node: 4 }).await.unwrap() {
        ClusterResult::Changed { .. } => {}
        r => panic!("unexpected {r:?}"),
    }
    drop(n4);
    let three: Vec<&Node> = nodes.iter().chain([&back]).collect();
    until("node 4 removed", &three, 30, |s| agree(s, 3) && s[0].map.member(4).is_none()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_node_answers_cluster_requests_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = crate::server::Server::start(dir.path(), &[]);
    let c = Client::connect(server.addr).await.unwrap();
    match c.cluster_status().await {
        Err(GridError::Invalid(m)) => assert!(m.contains("not in a cluster"), "{m}"),
        r => panic!("unexpected {r:?}"),
    }
    // A peer listener without a cookie is refused at start, with the reason.
    let out = Command::new(env!("CARGO_BIN_EXE_heapgrid"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path().join("other"))
        .args(["--node-id", "1", "--peer-listen", "127.0.0.1:0"])
        .env_remove("HEAPGRID_CLUSTER_COOKIE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cluster cookie"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_keeps_its_node_id() {
    let dir = tempfile::tempdir().unwrap();
    let n = start(1, dir.path(), "127.0.0.1:0", None);
    until("node 1 leads", &[&n], 20, |s| agree(s, 1)).await;
    drop(n);
    let out = Command::new(env!("CARGO_BIN_EXE_heapgrid"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path())
        .args(["--node-id", "2", "--peer-listen", "127.0.0.1:0"])
        .env("HEAPGRID_CLUSTER_COOKIE", COOKIE)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not node 2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A three-node cluster and a `ClusterClient` with a `sync(1)` table of `shards` shards whose
/// every shard serves.
/// Three nodes (ids 1 to 3, serve `flags` each) in agreement, and a `ClusterClient` of them.
async fn cluster_of_three(root: &Path, flags: &[&str]) -> (Vec<Node>, heapgrid::ClusterClient) {
    let d = |i: u64| root.join(format!("n{i}"));
    let n1 = start_with(1, &d(1), "127.0.0.1:0", None, flags);
    let n2 = start_with(2, &d(2), "127.0.0.1:0", Some(&n1.peer), flags);
    let n3 = start_with(3, &d(3), "127.0.0.1:0", Some(&n1.peer), flags);
    until("three nodes agree", &[&n1, &n2, &n3], 30, |s| agree(s, 3)).await;
    let opts = heapgrid::ClientOptions::default();
    let cc = heapgrid::ClusterClient::connect(&[n1.addr, n2.addr, n3.addr], opts).await.unwrap();
    (vec![n1, n2, n3], cc)
}

async fn three_with_table(root: &Path, table: &str, shards: u32) -> (Vec<Node>, heapgrid::ClusterClient) {
    use heapgrid::TableOptions;
    let (nodes, cc) = cluster_of_three(root, &[]).await;
    let t = cc.create_table(table, TableOptions { shards, fsync: None }).await.unwrap();
    let spec = cc.map().table(table).cloned().unwrap();
    assert_eq!((spec.replicas, spec.sync), (2, 1));
    // Every shard serves (its primary got a lease) before the clock starts.
    for i in 0..10 * shards {
        t.put(format!("warm{i}"), &i).await.unwrap();
    }
    (nodes, cc)
}

/// Acknowledged writes: key, value, when the put was sent, when it was acknowledged.
type Acks = std::sync::Arc<std::sync::Mutex<Vec<(String, u64, Instant, Instant)>>>;

/// Writers putting unique keys and logging every ack, until `stop`: two per shard (each
/// writes only keys of its shard, so a shard that is down holds up only its own writers).
fn writers(
    cc: &heapgrid::ClusterClient,
    table: &str,
    shards: u32,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (Acks, Vec<tokio::task::JoinHandle<()>>) {
    let acked: Acks = Default::default();
    let mut tasks = Vec::new();
    for w in 0..2 * shards {
        let (t, acked, stop) = (cc.table(table), acked.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let key = format!("w{w}-{i}");
                if heapgrid::Key::from(key.as_str()).shard(shards) != w % shards {
                    continue;
                }
                let sent = Instant::now();
                match t.put(key.clone(), &i).await {
                    Ok(_) => acked.lock().unwrap().push((key, i, sent, Instant::now())),
                    Err(e) => {
                        if std::env::var_os("HEAPGRID_TEST_LOGS").is_some() {
                            eprintln!("{:?} after start: {key}: {e}", sent.elapsed());
                        }
                    }
                }
            }
        }));
    }
    (acked, tasks)
}

/// Every acknowledged write reads back; the keys that do not.
async fn lost(
    cc: &heapgrid::ClusterClient,
    table: &str,
    acked: &[(String, u64, Instant, Instant)],
) -> Vec<String> {
    let t = cc.table(table);
    let mut out = Vec::new();
    for (k, v, _, _) in acked {
        if t.get::<u64>(k.clone()).await.ok().flatten() != Some(*v) {
            out.push(k.clone());
        }
    }
    out
}

/// CLUSTER.md's first test: writers put unique keys with `sync(1)` and log every ack; the
/// primary of a random shard is killed with `kill -9`; every acknowledged write is then read
/// back from the new primaries, and the failover time (first ack on that shard after the kill)
/// is printed. `HEAPGRID_FAILOVER_RUNS=N` repeats it on fresh clusters and prints p50/p99
/// (`scripts/cluster-failover.sh` runs 50); in `cargo test` it runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_sync_writes_survive_kill9_of_their_primary() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use heapgrid::Key;

    let runs: usize = std::env::var("HEAPGRID_FAILOVER_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let (_, mut rng) = crate::child::seeded("failover");
    let shards = 3;
    let mut times = Vec::new();
    for run in 0..runs {
        let root = tempfile::tempdir().unwrap();
        let (mut nodes, cc) = three_with_table(root.path(), "acks", shards).await;
        let stop = Arc::new(AtomicBool::new(false));
        let (acked, tasks) = writers(&cc, "acks", shards, &stop);
        tokio::time::sleep(Duration::from_millis(500 + rng() % 1000)).await;
        // HEAPGRID_FAILOVER_SHARD=N always kills shard N's primary.
        let shard = match std::env::var("HEAPGRID_FAILOVER_SHARD").ok().and_then(|s| s.parse().ok()) {
            Some(n) => n,
            None => (rng() % shards as u64) as u32,
        };
        let victim = cc.map().placement(&("acks".to_string(), shard)).unwrap().primary;
        let leader = status(&nodes[0]).await.and_then(|s| s.leader);
        let at = nodes.iter().position(|n| n.id == victim).unwrap();
        let killed_at = Instant::now();
        let _ = nodes.remove(at).kill9();
        let before = acked.lock().unwrap().len();
        tokio::time::sleep(Duration::from_secs(4)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        let acked = acked.lock().unwrap().clone();
        // The failover time (CLUSTER.md): the first acknowledgement on that shard of a write sent
        // after the kill, measured from the kill.
        let first_after = acked
            .iter()
            .filter(|(k, _, sent, _)| *sent > killed_at && Key::from(k.as_str()).shard(shards) == shard)
            .map(|(_, _, _, at)| at.duration_since(killed_at))
            .min()
            .unwrap_or_else(|| {
                panic!("run {run}: shard {shard} never served again after its primary was killed")
            });
        let placed = cc.map().placement(&("acks".to_string(), shard)).cloned().unwrap();
        assert_ne!(placed.primary, victim);
        assert!(placed.epoch > 1);
        let lost = lost(&cc, "acks", &acked).await;
        assert!(
            lost.is_empty(),
            "run {run}: {} acknowledged writes lost, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
        eprintln!(
            "run {run}: shard {shard}, primary node {victim} killed (Raft leader: {}): first ack after {} ms; \
             {} writes acked, {before} before the kill, 0 lost",
            leader == Some(victim),
            first_after.as_millis(),
            acked.len()
        );
        times.push(first_after.as_millis() as u64);
    }
    times.sort_unstable();
    let pct = |p: usize| times[(times.len() * p / 100).min(times.len() - 1)];
    eprintln!(
        "failover over {runs} runs: p50 {} ms, p99 {} ms, max {} ms",
        pct(50),
        pct(99),
        times[times.len() - 1]
    );
}

/// CLUSTER.md: a primary stopped (SIGSTOP) for three detection times is replaced; when it
/// resumes, what was queued at it is not applied by it (its lease ended while it slept: refused,
/// or forwarded to the new primary once it knows of it), so no two epochs accept writes; no
/// acknowledged write is lost, and it rejoins as a replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_primary_refuses_writes_when_it_wakes_and_rejoins_as_a_replica() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let root = tempfile::tempdir().unwrap();
    let (nodes, cc) = three_with_table(root.path(), "paused", 1).await;
    // Writers that give up on a silent node after 300 ms (and then ask the map again).
    let opts = heapgrid::ClientOptions { request_timeout: Duration::from_millis(300), ..Default::default() };
    let quick =
        heapgrid::ClusterClient::connect(&[nodes[0].addr, nodes[1].addr, nodes[2].addr], opts).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (acked, tasks) = writers(&quick, "paused", 1, &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let victim = cc.map().placement(&("paused".to_string(), 0)).unwrap().primary;
    let old = nodes.iter().find(|n| n.id == victim).unwrap();
    let direct = Client::connect(old.addr).await.unwrap();
    // SAFETY: kill(2) of our own child's pid.
    unsafe { libc::kill(old.child.id() as i32, libc::SIGSTOP) };
    let paused_at = Instant::now();
    // Every thread stopped for sure (the signal is delivered asynchronously) before the write
    // is sent.
    let stopped = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten().all(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            stat.rsplit(')').next().unwrap_or("").trim_start().starts_with(['T', 't'])
        })
    };
    while !stopped(old.child.id()) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Sent while it sleeps: answered only after it wakes.
    let queued = tokio::spawn(async move { direct.table("paused").put("sent-while-paused", &1u64).await });
    tokio::time::sleep(Duration::from_millis(1800)).await;
    // SAFETY: as above.
    unsafe { libc::kill(old.child.id() as i32, libc::SIGCONT) };
    let woke_at = Instant::now();
    // Refused, or (once the woken node knows the new map) forwarded to the new primary, which
    // applies it: never applied by the old primary, whose lease ended while it slept.
    let forwarded = match queued.await.unwrap() {
        Err(GridError::NotPrimary { .. }) => false,
        Ok(_) => true,
        r => panic!("the woken primary answered a write queued while it slept: {r:?}"),
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let during = acked.iter().filter(|(_, _, sent, at)| *sent > paused_at && *at < woke_at).count();
    assert!(during > 0, "no write was acknowledged while the old primary slept");
    cc.refresh().await.unwrap();
    let placed = cc.map().placement(&("paused".to_string(), 0)).cloned().unwrap();
    assert_ne!(placed.primary, victim);
    assert!(placed.replicas.contains(&victim));
    let lost = lost(&cc, "paused", &acked).await;
    assert!(lost.is_empty(), "{} acknowledged writes lost", lost.len());
    let expect = forwarded.then_some(1u64);
    assert_eq!(cc.table("paused").get::<u64>("sent-while-paused").await.unwrap(), expect);
    // It catches up as a replica: the in-sync set takes it back.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let _ = cc.refresh().await;
        let p = cc.map().placement(&("paused".to_string(), 0)).cloned().unwrap();
        if p.in_sync.contains(&victim) {
            break;
        }
        assert!(Instant::now() < deadline, "the old primary never caught up: {p:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Each node's copy of shard 0 of `table`: (lsn, keys, digest).
async fn digests(nodes: &[&Node], table: &str) -> Vec<Option<(u64, u64, u32)>> {
    let mut out = Vec::new();
    for n in nodes {
        let d = match Client::connect(n.addr).await {
            Ok(c) => match c.cluster(ClusterOp::Digest { table: table.into(), shard: 0 }).await {
                Ok(ClusterResult::Digest(d)) => Some((d.pos.lsn, d.keys, d.digest)),
                _ => None,
            },
            Err(_) => None,
        };
        out.push(d);
    }
    out
}

/// Until every node's copy of shard 0 of `table` (a table, `feed:NAME`, `$locks`, `$queues`)
/// has the same position and digest (10 s at most).
async fn copies_agree(nodes: &[&Node], table: &str) {
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let d = digests(nodes, table).await;
        if d.iter().all(Option::is_some) && d.windows(2).all(|w| w[0] == w[1]) {
            return;
        }
        assert!(tokio::time::Instant::now() < until, "{table}: copies differ: {d:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Puts `count` new keys (`prefix` + i) through `cc`, 8 at a time.
async fn put_many(cc: &heapgrid::ClusterClient, table: &str, prefix: &str, count: u64) {
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (t, prefix) = (cc.table(table), prefix.to_string());
        tasks.push(tokio::spawn(async move {
            for i in (w..count).step_by(8) {
                t.put(format!("{prefix}{i}"), &i).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// CLUSTER.md: a replica that was down catches up, from the primary's retained log when it
/// missed little, from a snapshot when it missed more than the primary keeps
/// (`--repl-retain 2000`); afterwards every copy's digest is the same. Down for
/// `HEAPGRID_CATCHUP_SECS` each time (default 2; CLUSTER.md's 60 s: `scripts/cluster-catchup.sh`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_was_down_catches_up_from_the_log_or_a_snapshot() {
    use heapgrid::TableOptions;
    let down: u64 = std::env::var("HEAPGRID_CATCHUP_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let root = tempfile::tempdir().unwrap();
    let retain = ["--repl-retain", "2000"];
    let (mut nodes, cc) = cluster_of_three(root.path(), &retain).await;
    cc.create_table("catch", TableOptions { shards: 1, fsync: None }).await.unwrap();
    put_many(&cc, "catch", "a", 200).await;
    let p = cc.map().placement(&("catch".to_string(), 0)).cloned().unwrap();
    let replica = *p.replicas.last().unwrap();
    for (round, missed) in [("log", 500u64), ("snapshot", 5000)] {
        let at = nodes.iter().position(|n| n.id == replica).unwrap();
        let (id, dir, peer, addr) = nodes.remove(at).kill9();
        put_many(&cc, "catch", round, missed).await;
        tokio::time::sleep(Duration::from_secs(down)).await;
        nodes.push(start_on(&addr.to_string(), id, &dir, &peer, None, &retain));
        let refs: Vec<&Node> = nodes.iter().collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ds = digests(&refs, "catch").await;
            if ds.iter().all(|d| d.is_some() && *d == ds[0]) {
                let (lsn, keys, digest) = ds[0].unwrap();
                eprintln!(
                    "{round}: node {id} caught up: lsn {lsn}, {keys} keys, digest {digest:08x} on every node"
                );
                break;
            }
            assert!(Instant::now() < deadline, "{round}: the copies never converged: {ds:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// CLUSTER.md, `async`: the primary is killed with writes it acknowledged that its replicas do
/// not have (they were killed 200 ms before, and restart); the loss is reported (acknowledged
/// writes missing after the failover). The old
/// primary then returns with records no one else has: it truncates them (starting over from
/// the new primary's snapshot), and every copy ends equal, without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_async_a_returning_primary_drops_its_unreplicated_writes() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use heapgrid::TableOptions;
    let root = tempfile::tempdir().unwrap();
    let (mut nodes, cc) = cluster_of_three(root.path(), &["--sync", "0"]).await;
    cc.create_table("loose", TableOptions { shards: 1, fsync: None }).await.unwrap();
    assert_eq!(cc.map().table("loose").unwrap().sync, 0);
    put_many(&cc, "loose", "warm", 100).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (acked, tasks) = writers(&cc, "loose", 1, &stop);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let victim = cc.map().placement(&("loose".to_string(), 0)).unwrap().primary;
    // The replicas die (kill -9) while the primary keeps acknowledging under its lease; then it
    // dies too, and the replicas come back without those writes.
    let mut replicas = Vec::new();
    while let Some(at) = nodes.iter().position(|n| n.id != victim) {
        replicas.push(nodes.remove(at).kill9());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let old_primary = nodes.remove(0).kill9();
    for r in &replicas {
        nodes.push(restart(r));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let lost = lost(&cc, "loose", &acked).await;
    eprintln!("async: {} of {} acknowledged writes lost in the failover", lost.len(), acked.len());
    assert!(
        !lost.is_empty(),
        "the primary acknowledged nothing its replicas missed: the scenario did not happen"
    );
    // The old primary returns: its copy converges to the new primary's.
    nodes.push(restart(&old_primary));
    let refs: Vec<&Node> = nodes.iter().collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ds = digests(&refs, "loose").await;
        if ds.iter().all(|d| d.is_some() && *d == ds[0]) {
            break;
        }
        assert!(Instant::now() < deadline, "the copies never converged: {ds:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // What was lost stays lost everywhere (the returning node dropped it too).
    let t = cc.table("loose");
    for k in &lost {
        assert_eq!(t.get::<u64>(k.clone()).await.unwrap(), None, "{k} came back");
    }
}

/// `heapgrid cluster move`: a shard's primary moves to a node that held no copy, under `sync(1)`
/// writes: the node catches up, the leader switches once the old primary's lease ended, and
/// the old primary leaves the shard; no acknowledged write is lost and the copies are equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_move_switches_the_primary_without_losing_writes() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use heapgrid::{ClientOptions, ClusterClient, TableOptions};
    let root = tempfile::tempdir().unwrap();
    let (nodes, cc) = cluster_of_three(root.path(), &["--replicas", "1"]).await;
    let (n2, n3) = (&nodes[1], &nodes[2]);
    let seeds = [nodes[0].addr, n2.addr, n3.addr];
    cc.create_table("moving", TableOptions { shards: 1, fsync: None }).await.unwrap();
    let before = cc.map().placement(&("moving".to_string(), 0)).cloned().unwrap();
    assert_eq!((before.primary, before.replicas.clone()), (1, vec![2]));
    put_many(&cc, "moving", "before", 300).await;
    let opts = ClientOptions { request_timeout: Duration::from_millis(500), ..ClientOptions::default() };
    let quick = ClusterClient::connect(&seeds, opts).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (acked, tasks) = writers(&quick, "moving", 1, &stop);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Through node 2: the CLI finds the Raft leader itself.
    let out = Command::new(env!("CARGO_BIN_EXE_heapgrid"))
        .args(["cluster", "--addr", &n2.addr.to_string(), "move", "moving", "0", "3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    cc.refresh().await.unwrap();
    let after = cc.map().placement(&("moving".to_string(), 0)).cloned().unwrap();
    assert_eq!((after.primary, after.replicas.clone()), (3, vec![2]), "{after:?}");
    assert!(after.epoch > before.epoch);
    let acked = acked.lock().unwrap().clone();
    assert!(!acked.is_empty());
    let lost = lost(&cc, "moving", &acked).await;
    assert!(lost.is_empty(), "{} acknowledged writes lost", lost.len());
    // The new primary and the replica hold the same copy.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ds = digests(&[n3, n2], "moving").await;
        if ds[0].is_some() && ds[0] == ds[1] {
            break;
        }
        assert!(Instant::now() < deadline, "copies differ: {ds:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Moving it to where it is changes nothing.
    let c = Client::connect(n3.addr).await.unwrap();
    let again = ClusterOp::Move { table: "moving".into(), shard: 0, node: 3 };
    // Sent to a node that may not lead: either done (nothing to do) or a clear refusal.
    match c.cluster(again).await {
        Ok(ClusterResult::Changed { .. }) => {}
        Err(GridError::Invalid(m)) => assert!(m.contains("Raft leader"), "{m}"),
        r => panic!("unexpected {r:?}"),
    }
}

/// Any node of a (trusted) cluster forwards a single-key request for a shard another node
/// serves: a plain `Client` or the CLI connected to one node reads and writes every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_forwards_single_key_requests_to_their_primary() {
    use heapgrid::TableOptions;
    let root = tempfile::tempdir().unwrap();
    let (nodes, cc) = cluster_of_three(root.path(), &[]).await;
    cc.create_table("fwd", TableOptions { shards: 3, fsync: None }).await.unwrap();
    // Every shard serves before the plain client starts. A new table's replicas may still be
    // catching up (on a loaded machine, past the 2 s a write waits for them): such a write is
    // `Indeterminate` (applied by the primary), and putting it again is harmless.
    for i in 0..30 {
        let mut tries = 0;
        loop {
            match cc.table("fwd").put(format!("warm{i}"), &i).await {
                Ok(_) => break,
                Err(GridError::Indeterminate(m)) if tries < 10 => {
                    tries += 1;
                    eprintln!("warm-up put {i}: {m}; again");
                }
                Err(e) => panic!("warm-up put {i}: {e:?}"),
            }
        }
    }
    let plain = Client::connect(nodes[1].addr).await.unwrap();
    let t = plain.table("fwd");
    // A put answered `Indeterminate` was applied by the primary and not yet acknowledged by a
    // replica within its wait (a loaded 2-core machine running three nodes): the primary's
    // reads see it, which is what this test checks.
    let applied = |r: Result<u64, GridError>, what: &str| match r {
        Ok(_) => {}
        Err(GridError::Indeterminate(m)) => eprintln!("{what}: {m}"),
        Err(e) => panic!("{what}: {e:?}"),
    };
    for i in 0..60u64 {
        applied(t.put(format!("k{i}"), &i).await, "put");
    }
    for i in 0..60u64 {
        assert_eq!(t.get::<u64>(format!("k{i}")).await.unwrap(), Some(i));
    }
    // Pipelined on one connection: a read sent right after a write of the same key sees it,
    // whichever node serves the key.
    for i in 0..60u64 {
        let k = format!("p{i}");
        let (w, r) = tokio::join!(t.put(k.clone(), &i), t.get::<u64>(k.clone()));
        applied(w, "pipelined put");
        assert_eq!(r.unwrap(), Some(i), "{k}");
    }
    // A request without a key (a one-shard table's snippet) is run at shard 0's primary too.
    cc.create_table("one", TableOptions { shards: 1, fsync: None }).await.unwrap();
    cc.table("one").put("warm", &0).await.unwrap();
    let one_primary = cc.map().placement(&("one".to_string(), 0)).unwrap().primary;
    let away = nodes.iter().find(|n| n.id != one_primary).unwrap();
    let v =
        Client::connect(away.addr).await.unwrap().table("one").eval("one['x'] = 7\none['x']").await.unwrap();
    assert_eq!(v, heapgrid::Value::Int(7));
    // The keys are spread: node 2 is the primary of only one shard of three.
    let map = cc.map();
    let here = (0..3).filter(|&s| map.placement(&("fwd".to_string(), s)).unwrap().primary == 2).count();
    assert_eq!(here, 1);
    // The CLI at node 3, for a key whose primary is another node.
    let elsewhere = (0..60u64)
        .find(|i| {
            let shard = heapgrid::Key::from(format!("k{i}").as_str()).shard(3);
            map.placement(&("fwd".to_string(), shard)).unwrap().primary != 3
        })
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_heapgrid"))
        .args(["eval", "--addr", &nodes[2].addr.to_string(), "get", "fwd", &format!("k{elsewhere}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), elsewhere.to_string());
}

/// Issue 15: a grid-scoped snippet sent to any node reads and writes every shard, each
/// operation at its shard's primary, and a multi-shard commit holds all or nothing across
/// nodes (concurrent transfers from every node keep the total); counts and scans from any node
/// see every shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grid_scoped_snippets_counts_and_scans_span_every_node() {
    use heapgrid::{TableOptions, Value};
    let root = tempfile::tempdir().unwrap();
    let (nodes, cc) = cluster_of_three(root.path(), &[]).await;
    cc.create_table("acct", TableOptions { shards: 3, fsync: None }).await.unwrap();
    for i in 0..30 {
        cc.table("acct").put(format!("warm{i}"), &i).await.unwrap();
    }
    // One primary per node: every node is the primary of one shard and not of two.
    let map = cc.map();
    let mut primaries: Vec<u64> =
        (0..3).map(|s| map.placement(&("acct".to_string(), s)).unwrap().primary).collect();
    primaries.sort();
    assert_eq!(primaries, vec![1, 2, 3]);
    let plain: Vec<Client> = {
        let mut v = Vec::new();
        for n in &nodes {
            v.push(Client::connect(n.addr).await.unwrap());
        }
        v
    };
    // Written from node 2, across all three shards.
    plain[1].eval("for i in range(30):\n    acct[f'a{i}'] = 100\nlen([1 for i in range(30) if acct[f'a{i}'] == 100])")
        .await
        .map(|v| assert_eq!(v, Value::Int(30)))
        .unwrap();
    for c in &plain {
        assert_eq!(c.table("acct").count().await.unwrap(), 60, "count from every node");
        let accts = c.table("acct").prefix("a", 100, false).await.unwrap();
        assert_eq!(accts.len(), 30);
        assert!(accts.iter().all(|(_, v)| *v == Value::Int(100)));
    }
    assert_eq!(cc.table("acct").count().await.unwrap(), 60, "a ClusterClient counts through any node");
    // Transfers between accounts of different shards, from every node at once.
    let transfer = "a = f'a{args[0]}'\nb = f'a{args[1]}'\nacct[a] = acct[a] - 1\nacct[b] = acct[b] + 1";
    let mut tasks = Vec::new();
    for (n, c) in plain.iter().enumerate() {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20i64 {
                let (a, b) = ((i * 7 + n as i64) % 30, (i * 11 + 3 * n as i64 + 1) % 30);
                if a == b {
                    continue;
                }
                let args = Value::List(vec![Value::Int(a), Value::Int(b)]);
                c.eval_with(transfer, args, Default::default()).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = "sum([acct[f'a{i}'] for i in range(30)])";
    for c in &plain {
        assert_eq!(c.eval(total).await.unwrap(), Value::Int(3000), "the total is kept, read from every node");
    }
    let moved = plain[2].eval("len([1 for i in range(30) if acct[f'a{i}'] != 100])").await.unwrap();
    assert!(moved != Value::Int(0), "the transfers changed balances");
    // `cluster status` on any node shows every copy's position (each node's detector hears
    // every report): once the writes stop, every replica holds its primary's last record.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let Ok(ClusterResult::Status(s)) = plain[0].cluster(ClusterOp::Status).await else {
            panic!("no status")
        };
        let caught_up = (0..3).all(|shard| {
            let p = s.map.placement(&("acct".to_string(), shard)).unwrap();
            let lsn = |n: u64| {
                s.copies
                    .iter()
                    .find(|c| c.table == "acct" && c.shard == shard && c.node == n)
                    .map(|c| c.pos.lsn)
            };
            lsn(p.primary).is_some_and(|l| l > 0) && p.replicas.iter().all(|&r| lsn(r) == lsn(p.primary))
        });
        if caught_up {
            break;
        }
        assert!(Instant::now() < deadline, "copies: {:?}", s.copies);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// With tokens, the node a client reached checks its permissions and runs its requests at the
/// primaries elsewhere: a reader on any node reads, counts and runs read-only snippets over
/// every shard, and its writes are refused there, before anything is sent on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_a_node_checks_permissions_then_runs_requests_at_other_primaries() {
    use heapgrid::{ClientOptions, TableOptions, Value};
    let root = tempfile::tempdir().unwrap();
    let cfg = root.path().join("tokens.json");
    let tokens = serde_json::json!({"tokens": [
        {"token": "root", "permissions": {"*": ["admin"]}},
        {"token": "reader", "permissions": {"acct": ["read", "eval"]}},
    ]});
    std::fs::write(&cfg, tokens.to_string()).unwrap();
    let flags = ["--config", cfg.to_str().unwrap()];
    let d = |i: u64| root.path().join(format!("n{i}"));
    let n1 = start_with(1, &d(1), "127.0.0.1:0", None, &flags);
    let n2 = start_with(2, &d(2), "127.0.0.1:0", Some(&n1.peer), &flags);
    let n3 = start_with(3, &d(3), "127.0.0.1:0", Some(&n1.peer), &flags);
    let as_ = |addr: SocketAddr, token: &str| {
        let opts = ClientOptions { token: Some(token.into()), ..ClientOptions::default() };
        Client::connect_with(addr, opts)
    };
    let admin = as_(n1.addr, "root").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(ClusterResult::Status(s)) = admin.cluster(ClusterOp::Status).await
            && s.voters.len() == 3
            && s.map.members().count() == 3
        {
            break;
        }
        assert!(Instant::now() < deadline, "three nodes did not agree");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    admin.create_table("acct", TableOptions { shards: 3, fsync: None }).await.unwrap();
    // Written through node 2 (two of three shards elsewhere). Right after the create, node 2
    // may not have applied the new placements yet: it answers `NotPrimary` naming no primary
    // (retryable) until it has.
    let writer = as_(n2.addr, "root").await.unwrap();
    for i in 0..30i64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match writer.table("acct").put(format!("k{i}"), &i).await {
                Ok(_) => break,
                Err(GridError::NotPrimary { primary: None, .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("put k{i}: {e:?}"),
            }
        }
    }
    let reader = as_(n3.addr, "reader").await.unwrap();
    let t = reader.table("acct");
    for i in 0..30i64 {
        assert_eq!(t.get::<i64>(format!("k{i}")).await.unwrap(), Some(i));
    }
    assert_eq!(t.count().await.unwrap(), 30);
    assert_eq!(reader.eval("sum([acct[f'k{i}'] for i in range(30)])").await.unwrap(), Value::Int(435));
    // Refused where the reader connected, for keys of every shard.
    for i in 0..3 {
        let e = t.put(format!("k{i}"), &0).await.unwrap_err();
        assert!(matches!(e, GridError::PermissionDenied { .. }), "{e:?}");
    }
    let e = reader.eval("acct['k1'] = 0").await.unwrap_err();
    assert!(matches!(e, GridError::PermissionDenied { .. }), "{e:?}");
    assert_eq!(writer.table("acct").get::<i64>("k1").await.unwrap(), Some(1), "nothing was written");
    drop((n1, n2, n3));
}

/// `cluster remove` of a dead node: its primaries were failed over, and each shard it was the
/// only replica of gets a new replica, which catches up before the dead node leaves the shard;
/// then it leaves the map. Writes to those shards, which waited on the dead replica under
/// `sync(1)`, complete again, nothing acknowledged is lost, and the copies are equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_dead_node_re_replicates_its_shards() {
    use heapgrid::TableOptions;
    let root = tempfile::tempdir().unwrap();
    let (mut nodes, cc) = cluster_of_three(root.path(), &["--replicas", "1"]).await;
    cc.create_table("rm", TableOptions { shards: 3, fsync: None }).await.unwrap();
    let t = cc.table("rm");
    for i in 0..300u64 {
        t.put(format!("k{i}"), &i).await.unwrap();
    }
    let held = |m: &heapgrid_actors::cluster::map::ClusterMap, n: u64| {
        (0..3)
            .filter(|&s| {
                m.placement(&("rm".to_string(), s)).is_some_and(|p| p.primary == n || p.replicas.contains(&n))
            })
            .count()
    };
    assert_eq!(held(&cc.map(), 3), 2, "node 3 is a primary of one shard and the replica of another");
    let _ = nodes.remove(2).kill9();
    let (n1, n2) = (&nodes[0], &nodes[1]);
    // Through the Raft leader (a dead primary may still need a switch).
    let s = until("a leader", &[n1, n2], 30, |s| s[0].leader.is_some_and(|l| l != 3)).await;
    let leader = s[0].leader.unwrap();
    let at = if leader == 1 { n1 } else { n2 };
    let out = Command::new(env!("CARGO_BIN_EXE_heapgrid"))
        .args(["cluster", "--addr", &at.addr.to_string(), "remove", "3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = until("node 3 gone", &[n1, n2], 30, |s| agree(s, 2) && s[0].map.member(3).is_none()).await;
    let map = &s[0].map;
    for shard in 0..3 {
        let p = map.placement(&("rm".to_string(), shard)).unwrap();
        let mut copies = p.replicas.clone();
        copies.push(p.primary);
        copies.sort();
        assert_eq!(copies, vec![1, 2], "shard {shard}: {p:?}");
        assert_eq!(p.in_sync.len(), 1, "shard {shard}: {p:?}");
    }
    // Every shard takes sync(1) writes again, and nothing acknowledged was lost.
    cc.refresh().await.unwrap();
    for i in 300..400u64 {
        t.put(format!("k{i}"), &i).await.unwrap();
    }
    for i in 0..400u64 {
        assert_eq!(t.get::<u64>(format!("k{i}")).await.unwrap(), Some(i), "k{i}");
    }
    // Both copies of every shard are the same.
    let deadline = Instant::now() + Duration::from_secs(20);
    for shard in 0..3 {
        loop {
            let mut ds = Vec::new();
            for n in [n1, n2] {
                let c = Client::connect(n.addr).await.unwrap();
                match c.cluster(ClusterOp::Digest { table: "rm".into(), shard }).await.unwrap() {
                    ClusterResult::Digest(d) => ds.push((d.keys, d.digest)),
                    r => panic!("unexpected {r:?}"),
                }
            }
            if ds[0] == ds[1] {
                break;
            }
            assert!(Instant::now() < deadline, "shard {shard}: {ds:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The lock and queue services are placed on one node of the cluster (their primary): every
/// client reaches the same locks and queues through it; another node refuses them with
/// `NotPrimary` naming that node (a grid-scoped snippet there that uses a queue too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_serves_the_cluster_s_locks_and_queues() {
    let root = tempfile::tempdir().unwrap();
    let (nodes, cc) = cluster_of_three(root.path(), &[]).await;
    let locks = cc.locks().await.unwrap();
    let map = cc.map();
    let home = map.placement(&("$locks".to_string(), 0)).unwrap().primary;
    let home_addr = nodes.iter().find(|n| n.id == home).unwrap().addr;
    let mine = locks.session(None).await.unwrap();
    let _held = mine.lock("job").try_acquire().await.unwrap().expect("a free lock");
    let theirs = cc.locks().await.unwrap().session(None).await.unwrap();
    assert!(theirs.lock("job").try_acquire().await.unwrap().is_none(), "one lock service: held");
    let away = nodes.iter().find(|n| n.id != home).unwrap();
    let c = Client::connect(away.addr).await.unwrap();
    match c.session(None).await {
        Err(GridError::NotPrimary { primary, addr, .. }) => {
            assert_eq!(primary, Some(home));
            assert_eq!(addr, Some(home_addr.to_string()));
        }
        r => panic!("a lock session on node {}: {r:?}", away.id),
    }
    // Queues: one node serves them too.
    let q_home = map.placement(&("$queues".to_string(), 0)).unwrap().primary;
    cc.queues().await.unwrap().queue("jobs").push(&1).await.unwrap();
    assert_eq!(cc.queues().await.unwrap().queue("jobs").len().await.unwrap().ready, 1);
    let q_away = nodes.iter().find(|n| n.id != q_home).unwrap();
    let c = Client::connect(q_away.addr).await.unwrap();
    let e = c.queue("jobs").push(&2).await.unwrap_err();
    assert!(matches!(e, GridError::NotPrimary { primary: Some(p), .. } if p == q_home), "{e:?}");
    let e = c.eval("q = queue('jobs')\nq.len()").await.unwrap_err();
    assert!(matches!(e, GridError::NotPrimary { primary: Some(p), .. } if p == q_home), "{e:?}");
}

/// Until every service has its replicas in sync (the leader adds them as members join).
async fn services_replicated(cc: &heapgrid::ClusterClient, replicas: usize) {
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let _ = cc.refresh().await;
        let map = cc.map();
        let ok = ["$locks", "$queues"]
            .iter()
            .all(|s| map.placement(&(s.to_string(), 0)).is_some_and(|p| p.in_sync.len() == replicas));
        if ok {
            return;
        }
        assert!(tokio::time::Instant::now() < until, "services not replicated: {map:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The lock and queue services are replicated: `kill -9` of the node serving them, and a
/// replica takes over with their state. A lock held stays held (by its recorded session, for
/// one ttl from the takeover; its holder can reattach); the next grant's fence is above every
/// earlier one and above the new epoch's floor; a queue's items are all there, the one in
/// flight ready again with its delivery counted, and its old receipt stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_and_queue_services_fail_over_with_their_state() {
    let root = tempfile::tempdir().unwrap();
    let (mut nodes, cc) = cluster_of_three(root.path(), &[]).await;
    services_replicated(&cc, 2).await;
    let map = cc.map();
    let home = map.placement(&("$locks".to_string(), 0)).unwrap().primary;
    let locks = cc.locks().await.unwrap();
    let mine = locks.session(Some(Duration::from_secs(2))).await.unwrap();
    let held = mine.lock("job").try_acquire().await.unwrap().expect("a free lock");
    let first_fence = held.fence();
    let (id, secret) = (mine.id(), mine.secret());
    let queues = cc.queues().await.unwrap();
    let q = queues.queue("jobs");
    for i in 1..=3u64 {
        q.push(&i).await.unwrap();
    }
    let receipt = q.pop(Duration::ZERO).await.unwrap().expect("an item").receipt;
    std::mem::forget(held);
    mine.abandon();
    // The services' node dies (the queues' too, if elsewhere: the same node at formation).
    let q_home = map.placement(&("$queues".to_string(), 0)).unwrap().primary;
    let i = nodes.iter().position(|n| n.id == home).unwrap();
    let _gone = nodes.remove(i).kill9();
    if q_home != home {
        let i = nodes.iter().position(|n| n.id == q_home).unwrap();
        let _gone_too = nodes.remove(i).kill9();
    }
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    let (locks, queues) = loop {
        let _ = cc.refresh().await;
        let m = cc.map();
        let moved =
            ["$locks", "$queues"].iter().all(|s| m.placement(&(s.to_string(), 0)).unwrap().primary != home);
        if moved && let (Ok(l), Ok(q)) = (cc.locks().await, cc.queues().await) {
            // Served once the new primary holds its lease.
            if l.session(None).await.is_ok() && q.queue("jobs").len().await.is_ok() {
                break (l, q);
            }
        }
        assert!(tokio::time::Instant::now() < until, "the services did not fail over: {m:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The lock is still held by the recorded session, which can reattach.
    let theirs = locks.session(None).await.unwrap();
    assert!(
        theirs.lock("job").try_acquire().await.unwrap().is_none(),
        "a held lock was freed by the failover"
    );
    let back = locks.reattach(id, secret).await.unwrap();
    back.close().await.unwrap();
    let next =
        theirs.lock("job").acquire(Duration::from_secs(10)).await.unwrap().expect("freed by the close");
    assert!(next.fence() > first_fence, "fence {} after {first_fence}", next.fence());
    let epoch = cc.map().placement(&("$locks".to_string(), 0)).unwrap().epoch;
    eprintln!("fences {first_fence} then {} (epoch {epoch}); the services left node {home}", next.fence());
    assert!(next.fence() > epoch << 40, "fence {} below epoch {epoch}'s floor", next.fence());
    // Every item is there; the one in flight is ready again, counted, and its receipt stale.
    let q = queues.queue("jobs");
    assert_eq!(q.len().await.unwrap().ready, 3);
    let e = q.ack(receipt).await.unwrap_err();
    assert!(matches!(e, GridError::StaleReceipt { .. }), "{e:?}");
    let again = q.pop_with(heapgrid::queue::Pop { n: 3, ..Default::default() }).await.unwrap();
    assert_eq!(again.len(), 3);
    assert_eq!(
        again.iter().map(|d| d.deliveries).max(),
        Some(2),
        "the delivery before the failover was not counted"
    );
    // The two copies left of each service are equal.
    let live: Vec<&Node> = nodes.iter().collect();
    for svc in ["$locks", "$queues"] {
        copies_agree(&live, svc).await;
    }
}

/// `read_from = replica`: a client that allows it is answered by an in-sync replica's own
/// copy, which under `sync(1)` holds every acknowledged write; so with the shard's primary
/// stopped (and not yet replaced), such reads are answered at once, while reads from the
/// primary wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_reads_are_answered_by_an_in_sync_copy() {
    use heapgrid::{ClientOptions, ReadFrom, TableOptions};
    let root = tempfile::tempdir().unwrap();
    let (nodes, cc) = cluster_of_three(root.path(), &[]).await;
    cc.create_table("rr", TableOptions { shards: 1, fsync: None }).await.unwrap();
    for i in 0..50u64 {
        cc.table("rr").put(format!("k{i}"), &i).await.unwrap();
    }
    let p = cc.map().placement(&("rr".to_string(), 0)).cloned().unwrap();
    assert_eq!(p.in_sync.len(), 2, "{p:?}");
    let primary = nodes.iter().find(|n| n.id == p.primary).unwrap();
    let replica = nodes.iter().find(|n| n.id == p.in_sync[0]).unwrap();
    let quick = |read_from| ClientOptions {
        request_timeout: Duration::from_millis(300),
        connect_attempts: 1,
        read_from,
        ..ClientOptions::default()
    };
    let copy_reader = Client::connect_with(replica.addr, quick(ReadFrom::Replica)).await.unwrap();
    let primary_reader = Client::connect_with(replica.addr, quick(ReadFrom::Primary)).await.unwrap();
    unsafe { libc::kill(primary.child.id() as i32, libc::SIGSTOP) };
    let started = Instant::now();
    let mut served = 0;
    for i in 0..50u64 {
        if started.elapsed() > Duration::from_millis(250) {
            break;
        }
        assert_eq!(copy_reader.table("rr").get::<u64>(format!("k{i}")).await.unwrap(), Some(i));
        served += 1;
    }
    let from_primary = primary_reader.table("rr").get::<u64>("k0").await;
    unsafe { libc::kill(primary.child.id() as i32, libc::SIGCONT) };
    assert!(served >= 10, "only {served} replica reads in 250 ms");
    assert!(from_primary.is_err(), "a read from the stopped primary was answered: {from_primary:?}");
    // A ClusterClient spreads them over the copies, and sees every write.
    let opts = ClientOptions { read_from: ReadFrom::Replica, ..ClientOptions::default() };
    let spread = heapgrid::ClusterClient::connect(&[nodes[0].addr], opts).await.unwrap();
    for i in 0..50u64 {
        // The primary was stopped a moment ago: under the whole suite's load on 2 cores it may
        // take a while to answer again (`Unavailable`), so each read is retried briefly.
        let mut tries = 0;
        let got = loop {
            match spread.table("rr").get::<u64>(format!("k{i}")).await {
                Err(GridError::Unavailable(m)) if tries < 20 => {
                    tries += 1;
                    eprintln!("read k{i}: {m}; again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                r => break r.unwrap(),
            }
        };
        assert_eq!(got, Some(i));
    }
}

/// Three nodes, each behind a `TcpRelay` it advertises as its peer address (`relay.rs`), in
/// agreement; `flags` go to every node.
async fn relayed_three(root: &Path, flags: &[&str]) -> (Vec<Node>, Vec<crate::relay::TcpRelay>) {
    let (mut nodes, mut relays) = (Vec::new(), Vec::new());
    for id in 1..=3u64 {
        let real = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let relay = crate::relay::TcpRelay::start(real).await;
        let join = (id > 1).then(|| nodes.first().map(|n: &Node| n.peer.clone())).flatten();
        let advertise = relay.addr.to_string();
        let mut all = vec!["--advertise-peer", advertise.as_str()];
        all.extend_from_slice(flags);
        let dir = root.join(format!("n{id}"));
        nodes.push(start_with(id, &dir, &real.to_string(), join.as_deref(), &all));
        relays.push(relay);
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    until("three nodes agree", &refs, 30, |s| agree(s, 3)).await;
    (nodes, relays)
}

/// Acknowledged writes through `client` of keys `prefix` + i, until `stop`: (key, value, sent,
/// acknowledged). A write that failed or timed out is not counted (it may or may not apply).
fn write_loop(
    client: Client,
    table: &'static str,
    prefix: &'static str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(String, u64, Instant, Instant)>> {
    tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut i = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let key = format!("{prefix}{i}");
            let sent = Instant::now();
            match client.table(table).put(key.clone(), &i).await {
                Ok(_) => acked.push((key, i, sent, Instant::now())),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
            i += 1;
        }
        acked
    })
}

/// CLUSTER.md with a real partition rather than a pause: relays (`relay.rs`) cut the primary
/// of a one-shard table off from the other two nodes in both directions for 3 s, while it
/// keeps running. It stops acknowledging writes sent to it before the new primary
/// acknowledges its first (no two epochs accept writes at once): under `sync(1)` at once (no
/// replica acks), under `async` when its lease runs out. After the partition heals it rejoins
/// as a replica and every copy is equal; under `sync(1)` no acknowledged write is lost, under
/// `async` only writes the cut-off primary acknowledged during the partition are (reported).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_primary_stops_before_its_successor_starts_and_rejoins() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use heapgrid::{ClientOptions, TableOptions};
    for sync in ["1", "0"] {
        let root = tempfile::tempdir().unwrap();
        let (nodes, relays) = relayed_three(root.path(), &["--sync", sync]).await;
        let refs: Vec<&Node> = nodes.iter().collect();
        let quick = ClientOptions { request_timeout: Duration::from_millis(300), ..ClientOptions::default() };
        let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
        let cc = heapgrid::ClusterClient::connect(&addrs, quick.clone()).await.unwrap();
        cc.create_table("part", TableOptions { shards: 1, fsync: None }).await.unwrap();
        // Warm-up under the 300 ms request timeout: on a loaded machine (the whole suite runs
        // at once on 2 cores) a first put can miss it; it is retried, as the other warm-ups are.
        for i in 0..10 {
            let mut tries = 0;
            loop {
                match cc.table("part").put(format!("warm{i}"), &i).await {
                    Ok(_) => break,
                    Err(GridError::Unavailable(m) | GridError::Indeterminate(m)) if tries < 20 => {
                        tries += 1;
                        eprintln!("warm-up put {i}: {m}; again");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => panic!("warm-up put {i}: {e:?}"),
                }
            }
        }
        let victim = cc.map().placement(&("part".to_string(), 0)).unwrap().primary;
        let at = |id: u64| nodes.iter().find(|n| n.id == id).unwrap();
        let other = if victim == 1 { 2 } else { 1 };
        let stop = Arc::new(AtomicBool::new(false));
        // Writes sent to the old primary itself, and through another node (which runs them at
        // whichever primary its map names).
        let old_side = write_loop(
            Client::connect_with(at(victim).addr, quick.clone()).await.unwrap(),
            "part",
            "old",
            stop.clone(),
        );
        let new_side = write_loop(
            Client::connect_with(at(other).addr, quick.clone()).await.unwrap(),
            "part",
            "new",
            stop.clone(),
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        for (n, r) in nodes.iter().zip(&relays) {
            if n.id == victim { r.block(None) } else { r.block(Some(&[victim])) }
        }
        let cut_at = Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        for r in &relays {
            r.heal();
        }
        let healed_at = Instant::now();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stop.store(true, Ordering::Relaxed);
        let old_acks = old_side.await.unwrap();
        let new_acks = new_side.await.unwrap();
        // The old primary's last acknowledgement while cut off came before the first
        // acknowledgement of a write the other side sent after the cut.
        let last_old =
            old_acks.iter().filter(|(_, _, _, a)| *a > cut_at && *a < healed_at).map(|(_, _, _, a)| *a).max();
        let first_new = new_acks
            .iter()
            .filter(|(_, _, s, a)| *s > cut_at && *a < healed_at)
            .map(|(_, _, _, a)| *a)
            .min()
            .expect("the other side acknowledged nothing during the partition: no failover");
        eprintln!(
            "partition, sync({sync}): the cut-off primary's last ack {:?} ms after the cut, its successor's first {} ms",
            last_old.map(|a| a.duration_since(cut_at).as_millis()),
            first_new.duration_since(cut_at).as_millis()
        );
        if sync == "0" {
            assert!(
                last_old.is_some(),
                "under async the cut-off primary acked nothing: its lease was not what stopped it"
            );
        }
        if sync == "1" {
            // Under sync(1) it acknowledges nothing sent after the cut (no replica can ack it).
            let sent_after = old_acks.iter().filter(|(_, _, s, a)| *s > cut_at && *a < healed_at).count();
            assert_eq!(sent_after, 0, "the cut-off primary acknowledged writes sent after the cut");
        }
        if let Some(last_old) = last_old {
            assert!(
                last_old < first_new,
                "the cut-off primary acked {} ms after the cut, its successor first acked at {} ms",
                last_old.duration_since(cut_at).as_millis(),
                first_new.duration_since(cut_at).as_millis()
            );
        }
        cc.refresh().await.unwrap();
        let p = cc.map().placement(&("part".to_string(), 0)).cloned().unwrap();
        assert!(p.primary != victim && p.epoch > 1, "{p:?}");
        // Under async, what the cut-off primary acked during the partition never reached the
        // others: lost (reported), as docs/cluster.md says of `async`; so may what it acked
        // just before the cut and had not shipped yet (async answers before shipping: a CI
        // run lost one acked 0 ms before the cut). `ASYNC_SHIP_MARGIN` covers those.
        const ASYNC_SHIP_MARGIN: Duration = Duration::from_millis(300);
        let at_risk_from = cut_at.checked_sub(ASYNC_SHIP_MARGIN).unwrap_or(cut_at);
        let (cut_off, mut acked): (Vec<_>, Vec<_>) =
            old_acks.into_iter().partition(|(_, _, _, a)| sync == "0" && *a > at_risk_from && *a < healed_at);
        acked.extend(new_acks);
        let lost = lost(&cc, "part", &acked).await;
        assert!(
            lost.is_empty(),
            "{} acknowledged writes lost, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
        if !cut_off.is_empty() {
            let gone = self::lost(&cc, "part", &cut_off).await.len();
            eprintln!(
                "partition, async: {gone} of the {} writes the cut-off primary acked are lost",
                cut_off.len()
            );
        }
        // It rejoins as an in-sync replica, and every copy is the same.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let _ = cc.refresh().await;
            let in_sync =
                cc.map().placement(&("part".to_string(), 0)).is_some_and(|p| p.in_sync.contains(&victim));
            let d = digests(&refs, "part").await;
            if in_sync && d.iter().all(|x| x.is_some() && x.map(|x| (x.1, x.2)) == d[0].map(|x| (x.1, x.2))) {
                break;
            }
            assert!(Instant::now() < deadline, "not equal after the partition healed: {d:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A one-way partition: nothing reaches the primary of a shard (its relay drops every
/// connection to it), while what it sends still arrives. Its reports reach the Raft leader, but
/// its leases and its replicas' acks do not: it stops serving, and the leader, which still
/// hears it, replaces it once it has reported without a lease for the detection time (and its
/// last lease has ended). Writes through another node then succeed; nothing acknowledged is
/// lost; after the heal every copy is equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cut_off_one_way_is_replaced() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use heapgrid::{ClientOptions, TableOptions};
    let root = tempfile::tempdir().unwrap();
    let (nodes, relays) = relayed_three(root.path(), &[]).await;
    let refs: Vec<&Node> = nodes.iter().collect();
    let s = until("a leader", &refs, 30, |s| agree(s, 3)).await;
    let leader = s[0].leader.unwrap();
    let quick = ClientOptions { request_timeout: Duration::from_millis(300), ..ClientOptions::default() };
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let cc = heapgrid::ClusterClient::connect(&addrs, quick.clone()).await.unwrap();
    cc.create_table("oneway", TableOptions { shards: 3, fsync: None }).await.unwrap();
    for i in 0..30 {
        cc.table("oneway").put(format!("warm{i}"), &i).await.unwrap();
    }
    // A shard whose primary is not the Raft leader (the leader keeps hearing it).
    let map = cc.map();
    let (shard, victim) = (0..3)
        .map(|s| (s, map.placement(&("oneway".to_string(), s)).unwrap().primary))
        .find(|&(_, p)| p != leader)
        .unwrap();
    let through = nodes.iter().find(|n| n.id != victim).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writes = write_loop(
        Client::connect_with(through.addr, quick.clone()).await.unwrap(),
        "oneway",
        "w",
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (i, _) = nodes.iter().enumerate().find(|(_, n)| n.id == victim).unwrap();
    relays[i].block(None);
    let cut_at = Instant::now();
    let deadline = cut_at + Duration::from_secs(15);
    loop {
        let _ = cc.refresh().await;
        let p = cc.map().placement(&("oneway".to_string(), shard)).cloned().unwrap();
        if p.primary != victim {
            eprintln!(
                "one-way cut: shard {shard}'s primary replaced after {} ms",
                cut_at.elapsed().as_millis()
            );
            break;
        }
        assert!(Instant::now() < deadline, "a primary cut off one way was never replaced: {p:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    relays[i].heal();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let acked = writes.await.unwrap();
    let on_shard = |k: &str| heapgrid::Key::from(k).shard(3) == shard;
    assert!(
        acked.iter().any(|(k, _, sent, _)| on_shard(k) && *sent > cut_at),
        "no write to the cut-off shard was acknowledged after its failover"
    );
    let lost = lost(&cc, "oneway", &acked).await;
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}

/// A feed created in a cluster is placed in the map (`feed:NAME`) and replicated: every
/// member starts it, its primary serves it (another node answers `NotPrimary` naming it), and
/// after `kill -9` of the primary an in-sync replica serves every acknowledged record, with
/// new ids above them; the copies left are equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_is_replicated_and_fails_over_with_its_records() {
    let root = tempfile::tempdir().unwrap();
    let (mut nodes, cc) = cluster_of_three(root.path(), &[]).await;
    // Created through a node that need not be its primary.
    let creator = Client::connect(nodes[2].addr).await.unwrap();
    creator.create_feed("events", heapgrid::FeedOptions::default()).await.unwrap();
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    let c = loop {
        let c = cc.feed_node("events").await.unwrap();
        // Served once its primary holds a lease and its replicas are in sync.
        let _ = cc.refresh().await;
        let in_sync =
            cc.map().placement(&("feed:events".to_string(), 0)).is_some_and(|p| !p.in_sync.is_empty());
        if in_sync && c.feed("events").len().await.is_ok() {
            break c;
        }
        assert!(tokio::time::Instant::now() < until, "the feed was not served: {:?}", cc.map());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let f = c.feed("events");
    let mut acked = Vec::new();
    for i in 0..200u64 {
        acked.push(f.append(i as i64).await.unwrap());
    }
    let map = cc.map();
    let primary = map.placement(&("feed:events".to_string(), 0)).unwrap().primary;
    let away = nodes.iter().find(|n| n.id != primary).unwrap();
    let e = Client::connect(away.addr).await.unwrap().feed("events").append(1000i64).await.unwrap_err();
    assert!(matches!(e, GridError::NotPrimary { primary: Some(p), .. } if p == primary), "{e:?}");
    let i = nodes.iter().position(|n| n.id == primary).unwrap();
    let _gone = nodes.remove(i).kill9();
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    let f = loop {
        if let Ok(c) = cc.feed_node("events").await
            && c.feed("events").len().await.is_ok()
        {
            break c.feed("events");
        }
        assert!(tokio::time::Instant::now() < until, "the feed did not fail over: {:?}", cc.map());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let read = f.read(heapgrid::Pos::Start, 1000).await.unwrap().records;
    let ids: Vec<u64> = read.iter().map(|r| r.id).collect();
    assert_eq!(ids, acked, "acknowledged records lost or reordered in the failover");
    let next = f.append(200i64).await.unwrap();
    assert!(next > *acked.last().unwrap(), "id {next} reused after the failover");
    let live: Vec<&Node> = nodes.iter().collect();
    copies_agree(&live, "feed:events").await;
}

/// Fenced writes are checked on every node, not only where the locks are served: each node
/// keeps a mirror of the lock service's fences, and a grant is answered only once every
/// node's mirror holds it (or has stopped answering). A write fenced with a released grant is
/// refused on every shard once the next grant was answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_writes_are_checked_on_every_node() {
    use heapgrid::lock::Fenced;
    let root = tempfile::tempdir().unwrap();
    let (_nodes, cc) = three_with_table(root.path(), "acct", 3).await;
    let t = cc.table("acct");
    let locks = cc.locks().await.unwrap();
    let a = locks.session(None).await.unwrap();
    let b = locks.session(None).await.unwrap();
    let g1 = a.lock("L").try_acquire().await.unwrap().expect("free");
    let f1 = g1.fence();
    let keys: Vec<String> = (0..30).map(|i| format!("k{i}")).collect();
    // Every node's mirror is current within a few of its asks.
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    for k in &keys {
        loop {
            match Fenced::with(&t, &[("L", f1)]).put(k.as_str(), &1).await {
                Ok(_) => break,
                Err(e) => {
                    assert!(tokio::time::Instant::now() < until, "fenced put of {k} with a held grant: {e:?}")
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The shards of these keys have their primaries on every node.
    let map = cc.map();
    let primaries: std::collections::BTreeSet<u64> =
        (0..3).map(|s| map.placement(&("acct".to_string(), s)).unwrap().primary).collect();
    assert_eq!(primaries.len(), 3, "{map:?}");
    g1.release().await.unwrap();
    let g2 = b.lock("L").try_acquire().await.unwrap().expect("released");
    assert!(g2.fence() > f1);
    for k in &keys {
        let e = Fenced::with(&t, &[("L", f1)]).put(k.as_str(), &2).await.unwrap_err();
        assert!(matches!(e, GridError::StaleFence { .. }), "{k}: a released grant's write: {e:?}");
        Fenced::with(&t, &[("L", g2.fence())]).put(k.as_str(), &3).await.unwrap();
    }
    for k in &keys {
        assert_eq!(t.get::<i64>(k.as_str()).await.unwrap(), Some(3));
    }
}
