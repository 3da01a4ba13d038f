"""One refresh of clustered clients' cells: shared views against one computation per client.

Scenario (issue 14 part 1): 50k vehicles around Moscow; 1,000 dispatchers
zoomed out over the region (zooms 8 to 10, viewports panned anywhere over
it, a quarter of them with a status filter, a tenth limited to a few groups:
a few hundred distinct views once snapped to the cell grid), each clustered.

- baseline: what the hub did before, per client: its visible vehicles'
  cells (`Core.cluster_cells`) and one encode each;
- shared: what `Hub.refresh_clusters` does now: one `view_key` per client,
  cells per distinct view (`Core.view_cells`, its filtered vehicles shared
  between views of the same rights and filters), one encode per view.

Both from the same core in the same run; the figure is their ratio. Also the
distinct views and the largest payload. Run alone:
`python benchmarks/bench_clusters.py [--vehicles N --clients N --runs N]`.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench_core import DLAT, DLON, LAT0, LON0, fleet
from realtime._core import Core
from realtime.messages import encode


def build(n_vehicles: int, n_clients: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    core = Core(vehicle_capacity=n_vehicles, client_capacity=n_clients)
    fleet(core, n_vehicles, rng, statuses=(0, 0, 0, 1, 2, 3))
    clients = []
    for i in range(n_clients):
        limited = i % 10 == 0
        c = core.add_client(fmt=int(i % 4 == 0), view_all=not limited,
                            groups=(f"g{i % 5}", f"g{(i % 5) + 5}") if limited else ())
        zoom = int(rng.integers(8, 11))
        deg = 90.0 / 2 ** zoom
        h, w = deg * 6, deg * 10                   # a map ~ 640 x 384 px at that zoom
        s = LAT0 + rng.uniform(-h / 2, DLAT - h / 2)
        west = LON0 + rng.uniform(-w / 2, DLON - w / 2)
        statuses = (["moving"], ["moving", "idle"], None, None)[i % 4]
        core.subscribe(c, bounds=(s, west, s + h, west + w), zoom=zoom, statuses=statuses)
        core.set_clustered(c, True)
        clients.append((c, zoom, deg))
    return core, clients


def per_client(core, clients):
    sizes = []
    for c, zoom, deg in clients:
        cells = core.cluster_cells(c, deg)
        sizes.append(len(encode(int(core.clients[c]["fmt"]), [{"t": "clusters", "z": zoom, "cells": cells}])))
    return sizes


def shared(core, clients):
    memo, bodies, sizes = {}, {}, []
    for c, zoom, deg in clients:
        key = core.view_key(c, deg)
        fmt = int(core.clients[c]["fmt"])
        body = bodies.get((key, zoom, fmt))
        if body is None:
            cells = memo.get(("cells", key))
            if cells is None:
                cells = memo[("cells", key)] = core.view_cells(key, memo)
            body = bodies[(key, zoom, fmt)] = encode(fmt, [{"t": "clusters", "z": zoom, "cells": cells}])
        sizes.append(len(body))
    return sizes, len({k for k, _, _ in bodies})


def timed(fn, runs):
    best = float("inf")
    out = None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vehicles", type=int, default=50_000)
    p.add_argument("--clients", type=int, default=1_000)
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    core, clients = build(a.vehicles, a.clients)
    base_s, base_sizes = timed(lambda: per_client(core, clients), a.runs)
    new_s, (sizes, views) = timed(lambda: shared(core, clients), a.runs)
    print(json.dumps({
        "benchmark": "cluster_refresh", "vehicles": a.vehicles, "clients": a.clients,
        "distinct_views": views,
        "per_client_ms": round(base_s * 1000, 1), "shared_ms": round(new_s * 1000, 1),
        "shared_ratio": round(new_s / base_s, 3),
        "largest_payload_bytes": max(sizes), "largest_payload_before_bytes": max(base_sizes),
    }))


if __name__ == "__main__":
    main()
