"""``GET /metrics``: the node's counters in the Prometheus text format.

Nothing is counted through prometheus-client on a hot path: the broker,
the connections and their writers keep plain integers and histograms
(``stats.py``), and a collector reads them when ``/metrics`` is scraped.
Each server has its own registry, so several servers in one process (tests,
embedding) do not mix their figures.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ..node.server import Server
from ..stats import Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class NodeCollector(Collector):
    """Reads a server's state into metric families at scrape time."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server = self.server
        stats = server.statistics()
        counters = server.counters
        yield GaugeMetricFamily(
            "tidings_connections", "WebSocket connections open now", value=stats.connections
        )
        yield GaugeMetricFamily(
            "tidings_subscriptions", "Subscriptions held now", value=stats.subscriptions
        )
        yield GaugeMetricFamily("tidings_topics", "Topics the node holds", value=stats.topics)
        yield GaugeMetricFamily(
            "tidings_broker_inbox_depth",
            "Publications waiting for the broker",
            value=stats.inbox_depth,
        )
        yield CounterMetricFamily(
            "tidings_events_published", "Events sequenced by the broker", value=stats.published
        )
        yield CounterMetricFamily(
            "tidings_events_delivered",
            "Events queued for a subscriber (one per subscriber per event)",
            value=stats.delivered,
        )
        dropped = CounterMetricFamily(
            "tidings_events_dropped", "Events not delivered to a subscriber", labels=["reason"]
        )
        dropped.add_metric(["overflow"], stats.dropped)
        backplane = server.backplane
        if backplane is not None:
            # Publications refused because Redis was away longer than backplane_timeout.
            dropped.add_metric(["backplane"], backplane.dropped)
        yield dropped
        if backplane is not None:
            yield GaugeMetricFamily(
                "tidings_backplane_connected",
                "1 while the node is connected to its Redis backplane",
                value=int(backplane.connected),
            )
            yield GaugeMetricFamily(
                "tidings_backplane_stalled",
                "1 while a publication batch has waited over half a second for Redis",
                value=int(backplane.stalled),
            )
            yield CounterMetricFamily(
                "tidings_backplane_dropped",
                "Publications refused (unavailable) while Redis was away or slow",
                value=backplane.dropped,
            )
            yield CounterMetricFamily(
                "tidings_backplane_unconfirmed",
                "Publications Redis did not confirm in time (answered unconfirmed)",
                value=backplane.unconfirmed,
            )
            yield CounterMetricFamily(
                "tidings_backplane_shed",
                "Events skipped while the node's fan-out was more than backplane_max_lag behind",
                value=backplane.shed,
            )
            yield CounterMetricFamily(
                "tidings_backplane_reconnects",
                "Connections made to Redis again after a loss (the first one is not counted)",
                value=backplane.reconnects,
            )
            yield CounterMetricFamily(
                "tidings_backplane_gaps",
                "Holes in a topic's offsets filled from the Redis stream",
                value=backplane.gaps,
            )
            yield CounterMetricFamily(
                "tidings_backplane_lost",
                "Holes the Redis stream no longer covered (subscribers closed with 4010)",
                value=backplane.lost,
            )
            yield CounterMetricFamily(
                "tidings_backplane_epochs",
                "Times a followed topic went on in a new epoch (Redis failed over or restarted)",
                value=backplane.epochs,
            )
            yield GaugeMetricFamily(
                "tidings_backplane_pending",
                "Publications waiting for Redis",
                value=backplane.status()["pending"],
            )
        proxy = server.proxy
        if proxy is not None:
            calls = CounterMetricFamily(
                "tidings_proxy_calls",
                "Calls of the application's hooks by outcome: allowed, refused, disconnected,"
                " unavailable (down, slow or nonsense), cached (answered from the cache)",
                labels=["hook", "outcome"],
            )
            for (hook, outcome), count in sorted(proxy.calls.items()):
                calls.add_metric([hook, outcome], count)
            yield calls
            yield GaugeMetricFamily(
                "tidings_proxy_in_flight", "Hook calls the backend holds now", value=proxy.in_flight
            )
            yield GaugeMetricFamily(
                "tidings_proxy_waiting",
                "Hook calls waiting for one of proxy_max_in_flight slots",
                value=proxy.waiting,
            )
        idempotency = server.broker.idempotency
        keyed = CounterMetricFamily(
            "tidings_idempotent_publications",
            "Publications whose idempotency key was known: replayed (answered with the first"
            " position, nothing published) or conflict (refused: another payload)",
            labels=["outcome"],
        )
        keyed.add_metric(
            ["replayed"], idempotency.replayed + (backplane.replayed if backplane else 0)
        )
        keyed.add_metric(
            ["conflict"], idempotency.conflicts + (backplane.conflicts if backplane else 0)
        )
        yield keyed
        yield CounterMetricFamily(
            "tidings_idempotency_evicted",
            "Idempotency keys a node forgot before their window ended, to stay within"
            " idempotency_max_keys or idempotency_max_bytes (not counted with Redis)",
            value=idempotency.evicted,
        )
        disconnects = CounterMetricFamily(
            "tidings_disconnects", "Connections that ended", labels=["code", "reason"]
        )
        for (code, reason), count in sorted(counters.disconnects.items()):
            disconnects.add_metric([str(code), reason], count)
        yield disconnects
        yield CounterMetricFamily(
            "tidings_rate_limited_messages",
            "Client messages refused by the rate limit",
            value=counters.rate_limited,
        )
        yield CounterMetricFamily(
            "tidings_auth_failures",
            "Upgrades or refreshes refused for a missing, invalid or expired token",
            value=counters.auth_failures,
        )
        yield _histogram(
            "tidings_outbox_depth",
            "Messages queued per connection, sampled when its pinger wakes",
            counters.outbox_depth,
        )
        yield _histogram(
            "tidings_write_delay_seconds",
            "Seconds from a message being queued (an event fanned out) to its write",
            counters.write_delay,
        )


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(
        name, documentation, buckets=histogram.cumulative(), sum_value=histogram.sum
    )


def registry_for(server: Server) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(server))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The scrape body."""
    return generate_latest(registry)
