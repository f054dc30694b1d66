//! The wire protocol between `Client` and `heapgrid serve`: length-prefixed postcard frames over
//! TCP. The full specification, for clients in other languages, is docs/protocol.md.
//!
//! ```text
//! frame   := u32 LE payload_len (<= FRAME_BYTES_MAX) | payload (postcard)
//! session := client Hello, server HelloReply, then any number of Request frames from the client
//!            and Response frames from the server, matched by `id` (responses may come back in
//!            any order; up to the server's in-flight limit run concurrently)
//! ```
//!
//! These are the wire's own types: the server converts them to the actor layer's typed calls at
//! its edge (src/server.rs) and the client from its typed methods (src/client.rs). Shared data
//! types (`Key`, `Value`, `Versioned`, `WriteOp`, `WriteResult`, `GridError`, `TableOptions`,
//! `TableInfo`, `LimitOverrides`) travel as they are and are pinned here too.
//!
//! Invariant: a malformed frame, an oversized frame or an undecodable message ends that
//! connection (after a `Response { id: 0, .. }` naming the problem); nothing else is affected.
//! Invariant: every enum on the wire only ever gains variants at the end (postcard tags are
//! indices), and no struct on the wire changes its fields; `golden_bytes_match_the_spec` pins
//! each of them.

use std::ops::Bound;

use crate::feed::{FeedOp, FeedResult};
use heapgrid_actors::cluster::ops::{ClusterOp, ClusterResult};
use heapgrid_actors::grid::{FeedInfo, FeedOptions, TableInfo, TableOptions};
use heapgrid_actors::lock::ops::{LockOp, LockResult};
use heapgrid_actors::queue::ops::{QueueOp, QueueResult};
use heapgrid_actors::snippet::LimitOverrides;
use heapgrid_actors::table::actor::RawVersioned;
use heapgrid_actors::value::VALUE_FORMAT_VERSION;
use heapgrid_actors::{GridError, Key, Value, Versioned, WriteOp, WriteResult};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// First bytes of a `Hello`.
pub const MAGIC: [u8; 4] = *b"HGRD";
/// Bumped on any incompatible change; see the version log in docs/protocol.md.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest frame payload (a 32 MiB value plus its request).
pub const FRAME_BYTES_MAX: u32 = 40 * 1024 * 1024;

/// The client's first frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 4],
    pub version: u32,
    /// Auth token; `None` on a server in trusted mode.
    pub token: Option<String>,
}

/// The server's answer to `Hello`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum HelloReply {
    Welcome { version: u32, server: String },
    Refused { error: GridError },
}

/// One request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the client, echoed in the response; 0 is reserved for connection errors.
    pub id: u64,
    pub body: RequestBody,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RequestBody {
    Ping,
    ListTables,
    CreateTable {
        name: String,
        options: TableOptions,
    },
    DropTable {
        name: String,
    },
    Table {
        table: String,
        op: TableOp,
    },
    /// A grid-scoped snippet (needs `eval` and `read` on every collection it touches, and
    /// `write` on those it writes).
    Eval {
        src: String,
        /// The snippet's `args` variable.
        args: Value,
        limits: LimitOverrides,
    },
    /// Entries `offset..offset+limit` of the value at a `$ref` path from a snippet result.
    Fetch {
        reference: String,
        offset: u32,
        limit: u32,
    },
    /// Stores (or replaces) a module of procedures (needs `admin` on `procedures`).
    PutProcedures {
        module: String,
        src: String,
    },
    /// Removes a module of procedures (needs `admin` on `procedures`).
    DropProcedures {
        module: String,
    },
    /// Feeds this token may read, with their containers.
    ListFeeds,
    /// Creates a feed (needs `admin` on its name).
    CreateFeed {
        name: String,
        options: FeedOptions,
    },
    /// Drops a feed and its records (needs `admin` on its name).
    DropFeed {
        name: String,
    },
    /// An operation on one feed (`read` or `write` on its name, per `FeedOp::writes`).
    Feed {
        feed: String,
        op: FeedOp,
    },
    /// A request to the lock service (docs/locks.md; permissions there).
    Lock {
        op: LockOp,
    },
    /// A grid-scoped snippet whose writes are fenced: every `(lock, fence)` is checked at its
    /// commit, with its writes (permissions as `Eval`).
    EvalFenced {
        src: String,
        args: Value,
        limits: LimitOverrides,
        fences: Vec<(String, u64)>,
    },
    /// A request to the queue service (docs/queues.md): `write` on the queue's name to change
    /// it, `read` to look.
    Queue {
        op: QueueOp,
    },
    /// About the cluster (docs/cluster.md): `read` on `cluster` to look, `admin` to change.
    Cluster {
        op: ClusterOp,
    },
    /// The node's memory and its heaps' figures (docs/protocol.md): the collections the
    /// token may read.
    Stats,
    /// This connection's settings from now on. `wait_for_recovery: false`: a request for a
    /// table or feed shard that is recovering (replaying its op log after a restart) is
    /// answered `Recovering` at once instead of after the replay.
    SetSession {
        wait_for_recovery: bool,
    },
    /// The server's slow log, newest first (needs admin on `$server`, which `*` grants);
    /// `clear` empties it.
    SlowLog {
        clear: bool,
    },
}

