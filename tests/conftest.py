"""Shared fixtures.

Rules of this suite: real sockets on 127.0.0.1 with port 0; timeouts short
through configuration, never through sleeps; every socket test bounded by
``trio.fail_after``; trio-websocket as the well-behaved third-party client,
``tests/rawws.py`` for the hostile one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from tidings import CloseInfo, Config, Server, open_server

from .httpclient import http_request  # noqa: F401 - the tests import it from here
from .rawws import RawWebSocket
from .redis_fixture import redis_server, tidings_nodes  # noqa: F401 - fixtures of test_cluster
from .serve_fixture import tidings_serve  # noqa: F401 - a fixture (tidings serve, no backplane)

#: Generous bound for any single socket test; a hang fails instead of stalling CI.
TEST_TIMEOUT = 20


@asynccontextmanager
async def running_server(
    *, listen: bool = True, endpoints: Iterable[Any] = (), **overrides: Any
) -> AsyncIterator[Server]:
    """A server on a free port with the defaults of the suite, overridable per test."""
    settings: dict[str, Any] = {"port": 0, "log_level": "warning"}
    settings.update(overrides)
    async with open_server(Config(**settings), listen=listen, endpoints=endpoints) as server:
        yield server


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async with running_server() as server:
        yield server


@asynccontextmanager
async def ws_client(server: Server) -> AsyncIterator[WebSocketConnection]:
    async with open_websocket_url(server.url) as ws:
        yield ws


async def send(ws: WebSocketConnection, message: Any) -> None:
    await ws.send_message(orjson.dumps(message).decode())


async def receive(ws: WebSocketConnection) -> dict[str, Any]:
    return orjson.loads(await ws.get_message())  # type: ignore[no-any-return]


async def call(ws: WebSocketConnection, message: dict[str, Any]) -> dict[str, Any]:
    """Send a command and return the frame answering it (by requestId)."""
    await send(ws, message)
    while True:
        reply = await receive(ws)
        if reply.get("requestId") == message.get("requestId"):
            return reply


async def subscribe(ws: WebSocketConnection, topic: str, **resume: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "subscribe", "topic": topic, "requestId": f"sub-{topic}"}
    if resume:
        message["payload"] = resume
    reply = await call(ws, message)
    assert reply["type"] == "response", reply
    return reply


async def raw_client(server: Server, **kwargs: Any) -> RawWebSocket:
    return await RawWebSocket.connect("127.0.0.1", server.port, **kwargs)


class Disconnects:
    """Records how connections ended, and lets a test wait for the next one."""

    def __init__(self, server: Server) -> None:
        self.closed: list[CloseInfo] = []
        self._changed = trio.Event()
        server.on_disconnect(self._record)

    def _record(self, _client: object, info: CloseInfo) -> None:
        self.closed.append(info)
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, count: int = 1) -> list[CloseInfo]:
        while len(self.closed) < count:
            await self._changed.wait()
        return self.closed
