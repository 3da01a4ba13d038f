"""POST /api/ingest (PROTOCOL §1.4): a JSON array or NDJSON of updates.

Accepted updates take the same path as Kafka records: validate, then one
core apply for the whole request. Each rejected item is reported by index
with a reason code and counted.
"""
from __future__ import annotations

from aiohttp import web

from ..auth import INGEST, AuthError
from .decode import Rejected, decode_http_body

MAX_BODY = 16 * 1024 * 1024


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
        request.app["security_log"](request, "http_auth_failed", str(e))
        raise web.HTTPUnauthorized(text=_err("unauthorized", str(e)), content_type="application/json",
                                   headers={"WWW-Authenticate": "Bearer"}) from None
    if permission and permission not in claims.permissions:
        request.app["security_log"](request, "http_forbidden", f"needs {permission}")
        raise web.HTTPForbidden(text=_err("forbidden", f"token lacks permission {permission!r}"),
                                content_type="application/json")
    return claims


def _err(code: str, message: str) -> str:
    import json
    return json.dumps({"error": code, "message": message})


async def handle(request: web.Request) -> web.Response:
    authorize(request, INGEST)
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=request.content_length)
    body = await request.read()
    hub = request.app["hub"]
    try:
        accepted, rejected = decode_http_body(body)
    except Rejected as r:
        hub.stats.reject(r.reason)
        return web.json_response({"error": "bad_request", "reason": r.reason, "message": r.detail},
                                 status=400)
    for _, reason, _ in rejected:
        hub.stats.reject(reason)
    updates = [u for _, u in accepted]
    try:
        await request.app["http_sink"](updates)
    except Exception as e:
        # nothing was accepted: the caller may retry the whole request
        return web.json_response({"error": "unavailable", "message": f"ingest path down: {e!r}"[:300]},
                                 status=503)
    return web.json_response({
        "accepted": len(accepted),
        "rejected": [{"index": i, "reason": reason, "detail": detail} for i, reason, detail in rejected],
    })
