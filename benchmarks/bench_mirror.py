"""What a second worker costs per tick, in one process (issue 14 part 4).

Two hubs linked by the real Unix socket the workers use (realtime/mirror.py):
the owner applies the built-in simulator's batches and flushes a tick every
50 ms of simulated time; the follower takes each frame and runs its own tick
loop. No clients on either side, so what is timed is what a second worker
adds before it serves anyone:
  - `publish_us`: the owner making and sending a frame (Owner.publish);
  - `follower_apply_us`: the follower taking a frame into its core;
  - `follower_tick_us`: the follower's own tick over the copied rows.
The baseline, timed in the same run, is what one worker does per tick
anyway: apply the tick's batch and flush (`one_worker_us`; the owner's, its
publish taken out). `second_worker_over_one` is the three above over it.

    python benchmarks/bench_mirror.py [--vehicles 20000 --ticks 500 --warmup 100]

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time

import numpy as np

from realtime import config, mirror
from realtime._core import Core
from realtime.hub import Hub
from realtime.ingest.simulator import Fleet

TICK_S = 0.05


def hub(vehicles: int) -> Hub:
    s = config.Settings(jwt_secret="x" * 32, simulate=0)
    s.validate()
    return Hub(s, Core(vehicle_capacity=max(1024, vehicles + vehicles // 2), client_capacity=64))


def timed(obj, name: str, into: list, on: list) -> None:
    """Wrap obj.name so that each call's duration lands in `into` while on[0]."""
    f = getattr(obj, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            if on[0]:
                into.append(time.perf_counter() - t0)
    setattr(obj, name, wrapper)


async def run(vehicles: int, ticks: int, warmup: int) -> dict:
    path = os.path.join(tempfile.mkdtemp(prefix="bench-mirror-"), "owner.sock")
    owner_hub, follower_hub = hub(vehicles), hub(vehicles)

    async def sink(updates):   # forwarded HTTP ingest: none here
        pass

    owner = mirror.Owner(owner_hub, path, sink)
    owner_hub.owner = owner
    follower = mirror.Follower(follower_hub, path)
    follower_hub.follower = follower
    on = [False]
    t = {k: [] for k in ("publish", "flush", "oapply", "apply", "ftick")}
    timed(owner, "publish", t["publish"], on)
    timed(owner_hub, "apply", t["oapply"], on)
    timed(owner_hub, "flush", t["flush"], on)
    timed(follower, "apply", t["apply"], on)
    timed(follower_hub.core, "tick", t["ftick"], on)
    await owner.start()
    follower.start()
    follower_hub.start()
    try:
        deadline = time.monotonic() + 10
        while not follower.connected:
            if time.monotonic() > deadline:
                raise RuntimeError("the follower never linked")
            await asyncio.sleep(0.01)
        fleet = Fleet(vehicles)
        frames0 = rows0 = 0
        for i in range(warmup + ticks):
            r = fleet.step(TICK_S, int(1000 * TICK_S * i))
            if r is not None:
                batch, types, _ = r
                batch.vtype = np.array([owner_hub.core.vtype_code(v) for v in types], np.uint8)
                owner_hub.apply(batch)
            if i == warmup:
                on[0] = True
                frames0, rows0 = follower.frames, follower_hub.stats.mirrored_rows
            owner_hub.flush()
            await asyncio.sleep(0.005)   # the follower reads and ticks
        await asyncio.sleep(0.2)
        on[0] = False
        frames = follower.frames - frames0
        rows = follower_hub.stats.mirrored_rows - rows0
    finally:
        await follower.stop()
        await follower_hub.stop()
        await owner.stop()

    def per_tick(name):   # the follower may take two frames in one tick: totals per owner tick
        return sum(t[name]) / ticks * 1e6

    second = per_tick("publish") + per_tick("apply") + per_tick("ftick")
    one = per_tick("oapply") + per_tick("flush") - per_tick("publish")
    return {
        "benchmark": "mirror", "vehicles": vehicles, "ticks": ticks,
        "frames": frames, "rows_per_frame": round(rows / max(frames, 1)),
        # the follower's ticks in the window: one per frame, or fewer when
        # frames come faster than its tick loop wakes
        "follower_ticks": len(t["ftick"]),
        "one_worker_us": round(one),
        "publish_us": round(per_tick("publish")),
        "follower_apply_us": round(per_tick("apply")),
        "follower_tick_us": round(per_tick("ftick")),
        "second_worker_over_one": round(second / max(one, 1e-9), 3),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, python {platform.python_version()}",
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vehicles", type=int, default=20000)
    p.add_argument("--ticks", type=int, default=500)
    p.add_argument("--warmup", type=int, default=100, help="ticks before timing: the fleet's first reports")
    a = p.parse_args()
    print(json.dumps(asyncio.run(run(a.vehicles, a.ticks, a.warmup))))


if __name__ == "__main__":
    main()
