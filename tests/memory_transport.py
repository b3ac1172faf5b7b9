"""A transport over memory, for the connection's races under trio's MockClock.

It stands where a socket would: the connection reads what the test (the peer)
sends, and writes into a "wire" of limited room that the peer drains when it
chooses, so a peer that stops reading stalls the writer exactly as a full
socket would, and timeouts run on the mock clock instead of the wall clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import trio

from tidings.transport.base import (
    CloseFrame,
    ConnectionLost,
    ControlFrame,
    Framer,
    Outgoing,
    PeerClosed,
    PingFrame,
    WriteTimeout,
)


def _identity(data: bytes) -> bytes:
    return data


class MemoryTransport:
    """A :class:`~tidings.transport.base.Transport` whose other end is the test."""

    supports_ping = True

    def __init__(self, room: int = 8) -> None:
        self.remote = "memory:1"
        self.last_received = trio.current_time()
        self.room = room
        """Items the wire holds before writes stall (a socket's buffers)."""
        self.wire: list[Outgoing] = []
        self.writes = 0
        """How many writes the connection made (each try_send is one)."""
        self.closed = False
        self._incoming_send, self._incoming = trio.open_memory_channel[Any](16)
        self._drained = trio.Event()
        self._written = trio.Event()

    # --- the peer's side ------------------------------------------------------------

    async def peer_sends(self, message: str | bytes | PingFrame | PeerClosed) -> None:
        await self._incoming_send.send(message)

    async def peer_reads(self, count: int = 1) -> list[Outgoing]:
        """Take ``count`` items off the wire, waiting for them to be written."""
        taken: list[Outgoing] = []
        while len(taken) < count:
            while not self.wire:
                self._written = trio.Event()
                await self._written.wait()
            taken.append(self.wire.pop(0))
            self._drained.set()
        return taken

    def peer_hangs_up(self) -> None:
        self._incoming_send.send_nowait(ConnectionLost())

    # --- the connection's side --------------------------------------------------------

    async def receive(self) -> str | bytes | PingFrame:
        item = await self._incoming.receive()
        self.last_received = trio.current_time()
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[no-any-return]

    def framer(self, text: bool) -> Framer:
        return _identity

    def frame_control(self, frame: ControlFrame) -> Outgoing:
        return frame

    def try_send(self, items: Iterable[Outgoing]) -> list[Outgoing] | None:
        if self.closed:
            raise ConnectionLost
        self.writes += 1
        pending = list(items)
        while pending and len(self.wire) < self.room:
            self.wire.append(pending.pop(0))
        self._written.set()
        return pending or None

    async def send_rest(self, rest: object, *, write_timeout: float) -> None:
        assert isinstance(rest, list)
        while rest:
            with trio.move_on_after(write_timeout) as waited:
                while len(self.wire) >= self.room:
                    self._drained = trio.Event()
                    await self._drained.wait()
            if waited.cancelled_caught:
                raise WriteTimeout
            if self.closed:
                raise ConnectionLost
            rest[:] = self.try_send(rest) or []

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


def close_frames(items: Iterable[Outgoing]) -> list[CloseFrame]:
    return [item for item in items if isinstance(item, CloseFrame)]
