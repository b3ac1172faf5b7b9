"""The bounded queue between the broker and one consumer.

It is a memory channel cut to this one job:

* the broker must never wait: :meth:`Outbox.offer` is ``send_nowait`` that
  answers False instead of raising, applying the overflow policy in place;
* replies and replays must never be dropped and must stay in order with
  events: :meth:`Outbox.put` queues past the capacity and does not use it up,
  so a resume that replays 900 events still leaves room for 256 live ones
  behind them (the reader waits in :meth:`Outbox.wait_writable` before reading
  the next command, so the excess is bounded by what one command produces:
  at most one topic's history);
* whoever writes wants everything queued in one go, to coalesce it into one
  socket write.

An outbox is drained in one of two ways. An in-process subscriber is a task
that waits in :meth:`receive`. A connection instead gives the outbox a
``sink`` and a :class:`Flusher`: when something is queued, the outbox asks the
flusher to call the sink, and one node-wide task then writes every outbox that
has something queued, with no task switch per connection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import StrEnum
from typing import Final, Generic, TypeVar

import attrs
import trio

from ..stats import Histogram

LOGGER = logging.getLogger("tidings.broker")

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


#: With at least this many connections waiting to be written, the flusher waits
#: up to COALESCE_PASSES scheduler passes (COALESCE_MAX_DELAY at most) for more.
COALESCE_OUTBOXES: Final = 64
COALESCE_PASSES: Final = 16
COALESCE_MAX_DELAY: Final = 0.002


class Flusher:
    """Calls the sink of every outbox that has something to write, in one task.

    Producers (the broker's fan-out, a connection's reader, the heartbeat)
    only queue; the flusher runs after they yield, so everything one broker
    batch queued for a connection goes out in one write, and a thousand
    connections cost one task switch rather than a thousand.
    """

    __slots__ = ("_pending", "_since", "_task", "coalesce", "delays")

    def __init__(self, delays: Histogram | None = None, *, coalesce: bool = False) -> None:
        self._pending: list[Outbox[object]] = []
        self._task: trio.lowlevel.Task | None = None
        self._since = 0.0
        self.delays = delays
        self.coalesce = coalesce
        """Wait briefly for more before writing many connections (see :meth:`_coalesce`).
        Off for the broker's own batches, which need none; on under a backplane."""
        """When set: per pass, seconds from the first thing queued to its write."""

    def schedule(self, outbox: Outbox[object]) -> None:
        if not self._pending and self.delays is not None:
            self._since = trio.current_time()
        self._pending.append(outbox)
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush until cancelled."""
        task_status.started()
        while True:
            if not self._pending:
                self._task = trio.lowlevel.current_task()

                def abort(_: object) -> trio.lowlevel.Abort:
                    self._task = None
                    return trio.lowlevel.Abort.SUCCEEDED

                await trio.lowlevel.wait_task_rescheduled(abort)
            if self.coalesce and len(self._pending) >= COALESCE_OUTBOXES:
                await self._coalesce()
            self.flush_now()
            await trio.lowlevel.checkpoint()

    async def _coalesce(self) -> None:
        """Let events that arrive one task switch apart join this write.

        The broker hands over events in batches, but a backplane delivers them
        one pub/sub message at a time, each after a few task switches: writing
        after every one cost a write(2) per event per connection. A few
        scheduler passes, bounded in time, gather them first.
        """
        deadline = trio.current_time() + COALESCE_MAX_DELAY
        for _ in range(COALESCE_PASSES):
            await trio.lowlevel.checkpoint()
            if not self._pending or trio.current_time() >= deadline:
                return

    def flush_now(self) -> None:
        """Flush every waiting outbox in the caller's task.

        A reader calls this when it is about to wait for input: what its
        commands queued goes out without waiting for the flusher's turn.
        """
        pending, self._pending = self._pending, []
        for outbox in pending:
            try:
                outbox.flush()
            except Exception:
                # A sink's bug must cost its own connection, not the node's writes.
                LOGGER.exception("flushing an outbox failed")
        if pending and self.delays is not None:
            self.delays.observe(trio.current_time() - self._since)


class Outbox(Generic[T]):
    """Bounded queue with a drop-or-disconnect overflow policy."""

    __slots__ = (
        "_consumer",
        "_flusher",
        "_items",
        "_put_queued",
        "_scheduled",
        "_writer_waiting_for_space",
        "capacity",
        "closing",
        "dropped",
        "lossless",
        "peak",
        "policy",
        "sink",
    )

    def __init__(
        self,
        capacity: int,
        policy: OverflowPolicy = OverflowPolicy.DROP,
        *,
        flusher: Flusher | None = None,
        sink: Callable[[], None] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("outbox capacity must be at least 1")
        if (flusher is None) != (sink is None):
            raise ValueError("an outbox needs both a flusher and a sink, or neither")
        self.capacity = capacity
        self.policy = policy
        self.dropped = 0
        """Events refused because the outbox was full."""
        self.lossless = False
        """Whether overflow always closes the outbox (1008), whatever the policy says:
        for consumers that cannot tell that an event was dropped."""
        self.peak = 0
        """The most items ever queued at once (as seen by the consumer)."""
        self.closing: Closing | None = None
        self.sink = sink
        """Writes what is queued (:meth:`take`) without waiting; called by the flusher."""
        self._flusher = flusher
        self._scheduled = False
        # A list, not a deque: take() swaps it whole, and an empty list is a
        # tenth of an empty deque on every idle connection.
        self._items: list[T] = []
        self._put_queued = 0  # items queued by put(), which do not use up the capacity
        self._consumer: trio.lowlevel.Task | None = None
        self._writer_waiting_for_space: trio.lowlevel.Task | None = None

    def __len__(self) -> int:
        return len(self._items)

    # --- producers ----------------------------------------------------------

    def offer(self, item: T, capacity: int = 0, policy: OverflowPolicy | None = None) -> bool:
        """Queue an event if there is room; never blocks. False means not queued.

        ``capacity`` and ``policy``, when given, replace the outbox's own for
        this event (a topic's namespace sets them). A full outbox counts a drop
        and, under the ``disconnect`` policy, closes itself with 1008 so the
        connection ends and the client can resume.
        """
        items = self._items
        if len(items) - self._put_queued >= (capacity or self.capacity) or self.closing is not None:
            if self.closing is None:
                self.dropped += 1
                if self.lossless or (policy or self.policy) is OverflowPolicy.DISCONNECT:
                    self.close(OVERFLOW_CLOSE_CODE, "outbox overflow", flush=False)
            return False
        items.append(item)
        if not self._scheduled:
            self._notify()
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
        self._notify()

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
        self._notify()
        self._wake_producer()

    # --- consumers ----------------------------------------------------------

    def take(self) -> list[T]:
        """Everything queued, now (for a sink)."""
        # The queue only grows between takes, so its length is at a peak now:
        # measured here rather than on every offer, which is the hot path.
        self._note_peak()
        batch, self._items = self._items, []
        self._put_queued = 0
        self._wake_producer()
        return batch

    def flush(self) -> None:
        """Run the sink (the flusher calls this after producers have yielded)."""
        self._scheduled = False
        if self.sink is not None:
            self.sink()

    async def receive_batch(self) -> list[T]:
        """Everything queued, waiting until there is something.

        Returns an empty batch once the outbox is closing and drained.
        """
        while not self._items:
            if self.closing is not None:
                await trio.lowlevel.checkpoint()
                return []
            await self._wait_for_items()
        return self.take()

    async def receive(self) -> T:
        """The next item, waiting until there is one.

        Raises:
            trio.EndOfChannel: the outbox is closing and drained.
        """
        while not self._items:
            if self.closing is not None:
                raise trio.EndOfChannel
            await self._wait_for_items()
        self._note_peak()
        item = self._items.pop(0)  # at most capacity + one replay long
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

    def _note_peak(self) -> None:
        self.peak = max(self.peak, len(self._items))

    def _notify(self) -> None:
        """Something changed for whoever drains this outbox."""
        if self._consumer is not None:
            task = self._consumer
            self._consumer = None
            trio.lowlevel.reschedule(task)
        elif self._flusher is not None and not self._scheduled:
            self._scheduled = True
            self._flusher.schedule(self)  # type: ignore[arg-type]

    async def _wait_for_items(self) -> None:
        if self._consumer is not None:
            raise trio.BusyResourceError("another task is already receiving from this outbox")
        self._consumer = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._consumer = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _wake_producer(self) -> None:
        task = self._writer_waiting_for_space
        if task is not None and (len(self._items) < self.capacity or self.closing is not None):
            self._writer_waiting_for_space = None
            trio.lowlevel.reschedule(task)
