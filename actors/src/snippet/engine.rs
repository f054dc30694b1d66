//! `Engine`: the environment snippets compile against, the compile cache, and running a
//! compiled snippet under its budgets.
//!
//! The environment is a frozen Starlark module holding one `collection` value per table and
//! the public functions of every stored-procedure module. It is rebuilt (new generation) when
//! tables or procedures change; cached compilations of an older generation are recompiled on use.
//!
//! A snippet compiles to a frozen function `snippet_main` (see `source.rs`), so a cached snippet
//! costs only a call: `benches/snippet.rs` measured about 1.5 µs over the read it does, against
//! about 30 µs more to rewrite, parse twice, compile and freeze it again.
//! The cache is keyed by the full source text (a hash picks the bucket; equality decides).

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use starlark::codemap::FileSpanRef;
use starlark::environment::{FrozenModule, Globals, GlobalsBuilder, LibraryExtension, Module};
use starlark::eval::{BeforeStmtFunc, BeforeStmtFuncDyn, Evaluator};
use starlark::syntax::{AstModule, Dialect};
use starlark::values::{OwnedFrozenValue, ValueLike};
use starlark_syntax::syntax::ast::StmtP;

use super::convert::{RefPath, Shaper};
use super::session::{self, Orig, Session, Stop, Store};
use super::source::{self, Mapped};
use super::types::{Collection, builtins};
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
const FILE: &str = "snippet";

fn dialect() -> Dialect {
    Dialect {
        enable_def: true,
        enable_lambda: true,
        enable_load: false,
        enable_keyword_only_arguments: true,
        enable_top_level_stmt: true,
        enable_f_strings: true,
        ..Dialect::Extended
    }
}

fn globals() -> Globals {
    use LibraryExtension as L;
    GlobalsBuilder::extended_by(&[
        L::StructType,
        L::RecordType,
        L::EnumType,
        L::NamespaceType,
        L::Map,
        L::Filter,
        L::Partial,
        L::Json,
        L::Typing,
        L::SetType,
    ])
    .with(builtins)
    .build()
}

/// One write a snippet leaves: a new value, or `None` for a deletion.
#[derive(Clone, Debug, PartialEq)]
pub struct SnippetWrite {
    pub collection: String,
    pub key: Key,
    pub value: Option<Value>,
}

/// What a successful run returns: the shaped result and the writes to commit.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub value: Value,
    pub writes: Vec<SnippetWrite>,
}

struct Env {
    generation: u64,
    module: FrozenModule,
    collections: BTreeSet<String>,
    procedures: BTreeSet<String>,
}

/// A compiled snippet, ready to run (shareable between threads).
pub struct Compiled {
    generation: u64,
    func: OwnedFrozenValue,
    /// Wrapped-source offset → offset in what the client sent.
    origin: Vec<u32>,
    source: Arc<str>,
    /// Collections the source names (a superset of those it touches directly).
    pub collections: Vec<String>,
    /// Whether the source names a stored procedure (which may touch other collections).
    pub calls_procedures: bool,
    /// Microseconds its latest run took (0: never run); callers use it to decide whether to run
    /// it where it may block a thread for long.
    last_run_us: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled").field("collections", &self.collections).finish_non_exhaustive()
    }
}

struct State {
    collections: BTreeSet<String>,
    procedures: BTreeMap<String, String>,
    env: Arc<Env>,
}