/// One response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    pub result: Result<ResponseBody, GridError>,
}

/// Append-only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ResponseBody {
    Pong,
    Tables(Vec<TableInfo>),
    Done,
    Op(OpResult),
    /// A snippet's result, or a fetched value.
    Value(Value),
    Feeds(Vec<FeedInfo>),
    Feed(FeedResult),
    Lock(LockResult),
    Queue(QueueResult),
    Cluster(ClusterResult),
    Stats(heapgrid_actors::stats::NodeStats),
    SlowLog(Vec<crate::metrics::SlowEntry>),
    /// A grid-scoped snippet's answer when it printed (`print()`): its value and the text.
    Printed {
        value: Value,
        printed: String,
    },
}

/// An operation on one table. Append-only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TableOp {
    Get {
        key: Key,
    },
    Contains {
        key: Key,
    },
    Count,
    /// Entries with keys in `[start, end]` per the bounds, at most `limit`, descending if `reverse`.
    Scan {
        start: Bound<Key>,
        end: Bound<Key>,
        limit: u32,
        reverse: bool,
    },
    /// Entries whose string keys start with `prefix`.
    Prefix {
        prefix: String,
        limit: u32,
        reverse: bool,
    },
    Write(WriteOp),
    /// Writes applied together, as one op-log record (all keys in one shard).
    Batch(Vec<WriteOp>),
    /// A collection-scoped snippet, run inside the shard actor that owns its `key`.
    Eval(EvalRequest),
    /// `Get` that an in-sync replica of the key's shard may answer from its own copy (in a
    /// cluster: `read_from = replica`, possibly missing the newest writes); elsewhere a `Get`.
    GetCopy {
        key: Key,
    },
}

impl TableOp {
    /// The key whose shard serves it, for an operation on one key (or a batch, by its first
    /// keyed write); `None` for those over every shard (count, scan, prefix).
    pub fn routing_key(&self) -> Option<&Key> {
        match self {
            TableOp::Get { key } | TableOp::Contains { key } | TableOp::GetCopy { key } => Some(key),
            TableOp::Write(w) => w.key(),
            TableOp::Batch(ops) => ops.iter().find_map(|w| w.key()),
            TableOp::Eval(e) => e.key.as_ref(),
            _ => None,
        }
    }
}

impl TableOp {
    /// True for operations that change the table.
    pub fn is_write(&self) -> bool {
        matches!(self, TableOp::Write(_) | TableOp::Batch(_))
    }
}

/// A collection-scoped snippet on the wire. Fields fixed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRequest {
    pub src: String,
    /// The routing key; the snippet's `key` variable.
    pub key: Option<Key>,
    /// The snippet's `args` variable.
    pub args: Value,
    pub limits: LimitOverrides,
    /// Refuse any write (the server forces it for tokens without write permission).
    pub read_only: bool,
}

impl From<EvalRequest> for heapgrid_actors::EvalRequest {
    fn from(r: EvalRequest) -> Self {
        heapgrid_actors::EvalRequest {
            src: r.src,
            key: r.key,
            args: r.args,
            limits: r.limits,
            read_only: r.read_only,
        }
    }
}

/// The answer to a `TableOp`. Append-only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum OpResult {
    Value(Option<Versioned>),
    Bool(bool),
    Count(u64),
    Entries(Vec<(Key, Versioned)>),
    /// `lsn` is the op-log record of the writes (0 if nothing was written).
    Written {
        lsn: u64,
        results: Vec<WriteResult>,
    },
    /// A snippet's (shaped) result.
    Snippet(Value),
}

/// Postcard tags of the variants `append_get_response` writes by hand.
const TAG_RESULT_OK: u8 = 0;
const TAG_BODY_OP: u8 = 3;
const TAG_OP_RESULT_VALUE: u8 = 0;

