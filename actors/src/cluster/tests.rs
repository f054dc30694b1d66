//! The cluster map's commands and the failure detector's leases and failover rule, directly.

use super::detector::{Detector, Lease, Report, Timing};
use super::map::{ClusterMap, MapCmd, MapError, Member, ShardId};
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
    vec![Report { shard: shard(), pos: Pos { epoch: 1, lsn: pos }, primary_of }]
}

#[test]
fn the_detector_leases_then_fails_over_only_on_fresh_enough_reports() {
    let map = three_nodes(1);
    let t = Timing { heartbeat_ms: 100, lease_ms: 500, detect_ms: 750, max_delay_ms: 20 };
    let mut d = Detector::new(t);
    assert!(d.decide(&map, 0).is_empty(), "the epoch's clock starts");
    let leases = d.heartbeat(&map, 1, 95, &report(10, Some(1)), 100);
    assert_eq!(leases, vec![Lease { shard: shard(), epoch: 1, until_ms: 595 }]);
    // A replica's heartbeat earns no lease.
    assert!(d.heartbeat(&map, 2, 100, &report(9, None), 100).is_empty());
    // The primary falls silent at 100. Reports before 100 + 500 + 40 do not count.
    d.heartbeat(&map, 2, 600, &report(10, None), 600);
    d.heartbeat(&map, 3, 600, &report(12, None), 600);
    assert!(d.decide(&map, 851).is_empty(), "stale reports only");
    // With sync(1) of two replicas, both must report.
    d.heartbeat(&map, 2, 700, &report(10, None), 700);
    assert!(d.decide(&map, 860).is_empty(), "one fresh report of the two needed");
    d.heartbeat(&map, 3, 700, &report(12, None), 700);
    assert!(d.decide(&map, 849).is_empty(), "not yet detected");
    assert_eq!(d.decide(&map, 851), vec![MapCmd::Failover { shard: shard(), from_epoch: 1, primary: 3 }]);
    // Async: any one fresh report will do.
    let map0 = three_nodes(0);
    let mut d = Detector::new(t);
    d.decide(&map0, 0);
    d.heartbeat(&map0, 2, 700, &report(10, None), 700);
    assert_eq!(d.decide(&map0, 800), vec![MapCmd::Failover { shard: shard(), from_epoch: 1, primary: 2 }]);
}
