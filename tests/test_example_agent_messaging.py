"""The agent messaging example (seed 004), end to end over real sockets on 127.0.0.1.

Field lists below are the seed's Go structs (json tags; omitempty fields are
left out when empty), written from the seed document.
"""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
)

from examples.agent_messaging import AgentMessaging
from examples.agent_messaging.__main__ import build, options
from examples.agent_messaging.demo import THREAD, run_demo
from tidings import Server

from .rawws import Closed, RawWebSocket

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10
MESSAGE = ["id", "thread_id", "message_seq", "created_at", "from_type", "from_id", "to_type",
           "to_id", "kind", "content"]  # fmt: skip
TELEMETRY = ["instance_id", "pid", "turns", "tokens_in", "tokens_out", "cost", "status",
             "duration_sec"]  # fmt: skip
INBOX = ["id", "message_id", "from_agent", "to_inbox", "message_type", "title", "status",
         "created_at"]  # fmt: skip
STREAM_TYPES = ["turn_start", "text", "tool_use", "tool_result", "turn_end", "error", "status"]
AGENT_INSERT = """
INSERT INTO messages (id, thread_id, message_seq, created_at, from_type, from_id, to_type,
    to_id, kind, content)
VALUES (?, ?, (SELECT COALESCE(MAX(message_seq), 0) + 1 FROM messages WHERE thread_id = ?),
    ?, 'agent', 'coder', 'user', 'u1', 'chat', ?)
"""


@asynccontextmanager
async def agent_server(*flags: str) -> AsyncIterator[tuple[AgentMessaging, Server]]:
    app, config = build(options(["--port", "0", "--poll-interval", "0.05", *flags]))
    async with app.running(config) as server:
        yield app, server


def client(server: Server, query: str = "", **kwargs: Any) -> Any:
    return open_websocket_url(f"ws://127.0.0.1:{server.port}/ws{query}", **kwargs)


async def send(ws: WebSocketConnection, kind: str, data: Any = None) -> None:
    frame: dict[str, Any] = {"type": kind, "timestamp": int(time.time() * 1000)}
    if data is not None:
        frame["data"] = data
    await ws.send_message(orjson.dumps(frame).decode())


async def receive(ws: WebSocketConnection, kind: str | None = None) -> dict[str, Any]:
    """The next frame; checks the envelope: type, a unix-ms timestamp, data."""
    frame: dict[str, Any] = orjson.loads(await ws.get_message())
    assert set(frame) <= {"type", "timestamp", "data"}
    assert abs(frame["timestamp"] - time.time() * 1000) < 5000
    if kind is not None:
        assert frame["type"] == kind, frame
    return frame


def chat(thread: str, content: str, **extra: Any) -> dict[str, Any]:
    return {
        "thread_id": thread, "from_type": "agent", "from_id": "coder", "to_type": "user",
        "to_id": "u1", "kind": "chat", "content": content, **extra,
    }  # fmt: skip


async def post(app: AgentMessaging, thread: str, count: int) -> None:
    for i in range(count):
        await app.post(chat(thread, f"m{i}"))


def seqs(messages: list[dict[str, Any]]) -> list[int]:
    return [m["message_seq"] for m in messages]


async def test_catch_up_in_batches_of_50_then_live_messages() -> None:
    with trio.fail_after(TIMEOUT):
        async with agent_server() as (app, server), client(server) as ws, client(server) as poster:
            await post(app, "t1", 120)
            await send(ws, "subscribe", {"thread_id": "t1", "from_seq": 0})
            batches = [(await receive(ws, "batch"))["data"] for _ in range(3)]
            assert [len(b["messages"]) for b in batches] == [50, 50, 20]
            assert [b["has_more"] for b in batches] == [True, True, False]
            assert all(set(b) == {"thread_id", "messages", "has_more"} for b in batches)
            assert seqs([m for b in batches for m in b["messages"]]) == list(range(1, 121))
            first = batches[0]["messages"][0]
            assert list(first) == MESSAGE  # no subject/metadata_json: omitempty
            assert first["thread_id"] == "t1" and first["content"] == "m0"
            assert abs(first["created_at"] - time.time() * 1000) < 5000
            state = (await receive(ws, "thread_state"))["data"]
            assert list(state) == ["thread_id", "status", "last_seq", "updated_at"]
            assert state["status"] == "live" and state["last_seq"] == 120
            # Live: messages posted by another client arrive one by one, in order.
            for i in range(3):
                extra = {"subject": "s", "metadata_json": '{"a":1}'} if i == 0 else {}
                await send(poster, "message", chat("t1", f"live{i}", **extra))
            live = [(await receive(ws, "message"))["data"] for _ in range(3)]
            assert seqs(live) == [121, 122, 123]
            assert list(live[0]) == [*MESSAGE[:9], "subject", "content", "metadata_json"]
            assert list(live[1]) == MESSAGE and live[1]["content"] == "live1"
            assert len(live[0]["id"]) == 32


