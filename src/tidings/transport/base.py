"""The contract between a connection and the socket under it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final, Protocol, TypeAlias

import attrs
import orjson


@attrs.frozen(slots=True)
class PingFrame:
    payload: bytes = b""


@attrs.frozen(slots=True)
class PongFrame:
    payload: bytes = b""


@attrs.frozen(slots=True)
class CloseFrame:
    code: int
    reason: str = ""


ControlFrame: TypeAlias = PingFrame | PongFrame | CloseFrame
WireMessage: TypeAlias = bytes | str
"""One message as its transport sends it, made by the transport's framer."""
Outgoing: TypeAlias = WireMessage | ControlFrame
"""What a writer hands a transport: framed messages and control frames."""
Framer: TypeAlias = Callable[[bytes], WireMessage]
"""Turns one encoded message into its wire form."""


class TransportError(Exception):
    """Base of what :meth:`Transport.receive` and :meth:`Transport.send` raise."""


class ConnectionLost(TransportError):
    """The connection ended without a close handshake (EOF, reset, broken pipe)."""


class PeerClosed(TransportError):
    """The peer sent a close frame."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"peer closed the connection with {code} {reason!r}")
        self.code = code
        self.reason = reason


class ProtocolViolation(TransportError):
    """The peer broke the WebSocket rules; the connection must close with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class MessageTooBig(TransportError):
    """A message exceeded the size limit; the rest of it is skipped."""


class WriteTimeout(TransportError):
    """A write could not complete within its timeout; the connection is unusable."""


class Transport(Protocol):
    """One accepted client connection (a WebSocket, or an HTTP stream), as the
    connection code sees it.

    ``receive`` is called by one task (the reader) and the writing methods
    by one other (the writer, the only code that writes); a transport need
    not be safe for more.
    """

    remote: str
    """The peer's address, ``host:port``."""
    supports_ping: bool
    """Whether protocol pings can be sent and their pongs observed."""

    @property
    def last_received(self) -> float:
        """``trio.current_time()`` when bytes last arrived from the peer (read only:
        a transport whose peer never speaks, an HTTP stream, says now)."""
        ...

    async def receive(self) -> str | bytes | PingFrame:
        """The next message (text as str, binary as bytes), or a ping to answer.

        Raises:
            PeerClosed, ConnectionLost, ProtocolViolation, MessageTooBig.
        """
        ...

    def framer(self, text: bool) -> Framer:
        """The function that frames one message (text or binary) for this transport.

        The same function object for every connection of a transport kind, so
        the broker can frame each event once for all of them.
        """
        ...

    def frame_control(self, frame: ControlFrame) -> Outgoing:
        """A ping, pong or close frame in the form :meth:`try_send` takes it."""
        ...

    def try_send(self, items: Iterable[Outgoing]) -> object | None:
        """Write ``items`` (framed by :meth:`framer`) now, in one write, without waiting.

        Returns None when everything went out, else what is left, to hand to
        :meth:`send_rest` before anything else is sent. (A transport that can
        only write by waiting returns everything.)

        Raises:
            ConnectionLost.
        """
        ...

    async def send_rest(self, rest: object, *, write_timeout: float) -> None:
        """Write what :meth:`try_send` left, waiting for the peer to take it.

        ``write_timeout`` bounds a *stall*: the time the peer takes nothing at
        all. A peer that keeps reading, however slowly, is waited for.

        Raises:
            WriteTimeout: the peer took nothing for ``write_timeout`` seconds;
                part of a frame may be on the wire, so the caller must drop the
                connection.
            ConnectionLost.
        """
        ...

    async def aclose(self) -> None:
        """Drop the connection now (no close handshake); idempotent."""
        ...


