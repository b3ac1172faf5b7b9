"""The writer: the only code that writes to a client's socket.

It waits on the outbox's receive side; each time it wakes it takes
everything queued (frames of every topic, replies, a pong, replay frames as
the budget allows) and writes it in one write when the socket takes it. When
it does not (the client reads slowly), the writer waits for the socket, and
gives up only when the client has taken *nothing* for ``write_timeout``: a
client that reads slowly but reads stays connected, and under the ``drop``
policy sees what it missed as gaps in ``seq``. A write cut off may have left
half a frame on the wire, so the connection is then lost, not closed.

Once the outbox is closing and drained, the writer writes the close frame
(within ``close_timeout``: under the ``disconnect`` policy the client may not
be reading at all), then waits for the peer's close frame up to
``close_timeout`` while the reader still reads, and the connection is over.
"""

from __future__ import annotations

from typing import Final, Protocol

import trio

from ..broker.outbox import Outbox
from ..stats import NodeCounters
from ..transport.base import CloseFrame, ConnectionLost, Outgoing, Transport, WriteTimeout
from .alarms import AlarmClock
from .lifecycle import Lifecycle
from .limits import ConnectionLimits

#: How a client that does not read what it asked for is closed (the reader's words too).
OVER_BUDGET_CODE: Final = 1008
OVER_BUDGET_REASON: Final = "over budget: the client does not read"
#: Writes whose delay is timed: one in DELAY_SAMPLING + 1.
DELAY_SAMPLING: Final = 7


class Writable(Protocol):
    """What the writer needs of its connection."""

    @property
    def outbox(self) -> Outbox[Outgoing]: ...
    @property
    def transport(self) -> Transport: ...
    @property
    def lifecycle(self) -> Lifecycle: ...
    @property
    def limits(self) -> ConnectionLimits: ...
    @property
    def tracks_positions(self) -> bool: ...
    @property
    def counters(self) -> NodeCounters: ...
    @property
    def alarms(self) -> AlarmClock: ...

    def note_written(self, batch: list[Outgoing]) -> None:
        """Tracked events in ``batch`` reached the socket."""

    async def wait_peer_closed(self) -> None:
        """Return once the reader has seen the peer's close frame."""

    def end(self) -> None:
        """The connection is over: cancel its nursery."""


async def run_writer(connection: Writable) -> None:
    """Write until the close handshake is done or the socket is lost."""
    outbox = connection.outbox
    receiver = outbox.receiver
    transport = connection.transport
    lifecycle = connection.lifecycle
    limits = connection.limits
    stall = limits.write_timeout
    delays = connection.counters.write_delay
    wait = trio.lowlevel.wait_task_rescheduled
    take, release = receiver.take, receiver.release
    delay = limits.write_delay
    writes = 0
    try:
        # The hot loop of every delivery: wake, take all, one write, park.
        while True:
            batch = take()
            if not batch:
                if outbox.closing is not None:
                    break  # closing, and everything that was to go out went out
                # receive_batch(), without its frame on every idle client's stack.
                await wait(receiver.park())
                if delay and outbox.closing is None:
                    # Gather what follows for a moment: events that arrive one
                    # at a time (a backplane's) then go out in one write.
                    due = outbox.since + delay
                    if due > trio.current_time():
                        await connection.alarms.sleep_until(due)
                continue
            queued_at = outbox.since
            rest = transport.try_send(batch)
            if rest is not None:
                await _send_rest(outbox, transport, rest, stall)
            release()
            writes += 1
            if not writes & DELAY_SAMPLING:  # timed on one write in 8: a clock read is not free
                delays.observe(trio.current_time() - queued_at)
            if connection.tracks_positions:
                connection.note_written(batch)
            # Not held while idle: an idle client's writer keeps no frame alive.
            batch = rest = None  # type: ignore[assignment]
            # No checkpoint here: back to the outbox, which parks if it is empty.
        closing = outbox.closing
        assert closing is not None
        lifecycle.close(closing.code, closing.reason, flush=closing.flush)
        lifecycle.drained()
        code, reason = lifecycle.close_frame
        rest = transport.try_send([transport.frame_control(CloseFrame(code, reason))])
        if rest is not None:
            await _send_rest(outbox, transport, rest, min(stall, limits.close_timeout))
        lifecycle.close_sent()
        if lifecycle.awaits_peer:
            with trio.move_on_after(limits.close_timeout):
                await connection.wait_peer_closed()
            lifecycle.close_timed_out()
    except WriteTimeout:
        _decided(connection)
        lifecycle.lost("write timeout", "server")
    except ConnectionLost:
        _decided(connection)
        lifecycle.lost("connection lost", "client")
    connection.end()


async def _send_rest(
    outbox: Outbox[Outgoing], transport: Transport, rest: object, stall: float
) -> None:
    """Wait for the socket to take ``rest``; the outbox may cut the wait short.

    When the outbox closes without flushing while the client takes nothing
    (an overflow under the ``disconnect`` policy), the write gets
    ``close_grace`` more, then the connection is dropped.
    """
    with trio.CancelScope() as writing:
        outbox.writing = writing
        try:
            await transport.send_rest(rest, write_timeout=stall)
        finally:
            outbox.writing = None
    if writing.cancelled_caught:
        raise WriteTimeout


def _decided(connection: Writable) -> None:
    """A close the outbox was asked for is how it ended, even if its frame could not go out.

    A client that stalled the writer while more was queued for it than its
    budget (answers it never read) ends as the reader would have ended it.
    """
    outbox = connection.outbox
    closing = outbox.closing
    if closing is not None:
        connection.lifecycle.close(closing.code, closing.reason, flush=closing.flush)
    elif outbox.over_budget:
        connection.lifecycle.close(OVER_BUDGET_CODE, OVER_BUDGET_REASON, flush=False)
