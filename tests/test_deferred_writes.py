"""The parts of a snapshot or catch-up that cost real work to build are built
in later turns of the event loop, one a turn, in order (RawWriter.write_batch
under permessage-deflate, GrpcOutlet.take): a 20k-vehicle snapshot built in
one go held every other client's tick for ~300 ms (test_large_work).

In process, on a real event loop, with a stand-in for the uvloop transport
and aiohttp's WebSocketResponse (the two things RawWriter writes through),
so that each turn of the loop can be looked at. tests/test_deflate.py and
tests/test_grpc.py check the same against a real server and clients."""
import asyncio
import json
import zlib

import pytest

from realtime._core._base import CoreBase
from realtime._core._schema import FMT_JSON
from realtime.session import Session
from realtime.transports import grpc_wire as wire
from realtime.transports.grpc_stream import BodyCache, GrpcOutlet
from realtime.transports.websocket import LATER_LIMITS, RawWriter

envelope = CoreBase.envelope


class Transport:
    """What RawWriter asks of a uvloop transport; `buffered` is the socket's backlog."""
    def __init__(self):
        self.frames: list[bytes] = []
        self.buffered = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.frames.append(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name, default=None):
        return default


class WS:
    """What RawWriter asks of aiohttp's WebSocketResponse."""
    compress = 15

    def __init__(self, transport: Transport):
        self.transport, self.closed, self.codes = transport, False, []

    async def close(self, code: int, message: bytes) -> None:
        self.closed = True
        self.codes.append(code)
        self.transport.frames.append(b"close %d" % code)


def message(frame: bytes):
    """A server frame (unmasked) -> its message, inflated when RSV1 says so."""
    if frame.startswith(b"close"):
        return frame.decode()
    n, at = frame[1] & 0x7F, 2
    if n == 126:
        n, at = int.from_bytes(frame[2:4], "big"), 4
    elif n == 127:
        n, at = int.from_bytes(frame[2:10], "big"), 10
    payload = frame[at:]
    assert len(payload) == n
    if frame[0] & 0x40:
        payload = zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")
    return json.loads(payload)


def body(first: int, n: int) -> bytes:
    """A batch body of n `full`s, big enough to be compressed."""
    return json.dumps([{"t": "full", "v": f"v{i:05d}", "pad": "x" * 100} for i in range(first, first + n)]).encode()


async def turn():
    await asyncio.sleep(0)


def writer(limit=1 << 20) -> tuple[RawWriter, Transport, WS]:
    t = Transport()
    ws = WS(t)
    return RawWriter(ws, t, FMT_JSON, limit, deflate_from=512), t, ws


def seqs(t: Transport) -> list:
    return [m.get("seq") if isinstance(m, dict) else m for m in map(message, t.frames)]


async def test_parts_are_compressed_one_a_turn_and_what_follows_waits_behind_them():
    w, t, _ = writer()
    w.write_batch(envelope, b"b", body(0, 50), None, True, True)
    w.write_batch(envelope, b"b", body(50, 50), None, False, True)
    w.write_batch(envelope, b"b", body(100, 10))          # a tick: waits behind
    w.write(json.dumps({"type": "pong"}).encode())         # a reply: waits too
    assert t.frames == [] and w.pending() > 0 and w.congested_now() is False
    written = []
    for _ in range(4):
        await turn()
        written.append(len(t.frames))
    assert written == [1, 2, 3, 4], "not one message a turn"
    got = [message(f) for f in t.frames]
    assert [m.get("seq") for m in got] == [1, 2, 3, None] and got[3] == {"type": "pong"}
    assert [m.get("more", False) for m in got[:3]] == [True, False, False]
    assert [x["v"] for m in got[:3] for x in m["messages"]] == [f"v{i:05d}" for i in range(110)]
    assert w.pending() == 0 and w.messages == 4 and w.nbytes == sum(map(len, t.frames))
    await turn()
    assert len(t.frames) == 4
    # with nothing waiting, a tick and a lone part go out at once
    w.write_batch(envelope, b"b", body(0, 10))
    w.write_batch(envelope, b"b", body(0, 10), None, False, False)
    assert len(t.frames) == 6


async def test_a_shutdown_close_writes_what_waits_then_closes():
    """§5: `reconnect` goes out before the 1001 close frame, whatever waited ahead of it."""
    w, t, ws = writer()
    w.write_batch(envelope, b"b", body(0, 50), None, True, True)
    w.write_batch(envelope, b"b", body(50, 50), None, False, True)
    w.write(json.dumps({"type": "reconnect", "after_ms": 100}).encode())
    w.close(1001, "server shutting down")
    await turn()
    await turn()
    assert seqs(t) == [1, 2, None, "close 1001"] and message(t.frames[2])["type"] == "reconnect"
    assert w.pending() == 0


