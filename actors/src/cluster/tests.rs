//! The cluster map's commands and the failure detector's leases and failover rule, directly.

use std::sync::Arc;
use std::time::Duration;

use super::detector::{Detector, Lease, Report, Timing};
use super::map::{ClusterMap, MapCmd, MapError, Member, ShardId};
use super::transport::{Inbox, LinkFault, LocalNet, Relay, TcpTransport, Transport};
use crate::replication::Pos;

fn member(id: u64) -> MapCmd {
    MapCmd::Join(Member { id, addr: format!("127.0.0.{id}:7000"), peer_addr: format!("127.0.0.{id}:7001") })
}

fn shard() -> ShardId {
    ("t".to_string(), 0)
}

fn three_nodes(sync: u32) -> ClusterMap {
    let mut m = ClusterMap::default();
    for id in 1..=3 {
        m.apply(member(id)).unwrap();
    }
    m.apply(MapCmd::Place { shard: shard(), primary: 1, replicas: vec![2, 3], sync }).unwrap();
    m
}

#[test]
fn the_map_applies_commands_deterministically_and_refuses_stale_ones() {
    let mut m = three_nodes(1);
    assert_eq!(m.version, 4);
    let p = m.placement(&shard()).unwrap().clone();
    assert_eq!((p.epoch, p.primary, p.replicas.clone()), (1, 1, vec![2, 3]));
    m.apply(MapCmd::Failover { shard: shard(), from_epoch: 1, primary: 3 }).unwrap();
    let p = m.placement(&shard()).unwrap();
    assert_eq!((p.epoch, p.primary, p.replicas.clone()), (2, 3, vec![1, 2]));
    // The same decision again (a retried Raft proposal, a second detector) changes nothing.
    let again = m.apply(MapCmd::Failover { shard: shard(), from_epoch: 1, primary: 2 });
    assert_eq!(again, Err(MapError::Stale { shard: shard(), epoch: 2 }));
    assert_eq!(m.version, 5);
    assert_eq!(m.apply(MapCmd::Leave(1)), Err(MapError::InUse(1)));
    let bad = MapCmd::Place { shard: shard(), primary: 1, replicas: vec![1, 2], sync: 1 };
    assert!(matches!(m.apply(bad), Err(MapError::BadPlacement(_))));
    let unknown = MapCmd::Place { shard: shard(), primary: 9, replicas: vec![], sync: 0 };
    assert_eq!(m.apply(unknown), Err(MapError::NoSuchMember(9)));
    // Two copies that apply the same commands are the same map.
    let mut a = three_nodes(1);
    a.apply(MapCmd::Failover { shard: shard(), from_epoch: 1, primary: 3 }).unwrap();
    assert_eq!(a, m);
}

fn report(pos: u64, primary_of: Option<u64>) -> Vec<Report> {
    vec![Report {
        shard: shard(),
        pos: Pos { epoch: 1, lsn: pos },
        primary_of,
        serving: primary_of.is_some(),
    }]
}

