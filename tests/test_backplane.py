"""The Redis backplane inside one process: two servers sharing a real redis-server.

The end-to-end tests with ``tidings serve`` processes are in test_cluster.py;
these drive the cases that need a hand on Redis itself: a node's pub/sub
connection cut under traffic, events that reach the stream but never the
node, a stream that no longer reaches back, Redis absent at start.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from tidings import BrokerError, Config, Server, open_server
from tidings.backplane.link import SEND_TIMEOUT, Link, LinkClosed
from tidings.backplane.redis import (
    PREFIX,
    SLOW_NODE_PATIENCE,
    RedisBackplane,
    _Session,
    _Shard,
    _Tracked,
    topic_id,
)
from tidings.broker.broker import DEFAULT_TENANT, Broker
from tidings.protocol.codes import CloseCode
from tidings.protocol.messages import Event, Position

from .conftest import TEST_TIMEOUT, Disconnects, receive, send, subscribe, ws_client
from .redis_fixture import RedisServer, free_port, redis_binary
from .redis_ha import cluster_port

pytestmark = pytest.mark.slow


@asynccontextmanager
async def node(url: str, name: str, **overrides: Any) -> AsyncIterator[Server]:
    settings: dict[str, Any] = {
        "port": 0,
        "log_level": "warning",
        "backplane": url,
        "node_id": name,
        "backplane_timeout": 1.0,
    }
    settings.update(overrides)
    async with open_server(Config(**settings)) as server:
        yield server


async def connected(server: Server) -> None:
    """Wait until the node has (re)connected to Redis, at most 5 s."""
    assert server.backplane is not None
    with trio.fail_after(5):
        await server.backplane.wait_connected()


async def events_of(ws: Any, count: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while len(events) < count:
        frame = await receive(ws)
        if frame["type"] == "event":
            events.append(frame)
    return events


async def test_an_event_published_on_one_node_reaches_subscribers_of_both_in_order(
    redis_server: RedisServer,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with node(redis_server.url, "a") as a, node(redis_server.url, "b") as b:
            async with ws_client(a) as on_a, ws_client(b) as on_b:
                first = await subscribe(on_a, "orders")
                second = await subscribe(on_b, "orders")
                # One stream: both nodes report the same epoch before any event.
                assert first["payload"]["epoch"] == second["payload"]["epoch"]
                for i in range(20):
                    await (a if i % 2 else b).publish("orders", {"n": i})
                got_a, got_b = await events_of(on_a, 20), await events_of(on_b, 20)
            assert [e["seq"] for e in got_a] == list(range(1, 21))
            assert [(e["seq"], e["epoch"], e["payload"]) for e in got_a] == [
                (e["seq"], e["epoch"], e["payload"]) for e in got_b
            ]
            assert [e["payload"]["n"] for e in got_a] == list(range(20))


async def test_a_client_resumes_on_the_other_node_with_what_it_missed(
    redis_server: RedisServer,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with node(redis_server.url, "a") as a, node(redis_server.url, "b") as b:
            async with ws_client(a) as ws:
                await subscribe(ws, "log")
                await a.publish("log", "one")
                (seen,) = await events_of(ws, 1)
            for word in ("two", "three"):
                await a.publish("log", word)
            async with ws_client(b) as ws:
                reply = await subscribe(ws, "log", since=seen["seq"], epoch=seen["epoch"])
                assert reply["payload"]["recovered"] is True
                replay = await events_of(ws, 2)
            assert [(e["seq"], e["payload"]) for e in replay] == [(2, "two"), (3, "three")]


async def test_a_cut_pubsub_connection_loses_nothing(redis_server: RedisServer) -> None:
    """Redis pub/sub drops what a disconnected node misses; the stream fills it in."""
    with trio.fail_after(TEST_TIMEOUT):
        async with node(redis_server.url, "a") as a, node(redis_server.url, "b") as b:
            async with ws_client(b) as ws:
                await subscribe(ws, "ticks")
                assert b.backplane is not None
                await connected(b)
                assert b.backplane.reconnects == 0  # a first connection is not a reconnect
                assert b.backplane.status()["reconnects"] == 0  # as /health shows it
                for i in range(30):
                    if i == 10:
                        # Cut every pub/sub connection (node b's among them).
                        await redis_server.command("CLIENT", "KILL", "TYPE", "pubsub")
                    await a.publish("ticks", i)
                    await trio.sleep(0.01)  # spread over the reconnect, not a sync point
                got = await events_of(ws, 30)
            assert [e["payload"] for e in got] == list(range(30))
            assert [e["seq"] for e in got] == list(range(1, 31))
            assert b.backplane.reconnects >= 1


async def _append_without_publishing(
    redis: RedisServer, topic: str, payload: str, tenant: str = "default"
) -> None:
    """Write the next event to the topic's stream as the publish script would, minus PUBLISH."""
    tid = topic_id(tenant, topic)
    meta, stream = f"{PREFIX}:{tid}:meta", f"{PREFIX}:{tid}:stream"
    seq = await redis.command("HINCRBY", meta, "s", 1)
    epoch = (await redis.command("HGET", meta, "e")).decode()
    message = f'{seq} {epoch} {int(time.time() * 1000)} 2026-01-01T00:00:00.000Z "{payload}"'
    await redis.command("XADD", stream, f"{seq}-1", "m", message)


