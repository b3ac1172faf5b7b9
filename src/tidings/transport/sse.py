r"""HTTP streams: Server-Sent Events and newline-delimited JSON, as transports.

A stream is a GET answered with ``200`` and a body that never ends on its own:
the connection writes events into it as the broker offers them, and it ends
when the client goes away or the server closes it. To the connection it is
a :class:`~tidings.transport.base.Transport` like a WebSocket (the same
nursery, outbox, budgets and overflow policy), with these differences:

* **Nothing is read**: :meth:`receive` only waits for the client to leave
  (end of file, or ASGI's ``http.disconnect``). A client that sends bytes
  anyway (more than :data:`MAX_INPUT`) is closed.
* **Heartbeats are comments** (``:`` for SSE, an empty line for NDJSON), sent
  every ``ping_interval`` as the connection's pings; no answer is expected,
  so there is no read timeout: a peer that is gone fails the next write.
* **The close frame is a last message** (``event: close`` with the code and
  reason, or a ``{"type":"close",...}`` line), then the end of the body:
  the write side is shut, and the client's end of file finishes the close.
* **Each SSE event gets its id line here**, from the stream's :class:`Numbering`
  (see :mod:`tidings.protocol.sse`), in front of bytes shared by every
  client. The framing itself is the dialect's; the framer passes it through.

Two implementations: :class:`SocketEventStream` for the built-in server (its
own non-blocking writes of whole batches, as the WebSocket transport does),
and :class:`AsgiEventStream` for an ASGI server's streaming response.

The response head, CORS, and the answers to preflight requests are here too:
an ``EventSource`` on another origin (``withCredentials`` or not) gets its own
origin echoed with ``Access-Control-Allow-Credentials: true``, once the
handler's origin policy allowed it.
"""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Iterable, MutableMapping
from typing import Any, Final, Protocol

import orjson
import trio

from .base import (
    CloseFrame,
    ConnectionLost,
    ControlFrame,
    Framer,
    Outgoing,
    PingFrame,
    ProtocolViolation,
    WireMessage,
)
from .fdio import read_now, write_now, write_rest
from .http1 import http_head

SSE: Final = "sse"
NDJSON: Final = "ndjson"
CONTENT_TYPES: Final = {
    SSE: b"text/event-stream; charset=utf-8",
    NDJSON: b"application/x-ndjson",
}
#: Bytes a client may send on a stream after its request before it is closed
#: (it has nothing to say; a few stray bytes are forgiven).
MAX_INPUT: Final = 4096
_READ_SIZE: Final = 4096
_HEARTBEATS: Final = {SSE: b":\n\n", NDJSON: b"\n"}
#: A close reason's suggested reconnect delay (a shutdown's): ``...; retry=<ms>``.
_RETRY_HINT: Final = re.compile(r"; retry=(\d{1,7})$")
#: Headers every stream response carries: never cached, never buffered by a proxy
#: (nginx reads X-Accel-Buffering), and the body's end is the connection's.
_STREAM_HEADERS: Final = (
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
    (b"x-content-type-options", b"nosniff"),
)
_PREFLIGHT_HEADERS: Final = (
    (b"access-control-allow-methods", b"GET"),
    (b"access-control-allow-headers", b"authorization, last-event-id, cache-control"),
    (b"access-control-max-age", b"600"),
)


class Numbering(Protocol):
    """Renders a stream's items into bytes, each SSE event with the stream's own id."""

    def render(self, items: list[Outgoing]) -> bytes:
        """The bytes of ``items``; called for every batch, in order."""
        ...


def cors_headers(origin: str | None) -> list[tuple[bytes, bytes]]:
    """What lets a page of ``origin`` (already allowed) read the response, cookies or not."""
    if not origin:
        return []
    return [
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"access-control-allow-credentials", b"true"),
        (b"vary", b"origin"),
    ]


def response_headers(kind: str, origin: str | None) -> list[tuple[bytes, bytes]]:
    """The headers of an accepted stream."""
    return [(b"content-type", CONTENT_TYPES[kind]), *_STREAM_HEADERS, *cors_headers(origin)]


def preflight_headers(origin: str | None) -> list[tuple[bytes, bytes]]:
    """The answer to a CORS preflight (``OPTIONS``) from an allowed origin."""
    return [*cors_headers(origin), *_PREFLIGHT_HEADERS]


def response_head(kind: str, origin: str | None) -> bytes:
    """The HTTP/1.1 head of an accepted stream, as the built-in server writes it.

    Written by hand rather than through h11, which would frame the body as
    chunks: the body ends when the connection does (``connection: close``),
    so each write carries events and nothing else.
    """
    return http_head(200, [*response_headers(kind, origin), (b"connection", b"close")])


class _Closing(bytes):
    """A stream's last message: once it is written, the body ends."""


def close_message(kind: str, code: int, reason: str) -> bytes:
    """Why the stream ends, as a close frame would say it.

    A reason that suggests when to come back (a shutdown's ``; retry=<ms>``,
    random per client) becomes the SSE stream's ``retry:`` as well: the
    browser's own reconnect then waits that long, so the pages of a node that
    restarts come back spread out.
    """
    body = orjson.dumps({"type": "close", "code": code, "reason": reason})
    if kind == SSE:
        hint = _RETRY_HINT.search(reason)
        retry = b"retry: %s\n" % hint[1].encode() if hint else b""
        return _Closing(retry + b"event: close\ndata: " + body + b"\n\n")
    return _Closing(body + b"\n")


