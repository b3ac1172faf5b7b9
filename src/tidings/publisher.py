"""Publish to a tidings node from any Python process, over its HTTP API.

Two clients of the same API (``docs/api.md``): :class:`Publisher`, a plain
synchronous one for Django views, Celery tasks, scripts and any thread with no
event loop; and :class:`AsyncPublisher`, to ``await`` under asyncio (FastAPI,
aiohttp, ...) or under Trio::

    from tidings.publisher import Publisher

    with Publisher("http://127.0.0.1:8800", api_key="s3cret-key") as tidings:
        published = tidings.publish("orders", {"id": 1, "total": 9.5})
        print(published.seq, published.epoch)

Both keep a pool of HTTP connections, give each call a timeout, return typed
results and raise typed errors (:class:`~tidings.errors.ApiCallError` and its
subclasses, carrying the API's stable codes). They retry what may succeed on
a second try (the node unreachable, a timeout, a 5xx such as ``unavailable``
or ``unconfirmed``) with jittered exponential backoff, a bounded number of
times. Retrying a publication is safe because every ``publish`` and
``broadcast`` carries an idempotency key, the same on every retry of a call:
the node publishes it once and answers the retries with the first position.
A key is made per call unless you give one (``idempotency_key=``), which you
do to make a retry that outlives the call (a Celery task retried after a
crash) publish once too.

This module needs no server: it talks HTTP only, and never imports the node.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Final, Generic, Self, TypeVar

import anyio
import attrs
import httpx
import orjson

from ._version import __version__
from .errors import (
    ApiAuthError,
    ApiCallError,
    ApiConflictError,
    ApiRejectedError,
    ApiUnavailableError,
)
from .protocol.messages import Event

__all__ = [
    "ApiAuthError",
    "ApiCallError",
    "ApiConflictError",
    "ApiRejectedError",
    "ApiUnavailableError",
    "AsyncPublisher",
    "Broadcast",
    "Channel",
    "History",
    "NodeInfo",
    "PresenceEntry",
    "PresenceStats",
    "Published",
    "Publisher",
    "TopicFailure",
]

LOGGER = logging.getLogger("tidings.publisher")

DEFAULT_URL: Final = "http://127.0.0.1:8800"
#: The largest request body the API takes (``docs/api.md``); a larger one is refused
#: here, before sending: the node may reset the connection rather than answer 413.
MAX_BODY: Final = 1024 * 1024
#: Per-topic failures of a broadcast that another try may fix (the others are final).
RETRYABLE_CODES: Final = frozenset({"unavailable", "unconfirmed", "too_many_topics"})

T = TypeVar("T")


# --- results ------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class Published:
    """Where a published event stands in its topic: its ``seq`` within ``epoch``.

    A retried publication (same idempotency key) answers with the first one's.
    """

    topic: str
    seq: int
    epoch: str


@attrs.frozen(slots=True)
class TopicFailure:
    """One topic of a broadcast that was not published, with the API's error code."""

    topic: str
    code: str
    message: str


@attrs.frozen(slots=True)
class Broadcast:
    """The outcome of a broadcast, one entry per topic in the order given."""

    results: tuple[Published | TopicFailure, ...]

    @property
    def published(self) -> list[Published]:
        return [result for result in self.results if isinstance(result, Published)]

    @property
    def failed(self) -> list[TopicFailure]:
        return [result for result in self.results if isinstance(result, TopicFailure)]


@attrs.frozen(slots=True)
class History:
    """A topic's retained events after an offset; ``seq``/``epoch`` is where it stands
    now (``epoch`` None: the node holds nothing for it)."""

    topic: str
    seq: int
    epoch: str | None
    events: tuple[Event, ...]


@attrs.frozen(slots=True)
class PresenceEntry:
    """One connection subscribed to a topic: its id, user (None without JWT),
    tenant, and when it connected (RFC 3339 UTC)."""

    client: str
    user: str | None
    tenant: str
    connected_at: str


@attrs.frozen(slots=True)
class PresenceStats:
    topic: str
    clients: int
    users: int


@attrs.frozen(slots=True)
class Channel:
    """A topic with subscribers, and how many."""

    topic: str
    subscribers: int


