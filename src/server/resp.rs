//! A RESP connection (`heapgrid serve --resp-listen ADDR`): Redis clients on the native request
//! path.
//!
//! Each command is parsed (`resp::codec`), planned into native requests (`resp::command`), and
//! those requests go through the same `Round` as the native protocol's: the same permission
//! checks, snapshot reads, per-shard pipelining, in-flight limit, buffer budget, frame deadline
//! and metrics. Native answers come back as native response frames (by request id); they are
//! matched to their command, and replies are written strictly in command order (RESP has no
//! request ids): a command's reply waits for every command before it.
//!
//! Invariants: replies leave in the order commands arrived; a malformed or oversized command
//! ends this connection only (after the replies of the commands before it, and the error); a
//! `barrier` command (a grid-scoped script, a feed being created) starts only when nothing else
//! of the connection is running, and nothing starts behind it until it has answered.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::stream::{FuturesUnordered, StreamExt};
use heapgrid_actors::grid::GridCore;
use heapgrid_actors::{GridError, Key};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{
    ConnCtx, ConnLimits, HANDSHAKE_TIMEOUT, IO_BUFFER_BYTES, Input, OpenConnection, Pending, Taken,
    finish_all, send_round, write_out,
};
use crate::auth::{Auth, Principal};
use crate::metrics::InFlight;
use crate::protocol::{self, Request, RequestBody, Response, ResponseBody};
use crate::resp::codec::{self, Limits, Parsed, ProtocolError, Reply};
use crate::resp::command::{self, Catalog, CmdError, Planned, RespConfig, Shape};

/// Scripts `SCRIPT LOAD` and `EVAL` remember for `EVALSHA`, at most this many and this many
/// bytes (the oldest is forgotten first).
pub const SCRIPTS_MAX: usize = 10_000;
pub const SCRIPTS_BYTES_MAX: usize = 64 << 20;
/// Longest script.
pub const SCRIPT_BYTES_MAX: usize = 1 << 20;
/// `SCAN` cursors a connection keeps (the oldest is forgotten first: `invalid cursor`).
pub const SCAN_CURSORS_MAX: usize = 1024;

/// What every RESP connection of a server shares.
pub struct RespShared {
    pub cfg: RespConfig,
    scripts: Mutex<Scripts>,
    started: Instant,
    client_ids: AtomicU64,
    /// Commands read, over every RESP connection (`INFO stats`).
    commands: AtomicU64,
    port: u16,
}

#[derive(Default)]
struct Scripts {
    by_sha: HashMap<String, Arc<str>>,
    /// Oldest first.
    order: VecDeque<String>,
    bytes: usize,
}

impl RespShared {
    pub fn new(cfg: RespConfig, port: u16) -> RespShared {
        RespShared {
            cfg,
            scripts: Mutex::default(),
            started: Instant::now(),
            client_ids: AtomicU64::new(1),
            commands: AtomicU64::new(0),
            port,
        }
    }

    /// Remembers `script`, answering its SHA-1 (hex), as Redis names scripts.
    fn remember(&self, script: &[u8]) -> Result<(String, Arc<str>), CmdError> {
        let text = std::str::from_utf8(script).map_err(|_| CmdError::err("scripts are UTF-8 text"))?;
        let sha = sha1_smol::Sha1::from(script).digest().to_string();
        let mut s = self.scripts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = s.by_sha.get(&sha) {
            return Ok((sha, found.clone()));
        }
        let src: Arc<str> = command::script_source(text).into();
        if src.len() > SCRIPT_BYTES_MAX {
            return Err(CmdError::err(format!("a script is at most {SCRIPT_BYTES_MAX} bytes")));
        }
        while s.order.len() >= SCRIPTS_MAX || s.bytes + src.len() > SCRIPTS_BYTES_MAX {
            let Some(old) = s.order.pop_front() else { break };
            if let Some(gone) = s.by_sha.remove(&old) {
                s.bytes -= gone.len();
            }
        }
        s.bytes += src.len();
        s.by_sha.insert(sha.clone(), src.clone());
        s.order.push_back(sha.clone());
        Ok((sha, src))
    }

    fn script(&self, sha: &[u8]) -> Option<Arc<str>> {
        let sha = std::str::from_utf8(sha).ok()?.to_ascii_lowercase();
        self.scripts.lock().unwrap_or_else(|e| e.into_inner()).by_sha.get(&sha).cloned()
    }
}

