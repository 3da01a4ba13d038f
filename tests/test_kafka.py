"""Integration: Kafka records through a real broker (Tansu) to real WebSocket clients."""
import asyncio
import json
import time
import uuid

import msgpack
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from conftest import Client, Server, create_topic, token, update

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


def js(u):
    return json.dumps(u, ensure_ascii=False).encode()


async def test_record_reaches_a_subscribed_client(kafka_server, uid):
    vid = uid + "k"
    c = await Client.connect(kafka_server, token())
    await c.recv_type("welcome")
    await c.subscribe(subscriptions={"vehicles": [vid]})
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
    c = await Client.connect(kafka_server, token())
    await c.recv_type("welcome")
    await c.subscribe(subscriptions={"vehicles": [vid]})
    poison = [(uid + "p1", b"{not json", None),
              (uid + "p2", js({"vehicle_id": uid + "p2", "timestamp": 1}), None),        # no position
              (uid + "p3", b"\xc1\xc1", [("content-type", b"application/msgpack")])]
    await produce(kafka_server, poison + [(vid, js(update(vid)), None)])
    got = await c.wait_messages(lambda m: m.get("v") == vid, timeout=10)
    assert got[-1]["t"] == "full"
    # the dead-letter topic holds copies of the three, with the reason
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_server.bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(kafka_server.dlq, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        seen = {}
        deadline = time.time() + 10
        while time.time() < deadline and not {uid + "p1", uid + "p2", uid + "p3"} <= set(seen):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    seen[r.key.decode()] = dict(r.headers)["x-reject-reason"].decode()
    finally:
        await consumer.stop()
    assert seen[uid + "p1"] == "invalid_json"
    assert seen[uid + "p2"] == "missing_field"
    assert seen[uid + "p3"] == "invalid_msgpack"
    await c.close()


async def test_msgpack_records(kafka_server, uid):
    vid = uid + "mp"
    c = await Client.connect(kafka_server, token())
    await c.recv_type("welcome")
    await c.subscribe(subscriptions={"vehicles": [vid]})
    u = update(vid, 56.0, 38.0, status="idle", driver={"name": "Петров", "phone": "+7"})
    await produce(kafka_server, [(vid, msgpack.packb(u), [("content-type", b"application/msgpack")])])
    got = await c.wait_messages(lambda m: m.get("v") == vid, timeout=10)
    assert got[-1]["st"] == "idle" and got[-1]["dr"] == {"name": "Петров"}
    await c.close()
