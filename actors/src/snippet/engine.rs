//! `Engine`: what snippets compile against (the tables and the stored procedures), the compile
//! cache, and the host side of a run (`Compiled::run`): answering a program's reads from a
//! `Store`, turning the documents it touched into writes, and shaping its answer.
//!
//! A program is `prelude.py` + the procedure modules (when the snippet names a procedure) + the
//! snippet, each rewritten by `rewrite.rs`. It is cached by the snippet's text and the
//! environment's generation (tables or procedures changed: recompiled on next use).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use monty_types::{ExcType, MontyException, MontyObject};

use super::convert::{self, RefPath, Shaper};
use super::rewrite::{self, RewriteError};
use super::session::{ScanQuery, Store};
use super::source;
use super::vm::{Answer, EngineLimits, InProcess, Program, Step, Vm, VmError};
use super::worker::WorkerPool;
use super::{Budget, Limits, SnippetErrorKind, SnippetFailure};
use crate::error::GridError;
use crate::key::Key;
use crate::value::{PathSeg, Value};

/// Most snippets kept compiled, and most source bytes among them; past either the cache starts
/// over.
pub const COMPILE_CACHE_ENTRIES: usize = 4096;
pub const COMPILE_CACHE_BYTES: usize = 32 << 20;
/// Longest snippet source accepted.
pub const SNIPPET_SOURCE_BYTES_MAX: usize = 256 << 10;

const PRELUDE: &str = include_str!("prelude.py");

/// One write a snippet leaves: a new value, or `None` for a deletion.
#[derive(Clone, Debug, PartialEq)]
pub struct SnippetWrite {
    pub collection: String,
    pub key: Key,
    pub value: Option<Value>,
}

/// A feed change a snippet leaves, applied after its writes commit, in program order.
#[derive(Clone, Debug, PartialEq)]
pub enum FeedWrite {
    Append {
        feed: String,
        value: Value,
        id: Option<u64>,
    },
    Remove {
        feed: String,
        id: u64,
    },
    /// `queue(q).push(value, dedup_key, delay_ms)`.
    Push {
        queue: String,
        value: Value,
        dedup_key: Option<String>,
        delay_ms: u64,
    },
}

/// What a successful run returns: the shaped result, the writes to commit, and the feed
/// changes to apply after them.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub value: Value,
    pub writes: Vec<SnippetWrite>,
    pub feed_writes: Vec<FeedWrite>,
    /// What the run printed (`print()`), at most `vm::PRINT_BYTES_MAX`.
    pub printed: String,
}

/// Where runs happen.
#[derive(Clone)]
pub enum Runner {
    /// In this process (trusted code only).
    InProcess,
    /// In the sandbox worker processes of this pool.
    Workers(Arc<WorkerPool>),
}

struct ProcModule {
    src: String,
}

struct Env {
    generation: u64,
    collections: BTreeSet<String>,
    /// Rewritten procedure modules, concatenated (empty without procedures).
    procedures_text: String,
    /// Public procedure names.
    procedures: BTreeSet<String>,
}

/// A compiled snippet, ready to run (shareable between threads).
pub struct Compiled {
    generation: u64,
    program: Arc<Program>,
    runner: Runner,
    /// Byte offset of the snippet's own text in the program, and its line (0-based).
    snippet_at: usize,
    snippet_line: u32,
    /// Snippet-text offset → offset in what the client sent.
    origin: Vec<u32>,
    source: Arc<str>,
    /// Documents read before the start (see `rewrite::Prefetch`).
    prefetch: Vec<(String, rewrite::Prefetch)>,
    /// Collections the source uses.
    pub collections: Vec<String>,
    /// Whether the source names a stored procedure (which may touch other collections).
    pub calls_procedures: bool,
    /// Whether the source (or a procedure it calls) may use a queue: it runs grid-scoped.
    pub uses_queues: bool,
    /// Microseconds its latest run took (0: never run).
    last_run_us: std::sync::atomic::AtomicU64,
    /// The engine's counters.
    stats: Arc<SnippetStats>,
    /// The collections there were when it compiled (a name error's hint lists them).
    env: Arc<Env>,
}

/// How much of a snippet's source a log line shows.
pub const SNIPPET_LOG_CHARS: usize = 120;

/// What an engine's snippets did (metrics): compilations, compile-cache hits, runs, and how
/// runs ended. Relaxed counters, recorded off the hot path's locks.
#[derive(Debug, Default)]
pub struct SnippetStats {
    pub compiles: AtomicU64,
    pub cache_hits: AtomicU64,
    pub runs: AtomicU64,
    /// Runs that failed for any reason, budgets included.
    pub errors: AtomicU64,
    /// Runs a budget stopped, by budget (`Budget::ALL`'s order).
    pub budget_stops: [AtomicU64; Budget::ALL.len()],
}

impl SnippetStats {
    fn ran(&self, r: &Result<Outcome, GridError>, source: &str) {
        self.runs.fetch_add(1, Relaxed);
        if let Err(e) = r {
            self.errors.fetch_add(1, Relaxed);
            if let GridError::Snippet(SnippetFailure { kind: SnippetErrorKind::Budget(b), message, .. }) = e {
                self.budget_stops[b.index()].fetch_add(1, Relaxed);
                let head: String = source.chars().take(SNIPPET_LOG_CHARS).collect();
                tracing::info!(budget = b.label(), snippet = %head, error = %message, "snippet stopped by its budget");
            }
        }
    }
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled").field("collections", &self.collections).finish_non_exhaustive()
    }
}

