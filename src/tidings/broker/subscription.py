"""In-process subscriptions: the broker's fan-out, delivered to Python code."""

from __future__ import annotations

from typing import Self

import trio

from ..protocol.messages import Event, Position
from .outbox import Outbox


def as_event(event: Event) -> Event:
    """The encoder of in-process subscribers: they receive the event itself."""
    return event


class Subscription:
    """Events of one topic for code running in the server's process.

    Iterate it (``async for event in subscription``) to receive each
    :class:`~tidings.Event` in ``seq`` order. It holds at most its buffer size
    of events; when the consumer falls behind, further events are dropped for
    it and counted in :attr:`dropped`, exactly as for a WebSocket client.
    """

    __slots__ = ("_outbox", "position", "recovered", "topic")

    def __init__(
        self, topic: str, outbox: Outbox[Event], position: Position, recovered: bool | None
    ) -> None:
        self.topic = topic
        self.position = position
        """Where the topic stood when the subscription started."""
        self.recovered = recovered
        """For a resumed subscription, whether every missed event was replayed."""
        self._outbox = outbox

    @property
    def dropped(self) -> int:
        """Events lost because this subscription's buffer was full."""
        return self._outbox.dropped

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self._outbox.receiver.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
