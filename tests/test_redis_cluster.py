"""Integration, issue 14 part 3: the service on a real Redis Cluster of three
masters with a replica each, started here from redis-server (--cluster-enabled
yes) and joined with redis-cli --cluster create. Ingest, events, ACL updates,
resume on another instance and the reconcile, with the keys spread over every
node; then a master restarted empty, and a master killed and failed over."""
import asyncio
import json
import shutil
import signal
import subprocess
import time

import msgpack
import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisError

from conftest import Client, Server, eventually, free_port, ingest, metric_value, ready_status, redis_up, \
    require, token, update, value, vehicle_status

pytestmark = pytest.mark.integration


def _cluster_ok(port: int) -> bool:
    p = subprocess.run(["redis-cli", "-p", str(port), "cluster", "info"], capture_output=True, text=True)
    return "cluster_state:ok" in p.stdout


class Cluster(list):
    """The nodes' ports (the first three start as masters); `restart(port)`
    stops a node and starts it again empty, with its cluster configuration."""

    def __init__(self, ports, start):
        super().__init__(ports)
        self.procs = {p: start(p) for p in ports}
        self._start = start

    def kill(self, port: int):
        self.procs[port].kill()
        self.procs[port].wait()

    def start(self, port: int):
        self.procs[port] = self._start(port)

    def restart(self, port: int):
        self.kill(port)
        self.start(port)
        self.wait_ok()

    def wait_ok(self, ports=None, timeout=30):
        deadline = time.time() + timeout
        while not all(redis_up(p) and _cluster_ok(p) for p in (ports or self)):
            assert time.time() < deadline, "the cluster did not become ok"
            time.sleep(0.1)

    def stop(self):
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            p.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three masters with a replica each, on free loopback ports, every slot assigned."""
    require("redis-server and redis-cli", bool(shutil.which("redis-server") and shutil.which("redis-cli")))
    bus = {}

    def start(port):
        d = tmp_path_factory.getbasetemp() / f"cluster-node-{port}"
        d.mkdir(exist_ok=True)
        bus.setdefault(port, free_port())
        # the bus port is named: the default, port + 10000, can be past 65535
        return subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-port", str(bus[port]), "--cluster-config-file", str(d / "nodes.conf"),
             "--cluster-node-timeout", "1500", "--save", "", "--appendonly", "no", "--dir", str(d)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c = Cluster([free_port() for _ in range(6)], start)
    try:
        deadline = time.time() + 10
        while not all(redis_up(p) for p in c):
            assert time.time() < deadline, "cluster nodes did not start"
            time.sleep(0.05)
        made = subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in c),
                               "--cluster-replicas", "1", "--cluster-yes"], capture_output=True, text=True)
        assert made.returncode == 0, made.stdout + made.stderr
        c.wait_ok()
        yield c
    finally:
        c.stop()


@pytest.fixture
async def rc(cluster):
    client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", cluster[0])], decode_responses=True)
    await client.initialize()
    yield client
    await client.aclose()


def url(cluster, *which) -> str:
    """A redis+cluster:// URL with some of the nodes as seeds."""
    return "redis+cluster://" + ",".join(f"127.0.0.1:{cluster[i]}" for i in (which or (0,)))


async def _per_node(rc, pattern) -> dict:
    """How many keys matching `pattern` each master holds."""
    out = {}
    for node in rc.get_primaries():
        n = 0
        async for _ in rc.scan_iter(match=pattern, count=500, target_nodes=node):
            n += 1
        out[node.name] = n
    return out


