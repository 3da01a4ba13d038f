"""Integration: --workers N share one port (SO_REUSEPORT) and state through Redis."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import (ROOT, SECRET, Client, Server, both_ready, both_workers, children, ingest, metric_value,
                      on_worker, token, update, vehicle_status)

pytestmark = pytest.mark.integration


def running(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


async def test_workers_share_the_port_restart_and_stop(module_redis_url, uid):
    s = Server("--workers", "2", "--simulate", "0", "--tick-ms", "20", "--redis", module_redis_url)
    try:
        workers = both_workers(s)
        both_ready(s)
        vid = uid + "w"
        assert ingest(s, [update(vid)])[0] == 200
        # the relay reaches the other worker: new connections land on either,
        # so wait until many in a row know the vehicle
        deadline, known = time.time() + 20, 0
        while known < 10 and time.time() < deadline:
            known = known + 1 if vehicle_status(s, vid) == 200 else 0
            time.sleep(0.02)
        assert known == 10
        # the owner has one follower, the follower its owner: either answers 1
        for _ in range(6):
            assert metric_value(s, "mirror_links") == 1
        clients, instances = [], set()
        for _ in range(16):
            c = await Client.connect(s, token())
            await c.recv_type("welcome")
            _, msgs = await c.subscribe(subscriptions={"vehicles": [vid]})
            assert [m["v"] for m in msgs] == [vid]
            clients.append(c)
        # batch ids name the instance: both workers serve clients. Each
        # request lands on either worker (one that is not the owner forwards
        # it, mirror.py), and every client gets every position
        for i in range(6):
            assert ingest(s, [update(vid, 56.0 + i / 10, ts=int(time.time() * 1000) + i)])[0] == 200
        for c in clients:
            lats = []
            while 56.5 not in lats:
                b = await c.recv_type("batch")
                lats += [m["p"][0] for m in b["messages"] if "p" in m]
                instances.add(b["batch_id"].rsplit("-", 1)[0])
            assert lats == sorted(lats)   # in order
        assert len(instances) == 2
        for c in clients:
            await c.close()
        # a worker that dies is restarted
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.time() + 20
        while time.time() < deadline:
            now = children(s.proc.pid)
            if len(now) >= 2 and workers[0] not in now:
                break
            time.sleep(0.1)
        assert len(children(s.proc.pid)) >= 2 and workers[0] not in children(s.proc.pid)
        # SIGTERM to the parent reaches every worker; all exit
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(20) == 0
    finally:
        s.stop()


async def test_the_owner_worker_restarts_and_the_others_carry_on(module_redis_url, uid):
    """Worker 0 owns the fleet (mirror.py). Killed, it is restarted; a client
    of another worker stays connected, loses no vehicle (the new owner reads
    the fleet back from Redis first) and gets updates again, and ingest sent
    to that worker meanwhile is refused (503) or applied, never lost."""
    s = Server("--workers", "2", "--simulate", "0", "--tick-ms", "20", "--redis", module_redis_url)
    clients = []
    try:
        both_workers(s)
        both_ready(s)
        vid = uid + "o"
        assert ingest(s, [update(vid, 55.0)])[0] == 200
        owner_pid = follower = None
        for _ in range(40):   # connections land on either worker: find one of each
            c = await Client.connect(s, token())
            await c.recv_type("welcome")
            clients.append(c)
            await c.subscribe(subscriptions={"vehicles": [vid]})
            ingest(s, [update(vid, 55.0 + len(clients) / 1000, ts=int(time.time() * 1000))])
            b = await c.recv_type("batch")
            pid, index = b["batch_id"].split("-")[:2]
            if index == "0":
                owner_pid = int(pid, 16)
            elif follower is None:
                follower = c
            if owner_pid and follower:
                break
        assert owner_pid and follower, "no connection reached each worker"
        # the owner's writer has the vehicle in Redis (the new owner reads it
        # back); the lease may still be a killed owner's of an earlier test
        import redis as redis_sync
        r = redis_sync.Redis.from_url(module_redis_url)
        want = str(55.0 + len(clients) / 1000)
        deadline = time.time() + 20
        while r.hget(f"vehicle:current:{vid}", "lat") != want.encode() and time.time() < deadline:
            time.sleep(0.1)
        assert r.hget(f"vehicle:current:{vid}", "lat") == want.encode()
        r.close()
        os.kill(owner_pid, signal.SIGKILL)
        deadline = time.time() + 30
        while time.time() < deadline:
            now = children(s.proc.pid)
            if len(now) >= 2 and owner_pid not in now:
                break
            time.sleep(0.1)
        # ingest until it is taken (a follower without its owner says 503)
        statuses = []
        while time.time() < deadline:
            st, _ = ingest(s, [update(vid, 57.0, ts=int(time.time() * 1000))])
            statuses.append(st)
            if st == 200:
                break
            assert st == 503
            time.sleep(0.2)
        assert statuses[-1] == 200
        seen = await follower.wait_messages(lambda m: m.get("p", [0])[0] == 57.0, timeout=20)
        assert not [m for m in seen if m.get("t") == "leave"], seen
    finally:
        for c in clients:
            await c.close()
        s.stop()


# ---------------------------------------------------------------- supervisor (issue 9)
def serve(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "realtime", "serve", "--jwt-secret", SECRET, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("workers", [1, 2])
def test_a_taken_port_is_one_clear_line_and_a_non_zero_exit(workers, module_redis_url):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = serve("--port", str(port), "--workers", str(workers), "--redis", module_redis_url, "--simulate", "0")
    assert p.returncode == 1
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert lines == [f"realtime serve: cannot listen on 127.0.0.1:{port}: the address is already in use "
                     "(is another server running there?); stop it or pass another --port"]


@pytest.mark.parametrize("supervised,status", [(False, 1), (True, 3)])
def test_a_worker_that_cannot_bind_says_so_once(supervised, status):
    """The race the check before start cannot close: the port is taken after
    it. A lone worker prints the line; a supervised one exits with the status
    that makes its supervisor give up instead of restarting it."""
    code = ("import sys\nfrom realtime import config, worker\n"
            f"s = config.Settings(port={{port}}, jwt_secret={SECRET!r}, simulate=0)\ns.validate()\n"
            f"sys.exit(worker.run(s, supervised={supervised}))\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = subprocess.run([sys.executable, "-c", code.format(port=port)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert p.returncode == status, p.stderr
    lines = [x for x in p.stderr.splitlines() if x.startswith("realtime serve:")]
    assert lines == ([] if supervised else [f"realtime serve: cannot listen on 127.0.0.1:{port}: the address "
                                            "is already in use (is another server running there?); "
                                            "stop it or pass another --port"])


def test_a_worker_that_keeps_dying_is_restarted_with_backoff_then_given_up(module_redis_url):
    s = Server("--workers", "2", "--simulate", "0", "--redis", module_redis_url)
    try:
        first = both_workers(s)
        victim, survivor = first
        for kill in range(1, 6):
            os.kill(victim, signal.SIGKILL)
            if kill == 5:
                break
            # the restarted worker is the child that is neither the survivor nor the dead one
            deadline = time.time() + 60
            while time.time() < deadline:
                now = [p for p in children(s.proc.pid) if p not in (victim, survivor)]
                if now:
                    victim = now[0]
                    break
                time.sleep(0.05)
            else:
                raise AssertionError("not restarted: " + s.logs())
            time.sleep(0.3)   # let it get past spawn, so that the kill hits the worker
        assert s.proc.wait(60) == 1
        out = open(s.log.name).read()
        restarts = [json.loads(x) for x in out.splitlines() if '"worker exited; restarting"' in x]
        assert [r["restart_in_s"] for r in restarts] == [0.5, 1.0, 2.0, 4.0]
        assert [r["deaths_in_window"] for r in restarts] == [1, 2, 3, 4]
        assert len({r["worker"] for r in restarts}) == 1
        assert "died 5 times in 300 s" in out and "giving up" in out
        deadline = time.time() + 10
        while running(survivor) and time.time() < deadline:   # the survivor was stopped too
            time.sleep(0.1)
        assert not running(survivor)
    finally:
        s.stop()


def test_the_supervisor_gives_up_at_once_when_its_workers_cannot_bind(module_redis_url):
    """The port is taken after the check before start (here: the check is
    skipped): each worker exits with status 3, and the supervisor prints one
    line and stops instead of restarting them."""
    code = ("import sys\nimport realtime.cli as cli\ncli.port_problem = lambda host, port: None\n"
            "sys.exit(cli.main(sys.argv[1:]))\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with tempfile.TemporaryFile("w+") as err:   # a file: no pipe for a straggler to hold open
            p = subprocess.run([sys.executable, "-c", code, "serve", "--port", str(port), "--workers", "2",
                                "--redis", module_redis_url, "--simulate", "0", "--jwt-secret", SECRET],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, text=True, timeout=90)
            err.seek(0)
            p.stderr = err.read()
    assert p.returncode == 1, p.stderr[-2000:]
    lines = [x for x in p.stderr.splitlines() if x.startswith("realtime serve:")]
    assert lines == [f"realtime serve: cannot listen on 127.0.0.1:{port}: the address is already in use "
                     "(is another server running there?); stop it or pass another --port"]
    assert '"worker exited; restarting"' not in p.stderr


def test_workers_go_when_their_supervisor_is_killed(module_redis_url):
    s = Server("--workers", "2", "--simulate", "0", "--redis", module_redis_url)
    try:
        workers = both_workers(s)
        s.proc.kill()
        s.proc.wait()
        deadline = time.time() + 20
        while any(running(w) for w in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(running(w) for w in workers), "orphaned workers keep serving"
    finally:
        s.stop()


async def test_a_group_the_registry_drops_leaves_on_every_worker(module_redis_url, uid):
    """Each worker reads the registry (`group:{g}:vehicles`) for the groups
    its own clients name; the owner worker's frames carry only the groups
    the updates carry. A registry group the owner read for a client that has
    since left used to reach the follower as if the updates carried it, and
    stayed there: after the registry dropped the vehicle, a token limited to
    that group on the follower still saw it, for good."""
    import redis.asyncio as aioredis
    s = Server("--workers", "2", "--simulate", "0", "--tick-ms", "20", "--redis", module_redis_url)
    r = aioredis.Redis.from_url(module_redis_url)
    vid, g = uid + "v", uid + "g"
    tok = token(sub=uid + "u", permissions=[], groups=[g])

    async def seeing(index: str):
        """A client of the group's token on that worker, seeing the vehicle."""
        c, _, sub, b = await on_worker(s, index, tok)
        assert sub["visible"] == 1 and [m["v"] for m in b["messages"]] == [vid]
        return c
    try:
        both_workers(s)
        both_ready(s)
        assert ingest(s, [update(vid)])[0] == 200   # its updates carry no groups
        await r.sadd(f"group:{g}:vehicles", vid)
        owners = await seeing("0")   # the owner reads the group for it
        await owners.close()         # and no longer does
        c = await seeing("1")
        await r.srem(f"group:{g}:vehicles", vid)
        left = await c.wait_messages(lambda m: m.get("t") == "leave" and m.get("v") == vid, timeout=15)
        assert [m["r"] for m in left if m.get("t") == "leave"] == ["permission"], s.logs()
        await c.close()
    finally:
        await r.aclose()
        s.stop()


