"""The HTTP server API (``POST /api/<method>``) over real sockets, and its OpenAPI document.

Every call goes through a real TCP connection to a real server; what the API
claims to have done is checked from where a user would notice it: a WebSocket
client that receives the event, or is disconnected with the code and reason.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import jwt
import orjson
import pytest
import requests
import schemathesis
import trio
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from tidings import Server
from tidings._version import __version__
from tidings.http.api import METHODS
from tidings.http.openapi import ERRORS
from tidings.protocol.clock import rfc3339_now

from .conftest import (
    TEST_TIMEOUT,
    Disconnects,
    call,
    http_request,
    raw_client,
    receive,
    running_server,
    subscribe,
    ws_client,
)

API_KEY = "test-api-key-4b1d"
JWT_SECRET = "a-test-secret-long-enough-for-hs256-0123456789"


# --- helpers -------------------------------------------------------------------------------


async def api(
    server: Server,
    method: str,
    body: Any = None,
    *,
    key: str | None = API_KEY,
    raw: bytes | None = None,
    authorization: str | None = None,
) -> tuple[int, Any]:
    """``POST /api/<method>``; returns the status and the decoded JSON answer."""
    data = raw if raw is not None else orjson.dumps({} if body is None else body)
    headers = "Content-Type: application/json\r\n"
    if authorization is not None:
        headers += f"Authorization: {authorization}\r\n"
    elif key is not None:
        headers += f"Authorization: apikey {key}\r\n"
    status, response_headers, content = await http_request(
        server.port, "POST", f"/api/{method}", data, headers
    )
    assert response_headers["content-type"] == "application/json", (status, content)
    return status, orjson.loads(content)


async def ok(server: Server, method: str, body: Any = None) -> dict[str, Any]:
    """An API call that must succeed; its answer."""
    status, answer = await api(server, method, body)
    assert status == 200, answer
    assert isinstance(answer, dict)
    return answer


def mint(user: str, tenant: str, **claims: Any) -> str:
    """A JWT as a backend would mint it for a browser."""
    payload = {"sub": user, "tenant": tenant, "exp": int(time.time()) + 600, **claims}
    return jwt.encode(payload, JWT_SECRET, algorithm="HS256")


@asynccontextmanager
async def client_as(server: Server, user: str, tenant: str) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket client presenting a token for ``user`` of ``tenant``."""
    headers = [(b"authorization", f"Bearer {mint(user, tenant)}".encode())]
    async with open_websocket_url(server.url, extra_headers=headers) as ws:
        yield ws


async def client_id(server: Server, ws: WebSocketConnection) -> str:
    """A client's id as a backend finds it: subscribe it somewhere unique, ask presence."""
    topic = f"whoami-{id(ws)}"
    await subscribe(ws, topic)
    [entry] = (await ok(server, "presence", {"topic": topic}))["clients"]
    return str(entry["client"])


async def closed_with(ws: WebSocketConnection) -> tuple[int, str]:
    """Read until the server closes the connection; its close code and reason."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await ws.get_message()
    return closed.value.reason.code, closed.value.reason.reason or ""


def error_of(answer: Any) -> str:
    """The stable code of an error answer, checking the error's shape on the way."""
    assert set(answer) == {"error"}, answer
    assert set(answer["error"]) == {"code", "message"}, answer
    assert isinstance(answer["error"]["message"], str)
    assert answer["error"]["message"]
    return str(answer["error"]["code"])


# --- each endpoint with the key ---------------------------------------------------------------


async def test_publish_answers_the_position_and_a_subscriber_receives_the_event() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(api_key=API_KEY) as server, ws_client(server) as ws:
            await subscribe(ws, "orders")
            first = await ok(server, "publish", {"topic": "orders", "payload": {"id": 7}})
            assert set(first) == {"topic", "seq", "epoch"}
            assert (first["topic"], first["seq"]) == ("orders", 1)
            assert isinstance(first["epoch"], str)
            assert first["epoch"]
            event = await receive(ws)
            assert event["type"] == "event"
            assert (event["topic"], event["seq"], event["epoch"]) == ("orders", 1, first["epoch"])
            assert event["payload"] == {"id": 7}

            second = await ok(server, "publish", {"topic": "orders", "payload": None})
            assert (second["seq"], second["epoch"]) == (2, first["epoch"])
            event = await receive(ws)
            assert (event["seq"], event["payload"]) == (2, None)


