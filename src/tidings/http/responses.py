"""Reading requests and writing responses on the ASGI side: shared by the routes and the console."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, Final

import orjson

from ..errors import HttpError
from ..transport.asgi import Receive, Scope, Send

MAX_BODY: Final = 1024 * 1024

Headers = list[tuple[bytes, bytes]]


def header(scope: Scope, name: bytes) -> str | None:
    """The value of request header ``name`` (lower case), the first if repeated."""
    for key, value in scope.get("headers", []):
        if bytes(key).lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def read_body(receive: Receive) -> bytes:
    """The request body, at most :data:`MAX_BODY` bytes.

    Raises:
        HttpError: 413 ``too_large``, 400 ``invalid_message`` if the request ended early.
    """
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


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


async def respond(send: Send, status: int, body: Any, extra_headers: Headers | None = None) -> None:
    """Send a JSON response (``cache-control: no-store``)."""
    await send_bytes(send, status, orjson.dumps(body), b"application/json", extra_headers)


async def send_bytes(
    send: Send,
    status: int,
    data: bytes,
    content_type: bytes,
    extra_headers: Headers | None = None,
    *,
    cache: bytes = b"no-store",
) -> None:
    """Send a whole response: ``data`` with its type, length and cache policy."""
    headers: Headers = [(b"content-type", content_type)]
    if status != 304:  # a 304 has no body, and says nothing of its length
        headers.append((b"content-length", str(len(data)).encode()))
    headers.append((b"cache-control", cache))
    headers.extend(extra_headers or [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if status == 304 else data})


def without_body(send: Send) -> Send:
    """``send`` for a HEAD request: the headers GET would send, without the body.

    h11 (the built-in server) refuses a body on a HEAD response and drops the connection.
    """

    async def send_head(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return send_head
