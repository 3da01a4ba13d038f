"""(i) `--workers 2` against one worker, with the same-run baseline of what a
second process costs on this machine (issue 14 part 4).

Scenario (a) (the built-in simulator at 1 Hz, ~1% viewports) served by
realtime with `--redis` and one worker, then two; and the raw server
(raw_server.py: pre-encoded frames, one write per client per tick) paced at
the same 50 ms tick with the same clients and messages per frame, in one
process, then two sharing the port (SO_REUSEPORT, as the workers do). The
four runs repeat `--rounds` times, in alternating order, so that the drift
of this shared machine falls on both sides.

The figure is deliveries per server CPU-second (the supervisor and its
workers summed), two processes over one:
  - `realtime_workers_ratio`: what `--workers 2` keeps of one worker's;
  - `raw_procs_ratio`: the same for raw writes, the floor that the machine
    itself sets (two busy processes and the load generators on two cores).

    python benchmarks/bench_workers.py --vehicles 20000 --clients 1000 --seconds 10 --rounds 3 \\
        --settle 20 --redis redis://127.0.0.1:6379/12

Prints one JSON object. The Redis database given is flushed before each run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from urllib.parse import urlparse

import bench_e2e as e2e


def flush(redis_url: str) -> None:
    u = urlparse(redis_url)
    db = (u.path or "/0").lstrip("/") or "0"
    subprocess.run(["redis-cli", "-h", u.hostname or "127.0.0.1", "-p", str(u.port or 6379), "-n", db,
                    "flushdb"], check=True, stdout=subprocess.DEVNULL)


def keep(r: dict) -> dict:
    return {k: r.get(k) for k in ("connected", "deliveries_per_s", "server_cpu_s_per_s", "deliveries_per_cpu_s",
                                  "p99_ms", "server_p99_ms")}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vehicles", type=int, default=20000)
    # 1,000: at 2,000 one worker and the two load generators fill both cores,
    # and a busy worker's clients count more deliveries for the same load
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--rounds", type=int, default=3)
    # the first ~15 s after a start are not the steady state: 20k vehicles'
    # first reports (every rich field, new Redis hashes) and, with two
    # workers, the follower's whole-fleet copy cost up to 0.3 CPU-s/s more;
    # measured inside that window the ratio weighs a one-off start-up cost
    p.add_argument("--settle", type=float, default=20.0,
                   help="seconds from the server's start to the clients' connecting")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/12",
                   help="a database the benchmark may flush (--workers > 1 needs Redis)")
    a = p.parse_args()
    V, C, T = a.vehicles, a.clients, a.seconds
    runs: dict[str, list[dict]] = {"realtime_1": [], "realtime_2": [], "raw_1": [], "raw_2": []}
    per_frame = None
    for rnd in range(a.rounds):
        order = (1, 2) if rnd % 2 == 0 else (2, 1)
        for n in order:
            flush(a.redis)
            extra = ("--redis", a.redis) + (("--workers", str(n)) if n > 1 else ())
            e2e.log(f"(i) round {rnd + 1}: realtime, {n} worker(s), {V} vehicles, {C} clients")
            r = e2e.scenario_a(V, C, T, extra=extra, settle=a.settle)
            runs[f"realtime_{n}"].append(keep(r))
            e2e.log(json.dumps(runs[f"realtime_{n}"][-1]))
            if per_frame is None:
                per_frame = max(1, round(r["deliveries_per_s"] / max(r["frames_per_s"], 1)))
        for n in order:
            e2e.log(f"(i) round {rnd + 1}: raw server, {n} process(es), {per_frame} messages per frame")
            r = e2e.raw_limit(C, T, per_frame, tick_ms=e2e.TICK_S * 1000, procs=n)
            runs[f"raw_{n}"].append(keep(r))
            e2e.log(json.dumps(runs[f"raw_{n}"][-1]))

    def median(name):
        return statistics.median(r["deliveries_per_cpu_s"] for r in runs[name])

    out = {"benchmark": "workers", "vehicles": V, "clients": C, "seconds": T, "rounds": a.rounds,
           "settle_s": a.settle,
           "messages_per_frame": per_frame, "runs": runs,
           "realtime_workers_ratio": round(median("realtime_2") / max(median("realtime_1"), 1), 3),
           "raw_procs_ratio": round(median("raw_2") / max(median("raw_1"), 1), 3),
           # each round's own ratio, to show the spread
           "realtime_workers_ratio_by_round": [round(b["deliveries_per_cpu_s"] / max(o["deliveries_per_cpu_s"], 1), 3)
                                               for o, b in zip(runs["realtime_1"], runs["realtime_2"])],
           "raw_procs_ratio_by_round": [round(b["deliveries_per_cpu_s"] / max(o["deliveries_per_cpu_s"], 1), 3)
                                        for o, b in zip(runs["raw_1"], runs["raw_2"])]}
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
