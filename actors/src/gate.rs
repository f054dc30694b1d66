//! The reply gate shared by every actor that owns a heap (table shards, feed shards, the lock
//! and queue services): replies
//! held until the op-log records they depend on are written (and, under `FsyncPolicy::Always`,
//! synced), the per-shard durable-reply task, the published read view, and the checkpoint in
//! flight. The actor around it applies writes with their records queued
//! (`Heap::apply_deferred`), asks `LogGate::answer` to send each reply, and forwards the two
//! messages the gate sends itself (`GateMsg::flush`, `GateMsg::durable`) back to it.
//!
//! Invariant: a reply is sent for a write only after its record is durable under the policy.
//! Invariant: a read is answered only once every write it could see is as durable as a write's
//! acknowledgement requires: after the group's op-log write, and under `Always` after its fsync.
//! That includes records no answer waits for (a timer's expiries): while the heap holds any not
//! yet written (`Heap::has_unlogged`), `answer` holds every reply for the next flush.
//! Invariant: if the actor dies, every reply port it held is dropped, so every caller gets an
//! error instead of waiting forever.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use heapgrid_heap::{CheckpointJob, Durability, FsyncPolicy, Heap, Published, Snapshot};
use ractor::{ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::mpsc;

use crate::error::GridError;

type Reply<T> = RpcReplyPort<Result<T, GridError>>;

/// Pages one step of online compaction reads (`Heap::compact_step`), one step per periodic
/// checkpoint (16 MiB of pages; the actor serves nothing else meanwhile, for a time not
/// measured yet): a pass over a shard of 100k pages takes 25 checkpoints.
pub const COMPACT_STEP_VISITS: u64 = 4096;

/// How long a (re)starting shard waits for the previous holder of its heap's lock: the
/// previous incarnation's state being dropped, readers finishing with its snapshots, or its
/// checkpoint write-back (a file's lock is held while any of them can still touch the file).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Opens (recovering) a shard's heap at `path`, creating its directory. After a crash the
/// previous incarnation's state (and its file lock) may still be being dropped while the new one
/// starts: this waits for it briefly rather than fail the restart.
pub async fn open_heap(
    path: &std::path::Path,
    opts: &heapgrid_heap::HeapOptions,
) -> Result<Heap, ActorProcessingErr> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    hold_recovery(path, opts.progress.as_deref()).await;
    let started = tokio::time::Instant::now();
    loop {
        // Recovery (the op-log replay) is long work: off the runtime's own threads, so that
        // every shard recovers in parallel (their supervisors start them all at once).
        match blocking(|| Heap::open(path, opts.clone())) {
            Err(heapgrid_heap::Error::Locked(_)) if started.elapsed() < LOCK_WAIT => {
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            r => {
                let heap = r?;
                let report = heap.replay_report();
                if report.records_replayed > 0 {
                    tracing::info!(
                        heap = %path.display(),
                        records = report.records_replayed,
                        ms = started.elapsed().as_millis() as u64,
                        "recovered: op log replayed"
                    );
                }
                return Ok(heap);
            }
        }
    }
}

/// The test hook that holds a shard in its recovery (tests/it/recovery.rs):
/// `HEAPGRID_TEST_HOLD_RECOVERY=<part of a heap path>:<file>` keeps every heap whose path
/// contains the part from opening while the file exists, shown as a replay under way (callers
/// wait for it as for any start in flight, `ShardSlot::give_up`). Unset (always, outside
/// tests), it costs one environment lookup per heap opened.
async fn hold_recovery(path: &std::path::Path, progress: Option<&heapgrid_heap::ReplayProgress>) {
    let Ok(hook) = std::env::var("HEAPGRID_TEST_HOLD_RECOVERY") else { return };
    let Some((part, file)) = hook.split_once(':') else { return };
    if !path.to_string_lossy().contains(part) {
        return;
    }
    if let Some(p) = progress {
        p.start(0);
    }
    tracing::warn!(heap = %path.display(), hold = file, "recovery held by HEAPGRID_TEST_HOLD_RECOVERY");
    while std::path::Path::new(file).exists() {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if let Some(p) = progress {
        p.end();
    }
}

/// What owns the heap behind a gate (a table shard, a feed shard).
pub trait HeapOwner: Send + 'static {
    fn heap(&self) -> &Heap;
    fn heap_mut(&mut self) -> &mut Heap;
    fn into_heap(self) -> Heap;
}

/// The two messages a gate sends to its own actor.
pub trait GateMsg: ractor::Message {
    /// Write the queued op-log records and answer their requests (`LogGate::flush`).
    fn flush() -> Self;
    /// Synced groups from the durable-reply task (`LogGate::durable`).
    fn durable(groups: Vec<Group>) -> Self;
    /// The background checkpoint's write-back ended (`LogGate::finish_checkpoint`).
    fn checkpoint_done() -> Self;
    /// Drop up to `want` bytes of the heap's clean resident pages (`Heap::shed`), answering
    /// what was resident and what was dropped: the memory budget's pager (`memory`).
    fn shed(want: u64, reply: Reply<heapgrid_heap::ShedReport>) -> Self;
    /// The message as one the gate handles itself (`LogGate::handle`), or back as it was.
    fn into_gate(self) -> Result<GateCall, Self>;
}

/// Implements `GateMsg` for an actor's message enum that has the gate's six variants under
/// their usual names: `Flush`, `Durable(Vec<Group>)`, `Checkpoint(Option<Reply<()>>)`,
/// `CheckpointDone`, `Close(Reply<()>)`, `Stats(Reply<HeapStats>)` and
/// `Shed(u64, Reply<ShedReport>)`.
macro_rules! impl_gate_msg {
    ($msg:ident) => {
        impl $crate::gate::GateMsg for $msg {
            fn flush() -> Self {
                $msg::Flush
            }
            fn durable(groups: Vec<$crate::gate::Group>) -> Self {
                $msg::Durable(groups)
            }
            fn checkpoint_done() -> Self {
                $msg::CheckpointDone
            }
            fn shed(
                want: u64,
                reply: ractor::RpcReplyPort<Result<heapgrid_heap::ShedReport, $crate::error::GridError>>,
            ) -> Self {
                $msg::Shed(want, reply)
            }
            fn into_gate(self) -> Result<$crate::gate::GateCall, Self> {
                use $crate::gate::GateCall;
                match self {
                    $msg::Flush => Ok(GateCall::Flush),
                    $msg::Durable(groups) => Ok(GateCall::Durable(groups)),
                    $msg::Checkpoint(reply) => Ok(GateCall::Checkpoint(reply)),
                    $msg::CheckpointDone => Ok(GateCall::CheckpointDone),
                    $msg::Close(reply) => Ok(GateCall::Close(reply)),
                    $msg::Stats(reply) => Ok(GateCall::Stats(reply)),
                    $msg::Shed(want, reply) => Ok(GateCall::Shed(want, reply)),
                    msg => Err(msg),
                }
            }
        }
    };
}
pub(crate) use impl_gate_msg;

/// Implements `HeapOwner` for a state machine whose heap is its field `heap`.
macro_rules! impl_heap_owner {
    ($owner:ty) => {
        impl $crate::gate::HeapOwner for $owner {
            fn heap(&self) -> &heapgrid_heap::Heap {
                &self.heap
            }
            fn heap_mut(&mut self) -> &mut heapgrid_heap::Heap {
                &mut self.heap
            }
            fn into_heap(self) -> heapgrid_heap::Heap {
                self.heap
            }
        }
    };
}
pub(crate) use impl_heap_owner;

/// The messages every heap-owning actor hands to its gate, whatever its own message type.
pub enum GateCall {
    /// See `GateMsg::flush`.
    Flush,
    /// See `GateMsg::durable`.
    Durable(Vec<Group>),
    /// Checkpoint: the periodic one in the background (`None`), or now, answering the port.
    Checkpoint(Option<Reply<()>>),
    /// See `GateMsg::checkpoint_done`.
    CheckpointDone,
    /// Checkpoint and close the heap (releasing its file lock); later operations get `Closed`.
    Close(Reply<()>),
    /// The heap's figures (`Heap::stats`: pages, bytes, resident bytes).
    Stats(Reply<heapgrid_heap::HeapStats>),
    /// See `GateMsg::shed`.
    Shed(u64, Reply<heapgrid_heap::ShedReport>),
}

/// What readers on other tasks see of a shard: its newest published snapshot, and the highest
/// LSN acknowledged to a writer. A snapshot older than that is stale (a caller that saw its
/// write acknowledged must read it back), and the read goes to the actor instead.
///
/// Snapshots are captured only while someone reads: after a group commit when a read went to
/// the actor since the last capture, or at once when such a read finds nothing to flush. A
/// write-only load therefore pays no capture (no sealing, and pages stay writable until the next
/// checkpoint); a mixed load pays at most one per group.
#[derive(Default)]
pub struct ReadView {
    published: Published<Snapshot>,
    acked: std::sync::atomic::AtomicU64,
    /// Set while the shard is replicated and this node may not serve it (not its primary, or
    /// without a lease): reads then go to the actor, which refuses them.
    withheld: std::sync::atomic::AtomicBool,
    /// Messages callers sent the actor, and those it took from its mailbox: their difference is
    /// its mailbox depth (ractor does not tell it), a metric.
    sent: std::sync::atomic::AtomicU64,
    handled: std::sync::atomic::AtomicU64,
}

impl ReadView {
    /// A caller sent the actor a message (the actor counts it with `note_handled`).
    pub fn note_sent(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }

    /// A message counted by `note_sent` could not be sent after all.
    pub fn note_unsent(&self) {
        self.sent.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn note_handled(&self) {
        self.handled.fetch_add(1, Ordering::Relaxed);
    }

    /// Messages sent and not yet taken by the actor (a message sent to an actor that stopped
    /// is never taken: a restart starts the count again, `reset_mailbox`).
    pub fn mailbox_depth(&self) -> u64 {
        let handled = self.handled.load(Ordering::Relaxed);
        self.sent.load(Ordering::Relaxed).saturating_sub(handled)
    }

    /// A new actor took over the shard: what the old one left in its mailbox is gone.
    pub fn reset_mailbox(&self) {
        self.handled.store(self.sent.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Whether this node serves the shard's reads from snapshots (a replicated shard: only
    /// while it is the primary holding a lease; the actor updates it every tick).
    pub fn set_serving(&self, serving: bool) {
        self.withheld.store(!serving, Ordering::Release);
    }

    /// The published snapshot, if it holds every acknowledged write.
    pub fn fresh(&self) -> Option<Arc<Snapshot>> {
        if self.withheld.load(Ordering::Acquire) {
            return None;
        }
        let need = self.acked.load(Ordering::Acquire);
        self.published.load().filter(|s| s.lsn() >= need)
    }

    /// Called before writes up to `lsn` are answered (after a newer snapshot, if any, is
    /// published). A published snapshot this makes stale is withdrawn: nobody may read it any
    /// more, and while it lived the pages it reaches could not be reused.
    fn acknowledge(&self, lsn: u64) {
        let before = self.acked.fetch_max(lsn, Ordering::AcqRel);
        if lsn > before && self.published.load().is_some_and(|s| s.lsn() < lsn) {
            self.published.clear();
        }
    }
}

/// Replies waiting for an fsync (under `Always`), with the snapshot to publish once it is done.
pub struct Group {
    snapshot: Option<Arc<Snapshot>>,
    pub replies: Vec<Deferred>,
    /// The LSN the fsync must cover.
    upto: u64,
}

/// Withdraws the shard's published snapshot when its state is dropped (the actor stopped or
/// died), before the heap is closed: readers then ask the actor's successor, and no snapshot of
/// this incarnation outlives it in the cell.
struct Unpublish(Arc<ReadView>);

impl Drop for Unpublish {
    fn drop(&mut self) {
        self.0.published.clear();
    }
}

/// A reply held until the op log is written (and, under `Always`, synced) up to `lsn`. `answer`
/// sends it, or, given an error, sends that instead.
pub struct Deferred {
    pub lsn: u64,
    pub answer: Answer,
}

/// Sends a held reply, or the given error instead.
pub type Answer = Box<dyn FnOnce(Option<&GridError>) + Send>;

pub fn deferred<T: Send + 'static>(lsn: u64, port: Reply<T>, r: Result<T, GridError>) -> Deferred {
    Deferred {
        lsn,
        answer: Box::new(move |err| {
            let _ = port.send(match err {
                None => r,
                Some(e) => Err(e.clone()),
            });
        }),
    }
}

/// A shard's heap owner and the replies waiting for its op log.
pub struct LogGate<S> {
    /// First, so it is dropped (and the snapshot withdrawn) before the heap closes.
    _unpublish: Unpublish,
    view: Arc<ReadView>,
    /// A read came to the actor since the last capture: capture at the next chance.
    readers: bool,
    /// `None` once closed.
    pub shard: Option<S>,
    /// Under `Always`: the durable-reply task and the handle it syncs through.
    durable: Option<(mpsc::UnboundedSender<Group>, Durability)>,
    /// Replies of requests whose writes (or whose view of others' writes) have op-log records
    /// still queued in memory: sent after `Flush`.
    unflushed: Vec<Deferred>,
    flush_scheduled: bool,
    /// The write-back of a checkpoint begun by this actor, running on the blocking pool.
    checkpoint_task: Option<tokio::task::JoinHandle<(CheckpointJob, heapgrid_heap::Result<()>)>>,
    /// What log lines call it (its heap's path: `named`).
    name: Arc<str>,
}

/// A checkpoint whose begin paused the actor longer than this, or whose write-back took longer
/// than `CHECKPOINT_WRITE_LOG_MS`, is logged (the metrics have every one).
const CHECKPOINT_PAUSE_LOG_MS: u128 = 100;
const CHECKPOINT_WRITE_LOG_MS: u128 = 2_000;

impl<S: HeapOwner> LogGate<S> {
    /// The gate of a shard whose heap was just opened (recovered): publishes what recovery
    /// rebuilt for readers, and under `Always` starts the durable-reply task.
    pub fn new<M: GateMsg>(
        mut shard: S,
        fsync: FsyncPolicy,
        view: Arc<ReadView>,
        myself: ActorRef<M>,
    ) -> Result<Self, ActorProcessingErr> {
        let durable = match (fsync, shard.heap().durability()) {
            (FsyncPolicy::Always, Some(d)) => Some((spawn_durable_replies(d.clone(), myself), d)),
            _ => None,
        };
        view.published.publish(Arc::new(shard.heap_mut().capture()?));
        Ok(LogGate {
            _unpublish: Unpublish(view.clone()),
            view,
            readers: false,
            shard: Some(shard),
            durable,
            unflushed: Vec::new(),
            flush_scheduled: false,
            checkpoint_task: None,
            name: "a heap".into(),
        })
    }

    /// Handles one of the gate's own messages. An error fails the actor (the supervisor then
    /// reopens the heap: restart is recovery).
    pub async fn handle<M: GateMsg>(
        &mut self,
        myself: &ActorRef<M>,
        call: GateCall,
    ) -> Result<(), ActorProcessingErr> {
        match call {
            GateCall::Flush => {
                self.flush()?;
                self.checkpoint_if_tail_long(myself)
            }
            GateCall::Durable(groups) => {
                self.durable(groups);
                Ok(())
            }
            GateCall::Checkpoint(None) => self.begin_checkpoint(myself),
            GateCall::CheckpointDone => {
                self.finish_checkpoint().await?;
                fail_if_poisoned(self)
            }
            GateCall::Checkpoint(Some(reply)) => {
                let r = self.checkpoint_now().await?;
                let _ = reply.send(r);
                Ok(())
            }
            GateCall::Close(reply) => {
                let r = self.close().await?;
                let _ = reply.send(r);
                Ok(())
            }
            GateCall::Stats(reply) => {
                let r = self.shard.as_ref().map(|s| s.heap().stats()).ok_or(GridError::Closed);
                let _ = reply.send(r);
                Ok(())
            }
            GateCall::Shed(want, reply) => {
                let r = self
                    .shard
                    .as_mut()
                    .map(|s| {
                        let heap = s.heap_mut();
                        if want > 0 {
                            // A heap the budget pages out is read back page by page: no
                            // read-around bringing cold neighbours in with each page.
                            heap.set_random_access(true);
                        }
                        heap.shed(want)
                    })
                    .ok_or(GridError::Closed);
                let _ = reply.send(r);
                Ok(())
            }
        }
    }

    /// Begins a background checkpoint now if the op log written since the last one passed its
    /// bound (`Heap::log_tail_due`), so a crash never leaves more than about that to replay, whatever
    /// the write rate (the timer alone lets the tail grow with the rate times the interval).
    fn checkpoint_if_tail_long<M: GateMsg>(
        &mut self,
        myself: &ActorRef<M>,
    ) -> Result<(), ActorProcessingErr> {
        match self.shard.as_ref() {
            Some(t) if self.checkpoint_task.is_none() && t.heap().log_tail_due() => {
                self.start_checkpoint(myself)
            }
            _ => Ok(()),
        }
    }

    /// The periodic checkpoint: begun here, written back on the blocking pool while the actor
    /// goes on serving (`GateMsg::checkpoint_done` finishes it); skipped while the previous one
    /// is still in flight. An error that did not poison the heap (a full disk while reserving
    /// the free list) leaves it serving; the next tick tries again.
    fn begin_checkpoint<M: GateMsg>(&mut self, myself: &ActorRef<M>) -> Result<(), ActorProcessingErr> {
        if self.checkpoint_task.is_none()
            && let Some(t) = self.shard.as_mut()
        {
            // A step of online compaction first, so the checkpoint cuts what it freed (an error
            // that did not poison the heap, a full disk, is tried again at the next tick).
            let _ = t.heap_mut().compact_step(COMPACT_STEP_VISITS);
        }
        self.start_checkpoint(myself)
    }

    /// Begins a background checkpoint unless one is in flight (`begin_checkpoint` without the
    /// compaction step).
    fn start_checkpoint<M: GateMsg>(&mut self, myself: &ActorRef<M>) -> Result<(), ActorProcessingErr> {
        let began = std::time::Instant::now();
        if self.checkpoint_task.is_none()
            && let Some(t) = self.shard.as_mut()
            && let Ok(Some(job)) = t.heap_mut().begin_checkpoint()
        {
            let pause = began.elapsed().as_millis();
            let name = self.name.clone();
            if pause > CHECKPOINT_PAUSE_LOG_MS {
                tracing::warn!(heap = %name, pause_ms = pause as u64, "a checkpoint's begin paused the shard");
            }
            let me = myself.clone();
            self.checkpoint_task = Some(tokio::task::spawn_blocking(move || {
                let written = std::time::Instant::now();
                let r = job.run();
                let ms = written.elapsed().as_millis();
                if ms > CHECKPOINT_WRITE_LOG_MS {
                    let pages = job.bytes() / heapgrid_heap::PAGE_SIZE as u64;
                    tracing::warn!(heap = %name, ms = ms as u64, pages, "a slow checkpoint write-back");
                }
                let _ = me.cast(M::checkpoint_done());
                (job, r)
            }));
        }
        fail_if_poisoned(self)
    }

    /// Names it in log lines (its heap's path).
    pub fn named(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Everything applied so far, durable when this returns: after any in-flight checkpoint,
    /// one more on this thread (letting the runtime move other tasks off). The outer error
    /// fails the actor; the inner one is the caller's answer.
    async fn checkpoint_now(&mut self) -> Result<Result<(), GridError>, ActorProcessingErr> {
        self.finish_checkpoint().await?;
        let r = match self.shard.as_mut() {
            Some(t) => blocking(|| t.heap_mut().checkpoint()).map_err(GridError::from),
            None => Err(GridError::Closed),
        };
        fail_if_poisoned(self)?;
        Ok(r)
    }

    /// Checkpoints and closes the heap (releasing its file lock); readers go to the actor (and
    /// get `Closed`) from now on.
    async fn close(&mut self) -> Result<Result<(), GridError>, ActorProcessingErr> {
        self.finish_checkpoint().await?;
        self.flush()?;
        self.view.published.clear();
        let r = match self.shard.take() {
            Some(t) => t.into_heap().close().map_err(GridError::from),
            None => Ok(()),
        };
        self.durable = None;
        Ok(r)
    }

    /// Writes the queued op-log records, then answers (or, under `Always`, hands to the
    /// durable-reply task) every request they belong to. On failure every one of them gets the
    /// error, and the caller fails the actor: the heap is poisoned and a restart recovers it.
    pub fn flush(&mut self) -> Result<(), ActorProcessingErr> {
        self.flush_scheduled = false;
        let r = match self.shard.as_mut() {
            Some(t) => t.heap_mut().flush_log().map_err(GridError::from),
            None => Ok(()),
        };
        let waiting = std::mem::take(&mut self.unflushed);
        // Everything applied so far is logged: capture it for readers, if any.
        let readers = std::mem::take(&mut self.readers);
        let snapshot = r.and_then(|_| match self.shard.as_mut() {
            Some(t) if readers => t.heap_mut().capture().map(|s| Some(Arc::new(s))).map_err(GridError::from),
            _ => Ok(None),
        });
        let snapshot = match snapshot {
            Ok(s) => s,
            Err(e) => {
                let e = GridError::Unavailable(format!("write not logged: {e}"));
                for d in waiting {
                    (d.answer)(Some(&e));
                }
                return Err(format!("op log write failed: {e}").into());
            }
        };
        match &self.durable {
            Some((tx, _)) => {
                // Published and answered once synced (`ShardMsg::Durable`).
                let upto = waiting
                    .iter()
                    .map(|d| d.lsn)
                    .chain(snapshot.as_ref().map(|s| s.lsn()))
                    .max()
                    .unwrap_or(0);
                if let Err(mpsc::error::SendError(g)) = tx.send(Group { snapshot, replies: waiting, upto }) {
                    let e = GridError::Unavailable("durable-reply task ended".into());
                    for d in g.replies {
                        (d.answer)(Some(&e));
                    }
                }
            }
            None => {
                if let Some(s) = snapshot {
                    self.view.published.publish(s);
                }
                let written = waiting.iter().map(|d| d.lsn).max().unwrap_or(0);
                self.view.acknowledge(written);
                for d in waiting {
                    (d.answer)(None);
                }
            }
        }
        Ok(())
    }

    /// A read came to the actor: make the next readers' snapshot fresh. Now, if nothing waits
    /// for the op log (and under `Always`, everything applied is synced); else at the next flush.
    pub fn read_seen(&mut self) {
        self.readers = true;
        let Some(t) = self.shard.as_mut() else { return };
        // Never a snapshot holding a write whose record is not yet written.
        if self.flush_scheduled || t.heap().has_unlogged() {
            return;
        }
        let synced = match &self.durable {
            Some((_, d)) => d.durable_lsn() >= t.heap().last_lsn(),
            None => true,
        };
        if synced && let Ok(s) = t.heap_mut().capture() {
            self.view.published.publish(Arc::new(s));
            self.readers = false;
        }
    }

    /// Waits for the checkpoint in flight, if any, and finishes it. A failed write-back poisons
    /// the heap (which `fail_if_poisoned` turns into a restart); a write-back task that panicked
    /// fails the actor at once, so the supervisor reopens the heap.
    pub async fn finish_checkpoint(&mut self) -> Result<(), ActorProcessingErr> {
        let Some(task) = self.checkpoint_task.take() else { return Ok(()) };
        let (job, r) = task.await.map_err(|e| format!("checkpoint write-back task failed: {e}"))?;
        if let Some(t) = self.shard.as_mut() {
            // An error here has poisoned the heap; the caller checks.
            let _ = t.heap_mut().finish_checkpoint(job, r);
        }
        Ok(())
    }

    /// Synced groups: publish the newest snapshot among them, then answer every reply.
    pub fn durable(&mut self, groups: Vec<Group>) {
        if let Some(s) = groups.iter().rev().find_map(|g| g.snapshot.clone()) {
            self.view.published.publish(s);
        }
        self.view.acknowledge(groups.iter().map(|g| g.upto).max().unwrap_or(0));
        for g in groups {
            for d in g.replies {
                (d.answer)(None);
            }
        }
    }

    /// Sends a reply whose op-log records are written: at once, or under `Always` through the
    /// durable-reply task once they are synced.
    pub fn release(&self, d: Deferred) {
        match &self.durable {
            Some((tx, durability)) if d.lsn > durability.durable_lsn() => {
                let upto = d.lsn;
                if let Err(mpsc::error::SendError(g)) =
                    tx.send(Group { snapshot: None, replies: vec![d], upto })
                {
                    for d in g.replies {
                        (d.answer)(Some(&GridError::Unavailable("durable-reply task ended".into())));
                    }
                }
            }
            _ => {
                // What this reply saw may be newer than the published snapshot (under `Always`
                // it became durable just now): later reads must not see less.
                self.view.acknowledge(d.lsn);
                (d.answer)(None)
            }
        }
    }

    /// Answers a request now or once what it wrote or saw is as durable as a write's
    /// acknowledgement: `wrote` is the LSN it wrote (0: none).
    pub fn answer<M: GateMsg>(&mut self, myself: &ActorRef<M>, wrote: u64, d: impl FnOnce(u64) -> Deferred) {
        let (last, unlogged) =
            self.shard.as_ref().map_or((0, false), |t| (t.heap().last_lsn(), t.heap().has_unlogged()));
        if wrote == 0 && !self.flush_scheduled && !unlogged {
            // A read (or a write that changed nothing): it saw only written records; under
            // `Always` it waits for them to be synced.
            self.release(d(last));
            return;
        }
        // What it wrote, or records queued that no answer waited for (a timer's expiries, a
        // restart's repairs): answered after the flush that writes them.
        self.unflushed.push(d(last.max(wrote)));
        if !self.flush_scheduled {
            self.flush_scheduled = true;
            if myself.cast(M::flush()).is_err() {
                // Only while stopping; the flush below answers everything queued.
                let _ = self.flush();
            }
        }
    }
}

/// A service actor over one heap behind a gate (the lock and queue services): what
/// `handle_gated` needs of it.
pub trait GatedService: Send + 'static {
    type Store: HeapOwner;
    type Msg: GateMsg;
    /// Names it in the reason of a failure ("the lock service").
    const WHAT: &'static str;
    fn gate(&mut self) -> &mut LogGate<Self::Store>;
    /// Answers a message that asks for an answer `Closed` (the heap is closed).
    fn refuse(msg: Self::Msg);
    /// Handles one message. An error means memory may be ahead of the heap (a record that
    /// could not be written or read): the actor fails, and its restart is recovery.
    fn serve(&mut self, myself: &ActorRef<Self::Msg>, msg: Self::Msg) -> Result<(), GridError>;
}

/// The whole `Actor::handle` of a `GatedService`: the gate's own messages to the gate; with the
/// heap closed, refusals; else `serve`, then a failure if it failed or the heap is poisoned.
pub async fn handle_gated<T: GatedService>(
    st: &mut T,
    myself: &ActorRef<T::Msg>,
    msg: T::Msg,
) -> Result<(), ActorProcessingErr> {
    let msg = match msg.into_gate() {
        Ok(call) => return st.gate().handle(myself, call).await,
        Err(m) => m,
    };
    if st.gate().shard.is_none() {
        T::refuse(msg);
        return Ok(());
    }
    if let Err(e) = st.serve(myself, msg) {
        return Err(format!("{}: {e}", T::WHAT).into());
    }
    fail_if_poisoned(st.gate())
}

pub fn fail_if_poisoned<S: HeapOwner>(state: &mut LogGate<S>) -> Result<(), ActorProcessingErr> {
    match state.shard.as_ref().and_then(|t| t.heap().poisoned().map(str::to_string)) {
        Some(why) => {
            // Whatever waits for the op log would wait for a heap that is gone.
            let e = GridError::Unavailable(format!("heap failed closed: {why}"));
            for d in std::mem::take(&mut state.unflushed) {
                (d.answer)(Some(&e));
            }
            Err(format!("heap failed closed: {why}").into())
        }
        None => Ok(()),
    }
}

/// Runs blocking work (a checkpoint's flushes) so the runtime can move other tasks off this
/// worker; on a current-thread runtime there is nowhere to move them, so it just runs.
pub fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The durable-reply task of a shard under `FsyncPolicy::Always`: one fsync per drained batch
/// of groups, then the groups go back to the actor, which publishes and answers (it is the only
/// publisher, so nothing is published after it stopped).
pub fn spawn_durable_replies<M: GateMsg>(
    durability: Durability,
    actor: ActorRef<M>,
) -> mpsc::UnboundedSender<Group> {
    // Not bounded here: each group holds the replies of requests already in the shard's mailbox
    // (one group per `Flush`, plus reads released under `Always`), so what bounds the mailbox
    // (the connections' in-flight limits; ractor's mailbox itself is unbounded) bounds this.
    let (tx, mut rx) = mpsc::unbounded_channel::<Group>();
    tokio::spawn(async move {
        let mut groups = Vec::new();
        while let Some(first) = rx.recv().await {
            groups.push(first);
            while let Ok(more) = rx.try_recv() {
                groups.push(more);
            }
            let upto = groups.iter().map(|g| g.upto).max().unwrap_or(0);
            let d = durability.clone();
            let synced = tokio::task::spawn_blocking(move || d.wait(upto)).await;
            let err = match synced {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => {
                    Some(GridError::Unavailable(format!("write not durable: {}", GridError::from(e))))
                }
                Err(e) => Some(GridError::Unavailable(format!("write not durable: fsync task failed: {e}"))),
            };
            match err {
                None => {
                    // A stopped actor drops the groups: their callers get an error.
                    let _ = actor.send_message(M::durable(std::mem::take(&mut groups)));
                }
                Some(e) => {
                    for d in groups.drain(..).flat_map(|g| g.replies) {
                        (d.answer)(Some(&e));
                    }
                }
            }
        }
    });
    tx
}
