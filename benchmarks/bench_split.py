"""One worker's tick against two workers' ticks over the same clients (issue 14 part 4).

With `--workers 2` each worker routes and encodes the changed rows for its
own clients. Routing scales with clients and is split; encoding is per
changed row a client sees, so with viewports spread over the fleet both
workers encode most rows: that part is done twice. This measures it in the
core alone, in one process:
  - one core with C clients (JSON, the same rights, each a viewport of 1% of
    the fleet's area, as the load generator's clients in bench_e2e);
  - two cores with the same clients split between them, even and odd;
  - the same batches (`--changed` rows moving a little) applied to all
    three, and each tick timed: one core's, and the sum of the two cores'
    (the order alternates tick by tick, so the machine's drift falls on both).
`two_over_one` is the two ticks' time over the one tick's (1.0: splitting
the clients costs nothing). The deliveries are checked to be equal.

    python benchmarks/bench_split.py [--vehicles 10000 --clients 500 --changed 770 --ticks 300]

770 changed rows a tick is 10k vehicles at 1 Hz over ~13 ticks a second,
bench_workers' load. For the instructions behind a figure (this machine's
timings drift), run it under `valgrind --tool=callgrind
--toggle-collect=__pyx_pw_8realtime_5_core_5_core_11k_tick`.

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_core import deliveries, fleet, make_tick_batch, viewport  # noqa: E402

from realtime._core import Core  # noqa: E402
from realtime._core import _schema as S  # noqa: E402


def cores(n_vehicles: int, n_clients: int, seed: int = 1):
    """(one core with every client, [two cores with half each])."""
    rng = np.random.default_rng(seed)
    views = [viewport(rng) for _ in range(n_clients)]
    made = []
    for part in (views, views[0::2], views[1::2]):
        core = Core(vehicle_capacity=n_vehicles, client_capacity=max(len(part), 1))
        fleet(core, n_vehicles, np.random.default_rng(seed + 1))   # the same fleet in each
        for bounds in part:
            c = core.add_client(fmt=S.FMT_JSON, view_all=True, groups=(), contacts=False)
            core.subscribe(c, bounds=bounds, zoom=13)
        core.tick()
        made.append(core)
    return made[0], made[1:]


def run(n_vehicles=10000, n_clients=500, n_changed=770, ticks=300, seed=1):
    one, two = cores(n_vehicles, n_clients, seed)
    rng = np.random.default_rng(seed + 2)
    lat, lon = one.cur["lat"][:n_vehicles].copy(), one.cur["lon"][:n_vehicles].copy()
    # per side: [its cores, tick seconds, deliveries]
    sides = [[[one], [], 0], [two, [], 0]]
    for t in range(ticks):
        b = make_tick_batch(rng, lat, lon, n_changed, 1_700_000_000_000 + 1000 * (t + 1))
        for core in (one, *two):
            core.apply(b)
        for side in (sides if t % 2 == 0 else sides[::-1]):
            t0 = time.perf_counter()
            outs = [core.tick() for core in side[0]]
            side[1].append(time.perf_counter() - t0)
            side[2] += sum(deliveries(o) for o in outs)
    (_, t_one, d_one), (_, t_two, d_two) = sides
    assert d_one == d_two, (d_one, d_two)   # the same messages, only split
    one_us, two_us = float(np.median(t_one)) * 1e6, float(np.median(t_two)) * 1e6
    return {
        "benchmark": "split", "vehicles": n_vehicles, "clients": n_clients, "changed_per_tick": n_changed,
        "ticks": ticks, "deliveries_per_tick": round(d_one / ticks),
        "one_tick_us": round(one_us), "two_ticks_us": round(two_us),
        "extra_us": round(two_us - one_us),
        "two_over_one": round(two_us / max(one_us, 1e-9), 3),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, python {platform.python_version()}",
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vehicles", type=int, default=10000)
    p.add_argument("--clients", type=int, default=500)
    p.add_argument("--changed", type=int, default=770)
    p.add_argument("--ticks", type=int, default=300)
    a = p.parse_args()
    print(json.dumps(run(a.vehicles, a.clients, a.changed, a.ticks)))


if __name__ == "__main__":
    main()