struct State {
    collections: BTreeSet<String>,
    procedures: BTreeMap<String, ProcModule>,
    env: Arc<Env>,
    runner: Runner,
}

/// The snippet engine of one grid.
pub struct Engine {
    state: RwLock<State>,
    cache: Mutex<Cache>,
    stats: Arc<SnippetStats>,
}

#[derive(Default)]
struct Cache {
    map: HashMap<Arc<str>, Arc<Compiled>>,
    bytes: usize,
}

impl Default for Engine {
    fn default() -> Self {
        Engine::new()
    }
}

fn failure(
    kind: SnippetErrorKind,
    src: &str,
    offset: Option<usize>,
    message: impl Into<String>,
) -> GridError {
    let (line, col) = offset.map_or((0, 0), |o| source::line_col(src, o));
    GridError::Snippet(SnippetFailure { kind, line, col, message: message.into() })
}

fn kind_of(t: ExcType) -> SnippetErrorKind {
    use ExcType as E;
    match t {
        E::SyntaxError | E::NotImplementedError => SnippetErrorKind::Syntax,
        E::NameError | E::UnboundLocalError => SnippetErrorKind::Name,
        E::TypeError | E::AttributeError => SnippetErrorKind::Type,
        E::MemoryError => SnippetErrorKind::Budget(Budget::Memory),
        E::TimeoutError => SnippetErrorKind::Budget(Budget::WallTime),
        E::RecursionError => SnippetErrorKind::Budget(Budget::CallDepth),
        E::Exception | E::AssertionError => SnippetErrorKind::Fail,
        _ => SnippetErrorKind::Value,
    }
}

/// A name error's message with what the user most likely meant: a collection. Names the
/// collections there are and how to create one.
fn name_hint(message: String, collections: &BTreeSet<String>) -> String {
    let Some(name) = message.split('\'').nth(1).filter(|n| !n.is_empty()) else { return message };
    let create = format!(
        "create a table with `heapgrid eval create {name}` (or `Client::create_table`), a feed with \
         `heapgrid eval feed create {name}`"
    );
    let visible: Vec<&str> = collections.iter().map(String::as_str).filter(|c| !c.starts_with('$')).collect();
    if visible.is_empty() {
        return format!("{message}: no collection is named {name:?}, and there are none yet; {create}");
    }
    const SHOWN_MAX: usize = 20;
    let mut shown = visible.iter().take(SHOWN_MAX).copied().collect::<Vec<_>>().join(", ");
    if visible.len() > SHOWN_MAX {
        shown.push_str(&format!(" and {} more", visible.len() - SHOWN_MAX));
    }
    format!("{message}: no collection is named {name:?} (there are: {shown}); {create}")
}

/// The byte offset of 1-based `line`, `column` (characters) in `text`.
fn offset_of(text: &str, line: u32, column: u32) -> Option<usize> {
    let mut at = 0usize;
    for _ in 1..line {
        at += text[at..].find('\n')? + 1;
    }
    let rest = &text[at..];
    let col = rest.char_indices().nth(column.saturating_sub(1) as usize).map_or(rest.len(), |(i, _)| i);
    Some(at + col)
}

fn rewrite_error(src: &str, e: RewriteError, what: &str) -> GridError {
    failure(SnippetErrorKind::Syntax, src, Some(e.offset), format!("{what}{}", e.message))
}

impl Engine {
    pub fn new() -> Engine {
        let env = Arc::new(Env {
            generation: 0,
            collections: BTreeSet::new(),
            procedures_text: String::new(),
            procedures: BTreeSet::new(),
        });
        Engine {
            state: RwLock::new(State {
                collections: BTreeSet::new(),
                procedures: BTreeMap::new(),
                env,
                runner: Runner::InProcess,
            }),
            cache: Mutex::new(Cache::default()),
            stats: Arc::default(),
        }
    }

    /// What its snippets did so far.
    pub fn stats(&self) -> &Arc<SnippetStats> {
        &self.stats
    }

    /// Runs snippets compiled from now on with `runner` (the cache starts over).
    pub fn set_runner(&self, runner: Runner) {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        st.runner = runner;
        let _ = self.rebuild(&mut st, false);
    }

