"""Long polling: GET /api/realtime/poll (PROTOCOL §4), for browsers and
proxies that pass nothing but plain request/response HTTP.

`?session=…&cursor=N&timeout=S` answers `{"cursor": M, "messages": […]}` at
once when the session has messages after N, else when one arrives or after
S seconds (at most 60, default 30) with none. The messages are the session's
server messages (realtime/mailbox.py), in order: batches, replies,
`token_expiring`, `reconnect`, `error`.

Cursor 0 (or none) reads from the session's first message. A cursor the
session's copy here does not hold (older than what it keeps, or handed out by
another instance) gets `"reset": true`: a new copy of the session with
`welcome`, the full state and every event since the last one the reader
acknowledged (transports/sessions.py). Each poll's cursor acknowledges what
came before it, so a lost response is simply asked for again.
"""
from __future__ import annotations

import time

from aiohttp import web

from ..mailbox import POS, message_bytes
from .sessions import HttpError, HttpSessions, _errors, authenticate

MAX_TIMEOUT_S = 60.0
DEFAULT_TIMEOUT_S = 30.0


def _query_number(request: web.Request, name: str, default, kind, low, high):
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = kind(raw)
    except ValueError:
        v = None
    if v is None or not (low <= v <= high) or v != v:
        raise HttpError(400, "bad_request", f"{name} must be a number from {low} to {high}")
    return v


@_errors
async def handle(request: web.Request) -> web.Response:
    claims = authenticate(request, "long_poll")
    cursor = _query_number(request, "cursor", 0, int, 0, 2 ** 62)
    timeout = _query_number(request, "timeout", DEFAULT_TIMEOUT_S, float, 0.0, MAX_TIMEOUT_S)
    registry: HttpSessions = request.app["http_sessions"]
    last_event = request.query.get("last_event") or None

    def serves(box) -> bool:
        # this copy holds what comes after the cursor (cursor 0: from its
        # first message, while that is still kept)
        return box.holds(cursor) if cursor else box.first == box.origin + 1
    h, reset = await registry.find(request, claims, request.query.get("session", ""), last_event,
                                   serves=serves)
    box = h.box
    if reset or not cursor:
        cursor = box.first - 1
    box.supersede()          # an older poll of this session answers now
    h.last_seen = time.monotonic()
    registry.acknowledged(h, cursor)
    if not box.after(cursor, 1):
        await box.wait(cursor, timeout)
    # what the cursor follows may have gone while the poll waited (another
    # poll of the session had it, and rights narrowed or the buffer was
    # trimmed): an empty answer, and the next poll with this cursor resets
    entries = box.after(cursor) if box.holds(cursor) else []
    if entries:
        box.handed(entries[-1][POS])
        cursor = entries[-1][POS]
    h.last_seen = time.monotonic()
    body = b"".join((b'{"cursor":%d,%s"messages":[' % (cursor, b'"reset":true,' if reset else b""),
                     b",".join(message_bytes(e) for e in entries), b"]}"))
    return web.Response(body=body, content_type="application/json",
                        headers={"Cache-Control": "no-store"})
