"""The broker on its own: sequencing, history, resume, fan-out and overflow."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from tidings import BrokerError, ErrorCode, OverflowPolicy
from tidings.broker import broker as broker_module
from tidings.broker.broker import Broker, Subscriber
from tidings.broker.namespaces import Namespace, Namespaces
from tidings.broker.outbox import Outbox
from tidings.broker.subscription import as_event
from tidings.protocol.messages import Event, Position


@asynccontextmanager
async def running(
    *, history_size: int = 1000, history_ttl: float = 300.0, **settings: int
) -> AsyncIterator[Broker]:
    default = Namespace(name="", history_size=history_size, history_ttl=history_ttl)
    broker = Broker(namespaces=Namespaces(default), **settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.run)
        yield broker
        nursery.cancel_scope.cancel()


def subscriber(capacity: int = 64, policy: OverflowPolicy = OverflowPolicy.DROP) -> Subscriber:
    return Subscriber(Outbox(capacity, policy), as_event)


def drain(sub: Subscriber) -> list[Event]:
    return list(sub.outbox.take())


async def test_seq_counts_up_per_topic_and_epoch_is_stable() -> None:
    async with running() as broker:
        a1 = await broker.publish("a", 1)
        a2 = await broker.publish("a", 2)
        b1 = await broker.publish("b", 1)
    assert (a1.seq, a2.seq, b1.seq) == (1, 2, 1)
    assert a1.epoch == a2.epoch
    assert a1.epoch != b1.epoch


async def test_fan_out_reaches_every_subscriber_in_order() -> None:
    async with running() as broker:
        subs = [subscriber() for _ in range(3)]
        for sub in subs:
            broker.subscribe(sub, "t")
        for i in range(10):
            await broker.publish("t", i)
    for sub in subs:
        events = drain(sub)
        assert [e.seq for e in events] == list(range(1, 11))
        assert [e.payload for e in events] == list(range(10))


async def test_a_payload_json_cannot_carry_fails_at_the_publisher() -> None:
    async with running() as broker:
        with pytest.raises(TypeError):
            await broker.publish("t", {1, 2})
        assert (await broker.publish("t", "ok")).seq == 1  # no offset was used up


async def test_resume_replays_exactly_what_was_missed() -> None:
    async with running(history_size=100) as broker:
        for i in range(10):
            position = await broker.publish("t", i)
        sub = subscriber()
        result = broker.subscribe(sub, "t", since=6, epoch=position.epoch)
    assert result.recovered is True
    assert [e.seq for e in result.replay.events()] == [7, 8, 9, 10]
    assert result.position.seq == 10


async def test_resume_at_the_head_recovers_with_nothing_to_replay() -> None:
    async with running() as broker:
        position = await broker.publish("t", 0)
        result = broker.subscribe(subscriber(), "t", since=1, epoch=position.epoch)
    assert (result.recovered, result.replay.events()) == (True, [])


@pytest.mark.parametrize(
    ("since", "epoch", "replayed"),
    [
        (2, None, [6, 7, 8, 9, 10]),  # history keeps 5: events 3..5 are gone
        (5, "another-epoch", []),  # another stream: offsets mean nothing here
        (11, None, []),  # an offset from the future
    ],
)
async def test_resume_that_cannot_be_complete_says_so(
    since: int, epoch: str | None, replayed: list[int]
) -> None:
    async with running(history_size=5) as broker:
        for i in range(10):
            await broker.publish("t", i)
        result = broker.subscribe(subscriber(), "t", since=since, epoch=epoch)
    assert result.recovered is False
    assert [e.seq for e in result.replay.events()] == replayed


async def test_history_forgets_events_older_than_its_ttl(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(history_ttl=60) as broker:
        await broker.publish("t", "old")
        await trio.sleep(61)
        position = await broker.publish("t", "new")
        result = broker.subscribe(subscriber(), "t", since=0, epoch=position.epoch)
    assert result.recovered is False
    assert [e.payload for e in result.replay.events()] == ["new"]


async def test_a_forgotten_topic_comes_back_in_its_epoch_within_history_ttl(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A client leaves a topic nothing was published to, which is forgotten as it
    leaves; an event comes while nobody listens. Back within history_ttl, the
    client resumes in the same epoch and gets that event (a new epoch would
    only have said recovered: false)."""
    async with running(history_ttl=10) as broker:
        away = subscriber()
        left = broker.subscribe(away, "t").position
        broker.unsubscribe(away, "t")
        assert broker.position("t") is None  # forgotten: no topic is held for it
        await trio.sleep(5)
        published = await broker.publish("t", "meanwhile")
        assert published == Position(left.seq + 1, left.epoch)
        back = broker.subscribe(subscriber(), "t", since=left.seq, epoch=left.epoch)
        assert back.recovered is True and back.position.epoch == left.epoch
        assert [e.payload for e in back.replay.events()] == ["meanwhile"]
        # Past history_ttl the position is let go: a new stream.
        late = subscriber()
        gone = broker.subscribe(late, "u").position
        broker.unsubscribe(late, "u")
        await trio.sleep(30)
        assert broker.subscribe(subscriber(), "u").position.epoch != gone.epoch


