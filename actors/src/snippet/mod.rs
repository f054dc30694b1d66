//! Snippets: short Python programs run next to the data, answering with a `Value` (JSON out).
//! The interpreter is Monty (pydantic's Python interpreter in Rust), behind heapgrid's own
//! boundary (`vm.rs`).
//!
//! Pieces:
//! - `source.rs`: checks on the source before it is parsed (nesting bounds), and positions;
//! - `rewrite.rs`: collection syntax (`users[k]`, `del users[k]`, `k in users`, `len(users)`)
//!   turned into calls of the prelude, on the parsed program;
//! - `prelude.py`: the Python side: the run's document cells and the `_HgCollection` type;
//! - `engine.rs`: `Engine` (tables and procedures, the compile cache) and `Compiled::run`, the
//!   host side of a run: reads answered from a `Store`, writes computed at the end;
//! - `vm.rs`: the `Vm` trait and `InProcess` (trusted code);
//! - `worker.rs`: the sandbox: worker processes, their protocol and pool;
//! - `session.rs`: the `Store` trait; `convert.rs`: `Value` ↔ Python values, result shaping.
//!
//! Semantics (docs/snippets.md has the user's version):
//! - A snippet never writes while it runs. Reads go through a `Store`; the documents it touched
//!   come back at the end and the host turns every change into a write, in the order the keys
//!   were first touched. The caller commits them: inside a shard actor as one batch (one op-log
//!   record); from the grid, optimistically (versions of what it read checked at commit).
//! - A snippet that fails, exceeds a budget, or whose worker dies returns an error and no writes.
//! - No clock, no randomness, no I/O: the same snippet on the same data gives the same result and
//!   the same writes. The wall-time budget is the one exception, and it only ever fails a run.

pub mod engine;
pub mod rewrite;
pub mod source;
pub mod vm;
pub mod worker;

mod convert;
mod session;

use serde::{Deserialize, Serialize};

pub use convert::{RefPath, parse_ref};
pub use engine::{Compiled, Engine, FeedWrite, Outcome, Runner, SnippetWrite};
pub use session::{ScanQuery, Store};

/// Budgets of one run. Each exceeded budget fails the run with `SnippetErrorKind::Budget`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Reads of the grid (host calls) one run may make. The interpreter has no per-statement
    /// counter: wall time and memory bound the rest.
    pub steps: u64,
    /// Bytes the run may allocate (in a sandbox worker: a hard ceiling on the process).
    pub memory_bytes: u64,
    /// Nested calls.
    pub call_depth: u32,
    /// Bytes of the encoded result.
    pub result_bytes: u64,
    /// Wall-clock milliseconds (in a sandbox worker: enforced by killing it).
    pub wall_ms: u64,
    /// Keys written.
    pub writes: u32,
    /// Nesting depth of the result; deeper stored values come back as `$ref`s.
    pub result_depth: u32,
    /// Entries of one list or map in the result; longer stored ones come back as `$ref`s.
    pub result_items: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            steps: 1_000_000,
            memory_bytes: 64 << 20,
            call_depth: 64,
            result_bytes: 4 << 20,
            wall_ms: 2_000,
            writes: crate::limits::TABLE_BATCH_OPS_MAX as u32,
            result_depth: 16,
            result_items: 1_000,
        }
    }
}

impl Limits {
    /// The largest budgets a server grants when none are configured.
    pub fn server_max() -> Limits {
        Limits {
            steps: 100_000_000,
            memory_bytes: 1 << 30,
            call_depth: 200,
            result_bytes: 32 << 20,
            wall_ms: 30_000,
            writes: crate::limits::TABLE_BATCH_OPS_MAX as u32,
            result_depth: crate::value::VALUE_DEPTH_MAX as u32,
            result_items: 100_000,
        }
    }

