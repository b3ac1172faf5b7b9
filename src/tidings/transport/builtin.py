"""tidings' own HTTP/1.1 and WebSocket server, on h11 and Trio streams.

Why our own (``docs/transports.md`` has the figures): the write timeout must
really cut off a client that stopped reading, which needs a cancellable write
(hypercorn shields its sends); shutdown must send every client a 1001 close
frame; and fan-out wants each batch of frames written with one ``send_all``.
h11 parses requests, but for a connection's first request when it is a
plain WebSocket upgrade (``http1.py``: a sixth of a handshake's CPU time);
the frames clients send are parsed by our own parser (``frames.py``: a few
slots per connection where wsproto's parser was several objects, and less
work per frame); the frames we send are built here, because a server frame
is a two-to-ten-byte header in front of the payload and nothing more.

Plain HTTP requests (``/health`` and the rest) are passed to an ASGI app, so
the same routes serve here and under any ASGI server.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import logging
import os
import resource
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from http import HTTPStatus
from typing import Any, Final, cast
from urllib.parse import unquote

import h11
import trio

from .base import (
    Admission,
    CloseFrame,
    ConnectionHandler,
    ConnectionLost,
    ControlFrame,
    Framer,
    MessageTooBig,
    Outgoing,
    PeerClosed,
    PingFrame,
    PongFrame,
    Rejection,
    Transport,
    UpgradeRequest,
)
from .deflate import DeflateFramer, InboundDeflate, negotiate
from .fdio import read_now, write_now, write_rest
from .frames import BINARY, CLOSE, PING, FrameParser
from .http1 import END_OF_HEAD, UpgradeHead, http_head, parse_upgrade
from .sse import SocketEventStream, cors_headers, preflight_headers, response_head

LOGGER = logging.getLogger("tidings.transport")

ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]

RECEIVE_SIZE: Final = 65536
#: The name of every connection's first task (the handshake, then the connection).
CONNECTION_TASK: Final = "tidings.transport.connection"
#: Errors of accept() that mean "out of resources for now", not "broken".
ACCEPT_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF: Final = 0.1
OVERLOAD_LOG_INTERVAL: Final = 10.0
#: Connections accepted in a row before the accept loop lets others run.
ACCEPT_BURST: Final = 64
#: Frames handled in one go before other tasks get a turn (a read can hold
#: thousands of tiny ones).
FRAMES_PER_TURN: Final = 256
#: Fragments one message may arrive in (frames of a large message as it
#: arrives count too): no client needs more; a flood of tiny ones is an attack.
MAX_FRAGMENTS: Final = 4096
MAX_REQUEST_HEAD: Final = 16 * 1024
MAX_REQUEST_BODY: Final = 1024 * 1024
MAX_REQUESTS_PER_CONNECTION: Final = 100
WEBSOCKET_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_TEXT: Final = 0x81  # FIN + opcode
_BINARY: Final = 0x82
_CLOSE: Final = 0x88
_PING: Final = 0x89
_PONG: Final = 0x8A
_pack_short = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack
_MAX_CLOSE_REASON: Final = 123  # a control frame carries 125 bytes; 2 are the code


def frame_header(first_byte: int, length: int) -> bytes:
    """The header of an unmasked (server-to-client) frame with a payload of ``length``."""
    if length < 126:
        return bytes((first_byte, length))
    if length < 65536:
        return _pack_short(first_byte, 126, length)
    return _pack_long(first_byte, 127, length)


def frame_text(data: bytes) -> bytes:
    """A complete server text frame; the same bytes suit every connection."""
    return frame_header(_TEXT, len(data)) + data


def frame_binary(data: bytes) -> bytes:
    """A complete server binary frame."""
    return frame_header(_BINARY, len(data)) + data


def frame_control(item: ControlFrame) -> bytes:
    """A complete server control frame."""
    if type(item) is PingFrame:
        return frame_header(_PING, len(item.payload)) + item.payload
    if type(item) is PongFrame:
        return frame_header(_PONG, len(item.payload)) + item.payload
    assert type(item) is CloseFrame
    payload = _close_payload(item.code, item.reason)
    return frame_header(_CLOSE, len(payload)) + payload


def _close_payload(code: int, reason: str) -> bytes:
    encoded = reason.encode()[:_MAX_CLOSE_REASON]
    # Never cut a multi-byte character in half: the peer would fail with 1007.
    encoded = encoded.decode("utf-8", "ignore").encode()
    return struct.pack("!H", code) + encoded


class PartialBudget:
    """Bytes of unfinished messages (fragments, frames still arriving) held for all
    clients of a server: a node-wide cap, so that many clients each holding part
    of a large message cannot add up to more than the node allows."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        """0: no node-wide cap (each message is still bounded by its own limit)."""
        self.held = 0

    def reserve(self, nbytes: int) -> bool:
        if self.limit and self.held + nbytes > self.limit:
            return False
        self.held += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.held -= nbytes


class WebSocketStream:
    """A :class:`~tidings.transport.base.Transport` over a non-blocking socket."""

    supports_ping = True

    __slots__ = (
        "_budget",
        "_closed",
        "_fd",
        "_fragments",
        "_frames",
        "_inflate",
        "_partial",
        "_partial_text",
        "_skipping",
        "_socket",
        "last_received",
        "max_message_size",
        "remote",
    )

    def __init__(
        self,
        sock: socket.socket,
        remote: str,
        *,
        max_message_size: int,
        trailing_data: bytes = b"",
        partial_budget: PartialBudget | None = None,
        inflate: InboundDeflate | None = None,
    ) -> None:
        # The bare (non-blocking) socket: no wrapper object lives as long as the
        # connection, and reads and writes go straight to the descriptor.
        self._socket = sock
        self._fd = sock.fileno()
        # Only parsing is needed (we build the frames we send). With
        # compression, ``inflate`` inflates for the parser (and holds the
        # server's compressing framers: one slot less per client).
        self._frames = FrameParser(inflate)
        self._inflate = inflate
        if trailing_data:
            self._frames.feed(trailing_data)
        self.remote = remote
        self.max_message_size = max_message_size
        self.last_received = trio.current_time()
        # An unfinished message, as UTF-8 or raw bytes: one buffer, not a
        # Python object per fragment (2-byte fragments cost 30x their size so).
        self._partial: bytearray | None = None
        self._partial_text = False
        self._fragments = 0
        self._budget = partial_budget or _NO_BUDGET
        self._skipping = False
        self._closed = False

    async def receive(self) -> str | bytes | PingFrame:
        frames = self._frames
        if self._inflate is not None:
            # Paced: a client's compressed messages inflate within a budget.
            delay = self._inflate.wait(trio.current_time())
            if delay > 0:
                await trio.sleep(delay)
        while True:
            handled = 0
            # At most FRAMES_PER_TURN: a read of tiny frames lets others
            # run before the rest.
            while handled < FRAMES_PER_TURN:
                frame = frames.next_frame()
                if frame is None:
                    break
                handled += 1
                opcode, payload, finished = frame
                if opcode <= BINARY:  # a message, or a piece of one
                    if self._inflate is not None and self._inflate.too_big:
                        self._inflate.too_big = False
                        self._drop_partial(finished)
                        raise MessageTooBig("message too big")
                    message = self._assemble(payload, finished)
                    if message is not None:
                        return message
                elif opcode == PING:
                    return PingFrame(cast(bytes, payload))
                elif opcode == CLOSE:
                    code, reason = cast(tuple[int, str], payload)
                    raise PeerClosed(code, reason)
                # PONG: its arrival already counts as activity.
            if handled == FRAMES_PER_TURN:
                await trio.lowlevel.checkpoint()
                continue
            # Straight to the socket, not through SocketStream.receive_some:
            # fewer frames on the stack of every idle connection.
            data = read_now(self._fd, RECEIVE_SIZE)
            if data is None:
                await trio.lowlevel.wait_readable(self._fd)
                continue
            self.last_received = trio.current_time()
            frames.feed(data)
            del data
            await trio.lowlevel.checkpoint()  # a peer that never stops sending still yields

    def _assemble(self, data: Any, finished: bool) -> str | bytes | None:
        """Reassemble a fragmented message, within its size limit and the node's budget."""
        if self._skipping:
            self._skipping = not finished
            return None
        partial = self._partial
        if partial is None:
            if finished:  # a whole message in one frame: the common case
                if _size(data) > self.max_message_size:
                    raise MessageTooBig
                return data  # type: ignore[no-any-return]
            partial = self._partial = bytearray()
            self._partial_text = isinstance(data, str)
            self._fragments = 0
        self._fragments += 1
        if self._fragments > MAX_FRAGMENTS:
            self._drop_partial(finished)
            raise MessageTooBig(f"a message of more than {MAX_FRAGMENTS} fragments")
        chunk = data.encode() if isinstance(data, str) else data
        if len(partial) + len(chunk) > self.max_message_size:
            self._drop_partial(finished)
            raise MessageTooBig("message too big")
        if not self._budget.reserve(len(chunk)):
            self._drop_partial(finished)
            raise MessageTooBig("the server holds too many unfinished messages")
        partial += chunk
        if not finished:
            return None
        self._partial = None
        self._budget.release(len(partial))
        # The parser checked the UTF-8 as it arrived.
        return partial.decode() if self._partial_text else bytes(partial)

    def _drop_partial(self, finished: bool) -> None:
        if self._partial is not None:
            self._budget.release(len(self._partial))
            self._partial = None
        self._skipping = not finished

    def framer(self, text: bool) -> Framer:
        if self._inflate is not None:  # compression negotiated: the server's framers
            return self._inflate.framers[0 if text else 1]
        return frame_text if text else frame_binary

    def frame_control(self, frame: ControlFrame) -> bytes:
        return frame_control(frame)

    def try_send(self, items: Iterable[Outgoing]) -> memoryview | None:
        """One ``write`` on the non-blocking socket, which almost always takes it all."""
        if self._closed:
            raise ConnectionLost
        # Control frames were framed when queued: every item is bytes here.
        return write_now(self._fd, b"".join(items))  # type: ignore[arg-type]

    async def send_rest(self, rest: object, *, write_timeout: float) -> None:
        assert isinstance(rest, memoryview)
        await write_rest(self._fd, rest, write_timeout, lambda: self._closed)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._drop_partial(True)
            trio.lowlevel.notify_closing(self._socket)
            self._socket.close()
            await trio.lowlevel.checkpoint()


