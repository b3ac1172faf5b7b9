"""The unmodified ``centrifuge`` npm SDK, in Node, against tidings' Centrifugo endpoint.

``tests/node/driver.js`` runs the SDK (with the ``ws`` package as its
WebSocket, which Node 20 lacks) and speaks JSON lines: SDK events on stdout,
commands on stdin. ``.ci/run`` installs ``tests/node`` with npm; on a machine
without node or those packages the tests skip (``TIDINGS_REQUIRE_NODE=1``, as
CI sets, makes that a failure).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
import trio

from tidings import Config, RequestContext, Server, open_server

from .conftest import http_request

NODE_DIR = Path(__file__).resolve().parent / "node"
DRIVER = NODE_DIR / "driver.js"
API_KEY = "centrifugo-node-key"
SECRET = "centrifugo-node-secret-of-32-bytes!"
#: One scenario, including its waits across ping intervals and reconnects.
SCENARIO_TIMEOUT = 60
FAST = {"ping_interval": 1, "read_timeout": 3, "log_level": "warning", "port": 0}


def _missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    for package in ("centrifuge", "ws"):
        if not (NODE_DIR / "node_modules" / package / "package.json").exists():
            return f"npm package {package!r} is missing: run 'npm ci' in tests/node"
    return None


_REASON = _missing()
if _REASON and os.environ.get("TIDINGS_REQUIRE_NODE"):
    raise RuntimeError(f"TIDINGS_REQUIRE_NODE is set but {_REASON}")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]


class NodeClient:
    """The driver process: its events in order, and its commands' results."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.events: list[dict[str, Any]] = []  # received, not yet taken
        self.seen: list[dict[str, Any]] = []  # every event, for assertions and failures
        self._buffer = b""
        self._ids = 0

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some(65536)
            if not chunk:
                raise AssertionError(f"the node driver exited; events: {self.seen}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        event = orjson.loads(line)
        self.events.append(event)
        self.seen.append(event)

    async def next(self, kind: str, **fields: Any) -> dict[str, Any]:
        """The next event of ``kind`` (with these field values), consuming it."""
        while True:
            for index, event in enumerate(self.events):
                if event["event"] == kind and all(event.get(k) == v for k, v in fields.items()):
                    del self.events[index]
                    return event
            await self._read()

    def count(self, kind: str) -> int:
        return sum(1 for event in self.seen if event["event"] == kind)

    async def call(self, cmd: str, **args: Any) -> Any:
        self._ids += 1
        command = {"cmd": cmd, "id": self._ids, **args}
        assert self.process.stdin is not None
        await self.process.stdin.send_all(orjson.dumps(command) + b"\n")
        answer = await self.next("result", id=self._ids)
        if "error" in answer:
            raise SdkError(answer["error"])
        return answer["result"]


class SdkError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error)
        self.code = error.get("code")


@asynccontextmanager
async def node_client(url: str, token: str = "") -> AsyncIterator[NodeClient]:
    command = ["node", str(DRIVER), url] + ([token] if token else [])
    process = await trio.lowlevel.open_process(
        command, cwd=str(NODE_DIR), stdin=-1, stdout=-1, stderr=None
    )
    client = NodeClient(process)
    try:
        await client.next("ready")
        yield client
    finally:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(5):
                with contextlib.suppress(Exception):  # the driver may be gone already
                    await client.call("exit")
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


def ws_url(server: Server) -> str:
    return f"ws://127.0.0.1:{server.port}/connection/websocket"


async def api(port: int, method: str, body: dict[str, Any]) -> dict[str, Any]:
    status, _, content = await http_request(
        port,
        "POST",
        f"/api/{method}",
        orjson.dumps(body),
        f"Authorization: apikey {API_KEY}\r\nContent-Type: application/json\r\n",
    )
    assert status == 200, content
    return orjson.loads(content)  # type: ignore[no-any-return]


