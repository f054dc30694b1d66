#!/usr/bin/env bash
# Snippets against Redis EVAL, side by side in one run on this machine: snippets/s over TCP with
# CLIENTS connections (one request in flight each), cached and uncached, for a read
# (`t[key]`) and a read-modify-write (a counter), against
# `EVAL "return redis.call('GET', KEYS[1])" 1 key` and `EVAL "return redis.call('INCR', KEYS[1])"`.
# "Uncached" makes every request's source unique (heapgrid: a trailing comment; Redis: the same
# `-- __rand_int__` trick), so each one is compiled. Each case runs ROUNDS times, alternating the
# two servers; the table reports medians. Prints markdown with ratios (heapgrid / Redis).
#
#   bash benches/compare-redis-eval.sh                                    # sandboxed snippets
#   HG_SERVE_FLAGS=--trusted-snippets bash benches/compare-redis-eval.sh  # in-process snippets
# It also prints the sandbox workers' resident memory at the end (0 when trusted).
#   SECONDS_PER_CASE=5 KEYS=1000000 ROUNDS=3 bash benches/compare-redis-eval.sh
set -euo pipefail
cd "$(dirname "$0")/.."

REQS="${REQS:-200000}"
ROUNDS="${ROUNDS:-3}"

source benches/lib-redis.sh

# requests/s from redis-benchmark's CSV (the command name itself may contain commas).
csv_rps() { python3 -c 'import csv,sys; rows=list(csv.reader(sys.stdin)); print(rows[1][1])'; }


hg_eval() { # $1 = table, $2 = snippet, extra flags...
  local table=$1 src=$2; shift 2
  "$HG" bench --addr "$HG_ADDR" --table "$table" --connections "$CLIENTS" --keys "$KEYS" --seconds "$SECS" \
    --eval "$src" "$@" --json | python3 -c 'import json,sys; print("%.0f" % json.load(sys.stdin)["ops_per_sec"])'
}

redis_eval() { # $1 = script, $2 = key prefix
  redis-benchmark -p "$REDIS_PORT" -n "$REQS" -c "$CLIENTS" -r "$KEYS" --csv eval "$1" 1 "$2:__rand_int__" 2>/dev/null |
    csv_rps
}

redis_get() {
  redis-benchmark -p "$REDIS_PORT" -t get -n "$REQS" -c "$CLIENTS" -r "$KEYS" -d "$VALUE" --csv -q 2>/dev/null |
    csv_rps
}

echo "## snippets vs Redis EVAL, $(date -u +%FT%TZ), $(nproc) cores, ${CLIENTS} clients, ${VALUE}-byte values, ${KEYS} key space, median of ${ROUNDS}"
echo
echo "| case | heapgrid snippets/s | Redis EVAL/s | heapgrid / Redis |"
echo "|---|---:|---:|---:|"

start_redis off
start_heapgrid every:1000
"$HG" bench --addr "$HG_ADDR" --table bench --connections "$CLIENTS" --keys "$KEYS" --value-bytes "$VALUE" \
  --reads 0 --seconds 0.01 --preload >/dev/null
redis-benchmark -p "$REDIS_PORT" -t set -n "$KEYS" -c "$CLIENTS" -P 16 -d "$VALUE" -r "$KEYS" -q >/dev/null 2>&1 || true

GET_SCRIPT="return redis.call('GET', KEYS[1])"
INCR_SCRIPT="return redis.call('INCR', KEYS[1])"
RMW='n = counters.get(key, 0) + 1
counters[key] = n
n'
# case name | heapgrid table | snippet | heapgrid flags | Redis script | Redis key prefix
cases=(
  "plain GET (no snippet; context)|bench|-|-|GET|key"
  "read \`bench[key]\` in the key's shard, cached|bench|bench[key]||$GET_SCRIPT|key"
  "read \`bench[args]\` grid-scoped, cached|bench|bench[args]|--grid-scope|$GET_SCRIPT|key"
  "read-modify-write counter in the key's shard, cached|counters|$RMW||$INCR_SCRIPT|ctr"
  "read \`bench[key]\`, uncached (compiled per request)|bench|bench[key]|--uncached|$GET_SCRIPT -- __rand_int__|key"
  "read-modify-write counter, uncached|counters|$RMW|--uncached|$INCR_SCRIPT -- __rand_int__|ctr"
)
for c in "${cases[@]}"; do
  IFS='|' read -r name table src flags script prefix <<<"$c"
  hgs=(); rds=()
  for _ in $(seq "$ROUNDS"); do
    if [ "$src" = "-" ]; then
      hgs+=("$("$HG" bench --addr "$HG_ADDR" --table bench --connections "$CLIENTS" --keys "$KEYS" \
        --value-bytes "$VALUE" --reads 100 --seconds "$SECS" --json |
        python3 -c 'import json,sys; print("%.0f" % json.load(sys.stdin)["ops_per_sec"])')")
      rds+=("$(redis_get)")
    else
      # shellcheck disable=SC2086
      hgs+=("$(hg_eval "$table" "$src" $flags)")
      rds+=("$(redis_eval "$script" "$prefix")")
    fi
  done
  hg=$(median "${hgs[@]}"); rd=$(median "${rds[@]}")
  echo "| $name | $hg (${hgs[*]}) | $rd (${rds[*]}) | $(ratio "$hg" "$rd") |"
done
workers_rss=0
for p in /proc/[0-9]*; do
  [ "$(awk '{print $4}' "$p/stat" 2>/dev/null)" = "$HG_PID" ] || continue
  grep -q heapgrid-worker "$p/comm" 2>/dev/null || continue
  workers_rss=$((workers_rss + $(awk '/VmRSS/ {print $2 * 1024}' "$p/status")))
done
echo
echo "sandbox workers' resident memory after the run: $workers_rss bytes (server ${HG_SERVE_FLAGS:-sandboxed})"
