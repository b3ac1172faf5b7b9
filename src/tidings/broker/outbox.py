"""The bounded queue between the broker and one consumer.

It is a memory channel cut to this one job, for three reasons measured or
required elsewhere:

* the broker must never wait: :meth:`Outbox.offer` is ``send_nowait`` that
  answers False instead of raising, applying the overflow policy in place;
* replies and replays must never be dropped and must stay in order with
  events: :meth:`Outbox.put` queues past the capacity and does not use it up,
  so a resume that replays 900 events still leaves room for 256 live ones
  behind them (the reader waits in :meth:`Outbox.wait_writable` before reading
  the next command, so the excess is bounded by what one command produces:
  at most one topic's history);
* the writer wants everything that is queued in one go, to coalesce it into
  one socket write: :meth:`Outbox.receive_batch`.

There is exactly one consumer task per outbox, so waking it is a single
reschedule, not a parking lot.
"""

from __future__ import annotations

from collections import deque
from enum import StrEnum
from typing import Generic, TypeVar

import attrs
import trio

T = TypeVar("T")


class OverflowPolicy(StrEnum):
    """What the broker does when a subscriber's outbox is full."""

    DROP = "drop"
    """Drop the event for that subscriber only, and count it."""
    DISCONNECT = "disconnect"
    """Close that subscriber (WebSocket close 1008) so it reconnects and resumes."""


@attrs.frozen(slots=True)
class Closing:
    """Why an outbox was closed, and whether what is queued still goes out."""

    code: int
    reason: str
    flush: bool


OVERFLOW_CLOSE_CODE = 1008


class Outbox(Generic[T]):
    """Bounded, single-consumer queue with a drop-or-disconnect overflow policy."""

    __slots__ = (
        "_consumer",
        "_items",
        "_put_queued",
        "_writer_waiting_for_space",
        "capacity",
        "closing",
        "dropped",
        "peak",
        "policy",
    )

    def __init__(self, capacity: int, policy: OverflowPolicy = OverflowPolicy.DROP) -> None:
        if capacity < 1:
            raise ValueError("outbox capacity must be at least 1")
        self.capacity = capacity
        self.policy = policy
        self.dropped = 0
        """Events refused because the outbox was full."""
        self.peak = 0
        """The most items ever queued at once."""
        self.closing: Closing | None = None
        self._items: deque[T] = deque()
        self._put_queued = 0  # items queued by put(), which do not use up the capacity
        self._consumer: trio.lowlevel.Task | None = None
        self._writer_waiting_for_space: trio.lowlevel.Task | None = None

    def __len__(self) -> int:
        return len(self._items)

    # --- producers ----------------------------------------------------------

    def offer(self, item: T) -> bool:
        """Queue an event if there is room; never blocks. False means not queued.

        A full outbox counts a drop and, under the ``disconnect`` policy, closes
        itself with 1008 so the connection ends and the client can resume.
        """
        items = self._items
        if len(items) - self._put_queued >= self.capacity or self.closing is not None:
            if self.closing is None:
                self.dropped += 1
                if self.policy is OverflowPolicy.DISCONNECT:
                    self.close(OVERFLOW_CLOSE_CODE, "outbox overflow", flush=False)
            return False
        items.append(item)
        self.peak = max(self.peak, len(items))
        if self._consumer is not None:
            self._wake_consumer()
        return True

    def put(self, item: T) -> None:
        """Queue a reply past the capacity: replies are never dropped.

        The caller bounds the excess by awaiting :meth:`wait_writable` before it
        takes on more work. Ignored once the outbox is closing.
        """
        if self.closing is not None:
            return
        self._items.append(item)
        self._put_queued += 1
        self.peak = max(self.peak, len(self._items))
        if self._consumer is not None:
            self._wake_consumer()

    def close(self, code: int, reason: str, *, flush: bool = True) -> None:
        """Stop accepting items; the first close wins.

        With ``flush`` the consumer still receives what is queued (a graceful
        shutdown drains); without it the queue is discarded (an overflowing
        client gets its close frame now, not after 256 stale events).
        """
        if self.closing is not None:
            return
        self.closing = Closing(code, reason, flush)
        if not flush:
            self._items.clear()
            self._put_queued = 0
        if self._consumer is not None:
            self._wake_consumer()
        self._wake_producer()

    # --- the consumer -------------------------------------------------------

    async def receive_batch(self) -> deque[T]:
        """Everything queued, waiting until there is something.

        Returns an empty batch once the outbox is closing and drained.
        """
        while not self._items:
            if self.closing is not None:
                await trio.lowlevel.checkpoint()
                return deque()
            await self._wait_for_items()
        batch, self._items = self._items, deque()
        self._put_queued = 0
        self._wake_producer()
        return batch

    async def receive(self) -> T:
        """The next item, waiting until there is one.

        Raises:
            trio.EndOfChannel: the outbox is closing and drained.
        """
        while not self._items:
            if self.closing is not None:
                raise trio.EndOfChannel
            await self._wait_for_items()
        item = self._items.popleft()
        # Which kind of item left is not recorded; assuming a put() one errs
        # towards dropping sooner, never towards growing past the bound.
        self._put_queued = max(0, self._put_queued - 1)
        self._wake_producer()
        await trio.lowlevel.checkpoint()
        return item

    async def wait_writable(self) -> None:
        """Wait until fewer than ``capacity`` items are queued (or the outbox closes)."""
        while len(self._items) >= self.capacity and self.closing is None:
            self._writer_waiting_for_space = trio.lowlevel.current_task()

            def abort(_: object) -> trio.lowlevel.Abort:
                self._writer_waiting_for_space = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)

    # --- internals ----------------------------------------------------------

    async def _wait_for_items(self) -> None:
        if self._consumer is not None:
            raise trio.BusyResourceError("another task is already receiving from this outbox")
        self._consumer = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._consumer = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _wake_consumer(self) -> None:
        task = self._consumer
        assert task is not None
        self._consumer = None
        trio.lowlevel.reschedule(task)

    def _wake_producer(self) -> None:
        task = self._writer_waiting_for_space
        if task is not None and (len(self._items) < self.capacity or self.closing is not None):
            self._writer_waiting_for_space = None
            trio.lowlevel.reschedule(task)
