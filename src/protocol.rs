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
//! Invariant: a malformed frame, an oversized frame or an undecodable message ends that
//! connection (after a `Response { id: 0, .. }` naming the problem); nothing else is affected.
//! Invariant: the enums below only ever gain variants at the end (postcard tags are indices).

use heapgrid_actors::grid::{TableDef, TableOptions};
use heapgrid_actors::snippet::LimitOverrides;
use heapgrid_actors::{GridError, OpResult, TableOp, Value};
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
}

/// One response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    pub result: Result<ResponseBody, GridError>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ResponseBody {
    Pong,
    Tables(Vec<TableDef>),
    Done,
    Op(OpResult),
    /// A snippet's result, or a fetched value.
    Value(Value),
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
    use heapgrid_actors::{Key, Value, WriteOp};
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

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
        /// The decoder meets random bytes: an error or a message, never a panic.
        #[test]
        fn random_payloads_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<Request>(&bytes);
            let _ = decode::<Hello>(&bytes);
            let _ = decode::<Response>(&bytes);
        }
    }
}
