"""WebSocket transport: GET /ws (PROTOCOL §2, §3).

The handshake and inbound frames go through aiohttp. Outbound batches are
written synchronously by `RawWriter`, one `transport.write` per message, so
the hub's tick can fan out to thousands of sockets without a task or an await
per client. Control frames (ping, pong, close) stay with aiohttp; both sides
write whole frames, so they never interleave.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from urllib.parse import urlsplit

from aiohttp import WSCloseCode, WSMsgType, hdrs, web
from aiohttp.http import ws_ext_gen

from . import deflate
from .. import client
from .. import messages as M
from .._core._schema import FMT_JSON, FMT_MSGPACK
from ..address import of_request as client_address
from ..auth import AuthError
from ..session import CLOSE_WRITE_FAILED, Session
from .base import StreamOutlet, direct_fd

log = logging.getLogger("realtime.ws")

SUBPROTOCOLS = ("realtime.v1.json", "realtime.v1.msgpack")
CLOSE_TRY_AGAIN = 1013  # events could not be kept for a slow client: resume


RSV1 = 0x40  # "this message is compressed" under permessage-deflate
# What may wait to be compressed when another snapshot begins
# (RawWriter.write_batch), in write buffer limits
LATER_LIMITS = 2


def frame_header(first: int, n: int) -> bytes:
    """`first` is FIN | RSV1 | opcode."""
    if n < 126:
        return bytes((first, n))
    if n < 65536:
        return bytes((first, 126)) + n.to_bytes(2, "big")
    return bytes((first, 127)) + n.to_bytes(8, "big")


class DeflateResponse(web.WebSocketResponse):
    """Accepts a permessage-deflate offer, always with server_no_context_takeover
    (RFC 7692 §7.1.1.1 lets the server add it), so that no compressor is kept
    per connection; see deflate.py. Bodies are compressed once for every
    client with a deflate.WBITS window: an offer whose server_max_window_bits
    is smaller is declined (§7.1.2.1), and that client is served uncompressed."""

    def _handshake(self, request):
        headers, protocol, compress, notakeover = super()._handshake(request)
        if compress and compress < deflate.WBITS:
            headers.pop(hdrs.SEC_WEBSOCKET_EXTENSIONS, None)
            return headers, protocol, 0, False
        if compress:
            headers[hdrs.SEC_WEBSOCKET_EXTENSIONS] = ws_ext_gen(
                compress=compress, isserver=True, server_notakeover=True)
        return headers, protocol, compress, True


class RawWriter(StreamOutlet):
    """Writes unmasked server frames straight to the transport, compressed when
    permessage-deflate was negotiated and the message is big enough. Its write
    state (seq, counters, limits, flags) is the compiled Outlet's, which the
    tick's fan-out (_core/_fanout.pyx) uses without this Python side."""

    __slots__ = ("opcode", "loop", "deflate_from", "last_seen", "last_ping", "close_started",
                 "_later", "_later_bytes", "_compressing", "_in_parts")

    def __init__(self, ws: web.WebSocketResponse, transport, fmt: int, limit: int,
                 deflate_from: int | None = None, hwm: int = 256 * 1024):
        self.ws = ws
        self.transport = transport
        self.fd = direct_fd(transport)
        self.fmt = fmt
        self.opcode = 0x80 | (0x2 if fmt == FMT_MSGPACK else 0x1)
        self.limit = limit      # hard limit: close 1013
        self.hwm = hwm          # high-water mark: the hub conflates above it
        self.last_seen = self.last_ping = time.monotonic()
        self.loop = asyncio.get_running_loop()
        # None: not negotiated; else the smallest message worth compressing
        self.deflate_from = deflate_from if ws.compress else None
        self.deflate = self.deflate_from is not None
        self.close_started = False
        # Messages to compress in later turns of the loop, in order: see write_batch
        self._later: deque[tuple[bytes, bytes, bytes]] = deque()
        self._later_bytes = 0
        self._compressing = False
        self._in_parts = False   # the parts of one snapshot are being written

    def _closing(self, t) -> bool:
        """Either side has begun to close: write nothing more. close_started
        too, as aiohttp's close task may not have run yet, and a message
        after those the close dropped would leave the client a gap."""
        return t is None or t.is_closing() or self.ws.closed or self.close_started

    def _writable(self):
        t = self.transport
        if self._closing(t):
            return None
        size = t.get_write_buffer_size()
        if size > self.limit:
            # Conflation keeps the buffer near the high-water mark; only
            # replies and events can push it this far. Close so that it resumes.
            self.close(CLOSE_TRY_AGAIN, "slow client: write buffer over limit")
            return None
        # What waits to be compressed is backlog too (the hub conflates on
        # it), but not toward the limit: it becomes far fewer bytes, and
        # _write_one_later holds the buffer to the limit as it writes.
        self.note_backlog(size + self._later_bytes)
        return t

    def control(self, opcode: int, payload: bytes) -> None:
        """A pong (0xA) answering a ping; control payloads are at most 125 bytes.
        Held to the write buffer's limit as any write: a client that sends
        pings and never reads would otherwise grow it without end."""
        t = self._writable()
        if t is not None:
            t.write(bytes((0x80 | opcode, len(payload))) + payload)

    def keepalive(self, now: float, every_s: float, timeout_s: float) -> bool:
        """PROTOCOL §3.3: a ping every `every_s`; False when nothing (no pong,
        no other frame) arrived for `timeout_s`, and the caller closes."""
        if now - self.last_seen > timeout_s:
            return False
        if now - self.last_ping >= every_s - 0.1:   # the caller's sweep runs ~once a second
            self.last_ping = now
            t = self.transport
            if t is not None and not t.is_closing():
                t.write(b"\x89\x00")  # ping, empty payload
        return True

    def write(self, payload: bytes) -> int:
        """One message; returns the bytes put on the wire."""
        return self.write_parts(b"", payload, b"")

    def write_batch(self, envelope_of, batch_id: bytes, body: bytes, req_id=None, more=False,
                    later=False) -> int:
        """The next `batch`: envelope_of (CoreBase.envelope) puts this
        connection's seq (and request id) around the shared body. The hub's
        tick writes uncompressed batches in _core/_fanout.pyx, the same frames.
        later: one of several parts of a snapshot or catch-up (Session.send_batch).
        Under permessage-deflate it is compressed in a later turn of the loop,
        one part a turn: the 16 parts of a 20k-vehicle snapshot compressed in
        one go held the loop ~300 ms, and every other client's tick with it."""
        self.seq += 1
        prefix, suffix = envelope_of(self.fmt, batch_id, self.seq, req_id, more)
        if later and self.deflate_from is not None:
            first, self._in_parts = not self._in_parts, more
            if first and self._later_bytes > LATER_LIMITS * self.limit:
                # another snapshot while this much of earlier ones still
                # waits (a subscribe loop): memory, not the socket, fills.
                # Checked as a snapshot begins, so none is ever cut.
                self._stop_later(CLOSE_TRY_AGAIN, "slow client: too much waiting to be compressed")
                return 0
        return self.write_parts(prefix, body, suffix, later)

    def write_parts(self, prefix: bytes, body: bytes, suffix: bytes, later: bool = False) -> int:
        """prefix + body + suffix as one frame, in one buffer (uvloop's fast
        path: a list of buffers costs a write context). Under permessage-deflate
        a body shared by many connections is compressed once for all of them.
        Whatever comes while messages wait to be compressed waits behind them,
        so the client gets every message in the order it was written."""
        t = self._writable()
        if t is None:
            return 0
        n = len(prefix) + len(body) + len(suffix)
        if self._later or (later and self.deflate_from is not None and n >= self.deflate_from):
            self._later.append((prefix, body, suffix))
            self._later_bytes += n
            if not self._compressing:
                self._compressing = True
                self.loop.call_soon(self._write_one_later)
            return n
        return self.sent(t, self._frame(prefix, body, suffix, n))

    def _frame(self, prefix: bytes, body: bytes, suffix: bytes, n: int) -> bytes:
        if self.deflate_from is not None and n >= self.deflate_from:
            payload = deflate.envelope_message(prefix, body, suffix)
            return frame_header(self.opcode | RSV1, len(payload)) + payload
        return b"".join((frame_header(self.opcode, n), prefix, body, suffix))

    def _write_one_later(self) -> None:
        """One waiting message, compressed and written; the next one in the
        next turn of the loop. A connection that is closing (by either side)
        drops what waits: nothing may follow its close frame."""
        self._compressing = False
        if not self._later:
            return
        t = self.transport
        if self._closing(t):
            self._drop_later()
            return
        if t.get_write_buffer_size() > self.limit:
            self._stop_later(CLOSE_TRY_AGAIN, "slow client: write buffer over limit")
            return
        if self._write_later_one(t) and self._later:
            self._compressing = True
            self.loop.call_soon(self._write_one_later)

    def _write_later_one(self, t) -> bool:
        prefix, body, suffix = self._later.popleft()
        n = len(prefix) + len(body) + len(suffix)
        self._later_bytes -= n
        try:
            self.sent(t, self._frame(prefix, body, suffix, n))
            return True
        except Exception as e:   # this connection's fault alone: it resumes
            Session.write_errors += 1
            log.warning("write failed; closing the connection", extra={"fields": {
                "event": "write_error", "transport": "websocket", "error": repr(e)[:200]}})
            self._stop_later(CLOSE_WRITE_FAILED, "write failed: resume")
            return False

    def _drop_later(self) -> None:
        self._later.clear()
        self._later_bytes = 0

    def _stop_later(self, code: int, reason: str) -> None:
        """Close (the client resumes and gets what it missed); the tick's
        fan-out stops writing to it at once, as after any failed write."""
        self._drop_later()
        self.closed = True
        self.close(code, reason)

    def pending(self) -> int:
        return super().pending() + self._later_bytes

    def congested_now(self) -> bool:
        return super().congested_now() or self._later_bytes > self.hwm // 4

    def close(self, code: int, reason: str) -> None:
        # once: every write (a pong per ping) over the limit would close again
        # until aiohttp's close has begun, each a task and a log line
        if not self.ws.closed and not self.close_started:
            if self._later and (code == 1000 or code == 1001):
                # a shutdown's `reconnect` (§5) and what came before it go
                # out ahead of the close frame, whatever waited
                t = self.transport
                while self._later and t is not None and not t.is_closing():
                    if not self._write_later_one(t):
                        return
            self._drop_later()
            self.close_started = True
            if code != 1000 and code != 1001:
                log.warning("connection closed by the server", extra={"fields": {
                    "event": "send_error" if code == CLOSE_TRY_AGAIN else "close",
                    "code": code, "reason": reason}})
            self.loop.create_task(self.ws.close(code=code, message=reason.encode()[:120]))