async def test_broadcast_reaches_subscribers_of_every_topic_and_reports_each() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(api_key=API_KEY) as server,
            ws_client(server) as alerts,
            ws_client(server) as audit,
        ):
            await subscribe(alerts, "alerts")
            await subscribe(audit, "audit")
            await server.publish("audit", "earlier")  # audit is at seq 1 already
            assert (await receive(audit))["payload"] == "earlier"

            answer = await ok(
                server,
                "broadcast",
                {"topics": ["alerts", "audit", "nobody-listens"], "payload": {"level": "high"}},
            )
            results = answer["results"]
            assert [r["topic"] for r in results] == ["alerts", "audit", "nobody-listens"]
            assert [r["seq"] for r in results] == [1, 2, 1]
            for ws, result in ((alerts, results[0]), (audit, results[1])):
                event = await receive(ws)
                assert (event["topic"], event["seq"], event["epoch"]) == (
                    result["topic"],
                    result["seq"],
                    result["epoch"],
                )
                assert event["payload"] == {"level": "high"}


async def test_broadcast_reports_a_refused_topic_and_still_publishes_the_others() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(api_key=API_KEY) as server, ws_client(server) as ws:
            await subscribe(ws, "news")
            answer = await ok(
                server, "broadcast", {"topics": ["nowhere:x", "news"], "payload": "hi"}
            )
            refused, published = answer["results"]
            assert refused["topic"] == "nowhere:x"
            assert refused["error"]["code"] == "unknown_namespace"
            assert "seq" not in refused
            assert (published["topic"], published["seq"]) == ("news", 1)
            assert (await receive(ws))["payload"] == "hi"


async def test_history_returns_the_events_after_an_offset_up_to_the_limit() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(api_key=API_KEY) as server:
            positions = [await server.publish("ledger", {"n": n}) for n in range(1, 11)]
            answer = await ok(server, "history", {"topic": "ledger", "since": 3, "limit": 4})
            assert (answer["topic"], answer["seq"]) == ("ledger", 10)
            assert answer["epoch"] == positions[0].epoch
            events = answer["events"]
            assert [e["seq"] for e in events] == [4, 5, 6, 7]
            assert [e["payload"] for e in events] == [{"n": 4}, {"n": 5}, {"n": 6}, {"n": 7}]
            assert {e["topic"] for e in events} == {"ledger"}
            assert {e["epoch"] for e in events} == {positions[0].epoch}
            assert all(e["timestamp"].endswith("Z") for e in events)

            everything = await ok(server, "history", {"topic": "ledger"})
            assert [e["seq"] for e in everything["events"]] == list(range(1, 11))
            caught_up = await ok(server, "history", {"topic": "ledger", "since": 10})
            assert (caught_up["seq"], caught_up["events"]) == (10, [])
            unknown = await ok(server, "history", {"topic": "never-published"})
            assert unknown == {"topic": "never-published", "seq": 0, "epoch": None, "events": []}


async def test_history_is_what_a_resuming_websocket_client_replays() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(api_key=API_KEY) as server, ws_client(server) as ws:
            for n in range(5):
                await ok(server, "publish", {"topic": "feed", "payload": n})
            history = await ok(server, "history", {"topic": "feed", "since": 2})
            await subscribe(ws, "feed", since=2, epoch=history["epoch"])
            replayed = [await receive(ws) for _ in range(3)]
            assert [(e["seq"], e["payload"]) for e in replayed] == [
                (e["seq"], e["payload"]) for e in history["events"]
            ]


async def test_presence_lists_each_subscriber_with_client_user_tenant_and_connected_at() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(api_key=API_KEY, jwt_secret=JWT_SECRET) as server,
            client_as(server, "alice", "acme") as alice_phone,
            client_as(server, "alice", "acme") as alice_laptop,
            client_as(server, "bob", "acme") as bob,
            client_as(server, "carol", "acme") as carol,
        ):
            for ws in (alice_phone, alice_laptop, bob):
                await subscribe(ws, "room")
            await subscribe(carol, "elsewhere")
            clients = {info.id: info for info in server.clients()}

            answer = await ok(server, "presence", {"topic": "room", "tenant": "acme"})
            assert answer["topic"] == "room"
            listed = answer["clients"]
            assert len(listed) == 3
            for entry in listed:
                info = clients[entry["client"]]
                assert entry == {
                    "client": info.id,
                    "user": info.user,
                    "tenant": "acme",
                    "connectedAt": rfc3339_now(info.connected_at),
                }
            assert sorted(entry["user"] for entry in listed) == ["alice", "alice", "bob"]

            stats = await ok(server, "presence_stats", {"topic": "room", "tenant": "acme"})
            assert stats == {"topic": "room", "clients": 3, "users": 2}

            # Another tenant's topic of the same name is empty; so is a topic nobody holds.
            assert (await ok(server, "presence", {"topic": "room"}))["clients"] == []
            nobody = await ok(server, "presence_stats", {"topic": "void", "tenant": "acme"})
            assert nobody == {"topic": "void", "clients": 0, "users": 0}

            disconnects = Disconnects(server)
            await alice_laptop.aclose()
            await disconnects.wait()
            stats = await ok(server, "presence_stats", {"topic": "room", "tenant": "acme"})
            assert stats == {"topic": "room", "clients": 2, "users": 2}


