"""A real redis-server and real ``tidings serve`` processes, for the cluster tests.

``redis_server`` starts its own ``redis-server`` on a free port of 127.0.0.1, in
a temporary directory, with an append-only file fsynced on every write: a
test can stop it and start it again on the same port and find its streams
there, as a deployment with persistence would. It never touches the instance
on 6379. Without the binary the tests that use it skip, unless
``TIDINGS_REQUIRE_REDIS=1`` (set by ``.ci/run``), where they fail.

``tidings_nodes`` starts ``python -m tidings serve`` processes sharing it; each
writes its log to a file that is printed at teardown (pytest shows it when the
test failed), and each is stopped (SIGTERM, then SIGKILL) at the end.

Every wait here is a bounded poll of something observable (PING, ``/health``),
never a bare sleep standing in for synchronisation.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
import trio

from .httpclient import http_request

#: How long a process gets to start answering (redis PING, tidings /health).
START_TIMEOUT = 10.0
#: How long a process gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 5.0
#: The API key of every node the fixture starts.
API_KEY = "cluster-test-key"

T = TypeVar("T")


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_binary() -> str:
    """The path of redis-server; skips the test without it (fails where it is required)."""
    path = shutil.which("redis-server")
    if path is None:
        reason = (
            "redis-server is not installed (apt-get install redis-server); "
            "the cluster tests need a real one"
        )
        if os.environ.get("TIDINGS_REQUIRE_REDIS") == "1":
            pytest.fail(f"TIDINGS_REQUIRE_REDIS=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return path


async def _stop_process(process: trio.Process, grace: float = STOP_TIMEOUT) -> int:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; returns the exit status."""
    if process.returncode is None:
        process.terminate()
        with trio.move_on_after(grace):
            return await process.wait()
        process.kill()
    return await process.wait()


async def eventually(
    probe: Callable[[], Awaitable[T]], accept: Callable[[T], bool], within: float = 10.0
) -> T:
    """Poll ``probe`` until ``accept`` takes its answer; fails after ``within`` seconds."""
    answer: T | None = None
    with trio.move_on_after(within):
        while True:
            answer = await probe()
            if accept(answer):
                return answer
            await trio.sleep(0.05)
    raise AssertionError(f"not so within {within} s; last answer: {answer!r}")


# --- redis -----------------------------------------------------------------------------