/// Creates the RESP table if it is missing (at start, by the server's own authority).
pub async fn ensure_table(grid: &GridCore, cfg: &RespConfig) -> Result<(), GridError> {
    if grid.table(&cfg.table).is_ok() {
        return Ok(());
    }
    match grid.create_table(&cfg.table, cfg.table_options()).await {
        Ok(_) | Err(GridError::TableExists(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

struct GridCatalog<'a>(&'a GridCore);

impl Catalog for GridCatalog<'_> {
    fn has_table(&self, name: &str) -> bool {
        self.0.table(name).is_ok()
    }
    fn has_feed(&self, name: &str) -> bool {
        self.0.feed(name).is_ok()
    }
    fn shard_of(&self, table: &str, key: &Key) -> Option<u32> {
        self.0.table(table).ok().map(|t| t.shard_of(key))
    }
}

/// How a command's reply is made once its requests have answered.
enum How {
    Shape(Shape),
    /// Encoded already (a command about the connection, or an error).
    Ready(Vec<u8>),
    /// `INFO`: the node's figures are the one answer.
    Info(Vec<String>),
    /// Something was created for the command (its first use); the command runs again.
    Again(Vec<Vec<u8>>),
}

/// A command read and not yet answered.
struct Cmd {
    /// Its requests have ids `first..first + results.len()`.
    first: u64,
    results: Vec<Option<Result<ResponseBody, GridError>>>,
    missing: usize,
    /// Bytes of the answers it holds.
    bytes: usize,
    how: How,
    /// The protocol version its reply is written in (the connection's when it was read).
    resp3: bool,
    barrier: bool,
    /// Close the connection after this reply (`QUIT`, a protocol error).
    last: bool,
}

/// A connection's state that commands change.
struct Conn {
    who: Option<Arc<Principal>>,
    resp3: bool,
    name: Option<String>,
    id: u64,
    cursors: HashMap<u64, Key>,
    cursor_order: VecDeque<u64>,
    next_cursor: u64,
    peer: SocketAddr,
}

impl Conn {
    fn cursor(&mut self, after: Key) -> u64 {
        if self.cursor_order.len() >= SCAN_CURSORS_MAX
            && let Some(old) = self.cursor_order.pop_front()
        {
            self.cursors.remove(&old);
        }
        self.next_cursor += 1;
        let c = self.next_cursor;
        self.cursors.insert(c, after);
        self.cursor_order.push_back(c);
        c
    }
}

fn ready(resp3: bool, f: impl FnOnce(&mut Reply)) -> How {
    let mut out = Vec::new();
    f(&mut Reply { out: &mut out, resp3 });
    How::Ready(out)
}

fn error(resp3: bool, e: &CmdError) -> How {
    ready(resp3, |r| e.write(r))
}

pub(super) async fn connection(
    sock: TcpStream,
    peer: SocketAddr,
    grid: Arc<GridCore>,
    auth: Arc<Auth>,
    limits: ConnLimits,
    mut stop: watch::Receiver<bool>,
    shared: Arc<RespShared>,
) {
    let (rd, mut wr) = sock.into_split();
    let metrics = limits.metrics.clone();
    let mut input = Input::new(rd, &limits);
    metrics.connections.open.fetch_add(1, Ordering::Relaxed);
    let _open = OpenConnection(&metrics);
    let mut conn = Conn {
        // Without tokens (trusted mode) every connection is in; else `AUTH` or `HELLO ... AUTH`.
        who: auth.login(None).ok().map(Arc::new),
        resp3: false,
        name: None,
        id: shared.client_ids.fetch_add(1, Ordering::Relaxed),
        cursors: HashMap::new(),
        cursor_order: VecDeque::new(),
        next_cursor: 0,
        peer,
    };
    // A connection that has not logged in gets `HANDSHAKE_TIMEOUT` to do so (as a native one
    // gets to send its hello).
    let login_due = conn.who.is_none().then(|| tokio::time::Instant::now() + HANDSHAKE_TIMEOUT);
    let inflight = limits.inflight;
    let mut timing = InFlight::new(peer.to_string());
    let mut running: FuturesUnordered<Pending> = FuturesUnordered::new();
    let mut open = 0usize;
    let (mut ctx, gone_tx) = ConnCtx::new();
    // Native answers (frames), then RESP replies.
    let mut native = Vec::with_capacity(IO_BUFFER_BYTES);
    let mut out = Vec::with_capacity(IO_BUFFER_BYTES);
    let mut cmds: VecDeque<Cmd> = VecDeque::new();
    // Bytes of answers held in `cmds`, waiting for the commands before theirs.
    let mut answers_held = 0usize;
    let mut next_id = 1u64;
    let mut args = Vec::new();
    // Bytes (from `input.at`) the buffer must hold before parsing again is worth it.
    let mut need = 0usize;
    // A command waiting to start: a barrier waiting for the commands before it, or a command
    // to run again once what it needed was created.
    let mut held: Option<Held> = None;
    let mut reading = true;
    let mut closing = false;
    // Whether another command may start: the connection's native requests in flight and its
    // commands waiting for a reply are each held to the in-flight limit, and the answers they
    // hold to `ANSWERS_HELD_MAX` bytes (so commands behind a blocked one cannot pile up); and
    // nothing starts behind a barrier until its reply is written (nothing was started after
    // it, so it is the last command).
    let room = |open: usize, cmds: &VecDeque<Cmd>, held_bytes: usize| {
        open < inflight
            && cmds.len() < inflight
            && held_bytes < ANSWERS_HELD_MAX
            && !cmds.back().is_some_and(|c| c.barrier)
    };
    loop {
        let mut round = ctx.round(&metrics);
        timing.pass();
        // Start the commands buffered, as far as the limits allow. Answers given at once (from
        // snapshots) gather in `native`: past `IO_BUFFER_BYTES` the pass ends and they go out.
        while !closing && room(open, &cmds, answers_held) && native.len() < IO_BUFFER_BYTES {
            let owned;
            let retried;
            let words: Vec<&[u8]> = if let Some(h) = held.take() {
                retried = h.retried;
                owned = h.words;
                owned.iter().map(Vec::as_slice).collect()
            } else {
                retried = false;
                if !reading || input.buf.len() - input.at < need {
                    break;
                }
                // Before login, commands are small (as Redis holds unauthenticated clients).
                let lim = if conn.who.is_some() { FULL } else { ANONYMOUS };
                match codec::parse(&input.buf[input.at..], lim, &mut args) {
                    Ok(Parsed::Need(n)) => {
                        need = n;
                        break;
                    }
                    Ok(Parsed::Command(n)) => {
                        need = 0;
                        let base = input.at;
                        input.at += n;
                        if args.is_empty() {
                            continue;
                        }
                        args.iter().map(|r| &input.buf[base + r.start..base + r.end]).collect()
                    }
                    Err(ProtocolError(why)) => {
                        let e = CmdError::err(format!("Protocol error: {why}"));
                        tracing::info!(%peer, reason = %why, "RESP protocol error; closing the connection");
                        cmds.push_back(Cmd::ready(error(conn.resp3, &e), true, next_id));
                        reading = false;
                        closing = true;
                        gone_tx.send_replace(true);
                        break;
                    }
                }
            };
            if !retried {
                shared.commands.fetch_add(1, Ordering::Relaxed);
            }
            let (p, how) = match local(&words, &mut conn, &auth, &shared, &grid, &metrics) {
                Local::Reply { how, then_close } => {
                    closing |= then_close;
                    cmds.push_back(Cmd::ready(how, then_close, next_id));
                    continue;
                }
                Local::Plan(p, how) => (p, how),
            };
            if p.barrier && !cmds.is_empty() {
                // Wait for everything before it.
                held = Some(Held { words: words.iter().map(|w| w.to_vec()).collect(), retried });
                break;
            }
            if p.requests.len() > COMMAND_REQUESTS_MAX {
                let e = CmdError::err(format!(
                    "heapgrid takes at most {COMMAND_REQUESTS_MAX} keys or values per command; split it"
                ));
                cmds.push_back(Cmd::ready(error(conn.resp3, &e), false, next_id));
                continue;
            }
            let Some(who) = conn.who.clone() else { unreachable!("`local` answers NOAUTH") };
            let how = match how {
                Some(how) => how,
                // Made what the command needed: run it again, once.
                None if matches!(p.shape, Shape::Created) && retried => {
                    let e = CmdError::err(format!(
                        "{} cannot be created: a table or feed of that name exists",
                        String::from_utf8_lossy(words.get(1).copied().unwrap_or_default())
                    ));
                    cmds.push_back(Cmd::ready(error(conn.resp3, &e), false, next_id));
                    continue;
                }
                None if matches!(p.shape, Shape::Created) => {
                    How::Again(words.iter().map(|w| w.to_vec()).collect())
                }
                None => How::Shape(p.shape),
            };
            let first = next_id;
            let n = p.requests.len();
            for body in p.requests {
                let id = next_id;
                next_id += 1;
                timing.start(id, &body);
                match round.add(&grid, &who, Request { id, body }, &mut native) {
                    Taken::Answered => {}
                    Taken::InRound => open += 1,
                    Taken::Alone(f) => {
                        open += 1;
                        running.push(f);
                    }
                }
            }
            cmds.push_back(Cmd {
                first,
                results: (0..n).map(|_| None).collect(),
                missing: n,
                bytes: 0,
                how,
                resp3: conn.resp3,
                barrier: p.barrier,
                last: false,
            });
        }
        let wrote = send_round(round, &mut running);
        ctx.writing.add_all(wrote);
        // Answers given at once (snapshot reads, refusals), then every reply that is ready.
        answers_held += take_answers(&mut native, &mut cmds, &metrics, &mut timing);
        let (again, written) = reply_ready(&mut cmds, &mut out, &mut conn, &shared, &metrics);
        answers_held -= written;
        if let Some(words) = again {
            debug_assert!(held.is_none(), "a barrier runs alone");
            held = Some(Held { words, retried: true });
        }
        if !out.is_empty() {
            metrics.bytes_out.fetch_add(out.len() as u64, Ordering::Relaxed);
            if !write_out(&mut wr, &mut out).await {
                return;
            }
        }
        if native.capacity() > 4 * IO_BUFFER_BYTES {
            native.shrink_to(IO_BUFFER_BYTES);
        }
        if closing && cmds.is_empty() {
            break;
        }
        if !reading && running.is_empty() && cmds.is_empty() && held.is_none() {
            break;
        }
        let buffered = input.buf.len() - input.at;
        // Go round again without waiting when there is something to start: a held command
        // once nothing runs before it (a held barrier waits for the commands before it to be
        // answered), or bytes that may hold a command (decoding stopped on a full buffer of
        // answers, or on a limit the replies just written lifted). Each way the next pass
        // starts a command or holds one, so this never spins.
        let startable = match held {
            Some(_) => cmds.is_empty(),
            None => reading && !closing && buffered >= need && buffered > 0,
        };
        if room(open, &cmds, answers_held) && startable {
            continue;
        }
        // A command that started arriving must be whole within the frame deadline (timed only
        // while this connection is read).
        if room(open, &cmds, answers_held) && reading && buffered > 0 {
            input.partial_since.get_or_insert_with(tokio::time::Instant::now);
        } else {
            input.partial_since = None;
        }
        let frame_due = input.partial_since.map(|t| t + limits.frame_deadline);
        let may_read = reading && !closing && room(open, &cmds, answers_held) && held.is_none();
        let login_wait = reading && conn.who.is_none();
        tokio::select! {
            done = running.next(), if !running.is_empty() => {
                if let Some(d) = done {
                    finish_all(d, &mut running, &mut native, &mut open, &mut ctx.writing);
                    answers_held += take_answers(&mut native, &mut cmds, &metrics, &mut timing);
                }
            }
            more = input.fill(), if may_read => match more {
                Ok(true) => {}
                Ok(false) => {
                    reading = false;
                    gone_tx.send_replace(true);
                }
                Err(e) => {
                    let e = CmdError::err(e.to_string());
                    cmds.push_back(Cmd::ready(error(conn.resp3, &e), true, next_id));
                    reading = false;
                    closing = true;
                    gone_tx.send_replace(true);
                }
            },
            _ = tokio::time::sleep_until(frame_due.unwrap_or_else(tokio::time::Instant::now)),
                if may_read && frame_due.is_some() => {
                let e = CmdError::err(format!("Protocol error: a command did not arrive whole within {:?}", limits.frame_deadline));
                cmds.push_back(Cmd::ready(error(conn.resp3, &e), true, next_id));
                reading = false;
                closing = true;
                gone_tx.send_replace(true);
            }
            _ = tokio::time::sleep_until(login_due.unwrap_or_else(tokio::time::Instant::now)), if login_wait && login_due.is_some() => {
                metrics.connections.auth_failures.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%peer, "RESP connection did not log in within {HANDSHAKE_TIMEOUT:?}; closing");
                let e = CmdError { code: "NOAUTH", msg: format!("no AUTH within {HANDSHAKE_TIMEOUT:?}; closing") };
                cmds.push_back(Cmd::ready(error(conn.resp3, &e), true, next_id));
                reading = false;
                closing = true;
                gone_tx.send_replace(true);
            }
            _ = stop.changed(), if reading => reading = false,
            // Nothing left to wait for: every command answered (a command still missing answers
            // with nothing running would be a bug: logged, and the connection ends).
            else => {
                if cmds.iter().any(|c| c.missing > 0) {
                    tracing::error!(%peer, "RESP connection: a command's answers are missing; closing");
                }
                break;
            }
        }
    }
    let _ = wr.shutdown().await;
}

/// A command waiting to start (its words), and whether it already ran once and made what it
/// needed (then it does not make it again).
struct Held {
    words: Vec<Vec<u8>>,
    retried: bool,
}

/// What an authenticated connection may send in one command (Redis' limits, but a bulk string
/// at most the native frame limit).
const FULL: Limits = Limits { args_max: codec::ARGS_MAX, bulk_max: protocol::FRAME_BYTES_MAX as usize };
/// Before login (Redis 7's limits for unauthenticated clients).
const ANONYMOUS: Limits = Limits { args_max: 10, bulk_max: 16 * 1024 };
/// Most native requests one command may make (keys of `MGET`/`DEL`/`EXISTS`, values of
/// `LPUSH`).
pub const COMMAND_REQUESTS_MAX: usize = 10_000;
/// Bytes of answers a connection holds for commands waiting on the ones before them; past it
/// no new command starts until replies are written.
pub const ANSWERS_HELD_MAX: usize = 16 << 20;

impl Cmd {
    /// A command answered without requests; `next` is the id the next request will take, so
    /// the commands stay ordered by `first` (what `take_answers` searches by).
    fn ready(how: How, last: bool, next: u64) -> Cmd {
        Cmd {
            first: next,
            results: Vec::new(),
            missing: 0,
            bytes: 0,
            how,
            resp3: false,
            barrier: false,
            last,
        }
    }
}

/// Hands the native answers in `native` to their commands.
/// Answers the bytes of answers it handed over (held until their commands' replies are written).
fn take_answers(
    native: &mut Vec<u8>,
    cmds: &mut VecDeque<Cmd>,
    metrics: &crate::metrics::ServerMetrics,
    timing: &mut InFlight,
) -> usize {
    if native.is_empty() {
        return 0;
    }
    let mut held = 0;
    metrics.observe_frames(timing, native);
    let mut rest = &native[..];
    while rest.len() >= 4 {
        let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        let Some(frame) = rest.get(4..4 + len) else { break };
        rest = &rest[4 + len..];
        let Ok(Response { id, result }) = protocol::decode::<Response>(frame) else { continue };
        // Commands are in id order; the one whose range holds `id`.
        let at = cmds.partition_point(|c| c.first + c.results.len() as u64 <= id);
        let Some(c) = cmds.get_mut(at) else { continue };
        let Some(slot) = id.checked_sub(c.first).and_then(|i| c.results.get_mut(i as usize)) else {
            continue;
        };
        if slot.is_none() {
            c.missing -= 1;
        }
        *slot = Some(result);
        c.bytes += len;
        held += len;
    }
    native.clear();
    held
}

/// Writes the replies of the answered commands at the front, in order. Answers the words of
/// a command to run again (the front one made what it needed), and the answer bytes released.
fn reply_ready(
    cmds: &mut VecDeque<Cmd>,
    out: &mut Vec<u8>,
    conn: &mut Conn,
    shared: &RespShared,
    metrics: &crate::metrics::ServerMetrics,
) -> (Option<Vec<Vec<u8>>>, usize) {
    let mut released = 0;
    while cmds.front().is_some_and(|c| c.missing == 0) {
        let c = cmds.pop_front().expect("front");
        released += c.bytes;
        let results: Vec<_> = c
            .results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(GridError::Unavailable("answer missing".into()))))
            .collect();
        // In the protocol version of when the command was read (a later `HELLO` does not change it).
        let mut r = Reply { out: &mut *out, resp3: c.resp3 };
        match c.how {
            How::Ready(bytes) => r.out.extend_from_slice(&bytes),
            How::Shape(shape) => command::answer(&shape, results, &mut r, &mut |k| conn.cursor(k)),
            How::Info(sections) => match results.into_iter().next() {
                Some(Ok(ResponseBody::Stats(s))) => r.text(&info(&sections, &s, shared, conn, metrics)),
                Some(Err(e)) => CmdError::from_grid(&e).write(&mut r),
                _ => r.error("ERR", "no stats"),
            },
            How::Again(words) => match results.into_iter().next() {
                Some(Ok(_) | Err(GridError::FeedExists(_) | GridError::TableExists(_))) | None => {
                    return (Some(words), released);
                }
                Some(Err(e)) => CmdError::from_grid(&e).write(&mut r),
            },
        }
        if c.last {
            cmds.clear();
            break;
        }
    }
    (None, released)
}