    /// Builds the environment: every procedure module rewritten against the tables. `strict`:
    /// a module that does not rewrite or compile is an error (registering it), else left out.
    fn build_env(
        generation: u64,
        collections: &BTreeSet<String>,
        procedures: &BTreeMap<String, ProcModule>,
        strict: bool,
    ) -> Result<Env, GridError> {
        let mut text = String::new();
        let mut names = BTreeSet::new();
        let mut owner: BTreeMap<String, String> = BTreeMap::new();
        for (module, m) in procedures {
            let what = format!("procedure module {module}: ");
            let r = source::check_complexity(&m.src)
                .map_err(|e| failure(SnippetErrorKind::Syntax, &m.src, Some(e.offset), format!("{what}{}", e.message)))
                .and_then(|()| rewrite::rewrite(&m.src, collections, false).map_err(|e| rewrite_error(&m.src, e, &what)))
                .and_then(|r| {
                    if let Some(at) = r.top_level_code {
                        return Err(failure(
                            SnippetErrorKind::Syntax,
                            &m.src,
                            Some(at),
                            format!("{what}a procedure module holds definitions (def, class, assignments, imports), not statements to run"),
                        ));
                    }
                    for n in &r.top_level {
                        if n.starts_with("_hg") || BUILTINS.contains(&n.as_str()) {
                            return Err(GridError::Invalid(format!(
                                "{what}`{n}` is a builtin or reserved for snippets; choose another name"
                            )));
                        }
                        if let Some(other) = owner.get(n) {
                            return Err(GridError::Invalid(format!(
                                "procedure `{n}` is defined by both module {other} and module {module}"
                            )));
                        }
                    }
                    if strict {
                        // Checked by compiling it after the prelude (admin code: in process).
                        let t = format!("{PRELUDE}\n{}\n_hg_end(None)\n", r.text);
                        Program::compile(&t).map_err(|e| {
                            GridError::Snippet(SnippetFailure {
                                kind: SnippetErrorKind::Syntax,
                                line: e.traceback().last().map_or(0, |f| {
                                    f.start.line.saturating_sub(PRELUDE.lines().count() as u32 + 1)
                                }),
                                col: e.traceback().last().map_or(0, |f| f.start.column),
                                message: format!("{what}{}", e.message().unwrap_or("does not compile")),
                            })
                        })?;
                    }
                    Ok(r)
                });
            match r {
                Ok(r) => {
                    for n in &r.top_level {
                        owner.insert(n.clone(), module.clone());
                        if !n.starts_with('_') {
                            names.insert(n.clone());
                        }
                    }
                    text.push_str(&format!("# procedure module {module}\n"));
                    text.push_str(&r.text);
                    text.push('\n');
                }
                Err(e) if strict => return Err(e),
                Err(_) => {}
            }
        }
        Ok(Env { generation, collections: collections.clone(), procedures_text: text, procedures: names })
    }

    fn rebuild(&self, st: &mut State, strict: bool) -> Result<(), GridError> {
        let generation = st.env.generation + 1;
        st.env = Arc::new(Engine::build_env(generation, &st.collections, &st.procedures, strict)?);
        Ok(())
    }

    /// Sets the collections snippets see (called when tables are created or dropped).
    pub fn set_collections(&self, names: impl IntoIterator<Item = String>) {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        let names: BTreeSet<String> = names.into_iter().collect();
        if names == st.collections {
            return;
        }
        let old = std::mem::replace(&mut st.collections, names);
        if self.rebuild(&mut st, false).is_err() {
            st.collections = old;
        }
    }

    /// Registers (or replaces) a module of stored procedures; checked by compiling it.
    pub fn set_procedures(&self, module: &str, src: &str) -> Result<(), GridError> {
        if src.len() > SNIPPET_SOURCE_BYTES_MAX {
            return Err(GridError::LimitExceeded {
                what: "procedure source bytes".into(),
                got: src.len() as u64,
                max: SNIPPET_SOURCE_BYTES_MAX as u64,
            });
        }
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        let old = st.procedures.insert(module.to_string(), ProcModule { src: src.to_string() });
        if let Err(e) = self.rebuild(&mut st, true) {
            match old {
                Some(o) => st.procedures.insert(module.to_string(), o),
                None => st.procedures.remove(module),
            };
            let _ = self.rebuild(&mut st, false);
            return Err(e);
        }
        Ok(())
    }

    /// Removes a module of stored procedures (whether it existed).
    pub fn remove_procedures(&self, module: &str) -> bool {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        let existed = st.procedures.remove(module).is_some();
        if existed {
            let _ = self.rebuild(&mut st, false);
        }
        existed
    }

    /// Compiles `src`, or returns the cached compilation of the same text.
    pub fn compile(&self, src: &str) -> Result<Arc<Compiled>, GridError> {
        let (env, runner) = {
            let st = self.state.read().unwrap_or_else(|e| e.into_inner());
            (st.env.clone(), st.runner.clone())
        };
        if let Some(c) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).map.get(src)
            && c.generation == env.generation
        {
            self.stats.cache_hits.fetch_add(1, Relaxed);
            return Ok(c.clone());
        }
        self.stats.compiles.fetch_add(1, Relaxed);
        let c = Arc::new(Engine::compile_uncached(src, &env, runner, self.stats.clone())?);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.map.len() >= COMPILE_CACHE_ENTRIES || cache.bytes + src.len() > COMPILE_CACHE_BYTES {
            cache.map.clear();
            cache.bytes = 0;
        }
        if let Some(old) = cache.map.insert(c.source.clone(), c.clone()) {
            cache.bytes -= old.source.len();
        }
        cache.bytes += src.len();
        Ok(c)
    }

    fn compile_uncached(
        src: &str,
        env: &Arc<Env>,
        runner: Runner,
        stats: Arc<SnippetStats>,
    ) -> Result<Compiled, GridError> {
        if src.len() > SNIPPET_SOURCE_BYTES_MAX {
            return Err(GridError::LimitExceeded {
                what: "snippet source bytes".into(),
                got: src.len() as u64,
                max: SNIPPET_SOURCE_BYTES_MAX as u64,
            });
        }
        source::check_complexity(src)
            .map_err(|e| failure(SnippetErrorKind::Syntax, src, Some(e.offset), e.message))?;
        let r = rewrite::rewrite(src, &env.collections, true).map_err(|e| rewrite_error(src, e, ""))?;
        let calls_procedures = r.names.iter().any(|n| env.procedures.contains(n));
        let procedures = if calls_procedures { env.procedures_text.as_str() } else { "" };
        let uses_fail = r.names.contains("fail") || procedures.contains("fail(");
        let uses_queues = r.names.contains("queue") || procedures.contains("queue(");
        let mut text = prelude_for(&[&r.text, procedures], uses_fail);
        text.push('\n');
        text.push_str(procedures);
        let snippet_at = text.len();
        let snippet_line = text.matches('\n').count() as u32;
        text.push_str(&r.text);
        let program = Arc::new(Program::new(text));
        let c = Compiled {
            generation: env.generation,
            program,
            runner,
            snippet_at,
            snippet_line,
            origin: r.origin,
            prefetch: r.prefetch.into_iter().collect(),
            source: src.into(),
            collections: r.collections.into_iter().collect(),
            calls_procedures,
            uses_queues,
            last_run_us: Default::default(),
            stats,
            env: env.clone(),
        };
        if let Runner::InProcess = c.runner {
            // Trusted: compile here, now, so a syntax error is reported at compile time.
            if let Err(e) =
                c.program.compiled.get_or_init(|| Program::compile(&c.program.text).map(Mutex::new))
            {
                return Err(c.exception(e.clone()));
            }
        }
        Ok(c)
    }
}

