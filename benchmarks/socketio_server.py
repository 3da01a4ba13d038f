"""Baseline (2), the peer: python-socketio doing scenario (a) the idiomatic way.

AsyncServer on aiohttp, no Redis manager, a room per vehicle. A client sends
`subscribe` with its viewport and joins the rooms of the vehicles inside it;
every simulated update is one `emit("pos", …, room=vehicle)` with the same
message shape as realtime's `pos`. The fleet is the same simulator.
"""
from __future__ import annotations

import argparse
import asyncio
import resource
import time

import numpy as np
import socketio
from aiohttp import web

from realtime.ingest.simulator import Fleet


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--vehicles", type=int, default=20000)
    a = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sio = socketio.AsyncServer(async_mode="aiohttp", cors_allowed_origins="*", logger=False,
                               engineio_logger=False)
    app = web.Application()
    sio.attach(app)
    fleet = Fleet(a.vehicles, seed=1)

    @sio.on("subscribe")
    async def subscribe(sid, bounds):
        inside = np.flatnonzero((fleet.lat >= bounds["south"]) & (fleet.lat <= bounds["north"])
                                & (fleet.lon >= bounds["west"]) & (fleet.lon <= bounds["east"]))
        for i in inside:
            await sio.enter_room(sid, fleet.ids[i])

    async def simulate(app_):
        async def loop():
            step = 0.1
            nxt = time.monotonic()
            while True:
                nxt += step
                await asyncio.sleep(max(0.0, nxt - time.monotonic()))
                res = fleet.step(step, int(time.time() * 1000))
                if res is None:
                    continue
                b = res[0]
                for j in range(len(b)):
                    await sio.emit("pos", {"t": "pos", "v": b.ids[j], "p": [float(b.lat[j]), float(b.lon[j])],
                                           "s": float(b.speed[j]), "c": float(b.course[j]), "ts": int(b.ts[j])},
                                   room=b.ids[j])
        app_["sim"] = asyncio.get_running_loop().create_task(loop())

    app.on_startup.append(simulate)
    web.run_app(app, host="127.0.0.1", port=a.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
