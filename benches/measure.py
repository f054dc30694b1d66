#!/usr/bin/env python3
"""Runs one load-generator command against a server and measures, besides what the command
prints, the CPU the *server* spent meanwhile (utime + stime of its /proc/<pid>/stat) and the CPU
the *load generator* spent (its rusage as a child of this script). A co-located load generator
shares the cores with the server, so throughput alone understates the server; CPU per request
does not depend on who else runs.

    measure.py --pid SERVER_PID --kind heapgrid|redis --requests N -- COMMAND...

Prints one JSON object: ops, seconds, ops_per_sec, p99_us, server_cpu_us_per_op,
client_cpu_us_per_op. `--kind` says how to read the command's output: `heapgrid bench --json`,
or `redis-benchmark --csv` (which needs `--requests`, the -n it was given).
"""
import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time

TICKS = os.sysconf("SC_CLK_TCK")


def stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        # The command name may contain spaces: fields after the closing parenthesis.
        return f.read().rsplit(")", 1)[1].split()


def proc_cpu_s(pid):
    """CPU of the server and of its child processes (heapgrid's sandbox workers run snippets):
    its own utime + stime, its reaped children's cutime + cstime, and the utime + stime of the
    children alive now."""
    fields = stat_fields(pid)
    # utime, stime, cutime, cstime are fields 14-17 of stat(5); fields[0] here is field 3.
    ticks = sum(int(x) for x in fields[11:15])
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == pid:
            continue
        try:
            c = stat_fields(int(d))
        except OSError:
            continue
        if int(c[1]) == pid:
            ticks += int(c[11]) + int(c[12])
    return ticks / TICKS


def children_cpu_s():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--kind", choices=["heapgrid", "redis"], required=True)
    ap.add_argument("--requests", type=int, default=0)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    s0, c0, t0 = proc_cpu_s(a.pid), children_cpu_s(), time.monotonic()
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
    s1, c1, t1 = proc_cpu_s(a.pid), children_cpu_s(), time.monotonic()
    if a.kind == "heapgrid":
        r = json.loads(out)
        ops, secs, p99 = r["ops"], r["seconds"], r["latency_us_p99"]
    else:
        # redis-benchmark --csv: a header line, then "test","rps","avg_latency_ms",...,"p99_latency_ms",...
        # (csv: the test's name is the command itself for `redis-benchmark ... eval "..."`.)
        rows = list(csv.reader(l for l in out.splitlines() if l.strip()))
        rec = dict(zip(rows[0], rows[1]))
        ops = a.requests
        secs = ops / float(rec["rps"])
        p99 = round(float(rec.get("p99_latency_ms", "nan")) * 1000)
    print(json.dumps({
        "ops": ops,
        "seconds": secs,
        "ops_per_sec": ops / secs,
        "p99_us": p99,
        "server_cpu_us_per_op": (s1 - s0) * 1e6 / ops,
        "client_cpu_us_per_op": (c1 - c0) * 1e6 / ops,
        "wall_s": t1 - t0,
    }))


if __name__ == "__main__":
    sys.exit(main())