/// The prelude sections a program needs (see prelude.py): `core`, and each other section whose
/// marker (`_hg_del(`, ...) appears in one of `texts`; `fail` when the program names it.
fn prelude_for(texts: &[&str], uses_fail: bool) -> String {
    let mut out = String::with_capacity(PRELUDE.len());
    let uses = |m: &str| texts.iter().any(|t| t.contains(m));
    // The header before the first section is comments only.
    for section in PRELUDE.split("\n# == ").skip(1) {
        let (marker, _) = section.split_once('\n').unwrap_or((section, ""));
        let keep = match marker {
            "core" => true,
            "fail" => uses_fail,
            // A collection object's `__len__` calls `_hg_len`.
            "_hg_len(" => uses("_hg_len(") || uses("_hg_coll("),
            m => uses(m),
        };
        if keep {
            out.push_str("# == ");
            out.push_str(section);
            out.push('\n');
        }
    }
    out
}

/// Equal as stored: floats by their bits, so a document holding NaN that a run only read is
/// not a change.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => x.to_bits() == y.to_bits(),
        (Value::List(x), Value::List(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q)),
        (Value::Map(x), Value::Map(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|((k1, v1), (k2, v2))| k1 == k2 && same(v1, v2))
        }
        (x, y) => x == y,
    }
}

/// Names a procedure may not take: Python builtins a snippet relies on.
const BUILTINS: &[&str] = &[
    "abs",
    "all",
    "any",
    "bin",
    "bool",
    "bytes",
    "chr",
    "dict",
    "divmod",
    "enumerate",
    "filter",
    "float",
    "getattr",
    "hasattr",
    "hash",
    "hex",
    "id",
    "int",
    "isinstance",
    "iter",
    "len",
    "list",
    "map",
    "max",
    "min",
    "next",
    "oct",
    "open",
    "ord",
    "pow",
    "print",
    "range",
    "repr",
    "reversed",
    "round",
    "set",
    "setattr",
    "sorted",
    "str",
    "sum",
    "tuple",
    "type",
    "zip",
    "fail",
    "lock_held",
    "key",
    "args",
];

/// The host side of one run: what it read, and the budgets of its reads.
struct Host<'s> {
    store: &'s mut dyn Store,
    reads: HashMap<(String, Key), Option<Value>>,
    calls: u64,
    calls_max: u64,
}

enum HostError {
    /// Raised in the program.
    Raise(ExcType, String),
    /// Ends the run with this error (an infrastructure failure, a permission).
    Grid(GridError),
}

impl From<GridError> for HostError {
    fn from(e: GridError) -> Self {
        HostError::Grid(e)
    }
}

fn str_arg(args: &[MontyObject], i: usize) -> Result<&str, HostError> {
    match args.get(i) {
        Some(MontyObject::String(s)) => Ok(s),
        _ => Err(HostError::Raise(ExcType::TypeError, "a collection name is a string".into())),
    }
}

fn key_arg(args: &[MontyObject], i: usize) -> Result<Key, HostError> {
    args.get(i)
        .and_then(convert::key_of)
        .ok_or_else(|| HostError::Raise(ExcType::TypeError, "a collection key is an int or a string".into()))
}

fn opt_key_arg(args: &[MontyObject], i: usize) -> Result<Option<Key>, HostError> {
    match args.get(i) {
        None | Some(MontyObject::None) => Ok(None),
        _ => key_arg(args, i).map(Some),
    }
}

fn int_arg(args: &[MontyObject], i: usize) -> Result<i64, HostError> {
    match args.get(i) {
        Some(MontyObject::Int(n)) => Ok(*n),
        _ => Err(HostError::Raise(ExcType::TypeError, "expected an int".into())),
    }
}