/// Appends the frame of `Response { id, result: Ok(Op(Value(record))) }` to `out`, copying the
/// stored value bytes (postcard of `Value`, the same encoding the wire uses) instead of decoding
/// and re-encoding them. Byte-identical to `encode` of that response (tested).
pub fn append_get_response(out: &mut Vec<u8>, id: u64, record: Option<&RawVersioned>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    let fast = match record {
        None => {
            push_varint(out, id);
            out.extend_from_slice(&[TAG_RESULT_OK, TAG_BODY_OP, TAG_OP_RESULT_VALUE, 0]);
            true
        }
        Some(r) => match r.value.split_first() {
            Some((&VALUE_FORMAT_VERSION, body)) => {
                push_varint(out, id);
                out.extend_from_slice(&[TAG_RESULT_OK, TAG_BODY_OP, TAG_OP_RESULT_VALUE, 1]);
                push_varint(out, r.version);
                out.extend_from_slice(body);
                true
            }
            _ => false,
        },
    };
    let len = (out.len() - start - 4) as u64;
    if fast && len <= FRAME_BYTES_MAX as u64 {
        out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
        return;
    }
    // Another value format, or too large: decode and encode the general way.
    out.truncate(start);
    let result = record
        .map(|r| {
            Value::decode(&r.value)
                .map(|value| Versioned { version: r.version, value })
                .map_err(|e| GridError::Corrupted(format!("stored value: {e}")))
        })
        .transpose()
        .map(|v| ResponseBody::Op(OpResult::Value(v)));
    append_response(out, &Response { id, result });
}

/// Appends `msg` as one frame to `out`.
pub fn append_msg<T: Serialize>(out: &mut Vec<u8>, msg: &T) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    if let Err(e) = postcard::to_extend(msg, Append(out)) {
        out.truncate(start);
        return Err(FrameError::Malformed(e.to_string()));
    }
    let len = out.len() - start - 4;
    if len > FRAME_BYTES_MAX as usize {
        out.truncate(start);
        return Err(FrameError::TooLarge(len as u32));
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// Appends one response frame to `out` (or, if it cannot be encoded, an error frame for its id).
pub fn append_response(out: &mut Vec<u8>, resp: &Response) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    let encoded = postcard::to_extend(resp, Append(out)).is_ok();
    let len = out.len().saturating_sub(start + 4);
    if encoded && len <= FRAME_BYTES_MAX as usize {
        out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
        return;
    }
    out.truncate(start);
    let why = if encoded {
        format!("response frame of {len} bytes is over the limit of {FRAME_BYTES_MAX}")
    } else {
        "response could not be encoded".to_string()
    };
    if let Ok(f) = encode(&Response { id: resp.id, result: Err(GridError::Protocol(why)) }) {
        out.extend_from_slice(&f);
    }
}

/// Lets postcard append to a buffer it does not own (so a failure cannot take the buffer).
struct Append<'a>(&'a mut Vec<u8>);

impl Extend<u8> for Append<'_> {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, iter: I) {
        self.0.extend(iter);
    }
}

/// A response frame's payload read only as far as its id and whether it failed (and, by its
/// `GridError` variant's wire index, how): what metrics count, without decoding the rest.
/// `None`: not a response.
pub fn response_outcome(payload: &[u8]) -> Option<(u64, Result<(), u32>)> {
    let (id, rest) = take_varint(payload)?;
    match rest.split_first()? {
        (&TAG_RESULT_OK, _) => Some((id, Ok(()))),
        (1, err) => Some((id, Err(u32::try_from(take_varint(err)?.0).ok()?))),
        _ => None,
    }
}

/// Postcard's unsigned varint at the start of `b`, and the rest (`None`: cut short or longer
/// than a u64's ten bytes).
fn take_varint(b: &[u8]) -> Option<(u64, &[u8])> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, &b[i + 1..]));
        }
    }
    None
}

/// Postcard's unsigned varint (LEB128).
fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {0} bytes is over the limit of {FRAME_BYTES_MAX}")]
    TooLarge(u32),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The server's node-wide budget for connection buffers is spent (many large frames at once).
    #[error(
        "the server's buffer budget of {budget_bytes} bytes is exhausted; send smaller frames or retry later"
    )]
    OverBudget { budget_bytes: u64 },
    /// A frame was started and not finished in time.
    #[error("a frame was not completed within {0:?}")]
    Deadline(std::time::Duration),
}

/// Reads one frame's payload.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Result<(), FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len);
    if len > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge(len));
    }
    buf.clear();
    buf.resize(len as usize, 0);
    r.read_exact(buf).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Malformed("truncated frame".into()),
        _ => FrameError::Io(e),
    })?;
    Ok(())
}

/// Encodes `msg` as one frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = postcard::to_extend(msg, vec![0u8; 4]).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = (out.len() - 4) as u32;
    if len > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge(len));
    }
    out[..4].copy_from_slice(&len.to_le_bytes());
    Ok(out)
}

/// Decodes a payload (untrusted).
pub fn decode<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, FrameError> {
    let (msg, rest) = heapgrid_actors::value::with_node_budget(|| postcard::take_from_bytes(payload))
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(format!("{} bytes after the message", rest.len())));
    }
    Ok(msg)
}

