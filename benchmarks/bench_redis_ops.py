"""Redis operations per second that instances cost at N vehicles reporting at 1 Hz.

Starts `realtime serve --redis ... --simulate N` (the writer) and `--readers`
more instances without a fleet of their own (they get it through Redis) on a
Redis database of its own, lets them settle, then measures for `--seconds`:
the commands Redis itself counted (INFO commandstats, the baseline: what the
server really executed), the writer's own redis_operations_total and the
readers' average. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(r) -> int:
    return sum(v["calls"] for k, v in r.info("commandstats").items())


def own_ops(url) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    m = re.search(r"^redis_operations_total (\S+)", text, re.M)
    return float(m.group(1)) if m else 0.0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vehicles", type=int, default=20000)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--settle", type=float, default=8)
    p.add_argument("--db", type=int, default=14)
    p.add_argument("--readers", type=int, default=1, help="instances besides the writer")
    a = p.parse_args()
    r = redis.Redis(db=a.db)
    # never flush what this benchmark did not write: claim an empty database
    if r.dbsize() or not r.set("realtime-bench:lock", os.getpid(), nx=True) or r.dbsize() != 1:
        sys.exit(f"bench_redis_ops: Redis database {a.db} is not empty; pass --db with an empty one")
    def serve(*extra):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "realtime", "serve", "--port", str(port),
                                 "--redis", f"redis://127.0.0.1:6379/{a.db}", "--jwt-secret", "x" * 32,
                                 "--log-level", "warning", *extra], cwd=ROOT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/health/live", timeout=1)
                return proc, url
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)

    procs = []
    try:
        procs.append(serve("--simulate", str(a.vehicles)))
        for _ in range(a.readers):
            procs.append(serve("--simulate", "0"))
        time.sleep(a.settle)
        urls = [u for _, u in procs]
        c0, o0, t0 = commands(r), [own_ops(u) for u in urls], time.time()
        time.sleep(a.seconds)
        c1, o1, t1 = commands(r), [own_ops(u) for u in urls], time.time()
        dt = t1 - t0
        per = [(b - a_) / dt for a_, b in zip(o0, o1)]
        print(json.dumps({
            "benchmark": "redis_ops_per_instance", "vehicles": a.vehicles, "report_hz": 1,
            "instances": len(procs), "seconds": round(dt, 1),
            "redis_commands_per_s": round((c1 - c0) / dt),   # as Redis counted them (includes pipelines' commands)
            "writer_ops_per_s": round(per[0]),
            "reader_ops_per_s": round(sum(per[1:]) / len(per[1:])) if per[1:] else None,
            "commands_per_vehicle_update": round((c1 - c0) / dt / a.vehicles, 2),
            "keys": r.dbsize(),
        }))
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            proc.wait(20)
        r.flushdb()


if __name__ == "__main__":
    main()
