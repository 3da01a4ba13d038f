"""One worker process: uvloop, the aiohttp site, signals.

With --workers > 1 every worker binds the same port with SO_REUSEPORT and the
kernel spreads connections between them.
"""
from __future__ import annotations

import asyncio
import errno
import gc
import logging
import signal
import socket
import sys

import uvloop
from aiohttp import web

from .app import make_app
from .listen import EXIT_FAILED, EXIT_PORT_TAKEN, bind_error

log = logging.getLogger("realtime.worker")


async def serve(settings, ready: asyncio.Event | None = None) -> None:
    app = make_app(settings)
    # an idle keep-alive connection (between requests) is let go after
    # --pong-timeout-s, as a silent WebSocket is: aiohttp's default kept each
    # for an hour, a socket apiece, with no per-address bound (found by a review)
    runner = web.AppRunner(app, handle_signals=False, access_log=None,
                           keepalive_timeout=settings.pong_timeout_s)
    await runner.setup()
    tls = app.get("tls")
    ctx = tls.front if tls is not None else None
    site = web.TCPSite(runner, settings.host, settings.port, ssl_context=ctx,
                       reuse_port=settings.workers > 1, backlog=4096)
    try:
        await site.start()
    except OSError as e:  # the port was taken after cli's check, or the address went away
        # what startup began (store loops, the tick) is stopped, within bounds:
        # a worker that cannot listen must exit, or its supervisor waits for it
        await _stop_all(runner, settings.shutdown_grace)
        raise CannotListen(e) from None
    _let_go_of_stalled_peers(site, settings.pong_timeout_s)
    log.info("listening on %s://%s:%d", "https" if ctx else "http", settings.host, settings.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # new TLS certificate and JWT keys, open connections untouched (keys.py)
    loop.add_signal_handler(signal.SIGHUP, app["keys"].reload)
    # held back since the start (cli.py): one that came meanwhile arrives now
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    if ready:
        ready.set()
    await stop.wait()
    log.info("shutting down")
    t0 = loop.time()
    # stop accepting, then tell the clients (PROTOCOL §5)
    await site.stop()
    grpc_server = app.get("grpc")
    if grpc_server is not None:   # no new gRPC calls either; the open ones get `reconnect`
        app["grpc_stopping"] = asyncio.ensure_future(grpc_server.stop(settings.shutdown_grace / 2))
    try:
        await asyncio.wait_for(app["hub"].say_goodbye(settings.shutdown_grace),
                               settings.shutdown_grace / 2)
    except Exception:
        log.exception("goodbye to clients failed")
    if await _stop_all(runner, settings.shutdown_grace):
        log.info("stopped", extra={"fields": {"elapsed_s": round(loop.time() - t0, 3)}})


async def _stop_all(runner, grace_s: float) -> bool:
    """The app's cleanup, then every task left, each step with a bound.
    False when something had to be abandoned (it is logged)."""
    clean = True
    try:
        await asyncio.wait_for(runner.cleanup(), grace_s)
    except asyncio.TimeoutError:
        _log_tasks("task still running at shutdown")
        clean = False
    # cancel what is left ourselves, with a bound: the loop's own final
    # cancellation (asyncio.run's) waits forever for a task that does not end
    rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in rest:
        t.cancel()
    if rest:
        _, pending = await asyncio.wait(rest, timeout=2.0)
        if pending:
            _log_tasks("task ignored cancellation at shutdown")
            clean = False
    return clean


def _log_tasks(msg: str) -> None:
    for t in asyncio.all_tasks():
        if t is not asyncio.current_task():
            frames = [f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}" for f in t.get_stack(limit=8)]
            log.error(msg, extra={"fields": {"task": t.get_name(), "stack": frames}})


def _let_go_of_stalled_peers(site, timeout_s: float) -> None:
    """TCP_USER_TIMEOUT on the listening sockets, which every accepted one
    inherits (Linux): a peer that takes none of our bytes for `timeout_s`
    (--pong-timeout-s), zero window included, is cut off by the kernel. A
    client that stops reading but keeps its connection (a hung app) was
    held for good: closing it waits in aiohttp's drain without a bound (a
    WebSocket's close, an SSE stream's or a poll response's end), with its
    session, its per-user slot, its socket and its buffered bytes."""
    server = getattr(site, "_server", None)
    for sock in getattr(server, "sockets", None) or ():
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(timeout_s * 1000)))
        except (OSError, AttributeError) as e:   # not TCP, or not Linux
            log.warning("TCP_USER_TIMEOUT not set: a client that stops reading may be held until it goes",
                        extra={"fields": {"error": repr(e)[:200]}})


class CannotListen(Exception):
    def __init__(self, error: OSError):
        super().__init__(error)
        self.error = error


def run(settings, supervised: bool = False) -> int:
    """Serves until SIGTERM/SIGINT; returns the process's exit status. A port
    that cannot be bound is one line on stderr (the supervisor prints it once
    for all its workers)."""
    tune_gc()
    # Not uvloop.run: at its end it cancels the tasks left and waits for them
    # without a bound, and serve() has already stopped everything it started
    # within bounds; a task that ignored that must not keep the process alive.
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(serve(settings))
    except CannotListen as e:
        if supervised and e.error.errno == errno.EADDRINUSE:
            return EXIT_PORT_TAKEN
        print(f"realtime serve: {bind_error(settings.host, settings.port, e.error)}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    return 0


def tune_gc() -> None:
    """The cyclic GC cost ~9% of a saturated worker (perf, 5k clients): every
    700 container allocations a young collection, and every so often a full
    one that walks each connection's objects. Nearly all garbage here is freed
    by reference counting, so collect young objects 100x less often, and keep
    what exists at start (modules, app) out of every collection."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(70_000, 20, 20)
