"""Server-Sent Events: GET /api/realtime/stream (PROTOCOL §4).

For clients behind proxies that pass only plain HTTP responses. The same
client layer as WebSocket (realtime/client.py); this module only frames:
- `text/event-stream`, `Cache-Control: no-cache`, `X-Accel-Buffering: no`
  (nginx must not buffer the stream), a `retry:` line first;
- each `batch` as `event: batch`, `id: <seq>`, `data: <the JSON batch>`;
  `welcome`, `token_expiring`, `reconnect` and `error` as events of their own
  type; a comment line at least every 15 s for proxies.
A slow reader is conflated like a slow WebSocket: the hub looks at this
writer's transport buffer (`congested`), and over the hard limit it is
closed, to resume.

Two kinds of stream:
- without `session`: a connection of its own (SSEWriter), carrying every
  vehicle the token allows; `resume` and `last_event` resume as on
  WebSocket (§3.4);
- with `session=` (made by POST /api/realtime/session, transports/sessions.py):
  the stream reads that session's Mailbox (SessionStream), from the batch
  after `Last-Event-ID` (or `last_event_id=`) while it is kept, else from a
  new copy of the session (`welcome`, full state, the events since).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

from aiohttp import web

from .. import client
from .. import messages as M
from .._core._schema import FMT_JSON
from ..mailbox import KIND, PARTS, POS, SEQ
from ..session import Session
from . import cors
from ..address import of_request as client_address
from .base import StreamOutlet
from ..stores.base import StoresUnavailable
from .sessions import CLOSE_TAKEN, HttpError, HttpSessions, authenticate

log = logging.getLogger("realtime.sse")

COMMENT_EVERY_S = 15.0   # PROTOCOL §4: a comment at least every 15 s
RETRY_MS = 3000          # the browser's EventSource reconnects after this


def _chunk(data: bytes) -> bytes:
    """HTTP/1.1 chunked framing, written here in one buffer with the event:
    aiohttp prepared the response as chunked and writes its last chunk when
    the handler returns; in between, nothing of it writes to this transport."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(kind: str, seq: int, parts) -> bytes:
    """One SSE event, chunked: a batch carries `id: <seq>` (Last-Event-ID)."""
    head = b"event: batch\nid: %d\ndata: " % seq if seq else b"event: %s\ndata: " % kind.encode()[:40]
    return _chunk(b"".join((head, *parts, b"\n\n")))


def _closed_event(code: int, reason: str) -> bytes:
    return _event("error", 0, (json.dumps({"type": "error", "code": "closed", "close_code": code,
                                           "message": reason}).encode(),))


class SSEWriter(StreamOutlet):
    """Writes SSE events straight to the transport, one write each."""

    __slots__ = ("last_comment", "done")

    def __init__(self, transport, limit: int, hwm: int):
        self.transport = transport
        self.fmt = FMT_JSON
        self.deflate = True    # frames built here, in Python: the fan-out calls write_batch
        self.limit = limit
        self.hwm = hwm
        self.last_comment = time.monotonic()
        self.done = asyncio.Event()

    def _writable(self):
        t = self.transport
        if self.closed or t is None or t.is_closing():
            self.done.set()
            return None
        size = t.get_write_buffer_size()
        if size > self.limit:
            self.close(1013, "slow client: write buffer over limit")
            return None
        self.note_backlog(size)
        return t

    def write(self, payload: bytes) -> int:
        """A server message (`welcome`, `error`, …) as an event of its own type."""
        try:
            kind = str(json.loads(payload).get("type", "message"))
        except (ValueError, AttributeError):
            kind = "message"
        return self._put(_event(kind, 0, (payload,)))

    def write_batch(self, envelope_of, batch_id: bytes, body: bytes, req_id=None, more=False,
                    later=False) -> int:
        self.seq += 1
        prefix, suffix = envelope_of(FMT_JSON, batch_id, self.seq, req_id, more)
        return self._put(_event("batch", self.seq, (prefix, body, suffix)))

    def _put(self, data: bytes) -> int:
        t = self._writable()
        if t is None:
            return 0
        return self.sent(t, data)

    def keepalive(self, now: float, every_s: float, timeout_s: float) -> bool:
        """A comment line for the proxies on the way. The reader cannot answer:
        a dead one shows as a transport that closes (or a buffer over the limit)."""
        if now - self.last_comment >= min(every_s, COMMENT_EVERY_S) - 0.1:
            self.last_comment = now
            t = self._writable()
            if t is not None:
                t.write(_chunk(b": keepalive\n\n"))
        return True

    def close(self, code: int, reason: str) -> None:
        """An `error` event with the WebSocket-style code, then the end of the
        response (PROTOCOL §4: the same codes as §3.3)."""
        if self.done.is_set():   # (Session.close sets `closed` before it calls this)
            return
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(_closed_event(code, reason))
        self.closed = True
        self.done.set()


