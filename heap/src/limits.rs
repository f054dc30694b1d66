//! Named limits of the heap. Every limit has a typed error one past it (`Error::LimitExceeded`),
//! and a test at the limit and one past it.

/// Bytes in one page. 4 KiB matches the OS page (so `madvise` and the page cache work in whole
/// pages), the common SSD program unit, and keeps copy-on-write amplification low: a one-key change
/// copies at most `depth` pages of 4 KiB.
pub const PAGE_SIZE: u32 = 4096;
/// `PAGE_SIZE` for indexing memory (never written to disk).
pub(crate) const PAGE: usize = PAGE_SIZE as usize;

/// Longest key. Chosen so that four branch or leaf cells always fit in one page, which is what lets
/// every split produce two valid halves.
pub const KEY_BYTES_MAX: u32 = 512;
/// Longest value. Values that do not fit in a quarter page live in an overflow chain.
pub const VALUE_BYTES_MAX: u32 = 32 * 1024 * 1024;
/// Operations in one write batch.
pub const BATCH_OPS_MAX: u32 = 1 << 20;
/// Encoded bytes of one write batch (keys + values + framing).
pub const BATCH_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// Height of the B+tree. Every node holds at least four cells (`CELL_BYTES_MAX` is a quarter of
/// a page), so a branch has at least 4 children after a split; 4^16 leaves are far more than
/// `FILE_BYTES_MAX` can hold, so a deeper tree is corruption.
pub const TREE_DEPTH_MAX: u32 = 16;
/// Default cap on one heap file (`HeapOptions::max_file_bytes` sets another).
pub const FILE_BYTES_MAX: u64 = 1 << 40;
