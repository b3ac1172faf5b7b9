r"""One client connection: a nursery running its reader, writer and pinger.

::

    broker ──offer──► outbox ──receive_batch──► writer ──► transport (socket)
                        ▲  ▲                                   │
                        │  └──put (replies, pongs)── reader ◄──┘ receive
                        └─────put (pings)────────── pinger (pings, read timeout,
                                                           token expiry)

Each client's whole life is one nursery (:meth:`Connection.run`): the
**reader** (:mod:`.reader`) decodes and dispatches what the client sends
(:mod:`.commands`); the **writer** (:mod:`.writer`) is the only code that
writes to its socket, everything queued in as few writes as possible, and
the close frame last; the **pinger** (:mod:`.pinger`) keeps its deadlines.
They are joined by the outbox, a bounded channel whose send side the broker
and the reader hold and whose receive side the writer holds; request
handlers run as tasks of the same nursery. The close handshake is an
explicit state machine (:mod:`.lifecycle`); when it is over, or the socket is
lost, the nursery is cancelled and everything the client owned ends with it:
in ``finally`` the subscriber leaves every topic. No leaked task, no leaked
subscriber, by construction.
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

import attrs
import trio

from ..app import ClientInfo, CloseInfo, RequestHandler
from ..auth import Authenticator, Identity
from ..broker.broker import DEFAULT_TENANT, Broker, Subscriber
from ..broker.namespaces import Namespaces
from ..broker.outbox import Outbox
from ..errors import BrokerError, ProxyDisconnect, ProxyError
from ..protocol.codes import CloseCode, ErrorCode
from ..protocol.dialect import Dialect
from ..protocol.messages import Event, Position
from ..protocol.topics import topic_problem
from ..stats import NodeCounters
from ..transport.base import Framer, Outgoing, Transport, UpgradeRequest
from .alarms import AlarmClock
from .commands import Commands
from .endpoint import Endpoint
from .hooks import ClientHooks
from .lifecycle import Lifecycle
from .limits import ConnectionLimits, TenantSeats
from .pinger import run_pinger
from .reader import run_reader
from .session import Session, SessionSubscription
from .writer import run_writer

LOGGER = logging.getLogger("tidings.connection")

#: The names of a connection's tasks (``trio.lowlevel.Task.name``).
READER: Final = "tidings.connection.reader"
WRITER: Final = "tidings.connection.writer"
PINGER: Final = "tidings.connection.pinger"

M = TypeVar("M")


@functools.lru_cache(maxsize=64)
def wire_encoder(encode: Callable[[M], bytes], frame: Framer) -> Callable[[M], Outgoing]:
    """Encode-and-frame, one function object per (dialect, transport kind).

    Every connection with the same dialect and transport gets this same
    function, and the broker groups subscribers by it: each event is encoded
    and framed once for all of them, and each delivery is the same bytes.
    The first such function to frame an event leaves the frame on it, so a
    replay to any number of clients shares those bytes too.
    """

    def encode_and_frame(message: M) -> Outgoing:
        if isinstance(message, Event):
            cached = message.frame_for(encode_and_frame)
            if cached is not None:
                return cached  # type: ignore[no-any-return]
            framed = frame(encode(message))
            message.keep_frame(encode_and_frame, framed)
            return framed
        return frame(encode(message))

    return encode_and_frame


@functools.lru_cache(maxsize=64)
def event_encoder(
    encode: Callable[[Event], bytes], frame: Framer, namespaces: Namespaces
) -> Callable[[Event], Outgoing]:
    """:func:`wire_encoder` for events, leaving uncompressed the namespaces that say so.

    A transport that compresses gives a framer with an ``uncompressed``
    twin; where some namespace turns compression off, the encoder picks one
    per event by its topic. Still one function per (dialect, framer,
    namespaces), so still one fan-out group: each event is framed once.
    """
    compressed = wire_encoder(encode, frame)
    plain: Framer | None = getattr(frame, "uncompressed", None)
    if plain is None or all(ns.compression for ns in (namespaces.default, *namespaces.named())):
        return compressed
    uncompressed = wire_encoder(encode, plain)
    resolve = namespaces.resolve

    def encode_and_frame(event: Event) -> Outgoing:
        namespace = resolve(event.topic)
        return (
            compressed(event) if namespace is None or namespace.compression else uncompressed(event)
        )

    return encode_and_frame


@attrs.frozen(slots=True)
class ConnectionStats:
    id: str
    remote: str
    subscriptions: int
    queued: int
    queued_bytes: int
    peak_queued: int
    dropped: int
    acked: dict[str, int]
    """Last offset the client acknowledged, per topic."""


class Connection(Commands):
    """A client connection from upgrade to close. Created and run by the server."""

    # Slots: one of these lives for every connected client.
    __slots__ = (
        "_alarms",
        "_connect_by",
        "_frame",
        "_nursery",
        "_on_end",
        "_peer_closed",
        "_seats",
        "_session",
        "_tracked",
        "authenticator",
        "broker",
        "counters",
        "delivered",
        "dialect",
        "endpoint",
        "handlers",
        "hooks",
        "info",
        "lifecycle",
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
        alarms: AlarmClock,
        identity: Identity | None = None,
        namespaces: Namespaces | None = None,
        authenticator: Authenticator | None = None,
        counters: NodeCounters | None = None,
        endpoint: Endpoint | None = None,
        seats: TenantSeats | None = None,
        hooks: ClientHooks | None = None,
        client_id: str | None = None,
        on_end: Callable[[Connection, CloseInfo], None] | None = None,
    ) -> None:
        self.transport = transport
        self._on_end = on_end
        self.dialect = dialect
        self.broker = broker
        self.limits = limits
        self.handlers = handlers
        self.identity = identity or Identity(DEFAULT_TENANT)
        self.namespaces = namespaces or broker.namespaces
        self.authenticator = authenticator
        self.counters = counters or NodeCounters()
        self.info = ClientInfo(
            # Made before the connection when a hook had to be told it (connect).
            id=client_id or new_client_id(),
            remote=transport.remote,
            connected_at=time.time(),
            dialect=dialect.name,
            path=request.path,
            user=self.identity.user,
            tenant=self.identity.tenant,
        )
        self.outbox: Outbox[Outgoing] = Outbox(
            limits.outbox_size,
            limits.overflow_policy,
            max_bytes=limits.max_queued_bytes,
            size=len,  # type: ignore[arg-type]  # frames are bytes or str
        )
        if endpoint is not None and endpoint.lossless:
            self.outbox.lossless = True
        self.outbox.close_grace = limits.close_timeout
        self._frame = transport.framer(dialect.text)
        self.subscriber = Subscriber(
            self.outbox,
            event_encoder(dialect.encode_event, self._frame, self.namespaces),
            tenant=self.identity.tenant,
            max_topics=limits.max_subscriptions,
            label=self.info.id,
            presence=self.info,
            encode_presence=wire_encoder(dialect.encode_presence, self._frame),
        )
        self.acked: dict[str, int] = _NOTHING_ACKED  # a dict of its own once used
        """Last offset the client acknowledged, per topic."""
        self.endpoint = endpoint
        self.hooks = hooks
        """The application's hooks (docs/proxy.md), on nodes that have any."""
        # Kept only for application endpoints, whose hooks read parameters from
        # it (usually empty: the same interned string for every connection).
        applied = endpoint is not None and bool(
            endpoint.handlers or endpoint.connect_hooks or endpoint.disconnect_hooks
        )
        self.query = request.query if applied else ""
        self.lifecycle = Lifecycle()
        self._alarms = alarms
        self._seats = seats  # the tenant's seat this connection holds (taken by the server)
        self._session: Session | None = None  # made when an application first needs it
        self.delivered: dict[str, Position] = _NOTHING_DELIVERED  # a dict of its own once used
        """Per tracked topic, the last event written to the socket."""
        self._tracked: Subscriber | None = None  # subscriptions an application tracks
        # Protocols that authenticate after the upgrade must do so by this time.
        self._connect_by: float | None = None
        if endpoint is not None and endpoint.authenticates_after_upgrade:
            self._connect_by = trio.current_time() + limits.connect_timeout
        self._peer_closed: trio.Event | None = None  # made when the writer waits for it
        self._requests: trio.Semaphore | None = None  # made on the first request
        self._nursery: trio.Nursery | None = None

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def session(self) -> Session:
        """This connection as the endpoint's application handlers see it."""
        if self._session is None:
            self._session = Session(self)
        return self._session

    @property
    def closed(self) -> CloseInfo | None:
        """How the connection ended (or is ending); None while it is open."""
        return None if self.lifecycle.open else self.lifecycle.info

    def statistics(self) -> ConnectionStats:
        return ConnectionStats(
            id=self.info.id,
            remote=self.info.remote,
            subscriptions=len(self.subscriber.topics),
            queued=len(self.outbox),
            queued_bytes=self.outbox.queued_bytes,
            peak_queued=self.outbox.peak,
            dropped=self.outbox.dropped,
            acked=dict(self.acked),
        )

    # --- the nursery -------------------------------------------------------------------

    async def run(self) -> CloseInfo:
        """Serve the client until the connection ends; returns how it ended."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.endpoint is not None and self.endpoint.connect_hooks:
                    await self._connected()
                # Named by constants: a name per task would be a string per client.
                nursery.start_soon(run_reader, self, name=READER)
                nursery.start_soon(run_writer, self, name=WRITER)
                nursery.start_soon(run_pinger, self, self._alarms, name=PINGER)
        finally:
            self.lifecycle.lost("cancelled", "server")  # no-op if it ended properly
            self.outbox.close(CloseCode.ABNORMAL, "connection ended", flush=False)
            self.broker.detach(self.subscriber)
            if self._tracked is not None:
                self.broker.detach(self._tracked)
            closed = self.lifecycle.info
            try:
                with trio.CancelScope(shield=True):
                    await self.transport.aclose()
                if self.endpoint is not None and self.endpoint.disconnect_hooks:
                    await self._disconnected(closed)
            finally:
                if self._on_end is not None:
                    self._on_end(self, closed)
        return closed

    def end(self) -> None:
        """The connection is over: cancel its nursery (the pinger, request handlers)."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # --- closing -----------------------------------------------------------------------

    def close(self, code: int, reason: str, *, flush: bool = True) -> None:
        """Ask the connection to end with ``code``; returns at once.

        With ``flush``, what is already queued is written before the close frame.
        """
        self.lifecycle.close(code, reason, flush=flush)
        self.outbox.close(code, reason, flush=flush)

    def peer_closed(self, code: int, reason: str) -> None:
        """The reader saw the peer's close frame: answer it (the writer does)."""
        self.lifecycle.peer_closed(code, reason)
        code, reason = self.lifecycle.close_frame
        self.outbox.close(code, reason, flush=False)
        if self._peer_closed is not None:
            self._peer_closed.set()

    async def wait_peer_closed(self) -> None:
        """Return once the reader has seen the peer's close frame."""
        if self._peer_closed is None:
            self._peer_closed = trio.Event()
        await self._peer_closed.wait()

    def lose(self, reason: str, by: str) -> None:
        """The socket is gone: no close handshake, end now."""
        self.lifecycle.lost(reason, by)
        self.end()

    # --- what the tasks ask of it ----------------------------------------------------

    @property
    def app_ping(self) -> Outgoing | None:
        ping = self.endpoint.app_ping if self.endpoint is not None else None
        return None if ping is None else self._frame(ping)

    @property
    def connect_deadline(self) -> float | None:
        return self._connect_by

    @property
    def connect_timeout_code(self) -> int:
        return self.endpoint.connect_timeout_code if self.endpoint is not None else 1008

    @property
    def refresh_due_in(self) -> float | None:
        """Seconds until the refresh hook should extend the session (0: now), if ever."""
        hooks = self.hooks
        expires = self.identity.expires_at
        if hooks is None or expires is None or hooks.refreshing or not hooks.hooks.refreshes:
            return None
        now = time.time()
        # Not sooner than refresh_retry after the last call: a backend that extends
        # a session by less than refresh_lead is not asked again at once.
        return max(expires - hooks.hooks.refresh_lead - now, hooks.refresh_after - now, 0.0)

    def refresh_session(self) -> None:
        """Ask the refresh hook, in a task of the connection's nursery (the pinger goes on)."""
        hooks = self.hooks
        if hooks is None or hooks.refreshing or self._nursery is None or self.closing:
            return
        hooks.refreshing = True
        self._nursery.start_soon(self._refresh_session, hooks)

    async def _refresh_session(self, hooks: ClientHooks) -> None:
        try:
            # While the backend cannot say, ask again; the pinger still closes the
            # connection (4002) when the session's expiry comes first.
            while not self.closing and self.identity.expires_at is not None:
                try:
                    refreshed = await hooks.hooks.refresh(self.info, hooks.origin)
                    hooks.refresh_after = time.time() + hooks.hooks.refresh_retry
                except ProxyDisconnect as exc:
                    self.close(exc.close_code, exc.reason)
                    return
                except ProxyError:
                    await trio.sleep(hooks.hooks.refresh_retry)
                    continue
                if refreshed.expired:
                    LOGGER.info("closing %s: the refresh hook ended its session", self.info.id)
                    self.close(CloseCode.TOKEN_EXPIRED, "session expired", flush=False)
                    return
                self.identity = attrs.evolve(self.identity, expires_at=refreshed.expires_at)
                return
        finally:
            hooks.refreshing = False

    @property
    def alarms(self) -> AlarmClock:
        return self._alarms

    @property
    def tracks_positions(self) -> bool:
        return self._tracked is not None

    def note_written(self, batch: list[Outgoing]) -> None:
        """Tracked events in ``batch`` reached the socket: remember where each topic stands."""
        for item in batch:
            if isinstance(item, _MarkedBytes | _MarkedStr):
                if self.delivered is _NOTHING_DELIVERED:
                    self.delivered = {}
                self.delivered[item.topic] = item.position

    def frame_handled(self) -> None:
        """The commands of one incoming message were handled: the endpoint's hooks."""
        assert self.endpoint is not None
        for hook in self.endpoint.frame_hooks:
            try:
                hook(self.session)
            except Exception:
                LOGGER.exception("frame hook of %s failed", self.endpoint.path)
                self.close(CloseCode.INTERNAL_ERROR, "frame hook failed")

    # --- application endpoints (what a Session asks) ----------------------------------

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

    @property
    def closing(self) -> bool:
        """Whether the connection is closing or has ended (sends are ignored)."""
        return self.outbox.closing is not None

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
        replay = result.replay
        if return_replay:
            # The protocol carries the replay in its reply: bounded at the source.
            # More than the limit is not recovered at all (never a partial success).
            limit = self.limits.history_max_reply
            if limit and len(replay) > limit:
                return SessionSubscription(topic, result.position, False, 0, [])
            events = replay.events()
            recovered = result.recovered
            return SessionSubscription(topic, result.position, recovered, len(events), events)
        # No await since prepare: the replay goes in before any live event.
        replay.queue(self.outbox, subscriber.encode)
        return SessionSubscription(topic, result.position, result.recovered, len(replay))

    async def publish_for_app(self, topic: str, payload: Any) -> Position:
        """Publish in this client's tenant (see :meth:`Session.publish`)."""
        return await self.broker.publish(topic, payload, tenant=self.identity.tenant, trusted=False)

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
        if identity.tenant != self.identity.tenant:
            if self.app_topics():
                raise RuntimeError("a session with subscriptions cannot change tenant")
            if self._seats is not None and not self._seats.move(
                self.identity.tenant, identity.tenant
            ):
                raise BrokerError(
                    ErrorCode.TOO_MANY_CONNECTIONS,
                    f"tenant {identity.tenant!r} holds its limit of connections",
                )
        self.identity = identity
        self._connect_by = None
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


def new_client_id() -> str:
    """A client id: unique within a process, for the logs, the API and presence."""
    return secrets.token_hex(6)


_NOTHING_DELIVERED: dict[str, Position] = {}
"""Shared by every connection that tracks nothing; never written to."""
_NOTHING_ACKED: dict[str, int] = {}
"""Shared by every connection that acknowledged nothing; never written to."""


class _MarkedBytes(bytes):
    """A framed event of a tracked subscription: it knows its topic and position."""

    topic: str
    position: Position


class _MarkedStr(str):
    """The same, for transports that take text as ``str`` (ASGI)."""

    topic: str
    position: Position