def _drop_http_parser(request: web.Request) -> None:
    """After the upgrade aiohttp reads frames with its WebSocket reader and no
    longer touches the HTTP parser (it sets it to None itself on close), but
    keeps it: ~1 KB per connection. Let it go now (benchmark (c))."""
    proto = request.protocol
    if getattr(proto, "_upgraded", False) and getattr(proto, "_payload_parser", None) is not None:
        proto._parser = None


def _format_of(request: web.Request, ws_protocol: str | None) -> int | None:
    if ws_protocol == "realtime.v1.msgpack":
        return FMT_MSGPACK
    if ws_protocol == "realtime.v1.json":
        return FMT_JSON
    f = request.query.get("format", "json")
    return {"json": FMT_JSON, "msgpack": FMT_MSGPACK}.get(f)


def _origin_allowed(request: web.Request, allowed: str | None) -> bool:
    """--allowed-origins: a comma-separated list; unset or `*` allows any.
    Clients that send no Origin (not browsers) are not affected."""
    if not allowed or allowed.strip() == "*":
        return True
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin_key(origin) in {origin_key(o) for o in allowed.split(",")}


def origin_key(origin: str) -> str:
    """An origin as browsers send it: scheme and host in lower case, no
    default port, no trailing slash, so that `https://Dispatch.example.com:443/`
    in --allowed-origins matches `https://dispatch.example.com`."""
    u = urlsplit(origin.strip().rstrip("/"))
    try:
        port = u.port
    except ValueError:
        return origin.strip()
    scheme, host = u.scheme.lower(), (u.hostname or "")
    if ":" in host:
        host = f"[{host}]"
    if port is None or (scheme, port) in (("http", 80), ("https", 443)):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def _token_of(request: web.Request) -> str | None:
    token = request.query.get("token")
    if token:
        return token
    h = request.headers.get("Authorization", "")
    if h.lower().startswith("bearer "):
        return h[7:].strip()
    return None


