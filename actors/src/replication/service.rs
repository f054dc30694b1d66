//! Replication of a node-wide service (the lock service, the queue service) in a cluster: the
//! service's heap is replicated like a one-shard table placed under the service's name in the
//! map (`$locks`, `$queues`), and the service actor keeps a `ServiceRepl` beside its gate.
//!
//! What differs from a table shard:
//! - Every write waits for the in-sync replicas (`acks_in_sync`), and every answer waits for
//!   the last write before it (`ShardRepl::written_or_pending`): a grant handed over by a
//!   release, or a delivery made by a push, is acknowledged only once a replica that could take
//!   over holds it. With no replica in sync, answers are not held (and no failover can happen).
//! - A service keeps state in memory (sessions, waiters, leases, deliveries in flight). The
//!   actor loads it from its heap when it becomes the serving primary (`should_load`, as a
//!   restart does), and drops it, answering its waiters `NotPrimary`, when it stops being the
//!   primary (`should_drop`). A replica's memory is empty; it only applies what is shipped.
//! - In a cluster the service's heap is another file than a lone node's (`cluster_path`), so
//!   what a node did alone is never mistaken for replicated history, and nothing is written to
//!   it except as the primary under a lease (a lone node's open-time writes, such as the lock
//!   epoch's rise, happen on promotion instead, replicated).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use heapgrid_heap::FsyncPolicy;
use ractor::ActorRef;

use super::shard::{ReplNet, ReplWire, ShardRepl};
use super::{Epoch, NodeId};
use crate::cluster::map::Placement;
use crate::error::GridError;
use crate::gate::{Deferred, GateMsg, HeapOwner, LogGate};

/// Where a service's heap lives on a node in a cluster: `<dir>/replicated/<service>/`.
pub fn cluster_path(dir: &Path, service: &str, file: &str) -> PathBuf {
    dir.join("replicated").join(service.trim_start_matches('$')).join(file)
}

/// `gate.answer`, holding the answer for the replicas too when `repl` replicates the heap: for
/// the write it made, or (`pending`) the last write still waiting for them. `Err`: replication
/// failed (the write applied here was not recorded for shipping): the answer says
/// `Unavailable`, and the caller's actor must fail (its restart recovers from the op log).
pub fn answer_held<S: HeapOwner, M: GateMsg>(
    repl: Option<&mut ShardRepl>,
    gate: &mut LogGate<S>,
    myself: &ActorRef<M>,
    wrote: u64,
    pending: bool,
    what: impl FnOnce() -> String,
    d: impl FnOnce(u64) -> Deferred,
) -> Result<(), GridError> {
    let (Some(r), Some(s)) = (repl, gate.shard.as_mut()) else {
        gate.answer(myself, wrote, d);
        return Ok(());
    };
    let token = if pending { r.written_or_pending(s.heap_mut()) } else { r.written(s.heap_mut()) };
    match token {
        Ok(Some(t)) => {
            let held = r.hold(t, d(0));
            gate.answer(myself, wrote, move |lsn| Deferred { lsn, answer: held.answer });
            Ok(())
        }
        Ok(None) => {
            gate.answer(myself, wrote, d);
            Ok(())
        }
        Err(e) => {
            let what = what();
            tracing::error!("{what}: replication failed: {e}");
            let err = GridError::Unavailable(format!(
                "{what}: replication failed ({e}); the write may or may not have applied"
            ));
            gate.answer(myself, wrote, move |lsn| {
                let answer = d(lsn).answer;
                Deferred { lsn, answer: Box::new(move |_| answer(Some(&err))) }
            });
            Err(e)
        }
    }
}

/// What replication hands a service actor (its messages of these kinds go to `ServiceRepl::on`).
pub enum ServiceEvent {
    Placement(Placement),
    Frame(NodeId, ReplWire),
    Tick,
}

/// A service's replication on this node: opened once the map places the service.
pub struct ServiceRepl {
    service: &'static str,
    net: Arc<ReplNet>,
    path: PathBuf,
    fsync: FsyncPolicy,
    repl: Option<Box<ShardRepl>>,
}

impl ServiceRepl {
    pub fn new(service: &'static str, net: Arc<ReplNet>, path: PathBuf, fsync: FsyncPolicy) -> ServiceRepl {
        ServiceRepl { service, net, path, fsync, repl: None }
    }