@attrs.frozen(slots=True)
class NodeInfo:
    """The node's identity and counters (``docs/api.md#info``); with a backplane,
    ``nodes``, ``cluster`` and ``backplane`` as the API gives them."""

    node: str
    version: str
    uptime: float
    connections: int
    topics: int
    subscriptions: int
    published: int
    delivered: int
    dropped: int
    nodes: tuple[dict[str, Any], ...] | None = None
    cluster: dict[str, Any] | None = None
    backplane: dict[str, Any] | None = None


# --- calls: what to send and how to read the answer, shared by both clients -------------------


@attrs.frozen(slots=True)
class _Call(Generic[T]):
    method: str
    body: bytes
    parse: Callable[[dict[str, Any]], T]
    retry_if: Callable[[T], bool] | None = None
    """A successful answer that is still worth another try (a broadcast's
    topics that failed with ``unavailable``)."""


def _body(fields: dict[str, Any], **required: Any) -> bytes:
    """The request: ``required`` as given (a ``None`` payload is JSON null),
    ``fields`` that are None left out.

    Serialized once per call, so every retry sends the same bytes (the node
    compares a retried payload with the first as serialized)."""
    optional = {name: value for name, value in fields.items() if value is not None}
    return orjson.dumps({**required, **optional})


def _key(idempotency_key: str | None) -> str:
    return idempotency_key if idempotency_key is not None else uuid.uuid4().hex


def _published(answer: dict[str, Any]) -> Published:
    return Published(str(answer["topic"]), int(answer["seq"]), str(answer["epoch"]))


def _broadcast(answer: dict[str, Any]) -> Broadcast:
    results: list[Published | TopicFailure] = []
    for entry in answer["results"]:
        error = entry.get("error")
        if error is None:
            results.append(_published(entry))
        else:
            results.append(
                TopicFailure(str(entry["topic"]), str(error["code"]), str(error["message"]))
            )
    return Broadcast(tuple(results))


def _broadcast_retryable(result: Broadcast) -> bool:
    return any(failure.code in RETRYABLE_CODES for failure in result.failed)


def _history(answer: dict[str, Any]) -> History:
    events = tuple(
        Event(
            str(event["topic"]),
            int(event["seq"]),
            str(event["epoch"]),
            event.get("payload"),
            str(event["timestamp"]),
        )
        for event in answer["events"]
    )
    epoch = answer.get("epoch")
    return History(str(answer["topic"]), int(answer["seq"]), epoch, events)


def _presence(answer: dict[str, Any]) -> list[PresenceEntry]:
    return [
        PresenceEntry(
            str(entry["client"]), entry.get("user"), str(entry["tenant"]), str(entry["connectedAt"])
        )
        for entry in answer["clients"]
    ]


def _presence_stats(answer: dict[str, Any]) -> PresenceStats:
    return PresenceStats(str(answer["topic"]), int(answer["clients"]), int(answer["users"]))


def _channels(answer: dict[str, Any]) -> list[Channel]:
    return [Channel(str(entry["topic"]), int(entry["subscribers"])) for entry in answer["channels"]]


def _disconnected(answer: dict[str, Any]) -> int:
    return int(answer["disconnected"])


def _info(answer: dict[str, Any]) -> NodeInfo:
    nodes = answer.get("nodes")
    return NodeInfo(
        node=str(answer["node"]),
        version=str(answer["version"]),
        uptime=float(answer["uptime"]),
        connections=int(answer["connections"]),
        topics=int(answer["topics"]),
        subscriptions=int(answer["subscriptions"]),
        published=int(answer["published"]),
        delivered=int(answer["delivered"]),
        dropped=int(answer["dropped"]),
        nodes=None if nodes is None else tuple(nodes),
        cluster=answer.get("cluster"),
        backplane=answer.get("backplane"),
    )


