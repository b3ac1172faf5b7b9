"""What an application's handlers see of one client connection: a :class:`Session`."""

from __future__ import annotations

from typing import Any, Protocol
from urllib.parse import parse_qs

import attrs

from ..app import ClientInfo
from ..auth import Identity
from ..protocol.messages import Event, Position
from .hooks import ClientHooks


class SessionHost(Protocol):
    """What a :class:`Session` asks of the connection under it."""

    @property
    def info(self) -> ClientInfo: ...
    @property
    def identity(self) -> Identity: ...
    @property
    def query(self) -> str: ...
    @property
    def closing(self) -> bool: ...
    @property
    def hooks(self) -> ClientHooks | None: ...

    def send_message(self, message: Any, *, reliable: bool) -> bool: ...
    async def subscribe_for_app(
        self,
        topic: str,
        since: int | None,
        epoch: str | None,
        *,
        track: bool,
        return_replay: bool = False,
    ) -> SessionSubscription: ...
    async def publish_for_app(self, topic: str, payload: Any) -> Position: ...
    def permission_problem(self, action: str, topic: str) -> tuple[str, str] | None: ...
    def adopt(self, identity: Identity) -> None: ...
    def unsubscribe_for_app(self, topic: str) -> bool: ...
    def app_topics(self) -> set[str]: ...
    def delivered_position(self, topic: str) -> Position | None: ...
    def close(self, code: int, reason: str, *, flush: bool = True) -> None: ...


@attrs.frozen(slots=True)
class SessionSubscription:
    """What :meth:`Session.subscribe` found: where the topic stands, what was replayed."""

    topic: str
    position: Position
    recovered: bool | None
    replayed: int
    events: list[Event] = attrs.Factory(list)
    """The replay, when :meth:`Session.subscribe` was asked to return it (not queue it)."""


class Session:
    """One client connection, as an endpoint's handlers use it.

    Every method is safe to call from any task of the server's Trio run (a
    workflow running in the background, a periodic broadcaster): none of them
    waits on the client.
    """

    __slots__ = ("_connection", "state")

    def __init__(self, connection: SessionHost) -> None:
        self._connection = connection
        self.state: dict[str, Any] = {}
        """The application's own per-connection state."""

    @property
    def info(self) -> ClientInfo:
        return self._connection.info

    @property
    def id(self) -> str:
        return self._connection.info.id

    @property
    def query(self) -> dict[str, str]:
        """The upgrade URL's query parameters (``?user_id=...``), first value of each."""
        return {
            name: values[0]
            for name, values in parse_qs(self._connection.query, keep_blank_values=True).items()
        }

    @property
    def identity(self) -> Identity:
        """Who the client authenticated as: user, tenant, permissions."""
        return self._connection.identity

    @property
    def closed(self) -> bool:
        """True once the connection is closing or has ended: sends are ignored."""
        return self._connection.closing

    @property
    def hooks(self) -> ClientHooks | None:
        """The application's hooks (``docs/proxy.md``) and what this client's upgrade
        said that they pass on; None on a node without hooks."""
        return self._connection.hooks

    def send(self, message: Any) -> bool:
        """Queue a frame for this client if its outbox has room; False if not queued.

        Bounded like events: a full outbox applies the overflow policy (drop,
        or close the client with 1008).
        """
        return self._connection.send_message(message, reliable=False)

    def reply(self, message: Any) -> None:
        """Queue a frame that answers the client's own message: never dropped.

        Use it for answers, not streams: the excess over the outbox size is
        bounded only because each client message yields a bounded answer.
        """
        self._connection.send_message(message, reliable=True)

    async def subscribe(
        self,
        topic: str,
        *,
        since: int | None = None,
        epoch: str | None = None,
        track: bool = False,
        return_replay: bool = False,
    ) -> SessionSubscription:
        """Subscribe this client to ``topic`` (replaying after ``since``, as for a client).

        The replay is queued to the client as events, ahead of any live one;
        with ``return_replay`` it is returned instead (in ``events``), for a
        protocol that carries it inside its subscribe reply: queue that reply
        before awaiting anything, and nothing live can overtake it.

        With ``track``, the connection remembers the offset of the last event
        of this topic it wrote to the socket (:meth:`delivered`), so an
        application can resume another connection of the same session where
        this one stopped.

        Raises:
            BrokerError: the topic is refused (namespace, limits, backplane).
        """
        return await self._connection.subscribe_for_app(
            topic, since, epoch, track=track, return_replay=return_replay
        )

    async def publish(self, topic: str, payload: Any) -> Position:
        """Publish to ``topic`` in this client's tenant; returns the event's position.

        Raises:
            BrokerError: refused by the broker or the backplane.
        """
        return await self._connection.publish_for_app(topic, payload)

    def permission_problem(self, action: str, topic: str) -> tuple[str, str] | None:
        """Why this client may not ``action`` (subscribe, publish, presence, request)
        ``topic`` under its token and the namespaces: ``(code, message)``, or None.

        Handlers of protocols that subscribe or publish for the client check
        this, so every dialect obeys the same permissions as the native one.
        """
        return self._connection.permission_problem(action, topic)

    def authenticate(self, identity: Identity) -> None:
        """Adopt ``identity`` (for protocols that authenticate after the upgrade,
        or refresh a token: a session with subscriptions keeps its tenant).

        Raises:
            RuntimeError: the session holds subscriptions and ``identity`` is of
                another tenant (they belong to the tenant it had).
            BrokerError: ``too_many_connections``: the new tenant holds its
                limit of connections on this node.
        """
        self._connection.adopt(identity)

    def unsubscribe(self, topic: str) -> bool:
        return self._connection.unsubscribe_for_app(topic)

    @property
    def topics(self) -> set[str]:
        """The topics this client is subscribed to."""
        return self._connection.app_topics()

    def delivered(self, topic: str) -> Position | None:
        """The last event of a tracked topic written to this client's socket."""
        return self._connection.delivered_position(topic)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection (what is queued goes out first)."""
        self._connection.close(code, reason)