async def test_resume_from_a_seq_and_no_gap_or_duplicate_while_catching_up() -> None:
    with trio.fail_after(TIMEOUT):
        async with agent_server() as (app, server), client(server) as ws:
            await post(app, "t2", 120)
            await send(ws, "subscribe", {"thread_id": "t2", "from_seq": 115})
            batch = (await receive(ws, "batch"))["data"]
            assert seqs(batch["messages"]) == [116, 117, 118, 119, 120]
            assert not batch["has_more"]
            assert (await receive(ws, "thread_state"))["data"]["last_seq"] == 120
            # Resubscribing from 0 while messages keep coming: each seq once, in order.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(post, app, "t2", 200)
                await send(ws, "subscribe", {"thread_id": "t2", "from_seq": 0})
                got: list[int] = []
                while len(got) < 320:
                    frame = await receive(ws)
                    if frame["type"] == "batch":
                        got += seqs(frame["data"]["messages"])
                    elif frame["type"] == "message":
                        got.append(frame["data"]["message_seq"])
                assert got == list(range(1, 321))


async def test_ack_window_pauses_a_subscriber_and_an_ack_resumes_it() -> None:
    with trio.fail_after(TIMEOUT):
        async with agent_server("--max-lag", "5") as (app, server), client(server) as ws:
            await post(app, "t3", 3)
            await send(ws, "subscribe", {"thread_id": "t3", "from_seq": 0})
            assert seqs((await receive(ws, "batch"))["data"]["messages"]) == [1, 2, 3]
            assert (await receive(ws, "thread_state"))["data"]["status"] == "live"
            await post(app, "t3", 4)  # seqs 4..7; only 5 may be unacknowledged
            assert [(await receive(ws, "message"))["data"]["message_seq"] for _ in "ab"] == [4, 5]
            paused = (await receive(ws, "thread_state"))["data"]
            assert (paused["status"], paused["last_seq"]) == ("paused", 5)  # the last sent
            await send(ws, "ack", {"thread_id": "t3", "ack_seq": 5})
            batch = (await receive(ws, "batch"))["data"]
            assert seqs(batch["messages"]) == [6, 7] and not batch["has_more"]
            live = (await receive(ws, "thread_state"))["data"]
            assert (live["status"], live["last_seq"]) == ("live", 7)
            await send(ws, "ack", {"thread_id": "nope", "ack_seq": 1})
            error = await receive(ws, "error")
            assert error["data"]["code"] == "not_subscribed"
            assert list(error["data"]) == ["code", "message"]


async def test_a_row_an_agent_writes_into_sqlite_reaches_the_subscriber(tmp_path: Path) -> None:
    db = str(tmp_path / "messages.db")
    with trio.fail_after(TIMEOUT):
        async with agent_server("--db", db) as (app, server), client(server) as ws:
            await post(app, "t4", 2)
            await send(ws, "subscribe", {"thread_id": "t4", "from_seq": 2})
            assert (await receive(ws, "thread_state"))["data"]["last_seq"] == 2
            agent = sqlite3.connect(db, isolation_level=None)  # another connection, as an agent
            agent.execute(AGENT_INSERT, ("row-1", "t4", "t4", 1, "from the agent"))
            agent.execute(AGENT_INSERT, ("row-2", "t4", "t4", "soon", 5))  # sloppy types
            agent.close()
            message = (await receive(ws, "message"))["data"]  # found by the bounded poll
            assert (message["id"], message["message_seq"]) == ("row-1", 3)
            assert message["content"] == "from the agent" and message["created_at"] == 1
            sloppy = (await receive(ws, "message"))["data"]  # read with the seed's types
            assert (sloppy["message_seq"], sloppy["created_at"], sloppy["content"]) == (4, 0, "5")


