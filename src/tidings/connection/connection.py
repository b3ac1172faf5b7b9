r"""One client connection: its reader task, and writes that need no task of their own.

::

    broker --offer--> outbox --flusher: try_send--> transport (one write, never waits)
                        ^            \--socket full--> drain task --send_rest--> transport
                        +--put (replies, pongs) <-- reader <--receive
                        +--put (pings) <-- the server's heartbeat (closes silent peers)

The connection's task is its reader. Writing takes no task per connection:
whatever is queued for a client, the node's :class:`~tidings.broker.outbox.Flusher`
writes in one non-blocking write once the producers have yielded, so a
broadcast to a thousand clients costs one task switch, not a thousand. Only
when a socket is full does the connection start a drain task, which writes the
rest under the write timeout and ends when it has caught up. Pings and the read
timeout are the server's heartbeat task, one for all connections.

Whoever decides the connection must end (the reader on a protocol error or the
peer's close, the heartbeat on a read timeout, the broker on overflow, the
server on shutdown) closes the outbox with a code. What must still go out (a
shutdown drains; an overflow does not) and the close frame are then written;
the reader waits up to ``close_timeout`` for the peer's close frame, and the
connection ends. Whatever way it ends, the subscriber is detached from every
topic in ``finally``.

Measured reasons for this shape are in ``docs/architecture.md``.
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import attrs
import trio

from ..app import ClientInfo, CloseInfo, RequestContext, RequestHandler
from ..auth import Authenticator, Identity, expired, may_publish
from ..broker.broker import DEFAULT_TENANT, Broker, Subscriber
from ..broker.namespaces import Namespaces
from ..broker.outbox import Flusher, Outbox
from ..errors import AuthError, BrokerError, RequestError
from ..protocol.codes import CloseCode, ErrorCode
from ..protocol.dialect import Dialect
from ..protocol.messages import (
    Ack,
    Acked,
    Answer,
    AppMessage,
    Command,
    Error,
    Event,
    Ping,
    Pong,
    Position,
    PresenceList,
    PresenceQuery,
    Publish,
    Published,
    Refresh,
    Refreshed,
    Reply,
    Request,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
)
from ..protocol.topics import topic_problem
from ..stats import NodeCounters
from ..transport.base import (
    CloseFrame,
    ConnectionLost,
    Framer,
    MessageTooBig,
    Outgoing,
    PeerClosed,
    PingFrame,
    PongFrame,
    ProtocolViolation,
    Transport,
    UpgradeRequest,
    WireMessage,
    WriteTimeout,
)
from .endpoint import Endpoint
from .limits import ConnectionLimits
from .ratelimit import TokenBucket
from .session import Session, SessionSubscription

LOGGER = logging.getLogger("tidings.connection")

M = TypeVar("M")


@functools.lru_cache(maxsize=64)
def wire_encoder(encode: Callable[[M], bytes], frame: Framer) -> Callable[[M], Outgoing]:
    """Encode-and-frame, one function object per (dialect, transport kind).

    Every connection with the same dialect and transport gets this same
    function, and the broker groups subscribers by it: each event is encoded
    and framed once for all of them, and each delivery is the same bytes.
    """

    def encode_and_frame(message: M) -> Outgoing:
        return frame(encode(message))

    return encode_and_frame


@attrs.frozen(slots=True)
class ConnectionStats:
    id: str
    remote: str
    subscriptions: int
    queued: int
    peak_queued: int
    dropped: int
    acked: dict[str, int]
    """Last offset the client acknowledged, per topic."""


class Connection:
    """A client connection from upgrade to close. Created and run by the server."""

    # Slots: one of these lives for every connected client.
    __slots__ = (
        "_bucket",
        "_close_done",
        "_close_sent",
        "_draining",
        "_ended",
        "_frame",
        "_next_ping",
        "_nursery",
        "_peer_close",
        "_reader_done",
        "_reported_drops",
        "_requests",
        "_session",
        "_tracked",
        "_violations",
        "acked",
        "authenticator",
        "broker",
        "closed",
        "counters",
        "delivered",
        "dialect",
        "endpoint",
        "handlers",
        "identity",
        "info",
        "limits",
        "namespaces",
        "outbox",
        "query",
        "subscriber",
        "transport",
    )

    def __init__(
        self,
        transport: Transport,
        request: UpgradeRequest,
        *,
        dialect: Dialect,
        broker: Broker,
        limits: ConnectionLimits,
        handlers: Mapping[str, RequestHandler],
        flusher: Flusher,
        identity: Identity | None = None,
        namespaces: Namespaces | None = None,
        authenticator: Authenticator | None = None,
        counters: NodeCounters | None = None,
        endpoint: Endpoint | None = None,
    ) -> None:
        self.transport = transport
        self.dialect = dialect
        self.broker = broker
        self.limits = limits
        self.handlers = handlers
        self.identity = identity or Identity(DEFAULT_TENANT)
        self.namespaces = namespaces or broker.namespaces
        self.authenticator = authenticator
        self.counters = counters or NodeCounters()
        self.info = ClientInfo(
            id=secrets.token_hex(6),
            remote=transport.remote,
            connected_at=time.time(),
            dialect=dialect.name,
            path=request.path,
            user=self.identity.user,
            tenant=self.identity.tenant,
        )
        if transport.writes_without_waiting:
            self.outbox: Outbox[Outgoing] = Outbox(
                limits.outbox_size, limits.overflow_policy, flusher=flusher, sink=self._flush
            )
            # What this client's commands queued (its replies, the fan-out of its
            # publications) goes out before the reader waits again, without a
            # task switch to the flusher.
            transport.on_idle = flusher.flush_now
        else:
            # Every write waits (ASGI): a writer task of its own drains the outbox.
            self.outbox = Outbox(limits.outbox_size, limits.overflow_policy)
        if endpoint is not None and endpoint.lossless:
            self.outbox.lossless = True
        self._frame = transport.framer(dialect.text)
        self.subscriber = Subscriber(
            self.outbox,
            wire_encoder(dialect.encode_event, self._frame),
            tenant=self.identity.tenant,
            max_topics=limits.max_subscriptions,
            label=self.info.id,
            presence=self.info,
            encode_presence=wire_encoder(dialect.encode_presence, self._frame),
        )
        self.acked: dict[str, int] = {}
        """Last offset the client acknowledged, per topic."""
        self.endpoint = endpoint
        # Kept only for application endpoints, whose hooks read parameters from
        # it (usually empty: the same interned string for every connection).
        applied = endpoint is not None and bool(
            endpoint.handlers or endpoint.connect_hooks or endpoint.disconnect_hooks
        )
        self.query = request.query if applied else ""
        self._session: Session | None = None  # made when an application first needs it
        self.delivered: dict[str, Position] = _NOTHING_DELIVERED  # a dict of its own once used
        """Per tracked topic, the last event written to the socket."""
        self._tracked: Subscriber | None = None  # subscriptions an application tracks
        self.closed: CloseInfo | None = None
        self._peer_close: PeerClosed | None = None
        self._close_sent = False  # the close frame is queued for writing
        self._close_done = False  # ... and written
        self._draining = False  # a drain (or ASGI writer) task owns writing; the sink stands aside
        self._reader_done = False
        self._ended = False
        self._next_ping = trio.current_time() + limits.ping_interval
        self._requests: trio.Semaphore | None = None  # made on the first request
        self._nursery: trio.Nursery | None = None
        self._bucket = None
        if limits.rate_limit:
            burst = limits.rate_burst or limits.rate_limit
            self._bucket = TokenBucket(limits.rate_limit, burst, trio.current_time())
        self._violations = 0
        self._reported_drops = 0

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def session(self) -> Session:
        """This connection as the endpoint's application handlers see it."""
        if self._session is None:
            self._session = Session(self)
        return self._session

    def statistics(self) -> ConnectionStats:
        return ConnectionStats(
            id=self.info.id,
            remote=self.info.remote,
            subscriptions=len(self.subscriber.topics),
            queued=len(self.outbox),
            peak_queued=self.outbox.peak,
            dropped=self.outbox.dropped,
            acked=dict(self.acked),
        )

    def close(self, code: int, reason: str, *, flush: bool = True) -> None:
        """Ask the connection to end with ``code``; returns at once.

        With ``flush``, what is already queued is written before the close frame.
        """
        self.outbox.close(code, reason, flush=flush)

    async def run(self) -> CloseInfo:
        """Serve the client until the connection ends; returns how it ended."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if not self.transport.writes_without_waiting:
                    self._draining = True  # the writer owns writing for the whole connection
                    nursery.start_soon(self._writer)
                if self.endpoint is not None and self.endpoint.connect_hooks:
                    await self._connected()
                await self._reader()
                await self._finish()
                nursery.cancel_scope.cancel()  # request handlers still running
        finally:
            self._ended = True
            self.outbox.close(CloseCode.ABNORMAL, "connection ended", flush=False)
            self.broker.detach(self.subscriber)
            if self._tracked is not None:
                self.broker.detach(self._tracked)
            with trio.CancelScope(shield=True):
                await self.transport.aclose()
            if self.closed is None:
                self.closed = CloseInfo(CloseCode.ABNORMAL, "connection ended", "server")
            if self.endpoint is not None and self.endpoint.disconnect_hooks:
                await self._disconnected(self.closed)
        return self.closed

    def heartbeat(self, now: float) -> None:
        """Ping when due; close a peer silent for longer than the read timeout.

        Called by the server's heartbeat task for every connection.
        """
        transport = self.transport
        if self.outbox.closing is not None:
            return
        self.counters.outbox_depth.observe(len(self.outbox))
        dropped = self.outbox.dropped
        if dropped > self._reported_drops:  # one line per tick at most, not per event
            LOGGER.warning(
                "client %s is not keeping up: %d events dropped (%d in all)",
                self.info.id,
                dropped - self._reported_drops,
                dropped,
                extra={"event": "overflow", "client": self.info.id, "dropped": dropped},
            )
            self._reported_drops = dropped
        if expired(self.identity):
            LOGGER.info("closing %s: its token expired", self.info.id)
            self.close(CloseCode.TOKEN_EXPIRED, "token expired", flush=False)
            return
        app_ping = self.endpoint.app_ping if self.endpoint is not None else None
        if app_ping is not None and now >= self._next_ping:
            # The protocol's own ping (a data frame, so it works under ASGI too).
            self.outbox.put(self._frame(app_ping))
            self._next_ping = now + self.limits.ping_interval
        if not transport.supports_ping:
            return  # under ASGI the server keeps the connection alive
        if now - transport.last_received >= self.limits.read_timeout:
            LOGGER.info("closing %s: silent for %.1f s", self.info.id, self.limits.read_timeout)
            self.close(CloseCode.INTERNAL_ERROR, "read timeout", flush=False)
        elif now >= self._next_ping and app_ping is None:
            self.outbox.put(self.transport.frame_control(PingFrame()))
            self._next_ping = now + self.limits.ping_interval

    # --- reader -------------------------------------------------------------

    async def _reader(self) -> None:
        transport = self.transport
        outbox = self.outbox
        decode = self.dialect.decode
        try:
            while True:
                try:
                    message = await transport.receive()
                except MessageTooBig:
                    self.close(CloseCode.MESSAGE_TOO_BIG, "message too big", flush=False)
                    continue
                if isinstance(message, PingFrame):
                    outbox.put(transport.frame_control(PongFrame(message.payload)))
                    continue
                if outbox.closing is not None:
                    continue  # closing: read on only to see the peer's close frame
                for item in decode(message):
                    if self._bucket is not None and not self._within_rate(item):
                        break
                    if type(item) is Error:
                        self._reply(item)
                    else:
                        await self._dispatch(item)
                if self.endpoint is not None and self.endpoint.frame_hooks:
                    self._frame_handled()
                if len(outbox) >= outbox.capacity:
                    # Replies queue past the capacity; take no more commands until
                    # the writer has caught up, so a client that sends but never
                    # reads cannot grow the queue.
                    await outbox.wait_writable()
        except PeerClosed as exc:
            self._peer_close = exc
            code = exc.code if exc.code not in (1005, 1006) else CloseCode.NORMAL
            self.close(code, "", flush=False)
        except ProtocolViolation as exc:
            self.close(exc.code, exc.reason, flush=False)
        except ConnectionLost:
            self._lose("connection lost", "client")
        finally:
            self._reader_done = True

    async def _dispatch(self, command: Any) -> None:
        kind = type(command)
        if kind is Publish:
            if self._refused("publish", command.topic, command.request_id):
                return
            tenant = self.identity.tenant
            try:
                try:
                    # Without yielding, so every publication of one socket read
                    # reaches the broker before it runs, as one batch.
                    self.broker.submit_nowait(
                        command.topic, command.payload, self._publish_reply(command), tenant=tenant
                    )
                except trio.WouldBlock:
                    await self.broker.submit(
                        command.topic, command.payload, self._publish_reply(command), tenant=tenant
                    )
            except TypeError as exc:  # a value orjson cannot write back (e.g. a huge int)
                self._reply(
                    Error(ErrorCode.INVALID_FIELD, str(exc), command.request_id, command.topic)
                )
        elif kind is Subscribe:
            await self._subscribe(command)
        elif kind is Unsubscribe:
            if self.broker.unsubscribe(self.subscriber, command.topic):
                self.acked.pop(command.topic, None)
                self._reply(Unsubscribed(command.topic, command.request_id))
            else:
                self._reply(self._not_subscribed(command.topic, command.request_id))
        elif kind is Request:
            await self._request(command)
        elif kind is Ack:
            self._ack(command)
        elif kind is Ping:
            self._reply(Pong(command.request_id))
        elif kind is PresenceQuery:
            if not self._refused("presence", command.topic, command.request_id):
                clients = await self.broker.presence_everywhere(command.topic, self.identity.tenant)
                self._reply(PresenceList(command.topic, command.request_id, clients))
        elif kind is Refresh:
            self._refresh(command)
        elif kind is AppMessage:
            await self._app_message(command)

    def _within_rate(self, item: Command | Error) -> bool:
        """Spend a token on one message; over the limit, answer rate_limited (or close)."""
        assert self._bucket is not None
        if self._bucket.take(trio.current_time()):
            return True
        self._violations += 1
        self.counters.rate_limited += 1
        limit = self.limits.rate_limit_violations
        if limit and self._violations >= limit:
            LOGGER.info("closing %s: %d messages over its rate limit", self.info.id, limit)
            # Flushed: the replies queued before it (bounded by the rate limit)
            # tell the client what it sent got done and why it is closed.
            self.close(CloseCode.RATE_LIMITED, "rate limited")
            return False
        request_id = getattr(item, "request_id", None)
        self._reply(Error(ErrorCode.RATE_LIMITED, "too many messages; slow down", request_id))
        return False

    def _refresh(self, command: Refresh) -> None:
        if self.authenticator is None or self.authenticator.mode == "none":
            self._reply(Refreshed(command.request_id, None))
            return
        try:
            identity = self.authenticator.verify(command.token)
        except AuthError as exc:
            self.counters.auth_failures += 1
            LOGGER.warning(
                "refresh refused for %s: %s",
                self.info.id,
                exc,
                extra={
                    "event": "auth_failure",
                    "client": self.info.id,
                    "remote": self.info.remote,
                    "reason": str(exc),
                },
            )
            self._reply(Error(ErrorCode.UNAUTHORIZED, str(exc), command.request_id))
            return
        if (identity.user, identity.tenant) != (self.identity.user, self.identity.tenant):
            self._reply(
                Error(ErrorCode.UNAUTHORIZED, "the token is for another user", command.request_id)
            )
            return
        self.identity = identity
        self._reply(Refreshed(command.request_id, identity.expires_at))
        # A narrower token ends the subscriptions it no longer allows.
        for topic in sorted(self.subscriber.topics):
            if not identity.subscribe.allows(topic):
                self.broker.unsubscribe(self.subscriber, topic)
                self.acked.pop(topic, None)
                self._reply(Unsubscribed(topic, None))

    async def _subscribe(self, command: Subscribe) -> None:
        if self._refused("subscribe", command.topic, command.request_id):
            return
        try:
            # With a backplane, waits until this node follows the topic; then
            # no await until the replay is queued.
            await self.broker.prepare(command.topic, self.identity.tenant)
            result = self.broker.subscribe(
                self.subscriber, command.topic, since=command.since, epoch=command.epoch
            )
        except BrokerError as exc:
            self._reply(Error(exc.code, exc.message, command.request_id, command.topic))
            return
        # No await from here on: the replay must be queued before the next
        # fan-out can put a live event behind it.
        self._reply(
            Subscribed(
                command.topic,
                command.request_id,
                result.position,
                result.recovered,
                len(result.replay),
            )
        )
        encode = self.subscriber.encode
        for event in result.replay:
            self.outbox.put(encode(event))

    def _ack(self, command: Ack) -> None:
        if command.topic not in self.subscriber.topics:
            self._reply(self._not_subscribed(command.topic, command.request_id))
            return
        position = self.broker.position(command.topic, self.identity.tenant)
        head = position.seq if position is not None else 0
        if command.seq > head:
            self._reply(
                Error(
                    ErrorCode.INVALID_FIELD,
                    f"seq {command.seq} is beyond the topic's last offset {head}",
                    command.request_id,
                    command.topic,
                )
            )
            return
        self.acked[command.topic] = command.seq
        if command.request_id is not None:
            self._reply(Acked(command.topic, command.request_id, command.seq))

    def _publish_reply(self, command: Publish) -> Callable[[Position | BrokerError], None]:
        def on_done(result: Position | BrokerError) -> None:
            if isinstance(result, BrokerError):
                self._reply(Error(result.code, result.message, command.request_id, command.topic))
            else:
                self._reply(Published(command.topic, command.request_id, result))

        return on_done

    async def _request(self, command: Request) -> None:
        if self._refused("request", command.topic, command.request_id):
            return
        handler = self.handlers.get(command.topic)
        if handler is None:
            self._reply(
                Error(
                    ErrorCode.NOT_FOUND,
                    f"no request handler for topic {command.topic!r}",
                    command.request_id,
                    command.topic,
                )
            )
            return
        if self._requests is None:
            self._requests = trio.Semaphore(self.limits.max_pending_requests)
        await self._requests.acquire()  # at most max_pending_requests in flight
        assert self._nursery is not None
        self._nursery.start_soon(self._answer, handler, command)

    async def _answer(self, handler: RequestHandler, command: Request) -> None:
        topic, request_id = command.topic, command.request_id
        try:
            with trio.fail_after(self.limits.request_timeout):
                result = await handler(RequestContext(topic, command.payload, self.info))
            # Encoded here, inside the try: an answer JSON cannot carry is the
            # handler's failure, not the connection's.
            frame = self._frame(self.dialect.encode_reply(Answer(topic, request_id, result)))
        except trio.TooSlowError:
            frame = self._encode_error(
                ErrorCode.REQUEST_TIMEOUT,
                f"no answer within {self.limits.request_timeout:g} s",
                request_id,
                topic,
            )
        except RequestError as exc:
            frame = self._encode_error(exc.code, exc.message, request_id, topic)
        except Exception:
            LOGGER.exception("request handler for %r failed", topic)
            frame = self._encode_error(
                ErrorCode.REQUEST_FAILED, "the request handler failed", request_id, topic
            )
        finally:
            assert self._requests is not None
            self._requests.release()
        self.outbox.put(frame)

    def _encode_error(self, code: str, message: str, request_id: Any, topic: str) -> WireMessage:
        return self._frame(self.dialect.encode_reply(Error(code, message, request_id, topic)))

    def _refused(self, action: str, topic: str, request_id: Any) -> bool:
        """Whether this client may not ``action`` on ``topic``; if so, it is told why.

        The namespace must exist and allow the topic; subscribing, requests and
        presence need the token's ``topics`` claim to allow it; publishing
        follows the namespace and the token's ``publish`` claim (see
        ``docs/auth.md``).
        """
        problem = self._permission_problem(action, topic)
        if problem is None:
            return False
        code, message = problem
        self._reply(Error(code, message, request_id, topic))
        return True

    def _permission_problem(self, action: str, topic: str) -> tuple[ErrorCode, str] | None:
        namespace = self.namespaces.resolve(topic)
        if namespace is None:
            prefix = topic.partition(":")[0]
            return ErrorCode.UNKNOWN_NAMESPACE, f"namespace {prefix!r} is not configured"
        if not namespace.topics.allows(topic):
            return ErrorCode.UNKNOWN_TOPIC, f"topic {topic!r} is not served here"
        identity = self.identity
        if action == "publish":
            if may_publish(identity, namespace, topic):
                return None
            return ErrorCode.FORBIDDEN, f"publishing to {topic!r} is not allowed"
        if not identity.subscribe.allows(topic):
            return ErrorCode.FORBIDDEN, f"your token does not allow topic {topic!r}"
        if action == "presence" and not namespace.presence:
            return ErrorCode.FORBIDDEN, f"presence is off for topic {topic!r}"
        return None

    @staticmethod
    def _not_subscribed(topic: str, request_id: Any) -> Error:
        return Error(ErrorCode.NOT_SUBSCRIBED, f"not subscribed to {topic!r}", request_id, topic)

    def _reply(self, reply: Reply) -> None:
        self.outbox.put(self._frame(self.dialect.encode_reply(reply)))

    # --- application endpoints ------------------------------------------------

    async def _connected(self) -> None:
        assert self.endpoint is not None
        for hook in self.endpoint.connect_hooks:
            try:
                with trio.fail_after(self.limits.request_timeout):
                    await hook(self.session)
            except Exception:
                LOGGER.exception("connect hook of %s failed", self.endpoint.path)
                self.close(CloseCode.INTERNAL_ERROR, "connect hook failed")
                return

    def _frame_handled(self) -> None:
        assert self.endpoint is not None
        for hook in self.endpoint.frame_hooks:
            try:
                hook(self.session)
            except Exception:
                LOGGER.exception("frame hook of %s failed", self.endpoint.path)
                self.close(CloseCode.INTERNAL_ERROR, "frame hook failed")

    async def _disconnected(self, closed: CloseInfo) -> None:
        assert self.endpoint is not None
        # Shielded: a connection cancelled by shutdown still runs its hooks, briefly.
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.limits.request_timeout
            for hook in self.endpoint.disconnect_hooks:
                try:
                    await hook(self.session, closed)
                except Exception:
                    LOGGER.exception("disconnect hook of %s failed", self.endpoint.path)

    async def _app_message(self, message: AppMessage) -> None:
        handler = self.endpoint.handlers.get(message.kind) if self.endpoint else None
        if handler is None:
            self._reply(
                Error(
                    ErrorCode.UNKNOWN_TYPE,
                    f"unknown message type {message.kind[:64]!r}",
                    message.request_id,
                )
            )
            return
        try:
            with trio.fail_after(self.limits.request_timeout):
                await handler(self.session, message)
        except trio.TooSlowError:
            self._reply(
                Error(
                    ErrorCode.REQUEST_TIMEOUT,
                    f"no answer within {self.limits.request_timeout:g} s",
                    message.request_id,
                )
            )
        except RequestError as exc:
            self._reply(Error(exc.code, exc.message, message.request_id))
        except BrokerError as exc:
            self._reply(Error(exc.code, exc.message, message.request_id))
        except Exception:
            LOGGER.exception("handler for %r messages failed", message.kind)
            self._reply(Error(ErrorCode.REQUEST_FAILED, "the handler failed", message.request_id))

    def send_message(self, message: Any, *, reliable: bool) -> bool:
        """An application's own frame to this client (see :meth:`Session.send`)."""
        if self.outbox.closing is not None:
            return False
        frame = self._frame(self.dialect.encode_message(message))
        if reliable:
            self.outbox.put(frame)
            return True
        return self.outbox.offer(frame)

    async def subscribe_for_app(
        self,
        topic: str,
        since: int | None,
        epoch: str | None,
        *,
        track: bool,
        return_replay: bool = False,
    ) -> SessionSubscription:
        problem = topic_problem(topic)
        if problem is not None:
            raise BrokerError(ErrorCode.INVALID_TOPIC, problem)
        if topic in self.app_topics():
            raise BrokerError(ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {topic!r}")
        subscriber = self._tracking_subscriber() if track else self.subscriber
        await self.broker.prepare(topic, self.identity.tenant)
        result = self.broker.subscribe(subscriber, topic, since=since, epoch=epoch)
        if return_replay:
            return SessionSubscription(
                topic, result.position, result.recovered, len(result.replay), result.replay
            )
        # No await since prepare: the replay goes in before any live event.
        for event in result.replay:
            self.outbox.put(subscriber.encode(event))
        return SessionSubscription(topic, result.position, result.recovered, len(result.replay))

    @property
    def closing(self) -> bool:
        """Whether the connection is closing or has ended (sends are ignored)."""
        return self.outbox.closing is not None

    async def publish_for_app(self, topic: str, payload: Any) -> Position:
        """Publish in this client's tenant (see :meth:`Session.publish`)."""
        return await self.broker.publish(topic, payload, tenant=self.identity.tenant)

    def delivered_position(self, topic: str) -> Position | None:
        """The last event of a tracked topic written to the socket."""
        return self.delivered.get(topic)

    def permission_problem(self, action: str, topic: str) -> tuple[str, str] | None:
        problem = topic_problem(topic)
        if problem is not None:
            return ErrorCode.INVALID_TOPIC, problem
        return self._permission_problem(action, topic)

    def adopt(self, identity: Identity) -> None:
        """Take on the identity a protocol established after the upgrade.

        With subscriptions, only an identity of the same tenant (a refreshed token).
        """
        if self.app_topics() and identity.tenant != self.identity.tenant:
            raise RuntimeError("a session with subscriptions cannot change tenant")
        self.identity = identity
        self.info = attrs.evolve(self.info, user=identity.user, tenant=identity.tenant)
        self.subscriber.tenant = identity.tenant
        self.subscriber.presence = self.info
        if self._tracked is not None:
            self._tracked.tenant = identity.tenant

    def unsubscribe_for_app(self, topic: str) -> bool:
        if self._tracked is not None and self.broker.unsubscribe(self._tracked, topic):
            return True
        return self.broker.unsubscribe(self.subscriber, topic)

    def app_topics(self) -> set[str]:
        tracked = self._tracked.topics if self._tracked is not None else set()
        return self.subscriber.topics | tracked

    def _tracking_subscriber(self) -> Subscriber:
        """A second subscriber on the same outbox whose frames carry their position."""
        if self._tracked is None:
            shared = self.subscriber.encode

            def encode_marked(event: Event) -> Outgoing:
                frame: Outgoing = shared(event)
                marked: _MarkedBytes | _MarkedStr
                if isinstance(frame, bytes):
                    marked = _MarkedBytes(frame)
                elif isinstance(frame, str):
                    marked = _MarkedStr(frame)
                else:  # pragma: no cover - framers give bytes or str
                    return frame
                marked.topic, marked.position = event.topic, Position(event.seq, event.epoch)
                return marked

            self._tracked = Subscriber(
                self.outbox,
                encode_marked,
                tenant=self.identity.tenant,
                max_topics=self.limits.max_subscriptions,
                label=self.info.id,
            )
        return self._tracked

    def _note_written(self, batch: list[Outgoing]) -> None:
        """Tracked events in ``batch`` reached the socket: remember where each topic stands."""
        for item in batch:
            if isinstance(item, _MarkedBytes | _MarkedStr):
                if self.delivered is _NOTHING_DELIVERED:
                    self.delivered = {}
                self.delivered[item.topic] = item.position

    # --- writing ------------------------------------------------------------

    def _flush(self) -> None:
        """The outbox's sink: write everything queued now, without waiting."""
        if self._draining or self._ended:
            return  # the drain task will take it; or nothing is listening any more
        batch, has_close = self._next_batch()
        if not batch:
            return
        try:
            rest = self.transport.try_send(batch)
        except ConnectionLost:
            self._lose("connection lost", "client")
            return
        written = batch if self._tracked is not None else None
        if rest is not None:
            self._draining = True
            assert self._nursery is not None
            self._nursery.start_soon(self._drain, rest, has_close, written)
        else:
            if written:
                self._note_written(written)
            if has_close:
                self._close_written()

    def _next_batch(self) -> tuple[list[Outgoing], bool]:
        """What is queued, with the close frame behind it once the outbox is closing."""
        return self._with_close(self.outbox.take())

    def _with_close(self, batch: list[Outgoing]) -> tuple[list[Outgoing], bool]:
        closing = self.outbox.closing
        if closing is None or self._close_sent:
            return batch, False
        self._close_sent = True
        batch.append(self.transport.frame_control(CloseFrame(closing.code, closing.reason)))
        return batch, True

    async def _drain(
        self, rest: object, has_close: bool, written: list[Outgoing] | None = None
    ) -> None:
        """Write what the socket did not take, then everything queued meanwhile."""
        transport, timeout = self.transport, self.limits.write_timeout
        try:
            while True:
                await transport.send_rest(rest, write_timeout=timeout)
                if written:
                    self._note_written(written)
                if has_close:
                    self._close_written()
                batch, has_close = self._next_batch()
                if not batch:
                    return
                written = batch if self._tracked is not None else None
                rest = transport.try_send(batch)
                if rest is None:
                    if written:
                        self._note_written(written)
                    if has_close:
                        self._close_written()
                    return
        except WriteTimeout:
            # Half a frame may be on the wire: the connection cannot be used
            # any more, only dropped.
            self._lose("write timeout", "server")
        except ConnectionLost:
            self._lose("connection lost", "client")
        finally:
            self._draining = False
            if self._reader_done and self._nursery is not None:
                self._nursery.cancel_scope.cancel()  # _finish was waiting for this

    async def _writer(self) -> None:
        """Drain the outbox for a transport whose every write waits (ASGI)."""
        transport, timeout = self.transport, self.limits.write_timeout
        try:
            while not self._close_sent:
                batch = await self.outbox.receive_batch()
                batch, has_close = self._with_close(batch)
                if batch:
                    rest = transport.try_send(batch)
                    if rest is not None:
                        await transport.send_rest(rest, write_timeout=timeout)
                    if self._tracked is not None:
                        self._note_written(batch)
                if has_close:
                    self._close_written()
        except WriteTimeout:
            self._lose("write timeout", "server")
        except ConnectionLost:
            self._lose("connection lost", "client")

    def _close_written(self) -> None:
        """The close frame is on the wire: wait for the peer's, briefly, then end."""
        assert self._nursery is not None
        self._close_done = True
        peer = self._peer_close
        closing = self.outbox.closing
        assert closing is not None
        if self.closed is None:
            self.closed = (
                CloseInfo(peer.code, peer.reason, "client")
                if peer is not None
                else CloseInfo(closing.code, closing.reason, "server")
            )
        if self._reader_done:
            self._nursery.cancel_scope.cancel()
        else:
            self._nursery.cancel_scope.deadline = trio.current_time() + self.limits.close_timeout

    async def _finish(self) -> None:
        """The reader is done: get the close frame out, then let the connection end."""
        if self.closed is not None and self.closed.code == CloseCode.ABNORMAL:
            return  # lost: nothing can be written
        if self._close_done:
            return
        if not self._draining:
            self._flush()  # the close frame, now; or it starts a drain task
        if not self._close_done:
            # The drain or writer task ends the connection when the close frame
            # is out, within the write timeout.
            await trio.sleep_forever()

    def _lose(self, reason: str, by: str) -> None:
        """End now, without a close handshake (the connection is gone or unusable)."""
        if self.closed is None:
            self.closed = CloseInfo(CloseCode.ABNORMAL, reason, by)
        self._ended = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()


_NOTHING_DELIVERED: dict[str, Position] = {}
"""Shared by every connection that tracks nothing; never written to."""


class _MarkedBytes(bytes):
    """A framed event of a tracked subscription: it knows its topic and position."""

    topic: str
    position: Position


class _MarkedStr(str):
    """The same, for transports that take text as ``str`` (ASGI)."""

    topic: str
    position: Position
