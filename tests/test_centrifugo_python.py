"""The unmodified centrifuge-python SDK (PyPI) against tidings' Centrifugo endpoint.

The SDK runs on asyncio: each scenario runs in a worker thread with its own
event loop (``trio.to_thread``), against a server in this Trio run on a real
port; the scenario calls back into Trio (``trio.from_thread``) to publish
with the tidings Python API and the HTTP API, as a backend would. One test
runs against a real ``tidings serve`` process instead.

Short ping intervals (1 s, read timeout 3 s) make every scenario prove that
the SDK keeps its connection alive by answering the server's pings.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import jwt
import orjson
import pytest
import trio

from tidings import Config, RequestContext, Server, open_server

from .conftest import TEST_TIMEOUT, http_request

centrifuge = pytest.importorskip("centrifuge", reason="centrifuge-python is in the test extra")

from centrifuge import (  # noqa: E402 - after the skip
    Client,
    ClientEventHandler,
    ClientState,
    ReplyError,
    StreamPosition,
    SubscriptionEventHandler,
)

pytestmark = pytest.mark.slow

API_KEY = "centrifugo-test-key"
SECRET = "centrifugo-test-secret-of-32-bytes!"
#: A whole scenario, asyncio side (it waits out ping intervals and reconnects).
SCENARIO_TIMEOUT = 60
#: Waiting for one SDK event.
EVENT_TIMEOUT = 10
FAST = {"ping_interval": 1, "read_timeout": 3, "log_level": "warning", "port": 0}


class Recorder:
    """Every SDK event, by kind; a scenario waits for the n-th of a kind."""

    def __init__(self) -> None:
        self.events: dict[str, list[Any]] = defaultdict(list)
        self._changed = asyncio.Event()

    def add(self, kind: str, value: Any) -> None:
        self.events[kind].append(value)
        self._changed.set()

    async def wait(self, kind: str, count: int = 1) -> list[Any]:
        async def enough() -> None:
            while len(self.events[kind]) < count:
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(enough(), EVENT_TIMEOUT)
        except TimeoutError:
            seen = {name: len(values) for name, values in self.events.items()}
            raise AssertionError(f"no {count} {kind!r} events; seen {seen}") from None
        return self.events[kind]


class ClientEvents(ClientEventHandler):  # type: ignore[misc]
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def on_connecting(self, ctx: Any) -> None:
        self.recorder.add("connecting", ctx)

    async def on_connected(self, ctx: Any) -> None:
        self.recorder.add("connected", ctx)

    async def on_disconnected(self, ctx: Any) -> None:
        self.recorder.add("disconnected", ctx)

    async def on_error(self, ctx: Any) -> None:
        self.recorder.add("error", ctx)


class SubEvents(SubscriptionEventHandler):  # type: ignore[misc]
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def on_subscribing(self, ctx: Any) -> None:
        self.recorder.add("subscribing", ctx)

    async def on_subscribed(self, ctx: Any) -> None:
        self.recorder.add("subscribed", ctx)

    async def on_unsubscribed(self, ctx: Any) -> None:
        self.recorder.add("unsubscribed", ctx)

    async def on_publication(self, ctx: Any) -> None:
        self.recorder.add("publication", ctx.pub)

    async def on_join(self, ctx: Any) -> None:
        self.recorder.add("join", ctx.info)

    async def on_leave(self, ctx: Any) -> None:
        self.recorder.add("leave", ctx.info)

    async def on_error(self, ctx: Any) -> None:
        self.recorder.add("sub_error", ctx)


def sdk_client(url: str, recorder: Recorder, **options: Any) -> Client:
    """The SDK's client, direct (no proxy from the environment), quick to reconnect."""
    options.setdefault("min_reconnect_delay", 0.5)
    options.setdefault("max_reconnect_delay", 0.5)
    return Client(url, events=ClientEvents(recorder), proxy=None, **options)


