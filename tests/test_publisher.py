"""tidings.publisher against a real ``tidings serve`` (issue 16).

A ``Publisher`` from plain threads with no event loop, an ``AsyncPublisher``
under ``asyncio.run`` (beside centrifuge-python, the asyncio subscriber) and
under ``trio.run``; retries whose first answer is lost (a proxy throws it away)
publish once; retries stop at errors a retry cannot fix; a node that is down,
or whose Redis is, gives a typed error after a bounded number of attempts.
The Python WebSocket client: publishes retried across a reconnect publish
once, and under asyncio it says at once what to use instead.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest
import trio

import tidings.client
from tidings.errors import (
    ApiAuthError,
    ApiConflictError,
    ApiRejectedError,
    ApiUnavailableError,
)
from tidings.publisher import (
    AsyncPublisher,
    Broadcast,
    Channel,
    History,
    NodeInfo,
    PresenceStats,
    Published,
    Publisher,
    TopicFailure,
)

from .conftest import TEST_TIMEOUT
from .redis_fixture import Nodes, RedisServer, free_port
from .serve_fixture import API_KEY, ServeProcess
from .tcpproxy import cutting_proxy

pytestmark = pytest.mark.slow

Serve = Callable[..., ServeProcess]
#: Retries in these tests pause a few milliseconds: what is tested is how many, not how long.
QUICK = {"backoff": 0.01, "max_backoff": 0.05}


def test_a_publisher_shared_by_plain_threads_calls_every_method(tidings_serve: Serve) -> None:
    node = tidings_serve()
    with Publisher(node.http_url, api_key=API_KEY, timeout=5) as publisher:
        seqs: list[int] = []
        lock = threading.Lock()

        def publish_some(thread: int) -> None:
            for n in range(25):
                published = publisher.publish("orders", {"thread": thread, "n": n})
                with lock:
                    seqs.append(published.seq)

        threads = [threading.Thread(target=publish_some, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TEST_TIMEOUT)
        assert sorted(seqs) == list(range(1, 101))

        history = publisher.history("orders", since=95, limit=10)
        assert isinstance(history, History)
        assert [event.seq for event in history.events] == [96, 97, 98, 99, 100]
        assert history.seq == 100 and history.epoch is not None
        assert publisher.history("never") == History("never", 0, None, ())

        broadcast = publisher.broadcast(["orders", "invoices", "nope:x"], None)
        assert isinstance(broadcast, Broadcast)
        assert broadcast.published == [
            Published("orders", 101, history.epoch),
            Published("invoices", 1, broadcast.results[1].epoch),  # type: ignore[union-attr]
        ]
        assert [(f.topic, f.code) for f in broadcast.failed] == [("nope:x", "unknown_namespace")]
        assert isinstance(broadcast.failed[0], TopicFailure)
        assert publisher.history("invoices").events[0].payload is None

        elsewhere = publisher.publish("orders", "hello", tenant="acme")
        assert (elsewhere.topic, elsewhere.seq) == ("orders", 1)
        assert publisher.presence("orders") == []
        assert publisher.presence_stats("orders") == PresenceStats("orders", 0, 0)
        assert publisher.channels() == []
        assert publisher.disconnect(user="nobody") == 0
        info = publisher.info()
        assert isinstance(info, NodeInfo)
        assert (info.node, info.published) == (node.name, 103)


def test_an_async_publisher_under_asyncio_reaches_a_centrifuge_python_subscriber(
    tidings_serve: Serve,
) -> None:
    centrifuge = pytest.importorskip("centrifuge", reason="centrifuge-python is in the test extra")
    node = tidings_serve()

    class Events(centrifuge.SubscriptionEventHandler):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            self.subscribed = asyncio.Event()
            self.publications: asyncio.Queue[Any] = asyncio.Queue()

        async def on_subscribed(self, ctx: Any) -> None:
            self.subscribed.set()

        async def on_publication(self, ctx: Any) -> None:
            await self.publications.put(ctx.pub)

    async def main() -> None:
        events = Events()
        client = centrifuge.Client(node.centrifugo_url, proxy=None)
        subscription = client.new_subscription("orders", events=events)
        await client.connect()
        await subscription.subscribe()
        await events.subscribed.wait()
        async with AsyncPublisher(node.http_url, api_key=API_KEY) as publisher:
            published = await asyncio.gather(
                *(publisher.publish("orders", {"n": n}) for n in range(10))
            )
            assert sorted(p.seq for p in published) == list(range(1, 11))
            received = [await events.publications.get() for _ in range(10)]
            assert sorted(pub.offset for pub in received) == list(range(1, 11))
            assert (await publisher.presence_stats("orders")).clients == 1
            assert await publisher.channels() == [Channel("orders", 1)]
        await client.disconnect()

    asyncio.run(asyncio.wait_for(main(), TEST_TIMEOUT))


async def test_an_async_publisher_under_trio(tidings_serve: Serve) -> None:
    node = tidings_serve()
    with trio.fail_after(TEST_TIMEOUT):
        async with AsyncPublisher(node.http_url, api_key=API_KEY) as publisher:
            results: list[Published] = []

            async def publish(n: int) -> None:
                results.append(await publisher.publish("deploys", {"step": n}))

            async with trio.open_nursery() as nursery:
                for n in range(10):
                    nursery.start_soon(publish, n)
            assert sorted(r.seq for r in results) == list(range(1, 11))
            assert len((await publisher.history("deploys")).events) == 10
            assert (await publisher.info()).published == 10


async def test_a_publish_whose_answer_was_lost_is_retried_and_published_once(
    tidings_serve: Serve,
) -> None:
    node = tidings_serve()
    with trio.fail_after(TEST_TIMEOUT):
        async with cutting_proxy(node.port) as proxy:
            url = f"http://127.0.0.1:{proxy.port}"
            # A synchronous Publisher in a worker thread, the proxy in this Trio loop.
            with Publisher(url, api_key=API_KEY, **QUICK) as publisher:
                proxy.cut_next_answer()
                first = await trio.to_thread.run_sync(publisher.publish, "orders", {"id": 1})
                assert proxy.cuts == 1
                broadcast_key = "broadcast-1"
                proxy.cut_next_answer()
                both = await trio.to_thread.run_sync(
                    lambda: publisher.broadcast(
                        ["orders", "audit"], {"id": 2}, idempotency_key=broadcast_key
                    )
                )
                assert proxy.cuts == 2
            async with AsyncPublisher(url, api_key=API_KEY, **QUICK) as publisher:
                proxy.cut_next_answer()
                third = await publisher.publish("orders", {"id": 3})
                assert proxy.cuts == 3
                history = await publisher.history("orders")
        assert first.seq == 1
        assert [r.seq for r in both.published] == [2, 1]  # type: ignore[union-attr]
        assert third.seq == 3
        assert [(e.seq, e.payload) for e in history.events] == [
            (1, {"id": 1}),
            (2, {"id": 2}),
            (3, {"id": 3}),
        ]


def test_retries_stop_at_errors_a_retry_cannot_fix(tidings_serve: Serve) -> None:
    node = tidings_serve()
    with (
        Publisher(node.http_url, api_key="wrong", retries=5, **QUICK) as wrong_key,
        pytest.raises(ApiAuthError) as unauthorized,
    ):
        wrong_key.publish("orders", 1)
    assert (unauthorized.value.status, unauthorized.value.code) == (401, "unauthorized")
    assert unauthorized.value.attempts == 1

    with Publisher(node.http_url, api_key=API_KEY, retries=5, **QUICK) as publisher:
        with pytest.raises(ApiRejectedError) as rejected:
            publisher.publish("", 1)
        assert (rejected.value.status, rejected.value.code) == (400, "invalid_topic")
        assert rejected.value.attempts == 1

        publisher.publish("orders", {"id": 1}, idempotency_key="order-1")
        with pytest.raises(ApiConflictError) as conflict:
            publisher.publish("orders", {"id": 2}, idempotency_key="order-1")
        assert (conflict.value.status, conflict.value.code) == (409, "idempotency_conflict")
        assert conflict.value.attempts == 1
        assert not conflict.value.retryable
        assert len(publisher.history("orders").events) == 1

        with pytest.raises(TypeError):
            publisher.publish("orders", object())
        with pytest.raises(ApiRejectedError) as too_large:
            publisher.publish("orders", "x" * (1024 * 1024))
        assert (too_large.value.code, too_large.value.attempts) == ("too_large", 0)


def test_a_node_that_is_down_gives_a_typed_error_after_bounded_retries() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with (
        Publisher(url, api_key=API_KEY, retries=2, **QUICK) as publisher,
        pytest.raises(ApiUnavailableError) as down,
    ):
        publisher.publish("orders", 1)
    assert (down.value.status, down.value.code, down.value.attempts) == (None, "unreachable", 3)
    assert down.value.retryable

    async def under_asyncio() -> None:
        async with AsyncPublisher(url, api_key=API_KEY, retries=1, **QUICK) as publisher:
            with pytest.raises(ApiUnavailableError) as down:
                await publisher.info()
            assert (down.value.code, down.value.attempts) == ("unreachable", 2)

    asyncio.run(asyncio.wait_for(under_asyncio(), TEST_TIMEOUT))


async def test_a_node_whose_redis_is_down_answers_503_retried_then_raised(
    tidings_nodes: Nodes, redis_server: RedisServer
) -> None:
    with trio.fail_after(2 * TEST_TIMEOUT):
        await redis_server.stop()
        node = await tidings_nodes.start("a", "--backplane-timeout", "0.2s", ready="degraded")
        url = f"http://127.0.0.1:{node.port}"
        async with AsyncPublisher(url, api_key="cluster-test-key", retries=2, **QUICK) as publisher:
            with pytest.raises(ApiUnavailableError) as unavailable:
                await publisher.publish("orders", 1)
        assert (unavailable.value.status, unavailable.value.code) == (503, "unavailable")
        assert unavailable.value.attempts == 3


# --- the Python WebSocket client --------------------------------------------------------------


async def test_the_client_sends_a_publish_lost_with_its_connection_again_once(
    tidings_serve: Serve,
) -> None:
    node = tidings_serve()
    with trio.fail_after(TEST_TIMEOUT):
        async with cutting_proxy(node.port) as proxy:
            url = f"ws://127.0.0.1:{proxy.port}/ws"
            async with tidings.client.connect(url, min_backoff=0.01, max_backoff=0.05) as client:
                proxy.cut_next_answer()
                position = await client.publish("orders", {"id": 1})
                assert proxy.cuts == 1
                assert client.connections == 2
                again = await client.publish("orders", {"id": 1}, idempotency_key="mine")
                assert await client.publish("orders", {"id": 1}, idempotency_key="mine") == again
        async with AsyncPublisher(node.http_url, api_key=API_KEY) as publisher:
            history = await publisher.history("orders")
        assert position.seq == 1
        assert [e.seq for e in history.events] == [1, 2]


def test_the_client_under_asyncio_fails_at_once_and_says_what_to_use() -> None:
    async def main() -> None:
        async with tidings.client.connect("ws://127.0.0.1:1/ws"):
            pass  # pragma: no cover - never reached

    with pytest.raises(RuntimeError, match=r"Trio only.*AsyncPublisher.*centrifuge-python"):
        asyncio.run(main())


async def test_a_broadcast_retries_under_its_key_only_the_topics_that_failed(
    tidings_nodes: Nodes, redis_server: RedisServer
) -> None:
    with trio.fail_after(3 * TEST_TIMEOUT):
        # node:* topics stay on the node (no Redis); the others need Redis.
        node = await tidings_nodes.start(
            "a", "--backplane-timeout", "0.2s", "--namespaces", '{"node": {"local": true}}'
        )
        url = f"http://127.0.0.1:{node.port}"
        async with AsyncPublisher(url, api_key="cluster-test-key", retries=2, **QUICK) as publisher:
            await redis_server.stop()
            await node.wait_health("degraded", connected=False)
            away = await publisher.broadcast(["node:status", "orders"], "hi", idempotency_key="b-1")
            # Three attempts: the local topic was published by the first, answered by the others.
            assert [r.seq for r in away.published] == [1]
            assert [(f.topic, f.code) for f in away.failed] == [("orders", "unavailable")]
            samples = await node.metrics()
            assert samples['tidings_idempotent_publications_total{outcome="replayed"}'] == 2

            await redis_server.start()
            await node.wait_health("ok")
            back = await publisher.broadcast(["node:status", "orders"], "hi", idempotency_key="b-1")
            assert [(r.topic, r.seq) for r in back.published] == [("node:status", 1), ("orders", 1)]
            local = await publisher.history("node:status")
            shared = await publisher.history("orders")
        assert [e.payload for e in local.events] == ["hi"]
        assert [e.payload for e in shared.events] == ["hi"]


async def test_with_redis_a_key_is_forgotten_once_its_window_has_passed(
    tidings_nodes: Nodes,
) -> None:
    with trio.fail_after(2 * TEST_TIMEOUT):
        # Long enough that the retry right after the first call is surely within it.
        node = await tidings_nodes.start("a", "--idempotency-window", "2s")
        url = f"http://127.0.0.1:{node.port}"
        async with AsyncPublisher(url, api_key="cluster-test-key") as publisher:
            first = await publisher.publish("orders", 1, idempotency_key="k")
            assert await publisher.publish("orders", 1, idempotency_key="k") == first
            await trio.sleep(2.1)  # the window itself is what is tested: let it pass
            later = await publisher.publish("orders", 1, idempotency_key="k")
        assert (first.seq, later.seq) == (1, 2)