async def test_a_worker_without_the_fleet_refuses_clients_rather_than_lose_their_events(module_redis_url, uid):
    """A follower that has not had the owner's fleet (it was restarted while
    the owner is stuck) holds no vehicles: a resume there replayed none of
    their events and still said recovered: true. It refuses clients with
    1013 until the fleet arrives, and serves them after."""
    import asyncio
    import websockets
    s = Server("--workers", "2", "--simulate", "0", "--tick-ms", "20", "--redis", module_redis_url)
    stopped = None
    try:
        first = both_workers(s)
        both_ready(s)
        assert ingest(s, [update(uid + "v")])[0] == 200
        c, owner, _, _ = await on_worker(s, "0")
        await c.close()
        assert owner in first
        follower = [p for p in first if p != owner][0]
        os.kill(owner, signal.SIGSTOP)
        stopped = owner
        os.kill(follower, signal.SIGKILL)
        deadline = time.time() + 30
        while time.time() < deadline and len([p for p in children(s.proc.pid) if p != owner]) < 1:
            time.sleep(0.1)
        await asyncio.sleep(1.0)   # the new follower listens; the stuck owner sends it nothing
        answers = []
        for _ in range(30):   # connections land on either: the stuck owner's never answer
            try:
                c = await Client.connect(s, token(), open_timeout=1.5)
            except (asyncio.TimeoutError, TimeoutError, OSError):
                continue
            try:
                answers.append((await c.recv(3.0)).get("type"))
            except websockets.ConnectionClosed as e:
                answers.append(e.rcvd.code if e.rcvd else None)
            except asyncio.TimeoutError:
                answers.append("silence")
            await c.close()
            if len(answers) >= 3:
                break
        assert answers and set(answers) == {1013}, answers
        os.kill(owner, signal.SIGCONT)
        stopped = None
        both_ready(s)
        c = await Client.connect(s, token())
        await c.recv_type("welcome")
        await c.close()
    finally:
        if stopped:
            os.kill(stopped, signal.SIGCONT)
        s.stop()


