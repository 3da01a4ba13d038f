"""What a worker's (re)start costs the owner worker's loop: the whole-fleet
copy (realtime/mirror.py, Owner._copy) at a given fleet size.

An owner core holds `--vehicles` of the built-in simulator's vehicles (with
their drivers and assignments); a plain Unix-socket reader in another thread
stands in for the follower, reading and dropping the frames. While the copy
goes, a task in the owner's loop sleeps 1 ms at a time and notes the gaps: the
longest is how long the owner's clients, Kafka and Redis writer waited.

The baseline, in the same run: the same copy made all at once (the slices
written back to back without yielding or waiting for the reader), which is
what the owner did before. Figures:
  - `copy_s`, `longest_hold_ms`: in slices, as served;
  - `at_once_copy_s`, `at_once_longest_hold_ms`: the baseline;
  - `hold_ratio`: the first hold over the second.

    python benchmarks/bench_copy.py [--vehicles 200000]

Sets the worker's GC thresholds (realtime/worker.py) as the server does.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import socket
import tempfile
import threading
import time

import numpy as np

import bench_mirror as bm
from realtime import mirror
from realtime.ingest.simulator import Fleet


def fleet_hub(vehicles: int):
    h = bm.hub(vehicles)
    fleet = Fleet(vehicles)
    for i in range(40):   # 2 s of reports: every vehicle has reported
        r = fleet.step(0.05, 50 * i)
        if r is not None:
            batch, types, _ = r
            batch.vtype = np.array([h.core.vtype_code(v) for v in types], np.uint8)
            h.apply(batch)
    h.flush()
    return h


class _AtOnce:
    """A writer whose drain never waits: with the loop's sleep(0) taken out
    (below), the copy is made in one go."""
    def __init__(self, w):
        self._w = w

    def __getattr__(self, name):
        return getattr(self._w, name)

    async def drain(self):
        return None


async def one_copy(h, at_once: bool) -> dict:
    path = os.path.join(tempfile.mkdtemp(prefix="bench-copy-"), "owner.sock")
    owner = mirror.Owner(h, path, None)
    h.owner = owner
    h.core.rich_log = {}
    await owner.start()
    if at_once:
        copy = owner._copy

        async def whole(w, partial=False):
            real_sleep = mirror.asyncio.sleep

            async def no_yield(_):
                return None
            mirror.asyncio.sleep = no_yield
            try:
                await copy(_AtOnce(w), partial)
            finally:
                mirror.asyncio.sleep = real_sleep
        owner._copy = whole
    done = threading.Event()
    received = [0]

    def reader():
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(mirror._frame({"v": mirror.VERSION}))
        head = b""
        while not done.is_set():   # frame by frame, until the one that ends the copy
            while len(head) < 4:
                head += s.recv(4 - len(head))
            (n,) = mirror.HEADER.unpack(head)
            body = bytearray()
            while len(body) < n:
                body += s.recv(min(n - len(body), 1 << 20))
            received[0] += 4 + n
            head = b""
            if body.endswith(b"\xa1e\x01"):   # the last key of the last slice (Owner._copy)
                done.set()
        s.close()
    t0 = time.perf_counter()
    threading.Thread(target=reader, daemon=True).start()
    gaps, last = [], time.perf_counter()
    while not done.is_set() and time.perf_counter() - t0 < 120:
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    took = time.perf_counter() - t0
    await owner.stop()
    return {"copy_s": round(took, 3), "longest_hold_ms": round(max(gaps) * 1000, 1), "mb": round(received[0] / 1e6, 1)}


async def run(vehicles: int) -> dict:
    h = fleet_hub(vehicles)
    gc.collect()
    gc.freeze()
    gc.set_threshold(70_000, 20, 20)
    sliced = await one_copy(h, at_once=False)
    whole = await one_copy(h, at_once=True)
    return {"benchmark": "copy", "vehicles": vehicles, "frames_mb": sliced["mb"],
            "copy_s": sliced["copy_s"], "longest_hold_ms": sliced["longest_hold_ms"],
            "at_once_copy_s": whole["copy_s"], "at_once_longest_hold_ms": whole["longest_hold_ms"],
            "hold_ratio": round(sliced["longest_hold_ms"] / max(whole["longest_hold_ms"], 1e-9), 3),
            "machine": f"{platform.machine()} {os.cpu_count()} cpu, python {platform.python_version()}"}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vehicles", type=int, default=200_000)
    a = p.parse_args()
    print(json.dumps(asyncio.run(run(a.vehicles))))


if __name__ == "__main__":
    main()
