"""Real ``tidings serve`` processes without a backplane, usable from any test.

The fixture is synchronous, so plain tests (a ``Publisher`` in a thread, an
``AsyncPublisher`` under ``asyncio.run``) and Trio tests alike can use it. Each
process gets a free port, the API key :data:`API_KEY`, a log file printed at
teardown (pytest shows it when the test failed), and SIGTERM (then SIGKILL) at
the end. Starting waits for ``/health`` with a bound: polling a child process,
there is nothing to await.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .redis_fixture import START_TIMEOUT, STOP_TIMEOUT, free_port

API_KEY = "publisher-test-key"


class ServeProcess:
    """One ``python -m tidings serve`` on 127.0.0.1."""

    def __init__(self, name: str, args: list[str], log_path: Path) -> None:
        self.name = name
        self.port = free_port()
        self.args = args
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def centrifugo_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/connection/websocket"

    def start(self) -> None:
        command = [
            sys.executable, "-m", "tidings", "serve",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--node-id", self.name, "--api-key", API_KEY, "--log-level", "info",
            *self.args,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
        env["PYTHONUNBUFFERED"] = "1"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not answer /health:\n{self.log()}")
            try:
                with opener.open(f"{self.http_url}/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; returns once it has exited."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@pytest.fixture
def tidings_serve(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Starts ``tidings serve`` processes (extra flags as arguments); stops them at the end."""
    started: list[ServeProcess] = []

    def start(*args: str) -> ServeProcess:
        name = f"solo{len(started) + 1}"
        node = ServeProcess(name, list(args), tmp_path / f"{name}.log")
        started.append(node)
        node.start()
        return node

    try:
        yield start
    finally:
        for node in started:
            node.stop()
        for node in started:
            print(f"----- {node.name} (port {node.port}) -----\n{node.log()[-6000:]}")
