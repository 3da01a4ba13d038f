"""What `--workers N` costs before anyone connects (issue 14 part 4): the
CPU of each process of `realtime serve --simulate V --redis R` with no
clients, one worker against N, rounds alternating so that the machine's
drift falls on both. With N > 1 the last process is a follower: its CPU is
the fixed cost of a second worker (the owner's frames, its ticks, presence,
the event log's tail, its event loop).

The baseline is one worker's own CPU for the same fleet, measured in the
same rounds (`one_worker`). Each configuration gets a Redis of its own.
A second baseline, in the same rounds: a bare uvloop process that only wakes
`--wake-hz` times a second (a follower wakes about once per owner tick, ~13),
so that the follower's cost can be read against what waking alone costs
here (`bare_wakes`, `us_per_bare_wake`).

    python benchmarks/bench_idle.py [--vehicles 10000 --workers 2 --rounds 3 --seconds 20 --wake-hz 13]

Prints one JSON object: per round, the CPU-s/s of every process (supervisor
first, then multiprocessing's resource tracker, then the workers in the
order they were started), and the means of one worker, the owner and the
follower.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import bench_e2e as e2e
from bench_workers import Throwaway


def run(vehicles: int, workers: int, settle: float, seconds: float) -> list[float]:
    redis = Throwaway()
    port = e2e.free_port()
    extra = ("--redis", redis.url) + (("--workers", str(workers)) if workers > 1 else ())
    s = e2e.realtime(port, vehicles, extra)
    try:
        e2e.wait_port(port)
        time.sleep(settle)   # the fleet's first reports and, with followers, their whole-fleet copy
        c0, t0 = e2e.cpu_by_process(s.p.pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = e2e.cpu_by_process(s.p.pid), time.monotonic()
        if c0.keys() != c1.keys():
            raise RuntimeError("a process started or ended in the window")
        return [round((c1[p] - c0[p]) / (t1 - t0), 4) for p in c0]
    finally:
        s.stop()
        redis.stop()


BARE = """
import asyncio, sys, time, uvloop
async def main(hz, seconds):
    await asyncio.sleep(1.0)
    c0, t0 = time.process_time(), time.monotonic()
    while time.monotonic() - t0 < seconds:
        await asyncio.sleep(1.0 / hz)
    print((time.process_time() - c0) / (time.monotonic() - t0))
uvloop.run(main(float(sys.argv[1]), float(sys.argv[2])))
"""


def bare_wakes(hz: float, seconds: float) -> float:
    """CPU-s/s of a process that does nothing but wake `hz` times a second."""
    out = subprocess.run([sys.executable, "-c", BARE, str(hz), str(seconds)], capture_output=True,
                         text=True, check=True).stdout
    return round(float(out), 5)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vehicles", type=int, default=10000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--settle", type=float, default=15.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--wake-hz", type=float, default=13.0)
    a = p.parse_args()
    one, many, bare = [], [], []
    for rnd in range(a.rounds):
        bare.append(bare_wakes(a.wake_hz, a.seconds))
        e2e.log(f"round {rnd + 1}, a bare process waking {a.wake_hz:g} times a second: {bare[-1]}")
        for n in ((1, a.workers) if rnd % 2 == 0 else (a.workers, 1)):
            r = run(a.vehicles, n, a.settle, a.seconds)
            e2e.log(f"round {rnd + 1}, {n} worker(s): {r}")
            (one if n == 1 else many).append(r)
    mean = lambda xs: round(statistics.mean(xs), 4)   # noqa: E731
    print(json.dumps({
        "benchmark": "idle", "vehicles": a.vehicles, "workers": a.workers, "rounds": a.rounds,
        "seconds": a.seconds, "one_worker_runs": one, "workers_runs": many,
        "one_worker": mean([r[0] for r in one]),
        # supervisor, resource tracker, then worker 0 (the owner), then the followers
        "owner": mean([r[2] for r in many]),
        "follower": mean([r[-1] for r in many]),
        "all_workers": mean([sum(r) for r in many]),
        "wake_hz": a.wake_hz, "bare_wakes": round(statistics.mean(bare), 5),
        "us_per_bare_wake": round(statistics.mean(bare) / a.wake_hz * 1e6, 1),
    }))


if __name__ == "__main__":
    sys.exit(main())
