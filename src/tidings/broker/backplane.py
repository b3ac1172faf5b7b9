"""What the broker asks of a backplane that shares topics between nodes.

Without a backplane the broker sequences events itself (the embedded
``memory`` default). With one, sequencing moves out of the process: the
broker hands each publication to :meth:`Backplane.send`, the backplane assigns
its offset where every node sees the same one (in Redis), and delivers it back
to every node that tracks the topic through :meth:`~tidings.broker.broker.Broker.deliver`.

This module names the seam only; implementations live in
:mod:`tidings.backplane` and the broker never imports them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import attrs

from ..protocol.messages import ClientInfo, Event, Position

DoneCallback = Callable[[Any], None]
"""Called with the event's Position, or the BrokerError that refused it."""


@attrs.frozen(slots=True)
class Publication:
    """One event on its way to be sequenced."""

    tenant: str
    topic: str
    payload: Any
    payload_json: bytes
    on_done: DoneCallback | None
    idempotency_key: str | None = None
    """Set on every retry of one publication: it is published once
    (:mod:`tidings.broker.idempotency`)."""
    trusted: bool = True
    """From the node's own side (the HTTP API, in-process code): exempt from the
    tenant's topic quota. A client's publication is not."""


class Backplane(Protocol):
    """Sequencing, history and subscriptions shared by every node."""

    def send(self, publication: Publication) -> None:
        """Queue a publication; never waits.

        The backplane calls ``publication.on_done`` with the position it got,
        or with a BrokerError (``unavailable``) when it could not be sequenced
        in time or the bounded queue was full.
        """

    async def track(self, tenant: str, topic: str) -> None:
        """Return once this node receives the topic's events and holds its state.

        After it returns, and until the caller next awaits, the broker's copy
        of the topic (offset, epoch, recent history) is current, so a
        subscription made then replays and continues with no gap.

        Raises:
            BrokerError: ``unavailable`` when the backplane cannot be reached.
        """

    def untrack(self, tenant: str, topic: str) -> None:
        """This node no longer has subscribers for the topic (never waits)."""

    async def history(
        self, tenant: str, topic: str, since: int, limit: int | None
    ) -> tuple[list[Event], Position | None]:
        """The shared history of a topic after offset ``since``, and where it stands."""

    async def presence(self, tenant: str, topic: str) -> list[ClientInfo]:
        """Who is subscribed to a topic on every node."""
