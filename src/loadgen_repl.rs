//! The baseline of the cluster benchmark (`benches/compare-redis-cluster.sh`): Redis with a
//! replica, each connection doing one `SET` of a random key at a time, followed by `WAIT n 0`
//! when `n > 0` (Redis' synchronous replication: the write is answered once `n` replicas
//! acknowledged it). The heapgrid side is the ordinary put load against a replicated table.

use std::net::SocketAddr;
use std::time::Instant;

use heapgrid_actors::GridError;

use crate::loadgen::{LoadReport, LoadSpec};
use crate::loadgen_feed::{Part, Reply, gather, new_hist};
use crate::loadgen_queue::RedisConn;

/// Runs `SET` (+ `WAIT wait 0`) against Redis at `addr` as `spec` says (connections, key
/// space, value size, duration).
pub async fn run(spec: &LoadSpec, addr: SocketAddr, wait: u32) -> Result<LoadReport, GridError> {
    let deadline = Instant::now() + spec.duration;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..spec.connections.max(1) {
        let value = vec![b'x'; spec.value_bytes];
        tasks.spawn(sets(addr, c as u64, spec.keys.max(1), value, wait, deadline));
    }
    gather(tasks, start).await
}

async fn sets(
    addr: SocketAddr,
    seed: u64,
    keys: u64,
    value: Vec<u8>,
    wait: u32,
    deadline: Instant,
) -> Result<Part, GridError> {
    let mut conn = RedisConn::connect(addr).await?;
    let mut rng = fastrand::Rng::with_seed(seed);
    let wait_arg = wait.to_string();
    let (mut hist, mut n, mut errors) = (new_hist(), 0, 0);
    while Instant::now() < deadline {
        let key = rng.u64(..keys).to_string();
        let set: &[&[u8]] = &[b"SET", key.as_bytes(), &value];
        let t = Instant::now();
        // A Redis error ends the connection's run (`read_reply` turns it into an error).
        let ok = if wait == 0 {
            conn.pipeline(&[set]).await?;
            true
        } else {
            let replies = conn.pipeline(&[set, &[b"WAIT", wait_arg.as_bytes(), b"0"]]).await?;
            // WAIT answers how many replicas acknowledged: fewer than asked is a failure.
            matches!(replies.last(), Some(Reply::Int(got)) if *got >= i64::from(wait))
        };
        if ok {
            hist.saturating_record(t.elapsed().as_micros().max(1) as u64);
            n += 1;
        } else {
            errors += 1;
        }
    }
    Ok((hist, n, errors))
}
