#!/usr/bin/env bash
# Queues against Redis, side by side in one run on this machine, both driven by
# `heapgrid bench --queues` (the Redis side through the minimal RESP client in
# src/loadgen_queue.rs), with each server's CPU per cycle from /proc/<pid>/stat:
#  - take: heapgrid push + pop in take mode, against LPUSH + BRPOP (both at-most-once);
#  - ack: heapgrid push + pop in ack mode + ack, against XADD + XREADGROUP + XACK (both
#    at-least-once).
# Each at 1 and 16 connections, one cycle in flight per connection, on one shared queue, with
# 100-byte items. heapgrid runs `--fsync never` (every change's record is written with write(2)
# before its answer; kill -9 loses nothing acknowledged); Redis without AOF or RDB. Each case
# runs ROUNDS times; the table reports medians and heapgrid / Redis ratios.
#
#   bash benches/compare-redis-queues.sh
#   SECONDS_PER_CASE=5 ROUNDS=3 bash benches/compare-redis-queues.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS="${ROUNDS:-3}"

source benches/lib-redis.sh


echo "## queues vs Redis, $(date -u +%FT%TZ), $(nproc) cores, median of ${ROUNDS}"
echo
echo "| case | heapgrid cycles/s | Redis cycles/s | heapgrid / Redis | p99 µs heapgrid | Redis | server CPU µs/cycle heapgrid | Redis | CPU ratio |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"

start_redis off
start_heapgrid never
for load in take ack; do
  for clients in 1 16; do
    hs=(); rs=(); hp=(); rp=(); hc=(); rc=()
    for round in $(seq "$ROUNDS"); do
      for side in heapgrid redis; do
        if [ "$side" = heapgrid ]; then pid=$HG_PID; extra=(); else pid=$REDIS_PID; extra=(--redis "127.0.0.1:$REDIS_PORT"); fi
        before=$(cpu_ticks "$pid")
        out=$("$HG" bench --addr "$HG_ADDR" --table "bench-$load-$clients-$round" --queues "$load" \
          --connections "$clients" --value-bytes 100 --seconds "$SECS" --json "${extra[@]}")
        after=$(cpu_ticks "$pid")
        ops=$(echo "$out" | field ops)
        if [ "$side" = heapgrid ]; then
          hs+=("$(echo "$out" | field ops_per_sec)"); hp+=("$(echo "$out" | field latency_us_p99)")
          hc+=("$(us_per_op "$before" "$after" "$ops")")
        else
          rs+=("$(echo "$out" | field ops_per_sec)"); rp+=("$(echo "$out" | field latency_us_p99)")
          rc+=("$(us_per_op "$before" "$after" "$ops")")
        fi
      done
    done
    h=$(median "${hs[@]}"); r=$(median "${rs[@]}"); hcm=$(median1 "${hc[@]}"); rcm=$(median1 "${rc[@]}")
    echo "| $load, $clients in flight | $h | $r | $(ratio "$h" "$r") | $(median "${hp[@]}") | $(median "${rp[@]}") | $hcm | $rcm | $(ratio "$hcm" "$rcm") |"
  done
done
