"""The node's rates over the last minutes, for the API's ``series`` method.

A counter says how many events were delivered since the start; a person
looking at a node wants to know how many per second, and how that changed.
:class:`Series` samples the counters every ``interval`` seconds (on multiples
of it in wall-clock time, so that the samples of several nodes line up and can
be summed) and keeps the last ``size`` samples: six minutes by default, a few
kilobytes, one read of the counters every two seconds.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import trio

from ..node.server import ServerStats

INTERVAL: Final = 2.0
SIZE: Final = 180


class Series:
    """Rates of one node's counters, sampled every ``interval`` seconds."""

    def __init__(
        self,
        statistics: Callable[[], ServerStats],
        *,
        interval: float = INTERVAL,
        size: int = SIZE,
    ) -> None:
        self.statistics = statistics
        self.interval = interval
        self._samples: deque[dict[str, Any]] = deque(maxlen=size)
        self._last: tuple[float, ServerStats] | None = None

    def sample(self, now: float) -> None:
        """Record the rates since the previous call (the first call only sets the baseline)."""
        stats = self.statistics()
        last, self._last = self._last, (now, stats)
        if last is None or now <= last[0]:
            return
        then, before = last
        elapsed = now - then
        self._samples.append(
            {
                "t": round(now, 3),
                "published": _rate(stats.published - before.published, elapsed),
                "delivered": _rate(stats.delivered - before.delivered, elapsed),
                "dropped": _rate(stats.dropped - before.dropped, elapsed),
                "connections": stats.connections,
                "subscriptions": stats.subscriptions,
            }
        )

    def since(self, t: float) -> list[dict[str, Any]]:
        """The samples taken after wall-clock time ``t``, oldest first."""
        return [sample for sample in self._samples if sample["t"] > t]

    async def run(self) -> None:
        """Sample on every multiple of ``interval`` until cancelled."""
        while True:
            due = (math.floor(time.time() / self.interval) + 1) * self.interval
            await trio.sleep(max(due - time.time(), 0.0))
            self.sample(due)


def _rate(count: int, elapsed: float) -> float:
    # A counter never goes down; if one did (a backplane reset), say 0, not a negative rate.
    return round(max(count, 0) / elapsed, 2)
