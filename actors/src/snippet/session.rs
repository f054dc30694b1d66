//! The state of one snippet run: the documents it touched, the `Store` it reads through, and the
//! writes it will leave.
//!
//! Collection handles are frozen values shared by every run (they only carry a name), and
//! Starlark's indexing hooks (`t[k]`, `t[k] = v`) get no evaluator, so a run's `Session` is
//! reached through a thread-local pointer set for exactly the duration of the run (`enter`).
//!
//! Invariants:
//! - A document is fetched from the store at most once per run; every later `t[k]` returns the
//!   same Starlark object, so in-place changes (`t[k]['n'] += 1`) are seen by the rest of the run
//!   and written back at the end.
//! - Writes are ordered by the first time their key was touched: deterministic.
//! - Nothing here writes to the store.

use std::cell::Cell;
use std::collections::HashMap;

use starlark::values::{Heap, Value as SValue};

use super::convert;
use super::{Budget, SnippetErrorKind};
use crate::error::GridError;
use crate::key::Key;
use crate::value::Value;

/// A range or prefix query of a collection from a snippet.
#[derive(Clone, Debug, PartialEq)]
pub struct ScanQuery {
    pub prefix: Option<String>,
    pub start: Option<Key>,
    /// Exclusive.
    pub end: Option<Key>,
    pub limit: u32,
    pub reverse: bool,
}

impl ScanQuery {
    pub fn matches(&self, k: &Key) -> bool {
        if let Some(p) = &self.prefix {
            match k {
                Key::Str(s) if s.starts_with(p.as_str()) => {}
                _ => return false,
            }
        }
        self.start.as_ref().is_none_or(|s| k >= s) && self.end.as_ref().is_none_or(|e| k < e)
    }
}

/// Where a snippet's reads come from. Implemented by the shard actor (collection scope: its own
/// heap, only its own collection and shard) and by the grid (grid scope: messages to actors).
pub trait Store {
    fn get(&mut self, coll: &str, key: &Key) -> Result<Option<Value>, GridError>;
    fn contains(&mut self, coll: &str, key: &Key) -> Result<bool, GridError>;
    fn count(&mut self, coll: &str) -> Result<u64, GridError>;
    fn scan(&mut self, coll: &str, q: &ScanQuery) -> Result<Vec<(Key, Value)>, GridError>;
    /// Whether the run may write `key` of `coll` (checked at the assignment, so a refusal has
    /// the snippet's position; the caller still checks every write before committing).
    fn check_write(&mut self, coll: &str, key: &Key) -> Result<(), GridError>;
}

/// What the store held for a touched key before the run.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Orig {
    /// Written without being read: unknown.
    Unknown,
    Absent,
    /// Existed; value not read.
    Exists,
    Present(Value),
}

pub(crate) struct Doc<'v> {
    /// `None`: deleted (or read as absent).
    pub live: Option<SValue<'v>>,
    pub orig: Orig,
    /// Assigned or deleted in this run (else only read, and maybe changed in place).
    pub assigned: bool,
}

/// Values that cannot change in place: a document read as one of these and never assigned is
/// unchanged, with no need to convert it back and compare.
fn immutable(v: SValue) -> bool {
    matches!(v.get_type(), "string" | "int" | "float" | "bool" | "NoneType" | "bytes")
}

/// An error a native function raises to stop the run with a specific kind.
#[derive(Debug)]
pub(crate) struct Stop {
    pub kind: SnippetErrorKind,
    pub message: String,
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Stop {}

pub(crate) fn stop(kind: SnippetErrorKind, message: impl Into<String>) -> starlark::Error {
    starlark::Error::new_other(Stop { kind, message: message.into() })
}

pub(crate) fn value_error(message: impl Into<String>) -> starlark::Error {
    stop(SnippetErrorKind::Value, message)
}

pub(crate) struct Session<'s, 'v> {
    store: &'s mut dyn Store,
    colls: Vec<String>,
    pub(crate) docs: HashMap<(u32, Key), Doc<'v>>,
    pub(crate) order: Vec<(u32, Key)>,
    /// An infrastructure failure (shard unavailable, permission denied) met by a native call:
    /// it ends the run and is returned as itself, not as a snippet error.
    pub(crate) abort: Option<GridError>,
    pub(crate) memory_max: u64,
}

impl<'s, 'v> Session<'s, 'v> {
    pub(crate) fn new(store: &'s mut dyn Store, memory_max: u64) -> Self {
        Session { store, colls: Vec::new(), docs: HashMap::new(), order: Vec::new(), abort: None, memory_max }
    }

    pub(crate) fn coll_name(&self, i: u32) -> &str {
        &self.colls[i as usize]
    }

    fn coll(&mut self, name: &str) -> u32 {
        match self.colls.iter().position(|c| c == name) {
            Some(i) => i as u32,
            None => {
                self.colls.push(name.to_string());
                (self.colls.len() - 1) as u32
            }
        }
    }

