"""Namespaces (``ns:topic``): their settings, as clients over real sockets meet them."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from tidings import BrokerError, ClientInfo, Config, ConfigError, ErrorCode, OverflowPolicy, Server
from tidings.config import NamespaceConfig

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

SECRET = "a-test-secret-that-is-long-enough-for-hs256"


def token(**claims: Any) -> str:
    body = {"sub": "alice", "exp": time.time() + 300, **claims}
    return jwt.encode(body, SECRET, algorithm="HS256")


def bearer(server: Server, value: str) -> Any:
    return open_websocket_url(
        server.url, extra_headers=[(b"Authorization", f"Bearer {value}".encode())]
    )


async def publish(ws: WebSocketConnection, topic: str, payload: Any = "x") -> dict[str, Any]:
    return await call(
        ws, {"type": "publish", "topic": topic, "payload": payload, "requestId": f"pub-{topic}"}
    )


async def error_code(ws: WebSocketConnection, kind: str, topic: str) -> str | None:
    """The error code a command on ``topic`` is answered with; None when it succeeds."""
    message: dict[str, Any] = {"type": kind, "topic": topic, "requestId": f"{kind}-{topic}"}
    if kind == "publish":
        message["payload"] = "x"
    reply = await call(ws, message)
    if reply["type"] == "error":
        return str(reply["payload"]["code"])
    return None


def other_client(server: Server, known: ClientInfo) -> ClientInfo:
    [other] = [client for client in server.clients() if client.id != known.id]
    return other


# --- history ---------------------------------------------------------------------------


async def test_history_size_is_per_namespace() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(
            history_size=10, namespaces={"brief": NamespaceConfig(history_size=2)}
        ) as server:
            for i in range(5):
                await server.publish("brief:t", i)
                await server.publish("full", i)
            async with ws_client(server) as ws:
                brief = await subscribe(ws, "brief:t", since=0)
                assert (brief["payload"]["replayed"], brief["payload"]["recovered"]) == (2, False)
                assert [(await receive(ws))["payload"] for _ in range(2)] == [3, 4]
                full = await subscribe(ws, "full", since=0)
                assert (full["payload"]["replayed"], full["payload"]["recovered"]) == (5, True)
                assert [(await receive(ws))["payload"] for _ in range(5)] == [0, 1, 2, 3, 4]


async def test_history_ttl_is_per_namespace() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(
            namespaces={"fleeting": NamespaceConfig(history_ttl="200ms")}
        ) as server:
            await server.publish("fleeting:t", "gone soon")
            await server.publish("kept", "kept")
            async with ws_client(server) as ws:
                # Bounded by fail_after: the fleeting event leaves history at some point.
                while True:
                    reply = await subscribe(ws, "fleeting:t", since=0)
                    if reply["payload"]["replayed"] == 0:
                        break
                    assert (await receive(ws))["payload"] == "gone soon"
                    await call(ws, {"type": "unsubscribe", "topic": "fleeting:t", "requestId": 1})
                    await trio.sleep(0.05)
                kept = await subscribe(ws, "kept", since=0)
                assert kept["payload"]["replayed"] == 1
                assert (await receive(ws))["payload"] == "kept"


# --- who may publish ---------------------------------------------------------------------


async def test_client_publish_false_forbids_clients_but_not_the_backend() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(namespaces={"feed": NamespaceConfig(client_publish=False)}) as server,
            ws_client(server) as ws,
        ):
            await subscribe(ws, "feed:news")
            refused = await publish(ws, "feed:news", "spoofed")
            assert refused["type"] == "error"
            assert refused["payload"]["code"] == ErrorCode.FORBIDDEN
            assert refused["topic"] == "feed:news"
            # Other namespaces are untouched, and the backend still publishes here.
            assert (await publish(ws, "chatter"))["payload"]["status"] == "published"
            await server.publish("feed:news", "official")
            event = await receive(ws)
            assert (event["seq"], event["payload"]) == (1, "official")


async def test_without_authentication_clients_publish_to_the_default_namespace(
    server: Server,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with ws_client(server) as ws:
            assert (await publish(ws, "anything"))["payload"]["status"] == "published"


async def test_top_level_client_publish_false_applies_to_the_default_namespace() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(
                client_publish=False, namespaces={"open": NamespaceConfig(client_publish=True)}
            ) as server,
            ws_client(server) as ws,
        ):
            assert await error_code(ws, "publish", "plain") == ErrorCode.FORBIDDEN
            assert await error_code(ws, "publish", "open:x") is None


async def test_with_jwt_the_publish_claim_decides_in_the_default_namespace() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(
                jwt_secret=SECRET,
                namespaces={
                    "ops": NamespaceConfig(client_publish=True),
                    "feed": NamespaceConfig(client_publish=False),
                },
            ) as server,
            bearer(server, token()) as plain,
            bearer(server, token(publish=["*"])) as writer,
        ):
            # No claim: no publishing where the namespace leaves it to tokens...
            assert await error_code(plain, "publish", "news") == ErrorCode.FORBIDDEN
            # ... but a namespace open to every client lets it.
            assert await error_code(plain, "publish", "ops:deploy") is None
            # A claim allowing everything: everywhere but where the namespace forbids it.
            assert await error_code(writer, "publish", "news") is None
            assert await error_code(writer, "publish", "ops:deploy") is None
            assert await error_code(writer, "publish", "feed:x") == ErrorCode.FORBIDDEN


async def test_with_the_static_token_clients_publish_unless_the_namespace_forbids() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(
                token="s3cret", namespaces={"feed": NamespaceConfig(client_publish=False)}
            ) as server,
            bearer(server, "s3cret") as ws,
        ):
            assert await error_code(ws, "publish", "news") is None
            assert await error_code(ws, "publish", "feed:x") == ErrorCode.FORBIDDEN


# --- which namespaces and topics exist ------------------------------------------------------


async def test_an_unknown_namespace_is_refused() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(namespaces={"chat": NamespaceConfig()}, presence=True) as server,
            ws_client(server) as ws,
        ):
            for kind in ("subscribe", "publish", "presence", "request"):
                assert await error_code(ws, kind, "nope:x") == ErrorCode.UNKNOWN_NAMESPACE, kind
                assert await error_code(ws, kind, ":x") == ErrorCode.UNKNOWN_NAMESPACE, kind
            assert await error_code(ws, "subscribe", "chat:x") is None
            assert await error_code(ws, "subscribe", "plain") is None
            with pytest.raises(BrokerError) as refused:
                await server.publish("nope:x", 1)
            assert refused.value.code == ErrorCode.UNKNOWN_NAMESPACE
            assert server.broker.topic_stats("nope:x") is None


async def test_unknown_namespaces_are_served_as_the_default_one_when_allowed() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(allow_unknown_namespaces=True, history_size=2) as server,
            ws_client(server) as reader,
            ws_client(server) as writer,
        ):
            await subscribe(reader, "nope:x")
            for i in range(3):
                assert (await publish(writer, "nope:x", i))["payload"]["seq"] == i + 1
            assert [(await receive(reader))["payload"] for _ in range(3)] == [0, 1, 2]
            # With the default namespace's settings (history_size=2).
            resumed = await subscribe(writer, "nope:x", since=0)
            assert resumed["payload"]["replayed"] == 2


async def test_a_namespace_allow_list_refuses_other_topics_of_it() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(
                presence=True,
                topics=("deploys",),
                namespaces={"chat": NamespaceConfig(topics=("chat:room-*", "chat:lobby"))},
            ) as server,
            ws_client(server) as ws,
        ):
            for topic in ("chat:room-1", "chat:lobby", "deploys"):
                assert await error_code(ws, "subscribe", topic) is None, topic
            for kind in ("subscribe", "publish", "presence", "request"):
                for topic in ("chat:admin", "chat:lobby2", "other"):
                    assert await error_code(ws, kind, topic) == ErrorCode.UNKNOWN_TOPIC, topic


# --- presence and join/leave -------------------------------------------------------------


async def test_presence_and_join_leave_where_a_namespace_turns_them_on() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(
            namespaces={"room": NamespaceConfig(presence=True, join_leave=True)}
        ) as server:
            disconnects = Disconnects(server)
            async with ws_client(server) as a:
                await subscribe(a, "room:1")
                [a_info] = server.clients()
                async with ws_client(server) as b:
                    await subscribe(b, "room:1")
                    b_info = other_client(server, a_info)
                    join = await receive(a)
                    assert (join["type"], join["topic"]) == ("join", "room:1")
                    assert join["payload"]["client"] == b_info.id
                    assert join["payload"]["tenant"] == "default"
                    assert join["payload"]["connectedAt"].endswith("Z")
                    # Both see the same presence list; a joiner hears no join of its own.
                    for ws in (a, b):
                        reply = await call(
                            ws, {"type": "presence", "topic": "room:1", "requestId": 1}
                        )
                        ids = {entry["client"] for entry in reply["payload"]["clients"]}
                        assert ids == {a_info.id, b_info.id}
                    await server.publish("room:1", "hello")
                    assert (await receive(b))["type"] == "event"
                    assert (await receive(a))["type"] == "event"
                    # Unsubscribing is a leave.
                    await call(b, {"type": "unsubscribe", "topic": "room:1", "requestId": "u"})
                    leave = await receive(a)
                    assert (leave["type"], leave["payload"]["client"]) == ("leave", b_info.id)
                    await subscribe(b, "room:1")
                    assert (await receive(a))["type"] == "join"
                # So is disconnecting.
                await disconnects.wait()
                leave = await receive(a)
                assert (leave["type"], leave["payload"]["client"]) == ("leave", b_info.id)
                reply = await call(a, {"type": "presence", "topic": "room:1", "requestId": 2})
                assert [entry["client"] for entry in reply["payload"]["clients"]] == [a_info.id]


async def test_no_presence_and_no_join_leave_where_a_namespace_leaves_them_off() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(
                namespaces={
                    "quiet": NamespaceConfig(),
                    "listed": NamespaceConfig(presence=True),  # presence without join/leave
                }
            ) as server,
            ws_client(server) as a,
            ws_client(server) as b,
        ):
            for topic in ("quiet:1", "listed:1", "plain"):
                await subscribe(a, topic)
                await subscribe(b, topic)
                await call(b, {"type": "unsubscribe", "topic": topic, "requestId": "u"})
                # Had a join or leave been sent, it would come before this event.
                await server.publish(topic, "only this")
                event = await receive(a)
                assert (event["type"], event["topic"]) == ("event", topic)
            assert await error_code(a, "presence", "quiet:1") == ErrorCode.FORBIDDEN
            assert await error_code(a, "presence", "plain") == ErrorCode.FORBIDDEN
            assert await error_code(a, "presence", "listed:1") is None


async def test_top_level_presence_settings_are_inherited_by_named_namespaces() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(
                presence=True,
                join_leave=True,
                namespaces={"inherit": NamespaceConfig(), "off": NamespaceConfig(join_leave=False)},
            ) as server,
            ws_client(server) as a,
            ws_client(server) as b,
        ):
            for topic in ("plain", "inherit:1"):
                await subscribe(a, topic)
                await subscribe(b, topic)
                assert (await receive(a))["type"] == "join"
            await subscribe(a, "off:1")
            await subscribe(b, "off:1")
            await server.publish("off:1", "no join before me")
            assert (await receive(a))["type"] == "event"
            assert await error_code(a, "presence", "off:1") is None  # presence still inherited


# --- overflow ---------------------------------------------------------------------------


async def test_a_namespace_overflow_policy_disconnect_closes_its_stalled_subscriber() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(
            overflow_policy=OverflowPolicy.DROP,
            write_timeout=30,
            close_timeout=0.2,
            namespaces={
                "strict": NamespaceConfig(overflow_policy=OverflowPolicy.DISCONNECT, outbox_size=8)
            },
        ) as server:
            disconnects = Disconnects(server)
            stalled = await raw_client(server, receive_buffer=4096)
            await stalled.send_json({"type": "subscribe", "topic": "strict:x", "requestId": "s"})
            assert (await stalled.receive_json())["type"] == "response"
            while server.statistics().dropped == 0:
                await server.publish("strict:x", {"blob": "x" * 32_000})
            assert await stalled.receive_close() == 1008
            [closed] = await disconnects.wait()
            assert (closed.code, closed.reason) == (1008, "outbox overflow")
            await stalled.aclose()


async def test_a_namespace_outbox_size_bounds_what_its_stalled_subscriber_queues() -> None:
    blob = {"blob": "x" * 32_000}
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(
            outbox_size=1000, write_timeout=30, namespaces={"tiny": NamespaceConfig(outbox_size=4)}
        ) as server:
            tiny = await raw_client(server, receive_buffer=4096)
            await tiny.send_json({"type": "subscribe", "topic": "tiny:x", "requestId": "s"})
            assert (await tiny.receive_json())["type"] == "response"
            published = 0
            while server.statistics().dropped == 0:
                await server.publish("tiny:x", blob)
                published += 1
            [tiny_client] = server.clients()
            stats = server.client_statistics(tiny_client.id)
            assert stats is not None
            assert stats.peak_queued <= 4
            # The same traffic in the default namespace (outbox 1000) loses nothing.
            roomy = await raw_client(server, receive_buffer=4096)
            await roomy.send_json({"type": "subscribe", "topic": "roomy", "requestId": "s"})
            assert (await roomy.receive_json())["type"] == "response"
            for i in range(published):
                await server.publish("roomy", {"i": i, **blob})
            received = [(await roomy.receive_json())["payload"]["i"] for _ in range(published)]
            assert received == list(range(published))
            topic = server.broker.topic_stats("roomy")
            assert topic is not None
            assert topic.dropped == 0
            await tiny.aclose()
            await roomy.aclose()


# --- configuration ----------------------------------------------------------------------


def test_namespaces_from_the_environment_as_json() -> None:
    env = {
        "TIDINGS_PRESENCE": "true",
        "TIDINGS_NAMESPACES": (
            '{"chat": {"history_size": 2, "history_ttl": "1m", "client_publish": false,'
            ' "overflow_policy": "disconnect", "outbox_size": 16, "topics": ["chat:room-*"]}}'
        ),
    }
    namespaces = Config.load(env=env).build_namespaces()
    chat = namespaces.resolve("chat:room-1")
    assert chat is not None
    assert chat.name == "chat"
    assert (chat.history_size, chat.history_ttl, chat.publish) == (2, 60.0, False)
    assert (chat.overflow_policy, chat.outbox_size) == (OverflowPolicy.DISCONNECT, 16)
    assert chat.topics.allows("chat:room-1")
    assert not chat.topics.allows("chat:admin")
    assert chat.presence  # inherited from the top level
    assert namespaces.resolve("plain") is namespaces.default
    assert namespaces.resolve("nope:x") is None


@pytest.mark.parametrize(
    "tables",
    [
        '{"": {}}',
        '{"a:b": {}}',
        '{"chat": {"outbox_size": 0}}',
        '{"chat": {"overflow_policy": "explode"}}',
        '{"chat": {"histroy_size": 2}}',
        '{"chat": {"history_ttl": "soon"}}',
        "not json",
    ],
)
def test_bad_namespace_tables_are_config_errors(tables: str) -> None:
    with pytest.raises(ConfigError):
        Config.load(env={"TIDINGS_NAMESPACES": tables})
