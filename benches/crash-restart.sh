#!/usr/bin/env bash
# Back in service after a crash (issue 19): KEYS keys (16-byte keys, VALUE-byte values) loaded,
# then WRITE_SECS of random overwrites, and `kill -9` of the server while they run; then the
# server is started again on the same data and timed from its spawn to its first answer:
#  - heapgrid (`--fsync every:1000`, SHARDS shards): the server listens at once and each shard
#    serves when its own replay ends; polled every millisecond with `heapgrid stats
#    --until-recovered` (the shards still recovering, at each change): to the first answer with
#    one shard of the table serving ("any shard") and every shard ("every shard"); and the same
#    after a clean stop (SIGTERM: checkpoint and close) and start, for the clean restart;
#  - Redis 7 with AOF (`appendfsync everysec`), and with an RDB snapshot taken after the load
#    (`SAVE`; the overwrites after it are lost, as RDB loses them): to the first GET that is not
#    refused with LOADING.
# Each time includes the process start. Before the kill, a measured phase of MEASURE_SECS of
# overwrites gives the write rate and the checkpoints taken under this op-log bound
# (LOG_BOUND, `--checkpoint-log-bytes`: a smaller bound replays less and checkpoints more).
#
#   bash benches/crash-restart.sh
#   KEYS=1000000 VALUE=100 WRITE_SECS=10 SHARDS=4 LOG_BOUND=64M bash benches/crash-restart.sh
set -euo pipefail
cd "$(dirname "$0")/.."

KEYS="${KEYS:-1000000}"
VALUE="${VALUE:-100}"
WRITE_SECS="${WRITE_SECS:-10}"
SHARDS="${SHARDS:-4}"
LOG_BOUND="${LOG_BOUND:-64M}"
MEASURE_SECS="${MEASURE_SECS:-5}"
CLIENTS=16
source benches/lib-redis.sh

now() { date +%s.%N; }
ms() { python3 -c "print('%.0f' % (($2 - $1) * 1000))"; }

# heapgrid
HG_DATA="$work/hg-data"
hg_start() {
  "$HG" serve --listen 127.0.0.1:0 --data "$HG_DATA" --fsync every:1000 --trusted-snippets \
    --checkpoint-log-bytes "$LOG_BOUND" > "$work/hg.out" 2>/dev/null &
  pids+=($!); HG_PID=$!
}
hg_addr() {
  for _ in $(seq 20000); do grep -q "listening on" "$work/hg.out" 2>/dev/null && break; sleep 0.001; done
  sed -n 's/heapgrid listening on //p' "$work/hg.out"
}
hg_start
HG_ADDR=$(hg_addr)
"$HG" bench --addr "$HG_ADDR" --table bench --shards "$SHARDS" --connections "$CLIENTS" --keys "$KEYS" \
  --value-bytes "$VALUE" --reads 0 --seconds 0.01 --preload >/dev/null
checkpoints() {
  "$HG" stats --addr "$HG_ADDR" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(sum(sh["checkpoints"] for c in s["collections"] if c["name"]=="bench" for sh in c["shards"]))'
}
cp0=$(checkpoints)
put_rate=$("$HG" bench --addr "$HG_ADDR" --table bench --connections "$CLIENTS" --keys "$KEYS" --value-bytes "$VALUE" \
  --reads 0 --seconds "$MEASURE_SECS" | sed -n 's/.*: \([0-9]*\) ops\/s.*/\1/p')
cp1=$(checkpoints)
"$HG" bench --addr "$HG_ADDR" --table bench --connections "$CLIENTS" --keys "$KEYS" --value-bytes "$VALUE" \
  --reads 0 --seconds "$((WRITE_SECS + 5))" > /dev/null 2>&1 &
