"""The Redis side of the capacity model (issue 14 part 4): commands and
network bytes per instance and in total, for a number of instances and a
fleet size at 1 Hz, with the reconcile by change feed against the design
before it (every instance SCANs and reads the timestamp of every key every 5 s).

Each instance is a process running only what talks to Redis: the real
RedisStores loops (writer lease and writes, change feed, safety scan,
event log tail, Pub/Sub, presence) on a real Hub and Core, with no
network clients. Every instance applies the same fleet, as it would from
Kafka: vehicle i reports in the 100 ms slot i mod 10 of each second, with
the slot's start as its timestamp, so that every instance holds what the
writer writes. The Redis is a throwaway redis-server of this run, so its
INFO counts (commands, bytes, CPU) are the instances' alone: the baseline
every figure here is read against. Bytes per instance are the process's
reads and writes on its asyncio streams (its only sockets are Redis's).

    python benchmarks/bench_capacity.py --vehicles 20000,200000 --instances 1,4,16 --design feed,scan

Prints one JSON object: a row per (design, vehicles, instances).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SLOTS = 10   # each vehicle reports once a second, in one of 10 slots of 100 ms


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ one instance
_io = [0]   # bytes this process sent to and read from Redis (its only sockets)


def _count_socket_bytes() -> None:
    """/proc/PID/io does not count socket I/O on every kernel: count at asyncio's streams."""
    w, wl, r = asyncio.StreamWriter.write, asyncio.StreamWriter.writelines, asyncio.StreamReader.read

    def write(self, data):
        _io[0] += len(data)
        return w(self, data)

    def writelines(self, data):
        data = list(data)
        _io[0] += sum(map(len, data))
        return wl(self, data)

    async def read(self, n=-1):
        data = await r(self, n)
        _io[0] += len(data)
        return data
    asyncio.StreamWriter.write, asyncio.StreamWriter.writelines, asyncio.StreamReader.read = write, writelines, read


async def instance(url: str, vehicles: int, design: str) -> None:
    import numpy as np
    _count_socket_bytes()

    sys.path.insert(0, str(ROOT))
    from realtime import config
    from realtime._core import Core
    from realtime._core._schema import UpdateBatch
    from realtime.hub import Hub
    from realtime.stores.redis import RedisStores

    s = config.Settings(jwt_secret="x" * 32, simulate=0, redis=url, log_level="warning")
    s.validate()
    hub = Hub(s, Core(vehicle_capacity=vehicles + 16, client_capacity=16))
    stores = RedisStores(s, hub.instance_id)
    hub.stores = stores
    if design == "scan":
        # the design before the change feed: a whole pass every reconcile
        async def whole_pass():
            stores._scanner.reset()
            applied = await stores._scan(None)
            stores.reconciled += applied
            await stores._refresh_groups()
            return applied
        stores.reconcile_once = whole_pass
    ids = np.array([f"veh_{i:06d}" for i in range(vehicles)], dtype=object)
    slot_rows = [np.arange(k, vehicles, SLOTS) for k in range(SLOTS)]

    def batch(rows, slot_ms):
        n = len(rows)
        phase = (slot_ms // 1000) % 600 / 600.0 * 2 * np.pi
        return UpdateBatch(
            list(ids[rows]), 50.0 + rows / vehicles * 5 + 0.01 * np.sin(phase),
            10.0 + rows / vehicles * 5 + 0.01 * np.cos(phase), np.full(n, 12.5), np.full(n, 90.0),
            np.ones(n, np.uint8), np.zeros(n, np.uint8), np.full(n, slot_ms, np.int64),
            None, None, None, None)

    # the whole fleet once, so that every instance holds every vehicle
    start_ms = int(time.time() * 10) * 100 - 1000
    for i in range(0, vehicles, 10_000):
        hub.apply(batch(np.arange(i, min(i + 10_000, vehicles)), start_ms))
    core = hub.core
    core_rows = [np.array([core.row_of(v) for v in ids[rows]], np.int64) for rows in slot_rows]
    await stores.start(hub)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: print(json.dumps({
        "ops": stores.ops, "bytes": _io[0], "leader": stores.leader}), flush=True))
    print("ready", flush=True)
    while not stop.is_set():
        slot_ms = int(time.time() * 10) * 100
        k = (slot_ms // 100) % SLOTS
        if stores.leader:
            hub.apply(batch(slot_rows[k], slot_ms))   # what the writer writes, through the core
        else:
            # what Kafka would have brought: only the timestamps matter to
            # the reconcile, and applying 200k updates a second in each of
            # 16 processes would measure this machine's 2 cores, not Redis
            core.cur["ts"][core_rows[k]] = slot_ms
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, (slot_ms + 100) / 1000.0 - time.time()))
        except asyncio.TimeoutError:
            pass
    await stores.stop()


