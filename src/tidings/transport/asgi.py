"""tidings as an ASGI application, for hypercorn's Trio worker or a larger app.

Limits of this transport, all from the ASGI server rather than from tidings
(``docs/transports.md``): hypercorn shields each send from cancellation, so
the write timeout cannot cut off a client that stopped reading (the overflow
policy still protects the broker and every other client); protocol pings and
their pongs are invisible to the application, so keepalive is left to the
server (``websocket_ping_interval``); and each frame is one ASGI message, so
queued frames cannot be coalesced into one write.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import trio
from wsproto.events import CloseConnection

from .base import (
    CloseFrame,
    ConnectionHandler,
    ConnectionLost,
    ControlFrame,
    Framer,
    Outgoing,
    PeerClosed,
    PingFrame,
    Rejection,
    UpgradeRequest,
)
from .sse import AsgiEventStream, cors_headers, preflight_headers, response_headers

LOGGER = logging.getLogger("tidings.transport")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class AsgiWebSocket:
    """A :class:`~tidings.transport.base.Transport` over ASGI ``receive``/``send``."""

    supports_ping = False

    def __init__(
        self, receive: Receive, send: Send, remote: str, peer_close: PeerCloseFrame | None = None
    ) -> None:
        self._receive = receive
        self._send = send
        self.remote = remote
        self._peer_close = peer_close
        self._close_answered = False
        self.last_received = trio.current_time()
        self._closed = False

    async def receive(self) -> str | bytes | PingFrame:
        message = await self._receive()
        self.last_received = trio.current_time()
        kind = message["type"]
        if kind == "websocket.receive":
            text = message.get("text")
            return text if text is not None else bytes(message.get("bytes") or b"")
        if kind == "websocket.disconnect":
            self._closed = True
            code, reason = int(message.get("code", 1005)), ""
            peer = self._peer_close
            if code == 1006 and peer is not None and peer.code is not None:
                # hypercorn says 1006 even after the client's close frame (its
                # issue 127); the frame itself was seen, so report what it said.
                code, reason = peer.code, peer.reason
            if code == 1006:
                raise ConnectionLost("closed without a close frame")
            # The ASGI server has answered the close frame itself.
            self._close_answered = True
            raise PeerClosed(code, reason)
        raise ConnectionLost(f"unexpected ASGI message {kind!r}")

    def framer(self, text: bool) -> Framer:
        # ASGI takes text as str: decode once per event, not once per subscriber.
        return _as_text if text else _as_bytes

    def frame_control(self, frame: ControlFrame) -> ControlFrame:
        return frame  # send_rest turns a close into websocket.close; pings are the server's

    def try_send(self, items: Iterable[Outgoing]) -> list[Outgoing]:
        # ASGI has no write that does not wait: everything goes through send_rest.
        rest = list(items)
        if self._closed and not self._answers_close(rest):
            raise ConnectionLost
        return rest

    async def send_rest(self, rest: object, *, write_timeout: float) -> None:
        # ``write_timeout`` cannot be honoured: the ASGI server owns the socket, and
        # hypercorn shields its writes from cancellation.
        assert isinstance(rest, list)
        if self._closed:
            if self._answers_close(rest):
                return  # the handshake the connection wants to finish is done
            raise ConnectionLost
        try:
            for item in rest:
                if type(item) is str:
                    await self._send({"type": "websocket.send", "text": item})
                elif type(item) is bytes:
                    await self._send({"type": "websocket.send", "bytes": item})
                elif type(item) is CloseFrame:
                    self._closed = True
                    await self._send(
                        {"type": "websocket.close", "code": item.code, "reason": item.reason}
                    )
                # Ping and pong frames are the ASGI server's business.
        except OSError as exc:  # the ASGI server's way of saying the socket is gone
            self._closed = True
            raise ConnectionLost from exc

    def _answers_close(self, items: list[Outgoing]) -> bool:
        """After the peer's close, which the ASGI server answered: our close frame."""
        return self._close_answered and any(type(item) is CloseFrame for item in items)

    async def aclose(self) -> None:
        # The ASGI server closes the socket when the application returns.
        self._closed = True


class PeerCloseFrame:
    """The close frame a client sent, as hypercorn's WebSocket stream parsed it."""

    __slots__ = ("code", "reason")

    def __init__(self) -> None:
        self.code: int | None = None
        self.reason = ""

    @classmethod
    def watch(cls, send: Send) -> PeerCloseFrame | None:
        """Record the client's close frame on hypercorn's stream behind ``send``.

        hypercorn hands an application its stream's bound ``app_send``; the
        stream's wsproto ``connection`` parses the close frame, which hypercorn
        then reports as 1006 whatever it said. Reading the parsed events on that
        one connection tells a clean close (and its code) from a lost one. Under
        another ASGI server (no such stream) this records nothing.
        """
        connection = getattr(getattr(send, "__self__", None), "connection", None)
        events = getattr(connection, "events", None)
        if not callable(events):
            return None
        seen = cls()

        def recording_events() -> Any:
            for event in events():
                if isinstance(event, CloseConnection):
                    seen.code, seen.reason = event.code, event.reason or ""
                yield event

        connection.events = recording_events  # type: ignore[union-attr]
        return seen


