"""A topic's recent events, bounded by count and by age."""

from __future__ import annotations

from collections import deque
from itertools import islice

from ..protocol.messages import Event


class History:
    """The last ``max_size`` events of one topic that are younger than ``ttl`` seconds.

    Events are appended in ``seq`` order with no holes, so the event after
    offset ``n`` sits at index ``n - first_seq + 1``: replay is a slice, not a
    search.
    """

    __slots__ = ("_events", "_times", "max_size", "ttl")

    def __init__(self, max_size: int, ttl: float) -> None:
        self.max_size = max_size
        self.ttl = ttl
        self._events: deque[Event] = deque(maxlen=max_size or None)
        self._times: deque[float] = deque(maxlen=max_size or None)

    def __len__(self) -> int:
        return len(self._events)

    def append(self, event: Event, now: float) -> None:
        if self.max_size == 0:
            return
        self._events.append(event)
        self._times.append(now)

    def expire(self, now: float) -> None:
        """Forget events older than ``ttl``."""
        cutoff = now - self.ttl
        times = self._times
        while times and times[0] < cutoff:
            times.popleft()
            self._events.popleft()

    def after(self, seq: int, now: float, limit: int | None = None) -> tuple[list[Event], bool]:
        """Events with an offset greater than ``seq``, oldest first, at most ``limit``.

        The flag says whether history reached back far enough: False means
        events between ``seq`` and the first one returned are gone.
        """
        self.expire(now)
        events = self._events
        if not events:
            return [], True
        start = seq + 1 - events[0].seq
        complete = start >= 0
        start = max(start, 0)
        stop = None if limit is None else start + limit
        return list(islice(events, start, stop)), complete

    @property
    def first_seq(self) -> int | None:
        return self._events[0].seq if self._events else None
