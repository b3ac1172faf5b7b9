"""The connection as the brief draws it: one nursery per client, and in it a
reader, a writer and a pinger; the writer is the only task that writes to the
client's socket.

An embedding program inspects trio's task tree while real clients are
connected, and records which task made each write to a client's socket.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from tidings.connection.connection import PINGER, READER, WRITER
from tidings.transport import builtin

from .conftest import TEST_TIMEOUT, raw_client, receive, running_server, subscribe, ws_client


def tasks_under(task: trio.lowlevel.Task) -> Iterator[trio.lowlevel.Task]:
    yield task
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            yield from tasks_under(child)


def connection_nurseries() -> list[trio.Nursery]:
    """Every nursery that holds a connection's writer."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    return [
        nursery
        for task in tasks_under(root)
        for nursery in task.child_nurseries
        if any(child.name == WRITER for child in nursery.child_tasks)
    ]


async def test_each_client_is_one_nursery_with_its_reader_writer_and_pinger() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server, ws_client(server) as a, ws_client(server) as b:
            await subscribe(a, "t")
            await subscribe(b, "t")
            nurseries = connection_nurseries()
            assert len(nurseries) == 2  # one per client
            for nursery in nurseries:
                names = sorted(child.name for child in nursery.child_tasks)
                assert names == sorted([READER, WRITER, PINGER])
            # Cancelling one client's nursery ends everything that client owns.
            nurseries[0].cancel_scope.cancel()
            while len(server.clients()) > 1:  # noqa: ASYNC110 - the connection unwinds
                await trio.sleep(0.01)
            assert len(connection_nurseries()) == 1
            assert server.statistics().subscriptions == 1


async def test_only_the_writer_writes_to_a_clients_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replies, events, pongs and pings: every write after the handshake is the writer's."""
    writers: dict[int, set[str]] = {}
    real_write = os.write

    def write(fd: int, data: Any) -> int:
        writers.setdefault(fd, set()).add(trio.lowlevel.current_task().name)
        return real_write(fd, data)

    monkeypatch.setattr(builtin.os, "write", write)
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(ping_interval=0.05, read_timeout=5) as server,
            ws_client(server) as ws,
        ):
            await subscribe(ws, "t")
            await server.publish("t", 1)
            assert (await receive(ws))["payload"] == 1
            await ws.ping(b"are you there")  # the server's pong
            raw = await raw_client(server)
            while (await raw.receive_frame())[0] != 0x9:  # the server's own ping
                pass
            await raw.aclose()
    assert writers, "no write was seen"
    # The handshake's 101 is written by the connection's first task, before the
    # nursery exists; everything after it by the writer.
    for names in writers.values():
        assert names <= {WRITER, builtin.CONNECTION_TASK}, names
        assert WRITER in names