async def test_ingest_events_and_acl_updates_on_a_cluster(cluster, rc, uid):
    # each instance knows a different node only: the others it learns from the cluster
    a = Server("--simulate", "0", "--tick-ms", "20", "--redis", url(cluster, 0), "--reconcile-scan-per-s", "100000")
    b = Server("--simulate", "0", "--tick-ms", "20", "--redis", url(cluster, 2, 1), "--reconcile-scan-per-s", "100000")
    try:
        fleet = [update(f"{uid}{i}", 55.0 + i / 100, 37.0, status="moving") for i in range(60)]
        watched, hidden = fleet[0]["vehicle_id"], fleet[1]["vehicle_id"]
        ca = await Client.connect(a, token(sub=uid + "ua"))
        await ca.recv_type("welcome")
        await ca.subscribe(subscriptions={"vehicles": [watched]})
        user = uid + "ub"
        cb = await Client.connect(b, token(sub=user))
        await cb.recv_type("welcome")
        await cb.subscribe(subscriptions={"vehicles": [watched, hidden]})

        # ingested on A: relayed to B through the cluster's Pub/Sub, and written to every node
        status, body = ingest(a, fleet)
        assert status == 200 and body["accepted"] == 60
        got = await cb.wait_messages(lambda m: m.get("v") == hidden, timeout=8)
        assert [m["p"] for m in got if m.get("v") == hidden][-1] == [55.01, 37.0]
        h = await eventually(lambda: rc.hgetall(f"vehicle:current:{watched}"), timeout=10)
        assert h["status"] == "moving" and float(h["lat"]) == 55.0
        per_node = await eventually(lambda: _all_nodes_hold(rc, f"vehicle:current:{uid}*", 60), timeout=10)
        assert per_node, await _per_node(rc, f"vehicle:current:{uid}*")
        # one writer for the cluster: the lease
        assert await rc.get("realtime:writer") in (a.proc.pid.__format__("x"), b.proc.pid.__format__("x"))

        # an instant event, published on a node neither instance was given:
        # both deliver it, with the same id from the one log
        other = RedisCluster(host="127.0.0.1", port=cluster[1], decode_responses=True)
        try:
            await other.publish(f"vehicle:events:{watched}", json.dumps({"type": "door_open", "door": 2}))
        finally:
            await other.aclose()
        ea = [m for m in await ca.wait_messages(lambda m: m["t"] == "event") if m["t"] == "event"][-1]
        eb = [m for m in await cb.wait_messages(lambda m: m["t"] == "event") if m["t"] == "event"][-1]
        assert ea["eid"] == eb["eid"] and ea["e"] == "door_open" and ea["d"] == {"door": 2}
        entries = await rc.xrange("events:stream", min=ea["eid"], max=ea["eid"])
        assert len(entries) == 1 and entries[0][1]["v"] == watched
        await asyncio.sleep(0.5)
        assert [m for m in await ca.messages(0.3) if m["t"] == "event"] == []   # once, not once per instance

        # an ACL update, published anywhere, applies at once to B's connection
        await rc.hset(f"acl:user:{user}", mapping={"vehicles": json.dumps([watched]),
                                                    "permissions": json.dumps([])})
        await rc.publish("acl:updates", user)
        got = await cb.wait_messages(lambda m: m["t"] == "leave", timeout=5)
        assert [m for m in got if m["t"] == "leave"] == [{"t": "leave", "v": hidden, "r": "permission"}]
        # and to a new connection on A
        c2 = await Client.connect(a, token(sub=user))
        await c2.recv_type("welcome")
        sub, snapshot = await c2.subscribe(subscriptions={"vehicles": [watched, hidden]})
        assert sub["visible"] == 1 and {m["v"] for m in snapshot} == {watched}
        for c in (ca, cb, c2):
            await c.close()
        assert metric_value(a, "redis_pool_timeouts_total") == 0
    finally:
        a.stop()
        b.stop()


async def _all_nodes_hold(rc, pattern, total):
    try:
        n = await _per_node(rc, pattern)
    except RedisError:   # the test's own client, while a node restarts
        return None
    return n if sum(n.values()) == total and all(n.values()) else None


