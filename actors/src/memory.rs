//! The memory budget's pager (`GridOptions::memory_budget`, `heapgrid serve --memory-budget`;
//! issue 16, DESIGN.md "Memory"): an actor beside the checkpointer that keeps the node's
//! resident anonymous memory plus its heaps' resident pages under the budget, by asking the
//! actors that own the heaps to drop clean pages (`Heap::shed`, through the gate).
//!
//! Every `TICK` (every `IDLE_TICK` while the node is below half its budget) it asks every
//! running heap for its resident bytes (`mincore`). Over
//! `HIGH_PERCENT` of the budget, it sheds down to `LOW_PERCENT`: idle heaps first (those whose
//! resident bytes grew least since it last looked: nothing read their dropped pages back),
//! larger ones first among equals; inside a heap the page clock (`heapgrid_heap`'s `shed`)
//! chooses the pages. Dirty pages are never dropped, so a node whose unwritten-back pages alone
//! exceed the budget stays over it until the next checkpoint makes them clean.
//!
//! What it counts: `RssAnon` (allocations: snippet engines, buffers, the heaps' bitmaps) and
//! each heap's pages in the page cache. The op log's segments are written with `write` and
//! are not counted (their clean pages are the kernel's first to reclaim).
//!
//! Invariant: it only ever asks; a heap that does not answer in `CALL_TIMEOUT` (busy, restarting)
//! is skipped this tick, and a failed call never fails the pager.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use heapgrid_heap::ShedReport;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::gate::GateMsg;
use crate::grid::Registries;
use crate::table::supervisor::{BoxFuture, SlotState};

/// How often the pager looks...
const TICK: Duration = Duration::from_millis(100);
/// ...and how often while the node is below `IDLE_PERCENT` of its budget (each look costs every
/// heap a `mincore` of its mapping).
const IDLE_TICK: Duration = Duration::from_secs(1);
const IDLE_PERCENT: u64 = 50;
/// Shedding starts above this share of the budget...
const HIGH_PERCENT: u64 = 95;
/// ...and goes down to this one (the gap keeps it from shedding on every tick).
const LOW_PERCENT: u64 = 85;
/// Longest wait for one heap's answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// What the pager did, readable by the stats (`NodeStats::memory_budget`).
#[derive(Debug, Default)]
pub struct PagerStats {
    /// The budget in bytes (0: none).
    pub budget_bytes: AtomicU64,
    /// Anonymous plus heap-resident bytes at the last look.
    pub used_bytes: AtomicU64,
    /// Bytes dropped since start.
    pub dropped_bytes: AtomicU64,
    /// Ticks that found the node over `HIGH_PERCENT` of its budget.
    pub shed_rounds: AtomicU64,
}

pub(crate) struct MemoryPager;

pub(crate) struct PagerArgs {
    pub registries: Registries,
    pub budget_bytes: u64,
    pub stats: Arc<PagerStats>,
}

pub(crate) struct PagerState {
    args: PagerArgs,
    /// Per heap: its resident bytes after the pager's last look (and shed).
    after: HashMap<String, u64>,
}

pub(crate) enum PagerMsg {
    Tick,
}

/// One running heap: a name for the pager's memory, and how to ask it to shed.
struct Target {
    key: String,
    ask: Box<dyn Fn(u64) -> BoxFuture<Option<ShedReport>> + Send + Sync>,
}

fn target<M: GateMsg>(key: String, a: ActorRef<M>) -> Target {
    Target {
        key,
        ask: Box::new(move |want| {
            let a = a.clone();
            Box::pin(async move {
                match a.call(|r| M::shed(want, r), Some(CALL_TIMEOUT)).await {
                    Ok(ractor::rpc::CallResult::Success(Ok(r))) => Some(r),
                    _ => None,
                }
            })
        }),
    }
}

