"""The connection's close races, on a memory transport under trio's MockClock.

Each test is one race between the connection's three tasks and its peer: a
peer that closes while the server drains, a close frame that cannot be
written, a shutdown during a replay, an overflow under ``disconnect``, a
silent peer. Time is the mock clock's (``autojump_clock``): a timeout
happens the moment every task waits, not after seconds of wall time, and
the tests assert what the peer saw and how the connection says it ended.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from tidings import CloseInfo, OverflowPolicy
from tidings.broker.broker import Broker
from tidings.broker.namespaces import Namespace, Namespaces
from tidings.connection.alarms import AlarmClock
from tidings.connection.connection import Connection
from tidings.connection.limits import ConnectionLimits
from tidings.protocol.native import NativeDialect
from tidings.transport.base import CloseFrame, PeerClosed, PingFrame, UpgradeRequest

from .memory_transport import MemoryTransport, close_frames


class Peer:
    """The client end of one connection, and how it ended."""

    def __init__(self, transport: MemoryTransport, connection: Connection) -> None:
        self.transport = transport
        self.connection = connection
        self.ended = trio.Event()
        self.closed: CloseInfo | None = None

    async def send(self, message: dict[str, Any]) -> None:
        await self.transport.peer_sends(orjson.dumps(message).decode())

    async def read(self, count: int = 1) -> list[Any]:
        """The next ``count`` items, JSON decoded (control frames as they are)."""
        items = await self.transport.peer_reads(count)
        return [orjson.loads(item) if isinstance(item, bytes) else item for item in items]

    async def subscribe(self, topic: str, **payload: Any) -> dict[str, Any]:
        await self.send({"type": "subscribe", "topic": topic, "requestId": "s", "payload": payload})
        (reply,) = await self.read()
        assert reply["type"] == "response", reply
        return reply  # type: ignore[no-any-return]


@asynccontextmanager
async def connected(
    *, room: int = 8, history_size: int = 1000, **limits: Any
) -> AsyncIterator[tuple[Broker, Peer]]:
    namespace = Namespace(
        name="",
        history_size=history_size,
        outbox_size=limits.get("outbox_size", 256),
        overflow_policy=limits.get("overflow_policy", OverflowPolicy.DROP),
    )
    broker = Broker(namespaces=Namespaces(namespace))
    alarms = AlarmClock()
    transport = MemoryTransport(room)
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.run)
        await nursery.start(alarms.run)
        connection = Connection(
            transport,  # type: ignore[arg-type]
            UpgradeRequest("/ws", "", b"", transport.remote),
            dialect=NativeDialect(),
            broker=broker,
            limits=ConnectionLimits(**limits),
            handlers={},
            alarms=alarms,
        )
        peer = Peer(transport, connection)

        async def run() -> None:
            peer.closed = await connection.run()
            peer.ended.set()

        nursery.start_soon(run)
        yield broker, peer
        nursery.cancel_scope.cancel()


async def test_a_peer_close_is_answered_with_its_code(autojump_clock: trio.abc.Clock) -> None:
    async with connected() as (_, peer):
        await peer.transport.peer_sends(PeerClosed(4000, "bye"))
        (answer,) = await peer.read()
        assert answer == CloseFrame(4000, "bye")
        await peer.ended.wait()
    assert peer.closed == CloseInfo(4000, "bye", "client")


async def test_a_peer_close_during_a_shutdown_drain_ends_it_without_the_rest(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The server drains for a shutdown; the peer, not reading, closes instead."""
    async with connected(room=4, close_timeout=2, write_timeout=10) as (broker, peer):
        await peer.subscribe("t")
        for i in range(20):
            await broker.publish("t", i)
        start = trio.current_time()
        peer.connection.close(1001, "server shutting down", flush=True)
        await peer.transport.peer_sends(PeerClosed(1000))
        await peer.ended.wait()
        # Not write_timeout: the drain stopped at the peer's close, and the
        # stalled write got only close_timeout to make room for the answer.
        assert trio.current_time() - start <= 2 + 0.01
    assert peer.closed is not None and peer.closed.code == 1001
    assert "close frame not delivered" in peer.closed.reason


