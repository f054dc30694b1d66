//! Write batches: a sequence of puts and deletes applied atomically.
//!
//! A batch is kept in its encoded form from the start, so it can be applied, logged and shipped to
//! replicas without re-encoding. The encoding (little-endian) is a sequence of operations:
//!
//! ```text
//! u8  tag: 1 = put, 2 = delete
//! u32 key_len
//! u32 value_len            (put only)
//! key bytes
//! value bytes              (put only)
//! ```
//!
//! Invariant: every operation in a batch passed the key and value limits when it was added.

use crate::error::{Error, Result};
use crate::limits::{BATCH_BYTES_MAX, BATCH_OPS_MAX, KEY_BYTES_MAX, VALUE_BYTES_MAX};

const TAG_PUT: u8 = 1;
const TAG_DELETE: u8 = 2;

/// One operation of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchOp<'a> {
    Put { key: &'a [u8], value: &'a [u8] },
    Delete { key: &'a [u8] },
}

impl<'a> BatchOp<'a> {
    pub fn key(&self) -> &'a [u8] {
        match self {
            BatchOp::Put { key, .. } | BatchOp::Delete { key } => key,
        }
    }
}

/// Puts and deletes applied together by `Heap::apply`: all of them or none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    buf: Vec<u8>,
    ops: u32,
}

pub(crate) fn check_key(key: &[u8]) -> Result<()> {
    if key.len() > KEY_BYTES_MAX as usize {
        return Err(Error::LimitExceeded {
            what: "key bytes",
            got: key.len() as u64,
            max: KEY_BYTES_MAX as u64,
        });
    }
    Ok(())
}

pub(crate) fn check_value(value: &[u8]) -> Result<()> {
    if value.len() > VALUE_BYTES_MAX as usize {
        return Err(Error::LimitExceeded {
            what: "value bytes",
            got: value.len() as u64,
            max: VALUE_BYTES_MAX as u64,
        });
    }
    Ok(())
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }

    fn check_room(&self, extra: usize) -> Result<()> {
        if self.ops >= BATCH_OPS_MAX {
            return Err(Error::LimitExceeded {
                what: "batch operations",
                got: self.ops as u64 + 1,
                max: BATCH_OPS_MAX as u64,
            });
        }
        let bytes = (self.buf.len() + extra) as u64;
        if bytes > BATCH_BYTES_MAX {
            return Err(Error::LimitExceeded { what: "batch bytes", got: bytes, max: BATCH_BYTES_MAX });
        }
        Ok(())
    }

    /// Adds a put. Fails, leaving the batch unchanged, if the key or value is too long.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<&mut Self> {
        check_key(key)?;
        check_value(value)?;
        self.check_room(9 + key.len() + value.len())?;
        self.buf.push(TAG_PUT);
        self.buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(key);
        self.buf.extend_from_slice(value);
        self.ops += 1;
        Ok(self)
    }

    /// Adds a delete. Fails, leaving the batch unchanged, if the key is too long.
    pub fn delete(&mut self, key: &[u8]) -> Result<&mut Self> {
        check_key(key)?;
        self.check_room(5 + key.len())?;
        self.buf.push(TAG_DELETE);
        self.buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(key);
        self.ops += 1;
        Ok(self)
    }

    pub fn len(&self) -> usize {
        self.ops as usize
    }
    pub fn is_empty(&self) -> bool {
        self.ops == 0
    }
    pub fn clear(&mut self) {
        self.buf.clear();
        self.ops = 0;
    }

    /// The encoded batch (see the module docs).
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Decodes and validates an encoded batch (from the op log or the network).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() as u64 > BATCH_BYTES_MAX {
            return Err(Error::LimitExceeded {
                what: "batch bytes",
                got: bytes.len() as u64,
                max: BATCH_BYTES_MAX,
            });
        }
        let mut ops = 0u32;
        for op in decode(bytes) {
            match op? {
                BatchOp::Put { key, value } => {
                    check_key(key)?;
                    check_value(value)?;
                }
                BatchOp::Delete { key } => check_key(key)?,
            }
            ops += 1;
            if ops > BATCH_OPS_MAX {
                return Err(Error::LimitExceeded {
                    what: "batch operations",
                    got: ops as u64,
                    max: BATCH_OPS_MAX as u64,
                });
            }
        }
        Ok(WriteBatch { buf: bytes.to_vec(), ops })
    }

    /// The operations in order.
    pub fn iter(&self) -> impl Iterator<Item = BatchOp<'_>> {
        decode(&self.buf).map(|op| op.expect("a batch built through its API decodes"))
    }
}

/// Error for a malformed encoded batch (not from a page: page 0 stands for "no page").
fn malformed(reason: &str) -> Error {
    Error::Format(format!("malformed write batch: {reason}"))
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
    if b.len() < n {
        return Err(malformed("truncated"));
    }
    let (h, t) = b.split_at(n);
    *b = t;
    Ok(h)
}

fn take_u32(b: &mut &[u8]) -> Result<usize> {
    Ok(u32::from_le_bytes(take(b, 4)?.try_into().expect("4 bytes")) as usize)
}

fn decode_one<'a>(b: &mut &'a [u8]) -> Result<BatchOp<'a>> {
    let tag = take(b, 1)?[0];
    let klen = take_u32(b)?;
    match tag {
        TAG_PUT => {
            let vlen = take_u32(b)?;
            let key = take(b, klen)?;
            let value = take(b, vlen)?;
            Ok(BatchOp::Put { key, value })
        }
        TAG_DELETE => Ok(BatchOp::Delete { key: take(b, klen)? }),
        _ => Err(malformed("unknown operation tag")),
    }
}

fn decode(mut b: &[u8]) -> impl Iterator<Item = Result<BatchOp<'_>>> {
    let mut failed = false;
    std::iter::from_fn(move || {
        if b.is_empty() || failed {
            return None;
        }
        let r = decode_one(&mut b);
        failed = r.is_err();
        Some(r)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_limits() {
        let mut b = WriteBatch::new();
        b.put(b"k", b"v").unwrap().delete(b"x").unwrap();
        let again = WriteBatch::from_bytes(b.as_bytes()).unwrap();
        assert_eq!(again, b);
        let ops: Vec<_> = again.iter().collect();
        assert_eq!(ops, vec![BatchOp::Put { key: b"k", value: b"v" }, BatchOp::Delete { key: b"x" }]);
        let long = vec![0u8; KEY_BYTES_MAX as usize + 1];
        assert!(matches!(b.put(&long, b""), Err(Error::LimitExceeded { .. })));
        assert!(b.put(&long[1..], b"").is_ok(), "a key at the limit is fine");
        assert_eq!(b.len(), 3);
    }

    #[test]
    fn malformed_bytes_are_errors() {
        assert!(WriteBatch::from_bytes(&[1, 5, 0, 0, 0]).is_err());
        assert!(WriteBatch::from_bytes(&[9, 0, 0, 0, 0]).is_err());
        assert!(WriteBatch::from_bytes(&[]).unwrap().is_empty());
    }
}
