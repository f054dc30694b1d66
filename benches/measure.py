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
import json
import os
import resource
import subprocess
import sys
import time

TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        # The command name may contain spaces: fields after the closing parenthesis.
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / TICKS


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
        lines = [l for l in out.splitlines() if l.strip()]
        head = [h.strip('"') for h in lines[0].split(",")]
        row = [v.strip('"') for v in lines[1].split(",")]
        rec = dict(zip(head, row))
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
