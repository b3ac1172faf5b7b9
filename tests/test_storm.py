"""A reconnect storm (issue 14): a node dies under 300 clients, who all resume on another at once.

Real ``redis-server``, real ``tidings serve`` nodes (``tests/redis_fixture.py``),
clients over real sockets with trio-websocket. ``bench/storm.py`` measures the
same at 10,000 clients with the Go load generator; this checks what it must
never get wrong at a size that runs in seconds: every client is answered
``recovered: true`` in the epoch it knew, and its stream goes on across the
move with no gap and no duplicate, every acknowledged event once.

Every client comes from 127.0.0.1, so the nodes run without the per-address
cap on pending handshakes (``--max-pending-handshakes-per-ip 0``): with its
default (256), a herd from one address has some of its connections closed at
once, which is that limit doing its job, not what is tested here
(``bench/storm.py`` counts those refusals).

Nothing sleeps to synchronise: the test waits on frames and answers; the only
sleep paces the publisher.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import trio

from .redis_fixture import Node, Nodes
from .test_cluster import PACE, Follower, Ledger, api_publish, check_delivery, start_nodes

pytestmark = pytest.mark.slow

CLIENTS = 300
TOPICS = 10


class Count:
    """How many publications were made; a test can wait for a number."""

    def __init__(self) -> None:
        self.value = 0
        self._changed = trio.Event()

    def add(self) -> None:
        self.value += 1
        self._changed.set()
        self._changed = trio.Event()

    async def reach(self, value: int) -> None:
        while self.value < value:
            await self._changed.wait()


async def test_a_storm_of_clients_of_a_killed_node_all_resume_on_another_with_nothing_lost(
    tidings_nodes: Nodes,
) -> None:
    with trio.fail_after(60):
        a, b = await start_nodes(tidings_nodes, ["a", "b"], "--max-pending-handshakes-per-ip", "0")
        topics = [f"storm{k}" for k in range(TOPICS)]
        ledgers = {topic: Ledger() for topic in topics}
        published = Count()
        stop, stopped = trio.Event(), trio.Event()

        async def publisher(node: Node) -> None:
            """Publishes round-robin over the topics through ``node``'s API until ``stop``."""
            try:
                while not stop.is_set():
                    topic = topics[published.value % TOPICS]
                    await api_publish(node, ledgers[topic], topic, f"{topic}/{published.value}")
                    published.add()
                    await trio.sleep(PACE)
            finally:
                stopped.set()

        async with trio.open_nursery() as nursery:
            followers = [Follower(f"c{k}", topics[k % TOPICS]) for k in range(CLIENTS)]
            replies: dict[str, dict[str, Any]] = {}

            async def follow(follower: Follower, node: Node, **resume: Any) -> None:
                replies[follower.name] = await follower.follow(nursery, node, **resume)

            async with trio.open_nursery() as connecting:
                for follower in followers:
                    connecting.start_soon(follow, follower, a)
            nursery.start_soon(publisher, b)
            for follower in followers:  # every client is in the stream on a
                await follower.wait_events(2)

            await a.kill()
            for follower in followers:
                await follower.wait(lambda f: f.closed is not None)
            # Events go on while they are away: each must come back from history.
            await published.reach(published.value + 2 * TOPICS)
            positions = {follower.name: follower.position for follower in followers}
            replies.clear()
            async with trio.open_nursery() as storm:  # all at once: the thundering herd
                for follower in followers:
                    seq, epoch = positions[follower.name]
                    storm.start_soon(partial(follow, follower, b, since=seq, epoch=epoch))

            assert len(replies) == CLIENTS
            for follower in followers:
                reply = replies[follower.name]
                seq, epoch = positions[follower.name]
                assert reply["recovered"] is True, (follower.name, reply)
                assert reply["epoch"] == epoch, (follower.name, reply)
                assert reply["replayed"] == reply["seq"] - seq >= 2, (follower.name, seq, reply)

            # Live events after the storm, then every follower has every event once.
            await published.reach(published.value + 2 * TOPICS)
            stop.set()
            await stopped.wait()
            for topic, ledger in ledgers.items():
                assert not ledger.refused and not ledger.other, (
                    topic,
                    ledger.refused,
                    ledger.other,
                )
                assert not ledger.unanswered, (topic, ledger.unanswered)
            for follower in followers:
                ledger = ledgers[follower.topic]
                await follower.wait(
                    lambda f, ledger=ledger: (
                        {e["payload"]["key"] for e in f.events} >= set(ledger.acked)
                    )
                )
                await follower.settle()
                check_delivery(follower, ledger)
                seqs = follower.seqs()
                assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), (follower.name, seqs)
                assert len({e["epoch"] for e in follower.events}) == 1, follower.name
            assert (await b.health())["status"] == "ok"
            nursery.cancel_scope.cancel()
