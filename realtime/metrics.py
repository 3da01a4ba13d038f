"""GET /metrics (PROTOCOL §5), in the Prometheus text format.

Values are read from the hub, the stores and the Kafka consumer when scraped,
so the delivery path pays nothing for them. prometheus-client does the format.
"""
from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class HubCollector:
    def __init__(self, app):
        self.app = app

    def collect(self):
        app = self.app
        hub = app["hub"]
        st = hub.stats
        g = GaugeMetricFamily("websocket_connections_active", "Open WebSocket connections",
                              labels=["transport"])
        by_kind: dict[str, int] = {}
        for s in hub.sessions.values():
            by_kind[s.kind] = by_kind.get(s.kind, 0) + 1
        for kind in ("websocket",):
            g.add_metric([kind], by_kind.get(kind, 0))
        yield g
        yield CounterMetricFamily("messages_sent", "Frames written to clients", value=st.frames_sent)
        users = {s.claims.sub for s in hub.sessions.values()}
        subs = sum(1 for s in hub.sessions.values() if s.subscription is not None)
        yield GaugeMetricFamily("subscriptions_per_user_avg", "Active subscriptions per connected user",
                                value=subs / len(users) if users else 0.0)
        yield CounterMetricFamily("ingest_updates", "Vehicle updates applied or ignored as older",
                                  value=st.ingest_updates)
        rej = CounterMetricFamily("ingest_rejected", "Inputs rejected, by reason", labels=["reason"])
        for reason, n in sorted(st.ingest_rejected.items()):
            rej.add_metric([reason], n)
        yield rej
        yield CounterMetricFamily("ingest_stale_ignored", "Updates older than the stored state",
                                  value=hub.core.ignored_stale)
        yield CounterMetricFamily("events_delivered", "Events handed to the core", value=st.events)
        yield CounterMetricFamily("redis_operations", "Redis commands sent",
                                  value=getattr(hub.stores, "ops", 0))
        yield CounterMetricFamily("hub_ticks", "Ticks run", value=st.ticks)
        yield CounterMetricFamily("hub_tick_seconds", "Time in ticks (route, encode, write)",
                                  value=st.tick_seconds)
        yield GaugeMetricFamily("vehicles_tracked", "Vehicles in memory", value=hub.core.n)
        kafka = app.get("kafka")
        if kafka is not None:
            yield GaugeMetricFamily("kafka_consumer_lag", "Records behind the end of the topic",
                                    value=kafka.lag)
            yield CounterMetricFamily("kafka_records", "Kafka records read", value=kafka.records)
            yield GaugeMetricFamily("kafka_first_record_time_seconds", "When the first record was read",
                                    value=kafka.first_record_at)
            yield GaugeMetricFamily("kafka_last_record_time_seconds", "When the latest records were applied",
                                    value=kafka.last_record_at)


def setup(app: web.Application) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(app))

    async def metrics(request):
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    app.router.add_get("/metrics", metrics)
