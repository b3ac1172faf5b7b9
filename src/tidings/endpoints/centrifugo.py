"""Centrifugo's client protocol as a tidings endpoint: its SDKs connect unmodified.

A server serves it at ``centrifugo_path`` (``/connection/websocket``, the
path the SDKs use) beside the native ``/ws``, on the same broker, history,
presence, authentication and namespaces::

    const centrifuge = new Centrifuge("ws://localhost:8800/connection/websocket", {token});
    centrifuge.newSubscription("news").subscribe();

Channels are topics; the connection token is checked at ``connect`` (the
upgrade itself needs none on this path) and its claims apply as for the
native protocol; ``rpc`` calls the handlers of :meth:`Server.on_request`;
``send`` goes to an optional hook. The frames, what is not supported and how
error and close codes map are in ``docs/centrifugo.md``; the frames
themselves are built in :mod:`tidings.protocol.centrifugo`.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeAlias

import attrs
import orjson

from .._version import __version__
from ..app import RequestContext
from ..auth import Identity
from ..broker.namespaces import Namespace
from ..connection.endpoint import Endpoint
from ..connection.session import Session
from ..errors import AuthError, BrokerError, ProxyDisconnect, ProxyError, RequestError
from ..node.proxy import Unavailable
from ..node.server import Server
from ..protocol import centrifugo as wire
from ..protocol.codes import ErrorCode
from ..protocol.messages import AppMessage
from ..transport.base import UpgradeRequest

__all__ = [
    "DEFAULT_PATH",
    "SendHandler",
    "centrifugo_endpoint",
    "send_message",
    "unsubscribe_client",
]

LOGGER = logging.getLogger("tidings.centrifugo")

DEFAULT_PATH: Final = "/connection/websocket"

SendHandler: TypeAlias = Callable[[Session, Any], Awaitable[None]]
"""``async def on_send(session, data)``: a client's ``send`` (no answer goes back)."""

#: Answers collected past this many bytes go to the outbox before the frame ends.
PENDING_FLUSH_BYTES: Final = 64 * 1024
#: ``subscribe.flag`` bit: answer error 112 rather than ``recovered: false``.
REJECT_UNRECOVERED: Final = 2
#: Methods whose handler may wait: a subscribe answer collected before them goes out
#: first, so no live publication can overtake it.
_MAY_WAIT: Final = frozenset({"publish", "presence", "presence_stats", "history", "rpc", "send"})
_STATE: Final = "centrifugo"


@attrs.define(slots=True)
class CentrifugoState:
    """What the endpoint keeps per connection, in ``session.state["centrifugo"]``."""

    connected: bool = False
    pending: list[bytes] = attrs.Factory(list)
    """Answers to the commands of the frame being handled, sent as one frame
    (or several, once they pass :data:`PENDING_FLUSH_BYTES`)."""
    pending_bytes: int = 0
    failed: bool = False
    """A command of this client failed in a handler: logged once, not per command."""
    urgent: bool = False
    """``pending`` holds a subscribe answer: send it before anything awaits."""


