//! Named limits of the actor layer that several modules share (tables, snippets, the grid).
//! Each is tested at its value and one past it where it is enforced.

/// Most entries one scan returns.
pub const SCAN_LIMIT_MAX: u32 = 10_000;
/// Most write operations in one batch.
pub const TABLE_BATCH_OPS_MAX: usize = 10_000;
/// Most shards per table.
pub const TABLE_SHARDS_MAX: u32 = 256;
/// Longest table name.
pub const TABLE_NAME_BYTES_MAX: usize = 64;
/// Most requests in one pipeline message to a shard (a connection's in-flight limit is far
/// below it).
pub const PIPELINE_OPS_MAX: usize = 4096;
