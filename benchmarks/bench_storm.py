"""A reconnect storm (issue 10, part 7), measured against real processes.

Two instances, A and B, share a Redis of their own. A fleet simulator feeds B
(relayed to A through Redis), and `observers` clients on B watch the whole
fleet all along. `clients` clients on A subscribe to `event_vehicles`
vehicles that get instant events (Redis PUBLISH) all through the run. Then A
gets SIGTERM: it sends each client `reconnect` with a jittered `after_ms` and
closes with 1001, and each client comes back on B with `resume` and
`last_event`, as the browser client does.

Reported, in the same run:
- storm_s: SIGTERM to the moment the last client has its `welcome` and its
  full state (the first `batch` after the resume) on B;
- events_lost: events published after a client's first event that it never
  got (must be 0), and events_repeated (got twice);
- redis_pool_waits / redis_pool_timeouts on B during the storm;
- the observers' p99 delivery latency during the storm, against their p99
  in the seconds before it (p99_ratio = storm / before): how much the storm
  costs the clients that were not part of it.

Run: python benchmarks/bench_storm.py [--smoke] ; prints one JSON object, and
exits 1 if any event was lost. STORM_DEBUG=1 logs each client that missed events;
STORM_PROFILE=file.json records where B spends the storm (py-spy, speedscope format).
The observers run in their own process (`--observe`), so that the storm
clients' work does not count against the observers' latency.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import jwt
import numpy as np
import uvloop

from bench_e2e import HERE, PY, ROOT, SECRET, Proc, cpu_s, free_port, log, metrics, realtime, token, wait_port
from loadgen import Stats, WSClient, mask_frame, next_frame, take_upgrade, viewport_subscribe

EID = re.compile(rb'"eid":"([0-9]+-[0-9]+)"')


def storm_token(user: str) -> str:
    return jwt.encode({"sub": user, "permissions": ["view_all_vehicles"], "exp": int(time.time()) + 86400},
                      SECRET, algorithm="HS256")


class StormClient(asyncio.Protocol):
    """One dispatcher: subscribes on A; on `reconnect` + close, resumes on B
    after `after_ms`; keeps every event id it receives."""

    def __init__(self, run: "Storm", i: int):
        self.run = run
        self.i = i
        self.tok = run.tokens[i % len(run.tokens)]
        self.session = None
        self.eids: list[bytes] = []
        self.after_ms = None
        self.port = run.port_a
        self.back_at = None        # when the first batch after the resume arrived
        self.recovered = None
        self.attempts = 0
        self._new()

    def _new(self):
        self.refused = None
        self.closed_code = None
        self.buf = bytearray()
        self.upgraded = False
        self.transport = None
        self.waiting_state = False

    # ------------------------------------------------------------ connecting
    async def connect(self):
        loop = asyncio.get_running_loop()
        self._new()
        self.attempts += 1
        path = f"/ws?token={self.tok}"
        if self.port == self.run.port_b:
            path += f"&resume={self.session}"
            if self.eids:
                path += f"&last_event={self.eids[-1].decode()}"
        try:
            await loop.create_connection(lambda: self, "127.0.0.1", self.port)
        except OSError as e:
            self.retry(type(e).__name__)
            return
        self.transport.write((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
                              f"Connection: Upgrade\r\nSec-WebSocket-Key: {os.urandom(16).hex()[:22]}==\r\n"
                              f"Sec-WebSocket-Version: 13\r\n\r\n").encode())

    def connection_made(self, transport):
        self.transport = transport

    def retry(self, why: str):
        """Refused (1013 try again, or no answer): back off and try B again."""
        self.port = self.run.port_b
        self.run.retries[why] = self.run.retries.get(why, 0) + 1
        asyncio.get_running_loop().call_later(random.uniform(0.5, 2.0),
                                              lambda: asyncio.ensure_future(self.connect()))

    def connection_lost(self, exc):
        if self.run.finished:
            return
        if self.port == self.run.port_a:
            # A is going away: come back on B after the server's after_ms
            self.port = self.run.port_b
            delay = (self.after_ms if self.after_ms is not None else random.randint(500, 2000)) / 1000
            self.waiting_state = False
            asyncio.get_running_loop().call_later(delay, lambda: asyncio.ensure_future(self.connect()))
        elif self.back_at is None:
            self.retry(f"closed {self.closed_code}" if self.upgraded else
                       ("refused " + self.refused if self.refused else "dropped before the upgrade"))

    # ------------------------------------------------------------ frames
    def data_received(self, data):
        buf = self.buf
        buf += data
        if not self.upgraded:
            answer = take_upgrade(buf)
            if answer is None:
                return
            if not answer:
                self.refused = bytes(buf[:12]).decode(errors="replace")
                self.transport.close()
                return
            self.upgraded = True
        while True:
            frame = next_frame(buf)
            if frame is None:
                return
            opcode, payload = frame
            if opcode == 0x9:
                self.transport.write(mask_frame(payload, 0xA))
            elif opcode == 0x8:
                self.closed_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                self.transport.close()
                return
            elif opcode == 0x1:
                self.message(payload)

    def message(self, payload: bytes):
        if payload.startswith(b'{"type":"batch"'):
            self.eids.extend(EID.findall(payload))
            if self.waiting_state:
                self.waiting_state = False
                if self.port == self.run.port_b and self.back_at is None:
                    self.back_at = time.monotonic()
                    self.run.back += 1
                else:
                    self.run.subscribed += 1
            return
        if b'"eid"' in payload:     # an event outside a batch: never expected
            self.eids.extend(EID.findall(payload))
        m = json.loads(payload)
        kind = m.get("type")
        if kind == "welcome":
            self.session = self.session or m["session"]
            if self.port == self.run.port_a:
                self.transport.write(mask_frame(json.dumps({"type": "subscribe", "subscriptions": {
                    "vehicles": self.run.event_vehicles}}).encode()))
            else:
                self.recovered = m.get("recovered")
                self.waiting_state = True   # hub.resume sends the full state next
        elif kind == "subscribed":
            self.waiting_state = True
        elif kind == "reconnect":
            self.after_ms = m.get("after_ms")


class Storm:
    def __init__(self, a, port_a, port_b, clients, event_vehicles, redis_url, b_pid=None):
        self.a = a
        self.b_pid = b_pid
        self.port_a, self.port_b = port_a, port_b
        self.clients_n = clients
        self.event_vehicles = event_vehicles
        self.redis_url = redis_url
        self.tokens = [storm_token(f"storm{i}") for i in range(50)]
        self.subscribed = 0
        self.back = 0
        self.retries: dict[str, int] = {}   # why -> times a client had to try B again
        self.finished = False

    async def run(self, events_per_s: float, observers: subprocess.Popen) -> dict:
        import redis.asyncio as aioredis
        r = aioredis.Redis.from_url(self.redis_url)
        loop = asyncio.get_running_loop()
        clients = [StormClient(self, i) for i in range(self.clients_n)]
        gate = asyncio.Semaphore(64)

        async def connect(c):
            async with gate:
                await c.connect()
                for _ in range(600):
                    if c.session is not None:
                        return
                    await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await asyncio.gather(*(connect(c) for c in clients))
        await _until(lambda: self.subscribed >= self.clients_n, 120, "every client subscribed on A")
        log(f"storm: {self.clients_n} clients on A in {time.monotonic() - t0:.1f} s")

        published = 0
        stop = asyncio.Event()

        async def publish():
            nonlocal published
            while not stop.is_set():
                v = self.event_vehicles[published % len(self.event_vehicles)]
                await r.publish(f"vehicle:events:{v}", json.dumps({"type": "storm", "n": published}))
                published += 1
                await asyncio.sleep(1.0 / events_per_s)
        pub = loop.create_task(publish())
        await _until(lambda: all(c.eids for c in clients), 60, "an event at every client")
        await asyncio.sleep(3.0)                  # the observers' baseline window runs meanwhile
        before = metrics(self.port_b)
        pids = {"a": self.a.p.pid, "b": self.b_pid, "clients": os.getpid(), "observers": observers.pid}
        cpu0 = {k: cpu_s(p) for k, p in pids.items()}
        t_storm = time.time()
        m0 = time.monotonic()
        self.a.p.send_signal(signal.SIGTERM)
        if os.environ.get("STORM_PROFILE"):   # where B spends the storm (needs py-spy)
            subprocess.Popen(["py-spy", "record", "--pid", str(self.b_pid), "--duration", "40",
                              "--format", "speedscope", "-o", os.environ["STORM_PROFILE"]],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await _until(lambda: self.back >= self.clients_n, 300, "every client back on B with its state")
        storm_s = time.monotonic() - m0
        t_back = time.time()
        cpu = {k: round(_cpu_or(p, cpu0[k]) - cpu0[k], 1) for k, p in pids.items()}
        after = metrics(self.port_b)
        await asyncio.sleep(2.0)                  # events go on after the storm
        stop.set()
        await pub
        await asyncio.sleep(2.0)                  # the last ones arrive
        self.finished = True
        # every event in the log, oldest first
        # every event in the log for the clients' vehicles, oldest first (the
        # simulated fleet's alerts are events too, for vehicles they do not see)
        mine = {v.encode() for v in self.event_vehicles}
        log_eids, cursor = [], "-"
        while True:
            page = await r.xrange("events:stream", min=cursor, count=10_000)
            if cursor != "-":
                page = page[1:]
            if not page:
                break
            log_eids += [e for e, f in page if f.get(b"v") in mine]
            cursor = page[-1][0].decode()
        await r.aclose()
        order = {e: i for i, e in enumerate(log_eids)}
        lost = repeated = 0
        for c in clients:
            got = [order[e] for e in c.eids if e in order]
            first = min(got)
            expected = set(range(first, len(log_eids)))
            missing = expected - set(got)
            lost += len(missing)
            repeated += len(got) - len(set(got))
            if missing and os.environ.get("STORM_DEBUG"):
                import redis as sync_redis
                rec = sync_redis.Redis.from_url(self.redis_url).get(f"session:{c.session}")
                log(f"client {c.i}: missing {sorted(missing)} got {got} recovered={c.recovered} record={rec}")
        a_exit = self.a.p.wait(30)
        return {
            "clients": self.clients_n, "storm_s": round(storm_s, 2),
            "events_published": published, "events_in_log": len(log_eids),
            "events_lost": lost, "events_repeated": repeated,
            "recovered_false": sum(1 for c in clients if c.recovered is False),
            "retries": sum(self.retries.values()), "retry_reasons": self.retries,
            "redis_pool_waits": after.get("redis_pool_waits_total", 0) - before.get("redis_pool_waits_total", 0),
            "redis_pool_timeouts": after.get("redis_pool_timeouts_total", 0)
            - before.get("redis_pool_timeouts_total", 0),
            "a_exit_status": a_exit,
            "cpu_s_during_storm": cpu,
            "window": (t_storm * 1000, t_back * 1000),
        }


def _cpu_or(pid, default):
    try:
        return cpu_s(pid)
    except OSError:   # A has exited
        return default


async def _until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------- observers
async def observe(port: int, clients: int, out: str) -> None:
    """--observe: `clients` watch parts of the fleet on B until stdin closes;
    then every sampled latency and when it was seen go to `out` (.npy)."""
    loop = asyncio.get_running_loop()
    # each watches a viewport of 5% of the fleet's area (~100 vehicles), and
    # one frame in 10 is decoded for its latency: the observers' own process
    # must stay far from saturation, or its delays are what gets measured
    stats = Stats(sample=10, stamped=True)
    viewport = viewport_subscribe((55.55, 37.35, 55.95, 37.9), 0.05)
    rng = random.Random(1)
    protos = []
    for i in range(clients):
        ready = loop.create_future()
        sub = viewport(rng, i)
        _, p = await loop.create_connection(
            lambda: WSClient(f"127.0.0.1:{port}", f"/ws?token={token()}", sub, stats, ready), "127.0.0.1", port)
        await asyncio.wait_for(ready, 30)
        protos.append(p)
    for p in protos:
        p.send_subscribe()
    await _until(lambda: stats.subscribed >= clients, 60, "observers subscribed")
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    np.save(out, np.array([stats.stamps, stats.latencies], dtype=np.float64))


# ---------------------------------------------------------------- orchestration
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, default=10_000)
    p.add_argument("--observers", type=int, default=200)
    p.add_argument("--fleet", type=int, default=2000)
    p.add_argument("--event-vehicles", type=int, default=50)
    p.add_argument("--events-per-s", type=float, default=2.0)
    p.add_argument("--smoke", action="store_true", help="300 clients, 20 observers, 200 vehicles")
    p.add_argument("--observe", type=int, metavar="PORT", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.observe:
        uvloop.run(observe(a.observe, a.observers, a.out))
        return
    if a.smoke:
        a.clients, a.observers, a.fleet = 300, 20, 200
    tmp = tempfile.mkdtemp(prefix="bench-storm-")
    rport, pa, pb = free_port(), free_port(), free_port()
    redis_proc = subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--dir", tmp],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{rport}/0"
    procs = []
    try:
        wait_port(rport)
        # the smoke run's shorter grace spreads its few reconnects over ~1 s, not 3
        extra = ("--redis", url, "--tick-ms", "50", "--shutdown-grace", "3" if a.smoke else "10")
        a_srv, b_srv = realtime(pa, 0, extra), realtime(pb, 0, extra)
        procs += [a_srv, b_srv]
        wait_port(pa)
        wait_port(pb)
        evs = [f"ev{i:03d}" for i in range(a.event_vehicles)]
        _ingest(pa, [{"vehicle_id": v, "timestamp": int(time.time() * 1000),
                      "position": {"lat": 55.7, "lon": 37.6}} for v in evs])
        time.sleep(1.0)   # relayed to B
        sim = Proc([PY, "-m", "realtime", "simulate", "--url", f"http://127.0.0.1:{pb}", "--vehicles",
                    str(a.fleet), "--rate", str(a.fleet), "--jwt-secret", SECRET])
        procs.append(sim)
        npy = os.path.join(tmp, "observers.npy")
        obs = subprocess.Popen([PY, str(HERE / "bench_storm.py"), "--observe", str(pb), "--observers",
                                str(a.observers), "--out", npy], cwd=ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
        if obs.stdout.readline().strip() != "ready":
            raise RuntimeError("the observers did not start")
        log(f"storm: {a.observers} observers on B, fleet of {a.fleet} at 1 Hz")
        res = uvloop.run(Storm(a_srv, pa, pb, a.clients, evs, url, b_srv.p.pid).run(a.events_per_s, obs))
        obs.stdin.close()
        obs.wait(300)
        stamps, lat = np.load(npy)
        t0, t1 = res.pop("window")
        base = lat[(stamps >= t0 - 3000) & (stamps < t0)]
        during = lat[(stamps >= t0) & (stamps <= t1)]
        p99_before = float(np.percentile(base, 99)) if len(base) else None
        p99_storm = float(np.percentile(during, 99)) if len(during) else None
        res.update({
            "observers": a.observers, "fleet": a.fleet,
            "observer_p99_before_ms": round(p99_before, 1) if p99_before is not None else None,
            "observer_p99_storm_ms": round(p99_storm, 1) if p99_storm is not None else None,
            "p99_ratio": round(p99_storm / p99_before, 2) if p99_before and p99_storm else None,
            "observer_samples": [int(len(base)), int(len(during))],
        })
        print(json.dumps(res))
        if res["events_lost"]:
            # a lost event is a bug, not a slow run: make the smoke run in `make test` fail
            log(f"storm: {res['events_lost']} events lost")
            sys.exit(1)
    finally:
        for pr in procs:
            pr.stop()
        redis_proc.terminate()
        redis_proc.wait()


def _ingest(port, updates):
    tok = jwt.encode({"sub": "feeder", "permissions": ["ingest"], "exp": int(time.time()) + 3600},
                     SECRET, algorithm="HS256")
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/ingest", data=json.dumps(updates).encode(),
                                 method="POST", headers={"Authorization": f"Bearer {tok}"})
    urllib.request.urlopen(req, timeout=10).read()


if __name__ == "__main__":
    main()