def _size(data: Any) -> int:
    """The size of a message in bytes (a str: as UTF-8)."""
    if isinstance(data, str):
        return len(data) if data.isascii() else len(data.encode())
    return len(data)


_NO_BUDGET: Final = PartialBudget(0)


class _Socket:
    """The little of a stream the handshake needs, straight on a non-blocking socket.

    trio's SocketStream would wrap each read and write in a context manager
    and a conflict detector; a handshake makes few of them, but 10,000
    clients reconnecting at once make 10,000 handshakes.
    """

    __slots__ = ("fd", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()

    async def receive_some(self, max_bytes: int) -> bytes:
        while True:
            try:
                return os.read(self.fd, max_bytes)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise trio.BrokenResourceError from exc
            await trio.lowlevel.wait_readable(self.fd)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
                continue
            except BlockingIOError:
                pass
            except OSError as exc:
                raise trio.BrokenResourceError from exc
            await trio.lowlevel.wait_writable(self.fd)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()


def _remote(address: Any) -> tuple[str, int]:
    try:
        host, port, *_ = address
    except (TypeError, ValueError):
        return ("unknown", 0)
    return (str(host), int(port))


async def open_listeners(
    host: str, port: int, *, backlog: int, reuse_port: bool = False
) -> list[socket.socket]:
    """Non-blocking listening sockets for every address ``host`` resolves to.

    As ``trio.open_tcp_listeners`` makes them (SO_REUSEADDR, IPv6 only on IPv6
    sockets), but bare: the accept loop takes connections straight from them.
    With ``reuse_port``, several processes may listen on the same port
    (SO_REUSEPORT; the kernel spreads connections between them).
    """
    infos = await trio.socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


def _accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + WEBSOCKET_GUID).digest())