async def test_events_a_node_never_heard_of_are_fetched_from_the_stream(
    redis_server: RedisServer,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with node(redis_server.url, "a") as a:
            async with ws_client(a) as ws:
                await subscribe(ws, "jobs")
                await a.publish("jobs", "first")
                await _append_without_publishing(redis_server, "jobs", "missed")
                await a.publish("jobs", "third")
                got = await events_of(ws, 3)
            assert [(e["seq"], e["payload"]) for e in got] == [
                (1, "first"),
                (2, "missed"),
                (3, "third"),
            ]
            assert a.backplane is not None and a.backplane.gaps == 1


async def test_a_hole_the_stream_no_longer_covers_closes_subscribers_with_4010(
    redis_server: RedisServer,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with node(redis_server.url, "a", history_size=2) as a:
            disconnects = Disconnects(a)
            async with ws_client(a) as ws:
                await subscribe(ws, "jobs")
                await a.publish("jobs", "first")
                for i in range(4):  # more than the history keeps
                    await _append_without_publishing(redis_server, "jobs", f"missed-{i}")
                await a.publish("jobs", "last")
                (closed,) = await disconnects.wait()
            assert closed.code == CloseCode.INSUFFICIENT_STATE
            assert a.backplane is not None and a.backplane.lost == 1
            # Resuming says plainly that events are gone, and where the stream is.
            async with ws_client(a) as ws:
                reply = await subscribe(ws, "jobs", since=1)
            assert reply["payload"]["recovered"] is False
            assert reply["payload"]["seq"] == 6


async def test_offsets_redis_hands_out_again_retire_the_epoch(
    redis_server: RedisServer,
) -> None:
    """Redis went back in time (lost writes): the same offsets must not mean two events."""
    with trio.fail_after(TEST_TIMEOUT):
        async with node(redis_server.url, "a") as a:
            disconnects = Disconnects(a)
            async with ws_client(a) as ws:
                await subscribe(ws, "jobs")
                for word in ("one", "two", "three"):
                    await a.publish("jobs", word)
                seen = await events_of(ws, 3)
                # Redis loses the last two writes, as after a failover to a lagging replica.
                tid = topic_id("default", "jobs")
                await redis_server.command("HSET", f"{PREFIX}:{tid}:meta", "s", 1)
                await redis_server.command("DEL", f"{PREFIX}:{tid}:stream")
                await a.publish("jobs", "other two")  # offset 2 again, another event
                (closed,) = await disconnects.wait()
            assert closed.code == CloseCode.INSUFFICIENT_STATE
            async with ws_client(a) as ws:
                reply = await subscribe(ws, "jobs", since=3, epoch=seen[-1]["epoch"])
            assert reply["payload"]["recovered"] is False
            assert reply["payload"]["epoch"] != seen[-1]["epoch"]


async def test_a_node_far_behind_redis_skips_then_refills_from_history(
    redis_server: RedisServer,
) -> None:
    """Publishers outrunning a node's fan-out: it skips, catches up, refills, loses nothing."""
    with trio.fail_after(TEST_TIMEOUT):
        async with node(redis_server.url, "a", backplane_max_lag=5) as a:
            async with ws_client(a) as ws:
                await subscribe(ws, "jobs")
                await a.publish("jobs", "first")
                # An event that reaches the node a minute after Redis sequenced it.
                tid = topic_id("default", "jobs")
                await _append_without_publishing(redis_server, "jobs", "late")
                meta = f"{PREFIX}:{tid}:meta"
                epoch = (await redis_server.command("HGET", meta, "e")).decode()
                stale_ms = int((time.time() - 60) * 1000)
                await redis_server.command(
                    "PUBLISH",
                    f"{PREFIX}:topic:{tid}",
                    f'2 {epoch} {stale_ms} 2026-01-01T00:00:00.000Z "late"',
                )
                await a.publish("jobs", "fresh")  # caught up: the skipped topic is refilled
                got = await events_of(ws, 3)
            assert [(e["seq"], e["payload"]) for e in got] == [
                (1, "first"),
                (2, "late"),
                (3, "fresh"),
            ]
            assert a.backplane is not None and a.backplane.shed == 1


async def test_a_local_namespace_stays_on_its_node(redis_server: RedisServer) -> None:
    """Each node's own status topics: sequenced and kept where published, never shared."""
    namespaces = {"node": {"local": True}}
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            node(redis_server.url, "a", namespaces=namespaces) as a,
            node(redis_server.url, "b", namespaces=namespaces) as b,
            ws_client(a) as on_a,
            ws_client(b) as on_b,
        ):
            await subscribe(on_a, "node:status")
            await subscribe(on_b, "node:status")
            await subscribe(on_b, "shared")
            await a.publish("node:status", "a is fine")
            await b.publish("node:status", "b is fine")
            await a.publish("shared", "to everyone")  # a shared topic still crosses
            (from_a,) = await events_of(on_a, 1)
            got_b = await events_of(on_b, 2)
            assert (from_a["seq"], from_a["payload"]) == (1, "a is fine")
            assert [(e["topic"], e["seq"], e["payload"]) for e in got_b] == [
                ("node:status", 1, "b is fine"),
                ("shared", 1, "to everyone"),
            ]
            events, _ = await a.history("node:status")
            assert [event.payload for event in events] == ["a is fine"]
            assert b.backplane is not None and b.backplane.status()["topics"] == 1  # "shared"


async def test_redis_absent_at_start_degrades_then_recovers(tmp_path: Path) -> None:
    redis = RedisServer(redis_binary(), tmp_path)
    with trio.fail_after(TEST_TIMEOUT):
        async with node(redis.url, "a", backplane_timeout=0.3) as a:
            assert a.backplane is not None and not a.backplane.connected
            async with ws_client(a) as ws:
                await send(ws, {"type": "subscribe", "topic": "t", "requestId": "s"})
                refused = await receive(ws)
                assert refused["type"] == "error"
                assert refused["payload"]["code"] == "unavailable"
                with pytest.raises(BrokerError) as refusal:
                    await a.publish("t", 1)
                assert refusal.value.code == "unavailable"
                assert a.backplane.dropped == 1
                await redis.start()
                try:
                    await connected(a)
                    await subscribe(ws, "t")
                    await a.publish("t", 2)
                    (event,) = await events_of(ws, 1)
                    assert event["payload"] == 2
                finally:
                    with trio.CancelScope(shield=True):
                        await redis.stop()


# --- Sentinel and Cluster deployments ------------------------------------------------


async def _start(command: list[str], cwd: Path) -> trio.Process:
    return await trio.lowlevel.open_process(
        command, cwd=str(cwd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


async def _answers_ping(port: int) -> None:
    """Wait (bounded) until a Redis or Sentinel process on ``port`` answers PING."""
    with trio.fail_after(10):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.02)
                continue
            async with stream:
                await stream.send_all(b"PING\r\n")
                if (await stream.receive_some(64)).startswith(b"+PONG"):
                    return
            await trio.sleep(0.02)


async def _cluster_ready(redis: RedisServer, port: int) -> None:
    """Poll a cluster node (bounded by the caller) until it says the cluster is ok."""
    redis.port = port
    info = b""
    while b"cluster_state:ok" not in info:
        await trio.sleep(0.05)
        info = await redis.command("CLUSTER", "INFO")


async def _stop(processes: list[trio.Process]) -> None:
    with trio.CancelScope(shield=True):
        for process in processes:
            process.kill()
            await process.wait()


async def _one_node_round_trip(url: str) -> None:
    async with node(url, "a") as a:
        await connected(a)
        async with ws_client(a) as ws:
            await subscribe(ws, "deploys")
            for step in ("build", "push"):
                await a.publish("deploys", step)
            got = await events_of(ws, 2)
        assert [(e["seq"], e["payload"]) for e in got] == [(1, "build"), (2, "push")]
        events, position = await a.history("deploys")
        assert [e.payload for e in events] == ["build", "push"] and position is not None


async def test_a_sentinel_url_finds_the_primary(tmp_path: Path) -> None:
    binary = redis_binary()
    primary, sentinel = free_port(), free_port()
    (tmp_path / "sentinel.conf").write_text(
        f"port {sentinel}\nbind 127.0.0.1\nsentinel monitor main 127.0.0.1 {primary} 1\n"
    )
    processes = [
        await _start(
            [binary, "--port", str(primary), "--bind", "127.0.0.1", "--save", ""], tmp_path
        ),
        await _start([binary, str(tmp_path / "sentinel.conf"), "--sentinel"], tmp_path),
    ]
    try:
        with trio.fail_after(TEST_TIMEOUT):
            await _answers_ping(primary)
            await _answers_ping(sentinel)
            await _one_node_round_trip(f"redis+sentinel://127.0.0.1:{sentinel}/main/0")
    finally:
        await _stop(processes)


async def test_a_cluster_url_spreads_topics_over_the_cluster(tmp_path: Path) -> None:
    binary, cli = redis_binary(), shutil.which("redis-cli")
    if cli is None:
        pytest.skip("redis-cli is not installed (it comes with redis-server's package)")
    ports = [cluster_port() for _ in range(3)]
    processes = []
    try:
        for port in ports:
            directory = tmp_path / str(port)
            directory.mkdir()
            processes.append(
                await _start(
                    [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                     "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"],
                    directory,
                )
            )  # fmt: skip
        with trio.fail_after(TEST_TIMEOUT):
            for port in ports:
                await _answers_ping(port)
            await trio.run_process(
                [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-yes"],
                capture_stdout=True,
            )
            for port in ports:
                await _cluster_ready(RedisServer(binary, tmp_path), port)
            await _one_node_round_trip(f"redis+cluster://127.0.0.1:{ports[0]}")
    finally:
        await _stop(processes)


async def test_garbage_on_the_control_channel_is_ignored(redis_server: RedisServer) -> None:
    """Anyone may PUBLISH on tidings:control; it must not cost the node its connection."""
    with trio.fail_after(TEST_TIMEOUT):
        async with node(redis_server.url, "a") as a, node(redis_server.url, "b") as b:
            assert a.backplane is not None and b.backplane is not None
            await connected(a)
            await connected(b)
            before = a.backplane.reconnects
            for garbage in ("not json", "[1, 2]", '{"op": "presence"}'):
                await redis_server.command("PUBLISH", f"{PREFIX}:control", garbage)
                await redis_server.command("PUBLISH", f"{PREFIX}:control:a", garbage)
            # Both still answer each other (the question goes over the same channel).
            async with ws_client(b) as ws:
                await subscribe(ws, "jobs")
                channels = await a.channels()
            assert channels == {"jobs": 1}
            assert a.backplane.reconnects == before and a.backplane.connected


class _HeldLink:
    """A pub/sub link whose ``send`` waits until released, as behind a busy send lock."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.sent: list[bytes] = []

    async def send(self, data: bytes) -> None:
        await self.release.wait()
        self.sent.append(data)


async def test_a_subscribe_cancelled_before_it_was_sent_leaves_no_waiter_behind() -> None:
    """Found by bench/storm.py: under a reconnect storm a topic's sync timed out
    while its SUBSCRIBE waited for the link's send lock; the waiter it left queued
    took the next confirmation, so every later sync of that topic waited for one
    confirmation too many, timed out in turn, and its clients were refused for
    good ("unavailable") or resumed with a gap."""
    link = _HeldLink()
    shard = _Shard(pubsub=link, publisher=link, run_id=b"", script=b"", version=(7,))  # type: ignore[arg-type]
    session = _Session()
    subscribe_ = RedisBackplane._subscribe
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:  # the sync that times out
            nursery.start_soon(subscribe_, None, session, shard, [b"t"], "SUBSCRIBE")
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert not link.sent
        assert b"t" not in shard.confirming

        link.release.set()
        async with trio.open_nursery() as nursery:  # the next sync of the topic
            nursery.start_soon(subscribe_, None, session, shard, [b"t"], "SUBSCRIBE")
            await trio.testing.wait_all_tasks_blocked()
            assert len(link.sent) == 1
            RedisBackplane._on_push(None, session, shard, [b"subscribe", b"t", 1])  # type: ignore[arg-type]
        assert b"t" not in shard.confirming


async def test_a_sync_of_a_topic_untracked_meanwhile_leaves_the_broker_alone() -> None:
    """When every client waiting for a topic gives up, the node forgets it, and
    the next client starts another sync while the first may still be fetching.
    The first must not load its copy into the broker, where the second's may
    already have subscribers (a suspected cause of the gaps bench/storm.py saw)."""
    broker = Broker()
    old = _Tracked(DEFAULT_TENANT, "t", b"channel-of-t")
    current = _Tracked(DEFAULT_TENANT, "t", b"channel-of-t")
    fetched = Position(7, "e1"), None, [Event("t", 7, "e1", {}, "2026-12-06T00:00:00.000Z", b"{}")]

    async def fetch(*args: Any, **kwargs: Any) -> Any:
        return fetched

    backplane = SimpleNamespace(broker=broker, _tracked={b"channel-of-t": current}, _fetch=fetch)
    await RedisBackplane._catch_up(backplane, old, resume=False)  # type: ignore[arg-type]
    assert broker.position("t") is None
    backplane._tracked[b"channel-of-t"] = old  # the same sync, still the topic's: it loads
    await RedisBackplane._catch_up(backplane, old, resume=False)  # type: ignore[arg-type]
    assert broker.position("t") == Position(7, "e1")


def _syncing_topic(*, healthy: bool) -> tuple[_Tracked, SimpleNamespace]:
    """A topic whose sync is under way, and as much of a backplane as ``track`` uses."""
    tracked = _Tracked(DEFAULT_TENANT, "t", b"channel-of-t")
    tracked.syncing = True
    backplane = SimpleNamespace(
        timeout=2.0,
        _tracked={b"channel-of-t": tracked},
        _unsubscribe=set(),
        _wake_unsubscriber=trio.Event(),
        _channel=lambda tenant, topic: b"channel-of-t",
        _broker_has=lambda tenant, topic: False,
        healthy=healthy,
    )
    return tracked, backplane


async def test_a_subscriber_waits_for_a_first_sync_a_busy_node_started_late(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """bench/storm.py: with thousands of handshakes on the node's loop, a topic's
    first sync began well after the first subscriber started waiting for it; the
    subscriber gave up after backplane_timeout and was refused `unavailable`
    ("Redis is not reachable") while Redis was idle and the sync then succeeded
    (533 refusals, not one failed sync, in run 150821). It now waits for the
    attempt under way, which the same timeout bounds."""
    # Redis does not answer publications in time either.
    tracked, backplane = _syncing_topic(healthy=False)

    async def late_sync(succeeds: bool) -> None:
        await trio.sleep(1.5)  # the loop's queue: the sync task starts late
        tracked.deadline = trio.current_time() + backplane.timeout
        await trio.sleep(1.8)  # SUBSCRIBE and the stream's head: within its own 2 s
        if succeeds:
            tracked.synced = True
            tracked.ready.set()

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(late_sync, True)
        await RedisBackplane.track(backplane, DEFAULT_TENANT, "t")  # type: ignore[arg-type]
    assert trio.current_time() - start == pytest.approx(3.3)

    # An attempt that runs out refuses its waiters at its deadline, not later.
    tracked.synced, tracked.ready, tracked.deadline = False, trio.Event(), 0.0
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(late_sync, False)
        with pytest.raises(BrokerError):
            await RedisBackplane.track(backplane, DEFAULT_TENANT, "t")  # type: ignore[arg-type]
    assert trio.current_time() - start == pytest.approx(3.5)
    assert b"channel-of-t" not in backplane._tracked


async def test_a_subscriber_waits_longer_for_a_sync_while_redis_answers_in_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """bench/storm.py after the fixes above: on a node this busy a sync's own
    attempt could outlast backplane_timeout, and its waiters were refused
    `unavailable` while Redis idled. When Redis answers publications in time
    (the backplane is healthy) the node is what is slow: a subscriber waits for
    the next attempt, up to SLOW_NODE_PATIENCE timeouts, and no longer."""
    tracked, backplane = _syncing_topic(healthy=True)

    async def attempts(succeeds_at: float | None) -> None:
        tracked.deadline = trio.current_time() + backplane.timeout
        await trio.sleep(backplane.timeout)  # the first attempt runs out
        tracked.deadline = trio.current_time() + backplane.timeout  # the next, at once
        if succeeds_at is not None:
            await trio.sleep(succeeds_at - backplane.timeout)
            tracked.synced = True
            tracked.ready.set()

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(attempts, 3.5)
        await RedisBackplane.track(backplane, DEFAULT_TENANT, "t")  # type: ignore[arg-type]
    assert trio.current_time() - start == pytest.approx(3.5)

    tracked.synced, tracked.ready = False, trio.Event()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(attempts, None)
        with pytest.raises(BrokerError):
            await RedisBackplane.track(backplane, DEFAULT_TENANT, "t")  # type: ignore[arg-type]
    assert trio.current_time() - start == pytest.approx(2.0 * SLOW_NODE_PATIENCE)


class _SlowStream:
    """A stream whose writes are recorded and each wait a scheduler pass or more."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.hold = trio.Event()

    async def send_all(self, data: bytes) -> None:
        await self.hold.wait()
        self.writes.append(bytes(data))

    async def aclose(self) -> None:
        pass


async def test_commands_sent_while_the_link_writes_go_out_together_in_order() -> None:
    """bench/storm.py: a hundred topics' SUBSCRIBE queued on the pub/sub link's
    send lock, one scheduler pass per turn, and took seconds on a busy node.
    Now whoever writes takes what the others queued meanwhile; a caller
    cancelled after queuing loses nothing of anyone's."""
    stream = _SlowStream()
    link = Link(stream, ("127.0.0.1", 0))  # type: ignore[arg-type]
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.send, b"first;")
            await trio.testing.wait_all_tasks_blocked()  # the first write is under way
            for i in range(100):
                nursery.start_soon(link.send, b"%d;" % i)
            await trio.testing.wait_all_tasks_blocked()  # queued, and returned
            with trio.CancelScope() as impatient:
                impatient.cancel()
                await link.send(b"cancelled;")
            await trio.testing.wait_all_tasks_blocked()
            stream.hold.set()
    assert len(stream.writes) == 2 and stream.writes[0] == b"first;"
    # Each command whole, once, in the order the calls ran (Trio runs new tasks in any order).
    commands = stream.writes[1].split(b";")
    assert commands[-2:] == [b"cancelled", b""]
    assert sorted(commands[:-2], key=int) == [b"%d" % i for i in range(100)]


async def test_a_write_redis_does_not_take_closes_the_link_and_is_not_cut_by_its_caller(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A write may carry other tasks' commands: its caller's cancellation does
    not cut it in half (the link would be left with half a command), but Redis
    taking nothing for SEND_TIMEOUT closes the link."""
    stream = _SlowStream()  # never released: Redis takes nothing
    closed = trio.Event()

    async def aclose() -> None:
        closed.set()

    stream.aclose = aclose  # type: ignore[method-assign]
    link = Link(stream, ("127.0.0.1", 0))  # type: ignore[arg-type]
    start = trio.current_time()
    with trio.move_on_after(1):  # the caller gives up long before
        with pytest.raises(LinkClosed):
            await link.send(b"PING;")
    assert trio.current_time() - start == pytest.approx(SEND_TIMEOUT)
    assert closed.is_set() and stream.writes == []
