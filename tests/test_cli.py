"""The ``tidings`` command as a user runs it: real processes, real signals."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from .conftest import TEST_TIMEOUT, receive, subscribe

pytestmark = pytest.mark.slow

TIDINGS = [sys.executable, "-m", "tidings"]


class Lines:
    """Reads a child process's output line by line."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def next(self) -> str:
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError(self.buffer.decode(errors="replace"))
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()

    async def until(self, text: str) -> str:
        while True:
            line = await self.next()
            if text in line:
                return line


@asynccontextmanager
async def tidings_serve(*args: str) -> AsyncIterator[tuple[trio.Process, str]]:
    """``tidings serve`` on a free port; yields the process and its WebSocket URL."""
    process = await trio.lowlevel.open_process(
        [*TIDINGS, "serve", "--port", "0", "--log-level", "warning", *args],
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await Lines(process.stdout).until("listening on ")
        yield process, line.split("listening on ", 1)[1].strip()
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def run(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [*TIDINGS, *args], capture_stdout=True, capture_stderr=True, check=False
    )


async def test_sigterm_closes_every_client_with_1001_and_exits_0() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with tidings_serve() as (process, url):
            async with open_websocket_url(url) as first, open_websocket_url(url) as second:
                await subscribe(first, "t")
                await subscribe(second, "t")
                process.send_signal(signal.SIGTERM)
                for ws in (first, second):
                    with pytest.raises(ConnectionClosed) as closed:
                        await ws.get_message()
                    assert closed.value.reason.code == 1001
            assert await process.wait() == 0


async def test_sigint_also_shuts_down_cleanly() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with tidings_serve() as (process, _url):
            process.send_signal(signal.SIGINT)
            assert await process.wait() == 0


async def test_publish_prints_the_seq_and_watch_prints_events() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with tidings_serve() as (_process, url):
            first = await run(
                "publish", "deploys", '{"type": "deploy.step", "appId": "api"}', "--url", url
            )
            assert first.returncode == 0, first.stderr
            assert first.stdout.decode().strip() == "1"
            second = await run("publish", "deploys", '"plain"', "--url", url)
            assert second.stdout.decode().strip() == "2"

            watch = await trio.lowlevel.open_process(
                [*TIDINGS, "watch", "deploys", "--since", "0", "--url", url],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            try:
                assert watch.stdout is not None
                lines = Lines(watch.stdout)
                replayed = [await lines.next(), await lines.next()]
                assert "deploys #1 deploy.step api" in replayed[0]
                assert 'deploys #2 "plain"' in replayed[1]
                async with open_websocket_url(url) as ws:
                    await ws.send_message(
                        orjson.dumps(
                            {"type": "publish", "topic": "deploys", "payload": {"live": True}}
                        ).decode()
                    )
                    await receive(ws)
                assert 'deploys #3 {"live":true}' in await lines.next()
                watch.send_signal(signal.SIGINT)
                assert await watch.wait() == 0
            finally:
                if watch.returncode is None:
                    watch.kill()
                await watch.wait()


async def test_publish_refuses_invalid_json_and_reports_an_unreachable_server() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        bad = await run("publish", "t", "{not json")
        assert bad.returncode != 0
        assert b"not valid JSON" in bad.stderr
        nobody = await run("publish", "t", "1", "--url", "ws://127.0.0.1:9/ws")
        assert nobody.returncode == 1
        assert b"cannot connect" in nobody.stderr


async def test_serve_demo_publishes_norn_shaped_events() -> None:
    norn_types = {
        "deploy.step", "deploy.progress", "deploy.completed", "deploy.failed",
        "app.restarted", "app.scaled", "function.completed",
    }  # fmt: skip
    with trio.fail_after(TEST_TIMEOUT):
        async with tidings_serve("--demo") as (_process, url), open_websocket_url(url) as ws:
            await subscribe(ws, "deploys")
            event = await receive(ws)
            envelope = event["payload"]
            assert envelope["type"] in norn_types
            assert isinstance(envelope["appId"], str)
            assert {"sagaId", "step", "status"} <= envelope["payload"].keys()
            answer = await run("request", "apps", "--url", url)
            assert b'"apps"' in answer.stdout


async def test_python_dash_m_tidings_is_the_same_command() -> None:
    result = await run("--version")
    assert result.returncode == 0
    assert result.stdout.decode().startswith("tidings ")