async def test_forgotten_positions_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_module, "MAX_REMEMBERED", 3)
    async with running() as broker:
        sub = subscriber()
        firsts = {}
        for name in "abcde":
            firsts[name] = broker.subscribe(sub, name).position.epoch
            broker.unsubscribe(sub, name)
        assert len(broker._remembered) == 3
        again = {name: broker.subscribe(sub, name).position.epoch for name in "abcde"}
    assert [again[n] == firsts[n] for n in "abcde"] == [False, False, True, True, True]


async def test_idle_topics_are_swept_once_history_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(history_ttl=10) as broker:
        first = await broker.publish("t", 1)
        assert broker.position("t") is not None
        await trio.sleep(30)  # past the ttl and a sweep
        assert broker.position("t") is None
        second = await broker.publish("t", 2)
    assert second.seq == 1
    assert second.epoch != first.epoch  # offsets restarted: a new stream


async def test_full_outbox_drops_for_that_subscriber_only_and_counts() -> None:
    async with running() as broker:
        slow, fast = subscriber(capacity=3), subscriber(capacity=100)
        broker.subscribe(slow, "t")
        broker.subscribe(fast, "t")
        for i in range(10):
            await broker.publish("t", i)
        stats = broker.topic_stats("t")
    assert [e.seq for e in drain(slow)] == [1, 2, 3]
    assert len(drain(fast)) == 10
    assert slow.outbox.dropped == 7
    assert stats is not None
    assert (stats.delivered, stats.dropped) == (13, 7)


async def test_disconnect_policy_closes_the_overflowing_outbox_with_1008() -> None:
    async with running() as broker:
        slow = subscriber(capacity=2, policy=OverflowPolicy.DISCONNECT)
        broker.subscribe(slow, "t")
        for i in range(3):
            await broker.publish("t", i)
    assert slow.outbox.closing is not None
    assert slow.outbox.closing.code == 1008
    assert len(slow.outbox) == 0  # the stale queue is discarded: the close goes out now


async def test_subscription_limits() -> None:
    async with running(max_topics=2) as broker:
        sub = Subscriber(Outbox(8), as_event, max_topics=1)
        broker.subscribe(sub, "a")
        with pytest.raises(BrokerError) as already:
            broker.subscribe(sub, "a")
        with pytest.raises(BrokerError) as too_many:
            broker.subscribe(sub, "b")
        other = subscriber()
        broker.subscribe(other, "b")
        with pytest.raises(BrokerError) as topics:
            broker.subscribe(other, "c")
    assert already.value.code == ErrorCode.ALREADY_SUBSCRIBED
    assert too_many.value.code == ErrorCode.TOO_MANY_SUBSCRIPTIONS
    assert topics.value.code == ErrorCode.TOO_MANY_TOPICS


async def test_detach_removes_every_subscription() -> None:
    async with running(history_size=0) as broker:
        sub = subscriber()
        for topic in ("a", "b", "c"):
            broker.subscribe(sub, topic)
        assert broker.statistics().subscriptions == 3
        broker.detach(sub)
        stats = broker.statistics()
    assert (stats.subscriptions, stats.topics, sub.topics) == (0, 0, set())


async def test_unsubscribe_stops_delivery() -> None:
    async with running() as broker:
        sub = subscriber()
        broker.subscribe(sub, "t")
        await broker.publish("t", 1)
        assert broker.unsubscribe(sub, "t") is True
        assert broker.unsubscribe(sub, "t") is False
        await broker.publish("t", 2)
    assert [e.payload for e in drain(sub)] == [1]


async def test_a_full_inbox_makes_publishers_wait_not_grow_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = Broker(inbox_size=2)  # not running: nothing drains the inbox
    broker.submit_nowait("t", 1)
    broker.submit_nowait("t", 2)
    with pytest.raises(trio.WouldBlock):
        broker.submit_nowait("t", 3)
    with trio.move_on_after(0.1) as scope:
        await broker.submit("t", 3)
    assert scope.cancelled_caught
    assert broker.statistics().inbox_depth == 2
