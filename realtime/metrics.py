"""GET /metrics (PROTOCOL §5), in the Prometheus text format.

Values are read from the hub, the stores and the Kafka consumer when scraped,
so the delivery path pays nothing for them. prometheus-client does the format.
"""
from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .session import Session

TRANSPORTS = ("websocket", "sse", "long_poll", "grpc")


class HubCollector:
    def __init__(self, app):
        self.app = app

    def collect(self):
        app = self.app
        hub = app["hub"]
        st = hub.stats
        g = GaugeMetricFamily("websocket_connections_active", "Open client connections, by transport "
                              "(long_poll: sessions held here that no SSE stream reads)", labels=["transport"])
        by_kind: dict[str, int] = {}
        sent = dict(st.closed_messages)
        nbytes = dict(st.closed_bytes)
        for s in hub.sessions.values():
            by_kind[s.kind] = by_kind.get(s.kind, 0) + 1
            sent[s.kind] = sent.get(s.kind, 0) + s.messages_sent
            nbytes[s.kind] = nbytes.get(s.kind, 0) + s.bytes_sent
        opened = CounterMetricFamily("transport_connections_opened", "Connections (and sessions) opened, "
                                     "by transport", labels=["transport"])
        msgs = CounterMetricFamily("transport_messages_sent", "Server messages written to clients, by transport",
                                   labels=["transport"])
        size = CounterMetricFamily("transport_bytes_sent", "Bytes written to clients, by transport",
                                   labels=["transport"])
        for kind in TRANSPORTS:
            g.add_metric([kind], by_kind.get(kind, 0))
            opened.add_metric([kind], st.opened.get(kind, 0))
            msgs.add_metric([kind], sent.get(kind, 0))
            size.add_metric([kind], nbytes.get(kind, 0))
        yield g
        yield opened
        yield msgs
        yield size
        h = hub.latency
        yield HistogramMetricFamily(
            "message_delivery_latency_ms", "Ingest (arrival in this process) to socket write, per update",
            buckets=h.buckets(), sum_value=h.sum)
        rej = CounterMetricFamily("ingest_rejected", "Inputs rejected, by reason", labels=["reason"])
        for reason, n in sorted(st.ingest_rejected.items()):
            rej.add_metric([reason], n)
        yield rej
        cmd = CounterMetricFamily("client_messages", "Client messages handled, by type", labels=["type"])
        for kind, n in sorted(st.commands.items()):
            cmd.add_metric([kind], n)
        yield cmd
        bg = CounterMetricFamily("background_errors", "Background work (store writes) that failed, by kind",
                                 labels=["kind"])
        for kind, n in sorted(st.background_errors.items()):
            bg.add_metric([kind], n)
        yield bg
        sec = CounterMetricFamily("security_events", "Security events (docs/security.md), by kind and "
                                  "transport; every one, also those the log's rate limit held back",
                                  labels=["kind", "transport"])
        for (kind, transport), n in sorted(hub.security.counts.items()):
            sec.add_metric([kind, transport], n)
        yield sec
        reloads = CounterMetricFamily("key_reloads", "Reloads of key material (SIGHUP, a JWT key file "
                                      "that changed), by what (tls, jwt) and result (ok, unchanged, failed)",
                                      labels=["what", "result"])
        for (what, result), n in sorted(app["keys"].counts.items()):
            reloads.add_metric([what, result], n)
        yield reloads
        users = {s.claims.sub for s in hub.sessions.values()}
        subs = sum(1 for s in hub.sessions.values() if s.subscription is not None)
        load = hub.load
        core = hub.core
        C, G = CounterMetricFamily, GaugeMetricFamily
        table = [
            (C, "messages_sent", "Frames written to clients", st.frames_sent),
            (G, "subscriptions_per_user_avg", "Active subscriptions per connected user",
             subs / len(users) if users else 0.0),
            (C, "ingest_updates", "Vehicle updates applied or ignored as older", st.ingest_updates),
            (C, "ingest_stale_ignored", "Updates older than the stored state", core.ignored_stale),
            (C, "events_delivered", "Events handed to the core", st.events),
            (C, "redis_operations", "Redis commands sent", getattr(hub.stores, "ops", 0)),
            (C, "hub_ticks", "Ticks run", st.ticks),
            (C, "hub_tick_seconds", "Time in ticks (route, encode, write)", st.tick_seconds),
            (G, "vehicles_tracked", "Vehicles in memory", core.n - len(core.row_free)),
            (C, "vehicle_types_overflowed", "Lookups of a vehicle_type name past the 63 this worker "
             "tells apart (sent and stored as unknown)", core.types_overflowed),
            (C, "vehicles_went_offline", "Vehicles turned offline by silence", st.went_offline),
            (C, "vehicles_forgotten", "Vehicles dropped as stale", st.forgotten),
            (C, "events_unknown_vehicle", "Events for a vehicle this worker does not hold (no client "
             "here can see it; kept in the log for replays)", st.events_unknown_vehicle),
            (C, "slow_client_conflations", "Times a slow connection stopped getting position "
             "batches (it gets the latest state once it drains)", st.conflations),
            (C, "slow_client_frames_conflated", "Batches not written to conflating connections",
             st.frames_conflated),
            (C, "slow_client_closed", "Connections closed 1013: their events could not be kept",
             st.slow_closed),
            (G, "slow_clients_conflating", "Connections conflating now", len(hub.conflating)),
            (C, "write_errors", "Connections closed 1011 because a write to them raised",
             Session.write_errors),
            (C, "heartbeat_timeouts", "Connections closed for no pong", st.pong_timeouts),
            (G, "grpc_calls_lingering", "gRPC calls closed with a message the client never took: "
             "grpc keeps each (and that message) until the client reads or goes; they count "
             "against --max-connections-per-ip", st.grpc_lingering),
            (C, "cluster_refreshes", "Once-a-second refreshes of clustered clients' cells", st.cluster_refreshes),
            (C, "cluster_views", "Distinct views (and formats) computed and encoded by those refreshes; "
             "each is sent to every client that has it", st.cluster_views),
            (C, "cluster_refresh_seconds", "Time in those refreshes", st.cluster_seconds),
            (G, "event_loop_lag_ms", "How late the event loop woke a 100 ms timer, latest", load.lag_ms),
            (G, "event_loop_lag_max_ms", "The worst event-loop lag since the last scrape",
             load.take_max_lag()),
            (G, "event_loop_lag_cpu_max_ms", "The same, counting only the event loop's own CPU time: "
             "a lag while the machine ran other processes does not count", load.take_max_cpu_lag()),
            (C, "slow_operations", "Event-loop blocks over 100 ms", load.slow_ops),
            (G, "process_cpu_share", "CPU used, as a share of one core, over 10 s", load.cpu),
            (G, "postgres_records_pending", "Records queued for PostgreSQL", hub.records.pending),
            (C, "postgres_records_written", "Records written to PostgreSQL", hub.records.written),
            (C, "postgres_records_dropped", "Records dropped: the queue was full during an outage",
             hub.records.dropped),
            (C, "postgres_records_refused", "Records the database refused (such as a NUL in a name); "
             "dropped, the others written", hub.records.refused),
        ]
        if app.get("tls") is not None:
            table.append((G, "tls_certificate_expiry_timestamp_seconds",
                          "When the certificate in use expires (Unix time): alert well before it",
                          app["tls"].not_after))
        stores = hub.stores
        if hasattr(stores, "full_passes"):   # Redis: the reconcile (stores/redis.py)
            table += [
                (C, "reconcile_applied", "Vehicles a reconcile found newer in Redis and applied",
                 stores.reconciled),
                (C, "reconcile_feed_vehicles", "Vehicles read from the change feed", stores.feed_vehicles),
                (C, "reconcile_feed_gaps", "Times the change feed no longer held this instance's place "
                 "(a whole pass followed)", stores.feed_gaps),
                (C, "reconcile_scanned_keys", "Keys the safety scan compared", stores.scanned),
                (C, "reconcile_full_passes", "Safety-scan passes over the whole keyspace", stores.full_passes),
            ]
        pool = getattr(hub.stores, "pool", None)   # stores/redis_conn.py
        if pool is not None:
            table += [
                (C, "redis_pool_waits", "Redis requests that waited for a free pooled connection",
                 getattr(pool, "waits", 0)),
                (C, "redis_pool_timeouts", "Redis requests that found no free connection in time",
                 getattr(pool, "timeouts", 0)),
            ]
        owner, follower = hub.owner, hub.follower   # --workers N (mirror.py)
        if owner is not None:
            table += [
                (G, "mirror_links", "Workers that take this owner worker's frames now", owner.connected),
                (C, "mirror_frames", "Frames sent to the other workers (one per tick with changes)", owner.frames),
                (C, "mirror_dropped", "Workers cut off for falling too far behind (they start again "
                 "from the whole fleet)", owner.dropped),
                (C, "mirror_failed", "Frames that could not be made (every worker started again from "
                 "the whole fleet)", owner.failed),
            ]
        if follower is not None:
            table += [
                (G, "mirror_links", "1 while this worker has the owner worker's fleet and frames",
                 int(follower.connected)),
                (C, "mirror_frames", "Frames taken from the owner worker", follower.frames),
                (C, "mirror_rows", "Vehicle rows taken from the owner worker", st.mirrored_rows),
                (C, "mirror_unknown_rows", "Rows in the owner's frames not named here yet (skipped; during a whole-fleet copy, expected)",
                 follower.unknown_rows),
            ]
        kafka = app.get("kafka")
        if kafka is not None:
            table += [
                (G, "kafka_consumer_lag", "Records behind the end of the topic", kafka.lag),
                (G, "ingest_lag_seconds", "Now minus the newest Kafka record's time; 0 when caught up",
                 kafka.ingest_lag_s()),
                (C, "kafka_records", "Kafka records read", kafka.records),
                (G, "kafka_first_record_time_seconds", "When the first record was read",
                 kafka.first_record_at),
                (G, "kafka_last_record_time_seconds", "When the latest records were applied",
                 kafka.last_record_at),
            ]
        for family, name, help_text, value in table:
            yield family(name, help_text, value=value)


def setup(app: web.Application) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(app))

    async def metrics(request):
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    app.router.add_get("/metrics", metrics)
