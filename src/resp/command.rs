//! The data commands: each becomes one or more native requests (`plan`), whose answers become
//! one reply (`answer`). Commands about the connection itself (`PING`, `HELLO`, `AUTH`,
//! `CLIENT`, `SCRIPT`, ...) are the connection's (`server::resp`).
//!
//! Mapping (docs/resp.md): a key lives in the table `RespConfig::table` as a string key; with
//! `route_prefixes`, `table:rest` names key `rest` of table `table` when that table exists. A
//! value is stored as bytes, except the canonical decimal of a 64-bit integer, stored as an int
//! (Redis' own integer encoding), so `INCR` is one atomic `Update` in the key's shard. Lists are
//! queues (take mode), streams are feeds.
//!
//! Invariant: every native request of one command is sent in order on the connection's request
//! path, so a command sees the effects of the commands before it on the same keys; a command
//! that could touch any table (a grid-scoped snippet, a feed being created) is a `barrier`: it
//! starts alone and nothing starts until it has answered.

use std::borrow::Cow;
use std::ops::Bound;

use heapgrid_actors::feed::Pos;
use heapgrid_actors::queue::ops::{Mode, QueueOp, QueueResult};
use heapgrid_actors::snippet::LimitOverrides;
use heapgrid_actors::{Expect, GridError, Key, Update, Value, WriteOp, WriteResult};

use super::codec::{Reply, int};
use super::glob;
use crate::feed::{FeedOp, FeedResult};
use crate::protocol::{EvalRequest, OpResult, RequestBody, ResponseBody, TableOp};

/// Where RESP keys live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RespConfig {
    /// The table holding every key (created on first use).
    pub table: String,
    /// `table:key` names `key` of an existing table `table`.
    pub route_prefixes: bool,
    /// Shards of the table when it is created (0: one per core).
    pub shards: u32,
}

impl Default for RespConfig {
    fn default() -> Self {
        RespConfig { table: TABLE_DEFAULT.into(), route_prefixes: false, shards: 0 }
    }
}

impl RespConfig {
    /// How the table is created when missing.
    pub fn table_options(&self) -> heapgrid_actors::grid::TableOptions {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        heapgrid_actors::grid::TableOptions {
            shards: if self.shards == 0 { cores } else { self.shards },
            fsync: None,
        }
    }
}

/// The table RESP keys live in unless configured otherwise.
pub const TABLE_DEFAULT: &str = "redis";

/// Keys `SCAN` visits at most per call (its `COUNT` is capped to it).
pub const SCAN_COUNT_MAX: u32 = 10_000;

/// Longest `SCAN ... MATCH` pattern (matching costs up to pattern × key length per key).
pub const PATTERN_BYTES_MAX: usize = 256;

/// Longest a blocking command (`BLPOP`, `XREAD BLOCK`) waits in one call (the native queue and
/// feed limit); `0` ("for ever") waits this long, then answers as a timeout would.
pub const BLOCK_MS_MAX: u64 = 60_000;

/// What the planner needs to know about the grid.
pub trait Catalog {
    fn has_table(&self, name: &str) -> bool;
    fn has_feed(&self, name: &str) -> bool;
    /// The shard of `key` in `table`, if the table runs here.
    fn shard_of(&self, table: &str, key: &Key) -> Option<u32>;
}

/// A command's error reply: `-CODE message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CmdError {
    pub code: &'static str,
    pub msg: String,
}

impl CmdError {
    pub fn err(msg: impl Into<String>) -> CmdError {
        CmdError { code: "ERR", msg: msg.into() }
    }

    pub fn syntax() -> CmdError {
        CmdError::err("syntax error")
    }

    pub fn arity(cmd: &str) -> CmdError {
        CmdError::err(format!("wrong number of arguments for '{}' command", cmd.to_ascii_lowercase()))
    }

    pub fn not_int() -> CmdError {
        CmdError::err("value is not an integer or out of range")
    }

    /// A native error as Redis clients expect to see it.
    pub fn from_grid(e: &GridError) -> CmdError {
        let code = match e {
            GridError::Unauthenticated(_) => "NOAUTH",
            GridError::PermissionDenied { .. } => "NOPERM",
            GridError::Recovering { .. } => "LOADING",
            GridError::Unavailable(_) | GridError::NotPrimary { .. } => "TRYAGAIN",
            _ => "ERR",
        };
        CmdError { code, msg: e.to_string() }
    }

    pub fn write(&self, r: &mut Reply) {
        r.error(self.code, &self.msg);
    }
}

/// What a planned command waits for and how its reply is made.
#[derive(Debug)]
pub struct Planned {
    pub requests: Vec<RequestBody>,
    pub shape: Shape,
    /// Starts alone: after every earlier command answered, before any later one starts.
    pub barrier: bool,
}

impl Planned {
    fn new(requests: Vec<RequestBody>, shape: Shape) -> Planned {
        Planned { requests, shape, barrier: false }
    }
}

/// How the answers of a command's requests become its reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// `+OK` once every request succeeded.
    Ok,
    /// A value as a bulk string, or nil.
    Get,
    /// A conditional or swapping `SET`: `get` answers the replaced value, else `OK` or nil.
    Set { get: bool },
    /// `SETNX`: 1 if it was set.
    SetNx,
    /// The counter's new value.
    Incr,
    /// Keys deleted or found (`DEL`, `EXISTS`).
    Count,
    /// One value or nil per key.
    MGet,
    /// A count answered as an integer (`DBSIZE`).
    Size,
    /// `TYPE`: `string` or `none`.
    Type,
    /// `STRLEN`.
    StrLen,
    /// `SCAN`: the cursor is the connection's to make from the last key seen.
    Scan { count: u32, pattern: Option<Vec<u8>> },
    /// A snippet's value, converted as Redis converts a Lua script's.
    Eval,
    /// `LPUSH`/`RPUSH`: the last request is the queue's length.
    PushLen,
    /// `LPOP`/`RPOP`: one value (or nil), or with a count an array (or nil).
    Pop { count: bool },
    /// `BLPOP`: `[queue, value]`, or a nil array when the wait ended.
    BPop { queue: String },
    /// `LLEN`.
    QueueLen,
    /// `XADD`: the new record's id (the later requests trim).
    XAdd,
    /// `XRANGE` (`rev` false, records with id ≤ `until`) / `XREVRANGE` (`rev`, id ≥ `until`).
    XRange { until: u64, rev: bool },
    /// `XLEN`.
    XLen,
    /// `XREAD`: one read per stream (`block`: waiting for records).
    XRead { streams: Vec<String>, block: bool },
    /// `XTRIM`: records dropped.
    XTrim,
    /// The feed named was created; the command runs again.
    Created,
    /// Nil, asking nothing (`XADD ... NOMKSTREAM` of a stream that does not exist).
    Nil,
    /// An empty array, asking nothing (`LPOP key 0`).
    EmptyArray,
}