impl Host<'_> {
    fn note(&mut self, coll: &str, key: &Key, v: Option<Value>) {
        let k = (coll.to_string(), key.clone());
        self.reads.entry(k).or_insert(v);
    }

    /// Reads the documents the program reads by the request's key before it starts: the
    /// `_hg_pre` input. A read that fails is left to the program (it meets the error where it
    /// reads, as it would have).
    fn prefetch(
        &mut self,
        wanted: &[(String, rewrite::Prefetch)],
        key: Option<&Key>,
        args: &Value,
    ) -> MontyObject {
        let mut pairs = Vec::new();
        for (c, which) in wanted {
            let k = match which {
                rewrite::Prefetch::Key => key.cloned(),
                rewrite::Prefetch::Args => match args {
                    Value::Int(i) => Some(Key::Int(*i)),
                    Value::Str(s) => Some(Key::Str(s.clone())),
                    _ => None,
                },
            };
            let Some(k) = k else { continue };
            if self.reads.contains_key(&(c.clone(), k.clone())) {
                continue;
            }
            let Ok(v) = self.store.get(c, &k) else { continue };
            let cell = match &v {
                Some(v) => MontyObject::List(vec![MontyObject::Bool(true), convert::to_monty(v)]),
                None => MontyObject::List(vec![MontyObject::Bool(false), MontyObject::None]),
            };
            pairs.push((
                MontyObject::Tuple(vec![MontyObject::String(c.clone()), convert::key_to_monty(&k)]),
                cell,
            ));
            self.note(c, &k, v);
        }
        if pairs.is_empty() {
            return MontyObject::None;
        }
        MontyObject::Dict(monty_types::DictPairs::from(pairs))
    }

    fn call(&mut self, name: &str, args: &[MontyObject]) -> Result<MontyObject, HostError> {
        self.calls += 1;
        if self.calls > self.calls_max {
            return Err(HostError::Grid(GridError::Snippet(SnippetFailure {
                kind: SnippetErrorKind::Budget(Budget::Steps),
                line: 0,
                col: 0,
                message: format!("the snippet read the grid more than {} times", self.calls_max),
            })));
        }
        match name {
            "_hg_read" => {
                let (c, k) = (str_arg(args, 0)?, key_arg(args, 1)?);
                let v = self.store.get(c, &k)?;
                let out = match &v {
                    Some(v) => MontyObject::Tuple(vec![MontyObject::Bool(true), convert::to_monty(v)]),
                    None => MontyObject::Tuple(vec![MontyObject::Bool(false), MontyObject::None]),
                };
                self.note(c, &k, v);
                Ok(out)
            }
            "_hg_contains" => {
                let (c, k) = (str_arg(args, 0)?, key_arg(args, 1)?);
                Ok(MontyObject::Bool(self.store.contains(c, &k)?))
            }
            "_hg_count" => {
                let c = str_arg(args, 0)?;
                let mut n = self.store.count(c)? as i64;
                if let Some(MontyObject::List(changes)) = args.get(1) {
                    for ch in changes {
                        let MontyObject::List(pair) = ch else { continue };
                        let (Some(k), Some(MontyObject::Bool(live))) =
                            (pair.first().and_then(convert::key_of), pair.get(1))
                        else {
                            continue;
                        };
                        let existed = match self.reads.get(&(c.to_string(), k.clone())) {
                            Some(v) => v.is_some(),
                            None => self.store.contains(c, &k)?,
                        };
                        n += i64::from(*live && !existed) - i64::from(!*live && existed);
                    }
                }
                Ok(MontyObject::Int(n))
            }
            "_hg_scan" => {
                let c = str_arg(args, 0)?;
                let prefix = match args.get(1) {
                    Some(MontyObject::String(s)) => Some(s.clone()),
                    Some(MontyObject::None) | None => None,
                    _ => {
                        return Err(HostError::Raise(ExcType::TypeError, "a scan prefix is a string".into()));
                    }
                };
                let (start, end) = (opt_key_arg(args, 2)?, opt_key_arg(args, 3)?);
                let (limit, extra) = (int_arg(args, 4)?, int_arg(args, 5)?);
                let reverse = matches!(args.get(6), Some(MontyObject::Bool(true)));
                let max = crate::limits::SCAN_LIMIT_MAX as i64;
                if !(0..=max).contains(&limit) {
                    return Err(HostError::Raise(
                        ExcType::ValueError,
                        format!("scan limit {limit} is outside 0..={max}"),
                    ));
                }
                let q = ScanQuery { prefix, start, end, limit: (limit + extra).min(max) as u32, reverse };
                let entries = self.store.scan(c, &q)?;
                let mut out = Vec::with_capacity(entries.len());
                for (k, v) in entries {
                    out.push(MontyObject::Tuple(vec![convert::key_to_monty(&k), convert::to_monty(&v)]));
                    self.note(c, &k, Some(v));
                }
                Ok(MontyObject::List(out))
            }
            "_hg_fread" => {
                let feed = str_arg(args, 0)?;
                let at = match args.get(1) {
                    Some(MontyObject::None) | None => None,
                    Some(MontyObject::Int(i)) if *i >= 0 => Some(*i as u64),
                    _ => {
                        return Err(HostError::Raise(
                            ExcType::TypeError,
                            "a feed position is an id (int >= 0)".into(),
                        ));
                    }
                };
                let n = int_arg(args, 2)?;
                let max = crate::feed::FEED_READ_MAX as i64;
                if !(0..=max).contains(&n) {
                    return Err(HostError::Raise(
                        ExcType::ValueError,
                        format!("read count {n} is outside 0..={max}"),
                    ));
                }
                let back = matches!(args.get(3), Some(MontyObject::Bool(true)));
                let records = self.store.feed_read(feed, at, n as u32, back)?;
                Ok(MontyObject::List(records.iter().map(convert::to_monty).collect()))
            }
            "_hg_lock_held" => {
                let lock = str_arg(args, 0)?;
                let fence = int_arg(args, 1)?;
                if fence < 0 {
                    return Ok(MontyObject::Bool(false));
                }
                Ok(MontyObject::Bool(self.store.lock_held(lock, fence as u64)?))
            }
            "_hg_qtake" | "_hg_qpeek" => {
                let queue = str_arg(args, 0)?;
                let n = int_arg(args, 1)?;
                let max = i64::from(crate::queue::actor::QUEUE_POP_MAX);
                if !(1..=max).contains(&n) {
                    return Err(HostError::Raise(
                        ExcType::ValueError,
                        format!("count {n} is outside 1..={max}"),
                    ));
                }
                let items = if name == "_hg_qtake" {
                    self.store.queue_take(queue, n as u32)?
                } else {
                    self.store.queue_peek(queue, n as u32)?
                };
                Ok(MontyObject::List(items.iter().map(convert::to_monty).collect()))
            }
            "_hg_qlen" => {
                let queue = str_arg(args, 0)?;
                Ok(convert::to_monty(&self.store.queue_len(queue)?))
            }
            "_hg_fstate" => {
                let feed = str_arg(args, 0)?;
                Ok(convert::to_monty(&self.store.feed_state(feed)?))
            }
            other => Err(HostError::Raise(ExcType::NameError, format!("name '{other}' is not defined"))),
        }
    }
}