#[test]
fn the_detector_leases_then_fails_over_to_a_live_in_sync_replica() {
    let mut map = three_nodes(1);
    let t = Timing { heartbeat_ms: 100, lease_ms: 500, detect_ms: 750, max_delay_ms: 20 };
    let mut d = Detector::new(t);
    assert!(d.decide(&map, 0).is_empty(), "the epoch's clock starts");
    let leases = d.heartbeat(&map, 1, 95, &report(10, Some(1)), 100);
    assert_eq!(leases, vec![Lease { shard: shard(), epoch: 1, until_ms: 595 }]);
    // A replica's heartbeat earns no lease.
    assert!(d.heartbeat(&map, 2, 100, &report(9, None), 100).is_empty());
    // Node 3 fell out of sync (the primary's proposal, committed).
    map.apply(MapCmd::SetInSync { shard: shard(), epoch: 1, based_on: 0, in_sync: vec![2] }).unwrap();
    // The primary falls silent at 100; both replicas report after it, node 3 further ahead.
    d.heartbeat(&map, 2, 600, &report(10, None), 600);
    d.heartbeat(&map, 3, 600, &report(12, None), 600);
    assert!(d.decide(&map, 849).is_empty(), "not yet detected");
    // Only the in-sync replica may take over, however far the other got.
    assert_eq!(d.decide(&map, 851), vec![MapCmd::Failover { shard: shard(), from_epoch: 1, primary: 2 }]);
    map.apply(MapCmd::Failover { shard: shard(), from_epoch: 1, primary: 2 }).unwrap();
    let p = map.placement(&shard()).unwrap();
    assert_eq!((p.epoch, p.primary, p.in_sync.clone()), (2, 2, vec![]), "the old primary is not in sync");
    // A failover to a replica out of sync is refused by the map itself.
    let mut m = three_nodes(1);
    m.apply(MapCmd::SetInSync { shard: shard(), epoch: 1, based_on: 0, in_sync: vec![2] }).unwrap();
    assert_eq!(m.placement(&shard()).unwrap().in_sync_version, 1);
    // A proposal based on the set before (delayed, or sent again) is refused: the primary saw
    // the set move on and may no longer count on it.
    let stale = MapCmd::SetInSync { shard: shard(), epoch: 1, based_on: 0, in_sync: vec![2, 3] };
    assert!(matches!(m.apply(stale), Err(MapError::Stale { .. })));
    // The same set again changes nothing, not even the version.
    m.apply(MapCmd::SetInSync { shard: shard(), epoch: 1, based_on: 1, in_sync: vec![2] }).unwrap();
    assert_eq!(m.placement(&shard()).unwrap().in_sync_version, 1);
    assert!(matches!(
        m.apply(MapCmd::Failover { shard: shard(), from_epoch: 1, primary: 3 }),
        Err(MapError::Stale { .. })
    ));
    // With no live in-sync replica, the shard waits.
    let mut d = Detector::new(t);
    d.decide(&m, 0);
    d.heartbeat(&m, 3, 700, &report(12, None), 700);
    assert!(d.decide(&m, 5_000).is_empty());
    // Async: any live replica will do.
    let map0 = three_nodes(0);
    let mut d = Detector::new(t);
    d.decide(&map0, 0);
    d.heartbeat(&map0, 3, 700, &report(10, None), 700);
    assert_eq!(d.decide(&map0, 800), vec![MapCmd::Failover { shard: shard(), from_epoch: 1, primary: 3 }]);
}

#[test]
fn a_new_leader_counts_silence_from_what_it_heard_as_a_follower() {
    let map = three_nodes(1);
    let t = Timing { heartbeat_ms: 100, lease_ms: 400, detect_ms: 600, max_delay_ms: 100 };
    // Node 2's detector, a follower: it hears every report but its leases go nowhere.
    let mut d = Detector::new(t);
    d.decide(&map, 0);
    d.heartbeat(&map, 1, 100, &report(10, Some(1)), 100);
    // The primary (node 1, also the old leader) dies after its report at 100; node 2 still
    // hears the in-sync replica, itself.
    for at in [200, 300, 400, 500, 600] {
        d.heartbeat(&map, 2, at, &report(10, None), at);
    }
    // Elected at 400: nothing is decided while a lease of the old leader may run (to 900)...
    d.took_lead(400);
    assert!(d.decide(&map, 750).is_empty(), "silent 650 ms, but an old lease may run");
    assert!(d.decide(&map, 899).is_empty());
    // ...and then at once: silence is counted from 100, not from the election.
    d.heartbeat(&map, 2, 900, &report(10, None), 900);
    assert_eq!(d.decide(&map, 901), vec![MapCmd::Failover { shard: shard(), from_epoch: 1, primary: 2 }]);
    // A primary that kept reporting is never replaced by the new leader.
    let mut d = Detector::new(t);
    d.decide(&map, 0);
    d.took_lead(0);
    for at in (100..3_000).step_by(100) {
        d.heartbeat(&map, 1, at, &report(10, Some(1)), at);
        d.heartbeat(&map, 2, at, &report(10, None), at);
        assert!(d.decide(&map, at + 50).is_empty(), "at {at}");
    }
    // Losing the lead ends a planned switch's drain (its leases flow again under a later lead).
    d.drain(shard(), 1);
    assert!(d.heartbeat(&map, 1, 3_000, &report(10, Some(1)), 3_000).is_empty(), "drained");
    d.lost_lead();
    assert_eq!(d.heartbeat(&map, 1, 3_100, &report(10, Some(1)), 3_100).len(), 1);
}

#[test]
fn a_table_cannot_be_placed_on_a_map_without_members() {
    use super::map::{LOCKS_SERVICE, service_spec};
    let mut m = ClusterMap::default();
    let cmd = MapCmd::CreateTable { name: LOCKS_SERVICE.into(), spec: service_spec() };
    assert!(matches!(m.apply(cmd.clone()), Err(MapError::BadPlacement(_))));
    assert_eq!(m.version, 0);
    m.apply(member(4)).unwrap();
    m.apply(cmd).unwrap();
    assert_eq!(m.placement(&(LOCKS_SERVICE.to_string(), 0)).map(|p| p.primary), Some(4));
}

