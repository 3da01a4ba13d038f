"""The aiohttp Application: routes, startup and cleanup."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

from aiohttp import web

from .address import Addresses, parse_networks
from .auth import VIEW_ALL, Authenticator, ephemeral_secret
from .hub import Hub
from . import messages as M
from .ingest import http as ingest_http
from .ingest import simulator
from .stores.base import StoresUnavailable
from .transports import poll, sessions, sse, websocket

log = logging.getLogger("realtime.app")
WEB = Path(__file__).parent / "web"


def make_app(settings) -> web.Application:
    from .transports.cors import cors
    app = web.Application(client_max_size=ingest_http.MAX_BODY, middlewares=[cors])
    if settings.development and not settings.jwt_secret:
        settings.jwt_secret = ephemeral_secret()
    app["settings"] = settings
    app["auth"] = Authenticator.from_settings(settings)
    from .keys import Keys, Tls
    app["tls"] = Tls(settings.tls_cert, settings.tls_key) if settings.tls_cert else None
    app["keys"] = Keys(settings, app["auth"], app["tls"])
    app["addresses"] = Addresses(parse_networks(settings.trusted_proxies))
    app["hub"] = hub = Hub(settings)
    app["security"] = hub.security

    def sink(batch, aged_up_to=0.0):
        """Kafka input (the decoder's UpdateBatch): applied here; every
        instance reads every partition."""
        hub.apply(batch, aged_up_to)

    app["ingest_sink"] = sink
    app["http_sink"] = _http_sink(app)
    app.router.add_get("/ws", websocket.handle)
    app.router.add_get("/api/realtime/stream", sse.handle)
    app.router.add_get("/api/realtime/poll", poll.handle)
    app.router.add_post("/api/realtime/session", sessions.post)
    app.router.add_put("/api/realtime/session/{session_id}", sessions.put)
    app.router.add_delete("/api/realtime/session/{session_id}", sessions.delete)
    app["http_sessions"] = sessions.HttpSessions(app)
    app.router.add_post("/api/ingest", ingest_http.handle)
    app.router.add_get("/api/vehicles/{vehicle_id}", vehicle)
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)
    from . import metrics
    metrics.setup(app)
    app.router.add_get("/", index)
    app.router.add_get("/dev/token", dev_token)
    app.router.add_static("/static/", WEB, show_index=False)
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    return app


def _http_sink(app):
    """PROTOCOL §1.4: HTTP-ingested updates reach every worker and instance --
    through Kafka when configured (every instance consumes it), else applied
    here and relayed through Redis."""
    async def sink(updates):
        hub = app["hub"]
        if hub.follower is not None:   # the owner worker takes it as its own (mirror.py)
            if updates:
                await hub.follower.forward(updates)
            return
        producer = app.get("kafka_producer")
        kafka = app.get("kafka")
        if producer is not None and kafka is not None and kafka.connected:
            from .ingest.kafka import produce_updates
            try:
                await asyncio.wait_for(produce_updates(producer, app["settings"].topic, updates), 5.0)
                return
            except Exception as e:  # Kafka is down: take the Redis path rather than fail
                log.warning("kafka produce failed; applying here and relaying through redis",
                            extra={"fields": {"error": repr(e)[:200]}})
        if not updates:
            return
        from .ingest.decode import to_batch
        batch = to_batch(updates, hub.core.vtype_code)
        hub.apply(batch)
        await hub.stores.relay_updates(batch)
    return sink


async def _start(app):
    hub = app["hub"]
    settings = app["settings"]
    from .stores import make_stores
    from . import mirror
    part = mirror.role(settings)
    if part == "owner":
        hub.owner = mirror.Owner(hub, mirror.socket_path(settings), app["http_sink"])
    elif part == "follower":
        hub.follower = mirror.Follower(hub, mirror.socket_path(settings))
    hub.stores = make_stores(settings, hub.instance_id)
    await hub.stores.start(hub)
    if hub.owner is not None:
        await hub.owner.start()
    if hub.follower is not None:
        hub.follower.start()
    if settings.postgres:
        from .stores.records import Records
        hub.records = Records(settings.postgres, hub.instance_id)
    hub.records.start()
    hub.start()
    hub.security.start()
    app["keys"].start()
    app["http_sessions"].start()
    if settings.grpc_port:
        from .transports import grpc_stream
        app["grpc"] = await grpc_stream.start(app)
    if settings.kafka and hub.follower is None:   # the owner worker consumes for the instance
        from .ingest.kafka import KafkaIngest
        app["kafka"] = kafka = KafkaIngest(settings, app["ingest_sink"], hub.stats, hub.core)
        if hasattr(hub.stores, "kafka_positions"):
            # the snapshot in Redis says how far into the topic it goes: a new
            # consumer reads on from there, and the writer keeps it up to date
            hub.stores.kafka_applied = kafka.applied
            kafka.stored_positions = hub.stores.kafka_positions
            kafka.snapshot_loaded = lambda: mirror.loaded_unless_down(hub.stores, hub.stores.snapshot_loaded)
        kafka.start()
        from aiokafka import AIOKafkaProducer
        app["kafka_producer"] = AIOKafkaProducer(bootstrap_servers=settings.kafka, linger_ms=5)
        try:
            await app["kafka_producer"].start()
        except Exception as e:  # HTTP ingest answers 503 until Kafka is back
            log.warning("kafka producer unavailable", extra={"fields": {"error": repr(e)[:200]}})
    n = settings.simulate_count
    worker = settings.worker_index
    if n and worker == 0:  # one simulated fleet, whatever the number of workers
        sink = app["http_sink"] if settings.kafka else None
        relay = bool(settings.workers > 1 or settings.redis)
        app["simulator"] = asyncio.get_running_loop().create_task(
            simulator.run_in_hub(hub, n, sink=sink, relay=relay))
        log.info("simulating %d vehicles", n)


async def _stop(app):
    t0 = time.monotonic()

    def step(name):
        log.info("shutdown step", extra={"fields": {"step": name, "elapsed_s": round(time.monotonic() - t0, 3)}})

    if app.get("grpc") is not None:   # its calls were told to reconnect (say_goodbye)
        stopping = app.get("grpc_stopping") or asyncio.ensure_future(app["grpc"].stop(1.0))
        await asyncio.wait([stopping], timeout=app["settings"].shutdown_grace / 2)
        step("grpc stopped")
    task = app.get("simulator")
    if task:
        task.cancel()
    await app["keys"].stop()
    await app["http_sessions"].stop()
    if app.get("kafka"):
        await app["kafka"].stop()
        step("kafka consumer stopped")
    if app.get("kafka_producer"):
        try:
            await app["kafka_producer"].stop()
        except Exception:
            pass
    hub = app["hub"]
    for part in (hub.owner, hub.follower):
        if part is not None:
            await part.stop()
    await app["hub"].security.stop()   # its last summary goes to the records
    await app["hub"].settle(max(1.0, app["settings"].shutdown_grace / 3))
    step("background writes settled")
    await app["hub"].stores.stop()
    step("stores stopped")
    await app["hub"].records.stop(max(1.0, app["settings"].shutdown_grace / 3))
    step("records written")
    await app["hub"].stop()
    step("hub stopped")


async def live(request):
    return web.json_response({"status": "ok"})


async def ready(request):
    """503 with reasons while Kafka or Redis (when configured) is unreachable,
    or the worker is overloaded: event-loop lag, CPU or memory over its threshold."""
    app = request.app
    problems = []
    if app["settings"].redis and not app["hub"].stores.healthy:
        problems.append("redis unreachable")
    kafka = app.get("kafka")
    if kafka is not None and not kafka.connected:
        problems.append("kafka unreachable")
    st = app["settings"]
    follower = app["hub"].follower
    if follower is not None and not (follower.connected and follower.has_fleet):
        # a partial copy (the owner has no snapshot) links it, but a worker
        # that never had the whole fleet refuses clients (client.start)
        problems.append("owner worker unreachable")
    problems += app["hub"].load.problems(st.ready_max_loop_lag_ms, st.ready_max_cpu, st.ready_max_memory)
    body = {"status": "ok" if not problems else "unavailable", "problems": problems,
            "connections": len(app["hub"].sessions)}
    return web.json_response(body, status=200 if not problems else 503)


async def vehicle(request):
    claims = await ingest_http.authorize_live(request)
    hub = request.app["hub"]
    vid = request.match_info["vehicle_id"]
    seen = hub.may_see(claims, vid)
    if not seen and claims.groups and not claims.view_all:
        # a group the registry gives it and no update has carried (§1.3)
        try:
            seen = await hub.stores.in_registry_group(vid, claims.groups)
        except StoresUnavailable:
            raise web.HTTPServiceUnavailable(
                text=json.dumps(M.http_error("unavailable", "rights cannot be checked now: try again")),
                content_type="application/json", headers={"Retry-After": "1"}) from None
    if not seen:
        hub.security.of_request(request, "forbidden", "http", "vehicle outside the rights: " + vid, claims.sub)
        raise web.HTTPForbidden(text=json.dumps(M.http_error("forbidden", "not allowed to see this vehicle")),
                                content_type="application/json")
    d = hub.long_form(claims, vid)
    if d is None:
        if hub.follower is not None and not hub.follower.has_fleet:   # not "unknown": not known yet
            raise web.HTTPServiceUnavailable(
                text=json.dumps(M.http_error("unavailable", "this worker is starting: try again")),
                content_type="application/json", headers={"Retry-After": "1"})
        raise web.HTTPNotFound(text=json.dumps(M.http_error("not_found", "unknown vehicle")),
                               content_type="application/json")
    return web.json_response(d, dumps=lambda o: json.dumps(o, ensure_ascii=False))


def _viewer_token(request) -> str:
    """Development mode's map token: a viewer of every vehicle."""
    return request.app["auth"].mint("map-viewer", role="viewer", permissions=[VIEW_ALL], ttl_s=12 * 3600)


def _dev_page(request) -> bool:
    """Development mode, asked for by a loopback name: a page that DNS
    rebinding serves under another name gets no token (the server listens on
    loopback only, but a browser can be made to reach it under any name)."""
    if not request.app["settings"].development:
        return False
    from .config import is_loopback
    return is_loopback(request.url.host or "")


async def index(request):
    settings = request.app["settings"]
    html = (WEB / "index.html").read_text()
    dev = _dev_page(request)
    config = {"tiles": "" if settings.tile_url == "none" else settings.tile_url,
              "tiles_attribution": settings.tile_attribution,
              "dev": dev, "token": _viewer_token(request) if dev else ""}
    # inside a <script>: no "<" at all, so neither "</script>" nor "<!--" can end or bend it
    blob = json.dumps(config).replace("<", "\\u003c")
    return web.Response(text=html.replace("__REALTIME_CONFIG__", blob), content_type="text/html",
                        headers={"Cache-Control": "no-store"})


async def dev_token(request):
    """Development mode only (loopback, PROTOCOL §7): a fresh map token, for
    the page's token function when the one it carries runs out."""
    if not _dev_page(request):
        raise web.HTTPNotFound()
    return web.json_response({"token": _viewer_token(request)}, headers={"Cache-Control": "no-store"})
