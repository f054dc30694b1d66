//! The engine boundary: heapgrid's own trait over the Python interpreter, so that where a
//! snippet runs (this process, or a sandbox worker process) and which interpreter version runs
//! it are each one change.
//!
//! A run is a sequence of steps: the program either calls a host function (`Step::Call`: a
//! read of the grid), which the host answers with `Vm::resume`, or ends by calling `_hg_done`
//! (`Step::Done`), whose arguments are the answer, the documents the run touched, and where the
//! answer holds stored documents. The run writes nothing itself.
//!
//! Two implementations:
//! - `InProcess`: Monty in this process, for trusted code (the embedded Grid's own snippets,
//!   and servers configured to trust a token). Its memory limit is Monty's own accounting,
//!   which a single native call can overshoot: trusted only.
//! - `worker::WorkerVm`: Monty in a worker process of the node's `WorkerPool`, under a
//!   process-wide allocation ceiling (`monty-alloc`), a hard deadline enforced by the parent,
//!   and a worker that is replaced when it dies.

use std::sync::Arc;
use std::time::Duration;

use monty::{MontyRun, RunProgress};
use monty_types::{
    CompileOptions, ExcType, MontyException, MontyObject, NameLookupResult, PrintWriter, ResourceLimits,
    ResourceTracker,
};
use serde::{Deserialize, Serialize};

/// The names of the host functions a program calls (all start with `_hg_`).
pub const HOST_PREFIX: &str = "_hg_";
/// The host function that ends a run.
pub const DONE: &str = "_hg_done";
/// The inputs every program is compiled with: the snippet's `key` and `args`, and `_hg_pre`, the
/// documents the host read before the start (`{(collection, key): [found, value]}` or None), so
/// that the common first read costs no suspension (no round trip to a sandbox worker).
pub const INPUTS: [&str; 3] = ["key", "args", "_hg_pre"];
/// The program's file name in tracebacks.
pub const FILE: &str = "snippet.py";

/// What a program asks of its host next.
#[derive(Debug, Serialize, Deserialize)]
pub enum Step {
    Call {
        name: String,
        args: Vec<MontyObject>,
    },
    /// The end: `_hg_done`'s arguments, and what the run printed (`print()`).
    Done {
        args: Vec<MontyObject>,
        printed: String,
    },
}

/// The most a run may print (`print()`): past it the run fails with a memory error.
pub const PRINT_BYTES_MAX: usize = 64 * 1024;

/// Where a run's `print()` goes: collected into `printed`, at most `PRINT_BYTES_MAX`.
pub(crate) fn out(printed: &mut String) -> PrintWriter<'_> {
    PrintWriter::CollectString(printed, Some(PRINT_BYTES_MAX))
}

/// The host's answer to a call.
#[derive(Debug, Serialize, Deserialize)]
pub enum Answer {
    Value(MontyObject),
    /// Raise this in the program, where the call was made.
    Raise(ExcType, String),
}

/// The budgets the engine enforces itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EngineLimits {
    pub wall_ms: u64,
    pub memory_bytes: u64,
    pub call_depth: u32,
}

/// Why a run stopped without reaching `_hg_done`.
#[derive(Debug)]
pub enum VmError {
    /// The program raised (or does not compile).
    Exception(MontyException),
    /// The worker ran past the hard wall-time deadline and was killed.
    Deadline,
    /// The worker passed its hard memory ceiling and ended.
    OutOfMemory,
    /// The worker died for another reason (killed, crashed), or no worker could be started.
    Died(String),
}

/// One run in progress.
pub trait Vm {
    fn start(
        &mut self,
        program: &Arc<Program>,
        inputs: Vec<MontyObject>,
        limits: &EngineLimits,
    ) -> Result<Step, VmError>;
    fn resume(&mut self, answer: Answer) -> Result<Step, VmError>;
}

/// A rewritten program (prelude, procedures, snippet). Its id is unique in this process (a
/// counter, not a hash of the text: a worker runs whatever its cache holds under an id, so two
/// texts must never share one).
#[derive(Debug)]
pub struct Program {
    pub id: u64,
    pub text: Arc<str>,
    /// Compiled in this process (trusted runs only; a sandboxed program is compiled by its
    /// worker). `MontyRun` is not `Sync`: each run clones it under the lock.
    pub compiled: std::sync::OnceLock<Result<std::sync::Mutex<MontyRun>, MontyException>>,
}

impl Program {
    pub fn new(text: String) -> Program {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Program { id, text: text.into(), compiled: Default::default() }
    }

