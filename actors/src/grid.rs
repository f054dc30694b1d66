//! `GridCore`: the running grid inside one process. It owns the data directory (an exclusive
//! lock file), the persisted catalogue of tables and feeds, and the supervisor tree:
//!
//! ```text
//! RootSupervisor ── TableSupervisor (one per table) ── ShardActor (one per shard, owns a heap)
//!                ├─ OneChild<FeedChild> (one per feed) ── FeedActor (owns the feed's heap)
//!                ├─ OneChild<LockChild> ── LockActor (the node's lock service, owns the lock heap)
//!                ├─ OneChild<QueueChild> ── QueueActor (the node's queue service, owns the queue heap)
//!                ├─ MemoryPager (with a memory budget: drops clean heap pages to stay under it)
//!                └─ Checkpointer (checkpoints every running table, feed and service heap on a schedule)
//! ```
//!
//! Layout of the data directory:
//!
//! ```text
//! <dir>/LOCK                          exclusive flock while a grid has it open
//! <dir>/catalog.heap (+ .log.*)       table name -> TableDef, "feed/" name -> FeedDef,
//!                                     "proc/" module -> source (Values), fsync always
//! <dir>/tables/<name>-<id>/shard-NNNN.heap   one heap (and its op log) per shard; <id> is
//!                                          unique per creation (see `TableDef::dir`)
//! <dir>/feeds/<name>-<id>/shard-0000.heap    a feed's heap (docs/format.md, feed shards)
//! <dir>/locks/shard-0000.heap               the lock heap: sessions, locks, semaphores, the
//!                                           lock epoch (docs/format.md, the lock heap)
//! ```
//!
//! Invariant: a table or feed is in the catalogue (durably) before its supervisor starts, and removed
//! from it before its files are deleted.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use heapgrid_heap::{FsyncPolicy, Heap, HeapOptions};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::error::GridError;
use crate::feed::actor::FeedMsg;
pub use crate::feed::def::{FeedDef, FeedInfo, FeedOptions, Retention};
pub use crate::feed::runtime::FeedRuntime;
use crate::feed::supervisor::FeedChild;
use crate::key::Key;
use crate::limits::TABLE_SHARDS_MAX;
use crate::lock::actor::LockMsg;
use crate::lock::supervisor::{LockChild, Locks};
use crate::queue::actor::QueueMsg;
use crate::queue::supervisor::{QueueChild, Queues};
use crate::restart::RestartPolicy;
use crate::snippet::{Engine, LimitOverrides, Limits, ScanQuery, Snippets, Store};
use crate::supervise::{OneChild, OneChildArgs, OneChildMsg, shut_down};
use crate::table::WriteOp;
use crate::table::actor::{EvalJob, ShardMsg, scan_range};
pub use crate::table::def::{FsyncSetting, TableDef, TableInfo, TableOptions};
use crate::table::def::{incarnation_dir, valid_name};
pub use crate::table::runtime::TableRuntime;
use crate::table::supervisor::{ShardSlot, SlotState, TableSupArgs, TableSupMsg, TableSupervisor};
use crate::value::Value;

/// Default time between checkpoints. The op log makes writes durable; checkpoints only bound
/// how much log a restart after a crash replays. Frequent checkpoints cost a lot under random
/// writes: every touched page is copied and flushed once per checkpoint, and the checkpoint
/// stops the shard's writers. Measured with `heapgrid bench` (50 connections, random puts over
/// 1M keys): at 1 s, 24k puts/s one at a time and a p99 of 438 ms with 16 in flight; at 30 s,
/// 36k puts/s and a p99 of 35 ms.
/// 10 s bounds replay after a crash while keeping most of that gain.
pub const CHECKPOINT_INTERVAL_MS_DEFAULT: u64 = 10_000;

/// Options of a whole grid.
#[derive(Clone, Debug)]
pub struct GridOptions {
    /// Default fsync policy of new tables.
    pub fsync: FsyncPolicy,
    /// How often the checkpointer checkpoints every shard.
    pub checkpoint_interval_ms: u64,
    /// A shard also checkpoints once this many bytes of op log were written since its last
    /// checkpoint: the most a crash leaves it to replay (default 64 MiB). Smaller restarts
    /// faster after a crash; under heavy writes it checkpoints more often, writing more pages
    /// per byte logged.
    pub checkpoint_log_bytes: u64,
    /// Restart intensity of shard actors.
    pub restart: RestartPolicy,
    /// Budgets of a snippet that asks for none.
    pub snippet_limits: Limits,
    /// The most budget a snippet may ask for.
    pub snippet_max: Limits,
    /// Where snippets run: `None` in this process (trusted code: the embedded default), or in a
    /// pool of sandbox worker processes.
    pub snippet_sandbox: Option<SandboxOptions>,
    /// The node's memory budget in bytes (`None`: none): resident anonymous memory plus the
    /// heaps' resident pages, held under it by the pager (`memory`) dropping clean pages.
    pub memory_budget: Option<u64>,
}

/// The snippet sandbox: worker processes running the `heapgrid-worker` binary.
#[derive(Clone, Debug)]
pub struct SandboxOptions {
    /// The worker executable.
    pub exe: PathBuf,
    /// Most workers (runs at once).
    pub workers: usize,
}

impl Default for GridOptions {
    fn default() -> Self {
        GridOptions {
            fsync: FsyncPolicy::default(),
            checkpoint_interval_ms: CHECKPOINT_INTERVAL_MS_DEFAULT,
            checkpoint_log_bytes: heapgrid_heap::LOG_TAIL_BYTES_MAX_DEFAULT,
            restart: RestartPolicy::default(),
            snippet_limits: Limits::default(),
            snippet_max: Limits::server_max(),
            snippet_sandbox: None,
            memory_budget: None,
        }
    }
}

type Registry = Arc<RwLock<HashMap<String, Arc<TableRuntime>>>>;
type FeedRegistry = Arc<RwLock<HashMap<String, Arc<FeedRuntime>>>>;

/// Messages of the root supervisor.
enum RootMsg {
    StartTable(TableDef, Arc<Vec<ShardSlot>>, RpcReplyPort<Result<(), GridError>>),
    StopTable(String, RpcReplyPort<Result<(), GridError>>),
    StartFeed(FeedDef, Arc<ShardSlot<FeedMsg>>, RpcReplyPort<Result<(), GridError>>),
    StopFeed(String, RpcReplyPort<Result<(), GridError>>),
    /// Stops and starts the lock and the queue service (joining a cluster: they reopen as its
    /// replicated copies).
    RestartServices(RpcReplyPort<Result<(), GridError>>),
    Shutdown(RpcReplyPort<Result<(), GridError>>),
}

struct RootArgs {
    dir: PathBuf,
    opts: GridOptions,
    registry: Registry,
    feeds: FeedRegistry,
    locks: Arc<Locks>,
    queues: Arc<Queues>,
    /// The node's replication network, once it joined a cluster.
    cluster: ClusterNet,
    /// What the memory pager did (budget 0 without one).
    pager: Arc<crate::memory::PagerStats>,
    counters: Arc<crate::metrics::NodeCounters>,
}

/// Where shard actors find the node's replication network (set when it joins a cluster).
pub type ClusterNet = Arc<std::sync::OnceLock<Arc<crate::replication::shard::ReplNet>>>;

/// A table supervisor under the root, with what it takes to start it again.
struct ChildTable {
    sup: ActorRef<TableSupMsg>,
    def: TableDef,
    slots: Arc<Vec<ShardSlot>>,
}

/// A feed supervisor under the root, with what it takes to start it again.
struct ChildFeed {
    sup: ActorRef<OneChildMsg>,
    def: FeedDef,
    slot: Arc<ShardSlot<FeedMsg>>,
}

struct RootState {
    args: RootArgs,
    tables: HashMap<String, ChildTable>,
    feeds: HashMap<String, ChildFeed>,
    lock_sup: Option<ActorRef<OneChildMsg>>,
    queue_sup: Option<ActorRef<OneChildMsg>>,
}

struct RootSupervisor;

fn table_dir(dir: &Path, def: &TableDef) -> PathBuf {
    dir.join("tables").join(&def.dir)
}

fn feed_dir(dir: &Path, def: &FeedDef) -> PathBuf {
    dir.join("feeds").join(&def.dir)
}

/// The options of a shard's heap under the grid's `opts`.
fn heap_options(args: &RootArgs, fsync: FsyncPolicy) -> HeapOptions {
    HeapOptions {
        fsync,
        log_tail_bytes_max: args.opts.checkpoint_log_bytes.max(1),
        io: Some(args.counters.io.clone()),
        ..HeapOptions::default()
    }
}

impl RootSupervisor {
    async fn start_table(
        myself: &ActorRef<RootMsg>,
        st: &mut RootState,
        def: TableDef,
        slots: Arc<Vec<ShardSlot>>,
    ) -> Result<(), GridError> {
        let heap = heap_options(&st.args, def.fsync.into());
        let args = TableSupArgs {
            table: def.name.clone(),
            dir: table_dir(&st.args.dir, &def),
            heap,
            policy: st.args.opts.restart,
            slots: slots.clone(),
            fences: st.args.locks.fences.clone(),
            cluster: st.args.cluster.clone(),
            counters: st.args.counters.clone(),
        };
        let (sup, _) = TableSupervisor::spawn_linked(None, TableSupervisor, args, myself.get_cell())
            .await
            .map_err(|e| GridError::Storage(format!("could not start table {}: {e}", def.name)))?;
        st.tables.insert(def.name.clone(), ChildTable { sup, def, slots });
        Ok(())
    }

