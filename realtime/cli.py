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
from .listen import EXIT_FAILED, EXIT_PORT_TAKEN, EXIT_USAGE, port_problem, port_taken


def _logging(level: str) -> None:
    from .logs import setup
    setup(level)


def cmd_serve(ns) -> int:
    try:
        settings = config.from_args(ns)
    except config.ConfigError as e:
        print(f"realtime serve: {e}", file=sys.stderr)
        return EXIT_USAGE
    problem = port_problem(settings.host, settings.port)
    if problem:
        print(f"realtime serve: {problem}", file=sys.stderr)
        return EXIT_FAILED
    _logging(settings.log_level)
    if settings.development:
        # one ephemeral secret for every worker, so a token works on all of them
        from .auth import ephemeral_secret
        settings.jwt_secret = ephemeral_secret()
        logging.getLogger("realtime").warning(
            "development mode: no JWT key configured, so tokens are signed with an ephemeral secret, "
            "GET / hands out a viewer token and only loopback addresses are served",
            extra={"fields": {"simulate": settings.simulate_count}})
    from . import worker
    if settings.workers <= 1:
        return worker.run(settings)
    return Supervisor(settings).run()


def _worker_main(settings, index: int) -> None:
    os.environ["REALTIME_INSTANCE_ID"] = f"{os.getpid():x}-{index}"
    os.environ["REALTIME_WORKER_INDEX"] = str(index)
    _logging(settings.log_level)
    from . import worker
    sys.exit(worker.run(settings, supervised=True))


class Supervisor:
    """Runs N workers on one port, restarts one that dies with a growing
    delay, gives up on one that keeps dying, and forwards SIGTERM/SIGINT.

    A worker that dies within STABLE_S of its start counts as a failure; the
    delay before its restart doubles from BACKOFF_S up to BACKOFF_MAX_S, and
    after GIVE_UP failures in a row the supervisor stops every worker and
    exits non-zero: a worker that cannot stay up will not by restarting.
    A worker that stayed up longer starts the count again."""

    BACKOFF_S = 0.5
    BACKOFF_MAX_S = 30.0
    STABLE_S = 30.0
    GIVE_UP = 5

    def __init__(self, settings):
        self.settings = settings
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: dict[int, tuple] = {}      # index -> (process, started at)
        self.failures: dict[int, int] = {}     # index -> deaths in a row
        self.due: dict[int, float] = {}        # index -> when to restart it
        self.stopping = False
        self.log = logging.getLogger("realtime.supervisor")

    def start(self, i: int) -> None:
        p = self.ctx.Process(target=_worker_main, args=(self.settings, i), daemon=False)
        p.start()
        self.procs[i] = (p, time.monotonic())

    def forward(self, signum, _frame) -> None:
        self.stopping = True
        for p, _ in self.procs.values():
            if p.is_alive():
                os.kill(p.pid, signum)

    def give_up(self, line: str) -> int:
        print(f"realtime serve: {line}", file=sys.stderr)
        self.forward(signal.SIGTERM, None)
        deadline = time.monotonic() + self.settings.shutdown_grace + 5
        for p, _ in self.procs.values():
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
        return EXIT_FAILED

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.forward)
        signal.signal(signal.SIGINT, self.forward)
        for i in range(self.settings.workers):
            self.start(i)
        while True:
            time.sleep(0.2)
            now = time.monotonic()
            for i, (p, started) in list(self.procs.items()):
                if p.is_alive():
                    continue
                self.procs.pop(i)
                if self.stopping:
                    continue
                if p.exitcode == EXIT_PORT_TAKEN:
                    return self.give_up(port_taken(self.settings.host, self.settings.port))
                fails = self.failures.get(i, 0) + 1 if now - started < self.STABLE_S else 1
                self.failures[i] = fails
                if fails >= self.GIVE_UP:
                    return self.give_up(f"worker {i} died {fails} times in a row, each within "
                                        f"{self.STABLE_S:g} s of its start (last exit code {p.exitcode}); "
                                        "giving up: see the worker's log above")
                delay = min(self.BACKOFF_MAX_S, self.BACKOFF_S * 2 ** (fails - 1))
                self.due[i] = now + delay
                self.log.warning("worker exited; restarting", extra={"fields": {
                    "worker": i, "exit_code": p.exitcode, "failures_in_a_row": fails,
                    "restart_in_s": delay}})
            for i, at in list(self.due.items()):
                if self.stopping:
                    self.due.pop(i)
                elif now >= at:
                    self.due.pop(i)
                    self.start(i)
            if self.stopping and not self.procs:
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


def _bounded(kind, lo, hi):
    """An argparse type: a number of `kind` in [lo, hi], or a message that says so."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: allowed {lo:g} to {hi:g}")
        return v
    return parse


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
    p = argparse.ArgumentParser(prog="realtime", description="Real-time fleet push server (PROTOCOL §7).")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the push server",
                       description="Serve vehicle updates to dispatchers' maps over WebSocket and HTTP. "
                                   "Every option can also be set with the environment variable named "
                                   "after it; a flag wins over the variable.",
                       epilog=config.help_epilog(), formatter_class=config.HelpFormatter)
    config.add_arguments(s)
    s.set_defaults(func=cmd_serve)
    t = sub.add_parser("token", help="print a token signed with the configured secret",
                       description="Print an HS256 token signed with --jwt-secret (or REALTIME_JWT_SECRET), "
                                   "for tests and tools; iss and aud come from REALTIME_JWT_ISSUER and "
                                   "REALTIME_JWT_AUDIENCE when set.")
    t.add_argument("--sub", required=True, help="user id (the `sub` claim)")
    t.add_argument("--name", help="display name (default: the user id)")
    t.add_argument("--role", help="role claim (default: empty)")
    t.add_argument("--perm", action="append",
                   help="a permission such as view_all_vehicles, view_driver_contacts or ingest; repeat, or comma-separate")
    t.add_argument("--groups", help="comma-separated groups the user may see")
    t.add_argument("--vehicles", help="comma-separated vehicle ids the user may see")
    t.add_argument("--ttl", type=_bounded(int, 1, 366 * 86400), default=3600,
                   help="seconds until the token expires (default: 3600)")
    t.add_argument("--jwt-secret", help="the server's secret (default: REALTIME_JWT_SECRET)")
    t.set_defaults(func=cmd_token)
    m = sub.add_parser("simulate", help="feed a simulated fleet to a server",
                       description="Post a simulated fleet's updates to a server's /api/ingest.")
    m.add_argument("--url", help="the server's base URL, e.g. http://127.0.0.1:8080")
    m.add_argument("--kafka", help="not yet: Kafka bootstrap servers to produce to")
    m.add_argument("--vehicles", type=_bounded(int, 1, 1_000_000), default=2000,
                   help="vehicles in the fleet (default: 2000)")
    m.add_argument("--rate", type=_bounded(float, 0.001, 10_000_000), default=2000.0,
                   help="updates per second in all (default: 2000)")
    m.add_argument("--duration", type=_bounded(float, 0, 10**9), default=0.0,
                   help="seconds to run; 0 runs until stopped (default: 0)")
    m.add_argument("--token", help="a token with the ingest permission (default: minted from --jwt-secret)")
    m.add_argument("--jwt-secret", help="the server's secret (default: REALTIME_JWT_SECRET)")
    m.add_argument("--seed", type=int, default=1, help="random seed of the fleet (default: 1)")
    m.set_defaults(func=cmd_simulate)
    ns = p.parse_args(argv)
    return ns.func(ns) or 0


if __name__ == "__main__":
    sys.exit(main())