impl Compiled {
    /// Maps an exception to a failure at its place in the client's source.
    fn exception(&self, e: MontyException) -> GridError {
        let kind = kind_of(e.exc_type());
        let mut message = e.message().unwrap_or("").lines().next().unwrap_or("").to_string();
        if message.is_empty() {
            message = format!("{:?}", e.exc_type());
        } else if matches!(kind, SnippetErrorKind::Value) {
            message = format!("{:?}: {message}", e.exc_type());
        } else if matches!(kind, SnippetErrorKind::Name) {
            message = name_hint(message, &self.env.collections);
        }
        let snippet_text = &self.program.text[self.snippet_at..];
        let at = e
            .traceback()
            .iter()
            .rev()
            .filter(|f| f.start.line > self.snippet_line)
            .find_map(|f| offset_of(snippet_text, f.start.line - self.snippet_line, f.start.column))
            .map(|o| self.origin.get(o).copied().unwrap_or(self.source.len() as u32) as usize);
        failure(kind, &self.source, at, message)
    }

    fn vm_error(&self, e: VmError, limits: &Limits) -> GridError {
        match e {
            VmError::Exception(e) => self.exception(e),
            VmError::Deadline => failure(
                SnippetErrorKind::Budget(Budget::WallTime),
                &self.source,
                None,
                format!("the snippet ran past its wall-time budget of {} ms", limits.wall_ms),
            ),
            VmError::OutOfMemory => failure(
                SnippetErrorKind::Budget(Budget::Memory),
                &self.source,
                None,
                format!("the snippet used more than its memory budget of {} bytes", limits.memory_bytes),
            ),
            VmError::Died(why) => GridError::WorkerDied(why),
        }
    }

    /// Runs the snippet against `store` under `limits`. Writes nothing: the outcome carries the
    /// writes for the caller to commit. `key` (the routing key of a collection-scoped run) and
    /// `args` (the request's arguments) are the snippet's `key` and `args` variables.
    pub fn run(
        &self,
        store: &mut dyn Store,
        limits: &Limits,
        key: Option<&Key>,
        args: &Value,
    ) -> Result<Outcome, GridError> {
        let started = Instant::now();
        let r = self.run_inner(store, limits, key, args);
        self.stats.ran(&r, &self.source);
        let us = started.elapsed().as_micros().min(u64::MAX as u128) as u64;
        self.last_run_us.store(us.max(1), std::sync::atomic::Ordering::Relaxed);
        r
    }

    fn run_inner(
        &self,
        store: &mut dyn Store,
        limits: &Limits,
        key: Option<&Key>,
        args: &Value,
    ) -> Result<Outcome, GridError> {
        let mut vm: Box<dyn Vm> = match &self.runner {
            Runner::InProcess => Box::<InProcess>::default(),
            Runner::Workers(pool) => Box::new(pool.vm()),
        };
        let engine_limits = EngineLimits {
            wall_ms: limits.wall_ms,
            memory_bytes: limits.memory_bytes,
            call_depth: limits.call_depth,
        };
        let mut host = Host { store, reads: HashMap::new(), calls: 0, calls_max: limits.steps };
        let pre = host.prefetch(&self.prefetch, key, args);
        let inputs = vec![key.map_or(MontyObject::None, convert::key_to_monty), convert::to_monty(args), pre];
        let mut step =
            vm.start(&self.program, inputs, &engine_limits).map_err(|e| self.vm_error(e, limits))?;
        loop {
            match step {
                Step::Call { name, args } => {
                    let a = match host.call(&name, &args) {
                        Ok(v) => Answer::Value(v),
                        Err(HostError::Raise(t, m)) => Answer::Raise(t, m),
                        Err(HostError::Grid(e)) => return Err(e),
                    };
                    step = vm.resume(a).map_err(|e| self.vm_error(e, limits))?;
                }
                Step::Done { args, printed } => {
                    let mut o = self.finish(host, args, limits)?;
                    o.printed = printed;
                    return Ok(o);
                }
            }
        }
    }