    fn fail(&mut self, e: GridError) -> starlark::Error {
        let msg = e.to_string();
        match e {
            // The snippet's own mistakes keep their position.
            GridError::Invalid(m) | GridError::Value(m) => value_error(m),
            e @ GridError::LimitExceeded { .. } => value_error(e.to_string()),
            e => {
                self.abort = Some(e);
                starlark::Error::new_other(Stop { kind: SnippetErrorKind::Value, message: msg })
            }
        }
    }

    fn touch(&mut self, c: u32, key: &Key, doc: Doc<'v>) {
        self.order.push((c, key.clone()));
        self.docs.insert((c, key.clone()), doc);
    }

    /// `t[k]` (`None` if absent).
    pub(crate) fn get(
        &mut self,
        name: &str,
        key: Key,
        heap: Heap<'v>,
    ) -> starlark::Result<Option<SValue<'v>>> {
        let c = self.coll(name);
        if let Some(d) = self.docs.get(&(c, key.clone())) {
            return Ok(d.live);
        }
        let got = self.store.get(name, &key).map_err(|e| self.fail(e))?;
        match got {
            Some(v) => {
                let sv = convert::to_starlark(&v, heap);
                self.touch(c, &key, Doc { live: Some(sv), orig: Orig::Present(v), assigned: false });
                Ok(Some(sv))
            }
            None => {
                self.touch(c, &key, Doc { live: None, orig: Orig::Absent, assigned: false });
                Ok(None)
            }
        }
    }

    /// `t[k] = v`.
    pub(crate) fn set(&mut self, name: &str, key: Key, v: SValue<'v>) -> starlark::Result<()> {
        // Refuse what cannot be stored now, where the assignment is (the final value is checked
        // again at the end, after any later in-place change).
        convert::to_value(v).map_err(value_error)?;
        self.store.check_write(name, &key).map_err(|e| self.fail(e))?;
        let c = self.coll(name);
        match self.docs.get_mut(&(c, key.clone())) {
            Some(d) => {
                d.live = Some(v);
                d.assigned = true;
            }
            None => self.touch(c, &key, Doc { live: Some(v), orig: Orig::Unknown, assigned: true }),
        }
        Ok(())
    }

    fn exists_before(&mut self, name: &str, c: u32, key: &Key) -> starlark::Result<bool> {
        let orig = &self.docs[&(c, key.clone())].orig;
        Ok(match orig {
            Orig::Absent => false,
            Orig::Exists | Orig::Present(_) => true,
            Orig::Unknown => {
                let e = self.store.contains(name, key).map_err(|e| self.fail(e))?;
                if let Some(d) = self.docs.get_mut(&(c, key.clone())) {
                    d.orig = if e { Orig::Exists } else { Orig::Absent };
                }
                e
            }
        })
    }

    /// `del t[k]` / `t.delete(k)`: whether the key existed.
    pub(crate) fn delete(&mut self, name: &str, key: Key) -> starlark::Result<bool> {
        self.store.check_write(name, &key).map_err(|e| self.fail(e))?;
        let c = self.coll(name);
        if !self.docs.contains_key(&(c, key.clone())) {
            let e = self.store.contains(name, &key).map_err(|e| self.fail(e))?;
            let orig = if e { Orig::Exists } else { Orig::Absent };
            self.touch(c, &key, Doc { live: None, orig, assigned: true });
            return Ok(e);
        }
        let d = self.docs.get_mut(&(c, key.clone())).expect("present");
        let existed = d.live.is_some();
        d.live = None;
        d.assigned = true;
        Ok(existed)
    }

    /// `k in t`.
    pub(crate) fn contains(&mut self, name: &str, key: Key) -> starlark::Result<bool> {
        let c = self.coll(name);
        match self.docs.get(&(c, key.clone())) {
            Some(d) => Ok(d.live.is_some()),
            None => self.store.contains(name, &key).map_err(|e| self.fail(e)),
        }
    }

    /// `len(t)`: the stored count adjusted by this run's creations and deletions.
    pub(crate) fn count(&mut self, name: &str) -> starlark::Result<u64> {
        let c = self.coll(name);
        let stored = self.store.count(name).map_err(|e| self.fail(e))?;
        let mine: Vec<Key> = self.order.iter().filter(|(cc, _)| *cc == c).map(|(_, k)| k.clone()).collect();
        let mut n = stored as i64;
        for k in mine {
            let before = self.exists_before(name, c, &k)?;
            let now = self.docs[&(c, k)].live.is_some();
            n += now as i64 - before as i64;
        }
        Ok(n.max(0) as u64)
    }