async def test_js_sdk_subscribes_receives_and_recovers() -> None:
    config = Config(**FAST, api_key=API_KEY, presence=True, join_leave=True)
    with trio.fail_after(SCENARIO_TIMEOUT):
        async with open_server(config) as server, node_client(ws_url(server)) as js:

            @server.on_request("sum")
            async def add(request: RequestContext) -> Any:
                return {"sum": sum(request.payload)}

            await js.call("subscribe", channel="news")
            await js.call("connect")
            connected = await js.next("connected")
            client_id = connected["client"]
            subscribed = await js.next("subscribed", channel="news")
            assert subscribed["recoverable"] and subscribed["positioned"]
            assert not subscribed["wasRecovering"]
            epoch = subscribed["streamPosition"]["epoch"]
            assert subscribed["streamPosition"] == {"offset": 0, "epoch": epoch}

            # From the Python API and from the HTTP API.
            await server.publish("news", {"n": 1})
            await api(server.port, "publish", {"topic": "news", "payload": {"n": 2}})
            first = await js.next("publication")
            second = await js.next("publication")
            assert (first["offset"], first["data"]) == (1, {"n": 1})
            assert (second["offset"], second["data"]) == (2, {"n": 2})

            # Three ping intervals with nothing but pongs from the SDK (read timeout 3 s).
            await trio.sleep(3.5)
            assert await js.call("state") == "connected"
            assert js.count("connecting") == 1 and js.count("disconnected") == 0

            # Its own publication, an RPC, presence and history.
            assert await js.call("publish", channel="news", data={"from": "js"}) == {}
            own = await js.next("publication")
            assert (own["offset"], own["data"]) == (3, {"from": "js"})
            assert await js.call("rpc", method="sum", data=[2, 3]) == {"data": {"sum": 5}}
            with pytest.raises(SdkError) as missing:
                await js.call("rpc", method="nothing-here", data=None)
            assert missing.value.code == 104
            presence = await js.call("presence", channel="news")
            assert presence["clients"] == {client_id: {"client": client_id, "user": ""}}
            stats = await js.call("presence_stats", channel="news")
            assert (stats["numClients"], stats["numUsers"]) == (1, 1)
            history = await js.call("history", channel="news", options={"limit": 10})
            assert [pub["offset"] for pub in history["publications"]] == [1, 2, 3]
            assert (history["offset"], history["epoch"]) == (3, epoch)

            # Away: publications meanwhile are recovered on return.
            await js.call("disconnect")
            await js.next("disconnected")
            await server.publish("news", {"n": 4})
            await server.publish("news", {"n": 5})
            await js.call("connect")
            recovered = await js.next("subscribed", channel="news")
            assert recovered["wasRecovering"] and recovered["recovered"]
            fourth = await js.next("publication")
            fifth = await js.next("publication")
            assert [(fourth["offset"], fourth["data"]), (fifth["offset"], fifth["data"])] == [
                (4, {"n": 4}),
                (5, {"n": 5}),
            ]

            # Closed by the server (API disconnect, 1000): the SDK reconnects and recovers.
            connected = await js.next("connected")
            assert await api(server.port, "disconnect", {"client": connected["client"]}) == {
                "disconnected": 1
            }
            await js.next("connecting")
            await server.publish("news", {"n": 6})
            again = await js.next("subscribed", channel="news")
            assert again["wasRecovering"] and again["recovered"]
            sixth = await js.next("publication")
            assert (sixth["offset"], sixth["data"]) == (6, {"n": 6})
            await server.publish("news", {"n": 7})
            assert (await js.next("publication"))["offset"] == 7


async def test_js_sdk_authenticates_and_stops_on_terminal_codes() -> None:
    config = Config(**FAST, jwt_secret=SECRET, api_key=API_KEY, presence=True)
    with trio.fail_after(SCENARIO_TIMEOUT):
        async with open_server(config) as server:
            token = jwt.encode({"sub": "carol", "exp": 2**31 - 1}, SECRET)
            async with node_client(ws_url(server), token) as js:
                await js.call("subscribe", channel="news")
                await js.call("connect")
                connected = await js.next("connected")
                await js.next("subscribed", channel="news")
                presence = await js.call("presence", channel="news")
                assert presence["clients"][connected["client"]]["user"] == "carol"
                body = {"user": "carol", "code": 4501, "reason": "banned"}
                assert await api(server.port, "disconnect", body) == {"disconnected": 1}
                closed = await js.next("disconnected")
                assert (closed["code"], closed["reason"]) == (4501, "banned")
            async with node_client(ws_url(server), "not-a-jwt") as refused:
                await refused.call("connect")
                closed = await refused.next("disconnected")
                assert (closed["code"], closed["reason"]) == (3500, "invalid token")