async def test_an_owner_restarted_while_redis_is_down_feeds_the_other_workers(kafka_bootstrap, throwaway_redis, uid):
    """The owner worker copies the fleet to the others once Redis has given
    it the snapshot. One restarted during a Redis outage waited for that for
    the whole outage, and the followers' clients had frozen positions. It
    now sends what it has (from Kafka) as a partial copy, which takes nothing
    from the followers (alerts the new owner has not read again stay),
    and the whole fleet once Redis is back."""
    import asyncio
    from conftest import create_topic
    from test_kafka import js, produce
    port, proc, start = throwaway_redis
    topic = "owner." + uid
    await create_topic(kafka_bootstrap, topic, 1)
    s = Server("--workers", "2", "--simulate", "0", "--tick-ms", "20", "--redis", f"redis://127.0.0.1:{port}/0",
               "--kafka", kafka_bootstrap, "--topic", topic, "--kafka-from", "earliest")
    s.bootstrap, s.topic = kafka_bootstrap, topic
    vid = uid + "v"
    clients, stopped = [], None
    try:
        both_workers(s)
        both_ready(s)
        t0 = time.time()
        await produce(s, [(vid, js(update(vid, 1.0, 2.0, int(t0 * 1000), alerts=["overspeed"])), None)])
        c, owner, _, _ = await on_worker(s, "0")
        clients.append(c)
        follower, follower_pid, _, b = await on_worker(s, "1", subscriptions={"vehicles": [vid]})
        clients.append(follower)
        # the owner's frame may reach that worker after the client's snapshot
        first = b["messages"] or await follower.wait_messages(lambda m: m.get("v") == vid, timeout=10)
        assert [(m["v"], m["al"]) for m in first if m.get("t") == "full"] == [(vid, ["overspeed"])]
        # past the new owner's rewind (10 s before its predecessor died), then
        # an update without alerts: the new owner knows the vehicle, not its alerts
        await asyncio.sleep(max(0.0, 11.0 - (time.time() - t0)))
        await produce(s, [(vid, js(update(vid, 2.0, 2.0, int(time.time() * 1000))), None)])
        assert await follower.wait_messages(lambda m: m.get("p", [None])[0] == 2.0, timeout=10)
        proc[0].terminate()
        proc[0].wait()
        await asyncio.sleep(1.0)
        # the follower links to the new owner only once that one has read
        # Kafka again: its copy then holds the vehicle, without the alerts
        os.kill(follower_pid, signal.SIGSTOP)
        stopped = follower_pid
        consumed = s.logs(None).count("kafka consuming")
        os.kill(owner, signal.SIGKILL)
        deadline = time.time() + 30
        while time.time() < deadline and (owner in children(s.proc.pid) or len(children(s.proc.pid)) < 2
                                          or s.logs(None).count("kafka consuming") == consumed):
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.0)   # its first poll: the record of 2.0, read again
        os.kill(follower_pid, signal.SIGCONT)
        stopped = None
        got, lat = [], 1.0
        deadline = time.monotonic() + 25
        while lat != 3.0 and time.monotonic() < deadline:   # until the new owner reads Kafka and copies
            await produce(s, [(vid, js(update(vid, 3.0, 2.0, int(time.time() * 1000))), None)])
            got = await follower.messages(1.0)
            lat = next((at[0] for at in (m.get("p") or m.get("ch", {}).get("p") for m in reversed(got)) if at), lat)
        assert lat == 3.0, s.logs()
        await follower.send({"type": "get", "vehicle": vid, "id": "g"})
        assert (await follower.recv_type("vehicle_update"))["alerts"] == ["overspeed"]
        # Redis back (empty: this one keeps nothing on disk): the whole fleet
        # as the owner has it now (without the alerts), and the follower goes on
        proc[0] = start()
        deadline = time.monotonic() + 20
        while "partial copy starts again" not in s.logs(None) and time.monotonic() < deadline:
            await asyncio.sleep(0.3)
        assert "partial copy starts again" in s.logs(None)
        await produce(s, [(vid, js(update(vid, 4.0, 2.0, int(time.time() * 1000))), None)])
        assert await follower.wait_messages(
            lambda m: (m.get("p") or m.get("ch", {}).get("p") or [None])[0] == 4.0, timeout=15)
    finally:
        if stopped:
            os.kill(stopped, signal.SIGCONT)
        for c in clients:
            await c.close()
        s.stop()
