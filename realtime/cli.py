"""The `realtime` command: serve, token, simulate (PROTOCOL §7)."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import signal
import sys
import time

from . import config


def _logging(level: str) -> None:
    from .logs import setup
    setup(level)


def cmd_serve(ns) -> int:
    try:
        settings = config.from_args(ns)
    except ValueError as e:
        print(f"realtime serve: {e}", file=sys.stderr)
        return 2
    _logging(settings.log_level)
    if settings.demo_token and not settings.jwt_secret:
        # one ephemeral secret for every worker, so a token works on all of them
        from .auth import ephemeral_secret
        settings.jwt_secret = ephemeral_secret()
        logging.getLogger("realtime").warning(
            "no --jwt-secret: development mode with an ephemeral secret; GET / hands out a viewer token")
    from . import worker
    if settings.workers <= 1:
        worker.run(settings)
        return 0
    return _supervise(settings)


def _worker_main(settings, index: int) -> None:
    os.environ["REALTIME_INSTANCE_ID"] = f"{os.getpid():x}-{index}"
    os.environ["REALTIME_WORKER_INDEX"] = str(index)
    _logging(settings.log_level)
    from . import worker
    worker.run(settings)


def _supervise(settings) -> int:
    """Start N workers on one port, restart any that dies, forward signals."""
    ctx = multiprocessing.get_context("spawn")
    procs = {}
    stopping = False

    def start(i):
        p = ctx.Process(target=_worker_main, args=(settings, i), daemon=False)
        p.start()
        procs[i] = p

    def forward(signum, _frame):
        nonlocal stopping
        stopping = True
        for p in procs.values():
            if p.is_alive():
                os.kill(p.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for i in range(settings.workers):
        start(i)
    while True:
        time.sleep(0.2)
        for i, p in list(procs.items()):
            if not p.is_alive():
                if stopping:
                    procs.pop(i)
                else:
                    logging.getLogger("realtime.supervisor").warning(
                        "worker %d exited with %s; restarting", i, p.exitcode)
                    start(i)
        if stopping and not procs:
            return 0


def cmd_token(ns) -> int:
    from .auth import Authenticator
    secret = ns.jwt_secret or os.environ.get("REALTIME_JWT_SECRET")
    if not secret:
        print("realtime token: needs --jwt-secret or REALTIME_JWT_SECRET", file=sys.stderr)
        return 2
    a = Authenticator(secret, issuer=os.environ.get("REALTIME_JWT_ISSUER"),
                      audience=os.environ.get("REALTIME_JWT_AUDIENCE"))
    perms = [p for group in (ns.perm or []) for p in group.split(",") if p]
    print(a.mint(ns.sub, ns.role or "", perms, _split(ns.groups), _split(ns.vehicles), ns.ttl, ns.name))
    return 0


def _split(v):
    return [x for x in (v or "").split(",") if x]


def cmd_simulate(ns) -> int:
    if not ns.url:
        print("realtime simulate: give --url (Kafka comes with --kafka in a later release)",
              file=sys.stderr)
        return 2
    return asyncio.run(_simulate_http(ns))


async def _simulate_http(ns) -> int:
    import aiohttp

    from .auth import INGEST, Authenticator
    from .ingest.simulator import Fleet
    token = ns.token
    if not token:
        secret = ns.jwt_secret or os.environ.get("REALTIME_JWT_SECRET")
        if not secret:
            print("realtime simulate: needs --token, --jwt-secret or REALTIME_JWT_SECRET", file=sys.stderr)
            return 2
        token = Authenticator(secret).mint("simulator", "ingest", [INGEST], ttl_s=86400)
    fleet = Fleet(ns.vehicles, seed=ns.seed, report_s=ns.vehicles / max(ns.rate, 1e-9))
    step = 0.1
    sent = 0
    deadline = time.monotonic() + ns.duration if ns.duration else None
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        url = ns.url.rstrip("/") + "/api/ingest"
        next_t = time.monotonic()
        while deadline is None or time.monotonic() < deadline:
            next_t += step
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))
            res = fleet.step(step, int(time.time() * 1000))
            if res is None:
                continue
            updates = fleet.as_updates(res)
            async with http.post(url, data=json.dumps(updates, ensure_ascii=False).encode(),
                                 headers={"Content-Type": "application/json"}) as r:
                if r.status != 200:
                    print(f"ingest answered {r.status}: {await r.text()}", file=sys.stderr)
                    return 1
                sent += len(updates)
    print(json.dumps({"sent": sent}))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="realtime")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the push server")
    config.add_arguments(s)
    s.set_defaults(func=cmd_serve)
    t = sub.add_parser("token", help="print a token signed with the configured secret")
    t.add_argument("--sub", required=True)
    t.add_argument("--name")
    t.add_argument("--role")
    t.add_argument("--perm", action="append", help="a permission; repeat, or comma-separate")
    t.add_argument("--groups")
    t.add_argument("--vehicles")
    t.add_argument("--ttl", type=int, default=3600)
    t.add_argument("--jwt-secret")
    t.set_defaults(func=cmd_token)
    m = sub.add_parser("simulate", help="feed a simulated fleet to a server")
    m.add_argument("--url")
    m.add_argument("--kafka")
    m.add_argument("--vehicles", type=int, default=2000)
    m.add_argument("--rate", type=float, default=2000.0, help="updates per second in all")
    m.add_argument("--duration", type=float, default=0.0, help="seconds; 0 runs until stopped")
    m.add_argument("--token")
    m.add_argument("--jwt-secret")
    m.add_argument("--seed", type=int, default=1)
    m.set_defaults(func=cmd_simulate)
    ns = p.parse_args(argv)
    return ns.func(ns) or 0


if __name__ == "__main__":
    sys.exit(main())
