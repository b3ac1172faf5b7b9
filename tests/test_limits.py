"""Origin checks, rate limits and connection caps, over real sockets.

The raw upgrade below sends whatever headers a hostile or browser client
would, from whichever loopback address the test picks, and reports the HTTP
status the server answered with.
"""

from __future__ import annotations

import base64
import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from tidings import CloseCode, Config, ConfigError, ErrorCode, Server, open_server
from tidings.connection.limits import ConnectionLimits
from tidings.connection.ratelimit import TokenBucket

from .conftest import (
    TEST_TIMEOUT,
    Disconnects,
    call,
    raw_client,
    receive,
    running_server,
    subscribe,
    ws_client,
)
from .rawws import Closed, RawWebSocket

# --- helpers -------------------------------------------------------------------------


class Upgrade:
    """The server's answer to one raw upgrade request: status, head, body, and the socket."""

    def __init__(self, status: int, head: bytes, body: bytes, ws: RawWebSocket) -> None:
        self.status = status
        self.head = head
        self.body = body
        self.ws = ws

    def error_code(self) -> str:
        return str(orjson.loads(self.body)["error"]["code"])


async def upgrade(
    server: Server, *, headers: dict[str, str] | None = None, source: str | None = None
) -> Upgrade:
    """Ask for a WebSocket with extra ``headers``, from the loopback address ``source``."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    if source is not None:
        await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", server.port))
    stream = trio.SocketStream(sock)
    key = base64.b64encode(os.urandom(16)).decode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    request = (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    await stream.send_all(request.encode())
    ws = RawWebSocket(stream)
    head = await ws._read_until(b"\r\n\r\n")
    status = int(head.split()[1])
    body = b""
    if status != 101:
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                body = await ws._read_exactly(int(value))
    return Upgrade(status, head, body, ws)


def text_frame(message: Any) -> bytes:
    """One masked client text frame carrying ``message`` as JSON."""
    payload = orjson.dumps(message)
    mask = os.urandom(4)
    n = len(payload)
    length = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return b"\x81" + length + mask + masked


async def send_at_once(ws: RawWebSocket, messages: list[dict[str, Any]]) -> None:
    """Every message in one write, so the server reads them as one burst."""
    await ws.stream.send_all(b"".join(text_frame(message) for message in messages))


async def replies(ws: RawWebSocket, count: int) -> list[dict[str, Any]]:
    return [await ws.receive_json() for _ in range(count)]


def pings(count: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"type": "ping", "requestId": i} for i in range(start, start + count)]


async def served(ws: RawWebSocket) -> None:
    """Once a ping is answered the server has taken the connection on (and counted it)."""
    await ws.send_json({"type": "ping", "requestId": "served"})
    assert (await ws.receive_json())["type"] == "pong"


@asynccontextmanager
async def raw(server: Server) -> AsyncIterator[RawWebSocket]:
    ws = await raw_client(server)
    try:
        yield ws
    finally:
        await ws.aclose()


# --- origins -------------------------------------------------------------------------

ALLOWED_ORIGINS = [
    None,  # no Origin header: not a browser
    "http://localhost:3000",
    "http://localhost",
    "https://localhost:8443",
    "http://127.0.0.1:8800",
    "http://[::1]:5173",
    "https://app.example.com",  # configured
    "https://app.example.com/",
    "http://other.example:8080",  # configured, with its port
]

REFUSED_ORIGINS = [
    "https://evil.example",
    "https://app.example.com.evil.example",
    "https://evil.example/app.example.com",
    "http://localhost.evil.example",
    "http://127.0.0.1.evil.example",
    "https://app.example.com:8443",  # another port of a configured origin
    "http://other.example",  # ... and the configured one without its port
    "http://app.example.com",  # another scheme
    "null",  # sandboxed iframes and file:// pages
    "file://",
    "not a url",
]

CONFIGURED = ("https://app.example.com", "http://other.example:8080")


@pytest.mark.parametrize("origin", ALLOWED_ORIGINS)
async def test_allowed_origins_connect(origin: str | None) -> None:
    headers = {"Origin": origin} if origin is not None else {}
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(allowed_origins=CONFIGURED) as server:
            answer = await upgrade(server, headers=headers)
            assert answer.status == 101, answer.head
            await answer.ws.send_json({"type": "ping", "requestId": 1})
            assert (await answer.ws.receive_json())["type"] == "pong"
            await answer.ws.aclose()


@pytest.mark.parametrize("origin", REFUSED_ORIGINS)
async def test_other_origins_are_refused_with_403(origin: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(allowed_origins=CONFIGURED) as server:
            answer = await upgrade(server, headers={"Origin": origin})
            assert answer.status == 403, answer.head
            assert answer.error_code() == "forbidden_origin"
            await answer.ws.aclose()
            assert server.clients() == []


async def test_the_origin_check_comes_before_the_token() -> None:
    """A page on a foreign origin learns nothing about tokens: 403 whatever it sends."""
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(token="s3cret") as server:
            for authorization in ("Bearer s3cret", "Bearer wrong"):
                headers = {"Origin": "https://evil.example", "Authorization": authorization}
                answer = await upgrade(server, headers=headers)
                assert answer.status == 403
                await answer.ws.aclose()
            answer = await upgrade(server, headers={"Origin": "http://localhost:3000"})
            assert answer.status == 401
            await answer.ws.aclose()


async def test_allowed_origins_from_the_environment_are_a_comma_separated_list() -> None:
    env = {
        "TIDINGS_ALLOWED_ORIGINS": " https://a.example, https://b.example:8443/ ,,",
        "TIDINGS_PORT": "0",
    }
    config = Config.load(env=env)
    assert config.allowed_origins == ("https://a.example", "https://b.example:8443/")
    with trio.fail_after(TEST_TIMEOUT):
        async with open_server(config) as server:
            for origin in ("https://a.example", "https://b.example:8443", "http://localhost:1"):
                answer = await upgrade(server, headers={"Origin": origin})
                assert answer.status == 101, origin
                await answer.ws.aclose()
            for origin in ("https://c.example", "https://b.example", "https://a.example.evil"):
                answer = await upgrade(server, headers={"Origin": origin})
                assert answer.status == 403, origin
                await answer.ws.aclose()


# --- rate limits: the bucket ---------------------------------------------------------


def test_the_bucket_allows_a_burst_then_one_message_per_interval() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=100.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(100.4)  # 0.8 of a token
    assert bucket.take(100.5)  # one token after 1/rate seconds
    assert not bucket.take(100.5)
    # A long idle spell refills the burst, and no more.
    assert [bucket.take(1000.0) for _ in range(4)] == [True, True, True, False]


def test_refused_messages_do_not_spend_tokens() -> None:
    bucket = TokenBucket(rate=1.0, burst=1, now=0.0)
    assert bucket.take(0.0)
    for t in (0.1, 0.2, 0.3, 0.9):
        assert not bucket.take(t)
    assert bucket.take(1.0)


def test_five_per_minute_is_expressible() -> None:
    limits = ConnectionLimits.from_config(Config(rate_limit=5, rate_period="60s"))
    bucket = TokenBucket(limits.rate_limit, limits.rate_burst, now=0.0)
    assert [bucket.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert not bucket.take(11.9)
    assert bucket.take(12.1)  # one message every 12 s after the burst
    assert not bucket.take(12.2)
    assert [bucket.take(600.0) for _ in range(6)] == [True] * 5 + [False]


def test_a_hundred_per_second_is_expressible() -> None:
    limits = ConnectionLimits.from_config(Config(rate_limit=100))
    bucket = TokenBucket(limits.rate_limit, limits.rate_burst, now=0.0)
    assert sum(bucket.take(0.0) for _ in range(150)) == 100
    assert sum(bucket.take(0.5) for _ in range(150)) == 50
    # A burst smaller than the rate.
    limits = ConnectionLimits.from_config(Config(rate_limit=100, rate_burst=10))
    bucket = TokenBucket(limits.rate_limit, limits.rate_burst, now=0.0)
    assert sum(bucket.take(0.0) for _ in range(150)) == 10
    assert sum(bucket.take(0.05) for _ in range(150)) == 5


def test_a_rate_period_of_zero_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="rate_period"):
        ConnectionLimits.from_config(Config(rate_limit=5, rate_period=0))


# --- rate limits: over the socket ----------------------------------------------------


async def test_five_per_minute_over_the_socket() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(rate_limit=5, rate_period="60s") as server, raw(server) as ws:
            await send_at_once(ws, pings(7))
            answers = await replies(ws, 7)
            assert [a["type"] for a in answers[:5]] == ["pong"] * 5
            for answer, request_id in zip(answers[5:], (5, 6), strict=True):
                assert answer["type"] == "error"
                assert answer["payload"]["code"] == ErrorCode.RATE_LIMITED
                assert answer["requestId"] == request_id
            assert server.counters.rate_limited == 2


async def test_a_hundred_per_second_over_the_socket() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(rate_limit=100, rate_limit_violations=0) as server,
            raw(server) as ws,
        ):
            await send_at_once(ws, pings(300))
            kinds = [a["type"] for a in await replies(ws, 300)]
            assert kinds[:100] == ["pong"] * 100  # the burst
            # 200 more in one read would need two seconds of refill to pass.
            assert "error" in kinds[100:]


async def test_a_rate_limited_publication_is_not_published() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(rate_limit=2, rate_period="60s") as server,
            raw(server) as publisher,
            ws_client(server) as reader,  # its own bucket
        ):
            await subscribe(reader, "t")
            await send_at_once(
                publisher,
                [{"type": "publish", "topic": "t", "payload": n, "requestId": n} for n in range(3)],
            )
            answers = await replies(publisher, 3)
            assert [a["payload"].get("status") for a in answers[:2]] == ["published"] * 2
            assert answers[2]["payload"]["code"] == ErrorCode.RATE_LIMITED
            await server.publish("t", "from the backend")
            events = [await receive(reader) for _ in range(3)]
            assert [(e["seq"], e["payload"]) for e in events] == [
                (1, 0),
                (2, 1),
                (3, "from the backend"),
            ]


async def test_the_rate_limit_recovers_after_its_period() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(rate_limit=1, rate_period="250ms", rate_limit_violations=0) as server,
            raw(server) as ws,
        ):
            await send_at_once(ws, pings(2))
            first, second = await replies(ws, 2)
            assert first["type"] == "pong"
            assert second["payload"]["code"] == ErrorCode.RATE_LIMITED
            # Within a period or so the bucket has a token again.
            attempt = 2
            while True:
                await trio.sleep(0.05)
                await ws.send_json({"type": "ping", "requestId": attempt})
                answer = await ws.receive_json()
                assert answer["requestId"] == attempt
                if answer["type"] == "pong":
                    break
                assert answer["payload"]["code"] == ErrorCode.RATE_LIMITED
                attempt += 1
            assert server.clients()  # never closed: violations are not counted against it


async def test_repeated_violations_close_the_connection_with_4029() -> None:
    """The Nth message over the limit closes; the ones before it are answered rate_limited."""
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(
            rate_limit=1, rate_period="60s", rate_limit_violations=3, close_timeout=0.2
        ) as server:
            disconnects = Disconnects(server)
            async with raw(server) as ws, ws_client(server) as bystander:
                await send_at_once(ws, pings(10))
                pong, *limited = await replies(ws, 3)
                assert pong["type"] == "pong"
                assert [a["payload"]["code"] for a in limited] == [ErrorCode.RATE_LIMITED] * 2
                with pytest.raises(Closed) as closed:
                    await ws.receive_json()
                assert closed.value.code == CloseCode.RATE_LIMITED == 4029
                [info] = await disconnects.wait()
                assert (info.code, info.reason) == (4029, "rate limited")
                # Another connection has its own bucket and is untouched.
                assert (await call(bystander, {"type": "ping", "requestId": 1}))["type"] == "pong"


async def test_protocol_pings_do_not_count_against_the_rate_limit() -> None:
    """Browsers and libraries keep connections alive with pings; that is not a flood."""
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(rate_limit=1, rate_period="60s", rate_limit_violations=1) as server,
            ws_client(server) as ws,
        ):
            for _ in range(5):
                await ws.ping()  # trio-websocket waits for the pong
            assert (await call(ws, {"type": "ping", "requestId": 1}))["type"] == "pong"
            assert server.counters.rate_limited == 0


# --- connection and subscription caps --------------------------------------------------


async def test_connections_per_ip_over_the_cap_are_refused_with_429() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(max_connections_per_ip=2) as server:
            disconnects = Disconnects(server)
            async with ws_client(server) as first, ws_client(server) as second:
                for ws in (first, second):  # served, so counted
                    assert (await call(ws, {"type": "ping", "requestId": 0}))["type"] == "pong"
                with pytest.raises(ConnectionRejected) as rejected:
                    async with open_websocket_url(server.url):
                        pass  # pragma: no cover
                assert rejected.value.status_code == 429
                body = orjson.loads(rejected.value.body or b"{}")
                assert body["error"]["code"] == "too_many_connections"
                await second.aclose()
                await disconnects.wait()
                # A slot is free again.
                async with ws_client(server) as third:
                    assert (await call(third, {"type": "ping", "requestId": 1}))["type"] == "pong"
                    assert len(server.clients()) == 2


async def test_the_connection_cap_is_per_address() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(max_connections_per_ip=1) as server:
            first = await upgrade(server, source="127.0.0.1")
            assert first.status == 101
            await served(first.ws)
            again = await upgrade(server, source="127.0.0.1")
            assert again.status == 429
            other = await upgrade(server, source="127.0.0.2")  # all of 127/8 is loopback
            assert other.status == 101
            await served(other.ws)
            assert sorted(c.remote.rpartition(":")[0] for c in server.clients()) == [
                "127.0.0.1",
                "127.0.0.2",
            ]
            for answer in (first, again, other):
                await answer.ws.aclose()


async def test_concurrent_upgrades_cannot_pass_the_per_ip_cap_together() -> None:
    """Driven through the ASGI app so the window between admit and serve is certain.

    Over sockets the same race lets a burst from one address exceed the cap
    by one or more, depending on timing.
    """
    clients = 3
    decided = 0
    all_decided = trio.Event()
    accepted = 0

    def decide() -> None:
        nonlocal decided
        decided += 1
        if decided == clients:
            all_decided.set()

    async def one_client(server: Server, number: int) -> None:
        nonlocal accepted
        messages = [{"type": "websocket.connect"}]

        async def receive_message() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await all_decided.wait()
            return {"type": "websocket.disconnect", "code": 1000}

        async def send_message(message: Any) -> None:
            nonlocal accepted
            if message["type"] == "websocket.accept":
                accepted += 1
                decide()
                await all_decided.wait()  # the ASGI server writes the 101
            elif message["type"] in ("websocket.http.response.start", "websocket.close"):
                decide()

        scope = {
            "type": "websocket",
            "path": "/ws",
            "query_string": b"",
            "headers": [],
            "client": ("192.0.2.1", 40000 + number),
            "extensions": {"websocket.http.response": {}},
        }
        await server.asgi_app(scope, receive_message, send_message)

    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(listen=False, max_connections_per_ip=1) as server,
            trio.open_nursery() as nursery,
        ):
            for number in range(clients):
                nursery.start_soon(one_client, server, number)
    assert accepted == 1


async def test_subscriptions_per_connection_are_capped() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(max_subscriptions=3) as server, ws_client(server) as ws:
            for topic in ("a", "b", "c"):
                await subscribe(ws, topic)
            again = await call(ws, {"type": "subscribe", "topic": "a", "requestId": "again"})
            assert again["payload"]["code"] == ErrorCode.ALREADY_SUBSCRIBED
            over = await call(ws, {"type": "subscribe", "topic": "d", "requestId": "d"})
            assert over["type"] == "error"
            assert over["payload"]["code"] == ErrorCode.TOO_MANY_SUBSCRIPTIONS
            assert over["topic"] == "d"
            # Nothing of d arrives; a freed slot can be used again.
            await server.publish("d", "missed")
            assert server.presence("d") == []
            await call(ws, {"type": "unsubscribe", "topic": "a", "requestId": "u"})
            await subscribe(ws, "d")
            await server.publish("d", "now")
            assert (await receive(ws))["payload"] == "now"
            # The cap is per connection: another client subscribes freely.
            async with ws_client(server) as other:
                for topic in ("a", "b", "c"):
                    await subscribe(other, topic)
