"""The plain-HTTP side of a node, as an ASGI app.

``GET /health``, ``GET /metrics`` (Prometheus), ``GET /api/openapi.json``,
``POST /api/<method>`` (the server API), and the application's own JSON routes
(:meth:`tidings.Server.http_route`). The same app answers under the built-in
server and under any ASGI server.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final
from urllib.parse import parse_qs

import attrs
import orjson

from ..errors import HttpError
from ..transport.asgi import Receive, Scope, Send
from .api import Api
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

HealthProbe = Callable[[], tuple[int, dict[str, Any]]]
"""Returns the HTTP status and the JSON body of ``/health``."""

LOGGER = logging.getLogger("tidings.http")

MAX_BODY: Final = 1024 * 1024
#: Paths tidings answers itself; an application route may not take them.
RESERVED_PATHS: Final = ("/health", "/metrics", "/api/")


@attrs.frozen(slots=True)
class HttpRequest:
    """A request to an application route: what a JSON handler needs of it."""

    method: str
    path: str
    query: dict[str, str]
    """The query string's parameters, first value of each."""
    headers: dict[str, str]
    """Header names in lower case, last value of each."""
    body: bytes

    def json(self) -> Any:
        """The body as JSON (an empty body is None).

        Raises:
            HttpError: 400 ``invalid_json``.
        """
        if not self.body:
            return None
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            raise HttpError(400, "invalid_json", "the body is not valid JSON") from None


HttpHandler = Callable[[HttpRequest], Awaitable[Any]]
"""``async def handler(request) -> Any``: the JSON answer (200), or ``(status, answer)``."""


@attrs.frozen(slots=True)
class HttpRoute:
    path: str
    handler: HttpHandler
    methods: tuple[str, ...]


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
        self.routes: dict[str, HttpRoute] = {}
        """The application's routes, by exact path."""

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
        elif path in self.routes:
            route = self.routes[path]
            if await _only(method, route.methods, send):
                await self._route(route, scope, receive, send)
        elif self.is_ws_path(path):
            await respond(
                send,
                426,
                _error("upgrade_required", "this endpoint speaks WebSocket only"),
                [(b"upgrade", b"websocket")],
            )
        else:
            await respond(send, 404, _error("not_found", f"no route for {path[:200]}"))

    def add_route(self, path: str, handler: HttpHandler, methods: tuple[str, ...]) -> None:
        if not path.startswith("/") or any(
            path == reserved or path.startswith(reserved) for reserved in RESERVED_PATHS
        ):
            raise ValueError(f"{path!r} is not a path an application may route")
        if self.is_ws_path(path):
            raise ValueError(f"{path!r} is a WebSocket endpoint")
        self.routes[path] = HttpRoute(path, handler, tuple(method.upper() for method in methods))

    async def _route(self, route: HttpRoute, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = route.path, str(scope.get("method", "GET"))
        try:
            body = await _body(receive)
            query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
            headers = {
                bytes(name).decode("latin-1").lower(): bytes(value).decode("latin-1")
                for name, value in scope.get("headers", [])
            }
            request = HttpRequest(method, path, {k: v[0] for k, v in query.items()}, headers, body)
            answer = await route.handler(request)
        except HttpError as exc:
            await respond(send, exc.status, _error(exc.code, exc.message))
            return
        except Exception:
            LOGGER.exception("HTTP route %s failed", path)
            await respond(send, 500, _error("internal_error", "the route's handler failed"))
            return
        status = 200
        if isinstance(answer, tuple) and len(answer) == 2 and isinstance(answer[0], int):
            status, answer = answer
        try:
            await respond(send, status, answer)
        except TypeError:  # not JSON-serializable: the handler's bug, told plainly
            LOGGER.exception("HTTP route %s answered a value JSON cannot carry", path)
            await respond(send, 500, _error("internal_error", "the route's answer is not JSON"))

    async def _api(self, name: str, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.api is not None
        try:
            self.api.check_key(_header(scope, b"authorization"))
            body = await _body(receive)
            result = await self.api.call(name, body)
        except HttpError as exc:
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
            raise HttpError(400, "invalid_message", "the request ended early")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise HttpError(413, "too_large", f"the body may be at most {MAX_BODY} bytes")
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