async def in_asyncio(scenario: Callable[[], Awaitable[None]]) -> None:
    """Run an asyncio scenario to its end in a worker thread with its own loop."""

    def run() -> None:
        asyncio.run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))

    await trio.to_thread.run_sync(run)


def from_trio(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Call into the server's Trio run from the scenario (blocks its loop briefly)."""
    return trio.from_thread.run(fn, *args)


async def api(port: int, method: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST /api/<method> with the key, as a backend does."""
    status, _, content = await http_request(
        port,
        "POST",
        f"/api/{method}",
        orjson.dumps(body),
        f"Authorization: apikey {API_KEY}\r\nContent-Type: application/json\r\n",
    )
    assert status == 200, content
    return orjson.loads(content)  # type: ignore[no-any-return]


def ws_url(server: Server) -> str:
    return f"ws://127.0.0.1:{server.port}/connection/websocket"


async def test_python_sdk_subscribes_publishes_queries_and_recovers() -> None:
    config = Config(**FAST, api_key=API_KEY, presence=True, join_leave=True)
    async with open_server(config) as server:

        @server.on_request("sum")
        async def add(request: RequestContext) -> Any:
            assert request.client is not None and request.client.dialect == "centrifugo"
            return {"sum": sum(request.payload)}

        async def scenario() -> None:
            events = Recorder()
            client = sdk_client(ws_url(server), events)
            news = client.new_subscription(
                "news", events=SubEvents(events), recoverable=True, positioned=True, join_leave=True
            )
            await client.connect()
            await news.subscribe()
            (connected,) = await events.wait("connected")
            assert connected.client == client.client_id
            (subscribed,) = await events.wait("subscribed")
            assert subscribed.recoverable and subscribed.positioned
            assert subscribed.stream_position.offset == 0
            epoch = subscribed.stream_position.epoch
            assert epoch and not subscribed.was_recovering

            # Publications from the tidings Python API and from the HTTP API.
            from_trio(server.publish, "news", {"n": 1})
            answer = from_trio(api, server.port, "publish", {"topic": "news", "payload": {"n": 2}})
            assert (answer["seq"], answer["epoch"]) == (2, epoch)
            pubs = await events.wait("publication", 2)
            assert [(pub.offset, pub.data) for pub in pubs] == [(1, {"n": 1}), (2, {"n": 2})]

            # Alive across three ping intervals with nothing but pongs (read timeout 3 s).
            await asyncio.sleep(3.5)
            assert client.state == ClientState.CONNECTED
            assert len(events.events["connecting"]) == 1  # the connect() call's own

            # Publishing from the client.
            await news.publish({"from": "python"})
            pubs = await events.wait("publication", 3)
            assert (pubs[2].offset, pubs[2].data) == (3, {"from": "python"})

            # Presence, join/leave, presence stats.
            presence = await news.presence()
            assert set(presence.clients) == {client.client_id}
            assert presence.clients[client.client_id].user == ""
            other_events = Recorder()
            other = sdk_client(ws_url(server), other_events)
            other_news = other.new_subscription("news", events=SubEvents(other_events))
            await other.connect()
            await other_news.subscribe()
            await other_events.wait("subscribed")
            (joined,) = await events.wait("join")
            assert joined.client == other.client_id
            stats = await client.presence_stats("news")
            assert (stats.num_clients, stats.num_users) == (2, 1)  # both anonymous: one user
            await other.disconnect()
            (left,) = await events.wait("leave")
            assert left.client == other.client_id

            # History: oldest first, newest first, since a position, the position alone.
            history = await news.history(limit=10)
            assert [pub.offset for pub in history.publications] == [1, 2, 3]
            assert (history.offset, history.epoch) == (3, epoch)
            assert history.publications[0].data == {"n": 1}
            newest = await news.history(limit=2, reverse=True)
            assert [pub.offset for pub in newest.publications] == [3, 2]
            since = await news.history(limit=-1, since=StreamPosition(offset=1, epoch=epoch))
            assert [pub.offset for pub in since.publications] == [2, 3]
            older = await news.history(limit=-1, since=StreamPosition(1 + 2, epoch), reverse=True)
            assert [pub.offset for pub in older.publications] == [2, 1]
            position = await news.history(limit=0)
            assert (position.publications, position.offset) == ([], 3)
            with pytest.raises(ReplyError) as stale:
                await news.history(limit=5, since=StreamPosition(offset=1, epoch="other"))
            assert stale.value.code == 112

            # RPC goes to the application's request handlers.
            result = await client.rpc("sum", [1, 2, 3])
            assert result.data == {"sum": 6}
            with pytest.raises(ReplyError) as missing:
                await client.rpc("nothing-here", {})
            assert missing.value.code == 104

            # Away: what is published meanwhile is recovered on return.
            await client.disconnect()
            from_trio(server.publish, "news", {"n": 4})
            from_trio(server.publish, "news", {"n": 5})
            await client.connect()
            subs = await events.wait("subscribed", 2)
            assert subs[1].was_recovering and subs[1].recovered
            assert subs[1].stream_position.epoch == epoch
            pubs = await events.wait("publication", 5)
            assert [(pub.offset, pub.data) for pub in pubs[3:]] == [(4, {"n": 4}), (5, {"n": 5})]

            # Live after the recovery, with nothing repeated.
            from_trio(server.publish, "news", {"n": 6})
            pubs = await events.wait("publication", 6)
            assert [pub.offset for pub in pubs] == [1, 2, 3, 4, 5, 6]
            await client.disconnect()

        await in_asyncio(scenario)


async def test_python_sdk_follows_server_side_disconnects() -> None:
    """API ``disconnect``: 1000 and 3xxx make the SDK reconnect and recover; 4500 stops it."""
    async with open_server(Config(**FAST, api_key=API_KEY)) as server:

        async def scenario() -> None:
            events = Recorder()
            client = sdk_client(ws_url(server), events)
            news = client.new_subscription("news", events=SubEvents(events))
            await client.connect()
            await news.subscribe()
            await events.wait("subscribed")
            from_trio(server.publish, "news", {"n": 1})
            await events.wait("publication", 1)

            # The default close code (1000): the SDK reconnects; what it missed comes back.
            answer = from_trio(api, server.port, "disconnect", {"client": client.client_id})
            assert answer == {"disconnected": 1}
            connecting = await events.wait("connecting", 2)
            assert connecting[1].code == 1  # the SDK's 'transport closed'
            from_trio(server.publish, "news", {"n": 2})
            subscribed = await events.wait("subscribed", 2)
            assert subscribed[1].was_recovering and subscribed[1].recovered
            pubs = await events.wait("publication", 2)
            assert [(pub.offset, pub.data) for pub in pubs] == [(1, {"n": 1}), (2, {"n": 2})]

            # A Centrifugo reconnect code (3000-3499) keeps its code for the SDK.
            body = {"client": client.client_id, "code": 3011, "reason": "force reconnect"}
            from_trio(api, server.port, "disconnect", body)
            connecting = await events.wait("connecting", 3)
            assert (connecting[2].code, connecting[2].reason) == (3011, "force reconnect")
            await events.wait("subscribed", 3)

            # A terminal code (4500-4999): disconnected for good.
            body = {"client": client.client_id, "code": 4500, "reason": "go away"}
            from_trio(api, server.port, "disconnect", body)
            (disconnected,) = await events.wait("disconnected")
            assert (disconnected.code, disconnected.reason) == (4500, "go away")
            await asyncio.sleep(1.5)  # three reconnect delays: it stays away
            assert client.state == ClientState.DISCONNECTED
            assert len(events.events["connecting"]) == 3

        await in_asyncio(scenario)


def token(sub: str, lifetime: float, **claims: Any) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + lifetime), **claims}, SECRET)


async def test_python_sdk_authenticates_with_a_jwt_and_refreshes_it() -> None:
    config = Config(**FAST, jwt_secret=SECRET, presence=True)
    async with open_server(config) as server:

        async def scenario() -> None:
            # A token whose claims decide, as for the native protocol.
            events = Recorder()
            claims = {"topics": ["news", "own"], "publish": ["own"]}
            client = sdk_client(ws_url(server), events, token=token("alice", 600, **claims))
            news = client.new_subscription("news", events=SubEvents(events))
            await client.connect()
            await news.subscribe()
            await events.wait("subscribed")
            presence = await news.presence()
            assert presence.clients[client.client_id].user == "alice"
            with pytest.raises(ReplyError) as forbidden:
                await news.publish({"x": 1})
            assert forbidden.value.code == 103
            await client.publish("own", {"x": 1})
            secret = client.new_subscription("secret", events=SubEvents(events))
            await secret.subscribe()
            (refused,) = await events.wait("unsubscribed")
            assert refused.code == 103
            await client.disconnect()

            # A bad token, or none: 3500, and the SDK stops.
            for bad in ("not-a-jwt", ""):
                bad_events = Recorder()
                refused_client = sdk_client(ws_url(server), bad_events, token=bad)
                await refused_client.connect()
                (closed,) = await bad_events.wait("disconnected")
                assert (closed.code, closed.reason) == (3500, "invalid token")

            # An expired token: 109, the SDK asks get_token and connects.
            fresh_events = Recorder()
            issued: list[str] = []

            async def get_token() -> str:
                issued.append(token("bob", 4))
                return issued[-1]

            refreshing = sdk_client(
                ws_url(server), fresh_events, token=token("bob", -10), get_token=get_token
            )
            await refreshing.connect()
            await fresh_events.wait("connected")
            assert len(issued) == 1
            # That token lives 4 s: connect said ttl, the SDK refreshes before the expiry,
            # and the connection outlives the first token.
            await asyncio.sleep(5)
            assert len(issued) >= 2, "the SDK did not refresh"
            assert refreshing.state == ClientState.CONNECTED
            assert len(fresh_events.events["connected"]) == 1
            await refreshing.disconnect()

        await in_asyncio(scenario)


# --- against a real `tidings serve` ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def served() -> Iterator[int]:
    """A ``tidings serve`` process with the HTTP API and short pings; yields its port."""
    port = _free_port()
    env = {**os.environ, "TIDINGS_API_KEY": API_KEY}
    env.pop("TIDINGS_CONFIG", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "tidings", "serve", "--port", str(port), "--ping-interval", "1",
         "--read-timeout", "3", "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + TEST_TIMEOUT
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "tidings serve did not start"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                time.sleep(0.05)  # polling a child process: nothing to await
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def post(port: int, method: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/{method}",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"apikey {API_KEY}", "Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=5) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def test_python_sdk_against_tidings_serve(served: int) -> None:
    async def scenario() -> None:
        events = Recorder()
        client = sdk_client(f"ws://127.0.0.1:{served}/connection/websocket", events)
        news = client.new_subscription("news", events=SubEvents(events))
        await client.connect()
        await news.subscribe()
        await events.wait("subscribed")
        await asyncio.to_thread(post, served, "publish", {"topic": "news", "payload": {"n": 1}})
        (pub,) = await events.wait("publication")
        assert (pub.offset, pub.data) == (1, {"n": 1})
        await asyncio.sleep(3.5)  # pings answered: still here past the read timeout
        assert client.state == ClientState.CONNECTED
        await asyncio.to_thread(post, served, "publish", {"topic": "news", "payload": {"n": 2}})
        pubs = await events.wait("publication", 2)
        assert pubs[1].offset == 2
        assert len(events.events["connecting"]) == 1
        body = {"client": client.client_id, "code": 3503, "reason": "force disconnect"}
        assert await asyncio.to_thread(post, served, "disconnect", body) == {"disconnected": 1}
        (closed,) = await events.wait("disconnected")
        assert closed.code == 3503

    asyncio.run(asyncio.wait_for(scenario(), SCENARIO_TIMEOUT))
