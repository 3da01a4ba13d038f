"""WebSocket load generator: many real connections from one process, no task per message.

Each connection is a bare asyncio Protocol on uvloop that does the HTTP
upgrade, sends one masked `subscribe` text frame, then parses server frames
in `data_received`. Per frame it counts the messages with `bytes.count`
(no JSON parsing); one frame in `--sample` is decoded to measure end-to-end
latency from each message's `ts` (set when the update was made) to its
receipt. Works against realtime, the raw baseline and anything that sends
the same frames.

Run alone: `python benchmarks/loadgen.py --port P --clients N --seconds S`
prints one JSON object with frames, messages, bytes, latency percentiles.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import struct
import sys
import time

import numpy as np
import uvloop

MARK = b'"t":"'


def mask_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    key = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + struct.pack(">H", n)
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + struct.pack(">Q", n)
    arr = np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(key, np.uint8), n)
    return head + key + arr.tobytes()


def take_upgrade(buf: bytearray):
    """The handshake's answer at the front of `buf`: None until it is whole,
    then True (101 Switching Protocols; removed from buf) or False."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    if not buf.startswith(b"HTTP/1.1 101"):
        return False
    del buf[: end + 4]
    return True


def next_frame(buf: bytearray):
    """The first whole unmasked server frame in `buf` as (opcode, payload),
    removed from it; None until one has arrived whole."""
    if len(buf) < 2:
        return None
    b1 = buf[1] & 0x7F
    off = 2
    if b1 == 126:
        if len(buf) < 4:
            return None
        n = struct.unpack_from(">H", buf, 2)[0]
        off = 4
    elif b1 == 127:
        if len(buf) < 10:
            return None
        n = struct.unpack_from(">Q", buf, 2)[0]
        off = 10
    else:
        n = b1
    if len(buf) < off + n:
        return None
    opcode = buf[0] & 0x0F
    payload = bytes(buf[off: off + n])
    del buf[: off + n]
    return opcode, payload


class Stats:
    def __init__(self, sample: int, stamped: bool = False):
        self.sample = sample
        self.stamps: list[float] | None = [] if stamped else None   # receipt time (ms) of each latency
        self.frames = 0
        self.messages = 0
        self.bytes = 0
        self.latencies: list[float] = []
        self.connected = 0
        self.subscribed = 0
        self.failed = 0
        self.closed = 0
        self.max_frame = 0      # the largest frame in the measuring window (bytes)


