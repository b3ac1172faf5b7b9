"""A minimal HTTP stream client for tests: Server-Sent Events and NDJSON, raw.

It reads what a server writes as it is (the head, every line, comments), parses
SSE blocks the way the HTML standard's event-stream parser does, and keeps the
last id like a browser, so a test can reconnect as ``EventSource`` would.
"""

from __future__ import annotations

import socket
from typing import Any

import attrs
import orjson
import trio


@attrs.define
class Block:
    """One SSE block (the lines up to a blank line)."""

    id: str | None = None
    event: str | None = None
    data: str | None = None
    retry: int | None = None
    comments: list[str] = attrs.Factory(list)

    def json(self) -> Any:
        assert self.data is not None, self
        return orjson.loads(self.data)


class StreamClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""  # of a refused request
        self.last_id = ""
        self._buffer = bytearray()
        self._raw = bytearray()  # of a chunked body (an ASGI server frames it so)
        self._chunked = False
        self.eof = False

    @classmethod
    async def open(
        cls,
        port: int,
        target: str,
        headers: dict[str, str] | None = None,
        *,
        method: str = "GET",
        receive_buffer: int | None = None,
    ) -> StreamClient:
        """Send the request and read the head (and, if refused, the whole body)."""
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        await sock.connect(("127.0.0.1", port))
        client = cls(trio.SocketStream(sock))
        lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        await client.stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await client._until(b"\r\n\r\n")
        status, *rest = head.decode("latin-1").split("\r\n")
        client.status = int(status.split()[1])
        for line in rest:
            name, _, value = line.partition(":")
            client.headers[name.strip().lower()] = value.strip()
        client._chunked = client.headers.get("transfer-encoding") == "chunked"
        if client._chunked:
            client._raw, client._buffer = client._buffer, bytearray()
            client._dechunk()
        if client.status != 200:
            length = int(client.headers.get("content-length", "0"))
            while len(client._buffer) < length:
                await client._more()
            client.body = bytes(client._buffer[:length])
        return client

    def error(self) -> dict[str, Any]:
        """The JSON error a refusal carries."""
        return orjson.loads(self.body)["error"]  # type: ignore[no-any-return]

    async def _more(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            self.eof = True
            raise EOFError
        if not self._chunked:
            self._buffer += data
            return
        self._raw += data
        self._dechunk()

    def _dechunk(self) -> None:
        """Move every complete chunk of the body from the raw bytes to the buffer."""
        while b"\r\n" in self._raw:
            size_line, _, rest = bytes(self._raw).partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if len(rest) < size + 2:
                return
            if size == 0:
                self.eof = True
            self._buffer += rest[:size]
            self._raw = bytearray(rest[size + 2 :])

    async def _until(self, marker: bytes) -> bytes:
        while marker not in self._buffer:
            await self._more()
        head, _, rest = bytes(self._buffer).partition(marker)
        self._buffer = bytearray(rest)
        return head

    async def line(self) -> bytes:
        """The next line, without its end (NDJSON; raises EOFError at the end)."""
        return await self._until(b"\n")

    async def block(self, *, skip_heartbeats: bool = True) -> Block:
        """The next SSE block; a block of comments only is a heartbeat, skipped unless asked."""
        while True:
            block = Block()
            data: list[str] = []
            while True:
                line = (await self.line()).decode()
                if line == "":
                    break
                name, colon, value = line.partition(":")
                if not name and colon:
                    block.comments.append(value)
                    continue
                value = value.removeprefix(" ")
                if name == "id":
                    block.id = value
                elif name == "event":
                    block.event = value
                elif name == "data":
                    data.append(value)
                elif name == "retry":
                    block.retry = int(value)
            if data:
                block.data = "\n".join(data)
            if block.id is not None:
                self.last_id = block.id
            if skip_heartbeats and block == Block(comments=block.comments) and block.comments:
                continue
            return block

    async def event(self) -> tuple[Block, dict[str, Any]]:
        """The next block that has data: the block and its JSON."""
        while True:
            block = await self.block()
            if block.data is not None:
                return block, block.json()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def aclose(self) -> None:
        await self.stream.aclose()
