"""Core memory at scale: 10k clients x 50k vehicles (issue 2: it must fit).

Per-client state is a column of the visibility bitset plus one 64-byte client
record; subscriptions are interned, so clients with the same sets share one
bitset row. Prints one JSON object: RSS growth measured from /proc against
the numpy arrays' own sizes (the baseline: what the layout says it costs).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_core import build  # noqa: E402

from realtime._core import Core  # noqa: E402


def rss_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vehicles", type=int, default=50000)
    p.add_argument("--clients", type=int, default=10000)
    a = p.parse_args()
    before = rss_kb()
    core, *_ = build(Core, a.vehicles, a.clients)
    after = rss_kb()
    arrays = sum(x.nbytes for x in (core.cur, core.sent, core.vis, core.sel_bits, core.group_bits,
                                    core.clients, core.dirty))
    print(json.dumps({
        "benchmark": "core_memory", "vehicles": a.vehicles, "clients": a.clients,
        "rss_growth_mb": round((after - before) / 1024, 1),
        "core_arrays_mb": round(arrays / 2**20, 1),
        "visibility_bitset_mb": round(core.vis.nbytes / 2**20, 1),
        "bytes_per_client": round((after - before) * 1024 / a.clients),
        "rss_vs_arrays": round((after - before) * 1024 / max(arrays, 1), 2),
    }))


if __name__ == "__main__":
    main()