proptest::proptest! {
    /// Whatever commands arrive, in whatever order, applying them never panics (it is the Raft
    /// state machine: a panic there stops the node), a refused one changes nothing, and every
    /// placement names members only, its replicas distinct from its primary, in sync ⊆ replicas.
    #[test]
    fn the_map_never_panics_and_keeps_its_invariants(
        cmds in proptest::collection::vec((0u8..8, 0u64..5, 0u32..4, 0u32..4, 0u64..4), 0..60)
    ) {
        use super::map::TableSpec;
        let mut m = ClusterMap::default();
        for (kind, node, a, b, epoch) in cmds {
            let shard: ShardId = (format!("t{}", a % 2), b % 2);
            let cmd = match kind {
                0 => member(node),
                1 => MapCmd::Leave(node),
                2 => MapCmd::CreateTable { name: format!("t{}", a % 2), spec: TableSpec { shards: b, replicas: a, sync: a.min(b) } },
                3 => MapCmd::DropTable(format!("t{}", a % 2)),
                4 => MapCmd::Failover { shard, from_epoch: epoch, primary: node },
                5 => MapCmd::AddReplica { shard, node },
                6 => MapCmd::RemoveReplica { shard, node },
                _ => MapCmd::SetInSync { shard, epoch, based_on: u64::from(a), in_sync: vec![node] },
            };
            let before = m.clone();
            if m.apply(cmd).is_err() {
                proptest::prop_assert_eq!(&m, &before);
            }
            for (_, p) in m.placements() {
                proptest::prop_assert!(m.member(p.primary).is_some());
                proptest::prop_assert!(p.replicas.iter().all(|r| m.member(*r).is_some() && *r != p.primary));
                proptest::prop_assert!(p.in_sync.iter().all(|r| p.replicas.contains(r)));
            }
        }
    }
}

#[test]
fn a_primary_that_reports_without_a_lease_is_drained_then_replaced() {
    let map = three_nodes(1);
    let t = Timing { heartbeat_ms: 100, lease_ms: 400, detect_ms: 600, max_delay_ms: 100 };
    let mut d = Detector::new(t);
    d.decide(&map, 0);
    let as_primary = |serving| {
        vec![Report { shard: shard(), pos: Pos { epoch: 1, lsn: 10 }, primary_of: Some(1), serving }]
    };
    assert_eq!(d.heartbeat(&map, 1, 100, &as_primary(true), 100).len(), 1);
    // From 200 on node 1 still reports, but without a lease (the leases sent to it are lost);
    // the in-sync replica reports too.
    let (mut last_lease, mut failover) = (100, None);
    for at in (200..=3_000).step_by(100) {
        if !d.heartbeat(&map, 1, at, &as_primary(false), at).is_empty() {
            last_lease = at;
        }
        d.heartbeat(&map, 2, at, &report(10, None), at);
        if let Some(cmd) = d.decide(&map, at + 10).into_iter().next() {
            failover = Some((at + 10, cmd));
            break;
        }
    }
    let (at, cmd) = failover.expect("an unleased primary is replaced");
    assert_eq!(cmd, MapCmd::Failover { shard: shard(), from_epoch: 1, primary: 2 });
    // Leases stopped once it had been unleased for the detection time, and the failover came
    // only after the last one granted had ended (its lease + the delay allowance).
    assert!(last_lease <= 200 + 600 + 100, "leases until {last_lease}");
    assert!(at >= last_lease + t.lease_ms + t.max_delay_ms, "failover at {at}, last lease at {last_lease}");
    // A primary that gets its leases again is left alone.
    let mut d = Detector::new(t);
    d.decide(&map, 0);
    for at in (100..3_000).step_by(100) {
        d.heartbeat(&map, 1, at, &as_primary(at % 500 != 0), at);
        d.heartbeat(&map, 2, at, &report(10, None), at);
        assert!(d.decide(&map, at + 10).is_empty(), "at {at}");
    }
}