    async fn start_feed(
        myself: &ActorRef<RootMsg>,
        st: &mut RootState,
        def: FeedDef,
        slot: Arc<ShardSlot<FeedMsg>>,
    ) -> Result<(), GridError> {
        let heap = heap_options(&st.args, def.fsync.into());
        let spec = FeedChild {
            def: def.clone(),
            dir: feed_dir(&st.args.dir, &def),
            heap,
            fences: st.args.locks.fences.clone(),
            cluster: st.args.cluster.clone(),
        };
        let args = OneChildArgs {
            spec,
            policy: st.args.opts.restart,
            slot: slot.clone(),
            counters: st.args.counters.clone(),
        };
        let (sup, _) = OneChild::spawn_linked(None, OneChild::default(), args, myself.get_cell())
            .await
            .map_err(|e| GridError::Storage(format!("could not start feed {}: {e}", def.name)))?;
        st.feeds.insert(def.name.clone(), ChildFeed { sup, def, slot });
        Ok(())
    }

    async fn stop_feed(st: &mut RootState, name: &str) -> Result<(), GridError> {
        let Some(ChildFeed { sup, .. }) = st.feeds.remove(name) else { return Ok(()) };
        shut_down(sup, OneChildMsg::Shutdown, &format!("feed {name}")).await
    }

    /// Starts the lock supervisor (and through it the lock service).
    async fn start_locks(myself: &ActorRef<RootMsg>, st: &mut RootState) -> Result<(), ActorProcessingErr> {
        let spec = LockChild {
            dir: st.args.dir.clone(),
            heap: heap_options(&st.args, st.args.opts.fsync),
            fences: st.args.locks.fences.clone(),
            ended: {
                let queues = st.args.queues.clone();
                Arc::new(move |s| queues.session_ended(s))
            },
            cluster: st.args.cluster.clone(),
        };
        let args = OneChildArgs {
            spec,
            policy: st.args.opts.restart,
            slot: st.args.locks.slot().clone(),
            counters: st.args.counters.clone(),
        };
        let (sup, _) = OneChild::spawn_linked(None, OneChild::default(), args, myself.get_cell()).await?;
        st.lock_sup = Some(sup);
        Ok(())
    }

    /// Starts the queue supervisor (and through it the queue service).
    async fn start_queues(myself: &ActorRef<RootMsg>, st: &mut RootState) -> Result<(), ActorProcessingErr> {
        let spec = QueueChild {
            dir: st.args.dir.clone(),
            heap: heap_options(&st.args, st.args.opts.fsync),
            fences: st.args.locks.fences.clone(),
            cluster: st.args.cluster.clone(),
        };
        let args = OneChildArgs {
            spec,
            policy: st.args.opts.restart,
            slot: st.args.queues.slot().clone(),
            counters: st.args.counters.clone(),
        };
        let (sup, _) = OneChild::spawn_linked(None, OneChild::default(), args, myself.get_cell()).await?;
        st.queue_sup = Some(sup);
        Ok(())
    }

    async fn stop_queues(st: &mut RootState) -> Result<(), GridError> {
        let Some(sup) = st.queue_sup.take() else { return Ok(()) };
        shut_down(sup, OneChildMsg::Shutdown, "the queue service").await
    }

    async fn stop_locks(st: &mut RootState) -> Result<(), GridError> {
        let Some(sup) = st.lock_sup.take() else { return Ok(()) };
        shut_down(sup, OneChildMsg::Shutdown, "the lock service").await
    }

    async fn stop_table(st: &mut RootState, name: &str) -> Result<(), GridError> {
        let Some(ChildTable { sup, .. }) = st.tables.remove(name) else { return Ok(()) };
        shut_down(sup, TableSupMsg::Shutdown, &format!("table {name}")).await
    }
}

impl Actor for RootSupervisor {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = RootArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RootMsg>,
        args: RootArgs,
    ) -> Result<RootState, ActorProcessingErr> {
        let interval = Duration::from_millis(args.opts.checkpoint_interval_ms.max(1));
        let registries = Registries {
            tables: args.registry.clone(),
            feeds: args.feeds.clone(),
            locks: args.locks.clone(),
            queues: args.queues.clone(),
        };
        if let Some(budget_bytes) = args.opts.memory_budget {
            let pager = crate::memory::PagerArgs {
                registries: registries.clone(),
                budget_bytes,
                stats: args.pager.clone(),
            };
            crate::memory::MemoryPager::spawn_linked(
                None,
                crate::memory::MemoryPager,
                pager,
                myself.get_cell(),
            )
            .await?;
        }
        Checkpointer::spawn_linked(None, Checkpointer, (registries, interval), myself.get_cell()).await?;
        let mut st = RootState {
            args,
            tables: HashMap::new(),
            feeds: HashMap::new(),
            lock_sup: None,
            queue_sup: None,
        };
        Self::start_locks(&myself, &mut st).await?;
        Self::start_queues(&myself, &mut st).await?;
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<RootMsg>,
        msg: RootMsg,
        st: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RootMsg::StartTable(def, slots, reply) => {
                let r = Self::start_table(&myself, st, def, slots).await;
                let _ = reply.send(r);
            }
            RootMsg::StopTable(name, reply) => {
                let r = Self::stop_table(st, &name).await;
                let _ = reply.send(r);
            }
            RootMsg::StartFeed(def, slot, reply) => {
                let r = Self::start_feed(&myself, st, def, slot).await;
                let _ = reply.send(r);
            }
            RootMsg::StopFeed(name, reply) => {
                let r = Self::stop_feed(st, &name).await;
                let _ = reply.send(r);
            }
            RootMsg::RestartServices(reply) => {
                let mut r = Self::stop_queues(st).await.and(Self::stop_locks(st).await);
                if r.is_ok() {
                    let started = match Self::start_locks(&myself, st).await {
                        Ok(()) => Self::start_queues(&myself, st).await,
                        e => e,
                    };
                    r = started
                        .map_err(|e| GridError::Unavailable(format!("could not restart the services: {e}")));
                }
                let _ = reply.send(r);
            }
            RootMsg::Shutdown(reply) => {
                let names: Vec<String> = st.tables.keys().cloned().collect();
                let mut result = Ok(());
                let feeds: Vec<String> = st.feeds.keys().cloned().collect();
                for name in feeds {
                    result = result.and(Self::stop_feed(st, &name).await);
                }
                for name in names {
                    result = result.and(Self::stop_table(st, &name).await);
                }
                result = result.and(Self::stop_queues(st).await);
                result = result.and(Self::stop_locks(st).await);
                let _ = reply.send(result);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<RootMsg>,
        evt: SupervisionEvent,
        st: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        // A table supervisor that dies is started again over the same slots: its shards reopen
        // their heaps (the shards' own restart limits still apply inside it).
        if let SupervisionEvent::ActorFailed(cell, _) = evt {
            let dead =
                st.tables.iter().find(|(_, c)| c.sup.get_id() == cell.get_id()).map(|(n, _)| n.clone());
            if let Some(name) = dead
                && let Some(ChildTable { def, slots, .. }) = st.tables.remove(&name)
            {
                let _ = Self::start_table(&myself, st, def, slots).await;
            }
            let dead = st.feeds.iter().find(|(_, c)| c.sup.get_id() == cell.get_id()).map(|(n, _)| n.clone());
            if let Some(name) = dead
                && let Some(ChildFeed { def, slot, .. }) = st.feeds.remove(&name)
            {
                let _ = Self::start_feed(&myself, st, def, slot).await;
            }
            if st.lock_sup.as_ref().is_some_and(|s| s.get_id() == cell.get_id()) {
                st.lock_sup = None;
                let _ = Self::start_locks(&myself, st).await;
            }
            if st.queue_sup.as_ref().is_some_and(|s| s.get_id() == cell.get_id()) {
                st.queue_sup = None;
                let _ = Self::start_queues(&myself, st).await;
            }
        }
        Ok(())
    }
}

/// Checkpoints every running shard every interval (fire and forget: a shard checkpoints between
/// its messages).
struct Checkpointer;

/// What the checkpointer and the memory pager reach: every table, feed, the lock and the queue
/// service.
#[derive(Clone)]
pub(crate) struct Registries {
    pub(crate) tables: Registry,
    pub(crate) feeds: FeedRegistry,
    pub(crate) locks: Arc<Locks>,
    pub(crate) queues: Arc<Queues>,
}

enum CheckpointerMsg {
    Tick,
}

impl Actor for Checkpointer {
    type Msg = CheckpointerMsg;
    type State = Registries;
    type Arguments = (Registries, Duration);

    async fn pre_start(
        &self,
        myself: ActorRef<CheckpointerMsg>,
        (registries, every): (Registries, Duration),
    ) -> Result<Registries, ActorProcessingErr> {
        myself.send_interval(every, || CheckpointerMsg::Tick);
        Ok(registries)
    }

    async fn handle(
        &self,
        _myself: ActorRef<CheckpointerMsg>,
        _msg: CheckpointerMsg,
        Registries { tables: registry, feeds, locks, queues }: &mut Registries,
    ) -> Result<(), ActorProcessingErr> {
        if let SlotState::Running(a) = locks.slot().get() {
            let _ = a.cast(LockMsg::Checkpoint(None));
        }
        if let SlotState::Running(a) = queues.slot().get() {
            let _ = a.cast(QueueMsg::Checkpoint(None));
        }
        let feeds: Vec<Arc<FeedRuntime>> =
            feeds.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        for f in feeds {
            if let SlotState::Running(a) = f.slot().get() {
                let _ = a.cast(FeedMsg::Checkpoint(None));
            }
        }
        let tables: Vec<Arc<TableRuntime>> =
            registry.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        for t in tables {
            for slot in t.slots() {
                if let SlotState::Running(a) = slot.get() {
                    let _ = a.cast(ShardMsg::Checkpoint(None));
                }
            }
        }
        Ok(())
    }
}

