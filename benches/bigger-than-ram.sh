#!/usr/bin/env bash
# Data bigger than the memory budget (issue 16): KEYS values of VALUE bytes (about 4x BUDGET),
# loaded into a server run with `--memory-budget BUDGET`, then SECS of random GETs with a
# uniform key choice and with a 90/10 hot set (`heapgrid bench --hot 10`: every tenth key gets
# 90% of the gets). The same data directory is then served again without a budget, every heap
# page read into memory first, and the same GETs run: the all-resident baseline of the same run.
#
# Reported per workload: GETs/s and p99 under the budget and all resident (and their ratio),
# page-ins per second (major faults of the server, /proc/<pid>/stat), and the most memory the
# node held under the budget (RssAnon from /proc plus the heaps' resident pages, by mincore,
# sampled twice a second) against the budget. Each case runs WARM seconds before it is measured
# (the case before it left other pages in memory).
#
#   bash benches/bigger-than-ram.sh
#   BUDGET=256M KEYS=262144 VALUE=4000 SECS=20 bash benches/bigger-than-ram.sh
#   BUDGET_THREADS=32 bash benches/bigger-than-ram.sh   # runtime threads of the budget server
#                                   (default with a budget: 16, or 4 per core if more)
set -euo pipefail
cd "$(dirname "$0")/.."

BUDGET="${BUDGET:-256M}"
KEYS="${KEYS:-262144}"
VALUE="${VALUE:-4000}"
SECS="${SECS:-20}"
CLIENTS="${CLIENTS:-16}"
WARM="${WARM:-5}"
SHARDS="${SHARDS:-4}"

source benches/lib-common.sh
DATA="$work/data"

