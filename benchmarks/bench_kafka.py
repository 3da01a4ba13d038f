"""Scenario (d), ingest: N Kafka records through Tansu, realtime consuming,
against baseline (3): a bare aiokafka consume loop that decodes nothing.

Both read the same topic from the beginning with every partition assigned.
Realtime's rate is read from its own kafka_records_total metric; the records
are produced before either starts, so both measure pure consumption.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench_e2e import Proc, free_port, log, metrics, realtime, wait_port  # noqa: E402


async def produce(bootstrap, topic, n, vehicles=20000):
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 4, 1)])
    await admin.close()
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20)
    await p.start()
    t0 = int(time.time() * 1000)
    try:
        futs = []
        for i in range(n):
            vid = f"veh_{i % vehicles:06d}"
            v = json.dumps({"vehicle_id": vid, "timestamp": t0 + i // vehicles * 1000,
                            "position": {"lat": 55.5 + (i % 997) * 1e-4, "lon": 37.5 + (i % 991) * 1e-4},
                            "speed": 40.5, "course": 90, "status": "moving", "vehicle_type": "truck",
                            "groups": ["north_fleet"]}).encode()
            futs.append(await p.send(topic, v, key=vid.encode()))
            if len(futs) >= 5000:
                await asyncio.gather(*futs)
                futs.clear()
        await asyncio.gather(*futs)
    finally:
        await p.stop()


async def bare_loop(bootstrap, topic, n):
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                         auto_offset_reset="earliest", max_partition_fetch_bytes=4 << 20)
    await c.start()
    try:
        parts = c.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in parts]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        got = 0
        t0 = None
        while got < n:
            batches = await c.getmany(timeout_ms=200, max_records=10000)
            if batches and t0 is None:
                t0 = time.monotonic()   # from the first record, as for realtime
            for records in batches.values():
                got += len(records)
        return got / (time.monotonic() - t0)
    finally:
        await c.stop()


def realtime_rate(bootstrap, topic, n):
    """From the first record read to the last one applied, as the server saw it."""
    port = free_port()
    s = realtime(port, 0, ["--kafka", bootstrap, "--topic", topic, "--kafka-from", "earliest"])
    try:
        wait_port(port)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            m = metrics(port)
            if m.get("kafka_records_total", 0) >= n:
                time.sleep(0.3)  # the last batch is applied after it is counted
                m = metrics(port)
                return n / (m["kafka_last_record_time_seconds"] - m["kafka_first_record_time_seconds"])
            time.sleep(0.05)
        raise RuntimeError("realtime did not read the topic in time")
    finally:
        s.stop()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int, default=200000)
    p.add_argument("--bootstrap", default=None)
    p.add_argument("--vehicles", type=int, default=20000, help="distinct vehicle ids (the fleet the core holds)")
    a = p.parse_args()
    broker = None
    bootstrap = a.bootstrap
    if bootstrap is None:
        from conftest import Tansu
        broker = Tansu()
        bootstrap = broker.bootstrap
    topic = "bench." + uuid.uuid4().hex[:8]
    try:
        log(f"(d) producing {a.records} records to {topic}")
        t = time.monotonic()
        asyncio.run(produce(bootstrap, topic, a.records, a.vehicles))
        log(f"produced in {time.monotonic() - t:.1f} s; (3) bare aiokafka loop")
        bare = asyncio.run(bare_loop(bootstrap, topic, a.records))
        log(f"bare: {bare:.0f} records/s; realtime consuming")
        rt = realtime_rate(bootstrap, topic, a.records)
        out = {"benchmark": "kafka_ingest", "records": a.records, "bare_aiokafka_records_per_s": round(bare),
               "realtime_records_per_s": round(rt), "kafka_ratio": round(rt / bare, 3)}
        log(json.dumps(out))
        print(json.dumps(out))
    finally:
        if broker:
            broker.stop()


if __name__ == "__main__":
    main()
