"""Idempotent publishing (issue 16): a key sent again within the window publishes once.

The window alone (time passed in by the test, no clock), then real
``tidings serve`` processes driven over the HTTP API and the native
WebSocket, then two nodes on one real Redis receiving the same key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import open_websocket_url

from tidings import BrokerError, ErrorCode
from tidings.backplane.redis import topic_id
from tidings.broker.idempotency import ENTRY_OVERHEAD, IdempotencyWindow
from tidings.protocol.messages import Position

from .conftest import TEST_TIMEOUT, call, http_request, running_server, send, subscribe
from .redis_fixture import Node, Nodes
from .serve_fixture import API_KEY, ServeProcess

Serve = Callable[..., ServeProcess]

# --- the window alone ---------------------------------------------------------------------


def test_a_key_seen_answers_with_the_first_position_and_another_payload_conflicts() -> None:
    window = IdempotencyWindow(window=60, max_keys=10)
    assert window.check("t", "orders", "k1", "print-a", now=0) is None
    window.remember("t", "orders", "k1", "print-a", position=Position(7, "e1"), now=0)
    assert window.check("t", "orders", "k1", "print-a", now=59) == Position(7, "e1")
    conflict = window.check("t", "orders", "k1", "print-b", now=59)
    assert isinstance(conflict, BrokerError)
    assert conflict.code == ErrorCode.IDEMPOTENCY_CONFLICT
    # The key names one publication per topic and tenant.
    assert window.check("t", "invoices", "k1", "print-a", now=1) is None
    assert window.check("other", "orders", "k1", "print-a", now=1) is None
    assert (window.replayed, window.conflicts) == (1, 1)


def test_a_key_is_forgotten_when_its_window_ends() -> None:
    window = IdempotencyWindow(window=60, max_keys=10)
    window.remember("t", "orders", "k1", "p", position=Position(1, "e"), now=100)
    window.remember("t", "orders", "k2", "p", position=Position(2, "e"), now=130)
    assert window.check("t", "orders", "k1", "p", now=159.9) == Position(1, "e")
    assert window.check("t", "orders", "k1", "p", now=160) is None  # 60 s after it was first seen
    assert window.check("t", "orders", "k2", "p", now=160) == Position(2, "e")
    assert window.keys("t") == 1
    window.sweep(now=190)
    assert window.keys("t") == 0
    assert window.bytes("t") == 0


def test_the_oldest_keys_go_first_beyond_the_count_of_a_tenant() -> None:
    window = IdempotencyWindow(window=60, max_keys=3)
    for n in range(1, 5):
        window.remember("t", "orders", f"k{n}", "p", position=Position(n, "e"), now=n)
    assert window.check("t", "orders", "k1", "p", now=5) is None
    assert [window.check("t", "orders", f"k{n}", "p", now=5) for n in (2, 3, 4)] == [
        Position(2, "e"),
        Position(3, "e"),
        Position(4, "e"),
    ]
    assert window.evicted == 1


def test_the_oldest_keys_go_first_beyond_the_bytes_of_a_tenant() -> None:
    one = ENTRY_OVERHEAD + len("orders") + len("k1") + len("e")
    window = IdempotencyWindow(window=60, max_keys=1000, max_bytes=2 * one)
    for n in range(1, 4):
        window.remember("t", "orders", f"k{n}", "p", position=Position(n, "e"), now=n)
    assert window.bytes("t") <= 2 * one
    assert window.keys("t") == 2
    assert window.check("t", "orders", "k1", "p", now=5) is None
    assert window.check("t", "orders", "k3", "p", now=5) == Position(3, "e")


def test_one_tenant_filling_its_window_does_not_evict_another_tenants_keys() -> None:
    window = IdempotencyWindow(window=60, max_keys=2)
    window.remember("quiet", "orders", "mine", "p", position=Position(1, "e"), now=0)
    for n in range(100):
        window.remember("noisy", "orders", f"k{n}", "p", position=Position(n, "e"), now=1)
    assert window.check("quiet", "orders", "mine", "p", now=2) == Position(1, "e")
    assert window.keys("noisy") == 2


# --- in process ------------------------------------------------------------------------------


async def test_the_broker_publishes_a_key_once_and_refuses_it_with_another_payload() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server:
            first = await server.publish("orders", {"id": 1}, idempotency_key="order-1")
            again = await server.publish("orders", {"id": 1}, idempotency_key="order-1")
            other = await server.publish("orders", {"id": 1}, idempotency_key="order-2")
            assert again == first
            assert other.seq == first.seq + 1
            with pytest.raises(BrokerError) as refused:
                await server.publish("orders", {"id": 2}, idempotency_key="order-1")
            assert refused.value.code == ErrorCode.IDEMPOTENCY_CONFLICT
            events, position = await server.history("orders")
            assert [event.payload for event in events] == [{"id": 1}, {"id": 1}]
            assert position == other
            with pytest.raises(ValueError, match="idempotency_key"):
                await server.publish("orders", 1, idempotency_key="")


# --- a real node ------------------------------------------------------------------------------


async def api(node: ServeProcess, method: str, **body: Any) -> tuple[int, dict[str, Any]]:
    status, _, answer = await http_request(
        node.port,
        "POST",
        f"/api/{method}",
        orjson.dumps(body),
        f"Authorization: apikey {API_KEY}\r\nContent-Type: application/json\r\n",
    )
    return status, orjson.loads(answer)


async def metrics(node: ServeProcess | Node) -> Any:
    """The samples of ``/metrics``, as a set of (name with labels, value)."""
    _, _, body = await http_request(node.port, "GET", "/metrics")
    lines = [line.rpartition(" ") for line in body.decode().splitlines() if line[:1] != "#"]
    return {(name, float(value)) for name, _, value in lines if name}


async def history(node: ServeProcess, topic: str) -> list[dict[str, Any]]:
    status, answer = await api(node, "history", topic=topic, limit=1000)
    assert status == 200, answer
    events: list[dict[str, Any]] = answer["events"]
    return events


async def test_api_publish_retried_with_one_key_is_one_event_with_one_seq(
    tidings_serve: Serve,
) -> None:
    node = tidings_serve()
    with trio.fail_after(TEST_TIMEOUT):
        body = {"topic": "orders", "payload": {"id": 1}, "idempotency_key": "pay-1"}
        answers = [await api(node, "publish", **body) for _ in range(3)]
        assert (
            answers == [(200, {"topic": "orders", "seq": 1, "epoch": answers[0][1]["epoch"]})] * 3
        )
        assert [event["payload"] for event in await history(node, "orders")] == [{"id": 1}]

        status, conflict = await api(node, "publish", **{**body, "payload": {"id": 2}})
        assert status == 409
        assert conflict["error"]["code"] == "idempotency_conflict"
        status, bad = await api(node, "publish", **{**body, "idempotency_key": 5})
        assert (status, bad["error"]["code"]) == (400, "invalid_field")
        assert len(await history(node, "orders")) == 1

        # Another tenant has keys of its own.
        status, elsewhere = await api(node, "publish", **body, tenant="acme")
        assert (status, elsewhere["seq"]) == (200, 1)
        assert (
            await metrics(node)
            >= {
                'tidings_idempotent_publications_total{outcome="replayed"}': 2.0,
                'tidings_idempotent_publications_total{outcome="conflict"}': 1.0,
            }.items()
        )


async def test_a_broadcast_retried_with_one_key_publishes_each_topic_once(
    tidings_serve: Serve,
) -> None:
    node = tidings_serve()
    with trio.fail_after(TEST_TIMEOUT):
        await api(node, "publish", topic="b", payload="earlier")
        body = {"topics": ["a", "b", "nope:x"], "payload": "notice", "idempotency_key": "n-1"}
        status, first = await api(node, "broadcast", **body)
        assert status == 200
        assert [r.get("seq") for r in first["results"]] == [1, 2, None]
        assert first["results"][2]["error"]["code"] == "unknown_namespace"
        status, again = await api(node, "broadcast", **body)
        assert (status, again) == (200, first)
        # Under the same key, a topic not named before is published; the others not again.
        status, wider = await api(node, "broadcast", **{**body, "topics": ["a", "b", "c"]})
        assert [r["seq"] for r in wider["results"]] == [1, 2, 1]
        assert [e["payload"] for e in await history(node, "a")] == ["notice"]
        assert [e["payload"] for e in await history(node, "b")] == ["earlier", "notice"]


async def test_beyond_the_count_the_oldest_key_is_forgotten_and_publishes_again(
    tidings_serve: Serve,
) -> None:
    node = tidings_serve("--idempotency-max-keys", "3")
    with trio.fail_after(TEST_TIMEOUT):
        for n in range(1, 5):
            status, answer = await api(
                node, "publish", topic="t", payload=n, idempotency_key=f"k{n}"
            )
            assert (status, answer["seq"]) == (200, n)
        _, newest = await api(node, "publish", topic="t", payload=4, idempotency_key="k4")
        assert newest["seq"] == 4  # still known: not published again
        _, oldest = await api(node, "publish", topic="t", payload=1, idempotency_key="k1")
        assert oldest["seq"] == 5  # forgotten: published again
        assert ("tidings_idempotency_evicted_total", 2.0) in await metrics(node)
        assert [e["payload"] for e in await history(node, "t")] == [1, 2, 3, 4, 1]


async def test_native_publish_with_one_key_on_two_connections_is_one_event(
    tidings_serve: Serve,
) -> None:
    node = tidings_serve()
    with trio.fail_after(TEST_TIMEOUT):
        async with open_websocket_url(node.ws_url) as watcher:
            await subscribe(watcher, "chat")
            message = {
                "type": "publish",
                "topic": "chat",
                "payload": {"text": "hi"},
                "idempotencyKey": "msg-1",
            }
            replies = []
            for attempt in range(2):
                async with open_websocket_url(node.ws_url) as ws:
                    replies.append(await call(ws, {**message, "requestId": attempt}))
            assert [r["payload"] for r in replies] == [
                {"status": "published", "seq": 1, "epoch": replies[0]["payload"]["epoch"]}
            ] * 2
            event = orjson.loads(await watcher.get_message())
            assert (event["type"], event["seq"]) == ("event", 1)
            # Nothing else arrives: the next frame answers the ping sent after.
            await send(watcher, {"type": "ping", "requestId": "p"})
            assert orjson.loads(await watcher.get_message())["type"] == "pong"

            async with open_websocket_url(node.ws_url) as ws:
                wrong = await call(ws, {**message, "idempotencyKey": "", "requestId": 9})
                conflict = await call(ws, {**message, "payload": "other", "requestId": 10})
            assert wrong["payload"]["code"] == "invalid_field"
            assert conflict["payload"]["code"] == "idempotency_conflict"
        assert len(await history(node, "chat")) == 1


# --- two nodes on one Redis ------------------------------------------------------------------


async def test_the_same_key_sent_to_two_nodes_publishes_once(tidings_nodes: Nodes) -> None:
    with trio.fail_after(3 * TEST_TIMEOUT):
        a = await tidings_nodes.start("a")
        b = await tidings_nodes.start("b")
        body = {"topic": "orders", "payload": {"id": 1}, "idempotency_key": "order-1"}
        first = await a.call("publish", **body)
        assert await b.call("publish", **body) == first
        assert first["seq"] == 1

        # At the same moment, on both nodes, many times: Redis's script decides once.
        answers: list[dict[str, Any]] = []

        async def publish(node: Any, key: str) -> None:
            body = {"topic": "orders", "payload": key, "idempotency_key": key}
            answers.append(await node.call("publish", **body))

        async with trio.open_nursery() as nursery:
            for n in range(20):
                for node in (a, b):
                    nursery.start_soon(publish, node, f"k{n}")
        by_key: dict[Any, set[int]] = {}
        for answer in answers:
            by_key.setdefault(answer["seq"], set()).add(answer["epoch"])
        assert len(answers) == 40 and len(by_key) == 20

        events = (await a.call("history", topic="orders", limit=1000))["events"]
        assert [e["seq"] for e in events] == list(range(1, 22))
        assert sorted(e["payload"] for e in events[1:]) == sorted(f"k{n}" for n in range(20))

        # A native client of node b retrying a key the API used on node a: nothing new.
        async with open_websocket_url(b.url) as ws:
            reply = await call(
                ws,
                {"type": "publish", "topic": "orders", "payload": {"id": 1},
                 "idempotencyKey": "order-1", "requestId": 1},
            )  # fmt: skip
        assert reply["payload"]["seq"] == 1
        conflict = await b.api("publish", **{**body, "payload": {"id": 2}})
        assert (conflict[0], conflict[1]["error"]["code"]) == (409, "idempotency_conflict")


async def test_with_redis_the_oldest_key_of_a_topic_goes_beyond_the_count(
    tidings_nodes: Nodes,
) -> None:
    with trio.fail_after(2 * TEST_TIMEOUT):
        node = await tidings_nodes.start("a", "--idempotency-max-keys", "3")
        for n in range(1, 5):
            answer = await node.call("publish", topic="t", payload=n, idempotency_key=f"k{n}")
            assert answer["seq"] == n
        assert (await node.call("publish", topic="t", payload=4, idempotency_key="k4"))["seq"] == 4
        assert (await node.call("publish", topic="t", payload=1, idempotency_key="k1"))["seq"] == 5
        assert (
            await metrics(node)
            >= {
                'tidings_idempotent_publications_total{outcome="replayed"}': 1.0,
            }.items()
        )
        # What Redis holds for the topic stays within the bound.
        tid = topic_id("default", "t")
        assert await tidings_nodes.redis.command("HLEN", f"tidings:{tid}:idem") == 3
        assert await tidings_nodes.redis.command("ZCARD", f"tidings:{tid}:idem-at") == 3
        assert 0 < await tidings_nodes.redis.command("PTTL", f"tidings:{tid}:idem") <= 300_000