/// Every running heap of the node.
fn targets(r: &Registries) -> Vec<Target> {
    let mut out = Vec::new();
    if let SlotState::Running(a) = r.locks.slot().get() {
        out.push(target("$locks".into(), a));
    }
    if let SlotState::Running(a) = r.queues.slot().get() {
        out.push(target("$queues".into(), a));
    }
    for f in r.feeds.read().unwrap_or_else(|e| e.into_inner()).values() {
        if let SlotState::Running(a) = f.slot().get() {
            out.push(target(format!("feed/{}", f.def.name), a));
        }
    }
    for t in r.tables.read().unwrap_or_else(|e| e.into_inner()).values() {
        for (i, slot) in t.slots().iter().enumerate() {
            if let SlotState::Running(a) = slot.get() {
                out.push(target(format!("table/{}/{i}", t.def.name), a));
            }
        }
    }
    out
}

/// When to look again: soon near the budget, less often far below it.
fn next_tick(used: u64, budget: u64) -> Duration {
    if used < budget / 100 * IDLE_PERCENT { IDLE_TICK } else { TICK }
}

/// The order to shed in: least grown since the last look first (idle), then largest first.
/// `looked`: (index, resident now, resident after the last look).
fn shed_order(looked: &mut [(usize, u64, u64)]) {
    looked.sort_by_key(|&(_, now, before)| (now.saturating_sub(before), std::cmp::Reverse(now)));
}

impl Actor for MemoryPager {
    type Msg = PagerMsg;
    type State = PagerState;
    type Arguments = PagerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<PagerMsg>,
        args: PagerArgs,
    ) -> Result<PagerState, ActorProcessingErr> {
        args.stats.budget_bytes.store(args.budget_bytes, Ordering::Relaxed);
        // Each tick schedules the next when it is done, so a slow one (heaps answering late)
        // never lets ticks pile up in the mailbox.
        myself.send_after(TICK, || PagerMsg::Tick);
        Ok(PagerState { args, after: HashMap::new() })
    }

    async fn handle(
        &self,
        myself: ActorRef<PagerMsg>,
        _msg: PagerMsg,
        st: &mut PagerState,
    ) -> Result<(), ActorProcessingErr> {
        let targets = targets(&st.args.registries);
        let mut looked = Vec::with_capacity(targets.len());
        let mut resident = 0u64;
        for (i, t) in targets.iter().enumerate() {
            if let Some(r) = (t.ask)(0).await {
                resident += r.resident_bytes;
                looked.push((i, r.resident_bytes, st.after.get(&t.key).copied().unwrap_or(r.resident_bytes)));
            }
        }
        let (anon, _) = crate::stats::process_memory();
        let used = anon + resident;
        let stats = &st.args.stats;
        stats.used_bytes.store(used, Ordering::Relaxed);
        let budget = st.args.budget_bytes;
        let mut after: HashMap<String, u64> =
            looked.iter().map(|&(i, now, _)| (targets[i].key.clone(), now)).collect();
        if used > budget / 100 * HIGH_PERCENT {
            stats.shed_rounds.fetch_add(1, Ordering::Relaxed);
            let mut excess = used - budget / 100 * LOW_PERCENT;
            shed_order(&mut looked);
            for &(i, now, _) in looked.iter() {
                if excess == 0 {
                    break;
                }
                if let Some(r) = (targets[i].ask)(excess.min(now)).await {
                    excess = excess.saturating_sub(r.dropped_bytes);
                    stats.dropped_bytes.fetch_add(r.dropped_bytes, Ordering::Relaxed);
                    after.insert(targets[i].key.clone(), r.resident_bytes.saturating_sub(r.dropped_bytes));
                }
            }
        }
        // Heaps gone since (a dropped table) are forgotten.
        st.after = after;
        myself.send_after(next_tick(used, budget), || PagerMsg::Tick);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn far_below_the_budget_the_pager_looks_less_often() {
        assert_eq!(next_tick(10, 1000), IDLE_TICK);
        assert_eq!(next_tick(600, 1000), TICK);
        assert_eq!(next_tick(2000, 1000), TICK);
    }

    #[test]
    fn idle_heaps_are_shed_first_then_the_largest() {
        // (index, resident now, resident after the last look)
        let mut v = vec![(0, 100, 10), (1, 50, 50), (2, 500, 500), (3, 60, 55)];
        shed_order(&mut v);
        let order: Vec<usize> = v.iter().map(|x| x.0).collect();
        assert_eq!(order, vec![2, 1, 3, 0]);
    }
}
