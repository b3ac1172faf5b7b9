"""The node: a broker, the connections, and the transport that accepts them.

:class:`Server` is the core of a tidings node and imports nothing above it:
the HTTP API, the metrics, the Centrifugo endpoint and the demo are put
around it by :func:`tidings.server.open_server`, the one way in for the CLI
and for applications alike::

    async with tidings.open_server(Config(port=8800)) as server:
        await server.publish("deploys", {"step": "build"})
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from fnmatch import fnmatchcase
from typing import Any, Final, Protocol, TypeAlias, TypeVar, overload
from urllib.parse import urlsplit

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .._version import __version__
from ..app import ClientInfo, CloseInfo, RequestHandler
from ..auth import Authenticator, Identity, token_of
from ..backplane.redis import RedisBackplane
from ..broker.broker import Broker, BrokerStats, Subscriber
from ..broker.idempotency import IdempotencyWindow
from ..broker.outbox import Outbox, OverflowPolicy
from ..broker.subscription import Subscription, as_event
from ..config import PROXY_HOOKS, Config
from ..connection.alarms import AlarmClock
from ..connection.connection import Connection, ConnectionStats, new_client_id
from ..connection.endpoint import Endpoint
from ..connection.hooks import ClientHooks
from ..connection.limits import ConnectionLimits, TenantSeats
from ..errors import AuthError, ProxyDisconnect, ProxyError
from ..protocol.codes import CloseCode, ErrorCode
from ..protocol.idempotency import idempotency_key_problem
from ..protocol.messages import Event, Position
from ..protocol.native import NativeDialect
from ..protocol.topics import topic_problem
from ..stats import NodeCounters
from ..transport.asgi import AsgiApp, Receive, Scope, Send
from ..transport.base import Admission, Rejection, Transport, UpgradeRequest
from ..transport.builtin import BuiltinServer
from ..transport.sse import NDJSON, SSE
from .proxy import Proxy, Unavailable
from .streams import StreamEndpoint, StreamPlan

LOGGER = logging.getLogger("tidings.server")

H = TypeVar("H", bound=RequestHandler)

EndpointSource: TypeAlias = "Endpoint | Callable[[Server], Endpoint]"
"""An endpoint, or a function of the server that makes one (its handlers then
hold the server, to publish or ask the cluster)."""

SHUTDOWN_REASON: Final = "server shutting down"
#: Pending connections the kernel queues per listener. hypercorn's default of 100
#: overflowed (connection resets) while 10,000 clients connected at once.
LISTEN_BACKLOG: Final = 4096


HttpHandler: TypeAlias = Callable[[Any], Awaitable[Any]]
"""An application's JSON route (see :meth:`Server.http_route`)."""


class HttpSide(Protocol):
    """The plain-HTTP side of the node (``/health``, the API, the application's
    routes), as an ASGI app with a routing table; put in by the composition root."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None: ...

    def add_route(self, path: str, handler: HttpHandler, methods: tuple[str, ...]) -> None: ...


@attrs.frozen(slots=True)
class ServerStats:
    """A snapshot of a node's counters."""

    uptime: float
    connections: int
    topics: int
    subscriptions: int
    published: int
    delivered: int
    dropped: int
    inbox_depth: int


def authenticator(config: Config) -> Authenticator:
    """The authenticator a node with ``config`` checks clients' tokens with."""
    return Authenticator(
        config.auth_mode,
        default_tenant=config.default_tenant,
        token=config.token,
        jwt_secret=config.jwt_secret,
        jwt_public_key=config.jwt_public_key,
        audience=config.jwt_audience,
        issuer=config.jwt_issuer,
    )