def _as_is(data: bytes) -> WireMessage:
    """The stream dialects frame their own messages."""
    return data


class EventStream:
    """What both stream transports share: framing, control messages, id lines."""

    __slots__ = ()

    supports_ping = True
    """Heartbeats go out every ``ping_interval``; no answer comes, none is awaited."""

    remote: str
    kind: str
    numbering: Numbering | None

    @property
    def last_received(self) -> float:
        """Always now: a stream's client never speaks, and its silence means nothing.
        A peer that is gone is found by the writes (heartbeats) that fail."""
        return trio.current_time()

    def framer(self, text: bool) -> Framer:
        return _as_is

    def frame_control(self, frame: ControlFrame) -> bytes:
        if type(frame) is PingFrame:
            return _HEARTBEATS[self.kind]
        if type(frame) is CloseFrame:
            return close_message(self.kind, frame.code, frame.reason)
        return b""  # a pong: nobody pings a stream

    def _render(self, items: list[Outgoing]) -> bytes:
        """The bytes of ``items``: as they are, or as the stream's numbering writes them."""
        numbering = self.numbering
        if numbering is None:
            return b"".join(items)  # type: ignore[arg-type]  # streams carry bytes only
        return numbering.render(items)


class SocketEventStream(EventStream):
    """A stream on the built-in server's socket (a :class:`~tidings.transport.base.Transport`)."""

    __slots__ = ("_closed", "_ending", "_fd", "_received", "_socket", "kind", "numbering", "remote")

    def __init__(
        self, sock: socket.socket, remote: str, kind: str, *, trailing_data: bytes = b""
    ) -> None:
        # The bare non-blocking socket, as the WebSocket transport takes it.
        self._socket = sock
        self._fd = sock.fileno()
        self.remote = remote
        self.kind = kind
        self.numbering: Numbering | None = None
        """Set by whoever runs the stream, before anything is written (SSE)."""
        self._received = len(trailing_data)
        self._ending = False  # the close message is being written: then the body ends
        self._closed = False

    async def receive(self) -> str | bytes | PingFrame:
        """Wait for the client to go away (raises); bytes it sends are read and dropped."""
        while True:
            if self._received > MAX_INPUT:
                raise ProtocolViolation(1008, "a stream takes no data from the client")
            data = read_now(self._fd, _READ_SIZE)
            if data is None:
                await trio.lowlevel.wait_readable(self._fd)
                continue
            self._received += len(data)
            await trio.lowlevel.checkpoint()

    def try_send(self, items: Iterable[Outgoing]) -> memoryview | None:
        """One non-blocking write of the whole batch, as the WebSocket transport does."""
        if self._closed:
            raise ConnectionLost
        batch = items if isinstance(items, list) else list(items)
        if batch and type(batch[-1]) is _Closing:
            self._ending = True
        rest = write_now(self._fd, self._render(batch))
        if rest is None:
            self._end_body()
        return rest

    async def send_rest(self, rest: object, *, write_timeout: float) -> None:
        assert isinstance(rest, memoryview)
        await write_rest(self._fd, rest, write_timeout, lambda: self._closed)
        self._end_body()

    def _end_body(self) -> None:
        """After the close message: shut our side, so the client sees the end and leaves."""
        if self._ending:
            self._ending = False
            with contextlib.suppress(OSError):  # already gone: the reader finds out
                self._socket.shutdown(socket.SHUT_WR)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self._socket)
            self._socket.close()
            await trio.lowlevel.checkpoint()


Receive = Any
Send = Any


class AsgiEventStream(EventStream):
    """A stream as an ASGI streaming response (hypercorn's Trio worker).

    ``http.response.start`` has gone out before the connection runs; each
    batch is one ``http.response.body`` with ``more_body``, the close
    message the last one. As for WebSockets under ASGI, writes wait as long
    as the server makes them: ``write_timeout`` cannot cut off a client that
    stopped reading (``docs/transports.md``).
    """

    def __init__(self, receive: Receive, send: Send, remote: str, kind: str) -> None:
        self._receive = receive
        self._send = send
        self.remote = remote
        self.kind = kind
        self.numbering: Numbering | None = None
        self._received = 0
        self._closed = False

    async def receive(self) -> str | bytes | PingFrame:
        while True:
            message: MutableMapping[str, Any] = await self._receive()
            if message["type"] != "http.request":  # http.disconnect
                self._closed = True
                raise ConnectionLost
            self._received += len(message.get("body", b""))
            if self._received > MAX_INPUT:
                raise ProtocolViolation(1008, "a stream takes no data from the client")

    def try_send(self, items: Iterable[Outgoing]) -> list[Outgoing]:
        # ASGI has no write that does not wait: everything goes through send_rest.
        if self._closed:
            raise ConnectionLost
        return list(items)

    async def send_rest(self, rest: object, *, write_timeout: float) -> None:
        assert isinstance(rest, list)
        if self._closed:
            raise ConnectionLost
        ending = bool(rest) and type(rest[-1]) is _Closing
        body = self._render(rest)
        try:
            await self._send({"type": "http.response.body", "body": body, "more_body": not ending})
        except OSError as exc:
            self._closed = True
            raise ConnectionLost from exc
        if ending:
            self._closed = True

    async def aclose(self) -> None:
        self._closed = True
