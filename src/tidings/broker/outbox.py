"""The bounded channel between the broker and one consumer (a client's writer).

:func:`open_outbox` returns its two ends, as ``trio.open_memory_channel``
does: the broker and the connection's reader hold the send side
(:class:`Outbox`), the connection's writer the receive side
(:class:`OutboxReceiver`). It is a memory channel cut to this job:

* **the broker never waits**: :meth:`Outbox.offer` is ``send_nowait`` with
  drop-on-full semantics: a full outbox refuses the event, counts the drop,
  and under the ``disconnect`` policy closes itself with 1008, all in place;
  :meth:`Outbox.send_nowait` is the same with Trio's signalling
  (``trio.WouldBlock``);
* **bounded in count and in bytes**: live events meet the count limit
  (``capacity``, per topic if its namespace says so) and the byte budget
  (``max_bytes``); everything queued toward the client is charged to that
  budget, including what the writer has taken and not yet written;
* **replies are never dropped** (:meth:`Outbox.put`), so a command always gets
  its answer; they are charged to the budget all the same, and whoever reads
  commands waits in :meth:`Outbox.wait_within_budget` before taking the next
  one: a client that sends but never reads stops being read;
* **pongs coalesce** (:meth:`Outbox.put_pong`): one pending pong at most, as
  RFC 6455 allows, so a ping flood costs nothing to queue;
* **replays are paced** (:meth:`Outbox.put_replay`): a resume queues a cursor
  over the topic's history, not the events; the writer pulls from it while
  less than half the budget is used (the other half is for the live events
  queued behind it), so a replay is never held whole per client;
* **the writer takes everything queued at once**
  (:meth:`OutboxReceiver.receive_batch`), to write it in as few writes as
  possible.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import StrEnum
from typing import Any, Final, Generic, TypeVar

import attrs
import trio

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


OVERFLOW_CLOSE_CODE: Final = 1008
#: What a control frame (ping, pong, close) is charged, whatever its form.
CONTROL_FRAME_BYTES: Final = 128


class Replay(Generic[T]):
    """A cursor over retained events, drained by the writer as the budget allows.

    The broker makes them (over a topic's history); the outbox only pulls.
    """

    __slots__ = ()

    def pull(self, max_bytes: int) -> tuple[list[T], int, int]:
        """The next items, about ``max_bytes`` of them (at least one if any
        remain), their size, and how many events that should have come first
        are gone from history."""
        raise NotImplementedError

    @property
    def done(self) -> bool:
        """Whether the whole replay was pulled."""
        raise NotImplementedError


def open_outbox(
    capacity: int,
    policy: OverflowPolicy = OverflowPolicy.DROP,
    *,
    max_bytes: int = 0,
    size: Callable[[T], int] = len,  # type: ignore[assignment]
) -> tuple[Outbox[T], OutboxReceiver[T]]:
    """A new outbox: its send side (broker, reader) and its receive side (writer).

    ``capacity`` bounds the live events queued (replies and replays do not use
    it up); ``max_bytes`` (0: unbounded) bounds the bytes of everything queued
    toward the consumer, measured with ``size``.
    """
    outbox: Outbox[T] = Outbox(capacity, policy, max_bytes=max_bytes, size=size)
    return outbox, outbox.receiver


class Outbox(trio.abc.SendChannel[T], Generic[T]):
    """The send side of an outbox, and the queue itself (see :func:`open_outbox`)."""

    __slots__ = (
        "_consumer",
        "_in_flight",
        "_items",
        "_live",
        "_pong",
        "_queued",
        "_replays",
        "_room_waiter",
        "_size",
        "capacity",
        "close_grace",
        "closing",
        "dropped",
        "lossless",
        "max_bytes",
        "peak",
        "policy",
        "receiver",
        "since",
        "writing",
    )

    def __init__(
        self,
        capacity: int,
        policy: OverflowPolicy = OverflowPolicy.DROP,
        *,
        max_bytes: int = 0,
        size: Callable[[T], int] = len,  # type: ignore[assignment]
    ) -> None:
        if capacity < 1:
            raise ValueError("outbox capacity must be at least 1")
        self.capacity = capacity
        self.policy = policy
        self.max_bytes = max_bytes
        """The byte budget of everything queued toward the consumer; 0: none."""
        self.dropped = 0
        """Events refused because the outbox was full (or gone from history mid-replay)."""
        self.lossless = False
        """Whether overflow always closes the outbox (1008), whatever the policy says:
        for consumers that cannot tell that an event was dropped."""
        self.peak = 0
        """The most items ever queued at once (as seen by the consumer)."""
        self.closing: Closing | None = None
        # A list, not a deque: take() swaps it whole, and an empty list is a
        # tenth of an empty deque on every idle connection.
        self._items: list[T | Replay[T]] = []
        self._live = 0  # events offered and queued: what meets the capacity
        self._replays = 0  # replay cursors queued
        self._pong: T | None = None
        self._queued = 0  # bytes charged for what is queued
        self._in_flight = 0  # ... and for what the consumer took and has not released
        self._size = size
        self._consumer: trio.lowlevel.Task | None = None
        self._room_waiter: trio.lowlevel.Task | None = None
        self.receiver: OutboxReceiver[T] = OutboxReceiver(self)
        """The receive side (the writer's end)."""
        self.since = 0.0
        """``trio.current_time()`` when the oldest item now queued was queued."""
        self.writing: trio.CancelScope | None = None
        """The scope of a write the consumer is waiting on (a stalled socket)."""
        self.close_grace = 2.0
        """Seconds such a write still gets once the outbox closes without flushing:
        long enough for a close frame behind it, short enough for a client that
        stopped reading."""

    def __len__(self) -> int:
        return len(self._items) + (self._pong is not None)

    @property
    def queued_bytes(self) -> int:
        """Bytes charged toward the consumer: queued, and taken but not yet written."""
        return self._queued + self._in_flight

    @property
    def over_budget(self) -> bool:
        """Whether more bytes are queued toward the consumer than its budget."""
        return bool(self.max_bytes) and self._queued + self._in_flight > self.max_bytes

    # --- the broker's side ----------------------------------------------------------

    def offer(
        self, item: T, capacity: int = 0, policy: OverflowPolicy | None = None, now: float = 0.0
    ) -> bool:
        """Queue a live event if there is room; never blocks. False means not queued.

        This is ``send_nowait`` with drop-on-full semantics: a full outbox
        counts a drop and, under the ``disconnect`` policy (or when
        :attr:`lossless`), closes itself with 1008 so the client can resume.
        ``capacity`` and ``policy``, when given, replace the outbox's own for
        this event (a topic's namespace sets them); ``now``, when given, is
        ``trio.current_time()`` (a fan-out reads the clock once for all its
        outboxes). A closing outbox refuses the event without counting it:
        nobody will read it either way.
        """
        if self.closing is not None:
            return False
        if self._live >= (capacity or self.capacity):
            self._overflow(policy)
            return False
        max_bytes = self.max_bytes
        if max_bytes:
            size = self._size(item)
            if self._queued + self._in_flight + size > max_bytes:
                self._overflow(policy)
                return False
            self._queued += size
        items = self._items
        if not items:
            self.since = now or trio.current_time()
        items.append(item)
        self._live += 1
        task = self._consumer
        if task is not None:  # the writer is parked: wake it (once per batch)
            self._consumer = None
            trio.lowlevel.reschedule(task)
        return True

    def send_nowait(self, value: T) -> None:
        """Queue a live event now, as a memory channel would.

        Raises:
            trio.WouldBlock: the outbox is full (the overflow policy was applied).
            trio.ClosedResourceError: the outbox is closing.
        """
        if self.closing is not None:
            raise trio.ClosedResourceError("the outbox is closing")
        if not self.offer(value):
            raise trio.WouldBlock

    async def send(self, value: T) -> None:
        """Queue a live event, waiting while the outbox is full (producers that may wait).

        Raises:
            trio.ClosedResourceError: the outbox is closing.
        """
        while True:
            if self.closing is not None:
                raise trio.ClosedResourceError("the outbox is closing")
            if self._has_room(self._size(value) if self.max_bytes else 0):
                break
            await self._wait_for_room()
        self.offer(value)
        await trio.lowlevel.checkpoint()

    def _has_room(self, size: int) -> bool:
        return self._live < self.capacity and (
            not self.max_bytes or self._queued + self._in_flight + size <= self.max_bytes
        )

    def _overflow(self, policy: OverflowPolicy | None) -> None:
        self.dropped += 1
        if self.lossless or (policy or self.policy) is OverflowPolicy.DISCONNECT:
            self.close(OVERFLOW_CLOSE_CODE, "outbox overflow", flush=False)

    # --- the reader's side ------------------------------------------------------------

    def put(self, item: T) -> None:
        """Queue a reply: never dropped, but charged to the byte budget.

        The caller keeps the excess bounded: it awaits :meth:`wait_within_budget`
        before it takes on more work. Ignored once the outbox is closing.
        """
        if self.closing is not None:
            return
        if self.max_bytes:
            self._queued += self._size(item)
        if not self._items:
            self.since = trio.current_time()
        self._items.append(item)
        self._wake_consumer()

    def put_control(self, item: T) -> None:
        """Queue a ping (or another control frame) of the server's own."""
        if self.closing is not None:
            return
        if self.max_bytes:
            self._queued += CONTROL_FRAME_BYTES
        self._items.append(item)
        self._wake_consumer()

    def put_pong(self, item: T) -> None:
        """Queue the answer to the peer's ping, replacing one not yet taken.

        RFC 6455 lets a pong answer only the latest of several pings; so a
        ping flood holds one pong, not one per ping.
        """
        if self.closing is not None:
            return
        if self._pong is None and self.max_bytes:
            self._queued += CONTROL_FRAME_BYTES
        self._pong = item
        self._wake_consumer()

    def put_replay(self, replay: Replay[T]) -> None:
        """Queue a replay cursor: its events go out, as the budget allows, ahead
        of whatever is queued after it (the live events of the topic)."""
        if self.closing is not None:
            return
        self._items.append(replay)
        self._replays += 1
        self._wake_consumer()

    async def wait_within_budget(self) -> None:
        """Wait until the bytes queued are back within the budget (or the outbox closes)."""
        while self.over_budget and self.closing is None:
            await self._wait_for_room()

    # --- closing ---------------------------------------------------------------------

    def close(self, code: int, reason: str, *, flush: bool = True) -> None:
        """Stop accepting items; the first close wins (its code and reason).

        With ``flush`` the consumer still receives what is queued (a graceful
        shutdown drains); without it the queue is discarded (an overflowing
        client gets its close frame now, not after 256 stale events). A close
        without flush after one with cuts the drain short.
        """
        closing = self.closing
        if closing is not None:
            if not closing.flush or flush:
                return
            # A harder close overtakes a drain (the peer closed during a
            # shutdown): the first code stands, the queue goes.
            code, reason = closing.code, closing.reason
        self.closing = Closing(code, reason, flush)
        if not flush:
            # What the consumer took and has not released stays charged until it does.
            self._items.clear()
            self._live = self._replays = self._queued = 0
            self._pong = None
            writing = self.writing
            if writing is not None:
                writing.deadline = min(writing.deadline, trio.current_time() + self.close_grace)
        self._wake_consumer()
        self._wake_room_waiter()

    async def aclose(self) -> None:
        """Close with 1000 (what is queued still goes out)."""
        self.close(1000, "")
        await trio.lowlevel.checkpoint()

    # --- the consumer's side (through OutboxReceiver) -------------------------------

    def take(self) -> list[T]:
        """Everything the consumer may have now, in order.

        Items queued behind an unfinished replay wait for it; the replay
        yields what the remaining budget allows (at least one event). What is
        taken stays charged to the budget until :meth:`release`.
        """
        items = self._items
        if not items and self._pong is None:
            return _NOTHING  # the writer's first look after it was woken for a close
        # Measured here, not on every offer (the hot path): the queue only
        # grows between takes, so its length is at a peak now.
        self.peak = max(self.peak, len(items))
        if self._replays:
            batch = self._take_through_replays()
        else:
            self._items = []
            self._live = 0
            self._in_flight += self._queued
            self._queued = 0
            batch = items  # type: ignore[assignment]  # no replay in it
        pong = self._pong
        if pong is not None:
            self._pong = None
            batch.insert(0, pong)
        if self._room_waiter is not None:
            self._wake_room_waiter()
        return batch

    def _take_through_replays(self) -> list[T]:
        batch: list[T] = []
        items = self._items
        sized = bool(self.max_bytes)
        charged = taken = 0
        for index, item in enumerate(items):
            if not isinstance(item, Replay):
                batch.append(item)
                if sized:
                    charged += _charge(self._size, item)
                taken = index + 1
                continue
            # Half the budget at most: the rest is for the live events behind it.
            room = self.max_bytes // 2 - self.queued_bytes if sized else 1 << 62
            events, size, missed = item.pull(max(room, 1))
            if missed:
                self._missed(missed)
                if self.closing is not None and not self.closing.flush:
                    return []
            batch.extend(events)
            if sized:
                self._queued += size  # charged as it is pulled ...
                charged += size
            if not item.done:
                break  # what is behind it waits for the rest of the replay
            self._replays -= 1
            taken = index + 1
        del items[:taken]
        self._queued -= charged  # ... and handed over with the rest
        self._in_flight += charged
        # Replies behind a replay count as live here: that errs toward dropping sooner.
        self._live = sum(1 for item in items if not isinstance(item, Replay))
        return batch

    def _missed(self, missed: int) -> None:
        """Events a replay should have carried left history before it got to them."""
        self.dropped += missed
        if self.lossless or self.policy is OverflowPolicy.DISCONNECT:
            self.close(OVERFLOW_CLOSE_CODE, "outbox overflow (a replay fell behind history)")

    def release(self) -> None:
        """The consumer wrote everything it took: those bytes leave the budget."""
        self._in_flight = 0
        if self._room_waiter is not None:
            self._wake_room_waiter()

    # --- waiting ---------------------------------------------------------------------

    def _wake_consumer(self) -> None:
        task = self._consumer
        if task is not None:
            self._consumer = None
            trio.lowlevel.reschedule(task)

    def _wake_room_waiter(self) -> None:
        task = self._room_waiter
        if task is not None and (self.closing is not None or not self.over_budget):
            self._room_waiter = None
            trio.lowlevel.reschedule(task)

    async def _wait_for_room(self) -> None:
        if self._room_waiter is not None:
            raise trio.BusyResourceError("another task is already waiting for room")
        self._room_waiter = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort_room_wait)

    def _abort_room_wait(self, _: object) -> trio.lowlevel.Abort:
        self._room_waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _abort_consumer_wait(self, _: object) -> trio.lowlevel.Abort:
        self._consumer = None
        return trio.lowlevel.Abort.SUCCEEDED


class OutboxReceiver(trio.abc.ReceiveChannel[T], Generic[T]):
    """The receive side of an outbox: the writer's end."""

    __slots__ = ("_outbox",)

    def __init__(self, outbox: Outbox[T]) -> None:
        self._outbox = outbox

    def ready(self) -> bool:
        """Whether :meth:`take` has something (or the outbox is closing)."""
        outbox = self._outbox
        return bool(outbox._items) or outbox._pong is not None or outbox.closing is not None

    def park(self) -> Callable[[object], trio.lowlevel.Abort]:
        """Make the calling task the one woken when something is queued; returns the
        abort function to pass to ``trio.lowlevel.wait_task_rescheduled``.

        :meth:`receive_batch` in two steps, for a consumer that would rather
        not have a frame of its own on the stack while it waits.
        """
        outbox = self._outbox
        if outbox._consumer is not None:
            raise trio.BusyResourceError("another task is already receiving from this outbox")
        outbox._consumer = trio.lowlevel.current_task()
        return outbox._abort_consumer_wait

    @property
    def take(self) -> Callable[[], list[T]]:
        """Everything queued now (possibly nothing): :meth:`Outbox.take`, unwrapped
        (the writer calls it on every wake)."""
        return self._outbox.take

    async def receive_batch(self) -> list[T]:
        """Everything queued, waiting until there is something.

        Returns an empty batch once the outbox is closing and drained (or
        closing without flush). Call :meth:`release` once the batch is written.
        """
        outbox = self._outbox
        while not outbox._items and outbox._pong is None:
            if outbox.closing is not None:
                return []
            if outbox._consumer is not None:
                raise trio.BusyResourceError("another task is already receiving from this outbox")
            outbox._consumer = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(outbox._abort_consumer_wait)
        return outbox.take()

    @property
    def release(self) -> Callable[[], None]:
        """Everything taken so far is written: it leaves the budget (:meth:`Outbox.release`)."""
        return self._outbox.release

    async def receive(self) -> T:
        """The next item, waiting until there is one (for in-process subscribers,
        which queue no replay cursor and no pong).

        Raises:
            trio.EndOfChannel: the outbox is closing and drained.
        """
        outbox = self._outbox
        while not outbox._items:
            if outbox.closing is not None:
                raise trio.EndOfChannel
            if outbox._consumer is not None:
                raise trio.BusyResourceError("another task is already receiving from this outbox")
            outbox._consumer = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(outbox._abort_consumer_wait)
        outbox.peak = max(outbox.peak, len(outbox._items))
        item = outbox._items.pop(0)  # at most capacity + replies long
        if isinstance(item, Replay):
            raise TypeError("receive() cannot take a replay cursor: use receive_batch()")
        # Which kind of item left is not recorded; counting it as live errs
        # toward accepting sooner, never toward growing past the bound.
        outbox._live = max(0, outbox._live - 1)
        if outbox._room_waiter is not None:
            outbox._wake_room_waiter()
        await trio.lowlevel.checkpoint()
        return item

    async def aclose(self) -> None:
        """The consumer is gone: close the outbox without flushing."""
        self._outbox.close(1000, "", flush=False)
        await trio.lowlevel.checkpoint()


_NOTHING: Final[list[Any]] = []
"""What take() answers when nothing is queued: shared, never changed."""


def _charge(size: Callable[[T], int], item: T) -> int:
    try:
        return size(item)
    except TypeError:  # a control frame object (ASGI)
        return CONTROL_FRAME_BYTES