async def test_resume_on_another_instance_on_a_cluster(cluster, rc, uid):
    a = Server("--simulate", "0", "--tick-ms", "20", "--redis", url(cluster, 1))
    b = Server("--simulate", "0", "--tick-ms", "20", "--redis", url(cluster, 2))
    try:
        vid = uid + "v"
        ingest(a, [update(vid, status="moving")])
        assert await eventually(lambda: value(vehicle_status(b, vid) == 200), timeout=20)
        c = await Client.connect(a, token(sub=uid + "u"))
        w = await c.recv_type("welcome")
        await c.subscribe(subscriptions={"vehicles": [vid]})
        await rc.publish(f"vehicle:events:{vid}", json.dumps({"type": "first"}))
        first = [m for m in await c.wait_messages(lambda m: m["t"] == "event") if m["t"] == "event"][-1]
        assert await eventually(lambda: _has(rc, f"session:{w['session']}", vid), timeout=20)
        a.proc.send_signal(signal.SIGKILL)   # the client's instance dies
        a.proc.wait()
        for name in ("missed1", "missed2"):
            await rc.publish(f"vehicle:events:{vid}", json.dumps({"type": name}))

        async def logged():
            return any(f.get("e") == "missed2" for _, f in await rc.xrevrange("events:stream", count=20))
        assert await eventually(logged, timeout=10)
        c2 = await Client.connect(b, token(sub=uid + "u"), f"resume={w['session']}&last_event={first['eid']}")
        w2 = await c2.recv_type("welcome")
        assert w2["resumed"] is True and w2["recovered"] is True
        snap = await c2.recv_type("batch")
        assert [(m["t"], m["v"]) for m in snap["messages"]] == [("full", vid)]
        replay = await c2.recv_type("batch")
        assert [m["e"] for m in replay["messages"]] == ["missed1", "missed2"]
        assert [m for m in await c2.messages(0.6) if m["t"] == "event"] == []
        await c2.close()
        # B took the writer lease over from the dead A
        assert await eventually(lambda: _is(rc, "realtime:writer", f"{b.proc.pid:x}"), timeout=15)
    finally:
        a.stop()
        b.stop()


async def _has(rc, key, needle):
    return needle in (await rc.get(key) or "")


async def _is(rc, key, value):
    return await rc.get(key) == value


async def test_reconcile_on_a_cluster_reads_the_feed_and_scans_every_node(cluster, rc, uid):
    """A hash written by another writer with its feed entry arrives within a
    reconcile; hashes written with no feed entry at all, on every node,
    arrive through the safety scan, which walks every master."""
    s = Server("--simulate", "0", "--tick-ms", "20", "--redis", url(cluster, 0))
    try:
        c = await Client.connect(s, token())
        await c.recv_type("welcome")
        fed = uid + "fed"
        silent = [f"{uid}s{i}" for i in range(30)]
        await c.subscribe(subscriptions={"vehicles": [fed, *silent]})
        # the pass at start must be over: one still running when the hashes
        # are written could find them itself, and nothing would show that the
        # later safety scan does
        assert await eventually(lambda: value(metric_value(s, "reconcile_full_passes_total") >= 1), 20)
        ts = int(time.time() * 1000)
        fields = {"lon": "37.5", "speed": "1", "course": "0", "status": "idle", "vehicle_type": "van",
                  "timestamp": str(ts)}
        await rc.hset(f"vehicle:current:{fed}", mapping={"lat": "55.1", **fields})
        await rc.xadd("vehicles:changes", {"u": msgpack.packb([[fed], [ts]])})
        for i, v in enumerate(silent):
            await rc.hset(f"vehicle:current:{v}", mapping={"lat": str(56 + i / 100), **fields})
        assert all((await _per_node(rc, f"vehicle:current:{uid}s*")).values())   # on every master
        seen = {}
        deadline = time.monotonic() + 15
        while len(seen) < 31 and time.monotonic() < deadline:
            for m in await c.messages(0.5):
                if m.get("v"):
                    seen[m["v"]] = m["p"]
        assert seen.get(fed) == [55.1, 37.5]
        assert set(seen) == {fed, *silent}
        assert seen[silent[29]] == [56.29, 37.5]
        # the pass that found them is counted once it reaches the keyspace's end
        assert await eventually(lambda: value(metric_value(s, "reconcile_full_passes_total") >= 2), 15)
        assert metric_value(s, "reconcile_feed_vehicles_total") >= 1
        await c.close()
    finally:
        s.stop()


async def test_a_burst_of_connects_waits_for_the_bounded_cluster_client(cluster, uid):
    """The cluster client fails at once when a node's connections run out;
    the service bounds its requests instead, so a burst waits (counted)."""
    s = Server("--simulate", "0", "--redis", url(cluster, 0), "--redis-pool-size", "4",
               "--redis-pool-timeout-s", "10", "--max-connections-per-ip", "1000")
    try:
        async def one(i):
            c = await Client.connect(s, token(sub=f"{uid}{i}"))
            m = await c.recv_type("welcome", timeout=30)
            await c.close()
            return m["type"]
        results = await asyncio.gather(*(one(i) for i in range(60)))
        assert results == ["welcome"] * 60
        assert metric_value(s, "redis_pool_waits_total") >= 1
        assert metric_value(s, "redis_pool_timeouts_total") == 0
        assert s.proc.poll() is None
    finally:
        s.stop()