async def test_channels_lists_topics_with_their_subscriber_counts_and_filters_by_pattern() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(api_key=API_KEY) as server,
            ws_client(server) as a,
            ws_client(server) as b,
        ):
            await subscribe(a, "chat.lobby")
            await subscribe(b, "chat.lobby")
            await subscribe(b, "chat.random")
            await subscribe(a, "weather")
            await server.publish("no-subscribers", 1)  # a topic, but not a channel

            everything = await ok(server, "channels")
            assert everything == {
                "channels": [
                    {"topic": "chat.lobby", "subscribers": 2},
                    {"topic": "chat.random", "subscribers": 1},
                    {"topic": "weather", "subscribers": 1},
                ]
            }
            chat = await ok(server, "channels", {"pattern": "chat.*"})
            assert [c["topic"] for c in chat["channels"]] == ["chat.lobby", "chat.random"]
            assert await ok(server, "channels", {"pattern": "sport*"}) == {"channels": []}
            assert await ok(server, "channels", {"tenant": "someone-else"}) == {"channels": []}

            await call(a, {"type": "unsubscribe", "topic": "chat.lobby", "requestId": "u"})
            chat = await ok(server, "channels", {"pattern": "chat.lobby"})
            assert chat == {"channels": [{"topic": "chat.lobby", "subscribers": 1}]}


async def test_disconnect_closes_one_client_with_the_code_and_reason() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(api_key=API_KEY) as server,
            ws_client(server) as target,
            ws_client(server) as bystander,
        ):
            target_id = await client_id(server, target)
            await subscribe(bystander, "t")
            answer = await ok(
                server, "disconnect", {"client": target_id, "code": 4000, "reason": "maintenance"}
            )
            assert answer == {"disconnected": 1}
            assert await closed_with(target) == (4000, "maintenance")
            # The other client is untouched.
            pong = await call(bystander, {"type": "ping", "requestId": "still-there"})
            assert pong["type"] == "pong"
            # Nobody by that id any more; a made-up id is not an error either.
            assert await ok(server, "disconnect", {"client": target_id}) == {"disconnected": 0}
            assert await ok(server, "disconnect", {"client": "made-up"}) == {"disconnected": 0}


async def test_disconnect_without_a_code_closes_normally() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(api_key=API_KEY) as server, ws_client(server) as ws:
            target_id = await client_id(server, ws)
            assert await ok(server, "disconnect", {"client": target_id}) == {"disconnected": 1}
            assert await closed_with(ws) == (1000, "")


async def test_disconnect_closes_every_connection_of_a_user_and_nobody_else() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(api_key=API_KEY, jwt_secret=JWT_SECRET) as server,
            client_as(server, "mallory", "acme") as first,
            client_as(server, "mallory", "acme") as second,
            client_as(server, "mallory", "globex") as namesake,  # same name, other tenant
            client_as(server, "bob", "acme") as bob,
        ):
            for ws in (first, second, namesake, bob):
                await call(ws, {"type": "ping", "requestId": "hello"})
            answer = await ok(
                server,
                "disconnect",
                {"user": "mallory", "tenant": "acme", "code": 4403, "reason": "banned"},
            )
            assert answer == {"disconnected": 2}
            assert await closed_with(first) == (4403, "banned")
            assert await closed_with(second) == (4403, "banned")
            for ws in (namesake, bob):
                pong = await call(ws, {"type": "ping", "requestId": "still-there"})
                assert pong["type"] == "pong"
            # Without a tenant, the default tenant is meant: no mallory there.
            assert await ok(server, "disconnect", {"user": "mallory"}) == {"disconnected": 0}


async def test_info_reports_the_node_and_its_counters() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(api_key=API_KEY, node_id="node-7") as server,
            ws_client(server) as a,
            ws_client(server) as b,
        ):
            before = await ok(server, "info")
            assert (before["node"], before["version"]) == ("node-7", __version__)
            assert before["connections"] == 2
            assert (before["topics"], before["subscriptions"]) == (0, 0)
            assert (before["published"], before["delivered"], before["dropped"]) == (0, 0, 0)
            assert isinstance(before["uptime"], int | float)
            assert before["uptime"] >= 0

            await subscribe(a, "t")
            await subscribe(b, "t")
            await subscribe(b, "u")
            for n in range(3):
                await ok(server, "publish", {"topic": "t", "payload": n})
            for ws in (a, b):
                assert [(await receive(ws))["payload"] for _ in range(3)] == [0, 1, 2]
            after = await ok(server, "info")
            assert after["connections"] == 2
            assert (after["topics"], after["subscriptions"]) == (2, 3)
            assert (after["published"], after["delivered"], after["dropped"]) == (3, 6, 0)


