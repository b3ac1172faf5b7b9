"""The Python client: connect, subscribe, publish and request over the native protocol.

::

    async with tidings.client.connect("ws://127.0.0.1:8800/ws") as client:
        async with client.subscribe("deploys") as events:
            async for event in events:
                print(event.seq, event.payload)

The client reconnects by itself with exponential backoff when the connection
drops, and resubscribes each topic from the last ``seq`` it delivered, so a
consumer sees every event once, in order, as long as the server's history
reaches back across the outage. When it does not, the subscription's
:attr:`ClientSubscription.gaps` counts it and ``seq`` jumps. A publish whose
connection drops before its answer is sent again after the reconnect, under
the same idempotency key, so it is published once.

It runs under Trio only. Under asyncio, publish with
:class:`tidings.publisher.AsyncPublisher` and subscribe with centrifuge-python
(``docs/asyncio.md``).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import random
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from typing import Any, Final, Self

import orjson
import sniffio
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from .errors import RemoteError, TidingsError
from .protocol.codes import ErrorCode
from .protocol.messages import Event, Position

__all__ = [
    "DEFAULT_URL",
    "Client",
    "ClientSubscription",
    "ConnectionLostError",
    "RemoteError",
    "TidingsError",
    "connect",
    "retry_hint",
]

LOGGER = logging.getLogger("tidings.client")

DEFAULT_URL = "ws://127.0.0.1:8800/ws"


class ConnectionLostError(ConnectionError):
    """The connection dropped before the server answered; the command may or may not have run."""


class ConnectionRejectedError(ConnectionError):
    """The server refused the first connection with an HTTP status (401: the token).

    ``code`` and ``message`` come from the refusal's JSON body, when it has one.
    """

    def __init__(self, text: str, status: int, code: str = "", message: str = "") -> None:
        super().__init__(text)
        self.status = status
        self.code = code
        self.message = message


_Callback = Callable[[dict[str, Any]], None]


class _Pending:
    """A command waiting for its reply.

    ``on_reply`` runs in the reader task as the reply arrives, before any later
    frame is read: a subscribe's position must be known before its events.
    """

    __slots__ = ("done", "error", "on_error", "on_reply", "reply")

    def __init__(
        self, on_reply: _Callback | None = None, on_error: _Callback | None = None
    ) -> None:
        self.done = trio.Event()
        self.on_reply = on_reply
        self.on_error = on_error
        self.reply: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def resolve(self, reply: dict[str, Any]) -> None:
        self.reply = reply
        if reply.get("type") != "error":
            if self.on_reply is not None:
                self.on_reply(reply)
        elif self.on_error is not None:
            self.on_error(reply)
        self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()


class ClientSubscription:
    """The events of one topic, in ``seq`` order, across reconnects.

    Iterate it with ``async for``. :attr:`last_seq` and :attr:`epoch` are the
    position of the last event delivered, from which the client resumes.
    """

    def __init__(self, topic: str, since: int | None, epoch: str | None, buffer: int) -> None:
        self.topic = topic
        self.last_seq = since
        self.epoch = epoch
        self.recovered: bool | None = None
        """Whether the last (re)subscribe replayed everything missed; None if not resumed."""
        self.gaps = 0
        """Resumes that could not recover every missed event."""
        self.resumes = 0
        self.confirmed = False
        """The server answered a subscribe for it (on some connection)."""
        self.answer: dict[str, Any] = {}
        """The payload of the last subscribe response: ``seq``, ``epoch``, and with
        a resume ``recovered`` and ``replayed`` (how many events follow it)."""
        self.refused: RemoteError | None = None
        """Why the server refused to resume it for good (iterating it raises this)."""
        self._send, self._receive = trio.open_memory_channel[Event](buffer)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            if self.refused is not None:
                raise self.refused from None
            raise StopAsyncIteration from None

    def _refuse(self, error: RemoteError) -> None:
        """A resume the server will not take: the iteration ends with ``error``."""
        self.refused = error
        self._send.close()

    def _on_subscribe_reply(self, reply: dict[str, Any]) -> None:
        self.confirmed = True
        payload = reply.get("payload") or {}
        self.answer = payload
        epoch = payload.get("epoch")
        recovered = payload.get("recovered")
        self.recovered = recovered
        if recovered is False:
            self.gaps += 1
        start = payload.get("seq", 0) - payload.get("replayed", 0)
        if epoch != self.epoch and (self.epoch is not None or self.last_seq is None):
            # A new stream (or a first subscribe): positions restart from here.
            self.last_seq = start
        elif recovered is False and self.last_seq is not None and self.last_seq > start:
            # An offset beyond the topic's (from another stream): kept, it would
            # hide every event up to it as a duplicate.
            self.last_seq = start
        self.epoch = epoch

    def _accepts(self, event: Event) -> bool:
        """False for an event this subscription already delivered."""
        if not event.epoch:
            return True  # no position: nothing to compare or to remember
        if event.epoch == self.epoch and self.last_seq is not None and event.seq <= self.last_seq:
            return False
        self.epoch = event.epoch
        self.last_seq = event.seq
        return True


class Client:
    """A connection to a tidings server that survives reconnects. Use :func:`connect`."""

    def __init__(
        self,
        url: str,
        *,
        reconnect: bool,
        min_backoff: float,
        max_backoff: float,
        connect_timeout: float,
        ping_interval: float,
        max_message_size: int,
        token: str | None = None,
    ) -> None:
        self.url = url
        self.token = token
        """Sent as ``Authorization: Bearer`` on every (re)connection; see :meth:`refresh`."""
        self.reconnect = reconnect
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.max_message_size = max_message_size
        self.connections = 0
        """How many times a connection was established (1 + reconnects)."""
        self._ws: WebSocketConnection | None = None
        self._connected = trio.Event()
        self._closed = False
        self._ids = itertools.count(1)
        self._pending: dict[str, _Pending] = {}
        self._subscriptions: dict[str, ClientSubscription] = {}
        # Resubscribes refused for a while (``unavailable``), retried on this connection.
        self._to_resume: list[ClientSubscription] = []
        self._resume_wake = trio.Event()

    @property
    def connected(self) -> bool:
        return self._ws is not None

    # --- commands -------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        payload: Any,
        *,
        timeout: float = 10.0,
        idempotency_key: str | None = None,
    ) -> Position:
        """Publish an event; returns its position once the server sequenced it.

        The publish carries an idempotency key (``idempotency_key``, or one
        made for this call). When the connection drops before the answer, it
        is sent again, with the same key, once the client has reconnected: the
        server publishes it once and answers with the first position. Pass
        your own key to also retry it yourself (after ``unavailable``,
        ``unconfirmed``, or a timeout) without publishing twice.

        Raises:
            TidingsError: the server refused it.
            ConnectionLostError: the connection dropped before the answer and
                the client does not reconnect (``reconnect=False``, or closing).
            trio.TooSlowError: no answer (or no connection) within ``timeout``.
        """
        message = {
            "type": "publish",
            "topic": topic,
            "payload": payload,
            "idempotencyKey": idempotency_key or uuid.uuid4().hex,
        }
        with trio.fail_after(timeout):
            while True:
                try:
                    reply = await self._call(dict(message), math.inf)
                except ConnectionLostError:
                    if not self.reconnect or self._closed:
                        raise
                    LOGGER.info("publish to %r lost with its connection; sending it again", topic)
                    continue
                break
        body = reply["payload"]
        return Position(body["seq"], body["epoch"])

    async def request(self, topic: str, payload: Any = None, *, timeout: float = 10.0) -> Any:
        """Ask the handler the server registered for ``topic``; returns its answer."""
        message: dict[str, Any] = {"type": "request", "topic": topic}
        if payload is not None:
            message["payload"] = payload
        reply = await self._call(message, timeout)
        return reply.get("payload")

    async def ping(self, *, timeout: float = 10.0) -> None:
        """Round-trip an application-level ping."""
        await self._call({"type": "ping"}, timeout)

    async def refresh(self, token: str, *, timeout: float = 10.0) -> float | None:
        """Give the server a new token before the current one expires.

        It is also the token used from the next reconnection on, including one
        under way: after the server closed the connection because the old token
        expired (4002), reconnections are refused until the client has a new
        token, and this is how it gets one. Returns the new expiry (seconds since
        the epoch), if the token has one.

        Raises:
            TidingsError: the server refused the token (the old one stays in use).
        """
        previous, self.token = self.token, token
        try:
            reply = await self._call({"type": "refresh", "payload": {"token": token}}, timeout)
        except TidingsError:
            if self.token == token:
                self.token = previous
            raise
        expires: float | None = (reply.get("payload") or {}).get("expiresAt")
        return expires

    async def presence(self, topic: str, *, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Who is subscribed to ``topic`` (where its namespace has presence on)."""
        reply = await self._call({"type": "presence", "topic": topic}, timeout)
        clients: list[dict[str, Any]] = (reply.get("payload") or {}).get("clients", [])
        return clients

    @asynccontextmanager
    async def subscribe(
        self,
        topic: str,
        *,
        since: int | None = None,
        epoch: str | None = None,
        buffer: int = 1024,
        timeout: float = 10.0,
    ) -> AsyncIterator[ClientSubscription]:
        """Subscribe to ``topic`` for the duration of the block.

        ``since`` (and ``epoch``) resume after that offset from the server's
        history. Events wait in a buffer of ``buffer`` events; when it is full
        the client stops reading from the socket until the consumer catches up,
        and the server's overflow policy applies.
        """
        if topic in self._subscriptions:
            raise ValueError(f"already subscribed to {topic!r} on this client")
        subscription = ClientSubscription(topic, since, epoch, buffer)
        self._subscriptions[topic] = subscription
        try:
            await self._call(
                self._subscribe_message(subscription),
                timeout,
                on_reply=subscription._on_subscribe_reply,
            )
            yield subscription
        finally:
            del self._subscriptions[topic]
            subscription._send.close()
            if self._ws is not None and not self._closed:
                # Shielded so that leaving the block by cancellation still
                # unsubscribes; _call's own two-second timeout bounds it.
                with (
                    trio.CancelScope(shield=True),
                    suppress(TidingsError, ConnectionLostError, trio.TooSlowError),
                ):
                    await self._call({"type": "unsubscribe", "topic": topic}, 2)

    async def wait_connected(self) -> None:
        """Wait until the client is connected (again)."""
        await self._connected.wait()

    # --- internals -----------------------------------------------------------------

    @staticmethod
    def _subscribe_message(subscription: ClientSubscription) -> dict[str, Any]:
        message: dict[str, Any] = {"type": "subscribe", "topic": subscription.topic}
        if subscription.last_seq is not None:
            resume: dict[str, Any] = {"since": subscription.last_seq}
            if subscription.epoch is not None:
                resume["epoch"] = subscription.epoch
            message["payload"] = resume
        return message

    async def _call(
        self, message: dict[str, Any], timeout: float, *, on_reply: _Callback | None = None
    ) -> dict[str, Any]:
        request_id = f"c{next(self._ids)}"
        message["requestId"] = request_id
        pending = _Pending(on_reply)
        text = orjson.dumps(message).decode()
        with trio.fail_after(timeout):
            while True:
                ws = self._ws
                if ws is None or ws.closed is not None:
                    # Away: wait for the reconnect (the event is replaced on each loss).
                    await self._connected.wait()
                    continue
                self._pending[request_id] = pending
                try:
                    await ws.send_message(text)
                except ConnectionClosed:
                    # Not sent, so safe to send again once reconnected.
                    self._pending.pop(request_id, None)
                    await trio.lowlevel.checkpoint()
                    continue
                break
            try:
                await pending.done.wait()
            finally:
                self._pending.pop(request_id, None)
        if pending.error is not None:
            raise pending.error
        assert pending.reply is not None
        if pending.reply.get("type") == "error":
            body = pending.reply.get("payload") or {}
            raise RemoteError(str(body.get("code")), str(body.get("message")))
        return pending.reply

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a connection open: connect, read, and on loss reconnect with backoff."""
        backoff = self.min_backoff
        started = False
        while True:
            hint: float | None = None
            try:
                headers = (
                    [(b"Authorization", f"Bearer {self.token}".encode())] if self.token else None
                )
                async with open_websocket_url(
                    self.url,
                    extra_headers=headers,
                    connect_timeout=self.connect_timeout,
                    disconnect_timeout=2,
                    max_message_size=self.max_message_size,
                ) as ws:
                    self.connections += 1
                    backoff = self.min_backoff
                    self._to_resume, self._resume_wake = [], trio.Event()
                    for message in self._resubscribe_messages(self._subscriptions.values()):
                        await ws.send_message(message)
                    self._ws = ws
                    self._connected.set()
                    if not started:
                        started = True
                        task_status.started()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._keepalive, ws, nursery.cancel_scope)
                        nursery.start_soon(self._resume_refused, ws)
                        with suppress(ConnectionClosed):  # the usual way a connection ends
                            await self._read(ws)
                        nursery.cancel_scope.cancel()
                    if ws.closed is not None and not self._closed:
                        LOGGER.info("connection to %s lost (%s)", self.url, _describe_close(ws))
                        hint = retry_hint(ws.closed.reason)
            except (OSError, HandshakeError, ConnectionClosed, trio.TooSlowError) as exc:
                if isinstance(exc, ConnectionClosed) and exc.reason is not None:
                    hint = retry_hint(exc.reason.reason)
                if not started:
                    text = f"cannot connect to {self.url}: {_describe(exc)}"
                    if isinstance(exc, ConnectionRejected):
                        code, message = _refusal(exc.body)
                        raise ConnectionRejectedError(text, exc.status_code, code, message) from exc
                    raise ConnectionError(text) from exc
                LOGGER.info("connection to %s lost (%s); reconnecting", self.url, _describe(exc))
            finally:
                self._ws = None
                self._connected = trio.Event()
                self._fail_pending()
            if not self.reconnect or self._closed:
                return
            if hint is not None:
                # The server said when (a restart spreads its clients out).
                await trio.sleep(min(hint, self.max_backoff))
            else:
                await trio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, self.max_backoff)

    def _resubscribe_messages(self, subscriptions: Iterable[ClientSubscription]) -> list[str]:
        """A subscribe for each subscription, resuming from its last offset."""
        messages = []
        for subscription in subscriptions:
            if not subscription.confirmed or subscription.refused is not None:
                continue  # its first subscribe is still in flight, or it is over
            message = self._subscribe_message(subscription)
            request_id = f"c{next(self._ids)}"
            message["requestId"] = request_id
            subscription.resumes += 1
            self._pending[request_id] = _Pending(
                subscription._on_subscribe_reply,
                functools.partial(self._on_resume_refused, subscription),
            )
            messages.append(orjson.dumps(message).decode())
        return messages

    def _on_resume_refused(self, subscription: ClientSubscription, reply: dict[str, Any]) -> None:
        """A resubscribe was refused: try again later if the reason passes, else end it."""
        body = reply.get("payload") or {}
        code, message = str(body.get("code")), str(body.get("message"))
        if self._subscriptions.get(subscription.topic) is not subscription:
            return  # left meanwhile
        if code in TEMPORARY_CODES:
            # A node busy resynchronising (a reconnect storm) or a hook that is
            # down: nothing is lost by waiting, the next resume replays it.
            LOGGER.info("resuming %r refused (%s: %s); retrying", subscription.topic, code, message)
            self._to_resume.append(subscription)
            self._resume_wake.set()
            return
        LOGGER.warning("resuming %r refused for good: %s: %s", subscription.topic, code, message)
        subscription._refuse(RemoteError(code, message))

    async def _resume_refused(self, ws: WebSocketConnection) -> None:
        """Resubscribe, with backoff, the topics whose resume was refused for a while."""
        backoff = self.min_backoff
        while True:
            await self._resume_wake.wait()
            await trio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, self.max_backoff)
            self._resume_wake = trio.Event()
            retry, self._to_resume = self._to_resume, []
            current = [s for s in retry if self._subscriptions.get(s.topic) is s]  # not left
            for message in self._resubscribe_messages(current):
                await ws.send_message(message)

    async def _read(self, ws: WebSocketConnection) -> None:
        while True:
            raw = await ws.get_message()
            try:
                message = orjson.loads(raw)
                kind = message["type"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                LOGGER.warning("ignoring a malformed frame from the server: %.200r", raw)
                continue
            if kind == "event":
                subscription = self._subscriptions.get(message.get("topic"))
                if subscription is None:
                    continue
                seq, epoch = message.get("seq"), message.get("epoch")
                if not isinstance(seq, int) or not isinstance(epoch, str):
                    # A server whose events carry no position (a dialect without
                    # resume): deliver them, with nothing to resume from.
                    seq, epoch = 0, ""
                event = Event(
                    str(message["topic"]),
                    seq,
                    epoch,
                    message.get("payload"),
                    message.get("timestamp", ""),
                )
                if subscription._accepts(event):
                    with suppress(trio.ClosedResourceError):  # it ended while we waited
                        await subscription._send.send(event)
                continue
            waiter = self._pending.pop(str(message.get("requestId")), None)
            if waiter is not None:
                waiter.resolve(message)
            elif kind == "error":
                LOGGER.warning("error from the server: %s", message.get("payload"))

    async def _keepalive(self, ws: WebSocketConnection, scope: trio.CancelScope) -> None:
        """Notice a server that went away without closing: ping, and drop on no pong."""
        while True:
            await trio.sleep(self.ping_interval)
            with trio.move_on_after(self.ping_interval) as timeout:
                try:
                    await ws.ping()
                except ConnectionClosed:
                    return
            if timeout.cancelled_caught:
                LOGGER.info(
                    "no pong from %s within %.0f s; reconnecting", self.url, self.ping_interval
                )
                await ws.aclose(code=1011, reason="ping timeout")
                scope.cancel()
                return

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            waiter.fail(ConnectionLostError("the connection closed before the server answered"))


def _require_trio() -> None:
    """Fail at once, with a way out, rather than deep inside Trio under another loop."""
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        library = "no async library"
    if library != "trio":
        raise RuntimeError(
            f"tidings.client runs under Trio only, and this is {library}. Under asyncio,"
            " publish with tidings.publisher.AsyncPublisher and subscribe with"
            " centrifuge-python at /connection/websocket (docs/asyncio.md)"
        )


#: Refusals of a resubscribe that pass by themselves: retried on the same connection.
TEMPORARY_CODES: Final = frozenset({ErrorCode.UNAVAILABLE.value, ErrorCode.RATE_LIMITED.value})

_RETRY: Final = re.compile(r"; retry=(\d{1,7})$")


def retry_hint(reason: str | None) -> float | None:
    """The delay (seconds) a server's close reason asks before reconnecting, if any.

    A closing server (a restart) ends its reason with ``; retry=<milliseconds>``.
    """
    match = _RETRY.search(reason or "")
    return int(match[1]) / 1000 if match else None


def _describe_close(ws: WebSocketConnection) -> str:
    reason = ws.closed
    return f"closed with {reason.code} {reason.reason or ''}".strip() if reason else "closed"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionClosed) and exc.reason is not None:
        return f"closed with {exc.reason.code} {exc.reason.reason or ''}".strip()
    if isinstance(exc, ConnectionRejected):
        code, message = _refusal(exc.body)
        reason = f" {code}: {message}" if code else ""
        return f"rejected with HTTP {exc.status_code}{reason}"
    if isinstance(exc, ConnectionTimeout | trio.TooSlowError):
        return "no answer to the WebSocket handshake in time"
    if not str(exc) and (exc.__cause__ or exc.__context__):
        # trio-websocket's HandshakeError says nothing; the OSError under it does.
        return _describe(exc.__cause__ or exc.__context__)  # type: ignore[arg-type]
    return str(exc) or type(exc).__name__


def _refusal(body: bytes | None) -> tuple[str, str]:
    """``(code, message)`` of a refused upgrade's ``{"error": {...}}`` body, if it has one."""
    try:
        error = orjson.loads(body or b"")["error"]
        return str(error["code"]), str(error["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "", ""


@asynccontextmanager
async def connect(
    url: str = DEFAULT_URL,
    *,
    reconnect: bool = True,
    min_backoff: float = 0.1,
    max_backoff: float = 10.0,
    connect_timeout: float = 10.0,
    ping_interval: float = 20.0,
    max_message_size: int = 16 * 1024 * 1024,
    token: str | None = None,
) -> AsyncIterator[Client]:
    """Connect to a tidings server for the duration of the block.

    The first connection must succeed (``ConnectionError`` otherwise); after
    that, with ``reconnect``, a lost connection is re-established with
    exponential backoff between ``min_backoff`` and ``max_backoff`` seconds and
    every subscription resumes where it left off. ``token`` authenticates the
    client (``Authorization: Bearer``).

    Raises:
        RuntimeError: not running under Trio (under asyncio, see ``docs/asyncio.md``).
    """
    _require_trio()
    client = Client(
        url,
        reconnect=reconnect,
        min_backoff=min_backoff,
        max_backoff=max_backoff,
        connect_timeout=connect_timeout,
        ping_interval=ping_interval,
        max_message_size=max_message_size,
        token=token,
    )
    failed: ConnectionError | None = None
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(client._run)
        except ConnectionError as exc:
            failed = exc  # raised below, outside the nursery, as itself
        else:
            try:
                yield client
            finally:
                client._closed = True
                ws = client._ws
                if ws is not None:
                    # A close handshake, so the server sees 1000 rather than a reset.
                    with trio.CancelScope(shield=True), trio.move_on_after(2):
                        await ws.aclose()
                nursery.cancel_scope.cancel()
    if failed is not None:
        raise failed
