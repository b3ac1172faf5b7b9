"""The plain-HTTP side of a node, as an ASGI app.

``GET /health``, ``GET /metrics`` (Prometheus), ``GET /api/openapi.json`` and
``POST /api/<method>`` (the server API). The same app answers under the
built-in server and under any ASGI server.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any, Final

import orjson

from .api import Api, ApiError
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .transport.asgi import Receive, Scope, Send

HealthProbe = Callable[[], tuple[int, dict[str, Any]]]
"""Returns the HTTP status and the JSON body of ``/health``."""

MAX_BODY: Final = 1024 * 1024


class HttpRoutes:
    """Routes plain HTTP requests of a tidings node."""

    def __init__(
        self,
        health: HealthProbe,
        *,
        ws_path: str | Callable[[str], bool] = "/ws",
        metrics: Callable[[], bytes] | None = None,
        api: Api | None = None,
    ) -> None:
        self.health = health
        # One path, or a test of paths (the server's WebSocket endpoints).
        self.is_ws_path = ws_path.__eq__ if isinstance(ws_path, str) else ws_path
        self.metrics = metrics
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        root = str(scope.get("root_path", ""))
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        method = scope.get("method", "GET")
        if method == "HEAD":
            # The headers GET would send, without the body: h11 (the built-in
            # server) refuses a body on a HEAD response and drops the connection.
            send = _without_body(send)
        if path == "/health":
            if await _only(method, ("GET", "HEAD"), send):
                status, body = self.health()
                await respond(send, status, body)
        elif path == "/metrics" and self.metrics is not None:
            if await _only(method, ("GET", "HEAD"), send):
                await _send(send, 200, self.metrics(), METRICS_CONTENT_TYPE.encode())
        elif path == "/api/openapi.json" and self.api is not None:
            if await _only(method, ("GET", "HEAD"), send):
                await _send(send, 200, self.api.document, b"application/json")
        elif path.startswith("/api/") and self.api is not None:
            if await _only(method, ("POST",), send):
                await self._api(path.removeprefix("/api/"), scope, receive, send)
        elif self.is_ws_path(path):
            await respond(
                send,
                426,
                _error("upgrade_required", "this endpoint speaks WebSocket only"),
                [(b"upgrade", b"websocket")],
            )
        else:
            await respond(send, 404, _error("not_found", f"no route for {path[:200]}"))

    async def _api(self, name: str, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.api is not None
        try:
            self.api.check_key(_header(scope, b"authorization"))
            body = await _body(receive)
            result = await self.api.call(name, body)
        except ApiError as exc:
            await respond(send, exc.status, _error(exc.code, exc.message))
            return
        await respond(send, 200, result)


async def _only(method: str, allowed: tuple[str, ...], send: Send) -> bool:
    if method in allowed:
        return True
    await respond(
        send,
        405,
        _error("method_not_allowed", f"use {' or '.join(allowed)}"),
        [(b"allow", ", ".join(allowed).encode())],
    )
    return False


def _without_body(send: Send) -> Send:
    async def send_head(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return send_head


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if bytes(key).lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def _body(receive: Receive) -> bytes:
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ApiError(400, "invalid_message", "the request ended early")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, "too_large", f"the body may be at most {MAX_BODY} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


async def respond(
    send: Send,
    status: int,
    body: Any,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Send a JSON response."""
    await _send(send, status, orjson.dumps(body), b"application/json", extra_headers)


async def _send(
    send: Send,
    status: int,
    data: bytes,
    content_type: bytes,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(data)).encode()),
                (b"cache-control", b"no-store"),
                *(extra_headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})