class WSClient(asyncio.Protocol):
    __slots__ = ("host", "path", "subscribe", "stats", "buf", "upgraded", "transport", "ready",
                 "extensions")

    # set by --deflate: offered like a browser does; only idle runs use it, as
    # the per-frame accounting below reads uncompressed payloads
    EXTENSIONS = ""

    def __init__(self, host, path, subscribe: bytes, stats: Stats, ready: asyncio.Future):
        self.host = host
        self.path = path
        self.subscribe = subscribe
        self.stats = stats
        self.buf = bytearray()
        self.upgraded = False
        self.ready = ready

    def connection_made(self, transport):
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write((f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
                         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                         f"Sec-WebSocket-Version: 13\r\n{self.EXTENSIONS}\r\n").encode())

    def send_subscribe(self):
        """After every client is connected, so that handshakes are not starved by traffic."""
        if not self.upgraded or self.transport.is_closing():
            return
        if self.subscribe.startswith(b"42"):      # socket.io: join the namespace first
            self.transport.write(mask_frame(b"40"))
        if self.subscribe:
            self.transport.write(mask_frame(self.subscribe))

    def data_received(self, data):
        buf = self.buf
        buf += data
        if not self.upgraded:
            answer = take_upgrade(buf)
            if answer is None:
                return
            if not answer:
                self.stats.failed += 1
                self.transport.close()
                return
            self.upgraded = True
            self.stats.connected += 1
            if not self.ready.done():
                self.ready.set_result(True)
        st = self.stats
        now = time.time() * 1000
        while True:
            frame = next_frame(buf)
            if frame is None:
                return
            opcode, payload = frame
            n = len(payload)
            if opcode == 0x9:       # ping -> pong
                self.transport.write(mask_frame(payload, 0xA))
                continue
            if opcode == 0x8:
                self.transport.close()
                return
            if opcode not in (0x1, 0x2):
                continue
            if payload == b"2":                      # engine.io ping
                self.transport.write(mask_frame(b"3"))
                continue
            st.frames += 1
            st.bytes += n
            if n > st.max_frame:
                st.max_frame = n
            if payload.startswith(b'{"type":"subscribed"'):
                st.subscribed += 1
            elif payload.startswith(b'{"type":"batch"'):
                st.messages += payload.count(MARK)
                if st.frames % st.sample == 0:
                    try:
                        for m in json.loads(payload)["messages"]:
                            if "ts" in m and m.get("t") in ("pos", "delta", "full"):
                                st.latencies.append(now - m["ts"])
                                if st.stamps is not None:
                                    st.stamps.append(now)
                    except ValueError:
                        pass
            elif payload.startswith(b"42["):          # socket.io event: one message each
                st.messages += payload.count(MARK)
                if st.frames % st.sample == 0:
                    try:
                        m = json.loads(payload[2:])[1]
                        if "ts" in m:
                            st.latencies.append(now - m["ts"])
                    except (ValueError, IndexError, TypeError):
                        pass

    def connection_lost(self, exc):
        self.stats.closed += 1


async def run(host, port, clients, seconds, path_fmt, subscribe_fmt, sample, seed, warmup,
              barrier=False, latencies_file=None):
    loop = asyncio.get_running_loop()
    stats = Stats(sample)
    rng = random.Random(seed)
    transports = []
    protocols = []
    t_conn = time.monotonic()
    gate = asyncio.Semaphore(64)  # handshakes in flight: enough to overlap, not a SYN flood

    async def one(i):
        async with gate:
            ready = loop.create_future()
            sub = subscribe_fmt(rng, i)
            try:
                t, proto = await loop.create_connection(
                    lambda: WSClient(f"{host}:{port}", path_fmt(i), sub, stats, ready), host, port)
                transports.append(t)
                protocols.append(proto)
                await asyncio.wait_for(ready, 30)
            except (OSError, asyncio.TimeoutError):
                stats.failed += 1
    await asyncio.gather(*(one(i) for i in range(clients)))
    deadline = time.monotonic() + 30
    while stats.connected + stats.failed < clients and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    connect_s = time.monotonic() - t_conn
    for i, proto in enumerate(protocols):
        proto.send_subscribe()
        if i % 100 == 99:
            await asyncio.sleep(0)
    # measure the steady state: after every subscription is answered
    wait_subs = any(p.subscribe.startswith(b'{"type":"subscribe"') for p in protocols[:1])
    deadline = time.monotonic() + 120
    while wait_subs and stats.subscribed < stats.connected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if barrier:
        # several load-generator processes: the orchestrator says `go` once
        # every one of them is connected and subscribed, so they measure together
        print("ready", flush=True, file=sys.stderr)
        await loop.run_in_executor(None, sys.stdin.readline)
    await asyncio.sleep(warmup)
    print("window", flush=True, file=sys.stderr)  # the orchestrator samples server CPU from here
    f0, m0, b0 = stats.frames, stats.messages, stats.bytes
    stats.max_frame = 0
    stats.latencies.clear()
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    dt = time.monotonic() - t0
    lat = np.array(stats.latencies) if stats.latencies else np.zeros(1)
    out = {
        "clients": clients, "connected": stats.connected, "failed": stats.failed,
        "closed_early": stats.closed, "connect_s": round(connect_s, 2), "seconds": round(dt, 2),
        "frames_per_s": round((stats.frames - f0) / dt),
        "deliveries_per_s": round((stats.messages - m0) / dt),
        "bytes_per_s": round((stats.bytes - b0) / dt),
        "latency_samples": int(len(stats.latencies)),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "max_frame_bytes": stats.max_frame,
    }
    if latencies_file:  # for percentiles merged across processes
        np.save(latencies_file, np.asarray(stats.latencies, dtype=np.float32))
    for t in transports:
        t.close()
    return out


