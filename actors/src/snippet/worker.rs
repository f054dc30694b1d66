//! Sandbox workers: snippet programs run in worker processes (`heapgrid-worker`), one run at a
//! time per worker, so that nothing a program does (a stack overflow, an allocation past the
//! ceiling, a crash in the interpreter) reaches the server.
//!
//! ## Protocol (the worker's stdin/stdout)
//! Frames of `u32` little-endian length + postcard body, at most `FRAME_MAX` bytes.
//! - parent → worker: `ToWorker::Run { id, text, inputs, limits }` (`text` only when the worker
//!   has not compiled program `id` yet; it answers `NeedText` for an id it does not know), then
//!   one `ToWorker::Answer` per `Step::Call` it receives.
//! - worker → parent: `FromWorker::Step` (a host call, or `Done` which ends the run), or
//!   `FromWorker::Failed` (the program raised; the run is over), or `NeedText`.
//!
//! A worker that exits with `monty_types::OOM_EXIT_CODE` passed its memory ceiling.
//!
//! ## Pool
//! `WorkerPool` keeps idle workers; a run takes one (starting a new one when none is idle and
//! fewer than `max` exist, else waiting), and gives it back only when the run ended cleanly. A
//! worker that misses the run's hard deadline (wall budget + `DEADLINE_GRACE`), sends garbage,
//! or dies is killed and reaped, never reused; the next run starts a fresh one.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use monty_types::{MontyException, MontyObject};
use serde::{Deserialize, Serialize};

use super::vm::{Answer, EngineLimits, Program, Step, Vm, VmError};

/// Largest frame either side sends (a step's arguments are bounded by the result and value
/// limits; this is the backstop).
pub const FRAME_MAX: usize = 256 << 20;
/// Time a worker gets past the run's wall budget before it is killed.
pub const DEADLINE_GRACE: Duration = Duration::from_millis(250);
/// Programs a worker keeps compiled.
pub const WORKER_PROGRAMS_MAX: usize = 1024;

#[derive(Debug, Serialize, Deserialize)]
pub enum ToWorker {
    Run { id: u64, text: Option<String>, inputs: Vec<MontyObject>, limits: EngineLimits },
    Answer(Answer),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum FromWorker {
    Step(Step),
    Failed(MontyException),
    NeedText,
}

fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> std::io::Result<()> {
    let body = postcard::to_stdvec(msg).map_err(|e| std::io::Error::other(e.to_string()))?;
    if body.len() > FRAME_MAX {
        return Err(std::io::Error::other(format!("frame of {} bytes is over {FRAME_MAX}", body.len())));
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)?;
    w.flush()
}

fn read_frame<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> std::io::Result<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > FRAME_MAX {
        return Err(std::io::Error::other(format!("frame of {len} bytes is over {FRAME_MAX}")));
    }
    // Grown as the bytes arrive, not allocated to the declared length up front.
    let mut body = Vec::new();
    r.take(len as u64).read_to_end(&mut body)?;
    if body.len() != len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    postcard::from_bytes(&body).map_err(|e| std::io::Error::other(e.to_string()))
}