class _Disconnect(Exception):
    """Raised by a handler: close the connection with ``code``."""

    def __init__(self, code: int, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.detail = detail or reason


Method: TypeAlias = Callable[
    [Session, CentrifugoState, dict[str, Any]], Awaitable[dict[str, Any] | None]
]


class _Centrifugo:
    """The endpoint's handlers, over one server."""

    def __init__(self, server: Server, path: str, on_send: SendHandler | None) -> None:
        self.server = server
        self.on_send = on_send
        self.endpoint = Endpoint(
            path,
            wire.CentrifugoDialect(server.config.max_commands_per_frame),
            authenticate=self._admit,
            app_ping=wire.PING,
            # The SDKs trust offsets: an event dropped for a slow client would be
            # a gap they never see, so a full outbox closes it and it recovers.
            lossless=True,
            # The token comes in the connect command: a socket that never sends
            # one is closed as Centrifugo does (3502), whatever else it sends.
            authenticates_after_upgrade=True,
            connect_timeout_code=wire.DisconnectCode.STALE,
        )
        self.methods: dict[str, Method] = {
            "connect": self._connect,
            "subscribe": self._subscribe,
            "unsubscribe": self._unsubscribe,
            "publish": self._publish,
            "presence": self._presence,
            "presence_stats": self._presence_stats,
            "history": self._history,
            "rpc": self._rpc,
            "refresh": self._refresh,
            "send": self._send,
            "sub_refresh": self._sub_refresh,
            "ping": self._ping,
        }
        for kind in (*self.methods, wire.PONG, wire.BAD_REQUEST):
            self.endpoint.on(kind)(self._dispatch)
        self.endpoint.after_frame(self._flush)

    def _admit(self, request: UpgradeRequest) -> Identity:
        # Anyone may open the socket: the token comes in the connect command,
        # and nothing but connect is served before it.
        return Identity(self.server.config.default_tenant)

    # --- dispatch ---------------------------------------------------------------------

    async def _dispatch(self, session: Session, message: AppMessage) -> None:
        state = _state(session)
        kind = message.kind
        if session.closed or kind == wire.PONG:
            return  # pongs count against the read timeout; nothing else to do
        problem = _out_of_turn(state, message)
        if problem is not None:
            self._close(
                session, state, _Disconnect(wire.DisconnectCode.BAD_REQUEST, "bad request", problem)
            )
            return
        if state.urgent and (kind in _MAY_WAIT or (kind == "subscribe" and self._subscribe_waits)):
            self._flush(session)
        command_id = message.request_id if isinstance(message.request_id, int) else 0
        reply: bytes | None = None
        try:
            result = await self.methods[kind](session, state, message.body)
            if result is not None and command_id:
                reply = wire.encode_result(command_id, kind, result)
                if kind == "subscribe":
                    state.urgent = True
        except _Disconnect as exc:
            self._close(session, state, exc)
            return
        except ProxyDisconnect as exc:
            self._close(session, state, _Disconnect(exc.close_code, exc.reason))
            return
        except ProxyError as exc:
            # The backend's own code (Centrifugo's backends send numbers) and its
            # temporary flag, which the SDKs act on.
            number, temporary, known = wire.centrifugo_error(exc.code)
            text = exc.message if known else f"{exc.code}: {exc.message}"
            reply = wire.encode_error(command_id, number, text, temporary or exc.temporary)
        except (RequestError, BrokerError) as exc:
            reply = wire.encode_tidings_error(command_id, exc.code, exc.message)
        except Exception:
            if not state.failed:  # a client that keeps failing is not a log flood
                state.failed = True
                LOGGER.exception("centrifugo %s of %s failed", kind, session.id)
            reply = wire.encode_tidings_error(
                command_id, ErrorCode.REQUEST_FAILED, f"{kind} failed"
            )
        if reply is not None and command_id:
            state.pending.append(reply)
            state.pending_bytes += len(reply)
            if state.pending_bytes >= PENDING_FLUSH_BYTES:
                # Into the outbox now, where the client's byte budget sees them,
                # rather than after a frame of a thousand commands.
                self._flush(session)

    def _flush(self, session: Session) -> None:
        """Send the answers collected so far, as one frame."""
        state = session.state.get(_STATE)
        if state is None or not state.pending:
            return
        frame = wire.join_frames(state.pending)
        state.pending.clear()
        state.pending_bytes = 0
        state.urgent = False
        session.reply(frame)

    def _close(self, session: Session, state: CentrifugoState, exc: _Disconnect) -> None:
        LOGGER.info(
            "closing %s: %s (%s)",
            session.id,
            exc.reason,
            exc.detail,
            extra={"event": "centrifugo_close", "client": session.id, "code": exc.code},
        )
        self._flush(session)
        session.close(exc.code, exc.reason)

    # --- connection -------------------------------------------------------------------

    @property
    def _subscribe_waits(self) -> bool:
        """Whether a subscribe may wait (for Redis, or for the subscribe hook)."""
        proxy = self.server.proxy
        return self.server.backplane is not None or (proxy is not None and proxy.subscribes)

    async def _connect(
        self, session: Session, state: CentrifugoState, body: dict[str, Any]
    ) -> dict[str, Any]:
        token = body.get("token")
        proxy = self.server.proxy
        hooks = session.hooks
        expiry: dict[str, Any] = {}
        if (
            proxy is not None
            and proxy.connects
            and hooks is not None
            and (self.server.authenticator.mode == "none" or not (isinstance(token, str) and token))
        ):
            # As Centrifugo: a client without a token is who the connect hook says.
            # Its session is refreshed by the node (the refresh hook) or ends at
            # its expiry, so the SDK is not told to refresh a token it has not got.
            try:
                # The connect's data goes to the hook only when the client sent some.
                data = {"data": body["data"]} if "data" in body else {}
                identity = await proxy.connect(
                    session.info,
                    hooks.origin,
                    name=_text(body.get("name")),
                    version=_text(body.get("version")),
                    **data,
                )
            except Unavailable:
                if not proxy.allow_when_unavailable:
                    raise
                identity = self._verify(token)  # as if there were no hook
                expiry = _expiry(identity)
            except (ProxyError, ProxyDisconnect):
                self.server.counters.auth_failures += 1
                raise
        else:
            identity = self._verify(token)
            expiry = _expiry(identity)
        try:
            session.authenticate(identity)
        except BrokerError as exc:
            raise _Disconnect(
                wire.DisconnectCode.CONNECTION_LIMIT, "connection limit", exc.message
            ) from None
        state.connected = True
        ping = max(1, math.ceil(self.server.config.ping_interval))
        return {
            "client": session.id,
            "version": __version__,
            "ping": ping,
            "pong": True,
            **expiry,
        }

    async def _refresh(
        self, session: Session, state: CentrifugoState, body: dict[str, Any]
    ) -> dict[str, Any]:
        identity = self._verify(body.get("token"))
        if (identity.user, identity.tenant) != (session.identity.user, session.identity.tenant):
            self.server.counters.auth_failures += 1
            raise _Disconnect(
                wire.DisconnectCode.INVALID_TOKEN, "invalid token", "refresh for another user"
            )
        session.authenticate(identity)
        return {"client": session.id, "version": __version__, **_expiry(identity)}

    def _verify(self, token: Any) -> Identity:
        authenticator = self.server.authenticator
        if authenticator.mode == "none":
            return Identity(self.server.config.default_tenant)
        if not isinstance(token, str) or not token:
            self.server.counters.auth_failures += 1
            raise _Disconnect(wire.DisconnectCode.INVALID_TOKEN, "invalid token", "no token")
        try:
            return authenticator.verify(token)
        except AuthError as exc:
            self.server.counters.auth_failures += 1
            if str(exc) == TOKEN_EXPIRED:
                # The SDKs get a new token (get_token / getToken) and try again.
                raise RequestError(wire.CentrifugoError.TOKEN_EXPIRED, "token expired") from None
            raise _Disconnect(
                wire.DisconnectCode.INVALID_TOKEN, "invalid token", str(exc)
            ) from None

    # --- subscriptions ----------------------------------------------------------------

    async def _subscribe(
        self, session: Session, state: CentrifugoState, body: dict[str, Any]
    ) -> dict[str, Any]:
        channel = _channel(body)
        if body.get("tf") is not None or body.get("type"):
            # Refused rather than ignored: the client would get what it filtered out.
            raise RequestError(
                wire.CentrifugoError.NOT_AVAILABLE,
                "tags filters and map or shared-poll subscriptions are not supported",
            )
        namespace = self._allowed(session, "subscribe", channel)
        hooks = session.hooks
        if hooks is not None and hooks.hooks.subscribes and channel not in session.topics:
            await hooks.hooks.subscribe(session.info, hooks.origin, channel, body.get("data"))
        recoverable = namespace.history_size > 0
        recover = recoverable and body.get("recover") is True
        since: int | None = None
        epoch: str | None = None
        if recover:
            since = _offset(body.get("offset"), "offset")
            epoch = _epoch(body.get("epoch"), "epoch") or None
        joined = await session.subscribe(channel, since=since, epoch=epoch, return_replay=True)
        # No await from here until the answer is queued (see _dispatch).
        result: dict[str, Any] = {}
        if recoverable:
            result["recoverable"] = True
            result["positioned"] = True
            result["epoch"] = joined.position.epoch
            result["offset"] = joined.position.seq
        if recover:
            result["was_recovering"] = True
            if joined.recovered:
                result["recovered"] = True
                # The client's own offset: each publication below moves it on to the top.
                result["offset"] = since
                if joined.events:
                    result["publications"] = [wire.publication(event) for event in joined.events]
            elif _int(body.get("flag"), "flag") & REJECT_UNRECOVERED:
                session.unsubscribe(channel)
                raise RequestError(
                    wire.CentrifugoError.UNRECOVERABLE_POSITION,
                    f"cannot recover {channel!r} from offset {since}",
                )
        return result

    async def _unsubscribe(
        self, session: Session, state: CentrifugoState, body: dict[str, Any]
    ) -> dict[str, Any]:
        session.unsubscribe(_channel(body))
        return {}

    async def _sub_refresh(
        self, session: Session, state: CentrifugoState, body: dict[str, Any]
    ) -> dict[str, Any]:
        # Subscription tokens are not used (the connection token's claims decide),
        # so a subscription never expires.
        return {}

    # --- publishing and reading ---------------------------------------------------------

    async def _publish(
        self, session: Session, state: CentrifugoState, body: dict[str, Any]
    ) -> dict[str, Any]:
        channel = _channel(body)
        if "data" not in body:
            raise RequestError(ErrorCode.MISSING_FIELD, "publish needs data")
        self._allowed(session, "publish", channel)
        data = body["data"]
        hooks = session.hooks
        if hooks is not None and hooks.hooks.publishes:
            data = await hooks.hooks.publish(session.info, hooks.origin, channel, data)
        await session.publish(channel, data)
        return {}

    async def _presence(
        self, session: Session, state: CentrifugoState, body: dict[str, Any]
    ) -> dict[str, Any]:
        clients = await self._who(session, _channel(body))
        # Bounded at the source: presence_stats counts them all.
        clients = clients[: self.server.config.presence_max_reply]
        info = {client.id: wire.client_info(client.id, client.user) for client in clients}
        return {"presence": info}

    async def _presence_stats(
        self, session: Session, state: CentrifugoState, body: dict[str, Any]
    ) -> dict[str, Any]:
        clients = await self._who(session, _channel(body))
        # Anonymous clients count as one user (""), as in Centrifugo.
        users = {client.user or "" for client in clients}
        return {"num_clients": len(clients), "num_users": len(users)}

    async def _who(self, session: Session, channel: str) -> list[Any]:
        namespace = self._allowed(session, "subscribe", channel)
        if not namespace.presence:
            raise RequestError(
                wire.CentrifugoError.NOT_AVAILABLE, f"presence is off for {channel!r}"
            )
        return await self.server.presence_everywhere(channel, tenant=session.identity.tenant)

    async def _history(
        self, session: Session, state: CentrifugoState, body: dict[str, Any]
    ) -> dict[str, Any]:
        channel = _channel(body)
        namespace = self._allowed(session, "subscribe", channel)
        if namespace.history_size == 0:
            raise RequestError(wire.CentrifugoError.NOT_AVAILABLE, f"no history for {channel!r}")
        limit = _int(body.get("limit"), "limit")
        reverse = body.get("reverse") is True
        since = body.get("since")
        if since is not None and not isinstance(since, dict):
            raise RequestError(ErrorCode.INVALID_FIELD, "since is {offset, epoch}")
        since_offset = _offset(since.get("offset"), "since.offset") if since else 0
        since_epoch = _epoch(since.get("epoch"), "since.epoch") if since else ""
        tenant = session.identity.tenant
        # Bounded at the source: "all" (a negative limit) or more than the
        # maximum is the maximum, as in Centrifugo; the client pages with since.
        most = self.server.config.history_max_reply
        wanted = most if limit < 0 or limit > most else limit
        if limit == 0:  # the position alone
            events, position = await self.server.history(channel, 0, 1, tenant=tenant)
            events = []
        elif not reverse:
            events, position = await self.server.history(
                channel, since_offset, wanted, tenant=tenant
            )
        else:
            events, position = await self.server.history(channel, 0, None, tenant=tenant)
            if since is not None:
                events = [event for event in events if event.seq < since_offset]
            events = events[: -wanted - 1 : -1]  # the newest, newest first
        top, epoch = (position.seq, position.epoch) if position is not None else (0, "")
        if since_epoch and since_epoch != epoch:
            raise RequestError(
                wire.CentrifugoError.UNRECOVERABLE_POSITION,
                f"epoch {since_epoch!r} is not the stream's ({epoch!r})",
            )
        result: dict[str, Any] = {"offset": top}
        if epoch:
            result["epoch"] = epoch
        if events:
            result["publications"] = [wire.publication(event) for event in events]
        return result

    # --- the application's handlers -----------------------------------------------------

    async def _rpc(
        self, session: Session, state: CentrifugoState, body: dict[str, Any]
    ) -> dict[str, Any]:
        method = body.get("method", "")
        if not isinstance(method, str):
            raise RequestError(ErrorCode.INVALID_FIELD, "method is a string")
        handler = self.server.request_handler(method)
        hooks = session.hooks
        forward = handler is None and hooks is not None and hooks.hooks.answers
        if handler is None and not forward:
            raise RequestError(ErrorCode.NOT_FOUND, f"no rpc method {method[:64]!r}")
        problem = session.permission_problem("request", method)
        if problem is not None:
            raise RequestError(*problem)
        if forward:
            assert hooks is not None
            answer = await hooks.hooks.rpc(session.info, hooks.origin, method, body.get("data"))
        else:
            assert handler is not None
            answer = await handler(RequestContext(method, body.get("data"), session.info))
        try:
            data = orjson.Fragment(orjson.dumps(answer))
        except TypeError:
            LOGGER.exception("rpc handler for %r answered what JSON cannot carry", method)
            raise RequestError(ErrorCode.REQUEST_FAILED, "the rpc handler failed") from None
        return {"data": data}

    async def _send(self, session: Session, state: CentrifugoState, body: dict[str, Any]) -> None:
        if self.on_send is not None:
            await self.on_send(session, body.get("data"))

    async def _ping(
        self, session: Session, state: CentrifugoState, body: dict[str, Any]
    ) -> dict[str, Any]:
        return {}  # protocol v1's ping command

    # --- helpers ----------------------------------------------------------------------------

    def _allowed(self, session: Session, action: str, channel: str) -> Namespace:
        """The channel's namespace, if the client may ``action`` it (else RequestError)."""
        problem = session.permission_problem(action, channel)
        if problem is not None:
            raise RequestError(*problem)
        namespace = self.server.namespaces.resolve(channel)
        assert namespace is not None  # permission_problem checked it
        return namespace


def _text(value: Any) -> str | None:
    """A connect command's ``name`` or ``version``, if it is a string (bounded)."""
    return value[:64] if isinstance(value, str) else None


#: The message of :class:`AuthError` for an expired token (answered with 109, not 3500).
TOKEN_EXPIRED: Final = "token expired"


def centrifugo_endpoint(
    server: Server, path: str = DEFAULT_PATH, *, on_send: SendHandler | None = None
) -> Endpoint:
    """An endpoint that speaks Centrifugo's bidirectional JSON protocol at ``path``.

    The server adds one at ``config.centrifugo_path`` itself; build one by hand
    for another path or to receive the clients' ``send`` messages
    (``server.add_endpoint(centrifugo_endpoint(server, on_send=...))``).
    """
    return _Centrifugo(server, path, on_send).endpoint


def unsubscribe_client(
    session: Session, channel: str, code: int = 2000, reason: str = "server unsubscribe"
) -> bool:
    """End a client's subscription from the server and tell its SDK.

    Below 2500 the subscription stays ended; from 2500 on the SDK subscribes
    again (and recovers). Returns False if the client was not subscribed.
    """
    if not session.unsubscribe(channel):
        return False
    session.reply(wire.encode_unsubscribe_push(channel, code, reason))
    return True


def send_message(session: Session, data: Any) -> bool:
    """A ``message`` push (Centrifugo's asynchronous message) to one client.

    centrifuge-js emits it as a ``message`` event; centrifuge-python 0.7.0
    ignores it. Bounded like events: False if the outbox had no room.
    """
    return session.send(wire.encode_message_push(data))


def _out_of_turn(state: CentrifugoState, message: AppMessage) -> str | None:
    """Why a message breaks the protocol here (Centrifugo closes with 3501), or None."""
    if message.kind == wire.BAD_REQUEST:
        return str(message.body["reason"])
    if not state.connected and message.kind != "connect":
        return f"{message.kind} before connect"
    if state.connected and message.kind == "connect":
        return "connect twice"
    return None


def _state(session: Session) -> CentrifugoState:
    state = session.state.get(_STATE)
    if state is None:
        state = session.state[_STATE] = CentrifugoState()
    return state


def _expiry(identity: Identity) -> dict[str, Any]:
    """``expires``/``ttl`` for a token that expires: the SDK refreshes after ``ttl``.

    A little before the expiry (a tenth, 1 to 30 s), so the refresh arrives
    before the server closes the connection (4002) at the expiry itself.
    """
    if identity.expires_at is None:
        return {}
    remaining = identity.expires_at - time.time()
    margin = min(max(remaining / 10, 1.0), 30.0)
    return {"expires": True, "ttl": max(1, int(remaining - margin))}


def _channel(body: dict[str, Any]) -> str:
    channel = body.get("channel")
    if not isinstance(channel, str) or not channel:
        raise RequestError(ErrorCode.MISSING_FIELD, "channel is a non-empty string")
    return channel


def _int(value: Any, name: str) -> int:
    if value is None:
        return 0
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        value = int(value)  # protobuf's JSON writes 64-bit integers as strings
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(ErrorCode.INVALID_FIELD, f"{name} is an integer")
    if not -(2**63) <= value < 2**64:
        raise RequestError(ErrorCode.INVALID_FIELD, f"{name} is out of range")
    return value


#: What a 64-bit integer written as a string looks like: ASCII digits only
#: (``str.isdigit`` also takes "²", which ``int`` refuses).
_INTEGER: Final = re.compile(r"-?[0-9]{1,20}")


def _offset(value: Any, name: str) -> int:
    offset = _int(value, name)
    if offset < 0:
        raise RequestError(ErrorCode.INVALID_FIELD, f"{name} is not negative")
    return offset


def _epoch(value: Any, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RequestError(ErrorCode.INVALID_FIELD, f"{name} is a string")
    return value