/// What `local` made of a command.
enum Local {
    /// Answered by the connection.
    Reply { how: How, then_close: bool },
    /// Native requests to send (and a reply other than the plan's shape).
    Plan(Planned, Option<How>),
}

fn reply_with(conn: &Conn, f: impl FnOnce(&mut Reply)) -> Local {
    Local::Reply { how: ready(conn.resp3, f), then_close: false }
}

/// Commands about the connection, answered here; data commands planned. `words` is the command
/// and its arguments (at least the command).
fn local(
    words: &[&[u8]],
    conn: &mut Conn,
    auth: &Auth,
    shared: &RespShared,
    grid: &GridCore,
    metrics: &crate::metrics::ServerMetrics,
) -> Local {
    let (given, args) = words.split_first().expect("a command has a name");
    let name = &*String::from_utf8_lossy(given).to_ascii_uppercase();
    let fail = |conn: &Conn, e: CmdError| Local::Reply { how: error(conn.resp3, &e), then_close: false };
    let arity = |ok: bool| if ok { Ok(()) } else { Err(CmdError::arity(name)) };
    if conn.who.is_none() && !matches!(name, "AUTH" | "HELLO" | "QUIT") {
        return fail(conn, CmdError { code: "NOAUTH", msg: "Authentication required.".into() });
    }
    match name {
        "PING" => match args {
            [] => reply_with(conn, |r| r.simple("PONG")),
            [m] => reply_with(conn, |r| r.bulk(m)),
            _ => fail(conn, CmdError::arity(name)),
        },
        "ECHO" => match args {
            [m] => reply_with(conn, |r| r.bulk(m)),
            _ => fail(conn, CmdError::arity(name)),
        },
        "QUIT" => Local::Reply { how: ready(conn.resp3, |r| r.ok()), then_close: true },
        "AUTH" => {
            let token = match args {
                [t] | [_, t] => t,
                _ => return fail(conn, CmdError::arity(name)),
            };
            match login(conn, auth, token, metrics) {
                Ok(()) => reply_with(conn, |r| r.ok()),
                Err(e) => fail(conn, e),
            }
        }
        "HELLO" => {
            let mut proto = None;
            let mut rest = args;
            if let Some((v, more)) = rest.split_first() {
                match codec::int(v) {
                    Some(v @ 2..=3) => proto = Some(v == 3),
                    _ => {
                        return fail(
                            conn,
                            CmdError { code: "NOPROTO", msg: "unsupported protocol version".into() },
                        );
                    }
                }
                rest = more;
            }
            while let Some((opt, more)) = rest.split_first() {
                match (String::from_utf8_lossy(opt).to_ascii_uppercase().as_str(), more) {
                    ("AUTH", [_user, token, tail @ ..]) => {
                        if let Err(e) = login(conn, auth, token, metrics) {
                            return fail(conn, e);
                        }
                        rest = tail;
                    }
                    ("SETNAME", [n, tail @ ..]) => {
                        if let Err(e) = client_name(n) {
                            return fail(conn, e);
                        }
                        conn.name = Some(String::from_utf8_lossy(n).into_owned());
                        rest = tail;
                    }
                    _ => return fail(conn, CmdError::syntax()),
                }
            }
            if conn.who.is_none() {
                return fail(conn, CmdError { code: "NOAUTH", msg: "HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time".into() });
            }
            if let Some(p) = proto {
                conn.resp3 = p;
            }
            let (id, proto) = (conn.id as i64, if conn.resp3 { 3 } else { 2 });
            reply_with(conn, |r| {
                r.map(7);
                for (k, v) in [("server", "heapgrid"), ("version", REDIS_VERSION)] {
                    r.bulk(k.as_bytes());
                    r.bulk(v.as_bytes());
                }
                r.bulk(b"proto");
                r.int(proto);
                r.bulk(b"id");
                r.int(id);
                for (k, v) in [("mode", "standalone"), ("role", "master")] {
                    r.bulk(k.as_bytes());
                    r.bulk(v.as_bytes());
                }
                r.bulk(b"modules");
                r.array(0);
            })
        }
        "SELECT" => match args {
            [b"0"] => reply_with(conn, |r| r.ok()),
            [_] => fail(conn, CmdError::err("heapgrid has one database: SELECT 0 only")),
            _ => fail(conn, CmdError::arity(name)),
        },
        "CLIENT" => {
            let sub =
                args.first().map(|s| String::from_utf8_lossy(s).to_ascii_uppercase()).unwrap_or_default();
            match (sub.as_str(), &args[1.min(args.len())..]) {
                ("SETNAME", [n]) => {
                    if let Err(e) = client_name(n) {
                        return fail(conn, e);
                    }
                    conn.name = Some(String::from_utf8_lossy(n).into_owned());
                    reply_with(conn, |r| r.ok())
                }
                ("GETNAME", []) => {
                    let n = conn.name.clone();
                    reply_with(conn, |r| match n {
                        Some(n) => r.bulk(n.as_bytes()),
                        None => r.nil(),
                    })
                }
                ("ID", []) => {
                    let id = conn.id as i64;
                    reply_with(conn, |r| r.int(id))
                }
                // Client libraries announce themselves (redis-py, go-redis): accepted, not kept.
                ("SETINFO", [_, _]) => reply_with(conn, |r| r.ok()),
                _ => fail(
                    conn,
                    CmdError::err(format!(
                        "unknown subcommand or wrong number of arguments for 'CLIENT|{sub}'"
                    )),
                ),
            }
        }
        // Enough for redis-cli (it asks for command docs to show hints) and libraries that ask
        // for the command table: an empty one.
        "COMMAND" => {
            let sub =
                args.first().map(|s| String::from_utf8_lossy(s).to_ascii_uppercase()).unwrap_or_default();
            match sub.as_str() {
                "" | "INFO" => reply_with(conn, |r| r.array(0)),
                "DOCS" => reply_with(conn, |r| r.map(0)),
                "COUNT" => reply_with(conn, |r| r.int(COMMANDS.len() as i64)),
                _ => fail(conn, CmdError::err(format!("unknown subcommand '{sub}'"))),
            }
        }
        // redis-benchmark reads `save` and `appendonly` at start: nothing is a Redis setting here.
        // redis-benchmark reads `save` and `appendonly` at start: heapgrid writes an op log
        // (like an append-only file) and takes no snapshots. Nothing else is a Redis setting.
        "CONFIG" => match args.first().map(|s| String::from_utf8_lossy(s).to_ascii_uppercase()).as_deref() {
            Some("GET") => {
                let known: Vec<(&str, &str)> = args[1..]
                    .iter()
                    .filter_map(|p| match String::from_utf8_lossy(p).to_ascii_lowercase().as_str() {
                        "save" => Some(("save", "")),
                        "appendonly" => Some(("appendonly", "yes")),
                        _ => None,
                    })
                    .collect();
                reply_with(conn, |r| {
                    r.map(known.len());
                    for (k, v) in known {
                        r.bulk(k.as_bytes());
                        r.bulk(v.as_bytes());
                    }
                })
            }
            _ => fail(
                conn,
                CmdError::err("heapgrid is configured with `heapgrid serve` flags, not CONFIG SET"),
            ),
        },
        "INFO" => {
            let sections = args.iter().map(|s| String::from_utf8_lossy(s).to_ascii_lowercase()).collect();
            let p = Planned { requests: vec![RequestBody::Stats], shape: Shape::Ok, barrier: false };
            Local::Plan(p, Some(How::Info(sections)))
        }
        "SCAN" => match scan(args, conn, shared) {
            Ok(p) => Local::Plan(p, None),
            Err(e) => fail(conn, e),
        },
        "EVAL" => {
            if let Err(e) = arity(args.len() >= 2) {
                return fail(conn, e);
            }
            match shared.remember(args[0]) {
                Ok((_, src)) => script(src.to_string(), &args[1..], conn, shared, grid),
                Err(e) => fail(conn, e),
            }
        }
        "EVALSHA" => {
            if let Err(e) = arity(args.len() >= 2) {
                return fail(conn, e);
            }
            match shared.script(args[0]) {
                Some(src) => script(src.to_string(), &args[1..], conn, shared, grid),
                None => fail(
                    conn,
                    CmdError { code: "NOSCRIPT", msg: "No matching script. Please use EVAL.".into() },
                ),
            }
        }
        "FCALL" => {
            if let Err(e) = arity(args.len() >= 2) {
                return fail(conn, e);
            }
            let f = std::str::from_utf8(args[0]).unwrap_or_default();
            let ident = f.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && f.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ident {
                return fail(conn, CmdError::err("FCALL names a stored procedure: a Python identifier"));
            }
            script(command::script_source(&format!("{f}(keys, args)")), &args[1..], conn, shared, grid)
        }
        "SCRIPT" => {
            let sub =
                args.first().map(|s| String::from_utf8_lossy(s).to_ascii_uppercase()).unwrap_or_default();
            match (sub.as_str(), &args[1.min(args.len())..]) {
                ("LOAD", [src]) => match shared.remember(src) {
                    Ok((sha, _)) => reply_with(conn, |r| r.bulk(sha.as_bytes())),
                    Err(e) => fail(conn, e),
                },
                ("EXISTS", shas) if !shas.is_empty() => {
                    let found: Vec<bool> = shas.iter().map(|s| shared.script(s).is_some()).collect();
                    reply_with(conn, |r| {
                        r.array(found.len());
                        for f in found {
                            r.int(i64::from(f));
                        }
                    })
                }
                // Every connection's scripts: admin on the server's own state.
                ("FLUSH", [] | [_]) => {
                    match conn.who.as_ref().map(|w| w.require(super::SERVER, crate::auth::Permission::Admin))
                    {
                        Some(Err(e)) => fail(conn, CmdError::from_grid(&e)),
                        _ => {
                            *shared.scripts.lock().unwrap_or_else(|e| e.into_inner()) = Scripts::default();
                            reply_with(conn, |r| r.ok())
                        }
                    }
                }
                _ => fail(
                    conn,
                    CmdError::err(format!(
                        "unknown subcommand or wrong number of arguments for 'SCRIPT|{sub}'"
                    )),
                ),
            }
        }
        _ => {
            let cat = GridCatalog(grid);
            match command::plan(name, args, &shared.cfg, &cat) {
                Ok(Some(p)) => {
                    // The keyspace's table is made on first use (normally at start: this is for
                    // one dropped since), by the caller's authority.
                    let cfg = &shared.cfg;
                    let needs = p
                        .requests
                        .iter()
                        .any(|r| matches!(r, RequestBody::Table { table, .. } if *table == cfg.table));
                    if needs
                        && grid.cluster().is_none()
                        && matches!(grid.table(&cfg.table), Err(GridError::NoSuchTable(_)))
                    {
                        let create =
                            RequestBody::CreateTable { name: cfg.table.clone(), options: Default::default() };
                        return Local::Plan(
                            Planned { requests: vec![create], shape: Shape::Created, barrier: true },
                            None,
                        );
                    }
                    Local::Plan(p, None)
                }
                Ok(None) => {
                    let mut msg = format!(
                        "unknown command '{}', with args beginning with:",
                        String::from_utf8_lossy(name.as_bytes())
                    );
                    for a in args.iter().take(8) {
                        msg.push_str(&format!(" '{}'", String::from_utf8_lossy(&a[..a.len().min(128)])));
                    }
                    fail(conn, CmdError::err(msg))
                }
                Err(e) => fail(conn, e),
            }
        }
    }
}

