"""examples/norn: Norn's WebSocket hub, checked against its seed document.

Every frame is compared field by field with ``seeds/003_fe6f634a737f4982.txt``:
the ``{type, appId, payload}`` envelope, each event type's payload fields, the
step statuses, origin checking, the buffers, and ``norn deploy``'s live view.
"""

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
from trio_websocket import ConnectionRejected, WebSocketConnection, open_websocket_url

from examples.norn.app import STEPS, make_config, running
from tidings import Endpoint, OverflowPolicy, Session

from .conftest import TEST_TIMEOUT, Disconnects
from .rawws import RawWebSocket

ROOT = Path(__file__).resolve().parent.parent
PAYLOADS = {
    "deploy.step": {"step": str, "sagaId": str, "status": str},
    "deploy.progress": {"sagaId": str, "message": str},
    "deploy.completed": {"sagaId": str, "imageTag": str},
    "deploy.failed": {"sagaId": str, "error": str},
    "app.restarted": {"sagaId": str},
    "app.scaled": {"sagaId": str, "group": str, "count": int},
    "function.completed": {"executionId": str, "status": str},
}


def check(frame: dict[str, Any]) -> dict[str, Any]:
    """The seed's envelope and the payload fields of its type, exactly; returns the frame."""
    assert list(frame) == ["type", "appId", "payload"], frame
    assert isinstance(frame["appId"], str) and frame["appId"]
    fields = {key: type(value) for key, value in frame["payload"].items()}
    assert fields == PAYLOADS[frame["type"]], frame
    if frame["type"] == "deploy.step":
        assert frame["payload"]["status"] in ("running", "complete", "failed")
    return frame


class Joined:
    """Counts clients the hub has subscribed, so a test publishes only once they hear."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.count = 0
        self._changed = trio.Event()
        endpoint.on_connect(self._joined)  # after the example's own hook

    async def _joined(self, session: Session) -> None:
        self.count += 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, count: int) -> None:
        while self.count < count:
            await self._changed.wait()


@asynccontextmanager
async def hub(**overrides: Any) -> AsyncIterator[tuple[Any, Any, Joined, str]]:
    env = {"NORN_ALLOWED_ORIGINS": "https://norn.example.com, https://ops.example:8443"}
    async with running(make_config(port=0, env=env, **overrides), step_delay=0) as (
        server,
        norn,
        endpoint,
    ):
        yield server, norn, Joined(endpoint), f"ws://127.0.0.1:{server.port}/ws"


async def receive(ws: WebSocketConnection) -> dict[str, Any]:
    return orjson.loads(await ws.get_message())  # type: ignore[no-any-return]


async def until(ws: WebSocketConnection, kind: str) -> list[dict[str, Any]]:
    frames = [check(await receive(ws))]
    while frames[-1]["type"] != kind:
        frames.append(check(await receive(ws)))
    return frames


# --- events ------------------------------------------------------------------------------


async def test_a_deploy_streams_its_steps_progress_and_completion_to_every_client() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with hub() as (_, norn, joined, url), open_websocket_url(url) as a:
            async with open_websocket_url(url) as b:  # no subscribe: everyone hears everything
                await joined.wait(2)
                assert await norn.deploy("myapp")
                frames = await until(a, "deploy.completed")
                assert await until(b, "deploy.completed") == frames
            assert {f["appId"] for f in frames} == {"myapp"}
            assert len({f["payload"]["sagaId"] for f in frames}) == 1
            steps = [(f["payload"]["step"], f["payload"]["status"]) for f in frames[:-1]
                     if f["type"] == "deploy.step"]  # fmt: skip
            assert steps == [(s, status) for s in STEPS for status in ("running", "complete")]
            progress = [f["payload"]["message"] for f in frames if f["type"] == "deploy.progress"]
            assert progress == ["1/2 allocations healthy", "2/2 allocations healthy"]
            assert frames[-1]["payload"]["imageTag"].startswith("myapp:")


async def test_a_failed_deploy_restart_scale_and_function() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with hub() as (_, norn, joined, url), open_websocket_url(url) as ws:
            await joined.wait(1)
            assert not await norn.deploy("api", fail_at="test")
            frames = await until(ws, "deploy.failed")
            assert [f["payload"]["status"] for f in frames if f["type"] == "deploy.step"][-2:] == [
                "running",
                "failed",
            ]
            assert frames[-1]["payload"]["error"] == "test failed"
            await norn.restart("api")
            await norn.scale("api", "web", 3)
            await norn.invoke("api", "resize-image")
            restarted, scaled, function = [check(await receive(ws)) for _ in range(3)]
            assert restarted["type"] == "app.restarted"
            assert (scaled["type"], scaled["payload"]["group"], scaled["payload"]["count"]) == (
                "app.scaled",
                "web",
                3,
            )
            assert (function["type"], function["payload"]["status"]) == (
                "function.completed",
                "success",
            )


async def test_a_client_can_start_a_deploy_and_bad_messages_get_envelope_errors() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with hub() as (_, _, _, url), open_websocket_url(url) as ws:
            await ws.send_message('{"type": "deploy", "appId": "web"}')
            accepted = await receive(ws)
            assert (accepted["type"], accepted["appId"]) == ("deploy.accepted", "web")
            frames = await until(ws, "deploy.completed")
            assert {f["payload"]["sagaId"] for f in frames} == {accepted["payload"]["sagaId"]}
            await ws.send_message('{"type": "deploy"}')
            await ws.send_message('{"type": "dance"}')
            for code in ("invalid_field", "unknown_type"):
                error = await receive(ws)
                assert list(error) == ["type", "appId", "payload"]
                assert (error["type"], error["payload"]["code"]) == ("error", code)


# --- origins and buffers ------------------------------------------------------------------


async def upgrade(url: str, origin: str | None) -> int:
    headers = [("Origin", origin)] if origin is not None else []
    try:
        async with open_websocket_url(url, extra_headers=headers):
            return 101
    except ConnectionRejected as exc:
        return int(exc.status_code)


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        (None, 101),
        ("http://localhost:5173", 101),
        ("http://localhost:3000", 101),
        ("http://localhost:9999", 101),
        ("http://127.0.0.1:8080", 101),
        ("http://[::1]:4000", 101),
        ("https://norn.example.com", 101),
        ("https://ops.example:8443", 101),
        ("https://evil.example", 403),
        ("https://norn.example.com.evil.example", 403),
        ("https://ops.example", 403),
    ],
)
async def test_origins(origin: str | None, status: int) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with hub() as (_, _, _, url):
            assert await upgrade(url, origin) == status


def test_the_buffers_are_the_seeds() -> None:
    config = make_config(env={})
    assert (config.outbox_size, config.overflow_policy) == (64, OverflowPolicy.DISCONNECT)
    assert config.inbox_size == 256
    assert config.allowed_origins == ("http://localhost:5173", "http://localhost:3000")


async def test_a_client_whose_64_buffer_fills_is_disconnected_with_1008() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with hub(write_timeout=30, close_timeout=0.2) as (server, norn, joined, url):
            disconnects = Disconnects(server)
            stalled = await RawWebSocket.connect("127.0.0.1", server.port, receive_buffer=4096)
            async with open_websocket_url(url) as healthy:
                await joined.wait(2)
                sent = 0
                # Small enough that the seed's 64 messages fill before the byte budget.
                while server.statistics().dropped == 0:
                    await norn.emit("deploy.progress", "big", sagaId="s", message="x" * 8_000)
                    sent += 1
                    check(await receive(healthy))  # the others keep up, unaffected
                assert await stalled.receive_close() == 1008
                [closed] = await disconnects.wait()
                assert (closed.code, closed.reason) == (1008, "outbox overflow")
                await norn.emit("app.restarted", "after", sagaId="s")
                assert check(await receive(healthy))["appId"] == "after"
            assert sent > 64
            await stalled.aclose()


# --- as the README runs it --------------------------------------------------------------


@asynccontextmanager
async def process(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[str]:
    """``python -m examples.norn ARGS``; yields the hub's URL."""
    command = [sys.executable, "-m", "examples.norn", *args]
    environ = {**os.environ, **(env or {})}
    proc = await trio.lowlevel.open_process(command, cwd=ROOT, stdout=subprocess.PIPE, env=environ)
    try:
        assert proc.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            chunk = await proc.stdout.receive_some(1)
            assert chunk, "the hub exited"
            line += chunk
        url = re.search(r"ws://127\.0\.0\.1:\d+/ws", line.decode())
        assert url is not None, line
        yield url[0]
    finally:
        proc.terminate()
        with trio.move_on_after(5):
            await proc.wait()
        proc.kill()


