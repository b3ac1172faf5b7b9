"""examples/dorgu: the dorgu operator's WebSocket server, checked against its seed document.

Every frame is compared field by field with ``seeds/000_4597520d0f026e73.txt``:
exact keys and JSON types, the eventType values, the limits and the CLI.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from examples.dorgu.app import make_config, running, step
from tidings import OverflowPolicy

from .conftest import TEST_TIMEOUT, Disconnects, http_request
from .rawws import RawWebSocket, close_code
from .redis_fixture import free_port

ROOT = Path(__file__).resolve().parent.parent
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
ENVELOPE = {"type", "topic", "requestId", "payload", "timestamp"}

PERSONA = {"namespace": str, "name": str, "appName": str, "type": str, "tier": str,
           "phase": str, "health": str}  # fmt: skip
CLUSTER = {"name": str, "environment": str, "phase": str, "kubernetesVersion": str,
           "platform": str, "nodeCount": int, "applicationCount": int, "addons": list}  # fmt: skip
PERSONA_EVENT = {"eventType": str, "namespace": str, "name": str, "phase": str, "health": str}
CLUSTER_EVENT = {"eventType": str, "name": str, "phase": str, "nodeCount": int,
                 "applicationCount": int}  # fmt: skip
VALIDATION_EVENT = {"namespace": str, "name": str, "passed": bool, "issueCount": int,
                    "severity": str, "issues": list}  # fmt: skip


def types(value: dict[str, Any]) -> dict[str, type]:
    return {key: type(item) for key, item in value.items()}


@asynccontextmanager
async def operator(**overrides: Any) -> AsyncIterator[tuple[Any, Any, str]]:
    """The operator in process, stepped by the test (interval 0)."""
    async with running(make_config(port=0, **overrides), interval=0) as (server, _, script):
        yield server, script, f"ws://127.0.0.1:{server.port}/ws"


async def send(ws: WebSocketConnection, frame: dict[str, Any]) -> None:
    await ws.send_message(orjson.dumps(frame).decode())


async def receive(ws: WebSocketConnection) -> dict[str, Any]:
    return orjson.loads(await ws.get_message())  # type: ignore[no-any-return]


async def call(ws: WebSocketConnection, frame: dict[str, Any]) -> dict[str, Any]:
    await send(ws, {**frame, "timestamp": "2026-03-23T10:00:00Z"})
    reply = await receive(ws)
    assert set(reply) <= ENVELOPE and reply["requestId"] == frame["requestId"], reply
    assert RFC3339.match(reply["timestamp"])
    return reply


# --- the protocol ------------------------------------------------------------------------


async def test_subscribe_and_unsubscribe_confirmations_are_the_seeds() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with operator() as (_, _, url), open_websocket_url(url) as ws:
            for topic in ("personas", "cluster", "deployments", "events"):
                reply = await call(ws, {"type": "subscribe", "topic": topic, "requestId": "s1"})
                assert set(reply) == ENVELOPE
                assert reply["type"] == "response" and reply["topic"] == topic
                assert reply["payload"] == {"status": "subscribed", "topic": topic}
            reply = await call(ws, {"type": "unsubscribe", "topic": "cluster", "requestId": "u1"})
            assert (reply["type"], reply["topic"]) == ("response", "cluster")
            assert reply["payload"] == {"status": "unsubscribed", "topic": "cluster"}
            # Not dorgu's: publishing, acks, unknown topics.
            reply = await call(ws, {"type": "publish", "topic": "personas", "payload": {},
                                    "requestId": "p1"})  # fmt: skip
            assert reply["type"] == "error" and reply["payload"]["code"] == "unknown_type"
            reply = await call(ws, {"type": "subscribe", "topic": "pods", "requestId": "s2"})
            assert reply["type"] == "error" and reply["payload"]["code"] == "unknown_topic"


async def test_the_operator_broadcasts_each_event_type_with_the_seeds_fields() -> None:
    seen: dict[str, set[str]] = {"personas": set(), "cluster": set(), "events": set()}
    with trio.fail_after(TEST_TIMEOUT):
        async with operator() as (server, script, url), open_websocket_url(url) as ws:
            for topic in seen:
                await call(ws, {"type": "subscribe", "topic": topic, "requestId": topic})
            for _ in range(8):  # one round of the simulated operator
                for _ in await step(server, script):
                    frame = await receive(ws)
                    assert set(frame) == {"type", "topic", "payload", "timestamp"}, frame
                    assert frame["type"] == "event" and RFC3339.match(frame["timestamp"])
                    payload = frame["payload"]
                    if frame["topic"] == "personas":
                        assert types(payload) == PERSONA_EVENT
                        seen["personas"].add(payload["eventType"])
                    elif frame["topic"] == "cluster":
                        assert types(payload) == CLUSTER_EVENT
                        seen["cluster"].add(payload["eventType"])
                    else:
                        assert types(payload) == VALIDATION_EVENT
                        assert payload["issueCount"] == len(payload["issues"])
                        assert payload["passed"] is (payload["issueCount"] == 0)
                        seen["events"].add(payload["severity"])
    assert seen["personas"] == {"created", "updated", "deleted"}
    assert seen["cluster"] == {"updated", "nodeAdded", "nodeRemoved"}
    assert "error" in seen["events"]


async def test_requests_are_answered_from_the_changing_store() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with operator() as (server, script, url), open_websocket_url(url) as ws:

            async def personas(payload: dict[str, Any] | None) -> list[dict[str, Any]]:
                frame = {"type": "request", "topic": "personas", "requestId": "r"}
                reply = await call(ws, frame if payload is None else {**frame, "payload": payload})
                assert (reply["type"], reply["topic"]) == ("response", "personas")
                assert list(reply["payload"]) == ["personas"]
                return reply["payload"]["personas"]  # type: ignore[no-any-return]

            everyone = await personas(None)
            assert {p["namespace"] for p in everyone} == {"production", "staging"}
            assert all(types(p) == PERSONA for p in everyone)
            assert await personas({}) == everyone
            production = await personas({"namespace": "production"})
            assert production and {p["namespace"] for p in production} == {"production"}
            assert await personas({"namespace": "nowhere"}) == []
            assert {p["name"]: p["phase"] for p in production}["nginx"] == "Active"
            await step(server, script)  # production/nginx degrades
            production = await personas({"namespace": "production"})
            assert {p["name"]: p["health"] for p in production}["nginx"] == "Unhealthy"

            first = await call(ws, {"type": "request", "topic": "cluster", "requestId": "c1"})
            assert types(first["payload"]) == CLUSTER and first["payload"]["name"] == "my-cluster"
            assert first["payload"]["nodeCount"] == 3
            await step(server, script)  # a node joins
            named = await call(ws, {"type": "request", "topic": "cluster", "requestId": "c2",
                                    "payload": {"name": "my-cluster"}})  # fmt: skip
            assert named["payload"]["nodeCount"] == 4
            other = await call(ws, {"type": "request", "topic": "cluster", "requestId": "c3",
                                    "payload": {"name": "dev-cluster"}})  # fmt: skip
            assert other["payload"]["name"] == "dev-cluster"
            missing = await call(ws, {"type": "request", "topic": "cluster", "requestId": "c4",
                                      "payload": {"name": "nope"}})  # fmt: skip
            assert missing["type"] == "error" and missing["payload"]["code"] == "not_found"


# --- connection management -----------------------------------------------------------------


def test_the_connection_limits_are_the_seeds() -> None:
    config = make_config()
    assert config.max_message_size == 512 * 1024
    assert (config.ping_interval, config.write_timeout, config.read_timeout) == (30, 10, 60)
    assert (config.outbox_size, config.overflow_policy) == (256, OverflowPolicy.DROP)
    assert (config.host, config.port) == ("127.0.0.1", 9090)


async def test_a_message_over_512_kb_closes_with_1009() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with operator() as (_, _, url), open_websocket_url(url) as ws:
            padded = {"type": "subscribe", "topic": "personas", "requestId": "big"}
            text = orjson.dumps({**padded, "pad": ""}).decode()
            pad = "x" * (512 * 1024 - len(text))
            await ws.send_message(text.replace('"pad":""', f'"pad":"{pad}"'))
            assert (await receive(ws))["payload"]["status"] == "subscribed"  # 512 KB exactly: fine
            await ws.send_message("x" * (512 * 1024 + 1))
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason.code == 1009


async def test_a_client_that_stops_reading_loses_events_not_its_connection() -> None:
    blob = "x" * 32_000
    with trio.fail_after(TEST_TIMEOUT):
        async with operator() as (server, _, _):
            disconnects = Disconnects(server)
            stalled = await RawWebSocket.connect("127.0.0.1", server.port, receive_buffer=4096)
            await stalled.send_json({"type": "subscribe", "topic": "events", "requestId": "s"})
            assert (await stalled.receive_json())["type"] == "response"
            while server.statistics().dropped == 0:
                await server.publish("events", {"namespace": "production", "issues": [blob]})
            [client] = server.clients()
            stats = server.client_statistics(client.id)
            assert stats is not None and stats.peak_queued <= 256
            # Still connected: after what was queued, it gets the answer to a new command.
            await stalled.send_json({"type": "unsubscribe", "topic": "events", "requestId": "u"})
            while (frame := await stalled.receive_json()).get("requestId") != "u":
                assert frame["type"] == "event"
            assert disconnects.closed == []
            await stalled.aclose()


async def test_a_silent_client_is_pinged_then_closed_after_the_read_timeout() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with operator(ping_interval=0.1, read_timeout=0.5) as (server, _, _):
            silent = await RawWebSocket.connect("127.0.0.1", server.port)
            frames = []
            while not frames or frames[-1][0] != 8:
                frames.append(await silent.receive_frame())
            *pings, (_, close) = frames
            assert pings and {opcode for opcode, _ in pings} == {9}  # unanswered pings
            assert close_code(close) == 1011  # then the read timeout
            await silent.aclose()


# --- as the README runs it --------------------------------------------------------------


@asynccontextmanager
async def process(*args: str) -> AsyncIterator[tuple[trio.Process, str]]:
    """``python -m examples.dorgu ARGS`` and the first line it prints."""
    command = [sys.executable, "-m", "examples.dorgu", *args]
    proc = await trio.lowlevel.open_process(command, cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            chunk = await proc.stdout.receive_some(1)
            assert chunk, "the operator exited"
            line += chunk
        yield proc, line.decode()
    finally:
        proc.terminate()
        with trio.move_on_after(5):
            await proc.wait()
        proc.kill()


async def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "examples.dorgu", *args]
    return await trio.run_process(command, cwd=ROOT, capture_stdout=True, check=False)


async def test_started_as_the_readme_says_it_serves_and_watch_filters_by_namespace() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with process("--port", "0", "--interval", "0.02") as (_, line):
            url = re.search(r"ws://127\.0\.0\.1:\d+/ws", line)
            assert url is not None, line
            port = int(url[0].split(":")[2].split("/")[0])
            status, _, body = await http_request(port, "GET", "/health")
            assert status == 200 and orjson.loads(body)["status"] == "ok"
            watched = await cli("watch", "personas", "-n", "production", "--url", url[0],
                                "--count", "4")  # fmt: skip
            assert watched.returncode == 0
            lines = watched.stdout.decode().splitlines()
            assert len(lines) == 4 and all(" production/" in line for line in lines), lines
            assert all(line.split()[1] == "personas" for line in lines)
            events = await cli("watch", "events", "-n", "staging", "--url", url[0], "--count", "1")
            assert events.returncode == 0 and " staging/orders " in events.stdout.decode()
            assert "severity=warning" in events.stdout.decode()


async def subscribed(server: Any, topic: str) -> None:
    """Until a client subscribes to ``topic``: a bounded poll (the test's fail_after)."""
    while not getattr(server.broker.topic_stats(topic), "subscribers", 0):  # noqa: ASYNC110
        await trio.sleep(0.01)


async def test_watch_waits_for_the_operator_and_resubscribes_when_it_comes_back() -> None:
    """``watch`` keeps its own loop: tidings' client would not resubscribe a topic whose
    subscribe answer has no position (dorgu's), and it starts slower."""
    with trio.fail_after(TEST_TIMEOUT):
        port = free_port()
        command = [sys.executable, "-m", "examples.dorgu", "watch", "cluster", "--count", "2",
                   "--url", f"ws://127.0.0.1:{port}/ws"]  # fmt: skip
        watcher = await trio.lowlevel.open_process(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        try:
            assert watcher.stdout is not None
            for _ in range(2):  # an operator that starts after the watch, then another one
                async with running(make_config(port=port), interval=0) as (server, store, _):
                    await subscribed(server, "cluster")
                    for topic, payload in store.cluster("nodeAdded", nodeCount=4):
                        await server.publish(topic, payload)
                    line = b""
                    while not line.endswith(b"\n"):
                        line += await watcher.stdout.receive_some(1)
                    assert " cluster  nodeAdded " in line.decode(), line
            assert await watcher.wait() == 0
        finally:
            watcher.kill()


async def test_the_operators_websocket_flags() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with process("--enable-websocket", "--websocket-addr", ":0") as (_, line):
            url = re.search(r"ws://127\.0\.0\.1:\d+/ws", line)
            assert url is not None, line
            async with open_websocket_url(url[0]) as ws:
                reply = await call(ws, {"type": "request", "topic": "cluster", "requestId": "c"})
                assert reply["payload"]["name"] == "my-cluster"
        async with process("--interval", "0.02") as (_, line):
            assert "disabled" in line  # without --enable-websocket the operator serves nothing