fn utf8(b: &[u8]) -> Result<&str, CmdError> {
    std::str::from_utf8(b)
        .map_err(|_| CmdError::err("heapgrid keys and names are UTF-8 text; this one is not"))
}

fn num(b: &[u8]) -> Result<i64, CmdError> {
    int(b).ok_or_else(CmdError::not_int)
}

fn upper(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_uppercase()
}

/// How a RESP value is stored: the canonical decimal of an `i64` as an int, anything else as
/// bytes.
pub fn stored(b: &[u8]) -> Value {
    match int(b) {
        Some(n) => Value::Int(n),
        None => Value::Bytes(b.to_vec()),
    }
}

/// A stored value as a RESP string: bytes and text as they are, an int in decimal, anything
/// else (a document written by the native API) as its JSON.
pub fn as_string(v: &Value) -> Cow<'_, [u8]> {
    match v {
        Value::Bytes(b) => Cow::Borrowed(b),
        Value::Str(s) => Cow::Borrowed(s.as_bytes()),
        Value::Int(n) => Cow::Owned(itoa::Buffer::new().format(*n).as_bytes().to_vec()),
        other => Cow::Owned(other.to_json().to_string().into_bytes()),
    }
}

/// A snippet's value as a reply, as Redis converts a Lua script's: an int as an integer, text
/// and bytes as bulk strings, `None` as nil, `True` as 1 and `False` as nil, a list as an array;
/// with RESP3 a float as a double, a dict as a map, a bool as a boolean (RESP2: a float as its
/// text, a dict as a flat array of keys and values).
pub fn value_reply(v: &Value, r: &mut Reply) {
    match v {
        Value::Null => r.nil(),
        Value::Bool(b) if r.resp3 => r.boolean(*b),
        Value::Bool(true) => r.int(1),
        Value::Bool(false) => r.nil(),
        Value::Int(n) => r.int(*n),
        Value::Float(f) => r.double(*f),
        Value::Str(s) => r.bulk(s.as_bytes()),
        Value::Bytes(b) => r.bulk(b),
        Value::List(l) => {
            r.array(l.len());
            for x in l {
                value_reply(x, r);
            }
        }
        Value::Map(m) => {
            r.map(m.len());
            for (k, x) in m {
                r.bulk(k.as_bytes());
                value_reply(x, r);
            }
        }
    }
}

/// The table and key a RESP key names.
pub fn route<'a>(key: &'a [u8], cfg: &'a RespConfig, cat: &dyn Catalog) -> Result<(&'a str, Key), CmdError> {
    let key = utf8(key)?;
    if cfg.route_prefixes
        && let Some((table, rest)) = key.split_once(':')
        && !table.is_empty()
        && cat.has_table(table)
    {
        return Ok((table, Key::Str(rest.to_string())));
    }
    Ok((cfg.table.as_str(), Key::Str(key.to_string())))
}

fn table(table: &str, op: TableOp) -> RequestBody {
    RequestBody::Table { table: table.to_string(), op }
}

/// The source a script runs as: `keys` and `args` bound from the request's `args` (one line in
/// front, so a script's cache entry is the same for every call).
pub fn script_source(script: &str) -> String {
    format!("keys, args = args\n{script}")
}

/// A script's keys and arguments as the snippet's `args`: `[keys, args]`, text as `str`, other
/// bytes as `bytes`.
fn script_args(keys: &[&[u8]], argv: &[&[u8]]) -> Result<Value, CmdError> {
    let text = |b: &&[u8]| match std::str::from_utf8(b) {
        Ok(s) => Value::Str(s.to_string()),
        Err(_) => Value::Bytes(b.to_vec()),
    };
    let keys = keys.iter().map(|k| utf8(k).map(|s| Value::Str(s.to_string()))).collect::<Result<_, _>>()?;
    Ok(Value::List(vec![Value::List(keys), Value::List(argv.iter().map(text).collect())]))
}

/// `EVAL`-like commands: `src` (already the full source) with `numkeys keys... args...` in
/// `rest`. With keys, the script runs in the shard of the first (atomically, beside the data,
/// like a Redis Cluster script); with none, grid-scoped (a barrier).
pub fn plan_script(
    src: String,
    rest: &[&[u8]],
    cfg: &RespConfig,
    cat: &dyn Catalog,
) -> Result<Planned, CmdError> {
    let Some((n, rest)) = rest.split_first() else { return Err(CmdError::arity("eval")) };
    let n = usize::try_from(num(n)?).map_err(|_| CmdError::err("Number of keys can't be negative"))?;
    if n > rest.len() {
        return Err(CmdError::err("Number of keys can't be greater than number of args"));
    }
    let (keys, argv) = rest.split_at(n);
    let args = script_args(keys, argv)?;
    let Some(first) = keys.first() else {
        let body = RequestBody::Eval { src, args, limits: LimitOverrides::default() };
        return Ok(Planned { requests: vec![body], shape: Shape::Eval, barrier: true });
    };
    let (t, key) = route(first, cfg, cat)?;
    // Every key in the first one's shard (the snippet runs there; as Redis Cluster checks slots).
    let shard = cat.shard_of(t, &key);
    for k in &keys[1..] {
        let (kt, kk) = route(k, cfg, cat)?;
        if kt != t || (shard.is_some() && cat.shard_of(kt, &kk) != shard) {
            return Err(CmdError {
                code: "CROSSSLOT",
                msg: "Keys in request don't hash to the same slot (heapgrid: a script's keys must be in its first key's shard)".into(),
            });
        }
    }
    let req = EvalRequest { src, key: Some(key), args, limits: LimitOverrides::default(), read_only: false };
    Ok(Planned::new(vec![table(t, TableOp::Eval(req))], Shape::Eval))
}

