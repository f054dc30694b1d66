#!/usr/bin/env bash
# Side-by-side: `heapgrid bench` against `heapgrid serve`, and `redis-benchmark` against
# `redis-server`, with the same parameters, in one run on this machine. Prints a markdown table
# with ratios (heapgrid / Redis). Installs Debian's redis-server and redis-tools if missing.
#
#   bash benches/compare-redis.sh            # default: 1M key space, 100-byte values, 50 clients
#   SECONDS_PER_CASE=10 KEYS=1000000 bash benches/compare-redis.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# redis-benchmark counts requests, heapgrid bench counts seconds: size redis' runs to about SECS.
REQS="${REQS:-300000}"

source benches/lib-redis.sh

echo "## heapgrid vs Redis, $(date -u +%FT%TZ), $(nproc) cores, ${CLIENTS} clients, ${VALUE}-byte values, ${KEYS} key space"
echo
echo "| case | heapgrid ops/s (p99 us) | Redis ops/s | heapgrid / Redis |"
echo "|---|---:|---:|---:|"

start_redis off
start_heapgrid every:1000
# Preload both so GETs hit.
"$HG" bench --addr "$HG_ADDR" --connections "$CLIENTS" --keys "$KEYS" --value-bytes "$VALUE" --reads 0 --seconds 0.01 --preload >/dev/null
redis-benchmark -p "$REDIS_PORT" -t set -n "$KEYS" -c "$CLIENTS" -P 16 -d "$VALUE" -r "$KEYS" -q >/dev/null 2>&1 || true
for p in 1 16; do
  for t in set get; do
    reads=0; [ "$t" = get ] && reads=100
    read -r hg p99 < <(hg_rps "$reads" "$p")
    rd=$(redis_rps "$t" "$p")
    echo "| ${t^^}, pipeline $p | $hg ($p99) | $rd | $(ratio "$hg" "$rd") |"
  done
done
# Memory per key after the preload.
hg_rss=$(awk '/VmRSS/ {print $2 * 1024}' "/proc/$HG_PID/status")
rd_mem=$(redis-cli -p "$REDIS_PORT" info memory | awk -F: '/^used_memory:/ {print $2+0}')
rd_keys=$(redis-cli -p "$REDIS_PORT" dbsize)
echo "| memory per key after ${KEYS} keys (heapgrid RSS; Redis used_memory) | $((hg_rss / KEYS)) B | $((rd_mem / rd_keys)) B | $(ratio "$((hg_rss / KEYS))" "$((rd_mem / rd_keys))") |"

# Restart holding the keys: time until the first request is answered.
kill "$HG_PID"; wait "$HG_PID" 2>/dev/null || true
t0=$(date +%s%N)
"$HG" serve --listen 127.0.0.1:0 --data "$HG_DIR" > "$work/hg.out" 2>/dev/null &
pids+=($!); HG_PID=$!
for _ in $(seq 2000); do grep -q "listening on" "$work/hg.out" 2>/dev/null && break; sleep 0.005; done
HG_ADDR=$(sed -n 's/heapgrid listening on //p' "$work/hg.out")
"$HG" eval --addr "$HG_ADDR" count bench >/dev/null
t1=$(date +%s%N)
echo "| restart holding ${KEYS} keys to first answer (heapgrid: process start to first reply) | $(( (t1 - t0) / 1000000 )) ms | | |"
kill "$HG_PID"; wait "$HG_PID" 2>/dev/null || true
kill "$REDIS_PID"; wait "$REDIS_PID" 2>/dev/null || true

# Durable SET: fsync always vs appendfsync always.
start_redis always
start_heapgrid always
read -r hg p99 < <(hg_rps 0 1)
rd=$(redis_rps set 1)
echo "| durable SET (fsync always / appendfsync always), pipeline 1 | $hg ($p99) | $rd | $(ratio "$hg" "$rd") |"