async def test_started_as_the_readme_says_with_the_demo_and_allowed_origins() -> None:
    env = {"NORN_ALLOWED_ORIGINS": "https://dash.example.com"}
    with trio.fail_after(TEST_TIMEOUT):
        async with process("--port", "0", "--step-delay", "0.01", env=env) as url:
            seen: set[str] = set()
            dashboard = [("Origin", "http://localhost:3000")]
            async with open_websocket_url(url, extra_headers=dashboard) as ws:
                while seen != set(PAYLOADS):
                    seen.add(check(await receive(ws))["type"])
            assert await upgrade(url, "https://dash.example.com") == 101
            assert await upgrade(url, "https://evil.example") == 403
            # `norn deploy --watch` follows the next deploy of an app, whoever started it.
            command = [sys.executable, "-m", "examples.norn", "deploy", "billing", "--watch"]
            watched = await trio.run_process(
                [*command, "--url", url], cwd=ROOT, capture_stdout=True, check=False
            )
            out = watched.stdout.decode()
            assert "Deploying billing (saga " in out
            outcome = "✓ Deployed billing" if watched.returncode == 0 else "✗ Deploy of billing"
            assert outcome in out, out


async def test_norn_deploy_renders_the_steps_live_and_exits_with_the_outcome() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with process("--port", "0", "--no-demo", "--step-delay", "0.01") as url:
            command = [sys.executable, "-m", "examples.norn", "deploy", "shop", "--url", url]
            done = await trio.run_process(
                [*command, "--no-color"], cwd=ROOT, capture_stdout=True, check=False
            )
            out = done.stdout.decode()
            assert done.returncode == 0, out
            assert "Deploying shop (saga " in out
            for step in STEPS:
                assert re.search(rf"✓ {step}\s+complete", out), out
            assert re.search(r"✓ Deployed shop image shop:[0-9a-f]{7}", out)
            assert "\x1b[" not in out  # not a terminal, no colour: plain text
            failed = await trio.run_process(
                [*command, "--fail-at", "migrate"], cwd=ROOT, capture_stdout=True, check=False
            )
            out = failed.stdout.decode()
            assert failed.returncode == 1, out
            assert re.search(r"✓ snapshot\s+complete", out) and re.search(
                r"✗ migrate\s+failed", out
            )
            assert "submit" not in out
            assert "✗ Deploy of shop failed: migrate failed" in out
            unreachable = await trio.run_process(
                [*command[:-1], "ws://127.0.0.1:1/ws"], cwd=ROOT, capture_stdout=True, check=False
            )
            assert unreachable.returncode == 2