/// The snippet engine of one grid.
pub struct Engine {
    globals: Globals,
    state: RwLock<State>,
    cache: Mutex<Cache>,
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

/// Classifies a Starlark error and finds where it happened in the client's source.
fn map_error(e: &starlark::Error, src: &str, origin: &[u32], fallback: Option<usize>) -> GridError {
    use starlark_syntax::error::ErrorKind as K;
    let (mut kind, message) = match e.kind() {
        K::Parser(a) => (SnippetErrorKind::Syntax, a.to_string()),
        K::Scope(a) => (SnippetErrorKind::Name, a.to_string()),
        K::Function(a) => (SnippetErrorKind::Type, a.to_string()),
        K::Fail(a) => (SnippetErrorKind::Fail, a.to_string()),
        K::StackOverflow(a) => (SnippetErrorKind::Budget(Budget::CallDepth), a.to_string()),
        K::Value(a) | K::Native(a) | K::Other(a) | K::Freeze(a) | K::Internal(a) => match a
            .downcast_ref::<Stop>()
        {
            Some(s) => (s.kind, s.message.clone()),
            None => {
                let m = a.to_string();
                // Starlark's own messages (its error enum is private); never substrings that user
                // text (a key, a string) could supply.
                let k = if m.starts_with("Execution duration limit of ") {
                    SnippetErrorKind::Budget(Budget::Steps)
                } else if m == "Evaluation cancelled" {
                    SnippetErrorKind::Budget(Budget::WallTime)
                } else if m.starts_with("Heap memory limit of ") {
                    SnippetErrorKind::Budget(Budget::Memory)
                } else if m.starts_with("Operation `")
                    || m.starts_with("Type of parameter")
                    || m.starts_with("Expected type")
                    || m.starts_with("Value of type")
                    || m.starts_with("Expected value of type")
                {
                    SnippetErrorKind::Type
                } else {
                    SnippetErrorKind::Value
                };
                let m = match k {
                    SnippetErrorKind::Budget(Budget::Steps) => {
                        "the snippet ran past its step budget (statements, calls and loop iterations)".into()
                    }
                    SnippetErrorKind::Budget(Budget::WallTime) => {
                        "the snippet ran past its wall-time budget".into()
                    }
                    _ => m,
                };
                (k, m)
            }
        },
        other => (SnippetErrorKind::Value, other.to_string()),
    };
    if message.starts_with("Variable `") && message.contains("not found") {
        kind = SnippetErrorKind::Name;
    }
    let in_snippet = |fs: &starlark::codemap::FileSpan| fs.filename() == FILE;
    let at = e
        .span()
        .filter(|s| in_snippet(s))
        .map(|s| s.span.begin().get() as usize)
        .or_else(|| {
            e.call_stack()
                .clone()
                .into_frames()
                .into_iter()
                .rev()
                .filter_map(|f| f.location)
                .find(|l| in_snippet(l))
                .map(|l| l.span.begin().get() as usize)
        })
        .or(fallback);
    let offset = at.map(|o| origin.get(o).copied().unwrap_or(src.len() as u32) as usize);
    let message = message.lines().next().unwrap_or("").to_string();
    failure(kind, src, offset, message)
}

/// The instant `ms` from now (far in the future if that overflows).
fn deadline_after(ms: u64) -> Instant {
    let now = Instant::now();
    now.checked_add(Duration::from_millis(ms)).unwrap_or(now + Duration::from_secs(86_400 * 365))
}

/// Counts statements; checks the memory budget and the deadline before each.
struct Guard {
    steps: u64,
    steps_max: u64,
    memory_max: u64,
    deadline: Instant,
    last: Rc<Cell<Option<u32>>>,
}

impl<'e> BeforeStmtFuncDyn<'e> for Guard {
    fn call<'v>(
        &mut self,
        span: FileSpanRef,
        _continued: bool,
        eval: &mut Evaluator<'v, '_, 'e>,
    ) -> starlark::Result<()> {
        self.steps += 1;
        if span.filename() == FILE {
            self.last.set(Some(span.span.begin().get()));
        }
        if self.steps > self.steps_max {
            return Err(session::stop(
                SnippetErrorKind::Budget(Budget::Steps),
                format!("the snippet ran more than {} steps", self.steps_max),
            ));
        }
        let used = eval.heap().allocated_bytes() as u64;
        if used > self.memory_max {
            return Err(session::stop(
                SnippetErrorKind::Budget(Budget::Memory),
                format!("the snippet uses {used} bytes; the memory budget is {}", self.memory_max),
            ));
        }
        if Instant::now() > self.deadline {
            return Err(session::stop(
                SnippetErrorKind::Budget(Budget::WallTime),
                "the snippet ran past its wall-time budget",
            ));
        }
        Ok(())
    }
}

/// Whether a module's public `name` is a collection handle (not a procedure).
fn is_collection(m: &FrozenModule, name: &str) -> bool {
    m.get(name).is_ok_and(|v| v.value().downcast_ref::<Collection>().is_some())
}

impl Engine {
    pub fn new() -> Engine {
        let env = Arc::new(
            Engine::build_env(&globals(), 0, &BTreeSet::new(), &BTreeMap::new(), true)
                .expect("empty environment"),
        );
        Engine {
            globals: globals(),
            state: RwLock::new(State { collections: BTreeSet::new(), procedures: BTreeMap::new(), env }),
            cache: Mutex::new(Cache::default()),
        }
    }

