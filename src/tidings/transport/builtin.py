"""tidings' own HTTP/1.1 and WebSocket server, on h11, wsproto and Trio streams.

Why our own (``docs/transports.md`` has the figures): the write timeout must
really cut off a client that stopped reading, which needs a cancellable write
(hypercorn shields its sends); shutdown must send every client a 1001 close
frame; and fan-out wants each batch of frames written with one ``send_all``.
h11 parses requests, wsproto parses the frames clients send; the frames we
send are built here, because a server frame is a two-to-ten-byte header in
front of the payload and nothing more.

Plain HTTP requests (``/health`` and the rest) are passed to an ASGI app, so
the same routes serve here and under any ASGI server.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import struct
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from http import HTTPStatus
from typing import Any, Final, cast
from urllib.parse import unquote

import h11
import trio
from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed

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
    ProtocolViolation,
    Rejection,
    UpgradeRequest,
    WriteTimeout,
)
from .reuseport import open_reuse_port_listeners

LOGGER = logging.getLogger("tidings.transport")

ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]

RECEIVE_SIZE: Final = 65536
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
INVALID_UTF8: Final = 1007
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


class WebSocketStream:
    """A :class:`~tidings.transport.base.Transport` over a Trio stream."""

    supports_ping = True
    writes_without_waiting = True

    __slots__ = (
        "_buffered",
        "_closed",
        "_fd",
        "_frames",
        "_parts",
        "_skipping",
        "_stream",
        "last_received",
        "max_message_size",
        "on_idle",
        "remote",
    )

    def __init__(
        self,
        stream: trio.SocketStream,
        remote: str,
        *,
        max_message_size: int,
        trailing_data: bytes = b"",
    ) -> None:
        self._stream = stream
        self._fd = stream.socket.fileno()
        # wsproto's frame parser without its Connection wrapper: we send our
        # own frames, so only parsing is needed, and the wrapper costs memory
        # on every connection.
        self._frames = FrameProtocol(client=False, extensions=[])
        if trailing_data:
            self._frames.receive_bytes(trailing_data)
        self.remote = remote
        self.max_message_size = max_message_size
        self.last_received = trio.current_time()
        self.on_idle: Callable[[], None] | None = None
        self._parts: list[Any] | None = None  # a fragmented message so far
        self._buffered = 0
        self._skipping = False
        self._closed = False

    async def receive(self) -> str | bytes | PingFrame:
        frames = self._frames
        while True:
            try:
                for frame in frames.received_frames():
                    opcode = frame.opcode
                    if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
                        message = self._assemble(frame.payload, frame.message_finished)
                        if message is not None:
                            return message
                    elif opcode is Opcode.PING:
                        return PingFrame(bytes(frame.payload))  # type: ignore[arg-type]
                    elif opcode is Opcode.CLOSE:
                        code, reason = cast(tuple[int, str], frame.payload)
                        raise PeerClosed(int(code), reason)
                    # PONG: its arrival already counts as activity.
            except ParseFailed as exc:
                if exc.code == INVALID_UTF8:
                    raise ProtocolViolation(exc.code, "text frame is not UTF-8") from None
                raise ProtocolViolation(exc.code, str(exc) or "protocol error") from None
            # Straight to the socket, not through SocketStream.receive_some:
            # fewer frames on the stack of every idle connection.
            try:
                data = os.read(self._fd, RECEIVE_SIZE)
            except BlockingIOError:
                data = None
            except OSError as exc:
                raise ConnectionLost from exc
            if data is None:
                if self.on_idle is not None:
                    self.on_idle()
                # Waited for outside the except block: an exception being
                # handled stays alive, with its traceback, for the whole wait.
                await trio.lowlevel.wait_readable(self._fd)
                continue
            if not data:
                raise ConnectionLost
            self.last_received = trio.current_time()
            frames.receive_bytes(data)
            del data
            await trio.lowlevel.checkpoint()  # a peer that never stops sending still yields

    def _assemble(self, data: Any, finished: bool) -> str | bytes | None:
        """Reassemble a fragmented message, enforcing the size limit as it grows."""
        if self._skipping:
            self._skipping = not finished
            return None
        if isinstance(data, str):
            size = len(data) if data.isascii() else len(data.encode())
        else:
            size = len(data)
        self._buffered += size
        if self._buffered > self.max_message_size:
            self._parts = None
            self._buffered = 0
            self._skipping = not finished
            raise MessageTooBig
        if finished and self._parts is None:
            self._buffered = 0
            return data if isinstance(data, str) else bytes(data)
        if self._parts is None:
            self._parts = []
        self._parts.append(data)
        if not finished:
            return None
        parts, self._parts, self._buffered = self._parts, None, 0
        return "".join(parts) if isinstance(data, str) else b"".join(parts)

    def framer(self, text: bool) -> Framer:
        return frame_text if text else frame_binary

    def frame_control(self, frame: ControlFrame) -> bytes:
        return frame_control(frame)

    def try_send(self, items: Iterable[Outgoing]) -> memoryview | None:
        """One ``write`` on the non-blocking socket, which almost always takes it all."""
        if self._closed:
            raise ConnectionLost
        # Control frames were framed when queued: every item is bytes here.
        data = b"".join(items)  # type: ignore[arg-type]
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise ConnectionLost from exc
        return memoryview(data)[sent:] if sent < len(data) else None

    async def send_rest(self, rest: object, *, write_timeout: float) -> None:
        assert isinstance(rest, memoryview)
        with trio.move_on_after(write_timeout):
            while rest:
                await trio.lowlevel.wait_writable(self._fd)
                if self._closed:
                    raise ConnectionLost
                try:
                    rest = rest[os.write(self._fd, rest) :]
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise ConnectionLost from exc
            return
        raise WriteTimeout

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await trio.aclose_forcefully(self._stream)


def _remote(stream: trio.abc.Stream) -> tuple[str, int]:
    try:
        host, port, *_ = stream.socket.getpeername()  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return ("unknown", 0)
    return (str(host), int(port))


def _accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + WEBSOCKET_GUID).digest())


def _is_upgrade(request: h11.Request) -> bool:
    upgrade = connection = b""
    for name, value in request.headers:
        if name == b"upgrade":
            upgrade = value.lower()
        elif name == b"connection":
            connection = value.lower()
    return upgrade == b"websocket" and b"upgrade" in connection


class BuiltinServer:
    """Accepts TCP connections, upgrades the handler's endpoints to WebSocket, serves HTTP."""

    def __init__(
        self,
        handler: ConnectionHandler,
        http_app: ASGIApp,
        *,
        max_message_size: int,
        handshake_timeout: float,
        backlog: int = 4096,
        reuse_port: bool = False,
    ) -> None:
        self.handler = handler
        self.backlog = backlog
        self.reuse_port = reuse_port
        self.http_app = http_app
        self.max_message_size = max_message_size
        self.handshake_timeout = handshake_timeout

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
        if self.reuse_port:  # one of several workers (tidings serve --workers)
            listeners = await open_reuse_port_listeners(port, host=host, backlog=self.backlog)
        else:
            listeners = await trio.open_tcp_listeners(port, host=host, backlog=self.backlog)
        task_status.started([_address(listener) for listener in listeners])
        await trio.serve_listeners(self.handle_stream, listeners, handler_nursery=handler_nursery)

    async def handle_stream(self, stream: trio.SocketStream) -> None:
        """Serve one TCP connection: HTTP requests, or one WebSocket."""
        remote = _remote(stream)
        try:
            # The handshake returns before the WebSocket is served, so that the
            # h11 objects die with its frame instead of living as long as the
            # connection.
            accepted = await self._http(stream, remote)
            if accepted is not None:
                transport, admission = accepted
                del accepted
                await self.handler.serve(transport, admission)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except Exception:
            # One connection's failure must never reach the nursery all
            # connections share.
            LOGGER.exception("error while serving %s:%s", *remote)

    async def _http(
        self, stream: trio.SocketStream, remote: tuple[str, int]
    ) -> tuple[WebSocketStream, Admission] | None:
        """Answer HTTP requests until one upgrades to WebSocket (returned) or the end."""
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        try:
            for served in range(1, MAX_REQUESTS_PER_CONNECTION + 1):
                request: h11.Request | None = None
                with trio.move_on_after(self.handshake_timeout):
                    request = await self._read_request(stream, http)
                if request is None:  # closed, or idle past the handshake timeout
                    return None
                path = unquote(request.target.split(b"?", 1)[0].decode("latin-1"))
                if self.handler.accepts(path) and _is_upgrade(request):
                    with trio.move_on_after(self.handshake_timeout):
                        return await self._upgrade(stream, http, request, remote)
                    return None
                with trio.move_on_after(self.handshake_timeout):
                    await self._serve_http(
                        stream, http, request, remote, last=served == MAX_REQUESTS_PER_CONNECTION
                    )
                if http.our_state is not h11.DONE or http.their_state is not h11.DONE:
                    return None
                http.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            with trio.move_on_after(1):
                if http.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await self._respond(
                        stream, http, Rejection(exc.error_status_hint, "bad request")
                    )
        return None

    async def _read_request(
        self, stream: trio.abc.Stream, http: h11.Connection
    ) -> h11.Request | None:
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(RECEIVE_SIZE)
                http.receive_data(cast(bytes, data))
                continue
            if isinstance(event, h11.Request):
                return event
            return None  # ConnectionClosed, or PAUSED after a half-closed connection

    async def _upgrade(
        self,
        stream: trio.SocketStream,
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
            unquote(path), query, request.headers, f"{remote[0]}:{remote[1]}"
        )
        admission = self.handler.admit(upgrade)
        if isinstance(admission, Rejection):
            await self._respond(stream, http, admission)
            return None
        response = http.send(
            h11.InformationalResponse(
                status_code=101,
                headers=[
                    (b"upgrade", b"websocket"),
                    (b"connection", b"Upgrade"),
                    (b"sec-websocket-accept", _accept_key(key)),
                ],
            )
        )
        try:
            await stream.send_all(response)
        except BaseException:
            self.handler.release(admission)  # serve() will not run to give it back
            raise
        trailing, _ = http.trailing_data
        transport = WebSocketStream(
            stream,
            upgrade.remote,
            max_message_size=self.max_message_size,
            trailing_data=bytes(trailing),
        )
        return transport, admission

    async def _respond(
        self,
        stream: trio.abc.Stream,
        http: h11.Connection,
        rejection: Rejection,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        status = rejection.status
        body = rejection.body()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *(extra_headers or []),
        ]
        if status >= 400:
            headers.append((b"connection", b"close"))
        data = http.send(h11.Response(status_code=status, headers=headers, reason=_phrase(status)))
        data += http.send(h11.Data(data=body))
        data += http.send(h11.EndOfMessage())
        await stream.send_all(data)

    async def _serve_http(
        self,
        stream: trio.abc.Stream,
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
                http.receive_data(cast(bytes, await stream.receive_some(RECEIVE_SIZE)))
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


def _address(listener: trio.SocketListener) -> tuple[str, int]:
    host, port, *_ = listener.socket.getsockname()
    return (str(host), int(port))