/// A running grid.
pub struct GridCore {
    dir: PathBuf,
    opts: GridOptions,
    root: ActorRef<RootMsg>,
    registry: Registry,
    feeds: FeedRegistry,
    locks: Arc<Locks>,
    queues: Arc<Queues>,
    catalog: Mutex<Option<Heap>>,
    snippets: Arc<Snippets>,
    /// Grid-scoped snippets that conflicted twice commit under one of these (chosen by the first
    /// shard they write), so that contenders on the same data take turns instead of retrying
    /// against each other without end. A holder keeps it for at most its remaining runs, each
    /// bounded by its wall budget and its commit by `PREPARE_HOLD_MAX`; waiters are bounded by
    /// the grid-scoped snippets in flight (connections × their in-flight limit).
    commit_stripes: Vec<tokio::sync::Mutex<()>>,
    /// This node's member of the cluster's control group, once `start_cluster` ran.
    cluster: std::sync::OnceLock<Arc<crate::cluster::raft::ControlNode>>,
    /// The replication network shard actors use, set with `cluster`.
    repl_net: ClusterNet,
    /// Calls to other nodes' shards, set with `cluster`; every `TableRuntime` holds it.
    remote: crate::table::runtime::RemoteShards,
    /// Replicas and `sync` of tables created in the cluster.
    cluster_defaults: std::sync::OnceLock<(u32, u32)>,
    data_plane: std::sync::OnceLock<crate::cluster::data::DataPlane>,
    /// What the memory pager did.
    pager: Arc<crate::memory::PagerStats>,
    /// Disk work, restarts and failures of the node (`metrics.rs`).
    counters: Arc<crate::metrics::NodeCounters>,
    _lock: File,
}

/// The items a grid-scoped run took from queues, given back when it is dropped still holding
/// them (the run failed, conflicted or its commit failed): ready again at once, their delivery
/// counts as before the run took them (`Queues::release`), so a retried run does not use up
/// an item's deliveries. (If the queue service restarted meanwhile, the items are ready
/// again anyway.)
struct GiveBack {
    core: Arc<GridCore>,
    taken: Vec<(String, crate::queue::ops::Receipt)>,
}

impl Drop for GiveBack {
    fn drop(&mut self) {
        for (queue, receipt) in self.taken.drain(..) {
            self.core.queues.release(queue, receipt);
        }
    }
}

/// One shard's part of a grid-scoped commit: (table, shard) and its operations.
type ShardOps = ((String, u32), Vec<WriteOp>);

/// Runs of a grid-scoped snippet before it answers `Conflict`.
pub const SNIPPET_ATTEMPTS_MAX: u32 = 32;
/// Conflicted runs before a snippet commits under its stripe.
const OPTIMISTIC_ATTEMPTS: u32 = 2;
const COMMIT_STRIPES: usize = 64;

/// Catalogue keys of stored-procedure modules start with this (no table name contains '/').
const PROC_PREFIX: &str = "proc/";
/// Catalogue keys of feeds start with this.
const FEED_PREFIX: &str = "feed/";

/// Who may do what in a grid-scoped snippet: called before each collection it reads and,
/// at the end, for each collection it writes (`write` true).
pub type AccessCheck = Arc<dyn Fn(&str, bool) -> Result<(), GridError> + Send + Sync>;

/// A grid-scoped snippet's view: every table, one message per operation, from a blocking thread.
/// Records the version of every key it reads (0: absent), for the optimistic commit.
struct GridStore {
    core: Arc<GridCore>,
    handle: tokio::runtime::Handle,
    access: AccessCheck,
    /// Read from the shard actors rather than published snapshots (a retry after a conflict:
    /// a snapshot may not yet show the write it lost to).
    fresh: bool,
    versions: HashMap<(String, Key), u64>,
    /// Items the run took from queues (in ack mode): acked if the run commits, given back if
    /// not.
    taken: Vec<(String, crate::queue::ops::Receipt)>,
}

/// How long an item a snippet took stays in flight before it would return by itself: longer
/// than any run (its wall budget) and its commit.
const SNIPPET_TAKE_VISIBILITY_MS: u64 = 300_000;

/// A collection a grid-scoped snippet names: tables and feeds share one namespace.
enum Collection {
    Table(Arc<TableRuntime>),
    Feed(Arc<FeedRuntime>),
}

impl GridStore {
    /// The collection `coll`, after the read check: a table (the common case, one lookup), else
    /// a feed, else `NoSuchTable`.
    fn collection(&self, coll: &str) -> Result<Collection, GridError> {
        (self.access)(coll, false)?;
        match self.core.table(coll) {
            Ok(t) => Ok(Collection::Table(t)),
            Err(e) => self.core.feed(coll).map(Collection::Feed).map_err(|_| e),
        }
    }

    /// The table `coll`, after the read check; a feed there is refused with `feed_use`.
    fn table(&self, coll: &str, feed_use: impl FnOnce() -> String) -> Result<Arc<TableRuntime>, GridError> {
        match self.collection(coll)? {
            Collection::Table(t) => Ok(t),
            Collection::Feed(_) => Err(GridError::Invalid(format!("{coll} is a feed: {}", feed_use()))),
        }
    }

    /// The feed `name`, after the read check.
    fn feed(&self, name: &str) -> Result<Arc<FeedRuntime>, GridError> {
        match self.collection(name) {
            Ok(Collection::Feed(f)) => Ok(f),
            Ok(Collection::Table(_)) | Err(GridError::NoSuchTable(_)) => {
                Err(GridError::NoSuchFeed(name.into()))
            }
            Err(e) => Err(e),
        }
    }
}

/// A feed record as a snippet sees it.
fn record_value(r: crate::feed::FeedRecord) -> Value {
    let mut m = indexmap::IndexMap::new();
    m.insert("id".to_string(), Value::Int(r.id as i64));
    m.insert("prev".to_string(), Value::Int(r.prev as i64));
    m.insert("next".to_string(), Value::Int(r.next as i64));
    m.insert("version".to_string(), Value::Int(r.version as i64));
    m.insert("value".to_string(), r.value);
    Value::Map(m)
}

impl Store for GridStore {
    fn lock_held(&mut self, lock: &str, fence: u64) -> Result<bool, GridError> {
        self.core.service_here(crate::cluster::map::LOCKS_SERVICE)?;
        Ok(self.core.locks.held(lock, fence))
    }

    fn feed_read(
        &mut self,
        feed: &str,
        at: Option<u64>,
        n: u32,
        back: bool,
    ) -> Result<Vec<Value>, GridError> {
        let f = self.feed(feed)?;
        let page = if back {
            self.handle.block_on(f.read_back(at, n))?
        } else {
            self.handle.block_on(f.read(crate::feed::Pos::After(at.unwrap_or(0)), n, 0))?
        };
        Ok(page.records.into_iter().map(record_value).collect())
    }

    fn feed_state(&mut self, feed: &str) -> Result<Value, GridError> {
        let f = self.feed(feed)?;
        let s = self.handle.block_on(f.state())?;
        let mut m = indexmap::IndexMap::new();
        for (k, v) in [("top", s.top), ("bottom", s.bottom), ("count", s.count), ("next_id", s.next_id)] {
            m.insert(k.to_string(), Value::Int(v as i64));
        }
        m.insert("version".to_string(), Value::Int(s.version as i64));
        Ok(Value::Map(m))
    }

    fn check_feed_write(&mut self, feed: &str) -> Result<(), GridError> {
        (self.access)(feed, true)?;
        self.core.feed(feed).map(|_| ())
    }

    fn queue_take(&mut self, queue: &str, n: u32) -> Result<Vec<Value>, GridError> {
        use crate::queue::ops::{Mode, QueueOp, QueueResult};
        self.core.service_here(crate::cluster::map::QUEUES_SERVICE)?;
        (self.access)(queue, false)?;
        (self.access)(queue, true)?;
        let op = QueueOp::Pop {
            queue: queue.to_string(),
            n,
            wait_ms: 0,
            mode: Mode::Ack,
            visibility_ms: Some(SNIPPET_TAKE_VISIBILITY_MS),
            session: None,
        };
        match self.handle.block_on(self.core.queues.call(op))? {
            QueueResult::Delivered(ds) => Ok(ds
                .into_iter()
                .map(|d| {
                    self.taken.push((queue.to_string(), d.receipt));
                    d.value
                })
                .collect()),
            r => Err(GridError::Protocol(format!("a pop was answered with {r:?}"))),
        }
    }

    fn queue_peek(&mut self, queue: &str, n: u32) -> Result<Vec<Value>, GridError> {
        use crate::queue::ops::{QueueOp, QueueResult};
        self.core.service_here(crate::cluster::map::QUEUES_SERVICE)?;
        (self.access)(queue, false)?;
        match self.handle.block_on(self.core.queues.call(QueueOp::Peek { queue: queue.to_string(), n }))? {
            QueueResult::Items(items) => Ok(items.into_iter().map(|(_, v)| v).collect()),
            r => Err(GridError::Protocol(format!("a peek was answered with {r:?}"))),
        }
    }

    fn queue_len(&mut self, queue: &str) -> Result<Value, GridError> {
        use crate::queue::ops::{QueueOp, QueueResult};
        self.core.service_here(crate::cluster::map::QUEUES_SERVICE)?;
        (self.access)(queue, false)?;
        match self.handle.block_on(self.core.queues.call(QueueOp::Len { queue: queue.to_string() }))? {
            QueueResult::Len(l) => {
                let mut m = indexmap::IndexMap::new();
                for (k, v) in [
                    ("ready", l.ready),
                    ("in_flight", l.in_flight),
                    ("delayed", l.delayed),
                    ("waiters", l.waiters),
                ] {
                    m.insert(k.to_string(), Value::Int(v as i64));
                }
                Ok(Value::Map(m))
            }
            r => Err(GridError::Protocol(format!("a queue length was answered with {r:?}"))),
        }
    }

    fn check_queue_write(&mut self, queue: &str) -> Result<(), GridError> {
        self.core.service_here(crate::cluster::map::QUEUES_SERVICE)?;
        (self.access)(queue, true)
    }

    fn check_write(&mut self, coll: &str, key: &Key) -> Result<(), GridError> {
        self.table(coll, || format!("its records are added with {coll}.append(v), not stored by key"))?;
        (self.access)(coll, true)?;
        key.encode().map(|_| ()).map_err(|e| GridError::Invalid(e.to_string()))
    }