class _Calls:
    """The API's methods as calls, and the settings both clients share."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None,
        tenant: str | None,
        timeout: float,
        retries: int,
        backoff: float,
        max_backoff: float,
    ) -> None:
        if retries < 0 or backoff < 0 or max_backoff < backoff or timeout <= 0:
            raise ValueError("retries and backoff must not be negative, timeout must be positive")
        self.url = url.rstrip("/")
        self.tenant = tenant
        """The tenant of calls that name none (None: the node's default tenant)."""
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.headers = {
            "Content-Type": "application/json",
            "User-Agent": f"tidings-publisher/{__version__}",
        }
        if api_key is not None:
            self.headers["Authorization"] = f"apikey {api_key}"

    def delay(self, attempt: int) -> float:
        """The pause before retry number ``attempt`` (1, 2, ...): doubling, jittered
        between half and all of it, so publishers that failed together spread out."""
        ceiling: float = min(self.max_backoff, self.backoff * 2.0 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def publish(
        self, topic: str, payload: Any, tenant: str | None, idempotency_key: str | None
    ) -> _Call[Published]:
        fields = {"tenant": tenant or self.tenant, "idempotency_key": _key(idempotency_key)}
        return _Call("publish", _body(fields, topic=topic, payload=payload), _published)

    def broadcast(
        self,
        topics: Sequence[str],
        payload: Any,
        tenant: str | None,
        idempotency_key: str | None,
    ) -> _Call[Broadcast]:
        if isinstance(topics, str):
            raise TypeError("topics is a sequence of topics, not one topic")
        fields = {"tenant": tenant or self.tenant, "idempotency_key": _key(idempotency_key)}
        body = _body(fields, topics=list(topics), payload=payload)
        return _Call("broadcast", body, _broadcast, _broadcast_retryable)

    def history(self, topic: str, since: int, limit: int, tenant: str | None) -> _Call[History]:
        fields = {"tenant": tenant or self.tenant}
        return _Call("history", _body(fields, topic=topic, since=since, limit=limit), _history)

    def presence(self, topic: str, tenant: str | None) -> _Call[list[PresenceEntry]]:
        return _Call("presence", _body({"tenant": tenant or self.tenant}, topic=topic), _presence)

    def presence_stats(self, topic: str, tenant: str | None) -> _Call[PresenceStats]:
        body = _body({"tenant": tenant or self.tenant}, topic=topic)
        return _Call("presence_stats", body, _presence_stats)

    def channels(self, pattern: str | None, tenant: str | None) -> _Call[list[Channel]]:
        return _Call(
            "channels", _body({"pattern": pattern, "tenant": tenant or self.tenant}), _channels
        )

    def disconnect(
        self, client: str | None, user: str | None, code: int, reason: str, tenant: str | None
    ) -> _Call[int]:
        fields = {"client": client, "user": user, "tenant": tenant or self.tenant}
        return _Call("disconnect", _body(fields, code=code, reason=reason), _disconnected)

    def info(self) -> _Call[NodeInfo]:
        return _Call("info", b"{}", _info)


def _answer(call: _Call[T], response: httpx.Response, attempts: int) -> T:
    """The call's result from an HTTP answer; raises the typed error it carries."""
    status = response.status_code
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    if status == 200 and isinstance(body, dict):
        try:
            return call.parse(body)
        except (KeyError, TypeError, ValueError):
            pass
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code, message = str(error.get("code")), str(error.get("message"))
    elif status == 200:
        code, message = "invalid_answer", f"not the tidings API's answer: {response.text[:200]!r}"
    else:
        code, message = f"http_{status}", response.text[:200] or response.reason_phrase
    kind: type[ApiCallError]
    if status in (401, 403):
        kind = ApiAuthError
    elif status == 409:
        kind = ApiConflictError
    elif status >= 500 or status in (408, 429):
        kind = ApiUnavailableError
    else:
        kind = ApiRejectedError
    raise kind(status, code, message, attempts=attempts)


def _transport_error(exc: httpx.TransportError, attempts: int) -> ApiUnavailableError:
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        code = "unreachable"  # nothing was sent
    elif isinstance(exc, httpx.TimeoutException):
        code = "timeout"
    else:
        code = "connection_lost"  # sent, maybe handled: the key makes a retry safe
    return ApiUnavailableError(None, code, f"{type(exc).__name__}: {exc}", attempts=attempts)


def _check_size(call: _Call[Any]) -> None:
    if len(call.body) > MAX_BODY:
        raise ApiRejectedError(
            None,
            "too_large",
            f"the request is {len(call.body)} bytes; the API takes at most {MAX_BODY}",
            attempts=0,
        )


def _limits(max_connections: int) -> httpx.Limits:
    return httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)


# --- the clients ---------------------------------------------------------------------------


class Publisher:
    """The HTTP API of a tidings node, for synchronous code (no event loop needed).

    Make one per process and share it: it keeps up to ``max_connections``
    keep-alive connections and may be used from several threads. In a
    process that forks (a Celery prefork worker, gunicorn with ``--preload``),
    make it after the fork. Use it as a context manager, or :meth:`close` it.

    ``timeout`` bounds each attempt (connecting, sending, waiting for the
    answer); a call makes at most ``1 + retries`` attempts, pausing
    ``backoff`` seconds, doubling up to ``max_backoff``, jittered, between
    them. ``tenant`` is the tenant of calls that name none.

    Raises (every method):
        ApiUnavailableError: the node was unreachable, timed out or answered
            5xx on every attempt.
        ApiAuthError: a wrong API key, or the API is off.
        ApiConflictError: an idempotency key used with another payload.
        ApiRejectedError: the API refused the call (``invalid_field``, ...).
        TypeError: a payload JSON cannot carry (before anything is sent).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        tenant: str | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        max_connections: int = 10,
    ) -> None:
        self._calls = _Calls(
            url,
            api_key=api_key,
            tenant=tenant,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
        )
        self._http = httpx.Client(
            headers=self._calls.headers,
            timeout=timeout,
            limits=_limits(max_connections),
        )

    @property
    def url(self) -> str:
        return self._calls.url

    def publish(
        self,
        topic: str,
        payload: Any,
        *,
        tenant: str | None = None,
        idempotency_key: str | None = None,
    ) -> Published:
        """Publish one event; returns its position once the node sequenced it.

        Retried under one idempotency key (yours, or one made for this call),
        so the event is published once however many attempts it takes.
        """
        return self._run(self._calls.publish(topic, payload, tenant, idempotency_key))

    def broadcast(
        self,
        topics: Sequence[str],
        payload: Any,
        *,
        tenant: str | None = None,
        idempotency_key: str | None = None,
    ) -> Broadcast:
        """Publish one payload to many topics (1 to 1000); one result per topic.

        Topics that failed with ``unavailable`` or ``unconfirmed`` are tried
        again, within the retries, under the call's one key: only they are
        published again. What still failed after that is in ``.failed``.
        """
        return self._run(self._calls.broadcast(topics, payload, tenant, idempotency_key))

    def history(
        self, topic: str, *, since: int = 0, limit: int = 100, tenant: str | None = None
    ) -> History:
        """The topic's retained events after offset ``since``, oldest first, at most ``limit``."""
        return self._run(self._calls.history(topic, since, limit, tenant))

    def presence(self, topic: str, *, tenant: str | None = None) -> list[PresenceEntry]:
        """The connections subscribed to a topic (on every node, with a backplane)."""
        return self._run(self._calls.presence(topic, tenant))

    def presence_stats(self, topic: str, *, tenant: str | None = None) -> PresenceStats:
        """How many connections, and distinct users, are subscribed to a topic."""
        return self._run(self._calls.presence_stats(topic, tenant))

    def channels(self, *, pattern: str | None = None, tenant: str | None = None) -> list[Channel]:
        """Topics with subscribers (matching a shell-style ``pattern``), sorted by name."""
        return self._run(self._calls.channels(pattern, tenant))

    def disconnect(
        self,
        *,
        client: str | None = None,
        user: str | None = None,
        code: int = 1000,
        reason: str = "",
        tenant: str | None = None,
    ) -> int:
        """Close one connection (``client``) or every connection of a ``user``; how many."""
        return self._run(self._calls.disconnect(client, user, code, reason, tenant))

    def info(self) -> NodeInfo:
        """The node's identity and counters."""
        return self._run(self._calls.info())

    def close(self) -> None:
        """Close the pooled connections."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _run(self, call: _Call[T]) -> T:
        calls = self._calls
        url = f"{calls.url}/api/{call.method}"
        _check_size(call)
        attempt = 0
        while True:
            attempt += 1
            try:
                try:
                    response = self._http.post(url, content=call.body)
                except httpx.TransportError as exc:
                    raise _transport_error(exc, attempt) from exc
                result = _answer(call, response, attempt)
            except ApiCallError as exc:
                if not exc.retryable or attempt > calls.retries:
                    raise
                LOGGER.info("tidings %s: %s; retrying", call.method, exc)
            else:
                if call.retry_if is None or attempt > calls.retries or not call.retry_if(result):
                    return result
                LOGGER.info("tidings %s: some topics unavailable; retrying", call.method)
            time.sleep(calls.delay(attempt))


class AsyncPublisher:
    """:class:`Publisher` to ``await``: under asyncio (FastAPI, aiohttp...) or Trio.

    The same methods, arguments, results, errors and retries. Make it where it
    is used (one per event loop), as ``async with AsyncPublisher(...)`` or
    closed with :meth:`aclose`.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        tenant: str | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        max_connections: int = 10,
    ) -> None:
        self._calls = _Calls(
            url,
            api_key=api_key,
            tenant=tenant,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
        )
        self._http = httpx.AsyncClient(
            headers=self._calls.headers,
            timeout=timeout,
            limits=_limits(max_connections),
        )

    @property
    def url(self) -> str:
        return self._calls.url

    async def publish(
        self,
        topic: str,
        payload: Any,
        *,
        tenant: str | None = None,
        idempotency_key: str | None = None,
    ) -> Published:
        """See :meth:`Publisher.publish`."""
        return await self._run(self._calls.publish(topic, payload, tenant, idempotency_key))

    async def broadcast(
        self,
        topics: Sequence[str],
        payload: Any,
        *,
        tenant: str | None = None,
        idempotency_key: str | None = None,
    ) -> Broadcast:
        """See :meth:`Publisher.broadcast`."""
        return await self._run(self._calls.broadcast(topics, payload, tenant, idempotency_key))

    async def history(
        self, topic: str, *, since: int = 0, limit: int = 100, tenant: str | None = None
    ) -> History:
        """See :meth:`Publisher.history`."""
        return await self._run(self._calls.history(topic, since, limit, tenant))

    async def presence(self, topic: str, *, tenant: str | None = None) -> list[PresenceEntry]:
        """See :meth:`Publisher.presence`."""
        return await self._run(self._calls.presence(topic, tenant))

    async def presence_stats(self, topic: str, *, tenant: str | None = None) -> PresenceStats:
        """See :meth:`Publisher.presence_stats`."""
        return await self._run(self._calls.presence_stats(topic, tenant))

    async def channels(
        self, *, pattern: str | None = None, tenant: str | None = None
    ) -> list[Channel]:
        """See :meth:`Publisher.channels`."""
        return await self._run(self._calls.channels(pattern, tenant))

    async def disconnect(
        self,
        *,
        client: str | None = None,
        user: str | None = None,
        code: int = 1000,
        reason: str = "",
        tenant: str | None = None,
    ) -> int:
        """See :meth:`Publisher.disconnect`."""
        return await self._run(self._calls.disconnect(client, user, code, reason, tenant))

    async def info(self) -> NodeInfo:
        """See :meth:`Publisher.info`."""
        return await self._run(self._calls.info())

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _run(self, call: _Call[T]) -> T:
        calls = self._calls
        url = f"{calls.url}/api/{call.method}"
        _check_size(call)
        attempt = 0
        while True:
            attempt += 1
            try:
                try:
                    response = await self._http.post(url, content=call.body)
                except httpx.TransportError as exc:
                    raise _transport_error(exc, attempt) from exc
                result = _answer(call, response, attempt)
            except ApiCallError as exc:
                if not exc.retryable or attempt > calls.retries:
                    raise
                LOGGER.info("tidings %s: %s; retrying", call.method, exc)
            else:
                if call.retry_if is None or attempt > calls.retries or not call.retry_if(result):
                    return result
                LOGGER.info("tidings %s: some topics unavailable; retrying", call.method)
            await anyio.sleep(calls.delay(attempt))