    /// Builds the environment. `strict`: a procedure module that does not load is an error
    /// (registering it); otherwise it is left out (a table it names was dropped).
    fn build_env(
        globals: &Globals,
        generation: u64,
        collections: &BTreeSet<String>,
        procedures: &BTreeMap<String, String>,
        strict: bool,
    ) -> Result<Env, GridError> {
        // Each procedure module sees the collections; the environment sees both.
        let base = Module::with_temp_heap(|m| {
            for c in collections {
                m.set(c, m.heap().alloc(Collection { name: c.clone() }));
            }
            m.freeze()
        })
        .map_err(|e| GridError::Invalid(format!("snippet environment: {e:?}")))?;
        let mut modules = Vec::new();
        let mut defined: BTreeMap<String, String> = BTreeMap::new();
        for (name, src) in procedures {
            match Engine::load_module(globals, &base, collections, name, src, &defined) {
                Ok((frozen, names)) => {
                    for n in names {
                        defined.insert(n, name.clone());
                    }
                    modules.push(frozen);
                }
                Err(e) if strict => return Err(e),
                Err(_) => {}
            }
        }
        // Set, not imported: imported names are private to the importer, and snippets import
        // this module's public names in turn.
        let module = Module::with_temp_heap(|m| {
            for c in collections {
                m.set(c, m.heap().alloc(Collection { name: c.clone() }));
            }
            for p in &modules {
                for n in p.names() {
                    let n = n.as_str();
                    if n.starts_with('_') || collections.contains(n) || is_collection(p, n) {
                        continue;
                    }
                    let Ok(v) = p.get(n) else { continue };
                    // SAFETY: `m`'s frozen heap takes a reference to the procedure module's
                    // heap, which keeps the value alive as long as the environment.
                    m.set(n, unsafe { v.owned_frozen_value(m.frozen_heap()) }.to_value());
                }
            }
            m.freeze()
        })
        .map_err(|e| GridError::Invalid(format!("snippet environment: {e:?}")))?;
        Ok(Env {
            generation,
            module,
            collections: collections.clone(),
            procedures: defined.into_keys().collect(),
        })
    }

    /// Loads one procedure module under the default budgets: the module and its public function
    /// names (refusing names that are builtins, snippet variables, or another module's).
    fn load_module(
        globals: &Globals,
        base: &FrozenModule,
        collections: &BTreeSet<String>,
        name: &str,
        src: &str,
        defined: &BTreeMap<String, String>,
    ) -> Result<(FrozenModule, Vec<String>), GridError> {
        let file = format!("procedures/{name}");
        let identity: Vec<u32> = (0..=src.len() as u32).collect();
        let fail = |e: &starlark::Error| match map_error(e, src, &identity, None) {
            GridError::Snippet(mut f) => {
                f.message = format!("procedure module {name}: {}", f.message);
                GridError::Snippet(f)
            }
            g => g,
        };
        source::check_complexity(src).map_err(|e| {
            failure(
                SnippetErrorKind::Syntax,
                src,
                Some(e.offset),
                format!("procedure module {name}: {}", e.message),
            )
        })?;
        let mut ast = AstModule::parse(&file, src.to_string(), &dialect()).map_err(|e| fail(&e))?;
        ast.replace_binary_operators(&HashMap::from([("*".to_string(), "__mul__".to_string())]));
        // A procedure may name a table that does not exist yet: a name used like a collection
        // (`t[k]`, `t.get(k)`) that is not a builtin starts as a collection handle (a missing
        // table is then `NoSuchTable` when the procedure runs, not a failure to load it).
        let builtin: BTreeSet<&str> = globals.iter().map(|(n, _)| n).collect();
        let free: Vec<String> = source::subscripted_identifiers(src)
            .into_iter()
            .filter(|n| !builtin.contains(n.as_str()) && !collections.contains(n))
            .collect();
        let limits = Limits::default();
        let frozen = Module::with_temp_heap(|m| {
            m.import_public_symbols(base);
            for n in &free {
                m.set(n, m.heap().alloc(Collection { name: n.clone() }));
            }
            {
                // The module's top-level code runs once per load, under the default budgets.
                let mut eval = Evaluator::new(&m);
                let setup = |r: anyhow::Result<()>| r.map_err(|e| GridError::Invalid(e.to_string()));
                setup(eval.set_max_tick_count(limits.steps))?;
                setup(eval.set_max_heap_size(limits.memory_bytes as usize))?;
                eval.before_stmt_for_dap(BeforeStmtFunc::from_dyn(Box::new(Guard {
                    steps: 0,
                    steps_max: limits.steps,
                    memory_max: limits.memory_bytes,
                    deadline: deadline_after(limits.wall_ms),
                    last: Rc::default(),
                })));
                eval.eval_module(ast, globals).map_err(|e| fail(&e))?;
            }
            m.freeze().map_err(|e| GridError::Invalid(format!("procedure module {name}: {e:?}")))
        })?;
        let mut names = Vec::new();
        for n in frozen.names() {
            let n = n.as_str().to_string();
            if n.starts_with('_') || collections.contains(&n) || is_collection(&frozen, &n) {
                continue;
            }
            if builtin.contains(n.as_str()) || n == "key" || n == "args" {
                return Err(GridError::Invalid(format!(
                    "procedure module {name}: `{n}` is a builtin or a snippet variable; choose another name"
                )));
            }
            if let Some(other) = defined.get(&n) {
                return Err(GridError::Invalid(format!(
                    "procedure `{n}` is defined by both module {other} and module {name}"
                )));
            }
            names.push(n);
        }
        Ok((frozen, names))
    }