    fn get(&mut self, coll: &str, key: &Key) -> Result<Option<Value>, GridError> {
        let t = match self.collection(coll)? {
            Collection::Table(t) => t,
            Collection::Feed(f) => {
                let Key::Int(id) = key else { return Ok(None) };
                return Ok(self.handle.block_on(f.get((*id).max(0) as u64))?.map(record_value));
            }
        };
        let v = if self.fresh {
            self.handle.block_on(t.get_fresh(key.clone()))?
        } else {
            self.handle.block_on(t.get(key.clone()))?
        };
        self.versions.entry((coll.to_string(), key.clone())).or_insert(v.as_ref().map_or(0, |v| v.version));
        Ok(v.map(|v| v.value))
    }

    fn contains(&mut self, coll: &str, key: &Key) -> Result<bool, GridError> {
        Ok(self.get(coll, key)?.is_some())
    }

    fn count(&mut self, coll: &str) -> Result<u64, GridError> {
        match self.collection(coll)? {
            Collection::Table(t) => self.handle.block_on(t.count()),
            Collection::Feed(f) => Ok(self.handle.block_on(f.state())?.count),
        }
    }

    fn scan(&mut self, coll: &str, q: &ScanQuery) -> Result<Vec<(Key, Value)>, GridError> {
        let t = self.table(coll, || format!("read it with {coll}.read(after, n)"))?;
        let entries = self.handle.block_on(t.scan(scan_range(q)))?;
        Ok(entries
            .into_iter()
            .map(|(k, v)| {
                self.versions.entry((coll.to_string(), k.clone())).or_insert(v.version);
                (k, v.value)
            })
            .collect())
    }
}

async fn lock_dir(dir: &Path) -> Result<File, GridError> {
    std::fs::create_dir_all(dir).map_err(|e| GridError::Storage(format!("{}: {e}", dir.display())))?;
    let f = File::create(dir.join("LOCK")).map_err(|e| GridError::Storage(e.to_string()))?;
    // A lock held only by a descriptor copy in a process being spawned elsewhere (between fork
    // and exec) is released within moments: retry briefly before calling the directory busy.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(f),
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(e) => {
                return Err(GridError::Storage(format!(
                    "data directory {} is in use by another process: {e}",
                    dir.display()
                )));
            }
        }
    }
}

/// How long a moved shard's new node may take to catch up before the move gives up.
const MOVE_CATCH_UP: Duration = Duration::from_secs(60);

/// The shards `opts` asks for (at least one), or why not.
fn valid_shards(opts: &TableOptions) -> Result<u32, GridError> {
    let shards = opts.shards.max(1);
    if shards > TABLE_SHARDS_MAX {
        return Err(GridError::LimitExceeded {
            what: "shards".into(),
            got: shards as u64,
            max: TABLE_SHARDS_MAX as u64,
        });
    }
    Ok(shards)
}

/// Applies a catalogue batch and waits until it is durable (the catalogue is fsync-always).
/// Waits until `slot` is no longer starting (a new collection is answered once it runs, or
/// failed).
async fn started<M>(slot: &ShardSlot<M>) {
    loop {
        let seen = slot.version();
        if !matches!(slot.get(), SlotState::Starting) {
            return;
        }
        slot.wait_change(seen, tokio::time::Instant::now() + Duration::from_secs(1)).await;
    }
}

/// How often the recovery after an open is reported while shards are still recovering.
const RECOVERY_REPORT_EVERY: Duration = Duration::from_secs(1);

/// Reports the recovery that follows an open in the log: the shards still recovering and the
/// op-log bytes replayed every `RECOVERY_REPORT_EVERY`, then how long until every shard ran.
/// Every shard recovers on its own task; each serves as soon as its own recovery ends.
fn watch_recovery(core: &Arc<GridCore>) {
    let weak = Arc::downgrade(core);
    let started = std::time::Instant::now();
    tokio::spawn(async move {
        let mut reported = false;
        loop {
            let Some(core) = weak.upgrade() else { return };
            let r = core.recovering();
            drop(core);
            if r.is_empty() {
                if reported {
                    let ms = started.elapsed().as_millis() as u64;
                    tracing::info!(ms, "recovered: every shard serves");
                }
                return;
            }
            if reported || started.elapsed() >= RECOVERY_REPORT_EVERY {
                let (done, total) =
                    r.iter().fold((0, 0), |(d, t), s| (d + s.replayed_bytes, t + s.total_bytes));
                tracing::info!(
                    shards = r.len(),
                    replayed_mib = done >> 20,
                    total_mib = total >> 20,
                    "recovering: shards still replaying their op logs"
                );
                reported = true;
            }
            tokio::time::sleep(if reported { RECOVERY_REPORT_EVERY } else { Duration::from_millis(50) })
                .await;
        }
    });
}

fn durable_apply(h: &mut Heap, batch: &heapgrid_heap::WriteBatch) -> Result<(), GridError> {
    let lsn = h.apply(batch)?;
    if let Some(d) = h.durability() {
        d.wait(lsn)?;
    }
    Ok(())
}

