"""Load generator for the fallback transports (PROTOCOL §4): SSE streams,
long pollers and gRPC streams, many from one process, like loadgen.py is for
WebSocket (same viewports, same --barrier protocol, same JSON line out).

- sse, poll: each client is a bare asyncio Protocol on uvloop speaking
  HTTP/1.1 keep-alive on one connection: `POST /api/realtime/session` with
  its viewport, then either `GET /api/realtime/stream?session=…` (counting
  messages in the event stream with bytes.count, no parsing) or polls in a
  loop (`GET /api/realtime/poll?session=…&cursor=…&timeout=…`, the next one
  as soon as an answer arrives);
- grpc: one channel (its own TCP connection) and one `Stream` call per
  client; a batch's messages are counted by walking its top-level fields.

`--idle` makes the pollers wait without traffic: the orchestrator reads the
server's RSS and CPU while 5,000 of them hold a request open.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import viewport_subscribe  # noqa: E402

MARK = b'"t":"'


class Stats:
    def __init__(self):
        self.messages = 0
        self.bytes = 0
        self.answers = 0      # poll responses, SSE chunks, gRPC batches
        self.ready = 0
        self.failed = 0
        self.waiting = 0      # polls held open by the server right now
        self.errors: dict[str, int] = {}


class HTTPClient(asyncio.Protocol):
    """POST a session, then stream (sse) or poll (poll) on the same connection."""

    def __init__(self, host, token, body: bytes, mode: str, timeout: float, stats: Stats,
                 ready: asyncio.Future):
        self.host, self.token, self.body, self.mode = host, token, body, mode
        self.timeout = timeout
        self.stats = stats
        self.ready = ready
        self.buf = bytearray()
        self.session = None
        self.cursor = 0
        self.streaming = False
        self.go = False
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        transport.write(b"POST /api/realtime/session HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n"
                        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                        % (self.host.encode(), self.token.encode(), len(self.body), self.body))

    def start(self):
        if self.session is None or self.transport.is_closing():
            return
        if self.mode == "sse":
            self.transport.write(b"GET /api/realtime/stream?session=%s HTTP/1.1\r\nHost: %s\r\n"
                                 b"Authorization: Bearer %s\r\n\r\n"
                                 % (self.session, self.host.encode(), self.token.encode()))
        else:
            self.poll()

    def poll(self):
        self.stats.waiting += 1
        self.transport.write(b"GET /api/realtime/poll?session=%s&cursor=%d&timeout=%g HTTP/1.1\r\n"
                             b"Host: %s\r\nAuthorization: Bearer %s\r\n\r\n"
                             % (self.session, self.cursor, self.timeout, self.host.encode(),
                                self.token.encode()))

    def data_received(self, data):
        st = self.stats
        if self.streaming:
            st.messages += data.count(MARK)
            st.bytes += len(data)
            st.answers += 1
            return
        buf = self.buf
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            if b"transfer-encoding: chunked" in head:      # the SSE stream
                self.streaming = True
                rest = bytes(buf[end + 4:])
                buf.clear()
                st.messages += rest.count(MARK)
                return
            i = head.find(b"content-length:")
            n = int(head[i + 15:].split(b"\r\n", 1)[0]) if i >= 0 else 0
            if len(buf) < end + 4 + n:
                return
            body = bytes(buf[end + 4:end + 4 + n])
            del buf[:end + 4 + n]
            status = head[9:12]
            if self.session is None:
                if status != b"201":
                    st.failed += 1
                    self.transport.close()
                    return
                self.session = json.loads(body)["session"].encode()
                st.ready += 1
                if not self.ready.done():
                    self.ready.set_result(True)
                continue
            st.waiting -= 1
            if status != b"200":
                st.failed += 1
                self.transport.close()
                return
            st.answers += 1
            st.messages += body.count(MARK)
            st.bytes += len(body)
            c = body.find(b'"cursor":')
            self.cursor = int(body[c + 9:body.index(b",", c)])
            self.poll()

    def connection_lost(self, exc):
        if self.session is None and not self.ready.done():
            self.ready.set_result(False)


async def grpc_client(target: str, token: str, request: bytes, stats: Stats, started: asyncio.Event,
                      ready: asyncio.Future, calls: list):
    from grpc import aio
    ch = aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
    stream = ch.unary_stream("/realtime.v1.Realtime/Stream", request_serializer=lambda b: b,
                             response_deserializer=lambda b: b)
    await started.wait()
    call = stream(request, metadata=(("authorization", f"Bearer {token}"),))
    calls.append((ch, call))
    try:
        async for data in call:
            if not ready.done():
                stats.ready += 1
                ready.set_result(True)
            stats.answers += 1
            stats.bytes += len(data)
            stats.messages += _grpc_messages(data)
    except Exception as e:
        if not ready.done():
            stats.failed += 1
            stats.errors[type(e).__name__ + ": " + str(getattr(e, "code", lambda: "")())] = \
                stats.errors.get(type(e).__name__ + ": " + str(getattr(e, "code", lambda: "")()), 0) + 1
            ready.set_result(False)


def _grpc_messages(data: bytes) -> int:
    """Batch.messages (field 3) at the top level of a Batch."""
    n, i, end = 0, 0, len(data)
    while i < end:
        key = data[i]
        i += 1
        if key & 7 == 2:
            size = shift = 0
            while True:
                c = data[i]
                i += 1
                size |= (c & 0x7F) << shift
                if c < 0x80:
                    break
                shift += 7
            i += size
            if key == 0x1A:
                n += 1
        else:   # a varint (seq)
            while data[i] & 0x80:
                i += 1
            i += 1
    return n


def _stream_request(sub: dict) -> bytes:
    from realtime.transports import grpc_wire as w
    b = sub["subscriptions"]["geographic"]["bounds"]
    bounds = w.d(1, b["north"]) + w.d(2, b["south"]) + w.d(3, b["east"]) + w.d(4, b["west"])
    geo = w.ld(1, bounds) + w.d(2, sub["subscriptions"]["geographic"]["zoom"])
    return w.ld(1, w.ld(3, geo))


async def run(a) -> dict:
    loop = asyncio.get_running_loop()
    stats = Stats()
    rng = random.Random(a.seed)
    bbox = tuple(float(x) for x in a.bbox.split(","))
    make = viewport_subscribe(bbox, a.area)
    protocols, transports, calls = [], [], []
    started = asyncio.Event()
    gate = asyncio.Semaphore(64)
    t_conn = time.monotonic()

    async def one(i):
        ready = loop.create_future()
        body = make(rng, i)
        if a.mode == "grpc":
            async with gate:   # streams open 64 at a time, as the HTTP clients connect
                asyncio.ensure_future(grpc_client(f"{a.host}:{a.grpc_port}", a.token,
                                                  _stream_request(json.loads(body)), stats, started, ready, calls))
                started.set()
                try:
                    await asyncio.wait_for(ready, 60)
                except asyncio.TimeoutError:
                    stats.failed += 1
            return
        async with gate:
            try:
                t, proto = await loop.create_connection(
                    lambda: HTTPClient(f"{a.host}:{a.port}", a.token, body, a.mode, a.poll_timeout, stats, ready),
                    a.host, a.port)
                transports.append(t)
                protocols.append(proto)
                await asyncio.wait_for(ready, 30)
            except (OSError, asyncio.TimeoutError):
                stats.failed += 1
    await asyncio.gather(*(one(i) for i in range(a.clients)))
    connect_s = time.monotonic() - t_conn
    for i, p in enumerate(protocols):
        p.start()
        if i % 100 == 99:
            await asyncio.sleep(0)
    if a.barrier:
        print("ready", flush=True, file=sys.stderr)
        await loop.run_in_executor(None, sys.stdin.readline)
    await asyncio.sleep(a.warmup)
    print("window", flush=True, file=sys.stderr)
    m0, b0, n0 = stats.messages, stats.bytes, stats.answers
    t0 = time.monotonic()
    await asyncio.sleep(a.seconds)
    dt = time.monotonic() - t0
    out = {"mode": a.mode, "clients": a.clients, "connected": stats.ready, "failed": stats.failed,
           "connect_s": round(connect_s, 2), "seconds": round(dt, 2),
           "deliveries_per_s": round((stats.messages - m0) / dt), "bytes_per_s": round((stats.bytes - b0) / dt),
           "answers_per_s": round((stats.answers - n0) / dt), "waiting_polls": stats.waiting,
           "errors": stats.errors}
    for t in transports:
        t.close()
    for ch, call in calls:
        call.cancel()
        await ch.close()
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--grpc-port", type=int)
    p.add_argument("--mode", choices=["sse", "poll", "grpc"], required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--warmup", type=float, default=2)
    p.add_argument("--poll-timeout", type=float, default=30)
    p.add_argument("--area", type=float, default=0.01)
    p.add_argument("--bbox", default="55.55,37.35,55.95,37.9")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--barrier", action="store_true")
    a = p.parse_args()
    print(json.dumps(uvloop.run(run(a))))


if __name__ == "__main__":
    main()
