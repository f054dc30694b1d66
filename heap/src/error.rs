//! The heap's error type. Everything that came from disk or a caller is a typed error here;
//! programmer errors are assertions.

use std::io;

/// Result alias for the heap crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every way a heap operation can fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bytes read from disk do not form a valid heap. `page` is the page the problem was found in.
    #[error("heap corrupted at page {page}: {reason}")]
    Corrupted { page: u64, reason: String },
    /// The file is not a heapgrid heap, or was written by an unknown format version.
    #[error("not a heapgrid heap or unsupported format: {0}")]
    Format(String),
    /// A named limit was exceeded by a caller's input.
    #[error("{what} is {got}, the limit is {max}")]
    LimitExceeded { what: &'static str, got: u64, max: u64 },
    /// The device has no space left for the file to grow.
    #[error("no space left on device while growing the heap to {wanted_bytes} bytes")]
    DiskFull { wanted_bytes: u64 },
    /// The heap reached `HeapOptions::max_file_bytes`.
    #[error("heap file would exceed its configured maximum of {max_bytes} bytes")]
    HeapFull { max_bytes: u64 },
    /// Another process (or handle) has the heap open.
    #[error("heap file is locked by another process: {0}")]
    Locked(String),
    /// An earlier failure (an fsync error, a corrupt page met during a write) left the in-memory
    /// state unknowable; the heap refuses further work until it is reopened.
    #[error("heap is closed after an earlier failure: {0}")]
    Poisoned(String),
    /// An I/O error from the operating system.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

impl Error {
    pub(crate) fn corrupted(page: u64, reason: impl Into<String>) -> Self {
        Error::Corrupted { page, reason: reason.into() }
    }

    /// True for `Corrupted` errors.
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corrupted { .. })
    }
}

/// Shorthand for "this on-disk field is out of range" in page decoders.
pub(crate) fn corrupt<T>(page: u64, reason: &str) -> Result<T> {
    Err(Error::corrupted(page, reason))
}
