"""Cross-origin access to the HTTP transports (PROTOCOL §8: the browser
library may be used from a page on another origin than the server).

The API authenticates with a Bearer token, never with cookies, so answering
CORS opens nothing a page could not already do with the token it holds:
credentials are not allowed, and the origins are those of --allowed-origins
(any, unless it is set), as for WebSockets.
"""
from __future__ import annotations

from aiohttp import web

from .websocket import _origin_allowed

# what a page may reach from another origin: the session API, SSE, polling,
# the long form of a vehicle, the health check the library times, and the
# library itself (module scripts are fetched in CORS mode)
PREFIXES = ("/api/realtime/", "/api/vehicles/", "/health/live", "/static/")
ALLOW_HEADERS = "Authorization, Content-Type, Last-Event-ID"
ALLOW_METHODS = "GET, POST, PUT, DELETE"
EXPOSE_HEADERS = "Retry-After, WWW-Authenticate"


def _headers(origin: str) -> dict:
    return {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": EXPOSE_HEADERS}


def _vary(resp) -> None:
    """Caches keep answers apart by Origin (merged with any Vary already set)."""
    have = resp.headers.get("Vary")
    if not have:
        resp.headers["Vary"] = "Origin"
    elif "origin" not in have.lower():
        resp.headers["Vary"] = have + ", Origin"


def _transport(path: str) -> str:
    """The transport a refused preflight was for (its security event)."""
    if path.startswith("/api/realtime/stream"):
        return "sse"
    if path.startswith("/api/realtime/poll"):
        return "long_poll"
    return "http"


@web.middleware
async def cors(request: web.Request, handler):
    if not request.path.startswith(PREFIXES):
        return await handler(request)
    origin = request.headers.get("Origin")
    allowed = origin is not None and _origin_allowed(request, request.app["settings"].allowed_origins)
    if origin is not None and request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        if not allowed:
            request.app["security"].of_request(request, "origin_refused", _transport(request.path),
                                               "preflight from origin " + origin[:100])
            return web.Response(status=403, text="origin not allowed")
        return web.Response(status=204, headers={
            **_headers(origin), "Vary": "Origin", "Access-Control-Allow-Methods": ALLOW_METHODS,
            "Access-Control-Allow-Headers": ALLOW_HEADERS, "Access-Control-Max-Age": "600"})
    # an origin that is not allowed gets no CORS headers: the browser refuses the answer
    extra = _headers(origin) if allowed else {}
    try:
        resp = await handler(request)
    except web.HTTPException as e:   # raised answers (404, 405, …) carry the headers too
        if extra:
            e.headers.update(extra)
            _vary(e)
        raise
    if not resp.prepared:   # a stream (SSE) sets them before it starts (see sse.py)
        resp.headers.update(extra)
        _vary(resp)
    return resp


def headers_for(request: web.Request) -> dict:
    """The CORS headers a streamed answer must carry before prepare()."""
    origin = request.headers.get("Origin")
    if origin is None or not _origin_allowed(request, request.app["settings"].allowed_origins):
        return {"Vary": "Origin"}
    return {**_headers(origin), "Vary": "Origin"}
