#!/usr/bin/env bash
# Bytes per key (issue 16's measurement), heapgrid against Redis in the same run on this
# machine: KEYS random SETs (16-byte keys, VALUE-byte values; `heapgrid bench` puts keys of the
# key space in random order, `redis-benchmark -r` likewise), then REWRITE_SECS of random
# overwrites, then IDLE_SECS idle (heapgrid checkpoints every 10 s).
#  - heapgrid (`--fsync every:1000`, the table with SHARDS shards): VmRSS, RssAnon and RssFile
#    of the server from /proc, the heaps' resident bytes (`heapgrid stats`, by mincore), heap
#    file bytes, op-log bytes, and the data directory's size on disk (du);
#  - Redis 7 (no persistence): used_memory and its RSS.
# All per key.
#
#   bash benches/memory.sh
#   KEYS=1000000 VALUE=100 REWRITE_SECS=10 IDLE_SECS=35 SHARDS=2 bash benches/memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."

KEYS="${KEYS:-1000000}"
VALUE="${VALUE:-100}"
REWRITE_SECS="${REWRITE_SECS:-10}"
IDLE_SECS="${IDLE_SECS:-35}"
SHARDS="${SHARDS:-2}"
CLIENTS=16
source benches/lib-redis.sh

per_key() { python3 -c "print(round($1 / $KEYS))"; }
status_kb() { awk -v f="$2:" '$1 == f {print $2 * 1024}' "/proc/$1/status"; }

start_heapgrid every:1000
"$HG" eval --addr "$HG_ADDR" create bench "$SHARDS" >/dev/null
"$HG" bench --addr "$HG_ADDR" --table bench --connections "$CLIENTS" --keys "$KEYS" --value-bytes "$VALUE" \
  --reads 0 --seconds 0.01 --preload >/dev/null
"$HG" bench --addr "$HG_ADDR" --table bench --connections "$CLIENTS" --keys "$KEYS" --value-bytes "$VALUE" \
  --reads 0 --seconds "$REWRITE_SECS" >/dev/null
# Freed pages become free over the checkpoints after the last write (one every 10 s), and
# online compaction (one step per checkpoint) empties the file's tail.
sleep "$IDLE_SECS"
stats=$("$HG" stats --addr "$HG_ADDR")
hg_keys=$(python3 -c 'import json,sys; s=json.load(sys.stdin); print(sum(sh["entries"] for c in s["collections"] if c["name"]=="bench" for sh in c["shards"]))' <<< "$stats")
field() { python3 -c "import json,sys; s=json.load(sys.stdin); print(sum(sh['$1'] for c in s['collections'] if c['name']=='bench' for sh in c['shards']))" <<< "$stats"; }
hg_rss=$(status_kb "$HG_PID" VmRSS); hg_anon=$(status_kb "$HG_PID" RssAnon); hg_file=$(status_kb "$HG_PID" RssFile)
hg_resident=$(field resident_bytes); hg_heap=$(field file_bytes); hg_log=$(field log_bytes)
hg_free=$(field free_pages); hg_held=$(field held_pages); hg_pages=$(field pages)
hg_du=$(du -sb "$HG_DIR" | awk '{print $1}')
# Open time: a clean stop (SIGTERM checkpoints), then a restart on the same directory, timed
# from the spawn to the first answer of `heapgrid stats` (every shard open).
kill -TERM "$HG_PID"; wait "$HG_PID" 2>/dev/null || true
t0=$(date +%s.%N)
"$HG" serve --listen 127.0.0.1:0 --data "$HG_DIR" --fsync every:1000 > "$work/hg2.out" 2>/dev/null &
pids+=($!); HG_PID=$!
for _ in $(seq 400); do grep -q "listening on" "$work/hg2.out" 2>/dev/null && break; sleep 0.005; done
HG_ADDR=$(sed -n 's/heapgrid listening on //p' "$work/hg2.out")
until "$HG" stats --addr "$HG_ADDR" >/dev/null 2>&1; do sleep 0.005; done
t1=$(date +%s.%N)
open_ms=$(python3 -c "print('%.0f' % (($t1 - $t0) * 1000))")
kill "$HG_PID"

start_redis off
redis-benchmark -p "$REDIS_PORT" -t set -n "$KEYS" -c "$CLIENTS" -d "$VALUE" -r "$KEYS" -q >/dev/null 2>&1
redis-benchmark -p "$REDIS_PORT" -t set -n "$((KEYS * 2))" -c "$CLIENTS" -d "$VALUE" -r "$KEYS" -q >/dev/null 2>&1
rd_keys=$(redis-cli -p "$REDIS_PORT" dbsize)
rd_mem=$(redis-cli -p "$REDIS_PORT" info memory | awk -F: '/^used_memory:/ {print $2+0}')
rd_rss=$(status_kb "$REDIS_PID" VmRSS)

echo "## bytes per key, $(date -u +%FT%TZ), $(nproc) cores: heapgrid $hg_keys keys ($SHARDS shards, every:1000), Redis $rd_keys keys; ${VALUE}-byte values"
echo
echo "| figure | heapgrid B/key | Redis B/key | heapgrid / Redis |"
echo "|---|---:|---:|---:|"
echo "| resident (heapgrid VmRSS; Redis RSS) | $(per_key "$hg_rss") | $(per_key "$rd_rss") | $(ratio "$hg_rss" "$rd_rss") |"
echo "| heapgrid RssAnon / Redis used_memory | $(per_key "$hg_anon") | $(per_key "$rd_mem") | $(ratio "$hg_anon" "$rd_mem") |"
echo "| heapgrid RssFile (heap pages mapped) | $(per_key "$hg_file") | | |"
echo "| heapgrid heap pages in the page cache (mincore) | $(per_key "$hg_resident") | | |"
echo "| heapgrid heap files | $(per_key "$hg_heap") | | |"
echo "| heapgrid op log | $(per_key "$hg_log") | | |"
echo "| heapgrid data directory on disk (du) | $(per_key "$hg_du") | | |"
echo
echo "heapgrid pages: $hg_pages in use, $hg_free free, $hg_held held; clean restart to the first answer: $open_ms ms (process start included)"
