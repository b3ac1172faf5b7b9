"""One client connection: a nursery with a reader, a writer and a pinger.

::

    broker --offer--> outbox --receive_batch--> writer --send--> transport
                        ^                                           |
                        +--put (replies, pongs) <-- reader <--receive
                        +--put (pings) <-- pinger  (closes silent peers)

Every byte to the socket is written by the writer, so writes never interleave
and the write timeout is enforced in one place. Whoever decides the connection
must end (the reader on a protocol error or the peer's close, the pinger on a
read timeout, the broker on overflow, the server on shutdown) closes the
outbox with a code; the writer then sends what must still go out, the close
frame, waits briefly for the peer's answer, and returns, which ends the
nursery. A lost TCP connection ends it at once. Whatever way it ends, the
subscriber is detached from every topic in ``finally``.
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import trio

from .app import ClientInfo, CloseInfo, RequestContext, RequestError, RequestHandler
from .broker.broker import Broker, BrokerError, Subscriber
from .broker.outbox import Outbox, OverflowPolicy
from .protocol.codes import CloseCode, ErrorCode
from .protocol.dialect import Dialect
from .protocol.messages import (
    Ack,
    Acked,
    Answer,
    Error,
    Event,
    Ping,
    Pong,
    Position,
    Publish,
    Published,
    Reply,
    Request,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
)
from .protocol.topics import TopicFilter
from .transport.base import (
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

LOGGER = logging.getLogger("tidings.connection")


@functools.lru_cache(maxsize=64)
def wire_encoder(encode: Callable[[Event], bytes], frame: Framer) -> Callable[[Event], Outgoing]:
    """Encode-and-frame, one function object per (dialect, transport kind).

    Every connection with the same dialect and transport gets this same
    function, and the broker groups subscribers by it: each event is encoded
    and framed once for all of them, and each delivery is the same bytes.
    """

    def encode_and_frame(event: Event) -> Outgoing:
        return frame(encode(event))

    return encode_and_frame


@attrs.frozen(kw_only=True)
class ConnectionLimits:
    """The per-connection limits of :class:`~tidings.Config`."""

    ping_interval: float = 30.0
    read_timeout: float = 60.0
    write_timeout: float = 10.0
    close_timeout: float = 2.0
    outbox_size: int = 256
    overflow_policy: OverflowPolicy = OverflowPolicy.DROP
    max_subscriptions: int = 1000
    max_pending_requests: int = 16
    request_timeout: float = 10.0


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

    def __init__(
        self,
        transport: Transport,
        request: UpgradeRequest,
        *,
        dialect: Dialect,
        broker: Broker,
        limits: ConnectionLimits,
        topic_filter: TopicFilter,
        handlers: Mapping[str, RequestHandler],
    ) -> None:
        self.transport = transport
        self.dialect = dialect
        self.broker = broker
        self.limits = limits
        self.topic_filter = topic_filter
        self.handlers = handlers
        self.info = ClientInfo(
            id=secrets.token_hex(6),
            remote=transport.remote,
            connected_at=time.time(),
            dialect=dialect.name,
            path=request.path,
        )
        self.outbox: Outbox[Outgoing] = Outbox(limits.outbox_size, limits.overflow_policy)
        self._frame = transport.framer(dialect.text)
        self.subscriber = Subscriber(
            self.outbox,
            wire_encoder(dialect.encode_event, self._frame),
            max_topics=limits.max_subscriptions,
            label=self.info.id,
        )
        self.acked: dict[str, int] = {}
        """Last offset the client acknowledged, per topic."""
        self.closed: CloseInfo | None = None
        self._peer_close: PeerClosed | None = None
        self._reader_done = trio.Event()
        self._requests = trio.Semaphore(limits.max_pending_requests)
        self._nursery: trio.Nursery | None = None

    @property
    def id(self) -> str:
        return self.info.id

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
                nursery.start_soon(self._reader)
                nursery.start_soon(self._writer)
                nursery.start_soon(self._pinger)
        finally:
            self.outbox.close(CloseCode.ABNORMAL, "connection ended", flush=False)
            self.broker.detach(self.subscriber)
            with trio.CancelScope(shield=True):
                await self.transport.aclose()
        if self.closed is None:  # pragma: no cover - every path records how it ended
            self.closed = CloseInfo(CloseCode.ABNORMAL, "connection ended", "server")
        return self.closed

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
                    outbox.put(PongFrame(message.payload))
                    continue
                if outbox.closing is not None:
                    continue  # closing: read on only to see the peer's close frame
                for item in decode(message):
                    if type(item) is Error:
                        self._reply(item)
                    else:
                        await self._dispatch(item)
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
            self._end(CloseInfo(CloseCode.ABNORMAL, "connection lost", "client"))
        finally:
            self._reader_done.set()

    async def _dispatch(self, command: Any) -> None:
        kind = type(command)
        if kind is Publish:
            if self._topic_refused(command.topic, command.request_id):
                return
            try:
                try:
                    # Without yielding, so every publication of one socket read
                    # reaches the broker before it runs, as one batch.
                    self.broker.submit_nowait(
                        command.topic, command.payload, self._publish_reply(command)
                    )
                except trio.WouldBlock:
                    await self.broker.submit(
                        command.topic, command.payload, self._publish_reply(command)
                    )
            except TypeError as exc:  # a value orjson cannot write back (e.g. a huge int)
                self._reply(
                    Error(ErrorCode.INVALID_FIELD, str(exc), command.request_id, command.topic)
                )
        elif kind is Subscribe:
            self._subscribe(command)
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

    def _subscribe(self, command: Subscribe) -> None:
        if self._topic_refused(command.topic, command.request_id):
            return
        try:
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
        position = self.broker.position(command.topic)
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
        if self._topic_refused(command.topic, command.request_id):
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
            self._requests.release()
        self.outbox.put(frame)

    def _encode_error(self, code: str, message: str, request_id: Any, topic: str) -> WireMessage:
        return self._frame(self.dialect.encode_reply(Error(code, message, request_id, topic)))

    def _topic_refused(self, topic: str, request_id: Any) -> bool:
        if self.topic_filter.allows(topic):
            return False
        self._reply(
            Error(ErrorCode.UNKNOWN_TOPIC, f"topic {topic!r} is not served here", request_id, topic)
        )
        return True

    @staticmethod
    def _not_subscribed(topic: str, request_id: Any) -> Error:
        return Error(ErrorCode.NOT_SUBSCRIBED, f"not subscribed to {topic!r}", request_id, topic)

    def _reply(self, reply: Reply) -> None:
        self.outbox.put(self._frame(self.dialect.encode_reply(reply)))

    # --- writer -------------------------------------------------------------

    async def _writer(self) -> None:
        outbox = self.outbox
        while True:
            batch = await outbox.receive_batch()
            if batch:
                if not await self._send(batch):
                    return
                continue
            closing = outbox.closing
            assert closing is not None
            await self._send([CloseFrame(closing.code, closing.reason)])
            if self._peer_close is not None:
                self._end(CloseInfo(self._peer_close.code, self._peer_close.reason, "client"))
                return
            info = CloseInfo(closing.code, closing.reason, "server")
            self._end(info, cancel=False)
            with trio.move_on_after(self.limits.close_timeout):
                await self._reader_done.wait()
            self._end(info)
            return

    async def _send(self, batch: Iterable[Outgoing]) -> bool:
        try:
            await self.transport.send(batch, write_timeout=self.limits.write_timeout)
        except ConnectionLost:
            self._end(CloseInfo(CloseCode.ABNORMAL, "connection lost", "client"))
            return False
        except WriteTimeout:
            # Half a frame may be on the wire: the connection cannot be used
            # any more, only dropped.
            self._end(CloseInfo(CloseCode.ABNORMAL, "write timeout", "server"))
            return False
        return True

    # --- pinger -------------------------------------------------------------

    async def _pinger(self) -> None:
        transport = self.transport
        if not transport.supports_ping:
            return  # the transport's server keeps the connection alive
        interval = self.limits.ping_interval
        read_timeout = self.limits.read_timeout
        next_ping = trio.current_time() + interval
        while True:
            await trio.sleep_until(min(next_ping, transport.last_received + read_timeout))
            now = trio.current_time()
            if now >= transport.last_received + read_timeout:
                LOGGER.info("closing %s: silent for %.1f s", self.info.id, read_timeout)
                self.close(CloseCode.INTERNAL_ERROR, "read timeout", flush=False)
                return
            if now >= next_ping:
                self.outbox.put(PingFrame())
                next_ping = now + interval

    # --- ending -------------------------------------------------------------

    def _end(self, info: CloseInfo, *, cancel: bool = True) -> None:
        if self.closed is None:
            self.closed = info
        if cancel and self._nursery is not None:
            self._nursery.cancel_scope.cancel()
