"""The Aurora chatbot example (seed 001), end to end over real sockets."""

from __future__ import annotations

import os
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
from trio_websocket import HandshakeError, WebSocketConnection, open_websocket_url

from examples.aurora.app import RATE_LIMIT_TEXT, TIMEOUT_TEXT, Aurora, open_aurora

from .browser import Browser, in_thread
from .conftest import TEST_TIMEOUT, http_request
from .tcpproxy import switching_proxy

ROOT = Path(__file__).resolve().parent.parent
SID = "550e8400-e29b-41d4-a716-446655440000"
START = {"type": "status", "data": {"status": "START"}}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


@asynccontextmanager
async def aurora(**options: Any) -> AsyncIterator[Aurora]:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_aurora(0, **{"chunk_delay": 0.001, **options}) as app:
            yield app


@asynccontextmanager
async def chat(app: Aurora) -> AsyncIterator[WebSocketConnection]:
    """A chat socket at the root path, past its START status and ``init``."""
    async with open_websocket_url(f"ws://127.0.0.1:{app.server.port}") as ws:
        assert await receive(ws) == START
        await send(ws, {"type": "init", "user_id": "user_abc123"})
        yield ws


async def send(ws: WebSocketConnection, message: dict[str, Any]) -> None:
    await ws.send_message(orjson.dumps(message).decode())


async def receive(ws: WebSocketConnection) -> dict[str, Any]:
    return orjson.loads(await ws.get_message())  # type: ignore[no-any-return]


async def until(ws: WebSocketConnection, kind: str, seen: list[dict[str, Any]]) -> dict[str, Any]:
    """Receive into ``seen`` up to the first frame of ``kind`` (or status ``kind``)."""
    while True:
        frame = await receive(ws)
        seen.append(frame)
        if kind in (frame["type"], frame["data"].get("status")):
            return frame


async def query(ws: WebSocketConnection, text: str = "Deploy my application to GKE") -> None:
    await send(
        ws,
        {
            "query": text,
            "user_id": "user_abc123",
            "session_id": SID,
            "mode": "agent",
            "model": "anthropic/claude-3.5-sonnet",
            "provider_preference": ["gcp"],
        },
    )


async def answer(ws: WebSocketConnection, request: dict[str, Any], approved: bool) -> None:
    await send(
        ws,
        {
            "type": "confirmation_response",
            "approved": approved,
            "user_id": "user_abc123",
            "confirmation_id": request["data"]["confirmation_id"],
            "session_id": SID,
        },
    )


def text_of(frames: list[dict[str, Any]]) -> str:
    return "".join(f["data"]["text"] for f in frames if f["type"] == "message")


def check_shapes(frames: list[dict[str, Any]]) -> None:
    """Every frame field by field, as the seed documents it."""
    for frame in frames:
        kind, data = frame["type"], frame["data"]
        if kind == "tool_result":  # the seed puts session_id inside data here
            assert set(frame) == {"type", "data"}
            assert set(data) == {"tool_name", "result", "session_id"} and data["session_id"] == SID
            assert data["result"]["success"] is True
            continue
        assert set(frame) == {"type", "data", "session_id"} and frame["session_id"] == SID
        if kind == "status":
            assert data in ({"status": "START"}, {"status": "END"})
        elif kind == "message":
            assert set(data) == {"text", "is_chunk", "is_complete", "streaming"}
            assert data["is_chunk"] is True and data["streaming"] is not data["is_complete"]
        elif kind == "tool_call":
            assert set(data) == {"tool_name", "input", "status", "timestamp", "tool_call_id"}
            assert data["status"] == "running" and TIMESTAMP.match(data["timestamp"])
            assert isinstance(data["input"], dict) and data["tool_call_id"].startswith("call_")
        elif kind == "tool_output":
            assert {"tool_name", "output", "is_chunk", "tool_call_id"} <= set(data)
            assert data["is_chunk"] is True and isinstance(data["output"], str)
        elif kind == "confirmation_request":
            assert set(data) == {
                "confirmation_id",
                "action",
                "details",
                "risk_level",
                "estimated_cost",
            }
            assert data["action"] == "create_gke_cluster" and data["risk_level"] == "medium"
            assert data["details"] == {
                "cluster_name": "my-cluster",
                "region": "us-central1",
                "node_count": 3,
                "machine_type": "e2-medium",
            }
            assert data["estimated_cost"] == "$150/month"
        else:
            assert kind == "usage_info" and set(data) == {"total_cost"}
            assert isinstance(data["total_cost"], float)


