#!/usr/bin/env bash
# Side-by-side: `heapgrid bench` against `heapgrid serve`, and `redis-benchmark` against
# `redis-server`, with the same parameters, in one run on this machine. Then redis-benchmark
# drives both servers (heapgrid over RESP, `serve --resp-listen`): the same load generator, so
# the rows `heapgrid (RESP)` compare exactly; it adds EVAL of a read and of an increment (a
# Python snippet against Redis' Lua script). For every case and
# server it records throughput, p99 latency, the server's CPU per request (from
# /proc/<pid>/stat, which a co-located load generator cannot distort) and the load generator's
# own CPU per request (benches/measure.py), and prints markdown tables with heapgrid / Redis
# ratios. Installs Debian's redis-server and redis-tools if missing.
#
#   bash benches/compare-redis.sh            # default: 1M key space, 100-byte values, 50 clients
#   SECONDS_PER_CASE=10 KEYS=1000000 bash benches/compare-redis.sh
#   HG_BEFORE=/path/to/old/heapgrid bash benches/compare-redis.sh   # also measure another build
set -euo pipefail
cd "$(dirname "$0")/.."

# redis-benchmark counts requests, heapgrid bench counts seconds: size Redis' runs to about SECS.
REQS="${REQS:-300000}"
REQS_DURABLE="${REQS_DURABLE:-50000}"

source benches/lib-redis.sh

results="$work/results.jsonl"
measure() { # $1 = label, $2 = case, $3 = server pid, then measure.py's arguments
  local label=$1 case=$2 pid=$3; shift 3
  python3 benches/measure.py --pid "$pid" "$@" |
    python3 -c 'import json,sys; r=json.load(sys.stdin); r["server"]=sys.argv[1]; r["case"]=sys.argv[2]; print(json.dumps(r))' \
      "$label" "$case" >> "$results"
}

# Every heapgrid build is driven by the current build's load generator, so only the server differs.
LOADGEN="$HG"
hg_case() { # $1 = label, $2 = case, $3 = reads percent, $4 = pipeline
  measure "$1" "$2" "$HG_PID" --kind heapgrid -- "$LOADGEN" bench --addr "$HG_ADDR" --connections "$CLIENTS" \
    --pipeline "$4" --keys "$KEYS" --value-bytes "$VALUE" --reads "$3" --seconds "$SECS" --json
}

redis_case() { # $1 = case, $2 = test (set|get), $3 = pipeline, $4 = requests
  measure redis "$1" "$REDIS_PID" --kind redis --requests "$4" -- redis-benchmark -p "$REDIS_PORT" -t "$2" \
    -n "$4" -c "$CLIENTS" -P "$3" -d "$VALUE" -r "$KEYS" --csv
}

cases=("SET, 1 in flight|0|1" "GET, 1 in flight|100|1" "SET, 16 in flight|0|16" "GET, 16 in flight|100|16")

# redis-benchmark against either server: $1 = label, $2 = case, $3 = pid, $4 = port, then its test.
REQS_EVAL="${REQS_EVAL:-100000}"
bench_case() {
  local label=$1 case=$2 pid=$3 port=$4 n=$REQS; shift 4
  [ "$1" = eval ] && n=$REQS_EVAL
  measure "$label" "$case" "$pid" --kind redis --requests "$n" -- redis-benchmark -p "$port" -n "$n" -c "$CLIENTS" \
    -d "$VALUE" -r "$KEYS" --csv "$@"
}
# The same work in each server's script language (KEYS[1] / keys[0]; counters under `ctr:`).
RD_EVAL_READ="return redis.call('GET', KEYS[1])"
RD_EVAL_INCR="return redis.call('INCR', KEYS[1])"
HG_EVAL_READ="redis.get(keys[0])"
HG_EVAL_INCR=$'n = redis.get(keys[0], 0) + 1\nredis[keys[0]] = n\nn'
resp_cases() { # $1 = label, $2 = pid, $3 = port, $4 = read script, $5 = increment script, $6 = also SET/GET
  if [ "$6" = yes ]; then
    for p in 1 16; do
      bench_case "$1" "SET, $p in flight" "$2" "$3" -t set -P "$p"
      bench_case "$1" "GET, $p in flight" "$2" "$3" -t get -P "$p"
    done
  fi
  bench_case "$1" "EVAL read, 1 in flight" "$2" "$3" eval "$4" 1 "key:__rand_int__"
  bench_case "$1" "EVAL increment, 1 in flight" "$2" "$3" eval "$5" 1 "ctr:__rand_int__"
}

# Every heapgrid build to measure: the current one, and HG_BEFORE if given.
builds=("heapgrid|$HG")
[ -n "${HG_BEFORE:-}" ] && builds+=("heapgrid-before|$HG_BEFORE")

echo "## heapgrid vs Redis, $(date -u +%FT%TZ), $(nproc) cores, ${CLIENTS} clients, ${VALUE}-byte values, ${KEYS} key space"
echo

start_redis off
redis-benchmark -p "$REDIS_PORT" -t set -n "$KEYS" -c "$CLIENTS" -P 16 -d "$VALUE" -r "$KEYS" -q >/dev/null 2>&1 || true
for c in "${cases[@]}"; do
  IFS='|' read -r name reads p <<< "$c"
  t=set; [ "$reads" = 100 ] && t=get
  redis_case "$name" "$t" "$p" "$REQS"
