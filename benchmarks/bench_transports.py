"""The fallback transports (PROTOCOL §4) against WebSocket in the same run,
on scenario (a)'s fleet and viewports (bench_e2e.py): V vehicles at 1 Hz from
the built-in simulator, C clients each watching ~1% of the fleet's area.

- deliveries per server CPU-second over SSE (sessions read by `session=`),
  long polling and gRPC, each as a ratio to WebSocket's (target for SSE:
  >= 0.5);
- 5,000 long pollers waiting with nothing to send: server RSS per poller
  and the server's idle CPU, against the same number of idle WebSocket
  connections.

Each transport gets a fresh server; the load generators (loadgen.py for
WebSocket, httpgen.py for the others) run as two processes, like bench_e2e.
Prints one JSON object; `--smoke` shrinks everything.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_e2e as e2e  # noqa: E402
from bench_e2e import PY, ROOT, cpu_s, free_port, log, realtime, rss_kb, token, wait_port  # noqa: E402


def httpgen(port, grpc_port, mode, clients, seconds, procs=2, extra=()):
    out = []
    for i in range(procs):
        n = clients // procs + (1 if i < clients % procs else 0)
        cmd = [PY, str(HERE / "httpgen.py"), "--port", str(port), "--mode", mode, "--token", token(),
               "--clients", str(n), "--seconds", str(seconds), "--warmup", str(e2e.WARMUP),
               "--seed", str(i + 1), "--barrier", *extra]
        if grpc_port:
            cmd += ["--grpc-port", str(grpc_port)]
        out.append(subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True))
    return out


def merged(lgs) -> dict:
    parts = []
    for lg in lgs:
        out, err = lg.communicate(timeout=600)
        if lg.returncode != 0:
            raise RuntimeError(f"load generator failed: {err[-2000:]}")
        parts.append(json.loads(out.strip().splitlines()[-1]))
    res = dict(parts[0])
    for k in ("clients", "connected", "failed", "deliveries_per_s", "bytes_per_s", "answers_per_s",
              "waiting_polls"):
        res[k] = sum(p[k] for p in parts)
    return res


def transport(mode, vehicles, clients, seconds) -> dict:
    port, gport = free_port(), free_port()
    s = realtime(port, vehicles, ("--grpc-port", str(gport)))
    try:
        wait_port(port)
        time.sleep(e2e.SETTLE)
        if mode == "websocket":
            lgs = e2e.loadgen(port, clients, seconds)
            res = e2e.measured(s, lgs, clients, seconds)
        else:
            lgs = httpgen(port, gport if mode == "grpc" else None, mode, clients, seconds)
            res = e2e.measured(s, lgs, clients, seconds, merge=merged)
        res["mode"] = mode
        return res
    finally:
        s.stop()


def idle_pollers(n, seconds) -> dict:
    """n pollers each holding a poll open (timeout 60 s) on a server with
    nothing to send; then n idle WebSocket connections on a fresh server."""
    out = {}
    for mode in ("poll", "websocket"):
        port = free_port()
        s = realtime(port, 0)
        try:
            wait_port(port)
            time.sleep(0.5)
            rss0 = rss_kb(s.p.pid)
            if mode == "poll":
                lgs = httpgen(port, None, "poll", n, seconds, extra=("--poll-timeout", "60"))
            else:
                lgs = e2e.loadgen(port, n, seconds)
            e2e.window(lgs)
            time.sleep(1.0)
            c0, t0 = cpu_s(s.p.pid), time.monotonic()
            rss1 = rss_kb(s.p.pid)
            time.sleep(max(0.0, seconds - 1.5))
            c1, t1 = cpu_s(s.p.pid), time.monotonic()
            res = merged(lgs) if mode == "poll" else e2e.merged(lgs)
            out[mode] = {"clients": n, "connected": res["connected"], "failed": res["failed"],
                         "waiting_polls": res.get("waiting_polls"),
                         "rss_kb_per_client": round((rss1 - rss0) / max(n, 1), 2),
                         "idle_cpu_s_per_s": round((c1 - c0) / (t1 - t0), 4)}
        finally:
            s.stop()
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--vehicles", type=int)
    p.add_argument("--clients", type=int)
    p.add_argument("--pollers", type=int)
    p.add_argument("--seconds", type=float)
    p.add_argument("--only", help="one transport (websocket, sse, poll, grpc); no ratios, no idle run")
    a = p.parse_args()
    if a.smoke:
        e2e.SETTLE, e2e.WARMUP = 1.0, 0.5
    V = a.vehicles or (2000 if a.smoke else 20000)
    C = a.clients or (100 if a.smoke else 1000)
    P = a.pollers or (100 if a.smoke else 5000)
    T = a.seconds or (1 if a.smoke else 10)
    out = {"benchmark": "transports", "smoke": a.smoke, "vehicles": V, "clients": C, "seconds": T}
    if a.only:
        out[a.only] = transport(a.only, V, C, T)
        print(json.dumps(out))
        return
    for mode in ("websocket", "sse", "poll", "grpc"):
        log(f"transports: {mode}, {V} vehicles at 1 Hz, {C} clients, viewports ~1%")
        out[mode] = r = transport(mode, V, C, T)
        log(json.dumps(r))
    ws = max(out["websocket"]["deliveries_per_cpu_s"], 1)
    for mode in ("sse", "poll", "grpc"):
        out[f"{mode}_ratio_vs_websocket"] = round(out[mode]["deliveries_per_cpu_s"] / ws, 3)
    log(f"transports: {P} idle long pollers, then {P} idle WebSocket connections")
    out["idle"] = idle = idle_pollers(P, 2 if a.smoke else 10)
    log(json.dumps(idle))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
