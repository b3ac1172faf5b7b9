"""Counters and a cheap histogram for the node's metrics.

No dependencies: the broker and the connections record into these on hot
paths, and ``metrics.py`` turns them into Prometheus families only when
``/metrics`` is scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence


class Histogram:
    """Counts of observations per bucket (upper bounds), plus their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs as Prometheus wants them, ``+Inf`` last."""
        total = 0
        pairs = []
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            total += count
            pairs.append((bound, total))
        return pairs


class NodeCounters:
    """What connections and the server count, read by the metrics collector."""

    __slots__ = ("auth_failures", "disconnects", "outbox_depth", "rate_limited", "write_delay")

    def __init__(self) -> None:
        self.rate_limited = 0
        """Client messages refused for the rate limit."""
        self.auth_failures = 0
        """Upgrades (and refreshes) refused for a missing, invalid or expired token."""
        self.disconnects: dict[tuple[int, str], int] = {}
        """Connections that ended, by (close code, reason)."""
        self.outbox_depth = Histogram((0, 1, 4, 16, 64, 128, 256, 512, 1024))
        """Messages queued per connection, sampled when its pinger wakes."""
        self.write_delay = Histogram((0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5))
        """Per write of a client's writer: seconds from the oldest message it
        carries being queued to the end of the write."""
