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

Not yet (issue 11, parts 2 and 3): the session API (`session=` naming a
session made with POST /api/realtime/session) and `Last-Event-ID` resume inside
a session's buffer. Without `session` the stream carries every vehicle the
token allows, as PROTOCOL §4 says; `resume` and `last_event` resume as on
WebSocket (§3.4).
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
from ..auth import AuthError
from ..ingest.http import bearer
from ..session import Session
from .base import StreamOutlet

log = logging.getLogger("realtime.sse")

COMMENT_EVERY_S = 15.0   # PROTOCOL §4: a comment at least every 15 s
RETRY_MS = 3000          # the browser's EventSource reconnects after this


def _chunk(data: bytes) -> bytes:
    """HTTP/1.1 chunked framing, written here in one buffer with the event:
    aiohttp prepared the response as chunked and writes its last chunk when
    the handler returns; in between, nothing of it writes to this transport."""
    return b"%x\r\n%s\r\n" % (len(data), data)


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
        self.congested = size > self.hwm
        return t

    def write(self, payload: bytes) -> int:
        """A server message (`welcome`, `error`, …) as an event of its own type."""
        try:
            kind = str(json.loads(payload).get("type", "message"))
        except (ValueError, AttributeError):
            kind = "message"
        return self._put(b"event: %s\ndata: %s\n\n" % (kind.encode()[:40], payload))

    def write_batch(self, envelope_of, batch_id: bytes, body: bytes, req_id=None) -> int:
        self.seq += 1
        prefix, suffix = envelope_of(FMT_JSON, batch_id, self.seq, req_id)
        return self._put(b"".join((b"event: batch\nid: %d\ndata: " % self.seq, prefix, body, suffix, b"\n\n")))

    def _put(self, data: bytes) -> int:
        t = self._writable()
        if t is None:
            return 0
        return self.sent(t, _chunk(data))

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
        if self.closed:
            return
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(_chunk(b"event: error\ndata: %s\n\n" % json.dumps(
                {"type": "error", "code": "closed", "close_code": code, "message": reason}).encode()))
        self.closed = True
        self.done.set()


async def handle(request: web.Request) -> web.StreamResponse:
    app = request.app
    hub = app["hub"]
    settings = app["settings"]
    try:
        claims = app["auth"].decode(bearer(request))
        if not claims.may_view_anything():
            raise AuthError("token grants no vehicles", forbidden=True)
    except AuthError as e:
        app["security_log"](request, "sse_auth_failed", str(e))
        status = 403 if e.forbidden else 401
        return web.json_response(M.error("forbidden" if e.forbidden else "unauthorized", str(e)), status=status)
    writer = SSEWriter(request.transport, settings.write_buffer_close_bytes, settings.slow_client_buffer_bytes)
    s = Session(writer, claims, FMT_JSON, settings.max_messages_per_s, "sse", request.remote or "")
    refused = hub.admit(s)
    if refused:
        app["security_log"](request, "sse_connection_limit", refused)
        return web.json_response(M.error("rate_limited", refused), status=429)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    reason = "client closed"
    opened = False
    try:
        await resp.prepare(request)
        request.transport.write(_chunk(b"retry: %d\n\n" % RETRY_MS))
        resume = request.query.get("resume") or None
        try:
            resumed = await client.start(hub, s, resume, request.query.get("last_event"),
                                         lambda kind, detail: app["security_log"](request, "sse_" + kind, detail))
        except client.Refused as r:
            writer.close(r.code, r.reason)
            return resp
        opened = True
        if not resumed:   # no session: every vehicle the token allows
            hub.subscribe(s, M.Subscribe(), reply=False)
        log.info("connect", extra={"fields": {
            "event": "connect", "user": claims.sub, "client": s.client_id, "session": s.session_id,
            "transport": "sse", "peer": s.peer, "resumed": resumed}})
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
            log.info("disconnect", extra={"fields": {
                "event": "disconnect", "user": claims.sub, "client": s.client_id, "transport": "sse",
                "reason": reason, "duration_s": round(time.time() - s.connected_at, 3),
                "messages": s.messages_sent, "bytes": s.bytes_sent}})
        hub.unadmit(s)
