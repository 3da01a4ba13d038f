"""The `realtime` command: serve, token, simulate (PROTOCOL §7)."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
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
        config.check_files(settings)
    except config.ConfigError as e:
        print(f"realtime serve: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        from . import worker
    except ImportError as e:  # an unbuilt checkout: the message says what to run
        print(f"realtime serve: {e}", file=sys.stderr)
        return EXIT_FAILED
    problem = port_problem(settings.host, settings.port)
    if not problem and settings.grpc_port:
        problem = port_problem(settings.host, settings.grpc_port)
        problem = problem and problem.replace("--port", "--grpc-port")
    if problem:
        print(f"realtime serve: {problem}", file=sys.stderr)
        return EXIT_FAILED
    _logging(settings.log_level)
    # SIGHUP reloads keys (keys.py) once a worker's loop handles it. Until
    # then it is held back (blocked, not ignored: one that comes while the
    # worker starts is delivered once it can act on it; its default kills).
    # Workers inherit the blocked mask through their exec.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    if settings.development:
        # one ephemeral secret for every worker, so a token works on all of them
        from .auth import ephemeral_secret
        settings.jwt_secret = ephemeral_secret()
        logging.getLogger("realtime").warning(
            "development mode: no JWT key configured, so tokens are signed with an ephemeral secret, "
            "GET / hands out a viewer token and only loopback addresses are served",
            extra={"fields": {"simulate": settings.simulate_count}})
    if settings.workers <= 1:
        return worker.run(settings)
    return Supervisor(settings).run()


def _worker_main(settings, index: int, parent: int) -> None:
    _die_with(parent)
    settings = dataclasses.replace(settings, worker_index=index, instance_id=f"{os.getpid():x}-{index}")
    _logging(settings.log_level)
    from . import worker
    sys.exit(worker.run(settings, supervised=True))


def _die_with(parent: int) -> None:
    """A worker whose supervisor is gone (SIGKILL, a crash) would go on
    serving with nobody to stop it: ask Linux for a SIGTERM when the parent
    dies, then check that it has not died already."""
    try:
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux
        pass
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


class Supervisor:
    """Runs N workers on one port, restarts one that dies with a growing
    delay, gives up on one that keeps dying, and forwards SIGTERM/SIGINT.

    Deaths are counted per worker over the last WINDOW_S. The delay before a
    restart doubles with each death in the window, from BACKOFF_S up to
    BACKOFF_MAX_S; at GIVE_UP deaths in the window the supervisor stops every
    worker and exits non-zero: a worker that cannot stay up will not by
    restarting. A worker that dies now and then (less often than GIVE_UP per
    WINDOW_S) is restarted for ever. SIGHUP goes to every worker (keys.py).
    On SIGTERM/SIGINT it waits
    --shutdown-grace + KILL_AFTER_S for the workers, then kills what is left."""

    BACKOFF_S = 0.5
    BACKOFF_MAX_S = 30.0
    WINDOW_S = 300.0
    GIVE_UP = 5
    KILL_AFTER_S = 5.0
    KAFKA_REWIND_S = 10.0   # read again before an owner worker's death: older updates change nothing
    CAUGHT_UP_S = 60.0      # an owner that lived this long had read on past where it started

    def __init__(self, settings):
        self.settings = settings
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: dict[int, multiprocessing.Process] = {}
        self.deaths: dict[int, list[float]] = {}   # index -> death times within the window
        self.due: dict[int, float] = {}            # index -> when to restart it
        self.started_at: dict[int, float] = {}     # index -> when it was last started (monotonic)
        self.kafka_since: dict[int, float] = {}    # index -> where its successor reads Kafka from (wall clock)
        self.stopping: int | None = None           # the signal being forwarded
        self.stop_deadline = 0.0
        self.signalled: set[int] = set()           # pids that got the stop signal
        self.failed = False                        # a worker died badly while stopping
        self.log = logging.getLogger("realtime.supervisor")

    def start(self, i: int) -> None:
        if self.stopping is not None:
            return
        settings = self.settings
        since = self.kafka_since.get(i)
        if i == 0 and since is not None and settings.kafka:
            # the owner worker alone reads Kafka (mirror.py): its successor
            # reads on from a little before the first death of a run of them,
            # not from the end
            settings = dataclasses.replace(settings, kafka_since_ms=int(since * 1000))
        self.started_at[i] = time.monotonic()
        p = self.ctx.Process(target=_worker_main, args=(settings, i, os.getpid()), daemon=False)
        # a new worker starts with SIGHUP blocked (a handler would not survive
        # its exec, and the default kills) until its loop takes it over; one
        # that reaches us meanwhile waits, and is passed on to it as well
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            p.start()
            self.procs[i] = p   # before the signal is let in: hangup() reaches it too
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})

    def hangup(self, _signum, _frame) -> None:
        """SIGHUP: every worker reloads its keys (they read the same files)."""
        if self.stopping is not None:
            return
        for p in self.procs.values():
            if p.pid is not None and p.is_alive():
                try:
                    os.kill(p.pid, signal.SIGHUP)
                except ProcessLookupError:
                    pass

    def forward(self, signum, _frame) -> None:
        if self.stopping is None:
            self.stopping = signum
            self.stop_deadline = time.monotonic() + self.settings.shutdown_grace + self.KILL_AFTER_S
        self._signal_all()

    def _signal_all(self) -> None:
        """Every live worker gets the signal once, also one whose start raced it."""
        for p in self.procs.values():
            if p.pid is not None and p.pid not in self.signalled and p.is_alive():
                self.signalled.add(p.pid)
                try:
                    os.kill(p.pid, self.stopping)
                except ProcessLookupError:
                    pass

    def give_up(self, line: str) -> int:
        print(f"realtime serve: {line}", file=sys.stderr)
        self.forward(signal.SIGTERM, None)
        for p in self.procs.values():
            p.join(max(0.1, self.stop_deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
        return EXIT_FAILED

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.forward)
        signal.signal(signal.SIGINT, self.forward)
        signal.signal(signal.SIGHUP, self.hangup)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        # the owner worker's socket for the others (mirror.py): in a directory
        # that only this user can enter (mkdtemp makes it 0700)
        import shutil
        import tempfile
        self.settings = dataclasses.replace(self.settings, mirror_dir=tempfile.mkdtemp(prefix="realtime-workers-"))
        try:
            for i in range(self.settings.workers):
                self.start(i)
            while True:
                status = self._step()
                if status is not None:
                    return status
                time.sleep(0.2)
        finally:
            for p in self.procs.values():   # whatever happened here, no worker outlives us
                if p.is_alive():
                    p.kill()
            shutil.rmtree(self.settings.mirror_dir, ignore_errors=True)

    def _step(self) -> int | None:
        now = time.monotonic()
        for i, p in list(self.procs.items()):
            if p.is_alive():
                continue
            self.procs.pop(i)
            if self.stopping is not None:
                # killed by the signal it was sent (before it could handle it) is a clean stop too
                self.failed |= p.exitcode not in (0, -self.stopping)
                continue
            if p.exitcode == EXIT_PORT_TAKEN:
                return self.give_up(port_taken(self.settings.host, self.settings.port))
            window = [t for t in self.deaths.get(i, []) if now - t < self.WINDOW_S] + [now]
            self.deaths[i] = window
            # where a new owner reads Kafka from: before this death, or before
            # an earlier one if the worker died again before it could catch up
            lived = now - self.started_at.get(i, now)
            since = time.time() - self.KAFKA_REWIND_S
            self.kafka_since[i] = since if lived > self.CAUGHT_UP_S else min(since, self.kafka_since.get(i, since))
            if len(window) >= self.GIVE_UP:
                return self.give_up(f"worker {i} died {len(window)} times in {self.WINDOW_S:g} s "
                                    f"(last exit code {p.exitcode}); giving up: see the worker's log above")
            delay = min(self.BACKOFF_MAX_S, self.BACKOFF_S * 2 ** (len(window) - 1))
            self.due[i] = now + delay
            self.log.warning("worker exited; restarting", extra={"fields": {
                "worker": i, "exit_code": p.exitcode, "deaths_in_window": len(window),
                "restart_in_s": delay}})
        for i, at in list(self.due.items()):
            if self.stopping is not None or now >= at:
                self.due.pop(i)
                self.start(i)
        if self.stopping is not None:
            self._signal_all()
            if not self.procs:
                return EXIT_FAILED if self.failed else 0
            if now > self.stop_deadline:
                names = sorted(self.procs)
                self.log.error("workers did not stop within the grace period; killing them",
                               extra={"fields": {"workers": names}})
                for p in self.procs.values():
                    p.kill()
                    p.join(5)
                return EXIT_FAILED
        return None


def cmd_token(ns) -> int:
    from .auth import Authenticator
    secret = ns.jwt_secret or os.environ.get("REALTIME_JWT_SECRET")
    if not secret:
        print("realtime token: needs --jwt-secret or REALTIME_JWT_SECRET", file=sys.stderr)
        return 2
    # the server's own settings: a token it verifies (REALTIME_JWT_ALGORITHMS HS512 signs HS512)
    a = Authenticator(secret, algorithms=os.environ.get("REALTIME_JWT_ALGORITHMS") or "HS256",
                      issuer=os.environ.get("REALTIME_JWT_ISSUER"),
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
    if bool(ns.url) == bool(ns.kafka):
        print("realtime simulate: give --url (HTTP ingest) or --kafka (produce to the topic), one of them",
              file=sys.stderr)
        return EXIT_USAGE
    return asyncio.run(_simulate(ns))


async def _simulate(ns) -> int:
    """Steps the fleet every 100 ms and sends what is due: one POST per step
    to /api/ingest, or one Kafka record per update (key = vehicle id)."""
    from .ingest.simulator import Fleet
    send, close = await (_kafka_sender(ns) if ns.kafka else _http_sender(ns))
    if send is None:
        return EXIT_USAGE
    fleet = Fleet(ns.vehicles, seed=ns.seed, report_s=ns.vehicles / max(ns.rate, 1e-9))
    step = 0.1
    sent = 0
    deadline = time.monotonic() + ns.duration if ns.duration else None
    try:
        next_t = time.monotonic()
        while deadline is None or time.monotonic() < deadline:
            next_t += step
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))
            res = fleet.step(step, int(time.time() * 1000))
            if res is None:
                continue
            updates = fleet.as_updates(res)
            problem = await send(updates)
            if problem:
                print(f"realtime simulate: {problem}", file=sys.stderr)
                return EXIT_FAILED
            sent += len(updates)
    finally:
        await close()
    print(json.dumps({"sent": sent}))
    return 0


async def _http_sender(ns):
    import aiohttp

    from .auth import INGEST, Authenticator
    token = ns.token
    if not token:
        secret = ns.jwt_secret or os.environ.get("REALTIME_JWT_SECRET")
        if not secret:
            print("realtime simulate: needs --token, --jwt-secret or REALTIME_JWT_SECRET", file=sys.stderr)
            return None, None
        token = Authenticator(secret).mint("simulator", "ingest", [INGEST], ttl_s=86400)
    http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"})
    url = ns.url.rstrip("/") + "/api/ingest"

    async def send(updates):
        async with http.post(url, data=json.dumps(updates, ensure_ascii=False).encode(),
                             headers={"Content-Type": "application/json"}) as r:
            if r.status != 200:
                return f"ingest answered {r.status}: {(await r.text())[:500]}"
        return None

    return send, http.close


async def _kafka_sender(ns):
    from aiokafka import AIOKafkaProducer
    producer = AIOKafkaProducer(bootstrap_servers=ns.kafka, linger_ms=5)
    await producer.start()

    async def send(updates):
        batch = [await producer.send(ns.topic, json.dumps(u, ensure_ascii=False).encode(),
                                     key=u["vehicle_id"].encode()) for u in updates]
        for f in batch:
            await f
        return None

    return send, producer.stop


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
                       description="Send a simulated fleet's updates to a server's /api/ingest (--url) "
                                   "or to its Kafka topic (--kafka).")
    m.add_argument("--url", help="the server's base URL, e.g. http://127.0.0.1:8080")
    m.add_argument("--kafka", metavar="HOST:PORT", help="Kafka bootstrap servers: produce the updates to --topic")
    m.add_argument("--topic", default="vehicle.updates.enriched",
                   help="the topic for --kafka (default: vehicle.updates.enriched)")
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