@pytest.mark.parametrize("how", ["server closes", "client closed", "transport closing"])
async def test_nothing_that_waits_is_written_once_the_connection_closes(how):
    w, t, ws = writer()
    w.write_batch(envelope, b"b", body(0, 50), None, True, True)
    w.write_batch(envelope, b"b", body(50, 50), None, False, True)
    await turn()
    assert len(t.frames) == 1
    if how == "server closes":
        w.close(1013, "slow client")
    elif how == "client closed":
        ws.closed = True
    else:
        t.closing = True
    for _ in range(3):
        await turn()
    assert seqs(t) == [1] + (["close 1013"] if how == "server closes" else [])
    assert w.pending() == 0


async def test_a_client_whose_socket_backlog_passes_the_limit_meanwhile_is_closed():
    w, t, ws = writer(limit=100_000)
    w.write_batch(envelope, b"b", body(0, 50), None, True, True)
    w.write_batch(envelope, b"b", body(50, 50), None, False, True)
    t.buffered = 100_001
    for _ in range(3):
        await turn()
    assert seqs(t) == ["close 1013"] and w.closed and w.pending() == t.buffered   # none waits


async def test_snapshots_asked_for_faster_than_they_are_compressed_close_the_client():
    """What waits is bounded (LATER_LIMITS write buffer limits, checked as a
    snapshot begins: one snapshot is never cut, however large), not only the
    socket's backlog. Once closed, nothing more is written: a later message
    after the dropped ones would leave the client a gap it resumes past."""
    limit = 100_000
    w, t, ws = writer(limit=limit)
    part = body(0, 700)
    parts = LATER_LIMITS * limit // len(part) + 2
    for i in range(parts):   # one snapshot bigger than the bound: whole
        w.write_batch(envelope, b"b", part, None, i < parts - 1, True)
    assert not w.closed and w.pending() > LATER_LIMITS * limit
    assert w.write_batch(envelope, b"b", part, None, True, True) == 0   # the next one begins
    assert w.closed and w.pending() == 0
    assert w.write(json.dumps({"type": "pong"}).encode()) == 0          # the same turn: nothing
    w.write_batch(envelope, b"b", body(0, 10))
    for _ in range(3):
        await turn()
    assert seqs(t) == ["close 1013"]


async def test_a_snapshot_behind_a_small_backlog_is_taken():
    w, t, _ = writer(limit=100_000)
    for rnd in range(2):
        w.write_batch(envelope, b"b", body(0, 50), None, True, True)
        w.write_batch(envelope, b"b", body(50, 50), None, False, True)
    for _ in range(5):
        await turn()
    assert seqs(t) == [1, 2, 3, 4] and not w.closed


async def test_grpc_parts_are_converted_when_taken_in_order_and_counted():
    cache = BodyCache()
    out = GrpcOutlet(cache, 1 << 20, 256 << 10)
    import msgpack
    packed = [msgpack.packb([{"t": "full", "v": f"v{i}", "p": [55.0, 37.0], "ts": 1}]) for i in range(3)]
    out.write_batch(envelope, b"b", packed[0], None, True, True)
    out.write_batch(envelope, b"b", packed[1], None, False, True)
    out.write_batch(envelope, b"b", packed[2])
    assert isinstance(out.queue[0], tuple) and isinstance(out.queue[2], bytes)
    taken = [out.take() for _ in range(3)]
    assert taken == [wire.batch_head(b"b", 1, True) + wire.batch_body(packed[0]),
                     wire.batch_head(b"b", 2) + wire.batch_body(packed[1]),
                     wire.batch_head(b"b", 3) + wire.batch_body(packed[2])]
    assert out.queued == 0 and out.nbytes == sum(map(len, taken)) and out.messages == 3


@pytest.mark.parametrize("shutdown", [False, True])
async def test_a_grpc_part_that_fails_to_convert_closes_that_stream_for_a_resume(shutdown):
    """Nothing after it is sent, even when a shutdown's close (1001, which
    keeps the queue for `reconnect`) came first: the client would see a gap."""
    out = GrpcOutlet(BodyCache(), 1 << 20, 256 << 10)
    out.write_batch(envelope, b"b", b"\xc1 not msgpack", None, True, True)
    out.write_batch(envelope, b"b", b"\x90", None, False, True)
    if shutdown:
        out.close(1001, "server shutting down")
    errors = Session.write_errors
    assert out.take() is None
    assert out.ended == ((1001, "server shutting down") if shutdown else (1011, "write failed: resume"))
    assert not out.queue and out.queued == 0
    assert Session.write_errors == errors + 1