    /// `t.scan(...)`: entries in key order (or reverse), this run's writes included.
    pub(crate) fn scan(
        &mut self,
        name: &str,
        q: &ScanQuery,
        heap: Heap<'v>,
    ) -> starlark::Result<Vec<(Key, SValue<'v>)>> {
        let c = self.coll(name);
        let mine: Vec<Key> =
            self.order.iter().filter(|(cc, k)| *cc == c && q.matches(k)).map(|(_, k)| k.clone()).collect();
        // Ask for enough that hiding this run's deletions still leaves `limit`.
        let mut wide = q.clone();
        wide.limit = q.limit.saturating_add(mine.len() as u32).min(crate::limits::SCAN_LIMIT_MAX);
        let stored = self.store.scan(name, &wide).map_err(|e| self.fail(e))?;
        let mut out: Vec<(Key, SValue<'v>)> = Vec::with_capacity(stored.len() + mine.len());
        for (k, v) in stored {
            match self.docs.get(&(c, k.clone())) {
                Some(d) => {
                    if let Some(live) = d.live {
                        out.push((k, live));
                    }
                }
                None => {
                    let sv = convert::to_starlark(&v, heap);
                    self.touch(c, &k, Doc { live: Some(sv), orig: Orig::Present(v), assigned: false });
                    out.push((k, sv));
                }
            }
        }
        for k in mine {
            if out.iter().any(|(o, _)| *o == k) {
                continue;
            }
            if let Some(live) = self.docs[&(c, k.clone())].live {
                out.push((k, live));
            }
        }
        if q.reverse {
            out.sort_by(|a, b| b.0.cmp(&a.0));
        } else {
            out.sort_by(|a, b| a.0.cmp(&b.0));
        }
        out.truncate(q.limit as usize);
        Ok(out)
    }

    /// The writes the run leaves, in first-touch order: `(collection, key, new value or None)`.
    pub(crate) fn writes(&self, max: u32) -> starlark::Result<Vec<(String, Key, Option<Value>)>> {
        let mut out = Vec::new();
        for (c, k) in &self.order {
            let d = &self.docs[&(*c, k.clone())];
            let w = match (&d.live, &d.orig) {
                (None, Orig::Absent) => continue,
                (None, _) => None,
                (Some(v), Orig::Present(_)) if !d.assigned && immutable(*v) => continue,
                (Some(v), orig) => {
                    let val = convert::to_value(*v).map_err(|m| {
                        value_error(format!("{}[{k}] cannot be stored: {m}", self.coll_name(*c)))
                    })?;
                    if let Orig::Present(o) = orig
                        && same(o, &val)
                    {
                        continue;
                    }
                    Some(val)
                }
            };
            if out.len() as u32 >= max {
                return Err(stop(
                    SnippetErrorKind::Budget(Budget::Writes),
                    format!("the snippet writes more than {max} keys"),
                ));
            }
            out.push((self.coll_name(*c).to_string(), k.clone(), w));
        }
        Ok(out)
    }
}

/// Exact equality for "did the run change this document": floats by bits (NaN equals itself),
/// maps in order (reordering keys is a change, as it changes what is stored).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => x.to_bits() == y.to_bits(),
        (Value::List(x), Value::List(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y)),
        (Value::Map(x), Value::Map(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|((kx, vx), (ky, vy))| kx == ky && same(vx, vy))
        }
        (a, b) => a == b,
    }
}

thread_local! {
    static CURRENT: Cell<*mut ()> = const { Cell::new(std::ptr::null_mut()) };
}

/// Makes `s` this thread's current session until the guard drops. The guard borrows the session,
/// so the session outlives it; forgetting the guard would leave the pointer set, so the guard is
/// only created by `Compiled::run`, which drops it before the session.
pub(crate) struct Entered<'a> {
    prev: *mut (),
    _session: std::marker::PhantomData<&'a mut ()>,
}

pub(crate) fn enter<'a>(s: &'a mut Session<'_, '_>) -> Entered<'a> {
    let p = s as *mut Session<'_, '_> as *mut ();
    Entered { prev: CURRENT.with(|c| c.replace(p)), _session: std::marker::PhantomData }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.prev));
    }
}

/// Runs `f` on the current session. `'v` must be the lifetime of the heap of the running
/// evaluator, which is what every caller (a native function given that heap's values) has.
pub(crate) fn with<'v, R>(
    f: impl for<'s> FnOnce(&mut Session<'s, 'v>) -> starlark::Result<R>,
) -> starlark::Result<R> {
    // Taken out while in use: a re-entrant call finds no session instead of a second `&mut`.
    let p = CURRENT.with(|c| c.replace(std::ptr::null_mut()));
    if p.is_null() {
        return Err(value_error("collections can only be used while a snippet runs"));
    }
    struct Restore(*mut ());
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(p);
    // SAFETY: `p` was set by `enter` from a `&mut Session` that outlives the guard, and the guard
    // lives for the whole evaluation that calls us; we hold the only reference (the pointer was
    // taken out of the slot above and is put back when we return). Its heap lifetime is the
    // running evaluator's, which is `'v` for our caller. GC is disabled for the run, so the
    // values it holds do not move.
    let s = unsafe { &mut *(p as *mut Session<'_, 'v>) };
    f(s)
}