async fn next(inbox: &mut Inbox) -> Option<(u64, Vec<u8>)> {
    tokio::time::timeout(Duration::from_secs(10), inbox.recv()).await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_frames_arrive_in_order_and_a_wrong_cookie_is_refused() {
    let any = "127.0.0.1:0".parse().unwrap();
    let (a, _a_in) = TcpTransport::bind(1, any, "secret").await.unwrap();
    let (_b, mut b_in) = TcpTransport::bind(2, any, "secret").await.unwrap();
    a.set_peer(2, _b.local_addr());
    for i in 0..1000u32 {
        a.send(2, i.to_le_bytes().to_vec());
    }
    for i in 0..1000u32 {
        assert_eq!(next(&mut b_in).await, Some((1, i.to_le_bytes().to_vec())), "frame {i}");
    }
    // A node with another cookie is not heard.
    let (c, _c_in) = TcpTransport::bind(3, any, "other").await.unwrap();
    c.set_peer(2, _b.local_addr());
    c.send(2, b"intruder".to_vec());
    a.send(2, b"after".to_vec());
    assert_eq!(next(&mut b_in).await, Some((1, b"after".to_vec())));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), b_in.recv()).await.is_err(),
        "nothing from node 3"
    );
    // Bad cookies are refused at bind.
    assert!(TcpTransport::bind(4, any, "").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_reconnects_to_a_restarted_peer() {
    let any = "127.0.0.1:0".parse().unwrap();
    let (a, _a_in) = TcpTransport::bind(1, any, "k").await.unwrap();
    let (b, mut b_in) = TcpTransport::bind(2, any, "k").await.unwrap();
    let addr = b.local_addr();
    a.set_peer(2, addr);
    a.send(2, b"one".to_vec());
    assert_eq!(next(&mut b_in).await, Some((1, b"one".to_vec())));
    drop(b);
    drop(b_in);
    // The peer comes back on the same address: later frames reach it (some sent meanwhile may
    // be lost; the sender keeps sending, as the protocols above do).
    // (The old listener closes as its task is cancelled: retry the bind briefly.)
    let t0 = tokio::time::Instant::now();
    let (_b, mut b_in) = loop {
        match TcpTransport::bind(2, addr, "k").await {
            Ok(b) => break b,
            Err(e) if t0.elapsed() < Duration::from_secs(5) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("rebind {addr}: {e}"),
        }
    };
    let t1 = tokio::time::Instant::now();
    let got = loop {
        assert!(t1.elapsed() < Duration::from_secs(10), "no frame reached the restarted peer");
        a.send(2, b"two".to_vec());
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(100), b_in.recv()).await {
            break m;
        }
    };
    assert_eq!(got, (1, b"two".to_vec()));
}

#[tokio::test]
async fn a_relay_blackholes_drops_and_delays_chosen_links() {
    let net = Arc::new(LocalNet::default());
    let (a, _a_in) = net.join(1);
    let (_b, mut b_in) = net.join(2);
    let (_c, mut c_in) = net.join(3);
    let relay = Relay::new(Arc::new(a), 42);
    relay.set(2, LinkFault { blackhole: true, ..LinkFault::default() });
    relay.set(3, LinkFault { delay_ms: 50, ..LinkFault::default() });
    relay.send(2, b"lost".to_vec());
    let t = tokio::time::Instant::now();
    relay.send(3, b"late".to_vec());
    assert_eq!(next(&mut c_in).await, Some((1, b"late".to_vec())));
    assert!(t.elapsed() >= Duration::from_millis(50));
    assert!(b_in.try_recv().is_err(), "the blackholed link delivered");
    relay.set(2, LinkFault { drop_per_mille: 500, ..LinkFault::default() });
    for i in 0..1000u32 {
        relay.send(2, i.to_le_bytes().to_vec());
    }
    let mut got = 0;
    while b_in.try_recv().is_ok() {
        got += 1;
    }
    assert!((300..700).contains(&got), "{got} of 1000 through a link dropping half");
    relay.set(2, LinkFault::default());
    relay.send(2, b"healed".to_vec());
    assert_eq!(next(&mut b_in).await, Some((1, b"healed".to_vec())));
}

mod raft_group {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use crate::cluster::map::{MapCmd, Member};
    use crate::cluster::raft::{Admin, ControlNode, RaftTiming};
    use crate::cluster::transport::{TcpTransport, Transport};

    async fn start(id: u64, listen: SocketAddr, dir: &std::path::Path, join: Vec<String>) -> ControlNode {
        let (t, inbox) = TcpTransport::bind(id, listen, "cookie").await.unwrap();
        let me =
            Member { id, addr: format!("127.0.0.1:{}", 7000 + id), peer_addr: t.local_addr().to_string() };
        let t: Arc<dyn Transport> = t;
        ControlNode::start(me, &dir.join(format!("n{id}")), t, inbox, join, RaftTiming::default())
            .await
            .unwrap()
    }

