//! The record encoding of the service heaps (lock, queue) and of the replication sidecar: a
//! format byte (`FORMAT`, 1), then the value in postcard. A record with another first byte is
//! `Corrupted` (a later format would be read by a later version of this module).

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::GridError;

pub const FORMAT: u8 = 1;

/// `v` as a record; `what` names it in the error.
pub fn encode<T: Serialize>(what: &str, v: &T) -> Result<Vec<u8>, GridError> {
    encode_as(FORMAT, what, v)
}

/// The value of record `b`; `what` names it in the error ("lock store session").
pub fn decode<T: DeserializeOwned>(what: &str, b: &[u8]) -> Result<T, GridError> {
    decode_as(FORMAT, what, b)
}

/// `v` as a record of format byte `format` (a store whose layout moved on from 1).
pub fn encode_as<T: Serialize>(format: u8, what: &str, v: &T) -> Result<Vec<u8>, GridError> {
    postcard::to_extend(v, vec![format]).map_err(|e| GridError::Invalid(format!("{what}: {e}")))
}

/// The value of record `b` of format byte `format`; a record of another format is refused,
/// naming both.
pub fn decode_as<T: DeserializeOwned>(format: u8, what: &str, b: &[u8]) -> Result<T, GridError> {
    match b.split_first() {
        Some((&f, body)) if f == format => {
            postcard::from_bytes(body).map_err(|e| GridError::Corrupted(format!("{what}: {e}")))
        }
        Some((&f, _)) => Err(GridError::Corrupted(format!(
            "{what}: record format {f}, and this build reads format {format} only"
        ))),
        None => Err(GridError::Corrupted(format!("{what}: an empty record"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_of_another_format_is_refused_by_name() {
        let b = encode_as(2, "thing", &7u64).unwrap();
        assert_eq!(decode_as::<u64>(2, "thing", &b).unwrap(), 7);
        let e = decode_as::<u64>(3, "thing", &b).unwrap_err().to_string();
        assert!(e.contains("record format 2") && e.contains("format 3"), "{e}");
        assert!(decode::<u64>("thing", &[]).is_err());
    }
}
