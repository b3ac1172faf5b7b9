"""The plain-HTTP side of a node, as an ASGI app.

``GET /health``, ``GET /metrics`` (Prometheus), ``GET /api/openapi.json``,
``POST /api/<method>`` (the server API), the web console (``console_path``),
and the application's own JSON routes (:meth:`tidings.Server.http_route`).
The same app answers under the built-in server and under any ASGI server.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import parse_qs

import attrs
import orjson

from ..errors import HttpError
from ..transport.asgi import Receive, Scope, Send
from .api import Api
from .console import Console
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .responses import MAX_BODY, error_body, header, read_body, respond, send_bytes, without_body

HealthProbe = Callable[[], tuple[int, dict[str, Any]]]
"""Returns the HTTP status and the JSON body of ``/health``."""

LOGGER = logging.getLogger("tidings.http")

__all__ = ["MAX_BODY", "HttpRequest", "HttpResponse", "HttpRoutes", "respond"]

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


@attrs.frozen(slots=True)
class HttpResponse:
    """An application route's answer that is not JSON: a page, a script, a file.

    Return it from a handler of :meth:`tidings.Server.http_route`; it is sent
    as it is, with ``cache-control: no-store`` unless ``headers`` say otherwise.
    """

    body: bytes
    content_type: str = "text/html; charset=utf-8"
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    """More headers, as ``(name, value)`` pairs (a Content-Security-Policy, say)."""


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
        console: Console | None = None,
    ) -> None:
        self.health = health
        # One path, or a test of paths (the server's WebSocket endpoints).
        self.is_ws_path = ws_path.__eq__ if isinstance(ws_path, str) else ws_path
        self.metrics = metrics
        self.api = api
        self.console = console
        """The web console, when ``console_path`` is set (it refuses to serve without a key)."""
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
            send = without_body(send)
        if path == "/health":
            if await _only(method, ("GET", "HEAD"), send):
                status, body = self.health()
                await respond(send, status, body)
        elif path == "/metrics" and self.metrics is not None:
            if await _only(method, ("GET", "HEAD"), send):
                await send_bytes(send, 200, self.metrics(), METRICS_CONTENT_TYPE.encode())
        elif path == "/api/openapi.json" and self.api is not None:
            if await _only(method, ("GET", "HEAD"), send):
                await send_bytes(send, 200, self.api.document, b"application/json")
        elif path.startswith("/api/") and self.api is not None:
            if await _only(method, ("POST",), send):
                await self._api(path.removeprefix("/api/"), scope, receive, send)
        elif path in self.routes:
            route = self.routes[path]
            if await _only(method, route.methods, send):
                await self._route(route, scope, receive, send)
        elif self.console is not None and self.console.owns(path):
            await self.console(path, scope, receive, send)
        elif self.is_ws_path(path):
            await respond(
                send,
                426,
                error_body("upgrade_required", "this endpoint speaks WebSocket only"),
                [(b"upgrade", b"websocket")],
            )
        elif path == "/" and self.console is not None and self.console.enabled:
            # A person who opens the node's address is looking for the console.
            if await _only(method, ("GET", "HEAD"), send):
                location = f"{root}{self.console.path}/".encode()
                await send_bytes(send, 303, b"", b"text/plain", [(b"location", location)])
        else:
            await respond(send, 404, error_body("not_found", f"no route for {path[:200]}"))

    def add_route(self, path: str, handler: HttpHandler, methods: tuple[str, ...]) -> None:
        if not path.startswith("/") or any(
            path == reserved or path.startswith(reserved) for reserved in RESERVED_PATHS
        ):
            raise ValueError(f"{path!r} is not a path an application may route")
        if self.is_ws_path(path):
            raise ValueError(f"{path!r} is a WebSocket endpoint")
        if self.console is not None and self.console.enabled and self.console.owns(path):
            raise ValueError(f"{path!r} is the console's (console_path)")
        self.routes[path] = HttpRoute(path, handler, tuple(method.upper() for method in methods))

    async def _route(self, route: HttpRoute, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = route.path, str(scope.get("method", "GET"))
        try:
            body = await read_body(receive)
            query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
            headers = {
                bytes(name).decode("latin-1").lower(): bytes(value).decode("latin-1")
                for name, value in scope.get("headers", [])
            }
            request = HttpRequest(method, path, {k: v[0] for k, v in query.items()}, headers, body)
            answer = await route.handler(request)
        except HttpError as exc:
            await respond(send, exc.status, error_body(exc.code, exc.message))
            return
        except Exception:
            LOGGER.exception("HTTP route %s failed", path)
            await respond(send, 500, error_body("internal_error", "the route's handler failed"))
            return
        if isinstance(answer, HttpResponse):
            extra = [(name.lower().encode("latin-1"), value.encode("latin-1"))
                     for name, value in answer.headers]  # fmt: skip
            cache = next((v for n, v in extra if n == b"cache-control"), b"no-store")
            extra = [(n, v) for n, v in extra if n != b"cache-control"]
            await send_bytes(
                send, answer.status, answer.body, answer.content_type.encode(), extra, cache=cache
            )
            return
        status = 200
        if isinstance(answer, tuple) and len(answer) == 2 and isinstance(answer[0], int):
            status, answer = answer
        try:
            await respond(send, status, answer)
        except TypeError:  # not JSON-serializable: the handler's bug, told plainly
            LOGGER.exception("HTTP route %s answered a value JSON cannot carry", path)
            await respond(send, 500, error_body("internal_error", "the route's answer is not JSON"))

    async def _api(self, name: str, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.api is not None
        try:
            authorization = header(scope, b"authorization")
            console = self.console
            if authorization is None and console is not None and console.has_session(scope):
                console.authorize(scope)  # the console's page: its cookie and CSRF token
            else:
                self.api.check_key(authorization)
            body = await read_body(receive)
            result = await self.api.call(name, body)
        except HttpError as exc:
            await respond(send, exc.status, error_body(exc.code, exc.message))
            return
        await respond(send, 200, result)


async def _only(method: str, allowed: tuple[str, ...], send: Send) -> bool:
    if method in allowed:
        return True
    await respond(
        send,
        405,
        error_body("method_not_allowed", f"use {' or '.join(allowed)}"),
        [(b"allow", ", ".join(allowed).encode())],
    )
    return False