async def test_clients_lists_each_connection_with_its_identity_and_subscriptions() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(api_key=API_KEY, jwt_secret=JWT_SECRET, node_id="node-c") as server,
            client_as(server, "alice", "acme") as alice,
            client_as(server, "bob", "globex") as bob,
        ):
            await subscribe(alice, "orders")
            await subscribe(alice, "chat")
            await subscribe(bob, "orders")
            answer = await ok(server, "clients")
            assert (answer["total"], answer["offset"], answer["limit"]) == (2, 0, 50)
            assert answer["missing"] == []
            by_user = {entry["user"]: entry for entry in answer["clients"]}
            entry = by_user["alice"]
            assert entry["client"] == await client_id_in(server, "orders", "acme", "alice")
            assert (entry["node"], entry["tenant"], entry["dialect"], entry["path"]) == (
                "node-c",
                "acme",
                "native",
                "/ws",
            )
            assert entry["remote"].startswith("127.0.0.1:")
            assert (entry["subscriptions"], entry["topics"]) == (2, ["chat", "orders"])
            assert (entry["queued"], entry["queuedBytes"], entry["dropped"]) == (0, 0, 0)
            assert entry["peakQueued"] >= 1  # its subscribe replies went through the outbox
            assert entry["connectedAt"].endswith("Z")
            assert by_user["bob"]["topics"] == ["orders"]

            # Filtered by any of its fields or topics, and by tenant (every tenant otherwise).
            for body, users in [
                ({"filter": "ALI"}, ["alice"]),
                ({"filter": "chat"}, ["alice"]),
                ({"filter": "globex"}, ["bob"]),
                ({"filter": "nobody"}, []),
                ({"tenant": "acme"}, ["alice"]),
                ({"tenant": "acme", "filter": "bob"}, []),
            ]:
                found = await ok(server, "clients", body)
                assert [entry["user"] for entry in found["clients"]] == users, body
                assert found["total"] == len(users)


async def client_id_in(server: Server, topic: str, tenant: str, user: str) -> str:
    """The id ``presence`` gives the connection of ``user`` on ``topic``."""
    answer = await ok(server, "presence", {"topic": topic, "tenant": tenant})
    [entry] = [entry for entry in answer["clients"] if entry["user"] == user]
    return str(entry["client"])


async def test_clients_sorts_and_pages_consistently() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(api_key=API_KEY, jwt_secret=JWT_SECRET) as server,
            client_as(server, "carol", "t") as c,
            client_as(server, "alice", "t") as a,
            client_as(server, "bob", "t") as b,
        ):
            for ws, count in ((c, 1), (a, 3), (b, 2)):
                for n in range(count):
                    await subscribe(ws, f"topic-{n}")
            by_user = await ok(server, "clients", {"sort": "user"})
            assert [e["user"] for e in by_user["clients"]] == ["alice", "bob", "carol"]
            by_count = await ok(server, "clients", {"sort": "subscriptions", "order": "desc"})
            assert [e["user"] for e in by_count["clients"]] == ["alice", "bob", "carol"]
            pages = [
                await ok(server, "clients", {"sort": "user", "limit": 2, "offset": offset})
                for offset in (0, 2, 4)
            ]
            assert [[e["user"] for e in page["clients"]] for page in pages] == [
                ["alice", "bob"],
                ["carol"],
                [],
            ]
            assert {page["total"] for page in pages} == {3}


async def test_clients_shows_the_outbox_and_drops_of_a_client_that_stopped_reading() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(api_key=API_KEY, outbox_size=8, write_timeout=30) as server:
            stalled = await raw_client(server, receive_buffer=4096)
            await stalled.send_json({"type": "subscribe", "topic": "t", "requestId": "s"})
            assert (await stalled.receive_json())["type"] == "response"  # then it stops reading
            while server.statistics().dropped == 0:
                await server.publish("t", {"blob": "x" * 32_000})
            [entry] = (await ok(server, "clients"))["clients"]
            assert entry["dropped"] == server.statistics().dropped > 0
            assert 0 < entry["queued"] <= entry["peakQueued"] <= 8
            assert entry["queuedBytes"] > 0
            [topic] = (await ok(server, "topics"))["topics"]
            assert topic["dropped"] == entry["dropped"]
            await stalled.aclose()


async def test_topics_lists_each_topic_with_its_position_history_and_counters() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(api_key=API_KEY, node_id="node-t") as server,
            ws_client(server) as ws,
        ):
            await subscribe(ws, "orders")
            for n in range(3):
                position = await ok(server, "publish", {"topic": "orders", "payload": n})
                assert (await receive(ws))["seq"] == position["seq"]
            await ok(server, "publish", {"topic": "audit", "payload": 1, "tenant": "acme"})
            answer = await ok(server, "topics")
            assert (answer["total"], answer["missing"]) == (2, [])
            assert [(t["tenant"], t["topic"]) for t in answer["topics"]] == [
                ("acme", "audit"),
                ("default", "orders"),
            ]
            orders = answer["topics"][1]
            assert orders["node"] == "node-t"
            assert (orders["subscribers"], orders["seq"], orders["epoch"]) == (
                1,
                3,
                position["epoch"],
            )
            assert (orders["history"], orders["published"], orders["delivered"]) == (3, 3, 3)
            assert orders["dropped"] == 0
            assert 0 <= orders["historyAge"] < TEST_TIMEOUT
            only = await ok(server, "topics", {"filter": "ORD"})
            assert [t["topic"] for t in only["topics"]] == ["orders"]
            acme = await ok(server, "topics", {"tenant": "acme"})
            assert [t["topic"] for t in acme["topics"]] == ["audit"]
            by_seq = await ok(server, "topics", {"sort": "seq", "order": "desc", "limit": 1})
            assert ([t["topic"] for t in by_seq["topics"]], by_seq["total"]) == (["orders"], 2)


