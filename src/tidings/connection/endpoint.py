"""Endpoints: a WebSocket path with its own dialect and its own application handlers.

A server always has the native endpoint (``config.ws_path``, the native
protocol), and by default Centrifugo's (``config.centrifugo_path``, see
:mod:`tidings.endpoints.centrifugo`, itself an endpoint like these). An application
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
from typing import Any, TypeAlias, TypeVar

from ..app import CloseInfo
from ..auth import Identity
from ..protocol.dialect import Dialect
from ..protocol.messages import AppMessage
from ..transport.base import UpgradeRequest
from .session import Session

MessageHandler: TypeAlias = Callable[["Session", AppMessage], Awaitable[None]]
"""``async def handler(session, message)``: raise RequestError to answer with an error."""
ConnectHook: TypeAlias = Callable[["Session"], Awaitable[None]]
DisconnectHook: TypeAlias = Callable[["Session", CloseInfo], Awaitable[None]]
FrameHook: TypeAlias = Callable[["Session"], None]
"""``hook(session)``: the commands of one incoming message were handled."""
Authenticate: TypeAlias = Callable[[UpgradeRequest], Identity]
"""Checks an upgrade request; raise :class:`~tidings.auth.AuthError` to refuse it (401)."""

H = TypeVar("H", bound=Callable[..., Awaitable[None]])


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
        authenticates_after_upgrade: for protocols whose clients prove who
            they are in a message after the upgrade (Centrifugo's ``connect``):
            a client that has not (:meth:`Session.authenticate`) within
            ``connect_timeout`` is closed with ``connect_timeout_code``, and
            nothing it sends before counts as activity.
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
        authenticates_after_upgrade: bool = False,
        connect_timeout_code: int = 1008,
    ) -> None:
        if not path.startswith("/"):
            raise ValueError(f"an endpoint path starts with '/': {path!r}")
        self.path = path
        self.dialect = dialect
        self.authenticate = authenticate
        self.app_ping = app_ping
        self.lossless = lossless
        self.authenticates_after_upgrade = authenticates_after_upgrade
        self.connect_timeout_code = connect_timeout_code
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