def _resp(*args: str | int) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Reader:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                raise ConnectionError("redis closed the connection")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    async def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size + 2:
            data = await self.stream.receive_some(65536)
            if not data:
                raise ConnectionError("redis closed the connection")
            self.buffer += data
        data, self.buffer = self.buffer[:size], self.buffer[size + 2 :]
        return data

    async def reply(self) -> Any:
        line = await self.line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(f"redis error: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else await self.exactly(size)
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [await self.reply() for _ in range(count)]
        raise RuntimeError(f"unexpected redis reply {line!r}")


class RedisServer:
    """One redis-server process of the test, restartable on the same port."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: trio.Process | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    async def start(self) -> None:
        """Start (again) on the same port and directory; returns once it answers PING."""
        assert self.process is None or self.process.returncode is not None, "already running"
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        self.process = await trio.lowlevel.open_process(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.starts += 1
        with trio.fail_after(START_TIMEOUT):
            while True:
                if self.process.returncode is not None:
                    raise RuntimeError(f"redis-server exited at start:\n{self.log()}")
                try:
                    if await self.command("PING") == "PONG":
                        return
                except (OSError, ConnectionError, RuntimeError):
                    pass  # not listening yet, or still loading its data
                await trio.sleep(0.02)

    async def stop(self) -> None:
        """SIGTERM (SIGKILL after STOP_TIMEOUT) and wait until it has exited."""
        if self.process is not None:
            await _stop_process(self.process)

    async def kill(self) -> None:
        """SIGKILL: a crash, with whatever the append-only file has."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def command(self, *args: str | int) -> Any:
        """Run one command over a fresh connection; for checks and debugging."""
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        async with stream:
            await stream.send_all(_resp(*args))
            return await _Reader(stream).reply()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A redis-server of this test alone, on a free port; stopped at teardown."""
    binary = redis_binary()
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(binary, directory)
    await server.start()
    try:
        yield server
    finally:
        with trio.CancelScope(shield=True):
            await server.stop()


# --- tidings nodes ---------------------------------------------------------------------


class Node:
    """One ``tidings serve`` process."""

    def __init__(self, name: str, args: list[str], log_path: Path) -> None:
        self.name = name
        self.port = free_port()
        self.args = args
        self.log_path = log_path
        self.process: trio.Process | None = None

    @property
    def url(self) -> str:
        """The WebSocket URL of the node."""
        return f"ws://127.0.0.1:{self.port}/ws"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "tidings", "serve",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--node-id", self.name, "--api-key", API_KEY,
            *self.args,
        ]  # fmt: skip

    async def start(self) -> None:
        """Start the process; returns once ``/health`` answers."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
        env["PYTHONUNBUFFERED"] = "1"
        with self.log_path.open("ab") as log:
            self.process = await trio.lowlevel.open_process(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )
        with trio.fail_after(START_TIMEOUT):
            while True:
                if self.process.returncode is not None:
                    raise RuntimeError(
                        f"node {self.name} exited with {self.process.returncode}:\n{self.log()}"
                    )
                try:
                    await self.health()
                except OSError:
                    await trio.sleep(0.05)
                else:
                    return

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def stop(self) -> int:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; returns the exit status."""
        assert self.process is not None
        return await _stop_process(self.process)

    async def kill(self) -> None:
        """SIGKILL, and wait until the process is gone."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- HTTP ----------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        """The body of ``/health`` (whatever the HTTP status)."""
        _, _, body = await http_request(self.port, "GET", "/health")
        health: dict[str, Any] = orjson.loads(body)
        return health

    async def api(self, method: str, **arguments: Any) -> tuple[int, dict[str, Any]]:
        """``POST /api/<method>``: (HTTP status, JSON body)."""
        status, _, body = await http_request(
            self.port,
            "POST",
            f"/api/{method}",
            orjson.dumps(arguments),
            f"Authorization: apikey {API_KEY}\r\nContent-Type: application/json\r\n",
        )
        return status, orjson.loads(body)

    async def call(self, method: str, **arguments: Any) -> dict[str, Any]:
        """``POST /api/<method>`` that must succeed; its JSON body."""
        status, body = await self.api(method, **arguments)
        assert status == 200, (self.name, method, status, body)
        return body

    async def metrics(self) -> dict[str, float]:
        """``/metrics`` as {sample name with labels: value}."""
        status, _, body = await http_request(self.port, "GET", "/metrics")
        assert status == 200, (status, body)
        samples: dict[str, float] = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    async def metric(self, name: str) -> float:
        """The sum of a metric's samples over its labels; fails if it has none."""
        samples = await self.metrics()
        values = [
            value for key, value in samples.items() if key == name or key.startswith(name + "{")
        ]
        assert values, f"node {self.name}: /metrics has no {name}"
        return sum(values)

    async def wait_health(
        self, status: str, within: float = 10.0, *, connected: bool | None = None
    ) -> dict[str, Any]:
        """Poll ``/health`` until its status is ``status``; returns that body.

        With ``connected``, also until the backplane's ``connected`` says so: a
        node is ``degraded`` as soon as Redis stalls, before it notices the
        connection is gone.
        """
        body: dict[str, Any] = {}
        with trio.move_on_after(within):
            while True:
                body = await self.health()
                if body.get("status") == status and (
                    connected is None or body.get("backplane", {}).get("connected") is connected
                ):
                    return body
                await trio.sleep(0.05)
        raise AssertionError(
            f"node {self.name}: /health never said {status!r} (connected={connected})"
            f" within {within} s; last: {body}"
        )


class Nodes:
    """Starts ``tidings serve`` processes against one backplane; stops them all at the end."""

    def __init__(self, directory: Path, redis: RedisServer) -> None:
        self.directory = directory
        self.redis = redis
        self.started: list[Node] = []

    async def start(
        self,
        name: str | None = None,
        *args: str,
        backplane: bool | str = True,
        ready: str | None = "ok",
    ) -> Node:
        """A new node named ``name`` with extra ``args``.

        ``backplane``: True for the test's Redis, a URL for another, False for
        none. ``ready``: the ``/health`` status to wait for (``ok`` once the node
        is connected to Redis), or None to return as soon as it answers.
        """
        name = name or f"node{len(self.started) + 1}"
        extra = ["--log-level", "info", "--history-size", "10000", *args]
        if backplane:
            url = self.redis.url if backplane is True else backplane
            extra = ["--backplane", url, *extra]
        node = Node(name, extra, self.directory / f"{name}.log")
        self.started.append(node)
        await node.start()
        if ready is not None:
            await node.wait_health(ready)
        return node

    async def close(self) -> None:
        async with trio.open_nursery() as nursery:
            for node in self.started:
                if node.process is not None:
                    nursery.start_soon(node.stop)

    def report(self) -> str:
        parts = []
        for node in self.started:
            status = node.process.returncode if node.process else "never started"
            parts.append(f"----- {node.name} (port {node.port}, exit {status}) -----")
            parts.append(node.log()[-6000:])
        parts.append(f"----- redis (port {self.redis.port}) -----")
        parts.append(self.redis.log()[-3000:])
        return "\n".join(parts)


@pytest.fixture
async def tidings_nodes(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[Nodes]:
    """Starts ``tidings serve`` processes sharing the test's ``redis_server``."""
    directory = tmp_path / "nodes"
    directory.mkdir()
    nodes = Nodes(directory, redis_server)
    try:
        yield nodes
    finally:
        with trio.CancelScope(shield=True):
            await nodes.close()
        print(nodes.report())  # shown by pytest when the test failed