async def test_series_answers_the_node_rates_it_sampled() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(api_key=API_KEY, node_id="node-s") as server:
            answer = await ok(server, "series")
            assert answer["interval"] == 2.0
            assert answer["missing"] == []
            [node] = answer["nodes"]
            assert node["node"] == "node-s"
            assert isinstance(node["samples"], list)  # sampled every 2 s: maybe none yet
            for sample in node["samples"]:
                assert set(sample) == {
                    "t", "published", "delivered", "dropped", "connections", "subscriptions"
                }  # fmt: skip
            later = await ok(server, "series", {"since": time.time() + 3600})
            assert later["nodes"][0]["samples"] == []


# --- the key ------------------------------------------------------------------------------

#: A valid body per method, so that only the key decides the answer.
VALID_BODIES: dict[str, dict[str, Any]] = {
    "publish": {"topic": "t", "payload": 1},
    "broadcast": {"topics": ["t"], "payload": 1},
    "history": {"topic": "t"},
    "presence": {"topic": "t"},
    "presence_stats": {"topic": "t"},
    "channels": {},
    "disconnect": {"user": "anyone"},
    "info": {},
    "clients": {},
    "topics": {},
    "series": {},
}


def test_every_method_is_covered_here_and_in_the_openapi_document() -> None:
    assert set(VALID_BODIES) == set(METHODS)
    assert {"400", "401", "403"} <= set(ERRORS)
    assert "`unauthorized`" in ERRORS["401"]
    assert "`api_disabled`" in ERRORS["403"]


@pytest.mark.parametrize("method", sorted(VALID_BODIES))
async def test_each_method_answers_with_the_key_and_401_without_it(method: str) -> None:
    body = VALID_BODIES[method]
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(api_key=API_KEY) as server:
            refusals = [
                await api(server, method, body, key=None),  # no Authorization header
                await api(server, method, body, key="wrong-key"),
                await api(server, method, body, key=API_KEY + "x"),
                await api(server, method, body, key=""),
                await api(server, method, body, authorization=f"Bearer {API_KEY}"),
                await api(server, method, body, authorization=API_KEY),
            ]
            for status, answer in refusals:
                assert status == 401
                assert error_of(answer) == "unauthorized"
            assert server.statistics().published == 0  # nothing was done

            status, answer = await api(server, method, body)
            assert status == 200, answer
            # The scheme is case-insensitive, as HTTP auth schemes are.
            status, answer = await api(server, method, body, authorization=f"ApiKey {API_KEY}")
            assert status == 200, answer


async def test_a_wrong_key_neither_publishes_nor_disconnects() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(api_key=API_KEY) as server, ws_client(server) as ws:
            await subscribe(ws, "t")
            target_id = await client_id(server, ws)
            status, _ = await api(server, "publish", {"topic": "t", "payload": "x"}, key="bad")
            assert status == 401
            status, _ = await api(server, "disconnect", {"client": target_id}, key="bad")
            assert status == 401
            # Still connected and subscribed; the first event it sees is the first published.
            await ok(server, "publish", {"topic": "t", "payload": "real"})
            event = await receive(ws)
            assert (event["seq"], event["payload"]) == (1, "real")