    /// Waits (bounded) until `f` holds for the nodes.
    async fn until(what: &str, nodes: &[&ControlNode], f: impl Fn(&[&ControlNode]) -> bool) {
        for _ in 0..300 {
            if f(nodes) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let s: Vec<_> = nodes.iter().map(|n| n.status()).collect();
        panic!("not within 15 s: {what}; status {s:#?}");
    }

    fn agreed(nodes: &[&ControlNode], voters: usize) -> bool {
        let s: Vec<_> = nodes.iter().map(|n| n.status()).collect();
        let leader = s[0].leader;
        leader.is_some()
            && s.iter().all(|x| x.leader == leader && x.voters.len() == voters && x.map == s[0].map)
            && s[0].map.members().count() == voters
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_nodes_form_a_group_keep_the_map_through_a_leader_loss_and_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let n1 = start(1, any, dir.path(), vec![]).await;
        // Node 1 forms a group of itself and records itself in the map once it leads.
        until("node 1 leads and is in the map", &[&n1], |n| agreed(n, 1)).await;
        let seed = vec![n1.map().member(1).unwrap().peer_addr.clone()];
        let n2 = start(2, any, dir.path(), seed.clone()).await;
        let n3 = start(3, any, dir.path(), seed.clone()).await;
        until("three voters agree", &[&n1, &n2, &n3], |n| agreed(n, 3)).await;

        // A change proposed at a follower reaches the leader and every copy of the map.
        let leader = n1.status().leader.unwrap();
        let nodes = [n1, n2, n3];
        let follower = nodes.iter().find(|n| n.id() != leader).unwrap();
        let place = MapCmd::Place { shard: ("t".into(), 0), primary: 1, replicas: vec![2, 3], sync: 1 };
        let v = follower.admin(Admin::Propose(place)).await.unwrap().version;
        let refs: Vec<&ControlNode> = nodes.iter().collect();
        until("the placement everywhere", &refs, |n| n.iter().all(|x| x.map().version == v)).await;
        // A refused command is an error, and changes nothing.
        let bad = MapCmd::Place { shard: ("t".into(), 1), primary: 9, replicas: vec![], sync: 0 };
        assert!(follower.admin(Admin::Propose(bad)).await.is_err());

        // The leader stops: the others elect one and the map still takes changes.
        let [a, b, c] = nodes;
        let (gone, rest): (Vec<ControlNode>, Vec<ControlNode>) =
            [a, b, c].into_iter().partition(|n| n.id() == leader);
        let gone = gone.into_iter().next().unwrap();
        let gone_addr: SocketAddr = gone.map().member(leader).unwrap().peer_addr.parse().unwrap();
        let old_term = gone.status().term;
        gone.shutdown().await;
        drop(gone);
        let rest: Vec<&ControlNode> = rest.iter().collect();
        until("a new leader", &rest, |n| {
            let s: Vec<_> = n.iter().map(|x| x.status()).collect();
            s.iter().all(|x| {
                x.leader.is_some_and(|l| l != leader) && x.leader == s[0].leader && x.term > old_term
            })
        })
        .await;
        let place =
            MapCmd::Place { shard: ("t".into(), 1), primary: rest[0].id(), replicas: vec![], sync: 0 };
        let v = rest[1].admin(Admin::Propose(place)).await.unwrap().version;

        // The old leader restarts from its store and catches up.
        let back = start(leader, gone_addr, dir.path(), vec![]).await;
        let mut all = rest.clone();
        all.push(&back);
        until("the restarted node catches up", &all, |n| {
            agreed(n, 3) && n.iter().all(|x| x.map().version >= v)
        })
        .await;
        assert_ne!(back.status().leader, None);
    }
}

#[test]
fn a_created_table_is_placed_round_the_members_and_a_dropped_one_leaves() {
    use super::map::TableSpec;
    let mut m = ClusterMap::default();
    for id in 1..=3 {
        m.apply(member(id)).unwrap();
    }
    let spec = TableSpec { shards: 4, replicas: 2, sync: 1 };
    m.apply(MapCmd::CreateTable { name: "t".into(), spec: spec.clone() }).unwrap();
    let placed: Vec<(u64, Vec<u64>)> = (0..4)
        .map(|i| m.placement(&("t".to_string(), i)).map(|p| (p.primary, p.replicas.clone())).unwrap())
        .collect();
    assert_eq!(placed, vec![(1, vec![2, 3]), (2, vec![3, 1]), (3, vec![1, 2]), (1, vec![2, 3])]);
    let p = m.placement(&("t".to_string(), 1)).unwrap();
    assert_eq!((p.epoch, p.in_sync.clone(), p.sync), (1, vec![3, 1], 1));
    assert_eq!(m.table("t"), Some(&spec));
    // Again, or more replicas than other members, or sync above replicas: refused, unchanged.
    let v = m.version;
    assert_eq!(
        m.apply(MapCmd::CreateTable { name: "t".into(), spec: spec.clone() }),
        Err(MapError::TableExists("t".into()))
    );
    let wide = TableSpec { shards: 1, replicas: 3, sync: 0 };
    assert!(matches!(
        m.apply(MapCmd::CreateTable { name: "u".into(), spec: wide }),
        Err(MapError::BadPlacement(_))
    ));
    let strict = TableSpec { shards: 1, replicas: 1, sync: 2 };
    assert!(matches!(
        m.apply(MapCmd::CreateTable { name: "u".into(), spec: strict }),
        Err(MapError::BadPlacement(_))
    ));
    assert_eq!(m.version, v);
    // A member holding placements cannot leave; once the table is dropped it can.
    assert_eq!(m.apply(MapCmd::Leave(2)), Err(MapError::InUse(2)));
    m.apply(MapCmd::DropTable("t".into())).unwrap();
    assert_eq!(m.placements().count(), 0);
    m.apply(MapCmd::Leave(2)).unwrap();
    assert_eq!(m.apply(MapCmd::DropTable("t".into())), Err(MapError::NoSuchTable("t".into())));
}

#[test]
fn a_planned_move_adds_a_replica_and_removes_one_within_the_epoch_and_a_drained_primary_gets_no_lease() {
    let mut m = three_nodes(1);
    m.apply(MapCmd::Join(Member { id: 4, addr: "a".into(), peer_addr: "p".into() })).unwrap();
    m.apply(MapCmd::AddReplica { shard: shard(), node: 4 }).unwrap();
    let p = m.placement(&shard()).unwrap().clone();
    assert_eq!((p.epoch, p.replicas.clone(), p.in_sync.clone()), (1, vec![2, 3, 4], vec![2, 3]));
    // Twice, the primary, a stranger: refused.
    assert!(matches!(
        m.apply(MapCmd::AddReplica { shard: shard(), node: 4 }),
        Err(MapError::BadPlacement(_))
    ));
    assert!(matches!(
        m.apply(MapCmd::AddReplica { shard: shard(), node: 1 }),
        Err(MapError::BadPlacement(_))
    ));
    assert_eq!(m.apply(MapCmd::AddReplica { shard: shard(), node: 9 }), Err(MapError::NoSuchMember(9)));
    m.apply(MapCmd::RemoveReplica { shard: shard(), node: 2 }).unwrap();
    // Not below sync(1) in sync: 3 is the last in-sync replica.
    assert!(matches!(
        m.apply(MapCmd::RemoveReplica { shard: shard(), node: 3 }),
        Err(MapError::BadPlacement(_))
    ));
    let p = m.placement(&shard()).unwrap();
    assert_eq!((p.epoch, p.replicas.clone(), p.in_sync.clone()), (1, vec![3, 4], vec![3]));

    let t = Timing { heartbeat_ms: 100, lease_ms: 400, detect_ms: 600, max_delay_ms: 100 };
    let mut d = Detector::new(t);
    assert_eq!(d.heartbeat(&m, 1, 0, &report(5, Some(1)), 0).len(), 1);
    d.drain(shard(), 1);
    assert!(d.heartbeat(&m, 1, 100, &report(6, Some(1)), 100).is_empty(), "a drained primary got a lease");
    // Still heard (and its in-sync replica too), well past the detection time: not failed
    // over while draining.
    d.decide(&m, 100);
    for at in (200..=1_500).step_by(100) {
        assert!(d.heartbeat(&m, 1, at, &report(6, Some(1)), at).is_empty(), "a drained primary got a lease");
        d.heartbeat(&m, 3, at, &report(6, None), at);
    }
    assert!(d.decide(&m, 650).is_empty());
    assert!(d.decide(&m, 1_550).is_empty());
    d.undrain(&shard());
    assert_eq!(d.heartbeat(&m, 1, 1_600, &report(7, Some(1)), 1_600).len(), 1);
}