writer=$!
sleep "$WRITE_SECS"
tail_bytes=$("$HG" stats --addr "$HG_ADDR" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(sum(sh["log_tail_bytes"] for c in s["collections"] if c["name"]=="bench" for sh in c["shards"]))')
kill -9 "$HG_PID"; wait "$HG_PID" 2>/dev/null || true
wait "$writer" 2>/dev/null || true
: > "$work/hg.out"
# Prints "ANY EVERY": ms from now to the first stats answer with one, then every, shard of the
# table serving.
hg_restart_ms() {
  local t0
  : > "$work/hg.out"
  t0=$(now)
  hg_start
  HG_ADDR=$(hg_addr)
  "$HG" stats --addr "$HG_ADDR" --until-recovered | python3 -c "
import json, sys
t0, shards = float(sys.argv[1]), int(sys.argv[2])
any_at = every_at = None
for line in sys.stdin:
    r = json.loads(line)
    serving = shards - sum(1 for x in r['recovering'] if x['collection'] == 'bench')
    if serving >= 1 and any_at is None:
        any_at = r['unix_s']
    if serving == shards and every_at is None:
        every_at = r['unix_s']
print('%.0f %.0f' % ((any_at - t0) * 1000, (every_at - t0) * 1000))" "$t0" "$SHARDS"
}
# (Run in this shell, not in a `$( )` subshell: it sets HG_PID.)
hg_restart_ms > "$work/times"
read -r hg_any hg_every < "$work/times"
# A clean stop (checkpoint and close), then a clean start.
kill "$HG_PID"; wait "$HG_PID" 2>/dev/null || true
hg_restart_ms > "$work/times"
read -r clean_any clean_every < "$work/times"
kill "$HG_PID"; wait "$HG_PID" 2>/dev/null || true

# Redis
redis_restart_ms() { # $1 = aof|rdb
  local dir="$work/redis-$1" port; port=$(free_port); mkdir -p "$dir"
  local flags=(--port "$port" --bind 127.0.0.1 --dir "$dir" --daemonize no --save "")
  [ "$1" = aof ] && flags+=(--appendonly yes --appendfsync everysec) || flags+=(--appendonly no)
  redis-server "${flags[@]}" >/dev/null 2>&1 &
  local pid=$!; pids+=("$pid")
  for _ in $(seq 200); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
  redis-benchmark -p "$port" -t set -n "$KEYS" -c "$CLIENTS" -d "$VALUE" -r "$KEYS" -q >/dev/null 2>&1
  [ "$1" = rdb ] && redis-cli -p "$port" save >/dev/null
  redis-benchmark -p "$port" -t set -n 100000000 -c "$CLIENTS" -d "$VALUE" -r "$KEYS" -q >/dev/null 2>&1 &
  local w=$!
  sleep "$WRITE_SECS"
  kill -9 "$pid"; wait "$pid" 2>/dev/null || true
  kill "$w" 2>/dev/null; wait "$w" 2>/dev/null || true
  local t0 t1; t0=$(now)
  redis-server "${flags[@]}" >/dev/null 2>&1 &
  pid=$!; pids+=("$pid")
  until r=$(redis-cli -p "$port" get key:000000000001 2>&1) && [[ "$r" != *LOADING* ]] && [[ "$r" != *refused* ]]; do
    sleep 0.001
  done
  t1=$(now)
  kill "$pid"; wait "$pid" 2>/dev/null || true
  ms "$t0" "$t1"
}
aof_ms=$(redis_restart_ms aof)
rdb_ms=$(redis_restart_ms rdb)

echo "## restart after kill -9 under writes, $(date -u +%FT%TZ), $(nproc) cores: $KEYS keys of $VALUE B, ${WRITE_SECS}s of overwrites before the kill"
echo
echo "| server | first answer from any shard (ms) | from every shard (ms) | ratio (every shard) |"
echo "|---|---:|---:|---:|"
echo "| heapgrid ($SHARDS shards, every:1000, --checkpoint-log-bytes $LOG_BOUND; op log since the last checkpoint at the kill: $(python3 -c "print('%.1f MiB' % ($tail_bytes / 1048576))")) | $hg_any | $hg_every | 1.00 |"
echo "| Redis, AOF everysec | $aof_ms | $aof_ms | $(python3 -c "print('%.2f' % ($aof_ms / $hg_every))") |"
echo "| Redis, RDB | $rdb_ms | $rdb_ms | $(python3 -c "print('%.2f' % ($rdb_ms / $hg_every))") |"
echo "| heapgrid, clean restart (after SIGTERM) | $clean_any | $clean_every | |"
echo
echo "(ratio: the other's time over heapgrid's to every shard; above 1 heapgrid is faster)"
echo
echo "heapgrid under this bound, before the kill: $put_rate puts/s over ${MEASURE_SECS}s ($CLIENTS connections), $((cp1 - cp0)) checkpoints over its $SHARDS shards"
