"""apply + route + encode per tick: the compiled core against the numpy reference.

Scenario (issue 2): 20k vehicles around Moscow reporting at 1 Hz, so 1,000
changed rows per 50 ms tick; 5k clients, each with a viewport of ~1% of the
fleet's area; a mix of JSON and msgpack clients and of rights.

Run alone: `python benchmarks/bench_core.py [--vehicles N --clients N --ticks N]`
prints one JSON object. Under pytest-benchmark (`pytest benchmarks/`) the
same functions are timed by the plugin.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import numpy as np

from realtime._core import Core, UpdateBatch
from realtime._core import _schema as S
from realtime._core._reference import ReferenceCore

LAT0, LON0, DLAT, DLON = 55.45, 37.25, 0.6, 0.75  # the fleet's area


def fleet(core, n_vehicles: int, rng, statuses=(0, 0, 0, 1, 2)):
    """n vehicles spread over the fleet's area, in 20 groups, applied and
    ticked; returns their (lat, lon)."""
    lat = LAT0 + rng.uniform(0, DLAT, n_vehicles)
    lon = LON0 + rng.uniform(0, DLON, n_vehicles)
    codes = [core.vtype_code(t) for t in ("truck", "van", "car", "bus")]
    b = UpdateBatch([f"veh_{i:06d}" for i in range(n_vehicles)], lat, lon,
                    rng.uniform(0, 90, n_vehicles).round(1), rng.integers(0, 360, n_vehicles).astype(float),
                    rng.choice(list(statuses), n_vehicles).astype(np.uint8),
                    rng.choice(codes, n_vehicles).astype(np.uint8),
                    np.full(n_vehicles, 1_700_000_000_000, np.int64),
                    [()] * n_vehicles, [{"name": "D", "phone": "+7"}] * n_vehicles, None,
                    [(f"g{i % 20}",) for i in range(n_vehicles)])
    core.apply(b)
    core.tick()
    return lat, lon


def viewport(rng, share: float = 0.01):
    """A random viewport (south, west, north, east) of `share` of the fleet's area."""
    side = math.sqrt(share)
    s = LAT0 + rng.uniform(0, DLAT * (1 - side))
    w = LON0 + rng.uniform(0, DLON * (1 - side))
    return (s, w, s + DLAT * side, w + DLON * side)


