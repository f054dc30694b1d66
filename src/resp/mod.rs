//! RESP, the Redis protocol, as heapgrid's second front door (`heapgrid serve --resp-listen`):
//! the pure parts, with no I/O, so they can be tested directly. `codec` reads commands (RESP2/
//! RESP3 multibulk arrays, and inline commands) and writes replies in either protocol version;
//! `glob` is Redis' pattern matching for `SCAN ... MATCH`; `command` turns a parsed command into
//! native requests and turns their answers back into a reply. The connection that drives them
//! is `server::resp` (it shares the native request path: `Round`, auth, limits, metrics).
//!
//! docs/resp.md lists the commands, how keys and values map onto tables, and where heapgrid
//! answers differently from Redis.

pub mod codec;
pub mod command;
pub mod glob;