/// A stream id (`N` or `N-S`; feed records are `N-0`) as the feed's id: the id itself, or for a
/// sequence above 0 reading forwards the next one (`5-1` is after record 5). With `range` (only
/// `XRANGE`/`XREVRANGE` take it) a `(` in front excludes the id: one further in the direction
/// read.
fn stream_id(b: &[u8], forward: bool, range: bool) -> Result<u64, CmdError> {
    let bad = || CmdError::err("Invalid stream ID specified as stream command argument");
    let (exclusive, b) = match b.strip_prefix(b"(") {
        Some(rest) if range => (true, rest),
        Some(_) => return Err(bad()),
        None => (false, b),
    };
    let (ms, seq) = match b.iter().position(|&c| c == b'-') {
        Some(i) => (&b[..i], Some(&b[i + 1..])),
        None => (b, None),
    };
    let number = |d: &[u8]| std::str::from_utf8(d).ok().and_then(|s| s.parse::<u64>().ok()).ok_or_else(bad);
    let ms = number(ms)?;
    let seq = match seq {
        Some(s) => number(s)?,
        None => 0,
    };
    let id = if forward && seq > 0 { ms.saturating_add(1) } else { ms };
    Ok(match (exclusive, forward) {
        (false, _) => id,
        (true, true) => id.saturating_add(1),
        (true, false) => id.saturating_sub(1),
    })
}

fn feed_op(feed: &str, op: FeedOp) -> RequestBody {
    RequestBody::Feed { feed: feed.to_string(), op }
}

fn queue_op(op: QueueOp) -> RequestBody {
    RequestBody::Queue { op }
}

