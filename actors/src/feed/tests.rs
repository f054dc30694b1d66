//! Tests of the feed state machine: FEEDS.md's cases directly, and a property test against a
//! `VecDeque` model with reopens (a process crash: the heap dropped without a checkpoint, its
//! op log replayed).

use std::collections::{BTreeMap, VecDeque};

use heapgrid_heap::{FsyncPolicy, Heap, HeapOptions};
use proptest::prelude::*;

use super::*;
use crate::gate::HeapOwner;

fn opts() -> HeapOptions {
    HeapOptions { fsync: FsyncPolicy::Never, ..HeapOptions::default() }
}

fn policy(segment_records: u64, keep: Option<u32>) -> SegmentPolicy {
    SegmentPolicy {
        segment_records,
        roll_after_ms: None,
        retention: Retention { keep_segments: keep, max_age_ms: None },
    }
}

fn open(dir: &std::path::Path, p: &SegmentPolicy) -> FeedShard {
    FeedShard::open(Heap::open(dir.join("f.heap"), opts()).unwrap(), p.clone()).unwrap()
}

fn int(i: i64) -> Value {
    Value::Int(i)
}

/// Every record, walked from the bottom through `next` and from the top through `prev`.
fn walks(f: &FeedShard) -> (Vec<u64>, Vec<u64>) {
    let mut fwd = Vec::new();
    let mut at = f.state().unwrap().bottom;
    while at != 0 {
        let r = f.get(at).unwrap().expect("a link points at a missing record");
        fwd.push(r.id);
        at = r.next;
        assert!(fwd.len() as u64 <= f.len(), "the chain loops");
    }
    let mut back = Vec::new();
    let mut at = f.top();
    while at != 0 {
        let r = f.get(at).unwrap().expect("a link points at a missing record");
        back.push(r.id);
        at = r.prev;
        assert!(back.len() as u64 <= f.len(), "the chain loops");
    }
    back.reverse();
    (fwd, back)
}

#[test]
fn thirty_appends_in_segments_of_six_make_five_segments() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = open(dir.path(), &policy(6, None));
    for i in 1..=30 {
        let a = f.append(&int(i), None, 1000 + i as u64).unwrap();
        assert_eq!(a.id, i as u64);
        assert_eq!(a.sealed, i % 6 == 0);
    }
    let ranges: Vec<(u64, Option<u64>)> =
        f.segments().unwrap().iter().map(|s| (s.first_id, s.last_id)).collect();
    assert_eq!(ranges, vec![(25, Some(30)), (19, Some(24)), (13, Some(18)), (7, Some(12)), (1, Some(6))]);
    for id in 1..=30u64 {
        let r = f.get(id).unwrap().unwrap();
        assert_eq!((r.id, r.value.clone()), (id, int(id as i64)));
        assert_eq!(r.prev, id - 1);
        assert_eq!(r.next, if id == 30 { 0 } else { id + 1 });
    }
    let (fwd, back) = walks(&f);
    assert_eq!(fwd, (1..=30).collect::<Vec<_>>());
    assert_eq!(back, fwd);
    // One read crosses every boundary.
    let r = f.read(Pos::Start, 100).unwrap();
    assert_eq!(r.records.iter().map(|r| r.id).collect::<Vec<_>>(), (1..=30).collect::<Vec<_>>());
    assert_eq!(r.next, 30);
    f.check().unwrap();
}

#[test]
fn keep_two_segments_leaves_the_newest_two_and_trims_a_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = open(dir.path(), &policy(6, Some(2)));
    f.cursor_set("c", Pos::Start).unwrap();
    for i in 1..=5 {
        f.append(&int(i), None, 0).unwrap();
    }
    // The cursor consumes up to 5.
    let (r, _) = f.cursor_read("c", 5).unwrap();
    assert_eq!(r.next, 5);
    for i in 6..=30 {
        f.append(&int(i), None, 0).unwrap();
    }
    let (dropped, _) = f.maintain(0).unwrap();
    assert_eq!(dropped, 18);
    let ranges: Vec<(u64, Option<u64>)> =
        f.segments().unwrap().iter().map(|s| (s.first_id, s.last_id)).collect();
    assert_eq!(ranges, vec![(25, Some(30)), (19, Some(24))]);
    assert_eq!(f.cursor_read("c", 10).unwrap_err(), GridError::Trimmed { first_available: 19 });
    assert_eq!(f.read(Pos::Start, 1).unwrap_err(), GridError::Trimmed { first_available: 19 });
    assert_eq!(f.read(Pos::After(17), 1).unwrap_err(), GridError::Trimmed { first_available: 19 });
    assert_eq!(f.read(Pos::After(18), 1).unwrap().records[0].id, 19);
    assert_eq!(f.read(Pos::FirstAvailable, 1).unwrap().records[0].id, 19);
    assert_eq!(f.cursor_get("c").unwrap(), CursorInfo { name: "c".into(), position: 5, lag: 12 });
    // A get of a dropped record is a miss; the chain starts at 19.
    assert!(f.get(18).unwrap().is_none());
    assert_eq!(f.get(19).unwrap().unwrap().prev, 0);
    f.check().unwrap();
}