    /// `self` (the defaults) with the request's overrides, each capped by `max`.
    pub fn with_overrides(&self, o: &LimitOverrides, max: &Limits) -> Limits {
        Limits {
            steps: o.steps.unwrap_or(self.steps).clamp(1, max.steps.max(1)),
            memory_bytes: o.memory_bytes.unwrap_or(self.memory_bytes).clamp(1, max.memory_bytes.max(1)),
            call_depth: o.call_depth.unwrap_or(self.call_depth).clamp(1, max.call_depth.max(1)),
            result_bytes: o.result_bytes.unwrap_or(self.result_bytes).clamp(1, max.result_bytes.max(1)),
            wall_ms: o.wall_ms.unwrap_or(self.wall_ms).clamp(1, max.wall_ms.max(1)),
            writes: o.writes.unwrap_or(self.writes).min(max.writes),
            result_depth: o.result_depth.unwrap_or(self.result_depth).clamp(1, max.result_depth.max(1)),
            result_items: o.result_items.unwrap_or(self.result_items).clamp(1, max.result_items.max(1)),
        }
    }
}

/// Where a run's printed text (`print()`) is handed back to whoever asked for it.
pub type PrintSink = std::sync::Arc<std::sync::Mutex<String>>;

/// A grid's snippet engine and budgets.
pub struct Snippets {
    pub engine: engine::Engine,
    /// Budgets of a request that sets none.
    pub defaults: Limits,
    /// The most a request may ask for.
    pub max: Limits,
}

/// Per-request budget overrides (absent: the server's default). Capped by the server's maximums.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitOverrides {
    pub steps: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub call_depth: Option<u32>,
    pub result_bytes: Option<u64>,
    pub wall_ms: Option<u64>,
    pub writes: Option<u32>,
    pub result_depth: Option<u32>,
    pub result_items: Option<u32>,
}

/// A budget, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Budget {
    Steps,
    Memory,
    CallDepth,
    ResultSize,
    WallTime,
    Writes,
}

impl Budget {
    /// Every budget, in a fixed order (`index`).
    pub const ALL: [Budget; 6] = [
        Budget::Steps,
        Budget::Memory,
        Budget::CallDepth,
        Budget::ResultSize,
        Budget::WallTime,
        Budget::Writes,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    /// Its name in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Budget::Steps => "steps",
            Budget::Memory => "memory",
            Budget::CallDepth => "call_depth",
            Budget::ResultSize => "result_size",
            Budget::WallTime => "wall_time",
            Budget::Writes => "writes",
        }
    }
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Budget::Steps => "steps",
            Budget::Memory => "memory",
            Budget::CallDepth => "call depth",
            Budget::ResultSize => "result size",
            Budget::WallTime => "wall time",
            Budget::Writes => "writes",
        })
    }
}

/// What kind of mistake stopped a snippet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnippetErrorKind {
    /// The program does not parse.
    Syntax,
    /// A name that is neither defined, a builtin, a collection nor a procedure.
    Name,
    /// An operation on the wrong type, or a call with the wrong arguments.
    Type,
    /// A bad value: a missing key, an index out of range, a value that cannot be stored.
    Value,
    /// The snippet called `fail(...)`, raised `Exception`, or an `assert` failed.
    Fail,
    /// A budget ran out.
    Budget(Budget),
}

impl std::fmt::Display for SnippetErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnippetErrorKind::Syntax => f.write_str("syntax error"),
            SnippetErrorKind::Name => f.write_str("name error"),
            SnippetErrorKind::Type => f.write_str("type error"),
            SnippetErrorKind::Value => f.write_str("value error"),
            SnippetErrorKind::Fail => f.write_str("fail"),
            SnippetErrorKind::Budget(b) => write!(f, "{b} budget exceeded"),
        }
    }
}

/// A snippet's error, with where it happened in the source the client sent (1-based line and
/// column; 0 when the position is unknown).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnippetFailure {
    pub kind: SnippetErrorKind,
    pub line: u32,
    pub col: u32,
    pub message: String,
}

impl std::fmt::Display for SnippetFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line > 0 {
            write!(f, "{} at line {}, column {}: {}", self.kind, self.line, self.col, self.message)
        } else {
            write!(f, "{}: {}", self.kind, self.message)
        }
    }
}

#[cfg(test)]
mod tests;