@attrs.frozen(slots=True)
class UpgradeRequest:
    """The HTTP request that asked for a WebSocket, as the server saw it.

    It lives as long as the connection, so its headers are kept as one bytes
    object (``name: value`` lines, names lower-cased) rather than a tuple of
    string pairs: a few hundred bytes less on every idle connection.
    """

    path: str
    query: str
    raw_headers: bytes
    remote: str

    @classmethod
    def build(
        cls, path: str, query: str, headers: Iterable[tuple[bytes, bytes]], remote: str
    ) -> UpgradeRequest:
        raw = b"\n".join(name.lower() + b": " + value for name, value in headers)
        return cls(path, query, raw, remote)

    @property
    def headers(self) -> list[tuple[str, str]]:
        """Every header as ``(lower-case name, value)``, in order of arrival."""
        pairs = []
        for line in self.raw_headers.decode("latin-1").split("\n"):
            name, _, value = line.partition(": ")
            if name:
                pairs.append((name, value))
        return pairs

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower-case), or None."""
        # Found in the bytes, not in a parse of them all: admission asks for two
        # or three headers of every connection. Values hold no line feed (both
        # request parsers refuse one), so a line starts at the start or after one.
        key = name.encode("latin-1") + b": "
        raw = self.raw_headers
        if raw.startswith(key):
            start = len(key)
        else:
            found = raw.find(b"\n" + key)
            if found < 0:
                return None
            start = found + 1 + len(key)
        end = raw.find(b"\n", start)
        return raw[start : end if end >= 0 else len(raw)].decode("latin-1")


@attrs.define(slots=True)
class Admission:
    r"""An upgrade the handler accepted, with what it decided about it.

    Transports pass it from :meth:`ConnectionHandler.admit` to
    :meth:`ConnectionHandler.serve` without looking inside. The handler
    :meth:`take`\ s its contents: the transport's frame still holds the
    admission while the connection lives, and the request's headers need not.
    """

    request: UpgradeRequest
    context: Any = None

    def take(self) -> tuple[UpgradeRequest, Any]:
        """The request and the context, handed over once (the admission keeps neither)."""
        request, context = self.request, self.context
        self.request = _TAKEN
        self.context = None
        return request, context


@attrs.frozen(slots=True)
class Rejection:
    """Refuse an upgrade (or any request) with this HTTP status, code and message."""

    status: int
    message: str
    code: str = ""
    """A stable error code; ``http_<status>`` when empty."""

    def body(self) -> bytes:
        """The JSON body every refusal carries: ``{"error": {"code", "message"}}``."""
        code = self.code or f"http_{self.status}"
        return orjson.dumps({"error": {"code": code, "message": self.message}})


class ConnectionHandler(Protocol):
    """What a transport hands accepted WebSockets to (the server)."""

    def accepts(self, path: str) -> bool:
        """Whether ``path`` is a WebSocket endpoint (an upgrade elsewhere is plain HTTP)."""
        ...

    def stream_kind(self, path: str) -> str | None:
        """The kind of HTTP stream served at ``path`` (``sse``, ``ndjson``), or None.

        A GET there is admitted like an upgrade (:meth:`admit`) and served as a
        connection over a streaming response (:mod:`tidings.transport.sse`).
        """
        ...

    def allows_origin(self, origin: str | None) -> bool:
        """Whether a page of ``origin`` may read this node's streams (CORS preflights)."""
        ...

    async def admit(self, request: UpgradeRequest) -> Admission | Rejection:
        """Decide, before the upgrade completes, whether to take this client.

        It may wait (the application's connect hook), for ``proxy_timeout`` at
        most; the transport answers a :class:`Rejection` with its HTTP status.
        """
        ...

    def serve(self, transport: Transport, admission: Admission) -> Awaitable[object]:
        """What runs the connection until it ends; the transport awaits it at once.

        Not a coroutine function itself: the awaitable it returns is the
        connection's own, so no frame of the handler's waits under every
        connection for its whole life.
        """
        ...

    def release(self, admission: Admission) -> None:
        """An admitted upgrade failed before :meth:`serve`: give back what admit reserved."""
        ...


_TAKEN: Final = UpgradeRequest("", "", b"", "")
"""What an admission holds once its request was taken (a shared empty request)."""