/// A client name: printable ASCII without spaces, as Redis has it.
fn client_name(n: &[u8]) -> Result<(), CmdError> {
    if n.iter().any(|&b| b <= b' ' || b > b'~') {
        return Err(CmdError::err("Client names cannot contain spaces, newlines or special characters."));
    }
    Ok(())
}

fn script(src: String, rest: &[&[u8]], conn: &Conn, shared: &RespShared, grid: &GridCore) -> Local {
    match command::plan_script(src, rest, &shared.cfg, &GridCatalog(grid)) {
        Ok(p) => Local::Plan(p, None),
        Err(e) => Local::Reply { how: error(conn.resp3, &e), then_close: false },
    }
}

fn scan(args: &[&[u8]], conn: &Conn, shared: &RespShared) -> Result<Planned, CmdError> {
    let Some((cursor, mut rest)) = args.split_first() else { return Err(CmdError::arity("SCAN")) };
    let cursor = codec::int(cursor)
        .and_then(|c| u64::try_from(c).ok())
        .ok_or_else(|| CmdError::err("invalid cursor"))?;
    let after = match cursor {
        0 => None,
        c => Some(conn.cursors.get(&c).cloned().ok_or_else(|| {
            CmdError::err(
                "invalid cursor (heapgrid keeps a connection's last 1024 SCAN cursors, on that connection)",
            )
        })?),
    };
    let (mut pattern, mut count) = (None, 10u32);
    while let Some((opt, more)) = rest.split_first() {
        let Some((v, tail)) = more.split_first() else { return Err(CmdError::syntax()) };
        match String::from_utf8_lossy(opt).to_ascii_uppercase().as_str() {
            "MATCH" if v.len() > command::PATTERN_BYTES_MAX => {
                return Err(CmdError::err(format!(
                    "a MATCH pattern is at most {} bytes",
                    command::PATTERN_BYTES_MAX
                )));
            }
            "MATCH" => pattern = Some(v.to_vec()),
            "COUNT" => {
                let c = codec::int(v).filter(|&c| c >= 1).ok_or_else(CmdError::syntax)?;
                count = u32::try_from(c).unwrap_or(u32::MAX).min(command::SCAN_COUNT_MAX);
            }
            "TYPE" if String::from_utf8_lossy(v).eq_ignore_ascii_case("string") => {}
            "TYPE" => {
                return Err(CmdError::err(
                    "SCAN's keyspace holds strings only (lists are queues, streams are feeds)",
                ));
            }
            _ => return Err(CmdError::syntax()),
        }
        rest = tail;
    }
    let op = command::scan_range(after, pattern.as_deref(), count);
    // A `prefix*` pattern is answered by the range alone: nothing to filter.
    let pattern = pattern.filter(|p| !crate::resp::glob::literal_prefix(p).1);
    Ok(Planned {
        requests: vec![RequestBody::Table { table: shared.cfg.table.clone(), op }],
        shape: Shape::Scan { count, pattern },
        barrier: false,
    })
}