    fn finish(
        &self,
        host: Host<'_>,
        mut args: Vec<MontyObject>,
        limits: &Limits,
    ) -> Result<Outcome, GridError> {
        let src = &*self.source;
        let bad = |m: &str| GridError::Invalid(format!("snippet ended oddly: {m}"));
        if args.len() != 4 {
            return Err(bad("arguments"));
        }
        let fw = args.pop().unwrap_or(MontyObject::None);
        let refs_obj = args.pop().unwrap_or(MontyObject::None);
        let docs = args.pop().unwrap_or(MontyObject::None);
        let result = args.pop().unwrap_or(MontyObject::None);
        let MontyObject::Dict(docs) = docs else { return Err(bad("documents")) };
        let mut writes = Vec::new();
        for (t, cell) in &docs {
            let (MontyObject::Tuple(t), MontyObject::List(cell)) = (t, cell) else { return Err(bad("cell")) };
            let (Some(MontyObject::String(coll)), Some(key)) =
                (t.first(), t.get(1).and_then(convert::key_of))
            else {
                return Err(bad("cell key"));
            };
            let (Some(MontyObject::Bool(live)), Some(v)) = (cell.first(), cell.get(1)) else {
                return Err(bad("cell value"));
            };
            let orig = host.reads.get(&(coll.clone(), key.clone()));
            let value = if *live {
                let v = convert::to_value(v).map_err(|why| {
                    failure(SnippetErrorKind::Value, src, None, format!("{coll}[{key}]: {why}"))
                })?;
                if let Some(Some(o)) = orig
                    && same(o, &v)
                {
                    continue;
                }
                Some(v)
            } else {
                if let Some(None) = orig {
                    continue;
                }
                None
            };
            writes.push(SnippetWrite { collection: coll.clone(), key, value });
        }
        let mut feed_writes = Vec::new();
        if let MontyObject::List(fw) = fw {
            for w in fw {
                let MontyObject::Tuple(w) = w else { return Err(bad("feed write")) };
                let (Some(MontyObject::String(feed)), Some(MontyObject::String(what))) =
                    (w.first(), w.get(1))
                else {
                    return Err(bad("feed write"));
                };
                if what == "qpush" {
                    let v = w.get(2).unwrap_or(&MontyObject::None);
                    let value = convert::to_value(v).map_err(|why| {
                        failure(SnippetErrorKind::Value, src, None, format!("queue {feed}.push: {why}"))
                    })?;
                    let opts = match w.get(3) {
                        Some(MontyObject::List(o)) => o.as_slice(),
                        _ => &[],
                    };
                    let dedup_key = match opts.first() {
                        Some(MontyObject::String(k)) => Some(k.clone()),
                        Some(MontyObject::None) | None => None,
                        Some(_) => {
                            let why = format!("queue {feed}.push: a dedup_key is a str");
                            return Err(failure(SnippetErrorKind::Value, src, None, why));
                        }
                    };
                    let delay_ms = match opts.get(1) {
                        Some(MontyObject::Int(d)) if *d >= 0 => *d as u64,
                        None => 0,
                        Some(_) => {
                            let why = format!("queue {feed}.push: delay_ms is an int >= 0");
                            return Err(failure(SnippetErrorKind::Value, src, None, why));
                        }
                    };
                    // Checked now, so a push the queue service would refuse fails the run rather
                    // than after its commit.
                    let refused =
                        crate::queue::actor::check_push(feed, &value, dedup_key.as_deref(), delay_ms);
                    if let Err(e) = refused {
                        return Err(failure(
                            SnippetErrorKind::Value,
                            src,
                            None,
                            format!("queue {feed}.push: {e}"),
                        ));
                    }
                    feed_writes.push(FeedWrite::Push { queue: feed.clone(), value, dedup_key, delay_ms });
                    continue;
                }
                let id = match w.get(3) {
                    Some(MontyObject::Int(i)) if *i > 0 => Some(*i as u64),
                    Some(MontyObject::None) | None => None,
                    Some(_) => {
                        return Err(failure(
                            SnippetErrorKind::Value,
                            src,
                            None,
                            format!("a record id of {feed} is an int above 0"),
                        ));
                    }
                };
                feed_writes.push(match (what.as_str(), id) {
                    ("remove", Some(id)) => FeedWrite::Remove { feed: feed.clone(), id },
                    ("remove", None) => {
                        return Err(failure(
                            SnippetErrorKind::Value,
                            src,
                            None,
                            format!("{feed}.remove needs an id"),
                        ));
                    }
                    _ => {
                        let v = w.get(2).unwrap_or(&MontyObject::None);
                        let value = convert::to_value(v).map_err(|why| {
                            failure(SnippetErrorKind::Value, src, None, format!("{feed}.append: {why}"))
                        })?;
                        FeedWrite::Append { feed: feed.clone(), value, id }
                    }
                });
            }
        }
        if writes.len() + feed_writes.len() > limits.writes as usize {
            return Err(failure(
                SnippetErrorKind::Budget(Budget::Writes),
                src,
                None,
                format!(
                    "the snippet writes {} keys and feed records; the budget is {}",
                    writes.len() + feed_writes.len(),
                    limits.writes
                ),
            ));
        }
        for w in &writes {
            host.store.check_write(&w.collection, &w.key)?;
        }
        for w in &feed_writes {
            match w {
                FeedWrite::Append { feed, .. } | FeedWrite::Remove { feed, .. } => {
                    host.store.check_feed_write(feed)?
                }
                FeedWrite::Push { queue, .. } => host.store.check_queue_write(queue)?,
            }
        }
        // Which parts of the answer are stored documents: `$ref`s when too big.
        let mut refs = Vec::new();
        if let MontyObject::List(rs) = refs_obj {
            for r in rs {
                let MontyObject::Tuple(r) = r else { continue };
                let (Some(MontyObject::List(pos)), Some(MontyObject::Tuple(t))) = (r.first(), r.get(1))
                else {
                    continue;
                };
                let (Some(MontyObject::String(c)), Some(k)) = (t.first(), t.get(1).and_then(convert::key_of))
                else {
                    continue;
                };
                let pos: Vec<usize> = pos
                    .iter()
                    .filter_map(|p| if let MontyObject::Int(i) = p { Some(*i as usize) } else { None })
                    .collect();
                // Only documents as stored (not changed by this run) can be fetched by path.
                let unchanged = !writes.iter().any(|w| &w.collection == c && w.key == k);
                if unchanged {
                    refs.push((pos, RefPath { collection: c.clone(), key: k, path: vec![] }));
                }
            }
        }
        let mut shaper = Shaper {
            depth_max: limits.result_depth,
            items_max: limits.result_items,
            bytes_max: limits.result_bytes,
            bytes: 0,
        };
        let value = match shaper.shape_result(&result, &refs, &mut Vec::new(), None, 0) {
            Ok(Ok(v)) => v,
            Ok(Err(why)) => {
                return Err(failure(SnippetErrorKind::Value, src, None, format!("result: {why}")));
            }
            Err(too_big) => {
                return Err(failure(SnippetErrorKind::Budget(Budget::ResultSize), src, None, too_big.0));
            }
        };
        Ok(Outcome { value, writes, feed_writes, printed: String::new() })
    }