async def test_a_close_frame_that_cannot_be_written_loses_the_connection_in_time(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with connected(room=2, close_timeout=2, write_timeout=10) as (broker, peer):
        await peer.subscribe("t")
        for i in range(10):
            await broker.publish("t", i)  # the wire is full: the writer waits
        start = trio.current_time()
        peer.connection.close(4000, "go", flush=False)
        await peer.ended.wait()
        assert trio.current_time() - start == pytest.approx(2, abs=0.01)
    assert peer.closed == CloseInfo(4000, "go (close frame not delivered: write timeout)", "server")
    assert not close_frames(peer.transport.wire)


async def test_a_shutdown_during_a_replay_drains_it_in_order_then_says_1001(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with connected(room=4) as (broker, peer):
        for i in range(50):
            await broker.publish("t", i)
        await peer.send({"type": "subscribe", "topic": "t", "payload": {"since": 0}})
        await trio.testing.wait_all_tasks_blocked()
        peer.connection.close(1001, "server shutting down", flush=True)
        (reply, *events) = await peer.read(51)
        assert reply["payload"]["replayed"] == 50
        assert [event["seq"] for event in events] == list(range(1, 51))
        (close,) = await peer.read()
        assert close == CloseFrame(1001, "server shutting down")
        await peer.transport.peer_sends(PeerClosed(1001))
        await peer.ended.wait()
    assert peer.closed == CloseInfo(1001, "server shutting down", "server")


async def test_an_overflow_under_disconnect_closes_with_1008_behind_what_was_written(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with connected(room=4, outbox_size=4, overflow_policy=OverflowPolicy.DISCONNECT) as (
        broker,
        peer,
    ):
        await peer.subscribe("t")
        for i in range(20):
            await broker.publish("t", i)
        seen = []
        while True:
            (item,) = await peer.read()
            if isinstance(item, CloseFrame):
                break
            seen.append(item["seq"])
        assert item.code == 1008
        # What reached the wire before the overflow, in order, and nothing stale after it.
        assert seen == list(range(1, len(seen) + 1)) and len(seen) < 20
        await peer.transport.peer_sends(PeerClosed(1008))
        await peer.ended.wait()
    assert peer.closed == CloseInfo(1008, "outbox overflow", "server")


async def test_a_silent_peer_is_pinged_then_closed_at_the_read_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with connected(ping_interval=5, read_timeout=12, close_timeout=1) as (_, peer):
        start = trio.current_time()
        (ping,) = await peer.read()
        assert ping == PingFrame() and trio.current_time() - start == pytest.approx(5)
        (ping,) = await peer.read()
        assert trio.current_time() - start == pytest.approx(10)
        (close,) = await peer.read()
        assert close == CloseFrame(1011, "read timeout")
        assert trio.current_time() - start == pytest.approx(12)
        await peer.ended.wait()  # no answer: closed after close_timeout
        assert trio.current_time() - start == pytest.approx(13)
    assert peer.closed == CloseInfo(1011, "read timeout", "server")


async def test_a_peer_that_hangs_up_is_lost_and_detached(autojump_clock: trio.abc.Clock) -> None:
    async with connected() as (broker, peer):
        await peer.subscribe("t")
        assert broker.statistics().subscriptions == 1
        peer.transport.peer_hangs_up()
        await peer.ended.wait()
        assert broker.statistics().subscriptions == 0
    assert peer.closed == CloseInfo(1006, "connection lost", "client")


@pytest.mark.parametrize(("delay", "writes"), [(0, 3), (0.05, 1)])
async def test_a_write_delay_gathers_events_that_arrive_one_at_a_time(
    autojump_clock: trio.abc.Clock, delay: float, writes: int
) -> None:
    async with connected(write_delay=delay) as (broker, peer):
        await peer.subscribe("t")
        before = peer.transport.writes
        for i in range(3):
            await broker.publish("t", i)  # one at a time, a millisecond apart
            await trio.sleep(0.001)
        events = await peer.read(3)
        assert [event["seq"] for event in events] == [1, 2, 3]
        assert peer.transport.writes - before == writes
