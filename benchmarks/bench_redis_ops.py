"""Redis operations per second that one instance costs at N vehicles reporting at 1 Hz.

Starts `realtime serve --redis ... --simulate N` on a Redis database of its
own, lets it settle, then measures for `--seconds`: the commands Redis itself
counted (INFO commandstats, the baseline: what the server really executed) and
the instance's own redis_operations_total. Prints one JSON object.
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
    a = p.parse_args()
    r = redis.Redis(db=a.db)
    # never flush what this benchmark did not write: claim an empty database
    if r.dbsize() or not r.set("realtime-bench:lock", os.getpid(), nx=True) or r.dbsize() != 1:
        sys.exit(f"bench_redis_ops: Redis database {a.db} is not empty; pass --db with an empty one")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "realtime", "serve", "--port", str(port),
                             "--redis", f"redis://127.0.0.1:6379/{a.db}", "--simulate", str(a.vehicles),
                             "--jwt-secret", "x" * 32, "--log-level", "warning"], cwd=ROOT)
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/health/live", timeout=1)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        time.sleep(a.settle)
        c0, o0, t0 = commands(r), own_ops(url), time.time()
        time.sleep(a.seconds)
        c1, o1, t1 = commands(r), own_ops(url), time.time()
        dt = t1 - t0
        print(json.dumps({
            "benchmark": "redis_ops_per_instance", "vehicles": a.vehicles, "report_hz": 1,
            "seconds": round(dt, 1),
            "redis_commands_per_s": round((c1 - c0) / dt),   # as Redis counted them (includes pipelines' commands)
            "instance_ops_per_s": round((o1 - o0) / dt),
            "commands_per_vehicle_update": round((c1 - c0) / dt / a.vehicles, 2),
            "keys": r.dbsize(),
        }))
    finally:
        proc.terminate()
        proc.wait(20)
        r.flushdb()


if __name__ == "__main__":
    main()
