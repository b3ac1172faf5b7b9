"""A tiny web server for browser tests: the pages they open, from another origin.

The pages are served from a port of their own, so an ``EventSource`` or a
``WebSocket`` to the node is a cross-origin request, as on a real site (the
node's origin check and CORS answer it). One request per connection; GET only;
nothing but the files it was given.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from functools import partial

import trio

#: The longest request head a page server reads (a browser's is a few hundred bytes).
MAX_HEAD = 16384


class PageServer:
    def __init__(self, files: Mapping[str, tuple[str, bytes]]) -> None:
        self.files = dict(files)
        """Path -> (content type, body)."""
        self.port = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            head = b""
            with trio.move_on_after(10):
                while b"\r\n\r\n" not in head and len(head) < MAX_HEAD:
                    data = await stream.receive_some(4096)
                    if not data:
                        return
                    head += data
            target = head.split(b" ", 2)[1].decode("latin-1") if head.count(b" ") >= 2 else ""
            path = target.split("?", 1)[0]
            if path not in self.files:
                body, kind, status = b"not found", "text/plain", "404 Not Found"
            else:
                (kind, body), status = self.files[path], "200 OK"
            answer = (
                f"HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {len(body)}\r\n"
                "cache-control: no-store\r\nconnection: close\r\n\r\n"
            ).encode() + body
            with suppress(trio.BrokenResourceError):
                await stream.send_all(answer)


@asynccontextmanager
async def page_server(files: Mapping[str, tuple[str, bytes]]) -> AsyncIterator[PageServer]:
    """Serve ``files`` on a free port of 127.0.0.1 for the block."""
    server = PageServer(files)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, host="127.0.0.1"), server._handle, 0
        )
        server.port = listeners[0].socket.getsockname()[1]
        yield server
        nursery.cancel_scope.cancel()