/// Plans a data command (`name` upper-cased, `args` after it). `Ok(None)`: not a data
/// command (the connection's, or unknown).
pub fn plan(
    name: &str,
    args: &[&[u8]],
    cfg: &RespConfig,
    cat: &dyn Catalog,
) -> Result<Option<Planned>, CmdError> {
    let arity = |ok: bool| if ok { Ok(()) } else { Err(CmdError::arity(name)) };
    let planned = match name {
        "GET" => {
            arity(args.len() == 1)?;
            let (t, key) = route(args[0], cfg, cat)?;
            Planned::new(vec![table(t, TableOp::Get { key })], Shape::Get)
        }
        "STRLEN" => {
            arity(args.len() == 1)?;
            let (t, key) = route(args[0], cfg, cat)?;
            Planned::new(vec![table(t, TableOp::Get { key })], Shape::StrLen)
        }
        "TYPE" => {
            arity(args.len() == 1)?;
            let (t, key) = route(args[0], cfg, cat)?;
            Planned::new(vec![table(t, TableOp::Get { key })], Shape::Type)
        }
        "SET" => {
            arity(args.len() >= 2)?;
            let (t, key) = route(args[0], cfg, cat)?;
            let value = stored(args[1]);
            let (mut nx, mut xx, mut get) = (false, false, false);
            let mut opts = args[2..].iter();
            while let Some(o) = opts.next() {
                match upper(o).as_str() {
                    "NX" if !xx => nx = true,
                    "XX" if !nx => xx = true,
                    "GET" => get = true,
                    // No expiry time exists to keep.
                    "KEEPTTL" => {}
                    "EX" | "PX" | "EXAT" | "PXAT" => {
                        opts.next().ok_or_else(CmdError::syntax)?;
                        return Err(no_expiry());
                    }
                    _ => return Err(CmdError::syntax()),
                }
            }
            let expect = match (nx, xx, get) {
                (false, false, false) => {
                    return Ok(Some(Planned::new(
                        vec![table(t, TableOp::Write(WriteOp::Put { key, value }))],
                        Shape::Ok,
                    )));
                }
                (true, _, _) => Expect::Absent,
                (_, true, _) => Expect::Present,
                (false, false, true) => Expect::Any,
            };
            let op = WriteOp::Cas { key, expect, new: Some(value) };
            Planned::new(vec![table(t, TableOp::Write(op))], Shape::Set { get })
        }
        "SETNX" => {
            arity(args.len() == 2)?;
            let (t, key) = route(args[0], cfg, cat)?;
            let op = WriteOp::Cas { key, expect: Expect::Absent, new: Some(stored(args[1])) };
            Planned::new(vec![table(t, TableOp::Write(op))], Shape::SetNx)
        }
        "GETSET" => {
            arity(args.len() == 2)?;
            let (t, key) = route(args[0], cfg, cat)?;
            let op = WriteOp::Cas { key, expect: Expect::Any, new: Some(stored(args[1])) };
            Planned::new(vec![table(t, TableOp::Write(op))], Shape::Set { get: true })
        }
        "SETEX" | "PSETEX" => return Err(no_expiry()),
        "INCR" | "DECR" | "INCRBY" | "DECRBY" => {
            let by = match name {
                "INCR" | "DECR" => {
                    arity(args.len() == 1)?;
                    1
                }
                _ => {
                    arity(args.len() == 2)?;
                    num(args[1])?
                }
            };
            let by = if name.starts_with("DECR") {
                by.checked_neg().ok_or_else(|| CmdError::err("decrement would overflow"))?
            } else {
                by
            };
            let (t, key) = route(args[0], cfg, cat)?;
            let op = WriteOp::Update { key, path: vec![], update: Update::Increment(Value::Int(by)) };
            Planned::new(vec![table(t, TableOp::Write(op))], Shape::Incr)
        }
        "DEL" | "UNLINK" | "EXISTS" => {
            arity(!args.is_empty())?;
            let mut reqs = Vec::with_capacity(args.len());
            for k in args {
                let (t, key) = route(k, cfg, cat)?;
                let op = if name == "EXISTS" {
                    TableOp::Contains { key }
                } else {
                    TableOp::Write(WriteOp::Delete { key })
                };
                reqs.push(table(t, op));
            }
            Planned::new(reqs, Shape::Count)
        }
        "MGET" => {
            arity(!args.is_empty())?;
            let reqs = args
                .iter()
                .map(|k| route(k, cfg, cat).map(|(t, key)| table(t, TableOp::Get { key })))
                .collect::<Result<_, _>>()?;
            Planned::new(reqs, Shape::MGet)
        }
        "MSET" => {
            arity(!args.is_empty() && args.len().is_multiple_of(2))?;
            // One batch per shard: atomic within each shard (a reader sees all of a shard's
            // keys changed or none), not across shards.
            let mut batches: Vec<(String, Option<u32>, Vec<WriteOp>)> = Vec::new();
            for kv in args.chunks(2) {
                let (t, key) = route(kv[0], cfg, cat)?;
                let shard = cat.shard_of(t, &key);
                let op = WriteOp::Put { key, value: stored(kv[1]) };
                let room = |ops: &Vec<WriteOp>| ops.len() < heapgrid_actors::limits::TABLE_BATCH_OPS_MAX;
                match batches
                    .iter_mut()
                    .find(|(bt, bs, ops)| bt == t && *bs == shard && shard.is_some() && room(ops))
                {
                    Some((_, _, ops)) => ops.push(op),
                    None => batches.push((t.to_string(), shard, vec![op])),
                }
            }
            let reqs = batches.into_iter().map(|(t, _, ops)| table(&t, TableOp::Batch(ops))).collect();
            Planned::new(reqs, Shape::Ok)
        }
        "DBSIZE" => {
            arity(args.is_empty())?;
            Planned::new(vec![table(&cfg.table, TableOp::Count)], Shape::Size)
        }
        "LPUSH" | "RPUSH" => {
            arity(args.len() >= 2)?;
            let queue = utf8(args[0])?.to_string();
            let mut reqs: Vec<RequestBody> = args[1..]
                .iter()
                .map(|v| {
                    queue_op(QueueOp::Push {
                        queue: queue.clone(),
                        value: stored(v),
                        dedup_key: None,
                        delay_ms: 0,
                        fence: None,
                    })
                })
                .collect();
            reqs.push(queue_op(QueueOp::Len { queue }));
            Planned::new(reqs, Shape::PushLen)
        }
        "LPOP" | "RPOP" => {
            arity(matches!(args.len(), 1 | 2))?;
            let queue = utf8(args[0])?.to_string();
            // A count is clamped to what one pop takes (as Redis clamps to the list's length).
            let n = match args.get(1) {
                Some(c) => u32::try_from(num(c)?)
                    .map_err(|_| CmdError::err("value is out of range, must be positive"))?
                    .min(heapgrid_actors::queue::actor::QUEUE_POP_MAX),
                None => 1,
            };
            if n == 0 {
                return Ok(Some(Planned::new(vec![], Shape::EmptyArray)));
            }
            let op =
                QueueOp::Pop { queue, n, wait_ms: 0, mode: Mode::Take, visibility_ms: None, session: None };
            Planned::new(vec![queue_op(op)], Shape::Pop { count: args.len() == 2 })
        }
        "BLPOP" | "BRPOP" => {
            arity(args.len() >= 2)?;
            if args.len() > 2 {
                return Err(CmdError::err(format!("heapgrid's {name} waits on one list (queue) at a time")));
            }
            let queue = utf8(args[0])?.to_string();
            let secs: f64 = std::str::from_utf8(args[1])
                .ok()
                .and_then(|s| s.parse().ok())
                .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                .ok_or_else(|| CmdError::err("timeout is not a float or out of range"))?;
            let wait_ms = if secs == 0.0 {
                BLOCK_MS_MAX
            } else {
                ((secs * 1000.0).ceil() as u64).clamp(1, BLOCK_MS_MAX)
            };
            let op = QueueOp::Pop {
                queue: queue.clone(),
                n: 1,
                wait_ms,
                mode: Mode::Take,
                visibility_ms: None,
                session: None,
            };
            Planned::new(vec![queue_op(op)], Shape::BPop { queue })
        }
        "LLEN" => {
            arity(args.len() == 1)?;
            Planned::new(vec![queue_op(QueueOp::Len { queue: utf8(args[0])?.to_string() })], Shape::QueueLen)
        }
        "XADD" => return plan_xadd(args, cat).map(Some),
        "XRANGE" | "XREVRANGE" => {
            arity(args.len() == 3 || args.len() == 5)?;
            let feed = utf8(args[0])?;
            let n = match args.get(3) {
                Some(c) if upper(c) == "COUNT" => u32::try_from(num(args[4])?.max(0))
                    .unwrap_or(u32::MAX)
                    .min(heapgrid_actors::feed::FEED_READ_MAX),
                Some(_) => return Err(CmdError::syntax()),
                None => heapgrid_actors::feed::FEED_READ_MAX,
            };
            let rev = name == "XREVRANGE";
            // XRANGE key start end; XREVRANGE key end start.
            let (lo, hi) = if rev { (args[2], args[1]) } else { (args[1], args[2]) };
            let (op, until) = if !rev {
                let until = if hi == b"+" { u64::MAX } else { stream_id(hi, false, true)? };
                let after = if lo == b"-" {
                    Pos::Start
                } else {
                    Pos::After(stream_id(lo, true, true)?.saturating_sub(1))
                };
                (FeedOp::Read { after, n, wait_ms: 0 }, until)
            } else {
                let until = if lo == b"-" { 0 } else { stream_id(lo, true, true)? };
                let before =
                    if hi == b"+" { None } else { Some(stream_id(hi, false, true)?.saturating_add(1)) };
                (FeedOp::ReadBack { before, n }, until)
            };
            if n == 0 {
                return Ok(Some(Planned::new(vec![], Shape::XRange { until, rev })));
            }
            Planned::new(vec![feed_op(feed, op)], Shape::XRange { until, rev })
        }
        "XLEN" => {
            arity(args.len() == 1)?;
            Planned::new(vec![feed_op(utf8(args[0])?, FeedOp::Info)], Shape::XLen)
        }
        "XTRIM" => {
            arity(args.len() >= 3)?;
            let feed = utf8(args[0])?;
            if upper(args[1]) != "MAXLEN" {
                return Err(CmdError::err(
                    "heapgrid's XTRIM takes MAXLEN only (MINID: trim by id with the feed API)",
                ));
            }
            let n = match args[2] {
                b"=" | b"~" => args.get(3).ok_or_else(CmdError::syntax)?,
                n => n,
            };
            let keep =
                u64::try_from(num(n)?).map_err(|_| CmdError::err("The MAXLEN argument must be >= 0."))?;
            Planned::new(vec![feed_op(feed, FeedOp::Trim { keep })], Shape::XTrim)
        }
        "XREAD" => return plan_xread(args).map(Some),
        _ => return Ok(None),
    };
    Ok(Some(planned))
}

fn no_expiry() -> CmdError {
    CmdError::err(
        "heapgrid keeps no expiry times, so EX/PX/EXAT/PXAT (and SETEX, PSETEX) are refused rather than \
         stored without one (docs/resp.md)",
    )
}

