"""``tidings serve --workers N``: processes sharing one port, supervised (issue 14).

Real processes: a supervisor started like any node (``tests/redis_fixture.py``)
with ``--workers 2`` on the test's own redis-server; its workers found through
``/proc``. What a user relies on: both workers serve the port, each is a node of
the cluster; a worker that dies is restarted and its clients resume on the
others with nothing lost; SIGTERM to the supervisor drains every worker (1001 to
each client) and exits 0; a supervisor killed outright leaves no worker behind;
``--workers`` on the memory backplane is refused with the reason.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, HandshakeError

from tidings.cli import main

from .redis_fixture import Node, Nodes, eventually
from .test_cluster import PACE, Follower, Ledger, api_publish, check_delivery

pytestmark = pytest.mark.slow

#: Longest wait for a WebSocket handshake before trying again.
HANDSHAKE_TIMEOUT = 5.0


def workers_of(supervisor: Node) -> list[int]:
    """The pids of a supervisor's worker processes, now."""
    assert supervisor.process is not None
    # Trio starts processes from a worker thread: they are that thread's children.
    children: list[int] = []
    for task in Path(f"/proc/{supervisor.process.pid}/task").glob("*"):
        with contextlib.suppress(FileNotFoundError):
            children += [int(child) for child in (task / "children").read_text().split()]
    return sorted(children)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


async def both_workers_announced(node: Node, name: str) -> None:
    await eventually(
        lambda: node.call("info"),
        lambda info: sorted(n["node"] for n in info["nodes"]) == [f"{name}-w1", f"{name}-w2"],
    )


async def both_serving(node: Node, within: float = 15.0) -> None:
    """Until /health, over new connections, has answered from both workers.

    Only a live worker answers, so after a kill this waits for the replacement
    to listen. The kernel picks the worker per connection: a few tries do it.
    """
    answered: set[str] = set()
    with trio.move_on_after(within):
        while len(answered) < 2:
            with contextlib.suppress(OSError, trio.BrokenResourceError, ValueError):
                answered.add((await node.health())["node"])
    assert answered == {"w-w1", "w-w2"}, answered


async def keep_following(follower: Follower, node: Node, nursery: trio.Nursery) -> None:
    """Whenever the worker under a follower dies, resume where it was.

    Stops at a close the server initiated (1001 on shutdown): that one is checked.
    """
    while True:
        await follower.wait(lambda f: f.closed is not None)
        if follower.closed.code != 1006:
            return
        seq, epoch = follower.position
        reply: dict[str, Any] | None = None
        while reply is None:
            # A connection the dying worker had accepted ends without an answer
            # to the handshake, and trio-websocket 0.12 then waits for it
            # forever: bounded here, as tidings.client bounds it.
            with (
                trio.move_on_after(HANDSHAKE_TIMEOUT),
                contextlib.suppress(OSError, HandshakeError, ConnectionClosed),
            ):
                reply = await follower.follow(nursery, node, since=seq, epoch=epoch)
            if reply is None:
                await trio.sleep(0.05)
        assert reply["recovered"] is True, (follower.name, reply)


async def test_workers_serve_one_port_and_clients_resume_when_a_worker_dies(
    tidings_nodes: Nodes,
) -> None:
    with trio.fail_after(60):
        node = await tidings_nodes.start("w", "--workers", "2")
        await both_workers_announced(node, "w")
        first = workers_of(node)
        assert len(first) == 2, first
        # Both listen on the one port: new connections reach either (and /health
        # answers for the one it reached).
        await both_serving(node)

        ledger = Ledger()
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            followers = [Follower(f"f{k}", "jobs") for k in range(8)]
            for follower in followers:
                await follower.follow(nursery, node)
            async with trio.open_nursery() as following:
                for follower in followers:
                    following.start_soon(keep_following, follower, node, nursery)

                async def publisher() -> None:
                    i = 0
                    while not stop.is_set():
                        # If its worker dies under it: no answer, maybe published.
                        with contextlib.suppress(OSError, trio.BrokenResourceError, IndexError):
                            await api_publish(node, ledger, "jobs", f"p-{i}")
                        i += 1
                        await trio.sleep(PACE)

                async with trio.open_nursery() as publishing:
                    publishing.start_soon(publisher)
                    await ledger.wait(lambda led: len(led.acked) >= 10)
                    # Kill one worker, wait for its replacement, then kill the other:
                    # every follower loses its worker at least once, whichever it was on.
                    for victim in first:
                        os.kill(victim, signal.SIGKILL)
                        await eventually(
                            lambda: trio.to_thread.run_sync(workers_of, node),
                            lambda pids, victim=victim: len(pids) == 2 and victim not in pids,
                        )
                        await both_serving(node)
                        done = len(ledger.acked)
                        await ledger.wait(lambda led, done=done: len(led.acked) >= done + 10)
                    stop.set()
                for follower in followers:
                    await follower.wait(
                        lambda f: {e["payload"]["key"] for e in f.events} >= set(ledger.acked)
                    )
                    await follower.settle()
                    check_delivery(follower, ledger, may_also=frozenset(ledger.unanswered))
                assert not ledger.other, ledger.other
                assert not ledger.refused, ledger.refused

                # SIGTERM to the supervisor drains every worker: 1001 to every client.
                second = workers_of(node)
                assert node.process is not None
                node.process.send_signal(signal.SIGTERM)
                assert await node.process.wait() == 0
            assert all(follower.closed.code == 1001 for follower in followers), [
                (follower.name, follower.closed) for follower in followers
            ]
            assert not any(alive(pid) for pid in second)
            log = node.log()
            assert log.count("restarting in") == 2, log
            nursery.cancel_scope.cancel()


async def test_workers_of_a_killed_supervisor_stop_too(tidings_nodes: Nodes) -> None:
    with trio.fail_after(30):
        node = await tidings_nodes.start("w", "--workers", "2")
        await both_workers_announced(node, "w")
        pids = workers_of(node)
        assert len(pids) == 2, pids
        await node.kill()  # SIGKILL: the supervisor cannot forward anything
        await eventually(
            lambda: trio.to_thread.run_sync(lambda: [pid for pid in pids if alive(pid)]),
            lambda left: not left,
        )


def test_workers_need_a_redis_backplane(capsys: Any) -> None:
    assert main(["serve", "--workers", "2", "--port", "0"]) == 2
    error = capsys.readouterr().err
    assert "workers > 1 needs a Redis backplane" in error, error
