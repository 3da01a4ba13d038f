"""Integration: Kafka records through a real broker (Tansu) to real WebSocket clients."""
import asyncio
import json
import time
import uuid

import msgpack
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from conftest import Client, Server, create_topic, token, update, statuses_once_old_is_offline

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def kafka_server(kafka_bootstrap):
    topic = "vehicle.updates.enriched." + uuid.uuid4().hex[:6]
    dlq = topic + ".dlq"

    async def setup():
        await create_topic(kafka_bootstrap, topic, 3)
        await create_topic(kafka_bootstrap, dlq, 1)
    asyncio.run(setup())
    s = Server("--simulate", "0", "--tick-ms", "20", "--kafka", kafka_bootstrap, "--topic", topic,
               "--dead-letter-topic", dlq, "--kafka-from", "earliest")
    s.topic, s.dlq, s.bootstrap = topic, dlq, kafka_bootstrap
    yield s
    s.stop()


async def produce(server, records):
    """records: (key, value bytes, headers) triples."""
    p = AIOKafkaProducer(bootstrap_servers=server.bootstrap)
    await p.start()
    try:
        for key, value, headers in records:
            await p.send_and_wait(server.topic, value, key=key.encode(), headers=headers or None)
    finally:
        await p.stop()


async def read_topic(bootstrap, topic, partitions, until, timeout=10.0):
    """Records of a topic from the beginning, until `until(records)` holds or time runs out."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    got = []
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.time() + timeout
        while time.time() < deadline and not until(got):
            for records in (await consumer.getmany(timeout_ms=300)).values():
                got.extend(records)
    finally:
        await consumer.stop()
    return got


async def watching(server, *vids):
    """A WebSocket client subscribed to these vehicles."""
    c = await Client.connect(server, token())
    await c.recv_type("welcome")
    await c.subscribe(subscriptions={"vehicles": list(vids)})
    return c


def js(u):
    return json.dumps(u, ensure_ascii=False).encode()


async def test_record_reaches_a_subscribed_client(kafka_server, uid):
    vid = uid + "k"
    c = await watching(kafka_server, vid)
    t0 = int(time.time() * 1000)
    await produce(kafka_server, [(vid, js(update(vid, 55.1, 37.2, t0, speed=40, status="moving",
                                                  vehicle_type="truck")), None)])
    got = await c.wait_messages(lambda m: m.get("v") == vid, timeout=10)
    assert got[-1]["t"] == "full" and got[-1]["p"] == [55.1, 37.2] and got[-1]["vt"] == "truck"
    await produce(kafka_server, [(vid, js(update(vid, 55.2, 37.2, t0 + 1000)), None)])
    got = await c.wait_messages(lambda m: m.get("v") == vid, timeout=10)
    assert got[-1] == {"t": "pos", "v": vid, "p": [55.2, 37.2], "s": 40, "c": 0, "ts": t0 + 1000}
    await c.close()


async def test_poison_records_do_not_block_and_go_to_the_dead_letter_topic(kafka_server, uid):
    vid = uid + "after"
    c = await watching(kafka_server, vid)
    poison = [(uid + "p1", b"{not json", None),
              (uid + "p2", js({"vehicle_id": uid + "p2", "timestamp": 1}), None),        # no position
              (uid + "p3", b"\xc1\xc1", [("content-type", b"application/msgpack")])]
    await produce(kafka_server, poison + [(vid, js(update(vid)), None)])
    got = await c.wait_messages(lambda m: m.get("v") == vid, timeout=10)
    assert got[-1]["t"] == "full"
    # the dead-letter topic holds copies of the three, with the reason
    want = {uid + "p1", uid + "p2", uid + "p3"}
    records = await read_topic(kafka_server.bootstrap, kafka_server.dlq, 1,
                               lambda got: want <= {r.key.decode() for r in got})
    seen = {r.key.decode(): dict(r.headers)["x-reject-reason"].decode() for r in records}
    assert seen[uid + "p1"] == "invalid_json"
    assert seen[uid + "p2"] == "missing_field"
    assert seen[uid + "p3"] == "invalid_msgpack"
    await c.close()


async def test_msgpack_records(kafka_server, uid):
    vid = uid + "mp"
    c = await watching(kafka_server, vid)
    u = update(vid, 56.0, 38.0, status="idle", driver={"name": "Петров", "phone": "+7"})
    await produce(kafka_server, [(vid, msgpack.packb(u), [("content-type", b"application/msgpack")])])
    got = await c.wait_messages(lambda m: m.get("v") == vid, timeout=10)
    assert got[-1]["st"] == "idle" and got[-1]["dr"] == {"name": "Петров"}
    await c.close()


async def test_consumer_lag_is_a_metric(kafka_server):
    import urllib.request
    text = urllib.request.urlopen(kafka_server.url + "/metrics", timeout=5).read().decode()
    assert "kafka_consumer_lag " in text and "kafka_records_total" in text


async def test_http_ingest_goes_through_kafka_when_configured(kafka_server, uid):
    from conftest import ingest
    vid = uid + "viakafka"
    c = await watching(kafka_server, vid)
    status, body = ingest(kafka_server, [update(vid, 50.5, 30.5)])
    assert status == 200 and body["accepted"] == 1
    got = await c.wait_messages(lambda m: m.get("v") == vid, timeout=10)
    assert got[-1]["p"] == [50.5, 30.5]
    # it is on the topic, for every instance
    records = await read_topic(kafka_server.bootstrap, kafka_server.topic, 3,
                               lambda got: any(r.key == vid.encode() for r in got))
    assert any(r.key == vid.encode() for r in records)
    await c.close()


async def test_kafka_outage_is_survived(uid):
    """Own broker: it goes away (and comes back empty, as in-memory Tansu does)."""
    import urllib.error
    import urllib.request

    from conftest import Tansu, ingest

    def ready():
        try:
            return urllib.request.urlopen(s.url + "/health/ready", timeout=3).status
        except urllib.error.HTTPError as e:
            return e.code

    def consuming():   # the consumer's starts, each logged once its offsets are set
        return s.logs(None).count("kafka consuming")

    async def until(pred, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if pred():
                return True
            await asyncio.sleep(0.2)
        return False

    broker = Tansu()
    topic = "updates." + uid
    await create_topic(broker.bootstrap, topic, 1)
    s = Server("--simulate", "0", "--tick-ms", "20", "--kafka", broker.bootstrap, "--topic", topic,
               "--kafka-from", "earliest")
    s.bootstrap, s.topic = broker.bootstrap, topic
    try:
        vid = uid + "o"
        c = await Client.connect(s, token())
        await c.recv_type("welcome")
        await c.subscribe(subscriptions={"vehicles": [vid]})
        await produce(s, [(vid, js(update(vid, 10.0, 10.0)), None)])
        assert (await c.wait_messages(lambda m: m.get("v") == vid, timeout=10))[-1]["t"] == "full"
        assert await until(lambda: ready() == 200, 10)
        broker.stop()
        assert await until(lambda: ready() == 503, 15), s.logs()
        # delivery goes on: HTTP ingest falls back to the local path
        status, _ = ingest(s, [update(vid, 11.0, 10.0)])
        assert status == 200
        got = await c.wait_messages(lambda m: m.get("v") == vid, timeout=10)
        assert got[-1]["p"] == [11.0, 10.0]
        # the broker returns (empty): the consumer reconnects and reads again.
        # Produce once it has: ready (the broker answers) comes before the
        # consumer's new start, and a record already in the empty log then
        # leaves it at an offset it had read before, so the outage's position
        # is kept and that record is skipped (a broker that lost its log looks
        # like one that did not; real Kafka keeps its log)
        started = consuming()
        broker.start()
        await create_topic(broker.bootstrap, topic, 1)
        assert await until(lambda: ready() == 200 and consuming() > started, 30), s.logs()
        await produce(s, [(vid, js(update(vid, 12.0, 10.0)), None)])
        got = await c.wait_messages(lambda m: m.get("v") == vid and m.get("p") == [12.0, 10.0], timeout=30)
        assert got[-1]["p"] == [12.0, 10.0]
        assert s.proc.poll() is None
        await c.close()
    finally:
        s.stop()
        broker.stop()


async def test_default_start_replays_recent_records_without_redis(kafka_bootstrap, uid):
    """No --redis, no --kafka-from: a new instance reads the last --stale-after-s of the topic."""
    topic = "recent." + uid
    await create_topic(kafka_bootstrap, topic, 2)
    srv = type("S", (), {"bootstrap": kafka_bootstrap, "topic": topic})
    vid = uid + "old"
    await produce(srv, [(vid, js(update(vid, 1.0, 2.0)), None)])
    t0 = time.monotonic()
    s = Server("--simulate", "0", "--kafka", kafka_bootstrap, "--topic", topic)
    try:
        c = await Client.connect(s, token())
        await c.recv_type("welcome")
        visible = 0
        while visible == 0 and time.monotonic() - t0 < 20:
            sub, _ = await c.subscribe(subscriptions={"vehicles": [vid]})
            visible = sub["visible"]
            await asyncio.sleep(0.1)
        assert visible == 1
        await c.close()
    finally:
        s.stop()


async def test_two_workers_consume_once_and_serve_the_clients_of_both(kafka_bootstrap, redis_url, uid):
    """--workers 2 with Kafka: the owner worker alone consumes the topic, and
    the follower's clients get its records through the owner's frames
    (mirror.py). HTTP ingest on either worker goes through the topic. Every
    client, on either worker, gets each position once and in order."""
    from conftest import both_ready, both_workers, ingest, vehicle_status
    topic = "workers." + uid
    await create_topic(kafka_bootstrap, topic, 3)
    s = Server("--workers", "2", "--simulate", "0", "--tick-ms", "20", "--redis", redis_url,
               "--kafka", kafka_bootstrap, "--topic", topic, "--kafka-from", "earliest")
    s.bootstrap, s.topic = kafka_bootstrap, topic
    clients, instances = [], set()
    try:
        both_workers(s)
        both_ready(s)
        vid = uid + "k"
        t0 = int(time.time() * 1000)
        await produce(s, [(vid, js(update(vid, 55.0, 37.0, t0)), None)])
        # requests land on either worker: until many in a row know the vehicle
        deadline, known = time.time() + 30, 0
        while known < 10 and time.time() < deadline:
            known = known + 1 if vehicle_status(s, vid) == 200 else 0
            await asyncio.sleep(0.02)
        assert known == 10, s.logs()
        # batch ids name the worker: connect until both serve clients
        while len(clients) < 40 and (len(instances) < 2 or len(clients) < 4):
            c = await Client.connect(s, token())
            await c.recv_type("welcome")
            clients.append(c)
            await c.send({"type": "subscribe", "subscriptions": {"vehicles": [vid]}})
            await c.recv_type("subscribed")
            b = await c.recv_type("batch")
            assert [m["p"] for m in b["messages"]] == [[55.0, 37.0]]
            instances.add(b["batch_id"].rsplit("-", 1)[0])
        assert len(instances) == 2

        async def everyone_gets(lat):
            for c in clients:
                got = await c.wait_messages(lambda m: m.get("p", [None])[0] == lat, timeout=15)
                lats = [m["p"][0] for m in got if "p" in m]
                assert lats == [lat], lats   # once, and nothing in between
        await produce(s, [(vid, js(update(vid, 55.1, 37.0, t0 + 1000)), None)])
        await everyone_gets(55.1)
        for i, lat in enumerate((55.2, 55.3, 55.4)):
            status, body = ingest(s, [update(vid, lat, 37.0, t0 + 2000 + i * 1000)])
            assert status == 200 and body["accepted"] == 1
            await everyone_gets(lat)
        late = await asyncio.gather(*(c.messages(0.5) for c in clients))   # no copy after the last
        assert not [m for got in late for m in got if "p" in m]
        # the HTTP updates went through the topic, once each, whichever worker took them
        records = await read_topic(kafka_bootstrap, topic, 3, lambda got: False, timeout=3.0)
        assert sum(r.key == vid.encode() for r in records) == 5
    finally:
        for c in clients:
            await c.close()
        s.stop()


async def test_records_produced_while_every_instance_was_down_are_read(kafka_bootstrap, throwaway_redis, uid):
    """With --redis and no --kafka-from, a new instance reads the topic on
    from where the Redis snapshot's writer had applied it (kafka:positions:*),
    not from its end: a vehicle's last update sent while the fleet's one
    instance restarted is on the map after it, and what the snapshot already
    holds is not read again."""
    import redis.asyncio as aioredis
    from conftest import metric_value
    port, _, _ = throwaway_redis
    topic = "positions." + uid
    await create_topic(kafka_bootstrap, topic, 2)
    srv = type("S", (), {"bootstrap": kafka_bootstrap, "topic": topic})
    args = ("--simulate", "0", "--tick-ms", "20", "--redis", f"redis://127.0.0.1:{port}/0",
            "--kafka", kafka_bootstrap, "--topic", topic)
    t0 = int(time.time() * 1000)
    parked, moving = uid + "parked", uid + "moving"
    r = aioredis.Redis(port=port)

    async def eventually(pred, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if await pred():
                return True
            await asyncio.sleep(0.1)
        return False

    s = Server(*args)
    try:
        async def consuming():
            return "kafka consuming" in s.logs(None)
        assert await eventually(consuming), s.logs()
        await produce(srv, [(moving, js(update(moving, 1.0, 1.0, t0 + i)), None) for i in range(5)])
        # the writer has the vehicle in Redis, and how far it read beside it
        assert await eventually(lambda: r.exists(f"vehicle:current:{moving}")), s.logs()
        assert await eventually(lambda: r.hgetall(f"kafka:positions:{topic}")), s.logs()
    finally:
        s.stop()
    saved = {int(k): int(v) for k, v in (await r.hgetall(f"kafka:positions:{topic}")).items()}
    assert sum(saved.values()) == 5, saved
    # produced while nothing runs
    await produce(srv, [(parked, js(update(parked, 2.0, 2.0, t0 + 10)), None),
                        (moving, js(update(moving, 1.5, 1.5, t0 + 10)), None)])
    s = Server(*args)
    try:
        c = await Client.connect(s, token())
        await c.recv_type("welcome")
        _, first = await c.subscribe(subscriptions={"vehicles": [parked, moving]})
        want, where = {parked: [2.0, 2.0], moving: [1.5, 1.5]}, {}
        deadline = time.time() + 20
        while where != want and time.time() < deadline:
            for m in first + await c.messages(0.5):
                if "p" in m:
                    where[m["v"]] = m["p"]
            first = []
        assert where == want, s.logs()
        assert metric_value(s, "kafka_records_total") == 2   # the two, not the five again
        await c.close()
    finally:
        s.stop()
        await r.aclose()


async def test_a_record_read_again_after_a_restart_counts_as_heard_when_the_broker_took_it(kafka_bootstrap, uid):
    """Without Redis a new instance reads the last --stale-after-s of the
    topic: a vehicle whose last record the broker took an hour ago turns
    offline at the first check (§3.3), not --offline-after-s later as if it
    had just reported; one that reported now stays as it is."""
    topic = "history." + uid
    await create_topic(kafka_bootstrap, topic, 1)
    now = int(time.time() * 1000)
    old, fresh = uid + "old", uid + "fresh"
    p = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await p.start()
    try:
        await p.send_and_wait(topic, js(update(old, 1.0, 2.0, now - 3_600_000, status="moving")),
                              key=old.encode(), timestamp_ms=now - 3_600_000)
        await p.send_and_wait(topic, js(update(fresh, 1.0, 2.0, now, status="moving")), key=fresh.encode())
    finally:
        await p.stop()
    s = Server("--simulate", "0", "--tick-ms", "20", "--kafka", kafka_bootstrap, "--topic", topic)
    try:
        assert await statuses_once_old_is_offline(s, old, fresh) == {old: "offline", fresh: "moving"}, s.logs()
        # read live, a record is heard on arrival whatever its clocks say (a
        # pipeline may stamp it with the device's time, an hour behind here)
        skewed = uid + "skewed"
        p = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await p.start()
        try:
            await p.send_and_wait(topic, js(update(skewed, 1.0, 2.0, now - 3_600_000, status="moving")),
                                  key=skewed.encode(), timestamp_ms=now - 3_600_000)
        finally:
            await p.stop()
        assert await statuses_once_old_is_offline(s, skewed, fresh, timeout=3.0) == \
            {skewed: "moving", fresh: "moving"}, s.logs()
    finally:
        s.stop()


async def test_partitions_added_to_the_topic_while_running_are_read(kafka_bootstrap, uid):
    """assign() follows no topic: partitions added to it must be noticed and
    read from their start, or the updates of the vehicles they carry are lost
    until a restart. Tansu cannot add partitions (no CreatePartitions), so the
    topic is made again with three: its metadata then shows two new ones, as
    after kafka-topics --alter."""
    from aiokafka.admin import AIOKafkaAdminClient
    topic = "grown." + uid
    await create_topic(kafka_bootstrap, topic, 1)
    s = Server("--simulate", "0", "--tick-ms", "20", "--kafka", kafka_bootstrap, "--topic", topic,
               "--kafka-from", "earliest")
    try:
        vids = [uid + str(p) for p in range(3)]
        c = await Client.connect(s, token())
        await c.recv_type("welcome")
        await c.subscribe(subscriptions={"vehicles": vids})
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.delete_topics([topic])
        finally:
            await admin.close()
        await create_topic(kafka_bootstrap, topic, 3)
        p = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await p.start()
        try:
            for part, vid in enumerate(vids):
                await p.send_and_wait(topic, js(update(vid, 1.0 + part, 2.0)), key=vid.encode(), partition=part)
        finally:
            await p.stop()
        seen = set()
        deadline = time.monotonic() + 20
        while seen != set(vids) and time.monotonic() < deadline:
            seen |= {m["v"] for m in await c.messages(0.5) if m.get("t") == "full"}
        assert seen == set(vids), s.logs()
        await c.close()
    finally:
        s.stop()