async def test_a_master_restarted_empty_is_written_again(cluster, rc, uid):
    """A master (not the one holding the writer's lease) restarts empty so
    quickly that nothing the writer sends fails: its share of the vehicles
    is gone, and vehicles that stand still are never written again by
    updates. The writer sees the node's new run_id and writes the fleet again."""
    s = Server("--simulate", "0", "--tick-ms", "20", "--redis", url(cluster, 0))
    try:
        fleet = [update(f"{uid}{i}", 50 + i / 100, 30.0) for i in range(60)]
        assert ingest(s, fleet)[0] == 200
        assert await eventually(lambda: _all_nodes_hold(rc, f"vehicle:current:{uid}*", 60), timeout=10)
        lease = rc.get_node_from_key("realtime:writer").port
        victim = next(n.port for n in rc.get_primaries() if n.port != lease)
        await asyncio.to_thread(cluster.restart, victim)
        assert await eventually(lambda: _all_nodes_hold(rc, f"vehicle:current:{uid}*", 60), timeout=30)
        assert "writing every vehicle again" in s.logs()
    finally:
        s.stop()


async def test_a_failover_is_followed(cluster, rc, uid):
    """The master holding the event log (and the writer lease) is killed; its
    replica takes over. Events, ACL updates and writes go on through the new
    master, and while the cluster was down the instance said it was not ready."""
    s = Server("--simulate", "0", "--tick-ms", "20", "--redis",
               "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in cluster))
    try:
        vid, hidden = uid + "v", uid + "h"
        assert ingest(s, [update(vid), update(hidden)])[0] == 200
        user = uid + "u"
        c = await Client.connect(s, token(sub=user))
        await c.recv_type("welcome")
        await c.subscribe(subscriptions={"vehicles": [vid, hidden]})
        await rc.publish(f"vehicle:events:{vid}", json.dumps({"type": "before"}))
        await c.wait_messages(lambda m: m["t"] == "event")
        victim = rc.get_node_from_key("events:stream").port
        await asyncio.to_thread(cluster.kill, victim)
        seen_unready = await eventually(lambda: value(ready_status(s) == 503), timeout=15, every=0.2)
        # the replica is promoted (node timeout 1.5 s); the cluster is whole again
        await asyncio.to_thread(cluster.wait_ok, [p for p in cluster if p != victim])
        assert seen_unready
        assert await eventually(lambda: value(ready_status(s) == 200), timeout=30, every=0.2)
        # events: published until one arrives (a PUBLISH before the instance
        # subscribed again reaches nobody); each arrives once
        events = []
        for n in range(60):
            try:
                await rc.publish(f"vehicle:events:{vid}", json.dumps({"type": f"after{n}"}))
            except RedisError:
                pass   # the test's own client, learning the new layout
            events += [m["e"] for m in await c.messages(0.5) if m["t"] == "event"]
            if events:
                break
        events += [m["e"] for m in await c.messages(1.0) if m["t"] == "event"]
        assert events and len(events) == len(set(events)), events
        # an ACL update is heard
        # (the test's own client may still try the dead node first)
        await _retrying(lambda: rc.hset(f"acl:user:{user}", mapping={
            "vehicles": json.dumps([vid]), "permissions": json.dumps([])}))
        await _retrying(lambda: rc.publish("acl:updates", user))
        got = await c.wait_messages(lambda m: m["t"] == "leave", timeout=10)
        assert [m for m in got if m["t"] == "leave"] == [{"t": "leave", "v": hidden, "r": "permission"}]
        # and new state is written, on whichever node holds it
        assert ingest(s, [update(vid, 51.5, 31.5)])[0] == 200

        async def written():
            try:
                return (await rc.hget(f"vehicle:current:{vid}", "lat")) == "51.5"
            except RedisError:
                return False
        assert await eventually(written, timeout=20)
        await c.close()
    finally:
        s.stop()
        # the old master comes back as a replica of the new one
        await asyncio.to_thread(cluster.start, victim)
        await asyncio.to_thread(cluster.wait_ok)


async def _retrying(fn, timeout=20.0):
    """fn() until it does not raise a RedisError (the test's client learning a new layout)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await fn()
        except RedisError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