fn plan_xadd(args: &[&[u8]], cat: &dyn Catalog) -> Result<Planned, CmdError> {
    if args.len() < 4 {
        return Err(CmdError::arity("XADD"));
    }
    let feed = utf8(args[0])?;
    let mut i = 1;
    let mut nomkstream = false;
    let mut keep = None;
    loop {
        match upper(args.get(i).ok_or_else(CmdError::syntax)?).as_str() {
            "NOMKSTREAM" => {
                nomkstream = true;
                i += 1;
            }
            "MAXLEN" => {
                i += 1;
                if matches!(args.get(i).copied(), Some(b"=" | b"~")) {
                    i += 1;
                }
                let n = num(args.get(i).ok_or_else(CmdError::syntax)?)?;
                keep =
                    Some(u64::try_from(n).map_err(|_| CmdError::err("The MAXLEN argument must be >= 0."))?);
                i += 1;
            }
            "MINID" | "LIMIT" => return Err(CmdError::err("heapgrid's XADD trims by MAXLEN only")),
            _ => break,
        }
    }
    let id = match args.get(i).copied().ok_or_else(CmdError::syntax)? {
        b"*" => None,
        given => {
            let ok = given.ends_with(b"-0") || !given.contains(&b'-');
            let id = stream_id(given, false, false).ok().filter(|&id| ok && id > 0);
            Some(id.ok_or_else(|| {
                CmdError::err("heapgrid stream ids are N-0 with N > 0 (a feed record's id)")
            })?)
        }
    };
    let fields = &args[i + 1..];
    if fields.is_empty() || !fields.len().is_multiple_of(2) {
        return Err(CmdError::arity("XADD"));
    }
    if !cat.has_feed(feed) {
        if nomkstream {
            return Ok(Planned::new(vec![], Shape::Nil));
        }
        let create = RequestBody::CreateFeed { name: feed.to_string(), options: Default::default() };
        return Ok(Planned { requests: vec![create], shape: Shape::Created, barrier: true });
    }
    let mut map = indexmap::IndexMap::new();
    for fv in fields.chunks(2) {
        map.insert(utf8(fv[0])?.to_string(), stored(fv[1]));
    }
    let mut reqs = vec![feed_op(feed, FeedOp::Append { value: Value::Map(map), id })];
    if let Some(keep) = keep {
        reqs.push(feed_op(feed, FeedOp::Trim { keep }));
    }
    Ok(Planned::new(reqs, Shape::XAdd))
}

fn plan_xread(args: &[&[u8]]) -> Result<Planned, CmdError> {
    let mut n = heapgrid_actors::feed::FEED_READ_MAX;
    let mut block = None;
    let mut i = 0;
    loop {
        match upper(args.get(i).ok_or_else(CmdError::syntax)?).as_str() {
            "COUNT" => {
                let c = num(args.get(i + 1).ok_or_else(CmdError::syntax)?)?;
                n = u32::try_from(c.max(1)).unwrap_or(u32::MAX).min(n);
                i += 2;
            }
            "BLOCK" => {
                let ms = num(args.get(i + 1).ok_or_else(CmdError::syntax)?)?;
                let ms = u64::try_from(ms).map_err(|_| CmdError::err("timeout is negative"))?;
                block = Some(if ms == 0 { BLOCK_MS_MAX } else { ms.min(BLOCK_MS_MAX) });
                i += 2;
            }
            "STREAMS" => {
                i += 1;
                break;
            }
            _ => return Err(CmdError::syntax()),
        }
    }
    let rest = &args[i..];
    if rest.is_empty() || !rest.len().is_multiple_of(2) {
        return Err(CmdError::err(
            "Unbalanced 'xread' list of streams: for each stream key an ID or '$' must be specified.",
        ));
    }
    let (names, ids) = rest.split_at(rest.len() / 2);
    if block.is_some() && names.len() > 1 {
        return Err(CmdError::err("heapgrid's XREAD BLOCK waits on one stream (feed) at a time"));
    }
    let mut reqs = Vec::with_capacity(names.len());
    let mut streams = Vec::with_capacity(names.len());
    for (name, id) in names.iter().zip(ids) {
        let feed = utf8(name)?;
        let after = match *id {
            b"$" => Pos::End,
            b"0" | b"0-0" => Pos::Start,
            id => Pos::After(stream_id(id, false, false)?),
        };
        reqs.push(feed_op(feed, FeedOp::Read { after, n, wait_ms: block.unwrap_or(0) }));
        streams.push(feed.to_string());
    }
    Ok(Planned::new(reqs, Shape::XRead { streams, block: block.is_some() }))
}

/// Writes the reply of a command of `shape` from its requests' answers (one per request, in
/// order). `cursor` makes a `SCAN` cursor from the last key seen.
pub fn answer(
    shape: &Shape,
    results: Vec<Result<ResponseBody, GridError>>,
    r: &mut Reply,
    cursor: &mut dyn FnMut(Key) -> u64,
) {
    if let Err(e) = shape_reply(shape, results, r, cursor) {
        e.write(r);
    }
}

fn op_result(b: ResponseBody) -> Result<OpResult, CmdError> {
    match b {
        ResponseBody::Op(o) => Ok(o),
        other => Err(unexpected(&other)),
    }
}

fn unexpected(b: &ResponseBody) -> CmdError {
    CmdError::err(format!("unexpected answer {b:?}"))
}

fn written(b: ResponseBody) -> Result<WriteResult, CmdError> {
    match op_result(b)? {
        OpResult::Written { mut results, .. } if results.len() == 1 => Ok(results.remove(0)),
        other => Err(CmdError::err(format!("unexpected answer {other:?}"))),
    }
}

fn value_of(b: ResponseBody) -> Result<Option<Value>, CmdError> {
    match op_result(b)? {
        OpResult::Value(v) => Ok(v.map(|v| v.value)),
        other => Err(CmdError::err(format!("unexpected answer {other:?}"))),
    }
}

fn bulk_or_nil(v: Option<&Value>, r: &mut Reply) {
    match v {
        Some(v) => r.bulk(&as_string(v)),
        None => r.nil(),
    }
}

fn stream_entries(records: &[heapgrid_actors::feed::FeedRecord], r: &mut Reply) {
    r.array(records.len());
    for rec in records {
        r.array(2);
        r.bulk(format!("{}-0", rec.id).as_bytes());
        match &rec.value {
            Value::Map(m) => {
                r.array(2 * m.len());
                for (k, v) in m {
                    r.bulk(k.as_bytes());
                    r.bulk(&as_string(v));
                }
            }
            other => {
                r.array(2);
                r.bulk(b"value");
                r.bulk(&as_string(other));
            }
        }
    }
}

