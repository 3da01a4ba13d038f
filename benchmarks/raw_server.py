"""Baseline (1), the raw limit: a bare uvloop server that writes pre-encoded
batch frames, one `transport.write` per client per round, nothing else.

Each round builds one JSON `batch` frame of `--messages` `pos` messages whose
`ts` is now (so the load generator measures latency the same way), then
writes it to every client. `--tick-ms 0` writes rounds back to back: the
most deliveries per second the kernel and the load generator can move here.
With a tick, a round starts every `--tick-ms` from the start of the last
one, as realtime's tick loop does (one that is late starts at once, with no
burst to catch up).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import ctypes
import hashlib
import json
import os
import resource
import signal
import time

import uvloop

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B30"


def frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + payload


class Conn(asyncio.Protocol):
    clients: set = set()

    def connection_made(self, transport):
        self.t = transport
        self.buf = b""
        self.up = False

    def data_received(self, data):
        if self.up:
            return  # client frames (subscribe, pongs) are ignored
        self.buf += data
        if b"\r\n\r\n" not in self.buf:
            return
        key = next(line.split(b":", 1)[1].strip() for line in self.buf.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key"))
        acc = base64.b64encode(hashlib.sha1(key + GUID).digest())
        self.t.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + acc + b"\r\n\r\n")
        self.up = True
        Conn.clients.add(self.t)

    def connection_lost(self, exc):
        Conn.clients.discard(self.t)


async def main(port, messages, tick_ms, expect, reuse_port=False):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Conn, "127.0.0.1", port, backlog=4096, reuse_port=reuse_port)
    # start writing once the expected clients are in (or after 60 s): writing
    # back to back would otherwise starve the handshakes of the rest. Several
    # processes (--procs) get a share each that SO_REUSEPORT's hash decides:
    # they wait until theirs stops growing.
    deadline = time.monotonic() + 60
    last, still_since = -1, time.monotonic()
    while len(Conn.clients) < expect and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        if len(Conn.clients) != last:
            last, still_since = len(Conn.clients), time.monotonic()
        elif reuse_port and last > 0 and time.monotonic() - still_since > 1.0:
            break
    seq = 0
    template = [{"t": "pos", "v": f"veh_{i:05d}", "p": [55.751234, 37.612345], "s": 42.5, "c": 180,
                 "ts": 0} for i in range(messages)]
    period = tick_ms / 1000.0
    async with server:
        while True:
            # the period runs from a round's start: sleeping a whole tick after
            # the writes, one process with 1,000 clients delivered 11-13% less
            # than two with 500 each, so the two did not do the same job
            started = loop.time()
            seq += 1
            now = int(time.time() * 1000)
            for m in template:
                m["ts"] = now
            data = frame(json.dumps({"type": "batch", "batch_id": f"raw-{seq}", "seq": seq,
                                     "messages": template}, separators=(",", ":")).encode())
            for t in list(Conn.clients):
                if t.get_write_buffer_size() < 1 << 20:
                    t.write(data)
            await asyncio.sleep(max(0.0, started + period - loop.time()))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--messages", type=int, default=10)
    p.add_argument("--tick-ms", type=float, default=0)
    p.add_argument("--expect", type=int, default=0, help="clients to wait for before writing")
    p.add_argument("--procs", type=int, default=1,
                   help="processes sharing the port (SO_REUSEPORT), as realtime's --workers: the "
                        "baseline for what a second process costs on this machine")
    a = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if a.procs <= 1:
        uvloop.run(main(a.port, a.messages, a.tick_ms, a.expect))
    else:
        children = []
        parent = os.getpid()

        def stop(signum, frame):
            for c in children:
                try:
                    os.kill(c, signal.SIGKILL)
                except ProcessLookupError:   # it exited already
                    pass
            os._exit(0)   # no more forks; a child forked meanwhile dies with us (below)
        signal.signal(signal.SIGTERM, stop)   # before the forks: no window without it
        for _ in range(a.procs):
            pid = os.fork()
            if pid == 0:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                # killed with the parent, however it ends (a SIGKILL too):
                # a child left behind would serve the next run's port
                ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
                if os.getppid() != parent:   # the parent died before prctl
                    os._exit(0)
                uvloop.run(main(a.port, a.messages, a.tick_ms, a.expect, reuse_port=True))
                os._exit(0)
            children.append(pid)
        for c in children:
            os.waitpid(c, 0)
