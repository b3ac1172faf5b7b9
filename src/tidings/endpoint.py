"""Endpoints: a WebSocket path with its own dialect and its own application handlers.

A server always has the native endpoint (``config.ws_path``, the native
protocol), and by default Centrifugo's (``config.centrifugo_path``, see
:mod:`tidings.centrifugo`, itself an endpoint like these). An application
whose clients speak another protocol adds an endpoint for it: a dialect that
turns its frames into :class:`~tidings.protocol.messages.AppMessage` values
and events into its frames, and handlers that run when such messages arrive::

    deploys = Endpoint("/ws", JsonDialect("norn"))

    @deploys.on_connect
    async def everyone_hears_everything(session: Session) -> None:
        await session.subscribe("events")

    @deploys.on("ping")
    async def ping(session: Session, message: AppMessage) -> None:
        session.reply({"type": "pong"})

    async with open_server(config, endpoints=[deploys]) as server: ...

Handlers see a :class:`Session`: the connection as an application uses it.
They may subscribe it to topics (the broker then fans events out to it with
the same bounds as any client), send it frames of their own, and keep state
in :attr:`Session.state`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar
from urllib.parse import parse_qs

import attrs

from .app import ClientInfo, CloseInfo
from .auth import Identity
from .protocol.dialect import Dialect
from .protocol.messages import AppMessage, Event, Position
from .transport.base import UpgradeRequest

if TYPE_CHECKING:
    from .connection import Connection

MessageHandler: TypeAlias = Callable[["Session", AppMessage], Awaitable[None]]
"""``async def handler(session, message)``: raise RequestError to answer with an error."""
ConnectHook: TypeAlias = Callable[["Session"], Awaitable[None]]
DisconnectHook: TypeAlias = Callable[["Session", CloseInfo], Awaitable[None]]
FrameHook: TypeAlias = Callable[["Session"], None]
"""``hook(session)``: the commands of one incoming message were handled."""
Authenticate: TypeAlias = Callable[[UpgradeRequest], Identity]
"""Checks an upgrade request; raise :class:`~tidings.auth.AuthError` to refuse it (401)."""

H = TypeVar("H", bound=Callable[..., Awaitable[None]])


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

    def __init__(self, connection: Connection) -> None:
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
        return self._connection.outbox.closing is not None

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
        return await self._connection.broker.publish(
            topic, payload, tenant=self._connection.identity.tenant
        )

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
        return self._connection.delivered.get(topic)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection (what is queued goes out first)."""
        self._connection.close(code, reason)


class Endpoint:
    """A WebSocket path, the dialect spoken there, and the handlers of its messages.

    Args:
        path: the URL path clients upgrade on (``/ws``, ``/api/v1/agents/connect``).
        dialect: how frames and the model convert (see :mod:`tidings.protocol`).
        authenticate: replaces the server's client authentication for this
            path (e.g. a bearer token for agents, none for browsers).
        app_ping: a frame sent every ``ping_interval`` instead of a WebSocket
            ping, for protocols whose clients expect pings of their own (and
            answer them: any message counts against the read timeout).
        limits: connection limits of this path that differ from the server's
            (names of :class:`~tidings.connection.ConnectionLimits`:
            ``rate_limit`` in messages per second with ``rate_burst``,
            ``outbox_size``, ``overflow_policy``, ``ping_interval``, ...), e.g.
            ``{"rate_limit": 0}`` for agents exempt from a chat's rate limit.
        lossless: for protocols whose clients cannot tell that an event was
            dropped: a full outbox closes the connection (1008, so the client
            resumes) whatever the topic's overflow policy says.
    """

    def __init__(
        self,
        path: str,
        dialect: Dialect,
        *,
        authenticate: Authenticate | None = None,
        app_ping: bytes | None = None,
        lossless: bool = False,
        limits: Mapping[str, Any] | None = None,
    ) -> None:
        if not path.startswith("/"):
            raise ValueError(f"an endpoint path starts with '/': {path!r}")
        self.path = path
        self.dialect = dialect
        self.authenticate = authenticate
        self.app_ping = app_ping
        self.lossless = lossless
        self.limits: dict[str, Any] = dict(limits or {})
        self.handlers: dict[str, MessageHandler] = {}
        self.connect_hooks: list[ConnectHook] = []
        self.disconnect_hooks: list[DisconnectHook] = []
        self.frame_hooks: list[FrameHook] = []

    def on(self, kind: str) -> Callable[[H], H]:
        """Register ``async def handler(session, message)`` for messages of ``kind``."""

        def register(handler: H) -> H:
            self.handlers[kind] = handler
            return handler

        return register

    def on_connect(self, hook: ConnectHook) -> ConnectHook:
        """``async def hook(session)``: runs before the client's first message is read."""
        self.connect_hooks.append(hook)
        return hook

    def after_frame(self, hook: FrameHook) -> FrameHook:
        """``hook(session)``: runs after the commands of each incoming message were handled.

        Also when the rate limit stopped them part way. For protocols that
        answer the commands of one message in one frame: the handlers collect
        the answers, the hook sends them. It must not block (it is not awaited).
        """
        self.frame_hooks.append(hook)
        return hook

    def on_disconnect(self, hook: DisconnectHook) -> DisconnectHook:
        """``async def hook(session, closed)``: runs after the connection ended."""
        self.disconnect_hooks.append(hook)
        return hook
