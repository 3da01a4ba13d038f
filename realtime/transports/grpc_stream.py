"""gRPC streaming (PROTOCOL §4): `realtime.v1.Realtime/Stream` on
--grpc-port, with grpcio's asyncio server on the worker's event loop (uvloop;
checked: grpcio 1.85 runs there).

The same client layer as every other transport (realtime/client.py): the
call authenticates with `authorization: Bearer …` in its metadata, opens a
Session (resume with `session` and `last_event`), subscribes to the request,
then streams Batches. grpcio has no synchronous write, so the hub's writes go
to this call's queue (GrpcOutlet) and the call's own task sends them; the
queue's size is the measure of a slow reader, as a socket buffer is for the
others: over the high-water mark the hub conflates, over the hard limit the
call ends (UNAVAILABLE: resume).

Batches are written in protobuf without a protobuf runtime (grpc_wire.py):
the messages of a body shared by many clients are encoded once per tick.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import grpc
import msgpack
import msgspec
from grpc import aio

from . import grpc_wire as wire
from .. import client
from .. import messages as M
from .._core._fanout import Outlet
from .._core._schema import FMT_MSGPACK
from ..auth import AuthError
from ..session import CLOSE_WRITE_FAILED, Session

log = logging.getLogger("realtime.grpc")

# what grpc's abort raises when the call ended before its status could go
# (the client of a lingering call went): not an error of ours. grpc's own
# module, not its API: without it such an end is logged as an error again.
try:
    from grpc._cython.cygrpc import ExecuteBatchError as _BATCH_FAILED
except ImportError:
    _BATCH_FAILED = ()

SERVICE = "realtime.v1.Realtime"

# WebSocket close codes (§3.3) -> how a call ends
_STATUS = {1001: grpc.StatusCode.UNAVAILABLE, 1013: grpc.StatusCode.UNAVAILABLE,
           1011: grpc.StatusCode.UNAVAILABLE, 1008: grpc.StatusCode.RESOURCE_EXHAUSTED,
           4001: grpc.StatusCode.UNAUTHENTICATED, 4403: grpc.StatusCode.PERMISSION_DENIED,
           4003: grpc.StatusCode.PERMISSION_DENIED,
           4404: grpc.StatusCode.NOT_FOUND}


class BodyCache:
    """Protobuf `messages` of the bodies written lately: a body shared by
    many clients is converted once, and so is each vehicle's message shared
    by many bodies. Keyed by the msgpack bytes themselves, so nothing goes
    stale (a vehicle's message changes bytes when the vehicle changes) and a
    `full` snapshot of one vehicle serves every client that subscribes in the
    same second; a first version emptied both at every tick, and each
    subscribe (a flush, so a tick) converted its whole snapshot again: 57% of
    a worker opening 500 streams. Bounded: emptied when either grows past
    its size."""

    BYTES = 32 << 20         # keys and values of both, about
    BODY_MAX = 64 * 1024     # bigger bodies (a large snapshot) are not kept whole: their pieces are

    def __init__(self):
        self.bodies: dict[bytes, bytes] = {}
        self.pieces = _Pieces()   # one vehicle's message, for every body that has it
        self.size = 0             # the bodies' bytes; the pieces count their own

    @property
    def bytes(self) -> int:
        return self.size + self.pieces.bytes

    def get(self, body: bytes) -> bytes:
        pb = self.bodies.get(body)
        if pb is None:
            if self.bytes > self.BYTES:
                self.bodies.clear()
                self.pieces = _Pieces()
                self.size = 0
            pb = wire.batch_body(body, self.pieces)
            if len(body) <= self.BODY_MAX:
                self.bodies[body] = pb
                self.size += len(body) + len(pb)
        return pb


class _Pieces(dict):
    """Raw msgpack of one message -> its protobuf, counting the bytes of
    both: a piece was counted as 200 bytes, but one with a driver and an
    assignment, or a 16 KiB event, is up to ~32 KiB, so the "32 MB" cache
    could hold gigabytes before it was emptied (found by a review)."""

    __slots__ = ("bytes",)

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __setitem__(self, raw: bytes, pb: bytes) -> None:
        super().__setitem__(raw, pb)
        self.bytes += len(raw) + len(pb)


class GrpcOutlet(Outlet):
    __slots__ = ("queue", "queued", "wake", "ended", "cache", "writing_since", "pump", "cut")

    def __init__(self, cache: BodyCache, limit: int, hwm: int):
        self.transport = None
        self.fmt = FMT_MSGPACK       # the core's bodies, converted by grpc_wire
        self.deflate = True          # frames built in Python: the fan-out calls write_batch
        self.limit = limit
        self.hwm = hwm
        self.cache = cache
        self.queue: deque[bytes | tuple[bytes, bytes]] = deque()
        self.queued = 0
        self.wake = asyncio.Event()
        self.ended = None            # (close code, reason) once closed
        # when the write in flight began (None: none is): a reader that takes
        # nothing (HTTP/2 flow control) leaves it there for good (keepalive)
        self.writing_since: float | None = None
        self.pump: asyncio.Future | None = None   # the stream's writes (_pump)
        self.cut: asyncio.Future | None = None    # set: closed with such a write in flight

    def write(self, payload: bytes) -> int:
        data = wire.notice(msgpack.unpackb(payload))
        return 0 if data is None else self._put(data)

    def write_batch(self, envelope_of, batch_id: bytes, body: bytes, req_id=None, more=False,
                    later=False) -> int:
        """later: one of several parts of a snapshot or catch-up, converted
        when the stream takes it (take()), each in a turn of the loop of its
        own: converting a 20k-vehicle snapshot's 20 parts at once held the
        loop as long as compressing them did on WebSocket (RawWriter)."""
        self.seq += 1
        head = wire.batch_head(batch_id, self.seq, more)
        if later:
            return self._put((head, body), len(head) + len(body))
        return self._put(head + self.cache.get(body))

    def _put(self, item, n: int | None = None) -> int:
        """item: the bytes to write, or (head, msgpack body) to convert later."""
        if self.ended is not None:
            return 0
        if n is None:
            n = len(item)
        self.queue.append(item)
        self.queued += n
        self.messages += 1
        self.nbytes += n
        if self.queued > self.limit:
            self.close(1013, "slow reader: queue over the limit; resume")
            return 0
        self.note_backlog(self.queued)
        self.wake.set()
        return n

    def take(self) -> bytes | None:
        """The next message to write, in the order written; None when its
        conversion failed and the stream closes (1011: the client resumes),
        as a failed write_batch closed it before conversion was put off."""
        item = self.queue.popleft()
        if type(item) is not tuple:
            self.queued -= len(item)
            return item
        head, body = item
        self.queued -= len(head) + len(body)
        try:
            data = head + self.cache.get(body)
        except Exception as e:
            Session.write_errors += 1
            log.warning("write failed; closing the stream", extra={"fields": {
                "event": "write_error", "transport": "grpc", "error": repr(e)[:200]}})
            self.close(CLOSE_WRITE_FAILED, "write failed: resume")
            # closed already (a shutdown's 1001 keeps the queue): nothing
            # after a part that cannot go, or the client would see a gap
            self.queue.clear()
            self.queued = 0
            return None
        self.nbytes += len(data) - len(head) - len(body)
        return data

    def pending(self) -> int:
        return self.queued

    def congested_now(self) -> bool:
        return self.queued > self.hwm // 4

    def keepalive(self, now: float, every_s: float, timeout_s: float) -> bool:
        """HTTP/2 keepalive pings (server options) find dead peers. A live
        one that stops reading is found here: a write that has not gone out
        for timeout_s (the hub then closes the stream, as for no pong; the
        client resumes). TCP_USER_TIMEOUT does not see it: the connection's
        other streams and pings still flow."""
        since = self.writing_since
        return since is None or now - since <= timeout_s

    def close(self, code: int, reason: str) -> None:
        if self.ended is None:
            self.ended = (code, reason)
            if code != 1001:
                # a shutdown's `reconnect` is sent first; otherwise what is
                # queued (up to the limit, for a slow reader) is dropped: the
                # client resumes and gets it from the event log
                self.queue.clear()
                self.queued = 0
            if code != 1001 and self.writing_since is not None and self.cut is not None:
                if not self.cut.done():   # the stream ends without that write
                    self.cut.set_result(None)
            self.wake.set()


def _token(context) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == "authorization" and isinstance(v, str) and v.lower().startswith("bearer "):
            return v[7:].strip()
    return None


class RealtimeService:
    def __init__(self, app):
        self.app = app
        self.hub = app["hub"]
        self.cache = BodyCache()

    def _address(self, context) -> str:
        """The client's address: the peer, or behind a trusted proxy the
        x-forwarded-for metadata it set (PROTOCOL §2)."""
        forwarded = [v for k, v in (context.invocation_metadata() or ()) if k == "x-forwarded-for"]
        return self.app["addresses"].client(_peer_address(context.peer()), forwarded)

    def _security(self, context, kind: str, reason: str, user: str | None = None) -> None:
        self.hub.security.report(kind, "grpc", self._address(context), reason, user)

    async def stream(self, request: bytes, context) -> None:
        app, hub = self.app, self.hub
        settings = app["settings"]
        try:
            claims = app["auth"].decode(_token(context))   # its rights with the live ACL: client.start
        except AuthError as e:
            self._security(context, e.kind, str(e), e.user)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED if e.forbidden
                                else grpc.StatusCode.UNAUTHENTICATED, str(e))
        try:
            body, session_id, last_event = wire.stream_request(request)
            sub = msgspec.convert(body, M.Subscribe)
        except (wire.WireError, msgspec.ValidationError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad StreamRequest: {e}"[:300])
        n = len(sub.subscriptions.vehicles) + len(sub.subscriptions.groups)
        if n > settings.max_subscription_size:
            self._security(context, "limit", "subscription size", claims.sub)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"subscription names {n} vehicles and "
                                f"groups; at most {settings.max_subscription_size}")
        out = GrpcOutlet(self.cache, settings.write_buffer_close_bytes, settings.slow_client_buffer_bytes)
        s = Session(out, claims, FMT_MSGPACK, settings.max_messages_per_s, "grpc", self._address(context))
        refused = hub.admit(s)
        if refused:
            self._security(context, "limit", refused, claims.sub)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
        opened = False
        reason = "client closed"
        released = lingering = False

        def release() -> None:
            """The session, its core row and its per-user slot: once."""
            nonlocal released
            if released:
                return
            released = True
            if opened or s.row >= 0:
                why = s.close_reason or reason
                client.close(hub, s, why)
                _log("disconnect", s, reason=why, duration_s=round(time.time() - s.connected_at, 3),
                     messages=s.messages_sent, bytes=s.bytes_sent)
            hub.unadmit(s)
        try:
            try:
                resumed = await client.start(hub, s, session_id or None, last_event or None)
            except client.Refused as r:
                await context.abort(_STATUS.get(r.code, grpc.StatusCode.UNAVAILABLE), r.reason)
            opened = True
            if not resumed or n or sub.subscriptions.geographic or _has_filters(sub):
                try:
                    # after a resume's snapshot, what changes; else every visible vehicle
                    await client.subscribe(hub, s, sub, full_all=not resumed)
                except M.ProtocolError as e:   # bounds the hub refuses (south above north, …)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)
            _log("connect", s, resumed=resumed)
            out.pump = asyncio.ensure_future(_pump(out, context))
            out.pump.add_done_callback(_retrieved)
            out.cut = asyncio.get_running_loop().create_future()
            await asyncio.wait((out.pump, out.cut), return_when=asyncio.FIRST_COMPLETED)
            if out.pump.done():
                out.pump.result()   # a write that raised ends the call as before
            code, reason = out.ended
            stuck = not out.pump.done()
            if stuck:
                # closed (no pong: out.keepalive) with a write in flight that
                # the reader does not take. grpc's write ends only with the
                # call, and the call's status waits behind that write, so what
                # the stream holds of this server is let go now: the session,
                # its row, what it held for a catch-up, the user's slot. grpc
                # keeps the call (and the one message in flight) until the
                # client reads or goes; it still counts against its address,
                # so that a client cannot pile such calls up without bound.
                release()
                lingering = hub.take_address(s.peer) is None
                if lingering:
                    hub.stats.grpc_lingering += 1
                s.known, s.held, s.cells, s.subscription = None, [], None, None
            try:
                await context.abort(_STATUS.get(code, grpc.StatusCode.UNAVAILABLE), reason)
            except _BATCH_FAILED:
                if not stuck:
                    raise
                # the stuck call's client went before it read: no status to send
        finally:
            if out.pump is not None and not out.pump.done():
                out.pump.cancel()   # the call ended (or was cancelled) with a write in flight
            release()
            if lingering:
                hub.stats.grpc_lingering -= 1
                hub.release_address(s.peer)


def _retrieved(task: asyncio.Future) -> None:
    """A pump the call did not wait for fails with the call: nothing to log."""
    if not task.cancelled():
        task.exception()


async def _pump(out: GrpcOutlet, context) -> None:
    """The stream's writes, in order, until it is closed. A task of its own,
    so that closing the stream can end a write the reader never takes."""
    while True:
        while out.queue:
            data = out.take()
            if data is not None:
                out.writing_since = time.monotonic()
                await context.write(data)
                out.writing_since = None
        if out.ended is not None:
            return
        out.wake.clear()
        if not out.queue and out.ended is None:
            await out.wake.wait()


def _has_filters(sub) -> bool:
    f = sub.filters
    return bool(f.status or f.vehicle_types) or f.show_alerts is False


def _peer_address(peer: str) -> str:
    """`ipv4:127.0.0.1:5555` / `ipv6:[::1]:5555` -> the address (per-IP limits)."""
    kind, _, rest = (peer or "").partition(":")
    host = rest.rpartition(":")[0] if kind in ("ipv4", "ipv6") else rest
    return host.strip("[]")


def _log(event: str, s: Session, **fields) -> None:
    log.info(event, extra={"fields": {"event": event, "user": s.claims.sub, "client": s.client_id,
                                      "session": s.session_id, "transport": "grpc", "peer": s.peer, **fields}})


async def start(app) -> aio.Server:
    """The gRPC server on --grpc-port (TLS with --tls-cert), sharing the port
    between workers (grpc sets SO_REUSEPORT)."""
    settings = app["settings"]
    service = RealtimeService(app)
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Stream": grpc.unary_stream_rpc_method_handler(
            service.stream, request_deserializer=None, response_serializer=None)})
    server = aio.server(options=[
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", int(settings.heartbeat_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.pong_timeout_s * 1000)),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 1),
    ])
    server.add_generic_rpc_handlers((handler,))
    address = grpc_address(settings.host, settings.grpc_port)
    if app.get("tls") is not None:   # SIGHUP reloads it (keys.Tls)
        server.add_secure_port(address, app["tls"].grpc_credentials())
    else:
        server.add_insecure_port(address)
    await server.start()
    log.info("gRPC listening on %s%s", address, " (TLS)" if settings.tls_cert else "")
    return server


def grpc_address(host: str, port: int) -> str:
    """host:port as grpcio reads it: an IPv6 literal in brackets (`::1:50051`
    is read as a host named that, on port 443)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