def _as_text(data: bytes) -> str:
    return data.decode()


def _as_bytes(data: bytes) -> bytes:
    return data


class AsgiApp:
    """Routes ASGI scopes: ``websocket`` on the WebSocket path to the server, the rest to HTTP.

    ``lifespan`` (optional) is an async context manager factory entered on
    ASGI startup and left on shutdown; hypercorn's Trio worker requires an app
    to answer lifespan events.
    """

    def __init__(
        self,
        handler: ConnectionHandler,
        http_app: ASGIApp,
        *,
        lifespan: Callable[[], Any] | None = None,
    ) -> None:
        self.handler = handler
        self.http_app = http_app
        self.lifespan = lifespan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            stream = self.handler.stream_kind(_path(scope))
            if stream is not None:
                await self._stream(scope, receive, send, stream)
            else:
                await self.http_app(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = _path(scope)
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        client = scope.get("client") or ("unknown", 0)
        request = UpgradeRequest.build(
            path,
            bytes(scope.get("query_string", b"")).decode("latin-1"),
            ((bytes(name), bytes(value)) for name, value in scope.get("headers", [])),
            f"{client[0]}:{client[1]}",
        )
        admission = (
            await self.handler.admit(request)
            if self.handler.accepts(path)
            else Rejection(404, f"no WebSocket endpoint at {path[:200]}")
        )
        if isinstance(admission, Rejection):
            await _refuse(scope, send, admission)
            return
        try:
            await send({"type": "websocket.accept"})
        except BaseException:
            self.handler.release(admission)  # serve() will not run to give it back
            raise
        transport = AsgiWebSocket(receive, send, request.remote, PeerCloseFrame.watch(send))
        await self.handler.serve(transport, admission)

    async def _stream(self, scope: Scope, receive: Receive, send: Send, kind: str) -> None:
        """An HTTP stream (SSE, NDJSON): admitted like an upgrade, then served as a
        connection over the streaming response."""
        headers = [(bytes(name), bytes(value)) for name, value in scope.get("headers", [])]
        origin = next((v.decode("latin-1") for n, v in headers if n.lower() == b"origin"), None)
        cors = cors_headers(origin) if self.handler.allows_origin(origin) else []
        method = scope.get("method", "GET")
        if method == "OPTIONS":
            if origin is None or not cors:
                await _respond(send, Rejection(403, "origin not allowed", "forbidden_origin"))
            else:
                await _respond(send, Rejection(204, ""), preflight_headers(origin))
            return
        if method != "GET":
            refusal = Rejection(405, "a stream is opened with GET", "method_not_allowed")
            await _respond(send, refusal, [(b"allow", b"GET, OPTIONS"), *cors])
            return
        client = scope.get("client") or ("unknown", 0)
        request = UpgradeRequest.build(
            _path(scope),
            bytes(scope.get("query_string", b"")).decode("latin-1"),
            headers,
            f"{client[0]}:{client[1]}",
        )
        admission = await self.handler.admit(request)
        if isinstance(admission, Rejection):
            await _respond(send, admission, cors)
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": response_headers(kind, origin),
                }
            )
        except BaseException:
            self.handler.release(admission)  # serve() will not run to give it back
            raise
        transport = AsgiEventStream(receive, send, request.remote, kind)
        await self.handler.serve(transport, admission)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":  # pragma: no cover
            return
        if self.lifespan is None:
            await send({"type": "lifespan.startup.complete"})
            message = await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        try:
            async with self.lifespan():
                await send({"type": "lifespan.startup.complete"})
                await receive()  # lifespan.shutdown
        except Exception as exc:
            LOGGER.exception("tidings failed to start or stop under ASGI")
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.shutdown.complete"})


async def _refuse(scope: Scope, send: Send, rejection: Rejection) -> None:
    """Answer a refused upgrade with its HTTP status where the server lets us.

    Without the ASGI ``websocket.http.response`` extension the only refusal
    is a close before accept, which servers turn into HTTP 403.
    """
    if "websocket.http.response" in scope.get("extensions", {}):
        body = rejection.body()
        await send(
            {
                "type": "websocket.http.response.start",
                "status": rejection.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": rejection.message})


async def _respond(
    send: Send, rejection: Rejection, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    """A refusal (or a preflight's answer) as a whole HTTP response."""
    body = b""
    headers = [(b"cache-control", b"no-store"), *(extra or [])]
    if rejection.status != 204:  # a preflight's answer: headers only
        body = rejection.body()
        headers[:0] = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
    await send({"type": "http.response.start", "status": rejection.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _path(scope: Scope) -> str:
    """The request path relative to where the app is mounted."""
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", ""))
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path