class Server:
    """A running tidings node. Get one from :func:`open_server`; do not construct it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.node_id = config.node_id or f"{socket.gethostname()}-{os.getpid()}"
        self.namespaces = config.build_namespaces()
        self.broker = Broker(
            namespaces=self.namespaces,
            max_topics=config.max_topics,
            inbox_size=config.inbox_size,
            tenant_max_topics=config.tenant_max_topics,
            history_node_bytes=config.history_node_bytes,
            tenant_history_bytes=config.tenant_history_bytes,
            idempotency=IdempotencyWindow(
                config.idempotency_window,
                config.idempotency_max_keys,
                config.idempotency_max_bytes,
            ),
        )
        self._questions: dict[str, Callable[[dict[str, Any]], Any]] = {}
        """Cluster-wide questions added by :meth:`answer`, by name."""
        self.backplane: RedisBackplane | None = None
        """The Redis backplane, when ``config.backplane`` names one."""
        if config.backplane != "memory":
            self.backplane = RedisBackplane(
                config.backplane,
                self.broker,
                node_id=self.node_id,
                timeout=config.backplane_timeout,
                buffer=config.backplane_buffer,
                max_lag=config.backplane_max_lag,
                durability=config.backplane_durability,
                answer=self._answer,
                node_stats=self.node_stats,
            )
            self.broker.attach(self.backplane)
        self.authenticator = authenticator(config)
        self.proxy: Proxy | None = None
        """The application's hooks (``[proxy]``, docs/proxy.md), when any is configured."""
        if any(getattr(config, f"proxy_{hook}") for hook in PROXY_HOOKS):
            self.proxy = Proxy(config)
        self._limits = ConnectionLimits.from_config(config)
        self._limits_by_path: dict[str, ConnectionLimits] = {}
        self.dialect = NativeDialect()
        self.endpoints: dict[str, Endpoint] = {
            config.ws_path: Endpoint(config.ws_path, self.dialect)
        }
        """WebSocket endpoints by path: the native one at ``ws_path``, Centrifugo's
        protocol at ``centrifugo_path``, and the application's."""
        self.counters = NodeCounters()
        self.alarms = AlarmClock()
        """Wakes every connection's pinger at its deadline (one task for the node)."""
        self.seats = TenantSeats(config.tenant_max_connections)
        """Connections per tenant."""
        self.builtin: BuiltinServer | None = None
        """The built-in transport, while it listens."""
        self.addresses: list[tuple[str, int]] = []
        """Where the server listens, once it does: ``[(host, port), ...]``."""
        self._origins = OriginPolicy(config.allowed_origins)
        self._handlers: dict[str, RequestHandler] = {}
        self._connections: dict[str, Connection] = {}
        max_topics = min(config.stream_max_topics, config.max_subscriptions)
        self.streams: dict[str, StreamEndpoint] = {
            path: StreamEndpoint(
                path,
                kind,
                retry=config.sse_retry,
                max_topics=max_topics,
                connection_of=self._connections.get,
            )
            for path, kind in ((config.sse_path, SSE), (config.stream_path, NDJSON))
            if path
        }
        """HTTP stream endpoints by path: Server-Sent Events at ``sse_path``,
        newline-delimited JSON at ``stream_path``."""
        self._per_host: dict[str, int] = {}
        self._admitted = 0  # upgrades admitted and not yet serving: they hold a slot too
        self._on_connect: list[Callable[[ClientInfo], None]] = []
        self._on_disconnect: list[Callable[[ClientInfo, CloseInfo], None]] = []
        self._started = time.monotonic()
        self._draining = False
        self._drained = trio.Event()
        self._stop_listening = trio.CancelScope()
        self._stop_hypercorn = trio.Event()
        self.http: HttpSide | None = None
        """Plain HTTP (``/health``, the API, routes); set by :func:`tidings.server.open_server`."""
        self.asgi_app = AsgiApp(self, self._serve_http)
        """This server's endpoints as an ASGI app, to mount in a larger application."""

    # --- addresses ----------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port the server listens on (useful with ``port=0``)."""
        if not self.addresses:
            raise RuntimeError("the server is not listening")
        return self.addresses[0][1]

    @property
    def url(self) -> str:
        """The WebSocket URL clients connect to, e.g. ``ws://127.0.0.1:8800/ws``."""
        host = self.addresses[0][0] if self.addresses else self.config.host
        host = f"[{host}]" if ":" in host else host
        return f"ws://{host}:{self.port}{self.config.ws_path}"

    # --- publishing -----------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        payload: Any,
        *,
        tenant: str | None = None,
        idempotency_key: str | None = None,
    ) -> Position:
        """Publish an event; returns its position (``seq`` and ``epoch``) once sequenced.

        Waits only while the broker's inbox is full. ``tenant`` defaults to the
        configured default tenant. An ``idempotency_key`` seen for the topic
        within ``idempotency_window`` returns the first publication's position
        and publishes nothing.

        Raises:
            ValueError: ``topic`` or ``idempotency_key`` is not valid.
            TypeError: ``payload`` is not JSON-serializable.
            tidings.BrokerError: an unknown namespace, the node's limit of topics,
                or ``idempotency_conflict`` (the key was used with another payload).
        """
        _check_topic(topic)
        _check_idempotency_key(idempotency_key)
        return await self.broker.publish(
            topic, payload, tenant=self._tenant(tenant), idempotency_key=idempotency_key
        )

    def publish_nowait(self, topic: str, payload: Any, *, tenant: str | None = None) -> None:
        """Queue an event without waiting (for code that cannot await).

        Raises:
            trio.WouldBlock: the broker's inbox is full; the event was not queued.
            ValueError, TypeError: as for :meth:`publish`.
        """
        _check_topic(topic)
        self.broker.submit_nowait(topic, payload, tenant=self._tenant(tenant))

    def _tenant(self, tenant: str | None) -> str:
        return self.config.default_tenant if tenant is None else tenant

    # --- in-process subscriptions ------------------------------------------------------

    @asynccontextmanager
    async def subscribe(
        self,
        topic: str,
        *,
        since: int | None = None,
        epoch: str | None = None,
        buffer: int | None = None,
        tenant: str | None = None,
    ) -> AsyncIterator[Subscription]:
        """Receive a topic's events in this process, without a socket.

        ``since``/``epoch`` resume from history as for a WebSocket client.
        ``buffer`` (default ``outbox_size``) bounds the events held for a
        consumer that falls behind; beyond it events are dropped and counted.

        Usage::

            async with server.subscribe("deploys") as events:
                async for event in events:
                    print(event.seq, event.payload)
        """
        _check_topic(topic)
        outbox: Outbox[Event] = Outbox(buffer or self.config.outbox_size, OverflowPolicy.DROP)
        subscriber = Subscriber(
            outbox, as_event, tenant=self._tenant(tenant), label=f"in-process:{topic}"
        )
        await self.broker.prepare(topic, subscriber.tenant)
        result = self.broker.subscribe(subscriber, topic, since=since, epoch=epoch, trusted=True)
        # In-process: the events themselves, shared with history (no copies).
        for event in result.replay.events():
            outbox.put(event)
        try:
            yield Subscription(topic, outbox, result.position, result.recovered)
        finally:
            self.broker.unsubscribe(subscriber, topic)
            outbox.close(CloseCode.NORMAL, "unsubscribed")

    # --- application hooks -------------------------------------------------------

    @overload
    def on_request(self, topic: str) -> Callable[[H], H]: ...
    @overload
    def on_request(self, topic: str, handler: H) -> H: ...

    def on_request(self, topic: str, handler: H | None = None) -> H | Callable[[H], H]:
        """Answer clients' ``request`` messages on ``topic`` with ``handler``.

        Use it as a call, ``server.on_request("personas", list_personas)``, or a
        decorator, ``@server.on_request("personas")``. The handler receives a
        :class:`~tidings.RequestContext` and returns the JSON-serializable answer;
        it may raise :class:`~tidings.RequestError` to answer with an error.
        """
        _check_topic(topic)

        def register(fn: H) -> H:
            self._handlers[topic] = fn
            return fn

        return register if handler is None else register(handler)

    def on_connect(self, hook: Callable[[ClientInfo], None]) -> Callable[[ClientInfo], None]:
        """Call ``hook(client)`` for each new WebSocket client (usable as a decorator)."""
        self._on_connect.append(hook)
        return hook

    def on_disconnect(
        self, hook: Callable[[ClientInfo, CloseInfo], None]
    ) -> Callable[[ClientInfo, CloseInfo], None]:
        """Call ``hook(client, close)`` when a client's connection has ended."""
        self._on_disconnect.append(hook)
        return hook

    # --- endpoints ------------------------------------------------------------------

    def add_endpoint(self, endpoint: Endpoint) -> Endpoint:
        """Serve ``endpoint`` at its path (replacing what was there, the native one included).

        Raises:
            TypeError: ``endpoint.limits`` names no connection limit.
        """
        if endpoint.limits:
            self._limits_by_path[endpoint.path] = attrs.evolve(self._limits, **endpoint.limits)
        else:
            self._limits_by_path.pop(endpoint.path, None)
        self.endpoints[endpoint.path] = endpoint
        return endpoint

    def http_route(
        self, path: str, *, methods: tuple[str, ...] = ("POST",)
    ) -> Callable[[HttpHandler], HttpHandler]:
        """Register ``async def handler(request: HttpRequest)`` for plain HTTP at ``path``.

        The handler's return value is the JSON answer (200), or ``(status,
        answer)``, or a :class:`~tidings.HttpResponse` for anything that is not
        JSON (a page); raise :class:`~tidings.HttpError` for an error in the
        API's shape. Served beside ``/health`` and ``/api/`` by the built-in
        transport and the ASGI app alike. For a backend that triggers work in
        an application protocol over HTTP (a deploy, a message to an agent).

        Raises:
            ValueError: a path tidings answers itself, or a WebSocket endpoint.
        """

        def register(handler: HttpHandler) -> HttpHandler:
            if self.http is None:
                raise RuntimeError("this server serves no plain HTTP (open it with open_server)")
            self.http.add_route(path, handler, methods)
            return handler

        return register

    def accepts(self, path: str) -> bool:
        return path in self.endpoints

    def stream_kind(self, path: str) -> str | None:
        stream = self.streams.get(path)
        return None if stream is None else stream.kind

    def allows_origin(self, origin: str | None) -> bool:
        return self._origins.allows(origin)

    def request_handler(self, topic: str) -> RequestHandler | None:
        """The handler :meth:`on_request` registered for ``topic``, if any."""
        return self._handlers.get(topic)

    async def _serve_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.http is None:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await self.http(scope, receive, send)

    def _endpoint_limits(self, endpoint: Endpoint) -> ConnectionLimits:
        """The server's connection limits, with the endpoint's own in their place."""
        return self._limits_by_path.get(endpoint.path, self._limits)

    # --- clients ------------------------------------------------------------------

    def clients(self) -> list[ClientInfo]:
        """The WebSocket clients connected now."""
        return [connection.info for connection in self._connections.values()]

    def client_statistics(self, client_id: str) -> ConnectionStats | None:
        connection = self._connections.get(client_id)
        return None if connection is None else connection.statistics()

    def client_topics(self, client_id: str) -> list[str] | None:
        """The topics a client is subscribed to now, sorted (None: no such client)."""
        connection = self._connections.get(client_id)
        return None if connection is None else sorted(connection.subscriber.topics)

    def disconnect(self, client_id: str, code: int = CloseCode.NORMAL, reason: str = "") -> bool:
        """Close one client's connection with ``code``; False if no such client."""
        connection = self._connections.get(client_id)
        if connection is None:
            return False
        connection.close(code, reason)
        return True

    def disconnect_user(
        self,
        user: str,
        code: int = CloseCode.NORMAL,
        reason: str = "",
        *,
        tenant: str | None = None,
    ) -> int:
        """Close every connection of ``user`` (in ``tenant``); returns how many."""
        tenant = self._tenant(tenant)
        closed = 0
        for connection in list(self._connections.values()):
            if connection.info.user == user and connection.info.tenant == tenant:
                connection.close(code, reason)
                closed += 1
        return closed

    def presence(self, topic: str, *, tenant: str | None = None) -> list[ClientInfo]:
        """Who on this node is subscribed to ``topic``."""
        return self.broker.presence(topic, self._tenant(tenant))

    # --- the whole cluster (this node alone without a backplane) ---------------------

    async def history(
        self, topic: str, since: int = 0, limit: int | None = None, *, tenant: str | None = None
    ) -> tuple[list[Event], Position | None]:
        """A topic's retained events after offset ``since``, and where it stands.

        Raises:
            BrokerError: ``unavailable`` when the backplane cannot be reached.
        """
        tenant = self._tenant(tenant)
        namespace = self.namespaces.resolve(topic)
        if self.backplane is None or namespace is None or namespace.local:
            return self.broker.history(topic, since, limit, tenant)
        return await self.backplane.history(tenant, topic, since, limit)

    async def presence_everywhere(
        self, topic: str, *, tenant: str | None = None
    ) -> list[ClientInfo]:
        """Who is subscribed to ``topic`` on every node (this one alone without a backplane)."""
        return await self.broker.presence_everywhere(topic, self._tenant(tenant))

    async def channels(
        self, *, tenant: str | None = None, pattern: str | None = None
    ) -> dict[str, int]:
        """Topics with subscribers (matching a shell-style ``pattern``) and how many, everywhere."""
        body = {"tenant": self._tenant(tenant), "pattern": pattern}
        if self.backplane is None:
            answer: dict[str, int] = self._answer("channels", body)
            return answer
        answers, _missing = await self.backplane.ask("channels", body)
        totals: dict[str, int] = {}
        for counts in answers.values():
            for name, count in (counts or {}).items():
                totals[name] = totals.get(name, 0) + int(count)
        return totals

    async def disconnect_everywhere(
        self,
        *,
        client: str | None = None,
        user: str | None = None,
        code: int = CloseCode.NORMAL,
        reason: str = "",
        tenant: str | None = None,
    ) -> int:
        """Close a client, or every connection of a user, on whichever node; returns how many."""
        body = {
            "client": client,
            "user": user,
            "code": code,
            "reason": reason,
            "tenant": self._tenant(tenant),
        }
        if self.backplane is None:
            closed: int = self._answer("disconnect", body)
            return closed
        answers, _missing = await self.backplane.ask("disconnect", body)
        return sum(int(count or 0) for count in answers.values())

    def answer(self, op: str, handler: Callable[[dict[str, Any]], Any]) -> None:
        """Answer the cluster-wide question ``op`` on this node with ``handler(body)``.

        The handler runs on every node that is asked (this one included) and
        returns a JSON-serializable value; :meth:`ask` gathers them. The
        questions the core answers itself cannot be replaced.

        Raises:
            ValueError: ``op`` is one of the core's questions.
        """
        if op in _CORE_QUESTIONS:
            raise ValueError(f"{op!r} is answered by the core")
        self._questions[op] = handler

    async def ask(self, op: str, body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Ask every node ``op`` (see :meth:`answer`): the answers by node id, and the
        nodes that did not answer in time. Without a backplane, this node alone."""
        if self.backplane is None:
            return {self.node_id: self._answer(op, body)}, []
        return await self.backplane.ask(op, body)

    async def nodes(self) -> list[dict[str, Any]]:
        """Every live node's id and counters (this node alone without a backplane)."""
        if self.backplane is None:
            return [{"node": self.node_id, **self.node_stats()}]
        return await self.backplane.nodes()

    def _answer(self, op: str, body: dict[str, Any]) -> Any:
        """This node's part of a cluster-wide question."""
        added = self._questions.get(op)
        if added is not None:
            return added(body)
        tenant = str(body.get("tenant") or self.config.default_tenant)
        if op == "presence":
            return [
                attrs.asdict(info) for info in self.broker.presence(str(body.get("topic")), tenant)
            ]
        if op == "channels":
            pattern = body.get("pattern")
            return {
                stats.name: stats.subscribers
                for stats in self.broker.topics(tenant)
                if stats.subscribers
                and (not isinstance(pattern, str) or fnmatchcase(stats.name, pattern))
            }
        if op == "disconnect":
            code, reason = int(body.get("code") or CloseCode.NORMAL), str(body.get("reason") or "")
            client = body.get("client")
            if isinstance(client, str):
                connection = self._connections.get(client)
                if connection is None or connection.info.tenant != tenant:
                    return 0
                connection.close(code, reason)
                return 1
            return self.disconnect_user(str(body.get("user")), code, reason, tenant=tenant)
        return None

    def node_stats(self) -> dict[str, Any]:
        """This node's counters as ``info`` and the node registry show them."""
        stats = self.statistics()
        return {
            "uptime": round(stats.uptime, 3),
            "connections": stats.connections,
            "topics": stats.topics,
            "subscriptions": stats.subscriptions,
            "published": stats.published,
            "delivered": stats.delivered,
            "dropped": stats.dropped,
        }

    def statistics(self) -> ServerStats:
        broker: BrokerStats = self.broker.statistics()
        return ServerStats(
            uptime=time.monotonic() - self._started,
            connections=len(self._connections),
            topics=broker.topics,
            subscriptions=broker.subscriptions,
            # With a backplane the broker sees every event of the topics followed
            # here; the events published through this node are what Redis sequenced.
            published=broker.published if self.backplane is None else self.backplane.sequenced,
            delivered=broker.delivered,
            dropped=broker.dropped,
            inbox_depth=broker.inbox_depth,
        )

    # --- running ---------------------------------------------------------------------

    @asynccontextmanager
    async def running(self, *, listen: bool = True) -> AsyncIterator[trio.Nursery]:
        """Run the node's tasks (and listen) for the duration of the block.

        Yields the node's nursery, for services that live as long as the node
        (the demo). Leaving the block shuts down gracefully: clients are
        closed with 1001 after their queues drain.
        """
        async with trio.open_nursery() as nursery:
            await nursery.start(self.broker.run)
            if self.backplane is not None:
                await nursery.start(self.backplane.run)
            await nursery.start(self.alarms.run)
            # The hooks' HTTP client outlives every connection (their calls end first).
            async with self._hooks_running(), trio.open_nursery() as connections:
                if listen:
                    await self._listen(nursery, connections)
                try:
                    yield nursery
                finally:
                    with trio.CancelScope(shield=True):
                        await self.shutdown()
                        if self.backplane is not None:
                            await self.backplane.forget_self()
                    connections.cancel_scope.cancel()
            nursery.cancel_scope.cancel()

    @asynccontextmanager
    async def _hooks_running(self) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            if self.proxy is not None:
                await stack.enter_async_context(self.proxy.running())
            yield

    # --- shutdown -------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop accepting, close every client with 1001 after its queue drains, wait.

        Clients get ``shutdown_timeout`` seconds in all; whoever is still
        connected then is cut off when the server's nursery ends.
        """
        if not self._draining:
            self._draining = True
            LOGGER.info("shutting down: closing %d connections", len(self._connections))
            self._stop_listening.cancel()
            for connection in list(self._connections.values()):
                connection.close(CloseCode.GOING_AWAY, self.reconnect_hint(SHUTDOWN_REASON))
        if self._connections:
            with trio.move_on_after(self.config.shutdown_timeout):
                await self._drained.wait()
        self._stop_hypercorn.set()

    def reconnect_hint(self, reason: str) -> str:
        """``reason`` with a suggested delay before reconnecting: ``<reason>; retry=<ms>``.

        Random within ``reconnect_window`` per client, so that clients closed
        together (a restart) come back spread out rather than as one wave.
        """
        window = self.config.reconnect_window
        if window <= 0:
            return reason
        return f"{reason}; retry={round(random.uniform(0, window) * 1000)}"

    # --- the transports' side (ConnectionHandler) ---------------------------------------

    async def admit(self, request: UpgradeRequest) -> Admission | Rejection:
        """Decide on an upgrade: capacity, origin, then who the client is (its token,
        or the application's connect hook)."""
        if self._draining:
            return Rejection(503, SHUTDOWN_REASON, "shutting_down")
        if len(self._connections) + self._admitted >= self.config.max_connections:
            return Rejection(503, "too many connections", "too_many_connections")
        cap = self.config.max_connections_per_ip
        if cap and self._per_host.get(_host(request.remote), 0) >= cap:
            return Rejection(429, "too many connections from this address", "too_many_connections")
        origin = request.header("origin")
        if not self._origins.allows(origin):
            LOGGER.warning(
                "refused origin %.200r from %s",
                origin,
                request.remote,
                extra={"event": "origin_refused", "origin": origin, "remote": request.remote},
            )
            return Rejection(403, "origin not allowed", "forbidden_origin")
        endpoint = self.endpoints.get(request.path) or self.streams.get(request.path)
        if endpoint is None:
            return Rejection(404, f"no WebSocket endpoint at {request.path[:200]}")
        host = _host(request.remote)
        # Reserved now, not when serve() starts: upgrades admitted together (or
        # waiting for the connect hook together) must not all pass the caps.
        self._per_host[host] = self._per_host.get(host, 0) + 1
        self._admitted += 1
        try:
            client_id = new_client_id() if self._asks_connect_hook(endpoint, request) else None
            if client_id is None:
                identity = self._authenticate(endpoint, request)
            else:
                identity = await self._connect_hook(endpoint, request, client_id)
            if not isinstance(identity, Rejection) and self._draining:
                identity = Rejection(503, SHUTDOWN_REASON, "shutting_down")
            plan: StreamPlan | None = None
            if not isinstance(identity, Rejection) and isinstance(endpoint, StreamEndpoint):
                # The hooks see the id the connection will have.
                client_id = client_id or new_client_id()
                planned = await self._plan_stream(endpoint, request, identity, client_id)
                if isinstance(planned, Rejection):
                    identity = planned
                else:
                    plan = planned
            if not isinstance(identity, Rejection) and not self.seats.take(identity.tenant):
                identity = Rejection(
                    429, "too many connections for this tenant", ErrorCode.TOO_MANY_CONNECTIONS
                )
        except BaseException:
            self._unreserve(host)
            raise
        if isinstance(identity, Rejection):
            self._unreserve(host)
            return identity
        return Admission(request, (endpoint, identity, client_id, plan))

    async def _plan_stream(
        self,
        endpoint: StreamEndpoint,
        request: UpgradeRequest,
        identity: Identity,
        client_id: str,
    ) -> StreamPlan | Rejection:
        """A stream's topics, checked as subscribes are (and by the subscribe hook, if
        the node has one) before its ``200``: a refused topic refuses the stream, with
        an HTTP status an ``EventSource`` does not retry."""
        planned = endpoint.plan(request, identity, self.namespaces)
        proxy = self.proxy
        if isinstance(planned, Rejection) or proxy is None or not proxy.subscribes:
            return planned
        client = self._hooked_client(endpoint, request, client_id, identity)
        origin = proxy.origin(request, endpoint.kind)
        for entry in planned.request.topics:
            try:
                await proxy.subscribe(client, origin, entry.topic)
            except ProxyError as exc:
                return Rejection(_refusal_status(exc), exc.message or "refused", exc.code)
            except ProxyDisconnect as exc:
                return Rejection(403, exc.reason or "refused", ErrorCode.FORBIDDEN)
        return planned

    def _hooked_client(
        self,
        endpoint: Endpoint,
        request: UpgradeRequest,
        client_id: str,
        identity: Identity | None,
    ) -> ClientInfo:
        """The client as the application's hooks are told of it before it is admitted
        (``identity`` None: before anyone knows who it is)."""
        return ClientInfo(
            id=client_id,
            remote=request.remote,
            connected_at=time.time(),
            dialect=endpoint.dialect.name,
            path=request.path,
            user=identity.user if identity is not None else None,
            tenant=identity.tenant if identity is not None else self.config.default_tenant,
        )

    def _authenticate(self, endpoint: Endpoint, request: UpgradeRequest) -> Identity | Rejection:
        try:
            authenticate = endpoint.authenticate or self.authenticator.authenticate
            return authenticate(request)
        except AuthError as exc:
            return self._auth_failure(request, str(exc), Rejection(401, str(exc), "unauthorized"))

    def _auth_failure(self, request: UpgradeRequest, reason: str, refusal: Rejection) -> Rejection:
        self.counters.auth_failures += 1
        LOGGER.warning(
            "authentication failed from %s: %s",
            request.remote,
            reason,
            extra={"event": "auth_failure", "remote": request.remote, "reason": reason},
        )
        return refusal

    def _asks_connect_hook(self, endpoint: Endpoint, request: UpgradeRequest) -> bool:
        """Whether the connect hook decides who this client is: it presents no token
        (or tokens are not used), on an endpoint without authentication of its own."""
        return (
            self.proxy is not None
            and self.proxy.connects
            and endpoint.authenticate is None
            and (self.authenticator.mode == "none" or token_of(request) is None)
        )

    async def _connect_hook(
        self, endpoint: Endpoint, request: UpgradeRequest, client_id: str
    ) -> Identity | Rejection:
        """The connect hook's identity for an upgrade, or its refusal as an HTTP status."""
        proxy = self.proxy
        assert proxy is not None
        client = self._hooked_client(endpoint, request, client_id, None)
        try:
            kind = endpoint.kind if isinstance(endpoint, StreamEndpoint) else "websocket"
            return await proxy.connect(client, proxy.origin(request, kind))
        except Unavailable as exc:
            if proxy.allow_when_unavailable:
                return self._authenticate(endpoint, request)  # as if there were no hook
            return Rejection(503, exc.message, exc.code)
        except ProxyError as exc:
            refusal = Rejection(_refusal_status(exc), exc.message or "refused", exc.code)
        except ProxyDisconnect as exc:
            refusal = Rejection(403, exc.reason or "refused", ErrorCode.FORBIDDEN)
        reason = f"refused by the connect hook: {refusal.message}"
        return self._auth_failure(request, reason, refusal)

    def release(self, admission: Admission) -> None:
        _endpoint, identity, _client_id, _plan = admission.context
        self._unreserve(_host(admission.request.remote))
        self.seats.give_back(identity.tenant)

    def _unreserve(self, host: str) -> None:
        self._admitted -= 1
        self._release_host(host)

    def _release_host(self, host: str) -> None:
        remaining = self._per_host.pop(host, 1) - 1
        if remaining > 0:
            self._per_host[host] = remaining

    def serve(self, transport: Transport, admission: Admission) -> Awaitable[CloseInfo]:
        """The run of one accepted connection, to its end (the transport awaits it).

        Everything after the end is :meth:`_ended`, which the connection calls
        as its last step: no frame of ours waits under each connection.
        """
        request, (endpoint, identity, client_id, plan) = admission.take()
        proxy = self.proxy
        hooks: ClientHooks | None = None
        if proxy is not None and (
            proxy.after_upgrade or (proxy.connects and endpoint.authenticates_after_upgrade)
        ):
            # What the upgrade said is kept only where a hook will be asked later
            # (its headers can be kilobytes): not where the only hook is the
            # connect hook, already asked at the upgrade.
            kind = endpoint.kind if isinstance(endpoint, StreamEndpoint) else "websocket"
            hooks = ClientHooks(proxy, proxy.origin(request, kind))
        connection = Connection(
            transport,
            request,
            dialect=endpoint.dialect,
            endpoint=endpoint,
            broker=self.broker,
            limits=self._endpoint_limits(endpoint),
            handlers=self._handlers,
            alarms=self.alarms,
            identity=identity,
            namespaces=self.namespaces,
            authenticator=self.authenticator,
            counters=self.counters,
            seats=self.seats,
            hooks=hooks,
            client_id=client_id,
            on_end=self._ended,
        )
        del request  # its headers need not live as long as the connection
        if plan is not None:
            endpoint.attach(connection.session, plan)
        info = connection.info
        self._connections[info.id] = connection
        self._admitted -= 1  # counted in _connections from now on
        LOGGER.info(
            "connect %s from %s user=%s tenant=%s",
            info.id,
            info.remote,
            info.user,
            info.tenant,
            extra={
                "event": "connect",
                "client": info.id,
                "remote": info.remote,
                "user": info.user,
                "tenant": info.tenant,
            },
        )
        for hook in self._on_connect:
            _call_hook(hook, info)
        if self._draining:
            # Admitted just before the shutdown began, served just after: it
            # was not among the connections the shutdown closed.
            connection.close(CloseCode.GOING_AWAY, self.reconnect_hint(SHUTDOWN_REASON))
        return connection.run()

    def _ended(self, connection: Connection, closed: CloseInfo) -> None:
        """A connection's last step: forget it, give back its seats, count and log its end."""
        info = connection.info
        del self._connections[info.id]
        self._release_host(_host(info.remote))
        self.seats.give_back(connection.identity.tenant)
        if self._draining and not self._connections:
            self._drained.set()
        key = _disconnect_key(closed)
        self.counters.disconnects[key] = self.counters.disconnects.get(key, 0) + 1
        duration = time.time() - info.connected_at
        LOGGER.info(
            "disconnect %s code=%d reason=%r by=%s after %.1f s dropped=%d",
            info.id,
            closed.code,
            closed.reason,
            closed.initiated_by,
            duration,
            connection.outbox.dropped,
            extra={
                "event": "disconnect",
                "client": info.id,
                "code": closed.code,
                "reason": closed.reason,
                "by": closed.initiated_by,
                "duration": round(duration, 3),
                "dropped": connection.outbox.dropped,
            },
        )
        for disconnect_hook in self._on_disconnect:
            _call_hook(disconnect_hook, info, closed)

    def health(self) -> tuple[int, dict[str, Any]]:
        """The status and JSON body ``GET /health`` answers."""
        stats = self.statistics()
        status = "ok"
        if self._draining:
            status = "draining"
        elif self.backplane is not None and not self.backplane.healthy:
            # Serving local clients; publications and cluster features wait for Redis.
            status = "degraded"
        body: dict[str, Any] = {
            "status": status,
            "version": __version__,
            "node": self.node_id,
            "uptime": round(stats.uptime, 3),
            "connections": stats.connections,
            "topics": stats.topics,
            "subscriptions": stats.subscriptions,
        }
        if self.backplane is not None:
            body["backplane"] = self.backplane.status()
        return (503 if self._draining else 200), body

    # --- listening --------------------------------------------------------------------

    async def _listen(self, nursery: trio.Nursery, connections: trio.Nursery) -> None:
        if self.config.transport == "hypercorn":
            binds: list[str] = await nursery.start(self._run_hypercorn)
            self.addresses = [_parse_bind(bind) for bind in binds]
        else:
            self.addresses = await nursery.start(self._run_builtin, connections)
        LOGGER.info("listening on %s (transport %s)", self.url, self.config.transport)

    async def _run_builtin(
        self,
        connections: trio.Nursery,
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        builtin = self.builtin = BuiltinServer(
            self,
            self._serve_http,
            max_message_size=self.config.max_message_size,
            handshake_timeout=self.config.handshake_timeout,
            backlog=LISTEN_BACKLOG,
            max_pending=self.config.max_pending_handshakes,
            max_pending_per_ip=self.config.max_pending_handshakes_per_ip,
            max_partial_bytes=self.config.max_partial_bytes,
            compression_min_size=(
                self.config.compression_min_size if self.config.compression else None
            ),
            reuse_port=self.config.reuse_port,
        )
        with self._stop_listening:
            await builtin.serve(
                self.config.host, self.config.port, connections, task_status=task_status
            )

    async def _run_hypercorn(
        self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        hypercorn_config = HypercornConfig()
        hypercorn_config.bind = [f"{host}:{self.config.port}"]
        hypercorn_config.websocket_max_message_size = self.config.max_message_size
        hypercorn_config.websocket_ping_interval = self.config.ping_interval
        hypercorn_config.graceful_timeout = self.config.close_timeout
        hypercorn_config.backlog = LISTEN_BACKLOG
        # hypercorn sets SO_REUSEPORT when told it runs several workers (serve() starts none).
        hypercorn_config.workers = 2 if self.config.reuse_port else 1
        hypercorn_config.accesslog = None
        # Through our logging configuration, not a second handler of hypercorn's own.
        hypercorn_config.errorlog = logging.getLogger("hypercorn.error")
        await hypercorn_serve(
            self.asgi_app,  # type: ignore[arg-type]
            hypercorn_config,
            shutdown_trigger=self._stop_hypercorn.wait,
            task_status=task_status,
        )


#: The cluster-wide questions :meth:`Server._answer` answers itself.
_CORE_QUESTIONS: Final = frozenset({"presence", "channels", "disconnect"})

#: Close codes a client's own close frame is counted under; others become 0.
_CLIENT_CODES: Final = frozenset({1000, 1001, 1002, 1005, 1006, 1007, 1008, 1009, 1011})


def _disconnect_key(closed: CloseInfo) -> tuple[int, str]:
    """The metric labels of a disconnect: bounded, whatever a client sends.

    A client chooses its close frame's code and reason; counting them as given
    would let any client create metric series without limit.
    """
    if closed.initiated_by == "client":
        return (closed.code if closed.code in _CLIENT_CODES else 0), "by client"
    return closed.code, closed.reason[:64]


def _refusal_status(refusal: ProxyError) -> int:
    """The HTTP status of an upgrade the connect hook refused: 503 when it may pass,
    the backend's code when that is a 4xx status, else 403."""
    if refusal.temporary:
        return 503
    code = refusal.code
    if code.isdigit() and 400 <= int(code) < 500:
        return int(code)
    return 403


def _host(remote: str) -> str:
    """``host:port`` (or ``[v6]:port``) -> host."""
    return remote.rpartition(":")[0].strip("[]") or remote


class OriginPolicy:
    """The Norn seed's origin check, for browsers (other clients send no Origin).

    Allowed: no Origin header; an origin in the configured list; an origin
    whose host is localhost, 127.0.0.1 or ::1. Anything else is refused.
    """

    LOCAL_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1"})

    def __init__(self, allowed: tuple[str, ...]) -> None:
        self.allowed = frozenset(origin.rstrip("/") for origin in allowed)

    def allows(self, origin: str | None) -> bool:
        if not origin or origin.rstrip("/") in self.allowed:
            return True
        try:
            host = urlsplit(origin).hostname
        except ValueError:
            return False
        return host in self.LOCAL_HOSTS


def _check_topic(topic: str) -> None:
    problem = topic_problem(topic) if isinstance(topic, str) else "topic must be a string"
    if problem is not None:
        raise ValueError(problem)


def _check_idempotency_key(key: str | None) -> None:
    problem = None if key is None else idempotency_key_problem(key)
    if problem is not None:
        raise ValueError(f"idempotency_key {problem}")


def _call_hook(hook: Callable[..., None], *args: Any) -> None:
    try:
        hook(*args)
    except Exception:
        LOGGER.exception("hook %r failed", hook)


def _parse_bind(bind: str) -> tuple[str, int]:
    """``http://127.0.0.1:8800`` -> ``("127.0.0.1", 8800)``."""
    address = bind.split("://", 1)[-1]
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)