@pytest.mark.parametrize("method", sorted(VALID_BODIES))
async def test_without_a_configured_key_the_api_is_refused_not_open(method: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server:
            for key in (None, "anything", ""):
                status, answer = await api(server, method, VALID_BODIES[method], key=key)
                assert status == 403
                assert error_of(answer) == "api_disabled"
            assert server.statistics().published == 0


# --- bad input ------------------------------------------------------------------------------

BAD_INPUT: list[tuple[str, bytes, int, str]] = [
    ("publish", b"not json", 400, "invalid_json"),
    ("publish", b'{"topic": "t", "payload": ', 400, "invalid_json"),
    ("publish", b"\xff\xfe", 400, "invalid_json"),
    ("publish", b"[1, 2]", 400, "invalid_message"),
    ("publish", b'"publish"', 400, "invalid_message"),
    ("publish", b"null", 400, "invalid_message"),
    ("publish", b"", 400, "missing_field"),
    ("publish", b"{}", 400, "missing_field"),
    ("publish", b'{"topic": "t"}', 400, "missing_field"),
    ("publish", b'{"payload": 1}', 400, "missing_field"),
    ("publish", b'{"topic": 5, "payload": 1}', 400, "invalid_field"),
    ("publish", b'{"topic": ["t"], "payload": 1}', 400, "invalid_field"),
    ("publish", b'{"topic": "", "payload": 1}', 400, "invalid_topic"),
    ("publish", b'{"topic": "a\\nb", "payload": 1}', 400, "invalid_topic"),
    ("publish", orjson.dumps({"topic": "x" * 257, "payload": 1}), 400, "invalid_topic"),
    ("publish", b'{"topic": "t", "payload": 1, "tenant": 5}', 400, "invalid_field"),
    ("publish", b'{"topic": "t", "payload": 1, "tenant": ""}', 400, "invalid_field"),
    ("publish", b'{"topic": "ns:t", "payload": 1}', 400, "unknown_namespace"),
    (
        "publish",
        b'{"topic": "t", "payload": ' + b"[" * 300 + b"]" * 300 + b"}",
        400,
        "invalid_field",
    ),
    ("broadcast", b'{"payload": 1}', 400, "missing_field"),
    ("broadcast", b'{"topics": ["t"]}', 400, "missing_field"),
    ("broadcast", b'{"topics": "t", "payload": 1}', 400, "invalid_field"),
    ("broadcast", b'{"topics": [], "payload": 1}', 400, "invalid_field"),
    ("broadcast", b'{"topics": ["t", 5], "payload": 1}', 400, "invalid_field"),
    ("broadcast", b'{"topics": ["t", ""], "payload": 1}', 400, "invalid_topic"),
    ("broadcast", orjson.dumps({"topics": ["t"] * 1001, "payload": 1}), 400, "invalid_field"),
    ("history", b"{}", 400, "missing_field"),
    ("history", b'{"topic": "t", "since": -1}', 400, "invalid_field"),
    ("history", b'{"topic": "t", "since": "3"}', 400, "invalid_field"),
    ("history", b'{"topic": "t", "since": 3.0}', 400, "invalid_field"),
    ("history", b'{"topic": "t", "since": true}', 400, "invalid_field"),
    ("history", b'{"topic": "t", "limit": 0}', 400, "invalid_field"),
    ("history", b'{"topic": "t", "limit": 1001}', 400, "invalid_field"),
    ("presence", b"{}", 400, "missing_field"),
    ("presence", b'{"topic": 1}', 400, "invalid_field"),
    ("presence_stats", b'{"topic": "t", "tenant": ["a"]}', 400, "invalid_field"),
    ("channels", b'{"pattern": 5}', 400, "invalid_field"),
    ("channels", b'{"tenant": "a\\u0000b"}', 400, "invalid_field"),
    ("disconnect", b"{}", 400, "missing_field"),
    ("disconnect", b'{"client": "a", "user": "b"}', 400, "missing_field"),
    ("disconnect", b'{"client": 5}', 400, "invalid_field"),
    ("disconnect", b'{"user": false}', 400, "invalid_field"),
    ("disconnect", b'{"user": "u", "code": 2000}', 400, "invalid_field"),
    ("disconnect", b'{"user": "u", "code": 1001}', 400, "invalid_field"),
    ("disconnect", b'{"user": "u", "code": 5000}', 400, "invalid_field"),
    ("disconnect", b'{"user": "u", "code": "4000"}', 400, "invalid_field"),
    ("disconnect", orjson.dumps({"user": "u", "reason": "\u00e9" * 62}), 400, "invalid_field"),
    ("disconnect", b'{"user": "u", "reason": 1}', 400, "invalid_field"),
    ("info", b"[]", 400, "invalid_message"),
    ("clients", b'{"limit": 0}', 400, "invalid_field"),
    ("clients", b'{"limit": 501}', 400, "invalid_field"),
    ("clients", b'{"offset": -1}', 400, "invalid_field"),
    ("clients", b'{"offset": 10001}', 400, "invalid_field"),
    ("clients", b'{"sort": "password"}', 400, "invalid_field"),
    ("clients", b'{"sort": "topic"}', 400, "invalid_field"),
    ("clients", b'{"order": "up"}', 400, "invalid_field"),
    ("clients", b'{"filter": 5}', 400, "invalid_field"),
    ("clients", orjson.dumps({"filter": "x" * 201}), 400, "invalid_field"),
    ("clients", b'{"tenant": ""}', 400, "invalid_field"),
    ("topics", b'{"sort": "client"}', 400, "invalid_field"),
    ("topics", b'{"limit": 2.0}', 400, "invalid_field"),
    ("series", b'{"since": -1}', 400, "invalid_field"),
    ("series", b'{"since": "now"}', 400, "invalid_field"),
    ("series", b'{"since": true}', 400, "invalid_field"),
    ("teleport", b"{}", 404, "not_found"),
    ("", b"{}", 404, "not_found"),
    ("publish/extra", b"{}", 404, "not_found"),
]


@pytest.mark.parametrize(
    ("method", "body", "status", "code"),
    BAD_INPUT,
    ids=[f"{m or 'empty'}-{code}-{i}" for i, (m, _, _, code) in enumerate(BAD_INPUT)],
)
async def test_bad_input_gets_its_stable_error_code(
    method: str, body: bytes, status: int, code: str
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(api_key=API_KEY) as server:
            got_status, answer = await api(server, method, raw=body)
            assert (got_status, error_of(answer)) == (status, code)
            assert server.statistics().published == 0
            # The server is none the worse for it.
            assert (await ok(server, "publish", {"topic": "t", "payload": 1}))["seq"] == 1


async def test_an_optional_field_that_is_null_counts_as_left_out() -> None:
    """As over the WebSocket: JSON encoders that write ``null`` for "not set" just work."""
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(api_key=API_KEY) as server, ws_client(server) as ws:
            await subscribe(ws, "t")
            published = await ok(server, "publish", {"topic": "t", "payload": 1, "tenant": None})
            assert (await receive(ws))["seq"] == published["seq"] == 1
            history = await ok(
                server, "history", {"topic": "t", "since": None, "limit": None, "tenant": None}
            )
            assert [e["seq"] for e in history["events"]] == [1]
            channels = await ok(server, "channels", {"pattern": None, "tenant": None})
            assert channels == {"channels": [{"topic": "t", "subscribers": 1}]}
            target = await client_id(server, ws)
            answer = await ok(
                server,
                "disconnect",
                {"client": target, "user": None, "code": None, "reason": None, "tenant": None},
            )
            assert answer == {"disconnected": 1}
            assert await closed_with(ws) == (1000, "")


async def test_other_http_methods_are_refused_with_405_and_allow() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(api_key=API_KEY) as server:
            for verb in ("GET", "PUT", "DELETE"):
                status, headers, content = await http_request(
                    server.port, verb, "/api/publish", b"", f"Authorization: apikey {API_KEY}\r\n"
                )
                assert status == 405
                assert headers["allow"] == "POST"
                assert error_of(orjson.loads(content)) == "method_not_allowed"


async def test_the_node_limit_of_topics_is_503_too_many_topics_when_every_topic_is_in_use() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(api_key=API_KEY, max_topics=1) as server,
            server.subscribe("first"),
        ):
            await ok(server, "publish", {"topic": "first", "payload": 1})
            status, answer = await api(server, "publish", {"topic": "second", "payload": 1})
            assert (status, error_of(answer)) == (503, "too_many_topics")
            assert (await ok(server, "publish", {"topic": "first", "payload": 2}))["seq"] == 2


async def test_an_idle_topic_makes_room_for_a_new_one_at_the_node_limit() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(api_key=API_KEY, max_topics=1) as server:
            first = await ok(server, "publish", {"topic": "first", "payload": 1})
            assert (await ok(server, "publish", {"topic": "second", "payload": 1}))["seq"] == 1
            # "first" was forgotten with its history: it comes back as a new stream.
            again = await ok(server, "publish", {"topic": "first", "payload": 2})
            assert again["seq"] == 1 and again["epoch"] != first["epoch"]


# --- tenants ---------------------------------------------------------------------------------


async def test_the_tenant_field_addresses_one_tenant_and_no_other() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(api_key=API_KEY, jwt_secret=JWT_SECRET) as server,
            client_as(server, "ann", "tenant-a") as ann,
            client_as(server, "bea", "tenant-b") as bea,
        ):
            await subscribe(ann, "news")
            await subscribe(bea, "news")
            to_b = await ok(
                server, "publish", {"topic": "news", "payload": "b", "tenant": "tenant-b"}
            )
            event = await receive(bea)
            assert (event["seq"], event["payload"]) == (to_b["seq"], "b")
            # The default tenant's "news" is a third topic: neither client sees it.
            await ok(server, "publish", {"topic": "news", "payload": "default"})
            # Tenant A's own stream starts at 1: it never saw B's or the default's event.
            to_a = await ok(
                server, "publish", {"topic": "news", "payload": "a", "tenant": "tenant-a"}
            )
            assert to_a["seq"] == 1
            event = await receive(ann)
            assert (event["seq"], event["payload"], event["epoch"]) == (1, "a", to_a["epoch"])
            await ok(
                server, "broadcast", {"topics": ["news"], "payload": "b2", "tenant": "tenant-b"}
            )
            assert (await receive(bea))["payload"] == "b2"

            history_a = await ok(server, "history", {"topic": "news", "tenant": "tenant-a"})
            assert [e["payload"] for e in history_a["events"]] == ["a"]
            history_b = await ok(server, "history", {"topic": "news", "tenant": "tenant-b"})
            assert [e["payload"] for e in history_b["events"]] == ["b", "b2"]

            presence_b = await ok(server, "presence", {"topic": "news", "tenant": "tenant-b"})
            assert [(c["user"], c["tenant"]) for c in presence_b["clients"]] == [
                ("bea", "tenant-b")
            ]
            channels_a = await ok(server, "channels", {"tenant": "tenant-a"})
            assert channels_a == {"channels": [{"topic": "news", "subscribers": 1}]}

            # A client id does not reach across tenants either.
            [bea_info] = [c for c in server.clients() if c.user == "bea"]
            wrong = await ok(server, "disconnect", {"client": bea_info.id, "tenant": "tenant-a"})
            assert wrong == {"disconnected": 0}
            assert (await call(bea, {"type": "ping", "requestId": "p"}))["type"] == "pong"
            right = await ok(server, "disconnect", {"client": bea_info.id, "tenant": "tenant-b"})
            assert right == {"disconnected": 1}
            assert await closed_with(bea) == (1000, "")
            # Ann is still subscribed and only ever got her tenant's event.
            await ok(server, "publish", {"topic": "news", "payload": "a2", "tenant": "tenant-a"})
            event = await receive(ann)
            assert (event["seq"], event["payload"]) == (2, "a2")