def kinds(frames: list[dict[str, Any]]) -> list[str]:
    """Frame types with consecutive repeats folded (chunks are one streaming step)."""
    folded: list[str] = []
    for frame in frames:
        kind = frame["data"]["status"] if frame["type"] == "status" else frame["type"]
        if not folded or folded[-1] != kind:
            folded.append(kind)
    return folded


async def test_an_approved_workflow_streams_every_documented_frame() -> None:
    async with aurora() as app, chat(app) as ws:
        await query(ws)
        seen: list[dict[str, Any]] = []
        request = await until(ws, "confirmation_request", seen)
        await answer(ws, request, approved=True)
        await until(ws, "END", seen)
    check_shapes(seen)
    assert kinds(seen) == [
        "START",
        "message",
        "tool_call",
        "tool_output",
        "tool_result",
        "message",
        "confirmation_request",
        "tool_call",
        "tool_output",
        "tool_result",
        "message",
        "usage_info",
        "END",
    ]
    calls = [f["data"] for f in seen if f["type"] == "tool_call"]
    assert calls[0]["tool_name"] == "kubectl_get"
    assert calls[0]["input"] == {"resource": "pods", "namespace": "default"}
    outputs = [f["data"] for f in seen if f["type"] == "tool_output"]
    assert outputs[0]["tool_call_id"] == calls[0]["tool_call_id"]
    assert "".join(o["output"] for o in outputs[:2]) == (
        "NAME                    READY   STATUS\napi-deployment-abc123   1/1     Running\n"
    )
    pods = next(f for f in seen if f["type"] == "tool_result")["data"]["result"]["pods"]
    assert pods == [{"name": "api-deployment-abc123", "status": "Running"}]
    assert "Deploy my application to GKE" in text_of(seen)
    assert text_of(seen).endswith("Done: my-cluster is being created in us-central1.")
    assert [f for f in seen if f["type"] == "message"][-1]["data"]["is_complete"] is True


async def test_a_rejected_change_aborts_politely_then_ends() -> None:
    async with aurora() as app, chat(app) as ws:
        await query(ws)
        seen: list[dict[str, Any]] = []
        request = await until(ws, "confirmation_request", seen)
        after: list[dict[str, Any]] = []
        await answer(ws, request, approved=False)
        await until(ws, "END", after)
    check_shapes(seen + after)
    assert kinds(after) == ["message", "usage_info", "END"]
    assert text_of(after) == "Understood, I won't create the cluster. No change made."


async def test_cancel_stops_the_workflow_and_sends_end() -> None:
    async with aurora(chunk_delay=0.02) as app, chat(app) as ws:
        await query(ws)
        seen: list[dict[str, Any]] = []
        await until(ws, "message", seen)
        await send(
            ws, {"type": "control", "action": "cancel", "session_id": SID, "user_id": "user_abc123"}
        )
        await until(ws, "END", seen)
        assert "confirmation_request" not in kinds(seen)
        # Nothing more is streamed: the next frame answers the next message.
        await send(ws, {"type": "control", "action": "pause", "session_id": SID})
        assert await receive(ws) == {
            "type": "error",
            "data": {"text": "the only control action is cancel", "code": "INVALID_ACTION"},
        }


async def test_the_sixth_message_within_a_minute_is_refused_with_the_seed_text() -> None:
    async with aurora() as app, chat(app) as ws:  # init was the first
        for _ in range(4):
            await send(ws, {"type": "init", "user_id": "user_abc123"})
        await query(ws)
        refused = {"type": "error", "data": {"text": RATE_LIMIT_TEXT}}
        assert await receive(ws) == refused
        await send(ws, {"type": "init", "user_id": "user_abc123"})
        assert await receive(ws) == refused  # and the socket stays open


async def test_agents_are_not_held_to_the_chats_rate_limit() -> None:
    """The limit is the chat's: an agent sends 20 messages at once, the chat still gets 5."""
    async with aurora(agent_token="s3cret") as app, chat(app) as ws:  # init was the first
        url = f"ws://127.0.0.1:{app.server.port}/kubectl-agent"
        headers = [(b"Authorization", b"Bearer s3cret")]
        async with open_websocket_url(url, extra_headers=headers) as agent:
            for n in range(20):
                await send(agent, {"type": "hello", "cluster_id": f"prod-{n}"})
            for n in range(20):
                assert await receive(agent) == {"type": "welcome", "cluster_id": f"prod-{n}"}
        for _ in range(5):
            await send(ws, {"type": "init", "user_id": "user_abc123"})
        assert await receive(ws) == {"type": "error", "data": {"text": RATE_LIMIT_TEXT}}