    pub fn compile(text: &str) -> Result<MontyRun, MontyException> {
        MontyRun::new(
            text.to_string(),
            FILE,
            INPUTS.iter().map(|s| s.to_string()).collect(),
            CompileOptions::default(),
        )
    }
}

pub(crate) fn resource_limits(l: &EngineLimits) -> ResourceLimits {
    ResourceLimits {
        max_duration: Some(Duration::from_millis(l.wall_ms.max(1))),
        max_memory: Some(l.memory_bytes.min(usize::MAX as u64) as usize),
        gc_interval: Some(10_000),
        // The prelude's own frames (`_hg_end`, `_hg_get`, a method) sit on top of the user's.
        max_recursion_depth: l.call_depth as usize + 4,
        max_suspensions: usize::MAX,
    }
}

/// Drives Monty from `p` to the next host call or the end; name lookups of host functions
/// are answered here (they never leave the process the interpreter runs in).
pub(crate) fn drive(
    mut p: Result<RunProgress, MontyException>,
    printed: &mut String,
) -> Result<(Step, Option<monty::FunctionCall>), VmError> {
    loop {
        match p {
            Err(e) => return Err(VmError::Exception(e)),
            Ok(RunProgress::NameLookup(n)) => {
                let r = if n.name.starts_with(HOST_PREFIX) {
                    NameLookupResult::Value(MontyObject::Function { name: n.name.clone(), docstring: None })
                } else {
                    NameLookupResult::Undefined
                };
                p = n.resume(r, out(printed));
            }
            Ok(RunProgress::FunctionCall(c)) => {
                if c.function_name == DONE {
                    let args = c.args.clone();
                    return Ok((Step::Done { args, printed: std::mem::take(printed) }, None));
                }
                if !c.function_name.starts_with(HOST_PREFIX) || c.object_id.is_some() || !c.kwargs.is_empty()
                {
                    let name = c.function_name.clone();
                    p = c.resume(
                        monty_types::ExtFunctionResult::Error(MontyException::new(
                            ExcType::NameError,
                            Some(format!("name '{name}' is not defined")),
                        )),
                        out(printed),
                    );
                    continue;
                }
                let step = Step::Call { name: c.function_name.clone(), args: c.args.clone() };
                return Ok((step, Some(c)));
            }
            Ok(RunProgress::Complete(_)) => {
                return Err(VmError::Exception(MontyException::new(
                    ExcType::RuntimeError,
                    Some("the program ended without an answer".into()),
                )));
            }
            Ok(RunProgress::OsCall(c)) => {
                p = c.abort(
                    MontyException::new(
                        ExcType::PermissionError,
                        Some("snippets have no file or OS access".into()),
                    ),
                    out(printed),
                );
            }
            Ok(RunProgress::ResolveFutures(f)) => {
                p = f.abort(
                    MontyException::new(ExcType::RuntimeError, Some("snippets cannot await".into())),
                    out(printed),
                );
            }
        }
    }
}

/// Resumes a suspended call with the host's answer.
pub(crate) fn answer(
    c: monty::FunctionCall,
    a: Answer,
    printed: &mut String,
) -> Result<RunProgress, MontyException> {
    match a {
        Answer::Value(v) => c.resume(v, out(printed)),
        Answer::Raise(t, m) => {
            c.resume(monty_types::ExtFunctionResult::Error(MontyException::new(t, Some(m))), out(printed))
        }
    }
}

/// Monty in this process.
#[derive(Default)]
pub struct InProcess {
    call: Option<monty::FunctionCall>,
    printed: String,
}

impl Vm for InProcess {
    fn start(
        &mut self,
        program: &Arc<Program>,
        inputs: Vec<MontyObject>,
        limits: &EngineLimits,
    ) -> Result<Step, VmError> {
        let run =
            match program.compiled.get_or_init(|| Program::compile(&program.text).map(std::sync::Mutex::new))
            {
                Ok(r) => r.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                Err(e) => return Err(VmError::Exception(e.clone())),
            };
        let p = run.start(inputs, ResourceTracker::new(resource_limits(limits)), out(&mut self.printed));
        let (step, call) = drive(p, &mut self.printed)?;
        self.call = call;
        Ok(step)
    }

    fn resume(&mut self, a: Answer) -> Result<Step, VmError> {
        let Some(c) = self.call.take() else {
            return Err(VmError::Died("resumed a run that is not waiting".into()));
        };
        let (step, call) = drive(answer(c, a, &mut self.printed), &mut self.printed)?;
        self.call = call;
        Ok(step)
    }
}