async def _first_message_auth(ws: web.WebSocketResponse, timeout: float) -> str:
    """PROTOCOL §2: {"type":"auth","token":…} as the first message within 10 s.
    Raises AuthError (4001) saying what came instead."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            msg = await asyncio.wait_for(ws.receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
        except asyncio.TimeoutError:
            raise AuthError(f"no auth message within {timeout:g} s") from None
        if msg.type == WSMsgType.PING:      # autoping is off: answered here until auth
            await ws.pong(msg.data)
            continue
        if msg.type != WSMsgType.PONG:
            break
    if msg.type == WSMsgType.ERROR and getattr(ws.exception(), "code", None) == WSCloseCode.MESSAGE_TOO_BIG:
        raise AuthError("the auth message is over the size limit", kind="limit")
    if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
        raise AuthError("closed before its auth message")
    try:
        m = M.parse(msg.data, msg.type == WSMsgType.BINARY)
    except M.ProtocolError:
        m = None
    if not isinstance(m, M.Auth) or not m.token:
        raise AuthError("missing token: the first message must be auth")
    return m.token


async def handle(request: web.Request) -> web.StreamResponse:
    app = request.app
    hub = app["hub"]
    settings = app["settings"]
    authn = app["auth"]
    ws = DeflateResponse(
        protocols=SUBPROTOCOLS,
        # aiohttp refuses a frame of max_msg_size bytes; §3.3 allows "at most 64 KiB"
        max_msg_size=settings.max_message_bytes + 1,
        heartbeat=None,   # the hub's once-a-second sweep pings (RawWriter.keepalive)
        compress=settings.ws_deflate == "on",
        autoping=False,   # pongs are seen here, as liveness
    )
    await ws.prepare(request)
    _drop_http_parser(request)
    if not _origin_allowed(request, settings.allowed_origins):
        app["security"].of_request(request, "origin_refused", "websocket",
                                   "origin " + request.headers.get("Origin", "(none)")[:100])
        await ws.close(code=4003, message=b"origin not allowed")
        return ws
    fmt = _format_of(request, ws.ws_protocol)
    if fmt is None:
        await ws.close(code=WSCloseCode.PROTOCOL_ERROR, message=b"format must be json or msgpack")
        return ws
    peer = client_address(request)
    # a socket waiting for its `auth` message already counts against its
    # address: thousands of silent sockets must not pass the per-IP limit
    refused = hub.take_address(peer)
    if refused:
        app["security"].of_request(request, "limit", "websocket", refused)
        await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=refused.encode())
        return ws
    try:
        token = _token_of(request)
        if token is None:
            token = await _first_message_auth(ws, settings.auth_timeout_s)
        claims = authn.decode(token)   # its rights with the live ACL: client.start
    except AuthError as e:
        hub.release_address(peer)
        app["security"].of_request(request, e.kind, "websocket", str(e), e.user)
        await ws.close(code=e.close_code, message=str(e).encode()[:120])
        return ws
    except BaseException:
        hub.release_address(peer)
        raise

    writer = RawWriter(ws, request.transport, fmt, settings.write_buffer_close_bytes,
                       settings.deflate_min_bytes, settings.slow_client_buffer_bytes)
    s = Session(writer, claims, fmt, settings.max_messages_per_s, "websocket", peer)
    refused = hub.admit(s, address_taken=True)
    if refused:
        app["security"].of_request(request, "limit", "websocket", refused, claims.sub)
        await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=refused.encode())
        return ws
    # the per-IP and per-user counts are taken in admit(): released on every way out
    close_reason = "client closed"
    opened = False
    try:
        try:
            resumed = await client.start(hub, s, request.query.get("resume") or None,
                                        request.query.get("last_event"))
        except client.Refused as r:
            await ws.close(code=r.code, message=r.reason.encode()[:120])
            return ws
        opened = True
        log.info("connect", extra={"fields": {
            "event": "connect", "user": claims.sub, "client": s.client_id, "session": s.session_id,
            "transport": "websocket", "format": "msgpack" if fmt == FMT_MSGPACK else "json",
            "peer": s.peer, "resumed": resumed, "deflate": writer.deflate_from is not None}})
        async for msg in ws:
            writer.last_seen = time.monotonic()
            if msg.type == WSMsgType.PING:
                writer.control(0xA, msg.data)
                continue
            if msg.type == WSMsgType.PONG:
                continue
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                if len(msg.data) > settings.max_message_bytes:
                    # aiohttp lets one byte more through a compressed frame (its
                    # limit is max_msg_size, one above ours, for uncompressed ones)
                    close_reason = "message too big"
                    hub.security.report("limit", "websocket", s.peer, "message size", claims.sub, s.client_id)
                    await ws.close(code=WSCloseCode.MESSAGE_TOO_BIG, message=b"message too big")
                    break
                try:
                    await client.command(hub, authn, s, msg.data, msg.type == WSMsgType.BINARY)
                except client.Refused as r:
                    close_reason = "rate limit"
                    s.closed = True
                    await ws.close(code=r.code, message=r.reason.encode()[:120])
                    break
            elif msg.type == WSMsgType.ERROR:
                close_reason = f"error: {ws.exception()}"
                if getattr(ws.exception(), "code", None) == WSCloseCode.MESSAGE_TOO_BIG:
                    hub.security.report("limit", "websocket", s.peer, "message size", claims.sub, s.client_id)
                break
        return ws
    finally:
        if opened or s.row >= 0:
            reason = s.close_reason or close_reason
            if ws.close_code is not None and not s.close_reason:
                reason = f"{close_reason} ({ws.close_code})"
            client.close(hub, s, reason)
            log.info("disconnect", extra={"fields": {
                "event": "disconnect", "user": claims.sub, "client": s.client_id,
                "transport": "websocket", "reason": reason,
                "duration_s": round(time.time() - s.connected_at, 3),
                "messages": s.messages_sent, "bytes": s.bytes_sent}})
        hub.unadmit(s)
