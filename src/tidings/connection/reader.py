"""The reader: reads the client's messages, decodes them, has them carried out.

What a client sends costs it, not the node:

* each command spends a token of its rate limit (when one is configured);
* before each command, even between the commands of one frame, the reader
  checks the client's byte budget: while more is queued toward the client
  than its budget (answers it does not read), the reader stops reading, so
  TCP pushes back on the client; if that lasts ``write_timeout``, the
  connection is closed (1008);
* a ping is answered with one coalesced pong, and pings beyond a generous
  rate (:data:`PING_BURST`, :data:`PING_RATE`) close the connection (1008);
* an oversized message closes with 1009, a protocol violation with 1002 or
  1007.

After the peer's close frame the reader's work is done; the writer answers it.
"""

from __future__ import annotations

import logging
from typing import Any, Final, Protocol

import trio

from ..app import ClientInfo
from ..broker.outbox import Outbox
from ..protocol.codes import CloseCode, ErrorCode
from ..protocol.dialect import Dialect
from ..protocol.messages import Error
from ..stats import NodeCounters
from ..transport.base import (
    ConnectionLost,
    MessageTooBig,
    Outgoing,
    PeerClosed,
    PingFrame,
    PongFrame,
    ProtocolViolation,
    Transport,
)
from .endpoint import Endpoint
from .lifecycle import Lifecycle
from .limits import ConnectionLimits
from .ratelimit import TokenBucket
from .writer import OVER_BUDGET_CODE, OVER_BUDGET_REASON

LOGGER = logging.getLogger("tidings.connection")

#: Pings a client may send at once, and per second after that: far beyond any
#: keepalive, far below a flood.
PING_BURST: Final = 100
PING_RATE: Final = 10.0


class Readable(Protocol):
    """What the reader needs of its connection."""

    @property
    def outbox(self) -> Outbox[Outgoing]: ...
    @property
    def transport(self) -> Transport: ...
    @property
    def lifecycle(self) -> Lifecycle: ...
    @property
    def limits(self) -> ConnectionLimits: ...
    @property
    def dialect(self) -> Dialect: ...
    @property
    def endpoint(self) -> Endpoint | None: ...
    @property
    def counters(self) -> NodeCounters: ...
    @property
    def info(self) -> ClientInfo: ...

    async def execute(self, command: Any) -> None: ...
    def reply(self, reply: Error) -> None: ...
    def frame_handled(self) -> None: ...
    def close(self, code: int, reason: str, *, flush: bool = True) -> None: ...
    def peer_closed(self, code: int, reason: str) -> None: ...
    def lose(self, reason: str, by: str) -> None: ...


async def run_reader(connection: Readable) -> None:
    """Read and handle the client's messages until the peer closes or is lost."""
    # Few locals, and none holding a message while it waits: every idle
    # client's reader is parked in receive() with this frame under it.
    transport = connection.transport
    outbox = connection.outbox
    endpoint = connection.endpoint
    frame_hooks = endpoint is not None and bool(endpoint.frame_hooks)
    rate = _RateLimit(connection) if connection.limits.rate_limit else None
    pings: TokenBucket | None = None  # made on the first ping
    try:
        while True:
            try:
                message = await transport.receive()
            except MessageTooBig as exc:
                reason = str(exc) or "message too big"
                connection.close(CloseCode.MESSAGE_TOO_BIG, reason, flush=False)
                continue
            if isinstance(message, PingFrame):
                if pings is None:
                    pings = TokenBucket(PING_RATE, PING_BURST, trio.current_time())
                if not pings.take(trio.current_time()):
                    if outbox.closing is None:
                        LOGGER.info("closing %s: ping flood", connection.info.id)
                        connection.close(CloseCode.POLICY_VIOLATION, "too many pings", flush=False)
                    continue
                outbox.put_pong(transport.frame_control(PongFrame(message.payload)))
                continue
            if outbox.closing is not None:
                continue  # closing: read on only to see the peer's close frame
            items = connection.dialect.decode(message)
            message = None  # type: ignore[assignment]
            for item in items:
                if outbox.over_budget:
                    await _wait_for_budget(connection)
                if outbox.closing is not None:
                    break
                if rate is not None and not rate.allows(item):
                    break
                await connection.execute(item)
            items = item = None  # type: ignore[assignment]
            if frame_hooks:
                connection.frame_handled()
    except PeerClosed as exc:
        connection.peer_closed(exc.code, exc.reason)
    except ProtocolViolation as exc:
        connection.close(exc.code, exc.reason, flush=False)
        connection.lifecycle.stopped_reading()
    except ConnectionLost:
        connection.lose("connection lost", "client")


async def _wait_for_budget(connection: Readable) -> None:
    """More is queued toward the client than its budget: stop reading until it reads.

    TCP then pushes back on the client. One that does not read for
    ``write_timeout`` is closed.
    """
    grace = connection.limits.write_timeout
    with trio.move_on_after(grace):
        await connection.outbox.wait_within_budget()
        return
    if connection.outbox.closing is None:
        LOGGER.info(
            "closing %s: %d bytes queued and not read for %.1f s",
            connection.info.id,
            connection.outbox.queued_bytes,
            grace,
            extra={"event": "over_budget", "client": connection.info.id},
        )
        connection.close(OVER_BUDGET_CODE, OVER_BUDGET_REASON, flush=False)


class _RateLimit:
    """The client's message rate limit: a token per message, close after N violations."""

    __slots__ = ("_bucket", "_connection", "_violations")

    def __init__(self, connection: Readable) -> None:
        limits = connection.limits
        burst = limits.rate_burst or limits.rate_limit
        self._bucket = TokenBucket(limits.rate_limit, burst, trio.current_time())
        self._connection = connection
        self._violations = 0

    def allows(self, item: Any) -> bool:
        """Spend a token on one message; over the limit, answer rate_limited (or close)."""
        if self._bucket.take(trio.current_time()):
            return True
        connection = self._connection
        self._violations += 1
        connection.counters.rate_limited += 1
        limit = connection.limits.rate_limit_violations
        if limit and self._violations >= limit:
            LOGGER.info("closing %s: %d messages over its rate limit", connection.info.id, limit)
            # Flushed: the replies queued before it (bounded by the rate limit)
            # tell the client what it sent got done and why it is closed.
            connection.close(CloseCode.RATE_LIMITED, "rate limited")
            return False
        request_id = getattr(item, "request_id", None)
        connection.reply(Error(ErrorCode.RATE_LIMITED, "too many messages; slow down", request_id))
        return False
