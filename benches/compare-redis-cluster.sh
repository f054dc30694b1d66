#!/usr/bin/env bash
# Replicated writes against Redis with a replica, side by side in one run on this machine (issue
# 15's benchmark). Everything is driven by `heapgrid bench` (the Redis side through the RESP
# client in src/loadgen_repl.rs): CLIENTS connections, each one SET / put of a random key at a
# time (100-byte values), SECONDS_PER_CASE each, ROUNDS rounds, medians.
#  - heapgrid: three `heapgrid serve` nodes on 127.0.0.1, a one-shard table whose primary is
#    node 1 (the load goes to it), `--sync 1` (answered once a replica's op log has the write)
#    and `--sync 0` (async), and one node on its own; every node `--fsync never` (records are
#    written with write(2) before they are acknowledged or shipped).
#  - Redis: a primary with one replica (`replicaof`), no AOF or RDB: SET followed by `WAIT 1 0`
#    (sync) and plain SET (async), and a Redis without a replica.
# Also the primary's CPU per write from /proc/<pid>/stat. Goal: sync(1) >= 1.0x Redis SET+WAIT.
#
#   bash benches/compare-redis-cluster.sh
#   CLIENTS=16 SECONDS_PER_CASE=5 ROUNDS=3 REPLICAS=1 bash benches/compare-redis-cluster.sh
# REPLICAS (default 1, as Redis's one replica; 2 puts a copy on every node) is `--replicas`;
# HG_THREADS (default: tokio's, one worker per core) is each heapgrid node's runtime threads.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS="${ROUNDS:-3}"
CLIENTS="${CLIENTS:-16}"
REPLICAS="${REPLICAS:-1}"
source benches/lib-redis.sh
export HEAPGRID_CLUSTER_COOKIE=bench

start_node() { # $1 = id, $2 = sync, $3 = join peer address or ""
  local dir="$work/n$1-$2-$RANDOM" out="$work/n$1-$2.out"
  local join=(); [ -n "$3" ] && join=(--join "$3")
  HEAPGRID_THREADS="${HG_THREADS:-}" "$HG" serve --listen 127.0.0.1:0 --data "$dir" --fsync never --node-id "$1" --peer-listen 127.0.0.1:0 \
    --sync "$2" --replicas "$REPLICAS" "${join[@]}" > "$out" 2>/dev/null &
  pids+=($!); NODE_PID=$!
  for _ in $(seq 200); do grep -q "listening on" "$out" 2>/dev/null && break; sleep 0.05; done
  NODE_ADDR=$(sed -n 's/heapgrid listening on //p' "$out"); NODE_PEER=$(sed -n 's/heapgrid peers on //p' "$out")
}

stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done; pids=(); }

cluster() { # $1 = sync: three nodes; PRIMARY_ADDR/PID = node 1
  start_node 1 "$1" ""; PRIMARY_ADDR=$NODE_ADDR; PRIMARY_PID=$NODE_PID; local seed=$NODE_PEER
  start_node 2 "$1" "$seed"; start_node 3 "$1" "$seed"
  for _ in $(seq 300); do
    n=$("$HG" cluster --addr "$PRIMARY_ADDR" status 2>/dev/null | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["members"]))' 2>/dev/null || echo 0)
    [ "$n" = 3 ] && break; sleep 0.1
  done
  "$HG" eval --addr "$PRIMARY_ADDR" create bench 1 >/dev/null
  # The primary serves once it holds a lease.
  for _ in $(seq 100); do "$HG" eval --addr "$PRIMARY_ADDR" put bench warm 1 >/dev/null 2>&1 && break; sleep 0.05; done
}

run_case() { # $1 = pid, $2.. = bench flags; prints "ops/s p99 cpu_us_per_op"
  local pid=$1; shift
  local before after out
  before=$(cpu_ticks "$pid")
  out=$("$HG" bench --connections "$CLIENTS" --keys "$KEYS" --value-bytes "$VALUE" --reads 0 --seconds "$SECS" --json "$@")
  after=$(cpu_ticks "$pid")
  echo "$(echo "$out" | field ops_per_sec) $(echo "$out" | field latency_us_p99) $(us_per_op "$before" "$after" "$(echo "$out" | field ops)")"
}

declare -A ops p99 cpu
record() { # $1 = case, $2 = "ops p99 cpu"
  read -r o p c <<< "$2"; ops[$1]+="$o "; p99[$1]+="$p "; cpu[$1]+="$c "
}

for round in $(seq "$ROUNDS"); do
  for s in 1 0; do
    cluster "$s"
    record "hg-sync$s" "$(run_case "$PRIMARY_PID" --addr "$PRIMARY_ADDR" --table bench)"
    stop_all
  done
  start_heapgrid never
  "$HG" eval --addr "$HG_ADDR" create bench 1 >/dev/null
  record "hg-alone" "$(run_case "$HG_PID" --addr "$HG_ADDR" --table bench)"
  stop_all
  start_redis off; primary_pid=$REDIS_PID; primary_port=$REDIS_PORT
  start_redis off; redis-cli -p "$REDIS_PORT" replicaof 127.0.0.1 "$primary_port" >/dev/null
  for _ in $(seq 100); do
    [ "$(redis-cli -p "$primary_port" info replication | grep -c 'state=online')" = 1 ] && break; sleep 0.1
  done
  record "redis-wait" "$(run_case "$primary_pid" --redis "127.0.0.1:$primary_port" --redis-set-wait 1)"
  record "redis-async" "$(run_case "$primary_pid" --redis "127.0.0.1:$primary_port" --redis-set-wait 0)"
  stop_all
  start_redis off
  record "redis-alone" "$(run_case "$REDIS_PID" --redis "127.0.0.1:$REDIS_PORT" --redis-set-wait 0)"
  stop_all
done

m() { median ${1}; }
m1() { median1 ${1}; }
echo "## replicated writes vs Redis, $(date -u +%FT%TZ), $(nproc) cores, $CLIENTS connections, heapgrid: $REPLICAS replica(s) per shard, ${HG_THREADS:-default} runtime threads per node; Redis: 1 replica; median of $ROUNDS"
echo
echo "| case | heapgrid writes/s | Redis writes/s | heapgrid / Redis | p99 µs heapgrid | Redis | primary CPU µs/write heapgrid | Redis | CPU ratio |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
row() { # $1 = label, $2 = heapgrid case, $3 = Redis case
  local h r hc rc
  h=$(m "${ops[$2]}"); r=$(m "${ops[$3]}"); hc=$(m1 "${cpu[$2]}"); rc=$(m1 "${cpu[$3]}")
  echo "| $1 | $h | $r | $(ratio "$h" "$r") | $(m "${p99[$2]}") | $(m "${p99[$3]}") | $hc | $rc | $(ratio "$hc" "$rc") |"
}
row "sync(1) vs SET + WAIT 1 0" hg-sync1 redis-wait
row "async vs SET with a replica" hg-sync0 redis-async
row "one node vs one Redis" hg-alone redis-alone