async def test_telemetry_inbox_and_every_task_stream_type_go_to_every_client() -> None:
    telemetry = dict(zip(TELEMETRY, ["i-1", 42, 3, 100, 200, 0.25, "running", 9], strict=True))
    inbox = {
        "id": "1", "message_id": "m", "correlation_id": "c", "from_agent": "a", "to_inbox": "b",
        "message_type": "request", "title": "T", "payload": "{}", "status": "unread",
        "created_at": 17, "unknown": "dropped",
    }  # fmt: skip
    with trio.fail_after(TIMEOUT):
        async with agent_server() as (app, server), client(server) as a, client(server) as b:
            # Each step is received by both before the next, which another client may send.
            await send(a, "telemetry", telemetry)
            await send(a, "telemetry", {"instance_id": "i-2"})
            for ws in (a, b):
                assert (await receive(ws, "telemetry"))["data"] == telemetry
                zeros = (await receive(ws, "telemetry"))["data"]
                assert zeros == dict.fromkeys(TELEMETRY, 0) | {"instance_id": "i-2", "status": ""}
            await send(b, "inbox_message", inbox)
            for ws in (a, b):
                got = (await receive(ws, "inbox_message"))["data"]
                assert list(got) == [*INBOX[:2], "correlation_id", *INBOX[2:6], "payload",
                                     *INBOX[6:]]  # fmt: skip
                assert got == {k: v for k, v in inbox.items() if k != "unknown"}
            for stream_type in STREAM_TYPES:
                await app.broadcast("task_stream", {"task_id": "k", "stream_type": stream_type})
            full = {"task_id": "k", "thread_id": "t", "stream_type": "tool_use", "turn_num": 2,
                    "text": "x", "tool_name": "bash", "tool_input": "ls", "tool_output": "a",
                    "error_msg": "e", "status": "running", "tokens_in": 1, "tokens_out": 2,
                    "cost": 0.5, "duration_sec": 3, "workspace": "/w", "directive": "d",
                    "directive_full": "dd", "agent_id": "design-doc-creator",
                    "source_type": "coordinator"}  # fmt: skip
            await app.broadcast("task_stream", full)
            for ws in (a, b):
                for stream_type in STREAM_TYPES:
                    event = (await receive(ws, "task_stream"))["data"]
                    assert event == {"task_id": "k", "stream_type": stream_type}
                last = (await receive(ws, "task_stream"))["data"]
                assert list(last.items()) == list(full.items())
            await send(b, "task_stream", {"task_id": "k", "stream_type": "dance"})
            assert (await receive(b, "error"))["data"]["code"] == "invalid_field"


async def test_100_messages_a_second_then_throttled() -> None:
    with trio.fail_after(TIMEOUT):
        async with agent_server() as (_, server), client(server) as ws:
            for _ in range(200):
                await send(ws, "ping")
            replies = [await receive(ws) for _ in range(200)]
            pongs = [r for r in replies if r["type"] == "pong"]
            errors = [r["data"] for r in replies if r["type"] == "error"]
            assert len(pongs) + len(errors) == 200
            assert 100 <= len(pongs) < 200 and {e["code"] for e in errors} == {"rate_limited"}
            assert all(set(p) == {"type", "timestamp"} for p in pongs)  # pong carries no data


async def test_messages_up_to_10_kb_and_1009_beyond() -> None:
    with trio.fail_after(TIMEOUT):
        async with agent_server() as (_, server), client(server) as ws:
            await send(ws, "subscribe", {"thread_id": "big", "from_seq": 0})
            await receive(ws, "thread_state")
            await send(ws, "message", chat("big", "x" * 9000))
            assert len((await receive(ws, "message"))["data"]["content"]) == 9000
            await ws.send_message("x" * (10 * 1024 + 1))
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason.code == 1009


async def test_token_refused_without_it_accepted_with_it() -> None:
    with trio.fail_after(TIMEOUT):
        async with agent_server("--token", "s3cret") as (_, server):
            for query in ("", "?token=wrong"):
                with pytest.raises(ConnectionRejected) as refused:
                    async with client(server, query):
                        pass
                assert refused.value.status_code == 401
            headers = [("Authorization", "Bearer s3cret")]
            async with client(server, extra_headers=headers) as ws, client(server, "?token=s3cret"):
                await send(ws, "ping")
                await receive(ws, "pong")


async def test_errors_are_error_events() -> None:
    with trio.fail_after(TIMEOUT):
        async with agent_server() as (_, server), client(server) as ws:
            await send(ws, "subscribe", {"from_seq": 0})
            await send(ws, "subscribe", {"thread_id": "t", "from_seq": -1})
            await send(ws, "dance")
            await ws.send_message("{not json")
            codes = [(await receive(ws, "error"))["data"]["code"] for _ in range(4)]
            assert codes == ["invalid_field", "invalid_field", "unknown_type", "invalid_json"]


async def test_pings_on_schedule_and_a_silent_client_is_closed() -> None:
    with trio.fail_after(TIMEOUT):
        async with agent_server("--ping-interval", "0.2", "--pong-wait", "0.6") as (_, server):
            raw = await RawWebSocket.connect("127.0.0.1", server.port)
            try:
                opcode, _ = await raw.receive_frame()
                assert opcode == 9  # a WebSocket ping; this client never answers
                with pytest.raises((Closed, EOFError)):
                    while True:
                        await raw.receive_json()
            finally:
                await raw.aclose()


