//! Table keys and their order-preserving byte encoding (the heap's key bytes).
//!
//! ```text
//! Int(i):  0x01, (i as u64 ^ 1 << 63) big-endian (8 bytes)   -> ints sort numerically
//! Str(s):  0x02, UTF-8 bytes of s                             -> strings sort by code point
//! ```
//! All ints sort before all strings. Shards are chosen by crc32c of this encoding, which is stable
//! across platforms and versions.
//!
//! Invariant: `decode(encode(k)) == k` and `encode` preserves `Ord`.

use serde::{Deserialize, Serialize};

const TAG_INT: u8 = 1;
const TAG_STR: u8 = 2;
/// Longest string key in bytes (one tag byte must still fit the heap's key limit).
pub const KEY_STR_BYTES_MAX: usize = heapgrid_heap::limits::KEY_BYTES_MAX as usize - 1;

/// A table key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Key {
    Int(i64),
    Str(String),
}

impl From<&str> for Key {
    fn from(s: &str) -> Self {
        Key::Str(s.to_string())
    }
}
impl From<String> for Key {
    fn from(s: String) -> Self {
        Key::Str(s)
    }
}
impl From<i64> for Key {
    fn from(i: i64) -> Self {
        Key::Int(i)
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Int(i) => write!(f, "{i}"),
            Key::Str(s) => write!(f, "{s:?}"),
        }
    }
}

impl Key {
    /// The heap key bytes. Fails for a string longer than `KEY_STR_BYTES_MAX`.
    pub fn encode(&self) -> Result<Vec<u8>, KeyTooLong> {
        Ok(match self {
            Key::Int(i) => {
                let mut v = Vec::with_capacity(9);
                v.push(TAG_INT);
                v.extend_from_slice(&((*i as u64) ^ (1 << 63)).to_be_bytes());
                v
            }
            Key::Str(s) => {
                if s.len() > KEY_STR_BYTES_MAX {
                    return Err(KeyTooLong { bytes: s.len() });
                }
                let mut v = Vec::with_capacity(1 + s.len());
                v.push(TAG_STR);
                v.extend_from_slice(s.as_bytes());
                v
            }
        })
    }

    /// Decodes heap key bytes (untrusted: from disk).
    pub fn decode(b: &[u8]) -> Option<Key> {
        match b.split_first()? {
            (&TAG_INT, rest) if rest.len() == 8 => {
                Some(Key::Int((u64::from_be_bytes(rest.try_into().ok()?) ^ (1 << 63)) as i64))
            }
            (&TAG_STR, rest) => std::str::from_utf8(rest).ok().map(|s| Key::Str(s.to_string())),
            _ => None,
        }
    }

    /// The shard of `shards` this key belongs to.
    pub fn shard(&self, shards: u32) -> u32 {
        match self.encode() {
            Ok(b) => crc32c::crc32c(&b) % shards.max(1),
            Err(_) => 0,
        }
    }
}

/// The smallest string greater than every string starting with `p` (`None`: there is none,
/// as for the empty string or one made only of U+10FFFF).
pub fn str_successor(p: &str) -> Option<String> {
    let mut chars: Vec<char> = p.chars().collect();
    while let Some(last) = chars.pop() {
        let next = (last as u32 + 1..=char::MAX as u32).find_map(char::from_u32);
        if let Some(n) = next {
            chars.push(n);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// A string key over the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("key is {bytes} bytes, the limit is {KEY_STR_BYTES_MAX}")]
pub struct KeyTooLong {
    pub bytes: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> impl Strategy<Value = Key> {
        prop_oneof![any::<i64>().prop_map(Key::Int), "\\PC{0,20}".prop_map(Key::Str)]
    }

    proptest! {
        #[test]
        fn encoding_roundtrips_and_preserves_order(a in key(), b in key()) {
            let (ea, eb) = (a.encode().unwrap(), b.encode().unwrap());
            prop_assert_eq!(Key::decode(&ea), Some(a.clone()));
            prop_assert_eq!(a.cmp(&b), ea.cmp(&eb));
        }
    }

    #[test]
    fn limits_and_garbage() {
        assert!(Key::Str("x".repeat(KEY_STR_BYTES_MAX)).encode().is_ok());
        assert!(Key::Str("x".repeat(KEY_STR_BYTES_MAX + 1)).encode().is_err());
        assert_eq!(Key::decode(&[1, 2]), None);
        assert_eq!(Key::decode(&[2, 0xff]), None);
        assert_eq!(Key::decode(&[]), None);
        assert!(Key::Int(-1) < Key::Int(0) && Key::Int(i64::MAX) < Key::Str(String::new()));
    }
}