async def test_a_workflow_outlives_its_socket_and_resumes_on_the_next() -> None:
    """Chunks from both sockets make the whole stream once: no gap, no repeat."""
    async with aurora(chunk_delay=0.05) as app:
        topic = f"aurora:session.{SID}"
        async with app.server.subscribe(topic) as everything:
            before: list[dict[str, Any]] = []
            async with chat(app) as ws:
                await query(ws)
                for _ in range(4):  # START and three chunks, then the socket drops
                    before.append(await receive(ws))
            # The workflow goes on meanwhile, up to the confirmation it waits on.
            published = []
            async for event in everything:
                published.append(event.payload)
                if event.payload["type"] == "confirmation_request":
                    break
            after: list[dict[str, Any]] = []
            async with chat(app) as ws:
                await send(
                    ws,
                    {"type": "confirmation_response", "user_id": "user_abc123", "session_id": SID},
                )
                request = await until(ws, "confirmation_request", after)
                await answer(ws, request, approved=True)
                await until(ws, "END", after)
            async for event in everything:
                published.append(event.payload)
                if event.payload["data"].get("status") == "END":
                    break
    assert len(before) == 4 and len(after) > 20
    assert before + after == published
    check_shapes(published)
    assert text_of(published).startswith("I'll help you with: Deploy my application to GKE.")


async def test_a_workflow_that_takes_too_long_times_out_with_the_seed_message() -> None:
    async with aurora(workflow_timeout=0.5) as app, chat(app) as ws:
        await query(ws)
        seen: list[dict[str, Any]] = []
        await until(ws, "confirmation_request", seen)  # and nobody answers
        assert await receive(ws) == {
            "type": "message",
            "data": {"text": TIMEOUT_TEXT},
            "session_id": SID,
        }
        assert await receive(ws) == {"type": "status", "data": {"status": "END"}, "session_id": SID}


async def test_direct_tool_calls_ask_mode_and_errors() -> None:
    async with aurora() as app, chat(app) as ws:
        call = {"tool_name": "github_commit", "parameters": {"repo": "my-org/my-repo"}}
        await send(ws, {"query": "Commit changes", "session_id": SID, "direct_tool_call": call})
        seen: list[dict[str, Any]] = []
        await until(ws, "END", seen)
        check_shapes(seen)
        assert kinds(seen) == ["START", "tool_call", "tool_output", "tool_result", "END"]
        call = {"tool_name": "rm_rf", "parameters": {}}
        await send(ws, {"query": "Delete", "session_id": SID, "direct_tool_call": call})
        seen = []
        await until(ws, "END", seen)
        assert seen[1] == {
            "type": "error",
            "session_id": SID,
            "data": {
                "text": "Failed to execute rm_rf: unknown tool",
                "code": "TOOL_EXECUTION_FAILED",
            },
        }
        assert kinds(seen) == ["START", "error", "ERROR", "END"]
        await send(ws, {"query": "Deploy my app", "session_id": SID, "mode": "ask"})
        seen = []
        await until(ws, "END", seen)
        check_shapes(seen)
        assert "confirmation_request" not in kinds(seen)  # ask mode is read-only
        await send(ws, {"type": "dance"})
        assert (await receive(ws))["data"]["code"] == "UNKNOWN_TYPE"


async def test_kubectl_agents_authenticate_with_their_bearer_token() -> None:
    async with aurora(agent_token="s3cret") as app:
        url = f"ws://127.0.0.1:{app.server.port}/kubectl-agent"
        for headers in ([], [(b"Authorization", b"Bearer wrong")], [(b"Authorization", b"s3cret")]):
            with pytest.raises(HandshakeError) as refused:
                async with open_websocket_url(url, extra_headers=headers):
                    pass
            assert refused.value.status_code == 401  # type: ignore[attr-defined]
        headers = [(b"Authorization", b"Bearer s3cret")]
        async with open_websocket_url(url, extra_headers=headers) as agent:
            await send(agent, {"type": "hello", "cluster_id": "prod-1"})
            assert await receive(agent) == {"type": "welcome", "cluster_id": "prod-1"}


