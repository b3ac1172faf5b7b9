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

from typing import Protocol

import trio

from ..broker.outbox import Outbox
from ..stats import NodeCounters
from ..transport.base import CloseFrame, ConnectionLost, Outgoing, Transport, WriteTimeout
from .lifecycle import Lifecycle
from .limits import ConnectionLimits


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
    try:
        while True:
            if not receiver.ready():
                # receive_batch(), without its frame on every idle client's stack.
                await wait(receiver.park())
                continue
            batch = receiver.take()
            if not batch:
                break  # closing, and everything that was to go out went out
            queued_at = outbox.since
            rest = transport.try_send(batch)
            if rest is not None:
                await transport.send_rest(rest, write_timeout=stall)
            receiver.release()
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
            await transport.send_rest(rest, write_timeout=min(stall, limits.close_timeout))
        lifecycle.close_sent()
        if lifecycle.awaits_peer:
            with trio.move_on_after(limits.close_timeout):
                await connection.wait_peer_closed()
            lifecycle.close_timed_out()
    except WriteTimeout:
        lifecycle.lost("write timeout", "server")
    except ConnectionLost:
        lifecycle.lost("connection lost", "client")
    connection.end()