    fn rebuild(&self, st: &mut State, strict: bool) -> Result<(), GridError> {
        let generation = st.env.generation + 1;
        st.env =
            Arc::new(Engine::build_env(&self.globals, generation, &st.collections, &st.procedures, strict)?);
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
        // Not strict: a procedure module that no longer loads (it named a dropped table other than
        // through `t[...]`/`t.`) is left out until it is replaced; snippets calling it get a name
        // error. The build itself only fails on an internal error: keep the old environment.
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
        let old = st.procedures.insert(module.to_string(), src.to_string());
        if let Err(e) = self.rebuild(&mut st, true) {
            match old {
                Some(o) => st.procedures.insert(module.to_string(), o),
                None => st.procedures.remove(module),
            };
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
        let env = self.state.read().unwrap_or_else(|e| e.into_inner()).env.clone();
        if let Some(c) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).map.get(src)
            && c.generation == env.generation
        {
            return Ok(c.clone());
        }
        let c = Arc::new(self.compile_uncached(src, &env)?);
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

    fn compile_uncached(&self, src: &str, env: &Env) -> Result<Compiled, GridError> {
        if src.len() > SNIPPET_SOURCE_BYTES_MAX {
            return Err(GridError::LimitExceeded {
                what: "snippet source bytes".into(),
                got: src.len() as u64,
                max: SNIPPET_SOURCE_BYTES_MAX as u64,
            });
        }
        source::check_complexity(src)
            .map_err(|e| failure(SnippetErrorKind::Syntax, src, Some(e.offset), e.message))?;
        let a = source::rewrite_statements(src)
            .map_err(|e| failure(SnippetErrorKind::Syntax, src, Some(e.offset), e.message))?;
        let a_origin: Vec<u32> = a.origin.clone();
        let ast = AstModule::parse(FILE, a.text.clone(), &dialect())
            .map_err(|e| map_error(&e, src, &a_origin, None))?;
        let last = match &ast.statement().node {
            StmtP::Statements(v) => v.last(),
            _ => Some(ast.statement()),
        };
        let return_at = last.and_then(|s| match &s.node {
            StmtP::Expression(_) => Some(s.span.begin().get() as usize),
            _ => None,
        });
        let b: Mapped = source::wrap(&a.text, return_at);
        let origin = b.then(&a);
        let mut ast = AstModule::parse(FILE, b.text.clone(), &dialect())
            .map_err(|e| map_error(&e, src, &origin, None))?;
        ast.replace_binary_operators(&HashMap::from([("*".to_string(), "__mul__".to_string())]));
        let frozen = Module::with_temp_heap(|m| {
            m.import_public_symbols(&env.module);
            {
                let mut eval = Evaluator::new(&m);
                eval.eval_module(ast, &self.globals).map_err(|e| map_error(&e, src, &origin, None))?;
            }
            m.freeze().map_err(|e| GridError::Invalid(format!("snippet: {e:?}")))
        })?;
        let func = frozen.get("snippet_main").map_err(|e| GridError::Invalid(format!("snippet: {e}")))?;
        let names = source::identifiers(src);
        let collections = names.iter().filter(|n| env.collections.contains(*n)).cloned().collect();
        let calls_procedures = names.iter().any(|n| env.procedures.contains(n));
        Ok(Compiled {
            generation: env.generation,
            func,
            origin,
            source: src.into(),
            collections,
            calls_procedures,
            last_run_us: Default::default(),
        })
    }
}

impl Compiled {
    /// Runs the snippet against `store` under `limits`. Writes nothing: the outcome carries the
    /// writes for the caller to commit.
    /// `key` (the routing key of a collection-scoped run) and `args` (the request's arguments)
    /// are the snippet's `key` and `args` variables.
    pub fn run(
        &self,
        store: &mut dyn Store,
        limits: &Limits,
        key: Option<&Key>,
        args: &Value,
    ) -> Result<Outcome, GridError> {
        let started = Instant::now();
        let deadline = deadline_after(limits.wall_ms);
        let last: Rc<Cell<Option<u32>>> = Rc::default();
        let src = &*self.source;
        let r = Module::with_temp_heap(|m| {
            // SAFETY: the value is a function of the frozen module `self.func` keeps alive; the
            // module's frozen heap takes a reference to that heap, and no value outlives `m`.
            let f = unsafe { self.func.owned_frozen_value(m.frozen_heap()) }.to_value();
            let mut session = Session::new(store, limits.memory_bytes);
            let r = {
                let mut eval = Evaluator::new(&m);
                eval.disable_gc();
                let setup = |r: anyhow::Result<()>| r.map_err(|e| GridError::Invalid(e.to_string()));
                setup(eval.set_max_callstack_size(limits.call_depth as usize))?;
                setup(eval.set_max_tick_count(limits.steps))?;
                setup(eval.set_max_heap_size(limits.memory_bytes as usize))?;
                eval.set_check_cancelled(Box::new(move || Instant::now() > deadline));
                eval.before_stmt_for_dap(BeforeStmtFunc::from_dyn(Box::new(Guard {
                    steps: 0,
                    steps_max: limits.steps,
                    memory_max: limits.memory_bytes,
                    deadline,
                    last: last.clone(),
                })));
                let heap = m.heap();
                let key = key.map_or(starlark::values::Value::new_none(), |k| match k {
                    Key::Int(i) => heap.alloc(*i),
                    Key::Str(s) => heap.alloc(s.as_str()),
                });
                let args = super::convert::to_starlark(args, heap);
                let _entered = session::enter(&mut session);
                eval.eval_function(f, &[key, args], &[])
            };
            let fallback = last.get().map(|o| o as usize);
            if let Some(e) = session.abort.take() {
                return Err(e);
            }
            let v = r.map_err(|e| map_error(&e, src, &self.origin, fallback))?;
            let writes = session.writes(limits.writes).map_err(|e| map_error(&e, src, &self.origin, None))?;
            // Documents read from collections are answered with `$ref`s when too big.
            let mut origins = HashMap::new();
            for ((c, k), d) in &session.docs {
                if let (Some(live), true) =
                    (d.live, matches!(d.orig, Orig::Present(_) | Orig::Exists | Orig::Unknown))
                {
                    origins.insert(
                        live.identity(),
                        RefPath {
                            collection: session.coll_name(*c).to_string(),
                            key: k.clone(),
                            path: vec![],
                        },
                    );
                }
            }
            let mut shaper = Shaper {
                depth_max: limits.result_depth,
                items_max: limits.result_items,
                bytes_max: limits.result_bytes,
                bytes: 0,
            };
            let value = match shaper.shape_starlark(v, &origins, None, 0) {
                Ok(Ok(v)) => v,
                Ok(Err(why)) => {
                    return Err(failure(SnippetErrorKind::Value, src, None, format!("result: {why}")));
                }
                Err(too_big) => {
                    return Err(failure(SnippetErrorKind::Budget(Budget::ResultSize), src, None, too_big.0));
                }
            };
            let writes = writes
                .into_iter()
                .map(|(collection, key, value)| SnippetWrite { collection, key, value })
                .collect();
            Ok(Outcome { value, writes })
        });
        let us = started.elapsed().as_micros().min(u64::MAX as u128) as u64;
        self.last_run_us.store(us.max(1), std::sync::atomic::Ordering::Relaxed);
        r
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
