"""The plain-HTTP side of a node, as an ASGI app: ``GET /health`` for now.

The same app answers under the built-in server and under any ASGI server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from .transport.asgi import Receive, Scope, Send

HealthProbe = Callable[[], tuple[int, dict[str, Any]]]
"""Returns the HTTP status and the JSON body of ``/health``."""


class HttpRoutes:
    """Routes plain HTTP requests of a tidings node."""

    def __init__(self, health: HealthProbe, *, ws_path: str = "/ws") -> None:
        self.health = health
        self.ws_path = ws_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        root = str(scope.get("root_path", ""))
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        method = scope.get("method", "GET")
        if path == "/health":
            if method not in ("GET", "HEAD"):
                await respond(
                    send, 405, _error("method_not_allowed", "use GET"), [(b"allow", b"GET, HEAD")]
                )
                return
            status, body = self.health()
            await respond(send, status, body)
            return
        if path == self.ws_path:
            await respond(
                send,
                426,
                _error("upgrade_required", "this endpoint speaks WebSocket only"),
                [(b"upgrade", b"websocket")],
            )
            return
        await respond(send, 404, _error("not_found", f"no route for {path[:200]}"))


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


async def respond(
    send: Send,
    status: int,
    body: Any,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Send a JSON response."""
    data = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                (b"cache-control", b"no-store"),
                *(extra_headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})
