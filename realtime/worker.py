"""One worker process: uvloop, the aiohttp site, signals.

With --workers > 1 every worker binds the same port with SO_REUSEPORT and the
kernel spreads connections between them.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import ssl

import uvloop
from aiohttp import web

from .app import make_app

log = logging.getLogger("realtime.worker")


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3  # PROTOCOL §7: TLS 1.3 only
    ctx.load_cert_chain(cert, key)
    return ctx


async def serve(settings, ready: asyncio.Event | None = None) -> None:
    app = make_app(settings)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    ctx = tls_context(settings.tls_cert, settings.tls_key) if settings.tls_cert else None
    site = web.TCPSite(runner, settings.host, settings.port, ssl_context=ctx,
                       reuse_port=settings.workers > 1, backlog=4096)
    await site.start()
    log.info("listening on %s://%s:%d", "https" if ctx else "http", settings.host, settings.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready:
        ready.set()
    await stop.wait()
    log.info("shutting down")
    t0 = loop.time()
    # stop accepting, then tell the clients (PROTOCOL §5)
    for srv in [getattr(x, "_server", None) for x in runner.sites]:
        if srv is not None:
            srv.close()
    try:
        await asyncio.wait_for(app["hub"].say_goodbye(settings.shutdown_grace),
                               settings.shutdown_grace / 2)
    except Exception:
        log.exception("goodbye to clients failed")
    try:
        await asyncio.wait_for(runner.cleanup(), settings.shutdown_grace)
        log.info("stopped", extra={"fields": {"elapsed_s": round(loop.time() - t0, 3)}})
    except asyncio.TimeoutError:
        _log_tasks("task still running at shutdown")
    # cancel what is left ourselves, with a bound: the loop's own final
    # cancellation waits forever for a task that does not end
    rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in rest:
        t.cancel()
    if rest:
        _, pending = await asyncio.wait(rest, timeout=2.0)
        if pending:
            _log_tasks("task ignored cancellation at shutdown")
            logging.shutdown()
            os._exit(0)


def _log_tasks(msg: str) -> None:
    for t in asyncio.all_tasks():
        if t is not asyncio.current_task():
            frames = [f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}" for f in t.get_stack(limit=8)]
            log.error(msg, extra={"fields": {"task": t.get_name(), "stack": frames}})


def run(settings) -> None:
    tune_gc()
    uvloop.run(serve(settings))


def tune_gc() -> None:
    """The cyclic GC cost ~9% of a saturated worker (perf, 5k clients): every
    700 container allocations a young collection, and every so often a full
    one that walks each connection's objects. Nearly all garbage here is freed
    by reference counting, so collect young objects 100x less often, and keep
    what exists at start (modules, app) out of every collection."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(70_000, 20, 20)