/// The worker's side: serves runs on stdin/stdout until stdin closes. `set_memory_limit` arms
/// the process's allocation ceiling for each run (the `heapgrid-worker` binary passes
/// `monty_alloc::set_limit`).
pub fn serve(set_memory_limit: &dyn Fn(Option<usize>)) -> std::io::Result<()> {
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let mut input = stdin.lock();
    let mut output = std::io::BufWriter::new(stdout.lock());
    let mut programs: HashMap<u64, monty::MontyRun> = HashMap::new();
    let mut order: VecDeque<u64> = VecDeque::new();
    loop {
        let msg: ToWorker = match read_frame(&mut input) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        let ToWorker::Run { id, text, inputs, limits } = msg else {
            return Err(std::io::Error::other("an answer with no run in progress"));
        };
        if !programs.contains_key(&id) {
            let Some(text) = text else {
                write_frame(&mut output, &FromWorker::NeedText)?;
                continue;
            };
            set_memory_limit(Some(limits.memory_bytes.min(usize::MAX as u64) as usize));
            match Program::compile(&text) {
                Ok(r) => {
                    if order.len() >= WORKER_PROGRAMS_MAX
                        && let Some(old) = order.pop_front()
                    {
                        programs.remove(&old);
                    }
                    programs.insert(id, r);
                    order.push_back(id);
                }
                Err(e) => {
                    write_frame(&mut output, &FromWorker::Failed(e))?;
                    continue;
                }
            }
        }
        let run = programs[&id].clone();
        set_memory_limit(Some(limits.memory_bytes.min(usize::MAX as u64) as usize));
        let tracker = monty_types::ResourceTracker::new(super::vm::resource_limits(&limits));
        let mut printed = String::new();
        let mut p = super::vm::drive(run.start(inputs, tracker, super::vm::out(&mut printed)), &mut printed);
        loop {
            match p {
                Ok((step, call)) => {
                    let done = matches!(step, Step::Done { .. });
                    write_frame(&mut output, &FromWorker::Step(step))?;
                    let Some(call) = call.filter(|_| !done) else { break };
                    let a = match read_frame(&mut input)? {
                        ToWorker::Answer(a) => a,
                        ToWorker::Run { .. } => {
                            return Err(std::io::Error::other("a run while one is waiting"));
                        }
                    };
                    p = super::vm::drive(super::vm::answer(call, a, &mut printed), &mut printed);
                }
                Err(VmError::Exception(e)) => {
                    write_frame(&mut output, &FromWorker::Failed(e))?;
                    break;
                }
                Err(other) => return Err(std::io::Error::other(format!("{other:?}"))),
            }
        }
        set_memory_limit(None);
    }
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    /// Programs this worker has been sent (it may have dropped some since: it then answers
    /// `NeedText`). At most `WORKER_PROGRAMS_MAX`; past that it starts over.
    known: std::collections::HashSet<u64>,
}

impl Worker {
    fn kill(mut self) -> Option<std::process::ExitStatus> {
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

/// The node's sandbox worker processes.
pub struct WorkerPool {
    exe: PathBuf,
    max: usize,
    state: Mutex<PoolState>,
    freed: Condvar,
}

struct PoolState {
    idle: Vec<Worker>,
    live: usize,
}

impl WorkerPool {
    /// A pool of at most `max` workers running `exe` (the `heapgrid-worker` binary).
    pub fn new(exe: PathBuf, max: usize) -> WorkerPool {
        WorkerPool {
            exe,
            max: max.max(1),
            state: Mutex::new(PoolState { idle: Vec::new(), live: 0 }),
            freed: Condvar::new(),
        }
    }

    /// The worker binary next to the running executable (`heapgrid-worker`), if there is one.
    pub fn default_exe() -> Option<PathBuf> {
        let me = std::env::current_exe().ok()?;
        let dir = me.parent()?;
        let candidates = [dir.join("heapgrid-worker"), dir.parent()?.join("heapgrid-worker")];
        candidates.into_iter().find(|p| p.is_file())
    }

    fn spawn(&self) -> Result<Worker, VmError> {
        let mut child = Command::new(&self.exe)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| VmError::Died(format!("cannot start snippet worker {}: {e}", self.exe.display())))?;
        let stdin = child.stdin.take().ok_or_else(|| VmError::Died("worker has no stdin".into()))?;
        let stdout = child.stdout.take().ok_or_else(|| VmError::Died("worker has no stdout".into()))?;
        Ok(Worker { child, stdin, stdout, known: Default::default() })
    }

    fn take(&self, deadline: Instant) -> Result<Worker, VmError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(w) = st.idle.pop() {
                return Ok(w);
            }
            if st.live < self.max {
                st.live += 1;
                drop(st);
                return self.spawn().inspect_err(|_| {
                    self.state.lock().unwrap_or_else(|e| e.into_inner()).live -= 1;
                    self.freed.notify_one();
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VmError::Deadline);
            }
            st = self.freed.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn give_back(&self, w: Worker) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).idle.push(w);
        self.freed.notify_one();
    }

    fn discard(&self, w: Worker) -> Option<std::process::ExitStatus> {
        let status = w.kill();
        self.state.lock().unwrap_or_else(|e| e.into_inner()).live -= 1;
        self.freed.notify_one();
        status
    }

