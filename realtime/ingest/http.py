"""POST /api/ingest (PROTOCOL §1.4): a JSON array or NDJSON of updates.

Accepted updates take the same path as Kafka records. Each rejected item is
reported by index with a reason code and counted.

A body of up to 16 MiB (~80,000 updates) is split into items at once (~15
ms), then decoded and applied SLICE items (and at most about SLICE_BYTES) at
a time with the event loop free in between: ticks go on while it is ingested
(a whole 16 MiB body in one go held the loop for 1.6 s).
"""
from __future__ import annotations

import asyncio

from aiohttp import web

from .. import messages as M
from ..auth import INGEST, AuthError
from .decode import Rejected, decode_items, split_http_body

MAX_BODY = 16 * 1024 * 1024
SLICE = 1000   # ~15 ms of decoding and applying small updates ...
# ... but a slice's cost grows with its bytes: 1,000 updates of 800 B (a
# long driver name) held the loop ~100 ms (tests/test_large_work.py)
SLICE_BYTES = 256 << 10


def slices(items: list):
    """(start, end) of runs of at most SLICE items and about SLICE_BYTES."""
    start = size = 0
    for i, raw in enumerate(items):
        size += len(raw)
        if i + 1 - start >= SLICE or size >= SLICE_BYTES:
            yield start, i + 1
            start, size = i + 1, 0
    if start < len(items):
        yield start, len(items)


def bearer(request: web.Request) -> str | None:
    h = request.headers.get("Authorization", "")
    if h.lower().startswith("bearer "):
        return h[7:].strip()
    return request.query.get("token")


def authorize(request: web.Request, permission: str | None = None):
    """Claims of the request's token, or an HTTP 401/403 error response."""
    try:
        claims = request.app["auth"].decode(bearer(request))
    except AuthError as e:
        request.app["security"].of_request(request, e.kind, "http", str(e), e.user)
        raise web.HTTPUnauthorized(text=_err("unauthorized", str(e)), content_type="application/json",
                                   headers={"WWW-Authenticate": "Bearer"}) from None
    if permission and permission not in claims.permissions:
        request.app["security"].of_request(request, "forbidden", "http", f"needs {permission}", claims.sub)
        raise web.HTTPForbidden(text=_err("forbidden", f"token lacks permission {permission!r}"),
                                content_type="application/json")
    return claims


async def authorize_live(request: web.Request, permission: str | None = None):
    """authorize() with the user's live ACL on top (PROTOCOL §2: ACLs apply to
    every way in). While Redis cannot answer, the last ACL this instance read
    for the user is used; for a user it never read, 503: the token's own
    rights could be wider than what an ACL took away."""
    from ..stores.base import StoresUnavailable
    claims = authorize(request)
    try:
        acl = await request.app["hub"].stores.acl(claims.sub)
    except StoresUnavailable:
        raise web.HTTPServiceUnavailable(text=_err("unavailable", "rights cannot be checked now: try again"),
                                         content_type="application/json", headers={"Retry-After": "1"}) from None
    live = claims.with_acl(acl)
    if permission and permission not in live.permissions:
        request.app["security"].of_request(request, "forbidden", "http", f"needs {permission}" + (" (ACL)" if acl else ""),
                                           claims.sub)
        raise web.HTTPForbidden(text=_err("forbidden", f"no permission {permission!r}"),
                                content_type="application/json")
    return live


def _err(code: str, message: str) -> str:
    import json
    return json.dumps(M.http_error(code, message))


async def handle(request: web.Request) -> web.Response:
    claims = await authorize_live(request, INGEST)
    try:
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=request.content_length)
        body = await request.read()   # aiohttp raises the same past client_max_size (MAX_BODY)
    except web.HTTPRequestEntityTooLarge:
        request.app["security"].of_request(request, "limit", "http", "request body size", claims.sub)
        raise web.HTTPRequestEntityTooLarge(
            max_size=MAX_BODY, actual_size=request.content_length or MAX_BODY + 1,
            text=_err("too_large", f"a body is at most {MAX_BODY} bytes"), content_type="application/json") from None
    hub = request.app["hub"]
    try:
        items = split_http_body(body)
    except Rejected as r:
        hub.stats.reject(r.reason)
        return web.json_response({**M.http_error("bad_request", r.detail), "reason": r.reason}, status=400)
    del body
    sink = request.app["http_sink"]
    accepted = 0
    rejected: list = []
    for start, end in slices(items):
        if start:
            await asyncio.sleep(0)   # a tick, and other requests, between slices
        ok, bad = decode_items(items[start:end], start)
        for _, reason, _ in bad:
            hub.stats.reject(reason)
        rejected += bad
        if not ok:
            continue
        try:
            await sink([u for _, u in ok])
        except Exception as e:
            # the items before this slice went in; sending the whole body again
            # is safe (an update applies once per timestamp, alerts once)
            return web.json_response({**M.http_error("unavailable", f"ingest path down: {e!r}"[:300]),
                                      "accepted": accepted}, status=503)
        accepted += len(ok)
    return web.json_response({
        "accepted": accepted,
        "rejected": [{"index": i, "reason": reason, "detail": detail} for i, reason, detail in rejected],
    })
