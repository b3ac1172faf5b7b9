"""A deliberately minimal WebSocket client for hostile and stalled-client tests.

trio-websocket is the well-behaved third-party client of the suite; this one
exists to do what a well-behaved client will not: stop reading, stay silent
(no pongs), send invalid UTF-8 or oversized frames, shrink its receive buffer.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
from typing import Any

import orjson
import trio


class RawWebSocket:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = bytearray()

    @classmethod
    async def connect(
        cls, host: str, port: int, path: str = "/ws", *, receive_buffer: int | None = None
    ) -> RawWebSocket:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        if receive_buffer is not None:
            # Set before connect so the advertised window stays small.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        await sock.connect((host, port))
        stream = trio.SocketStream(sock)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await stream.send_all(request.encode())
        ws = cls(stream)
        head = await ws._read_until(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head.decode(errors="replace"))
        return ws

    async def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self._buffer += data
        head, _, rest = bytes(self._buffer).partition(marker)
        self._buffer = bytearray(rest)
        return head

    async def _read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self._buffer += data
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    async def send_frame(self, opcode: int, payload: bytes, *, fin: bool = True) -> None:
        mask = os.urandom(4)
        header = bytes([(0x80 if fin else 0) | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 65536:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await self.stream.send_all(header + mask + masked)

    async def send_text(self, text: str | bytes) -> None:
        await self.send_frame(1, text.encode() if isinstance(text, str) else text)

    async def send_json(self, message: Any) -> None:
        await self.send_frame(1, orjson.dumps(message))

    async def receive_frame(self) -> tuple[int, bytes]:
        first, second = await self._read_exactly(2)
        n = second & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self._read_exactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self._read_exactly(8))
        return first & 0x0F, await self._read_exactly(n)

    async def receive_json(self) -> dict[str, Any]:
        """The next text frame as JSON, skipping pings (unanswered: this client is rude)."""
        while True:
            opcode, payload = await self.receive_frame()
            if opcode == 1:
                return orjson.loads(payload)  # type: ignore[no-any-return]
            if opcode == 8:
                raise Closed(close_code(payload))

    async def receive_close_reason(self) -> tuple[int, str]:
        """Read until the close frame; returns its code and reason."""
        while True:
            opcode, payload = await self.receive_frame()
            if opcode == 8:
                return close_code(payload), payload[2:].decode()

    async def receive_close(self) -> int:
        """Read until the close frame; returns its code."""
        while True:
            opcode, payload = await self.receive_frame()
            if opcode == 8:
                return close_code(payload)

    async def aclose(self) -> None:
        await self.stream.aclose()


class Closed(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def close_code(payload: bytes) -> int:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