fn login(
    conn: &mut Conn,
    auth: &Auth,
    token: &[u8],
    metrics: &crate::metrics::ServerMetrics,
) -> Result<(), CmdError> {
    if auth.is_trusted() {
        return Err(CmdError::err(
            "AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
        ));
    }
    match auth.login(std::str::from_utf8(token).ok()) {
        Ok(p) => {
            conn.who = Some(Arc::new(p));
            Ok(())
        }
        Err(e) => {
            metrics.connections.auth_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %conn.peer, reason = %e, "authentication failed (RESP)");
            Err(CmdError {
                code: "WRONGPASS",
                msg: "invalid username-password pair or user is disabled.".into(),
            })
        }
    }
}

/// The Redis version heapgrid answers as (`HELLO`, `INFO`): the command set it follows.
pub const REDIS_VERSION: &str = "7.0.0";

/// The commands heapgrid answers over RESP (docs/resp.md).
pub const COMMANDS: &[&str] = &[
    "PING",
    "ECHO",
    "QUIT",
    "AUTH",
    "HELLO",
    "SELECT",
    "CLIENT",
    "COMMAND",
    "CONFIG",
    "INFO",
    "DBSIZE",
    "GET",
    "SET",
    "SETNX",
    "GETSET",
    "STRLEN",
    "DEL",
    "UNLINK",
    "EXISTS",
    "INCR",
    "INCRBY",
    "DECR",
    "DECRBY",
    "MGET",
    "MSET",
    "SCAN",
    "TYPE",
    "EVAL",
    "EVALSHA",
    "SCRIPT",
    "FCALL",
    "XADD",
    "XRANGE",
    "XREVRANGE",
    "XREAD",
    "XLEN",
    "XTRIM",
    "LPUSH",
    "RPUSH",
    "LPOP",
    "RPOP",
    "BLPOP",
    "BRPOP",
    "LLEN",
];