start() { # extra serve flags; $THREADS: the server's runtime threads (empty: the default)
  HEAPGRID_THREADS="${THREADS:-}" "$HG" serve --listen 127.0.0.1:0 --data "$DATA" --trusted-snippets "$@" > "$work/hg.out" 2>/dev/null &
  pids+=($!); HG_PID=$!
  for _ in $(seq 400); do grep -q "listening on" "$work/hg.out" 2>/dev/null && break; sleep 0.05; done
  HG_ADDR=$(sed -n 's/heapgrid listening on //p' "$work/hg.out")
}
stop() { kill "$HG_PID"; wait "$HG_PID" 2>/dev/null || true; }
majflt() { awk '{print $12}' "/proc/$HG_PID/stat"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$HG_PID/stat"; }
sys_ticks() { awk '{print $15}' "/proc/$HG_PID/stat"; }
clk_tck=$(getconf CLK_TCK)
anon() { awk '$1 == "RssAnon:" {print $2 * 1024}' "/proc/$HG_PID/status"; }
used() { # "RssAnon+heap-resident RssAnon"
  local r a; r=$("$HG" stats --addr "$HG_ADDR" | python3 -c 'import json,sys; print(json.load(sys.stdin)["heap_resident_bytes"])')
  a=$(anon)
  echo "$(( a + r )) $a"
}
budget_bytes=$(python3 -c "
s='$BUDGET'.upper().rstrip('B').rstrip('I'); u={'K':10,'M':20,'G':30,'T':40}
print(int(s[:-1]) << u[s[-1]] if s[-1] in u else int(s))")

# One workload: prints "ops/s p99_us page-ins/s max_used_bytes max_anon_bytes cpu_us_per_op
# kernel_percent".
run() { # $1 = --hot percent
  local f0 max=0 maxanon=0 u a
  # Warm up first (the previous case left other pages in memory), then measure.
  "$HG" bench --addr "$HG_ADDR" --table big --connections "$CLIENTS" --keys "$KEYS" \
    --value-bytes "$VALUE" --reads 100 --hot "$1" --seconds "$WARM" >/dev/null
  f0=$(majflt); c0=$(cpu_ticks); s0=$(sys_ticks)
  ( while sleep 0.5; do used; done ) > "$work/used" 2>/dev/null &
  local sampler=$!
  local rep; rep=$("$HG" bench --addr "$HG_ADDR" --table big --connections "$CLIENTS" --keys "$KEYS" \
    --value-bytes "$VALUE" --reads 100 --hot "$1" --seconds "$SECS" --json)
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null || true
  local f1 c1 s1; f1=$(majflt); c1=$(cpu_ticks); s1=$(sys_ticks)
  while read -r u a; do
    [ "$u" -gt "$max" ] && max=$u
    [ "$a" -gt "$maxanon" ] && maxanon=$a
  done < "$work/used"
  python3 -c "
import json; r=json.loads('''$rep''')
print('%.0f %d %.0f %d %d %.1f %.0f' % (r['ops_per_sec'], r['latency_us_p99'], ($f1 - $f0) / r['seconds'], $max, $maxanon,
  ($c1 - $c0) * 1e6 / $clk_tck / max(1, r['ops']), 100 * ($s1 - $s0) / max(1, $c1 - $c0)))"
}

THREADS="${BUDGET_THREADS:-}" start --memory-budget "$BUDGET"
t0=$(date +%s.%N)
"$HG" bench --addr "$HG_ADDR" --table big --shards "$SHARDS" --connections "$CLIENTS" --keys "$KEYS" \
  --value-bytes "$VALUE" --reads 100 --seconds 0.01 --preload >/dev/null
t1=$(date +%s.%N)
sleep 15 # a checkpoint makes the last written pages clean; the pager settles
data_bytes=$("$HG" stats --addr "$HG_ADDR" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(sum(sh["file_bytes"] for c in s["collections"] if c["name"]=="big" for sh in c["shards"]))')
read -r b_uni_ops b_uni_p99 b_uni_pin b_uni_max b_uni_anon b_uni_cpu b_uni_sys <<< "$(run 0)"
read -r b_hot_ops b_hot_p99 b_hot_pin b_hot_max b_hot_anon b_hot_cpu b_hot_sys <<< "$(run 10)"
dropped=$("$HG" stats --addr "$HG_ADDR" | python3 -c 'import json,sys; print(json.load(sys.stdin)["memory_budget"]["dropped_bytes"])')
stop

start
cat "$DATA"/tables/*/*.heap > /dev/null # every page in memory: the all-resident baseline
read -r r_uni_ops r_uni_p99 r_uni_pin _ _ r_uni_cpu r_uni_sys <<< "$(run 0)"
read -r r_hot_ops r_hot_p99 r_hot_pin _ _ r_hot_cpu r_hot_sys <<< "$(run 10)"
stop

mib() { python3 -c "print('%.0f MiB' % ($1 / 1048576))"; }
ratio() { python3 -c "print(f'{$1/$2:.2f}x')"; }
echo "## bigger than the budget, $(date -u +%FT%TZ), $(nproc) cores: $KEYS keys of $VALUE B ($SHARDS shards), heap files $(mib "$data_bytes"), budget $BUDGET ($(ratio "$data_bytes" "$budget_bytes") of it), $CLIENTS connections, ${SECS}s per case"
echo
echo "load: $(python3 -c "print('%.1f s' % ($t1 - $t0))"); dropped by the pager over the run: $(mib "$dropped")"
echo
echo "| GETs | budget: ops/s | p99 µs | server CPU µs/GET | page-ins/s | most held (of the budget) | all resident: ops/s | p99 µs | server CPU µs/GET | budget / all resident |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
echo "| uniform | $b_uni_ops | $b_uni_p99 | $b_uni_cpu | $b_uni_pin | $(mib "$b_uni_max") ($(ratio "$b_uni_max" "$budget_bytes")) | $r_uni_ops | $r_uni_p99 | $r_uni_cpu | $(ratio "$b_uni_ops" "$r_uni_ops") |"
echo "| 90/10 hot set | $b_hot_ops | $b_hot_p99 | $b_hot_cpu | $b_hot_pin | $(mib "$b_hot_max") ($(ratio "$b_hot_max" "$budget_bytes")) | $r_hot_ops | $r_hot_p99 | $r_hot_cpu | $(ratio "$b_hot_ops" "$r_hot_ops") |"
echo
echo "(share of the server's CPU in the kernel: budget uniform ${b_uni_sys}%, hot ${b_hot_sys}%; all resident uniform ${r_uni_sys}%, hot ${r_hot_sys}%)"
echo "(most RssAnon under the budget: uniform $(mib "$b_uni_anon"), hot $(mib "$b_hot_anon"); all-resident page-ins/s: uniform $r_uni_pin, hot $r_hot_pin)"