fn shape_reply(
    shape: &Shape,
    results: Vec<Result<ResponseBody, GridError>>,
    r: &mut Reply,
    cursor: &mut dyn FnMut(Key) -> u64,
) -> Result<(), CmdError> {
    // Reads of a stream that does not exist answer as Redis does for a missing key.
    let missing_feed = |e: &GridError| matches!(e, GridError::NoSuchFeed(_));
    match shape {
        Shape::XRange { .. } | Shape::XLen | Shape::XRead { .. } | Shape::XTrim => {}
        _ => {
            if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
                return Err(incr_error(shape, e));
            }
        }
    }
    let mut results = results.into_iter();
    let mut next = || results.next().unwrap_or_else(|| Err(GridError::Unavailable("answer missing".into())));
    match shape {
        Shape::Ok => r.ok(),
        Shape::Get => bulk_or_nil(value_of(next().map_err(|e| CmdError::from_grid(&e))?)?.as_ref(), r),
        Shape::StrLen => {
            let v = value_of(next().map_err(|e| CmdError::from_grid(&e))?)?;
            r.int(v.map_or(0, |v| as_string(&v).len() as i64));
        }
        Shape::Type => {
            let v = value_of(next().map_err(|e| CmdError::from_grid(&e))?)?;
            r.simple(if v.is_some() { "string" } else { "none" });
        }
        Shape::Set { .. } | Shape::SetNx => {
            let WriteResult::Cas { ok, current } = written(next().map_err(|e| CmdError::from_grid(&e))?)?
            else {
                return Err(CmdError::err("unexpected write result"));
            };
            match shape {
                Shape::SetNx => r.int(i64::from(ok)),
                Shape::Set { get: true } => bulk_or_nil(current.as_ref().map(|c| &c.value), r),
                _ if ok => r.ok(),
                _ => r.nil(),
            }
        }
        Shape::Incr => match written(next().map_err(|e| CmdError::from_grid(&e))?)? {
            WriteResult::Updated { value: Value::Int(n), .. } => r.int(n),
            WriteResult::Updated { value, .. } => r.bulk(&as_string(&value)),
            _ => return Err(CmdError::err("unexpected write result")),
        },
        Shape::Count => {
            let mut n = 0i64;
            for b in results.by_ref() {
                n += i64::from(match b.map_err(|e| CmdError::from_grid(&e))? {
                    ResponseBody::Op(OpResult::Bool(b)) => b,
                    body => matches!(written(body)?, WriteResult::Deleted { existed: true }),
                });
            }
            r.int(n);
        }
        Shape::MGet => {
            let all: Vec<_> = results.collect();
            r.array(all.len());
            for b in all {
                bulk_or_nil(value_of(b.map_err(|e| CmdError::from_grid(&e))?)?.as_ref(), r);
            }
        }
        Shape::Size => match op_result(next().map_err(|e| CmdError::from_grid(&e))?)? {
            OpResult::Count(n) => r.int(n as i64),
            other => return Err(CmdError::err(format!("unexpected answer {other:?}"))),
        },
        Shape::Scan { count, pattern } => {
            let OpResult::Entries(entries) = op_result(next().map_err(|e| CmdError::from_grid(&e))?)? else {
                return Err(CmdError::err("unexpected scan answer"));
            };
            let more = entries.len() as u32 >= *count;
            let keys: Vec<Vec<u8>> = entries
                .iter()
                .map(|(k, _)| match k {
                    Key::Str(s) => s.as_bytes().to_vec(),
                    Key::Int(i) => i.to_string().into_bytes(),
                })
                .filter(|k| pattern.as_deref().is_none_or(|p| glob::matches(p, k)))
                .collect();
            let next_cursor = match entries.into_iter().last() {
                Some((k, _)) if more => cursor(k),
                _ => 0,
            };
            r.array(2);
            r.bulk(itoa::Buffer::new().format(next_cursor).as_bytes());
            r.array(keys.len());
            for k in keys {
                r.bulk(&k);
            }
        }
        Shape::Eval => match next().map_err(|e| CmdError::from_grid(&e))? {
            ResponseBody::Op(OpResult::Snippet(v))
            | ResponseBody::Value(v)
            | ResponseBody::Printed { value: v, .. } => value_reply(&v, r),
            other => return Err(unexpected(&other)),
        },
        Shape::PushLen => {
            let all: Vec<_> = results.collect();
            match all.into_iter().last() {
                Some(Ok(ResponseBody::Queue(QueueResult::Len(l)))) => r.int((l.ready + l.delayed) as i64),
                Some(Ok(other)) => return Err(unexpected(&other)),
                _ => return Err(CmdError::err("answer missing")),
            }
        }
        Shape::Pop { count } => match next().map_err(|e| CmdError::from_grid(&e))? {
            ResponseBody::Queue(QueueResult::Delivered(ds)) => match (count, ds.as_slice()) {
                (false, [d, ..]) => r.bulk(&as_string(&d.value)),
                (false, []) => r.nil(),
                (true, []) => r.nil_array(),
                (true, ds) => {
                    r.array(ds.len());
                    for d in ds {
                        r.bulk(&as_string(&d.value));
                    }
                }
            },
            other => return Err(unexpected(&other)),
        },
        Shape::BPop { queue } => match next().map_err(|e| CmdError::from_grid(&e))? {
            ResponseBody::Queue(QueueResult::Delivered(ds)) => match ds.first() {
                Some(d) => {
                    r.array(2);
                    r.bulk(queue.as_bytes());
                    r.bulk(&as_string(&d.value));
                }
                None => r.nil_array(),
            },
            other => return Err(unexpected(&other)),
        },
        Shape::QueueLen => match next().map_err(|e| CmdError::from_grid(&e))? {
            ResponseBody::Queue(QueueResult::Len(l)) => r.int((l.ready + l.delayed) as i64),
            other => return Err(unexpected(&other)),
        },
        Shape::XAdd => match next().map_err(|e| CmdError::from_grid(&e))? {
            ResponseBody::Feed(FeedResult::Appended { id }) => r.bulk(format!("{id}-0").as_bytes()),
            other => return Err(unexpected(&other)),
        },
        Shape::XRange { until, rev } => {
            let records = match results.next() {
                None => Vec::new(),
                Some(Err(e)) if missing_feed(&e) => Vec::new(),
                Some(Err(e)) => return Err(CmdError::from_grid(&e)),
                Some(Ok(ResponseBody::Feed(FeedResult::Records(rr)))) => rr.records,
                Some(Ok(other)) => return Err(unexpected(&other)),
            };
            let kept: Vec<_> = records
                .into_iter()
                .filter(|rec| if *rev { rec.id >= *until } else { rec.id <= *until })
                .collect();
            stream_entries(&kept, r);
        }
        Shape::XLen => match next() {
            Err(e) if missing_feed(&e) => r.int(0),
            Err(e) => return Err(CmdError::from_grid(&e)),
            Ok(ResponseBody::Feed(FeedResult::Info(info))) => r.int(info.state.count as i64),
            Ok(other) => return Err(unexpected(&other)),
        },
        Shape::XTrim => match next() {
            Err(e) if missing_feed(&e) => r.int(0),
            Err(e) => return Err(CmdError::from_grid(&e)),
            Ok(ResponseBody::Feed(FeedResult::Count(n))) => r.int(n as i64),
            Ok(ResponseBody::Feed(FeedResult::Done)) => r.int(0),
            Ok(other) => return Err(unexpected(&other)),
        },
        Shape::XRead { streams, block } => {
            let mut found = Vec::new();
            for (name, res) in streams.iter().zip(results) {
                match res {
                    // Waiting on a stream that does not exist would answer at once, and a
                    // client looping on `XREAD BLOCK` would spin: refused instead.
                    Err(e) if missing_feed(&e) && *block => {
                        return Err(CmdError::err(format!(
                            "XREAD BLOCK waits on an existing stream; '{name}' has none yet (XADD creates it)"
                        )));
                    }
                    Err(e) if missing_feed(&e) => {}
                    Err(e) => return Err(CmdError::from_grid(&e)),
                    Ok(ResponseBody::Feed(FeedResult::Records(rr))) if !rr.records.is_empty() => {
                        found.push((name, rr.records))
                    }
                    Ok(ResponseBody::Feed(FeedResult::Records(_))) => {}
                    Ok(other) => return Err(unexpected(&other)),
                }
            }
            if found.is_empty() {
                r.nil_array();
            } else {
                // RESP3: a map of stream to entries; RESP2: an array of [stream, entries].
                if r.resp3 {
                    r.map(found.len())
                } else {
                    r.array(found.len())
                }
                for (name, records) in found {
                    if !r.resp3 {
                        r.array(2);
                    }
                    r.bulk(name.as_bytes());
                    stream_entries(&records, r);
                }
            }
        }
        Shape::Created => r.ok(),
        Shape::Nil => r.nil(),
        Shape::EmptyArray => r.array(0),
    }
    Ok(())
}