class SessionStream:
    """The reader of a session's Mailbox that an SSE stream with `session=`
    attaches: entries go to the socket as they are appended while it keeps
    up; once its socket buffer passes the high-water mark they wait in the
    Mailbox (unread: the hub conflates the session), and the stream's loop
    (pump) sends them as the socket drains."""

    __slots__ = ("transport", "cursor", "hwm", "last_comment", "done", "ended")

    def __init__(self, transport, cursor: int, hwm: int):
        self.transport = transport
        self.cursor = cursor        # the last position written to the socket
        self.hwm = hwm
        self.last_comment = time.monotonic()
        self.done = asyncio.Event()
        self.ended = None           # (code, reason) when the session's copy ended it

    def _open(self):
        t = self.transport
        if t is None or t.is_closing():
            self.done.set()
            return None
        return t

    def caught_up(self, box) -> bool:
        t = self._open()
        return t is not None and self.cursor == box.pos - 1 and t.get_write_buffer_size() <= self.hwm

    def send(self, entry) -> None:
        t = self._open()
        if t is not None:
            t.write(_event(entry[KIND], entry[SEQ], entry[PARTS]))
        self.cursor = entry[POS]

    def pump(self, box) -> None:
        """What is waiting in the Mailbox, while the socket takes it."""
        t = self._open()
        while t is not None and t.get_write_buffer_size() <= self.hwm and self.cursor < box.pos:
            entries = box.after(self.cursor, 256 * 1024)
            if not entries:
                break
            for e in entries:
                self.send(e)
            box.handed(self.cursor)

    def pending(self) -> int:
        t = self.transport
        return 0 if t is None or t.is_closing() else t.get_write_buffer_size()

    def congested_now(self) -> bool:
        return self.pending() > self.hwm // 4

    def keepalive(self, now: float, every_s: float) -> None:
        if now - self.last_comment >= min(every_s, COMMENT_EVERY_S) - 0.1:
            self.last_comment = now
            t = self._open()
            if t is not None:
                t.write(_chunk(b": keepalive\n\n"))

    def end(self, code: int, reason: str, say: bool = False) -> None:
        """The session's copy closed (its error entry is the last one to
        send), or (say=True: the `error` event is written here) another
        stream took the session or this one cannot go on without a gap."""
        if say and self.ended is None:
            t = self._open()
            if t is not None:
                t.write(_closed_event(code, reason))
        self.ended = (code, reason)
        self.done.set()


HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def handle(request: web.Request) -> web.StreamResponse:
    try:
        claims = authenticate(request, "sse")
        if request.query.get("session"):
            return await _session_stream(request, claims)
        return await _own_stream(request, claims)
    except HttpError as e:
        return e.response()