def viewport_subscribe(fleet_bbox, area_fraction):
    """A random viewport covering `area_fraction` of the fleet's bounding box."""
    s, w, n, e = fleet_bbox
    side = area_fraction ** 0.5

    def make(rng, i):
        lat = s + rng.random() * (n - s) * (1 - side)
        lon = w + rng.random() * (e - w) * (1 - side)
        return json.dumps({"type": "subscribe", "subscriptions": {"geographic": {
            "bounds": {"south": lat, "west": lon, "north": lat + (n - s) * side,
                       "east": lon + (e - w) * side}, "zoom": 14}}}).encode()
    return make


def zoomed_out_subscribe(fleet_bbox):
    """A dispatcher's map zoomed out over the region (zoom 8 to 10, a map of
    ~640 x 384 px panned anywhere over the fleet), a quarter of them with a
    status filter: clustered (issue 14), a few hundred distinct views."""
    s, w, n, e = fleet_bbox

    def make(rng, i):
        zoom = rng.randint(8, 10)
        deg = 90.0 / 2 ** zoom
        h, wd = deg * 6, deg * 10
        lat = s - h / 2 + rng.random() * (n - s)
        lon = w - wd / 2 + rng.random() * (e - w)
        msg = {"type": "subscribe", "subscriptions": {"geographic": {
            "bounds": {"south": lat, "west": lon, "north": lat + h, "east": lon + wd}, "zoom": zoom}}}
        statuses = (["moving"], ["moving", "idle"], None, None)[i % 4]
        if statuses:
            msg["filters"] = {"status": statuses}
        return json.dumps(msg).encode()
    return make


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token", default="")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--warmup", type=float, default=2)
    p.add_argument("--sample", type=int, default=20)
    p.add_argument("--area", type=float, default=0.01)
    p.add_argument("--bbox", default="55.55,37.35,55.95,37.9", help="south,west,north,east of the fleet")
    p.add_argument("--subscribe", default="viewport",
                   choices=["viewport", "zoomed_out", "all", "none", "socketio"])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--deflate", action="store_true", help="offer permessage-deflate (idle runs)")
    p.add_argument("--barrier", action="store_true",
                   help="print `ready` when subscribed, wait for a line on stdin, then measure")
    p.add_argument("--latencies-file", help="save the window's latency samples (ms) here, .npy")
    a = p.parse_args()
    if a.deflate:
        WSClient.EXTENSIONS = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    bbox = tuple(float(x) for x in a.bbox.split(","))
    if a.subscribe == "viewport":
        sub = viewport_subscribe(bbox, a.area)
    elif a.subscribe == "zoomed_out":
        sub = zoomed_out_subscribe(bbox)
    elif a.subscribe == "all":
        def sub(rng, i):
            return json.dumps({"type": "subscribe", "subscriptions": {}}).encode()
    elif a.subscribe == "socketio":
        vp = viewport_subscribe(bbox, a.area)

        def sub(rng, i):
            bounds = json.loads(vp(rng, i))["subscriptions"]["geographic"]["bounds"]
            return b"42" + json.dumps(["subscribe", bounds]).encode()
    else:
        def sub(rng, i):
            return b""
    path = f"/ws?token={a.token}" if a.token else "/ws"
    if a.subscribe == "socketio":
        path = "/socket.io/?EIO=4&transport=websocket"
    res = uvloop.run(run(a.host, a.port, a.clients, a.seconds, lambda i: path, sub, a.sample, a.seed, a.warmup,
                         a.barrier, a.latencies_file))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