#[test]
fn caller_ids_exist_idempotently_and_never_go_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = open(dir.path(), &policy(100, None));
    assert_eq!(f.append(&int(1), Some(10), 0).unwrap().id, 10);
    // A retry with the same value succeeds without writing; another value is `IdExists`.
    assert_eq!(f.append(&int(1), Some(10), 0).unwrap(), Appended { id: 10, lsn: 0, sealed: false });
    assert_eq!(f.append(&int(2), Some(10), 0).unwrap_err(), GridError::IdExists { id: 10 });
    assert!(matches!(f.append(&int(2), Some(5), 0), Err(GridError::Invalid(_))));
    assert_eq!(f.append(&int(3), None, 0).unwrap().id, 11);
    f.remove(11).unwrap();
    // Ids are never reused, even after a removal.
    assert_eq!(f.append(&int(4), None, 0).unwrap().id, 12);
    assert_eq!(f.remove(11).unwrap_err(), GridError::NoSuchRecord { id: 11 });
    assert!(matches!(f.append(&int(5), Some(0), 0), Err(GridError::Invalid(_))));
}

#[test]
fn removing_relinks_and_moves_the_ends() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = open(dir.path(), &policy(3, None));
    for i in 1..=7 {
        f.append(&int(i), None, 0).unwrap();
    }
    f.cursor_set("c", Pos::After(4)).unwrap();
    for id in [4, 1, 7] {
        f.remove(id).unwrap();
    }
    let (fwd, back) = walks(&f);
    assert_eq!(fwd, vec![2, 3, 5, 6]);
    assert_eq!(back, fwd);
    let s = f.state().unwrap();
    assert_eq!((s.bottom, s.top, s.count), (2, 6, 4));
    // The cursor sat on the removed record 4: harmless.
    assert_eq!(
        f.cursor_read("c", 10).unwrap().0.records.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![5, 6]
    );
    let back = f.read_back(None, 10).unwrap();
    assert_eq!(
        back.records.iter().map(|r| (r.id, r.prev, r.next)).collect::<Vec<_>>(),
        vec![(6, 5, 0), (5, 3, 6), (3, 2, 5), (2, 0, 3)]
    );
    f.check().unwrap();
}

#[test]
fn versions_start_segments_and_come_back_with_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = open(dir.path(), &policy(100, None));
    f.append(&int(1), None, 0).unwrap();
    f.append(&int(2), None, 0).unwrap();
    f.set_version(2, 5).unwrap();
    f.append(&int(3), None, 6).unwrap();
    f.set_version(3, 7).unwrap();
    f.append(&int(4), None, 8).unwrap();
    let segs = f.segments().unwrap();
    assert_eq!(
        segs.iter().map(|s| (s.first_id, s.last_id, s.version)).collect::<Vec<_>>(),
        vec![(4, None, 3), (3, Some(3), 2), (1, Some(2), 1)]
    );
    let r = f.read(Pos::Start, 10).unwrap();
    assert_eq!(r.records.iter().map(|r| r.version).collect::<Vec<_>>(), vec![1, 1, 2, 3]);
    assert_eq!(f.get(3).unwrap().unwrap().version, 2);
    // Survives a reopen.
    drop(f);
    let f = open(dir.path(), &policy(100, None));
    assert_eq!(f.get(1).unwrap().unwrap().version, 1);
    assert_eq!(f.state().unwrap().version, 3);
}

#[test]
fn segments_roll_by_age_and_age_out() {
    let dir = tempfile::tempdir().unwrap();
    let p = SegmentPolicy {
        segment_records: 1000,
        roll_after_ms: Some(100),
        retention: Retention { keep_segments: None, max_age_ms: Some(1000) },
    };
    let mut f = open(dir.path(), &p);
    f.append(&int(1), None, 0).unwrap();
    f.append(&int(2), None, 50).unwrap();
    f.maintain(99).unwrap();
    assert_eq!(f.segments().unwrap()[0].last_id, None, "not yet 100 ms old");
    f.maintain(100).unwrap();
    assert_eq!(f.segments().unwrap()[0].last_id, Some(2), "rolled on a quiet feed");
    f.append(&int(3), None, 200).unwrap();
    assert_eq!(f.maintain(1099).unwrap().0, 0);
    assert_eq!(f.maintain(1100).unwrap().0, 2, "the sealed segment aged out");
    assert_eq!(f.read(Pos::FirstAvailable, 10).unwrap().records[0].id, 3);
    f.check().unwrap();
}

