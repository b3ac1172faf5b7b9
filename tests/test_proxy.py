"""The application's hooks (``[proxy]``, docs/proxy.md) against a real HTTP backend.

The backend (``tests/hookbackend.py``) is a small h11 server on 127.0.0.1 in
the test's own Trio run; the node is a real one on a real port (and, once,
a ``tidings serve`` process). Clients are trio-websocket on ``/ws`` and the
unmodified centrifuge-python SDK on ``/connection/websocket``. The backend
allows, refuses, replaces payloads, answers requests, holds calls (slow),
is not there (down) and answers nonsense; the node must turn each into the
client's answer without holding up any other client.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from tidings import Server
from tidings.config import PROXY_HOOKS as HOOKS
from tidings.errors import ProxyError
from tidings.node.proxy import AnswerCache

from .conftest import (
    TEST_TIMEOUT,
    Disconnects,
    call,
    http_request,
    receive,
    running_server,
    send,
    subscribe,
)
from .hookbackend import Backend, Call, Flood, HangUp, Hold, Raw, running_backend
from .rawws import RawWebSocket
from .redis_fixture import free_port
from .test_centrifugo_python import Recorder, ReplyError, SubEvents, in_asyncio, sdk_client

ROOT = Path(__file__).resolve().parent.parent
SECRET = "proxy-test-secret-of-32-bytes-or-more!"
CHAT = {"chat": {"client_publish": True}}


@asynccontextmanager
async def node_with(backend: Backend, **settings: Any) -> AsyncIterator[Server]:
    """A node whose hooks (``hooks=("subscribe", ...)``) are the backend's /<hook> paths."""
    hooks = settings.pop("hooks", ())
    for hook in hooks:
        settings[f"proxy_{hook}"] = backend.url(f"/{hook}")
    settings.setdefault("namespaces", CHAT)
    async with running_server(**settings) as server:
        yield server


def ws_url(server: Server, query: str = "") -> str:
    return server.url + (f"?{query}" if query else "")


async def request(ws: Any, topic: str, payload: Any, request_id: str) -> dict[str, Any]:
    message = {"type": "request", "topic": topic, "payload": payload, "requestId": request_id}
    return await call(ws, message)


async def publish(ws: Any, topic: str, payload: Any, request_id: str) -> dict[str, Any]:
    message = {"type": "publish", "topic": topic, "payload": payload, "requestId": request_id}
    return await call(ws, message)


async def try_subscribe(ws: Any, topic: str) -> dict[str, Any]:
    return await call(ws, {"type": "subscribe", "topic": topic, "requestId": f"sub-{topic}"})


