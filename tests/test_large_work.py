"""Large work is done in slices, off the ticks' critical path (issue 10, part 6).

Real server processes and a Redis of their own. Each big job is checked two ways:
- it is visibly sliced: clients get batches while it runs (the first
  vehicles of a 16 MiB ingest arrive before its response; a mass offline
  and a mass forget reach the client over several ticks);
- the event loop is never held for long: the worst lag the server saw,
  counting only the loop's own CPU time (`event_loop_lag_cpu_max_ms`),
  stays far below what the job took in one piece. Before slicing these jobs
  held the loop 0.5 to 7 s; a slice is ~15 ms. The bound is loose on purpose
  (a shared 2-core machine); the figures are in the benchmarks, not here.
  The wall-clock lag (`event_loop_lag_max_ms`) is bounded loosely (3 s) and
  printed: in a full run of the suite, with the other half of it on the
  machine, it passed 500 ms (557), where the job's own CPU held the loop
  90 to 150 ms alone beside a busy core (loadmon.py).
"""
import asyncio
import json
import re
import time
import urllib.request

import aiohttp
import pytest
import redis.asyncio as aioredis

from conftest import Client, Server, token

pytestmark = pytest.mark.integration

N = 20_000          # vehicles: the "20k vehicles going offline at once"
BODY = 16 << 20     # the largest ingest body (MAX_BODY)
HELD_MS = 500       # a loop held this long means a job ran in one piece
# the wall clock's bound, loose: a block off the CPU (a synchronous call
# waiting on a socket) does not count as the loop's CPU, and must show here
HELD_WALL_MS = 3000