/// Writes one message as a frame.
pub async fn write_msg<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let bytes = encode(msg)?;
    w.write_all(&bytes).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn roundtrip_request_and_response() {
        let r = Request {
            id: 7,
            body: RequestBody::Table {
                table: "users".into(),
                op: TableOp::Write(WriteOp::Put { key: Key::from("bob"), value: Value::Int(1) }),
            },
        };
        let f = encode(&r).unwrap();
        assert_eq!(u32::from_le_bytes(f[..4].try_into().unwrap()) as usize, f.len() - 4);
        assert_eq!(decode::<Request>(&f[4..]).unwrap(), r);
        let resp = Response { id: 7, result: Err(GridError::NoSuchTable("x".into())) };
        assert_eq!(decode::<Response>(&encode(&resp).unwrap()[4..]).unwrap(), resp);
        let mut trailing = encode(&r).unwrap()[4..].to_vec();
        trailing.push(0);
        assert!(decode::<Request>(&trailing).is_err(), "trailing bytes are malformed");
    }

    /// Bytes derived by hand from docs/protocol.md: a client written from the doc produces these.
    #[test]
    fn golden_bytes_match_the_spec() {
        use std::ops::Bound;
        let req = Request {
            id: 1,
            body: RequestBody::Table {
                table: "t".into(),
                op: TableOp::Scan {
                    start: Bound::Included(Key::Int(1)),
                    end: Bound::Unbounded,
                    limit: 2,
                    reverse: true,
                },
            },
        };
        // id 1 | Table (4) | "t" | Scan (3) | Included (1) Int (0) zigzag(1)=2 | Unbounded (0) | 2 | true
        let want = [1, 4, 1, b't', 3, 1, 0, 2, 0, 2, 1];
        assert_eq!(&encode(&req).unwrap()[4..], &want);
        let hello = Hello { magic: MAGIC, version: 1, token: Some("k".into()) };
        assert_eq!(&encode(&hello).unwrap()[4..], &[b'H', b'G', b'R', b'D', 1, 1, 1, b'k']);
        let resp = Response { id: 300, result: Ok(ResponseBody::Op(OpResult::Count(5))) };
        // id 300 = varint [0xac, 0x02] | Ok (0) | Op (3) | Count (2) | 5
        assert_eq!(&encode(&resp).unwrap()[4..], &[0xac, 0x02, 0, 3, 2, 5]);
        let v = Value::Map(
            [("a".to_string(), Value::List(vec![Value::Bool(true), Value::Null]))].into_iter().collect(),
        );
        let put = Request {
            id: 2,
            body: RequestBody::Table {
                table: "t".into(),
                op: TableOp::Write(WriteOp::Put { key: Key::from("k"), value: v }),
            },
        };
        // ... Write (5) | Put (0) | Str (1) "k" | Map (7) 1 "a" List (6) 2 Bool (1) 1 Null (0)
        let want = [2, 4, 1, b't', 5, 0, 1, 1, b'k', 7, 1, 1, b'a', 6, 2, 1, 1, 0];
        assert_eq!(&encode(&put).unwrap()[4..], &want);
    }

    /// The first byte of an enum's encoding is its variant index (all indices here are < 128).
    fn tag<T: Serialize>(v: &T) -> u8 {
        postcard::to_allocvec(v).unwrap()[0]
    }

    /// Every enum on the wire, variant by variant, at the index docs/protocol.md gives it: a
    /// variant inserted anywhere but at the end fails this test.
    #[test]
    fn every_wire_enum_keeps_its_variant_indices() {
        use heapgrid_actors::grid::FsyncSetting;
        use heapgrid_actors::snippet::{Budget, SnippetErrorKind, SnippetFailure};
        use heapgrid_actors::{Expect, PathSeg, Update, WriteResult};
        let s = String::new;
        let v = || Value::Null;
        let k = || Key::Int(0);
        let bodies = [
            RequestBody::Ping,
            RequestBody::ListTables,
            RequestBody::CreateTable { name: s(), options: TableOptions::default() },
            RequestBody::DropTable { name: s() },
            RequestBody::Table { table: s(), op: TableOp::Count },
            RequestBody::Eval { src: s(), args: v(), limits: LimitOverrides::default() },
            RequestBody::Fetch { reference: s(), offset: 0, limit: 0 },
            RequestBody::PutProcedures { module: s(), src: s() },
            RequestBody::DropProcedures { module: s() },
            RequestBody::ListFeeds,
            RequestBody::CreateFeed { name: s(), options: FeedOptions::default() },
            RequestBody::DropFeed { name: s() },
            RequestBody::Feed { feed: s(), op: FeedOp::Info },
            RequestBody::Lock { op: LockOp::List },
            RequestBody::EvalFenced {
                src: s(),
                args: v(),
                limits: LimitOverrides::default(),
                fences: vec![],
            },
            RequestBody::Queue { op: QueueOp::List },
            RequestBody::Cluster { op: ClusterOp::Status },
            RequestBody::Stats,
            RequestBody::SetSession { wait_for_recovery: true },
            RequestBody::SlowLog { clear: false },
        ];
        assert_eq!(bodies.iter().map(tag).collect::<Vec<_>>(), (0..20).collect::<Vec<u8>>());
        let info = TableInfo { name: s(), shards: 1, fsync: FsyncSetting::Never };
        let responses = [
            ResponseBody::Pong,
            ResponseBody::Tables(vec![info.clone()]),
            ResponseBody::Done,
            ResponseBody::Op(OpResult::Count(0)),
            ResponseBody::Value(v()),
            ResponseBody::Feeds(vec![]),
            ResponseBody::Feed(FeedResult::Done),
            ResponseBody::Lock(LockResult::Done),
            ResponseBody::Queue(QueueResult::Done),
            ResponseBody::Cluster(ClusterResult::Changed { version: 0 }),
            ResponseBody::Stats(Default::default()),
            ResponseBody::SlowLog(vec![]),
            ResponseBody::Printed { value: v(), printed: s() },
        ];
        assert_eq!(responses.iter().map(tag).collect::<Vec<_>>(), (0..13).collect::<Vec<u8>>());
        use heapgrid_actors::cluster::map::Member;
        let m = Member { id: 0, addr: s(), peer_addr: s() };
        let cluster_ops = [
            ClusterOp::Status,
            ClusterOp::Add(m),
            ClusterOp::Remove { node: 0 },
            ClusterOp::Digest { table: s(), shard: 0 },
            ClusterOp::Move { table: s(), shard: 0, node: 0 },
        ];
        assert_eq!(cluster_ops.iter().map(tag).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
        use heapgrid_actors::cluster::raft::ClusterStatus;
        use heapgrid_actors::replication::shard::ShardDigest;
        let status = ClusterStatus {
            node: 0,
            role: s(),
            leader: None,
            term: 0,
            voters: vec![],
            learners: vec![],
            applied: 0,
            map: Default::default(),
            copies: vec![],
        };
        let cluster_results = [
            ClusterResult::Status(status),
            ClusterResult::Changed { version: 0 },
            ClusterResult::Digest(ShardDigest { pos: Default::default(), keys: 0, digest: 0 }),
        ];
        assert_eq!(cluster_results.iter().map(tag).collect::<Vec<_>>(), [0, 1, 2]);
        use heapgrid_actors::queue::ops::{Mode, QueueLen, QueueOptions, Receipt};
        let r = || Receipt { seq: 0, delivery: 0 };
        let queue_ops = [
            QueueOp::Push { queue: s(), value: v(), dedup_key: None, delay_ms: 0, fence: None },
            QueueOp::Pop {
                queue: s(),
                n: 0,
                wait_ms: 0,
                mode: Mode::Ack,
                visibility_ms: None,
                session: None,
            },
            QueueOp::Ack { queue: s(), receipt: r() },
            QueueOp::Nack { queue: s(), receipt: r(), delay_ms: 0 },
            QueueOp::Extend { queue: s(), receipt: r(), ms: 0 },
            QueueOp::Peek { queue: s(), n: 0 },
            QueueOp::Len { queue: s() },
            QueueOp::Purge { queue: s() },
            QueueOp::Configure { queue: s(), options: QueueOptions::defaults("q") },
            QueueOp::List,
            QueueOp::PushWait {
                queue: s(),
                value: v(),
                dedup_key: None,
                delay_ms: 0,
                fence: None,
                wait_ms: 0,
            },
        ];
        assert_eq!(queue_ops.iter().map(tag).collect::<Vec<_>>(), (0..11).collect::<Vec<u8>>());
        assert_eq!([Mode::Ack, Mode::Take].iter().map(tag).collect::<Vec<_>>(), [0, 1]);
        let queue_results = [
            QueueResult::Pushed { seq: 0, duplicate: false },
            QueueResult::Delivered(vec![]),
            QueueResult::Done,
            QueueResult::Items(vec![]),
            QueueResult::Len(QueueLen::default()),
            QueueResult::Purged { items: 0 },
            QueueResult::List(vec![]),
        ];
        assert_eq!(queue_results.iter().map(tag).collect::<Vec<_>>(), (0..7).collect::<Vec<u8>>());
        // A delivery is exactly seq, receipt (seq, delivery), deliveries, value.
        let d = heapgrid_actors::queue::ops::Delivery {
            seq: 1,
            receipt: Receipt { seq: 1, delivery: 2 },
            deliveries: 2,
            value: v(),
        };
        assert_eq!(postcard::to_allocvec(&d).unwrap(), [1, 1, 2, 2, 0]);
        // QueueLen is exactly ready, in_flight, delayed, waiters.
        let l = QueueLen { ready: 1, in_flight: 2, delayed: 3, waiters: 4 };
        assert_eq!(postcard::to_allocvec(&l).unwrap(), [1, 2, 3, 4]);
        let lock_ops = [
            LockOp::Open { ttl_ms: None },
            LockOp::Reattach { session: 0, secret: 0 },
            LockOp::Heartbeat { session: 0 },
            LockOp::Close { session: 0 },
            LockOp::Acquire { lock: s(), session: 0, wait_ms: 0, lease_ms: None },
            LockOp::Release { lock: s(), session: 0, fence: 0 },
            LockOp::Renew { lock: s(), session: 0, fence: 0, lease_ms: None },
            LockOp::Status { lock: s() },
            LockOp::List,
            LockOp::Configure { lock: s(), reentry_max: 0, lock_delay_ms: 0 },
            LockOp::SemAcquire { sem: s(), session: 0, size: 1, permits: 1, wait_ms: 0 },
            LockOp::SemRelease { sem: s(), session: 0, permits: 1 },
            LockOp::SemStatus { sem: s() },
        ];
        assert_eq!(lock_ops.iter().map(tag).collect::<Vec<_>>(), (0..13).collect::<Vec<u8>>());
        use heapgrid_actors::lock::ops::{LockStatus, SemStatus};
        let status = LockStatus {
            lock: s(),
            holder: None,
            last_fence: 0,
            waiters: 0,
            reentry_max: 0,
            lock_delay_ms: 0,
        };
        let sem = SemStatus { sem: s(), size: 1, in_use: 0, waiters: 0, holders: vec![] };
        let lock_results = [
            LockResult::Session { session: 0, secret: 0, ttl_ms: 0 },
            LockResult::Done,
            LockResult::Granted { fence: 0, expires_in_ms: 0 },
            LockResult::Timeout,
            LockResult::Status(status.clone()),
            LockResult::List { locks: vec![status.clone()], sems: vec![sem.clone()] },
            LockResult::Permits { held: 0 },
            LockResult::Sem(sem),
        ];
        assert_eq!(lock_results.iter().map(tag).collect::<Vec<_>>(), (0..8).collect::<Vec<u8>>());
        // LockStatus is exactly lock, holder, last_fence, waiters, reentry_max, lock_delay_ms.
        assert_eq!(postcard::to_allocvec(&status).unwrap(), [0, 0, 0, 0, 0, 0]);
        use heapgrid_actors::feed::{CursorInfo, Pos, ReadResult};
        let feed_ops = [
            FeedOp::Append { value: v(), id: None },
            FeedOp::Get { id: 0 },
            FeedOp::Remove { id: 0 },
            FeedOp::Read { after: Pos::Start, n: 0, wait_ms: 0 },
            FeedOp::ReadBack { before: None, n: 0 },
            FeedOp::CursorSet { name: s(), at: Pos::End },
            FeedOp::CursorGet { name: s() },
            FeedOp::CursorRead { name: s(), n: 0, wait_ms: 0 },
            FeedOp::CursorDelete { name: s() },
            FeedOp::Cursors,
            FeedOp::Trim { keep: 0 },
            FeedOp::Cut { before: 0 },
            FeedOp::Rotate,
            FeedOp::SetVersion { version: 0 },
            FeedOp::Info,
            FeedOp::AppendFenced { value: v(), id: None, fences: vec![] },
        ];
        assert_eq!(feed_ops.iter().map(tag).collect::<Vec<_>>(), (0..16).collect::<Vec<u8>>());
        let cursor = CursorInfo { name: s(), position: 0, lag: 0 };
        let feed_results = [
            FeedResult::Appended { id: 0 },
            FeedResult::Record(None),
            FeedResult::Done,
            FeedResult::Records(ReadResult { records: vec![], next: 0 }),
            FeedResult::Cursor(cursor.clone()),
            FeedResult::Cursors(vec![cursor]),
            FeedResult::Bool(true),
            FeedResult::Count(0),
            FeedResult::Info(FeedInfo {
                name: s(),
                segment_records: 1,
                roll_after_ms: None,
                retention: Default::default(),
                fsync: FsyncSetting::Never,
                state: heapgrid_actors::feed::FeedState {
                    top: 0,
                    bottom: 0,
                    count: 0,
                    next_id: 1,
                    version: 1,
                    trimmed_below: 1,
                    segments: vec![],
                },
            }),
        ];
        assert_eq!(feed_results.iter().map(tag).collect::<Vec<_>>(), (0..9).collect::<Vec<u8>>());
        let positions = [Pos::Start, Pos::End, Pos::After(0), Pos::FirstAvailable];
        assert_eq!(positions.iter().map(tag).collect::<Vec<_>>(), (0..4).collect::<Vec<u8>>());
        // TableInfo is exactly name, shards, fsync (no internal field leaks onto the wire).
        assert_eq!(postcard::to_allocvec(&info).unwrap(), [0, 1, 2]);
        let eval = EvalRequest {
            src: s(),
            key: None,
            args: v(),
            limits: LimitOverrides::default(),
            read_only: false,
        };
        let ops = [
            TableOp::Get { key: k() },
            TableOp::Contains { key: k() },
            TableOp::Count,
            TableOp::Scan { start: Bound::Unbounded, end: Bound::Unbounded, limit: 0, reverse: false },
            TableOp::Prefix { prefix: s(), limit: 0, reverse: false },
            TableOp::Write(WriteOp::Delete { key: k() }),
            TableOp::Batch(vec![]),
            TableOp::Eval(eval),
            TableOp::GetCopy { key: k() },
        ];
        assert_eq!(ops.iter().map(tag).collect::<Vec<_>>(), (0..9).collect::<Vec<u8>>());
        let results = [
            OpResult::Value(None),
            OpResult::Bool(true),
            OpResult::Count(0),
            OpResult::Entries(vec![]),
            OpResult::Written { lsn: 0, results: vec![] },
            OpResult::Snippet(v()),
        ];
        assert_eq!(results.iter().map(tag).collect::<Vec<_>>(), (0..6).collect::<Vec<u8>>());
        let writes = [
            WriteOp::Put { key: k(), value: v() },
            WriteOp::Delete { key: k() },
            WriteOp::Cas { key: k(), expect: Expect::Absent, new: None },
            WriteOp::Update { key: k(), path: vec![], update: Update::Remove },
            WriteOp::Check { key: k(), expect: Expect::Absent },
            WriteOp::Fence { lock: s(), fence: 0 },
        ];
        assert_eq!(writes.iter().map(tag).collect::<Vec<_>>(), (0..6).collect::<Vec<u8>>());
        let expects = [Expect::Absent, Expect::Value(v()), Expect::Version(0), Expect::Present, Expect::Any];
        assert_eq!(expects.iter().map(tag).collect::<Vec<_>>(), (0..5).collect::<Vec<u8>>());
        let updates = [Update::Set(v()), Update::Increment(v()), Update::Append(v()), Update::Remove];
        assert_eq!(updates.iter().map(tag).collect::<Vec<_>>(), (0..4).collect::<Vec<u8>>());
        assert_eq!([tag(&PathSeg::Key(s())), tag(&PathSeg::Index(0))], [0, 1]);
        let wresults = [
            WriteResult::Put { version: 0 },
            WriteResult::Deleted { existed: false },
            WriteResult::Cas { ok: false, current: None },
            WriteResult::Updated { value: v(), version: 0 },
            WriteResult::Checked,
        ];
        assert_eq!(wresults.iter().map(tag).collect::<Vec<_>>(), (0..5).collect::<Vec<u8>>());
        assert_eq!([tag(&Key::Int(0)), tag(&Key::Str(s()))], [0, 1]);
        let values = [
            Value::Null,
            Value::Bool(true),
            Value::Int(0),
            Value::Float(0.0),
            Value::Str(s()),
            Value::Bytes(vec![]),
            Value::List(vec![]),
            Value::Map(Default::default()),
        ];
        assert_eq!(values.iter().map(tag).collect::<Vec<_>>(), (0..8).collect::<Vec<u8>>());
        let fsyncs = [FsyncSetting::Always, FsyncSetting::EveryMs(1), FsyncSetting::Never];
        assert_eq!(fsyncs.iter().map(tag).collect::<Vec<_>>(), (0..3).collect::<Vec<u8>>());
        let bounds: [Bound<Key>; 3] = [Bound::Unbounded, Bound::Included(k()), Bound::Excluded(k())];
        assert_eq!(bounds.iter().map(tag).collect::<Vec<_>>(), (0..3).collect::<Vec<u8>>());
        let hellos = [
            HelloReply::Welcome { version: 1, server: s() },
            HelloReply::Refused { error: GridError::Closed },
        ];
        assert_eq!(hellos.iter().map(tag).collect::<Vec<_>>(), (0..2).collect::<Vec<u8>>());
        let budgets = [
            Budget::Steps,
            Budget::Memory,
            Budget::CallDepth,
            Budget::ResultSize,
            Budget::WallTime,
            Budget::Writes,
        ];
        assert_eq!(budgets.iter().map(tag).collect::<Vec<_>>(), (0..6).collect::<Vec<u8>>());
        let kinds = [
            SnippetErrorKind::Syntax,
            SnippetErrorKind::Name,
            SnippetErrorKind::Type,
            SnippetErrorKind::Value,
            SnippetErrorKind::Fail,
            SnippetErrorKind::Budget(Budget::Steps),
        ];
        assert_eq!(kinds.iter().map(tag).collect::<Vec<_>>(), (0..6).collect::<Vec<u8>>());
        let failure = SnippetFailure { kind: SnippetErrorKind::Fail, line: 1, col: 2, message: "m".into() };
        assert_eq!(postcard::to_allocvec(&failure).unwrap(), [4, 1, 2, 1, b'm']);
        let errors = [
            GridError::NoSuchTable(s()),
            GridError::TableExists(s()),
            GridError::Invalid(s()),
            GridError::CasFailed { index: 300 },
            GridError::LimitExceeded { what: s(), got: 0, max: 0 },
            GridError::Value(s()),
            GridError::Corrupted(s()),
            GridError::Storage(s()),
            GridError::ShardFailed { table: s(), shard: 0, reason: s() },
            GridError::Unavailable(s()),
            GridError::Closed,
            GridError::Unauthenticated(s()),
            GridError::PermissionDenied { collection: s(), permission: s() },
            GridError::Protocol(s()),
            GridError::Snippet(failure),
            GridError::WorkerDied(s()),
            GridError::Conflict { attempts: 1 },
            GridError::NoSuchFeed(s()),
            GridError::FeedExists(s()),
            GridError::IdExists { id: 0 },
            GridError::NoSuchRecord { id: 0 },
            GridError::Trimmed { first_available: 0 },
            GridError::NoSuchCursor(s()),
            GridError::StaleFence { lock: s(), presented: 0, current: None },
            GridError::NotHolder { lock: s(), current: None },
            GridError::SessionExpired { session: 0 },
            GridError::QueueFull { queue: s(), max_len: 0 },
            GridError::StaleReceipt { queue: s(), seq: 0, delivery: 0 },
            GridError::Indeterminate(s()),
            GridError::NotPrimary { table: s(), shard: 0, primary: None, addr: None },
            GridError::Recovering { table: s(), shard: 0, replayed_bytes: 0, total_bytes: 0 },
        ];
        assert_eq!(errors.iter().map(tag).collect::<Vec<_>>(), (0..31).collect::<Vec<u8>>());
        // The metrics' names of errors, by wire index, are each variant's own.
        assert_eq!(GridError::KINDS.len(), errors.len());
        for e in &errors {
            assert_eq!(GridError::KINDS[tag(e) as usize], e.kind(), "{e:?}");
        }
        // CasFailed's index is a u64 varint.
        assert_eq!(postcard::to_allocvec(&errors[3]).unwrap(), [3, 0xac, 0x02]);
    }

    #[test]
    fn varints_read_back_what_postcard_writes() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut b = postcard::to_allocvec(&v).unwrap();
            b.push(0xee);
            assert_eq!(take_varint(&b), Some((v, &[0xee][..])), "{v}");
        }
        assert_eq!(take_varint(&[0x80, 0x80]), None, "cut short");
        assert_eq!(take_varint(&[0xff; 11]), None, "too long");
        let mut out = Vec::new();
        append_response(&mut out, &Response { id: 300, result: Err(GridError::Closed) });
        assert_eq!(response_outcome(&out[4..]), Some((300, Err(10))));
    }

    /// The hand-written get response is byte for byte what serde writes.
    #[test]
    fn get_responses_written_by_hand_equal_serde() {
        let mut out = Vec::new();
        append_get_response(&mut out, 300, None);
        let want =
            encode(&Response { id: 300, result: Ok(ResponseBody::Op(OpResult::Value(None))) }).unwrap();
        assert_eq!(out, want);
        // A value in a format the fast path does not know is decoded (and, if broken, refused).
        let raw = RawVersioned { version: 1, value: vec![99, 0] };
        let mut out = Vec::new();
        append_get_response(&mut out, 5, Some(&raw));
        let back: Response = decode(&out[4..]).unwrap();
        assert!(matches!(back.result, Err(GridError::Corrupted(_))), "{back:?}");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
        /// The decoder meets random bytes: an error or a message, never a panic.
        #[test]
        fn random_payloads_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<Request>(&bytes);
            let _ = decode::<Hello>(&bytes);
            let _ = decode::<Response>(&bytes);
        }

        #[test]
        fn get_responses_of_any_value_equal_serde(id in any::<u64>(), version in any::<u64>(), json in "[0-9a-z\\[\\]{}\":, ]{0,40}") {
            let value = serde_json::from_str::<serde_json::Value>(&json)
                .ok()
                .and_then(|j| Value::from_json(&j).ok())
                .unwrap_or(Value::Str(json));
            let raw = RawVersioned { version, value: value.encode().unwrap() };
            let mut out = vec![7];
            append_get_response(&mut out, id, Some(&raw));
            let resp = Response { id, result: Ok(ResponseBody::Op(OpResult::Value(Some(Versioned { version, value })))) };
            prop_assert_eq!(&out[1..], &encode(&resp).unwrap()[..]);
        }
    }
}