    /// Whether runs go to a sandbox worker process.
    pub fn sandboxed(&self) -> bool {
        matches!(self.runner, Runner::Workers(_))
    }

    /// How long the latest run took, in microseconds (0 if it never ran).
    pub fn last_run_us(&self) -> u64 {
        self.last_run_us.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Resolves the `$ref` path `at` (`r` as the client wrote it) against the stored document `doc`
/// of its collection and key, and returns entries `offset..offset+limit` of the list or map there
/// (the whole value if it is a scalar), shaped with `limits`.
pub fn fetch(
    at: RefPath,
    r: &str,
    doc: Option<Value>,
    offset: u32,
    limit: u32,
    limits: &Limits,
) -> Result<Value, GridError> {
    let doc =
        doc.ok_or_else(|| GridError::Invalid(format!("{r}: key {} not found in {}", at.key, at.collection)))?;
    let mut v = &doc;
    let mut resolved = Vec::with_capacity(at.path.len());
    for seg in &at.path {
        let s = match seg {
            PathSeg::Key(s) => s.clone(),
            PathSeg::Index(i) => i.to_string(),
        };
        let s = &s;
        v = match v {
            Value::Map(m) => {
                resolved.push(PathSeg::Key(s.clone()));
                m.get(s)
            }
            Value::List(l) => {
                let i: i64 =
                    s.parse().map_err(|_| GridError::Invalid(format!("{r}: {s:?} is not a list index")))?;
                resolved.push(PathSeg::Index(i));
                usize::try_from(i).ok().and_then(|i| l.get(i))
            }
            _ => None,
        }
        .ok_or_else(|| GridError::Invalid(format!("{r}: nothing at {s:?}")))?;
    }
    let place = RefPath { collection: at.collection, key: at.key, path: resolved };
    let mut shaper = Shaper {
        depth_max: limits.result_depth,
        items_max: limits.result_items,
        bytes_max: limits.result_bytes,
        bytes: 0,
    };
    let too_big =
        |e: super::convert::TooBig| failure(SnippetErrorKind::Budget(Budget::ResultSize), r, None, e.0);
    let (o, n) = (offset as usize, limit as usize);
    match v {
        Value::List(l) => {
            let mut out = Vec::new();
            for (i, x) in l.iter().enumerate().skip(o).take(n) {
                let mut p = place.clone();
                p.path.push(PathSeg::Index(i as i64));
                out.push(shaper.shape_value(x, &p, 1).map_err(too_big)?);
            }
            Ok(Value::List(out))
        }
        Value::Map(m) => {
            let mut out = indexmap::IndexMap::new();
            for (k, x) in m.iter().skip(o).take(n) {
                let mut p = place.clone();
                p.path.push(PathSeg::Key(k.clone()));
                out.insert(k.clone(), shaper.shape_value(x, &p, 1).map_err(too_big)?);
            }
            Ok(Value::Map(out))
        }
        x => Ok(x.clone()),
    }
}