# --- the OpenAPI document -------------------------------------------------------------------


async def test_the_openapi_document_describes_every_method_the_server_answers() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(api_key=API_KEY) as server:
            status, headers, content = await http_request(server.port, "GET", "/api/openapi.json")
            assert status == 200
            assert headers["content-type"] == "application/json"
            document = orjson.loads(content)
            assert document["openapi"].startswith("3.")
            assert document["info"]["version"] == __version__
            assert set(document["paths"]) == {f"/api/{name}" for name in METHODS}
            for name, path in document["paths"].items():
                assert set(path) == {"post"}, name
                assert path["post"]["security"] == [
                    {"apikey": []},
                    {"console_session": [], "console_csrf": []},
                ]
                assert {"200", "400", "401", "403"} <= set(path["post"]["responses"])
            scheme = document["components"]["securitySchemes"]["apikey"]
            assert (scheme["in"], scheme["name"]) == ("header", "Authorization")
            # HEAD gets the same headers and no body, and the connection stays usable.
            status, headers, content = await http_request(server.port, "HEAD", "/api/openapi.json")
            assert (status, content) == (200, b"")
            assert headers["content-type"] == "application/json"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def served_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``tidings serve`` process with ``TIDINGS_API_KEY``; yields its base URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    env = {**os.environ, "TIDINGS_API_KEY": API_KEY}
    env.pop("TIDINGS_CONFIG", None)
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "tidings", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "warning"],
            env=env, stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TEST_TIMEOUT
        while True:
            assert process.poll() is None, f"tidings serve exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"no /health within {TEST_TIMEOUT} s"
            try:
                if requests.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.05)  # polling a child process: there is nothing to await
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_schemathesis_finds_the_server_as_its_openapi_document_says(
    served_api: str, method: str, mode: str
) -> None:
    """Generated requests, valid and invalid: never a 500, and every answer as documented."""
    schema = schemathesis.openapi.from_url(f"{served_api}/api/openapi.json")
    operation = schema[f"/api/{method}"]["POST"]
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    if mode == "negative":  # what the document rules out, the server refuses
        checks.append(negative_data_rejection)
    statuses: list[int] = []

    # The key is fixed: negative cases are about the body (wrong keys are tested above).
    strategy = operation.as_strategy(
        generation_mode=schemathesis.GenerationMode(mode),
        headers={"Authorization": f"apikey {API_KEY}"},
    )

    @given(case=strategy)
    @settings(
        max_examples=int(os.environ.get("TIDINGS_SCHEMATHESIS_EXAMPLES", "25")),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def run(case: schemathesis.Case) -> None:
        response = case.call_and_validate(checks=checks, timeout=10)
        statuses.append(response.status_code)

    run()
    assert statuses, "schemathesis sent nothing"
    if mode == "positive":
        assert 200 in statuses, f"no generated valid request was accepted: {statuses}"


@pytest.mark.slow
def test_served_api_fixture_reads_the_key_from_the_environment(served_api: str) -> None:
    """The subprocess above took ``TIDINGS_API_KEY``: the key works, others do not."""
    url = f"{served_api}/api/info"
    accepted = requests.post(
        url, json={}, headers={"Authorization": f"apikey {API_KEY}"}, timeout=5
    )
    assert accepted.status_code == 200
    assert accepted.json()["version"] == __version__
    refused = requests.post(url, json={}, headers={"Authorization": "apikey nope"}, timeout=5)
    assert (refused.status_code, refused.json()["error"]["code"]) == (401, "unauthorized")
