#!/usr/bin/env bash
# CLUSTER.md's catch-up test at full length: a replica down for 60 s (SECS) catches up from the
# primary's log, then, down again while more is written than the primary retains, from a
# snapshot; every copy's digest is equal afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/heapgrid/target}"
HEAPGRID_CATCHUP_SECS="${SECS:-60}" cargo test --release --test it \
    cluster::a_replica_that_was_down_catches_up_from_the_log_or_a_snapshot -- --nocapture 2>&1 |
    grep -E 'caught up|panicked|test result'