async def test_a_client_that_stops_reading_is_closed_with_1008() -> None:
    with trio.fail_after(TIMEOUT):
        async with agent_server("--max-lag", "10", "--write-wait", "30") as (app, server):
            stalled = await RawWebSocket.connect("127.0.0.1", server.port, receive_buffer=4096)
            try:
                while server.statistics().dropped == 0:  # until its queue of 74 frames is full
                    await app.broadcast("telemetry", {"instance_id": "x" * 32_000})
                assert await stalled.receive_close() == 1008
            finally:
                await stalled.aclose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
async def test_started_as_the_readme_says_with_an_agent_writing_to_its_file(
    tmp_path: Path,
) -> None:
    db, port = str(tmp_path / "agents.db"), free_port()
    command = [sys.executable, "-m", "examples.agent_messaging", "--port", str(port)]
    command += ["--token", "T0K", "--db", db, "--poll-interval", "0.1", "--no-demo"]
    process = await trio.lowlevel.open_process(command, cwd=ROOT, stdout=subprocess.PIPE)
    try:
        with trio.fail_after(TIMEOUT):
            assert process.stdout is not None
            line = b""
            while not line.endswith(b"\n"):  # it prints its URL once it listens
                line += await process.stdout.receive_some(1)
            assert f"ws://127.0.0.1:{port}/ws" in line.decode()
            url = f"ws://127.0.0.1:{port}/ws"
            with pytest.raises(ConnectionRejected):
                async with open_websocket_url(url):
                    pass
            async with open_websocket_url(f"{url}?token=T0K") as ws:
                await send(ws, "subscribe", {"thread_id": "ops", "from_seq": 0})
                assert (await receive(ws, "thread_state"))["data"]["last_seq"] == 0
                agent = sqlite3.connect(db, isolation_level=None)  # another process writes
                agent.execute(AGENT_INSERT, (uuid.uuid4().hex, "ops", "ops", 5, "deployed"))
                agent.close()
                message = (await receive(ws, "message"))["data"]
                assert (message["message_seq"], message["content"]) == (1, "deployed")
    finally:
        process.terminate()
        with trio.move_on_after(5):
            await process.wait()


async def test_the_demo_shows_every_kind_of_traffic() -> None:
    """Simulated agents: thread messages (posted, and written into the store), then
    telemetry, inbox messages and every task-stream type to every client."""
    kinds = {"batch", "message", "thread_state", "telemetry", "inbox_message", "task_stream"}
    authors = {"newcomer", "coordinator", "design-doc-creator", "code-reviewer"}
    seen: set[str] = set()
    streams: set[str] = set()
    wrote: set[str] = set()
    sent = 0
    with trio.fail_after(TIMEOUT):
        async with (
            agent_server() as (app, server),
            client(server) as ws,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(run_demo, app, 0.001)
            await send(ws, "subscribe", {"thread_id": THREAD, "from_seq": 0})
            while not (kinds <= seen and set(STREAM_TYPES) <= streams and authors <= wrote):
                frame = await receive(ws)
                seen.add(frame["type"])
                data = frame["data"]
                messages = (
                    data.get("messages", [data]) if frame["type"] in {"batch", "message"} else []
                )
                for message in messages:  # in order, each seq once
                    assert message["message_seq"] == sent + 1
                    sent = message["message_seq"]
                    wrote.add(message["from_id"])
                if frame["type"] == "task_stream":
                    streams.add(data["stream_type"])
                if messages:
                    await send(ws, "ack", {"thread_id": THREAD, "ack_seq": sent})
            nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_a_newcomer_starts_it_and_watches_the_demo() -> None:
    port = free_port()
    server = [sys.executable, "-m", "examples.agent_messaging", "--port", str(port)]
    server += ["--demo-interval", "0.02"]
    process = await trio.lowlevel.open_process(server, cwd=ROOT, stdout=subprocess.PIPE)
    watcher: trio.Process | None = None
    try:
        with trio.fail_after(TIMEOUT):
            assert process.stdout is not None
            said = b""
            while b"examples.agent_messaging watch" not in said:  # it says how to watch
                said += await process.stdout.receive_some(65536)
            command = [sys.executable, "-m", "examples.agent_messaging", "watch"]
            command += ["--url", f"ws://127.0.0.1:{port}/ws"]
            watcher = await trio.lowlevel.open_process(command, cwd=ROOT, stdout=subprocess.PIPE)
            assert watcher.stdout is not None
            shown, lines = set(), b""
            wanted = {"thread_state", "message", "telemetry", "inbox_message", "task_stream"}
            while not wanted <= shown:
                lines += await watcher.stdout.receive_some(65536)
                *complete, lines = lines.split(b"\n")
                shown |= {line.split()[1].decode() for line in complete if line.strip()} - {"batch"}
    finally:
        for child in (watcher, process):
            if child is not None:
                child.terminate()
                with trio.move_on_after(5):
                    await child.wait()