/// The error a failed request makes of the command: Redis' words for a counter that is not one.
fn incr_error(shape: &Shape, e: &GridError) -> CmdError {
    match (shape, e) {
        (Shape::Incr, GridError::Value(m)) if m.contains("overflow") => {
            CmdError::err("increment or decrement would overflow")
        }
        (Shape::Incr, GridError::Value(_)) => CmdError::not_int(),
        _ => CmdError::from_grid(e),
    }
}

/// Bounds of a `SCAN` after `after` (exclusive) over keys matching `pattern`'s literal prefix.
pub fn scan_range(after: Option<Key>, pattern: Option<&[u8]>, count: u32) -> TableOp {
    let (prefix, _) = pattern.map(glob::literal_prefix).unwrap_or_default();
    let prefix = String::from_utf8_lossy(&prefix).into_owned();
    let range = if prefix.is_empty() {
        heapgrid_actors::ScanRange {
            start: Bound::Unbounded,
            end: Bound::Unbounded,
            limit: count,
            reverse: false,
        }
    } else {
        heapgrid_actors::ScanRange::prefix(&prefix, count, false)
    };
    let start = match after {
        Some(k) if !matches!(&range.start, Bound::Included(p) if *p > k) => Bound::Excluded(k),
        _ => range.start,
    };
    TableOp::Scan { start, end: range.end, limit: count, reverse: false }
}

#[cfg(test)]
mod tests {
    use super::*;
    use heapgrid_actors::Versioned;

    struct Grid;
    impl Catalog for Grid {
        fn has_table(&self, name: &str) -> bool {
            name == "users"
        }
        fn has_feed(&self, name: &str) -> bool {
            name == "events"
        }
        fn shard_of(&self, _: &str, key: &Key) -> Option<u32> {
            Some(matches!(key, Key::Str(s) if s.starts_with('a')) as u32)
        }
    }

    fn planned(cmd: &str, cfg: &RespConfig) -> Result<Planned, CmdError> {
        let words: Vec<&[u8]> = cmd.split(' ').map(str::as_bytes).collect();
        plan(
            &words[0].to_ascii_uppercase().iter().map(|&b| b as char).collect::<String>(),
            &words[1..],
            cfg,
            &Grid,
        )
        .map(|p| p.expect("a data command"))
    }

    fn reply(shape: &Shape, results: Vec<Result<ResponseBody, GridError>>, resp3: bool) -> String {
        let mut out = Vec::new();
        let mut r = Reply { out: &mut out, resp3 };
        answer(shape, results, &mut r, &mut |_| 7);
        String::from_utf8(out).unwrap()
    }

    fn value(v: Value) -> Result<ResponseBody, GridError> {
        Ok(ResponseBody::Op(OpResult::Value(Some(Versioned { version: 1, value: v }))))
    }

    #[test]
    fn values_keep_their_bytes() {
        assert_eq!(stored(b"42"), Value::Int(42));
        assert_eq!(stored(b"042"), Value::Bytes(b"042".to_vec()));
        assert_eq!(stored(b"\xff"), Value::Bytes(vec![0xff]));
        for b in [&b"42"[..], b"-7", b"042", b"x y", b"\xff\x00", b""] {
            assert_eq!(as_string(&stored(b)).as_ref(), b);
        }
        assert_eq!(as_string(&Value::Map(Default::default())).as_ref(), b"{}");
    }