/// `INFO`'s text: the sections asked for (none, `all`, `everything` or `default`: every one).
fn info(
    sections: &[String],
    s: &heapgrid_actors::stats::NodeStats,
    shared: &RespShared,
    conn: &Conn,
    metrics: &crate::metrics::ServerMetrics,
) -> String {
    use std::fmt::Write;
    let all = sections.is_empty()
        || sections.iter().any(|s| matches!(s.as_str(), "all" | "everything" | "default"));
    let want = |name: &str| all || sections.iter().any(|s| s == name);
    let mut t = String::new();
    if want("server") {
        let _ = write!(
            t,
            "# Server\r\nredis_version:{REDIS_VERSION}\r\nheapgrid_version:{}\r\nredis_mode:standalone\r\nos:{}\r\nprocess_id:{}\r\ntcp_port:{}\r\nuptime_in_seconds:{}\r\n\r\n",
            env!("CARGO_PKG_VERSION"),
            std::env::consts::OS,
            std::process::id(),
            shared.port,
            shared.started.elapsed().as_secs(),
        );
    }
    if want("clients") {
        let _ = write!(
            t,
            "# Clients\r\nconnected_clients:{}\r\nclient_id:{}\r\n\r\n",
            metrics.connections.open.load(Ordering::Relaxed),
            conn.id
        );
    }
    if want("memory") {
        let _ = write!(
            t,
            "# Memory\r\nused_memory:{}\r\nused_memory_rss:{}\r\nheap_resident_bytes:{}\r\nheap_file_bytes:{}\r\noplog_bytes:{}\r\n\r\n",
            s.rss_anon_bytes,
            s.rss_anon_bytes + s.rss_file_bytes,
            s.heap_resident_bytes,
            s.heap_file_bytes,
            s.log_bytes,
        );
    }
    if want("stats") {
        let _ = write!(
            t,
            "# Stats\r\ntotal_connections_received:{}\r\ntotal_commands_processed:{}\r\nrejected_connections:{}\r\ntotal_net_input_bytes:{}\r\ntotal_net_output_bytes:{}\r\n\r\n",
            metrics.connections.accepted.load(Ordering::Relaxed),
            shared.commands.load(Ordering::Relaxed),
            metrics.connections.refused.load(Ordering::Relaxed),
            metrics.bytes_in.load(Ordering::Relaxed),
            metrics.bytes_out.load(Ordering::Relaxed),
        );
    }
    if want("keyspace") {
        let keys: u64 = s
            .collections
            .iter()
            .filter(|c| c.name == shared.cfg.table)
            .flat_map(|c| &c.shards)
            .map(|sh| sh.entries)
            .sum();
        let _ = write!(t, "# Keyspace\r\ndb0:keys={keys},expires=0,avg_ttl=0\r\n");
    }
    t
}
