"""Kafka consumer for `vehicle.updates.enriched` (PROTOCOL §1.1).

Every instance needs every vehicle, so each one assigns itself all partitions
of the topic (no consumer group, no committed offsets): adding an instance
adds a reader, not a rebalance, and a slow instance delays nobody else.
Where to start, unless --kafka-from says: with --redis, where the instance
writing the Redis snapshot had applied the topic up to when it last wrote
(`kafka:positions:{topic}`, saved by stores/redis.py after the rows it
covers), so that records produced while every instance was down are read;
`latest` when no position was ever saved. Without Redis, `time` (the offsets
of now - --stale-after-s). Never from before now - --stale-after-s: older
updates would only bring back vehicles that are stale anyway.

Records are decoded and validated in batches: one `getmany` poll goes
through one compiled call (_core/_ingest.pyx) into the core's columns, then
one core apply for every valid record in it. A bad record is counted by reason,
logged (rate-limited), copied to --dead-letter-topic when set, and skipped.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from .._core._ingest import RecordDecoder
from ..tasks import cancel_and_wait
from .decode import RICH_DECODERS, Rejected, decode_record, finish_object

log = logging.getLogger("realtime.kafka")
SNAPSHOT_WAIT_S = 30.0   # the longest the first records wait for the Redis snapshot


class RateLimitedLog:
    """At most one line per `interval` seconds; says how many were dropped."""

    def __init__(self, logger, interval: float = 1.0):
        self.logger = logger
        self.interval = interval
        self.last = 0.0
        self.dropped = 0

    def warning(self, msg: str, **fields) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            self.dropped += 1
            return
        self.logger.warning(msg, extra={"fields": {**fields, "suppressed": self.dropped}})
        self.last = now
        self.dropped = 0


def is_msgpack(headers) -> bool:
    """A `content-type` header of application/msgpack (or x-msgpack), in any
    case and with any parameters (`; charset=...`), as HTTP media types go."""
    for k, v in headers or ():
        if k.lower() == "content-type" and isinstance(v, (bytes, bytearray)) and \
                bytes(v).split(b";", 1)[0].strip().lower() in (b"application/msgpack", b"application/x-msgpack"):
            return True
    return False


def record_decoder(core) -> RecordDecoder:
    """A poll's records -> (the core's UpdateBatch, [(record, Rejected)]),
    in one compiled call; decode_record reads what it does not take on."""
    return RecordDecoder(core, decode_record, Rejected, is_msgpack, RICH_DECODERS, finish_object)


async def produce_updates(producer, topic: str, updates: list[dict]) -> None:
    """Validated updates back onto the topic (HTTP ingest with Kafka configured)."""
    import json
    from .decode import iso_ms
    futs = []
    for u in updates:
        rec = {"vehicle_id": u["vehicle_id"], "timestamp": iso_ms(u["ts"]),
               "position": {"lat": u["lat"], "lon": u["lon"]}}
        for k in ("speed", "course", "status", "vehicle_type", "groups", "driver", "assignment", "alerts"):
            if u.get(k) is not None:
                rec[k] = u[k]
        futs.append(await producer.send(topic, json.dumps(rec, ensure_ascii=False).encode(),
                                        key=u["vehicle_id"].encode()))
    for f in futs:
        await f


class KafkaIngest:
    def __init__(self, settings, sink, stats, core):
        self.settings = settings
        self.sink = sink            # callable(UpdateBatch, aged_up_to) -> None: applies it (hub.apply)
        self.decoder = record_decoder(core)
        self.stats = stats
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.partitions: list[TopicPartition] = []
        self.connected = False
        self.lag = 0
        self.records = 0
        self.first_record_at = 0.0   # wall clock of the first and the latest record read,
        self.last_record_at = 0.0    # for the ingest benchmark
        self.newest_record_ms = 0    # the newest record's Kafka timestamp read
        self._task: asyncio.Task | None = None
        self._bad_log = RateLimitedLog(log)
        self.positions: dict[TopicPartition, int] = {}   # where to go on after a reconnect
        # partition -> its end when the consumer took its place (after a
        # start or an outage): what is below it is read again (_history)
        self._history_end: dict[int, int] = {}
        # partition -> the offset after the last record applied to the core
        # (decoded, applied or rejected): what the Redis writer saves once
        # the rows they changed are written (stores/redis.py)
        self.applied: dict[int, int] = {}
        # async () -> {partition: offset} | None: the positions saved in Redis
        # (set by app.py with --redis)
        self.stored_positions = None
        # async () -> bool (app.py, with --redis): True once the Redis
        # snapshot is loaded, False as soon as Redis is known down. The first
        # records wait for it, so that what they replay lands on the state it
        # follows (an alert still active is not new to an empty core), but
        # not for an outage
        self.snapshot_loaded = None
        self._reconnect = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kafka-ingest")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        await self._close()

    async def _close(self) -> None:
        for c in (self.consumer, self.producer):
            if c is not None:
                try:
                    await c.stop()
                except Exception:
                    pass
        self.consumer = self.producer = None
        self.connected = False

    async def _run(self) -> None:
        """Connect, consume; on any failure reconnect with jittered backoff."""
        backoff = 0.5
        while True:
            try:
                await self._connect()
                backoff = 0.5
                if self.snapshot_loaded is not None:
                    try:
                        loaded = await asyncio.wait_for(self.snapshot_loaded(), SNAPSHOT_WAIT_S)
                    except asyncio.TimeoutError:
                        loaded = False
                    if not loaded:   # Redis away: the records cannot wait for it
                        log.warning("redis snapshot not loaded; consuming without it")
                    self.snapshot_loaded = None
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("kafka unavailable, retrying", extra={"fields": {"error": repr(e)[:300]}})
            await self._close()
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 30.0)

    async def _connect(self) -> None:
        s = self.settings
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka, enable_auto_commit=False, group_id=None,
            auto_offset_reset="earliest", fetch_max_wait_ms=50, max_partition_fetch_bytes=4 << 20,
        )
        await self.consumer.start()
        parts = None
        for _ in range(50):
            parts = self.consumer.partitions_for_topic(s.topic)
            if parts:
                break
            await self.consumer.topics()  # refresh metadata; the topic may not exist yet
            await asyncio.sleep(0.2)
        if not parts:
            raise RuntimeError(f"topic {s.topic!r} has no partitions")
        self.partitions = [TopicPartition(s.topic, p) for p in sorted(parts)]
        self.consumer.assign(self.partitions)
        await self._seek_start()
        try:
            ends = await self.consumer.end_offsets(self.partitions)
            self._history_end = {tp.partition: o for tp, o in ends.items()}
        except Exception:   # then every record counts as live, heard on arrival
            self._history_end = {}
        if s.dead_letter_topic:
            self.producer = AIOKafkaProducer(bootstrap_servers=s.kafka)
            await self.producer.start()
        self.connected = True
        log.info("kafka consuming", extra={"fields": {"topic": s.topic, "partitions": len(parts)}})

    async def _seek_start(self) -> None:
        c = self.consumer
        if self.positions:
            # after an outage: go on where we were, unless the partition is now
            # shorter than that (the broker lost its log): then from its start
            ends = await c.end_offsets(self.partitions)
            for tp in self.partitions:
                pos = self.positions.get(tp)
                if pos is not None and pos <= ends.get(tp, 0):
                    c.seek(tp, pos)
                else:   # all of a new partition is new
                    log.warning("partition new or restarted; reading it from the beginning",
                                extra={"fields": {"partition": tp.partition, "new": pos is None}})
                    await c.seek_to_beginning(tp)
            return
        start = self.settings.kafka_from or ("latest" if self.settings.redis else "time")
        resume = self.settings.kafka_since_ms   # a restarted owner worker: where its predecessor stopped
        if resume is not None:
            start = "time"
        elif not self.settings.kafka_from and self.stored_positions is not None:
            stored = await self.stored_positions()
            if stored:
                await self._seek_stored(stored)
                return
        if start == "earliest":
            await c.seek_to_beginning(*self.partitions)
        elif start == "latest":
            await c.seek_to_end(*self.partitions)
        else:
            since = resume if resume is not None else int((time.time() - self.settings.stale_after_s) * 1000)
            try:
                offsets = await c.offsets_for_times({tp: since for tp in self.partitions})
            except Exception as e:
                # a broker without timestamp lookups: replay everything instead;
                # updates older than what is stored are ignored, so this is safe
                log.warning("offsets_for_times failed; reading from the beginning",
                            extra={"fields": {"error": repr(e)[:200]}})
                await c.seek_to_beginning(*self.partitions)
                return
            for tp in self.partitions:
                o = offsets.get(tp)
                if o is None:
                    await c.seek_to_end(tp)
                else:
                    c.seek(tp, o.offset)

    async def _seek_stored(self, stored: dict[int, int]) -> None:
        """Each partition from where the Redis snapshot's writer had applied
        it, but not from before now - --stale-after-s, nor past the
        partition's end; a partition it never read (new, or never written to)
        from that bound."""
        c = self.consumer
        since = int((time.time() - self.settings.stale_after_s) * 1000)
        try:
            bound = await c.offsets_for_times({tp: since for tp in self.partitions})
        except Exception as e:   # no timestamp lookups: the stored offsets alone
            log.warning("offsets_for_times failed; reading from the stored positions",
                        extra={"fields": {"error": repr(e)[:200]}})
            bound = None
        try:
            # a stored offset past a partition's end (the topic made again, or
            # written by hand) would send the consumer to the partition's start
            ends = await c.end_offsets(self.partitions)
        except Exception:
            ends = {}
        for tp in self.partitions:
            pos = stored.get(tp.partition)
            if pos is not None and tp in ends:
                pos = min(pos, ends[tp])
            if bound is None:
                lowest = 0
            elif bound.get(tp) is None:   # nothing newer than the bound in it
                lowest = None
            else:
                lowest = bound[tp].offset
            if lowest is None:
                await c.seek_to_end(tp)
            else:
                c.seek(tp, max(pos if pos is not None else lowest, lowest))
        log.info("kafka reading from the positions saved in redis",
                 extra={"fields": {"partitions": {tp.partition: stored.get(tp.partition) for tp in self.partitions}}})

    async def _probe(self) -> None:
        """aiokafka retries a lost broker quietly; ask for metadata every 2 s
        so that /health/ready can say Kafka is gone."""
        while True:
            await asyncio.sleep(2.0)
            try:
                # a metadata request (what consumer.topics() sends), kept whole:
                # the consumer's own cluster view of an assigned topic does not
                # learn of partitions added to it
                cluster = await asyncio.wait_for(self.consumer._client.fetch_all_metadata(), 3.0)
                if not self.connected:
                    log.info("kafka reachable again")
                    self._reconnect.set()  # reconnect whole: metadata and offsets may have moved
                self.connected = True
                parts = cluster.partitions_for_topic(self.settings.topic) or set()
                added = parts - {tp.partition for tp in self.partitions}
                if added:
                    # assign() follows no topic: partitions added to it would
                    # never be read (their vehicles' updates lost) until a
                    # restart. Reconnecting reads them from their start.
                    log.warning("kafka topic has new partitions; reading them",
                                extra={"fields": {"topic": self.settings.topic, "added": sorted(added)}})
                    self._reconnect.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                if self.connected:
                    log.warning("kafka unreachable")
                self.connected = False

    async def _consume(self) -> None:
        c = self.consumer
        self._reconnect.clear()
        loop = asyncio.get_running_loop()
        probe = loop.create_task(self._probe())
        consume = loop.create_task(self._consume_loop(c))
        wait_reconnect = loop.create_task(self._reconnect.wait())
        try:
            done, _ = await asyncio.wait({consume, wait_reconnect}, return_when=asyncio.FIRST_COMPLETED)
            if consume in done:
                consume.result()  # raises what stopped it
        finally:
            for t in (probe, consume, wait_reconnect):
                t.cancel()
            for tp in self.partitions:
                try:
                    self.positions[tp] = await asyncio.wait_for(c.position(tp), 1.0)
                except Exception:
                    pass
        raise ConnectionError("kafka came back: reconnecting")

    async def _consume_loop(self, c) -> None:
        while True:
            batches = await c.getmany(timeout_ms=100, max_records=10000)
            if batches and not self.first_record_at:
                self.first_record_at = time.time()
            polled = []
            reached = {}
            newest = 0
            history = False
            for tp, records in batches.items():
                self.records += len(records)
                newest = max(newest, records[-1].timestamp)
                history = history or records[0].offset < self._history_end.get(tp.partition, 0)
                reached[tp.partition] = records[-1].offset + 1
                polled += records
            self.newest_record_ms = max(self.newest_record_ms, newest)
            if polled:
                # decoded and applied with no await between: the rows the
                # decoder looked up cannot be given to another vehicle meanwhile
                decoded, rejected = self._decode(polled)
                for batch, recs in decoded:
                    self.sink(batch, self._history(recs) if history else 0.0)
                for r, e in rejected:
                    await self._reject(r, e)
                # after the rejects' dead-letter copies too: a restart from a
                # saved position sends them again rather than not at all
                self.applied.update(reached)
                self.last_record_at = time.time()
            await self._update_lag()

    def _history(self, recs: list):
        """For the records read again after a restart (below the end each
        partition had when this consumer took its place, `_history_end`),
        their age by the record's timestamp: core.apply counts their vehicle
        as heard when its update's timestamp says, but never before that
        (a device clock behind, in the update, is capped by it). Every later
        record is live, heard now whatever the clocks say: a record's
        timestamp is the producer's (CreateTime), which a pipeline may set to
        the event's time, so timestamps alone cannot tell history from a
        device or pipeline running behind."""
        ends = self._history_end
        wall = time.time()
        ages = np.fromiter((wall - r.timestamp / 1000.0 if r.offset < ends.get(r.partition, 0) else 0.0
                            for r in recs), np.float64, len(recs))
        return np.maximum(ages, 0.0)

    def _decode(self, polled: list) -> tuple[list, list]:
        """A poll -> ([(UpdateBatch, its records)], [(record, Rejected)]).
        Should the decoder fail on the poll (a defect, not bad input: that is
        rejected), the records go one at a time, so that one record cannot cost
        the poll's others: what still fails is rejected and dead-lettered as
        unreadable."""
        try:
            batch, rejected = self.decoder.decode(polled)
            if batch is None:
                return [], rejected
            if rejected:
                bad = {id(r) for r, _ in rejected}
                return [(batch, [r for r in polled if id(r) not in bad])], rejected
            return [(batch, polled)], rejected
        except Exception as e:
            log.error("kafka poll not decodable at once; one record at a time",
                      extra={"fields": {"error": repr(e)[:200], "records": len(polled)}})
        batches, rejected = [], []
        for r in polled:
            try:
                batch, bad = self.decoder.decode([r])
            except Exception as e:
                mp = bool(r.headers) and is_msgpack(r.headers)
                batch, bad = None, [(r, Rejected("invalid_msgpack" if mp else "invalid_json",
                                                 f"unreadable: {e!r}"[:200]))]
            if batch is not None:
                batches.append((batch, [r]))
            rejected += bad
        return batches, rejected

    async def _reject(self, record, e: Rejected) -> None:
        self.stats.reject(e.reason)
        self._bad_log.warning("rejected kafka record", reason=e.reason, detail=e.detail[:200],
                              partition=record.partition, offset=record.offset)
        if self.producer is not None:
            headers = list(record.headers or ()) + [("x-reject-reason", e.reason.encode()),
                                                    ("x-source-offset", str(record.offset).encode())]
            try:
                await self.producer.send(self.settings.dead_letter_topic, record.value, key=record.key,
                                         headers=headers)
            except Exception as err:  # the dead-letter copy must never stop consumption
                self._bad_log.warning("dead-letter send failed", error=repr(err)[:200])

    def ingest_lag_s(self) -> float:
        """How far behind the topic's newest record this consumer is, in time:
        0 when caught up, else now minus the newest record read."""
        if self.lag == 0 or not self.newest_record_ms:
            return 0.0
        return max(0.0, time.time() - self.newest_record_ms / 1000.0)

    async def _update_lag(self) -> None:
        """Records behind the end of every partition (the consumer-lag metric)."""
        lag = 0
        for tp in self.partitions:
            hw = self.consumer.highwater(tp)  # Tansu: highwater(), not end_offsets()
            if hw is None:
                continue
            pos = await self.consumer.position(tp)
            lag += max(0, hw - pos)
        self.lag = lag
