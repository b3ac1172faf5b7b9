"""A topic's recent events, bounded by count, by age and by bytes."""

from __future__ import annotations

from collections import deque
from itertools import islice
from typing import Final, Protocol

from ..protocol.messages import Event

#: What one retained event costs besides its payload: the Event object, its
#: timestamp and epoch strings, the deque slots (measured with tracemalloc:
#: ~330 bytes for an event with a short topic).
EVENT_OVERHEAD: Final = 384


class Charged(Protocol):
    """Anyone who pays for history bytes besides the topic (a tenant, the node)."""

    history_bytes: int


def event_size(event: Event) -> int:
    """The bytes an event is charged in history: its payload twice (the JSON, and
    the encoded frame that fan-out and replays share), plus the object itself."""
    return 2 * len(event.payload_json) + EVENT_OVERHEAD


class History:
    """The last ``max_size`` events of one topic, younger than ``ttl`` seconds and
    of at most ``max_bytes`` in all (0: no byte bound).

    Events are appended in ``seq`` order with no holes, so the event after
    offset ``n`` sits at index ``n - first_seq + 1``: replay is a slice, not a
    search.
    """

    __slots__ = ("_events", "_times", "bytes", "ledgers", "max_bytes", "max_size", "ttl")

    def __init__(
        self, max_size: int, ttl: float, max_bytes: int = 0, ledgers: tuple[Charged, ...] = ()
    ) -> None:
        self.max_size = max_size
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.bytes = 0
        """What the retained events are charged (:func:`event_size`)."""
        self.ledgers = ledgers
        """Whoever else pays for these bytes (the tenant, the node), kept in step."""
        self._events: deque[Event] = deque()
        self._times: deque[float] = deque()

    def __len__(self) -> int:
        return len(self._events)

    def append(self, event: Event, now: float) -> int:
        """Retain ``event``; returns the bytes this changed the history by
        (positive: it grew; older events may have left to make room)."""
        if self.max_size == 0:
            return 0
        before = self.bytes
        size = event_size(event)
        if self.max_bytes and size > self.max_bytes:
            # Larger than the whole history may be: keep nothing rather than it.
            self.clear()
            return self.bytes - before
        self._events.append(event)
        self._times.append(now)
        self._charge(size)
        while len(self._events) > self.max_size or (self.max_bytes and self.bytes > self.max_bytes):
            self.pop_oldest()
        return self.bytes - before

    def pop_oldest(self) -> int:
        """Forget the oldest event; returns the bytes freed (0 if there was none)."""
        if not self._events:
            return 0
        self._times.popleft()
        size = event_size(self._events.popleft())
        self._charge(-size)
        return size

    def clear(self) -> int:
        """Forget everything; returns the bytes freed."""
        freed = self.bytes
        self._events.clear()
        self._times.clear()
        self._charge(-freed)
        return freed

    def _charge(self, delta: int) -> None:
        self.bytes += delta
        for ledger in self.ledgers:
            ledger.history_bytes += delta

    def expire(self, now: float) -> int:
        """Forget events older than ``ttl``; returns the bytes freed."""
        cutoff = now - self.ttl
        times = self._times
        freed = 0
        while times and times[0] < cutoff:
            freed += self.pop_oldest()
        return freed

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

    @property
    def oldest_time(self) -> float | None:
        """When the oldest retained event was appended (``trio.current_time()``)."""
        return self._times[0] if self._times else None