impl GridCore {
    /// Opens (creating if needed) the grid in `dir` and starts every catalogued table.
    pub async fn open(dir: impl AsRef<Path>, opts: GridOptions) -> Result<Arc<GridCore>, GridError> {
        let dir = dir.as_ref().to_path_buf();
        let lock = lock_dir(&dir).await?;
        let catalog_opts = HeapOptions { fsync: FsyncPolicy::Always, ..HeapOptions::default() };
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let catalog = loop {
            // Same brief wait as for LOCK: a spawning process may still hold a descriptor copy.
            match Heap::open(dir.join("catalog.heap"), catalog_opts.clone()) {
                Err(heapgrid_heap::Error::Locked(_)) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                r => break r?,
            }
        };
        let mut defs = Vec::new();
        let mut procs = Vec::new();
        let mut feed_defs = Vec::new();
        for e in catalog.iter() {
            let (k, v) = e?;
            if k.starts_with(FEED_PREFIX.as_bytes()) {
                let value = Value::decode(&v).map_err(|e| GridError::Corrupted(format!("catalogue: {e}")))?;
                let def = value
                    .to_serde::<FeedDef>()
                    .map_err(|e| GridError::Corrupted(format!("catalogue: {e}")))?;
                def.validate()?;
                feed_defs.push(def);
                continue;
            }
            if let Some(name) = k.strip_prefix(PROC_PREFIX.as_bytes()) {
                let src = match Value::decode(&v) {
                    Ok(Value::Str(s)) => s,
                    _ => {
                        return Err(GridError::Corrupted(
                            "catalogue: procedure entry is not a string".into(),
                        ));
                    }
                };
                procs.push((String::from_utf8_lossy(name).into_owned(), src));
                continue;
            }
            let value = Value::decode(&v).map_err(|e| GridError::Corrupted(format!("catalogue: {e}")))?;
            let def =
                value.to_serde::<TableDef>().map_err(|e| GridError::Corrupted(format!("catalogue: {e}")))?;
            def.validate()?;
            defs.push(def);
        }
        // Directories no catalogue entry names are left by a drop that did not finish: remove.
        if let Ok(entries) = std::fs::read_dir(dir.join("tables")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !defs.iter().any(|d| d.dir == name) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(dir.join("feeds")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !feed_defs.iter().any(|d| d.dir == name) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let registry: Registry = Arc::default();
        let feeds: FeedRegistry = Arc::default();
        let fences = Arc::new(crate::lock::fence::FenceTable::with_clock(crate::cluster::fences::now_ms));
        let locks = Arc::new(Locks::new(Arc::new(ShardSlot::new()), fences));
        let queues = Arc::new(Queues::default());
        let repl_net: ClusterNet = Arc::default();
        let pager: Arc<crate::memory::PagerStats> = Arc::default();
        let counters = Arc::new(crate::metrics::NodeCounters::default());
        let args = RootArgs {
            dir: dir.clone(),
            opts: opts.clone(),
            registry: registry.clone(),
            feeds: feeds.clone(),
            locks: locks.clone(),
            queues: queues.clone(),
            cluster: repl_net.clone(),
            pager: pager.clone(),
            counters: counters.clone(),
        };
        let (root, _) = RootSupervisor::spawn(None, RootSupervisor, args)
            .await
            .map_err(|e| GridError::Storage(format!("could not start the grid: {e}")))?;
        let snippets = Arc::new(Snippets {
            engine: Engine::new(),
            defaults: opts.snippet_limits.clone(),
            max: opts.snippet_max.clone(),
        });
        if let Some(sb) = &opts.snippet_sandbox {
            let pool = crate::snippet::worker::WorkerPool::new(sb.exe.clone(), sb.workers);
            snippets.engine.set_runner(crate::snippet::Runner::Workers(Arc::new(pool)));
        }
        snippets.engine.set_collections(defs.iter().map(|d| d.name.clone()));
        for (name, src) in procs {
            // A stored module that no longer compiles (it used a dropped table) is skipped, not
            // fatal: snippets calling it get a name error.
            let _ = snippets.engine.set_procedures(&name, &src);
        }
        let core = Arc::new(GridCore {
            dir,
            opts,
            root,
            registry,
            feeds,
            locks,
            queues,
            catalog: Mutex::new(Some(catalog)),
            snippets,
            commit_stripes: (0..COMMIT_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            cluster: std::sync::OnceLock::new(),
            repl_net,
            remote: Arc::default(),
            cluster_defaults: std::sync::OnceLock::new(),
            data_plane: std::sync::OnceLock::new(),
            pager,
            counters,
            _lock: lock,
        });
        for def in feed_defs {
            if let Err(e) = core.start_feed(def).await {
                let _ = core.close().await;
                return Err(e);
            }
        }
        for def in defs {
            if let Err(e) = core.start(def).await {
                // Stop what did start, so no heap stays open (and locked) behind a failed open.
                let _ = core.close().await;
                return Err(e);
            }
        }
        watch_recovery(&core);
        Ok(core)
    }

    async fn start(&self, def: TableDef) -> Result<Arc<TableRuntime>, GridError> {
        let slots: Arc<Vec<ShardSlot>> = Arc::new((0..def.shards).map(|_| ShardSlot::new()).collect());
        let rt = Arc::new(TableRuntime::new(
            def.clone(),
            slots.clone(),
            self.snippets.clone(),
            self.remote.clone(),
        ));
        match self.root.call(|p| RootMsg::StartTable(def.clone(), slots, p), None).await {
            Ok(ractor::rpc::CallResult::Success(r)) => r?,
            _ => return Err(GridError::Closed),
        }
        self.registry.write().unwrap_or_else(|e| e.into_inner()).insert(def.name.clone(), rt.clone());
        self.refresh_collections();
        Ok(rt)
    }

    async fn start_feed(&self, def: FeedDef) -> Result<Arc<FeedRuntime>, GridError> {
        let slot: Arc<ShardSlot<FeedMsg>> = Arc::new(ShardSlot::new());
        let rt = Arc::new(FeedRuntime::new(def.clone(), slot.clone()));
        match self.root.call(|p| RootMsg::StartFeed(def.clone(), slot, p), None).await {
            Ok(ractor::rpc::CallResult::Success(r)) => r?,
            _ => return Err(GridError::Closed),
        }
        self.feeds.write().unwrap_or_else(|e| e.into_inner()).insert(def.name.clone(), rt.clone());
        self.refresh_collections();
        Ok(rt)
    }

    /// Creates a feed (durably recorded) and starts its shard. Feeds and tables share one
    /// namespace (snippets name both). In a cluster the feed is placed in the map first
    /// (`feed:NAME`, one shard, the cluster's default replicas and `sync`), then started here;
    /// the other members start it with this node's definition (`data::place`).
    pub async fn create_feed(&self, name: &str, opts: FeedOptions) -> Result<Arc<FeedRuntime>, GridError> {
        let def = FeedDef::new(name, &opts, self.opts.fsync.into(), incarnation_dir(name))?;
        let (Some(c), Some(net)) = (self.cluster.get(), self.repl_net.get()) else {
            return self.create_feed_local(def).await;
        };
        let map_name = crate::cluster::map::feed_map_name(name);
        let map = c.map();
        if map.table(&map_name).is_some() || self.feed(name).is_ok() {
            return Err(GridError::FeedExists(name.into()));
        }
        if map.table(name).is_some() || self.table(name).is_ok() {
            return Err(GridError::TableExists(name.into()));
        }
        let members = map.members().count() as u32;
        let (replicas, sync) = self.cluster_defaults.get().copied().unwrap_or((0, 0));
        let replicas = replicas.min(members.saturating_sub(1));
        let spec = crate::cluster::map::TableSpec { shards: 1, replicas, sync: sync.min(replicas) };
        let cmd = crate::cluster::map::MapCmd::CreateTable { name: map_name.clone(), spec };
        c.admin(crate::cluster::raft::Admin::Propose(cmd)).await?;
        // Started only once this node's map places it: a replicated feed never writes a record
        // outside replication.
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        while net.placement(&map_name, 0).is_none() {
            if tokio::time::Instant::now() >= until {
                return Err(GridError::Unavailable(format!(
                    "feed {name} is in the cluster map but this node did not see it within 10 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.create_feed_local(def).await
    }

    /// Records `def` durably and starts its feed, on this node only (a node on its own, or a
    /// feed the map placed).
    pub async fn create_feed_local(&self, def: FeedDef) -> Result<Arc<FeedRuntime>, GridError> {
        let name = def.name.as_str();
        let key = format!("{FEED_PREFIX}{name}");
        self.catalog(|h| {
            if h.contains(name.as_bytes())? || h.contains(key.as_bytes())? {
                return Err(GridError::FeedExists(name.into()));
            }
            let v = Value::from_serde(&def)
                .and_then(|v| v.encode())
                .map_err(|e| GridError::Value(e.to_string()))?;
            durable_apply(h, heapgrid_heap::WriteBatch::new().put(key.as_bytes(), &v)?)
        })?;
        let rt = self.start_feed(def).await?;
        started(rt.slot()).await;
        Ok(rt)
    }

    /// Stops a feed, removes it from the catalogue, then deletes its files. In a cluster a
    /// placed feed leaves the map first (every member then drops its copy).
    pub async fn drop_feed(&self, name: &str) -> Result<(), GridError> {
        let map_name = crate::cluster::map::feed_map_name(name);
        if let Some(c) = self.cluster.get()
            && c.map().table(&map_name).is_some()
        {
            let cmd = crate::cluster::map::MapCmd::DropTable(map_name);
            c.admin(crate::cluster::raft::Admin::Propose(cmd)).await?;
            return match self.drop_feed_local(name).await {
                Err(GridError::NoSuchFeed(_)) => Ok(()),
                r => r,
            };
        }
        self.drop_feed_local(name).await
    }

    /// Drops a feed on this node only.
    pub async fn drop_feed_local(&self, name: &str) -> Result<(), GridError> {
        let Some(rt) = self.feeds.write().unwrap_or_else(|e| e.into_inner()).remove(name) else {
            return Err(GridError::NoSuchFeed(name.into()));
        };
        self.refresh_collections();
        match self.root.call(|p| RootMsg::StopFeed(name.into(), p), None).await {
            Ok(ractor::rpc::CallResult::Success(r)) => r?,
            _ => return Err(GridError::Closed),
        }
        let key = format!("{FEED_PREFIX}{name}");
        self.catalog(|h| durable_apply(h, heapgrid_heap::WriteBatch::new().delete(key.as_bytes())?))?;
        std::fs::remove_dir_all(feed_dir(&self.dir, &rt.def)).map_err(|e| GridError::Storage(e.to_string()))
    }

    /// A running feed.
    pub fn feed(&self, name: &str) -> Result<Arc<FeedRuntime>, GridError> {
        self.feeds
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| GridError::NoSuchFeed(name.into()))
    }

    /// The node's memory and every heap's figures (shards that do not answer, restarting or
    /// failed, are left out).
    pub async fn stats(&self) -> crate::stats::NodeStats {
        use crate::stats::{CollectionStats, ShardStats};
        let mut out = Vec::new();
        let tables: Vec<Arc<TableRuntime>> =
            self.registry.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        // A recovering shard is not asked (it would answer after its replay).
        let recovering = self.recovering();
        let skip = |name: &str, i: u32| recovering.iter().any(|r| r.collection == name && r.shard == i);
        for t in tables {
            let mut shards = Vec::new();
            for i in (0..t.def.shards).filter(|&i| !skip(&t.def.name, i)) {
                if let Ok(s) = t.heap_stats(i).await {
                    let restarts = t.slots()[i as usize].restarts();
                    shards.push(ShardStats { restarts, ..ShardStats::of(i, &s) });
                }
            }
            out.push(CollectionStats { name: t.def.name.clone(), kind: "table".into(), shards });
        }
        let feeds: Vec<Arc<FeedRuntime>> =
            self.feeds.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        for f in feeds {
            let shards = match skip(&f.def.name, 0) {
                true => Vec::new(),
                false => f
                    .heap_stats()
                    .await
                    .map(|s| vec![ShardStats { restarts: f.slot().restarts(), ..ShardStats::of(0, &s) }])
                    .unwrap_or_default(),
            };
            out.push(CollectionStats { name: f.def.name.clone(), kind: "feed".into(), shards });
        }
        use crate::cluster::map::{LOCKS_SERVICE, QUEUES_SERVICE};
        for name in [LOCKS_SERVICE, QUEUES_SERVICE] {
            let (stats, restarts) = match (skip(name, 0), name == LOCKS_SERVICE) {
                (true, _) => (None, 0),
                (false, true) => (self.locks.heap_stats().await.ok(), self.locks.slot().restarts()),
                (false, false) => (self.queues.heap_stats().await.ok(), self.queues.slot().restarts()),
            };
            let shards =
                stats.map(|s| vec![ShardStats { restarts, ..ShardStats::of(0, &s) }]).unwrap_or_default();
            out.push(CollectionStats { name: name.into(), kind: "service".into(), shards });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        let mut node = crate::stats::NodeStats::of(out);
        node.memory_budget = crate::stats::BudgetStats::of(&self.pager);
        node.recovering = recovering;
        node
    }

    /// The node's counters: its heaps' disk work, shard restarts and failures.
    pub fn counters(&self) -> &Arc<crate::metrics::NodeCounters> {
        &self.counters
    }

    /// Every shard on this node (tables, feeds, the services): its state and mailbox depth.
    pub fn shard_health(&self) -> Vec<crate::stats::ShardHealth> {
        use crate::stats::ShardHealth;
        fn of<M>(collection: &str, shard: u32, slot: &ShardSlot<M>) -> ShardHealth {
            let state = match slot.get() {
                SlotState::Starting => "starting",
                SlotState::Running(_) => "running",
                SlotState::Failed(_) => "failed",
                SlotState::Stopped => "stopped",
            };
            ShardHealth {
                collection: collection.into(),
                shard,
                state: state.into(),
                // A shard given up on has no actor to take what its dead one left.
                mailbox_depth: if state == "running" { slot.view.mailbox_depth() } else { 0 },
            }
        }
        let mut out = Vec::new();
        for t in self.registry.read().unwrap_or_else(|e| e.into_inner()).values() {
            for (i, slot) in t.slots().iter().enumerate() {
                out.push(of(&t.def.name, i as u32, slot));
            }
        }
        for f in self.feeds.read().unwrap_or_else(|e| e.into_inner()).values() {
            out.push(of(&f.def.name, 0, f.slot()));
        }
        out.push(of(crate::cluster::map::LOCKS_SERVICE, 0, self.locks.slot()));
        out.push(of(crate::cluster::map::QUEUES_SERVICE, 0, self.queues.slot()));
        out.sort_by(|a, b| (&a.collection, a.shard).cmp(&(&b.collection, b.shard)));
        out
    }

    /// The shards still recovering (opening their heap, replaying their op log) and how far.
    pub fn recovering(&self) -> Vec<crate::stats::RecoveringShard> {
        use crate::stats::RecoveringShard;
        let mut out = Vec::new();
        let mut note = |collection: &str, shard: u32, p: Option<(u64, u64)>| {
            if let Some((replayed_bytes, total_bytes)) = p {
                out.push(RecoveringShard {
                    collection: collection.into(),
                    shard,
                    replayed_bytes,
                    total_bytes,
                });
            }
        };
        for t in self.registry.read().unwrap_or_else(|e| e.into_inner()).values() {
            for (i, slot) in t.slots().iter().enumerate() {
                note(&t.def.name, i as u32, slot.recovering());
            }
        }
        for f in self.feeds.read().unwrap_or_else(|e| e.into_inner()).values() {
            note(&f.def.name, 0, f.slot().recovering());
        }
        note(crate::cluster::map::LOCKS_SERVICE, 0, self.locks.slot().recovering());
        note(crate::cluster::map::QUEUES_SERVICE, 0, self.queues.slot().recovering());
        out.sort_by(|a, b| (&a.collection, a.shard).cmp(&(&b.collection, b.shard)));
        out
    }

    /// Every feed, by name.
    pub fn list_feeds(&self) -> Vec<FeedDef> {
        let mut v: Vec<FeedDef> =
            self.feeds.read().unwrap_or_else(|e| e.into_inner()).values().map(|f| f.def.clone()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn catalog<R>(&self, f: impl FnOnce(&mut Heap) -> Result<R, GridError>) -> Result<R, GridError> {
        let mut guard = self.catalog.lock().unwrap_or_else(|e| e.into_inner());
        match guard.as_mut() {
            Some(h) => f(h),
            None => Err(GridError::Closed),
        }
    }

    /// Creates a table (durably recorded) and starts its shards. In a cluster the table is
    /// replicated: it is created in the cluster map, which places its shards over the members
    /// (`ClusterOptions::replicas` replicas each, writes waiting for `sync` of them), and every
    /// node starts it; this returns once it runs here.
    pub async fn create_table(&self, name: &str, opts: TableOptions) -> Result<Arc<TableRuntime>, GridError> {
        let Some(c) = self.cluster.get() else { return self.create_table_local(name, opts).await };
        valid_name(name)?;
        let shards = valid_shards(&opts)?;
        let map = c.map();
        if map.table(name).is_some() || self.feed(name).is_ok() {
            return Err(GridError::TableExists(name.into()));
        }
        let members = map.members().count() as u32;
        let (replicas, sync) = self.cluster_defaults.get().copied().unwrap_or((0, 0));
        let replicas = replicas.min(members.saturating_sub(1));
        let spec = crate::cluster::map::TableSpec { shards, replicas, sync: sync.min(replicas) };
        let cmd = crate::cluster::map::MapCmd::CreateTable { name: name.into(), spec };
        c.admin(crate::cluster::raft::Admin::Propose(cmd)).await?;
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(t) = self.table(name) {
                return Ok(t);
            }
            if tokio::time::Instant::now() >= until {
                return Err(GridError::Unavailable(format!(
                    "table {name} is in the cluster map but did not start here within 10 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Creates a table on this node only (a node on its own, or a table the map placed).
    pub async fn create_table_local(
        &self,
        name: &str,
        opts: TableOptions,
    ) -> Result<Arc<TableRuntime>, GridError> {
        valid_name(name)?;
        let shards = valid_shards(&opts)?;
        let def = TableDef {
            name: name.into(),
            shards,
            fsync: opts.fsync.unwrap_or(self.opts.fsync.into()),
            dir: incarnation_dir(name),
        };
        self.catalog(|h| {
            if h.contains(name.as_bytes())? || h.contains(format!("{FEED_PREFIX}{name}").as_bytes())? {
                return Err(GridError::TableExists(name.into()));
            }
            let v = Value::from_serde(&def)
                .and_then(|v| v.encode())
                .map_err(|e| GridError::Value(e.to_string()))?;
            durable_apply(h, heapgrid_heap::WriteBatch::new().put(name.as_bytes(), &v)?)
        })?;
        let rt = self.start(def).await?;
        for slot in rt.slots() {
            started(slot).await;
        }
        Ok(rt)
    }

    /// Stops a table, removes it from the catalogue, then deletes its files (in a cluster: on
    /// every node, through the map).
    pub async fn drop_table(&self, name: &str) -> Result<(), GridError> {
        if let Some(c) = self.cluster.get()
            && c.map().table(name).is_some()
        {
            let cmd = crate::cluster::map::MapCmd::DropTable(name.into());
            c.admin(crate::cluster::raft::Admin::Propose(cmd)).await?;
            return match self.drop_table_local(name).await {
                Err(GridError::NoSuchTable(_)) => Ok(()),
                r => r,
            };
        }
        self.drop_table_local(name).await
    }

    /// Drops a table on this node only.
    pub async fn drop_table_local(&self, name: &str) -> Result<(), GridError> {
        let Some(rt) = self.registry.write().unwrap_or_else(|e| e.into_inner()).remove(name) else {
            return Err(GridError::NoSuchTable(name.into()));
        };
        self.refresh_collections();
        match self.root.call(|p| RootMsg::StopTable(name.into(), p), None).await {
            Ok(ractor::rpc::CallResult::Success(r)) => r?,
            _ => return Err(GridError::Closed),
        }
        self.catalog(|h| durable_apply(h, heapgrid_heap::WriteBatch::new().delete(name.as_bytes())?))?;
        // A crash before this line leaves an orphan directory, removed at the next open.
        std::fs::remove_dir_all(table_dir(&self.dir, &rt.def)).map_err(|e| GridError::Storage(e.to_string()))
    }

    fn refresh_collections(&self) {
        let mut names: Vec<String> =
            self.registry.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        names.extend(self.feeds.read().unwrap_or_else(|e| e.into_inner()).keys().cloned());
        self.snippets.engine.set_collections(names);
    }

    /// The snippet engine and budgets.
    pub fn snippets(&self) -> &Arc<Snippets> {
        &self.snippets
    }

    /// Runs a grid-scoped snippet. Each collection operation in it is one message to the owning
    /// shard and atomic on its own; its writes are applied at the end, one batch per shard, shard
    /// after shard: the snippet as a whole is not a transaction. A snippet that names one table
    /// (and no procedure) is first tried inside one of its shards (atomic and isolated there).
    pub async fn eval(
        self: &Arc<Self>,
        src: &str,
        args: Value,
        limits: &LimitOverrides,
        access: AccessCheck,
    ) -> Result<Value, GridError> {
        self.eval_fenced(src, args, limits, access, &[]).await
    }

    /// `eval` whose writes are fenced: each shard it writes checks every `(lock, fence)` at the
    /// commit, with the writes, and one stale fence fails the run with nothing written
    /// (`StaleFence`). Feed appends and removals of the run come after the commit and are not
    /// fenced (docs/locks.md).
    pub async fn eval_fenced(
        self: &Arc<Self>,
        src: &str,
        args: Value,
        limits: &LimitOverrides,
        access: AccessCheck,
        fences: &[(String, u64)],
    ) -> Result<Value, GridError> {
        self.eval_printing(src, args, limits, access, fences, None).await
    }

    /// `eval_fenced` that hands what the run printed (`print()`) to `printed` (the run that
    /// answered: a grid-scoped run retried after a conflict prints again).
    pub async fn eval_printing(
        self: &Arc<Self>,
        src: &str,
        args: Value,
        limits: &LimitOverrides,
        access: AccessCheck,
        fences: &[(String, u64)],
        printed: Option<crate::snippet::PrintSink>,
    ) -> Result<Value, GridError> {
        let fences: Vec<WriteOp> =
            fences.iter().map(|(lock, fence)| WriteOp::Fence { lock: lock.clone(), fence: *fence }).collect();
        let compiled = self.snippets.engine.compile(src)?;
        let limits = self.snippets.defaults.with_overrides(limits, &self.snippets.max);
        if let [only] = compiled.collections.as_slice()
            && !compiled.calls_procedures
            && !compiled.uses_queues
            && let Ok(t) = self.table(only)
        {
            access(only, false)?;
            let read_only = access(only, true).is_err();
            let guess = match &args {
                Value::Int(i) => Key::Int(*i).shard(t.def.shards),
                Value::Str(s) => Key::Str(s.clone()).shard(t.def.shards),
                _ => 0,
            };
            // In a cluster, a shard another node serves is not tried in place: the snippet
            // runs grid-scoped here, its operations sent to their primaries.
            if t.primary_elsewhere(guess).is_some() {
                return self.eval_grid(compiled, args, limits, access, fences, printed).await;
            }
            if t.def.shards == 1 {
                let job = EvalJob { args, read_only, fences, printed, ..t.eval_job(0, compiled, limits) };
                return t.eval_in(job).await;
            }
            // Several shards: first try the shard that `args` names when it is a key (else shard
            // 0). A snippet that stays in that shard is answered from there (atomically); one
            // that reaches outside it stops with no effect and runs grid-scoped below.
            let missed = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let job = EvalJob {
                args: args.clone(),
                read_only,
                out_of_scope: Some(missed.clone()),
                fences: fences.clone(),
                printed: printed.clone(),
                ..t.eval_job(guess, compiled.clone(), limits.clone())
            };
            match t.eval_in(job).await {
                Ok(v) => return Ok(v),
                Err(e) if !missed.load(std::sync::atomic::Ordering::Relaxed) => return Err(e),
                Err(_) => {}
            }
        }
        self.eval_grid(compiled, args, limits, access, fences, printed).await
    }

    /// The grid-scoped run of `eval_fenced`: optimistic, then under a commit stripe.
    async fn eval_grid(
        self: &Arc<Self>,
        compiled: Arc<crate::snippet::Compiled>,
        args: Value,
        limits: crate::snippet::Limits,
        access: AccessCheck,
        fences: Vec<WriteOp>,
        printed: Option<crate::snippet::PrintSink>,
    ) -> Result<Value, GridError> {
        let mut stripe = None;
        for attempt in 1..=SNIPPET_ATTEMPTS_MAX {
            let core = self.clone();
            let handle = tokio::runtime::Handle::current();
            let check = access.clone();
            let (c, l, a) = (compiled.clone(), limits.clone(), args.clone());
            let fresh = attempt > 1;
            let (outcome, versions, taken) = tokio::task::spawn_blocking(move || {
                let mut store = GridStore {
                    core,
                    handle,
                    access: check,
                    fresh,
                    versions: HashMap::new(),
                    taken: Vec::new(),
                };
                let r = c.run(&mut store, &l, None, &a);
                (r, store.versions, store.taken)
            })
            .await
            .map_err(|e| GridError::Unavailable(format!("snippet task failed: {e}")))?;
            // Whatever ends this run short of its commit gives back what it took.
            let mut give_back = GiveBack { core: self.clone(), taken };
            let crate::snippet::Outcome { value, writes, feed_writes, printed: text } = outcome?;
            if let Some(sink) = &printed {
                *sink.lock().unwrap_or_else(|e| e.into_inner()) = text;
            }
            let mut groups = self.commit_groups(writes, &versions)?;
            for (_, ops) in &mut groups {
                ops.splice(0..0, fences.iter().cloned());
            }
            if attempt > OPTIMISTIC_ATTEMPTS && stripe.is_none() {
                // Take turns with the other contenders on this data.
                let first = groups.first().map_or(0, |((t, i), _)| {
                    use std::hash::{Hash, Hasher};
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    (t, i).hash(&mut h);
                    h.finish() as usize
                });
                stripe = Some(self.commit_stripes[first % COMMIT_STRIPES].lock().await);
            }
            match self.commit(groups).await {
                Ok(()) => {
                    // The run committed: every step below is tried, and the first failure is
                    // reported as one that came after the commit.
                    let mut after: Option<GridError> = None;
                    // What the run took is its own for good. A stale receipt means the queue
                    // service restarted meanwhile and the item is ready again: it will be
                    // delivered once more (at-least-once).
                    for (queue, receipt) in std::mem::take(&mut give_back.taken) {
                        let op = crate::queue::ops::QueueOp::Ack { queue, receipt };
                        match self.queues.call(op).await {
                            Ok(_) | Err(GridError::StaleReceipt { .. }) => {}
                            Err(e) => {
                                after.get_or_insert(e);
                            }
                        }
                    }
                    // Feed changes and queue pushes go after the writes committed, once, in
                    // program order.
                    for w in feed_writes {
                        match w {
                            crate::snippet::FeedWrite::Push { queue, value, dedup_key, delay_ms } => {
                                let op = crate::queue::ops::QueueOp::Push {
                                    queue,
                                    value,
                                    dedup_key,
                                    delay_ms,
                                    fence: None,
                                };
                                if let Err(e) = self.queues.call(op).await {
                                    after.get_or_insert(e);
                                }
                            }
                            crate::snippet::FeedWrite::Append { feed, value, id } => {
                                if let Err(e) = async { self.feed(&feed)?.append(value, id).await }.await {
                                    after.get_or_insert(e);
                                }
                            }
                            crate::snippet::FeedWrite::Remove { feed, id } => {
                                if let Err(e) = async { self.feed(&feed)?.remove(id).await }.await {
                                    after.get_or_insert(e);
                                }
                            }
                        }
                    }
                    return match after {
                        None => Ok(value),
                        Some(e) => Err(GridError::Unavailable(format!(
                            "the snippet's writes committed, but a feed or queue change after them failed \
                             (the others were made): {e}"
                        ))),
                    };
                }
                Err(GridError::CasFailed { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(GridError::Conflict { attempts: SNIPPET_ATTEMPTS_MAX })
    }

    /// A grid-scoped outcome as batches per (table, shard), in (table, shard) order: each key it
    /// read is checked at the version it saw (`Check`, or a `Cas` where it also writes), keys it
    /// wrote blind are written as they are. The write permission and each key were checked when
    /// the run ended (`GridStore::check_write`); a value that cannot be stored fails its shard's
    /// batch or prepare, and with it the whole commit.
    fn commit_groups(
        &self,
        writes: Vec<crate::snippet::SnippetWrite>,
        versions: &HashMap<(String, Key), u64>,
    ) -> Result<Vec<ShardOps>, GridError> {
        use crate::table::Expect;
        let mut groups: std::collections::BTreeMap<(String, u32), Vec<WriteOp>> = Default::default();
        let mut written = std::collections::HashSet::new();
        for w in writes {
            let t = self.table(&w.collection)?;
            let at = (w.collection.clone(), w.key.shard(t.def.shards));
            let expect = versions.get(&(w.collection.clone(), w.key.clone())).map(|&v| match v {
                0 => Expect::Absent,
                v => Expect::Version(v),
            });
            written.insert((w.collection, w.key.clone()));
            let op = match (expect, w.value) {
                (Some(expect), new) => WriteOp::Cas { key: w.key, expect, new },
                (None, Some(value)) => WriteOp::Put { key: w.key, value },
                (None, None) => WriteOp::Delete { key: w.key },
            };
            groups.entry(at).or_default().push(op);
        }
        // Reads only matter to a snippet that writes (a read-only one answered from what it saw).
        if !groups.is_empty() {
            for ((coll, key), &v) in versions {
                if written.contains(&(coll.clone(), key.clone())) {
                    continue;
                }
                let t = self.table(coll)?;
                let expect = if v == 0 { Expect::Absent } else { Expect::Version(v) };
                groups
                    .entry((coll.clone(), key.shard(t.def.shards)))
                    .or_default()
                    .push(WriteOp::Check { key: key.clone(), expect });
            }
        }
        Ok(groups.into_iter().collect())
    }

    /// Applies `groups` all or nothing: one batch for one shard; over several, each shard is
    /// prepared (validated, then held) in (table, shard) order, and applied only when all are.
    /// `CasFailed`: something read changed; nothing was applied.
    async fn commit(&self, groups: Vec<ShardOps>) -> Result<(), GridError> {
        match groups.len() {
            0 => Ok(()),
            1 => {
                let ((table, _), ops) = groups.into_iter().next().expect("one");
                self.table(&table)?.batch(ops).await.map(|_| ())
            }
            _ => {
                let mut held = Vec::with_capacity(groups.len());
                for ((table, shard), ops) in groups {
                    // On an error the senders held so far are dropped: those shards let go.
                    held.push(self.table(&table)?.prepare(shard, ops).await?);
                }
                let mut done = Vec::with_capacity(held.len());
                for (decide, d) in held {
                    let _ = decide.send(true);
                    done.push(d);
                }
                // Every shard was told to apply: one that failed now (its hold ended, it lost
                // its lease, its node stopped answering) leaves the others applied.
                let n = done.len();
                let mut failed = Vec::new();
                for d in done {
                    let r = d
                        .await
                        .map_err(|_| GridError::Unavailable("a shard stopped while committing".into()));
                    if let Err(e) = r.and_then(|r| r) {
                        failed.push(e);
                    }
                }
                match failed.len() {
                    0 => Ok(()),
                    f if f == n => Err(failed
                        .iter()
                        .find(|e| matches!(e, GridError::Indeterminate(_)))
                        .unwrap_or(&failed[0])
                        .clone()),
                    f => Err(GridError::Indeterminate(format!(
                        "the commit applied on {} of {n} shards; the others failed: {}",
                        n - f,
                        failed[0]
                    ))),
                }
            }
        }
    }

    /// The value at a `$ref` path from a snippet result: entries `offset..offset+limit` of the
    /// list or map there (or the scalar), shaped with the default budgets.
    pub async fn fetch(
        &self,
        r: &str,
        offset: u32,
        limit: u32,
        access: AccessCheck,
    ) -> Result<Value, GridError> {
        let at = crate::snippet::parse_ref(r).map_err(GridError::Invalid)?;
        access(&at.collection, false)?;
        let doc = self.table(&at.collection)?.get(at.key.clone()).await?.map(|v| v.value);
        crate::snippet::engine::fetch(at, r, doc, offset, limit, &self.snippets.defaults)
    }

    /// Stores (or replaces) a module of procedures: compiled first, then recorded durably.
    pub fn put_procedures(&self, module: &str, src: &str) -> Result<(), GridError> {
        valid_name(module)?;
        self.snippets.engine.set_procedures(module, src)?;
        let key = format!("{PROC_PREFIX}{module}");
        let v = Value::Str(src.to_string()).encode().map_err(|e| GridError::Value(e.to_string()))?;
        self.catalog(|h| durable_apply(h, heapgrid_heap::WriteBatch::new().put(key.as_bytes(), &v)?))
    }

    /// Removes a stored module of procedures.
    pub fn drop_procedures(&self, module: &str) -> Result<bool, GridError> {
        let key = format!("{PROC_PREFIX}{module}");
        self.catalog(|h| durable_apply(h, heapgrid_heap::WriteBatch::new().delete(key.as_bytes())?))?;
        Ok(self.snippets.engine.remove_procedures(module))
    }

    /// Every table, by name.
    pub fn list_tables(&self) -> Vec<TableInfo> {
        let mut v: Vec<TableInfo> =
            self.registry.read().unwrap_or_else(|e| e.into_inner()).values().map(|t| t.def.info()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// A running table.
    pub fn table(&self, name: &str) -> Result<Arc<TableRuntime>, GridError> {
        self.registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| GridError::NoSuchTable(name.into()))
    }

    /// The node's lock service (sessions, locks, semaphores) and its fence table.
    pub fn locks(&self) -> &Arc<Locks> {
        &self.locks
    }

    /// The node's queue service.
    pub fn queues(&self) -> &Arc<Queues> {
        &self.queues
    }

    /// Joins (or forms) the cluster `opts` describes, with the Raft state in `<dir>/cluster`,
    /// and starts its data plane (replication of the tables the map places). Once per grid.
    pub async fn start_cluster(
        self: &Arc<Self>,
        opts: &crate::cluster::raft::ClusterOptions,
    ) -> Result<(), GridError> {
        use crate::replication::shard::ReplNet;
        let taken = || GridError::Invalid("this grid is already in a cluster".into());
        if self.cluster.get().is_some() {
            return Err(taken());
        }
        let node =
            Arc::new(crate::cluster::raft::ControlNode::listen(opts, &self.dir.join("cluster")).await?);
        let inbox = node.take_data_inbox().ok_or_else(taken)?;
        let (proposals, proposed) = tokio::sync::mpsc::channel(crate::replication::shard::PROPOSALS_MAX);
        let net = Arc::new(ReplNet {
            me: opts.node_id,
            transport: node.transport(),
            map: node.watch(),
            proposals,
            origin: std::time::Instant::now(),
            heartbeat_ms: opts.detector.heartbeat_ms,
            retain_records: opts.retain_records,
        });
        let _ = self.cluster_defaults.set((opts.replicas, opts.sync));
        self.repl_net.set(net.clone()).map_err(|_| taken())?;
        // The lock and queue services reopen as the cluster's replicated copies (another heap
        // each: what this node did alone is not the cluster's history).
        match self.root.call(RootMsg::RestartServices, None).await {
            Ok(ractor::rpc::CallResult::Success(r)) => r?,
            _ => return Err(GridError::Closed),
        }
        let rpc = Arc::new(crate::cluster::shard_rpc::ShardRpc::new(net.clone()));
        self.remote.set(rpc.clone()).map_err(|_| taken())?;
        self.cluster.set(node.clone()).map_err(|_| taken())?;
        let plane = crate::cluster::data::DataPlane::start(
            Arc::downgrade(self),
            node,
            net,
            rpc,
            inbox,
            proposed,
            opts.detector,
        );
        self.data_plane.set(plane).map_err(|_| taken())
    }

    /// Makes `node` the primary of shard `shard` of replicated table `table` (a planned move):
    /// `node` becomes a replica if it is not one, catches up (the primary takes it into the
    /// in-sync set), then the leader switches the primary once the old one's lease has ended
    /// (writes pause for about half a second; a `sync(n)` write in flight may end
    /// `Indeterminate`); if `node` was added, the old primary then leaves the shard, so it keeps
    /// its number of replicas. Run on the Raft leader. The map's version after it.
    pub async fn cluster_move(&self, table: &str, shard: u32, node: u64) -> Result<u64, GridError> {
        use crate::cluster::map::MapCmd;
        use crate::cluster::raft::Admin;
        let (Some(c), Some(plane)) = (self.cluster.get(), self.data_plane.get()) else {
            return Err(GridError::Invalid("this node is not in a cluster".into()));
        };
        let id = (table.to_string(), shard);
        let placed = |c: &crate::cluster::raft::ControlNode| {
            c.map()
                .placement(&id)
                .cloned()
                .ok_or_else(|| GridError::NoSuchTable(format!("{table} shard {shard}")))
        };
        let before = placed(c)?;
        if before.primary == node {
            return Ok(c.map().version);
        }
        if !c.is_leader() {
            let leader = c.status().leader;
            let addr = leader.and_then(|l| c.map().member(l).map(|m| m.addr.clone()));
            return Err(GridError::Invalid(format!(
                "a move runs on the Raft leader: node {leader:?} at {addr:?}"
            )));
        }
        let added = !before.replicas.contains(&node);
        if added {
            c.admin(Admin::Propose(MapCmd::AddReplica { shard: id.clone(), node })).await?;
        }
        let until = tokio::time::Instant::now() + MOVE_CATCH_UP;
        while !placed(c)?.in_sync.contains(&node) {
            if tokio::time::Instant::now() >= until {
                return Err(GridError::Unavailable(format!(
                    "node {node} did not catch up with {table} shard {shard} within {MOVE_CATCH_UP:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut version = plane.switch(id.clone(), node).await?;
        if added {
            let old = before.primary;
            version = c.admin(Admin::Propose(MapCmd::RemoveReplica { shard: id, node: old })).await?.version;
        }
        Ok(version)
    }

    /// How often `cluster_remove` takes the node out of a service again (the leader may have
    /// given it a service replica meanwhile) before giving up.
    const REMOVE_RETRIES: u32 = 5;

    /// Takes `node` out of the cluster, alive or dead, placing every shard it holds elsewhere
    /// first (shared CLUSTER.md, "Operations"):
    /// - a shard it is the primary of moves to an in-sync replica (a planned switch, run on the
    ///   Raft leader; a dead primary is usually failed over already);
    /// - a shard it is a replica of gets a new replica on the member that holds the fewest
    ///   copies among those that do not hold the shard; once that one is in sync, `node`
    ///   leaves the shard. With no such member the shard keeps one copy fewer (refused if its
    ///   in-sync set would fall below its `sync`).
    ///
    /// Then `node` leaves the map and the Raft group. The map's version after it.
    pub async fn cluster_remove(&self, node: u64) -> Result<u64, GridError> {
        use crate::cluster::map::{MapCmd, Placement};
        use crate::cluster::raft::Admin;
        let Some(c) = self.cluster.get() else {
            return Err(GridError::Invalid("this node is not in a cluster".into()));
        };
        let holding = |c: &crate::cluster::raft::ControlNode| -> Vec<((String, u32), Placement)> {
            c.map()
                .placements()
                .filter(|(_, p)| p.primary == node || p.replicas.contains(&node))
                .map(|(id, p)| (id.clone(), p.clone()))
                .collect()
        };
        for (id, p) in holding(c) {
            let (table, shard) = (&id.0, id.1);
            if p.primary == node {
                let Some(&to) = p.in_sync.first() else {
                    return Err(GridError::Invalid(format!(
                        "{table} shard {shard} has no in-sync replica to take over from node {node}"
                    )));
                };
                tracing::info!(table = %table, shard, from = node, to, "removing a node: moving its primary");
                if let Err(e) = self.cluster_move(table, shard, to).await {
                    // A dead primary may have been failed over meanwhile; anything else stops.
                    if c.map().placement(&id).is_none_or(|now| now.primary == node) {
                        return Err(e);
                    }
                }
            }
            let Some(now) = c.map().placement(&id).cloned() else { continue };
            if !now.replicas.contains(&node) {
                continue;
            }
            let map = c.map();
            let copies =
                |m: u64| map.placements().filter(|(_, p)| p.primary == m || p.replicas.contains(&m)).count();
            let spare = map
                .members()
                .map(|m| m.id)
                .filter(|&m| m != node && m != now.primary && !now.replicas.contains(&m))
                .min_by_key(|&m| (copies(m), m));
            if let Some(m) = spare {
                tracing::info!(table = %table, shard, node, new_replica = m, "removing a node: a new replica first");
                c.admin(Admin::Propose(MapCmd::AddReplica { shard: id.clone(), node: m })).await?;
                let until = tokio::time::Instant::now() + MOVE_CATCH_UP;
                while !c.map().placement(&id).is_some_and(|p| p.in_sync.contains(&m)) {
                    if tokio::time::Instant::now() >= until {
                        return Err(GridError::Unavailable(format!(
                            "node {m} did not catch up with {table} shard {shard} within {MOVE_CATCH_UP:?}"
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            c.admin(Admin::Propose(MapCmd::RemoveReplica { shard: id.clone(), node })).await?;
        }
        // The leader gives the services replicas on members short of them: it may have made
        // `node` one again meanwhile. It leaves those again, then the cluster.
        let mut tries = 0;
        loop {
            let again: Vec<(String, u32)> = holding(c)
                .into_iter()
                .filter(|(id, p)| crate::cluster::map::is_service(&id.0) && p.primary != node)
                .map(|(id, _)| id)
                .collect();
            for id in again {
                c.admin(Admin::Propose(MapCmd::RemoveReplica { shard: id, node })).await?;
            }
            match c.admin(Admin::Remove(node)).await {
                Ok(r) => return Ok(r.version),
                Err(e) if tries < Self::REMOVE_RETRIES && !holding(c).is_empty() => {
                    tries += 1;
                    tracing::debug!(node, "removing a node: it holds a service replica again ({e})");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `Ok` if this node serves `service` (`cluster::map::LOCKS_SERVICE` or `QUEUES_SERVICE`):
    /// always on a node on its own; in a cluster only on the node the map places its primary
    /// on (one node serves it for every client; its replicas take over on failure), else
    /// `NotPrimary` naming that node.
    pub fn service_here(&self, service: &str) -> Result<(), GridError> {
        let Some(net) = self.repl_net.get() else { return Ok(()) };
        let map = net.map.borrow();
        let Some(p) = map.placement(&(service.to_string(), 0)) else {
            return Err(GridError::Unavailable(format!(
                "the cluster has not placed the {} service yet",
                service.trim_start_matches('$')
            )));
        };
        if p.primary == net.me {
            return Ok(());
        }
        let addr = map.member(p.primary).map(|m| m.addr.clone());
        Err(GridError::NotPrimary { table: service.to_string(), shard: 0, primary: Some(p.primary), addr })
    }

    /// This node's member of the cluster's control group (`None`: a node on its own).
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::raft::ControlNode>> {
        self.cluster.get()
    }

    /// What this node knows of the cluster, with every copy's last reported position.
    pub fn cluster_status(&self) -> Option<crate::cluster::raft::ClusterStatus> {
        let mut s = self.cluster.get()?.status();
        if let Some(plane) = self.data_plane.get() {
            s.copies = plane.copies();
        }
        Some(s)
    }

    /// Checkpoints and stops every shard, then the tree, then closes the catalogue.
    pub async fn close(&self) -> Result<(), GridError> {
        if let Some(c) = self.cluster.get() {
            c.shutdown().await;
        }
        let r = match self.root.call(RootMsg::Shutdown, None).await {
            Ok(ractor::rpc::CallResult::Success(r)) => r,
            _ => Err(GridError::Closed),
        };
        let _ = self.root.stop_and_wait(None, Some(Duration::from_secs(30))).await;
        self.registry.write().unwrap_or_else(|e| e.into_inner()).clear();
        self.feeds.write().unwrap_or_else(|e| e.into_inner()).clear();
        if let Some(h) = self.catalog.lock().unwrap_or_else(|e| e.into_inner()).take() {
            h.close()?;
        }
        r
    }
}