# ------------------------------------------------------------------ the run
def sample(procs) -> list[dict]:
    """Each instance's own counters (commands sent, bytes to and from Redis), asked with SIGUSR1."""
    for p in procs:
        p.send_signal(signal.SIGUSR1)
    return [json.loads(p.stdout.readline()) for p in procs]


def cpu_s(pid: int) -> float:
    parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def redis_counts(r) -> dict:
    stats, cpu = r.info("stats"), r.info("cpu")
    return {"commands": sum(v["calls"] for v in r.info("commandstats").values()),
            "bytes": stats["total_net_input_bytes"] + stats["total_net_output_bytes"],
            "cpu": cpu["used_cpu_sys"] + cpu["used_cpu_user"]}


def one_run(design: str, vehicles: int, n: int, settle: float, seconds: float) -> dict:
    import redis
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="bench-capacity-")
    srv = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
    r = redis.Redis(port=port)
    deadline = time.time() + 10
    while True:
        try:
            r.ping()
            break
        except redis.ConnectionError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)
    url = f"redis://127.0.0.1:{port}/0"
    procs = []
    try:
        for _ in range(n):
            p = subprocess.Popen([sys.executable, __file__, "--child", url, str(vehicles), design],
                                 stdout=subprocess.PIPE, text=True, cwd=ROOT)
            procs.append(p)
        for p in procs:
            assert p.stdout.readline().strip() == "ready", "an instance did not start"
        time.sleep(settle)
        c0, s0, u0, t0 = redis_counts(r), sample(procs), [cpu_s(p.pid) for p in procs], time.time()
        time.sleep(seconds)
        c1, s1, u1, t1 = redis_counts(r), sample(procs), [cpu_s(p.pid) for p in procs], time.time()
        dt = t1 - t0
        per = [{"ops_per_s": (s1[i]["ops"] - s0[i]["ops"]) / dt, "bytes_per_s": (s1[i]["bytes"] - s0[i]["bytes"]) / dt,
                "cpu_s_per_s": (u1[i] - u0[i]) / dt, "leader": s1[i]["leader"]} for i in range(n)]
        writer = [x for x in per if x["leader"]]
        readers = [x for x in per if not x["leader"]]

        def avg(rows, f, nd=0):
            return round(sum(x[f] for x in rows) / len(rows), nd or None) if rows else None
        return {
            "design": design, "vehicles": vehicles, "instances": n,
            "redis_commands_per_s": round((c1["commands"] - c0["commands"]) / dt),
            "redis_bytes_per_s": round((c1["bytes"] - c0["bytes"]) / dt),
            "redis_cpu_s_per_s": round((c1["cpu"] - c0["cpu"]) / dt, 3),
            "writer_ops_per_s": avg(writer, "ops_per_s"), "writer_bytes_per_s": avg(writer, "bytes_per_s"),
            "writer_cpu_s_per_s": avg(writer, "cpu_s_per_s", 3),
            "reader_ops_per_s": avg(readers, "ops_per_s"), "reader_bytes_per_s": avg(readers, "bytes_per_s"),
            "reader_cpu_s_per_s": avg(readers, "cpu_s_per_s", 3),
            "writers": len(writer),
            "keys": r.dbsize(),
        }
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        srv.terminate()
        srv.wait()


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        asyncio.run(instance(sys.argv[2], int(sys.argv[3]), sys.argv[4]))
        return
    p = argparse.ArgumentParser()
    p.add_argument("--vehicles", default="20000,200000")
    p.add_argument("--instances", default="1,4,16")
    p.add_argument("--design", default="feed,scan", help="feed (now), scan (before the change feed)")
    p.add_argument("--settle", type=float, default=12.0, help="seconds before measuring (the first whole pass)")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--check-writers", action="store_true",
                   help="exit 1 unless every run had exactly one writer (a full run; a smoke run only warns)")
    a = p.parse_args()
    rows = []
    for vehicles in map(int, a.vehicles.split(",")):
        for n in map(int, a.instances.split(",")):
            for design in a.design.split(","):
                row = one_run(design, vehicles, n, a.settle, a.seconds)
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    print(json.dumps({"runs": rows, "machine": f"{os.cpu_count()} cores"}))
    # not a timing: a run with no writer, or two, measured something else
    # than the design (the lease is broken); say so with the exit status
    if any(row["writers"] != 1 for row in rows):
        print("bench_capacity: a run did not have exactly one writer", file=sys.stderr)
        if a.check_writers:
            sys.exit(1)


if __name__ == "__main__":
    main()