    #[test]
    fn set_options_pick_the_write() {
        let cfg = RespConfig::default();
        let op = |p: Planned| match p.requests.into_iter().next() {
            Some(RequestBody::Table { op: TableOp::Write(w), .. }) => w,
            other => panic!("{other:?}"),
        };
        assert!(matches!(op(planned("SET k v", &cfg).unwrap()), WriteOp::Put { .. }));
        assert!(matches!(
            op(planned("SET k v NX", &cfg).unwrap()),
            WriteOp::Cas { expect: Expect::Absent, .. }
        ));
        assert!(matches!(
            op(planned("SET k v xx GET", &cfg).unwrap()),
            WriteOp::Cas { expect: Expect::Present, .. }
        ));
        assert!(matches!(
            op(planned("SET k v GET", &cfg).unwrap()),
            WriteOp::Cas { expect: Expect::Any, .. }
        ));
        assert_eq!(planned("SET k v NX XX", &cfg).unwrap_err(), CmdError::syntax());
        assert!(planned("SET k v EX 10", &cfg).unwrap_err().msg.contains("no expiry"));
        assert_eq!(planned("SET k v EX", &cfg).unwrap_err(), CmdError::syntax());
        assert_eq!(planned("GET", &cfg).unwrap_err(), CmdError::arity("GET"));
    }

    #[test]
    fn keys_route_to_tables_when_configured() {
        let plain = RespConfig::default();
        let routed = RespConfig { route_prefixes: true, ..RespConfig::default() };
        assert_eq!(route(b"users:bob", &plain, &Grid).unwrap(), ("redis", Key::Str("users:bob".into())));
        assert_eq!(route(b"users:bob", &routed, &Grid).unwrap(), ("users", Key::Str("bob".into())));
        assert_eq!(route(b"other:bob", &routed, &Grid).unwrap(), ("redis", Key::Str("other:bob".into())));
        assert!(route(b"\xff", &plain, &Grid).is_err());
    }

    #[test]
    fn mset_batches_by_shard() {
        let p = planned("MSET a1 1 b1 2 a2 3", &RespConfig::default()).unwrap();
        let sizes: Vec<usize> = p
            .requests
            .iter()
            .map(|r| match r {
                RequestBody::Table { op: TableOp::Batch(ops), .. } => ops.len(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(sizes, [2, 1]);
    }

    #[test]
    fn replies_from_answers() {
        assert_eq!(reply(&Shape::Get, vec![value(Value::Int(5))], false), "$1\r\n5\r\n");
        assert_eq!(reply(&Shape::Get, vec![Ok(ResponseBody::Op(OpResult::Value(None)))], false), "$-1\r\n");
        assert_eq!(reply(&Shape::Get, vec![Ok(ResponseBody::Op(OpResult::Value(None)))], true), "_\r\n");
        let cas = |ok, cur: Option<i64>| {
            Ok(ResponseBody::Op(OpResult::Written {
                lsn: 1,
                results: vec![WriteResult::Cas {
                    ok,
                    current: cur.map(|n| Versioned { version: 1, value: Value::Int(n) }),
                }],
            }))
        };
        assert_eq!(reply(&Shape::Set { get: false }, vec![cas(false, Some(1))], false), "$-1\r\n");
        assert_eq!(reply(&Shape::Set { get: false }, vec![cas(true, None)], false), "+OK\r\n");
        assert_eq!(reply(&Shape::Set { get: true }, vec![cas(true, Some(9))], false), "$1\r\n9\r\n");
        assert_eq!(reply(&Shape::SetNx, vec![cas(false, Some(9))], false), ":0\r\n");
        let overflow = Err(GridError::Value("type mismatch at []: integer overflow".into()));
        assert_eq!(
            reply(&Shape::Incr, vec![overflow], false),
            "-ERR increment or decrement would overflow\r\n"
        );
        let wrong = Err(GridError::Value("type mismatch at []: increment a bytes by a int".into()));
        assert_eq!(
            reply(&Shape::Incr, vec![wrong], false),
            "-ERR value is not an integer or out of range\r\n"
        );
        let b = |x| Ok(ResponseBody::Op(OpResult::Bool(x)));
        assert_eq!(reply(&Shape::Count, vec![b(true), b(false), b(true)], false), ":2\r\n");
        let missing = Err(GridError::NoSuchFeed("s".into()));
        assert_eq!(reply(&Shape::XLen, vec![missing], false), ":0\r\n");
        let doc = Value::from_json(&serde_json::json!({"a": [1, 2.5, true, null]})).unwrap();
        assert_eq!(
            reply(&Shape::Eval, vec![Ok(ResponseBody::Value(doc.clone()))], false),
            "*2\r\n$1\r\na\r\n*4\r\n:1\r\n$3\r\n2.5\r\n:1\r\n$-1\r\n"
        );
        assert_eq!(
            reply(&Shape::Eval, vec![Ok(ResponseBody::Value(doc))], true),
            "%1\r\n$1\r\na\r\n*4\r\n:1\r\n,2.5\r\n#t\r\n_\r\n"
        );
    }

    #[test]
    fn scan_pages_by_cursor() {
        let e = |k: &str| (Key::Str(k.into()), Versioned { version: 1, value: Value::Null });
        let page = |entries| Ok(ResponseBody::Op(OpResult::Entries(entries)));
        let shape = Shape::Scan { count: 2, pattern: Some(b"a*".to_vec()) };
        assert_eq!(
            reply(&shape, vec![page(vec![e("a1"), e("b")])], false),
            "*2\r\n$1\r\n7\r\n*1\r\n$2\r\na1\r\n"
        );
        assert_eq!(reply(&shape, vec![page(vec![e("a1")])], false), "*2\r\n$1\r\n0\r\n*1\r\n$2\r\na1\r\n");
        match scan_range(Some(Key::Str("user:5".into())), Some(b"user:*"), 10) {
            TableOp::Scan { start: Bound::Excluded(Key::Str(s)), .. } => assert_eq!(s, "user:5"),
            other => panic!("{other:?}"),
        }
        match scan_range(Some(Key::Str("a".into())), Some(b"user:*"), 10) {
            TableOp::Scan { start: Bound::Included(Key::Str(s)), .. } => assert_eq!(s, "user:"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn stream_ids() {
        assert_eq!(stream_id(b"5", true, true).unwrap(), 5);
        assert_eq!(stream_id(b"5-0", true, true).unwrap(), 5);
        assert_eq!(stream_id(b"5-1", true, true).unwrap(), 6);
        assert_eq!(stream_id(b"(5", true, true).unwrap(), 6);
        assert_eq!(stream_id(b"(5", false, true).unwrap(), 4);
        assert!(stream_id(b"x", true, true).is_err());
        assert!(stream_id(b"(5", true, false).is_err(), "`(` only in ranges");
    }
}