def refused_port() -> int:
    """A port on 127.0.0.1 nobody listens on (connections to it are refused)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


# --- connect ------------------------------------------------------------------------


async def connect_answer(call: Call) -> Any:
    cookie = call.headers.get("cookie", "")
    if "session=alice" in cookie:
        return {
            "result": {
                "user": "alice",
                "tenant": "acme",
                "topics": ["chat:*", "prices", "nothing"],
                "publish": ["chat:lobby"],
            }
        }
    if "session=banned" in cookie:
        return {"error": {"code": 403, "message": "banned"}}
    if "session=gone" in cookie:
        return {"disconnect": {"code": 4501, "reason": "go away"}}
    if "session=later" in cookie:
        return {"error": {"code": 1001, "message": "try later", "temporary": True}}
    return {"error": {"code": 401, "message": "log in first"}}


async def test_connect_hook_names_the_client_or_refuses_it_at_the_upgrade() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_backend() as backend, node_with(backend, hooks=["connect"]) as server:
            backend.on("/connect", connect_answer)
            headers = [("Cookie", "session=alice"), ("User-Agent", "test/1")]
            async with open_websocket_url(ws_url(server, "room=7"), extra_headers=headers) as ws:
                reply = await subscribe(ws, "chat:lobby")
                assert reply["payload"]["status"] == "subscribed"
                [client] = server.clients()
                assert (client.user, client.tenant) == ("alice", "acme")
                # The hook's topics claim: chat:* (and two rpc methods).
                refused = await try_subscribe(ws, "news")
                assert refused["payload"]["code"] == "forbidden"
                # ... and its publish claim: chat:lobby only.
                assert (await publish(ws, "chat:lobby", 1, "p1"))["type"] == "response"
                assert (await publish(ws, "chat:other", 1, "p2"))["payload"]["code"] == "forbidden"
            [asked] = backend.calls_to("/connect")
            body = asked.body
            assert body["client"] == client.id
            assert (body["transport"], body["protocol"], body["encoding"]) == (
                "websocket",
                "json",
                "json",
            )
            assert (body["dialect"], body["path"], body["query"]) == ("native", "/ws", "room=7")
            assert body["remote"] == client.remote
            assert body["headers"] == {"Cookie": "session=alice", "User-Agent": "test/1"}
            assert "user" not in body  # not known yet

            for cookie, status, code, message in [
                ("session=banned", 403, "403", "banned"),
                ("session=nobody", 401, "401", "log in first"),
                ("session=gone", 403, "forbidden", "go away"),
                ("session=later", 503, "1001", "try later"),
            ]:
                with pytest.raises(ConnectionRejected) as rejected:
                    async with open_websocket_url(
                        ws_url(server), extra_headers=[("Cookie", cookie)]
                    ):
                        pass
                assert rejected.value.status_code == status, cookie
                assert orjson.loads(rejected.value.body)["error"] == {
                    "code": code,
                    "message": message,
                }
            assert server.clients() == []
            assert server.counters.auth_failures == 4


async def test_a_client_with_a_token_is_not_asked_about() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_backend() as backend,
            node_with(backend, hooks=["connect"], jwt_secret=SECRET) as server,
        ):
            backend.on("/connect", connect_answer)
            token = jwt.encode({"sub": "bob", "exp": int(time.time()) + 60}, SECRET)
            headers = [("Authorization", f"Bearer {token}")]
            async with open_websocket_url(ws_url(server), extra_headers=headers) as ws:
                await subscribe(ws, "news")
                assert [c.user for c in server.clients()] == ["bob"]
            assert backend.calls_to("/connect") == []
            # Without a token, the hook decides, though the node takes JWTs.
            headers = [("Cookie", "session=alice")]
            async with open_websocket_url(ws_url(server), extra_headers=headers) as ws:
                await subscribe(ws, "chat:lobby")
                assert [c.user for c in server.clients()] == ["alice"]
            assert len(backend.calls_to("/connect")) == 1


# --- subscribe, publish, rpc ----------------------------------------------------------


async def subscribe_answer(call: Call) -> Any:
    channel = call.body["channel"]
    if channel == "chat:secret":
        return {"error": {"code": 4403, "message": "members only"}}
    if channel == "chat:door":
        return {"disconnect": {"code": 4501, "reason": "not here"}}
    return {"result": {}}


async def publish_answer(call: Call) -> Any:
    data = call.body["data"]
    if data == "swear":
        return {"result": {"data": {"text": "[removed]", "by": call.body["user"]}}}
    if data == "spam":
        return {"error": {"code": "spam", "message": "no spam"}}
    return {"result": {}}


async def rpc_answer(call: Call) -> Any:
    if call.body["method"] == "prices":
        return {"result": {"data": {"price": call.body["data"]["item"] * 2}}}
    return {"error": {"code": 404, "message": "no such method"}}


async def test_subscribe_and_publish_hooks_allow_refuse_replace_and_disconnect() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_backend() as backend,
            node_with(backend, hooks=["subscribe", "publish"]) as server,
        ):
            backend.on("/subscribe", subscribe_answer)
            backend.on("/publish", publish_answer)
            async with open_websocket_url(ws_url(server, "a=b")) as ws:
                await subscribe(ws, "chat:lobby")
                refused = await try_subscribe(ws, "chat:secret")
                assert refused["type"] == "error"
                assert refused["payload"] == {"code": "4403", "message": "members only"}
                assert refused["topic"] == "chat:secret"

                assert (await publish(ws, "chat:lobby", "hello", "p1"))["type"] == "response"
                assert (await receive(ws))["payload"] == "hello"
                assert (await publish(ws, "chat:lobby", "swear", "p2"))["type"] == "response"
                assert (await receive(ws))["payload"] == {"text": "[removed]", "by": ""}
                spam = await publish(ws, "chat:lobby", "spam", "p3")
                assert spam["payload"] == {"code": "spam", "message": "no spam"}
                # Nothing of the refused publication was published.
                assert (await publish(ws, "chat:lobby", "bye", "p4"))["payload"]["seq"] == 3
                assert (await receive(ws))["payload"] == "bye"

                await send(ws, {"type": "subscribe", "topic": "chat:door", "requestId": "d"})
                with pytest.raises(ConnectionClosed) as closed:
                    await receive(ws)
                assert closed.value.reason.code == 4501
                assert closed.value.reason.reason == "not here"

            subscribes = backend.calls_to("/subscribe")
            assert [c.body["channel"] for c in subscribes] == [
                "chat:lobby",
                "chat:secret",
                "chat:door",
            ]
            body = subscribes[0].body
            assert (body["user"], body["tenant"], body["query"]) == ("", "default", "a=b")
            assert [c.body["data"] for c in backend.calls_to("/publish")] == [
                "hello",
                "swear",
                "spam",
                "bye",
            ]


async def test_requests_without_a_handler_go_to_the_rpc_hook() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_backend() as backend, node_with(backend, hooks=["rpc"]) as server:
            backend.on("/rpc", rpc_answer)

            @server.on_request("local")
            async def local(request: Any) -> Any:
                return {"here": True}

            async with open_websocket_url(ws_url(server)) as ws:
                answer = await request(ws, "prices", {"item": 21}, "r1")
                assert (answer["type"], answer["payload"]) == ("response", {"price": 42})
                missing = await request(ws, "nothing", {}, "r2")
                assert missing["payload"] == {"code": "404", "message": "no such method"}
                assert (await request(ws, "local", {}, "r3"))["payload"] == {"here": True}
            assert [c.body["method"] for c in backend.calls_to("/rpc")] == ["prices", "nothing"]
            assert backend.calls_to("/rpc")[0].body["data"] == {"item": 21}


# --- a backend that is slow, down, or talks nonsense ------------------------------------


async def test_a_slow_backend_refuses_with_a_temporary_error_and_holds_up_no_one_else() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_backend() as backend,
            node_with(backend, hooks=["subscribe"], proxy_timeout="1s") as server,
        ):
            backend.on(
                "/subscribe",
                lambda c: Hold() if c.body["channel"] == "chat:slow" else {"result": {}},
            )
            async with open_websocket_url(server.url) as a, open_websocket_url(server.url) as b:
                await subscribe(a, "chat:news")
                await send(a, {"type": "subscribe", "topic": "chat:slow", "requestId": "s"})
                await backend.wait_for(lambda: backend.holding == 1)
                # While the backend holds a's call: b is served, and a's writer
                # still delivers its events; only a's own commands wait.
                await subscribe(b, "chat:news")
                await server.publish("chat:news", "while held")
                assert (await receive(b))["payload"] == "while held"
                assert (await receive(a))["payload"] == "while held"
                assert backend.holding == 1
                refused = await receive(a)
                assert (refused["type"], refused["requestId"]) == ("error", "s")
                assert refused["payload"]["code"] == "unavailable"
                assert (await call(a, {"type": "ping", "requestId": "p"}))["type"] == "pong"
            assert server.proxy is not None
            assert server.proxy.calls[("subscribe", "unavailable")] == 1


#: What a backend might answer that is no answer at all, by the channel asked about.
NONSENSE: dict[str, Any] = {
    "chat:not-json": Raw(200, b"<html>oops</html>"),
    "chat:array": [],
    "chat:empty": {},
    "chat:result-list": {"result": []},
    "chat:error-string": {"error": "no"},
    "chat:code-bool": {"error": {"code": True, "message": "x"}},
    "chat:code-long": {"error": {"code": "x" * 200}},
    "chat:temporary-text": {"error": {"code": 1, "temporary": "yes"}},
    "chat:close-code": {"disconnect": {"code": 1000, "reason": "x"}},
    "chat:status-500": Raw(500, b'{"result": {}}'),
    "chat:redirect": Raw(302, b"", (("location", "http://127.0.0.1:1/"),)),
    "chat:gzip": Raw(200, b'{"result": {}}', (("content-encoding", "gzip"),)),
    "chat:hang-up": HangUp(),
    "chat:huge": Flood(100 * 1024 * 1024),
}


async def test_a_backend_answering_nonsense_refuses_with_a_temporary_error() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_backend() as backend,
            node_with(
                backend,
                hooks=["subscribe", "publish"],
                proxy_max_response_size="64KiB",
                client_publish=True,
            ) as server,
        ):
            backend.on("/subscribe", lambda c: NONSENSE.get(c.body["channel"], {"result": {}}))
            backend.on("/publish", {"result": {"data": "x" * 100_000}})  # over the cap
            async with open_websocket_url(server.url) as ws:
                for channel in NONSENSE:
                    refused = await try_subscribe(ws, channel)
                    assert refused["type"] == "error", channel
                    assert refused["payload"]["code"] == "unavailable", channel
                refused = await publish(ws, "chat:ok", 1, "p")
                assert refused["payload"]["code"] == "unavailable"
                # The connection and the node are as they were.
                await subscribe(ws, "chat:ok")
                await server.publish("chat:ok", "fine")
                assert (await receive(ws))["payload"] == "fine"
            # The flood was not read: the connection was dropped after the cap.
            await backend.flood_done.wait()
            assert backend.flooded < 50 * 1024 * 1024
            assert server.proxy is not None
            assert server.proxy.calls[("subscribe", "unavailable")] == len(NONSENSE)
            status, _, metrics = await http_request(server.port, "GET", "/metrics")
            assert status == 200
            line = 'tidings_proxy_calls_total{hook="subscribe",outcome="unavailable"} 14.0'
            assert line.encode() in metrics
            assert b"tidings_proxy_in_flight 0.0" in metrics


async def test_a_backend_that_is_down_refuses_with_a_temporary_error() -> None:
    down = f"http://127.0.0.1:{refused_port()}"
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(
            proxy_connect=f"{down}/connect",
            proxy_subscribe=f"{down}/subscribe",
            proxy_rpc=f"{down}/rpc",
            namespaces=CHAT,
        ) as server:
            with pytest.raises(ConnectionRejected) as rejected:
                async with open_websocket_url(server.url):
                    pass
            assert rejected.value.status_code == 503
            assert orjson.loads(rejected.value.body)["error"]["code"] == "unavailable"
        async with (
            running_server(
                proxy_subscribe=f"{down}/subscribe", proxy_rpc=f"{down}/rpc", namespaces=CHAT
            ) as server,
            open_websocket_url(server.url) as ws,
        ):
            refused = await try_subscribe(ws, "chat:lobby")
            assert refused["payload"]["code"] == "unavailable"
            answer = await request(ws, "prices", {}, "r")
            assert answer["payload"]["code"] == "unavailable"


async def test_with_unavailable_allow_a_down_backend_is_as_if_there_were_no_hook() -> None:
    down = f"http://127.0.0.1:{refused_port()}"
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(
                proxy_connect=f"{down}/connect",
                proxy_subscribe=f"{down}/subscribe",
                proxy_publish=f"{down}/publish",
                proxy_unavailable="allow",
                namespaces=CHAT,
            ) as server,
            open_websocket_url(server.url) as ws,
        ):  # anonymous, as without a hook
            await subscribe(ws, "chat:lobby")
            assert (await publish(ws, "chat:lobby", "as sent", "p"))["type"] == "response"
            assert (await receive(ws))["payload"] == "as sent"
            assert [c.user for c in server.clients()] == [None]
        async with running_server(
            proxy_connect=f"{down}/connect", proxy_unavailable="allow", jwt_secret=SECRET
        ) as server:
            # ... which, on a node that takes tokens, is a 401 without one.
            with pytest.raises(ConnectionRejected) as rejected:
                async with open_websocket_url(server.url):
                    pass
            assert rejected.value.status_code == 401


# --- bounds: calls in flight, the cache -------------------------------------------------


async def test_calls_in_flight_are_bounded_per_node_and_the_rest_wait_their_turn() -> None:
    release = trio.Event()
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_backend() as backend,
            node_with(
                backend, hooks=["subscribe"], proxy_max_in_flight=2, proxy_timeout="15s"
            ) as server,
        ):
            backend.on("/subscribe", Hold(release))
            proxy = server.proxy
            assert proxy is not None
            async with trio.open_nursery() as nursery:
                answers: list[dict[str, Any]] = []

                async def client(n: int) -> None:
                    async with open_websocket_url(server.url) as ws:
                        answers.append(await try_subscribe(ws, f"chat:{n}"))

                for n in range(5):
                    nursery.start_soon(client, n)
                await backend.wait_for(lambda: backend.holding == 2)
                # The node's own counter: there is no event to await for it.
                while proxy.waiting < 3:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                assert (backend.holding, proxy.in_flight) == (2, 2)
                release.set()
            assert [answer["type"] for answer in answers] == ["response"] * 5
            assert backend.peak == 2
            assert (proxy.in_flight, proxy.waiting) == (0, 0)


async def test_subscribe_answers_are_kept_per_user_and_topic_for_the_cache_ttl() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_backend() as backend,
            node_with(
                backend, hooks=["connect", "subscribe"], proxy_cache_ttl="1h", proxy_cache_size=2
            ) as server,
        ):
            backend.on("/connect", lambda c: {"result": {"user": c.headers.get("cookie", "")}})
            backend.on("/subscribe", subscribe_answer)

            async def subscribe_as(user: str, *topics: str) -> list[str]:
                headers = [("Cookie", user)] if user else []
                async with open_websocket_url(server.url, extra_headers=headers) as ws:
                    return [(await try_subscribe(ws, topic))["type"] for topic in topics]

            assert await subscribe_as("ann", "chat:lobby", "chat:secret") == ["response", "error"]
            # A second connection of ann: both answers (the refusal too) from the cache.
            assert await subscribe_as("ann", "chat:lobby", "chat:secret") == ["response", "error"]
            assert len(backend.calls_to("/subscribe")) == 2
            await subscribe_as("ben", "chat:lobby")  # another user: asked
            assert len(backend.calls_to("/subscribe")) == 3
            await subscribe_as("", "chat:lobby")  # anonymous: asked every time
            await subscribe_as("", "chat:lobby")
            assert len(backend.calls_to("/subscribe")) == 5
            # Two answers kept at most: ann's first went first.
            await subscribe_as("ann", "chat:lobby")
            assert len(backend.calls_to("/subscribe")) == 6
            assert server.proxy is not None
            assert server.proxy.calls[("subscribe", "cached")] == 2


async def test_the_cache_forgets_an_answer_after_its_ttl(autojump_clock: trio.abc.Clock) -> None:
    cache = AnswerCache(size=10, ttl=5.0)
    cache.put(("t", "ann", "a"), None)
    cache.put(("t", "ann", "b"), ProxyError("403", "no"))
    assert cache.get(("t", "ann", "a")) == (True, None)
    found, refusal = cache.get(("t", "ann", "b"))
    assert found and refusal is not None and refusal.code == "403"
    await trio.sleep(5.0)
    assert cache.get(("t", "ann", "a")) == (False, None)
    assert len(cache) == 1  # b is dropped when next asked for


# --- what the backend is told ----------------------------------------------------------------


async def test_only_the_allow_listed_headers_of_the_upgrade_are_forwarded() -> None:
    headers = [
        ("Cookie", "a=1"),
        ("Cookie", "b=2"),
        ("Authorization", "Basic eA=="),
        ("Origin", "http://localhost:3000"),
        ("User-Agent", "agent/1"),
        ("X-Forwarded-For", "10.0.0.1"),
        ("X-Secret", "not for the backend"),
    ]
    with trio.fail_after(TEST_TIMEOUT):
        async with running_backend() as backend:
            backend.on("/subscribe", {"result": {}})
            async with (
                node_with(backend, hooks=["subscribe"]) as server,
                open_websocket_url(server.url, extra_headers=headers) as ws,
            ):
                await subscribe(ws, "chat:lobby")
            async with (
                node_with(
                    backend, hooks=["subscribe"], proxy_forward_headers=("x-secret",)
                ) as server,
                open_websocket_url(server.url, extra_headers=headers) as ws,
            ):
                await subscribe(ws, "chat:lobby")
        default, custom = backend.calls_to("/subscribe")
        expected = {
            "Cookie": "a=1; b=2",
            "Authorization": "Basic eA==",
            "Origin": "http://localhost:3000",
            "User-Agent": "agent/1",
            "X-Forwarded-For": "10.0.0.1",
        }
        assert default.body["headers"] == expected
        for name, value in expected.items():
            assert default.headers[name.lower()] == value  # also as the call's own headers
        assert "x-secret" not in default.headers
        assert default.headers["content-type"] == "application/json"
        assert custom.body["headers"] == {"x-secret": "not for the backend"}
        assert "cookie" not in custom.headers


# --- refresh ------------------------------------------------------------------------------


async def test_the_refresh_hook_extends_a_session_ends_it_or_lets_it_expire() -> None:
    async def connect(call: Call) -> Any:
        # Sessions that expire in 2 s: the node asks the refresh hook ahead of that.
        return {"result": {"user": call.headers["cookie"], "expire_at": time.time() + 2}}

    async def refresh(call: Call) -> Any:
        user = call.body["user"]
        if user == "extend":
            return {"result": {"expire_at": time.time() + 3600}}
        if user == "end":
            return {"result": {"expired": True}}
        return Raw(500, b"")  # "broken": asked again until the session expires

    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_backend() as backend,
            node_with(backend, hooks=["connect", "refresh"], proxy_timeout="500ms") as server,
        ):
            backend.on("/connect", connect)
            backend.on("/refresh", refresh)
            disconnects = Disconnects(server)

            async def session(user: str) -> Any:
                return open_websocket_url(server.url, extra_headers=[("Cookie", user)])

            async with (
                await session("extend") as extended,
                await session("end") as ended,
                await session("broken") as broken,
            ):
                for ws in (extended, ended, broken):
                    await subscribe(ws, "chat:lobby")
                with pytest.raises(ConnectionClosed) as closed:
                    await receive(ended)
                assert (closed.value.reason.code, closed.value.reason.reason) == (
                    4002,
                    "session expired",
                )
                with pytest.raises(ConnectionClosed) as closed:
                    await receive(broken)
                assert (closed.value.reason.code, closed.value.reason.reason) == (
                    4002,
                    "token expired",
                )
                # The extended one outlived its first expiry, and is still served.
                await disconnects.wait(2)
                [client] = server.clients()
                assert client.user == "extend"
                assert (await call(extended, {"type": "ping", "requestId": 1}))["type"] == "pong"
            asked = [c.body["user"] for c in backend.calls_to("/refresh")]
            assert asked.count("extend") == 1
            assert asked.count("end") == 1
            assert asked.count("broken") >= 2  # asked again while it could not say
            body = backend.calls_to("/refresh")[0].body
            assert {"client", "user", "tenant", "transport", "headers"} <= set(body)


# --- the Centrifugo SDK ------------------------------------------------------------------------


async def test_centrifugo_sdk_clients_are_decided_by_the_same_hooks() -> None:
    answers = {"later": {"error": {"code": 1001, "message": "try later", "temporary": True}}}

    async def connect(call: Call) -> Any:
        cookie = call.headers.get("cookie", "")
        if cookie in answers:
            return answers[cookie]
        return await connect_answer(call)

    with trio.fail_after(60):
        async with (
            running_backend() as backend,
            node_with(
                backend,
                hooks=["connect", "subscribe", "publish", "rpc"],
                ping_interval=1,
                read_timeout=3,
            ) as server,
        ):
            backend.on("/connect", connect)
            backend.on("/subscribe", subscribe_answer)
            backend.on("/publish", publish_answer)
            backend.on("/rpc", rpc_answer)
            url = f"ws://127.0.0.1:{server.port}/connection/websocket"

            async def scenario() -> None:
                events = Recorder()
                client = sdk_client(
                    url, events, headers={"Cookie": "session=alice"}, data={"room": 7}
                )
                lobby = client.new_subscription("chat:lobby", events=SubEvents(events))
                await client.connect()
                await lobby.subscribe()
                await events.wait("connected")
                await events.wait("subscribed")
                await lobby.publish("swear")
                (pub,) = await events.wait("publication")
                assert pub.data == {"text": "[removed]", "by": "alice"}
                result = await client.rpc("prices", {"item": 21})
                assert result.data == {"price": 42}
                with pytest.raises(ReplyError) as missing:
                    await client.rpc("nothing", {})
                assert (missing.value.code, missing.value.message) == (404, "no such method")

                secret_events = Recorder()
                secret = client.new_subscription("chat:secret", events=SubEvents(secret_events))
                await secret.subscribe()
                (refused,) = await secret_events.wait("unsubscribed")
                assert (refused.code, refused.reason) == (4403, "members only")

                door = client.new_subscription("chat:door", events=SubEvents(Recorder()))
                await door.subscribe()
                (closed,) = await events.wait("disconnected")
                assert (closed.code, closed.reason) == (4501, "not here")

                # Refused at connect: the SDK stops, with the backend's code.
                banned_events = Recorder()
                banned = sdk_client(url, banned_events, headers={"Cookie": "session=banned"})
                await banned.connect()
                (closed,) = await banned_events.wait("disconnected")
                assert (closed.code, closed.reason) == (403, "banned")

                # A temporary refusal: the SDK tries again until the backend lets it in.
                later_events = Recorder()
                later = sdk_client(url, later_events, headers={"Cookie": "later"})
                await later.connect()
                (error,) = await later_events.wait("error")
                assert (error.error.code, error.error.temporary) == (1001, True)
                answers["later"] = {"result": {"user": "late"}}
                await later_events.wait("connected")
                await later.disconnect()

            await in_asyncio(scenario)
            connects = backend.calls_to("/connect")
            body = connects[0].body
            assert body["data"] == {"room": 7}
            assert body["name"] == "python"
            assert (body["transport"], body["dialect"], body["path"]) == (
                "websocket",
                "centrifugo",
                "/connection/websocket",
            )
            assert body["headers"]["Cookie"] == "session=alice"
            published = backend.calls_to("/publish")[0].body
            assert (published["channel"], published["data"], published["user"]) == (
                "chat:lobby",
                "swear",
                "alice",
            )


# --- a real `tidings serve`, configured by a [proxy] table and a flag --------------------------


@pytest.mark.slow
async def test_tidings_serve_calls_the_hooks_of_its_proxy_table(
    tmp_path: Any, tidings_serve: Any
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_backend() as backend:
            backend.on("/connect", connect_answer)
            backend.on("/subscribe", subscribe_answer)
            backend.on("/rpc", rpc_answer)
            config = tmp_path / "proxy.toml"
            config.write_text(
                "[namespaces.chat]\nclient_publish = true\n\n"
                f'[proxy]\nconnect = "{backend.url("/connect")}"\n'
                f'subscribe = "{backend.url("/subscribe")}"\ntimeout = "2s"\n'
            )
            # Started from a thread: the backend answers in this Trio run meanwhile.
            node = await trio.to_thread.run_sync(
                tidings_serve, "--config", str(config), "--proxy-rpc", backend.url("/rpc")
            )
            headers = [("Cookie", "session=alice")]
            async with open_websocket_url(node.ws_url, extra_headers=headers) as ws:
                await subscribe(ws, "chat:lobby")
                refused = await try_subscribe(ws, "chat:secret")
                assert refused["payload"] == {"code": "4403", "message": "members only"}
                answer = await request(ws, "prices", {"item": 2}, "r")
                assert answer["payload"] == {"price": 4}
            with pytest.raises(ConnectionRejected) as rejected:
                async with open_websocket_url(node.ws_url):
                    pass
            assert rejected.value.status_code == 401
            assert [c.path for c in backend.calls] == [
                "/connect",
                "/subscribe",
                "/subscribe",
                "/rpc",
                "/connect",
            ]


async def test_under_hypercorn_a_refused_upgrade_is_an_http_status_too() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_backend() as backend,
            node_with(backend, hooks=["connect"], transport="hypercorn") as server,
        ):
            backend.on("/connect", connect_answer)
            with pytest.raises(ConnectionRejected) as rejected:
                async with open_websocket_url(server.url, extra_headers=[("Cookie", "x")]):
                    pass
            assert rejected.value.status_code == 401
            headers = [("Cookie", "session=alice")]
            async with open_websocket_url(server.url, extra_headers=headers) as ws:
                await subscribe(ws, "chat:lobby")
                assert [c.user for c in server.clients()] == ["alice"]


async def test_a_centrifugo_client_with_a_token_is_not_asked_about() -> None:
    token = jwt.encode({"sub": "bob", "exp": int(time.time()) + 60}, SECRET)
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_backend() as backend,
            node_with(backend, hooks=["connect"], jwt_secret=SECRET) as server,
        ):
            backend.on("/connect", {"result": {"user": "from-the-hook"}})
            url = f"ws://127.0.0.1:{server.port}/connection/websocket"
            for connect, user in [({"token": token}, "bob"), ({}, "from-the-hook")]:
                async with open_websocket_url(url) as ws:
                    await ws.send_message(orjson.dumps({"id": 1, "connect": connect}).decode())
                    reply = orjson.loads(await ws.get_message())
                    assert "client" in reply["connect"], reply
                    [client] = [c for c in server.clients() if c.id == reply["connect"]["client"]]
                    assert client.user == user
            assert len(backend.calls_to("/connect")) == 1


# --- the example backend of docs/proxy.md, as its own process ---------------------------------


@pytest.fixture
def example_backend() -> Iterator[str]:
    """examples/proxy_backend.py under hypercorn (a real process); yields its base URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "hypercorn", "examples.proxy_backend:app",
         "--bind", f"127.0.0.1:{port}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        # A child process: nothing to await but its answer. Not its port: hypercorn
        # listens before the app has started, and drops what came meanwhile.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + TEST_TIMEOUT
        while True:
            if process.poll() is not None:
                raise RuntimeError(process.stderr.read().decode() if process.stderr else "")
            try:
                with opener.open(f"http://127.0.0.1:{port}/docs", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/tidings"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.slow
async def test_the_example_backend_runs_a_chat(example_backend: str) -> None:
    hooks = {f"proxy_{hook}": f"{example_backend}/{hook}" for hook in HOOKS}
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(
            namespaces={"room": {"client_publish": True}}, proxy_timeout="5s", **hooks
        ) as server:

            def as_user(session: str) -> Any:
                return open_websocket_url(server.url, extra_headers=[("Cookie", session)])

            async with as_user("session=s-ann") as ann, as_user("session=s-bob") as bob:
                await subscribe(ann, "room:kitchen")
                await subscribe(ann, "room:office")
                await subscribe(bob, "room:kitchen")
                refused = await try_subscribe(bob, "room:office")
                assert refused["payload"] == {
                    "code": "403",
                    "message": "not a member of this room",
                }
                sent = await publish(ann, "room:kitchen", {"text": "oh darn"}, "p")
                assert sent["type"] == "response"
                said = {"text": "oh ***", "from": "ann"}
                assert (await receive(bob))["payload"] == said
                members = await request(ann, "room:members", {"room": "room:kitchen"}, "r")
                assert members["payload"] == ["ann", "bob"]
            with pytest.raises(ConnectionRejected) as rejected:
                async with as_user("session=stolen"):
                    pass
            assert rejected.value.status_code == 401


async def test_a_kept_alive_connection_the_backend_closed_is_replaced_once() -> None:
    # The backend drops every connection it is asked on a second time, as a server
    # whose idle timeout fires as the call arrives does: the node asks again on a
    # new connection (except for an rpc, which may do something).
    def hang_up_when_reused(call: Call) -> Any:
        return HangUp() if call.nth > 1 else {"result": {"data": call.body["method"]}}

    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_backend() as backend,
            node_with(backend, hooks=["subscribe", "rpc"]) as server,
            open_websocket_url(server.url) as ws,
        ):
            backend.on("/subscribe", lambda c: HangUp() if c.nth > 1 else {"result": {}})
            backend.on("/rpc", hang_up_when_reused)
            for topic in ("chat:a", "chat:b", "chat:c"):
                await subscribe(ws, topic)
            assert [c.nth for c in backend.calls_to("/subscribe")] == [1, 2, 1, 2, 1]
            # The last subscribe's connection is kept: the rpc meets it dropped, and
            # is not asked again; the next rpc goes on a new connection.
            refused = await request(ws, "m", {}, "r1")
            assert refused["payload"]["code"] == "unavailable"
            assert (await request(ws, "m", {}, "r2"))["payload"] == "m"
            assert [c.nth for c in backend.calls_to("/rpc")] == [2, 1]


async def raw_upgrade(server: Server, header_lines: bytes) -> RawWebSocket:
    """A WebSocket upgraded with header lines as given (bytes a polite client never sends)."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    await stream.send_all(
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        + header_lines
        + b"\r\n"
    )
    ws = RawWebSocket(stream)
    head = await ws._read_until(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return ws


async def test_headers_of_any_bytes_are_forwarded_as_sent() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_backend() as backend,
            node_with(backend, hooks=["connect", "subscribe"]) as server,
        ):
            backend.on("/connect", {"result": {"user": "ann"}})
            backend.on("/subscribe", {"result": {}})
            # Latin-1 bytes in a cookie and a user agent: HTTP allows them (obs-text).
            ws = await raw_upgrade(server, b"Cookie: name=\xe9t\xe9\r\nUser-Agent: caf\xe9\r\n")
            await ws.send_json({"type": "subscribe", "topic": "chat:x", "requestId": 1})
            assert (await ws.receive_json())["type"] == "response"
            await ws.aclose()
        for call in backend.calls:
            assert call.body["headers"] == {"Cookie": "name=\xe9t\xe9", "User-Agent": "caf\xe9"}
            assert call.headers["cookie"].encode("latin-1") == b"name=\xe9t\xe9"