def body_of(uid: str) -> bytes:
    """N updates padded to just under 16 MiB."""
    now = int(time.time() * 1000)
    bare = len(json.dumps([_update(uid, i, now, "") for i in range(N)]))
    pad = "x" * ((BODY - bare) // N)
    body = json.dumps([_update(uid, i, now, pad) for i in range(N)]).encode()
    assert BODY - N < len(body) <= BODY, len(body)
    return body


def _update(uid, i, now, pad):
    return {"vehicle_id": f"{uid}{i:05d}", "timestamp": now, "position": {"lat": 50 + i * 1e-4, "lon": 10.0},
            "status": "moving", "speed": 10.0, "driver": {"id": f"d{i}", "name": pad}}


def metric(server, name: str) -> float:
    """A metric; and since each scrape resets the lag maxima, the worst lags
    of every scrape are kept in server.worst_lag: (CPU, wall clock)."""
    text = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
    cpu, wall = (float(re.search(rf"^{k} (\S+)$", text, re.M).group(1))
                 for k in ("event_loop_lag_cpu_max_ms", "event_loop_lag_max_ms"))
    was = getattr(server, "worst_lag", (0.0, 0.0))
    server.worst_lag = (max(was[0], cpu), max(was[1], wall))
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def worst_lag(server) -> tuple[float, float]:
    """The worst event-loop lags since the previous call: (CPU, wall clock)."""
    metric(server, "event_loop_lag_max_ms")
    lag, server.worst_lag = server.worst_lag, (0.0, 0.0)
    return lag


async def messages_until(client: Client, done, timeout: float = 60.0) -> list[list[dict]]:
    """The `batch`es a client gets until done() is true; one list per batch."""
    batches = []
    deadline = time.monotonic() + timeout
    while not done(batches):
        assert time.monotonic() < deadline, f"gave up after {len(batches)} batches: {_summary(batches)}"
        try:
            m = await client.recv(1.0)
        except asyncio.TimeoutError:
            continue
        if m.get("type") == "batch" and m["messages"]:
            batches.append(m["messages"])
    return batches


def _summary(batches) -> dict:
    kinds: dict = {}
    for b in batches:
        for m in b:
            k = (m.get("t"), m.get("st") or m.get("ch", {}).get("st"), m.get("r"))
            kinds[k] = kinds.get(k, 0) + 1
    return kinds


def count(batches, pred) -> int:
    return sum(1 for b in batches for m in b if pred(m))


async def test_a_16_mib_ingest_and_a_fleet_going_silent_are_sliced(throwaway_redis, uid):
    port, _, _ = throwaway_redis
    url = f"redis://127.0.0.1:{port}/0"
    # offline after 20 s: the fleet's timestamps are from before the ingest,
    # and b must be serving the client before the fleet turns offline (a
    # loaded snapshot is heard when its timestamps say); 8 s was too short
    # on a busy CI machine, where all 20k were offline in the snapshot
    flags = ("--simulate", "0", "--redis", url, "--offline-after-s", "20", "--stale-after-s", "32",
             "--max-visible", str(2 * N))
    a = Server(*flags)
    b = None
    try:
        body = body_of(uid)
        c = await Client.connect(a, token())
        await c.subscribe(subscriptions={})
        worst_lag(a)
        async with aiohttp.ClientSession() as http:
            post = asyncio.ensure_future(http.post(
                a.url + "/api/ingest", data=body,
                headers={"Authorization": f"Bearer {token('feeder', ['ingest'])}"}))
            # while the request runs, the client already gets vehicles, tick by tick
            early = await messages_until(c, lambda bs: len(bs) >= 2 or post.done())
            assert not post.done() and count(early, lambda m: m["t"] == "full") > 0, \
                "the ingest was applied in one piece"
            resp = await post
            assert resp.status == 200
            assert (await resp.json()) == {"accepted": N, "rejected": []}
        rest = await messages_until(c, lambda bs: count(early + bs, lambda m: m["t"] == "full") >= N)
        assert count(early + rest, lambda m: m["t"] == "full") == N
        # the writer puts all of it into Redis, also in slices
        r = aioredis.Redis(port=port)
        try:
            for _ in range(300):
                if len([k async for k in r.scan_iter(match=f"vehicle:current:{uid}*", count=5000)]) == N:
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the writer did not write every vehicle")
        finally:
            await r.aclose()
        lag_a = worst_lag(a)
        assert lag_a[0] < HELD_MS and lag_a[1] < HELD_WALL_MS, lag_a
        await c.close()
        a.stop()

        # a new instance: its first reconcile loads the whole fleet, it becomes
        # the writer and rewrites everything, then the fleet goes offline (no
        # news for 20 s) and is forgotten (32 s): 20k vehicles at once, each time
        b = Server(*flags)
        c = await Client.connect(b, token())
        for _ in range(200):
            if metric(b, "vehicles_tracked") == N:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the snapshot was not loaded")
        _, first = await c.subscribe(subscriptions={})
        # §3.4: the snapshot comes in batches of at most 1,000, one after the other
        rest = await messages_until(c, lambda bs: len(first) + sum(map(len, bs)) >= N)
        snapshot = first + [m for b in rest for m in b]
        assert len(snapshot) == N and {m["t"] for m in snapshot} == {"full"}
        assert max(map(len, [first] + rest)) <= 1000

        def offline(bs):
            return count(bs, lambda m: (m.get("st") or m.get("ch", {}).get("st")) == "offline")
        went = await messages_until(c, lambda bs: offline([snapshot] + bs) >= N)
        assert offline([snapshot] + went) == N
        assert len(went) > 2, "all vehicles went offline in one tick"
        gone = await messages_until(c, lambda bs: count(bs, lambda m: m["t"] == "leave") >= N, timeout=90)
        assert count(gone, lambda m: m["t"] == "leave" and m["r"] == "stale") == N
        assert len(gone) > 2, "all vehicles were forgotten in one tick"
        assert metric(b, "vehicles_tracked") == 0
        # the counter counts the ones that turned offline in b: every one after
        # the snapshot, and those in it that b turned offline before it was
        # sent (a snapshot's vehicles are heard when their timestamps say, so
        # those silent too long by then turn offline at b's first check),
        # but not those that came offline from a's hashes
        assert offline(went) <= metric(b, "vehicles_went_offline_total") <= offline([snapshot] + went)
        r = aioredis.Redis(port=port, decode_responses=True)
        try:   # b took over the writer's lease (and so rewrote the fleet) meanwhile
            assert await r.get("realtime:writer") == f"{b.proc.pid:x}"
        finally:
            await r.aclose()
        lag = worst_lag(b)
        print("worst event-loop lag, its own CPU (wall clock): ingest and write %.0f ms (%.0f); "
              "load, rewrite, offline and forget %.0f ms (%.0f)" % (*lag_a, *lag))
        assert lag[0] < HELD_MS and lag[1] < HELD_WALL_MS, lag
        await c.close()
    finally:
        a.stop()
        if b is not None:
            b.stop()
