//! The record encoding of the service heaps (lock, queue) and of the replication sidecar: a
//! format byte (`FORMAT`, 1), then the value in postcard. A record with another first byte is
//! `Corrupted` (a later format would be read by a later version of this module).

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::GridError;

pub const FORMAT: u8 = 1;

/// `v` as a record; `what` names it in the error.
pub fn encode<T: Serialize>(what: &str, v: &T) -> Result<Vec<u8>, GridError> {
    postcard::to_extend(v, vec![FORMAT]).map_err(|e| GridError::Invalid(format!("{what}: {e}")))
}

/// The value of record `b`; `what` names it in the error ("lock store session").
pub fn decode<T: DeserializeOwned>(what: &str, b: &[u8]) -> Result<T, GridError> {
    match b.split_first() {
        Some((&FORMAT, body)) => {
            postcard::from_bytes(body).map_err(|e| GridError::Corrupted(format!("{what}: {e}")))
        }
        _ => Err(GridError::Corrupted(format!("{what}: unknown record format"))),
    }
}
