"""Server-Sent Events (``/sse``) and NDJSON (``/stream``) over real sockets.

A stream client is a connection like a WebSocket one: admitted by the same
checks, bounded by the same budgets, subscribed through the same broker. The
client here (``tests/streamclient.py``) reads every byte the server writes and
reconnects as ``EventSource`` does, with the last id it saw; the browser itself
is in ``tests/test_browser_streams.py``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import jwt
import orjson
import pytest
import trio

from tidings import Config, ConfigError, Server
from tidings.protocol.messages import Position
from tidings.protocol.sse import format_id

from .conftest import TEST_TIMEOUT, running_server, subscribe, ws_client
from .hookbackend import Call, running_backend
from .serve_fixture import API_KEY
from .streamclient import StreamClient

SECRET = "a-test-secret-that-is-long-enough-for-hs256"


@asynccontextmanager
async def sse(
    server: Server, query: str, headers: dict[str, str] | None = None, path: str = "/sse"
) -> AsyncIterator[StreamClient]:
    client = await StreamClient.open(server.port, f"{path}?{query}", headers)
    try:
        yield client
    finally:
        await client.aclose()


async def events(client: StreamClient, count: int) -> list[dict[str, Any]]:
    """The next ``count`` topic events (reset and other named events are not events)."""
    seen = []
    while len(seen) < count:
        block, body = await client.event()
        if block.event is None:
            seen.append(body)
    return seen


def mint(**claims: Any) -> str:
    body = {"sub": "alice", "exp": time.time() + 300, **claims}
    return jwt.encode(body, SECRET, algorithm="HS256")


# --- the stream ---------------------------------------------------------------------------


async def test_a_stream_starts_with_its_retry_and_the_id_of_where_it_starts() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(sse_retry=2.0) as server:
            orders = await server.publish("orders", {"n": 1})
            async with sse(server, "topic=orders&topic=deploys") as client:
                assert client.status == 200
                assert client.headers["content-type"] == "text/event-stream; charset=utf-8"
                assert client.headers["cache-control"] == "no-store"
                assert "content-length" not in client.headers
                assert "transfer-encoding" not in client.headers  # the body ends with the socket
                first = await client.block()
                assert (
                    first.data is None and first.event is None
                )  # no event: onmessage sees nothing
                assert first.retry is not None and 2000 <= first.retry <= 3000
                deploys = server.broker.position("deploys")
                assert deploys is not None
                assert first.id == format_id([orders, deploys])


async def test_each_event_is_an_id_and_the_native_envelope_and_the_id_names_every_topic() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server, sse(server, "topic=a&topic=b") as client:
            await client.block()
            a1 = await server.publish("a", {"x": 1})
            b1 = await server.publish("b", {"y": 1})
            a2 = await server.publish("a", {"x": 2})
            seen = []
            for _ in range(3):
                block, body = await client.event()
                assert block.event is None  # a plain message: EventSource's onmessage
                seen.append((block.id, body["topic"], body["seq"], body["payload"]))
            assert seen == [
                (format_id([a1, Position(0, b1.epoch)]), "a", 1, {"x": 1}),
                (format_id([a1, b1]), "b", 1, {"y": 1}),
                (format_id([a2, b1]), "a", 2, {"x": 2}),
            ]


async def test_last_event_id_resumes_every_topic_with_no_gap_and_no_duplicate() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server:
            async with sse(server, "topic=a&since=0&topic=b&since=0") as client:
                await client.block()
                for n in range(3):
                    await server.publish("a", n)
                    await server.publish("b", n)
                got = await events(client, 4)  # a0 b0 a1 b1: then the connection drops
                last = client.last_id
            # Missed while away: a2 b2 (already published), and more of each.
            for n in range(3, 5):
                await server.publish("b", n)
                await server.publish("a", n)
            # EventSource reconnects to the same URL (since=0 and all) with Last-Event-ID.
            async with sse(
                server, "topic=a&since=0&topic=b&since=0", {"Last-Event-ID": last}
            ) as client:
                preamble = await client.block()
                assert preamble.id == last
                got += await events(client, 6)
                await server.publish("a", 5)
                got += await events(client, 1)
            by_topic = {t: [e["payload"] for e in got if e["topic"] == t] for t in "ab"}
            assert by_topic == {"a": [0, 1, 2, 3, 4, 5], "b": [0, 1, 2, 3, 4]}


async def test_since_and_epoch_resume_the_first_connect() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server:
            positions = [await server.publish("t", n) for n in range(5)]
            epoch = positions[0].epoch
            async with sse(server, f"topic=t&since=2&epoch={epoch}") as client:
                assert (await client.block()).id == f"{epoch}:2"
                assert [e["seq"] for e in await events(client, 3)] == [3, 4, 5]


async def test_a_topic_history_no_longer_reaches_gets_a_reset_before_what_is_replayed() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(history_size=3) as server:
            for n in range(10):
                last = await server.publish("t", n)
            async with sse(server, f"topic=t&since=2&epoch={last.epoch}&topic=u") as client:
                await client.block()
                reset, body = await client.event()
                assert reset.event == "reset"
                assert body == {"type": "reset", "topic": "t", "seq": 7, "epoch": last.epoch,
                                "recovered": False}  # fmt: skip
                assert reset.id is not None and reset.id.startswith(f"{last.epoch}:7,")
                assert [e["seq"] for e in await events(client, 3)] == [8, 9, 10]


@pytest.mark.parametrize(
    ("query", "why"),
    [
        ("topic=t&since=99", "an offset from the future"),
        ("topic=t&since=1&epoch=0badc0de", "another stream"),
    ],
)
async def test_a_resume_that_cannot_be_honoured_says_so_in_band(query: str, why: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server:
            head = await server.publish("t", 1)
            async with sse(server, query) as client:
                await client.block()
                reset, body = await client.event()
                assert reset.event == "reset", why
                assert (body["seq"], body["epoch"], body["recovered"]) == (1, head.epoch, False)
                await server.publish("t", 2)
                assert [e["seq"] for e in await events(client, 1)] == [2]


async def test_an_unreadable_last_event_id_resets_every_topic() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        garbage = {"Last-Event-ID": "x" * 10_000}
        async with running_server() as server, sse(server, "topic=a&topic=b", garbage) as client:
            await client.block()
            resets = [await client.event() for _ in range(2)]
            assert [(b.event, body["topic"]) for b, body in resets] == [
                ("reset", "a"),
                ("reset", "b"),
            ]


async def test_heartbeats_are_comments_and_a_stream_has_no_read_timeout() -> None:
    """The client never speaks: after several heartbeats, more than the read
    timeout apart in all, the stream is still open and delivering."""
    with trio.fail_after(TEST_TIMEOUT):
        quick = running_server(ping_interval=0.1, read_timeout=0.25)
        async with quick as server, sse(server, "topic=t") as client:
            await client.block()
            for _ in range(4):
                block = await client.block(skip_heartbeats=False)
                assert block.comments == [""] and block.data is None
            await server.publish("t", "still here")
            assert (await events(client, 1))[0]["payload"] == "still here"


async def test_presence_changes_are_named_events() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        chat = running_server(namespaces={"chat": {"join_leave": True}})
        async with chat as server, sse(server, "topic=chat:lobby") as client:
            await client.block()
            async with ws_client(server) as ws:
                await subscribe(ws, "chat:lobby")
                join, body = await client.event()
            assert (join.event, body["type"]) == ("join", "join")
            assert join.id is None  # no position moved


async def test_ndjson_is_one_event_per_line_and_resumes_with_since() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(history_size=3) as server:
            for n in range(6):
                last = await server.publish("t", n)
            async with sse(server, f"topic=t&since=1&epoch={last.epoch}", path="/stream") as client:
                assert client.headers["content-type"] == "application/x-ndjson"
                lines = [orjson.loads(await client.line()) for _ in range(4)]
                assert lines[0] == {"type": "reset", "topic": "t", "seq": 3, "epoch": last.epoch,
                                    "recovered": False}  # fmt: skip
                assert [line["seq"] for line in lines[1:]] == [4, 5, 6]
                assert all(line["type"] == "event" for line in lines[1:])


# --- admission: the same checks as a WebSocket upgrade ----------------------------------------


async def test_a_token_comes_in_the_query_or_the_authorization_header() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(jwt_secret=SECRET) as server:
            async with sse(server, "topic=t") as refused:
                assert refused.status == 401 and refused.error()["code"] == "unauthorized"
            async with sse(server, f"topic=t&token={mint()}") as client:
                assert client.status == 200
            async with sse(server, "topic=t", {"Authorization": f"Bearer {mint()}"}) as client:
                assert client.status == 200
            narrow = mint(topics=["chat:*"])
            async with sse(server, f"topic=t&token={narrow}") as refused:
                assert (refused.status, refused.error()["code"]) == (403, "forbidden")


async def test_an_expired_token_ends_the_stream_with_a_close_event() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(jwt_secret=SECRET) as server:
            token = mint(exp=time.time() + 1.0)
            async with sse(server, f"topic=t&token={token}") as client:
                await client.block()
                close, body = await client.event()
                assert close.event == "close"
                assert body == {"type": "close", "code": 4002, "reason": "token expired"}
                with pytest.raises(EOFError):
                    await client.block()


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("", 400, "missing_field"),
        ("topic=nope:x", 404, "unknown_namespace"),
        ("topic=secret", 404, "unknown_topic"),
        ("&".join(f"topic=t{i}" for i in range(1000)), 400, "too_many_subscriptions"),
        ("topic=a&since=-1", 400, "invalid_field"),
    ],
)
async def test_a_stream_that_cannot_be_served_is_refused_before_it_starts(
    query: str, status: int, code: str
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(topics=("t*", "a")) as server, sse(server, query) as client:
            assert (client.status, client.error()["code"]) == (status, code)


async def test_only_get_opens_a_stream() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server:
            client = await StreamClient.open(server.port, "/sse?topic=t", method="DELETE")
            assert client.status == 405 and client.headers["allow"] == "GET, OPTIONS"
            await client.aclose()


async def test_an_other_origin_gets_cors_headers_and_a_foreign_one_is_refused() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(allowed_origins=("https://app.example.com",)) as server:
            page = {"Origin": "https://app.example.com"}
            async with sse(server, "topic=t", page) as client:
                assert client.status == 200
                assert client.headers["access-control-allow-origin"] == "https://app.example.com"
                # EventSource with withCredentials needs this and the exact origin, never *.
                assert client.headers["access-control-allow-credentials"] == "true"
            async with sse(server, "topic=t", {"Origin": "https://evil.example"}) as refused:
                assert (refused.status, refused.error()["code"]) == (403, "forbidden_origin")
                assert "access-control-allow-origin" not in refused.headers
            preflight = await StreamClient.open(server.port, "/sse?topic=t", page, method="OPTIONS")
            assert preflight.status == 204
            assert "last-event-id" in preflight.headers["access-control-allow-headers"]
            await preflight.aclose()
            foreign = {"Origin": "https://evil.example"}
            refused = await StreamClient.open(
                server.port, "/sse?topic=t", foreign, method="OPTIONS"
            )
            assert refused.status == 403
            await refused.aclose()


async def test_streams_count_against_the_connection_caps() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(max_connections_per_ip=1) as server,
            sse(server, "topic=t") as first,
        ):
            assert first.status == 200
            async with sse(server, "topic=t") as second:
                assert (second.status, second.error()["code"]) == (429, "too_many_connections")
        async with running_server(max_connections=1) as server, sse(server, "topic=t") as first:
            await first.block()
            async with sse(server, "topic=t", path="/stream") as second:
                assert second.status == 503


async def test_a_tenant_holds_its_connection_limit_across_streams_and_websockets() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(jwt_secret=SECRET, tenant_max_connections=1) as server:
            token = mint(tenant="acme")
            async with sse(server, f"topic=t&token={token}") as first:
                assert first.status == 200
                async with sse(server, f"topic=t&token={token}", path="/stream") as second:
                    assert second.status == 429


async def test_a_stream_is_a_client_like_any_other() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(presence=True) as server, sse(server, "topic=t") as client:
            await client.block()
            [listed] = server.broker.presence("t")
            assert listed.dialect == "sse" and listed.path == "/sse"
            assert server.statistics().connections == 1


# --- budgets, overflow and attacks ---------------------------------------------------------


async def test_a_stream_closed_for_overflow_resumes_every_event_once_in_order() -> None:
    """Under the disconnect policy a client that falls behind is closed (1008);
    reconnecting with its last id, it gets every event once, in order."""
    total = 210
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(overflow_policy="disconnect", outbox_size=8) as server:
            client = await StreamClient.open(server.port, "/sse?topic=t")
            await client.block()
            for n in range(10):
                await server.publish("t", {"n": n})
            # A burst the writer cannot take in time: published without yielding,
            # far more than the outbox holds.
            for n in range(10, total):
                server.publish_nowait("t", {"n": n})
            seen: list[int] = []
            closes = []
            try:
                while True:
                    block, body = await client.event()
                    if block.event == "close":
                        closes.append(body["code"])
                    else:
                        seen.append(body["payload"]["n"])
            except EOFError:
                pass
            await client.aclose()
            assert closes == [1008]
            assert seen == list(range(len(seen))) and 10 <= len(seen) < total
            async with sse(server, "topic=t", {"Last-Event-ID": client.last_id}) as again:
                await again.block()
                rest = [e["payload"]["n"] for e in await events(again, total - len(seen))]
            assert seen + rest == list(range(total))


async def test_a_client_that_sends_data_on_a_stream_is_closed() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server, sse(server, "topic=t") as client:
            await client.block()
            await client.send(b"x" * 10_000)
            close, body = await client.event()
            assert (close.event, body["code"]) == ("close", 1008)


async def test_a_huge_last_event_id_costs_nothing_and_a_huger_head_is_refused() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server:
            # 40 KB: read whole, then not parsed at all (longer than any id of one topic).
            async with sse(server, "topic=t", {"Last-Event-ID": "e:1," * 10_000}) as client:
                await client.block()
                reset, _ = await client.event()
                assert reset.event == "reset"
            # 200 KB: past what the server reads of a head. Refused, with a 431
            # if the answer gets out before the server drops the rest.
            try:
                client = await StreamClient.open(
                    server.port, "/sse?topic=t", {"Last-Event-ID": "e:1," * 50_000}
                )
            except (trio.BrokenResourceError, EOFError):
                pass
            else:
                assert client.status == 431
                await client.aclose()


async def test_shutdown_closes_every_stream_with_1001() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server:
            client = await StreamClient.open(server.port, "/sse?topic=t")
            await client.block()
            ndjson = await StreamClient.open(server.port, "/stream?topic=t")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.shutdown)
                close, body = await client.event()
                assert (close.event, body["code"]) == ("close", 1001)
                # The delay the node suggests, random per client, is the browser's retry too.
                reason, _, retry = body["reason"].partition("; retry=")
                assert reason == "server shutting down" and close.retry == int(retry)
                assert orjson.loads(await ndjson.line())["code"] == 1001
            for each in (client, ndjson):
                await each.aclose()


# --- under hypercorn ----------------------------------------------------------------------------


async def test_streams_under_hypercorn() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(transport="hypercorn", jwt_secret=SECRET) as server:
            async with sse(server, "topic=t") as refused:
                assert refused.status == 401
            token = mint()
            async with sse(server, f"topic=t&topic=u&token={token}") as client:
                assert client.headers["content-type"] == "text/event-stream; charset=utf-8"
                await client.block()
                await server.publish("t", 1)
                await server.publish("u", 1)
                await events(client, 2)
                last = client.last_id
            await server.publish("t", 2)
            async with sse(
                server, f"topic=t&topic=u&token={token}", {"Last-Event-ID": last}
            ) as client:
                assert (await client.block()).id == last
                [event] = await events(client, 1)
                assert (event["topic"], event["seq"]) == ("t", 2)
            async with sse(server, f"topic=t&since=0&token={token}", path="/stream") as client:
                assert [orjson.loads(await client.line())["seq"] for _ in range(2)] == [1, 2]


# --- curl, against a real tidings serve -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_follows_a_topic_from_an_offset(tidings_serve: Any) -> None:
    node = tidings_serve()
    publish = [
        "curl", "-s", "-X", "POST", "-H", f"Authorization: apikey {API_KEY}",
        f"{node.http_url}/api/publish",
    ]  # fmt: skip
    for n in range(4):
        body = orjson.dumps({"topic": "orders", "payload": {"n": n}})
        subprocess.run([*publish, "-d", body], check=True, capture_output=True, timeout=10)
    follow = subprocess.run(
        ["curl", "-sN", "--max-time", "2", f"{node.http_url}/stream?topic=orders&since=2"],
        capture_output=True, timeout=10, check=False,
    )  # fmt: skip
    assert follow.returncode == 28  # curl's "timed out": the stream stays open
    lines = [orjson.loads(line) for line in follow.stdout.splitlines() if line]
    assert [(line["seq"], line["payload"]) for line in lines] == [(3, {"n": 2}), (4, {"n": 3})]


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"sse_path": "/ws"}, "sse_path '/ws' is taken"),
        ({"stream_path": "/sse"}, "stream_path '/sse' is taken"),
        ({"sse_path": "/api/sse"}, "is taken"),
        ({"sse_path": "sse"}, "must start with '/'"),
        ({"stream_max_topics": 0}, "stream_max_topics must be at least 1"),
        ({"sse_retry": 0}, "sse_retry must be greater than 0"),
        ({"compression_min_size": -1}, "compression_min_size must not be negative"),
    ],
)
def test_stream_and_compression_settings_are_checked(settings: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        Config(**settings)


async def test_a_stream_path_may_be_turned_off() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(sse_path="", stream_path="/events") as server:
            async with sse(server, "topic=t") as client:
                assert client.status == 404
            async with sse(server, "topic=t", path="/events") as client:
                assert client.status == 200


async def test_a_topic_that_cannot_be_followed_ends_the_stream_with_1011() -> None:
    """Admitted, then the node cannot hold its second topic (max_topics, the first
    in use): the stream says why and ends, with no id to resume from."""
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(max_topics=1) as server, sse(server, "topic=a&topic=b") as client:
            start = await client.block()
            assert start.retry is not None and start.id is None
            close, body = await client.event()
            assert (close.event, body["code"]) == ("close", 1011)
            assert "cannot follow 'b'" in body["reason"]
            with pytest.raises(EOFError):
                await client.block()


# --- the application's hooks (docs/proxy.md) ---------------------------------------------


async def test_streams_ask_the_connect_and_subscribe_hooks_before_they_start() -> None:
    """No token: the connect hook says who the page is (by its cookie); each topic
    of the stream is asked of the subscribe hook at admission, and a refused one
    refuses the stream with an HTTP status (an EventSource does not retry it)."""

    async def connect(call: Call) -> Any:
        if "session=alice" in call.headers.get("cookie", ""):
            return {"result": {"user": "alice", "tenant": "acme"}}
        return {"error": {"code": 401, "message": "log in first"}}

    async def subscribe(call: Call) -> Any:
        if call.body["channel"] == "chat:secret":
            return {"error": {"code": 4403, "message": "members only"}}
        return {"result": {}}

    with trio.fail_after(TEST_TIMEOUT):
        async with running_backend() as backend:
            backend.on("/connect", connect)
            backend.on("/subscribe", subscribe)
            async with running_server(
                namespaces={"chat": {}},
                proxy_connect=backend.url("/connect"),
                proxy_subscribe=backend.url("/subscribe"),
                proxy_forward_headers=("Cookie",),
            ) as server:
                cookie = {"Cookie": "session=alice"}
                async with sse(server, "topic=chat:lobby") as refused:
                    assert (refused.status, refused.error()["message"]) == (401, "log in first")
                async with sse(server, "topic=chat:lobby&topic=chat:secret", cookie) as refused:
                    assert refused.status == 403
                    assert refused.error() == {"code": "4403", "message": "members only"}
                async with sse(server, "topic=chat:lobby", cookie) as client:
                    await client.block()
                    await server.publish("chat:lobby", "hi", tenant="acme")
                    assert (await events(client, 1))[0]["payload"] == "hi"
            calls = backend.calls_to("/subscribe")
            assert {c.body["transport"] for c in calls} == {"sse"}
            assert calls[-1].body["user"] == "alice"
            assert {c.body["transport"] for c in backend.calls_to("/connect")} == {"sse"}