    /// The service's replication, opened over `store`'s heap once the map places it; `tick`
    /// sends the actor its replication tick.
    pub fn ensure<S: HeapOwner>(
        &mut self,
        store: Option<&mut S>,
        tick: impl Fn() -> bool + Send + 'static,
    ) -> Result<(), GridError> {
        if self.repl.is_some() || self.net.placement(self.service, 0).is_none() {
            return Ok(());
        }
        let Some(store) = store else { return Ok(()) };
        let r = ShardRepl::open(
            self.net.clone(),
            self.service,
            0,
            store.heap_mut(),
            &self.path,
            self.fsync,
            tick,
        )?;
        self.repl = Some(Box::new(r));
        Ok(())
    }

    /// Whether a request may run here now: this node is the service's primary under a lease.
    pub fn admit(&mut self) -> Result<(), GridError> {
        match self.repl.as_mut() {
            Some(r) => r.admit(),
            None => Err(GridError::Unavailable(format!(
                "the cluster has not placed the {} service yet",
                self.service.trim_start_matches('$')
            ))),
        }
    }

    /// Whether this node is the service's primary (leased or not).
    pub fn primary(&self) -> bool {
        self.repl.as_ref().is_some_and(|r| r.serving())
    }

    /// The service's epoch in the map (it rises at every failover and planned move).
    pub fn map_epoch(&self) -> Epoch {
        self.net.placement(self.service, 0).map_or(0, |p| p.epoch)
    }

    /// `NotPrimary`, naming the service's primary as the map has it.
    pub fn not_primary(&self) -> GridError {
        let map = self.net.map.borrow();
        let primary = map.placement(&(self.service.to_string(), 0)).map(|p| p.primary);
        let addr = primary.and_then(|p| map.member(p)).map(|m| m.addr.clone());
        GridError::NotPrimary { table: self.service.to_string(), shard: 0, primary, addr }
    }

    /// The node's replication network.
    pub fn net(&self) -> &Arc<ReplNet> {
        &self.net
    }

    pub fn repl(&mut self) -> Option<&mut ShardRepl> {
        self.repl.as_deref_mut()
    }

    /// A placement, a frame or the tick: replication opened first if the map places the
    /// service now (`tick` sends the actor its replication tick). The caller then checks its
    /// role (`should_load`, `should_drop`).
    pub fn on<S: HeapOwner>(
        &mut self,
        mut store: Option<&mut S>,
        ev: ServiceEvent,
        tick: impl Fn() -> bool + Send + 'static,
    ) -> Result<(), GridError> {
        if !matches!(ev, ServiceEvent::Tick) {
            self.ensure(store.as_deref_mut(), tick)?;
        }
        let (Some(r), Some(s)) = (self.repl.as_mut(), store) else { return Ok(()) };
        match ev {
            ServiceEvent::Placement(p) => {
                r.on_placement(s.heap_mut(), &p);
                Ok(())
            }
            ServiceEvent::Frame(from, wire) => r.on_frame(s.heap_mut(), from, wire),
            ServiceEvent::Tick => r.tick(s.heap_mut()),
        }
    }

    /// After each message of the service actor: what was written is recorded for shipping (a
    /// timer's writes too) and shipped once the op log has it.
    pub fn after<S: HeapOwner>(&mut self, store: Option<&mut S>) -> Result<(), GridError> {
        if let (Some(r), Some(s)) = (self.repl.as_mut(), store) {
            r.written(s.heap_mut())?;
            r.ship(s.heap_mut())?;
        }
        Ok(())
    }

    /// The service's memory should be loaded now (it became the primary under a lease).
    pub fn should_load(&mut self, loaded: bool) -> bool {
        !loaded && self.admit().is_ok()
    }

    /// The service's memory should be dropped now (another node is the primary).
    pub fn should_drop(&self, loaded: bool) -> bool {
        loaded && !self.primary()
    }

    /// The digest of this node's copy.
    pub fn digest<S: HeapOwner>(&self, store: Option<&S>) -> Result<super::shard::ShardDigest, GridError> {
        match (self.repl.as_ref(), store) {
            (Some(r), Some(s)) => r.digest(s.heap()),
            _ => Err(GridError::Unavailable(format!("the {} service is not replicated here", self.service))),
        }
    }
}
