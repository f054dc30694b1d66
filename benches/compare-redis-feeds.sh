#!/usr/bin/env bash
# Feeds against Redis streams, side by side in one run on this machine:
#  - appends/s with CLIENTS connections at 1 and 16 in flight each, against
#    `redis-benchmark XADD stream * f VALUE` (same connections, `-P`), with the server's CPU per
#    append from /proc/<pid>/stat (utime + stime), which a co-located load generator cannot
#    distort;
#  - a follower's append-to-delivery latency at RATE appends/s (one appending connection, one
#    follower), heapgrid `Feed::follow` against `XREAD BLOCK` on the last id seen, both measured by
#    `heapgrid bench --follow-rate` (the Redis side through a minimal RESP client in
#    src/loadgen_feed.rs).
# Both servers run without fsync per write (heapgrid `--fsync never`: the op log is written with
# write(2) before each acknowledgement; Redis: no AOF, no RDB). Each case runs ROUNDS times,
# alternating; the table reports medians. Prints markdown with ratios (heapgrid / Redis).
#
#   bash benches/compare-redis-feeds.sh
#   SECONDS_PER_CASE=5 ROUNDS=3 RATE=10000 bash benches/compare-redis-feeds.sh
set -euo pipefail
cd "$(dirname "$0")/.."

REQS="${REQS:-300000}"
ROUNDS="${ROUNDS:-3}"
RATE="${RATE:-10000}"

source benches/lib-redis.sh

csv_rps() { python3 -c 'import csv,sys; rows=list(csv.reader(sys.stdin)); print(rows[1][1])'; }

echo "## feeds vs Redis streams, $(date -u +%FT%TZ), $(nproc) cores, ${CLIENTS} clients, ${VALUE}-byte values, median of ${ROUNDS}"
echo
echo "| case | heapgrid | Redis | heapgrid / Redis | server CPU µs/op heapgrid | Redis |"
echo "|---|---:|---:|---:|---:|---:|"

start_redis off
start_heapgrid never
for p in 1 16; do
  hgs=(); rds=(); hcpu=(); rcpu=()
  for _ in $(seq "$ROUNDS"); do
    before=$(cpu_ticks "$HG_PID")
    out=$("$HG" bench --addr "$HG_ADDR" --table events --feed --connections "$CLIENTS" --pipeline "$p" \
      --value-bytes "$VALUE" --seconds "$SECS" --json)
    after=$(cpu_ticks "$HG_PID")
    ops=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ops"])')
    hgs+=("$(echo "$out" | python3 -c 'import json,sys; print("%.0f" % json.load(sys.stdin)["ops_per_sec"])')")
    hcpu+=("$(us_per_op "$before" "$after" "$ops")")
    before=$(cpu_ticks "$REDIS_PID")
    rds+=("$(redis-benchmark -p "$REDIS_PORT" -n "$REQS" -c "$CLIENTS" -P "$p" --csv \
      xadd events '*' f "$(head -c "$VALUE" /dev/zero | tr '\0' x)" 2>/dev/null | csv_rps)")
    after=$(cpu_ticks "$REDIS_PID")
    rcpu+=("$(us_per_op "$before" "$after" "$REQS")")
  done
  h=$(median "${hgs[@]}"); r=$(median "${rds[@]}")
  echo "| append, ${p} in flight per connection (appends/s) | $h | $r | $(ratio "$h" "$r") | $(python3 -c "import statistics,sys; print('%.1f' % statistics.median(map(float, sys.argv[1:])))" "${hcpu[@]}") | $(python3 -c "import statistics,sys; print('%.1f' % statistics.median(map(float, sys.argv[1:])))" "${rcpu[@]}") |"
done

hp=(); rp=(); h50=(); r50=()
for _ in $(seq "$ROUNDS"); do
  out=$("$HG" bench --addr "$HG_ADDR" --table follow --feed --follow-rate "$RATE" --seconds "$SECS" --json)
  hp+=("$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["latency_us_p99"])')")
  h50+=("$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["latency_us_p50"])')")
  out=$("$HG" bench --addr "$HG_ADDR" --table follow --feed --follow-rate "$RATE" --seconds "$SECS" \
    --redis "127.0.0.1:$REDIS_PORT" --json)
  rp+=("$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["latency_us_p99"])')")
  r50+=("$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["latency_us_p50"])')")
done
h=$(median "${hp[@]}"); r=$(median "${rp[@]}")
echo "| follower append-to-delivery p99 at ${RATE}/s (µs; lower is better) | $h | $r | $(ratio "$h" "$r") | | |"
h=$(median "${h50[@]}"); r=$(median "${r50[@]}")
echo "| follower append-to-delivery p50 at ${RATE}/s (µs) | $h | $r | $(ratio "$h" "$r") | | |"