def _ambiguous_length(request: h11.Request) -> bool:
    names = {name for name, _ in request.headers}
    return b"content-length" in names and b"transfer-encoding" in names


def _is_upgrade(request: h11.Request) -> bool:
    upgrade = connection = b""
    for name, value in request.headers:
        if name == b"upgrade":
            upgrade = value.lower()
        elif name == b"connection":
            connection = value.lower()
    return upgrade == b"websocket" and b"upgrade" in connection


class BuiltinServer:
    """Accepts TCP connections, upgrades the handler's endpoints to WebSocket, serves HTTP.

    Before the upgrade a connection costs a descriptor and a task; so
    connections still in their handshake are bounded too: at
    ``max_pending`` (never more than half the process's descriptors)
    accepting pauses and the kernel's backlog holds the rest, and an address
    with ``max_pending_per_ip`` handshakes already pending has its new
    connections closed at once. When the process runs out of descriptors,
    accepting backs off, with one log line per interval.
    """

    def __init__(
        self,
        handler: ConnectionHandler,
        http_app: ASGIApp,
        *,
        max_message_size: int,
        handshake_timeout: float,
        backlog: int = 4096,
        max_pending: int = 4096,
        max_pending_per_ip: int = 0,
        max_partial_bytes: int = 0,
        compression_min_size: int | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.handler = handler
        self.backlog = backlog
        self.reuse_port = reuse_port
        self.http_app = http_app
        self.max_message_size = max_message_size
        self.handshake_timeout = handshake_timeout
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        descriptors = soft // 2 if soft != resource.RLIM_INFINITY else max_pending
        self.max_pending = max(1, min(max_pending, descriptors))
        self.max_pending_per_ip = max_pending_per_ip
        self.partial_budget = PartialBudget(max_partial_bytes)
        self.framers: tuple[DeflateFramer, DeflateFramer] | None = None
        """With compression on (``compression_min_size`` given), the framers every
        compressed connection shares: each event is compressed once for all."""
        if compression_min_size is not None:
            self.framers = (
                DeflateFramer(True, compression_min_size),
                DeflateFramer(False, compression_min_size),
            )
        self.pending = 0
        """Connections accepted and not yet upgraded (or done with plain HTTP)."""
        self.refused = 0
        """Connections closed at once: their address had too many pending."""
        self._pending_by_host: dict[str, int] = {}
        self._room: trio.Event | None = None
        self._overload_logged = -OVERLOAD_LOG_INTERVAL
        self._overloads = 0

    async def serve(
        self,
        host: str,
        port: int,
        handler_nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen and accept until cancelled; connections live in ``handler_nursery``.

        Cancelling this task stops accepting without touching connections that
        are already open, which is the first step of a graceful shutdown.
        """
        listeners = await open_listeners(
            host, port, backlog=self.backlog, reuse_port=self.reuse_port
        )
        try:
            task_status.started([_address(listener) for listener in listeners])
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener, handler_nursery)
        finally:
            for listener in listeners:
                trio.lowlevel.notify_closing(listener)
                listener.close()

    async def _accept_loop(self, listener: socket.socket, connections: trio.Nursery) -> None:
        accepted = 0
        while True:
            while self.pending >= self.max_pending:
                self._room = self._room or trio.Event()
                await self._room.wait()
            try:
                sock, address = listener.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listener)
                continue
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                self._overloaded(exc)
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            remote = _remote(address)
            host = remote[0]
            cap = self.max_pending_per_ip
            if cap and self._pending_by_host.get(host, 0) >= cap:
                self.refused += 1
                sock.close()  # no task, no handshake: gone at once
                continue
            sock.setblocking(False)
            # Frames are written whole, each batch in one write: never wait
            # for an ACK to send the next (Nagle).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.pending += 1
            self._pending_by_host[host] = self._pending_by_host.get(host, 0) + 1
            connections.start_soon(self.handle_stream, sock, remote, name=CONNECTION_TASK)
            accepted += 1
            if accepted % ACCEPT_BURST == 0:
                # The backlog may hold thousands (a reconnect storm): let the
                # handshakes begin between bursts.
                await trio.lowlevel.checkpoint()

    def _overloaded(self, exc: OSError) -> None:
        """Out of descriptors (or memory): one line per interval, not per accept."""
        self._overloads += 1
        now = trio.current_time()
        if now - self._overload_logged >= OVERLOAD_LOG_INTERVAL:
            LOGGER.error(
                "cannot accept connections: %s (%d times since the last report); backing off",
                exc.strerror or exc,
                self._overloads,
                extra={"event": "accept_overload", "errno": exc.errno, "count": self._overloads},
            )
            self._overload_logged = now
            self._overloads = 0

    def _handshake_done(self, host: str) -> None:
        self.pending -= 1
        left = self._pending_by_host.pop(host, 1) - 1
        if left > 0:
            self._pending_by_host[host] = left
        if self._room is not None and self.pending < self.max_pending:
            self._room.set()
            self._room = None

    async def handle_stream(self, sock: socket.socket, remote: tuple[str, int]) -> None:
        """Serve one TCP connection: HTTP requests, or one WebSocket."""
        stream: _Socket | None = _Socket(sock)
        del sock
        try:
            try:
                # The handshake returns before the WebSocket is served, so that the
                # h11 objects die with its frame instead of living as long as the
                # connection.
                assert stream is not None
                accepted = await self._http(stream, remote)
            finally:
                self._handshake_done(remote[0])
            if accepted is not None:
                stream = None  # the transport owns the socket now
                transport, admission = accepted
                del accepted
                await self.handler.serve(transport, admission)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except Exception:
            # One connection's failure must never reach the nursery all
            # connections share.
            LOGGER.exception("error while serving %s:%s", *remote)
        finally:
            if stream is not None:
                stream.close()

    async def _http(
        self, stream: _Socket, remote: tuple[str, int]
    ) -> tuple[Transport, Admission] | None:
        """Answer HTTP requests until one upgrades to WebSocket or opens a stream
        (returned), or the end."""
        http = None
        try:
            for served in range(1, MAX_REQUESTS_PER_CONNECTION + 1):
                # One scope per request, its head and its handling (an upgrade, or
                # a plain request): a cancel scope is not free, and a reconnect
                # storm makes thousands of handshakes.
                with trio.move_on_after(self.handshake_timeout):
                    if http is None:
                        # A first request: most are a WebSocket upgrade, taken
                        # without h11; the rest go to h11 with the same bytes.
                        first = await self._first_request(stream, remote)
                        if not isinstance(first, h11.Connection):
                            return first
                        http = first
                    request = await self._read_request(stream, http)
                    if request is None:  # closed
                        return None
                    if _ambiguous_length(request):
                        # RFC 9112 6.3: both headers may be a smuggling attempt;
                        # answer and close.
                        reason = "both Content-Length and Transfer-Encoding"
                        await self._respond(stream, http, Rejection(400, reason, "bad_request"))
                        return None
                    path = unquote(request.target.split(b"?", 1)[0].decode("latin-1"))
                    if self.handler.accepts(path) and _is_upgrade(request):
                        return await self._upgrade(stream, http, request, remote)
                    kind = self.handler.stream_kind(path)
                    if kind is not None:
                        return await self._stream(stream, http, request, remote, kind)
                    await self._serve_http(
                        stream, http, request, remote, last=served == MAX_REQUESTS_PER_CONNECTION
                    )
                    if http.our_state is not h11.DONE or http.their_state is not h11.DONE:
                        return None
                    http.start_next_cycle()
                    continue
                return None  # idle, or slow, past the handshake timeout
        except h11.RemoteProtocolError as exc:
            with trio.move_on_after(1):
                if http is not None and http.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await self._respond(
                        stream, http, Rejection(exc.error_status_hint, "bad request")
                    )
        return None

    async def _first_request(
        self, stream: _Socket, remote: tuple[str, int]
    ) -> tuple[WebSocketStream, Admission] | h11.Connection | None:
        """Read a connection's first request head: an upgrade :func:`parse_upgrade`
        takes is answered here; otherwise an h11 connection that holds the bytes
        read. None if the client closed first."""
        data = await stream.receive_some(RECEIVE_SIZE)
        while data and END_OF_HEAD not in data and len(data) <= MAX_REQUEST_HEAD:
            more = await stream.receive_some(RECEIVE_SIZE)
            if not more:
                return None
            data += more
        if not data:
            return None
        end = data.find(END_OF_HEAD) + len(END_OF_HEAD)
        head = parse_upgrade(data[:end]) if end >= len(END_OF_HEAD) else None
        if head is not None:
            path = unquote(head.target.split(b"?", 1)[0].decode("latin-1"))
            if self.handler.accepts(path):
                return await self._accept(stream, head, path, data[end:], remote)
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        http.receive_data(data)
        return http

    async def _accept(
        self,
        stream: _Socket,
        head: UpgradeHead,
        path: str,
        trailing: bytes,
        remote: tuple[str, int],
    ) -> tuple[WebSocketStream, Admission] | None:
        """Accept (101) or refuse an upgrade :func:`parse_upgrade` took: no h11 involved."""
        _, _, query = head.target.decode("latin-1").partition("?")
        upgrade = UpgradeRequest.build(
            # Interned: every client of an endpoint shares its path's string.
            sys.intern(path),
            query,
            head.headers,
            f"{remote[0]}:{remote[1]}",
        )
        admission = await self.handler.admit(upgrade)
        if isinstance(admission, Rejection):
            body = admission.body()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            await stream.send_all(http_head(admission.status, headers) + body)
            return None
        answer = [
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", _accept_key(head.key)),
        ]
        deflate = self._negotiate(head.headers, answer)
        try:
            await stream.send_all(http_head(101, answer))
        except BaseException:
            self.handler.release(admission)  # serve() will not run to give it back
            raise
        return self._websocket(stream, upgrade, trailing, deflate), admission

    def _negotiate(
        self, headers: list[tuple[bytes, bytes]], answer: list[tuple[bytes, bytes]]
    ) -> str | None:
        """permessage-deflate, if the server compresses and the client offers it
        (the answer's header is appended to ``answer``)."""
        if self.framers is None:
            return None
        offers = [v.decode("latin-1") for n, v in headers if n == b"sec-websocket-extensions"]
        deflate = negotiate(offers) if offers else None
        if deflate is not None:
            answer.append((b"sec-websocket-extensions", deflate.encode()))
        return deflate

    def _websocket(
        self, stream: _Socket, upgrade: UpgradeRequest, trailing: bytes, deflate: str | None
    ) -> WebSocketStream:
        return WebSocketStream(
            stream.sock,
            upgrade.remote,
            max_message_size=self.max_message_size,
            trailing_data=trailing,
            partial_budget=self.partial_budget,
            inflate=InboundDeflate(self.max_message_size, self.framers, now=trio.current_time())
            if deflate and self.framers
            else None,
        )

    async def _read_request(self, stream: _Socket, http: h11.Connection) -> h11.Request | None:
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(RECEIVE_SIZE)
                http.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                return event
            return None  # ConnectionClosed, or PAUSED after a half-closed connection

    async def _upgrade(
        self,
        stream: _Socket,
        http: h11.Connection,
        request: h11.Request,
        remote: tuple[str, int],
    ) -> tuple[WebSocketStream, Admission] | None:
        """Accept (101) or refuse one WebSocket upgrade."""
        headers = {name: value for name, value in request.headers}
        key = headers.get(b"sec-websocket-key")
        if request.method != b"GET" or key is None:
            await self._respond(
                stream, http, Rejection(400, "a WebSocket upgrade is a GET with Sec-WebSocket-Key")
            )
            return None
        if headers.get(b"sec-websocket-version") != b"13":
            await self._respond(
                stream,
                http,
                Rejection(426, "only WebSocket version 13 is supported"),
                [(b"sec-websocket-version", b"13")],
            )
            return None
        target = request.target.decode("latin-1")
        path, _, query = target.partition("?")
        upgrade = UpgradeRequest.build(
            # Interned: every client of an endpoint shares its path's string.
            sys.intern(unquote(path)),
            query,
            request.headers,
            f"{remote[0]}:{remote[1]}",
        )
        admission = await self.handler.admit(upgrade)
        if isinstance(admission, Rejection):
            await self._respond(stream, http, admission)
            return None
        answer = [
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", _accept_key(key)),
        ]
        deflate = self._negotiate(list(request.headers), answer)
        response = http.send(h11.InformationalResponse(status_code=101, headers=answer))
        try:
            await stream.send_all(response)
        except BaseException:
            self.handler.release(admission)  # serve() will not run to give it back
            raise
        trailing, _ = http.trailing_data
        return self._websocket(stream, upgrade, bytes(trailing), deflate), admission

    async def _stream(
        self,
        stream: _Socket,
        http: h11.Connection,
        request: h11.Request,
        remote: tuple[str, int],
        kind: str,
    ) -> tuple[SocketEventStream, Admission] | None:
        """Open an HTTP stream (SSE, NDJSON) for an admitted GET; answer the rest."""
        origin = None
        for name, value in request.headers:
            if name == b"origin":
                origin = value.decode("latin-1")
        cors = cors_headers(origin) if self.handler.allows_origin(origin) else []
        if request.method == b"OPTIONS":  # a CORS preflight (fetch with Authorization)
            if origin is None or not cors:
                await self._respond(
                    stream, http, Rejection(403, "origin not allowed", "forbidden_origin")
                )
                return None
            await self._respond(stream, http, Rejection(204, ""), preflight_headers(origin))
            return None
        if request.method != b"GET":
            await self._respond(
                stream,
                http,
                Rejection(405, "a stream is opened with GET", "method_not_allowed"),
                [(b"allow", b"GET, OPTIONS"), *cors],
            )
            return None
        event = http.next_event()
        if not isinstance(event, h11.EndOfMessage):  # a GET with a body: not a stream's
            await self._respond(
                stream, http, Rejection(400, "a stream's GET has no body", "bad_request"), cors
            )
            return None
        target = request.target.decode("latin-1")
        path, _, query = target.partition("?")
        opened = UpgradeRequest.build(
            sys.intern(unquote(path)), query, request.headers, f"{remote[0]}:{remote[1]}"
        )
        admission = await self.handler.admit(opened)
        if isinstance(admission, Rejection):
            await self._respond(stream, http, admission, cors)
            return None
        try:
            await stream.send_all(response_head(kind, origin))
        except BaseException:
            self.handler.release(admission)  # serve() will not run to give it back
            raise
        trailing, _ = http.trailing_data
        return SocketEventStream(
            stream.sock, opened.remote, kind, trailing_data=bytes(trailing)
        ), admission

    async def _respond(
        self,
        stream: _Socket,
        http: h11.Connection,
        rejection: Rejection,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        status = rejection.status
        body = b""
        headers = list(extra_headers or [])
        if status != 204:  # a preflight's answer: headers only
            body = rejection.body()
            headers[:0] = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ]
        if status >= 400 or status == 204:
            headers.append((b"connection", b"close"))
        data = http.send(h11.Response(status_code=status, headers=headers, reason=_phrase(status)))
        data += http.send(h11.Data(data=body))
        data += http.send(h11.EndOfMessage())
        await stream.send_all(data)

    async def _serve_http(
        self,
        stream: _Socket,
        http: h11.Connection,
        request: h11.Request,
        remote: tuple[str, int],
        *,
        last: bool = False,
    ) -> None:
        if http.client_is_waiting_for_100_continue:
            await stream.send_all(http.send(h11.InformationalResponse(status_code=100, headers=[])))
        body = bytearray()
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                http.receive_data(await stream.receive_some(RECEIVE_SIZE))
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_REQUEST_BODY:
                    await self._respond(
                        stream, http, Rejection(413, "request body too large", "too_large")
                    )
                    return
            elif isinstance(event, h11.EndOfMessage):
                break
            else:  # the client went away
                return
        target = request.target
        raw_path, _, query = target.partition(b"?")
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.http_version.decode(),
            "method": request.method.decode(),
            "scheme": "http",
            "path": unquote(raw_path.decode("latin-1")),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": list(request.headers),
            "client": remote,
            "server": None,
        }
        sent_body = False

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            await trio.sleep_forever()
            raise AssertionError("unreachable")  # pragma: no cover

        async def send(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                if last:
                    # The connection's last request: say so, or a keep-alive
                    # client would send the next one into a closed socket.
                    headers.append((b"connection", b"close"))
                out = http.send(
                    h11.Response(status_code=status, headers=headers, reason=_phrase(status))
                )
            elif kind == "http.response.body":
                out = http.send(h11.Data(data=message.get("body", b"")))
                if not message.get("more_body", False):
                    out += http.send(h11.EndOfMessage())
            else:  # pragma: no cover - not sent by our app
                return
            await stream.send_all(out)

        await self.http_app(scope, receive, send)


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _address(listener: socket.socket) -> tuple[str, int]:
    host, port, *_ = listener.getsockname()
    return (str(host), int(port))