    /// A run on one of this pool's workers.
    pub fn vm(self: &Arc<Self>) -> WorkerVm {
        WorkerVm { pool: self.clone(), worker: None, deadline: Instant::now() }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for w in st.idle.drain(..) {
            drop(w.stdin);
            let mut c = w.child;
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One run on a worker.
pub struct WorkerVm {
    pool: Arc<WorkerPool>,
    worker: Option<Worker>,
    deadline: Instant,
}

/// Waits until `fd` is readable or `deadline` passes (false).
fn wait_readable(fd: i32, deadline: Instant) -> bool {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        let ms = (deadline - now).as_millis().clamp(1, i32::MAX as u128) as i32;
        let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, for the duration of the call.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r > 0 {
            return true;
        }
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return true; // let the read report it
        }
    }
}

impl WorkerVm {
    /// Ends the run with the worker's death: kills it and says why.
    fn died(&mut self, why: String, timed_out: bool) -> VmError {
        let Some(w) = self.worker.take() else { return VmError::Died(why) };
        let status = self.pool.discard(w);
        if timed_out {
            return VmError::Deadline;
        }
        match status.and_then(|s| s.code()) {
            Some(monty_types::OOM_EXIT_CODE) => VmError::OutOfMemory,
            _ => VmError::Died(why),
        }
    }

    fn send(&mut self, msg: &ToWorker) -> Result<(), VmError> {
        let w = self.worker.as_mut().ok_or_else(|| VmError::Died("no worker".into()))?;
        if let Err(e) = write_frame(&mut w.stdin, msg) {
            return Err(self.died(format!("snippet worker: {e}"), false));
        }
        Ok(())
    }

    fn recv(&mut self) -> Result<FromWorker, VmError> {
        let w = self.worker.as_mut().ok_or_else(|| VmError::Died("no worker".into()))?;
        if !wait_readable(w.stdout.as_raw_fd(), self.deadline) {
            return Err(self.died("snippet worker missed its deadline".into(), true));
        }
        match read_frame::<FromWorker>(&mut w.stdout) {
            Ok(m) => Ok(m),
            Err(e) => {
                // A worker that ended mid-frame: give it a moment to be reaped with its status.
                std::thread::sleep(Duration::from_millis(2));
                Err(self.died(format!("snippet worker died: {e}"), false))
            }
        }
    }

    /// The step a worker's message means; the worker goes back to the pool when the run ended.
    fn step(&mut self, m: FromWorker) -> Result<Step, VmError> {
        match m {
            FromWorker::Step(s) => {
                if matches!(s, Step::Done { .. })
                    && let Some(w) = self.worker.take()
                {
                    self.pool.give_back(w);
                }
                Ok(s)
            }
            FromWorker::Failed(e) => {
                if let Some(w) = self.worker.take() {
                    self.pool.give_back(w);
                }
                Err(VmError::Exception(e))
            }
            FromWorker::NeedText => Err(self.died("snippet worker asked for a program twice".into(), false)),
        }
    }
}

impl Vm for WorkerVm {
    fn start(
        &mut self,
        program: &Arc<Program>,
        inputs: Vec<MontyObject>,
        limits: &EngineLimits,
    ) -> Result<Step, VmError> {
        self.deadline = Instant::now() + Duration::from_millis(limits.wall_ms) + DEADLINE_GRACE;
        let mut w = self.pool.take(self.deadline)?;
        if w.known.len() >= WORKER_PROGRAMS_MAX {
            w.known.clear();
        }
        let text = w.known.insert(program.id).then(|| program.text.to_string());
        self.worker = Some(w);
        let mut msg = ToWorker::Run { id: program.id, text, inputs, limits: limits.clone() };
        self.send(&msg)?;
        match self.recv()? {
            // The worker dropped it (its cache is bounded): send the text after all, once.
            FromWorker::NeedText => {
                if let ToWorker::Run { text: text @ None, .. } = &mut msg {
                    *text = Some(program.text.to_string());
                    self.send(&msg)?;
                    let m = self.recv()?;
                    self.step(m)
                } else {
                    Err(self.died("snippet worker refused a program".into(), false))
                }
            }
            m => self.step(m),
        }
    }

    fn resume(&mut self, answer: Answer) -> Result<Step, VmError> {
        self.send(&ToWorker::Answer(answer))?;
        let m = self.recv()?;
        self.step(m)
    }
}

impl Drop for WorkerVm {
    fn drop(&mut self) {
        // A run abandoned midway (the host hit an error): the worker is waiting for an answer
        // that will not come. Kill it rather than teach it to unwind.
        if let Some(w) = self.worker.take() {
            self.pool.discard(w);
        }
    }
}