async def test_it_runs_as_the_readme_says() -> None:
    command = [sys.executable, "-m", "examples.aurora", "--port", "0", "--chunk-delay", "0.001"]
    env = {**os.environ, "AURORA_AGENT_TOKEN": "from-env"}
    with trio.fail_after(TEST_TIMEOUT):
        process = await trio.lowlevel.open_process(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE
        )
        try:
            assert process.stdout is not None
            line = (await process.stdout.receive_some()).decode()
            port = int(re.search(r"ws://127\.0\.0\.1:(\d+)", line)[1])  # type: ignore[index]
            async with open_websocket_url(f"ws://127.0.0.1:{port}") as ws:
                assert await receive(ws) == START
                await send(ws, {"type": "init", "user_id": "user_abc123"})
                await send(
                    ws, {"query": "List my GKE clusters", "session_id": SID, "mode": "agent"}
                )
                seen: list[dict[str, Any]] = []
                await until(ws, "END", seen)
            check_shapes(seen)
            assert "confirmation_request" not in kinds(seen)  # listing changes nothing
            headers = [(b"Authorization", b"Bearer from-env")]
            url = f"ws://127.0.0.1:{port}/kubectl-agent"
            async with open_websocket_url(url, extra_headers=headers) as agent:
                await send(agent, {"type": "hello", "cluster_id": "c"})
                assert await receive(agent) == {"type": "welcome", "cluster_id": "c"}
        finally:
            process.terminate()
            await process.wait()


# --- the chat page, over Server-Sent Events, in a real browser --------------------------------


async def test_the_chat_page_and_its_query_route() -> None:
    async with aurora(chunk_delay=0.2) as app:
        port = app.server.port
        status, headers, page = await http_request(port, "GET", "/chat")
        assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
        assert b'<script src="/chat.js"' in page
        assert headers["content-security-policy"].startswith("default-src 'self'")
        status, headers, script = await http_request(port, "GET", "/chat.js")
        assert status == 200 and b"new EventSource(" in script
        assert headers["content-type"] == "text/javascript; charset=utf-8"
        body = orjson.dumps({"query": "What pods are running?", "session_id": SID})
        status, _, answer = await http_request(port, "POST", "/chat/query", body)
        assert status == 200
        assert orjson.loads(answer) == {"session_id": SID, "topic": f"aurora:session.{SID}"}
        status, _, answer = await http_request(port, "POST", "/chat/query", body)
        assert (status, orjson.loads(answer)["error"]["code"]) == (409, "WORKFLOW_RUNNING")
        for bad in (b"{", b"[]", b'{"query": 1}'):
            status, _, answer = await http_request(port, "POST", "/chat/query", bad)
            assert status == 400, answer


async def test_the_chat_page_streams_an_answer_and_resumes_it_after_a_network_cut(
    browser: Browser,
) -> None:
    """The page posts a query, follows the session over an EventSource, loses the
    network mid-answer, and when it comes back carries on with the next chunk:
    the answer on the page is the whole answer, each chunk once."""
    query = "What pods are running in my cluster?"
    expected = (
        f"I'll help you with: {query}. Let me check your clusters..."
        "Your pods are running. I changed nothing."
    )
    chunks_of_answer = (
        "return [...document.querySelectorAll('.answer')].map(a => [...a.childNodes]"
        ".filter(n => n.nodeType === 3).map(n => n.textContent).join(''))"
    )
    async with aurora(chunk_delay=0.05) as app, switching_proxy(app.server.port) as proxy:
        await in_thread(browser.open, f"http://127.0.0.1:{proxy.port}/chat")
        await in_thread(browser.type_into, "#query", query + "\n")
        await in_thread(
            browser.wait_until,
            lambda br: len("".join(br.js(chunks_of_answer))) > 10,
            message="the first chunks of the answer",
        )
        [chat] = app.chats.values()
        proxy.cut()
        await in_thread(
            browser.wait_until,
            lambda br: br.js("return document.body.dataset.stream") == "reconnecting",
            message="the cut",
        )
        partial = browser.js(chunks_of_answer)[0]
        assert partial != expected  # cut mid-answer
        # The workflow goes on without the page: wait for its last frame.
        async with app.server.subscribe(chat.topic, since=0) as frames:
            async for frame in frames:
                if frame.payload["data"].get("status") == "END":
                    break
        proxy.restore()
        await in_thread(browser.wait_for, ".answer.done")
        await in_thread(browser.screenshot, "aurora-chat-resumed")
        assert browser.js(chunks_of_answer) == [expected]
        assert "api-deployment-abc123" in browser.find(".tool pre").text
        assert browser.js("return document.body.dataset.stream") == "streaming"
        assert browser.foreign_requests() == []