async def _own_stream(request: web.Request, claims) -> web.StreamResponse:
    """A stream that is a connection of its own (no `session=`)."""
    app = request.app
    hub = app["hub"]
    settings = app["settings"]
    if not claims.may_view_anything():
        # refused with 403, not a stream that ends at once: client.start's
        # check comes after the headers (an ACL may grant what the token does not)
        try:
            acl = await hub.stores.acl(claims.sub)
        except StoresUnavailable:
            raise HttpError(503, "unavailable", "rights cannot be checked now: try again", {"Retry-After": "1"}) from None
        if not claims.may_enter(acl):
            app["security"].of_request(request, "forbidden", "sse", "token grants no vehicles", claims.sub)
            raise HttpError(403, "forbidden", "token grants no vehicles")
    writer = SSEWriter(request.transport, settings.write_buffer_close_bytes, settings.slow_client_buffer_bytes)
    s = Session(writer, claims, FMT_JSON, settings.max_messages_per_s, "sse", client_address(request))
    refused = hub.admit(s)
    if refused:
        app["security"].of_request(request, "limit", "sse", refused, claims.sub)
        raise HttpError(429, "rate_limited", refused)
    resp = web.StreamResponse(headers={**HEADERS, **cors.headers_for(request)})
    reason = "client closed"
    opened = False
    try:
        await resp.prepare(request)
        request.transport.write(_chunk(b"retry: %d\n\n" % RETRY_MS))
        resume = request.query.get("resume") or None
        try:
            resumed = await client.start(hub, s, resume, request.query.get("last_event"))
        except client.Refused as r:
            writer.close(r.code, r.reason)
            return resp
        opened = True
        if not resumed:   # no session: every vehicle the token allows
            hub.subscribe(s, M.Subscribe(), reply=False)
        _log_connect(s, resumed)
        while not writer.done.is_set():
            t = writer.transport
            if t is None or t.is_closing():
                break
            try:   # woken by close(); else a look at the transport each second
                await asyncio.wait_for(writer.done.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
        return resp
    finally:
        if opened or s.row >= 0:
            reason = s.close_reason or reason
            client.close(hub, s, reason)
            _log_disconnect(s, reason)
        hub.unadmit(s)


def _last_event_id(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    if not raw:
        return None
    try:
        v = int(raw.strip())
    except ValueError:
        return None
    return v if v >= 0 else None


async def _session_stream(request: web.Request, claims) -> web.StreamResponse:
    """A stream reading a session's Mailbox (`session=`)."""
    app = request.app
    registry: HttpSessions = app["http_sessions"]
    settings = app["settings"]
    last_event = request.query.get("last_event") or None
    seq = _last_event_id(request)

    def serves(box) -> bool:
        if seq is None:
            # a stream that names no batch: this copy only while no reader has
            # had anything from it (what was written to a dead link may be lost)
            return box.read == box.origin
        # kept here (an id of another copy never is), and handed out: an id
        # past what any reader had is made up, and would skip what follows it
        at = box.index_of_seq(seq)
        return at is not None and at <= box.read
    # (find takes the token: a 403 comes before anything is acknowledged)
    h, reset = await registry.find(request, claims, request.query["session"], last_event, "sse", serves, seq)
    box = h.box
    if reset:
        start = box.first - 1
    elif seq is not None:
        start = box.index_of_seq(seq)
        if box.acknowledge_seq(seq):   # what the reader says it has
            registry.acknowledged(h, None)
    else:
        start = box.read    # what no reader has had yet
    resp = web.StreamResponse(headers={**HEADERS, **cors.headers_for(request)})
    await resp.prepare(request)
    t = request.transport
    t.write(_chunk(b"retry: %d\n\n" % RETRY_MS))
    if start > box.origin and not reset:
        # this stream's own welcome: the session goes on without a gap
        t.write(_event("welcome", 0, (json.dumps({
            "type": "welcome", "client": h.s.client_id, "session": h.s.session_id, "resumed": True,
            "recovered": True, "continued": True, "heartbeat_s": int(settings.heartbeat_s)}).encode(),)))
    stream = SessionStream(t, start, settings.slow_client_buffer_bytes)
    if box.reader is not None:
        box.reader.end(CLOSE_TAKEN, "another stream reads this session", say=True)
    box.supersede()
    box.reader = stream
    h.s.kind = "sse"
    _log_connect(h.s, not reset)
    try:
        # bytes written are not acknowledged (a dying link loses them): only
        # a reconnect's Last-Event-ID says what this reader has (mailbox.py)
        while not stream.done.is_set() and not box.closed:
            if stream.pending() > stream.hwm:
                await asyncio.sleep(0.05)
                stream._open()
                continue
            if not box.holds(stream.cursor):
                # a poll of the same session had these entries, and they are
                # gone: this stream cannot go on without a gap
                stream.end(CLOSE_TAKEN, "the session was read elsewhere: reconnect", say=True)
                break
            stream.pump(box)
            h.last_seen = time.monotonic()
            if stream.cursor >= box.pos:
                await box.wait(stream.cursor, 1.0)
                stream._open()
        return resp
    finally:
        if box.closed and box.holds(stream.cursor):   # the rest, up to its `error`
            stream.hwm = 1 << 62
            stream.pump(box)
        if box.reader is stream:
            box.reader = None
            h.s.kind = "long_poll"
        h.last_seen = time.monotonic()
        _log_disconnect(h.s, "stream ended" if stream.ended is None else stream.ended[1])


def _log_connect(s: Session, resumed: bool) -> None:
    log.info("connect", extra={"fields": {
        "event": "connect", "user": s.claims.sub, "client": s.client_id, "session": s.session_id,
        "transport": "sse", "peer": s.peer, "resumed": resumed}})


def _log_disconnect(s: Session, reason: str) -> None:
    log.info("disconnect", extra={"fields": {
        "event": "disconnect", "user": s.claims.sub, "client": s.client_id, "transport": "sse",
        "reason": reason, "duration_s": round(time.time() - s.connected_at, 3),
        "messages": s.messages_sent, "bytes": s.bytes_sent}})
