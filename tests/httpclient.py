"""A minimal HTTP/1.1 client for tests: one request over a fresh connection."""

from __future__ import annotations

import trio


async def http_request(
    port: int, method: str, path: str, body: bytes = b"", headers: str = ""
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request over a fresh connection: (status, headers, body)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        request = (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n{headers}\r\n"
        ).encode() + body
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, content = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), parsed, content