def build(cls, n_vehicles: int, n_clients: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    core = cls(vehicle_capacity=n_vehicles, client_capacity=n_clients)
    lat, lon = fleet(core, n_vehicles, rng)
    for i in range(n_clients):
        c = core.add_client(fmt=int(i % 4 == 0), view_all=i % 10 != 0,
                            groups=(f"g{i % 20}", f"g{(i + 7) % 20}"), contacts=i % 3 == 0)
        core.subscribe(c, bounds=viewport(rng), zoom=13)
    return core, rng, lat, lon


def build_reference(n_vehicles: int, n_clients: int, seed: int = 1):
    """The same state as build(Core, ...), handed to the reference kernels.

    Both cores share CoreBase's attributes, so the compiled core builds the
    state (the reference's brute-force subscribe would take minutes) and the
    reference times the same ticks from the same state."""
    import copy
    core, rng, lat, lon = build(Core, n_vehicles, n_clients, seed)
    ref = ReferenceCore.__new__(ReferenceCore)
    ref.__dict__ = copy.deepcopy(core.__dict__)
    ref.kernel_state = None
    return ref, rng, lat, lon


def make_tick_batch(rng, lat, lon, n_changed: int, ts: int):
    """n_changed vehicles move a little (~20 m); some change status."""
    idx = rng.choice(len(lat), n_changed, replace=False)
    lat[idx] += rng.normal(0, 2e-4, n_changed)
    lon[idx] += rng.normal(0, 3e-4, n_changed)
    status = np.full(n_changed, S.KEEP, np.uint8)
    flip = rng.random(n_changed) < 0.02
    status[flip] = rng.integers(0, 3, int(flip.sum()))
    return UpdateBatch([f"veh_{i:06d}" for i in idx], lat[idx], lon[idx],
                       rng.uniform(0, 90, n_changed).round(1), np.full(n_changed, math.nan), status,
                       np.full(n_changed, S.KEEP, np.uint8), np.full(n_changed, ts, np.int64),
                       None, None, None, None)


def deliveries(out) -> int:
    """Messages delivered in one tick's output (sum over clients)."""
    total = 0
    for body, rows in out:
        if body[:1] == b"[":
            n = len(json.loads(body))
        else:
            import msgpack
            n = len(msgpack.unpackb(body))
        total += n * len(rows)
    return total


def time_ticks(core, rng, lat, lon, n_changed, ticks):
    """Per tick: (apply seconds, route+encode seconds); deliveries and frames in all."""
    times, deliv, frames = [], 0, 0
    for t in range(ticks):
        b = make_tick_batch(rng, lat, lon, n_changed, 1_700_000_000_000 + t + 1)
        t0 = time.perf_counter()
        core.apply(b)
        t1 = time.perf_counter()
        out = core.tick()
        times.append((t1 - t0, time.perf_counter() - t1))
        deliv += deliveries(out)
        frames += sum(len(r) for _, r in out)
    return np.array(times), deliv, frames


def run(n_vehicles=20000, n_clients=5000, n_changed=1000, ticks=20, ref_ticks=1, seed=1):
    core, rng, lat, lon = build(Core, n_vehicles, n_clients, seed)
    times, deliv, frames = time_ticks(core, rng, lat, lon, n_changed, ticks)
    ref, rrng, rlat, rlon = build_reference(n_vehicles, n_clients, seed)
    rtimes, rdeliv, _ = time_ticks(ref, rrng, rlat, rlon, n_changed, ref_ticks)
    compiled_s = float(np.median(times.sum(axis=1)))
    reference_s = float(np.median(rtimes.sum(axis=1)))
    route_s = float(np.median(times[:, 1]))
    ref_route_s = float(np.median(rtimes[:, 1]))
    per_tick_deliveries = deliv / ticks
    return {
        "benchmark": "core_apply_route_encode",
        "vehicles": n_vehicles, "clients": n_clients, "changed_per_tick": n_changed,
        "ticks": ticks, "reference_ticks": ref_ticks,
        "compiled_tick_ms_median": round(compiled_s * 1000, 3),
        "compiled_tick_ms_p90": round(float(np.percentile(times.sum(axis=1), 90)) * 1000, 3),
        "compiled_apply_ms_median": round(float(np.median(times[:, 0])) * 1000, 3),
        "compiled_route_encode_ms_median": round(route_s * 1000, 3),
        "reference_tick_ms": round(reference_s * 1000, 1),
        "speedup_vs_reference": round(reference_s / compiled_s, 1),
        "route_encode_speedup_vs_reference": round(ref_route_s / route_s, 1),
        "route_encode_us_per_delivery": round(route_s * 1e6 / max(deliv / ticks, 1), 4),
        "deliveries_per_tick": round(per_tick_deliveries),
        "frames_per_tick": round(frames / ticks),
        "us_per_delivery": round(compiled_s * 1e6 / max(per_tick_deliveries, 1), 4),  # apply included
        "reference_deliveries_per_tick": round(rdeliv / ref_ticks),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, python {platform.python_version()}",
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vehicles", type=int, default=20000)
    p.add_argument("--clients", type=int, default=5000)
    p.add_argument("--changed", type=int, default=1000)
    p.add_argument("--ticks", type=int, default=20)
    p.add_argument("--ref-ticks", type=int, default=1)
    a = p.parse_args()
    print(json.dumps(run(a.vehicles, a.clients, a.changed, a.ticks, a.ref_ticks)))


# ---------------------------------------------------------------- pytest-benchmark
def _bench(benchmark, cls, rounds):
    n_v = int(os.environ.get("BENCH_VEHICLES", 20000))
    n_c = int(os.environ.get("BENCH_CLIENTS", 5000))
    core, rng, lat, lon = build(Core, n_v, n_c) if cls is Core else build_reference(n_v, n_c)
    ts = iter(range(1_700_000_000_001, 1_800_000_000_000))

    def setup():
        return (make_tick_batch(rng, lat, lon, n_v // 20, next(ts)),), {}

    def one_tick(b):
        core.apply(b)
        return core.tick()

    out = benchmark.pedantic(one_tick, setup=setup, rounds=rounds, iterations=1)
    assert deliveries(out) > 0


def test_compiled(benchmark):
    _bench(benchmark, Core, int(os.environ.get("BENCH_ROUNDS", 20)))


def test_reference(benchmark):
    _bench(benchmark, ReferenceCore, 1)


if __name__ == "__main__":
    main()
