#!/usr/bin/env bash
# Locks against the usual single-instance Redis lock (SET key token NX PX 30000, released by a
# Lua compare-and-delete through EVALSHA), side by side in one run on this machine, both driven
# by `heapgrid bench --locks` (the Redis side through the minimal RESP client in
# src/loadgen_lock.rs), with each server's CPU per acquire+release pair from /proc/<pid>/stat:
#  - uncontended: LOCK_CLIENTS connections, a lock each (two round trips per pair, no waiting);
#  - contended: 16 connections on one lock (the handoff rate; heapgrid queues waiters FIFO in
#    the server, Redis clients retry SET NX at once, failed tries reported).
# heapgrid runs `--fsync never` (each grant's record is written with write(2) before its answer;
# kill -9 loses nothing acknowledged); Redis without AOF or RDB. Each case runs ROUNDS times; the
# table reports medians and heapgrid / Redis ratios.
#
#   bash benches/compare-redis-locks.sh
#   SECONDS_PER_CASE=5 ROUNDS=3 LOCK_CLIENTS=1 bash benches/compare-redis-locks.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS="${ROUNDS:-3}"
LOCK_CLIENTS="${LOCK_CLIENTS:-1}"

source benches/lib-redis.sh


echo "## locks vs the Redis lock, $(date -u +%FT%TZ), $(nproc) cores, median of ${ROUNDS}"
echo
echo "| case | heapgrid pairs/s | Redis pairs/s | heapgrid / Redis | p99 µs heapgrid | Redis | server CPU µs/pair heapgrid | Redis | Redis failed SET NX |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"

start_redis off
start_heapgrid never
for load in uncontended contended; do
  clients=$LOCK_CLIENTS; [ "$load" = contended ] && clients=16
  hs=(); rs=(); hp=(); rp=(); hc=(); rc=(); rf=()
  for round in $(seq "$ROUNDS"); do
    for side in heapgrid redis; do
      if [ "$side" = heapgrid ]; then pid=$HG_PID; extra=(); else pid=$REDIS_PID; extra=(--redis "127.0.0.1:$REDIS_PORT"); fi
      before=$(cpu_ticks "$pid")
      out=$("$HG" bench --addr "$HG_ADDR" --table "bench-$load-$round" --locks "$load" --connections "$clients" \
        --seconds "$SECS" --json "${extra[@]}")
      after=$(cpu_ticks "$pid")
      ops=$(echo "$out" | field ops)
      if [ "$side" = heapgrid ]; then
        hs+=("$(echo "$out" | field ops_per_sec)"); hp+=("$(echo "$out" | field latency_us_p99)")
        hc+=("$(us_per_op "$before" "$after" "$ops")")
      else
        rs+=("$(echo "$out" | field ops_per_sec)"); rp+=("$(echo "$out" | field latency_us_p99)")
        rc+=("$(us_per_op "$before" "$after" "$ops")"); rf+=("$(echo "$out" | field errors)")
      fi
    done
  done
  h=$(median "${hs[@]}"); r=$(median "${rs[@]}")
  echo "| $load, $clients connection(s) | $h | $r | $(ratio "$h" "$r") | $(median "${hp[@]}") | $(median "${rp[@]}") | $(median1 "${hc[@]}") | $(median1 "${rc[@]}") | $(median "${rf[@]}") |"
done
