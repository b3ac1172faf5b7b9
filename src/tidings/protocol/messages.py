"""The dialect-neutral model: commands in, replies and events out.

A dialect decodes frames into these and encodes these into frames; the
connection and the broker only ever see these types.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import attrs

RequestId: TypeAlias = str | int | None
"""What the client put in ``requestId``; echoed verbatim on the reply."""


@attrs.frozen(slots=True)
class Position:
    """Where a topic's stream stands: the last offset and the stream's epoch."""

    seq: int
    epoch: str


@attrs.frozen(slots=True)
class Event:
    """One published event, stamped by the broker.

    ``seq`` is the topic's offset (1 for the first event of an epoch);
    ``timestamp`` is RFC 3339 UTC, taken when the broker sequenced it;
    ``payload`` is any JSON value.
    """

    topic: str
    seq: int
    epoch: str
    payload: Any
    timestamp: str
    payload_json: bytes = attrs.field(default=b"", repr=False, eq=False)
    """``payload`` serialized once by the broker; dialects embed it as is.
    Empty in events a client received."""
    _frame_key: Any = attrs.field(default=None, init=False, repr=False, eq=False)
    _frame: Any = attrs.field(default=None, init=False, repr=False, eq=False)

    def frame_for(self, key: Any) -> Any:
        """The wire form kept by :meth:`keep_frame` under ``key``, or None."""
        return self._frame if self._frame_key is key else None

    def keep_frame(self, key: Any, frame: Any) -> None:
        """Keep one wire form of this event (the first kept stays), so that
        fan-out and every replay of it share the same bytes."""
        if self._frame_key is None:
            object.__setattr__(self, "_frame_key", key)
            object.__setattr__(self, "_frame", frame)


@attrs.frozen(slots=True)
class ClientInfo:
    """One connected client, as request handlers, hooks and presence see it."""

    id: str
    """Unique within this server process."""
    remote: str
    """``host:port`` of the peer (of the proxy, behind one)."""
    connected_at: float
    """Wall-clock time of the upgrade (seconds since the epoch)."""
    dialect: str
    path: str
    user: str | None = None
    """The token's ``sub``; None for anonymous clients."""
    tenant: str = "default"


@attrs.frozen(slots=True)
class PresenceChange:
    """A client joined or left a topic (sent where the namespace has join/leave on)."""

    topic: str
    kind: str
    """``"join"`` or ``"leave"``."""
    client: ClientInfo


# --- commands (client to server) -------------------------------------------


@attrs.frozen(slots=True)
class Subscribe:
    topic: str
    request_id: RequestId = None
    since: int | None = None
    epoch: str | None = None


@attrs.frozen(slots=True)
class Unsubscribe:
    topic: str
    request_id: RequestId = None


@attrs.frozen(slots=True)
class Publish:
    topic: str
    payload: Any
    request_id: RequestId = None
    idempotency_key: str | None = None
    """The same on every retry of one publication: the node publishes it once."""


@attrs.frozen(slots=True)
class Request:
    topic: str
    payload: Any
    request_id: RequestId = None


@attrs.frozen(slots=True)
class Ack:
    topic: str
    seq: int
    request_id: RequestId = None


@attrs.frozen(slots=True)
class Ping:
    request_id: RequestId = None


@attrs.frozen(slots=True)
class PresenceQuery:
    """Who is subscribed to a topic."""

    topic: str
    request_id: RequestId = None


@attrs.frozen(slots=True)
class Refresh:
    """A new token for a connection whose token is about to expire."""

    token: str
    request_id: RequestId = None


@attrs.frozen(slots=True)
class AppMessage:
    """A message of an application's own protocol, for its endpoint's handlers.

    Dialects of application protocols (an envelope of their own, commands such
    as ``query`` or ``heartbeat``) decode what is not a tidings command into
    this; the connection hands it to the handler registered for ``kind``.
    """

    kind: str
    body: dict[str, Any]
    request_id: RequestId = None


Command: TypeAlias = (
    Subscribe | Unsubscribe | Publish | Request | Ack | Ping | PresenceQuery | Refresh | AppMessage
)


# --- replies (server to client) --------------------------------------------


@attrs.frozen(slots=True)
class Subscribed:
    topic: str
    request_id: RequestId
    position: Position
    recovered: bool | None = None
    """None when the client did not ask to resume."""
    replayed: int = 0


@attrs.frozen(slots=True)
class Unsubscribed:
    topic: str
    request_id: RequestId


@attrs.frozen(slots=True)
class Published:
    topic: str
    request_id: RequestId
    position: Position


@attrs.frozen(slots=True)
class Acked:
    """Sent for an ``ack`` only when it carried a ``requestId``."""

    topic: str
    request_id: RequestId
    seq: int


@attrs.frozen(slots=True)
class Answer:
    """A request handler's result."""

    topic: str
    request_id: RequestId
    payload: Any


@attrs.frozen(slots=True)
class PresenceList:
    topic: str
    request_id: RequestId
    clients: list[ClientInfo]


@attrs.frozen(slots=True)
class Refreshed:
    request_id: RequestId
    expires_at: float | None


@attrs.frozen(slots=True)
class Pong:
    request_id: RequestId = None


@attrs.frozen(slots=True)
class Error:
    """A command failed or a frame could not be understood.

    ``code`` is an :class:`ErrorCode`, or an application's own code raised by a
    request handler.
    """

    code: str
    message: str
    request_id: RequestId = None
    topic: str | None = None


Reply: TypeAlias = (
    Subscribed | Unsubscribed | Published | Acked | Answer | PresenceList | Refreshed | Pong | Error
)