done
# (Redis' SET/GET rows above are already redis-benchmark's.)
resp_cases redis "$REDIS_PID" "$REDIS_PORT" "$RD_EVAL_READ" "$RD_EVAL_INCR" no
rd_mem=$(redis-cli -p "$REDIS_PORT" info memory | awk -F: '/^used_memory:/ {print $2+0}')
rd_keys=$(redis-cli -p "$REDIS_PORT" dbsize)
kill "$REDIS_PID"; wait "$REDIS_PID" 2>/dev/null || true

for b in "${builds[@]}"; do
  IFS='|' read -r label bin <<< "$b"
  HG_SAVED=$HG; HG=$bin
  start_heapgrid every:1000
  # Preload so GETs hit.
  "$LOADGEN" bench --addr "$HG_ADDR" --connections "$CLIENTS" --keys "$KEYS" --value-bytes "$VALUE" --reads 0 \
    --seconds 0.01 --preload >/dev/null
  for c in "${cases[@]}"; do
    IFS='|' read -r name reads p <<< "$c"
    hg_case "$label" "$name" "$reads" "$p"
  done
  if [ "$label" = heapgrid ]; then
    hg_rss=$(awk '/VmRSS/ {print $2 * 1024}' "/proc/$HG_PID/status")
    # Restart holding the keys: time until the first request is answered.
    kill "$HG_PID"; wait "$HG_PID" 2>/dev/null || true
    t0=$(date +%s%N)
    "$HG" serve --listen 127.0.0.1:0 --data "$HG_DIR" > "$work/hg.out" 2>/dev/null &
    pids+=($!); HG_PID=$!
    for _ in $(seq 2000); do grep -q "listening on" "$work/hg.out" 2>/dev/null && break; sleep 0.005; done
    HG_ADDR=$(sed -n 's/heapgrid listening on //p' "$work/hg.out")
    "$LOADGEN" eval --addr "$HG_ADDR" count bench >/dev/null
    restart_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  fi
  kill "$HG_PID"; wait "$HG_PID" 2>/dev/null || true
  HG=$HG_SAVED
done

# redis-benchmark driving heapgrid over RESP (this build; a fresh data directory).
resp_port=$(free_port)
HG_SERVE_FLAGS_SAVED="${HG_SERVE_FLAGS:-}"
HG_SERVE_FLAGS="${HG_SERVE_FLAGS:-} --resp-listen 127.0.0.1:$resp_port"
start_heapgrid every:1000
HG_SERVE_FLAGS=$HG_SERVE_FLAGS_SAVED
# Preloaded as Redis was, so GETs hit as often.
redis-benchmark -p "$resp_port" -t set -n "$KEYS" -c "$CLIENTS" -P 16 -d "$VALUE" -r "$KEYS" -q >/dev/null 2>&1 || true
resp_cases "heapgrid (RESP)" "$HG_PID" "$resp_port" "$HG_EVAL_READ" "$HG_EVAL_INCR" yes
kill "$HG_PID"; wait "$HG_PID" 2>/dev/null || true

# Durable SET: fsync always vs appendfsync always.
start_redis always
for p in 1 16; do redis_case "durable SET, $p in flight" set "$p" "$REQS_DURABLE"; done
kill "$REDIS_PID"; wait "$REDIS_PID" 2>/dev/null || true
for b in "${builds[@]}"; do
  IFS='|' read -r label bin <<< "$b"
  HG_SAVED=$HG; HG=$bin
  start_heapgrid always
  HG=$HG_SAVED
  for p in 1 16; do hg_case "$label" "durable SET, $p in flight" 0 "$p"; done
  kill "$HG_PID"; wait "$HG_PID" 2>/dev/null || true
done

python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {(r["server"], r["case"]): r for r in rows}
cases = list(dict.fromkeys(r["case"] for r in rows))
builds = [s for s in dict.fromkeys(r["server"] for r in rows) if s != "redis"]
def f(x, d=1): return f"{x:.{d}f}"
print("| case | server | ops/s | p99 us | server CPU us/req | load generator CPU us/req | ops/s vs Redis | server CPU vs Redis |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for c in cases:
    rd = by.get(("redis", c))
    for s in builds + ["redis"]:
        r = by.get((s, c))
        if not r:
            continue
        tp = f(r["ops_per_sec"] / rd["ops_per_sec"], 2) + "x" if rd and s != "redis" else ""
        cpu = f(r["server_cpu_us_per_op"] / rd["server_cpu_us_per_op"], 2) + "x" if rd and s != "redis" else ""
        print(f"| {c} | {s} | {r['ops_per_sec']:.0f} | {r['p99_us']} | {f(r['server_cpu_us_per_op'], 2)} | {f(r['client_cpu_us_per_op'], 2)} | {tp} | {cpu} |")
PY
echo
echo "| memory per key after ${KEYS} keys (heapgrid RSS; Redis used_memory) | $((hg_rss / KEYS)) B | $((rd_mem / rd_keys)) B | $(ratio "$((hg_rss / KEYS))" "$((rd_mem / rd_keys))") |"
echo "| restart holding ${KEYS} keys to first answer (heapgrid: process start to first reply) | ${restart_ms} ms | | |"