#[test]
fn trim_and_cut_cross_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = open(dir.path(), &policy(1000, None));
    let n = CUT_CHUNK * 2 + 10;
    for i in 0..n {
        f.append(&int(i as i64), None, 0).unwrap();
    }
    let (dropped, _) = f.trim(5).unwrap();
    assert_eq!(dropped, n - 5);
    assert_eq!(f.len(), 5);
    assert_eq!(f.state().unwrap().bottom, n - 4);
    f.check().unwrap();
    let (dropped, _) = f.cut(n).unwrap();
    assert_eq!((dropped, f.len(), f.top()), (4, 1, n));
    f.check().unwrap();
}

#[derive(Clone, Debug)]
enum Op {
    Append(i64),
    AppendAt(u64, i64),
    Remove(usize),
    RemoveMissing(u64),
    Read(u8, u8),
    Cursor(u8),
    CursorRead(u8),
    Trim(u8),
    Rotate,
    SetVersion(u8),
    Maintain,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => any::<i64>().prop_map(Op::Append),
        1 => (0u64..4, any::<i64>()).prop_map(|(gap, v)| Op::AppendAt(gap, v)),
        3 => any::<usize>().prop_map(Op::Remove),
        1 => (0u64..200).prop_map(Op::RemoveMissing),
        2 => (any::<u8>(), any::<u8>()).prop_map(|(a, n)| Op::Read(a, n)),
        1 => any::<u8>().prop_map(Op::Cursor),
        1 => any::<u8>().prop_map(Op::CursorRead),
        1 => (0u8..20).prop_map(Op::Trim),
        1 => Just(Op::Rotate),
        1 => (1u8..4).prop_map(Op::SetVersion),
        1 => Just(Op::Maintain),
        1 => Just(Op::Reopen),
    ]
}

/// The model: the chain as a deque of (id, value, version), the id counter, the trim mark,
/// the cursors.
#[derive(Default)]
struct Model {
    chain: VecDeque<(u64, i64, u32)>,
    next_id: u64,
    trimmed_below: u64,
    version: u32,
    cursors: BTreeMap<String, u64>,
}

