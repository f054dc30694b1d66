# Shared by compare-redis.sh and compare-redis-eval.sh: the common parameters, installs Redis if
# missing, builds heapgrid, and starts and stops both servers. Source it from the repository root.

KEYS="${KEYS:-1000000}"
VALUE="${VALUE:-100}"
CLIENTS="${CLIENTS:-50}"
SECS="${SECONDS_PER_CASE:-5}"

if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools
fi
source benches/lib-common.sh

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_redis() { # $1 = appendfsync setting or "off"
  local port; port=$(free_port)
  local aof="no"; [ "$1" != "off" ] && aof="yes"
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly "$aof" --appendfsync "${1/off/everysec}" \
    --dir "$work" --daemonize no >/dev/null 2>&1 &
  pids+=($!); REDIS_PID=$!; REDIS_PORT=$port
  for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && return; sleep 0.05; done
  echo "redis did not start" >&2; exit 1
}

start_heapgrid() { # $1 = default fsync policy
  local dir="$work/hg-$RANDOM"
  # shellcheck disable=SC2086 # HG_SERVE_FLAGS: extra serve flags, e.g. --trusted-snippets
  # HG_THREADS: the server's runtime threads (HEAPGRID_THREADS; empty: tokio's default).
  HEAPGRID_THREADS="${HG_THREADS:-}" "$HG" serve --listen 127.0.0.1:0 --data "$dir" --fsync "$1" ${HG_SERVE_FLAGS:-} > "$work/hg.out" 2>/dev/null &
  pids+=($!); HG_PID=$!; HG_DIR=$dir
  for _ in $(seq 200); do grep -q "listening on" "$work/hg.out" 2>/dev/null && break; sleep 0.05; done
  HG_ADDR=$(sed -n 's/heapgrid listening on //p' "$work/hg.out")
}

redis_rps() { # $1 = test (set|get), $2 = pipeline
  redis-benchmark -p "$REDIS_PORT" -t "$1" -n "$REQS" -c "$CLIENTS" -P "$2" -d "$VALUE" -r "$KEYS" --csv -q 2>/dev/null |
    awk -F, 'NR>1 {gsub(/"/,"",$2); print $2; exit}'
}

hg_rps() { # $1 = reads percent, $2 = pipeline
  "$HG" bench --addr "$HG_ADDR" --connections "$CLIENTS" --pipeline "$2" --keys "$KEYS" --value-bytes "$VALUE" \
    --reads "$1" --seconds "$SECS" --json | python3 -c 'import json,sys; r=json.load(sys.stdin); print("%.0f %d" % (r["ops_per_sec"], r["latency_us_p99"]))'
}

ratio() { python3 -c "print(f'{$1/$2:.2f}x')"; }

# Medians of figures, a server's CPU ticks from /proc/<pid>/stat (user + system) and µs per
# operation between two readings, and a field of a `heapgrid bench --json` report.
median() { python3 -c 'import sys,statistics; print("%.0f" % statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }
median1() { python3 -c 'import sys,statistics; print("%.1f" % statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
clk_tck=$(getconf CLK_TCK)
us_per_op() { python3 -c "print('%.1f' % (($2 - $1) * 1e6 / $clk_tck / max(1, $3)))"; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