impl Model {
    fn read(&self, after: u64, n: usize) -> Result<Vec<u64>, GridError> {
        if after + 1 < self.trimmed_below {
            return Err(GridError::Trimmed {
                first_available: self.chain.front().map_or(self.next_id, |r| r.0),
            });
        }
        Ok(self.chain.iter().filter(|r| r.0 > after).take(n).map(|r| r.0).collect())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn feed_matches_a_deque_model(ops in prop::collection::vec(op(), 1..120), seg in 1u64..8, keep in prop::option::of(1u32..4)) {
        let dir = tempfile::tempdir().unwrap();
        let p = policy(seg, keep);
        let mut f = open(dir.path(), &p);
        let mut m = Model { next_id: 1, trimmed_below: 1, version: 1, ..Model::default() };
        for op in ops {
            match op {
                Op::Append(v) => {
                    let a = f.append(&int(v), None, 0).unwrap();
                    prop_assert_eq!(a.id, m.next_id);
                    m.chain.push_back((a.id, v, m.version));
                    m.next_id += 1;
                }
                Op::AppendAt(gap, v) => {
                    let id = m.next_id + gap;
                    prop_assert_eq!(f.append(&int(v), Some(id), 0).unwrap().id, id);
                    m.chain.push_back((id, v, m.version));
                    m.next_id = id + 1;
                    // The same again is an idempotent success; another value exists.
                    prop_assert_eq!(f.append(&int(v), Some(id), 0).unwrap().lsn, 0);
                    prop_assert_eq!(f.append(&int(v.wrapping_add(1)), Some(id), 0).unwrap_err(), GridError::IdExists { id });
                }
                Op::Remove(i) => {
                    if !m.chain.is_empty() {
                        let (id, _, _) = m.chain.remove(i % m.chain.len()).unwrap();
                        f.remove(id).unwrap();
                    }
                }
                Op::RemoveMissing(id) => {
                    if !m.chain.iter().any(|r| r.0 == id) {
                        prop_assert_eq!(f.remove(id).unwrap_err(), GridError::NoSuchRecord { id });
                    }
                }
                Op::Read(a, n) => {
                    let after = a as u64 % (m.next_id + 1);
                    let got = f.read(Pos::After(after), n as u32).map(|r| r.records.iter().map(|r| r.id).collect::<Vec<_>>());
                    prop_assert_eq!(got, m.read(after, n as usize));
                }
                Op::Cursor(a) => {
                    let name = format!("c{}", a % 3);
                    let after = (a as u64 % (m.next_id + 1)).max(m.trimmed_below.saturating_sub(1));
                    let (info, _) = f.cursor_set(&name, Pos::After(after)).unwrap();
                    prop_assert_eq!(info.lag, m.chain.iter().filter(|r| r.0 > after).count() as u64);
                    m.cursors.insert(name, after);
                }
                Op::CursorRead(a) => {
                    let name = format!("c{}", a % 3);
                    let got = f.cursor_read(&name, (a % 5) as u32).map(|(r, _)| r.records.iter().map(|r| r.id).collect::<Vec<_>>());
                    match m.cursors.get(&name).copied() {
                        None => prop_assert_eq!(got.unwrap_err(), GridError::NoSuchCursor(name)),
                        Some(at) => {
                            let want = m.read(at, (a % 5) as usize);
                            if let Ok(ids) = &want && let Some(l) = ids.last() {
                                m.cursors.insert(name, *l);
                            }
                            prop_assert_eq!(got, want);
                        }
                    }
                }
                Op::Trim(keep) => {
                    f.trim(keep as u64).unwrap();
                    if m.chain.len() > keep as usize {
                        let before = if keep == 0 { m.next_id } else { m.chain[m.chain.len() - keep as usize].0 };
                        m.chain.retain(|r| r.0 >= before);
                        m.trimmed_below = m.trimmed_below.max(before);
                    }
                }
                Op::Rotate => {
                    f.rotate(0).unwrap();
                }
                Op::SetVersion(v) => {
                    f.set_version(v as u32, 0).unwrap();
                    m.version = v as u32;
                }
                Op::Maintain => {
                    // Keep-k retention drops the oldest whole segments until k remain (the
                    // newest k, unchanged); everything below the oldest kept one is gone.
                    let before = f.segments().unwrap();
                    f.maintain(0).unwrap();
                    let s = f.state().unwrap();
                    prop_assert!(s.trimmed_below >= m.trimmed_below);
                    let mut want = before.clone();
                    if let Some(k) = keep {
                        want.truncate(k as usize);
                    }
                    prop_assert_eq!(&s.segments, &want);
                    if want.len() < before.len() {
                        let cut = want.last().map_or(m.next_id, |seg| seg.first_id);
                        // The dropped segments' ids are all below `cut`, and only theirs.
                        prop_assert_eq!(s.trimmed_below, before[want.len()].last_id.unwrap() + 1);
                        m.chain.retain(|r| r.0 >= cut);
                        m.trimmed_below = s.trimmed_below;
                    } else {
                        prop_assert_eq!(s.trimmed_below, m.trimmed_below);
                    }
                }
                Op::Reopen => {
                    drop(f);
                    f = open(dir.path(), &p);
                }
            }
            // After every step: both walks give the model's order, the counts agree, every
            // record has its value and version, and the checker passes.
            let (fwd, back) = walks(&f);
            let want: Vec<u64> = m.chain.iter().map(|r| r.0).collect();
            prop_assert_eq!(&fwd, &want);
            prop_assert_eq!(&back, &want);
            prop_assert_eq!(f.len(), m.chain.len() as u64);
            let all = f.read(Pos::FirstAvailable, FEED_READ_MAX).unwrap();
            let got: Vec<(u64, i64, u32)> = all.records.iter().map(|r| match r.value { Value::Int(v) => (r.id, v, r.version), _ => (0, 0, 0) }).collect();
            prop_assert_eq!(got, m.chain.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(f.last_issued(), m.next_id - 1);
            f.check().unwrap();
        }
    }
}

#[test]
fn the_checker_finds_a_record_the_container_does_not_count() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = open(dir.path(), &policy(10, None));
    f.append(&int(1), None, 0).unwrap();
    f.check().unwrap();
    // A record written behind the container's back (as a lost container write would leave).
    let stray = Value::Int(2).encode().unwrap();
    f.heap_mut().put(&record_key(2), &stray).unwrap();
    assert!(matches!(f.check(), Err(GridError::Corrupted(_))));
    drop(f);
    let heap = Heap::open(dir.path().join("f.heap"), opts()).unwrap();
    assert!(matches!(FeedShard::check_heap(heap), Err(GridError::Corrupted(_))));
}
