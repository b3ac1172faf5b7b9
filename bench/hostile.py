"""The project's own hostile suite: the attacks of issue 11, each against a fresh server.

Usage::

    .venv/bin/python bench/hostile.py [--cases NAME,...] [--quick] [--out PATH] [--list]

Method
------
Every case starts its own ``python -m tidings serve`` on 127.0.0.1 (a free port picked
here; ready once ``GET /health`` answers 200), with the settings the case needs and
nothing else, and keeps the server's stdout and stderr in a temporary log file.

Before the attack, a *healthy client* starts watching: a well-behaved subscriber
(trio-websocket) on the topic ``watch``, a publisher sending 20 events/s to that topic
over the native protocol, and a ``GET /health`` every second. The subscriber checks that
``seq`` goes up by one with no gap, that every acknowledged event arrives and that it
stays connected; the publisher counts acknowledgements and errors; the probe counts
failed or slow answers. In the slow-handshakes case all three come from 127.0.0.2.

The server's RSS (``VmRSS`` in ``/proc/PID/status``) is sampled every 50 ms from just
before the attack to the end of the case. Reported: the baseline (the last sample
before the attack), the peak and the growth at peak, and the growth still held at the
end, after the attacker has left and the server had a few seconds. The kernel's own
high-water mark (``VmHWM``) is recorded too, as a check on peaks between two samples.
Sizes are printed in MB (10^6 bytes).

The attackers are raw sockets driven by a small WebSocket client of this file (masked
frames, fragments, ping frames, a small SO_RCVBUF, reading nothing) so that they can
do what a polite client will not. What each attacker got is recorded on its side (HTTP
statuses, close codes, errors, what it could have read, when its sockets were closed),
and the server's log is read for disconnect lines, tracebacks and "too many open files".

Each case prints the target the issue sets for it ("must") and whether it was met. The
script reports, it does not assert: it exits 0 whatever the figures. The results go to
``bench/results/hostile-<UTC date-time>.json``.

Everything is bounded: every wait has a timeout, a case stops at its deadline (90 s),
only 127.0.0.1 and 127.0.0.2 are used, nothing is downloaded, and every process started
here is stopped on the way out (on errors and Ctrl-C too; the children also get
PR_SET_PDEATHSIG, so they die if this script is killed). The script talks to the server
only over sockets, HTTP and the CLI, so that it keeps working while the server changes;
settings that may not exist yet (``tenant_max_topics``, ``connect_timeout``, ...) are
used or read only when ``tidings serve --help`` lists them.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import datetime
import errno
import functools
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import orjson
import trio
import trio_websocket

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
OTHER_HOST = "127.0.0.2"
CASE_DEADLINE = 90.0
SAMPLE_EVERY = 0.05
MB = 1_000_000
KiB = 1024
JWT_SECRET = "hostile-bench-secret-not-for-any-real-node-0123456789"
API_KEY = "hostile-bench-api-key"
WATCH_RATE = 20.0
PAD_1K = "x" * 1000  # makes a payload of about 1 KiB

Json = dict[str, Any]


# --- processes ---------------------------------------------------------------------

_PROCESSES: list[subprocess.Popen[bytes]] = []


def _child_setup(nofile: int | None) -> Callable[[], None]:
    def setup() -> None:
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with this script
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return setup


def spawn(
    argv: list[str], log_path: Path, env: dict[str, str], nofile: int | None = None
) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tempfile.gettempdir(),
            preexec_fn=_child_setup(nofile),  # noqa: PLW1509 - rlimit and death signal
        )
    _PROCESSES.append(process)
    return process


def stop_process(process: subprocess.Popen[bytes], grace: float = 3.0) -> int | None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; the exit status."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)  # a frozen process cannot act on SIGTERM
            process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
    with contextlib.suppress(ValueError):
        _PROCESSES.remove(process)
    return process.returncode


def stop_all_processes() -> None:
    for process in list(_PROCESSES):
        stop_process(process, grace=1.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def proc_status(pid: int, key: str) -> int | None:
    """A ``kB`` field of /proc/PID/status, in bytes; None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(key.encode() + b":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# --- what `tidings serve --help` offers ---------------------------------------------


@dataclass
class ServerHelp:
    text: str

    @classmethod
    def load(cls) -> ServerHelp:
        done = subprocess.run(
            [sys.executable, "-m", "tidings", "serve", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return cls(" ".join(done.stdout.split()))

    def has(self, flag: str) -> bool:
        return re.search(rf"(^|\s){re.escape(flag)}(\s|$|,)", self.text) is not None

    def flags(self) -> list[str]:
        return sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", self.text)))

    def default(self, flag: str) -> str | None:
        """The ``(default: X)`` printed for ``flag``, if any."""
        match = re.search(
            rf"{re.escape(flag)} [A-Z_]+ ((?:(?! --[a-z]).)*?)\(default: ([^)]*)\)", self.text
        )
        return match[2] if match else None

    def seconds(self, flag: str, fallback: float) -> float:
        value = self.default(flag)
        if value is None:
            return fallback
        match = re.fullmatch(r"([\d.]+)\s*(ms|s|m)?", value.strip())
        if match is None:
            return fallback
        scale = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[match[2]]
        return float(match[1]) * scale


# --- the server under attack --------------------------------------------------------


class Server:
    def __init__(
        self, case: str, args: list[str], env: dict[str, str], nofile: int | None = None
    ) -> None:
        self.case = case
        self.args = args
        self.env_extra = env
        self.nofile = nofile
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        slug = re.sub(r"[^a-z0-9]+", "-", case.lower())
        fd, name = tempfile.mkstemp(prefix=f"hostile-{slug}-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)
        self.exit_status: int | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "tidings",
            "serve",
            "--host",
            HOST,
            "--port",
            str(self.port),
            *self.args,
        ]

    def start(self) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
        env.update(self.env_extra)
        self.process = spawn(self.argv(), self.log_path, env, self.nofile)

    async def ready(self, limit: float = 20.0) -> None:
        deadline = trio.current_time() + limit
        while trio.current_time() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                tail = read_text(self.log_path)[-1500:]
                raise RuntimeError(f"server exited with {self.process.returncode}: {tail}")
            with contextlib.suppress(OSError, trio.TooSlowError, ValueError):
                answer = await http(self.port, "GET", "/health", limit=1.0)
                if answer.status == 200:
                    return
            await trio.sleep(0.1)
        raise RuntimeError(f"server not ready after {limit} s: {read_text(self.log_path)[-800:]}")

    def rss(self) -> int | None:
        return proc_status(self.pid, "VmRSS") if self.process else None

    def log_summary(self) -> Json:
        text = read_text(self.log_path)
        lines = text.splitlines()
        disconnects: Counter[str] = Counter()
        after: dict[str, list[float]] = {}
        dropped = 0
        for line in lines:
            match = re.search(
                r"disconnect \S+ code=(\d+) reason=(.*?) by=(\w+) after ([\d.]+) s dropped=(\d+)",
                line,
            )
            if match:
                key = f"{match[1]} {match[2]} by {match[3]}"
                disconnects[key] += 1
                after.setdefault(key, []).append(float(match[4]))
                dropped += int(match[5])
        server_closes = {
            key: {"count": len(times), "after_s_min": min(times), "after_s_max": max(times)}
            for key, times in after.items()
            if not key.endswith("by client")
        }
        return {
            "path": str(self.log_path),
            "bytes": len(text.encode()),
            "lines": len(lines),
            "traceback_lines": sum("Traceback" in line for line in lines),
            "too_many_open_files_lines": sum("Too many open files" in line for line in lines),
            "error_lines": sum(" ERROR " in line or '"level":"error"' in line for line in lines),
            "disconnects": dict(disconnects.most_common(12)),
            "disconnect_lines": sum(disconnects.values()),
            "server_closes": server_closes,
            "dropped_in_disconnect_lines": dropped,
            "last_lines": [line[:300] for line in lines[-5:]],
        }

    def stop(self) -> None:
        if self.process is not None:
            self.exit_status = stop_process(self.process)


# --- HTTP and TCP -------------------------------------------------------------------


async def open_tcp(
    port: int, *, source: str | None = None, rcvbuf: int | None = None, limit: float = 10.0
) -> trio.SocketStream:
    """A TCP connection to the server, optionally from ``source`` and with a small buffer."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:  # before connect, so that the advertised window stays small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source is not None:
            await sock.bind((source, 0))
        with trio.fail_after(limit):
            await sock.connect((HOST, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float

    def json(self) -> Any:
        return orjson.loads(self.body)


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def http(
    port: int,
    method: str,
    path: str,
    *,
    body: bytes = b"",
    headers: tuple[tuple[str, str], ...] = (),
    source: str | None = None,
    limit: float = 5.0,
) -> Answer:
    """One request on its own connection (``Connection: close``), read to EOF."""
    started = trio.current_time()
    with trio.fail_after(limit):
        stream = await open_tcp(port, source=source, limit=limit)
        async with stream:
            head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n"
            head += "".join(f"{name}: {value}\r\n" for name, value in headers)
            if body or method == "POST":
                head += f"Content-Length: {len(body)}\r\n"
            await stream.send_all(head.encode() + b"\r\n" + body)
            data = bytearray()
            while chunk := await stream.receive_some(65536):
                data += chunk
    raw_head, _, rest = bytes(data).partition(b"\r\n\r\n")
    status, answer_headers = parse_head(raw_head)
    return Answer(status, answer_headers, rest, trio.current_time() - started)


async def api(port: int, method: str, body: Json, *, limit: float = 5.0) -> Answer:
    return await http(
        port,
        "POST",
        f"/api/{method}",
        body=orjson.dumps(body),
        headers=(("Authorization", f"apikey {API_KEY}"), ("Content-Type", "application/json")),
        limit=limit,
    )


async def metrics(port: int) -> dict[str, float]:
    """``GET /metrics`` as {'name{labels}': value}."""
    answer = await http(port, "GET", "/metrics", limit=5.0)
    values: dict[str, float] = {}
    for line in answer.body.decode(errors="replace").splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                values[key] = float(value)
    return values


async def health(port: int, *, source: str | None = None) -> Json:
    answer = await http(port, "GET", "/health", source=source, limit=5.0)
    result: Json = {"status_code": answer.status}
    with contextlib.suppress(ValueError):
        result |= answer.json()
    return result


# --- a small raw WebSocket client ---------------------------------------------------


class Refused(Exception):
    """The upgrade was answered with something else than 101."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class Closed(Exception):
    """A close frame arrived."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"close {code} {reason}")
        self.code = code
        self.reason = reason


def mask(payload: bytes, key: bytes) -> bytes:
    """RFC 6455 masking, as one big-integer XOR (fast for large payloads)."""
    n = len(payload)
    if n == 0:
        return b""
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


def frame(
    opcode: int, payload: bytes = b"", *, fin: bool = True, key: bytes | None = None
) -> bytes:
    """One masked client frame."""
    key = os.urandom(4) if key is None else key
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + key + mask(payload, key)


def parse_frame_head(buffer: bytearray) -> tuple[bool, int, int, int] | None:
    """(fin, opcode, payload length, header length) of the frame at the start, if complete."""
    if len(buffer) < 2:
        return None
    first, second = buffer[0], buffer[1]
    length, size = second & 0x7F, 2
    if length == 126:
        if len(buffer) < 4:
            return None
        length, size = struct.unpack_from("!H", buffer, 2)[0], 4
    elif length == 127:
        if len(buffer) < 10:
            return None
        length, size = struct.unpack_from("!Q", buffer, 2)[0], 10
    if second & 0x80:
        size += 4  # a masked frame (servers do not mask; tolerated)
    return bool(first & 0x80), first & 0x0F, length, size


def close_payload(payload: bytes) -> tuple[int, str]:
    if len(payload) < 2:
        return 1005, ""
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode(errors="replace")


def upgrade_request(port: int, path: str, token: str | None = None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    target = path + (f"?token={token}" if token else "")
    return (
        f"GET {target} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


class FrameTally:
    """Counts the frames of a byte stream from the server, keeping only small payloads
    (a reply of hundreds of megabytes is skipped, not held)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.skip = 0  # payload bytes of the current big frame still to skip
        self.frames = 0
        self.first: list[Json] = []  # the first few frames, summarised
        self.close: tuple[int, str] | None = None

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while self.close is None:
            if self.skip:
                n = min(self.skip, len(self.buffer))
                del self.buffer[:n]
                self.skip -= n
                if self.skip:
                    return
            head = parse_frame_head(self.buffer)
            if head is None:
                return
            fin, opcode, length, size = head
            if length > 4096 and opcode != 8:
                self._note(opcode, length, fin, None)
                del self.buffer[:size]
                self.skip = length
                continue
            if len(self.buffer) < size + length:
                return
            payload = bytes(self.buffer[size : size + length])
            del self.buffer[: size + length]
            if opcode == 8:
                self.frames += 1
                self.close = close_payload(payload)
            else:
                self._note(opcode, length, fin, payload)

    def _note(self, opcode: int, length: int, fin: bool, payload: bytes | None) -> None:
        self.frames += 1
        if len(self.first) < 4:
            summary: Json = {"opcode": opcode, "bytes": length, "fin": fin}
            if payload is not None:
                summary["text"] = payload[:160].decode(errors="replace")
            self.first.append(summary)


class RawWS:
    """A WebSocket client that does only what it is told: it may never read, flood pings,
    send fragments, or shrink its receive buffer."""

    def __init__(self, stream: trio.SocketStream, buffer: bytes) -> None:
        self.stream = stream
        self.buffer = bytearray(buffer)
        self._send_lock = trio.Lock()

    @classmethod
    async def connect(
        cls,
        port: int,
        path: str = "/ws",
        *,
        token: str | None = None,
        source: str | None = None,
        rcvbuf: int | None = None,
        limit: float = 10.0,
    ) -> RawWS:
        stream = await open_tcp(port, source=source, rcvbuf=rcvbuf, limit=limit)
        try:
            with trio.fail_after(limit):
                await stream.send_all(upgrade_request(port, path, token))
                data = bytearray()
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        raise EOFError("connection closed during the handshake")
                    data += chunk
                head, _, rest = bytes(data).partition(b"\r\n\r\n")
                status, _ = parse_head(head)
                if status != 101:
                    with trio.move_on_after(0.5):
                        while chunk := await stream.receive_some(65536):
                            rest += chunk
                    raise Refused(status, rest[:300].decode(errors="replace"))
        except BaseException:
            stream.socket.close()
            raise
        return cls(stream, rest)

    async def send_raw(self, data: bytes | memoryview) -> None:
        async with self._send_lock:
            await self.stream.send_all(data)

    async def send(self, opcode: int, payload: bytes = b"", *, fin: bool = True) -> None:
        await self.send_raw(frame(opcode, payload, fin=fin))

    async def send_text(self, text: str | bytes) -> None:
        await self.send(1, text.encode() if isinstance(text, str) else text)

    async def send_json(self, message: Any) -> None:
        await self.send(1, orjson.dumps(message))

    async def _fill(self) -> None:
        chunk = await self.stream.receive_some(1 << 16)
        if not chunk:
            raise EOFError("connection closed")
        self.buffer += chunk

    async def receive_frame(self) -> tuple[bool, int, bytes]:
        while True:
            head = parse_frame_head(self.buffer)
            if head is not None and len(self.buffer) >= head[3] + head[2]:
                fin, opcode, length, size = head
                payload = bytes(self.buffer[size : size + length])
                del self.buffer[: size + length]
                return fin, opcode, payload
            await self._fill()

    async def next_message(self, *, answer_pings: bool = True) -> bytes:
        """The next text or binary message; answers pings; raises Closed on a close frame."""
        parts: list[bytes] = []
        while True:
            fin, opcode, payload = await self.receive_frame()
            if opcode == 8:
                raise Closed(*close_payload(payload))
            if opcode == 9:
                if answer_pings:
                    await self.send(10, payload)
                continue
            if opcode == 10:
                continue
            parts.append(payload)
            if fin:
                return b"".join(parts)

    async def next_json(self) -> Json:
        return orjson.loads(await self.next_message())  # type: ignore[no-any-return]

    async def drain(self, seconds: float) -> Json:
        """Read for up to ``seconds``, without keeping big payloads: what the peer sent."""
        tally = FrameTally()
        received = len(self.buffer)
        tally.feed(bytes(self.buffer))
        self.buffer.clear()
        ended: str | None = None
        with trio.move_on_after(seconds):
            try:
                while tally.close is None:
                    chunk = await self.stream.receive_some(1 << 20)
                    if not chunk:
                        ended = "EOF"
                        break
                    received += len(chunk)
                    tally.feed(chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                ended = describe(exc)
        return {
            "bytes_read": received,
            "frames": tally.frames,
            "close_code": tally.close[0] if tally.close else None,
            "close_reason": tally.close[1] if tally.close else None,
            "ended": ended,
            "first_frames": tally.first,
        }

    def abort(self) -> None:
        """Leave without a close frame."""
        self.stream.socket.close()


async def request(ws: RawWS, message: Json, limit: float = 5.0) -> Json:
    """Send a native command and read until its response or error (other frames skipped)."""
    await ws.send_json(message)
    with trio.fail_after(limit):
        while True:
            reply = await ws.next_json()
            if reply.get("requestId") == message["requestId"] and reply.get("type") in (
                "response",
                "error",
            ):
                return reply


def outcome(reply: Json) -> str:
    if reply.get("type") == "response":
        return "ok"
    return str((reply.get("payload") or {}).get("code", reply.get("type")))


def describe(exc: BaseException) -> str:
    """A short name for what happened to a connection or a request."""
    if isinstance(exc, Closed):
        return f"close {exc.code}" + (f" {exc.reason!r}" if exc.reason else "")
    if isinstance(exc, Refused):
        return f"HTTP {exc.status}"
    if isinstance(exc, trio_websocket.ConnectionRejected):
        return f"HTTP {exc.status_code}"
    if isinstance(exc, trio_websocket.ConnectionClosed):
        reason = exc.reason
        return f"close {reason.code} {reason.reason or ''}".strip()
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    if isinstance(exc, EOFError):
        return "EOF"
    if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError):
        cause = exc.__cause__
        return describe(cause) if isinstance(cause, OSError) else "broken"
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return f"{type(exc).__name__}: {exc}"


NETWORK_ERRORS = (
    OSError,
    EOFError,
    Closed,
    Refused,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio_websocket.HandshakeError,
    trio_websocket.ConnectionClosed,
)


async def send_many(
    ws: RawWS,
    count: int,
    message: Callable[[int], Json],
    *,
    window: int = 64,
    stop_on_error: bool = False,
    limit: float = 120.0,
) -> Json:
    """Send ``count`` native commands (``requestId`` i) on ``ws``, ``window`` unanswered at
    most, and count the answers. ``stop_on_error``: stop at the first error answer."""
    started = trio.current_time()
    acked = sent = 0
    errors: Counter[str] = Counter()
    first_error: Json | None = None
    last_seq: int | None = None
    ended: str | None = None
    stop = False
    slots = trio.Semaphore(window)

    async def receive(cancel_scope: trio.CancelScope) -> None:
        nonlocal acked, last_seq, first_error, stop, ended
        try:
            while True:
                reply = await ws.next_json()
                if reply.get("type") == "response":
                    acked += 1
                    seq = (reply.get("payload") or {}).get("seq")
                    if isinstance(seq, int):
                        last_seq = seq
                elif reply.get("type") == "error":
                    code = outcome(reply)
                    errors[code] += 1
                    if first_error is None:
                        text = (reply.get("payload") or {}).get("message")
                        first_error = {
                            "index": reply.get("requestId"),
                            "code": code,
                            "message": text,
                        }
                    stop = stop or stop_on_error
                else:
                    continue  # an event, a pong: not an answer
                slots.release()
        except NETWORK_ERRORS as exc:
            ended = describe(exc)
            cancel_scope.cancel()  # nothing more will be answered

    with trio.move_on_after(limit):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive, nursery.cancel_scope)
            try:
                for i in range(count):
                    await slots.acquire()
                    if stop:
                        break
                    await ws.send_json({**message(i), "requestId": i})
                    sent += 1
            except NETWORK_ERRORS as exc:
                ended = ended or f"send: {describe(exc)}"
            await wait_until(lambda: acked + errors.total() >= sent or ended is not None, limit)
            nursery.cancel_scope.cancel()
    return {
        "sent": sent,
        "acked": acked,
        "errors": dict(errors),
        "first_error": first_error,
        "last_seq": last_seq,
        "ended": ended,
        "seconds": round(trio.current_time() - started, 2),
    }


async def publish_many(
    port: int,
    count: int,
    topic: Callable[[int], str],
    payload: Callable[[int], Any],
    *,
    token: str | None = None,
    window: int = 64,
    stop_on_error: bool = False,
    limit: float = 120.0,
) -> Json:
    """Publish ``count`` events over one native connection of its own, then leave."""
    ws = await RawWS.connect(port, "/ws", token=token)
    try:
        return await send_many(
            ws,
            count,
            lambda i: {"type": "publish", "topic": topic(i), "payload": payload(i)},
            window=window,
            stop_on_error=stop_on_error,
            limit=limit,
        )
    finally:
        ws.abort()


async def wait_until(predicate: Callable[[], bool], seconds: float, step: float = 0.05) -> bool:
    with trio.move_on_after(seconds):
        while True:
            if predicate():
                return True
            await trio.sleep(step)
    return predicate()


def make_token(
    sub: str, tenant: str | None = None, *, publish: list[str] | None = None, exp: Any = None
) -> str:
    claims: Json = {"sub": sub, "exp": int(time.time()) + 3600 if exp is None else exp}
    if tenant is not None:
        claims["tenant"] = tenant
    if publish is not None:
        claims["publish"] = publish
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


# --- the healthy client watching ----------------------------------------------------


async def open_ws(
    nursery: trio.Nursery, port: int, path: str, *, token: str | None, source: str | None
) -> trio_websocket.WebSocketConnection:
    stream = await open_tcp(port, source=source)
    resource_ = path + (f"?token={token}" if token else "")
    with trio.fail_after(10):
        return await trio_websocket.wrap_client_stream(
            nursery, stream, HOST, resource_, max_message_size=8 * MB
        )


class Subscriber:
    """A well-behaved subscriber: reads everything, checks seq, answers pings."""

    def __init__(self, port: int, topic: str, token: str | None, source: str | None) -> None:
        self.port, self.topic, self.token, self.source = port, topic, token, source
        self.ready = trio.Event()
        self.scope = trio.CancelScope()
        self.ws: trio_websocket.WebSocketConnection | None = None
        self.stopping = False
        self.subscribed_seq: int | None = None
        self.last_seq: int | None = None
        self.events = self.gaps = self.duplicates = 0
        self.latencies: list[float] = []
        self.closed: Json | None = None
        self.error: str | None = None

    async def run(self) -> None:
        # Errors are caught inside the nursery: out of it they would come in a group.
        with self.scope:
            async with trio.open_nursery() as nursery:
                try:
                    await self._subscribe_and_read(nursery)
                except NETWORK_ERRORS as exc:
                    if not self.stopping:
                        if self.ready.is_set():
                            self.closed = {"how": describe(exc), "at": trio.current_time()}
                        else:
                            self.error = describe(exc)
                finally:
                    self.ready.set()
                nursery.cancel_scope.cancel()

    async def _subscribe_and_read(self, nursery: trio.Nursery) -> None:
        self.ws = ws = await open_ws(
            nursery, self.port, "/ws", token=self.token, source=self.source
        )
        subscribe = {"type": "subscribe", "topic": self.topic, "requestId": "watch"}
        await ws.send_message(orjson.dumps(subscribe).decode())
        while True:
            message = orjson.loads(await ws.get_message())
            kind = message.get("type")
            if kind == "event" and message.get("topic") == self.topic:
                self.on_event(message)
            elif message.get("requestId") == "watch":
                if kind != "response":
                    self.error = f"subscribe refused: {outcome(message)}"
                    return
                self.subscribed_seq = message["payload"].get("seq")
                self.ready.set()

    def on_event(self, message: Json) -> None:
        seq = message.get("seq")
        if not isinstance(seq, int):
            return
        self.events += 1
        expected = (
            self.last_seq + 1
            if self.last_seq is not None
            else (self.subscribed_seq + 1 if self.subscribed_seq is not None else seq)
        )
        if seq > expected:
            self.gaps += seq - expected
        elif seq < expected:
            self.duplicates += 1
        self.last_seq = seq if self.last_seq is None else max(self.last_seq, seq)
        sent_at = (message.get("payload") or {}).get("t")
        if isinstance(sent_at, float):
            self.latencies.append(time.monotonic() - sent_at)

    async def stop(self) -> None:
        self.stopping = True
        if self.ws is not None:
            with trio.move_on_after(2), contextlib.suppress(*NETWORK_ERRORS):
                await self.ws.aclose()
        self.scope.cancel()

    def result(self) -> Json:
        latencies = sorted(self.latencies)
        return {
            "subscribed": self.subscribed_seq is not None,
            "events": self.events,
            "gaps": self.gaps,
            "duplicates": self.duplicates,
            "last_seq": self.last_seq,
            "closed_by_server": self.closed,
            "error": self.error,
            "latency_ms": {
                "p50": round(latencies[len(latencies) // 2] * 1000, 1),
                "p99": round(latencies[int(len(latencies) * 0.99)] * 1000, 1),
                "max": round(latencies[-1] * 1000, 1),
            }
            if latencies
            else None,
        }


class Publisher:
    """Publishes ``rate`` events/s to one topic over the native protocol, open loop."""

    def __init__(
        self,
        port: int,
        topic: str,
        rate: float,
        *,
        token: str | None = None,
        source: str | None = None,
        pad: str = "",
    ) -> None:
        self.port, self.topic, self.rate, self.token, self.source = port, topic, rate, token, source
        self.pad = pad
        self.scope = trio.CancelScope()
        self.ws: trio_websocket.WebSocketConnection | None = None
        self.stopping = False
        self.sent = self.acked = 0
        self.errors: Counter[str] = Counter()
        self.last_acked_seq: int | None = None
        self.closed: str | None = None

    async def run(self) -> None:
        with self.scope:
            async with trio.open_nursery() as nursery:
                try:
                    await self._publish(nursery)
                except NETWORK_ERRORS as exc:
                    if not self.stopping:
                        self.closed = describe(exc)
                nursery.cancel_scope.cancel()

    async def _publish(self, nursery: trio.Nursery) -> None:
        self.ws = ws = await open_ws(
            nursery, self.port, "/ws", token=self.token, source=self.source
        )
        nursery.start_soon(self._read, ws)
        started = trio.current_time()
        while not self.stopping:
            await trio.sleep_until(started + self.sent / self.rate)
            if self.stopping:
                break
            payload: Json = {"n": self.sent, "t": time.monotonic()}
            if self.pad:
                payload["pad"] = self.pad
            message = {
                "type": "publish",
                "topic": self.topic,
                "requestId": self.sent,
                "payload": payload,
            }
            await ws.send_message(orjson.dumps(message).decode())
            self.sent += 1
        await trio.sleep_forever()  # answers are still read until stop() cancels

    async def _read(self, ws: trio_websocket.WebSocketConnection) -> None:
        try:
            while True:
                reply = orjson.loads(await ws.get_message())
                if reply.get("type") == "response":
                    self.acked += 1
                    seq = (reply.get("payload") or {}).get("seq")
                    if isinstance(seq, int):
                        self.last_acked_seq = max(seq, self.last_acked_seq or 0)
                elif reply.get("type") == "error":
                    self.errors[outcome(reply)] += 1
        except NETWORK_ERRORS as exc:
            if not self.stopping:
                self.closed = describe(exc)

    async def stop(self) -> None:
        self.stopping = True
        await wait_until(lambda: self.acked + self.errors.total() >= self.sent, 3.0)
        if self.ws is not None:
            with trio.move_on_after(2), contextlib.suppress(*NETWORK_ERRORS):
                await self.ws.aclose()
        self.scope.cancel()

    def result(self) -> Json:
        return {
            "sent": self.sent,
            "acked": self.acked,
            "errors": dict(self.errors),
            "unanswered": self.sent - self.acked - self.errors.total(),
            "last_acked_seq": self.last_acked_seq,
            "closed_by_server": self.closed,
        }


class HealthProbe:
    """``GET /health`` once a second."""

    def __init__(self, port: int, source: str | None) -> None:
        self.port, self.source = port, source
        self.scope = trio.CancelScope()
        self.ok = 0
        self.failed: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self.max_seconds = 0.0

    async def run(self) -> None:
        with self.scope:
            while True:
                started = trio.current_time()
                try:
                    answer = await http(self.port, "GET", "/health", source=self.source, limit=3.0)
                    self.max_seconds = max(self.max_seconds, answer.seconds)
                    status = str(answer.json().get("status")) if answer.status == 200 else None
                    self.statuses[f"{answer.status} {status}"] += 1
                    if answer.status == 200:
                        self.ok += 1
                    else:
                        self.failed[f"HTTP {answer.status}"] += 1
                except (*NETWORK_ERRORS, ValueError) as exc:
                    self.failed[describe(exc)] += 1
                await trio.sleep_until(started + 1.0)

    def result(self) -> Json:
        return {
            "ok": self.ok,
            "failed": dict(self.failed),
            "statuses": dict(self.statuses),
            "max_ms": round(self.max_seconds * 1000, 1),
        }


class Watch:
    """The healthy client: a subscriber, a publisher at 20 events/s, a health probe."""

    def __init__(self, port: int, *, token: str | None, source: str) -> None:
        self.source = source
        self.subscriber = Subscriber(port, "watch", token, source)
        self.publisher = Publisher(port, "watch", WATCH_RATE, token=token, source=source)
        self.probe = HealthProbe(port, source)

    async def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self.subscriber.run)
        with trio.move_on_after(10):
            await self.subscriber.ready.wait()
        nursery.start_soon(self.publisher.run)
        nursery.start_soon(self.probe.run)

    async def stop(self) -> None:
        await self.publisher.stop()
        last = self.publisher.last_acked_seq
        await wait_until(
            lambda: (
                last is None
                or (self.subscriber.last_seq or 0) >= last
                or self.subscriber.closed is not None
            ),
            3.0,
        )
        await self.subscriber.stop()
        self.probe.scope.cancel()

    def result(self) -> Json:
        sub, pub, probe = self.subscriber.result(), self.publisher.result(), self.probe.result()
        missing = 0
        if pub["last_acked_seq"] is not None:
            missing = max(0, pub["last_acked_seq"] - (sub["last_seq"] or 0))
        missed = bool(
            not sub["subscribed"]
            or sub["gaps"]
            or missing
            or sub["closed_by_server"]
            or sub["error"]
        )
        affected = bool(
            missed
            or pub["errors"]
            or pub["unanswered"]
            or pub["closed_by_server"]
            or probe["failed"]
        )
        return {
            "source_address": self.source,
            "missed_anything": missed,
            "affected": affected,
            "missing_at_end": missing,
            "subscriber": sub,
            "publisher": pub,
            "health_probe": probe,
        }


def watch_line(watch: Json | None) -> str:
    if not watch:
        return "no healthy client"
    sub, pub, probe = watch["subscriber"], watch["publisher"], watch["health_probe"]
    parts = [f"{sub['events']} events, {sub['gaps']} gaps, {watch['missing_at_end']} missing"]
    if sub["error"]:
        parts.append(f"error {sub['error']}")
    parts.append(
        f"closed ({sub['closed_by_server']['how']})" if sub["closed_by_server"] else "connected"
    )
    if sub["latency_ms"]:
        parts.append(f"latency max {sub['latency_ms']['max']:.0f} ms")
    if pub["errors"] or pub["unanswered"] or pub["closed_by_server"]:
        parts.append(f"publish errors {pub['errors']} unanswered {pub['unanswered']}")
    parts.append(
        f"health {probe['ok']} ok"
        + (f", failed {probe['failed']}" if probe["failed"] else "")
        + f", max {probe['max_ms']:.0f} ms"
    )
    return "; ".join(parts)


# --- one case's run -----------------------------------------------------------------


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []

    async def run(self) -> None:
        while True:
            rss = proc_status(self.pid, "VmRSS")
            if rss is None:
                return
            self.samples.append((trio.current_time(), rss))
            await trio.sleep(SAMPLE_EVERY)

    def peak(self) -> int:
        return max((rss for _, rss in self.samples), default=0)


class Run:
    """What one case has started (server, healthy client, sampler) and what it measured."""

    def __init__(self, name: str, quick: bool, help_: ServerHelp, nursery: trio.Nursery) -> None:
        self.name = name
        self.quick = quick
        self.help = help_
        self.nursery = nursery
        self.t0 = trio.current_time()
        self.servers: list[Server] = []
        self.others: list[subprocess.Popen[bytes]] = []
        self.server: Server | None = None
        self.watch: Watch | None = None
        self.sampler: RssSampler | None = None
        self.attack_at = self.t0  # set by begin_attack()
        self.baseline: int | None = None
        self.end_rss: int | None = None
        self.vmhwm: int | None = None
        self.log: Json | None = None
        self.timeline: list[Json] = []
        self.sockets: list[RawWS] = []

    def t(self) -> float:
        return round(trio.current_time() - self.t0, 2)

    def since_attack(self) -> float:
        return round(trio.current_time() - self.attack_at, 2)

    def pick(self, full: float, quick: float) -> float:
        return quick if self.quick else full

    def mark(self, what: str, **info: Any) -> None:
        rss = self.server.rss() if self.server else None
        self.timeline.append({"t": self.t(), "what": what, "rss_mb": mb(rss), **info})

    async def start_server(
        self,
        args: list[str] | tuple[str, ...] = (),
        *,
        env: dict[str, str] | None = None,
        nofile: int | None = None,
    ) -> Server:
        server = Server(self.name, list(args), env or {}, nofile)
        self.servers.append(server)
        server.start()
        await server.ready()
        self.server = server
        self.mark("server ready", argv=server.argv()[3:], nofile=nofile)
        return server

    async def connect(self, path: str = "/ws", **options: Any) -> RawWS:
        """An attacker's WebSocket, closed by close() should the case end early."""
        assert self.server is not None
        ws = await RawWS.connect(self.server.port, path, **options)
        self.sockets.append(ws)
        return ws

    async def start_watch(self, *, token: str | None = None, source: str = HOST) -> None:
        assert self.server is not None
        self.watch = Watch(self.server.port, token=token, source=source)
        await self.watch.start(self.nursery)
        await trio.sleep(1.0)  # a second of ordinary traffic first
        self.mark("healthy client watching")

    async def begin_attack(self) -> None:
        assert self.server is not None
        self.sampler = RssSampler(self.server.pid)
        self.nursery.start_soon(self.sampler.run)
        await trio.sleep(0.25)
        self.baseline = self.sampler.samples[-1][1] if self.sampler.samples else None
        self.attack_at = trio.current_time()
        self.mark("attack starts")

    async def observe(self, *, min_s: float, max_s: float, quiet_s: float) -> None:
        """Wait while RSS is still climbing: at least ``min_s``, at most ``max_s``, until the
        peak has not grown by 1 MB for ``quiet_s``."""
        assert self.sampler is not None
        started = last_rise = trio.current_time()
        last_peak = self.sampler.peak()
        while True:
            await trio.sleep(0.25)
            now = trio.current_time()
            if self.sampler.peak() > last_peak + MB:
                last_peak, last_rise = self.sampler.peak(), now
            if now - started >= max_s or (now - started >= min_s and now - last_rise >= quiet_s):
                break
        self.mark("observed", seconds=round(trio.current_time() - started, 1))

    async def settle(self, seconds: float = 3.0) -> None:
        """After the attacker left: give the server time, then take the end sample."""
        await trio.sleep(seconds)
        self.end_rss = self.server.rss() if self.server else None
        self.mark("end")

    async def finish(self) -> None:
        if self.watch is not None:
            with trio.move_on_after(10):
                await self.watch.stop()
        if self.server is not None:
            self.vmhwm = proc_status(self.server.pid, "VmHWM")
            self.log = self.server.log_summary()  # before shutdown adds its own lines

    def close(self) -> None:
        for ws in self.sockets:
            ws.abort()
        for process in self.others:
            stop_process(process, grace=1.0)
        for server in self.servers:
            server.stop()

    def rss_report(self) -> Json | None:
        if self.sampler is None or self.baseline is None:
            return None
        samples = [(t, r) for t, r in self.sampler.samples if t >= self.attack_at]
        if not samples:
            return None
        peak_at, peak = max(samples, key=lambda sample: sample[1])
        end = self.end_rss if self.end_rss is not None else samples[-1][1]
        series, next_t = [], self.attack_at
        for t, r in samples:
            if t >= next_t:
                series.append([round(t - self.attack_at, 2), mb(r)])
                next_t = t + 0.5
        return {
            "baseline_bytes": self.baseline,
            "peak_bytes": peak,
            "peak_at_s": round(peak_at - self.attack_at, 2),
            "end_bytes": end,
            "growth_peak_bytes": peak - self.baseline,
            "growth_held_bytes": end - self.baseline,
            "vmhwm_bytes": self.vmhwm,
            "samples": len(samples),
            "series_mb": series,
        }


def mb(value: int | float | None) -> float | None:
    return None if value is None else round(value / MB, 1)


# --- the cases ----------------------------------------------------------------------


def amplification_frame(limit: int) -> bytes:
    """Lines of ``history limit:-1`` on ``amp``, ``limit`` bytes at most in all."""
    lines: list[bytes] = []
    size, k = 0, 2
    while True:
        line = f'{{"id":{k},"history":{{"channel":"amp","limit":-1}}}}'.encode()
        if size + len(line) + 1 > limit:
            return b"\n".join(lines)
        lines.append(line)
        size += len(line) + 1
        k += 1


async def case_amplification(run: Run, frame_kib: int) -> Json:
    server = await run.start_server()
    fill = await publish_many(server.port, 1000, lambda i: "amp", lambda i: {"i": i, "pad": PAD_1K})
    await run.start_watch()
    await run.begin_attack()
    ws = await run.connect("/connection/websocket", rcvbuf=4096)
    await ws.send_text(b'{"id":1,"connect":{}}')
    data = amplification_frame(frame_kib * KiB)
    await ws.send_text(data)
    run.mark("frame sent")
    await run.observe(min_s=5, max_s=run.pick(30, 20), quiet_s=5)
    info = await health(server.port)
    got = await ws.drain(2.0)
    ws.abort()
    run.mark("attacker left")
    await run.settle(3)
    first = got["first_frames"]
    return {
        "attack": {
            "frame_bytes": len(data),
            "commands": data.count(b"\n") + 1,
            "history": "1,000 events of ~1 KiB on 'amp'",
            "fill": fill,
        },
        "attacker": {
            "read_in_2s_after_the_window": got,
            "server_connections_at_end_of_window": info.get("connections"),
        },
        "attacker_summary": (
            f"frames {[f['bytes'] for f in first]} bytes; "
            f"close {got['close_code']}, {got['ended'] or 'still open'}"
        ),
    }


async def case_ping_flood(run: Run) -> Json:
    await run.start_server()
    await run.start_watch()
    await run.begin_attack()
    ws = await run.connect("/ws", rcvbuf=4096)
    batch = b"".join(frame(9, b"hostile-ping-016") for _ in range(1000))
    duration = 10.0
    sent = 0
    closed: Json | None = None
    last_write = trio.current_time()
    with trio.move_on_after(duration):
        try:
            while True:
                await ws.send_raw(batch)
                sent += 1000
                last_write = trio.current_time()
        except NETWORK_ERRORS as exc:
            closed = {"how": describe(exc), "at_s": run.since_attack()}
    blocked = round(run.attack_at + duration - last_write, 2) if closed is None else 0
    run.mark("flood over", pings_sent=sent)
    await run.observe(min_s=2, max_s=10, quiet_s=3)
    got = await ws.drain(3.0)
    ws.abort()
    run.mark("attacker left")
    await run.settle(3)
    client_closed = closed is not None or got["close_code"] is not None or got["ended"] is not None
    return {
        "attack": {"duration_s": duration, "ping_payload_bytes": 16, "rcvbuf": 4096},
        "attacker": {
            "pings_sent": sent,
            "send_failed": closed,
            "writes_blocked_for_last_s": blocked,
            "read_after": got,
            "client_closed": client_closed,
        },
        "attacker_summary": (
            f"{sent:,} pings sent; "
            + (f"send failed ({closed['how']}) at {closed['at_s']} s; " if closed else "")
            + (f"writes blocked for the last {blocked} s; " if blocked > 0.5 else "")
            + f"then read {got['bytes_read']:,} bytes, close {got['close_code']}, "
            + f"{got['ended'] or 'still open'}"
        ),
    }


async def case_fragments(run: Run) -> Json:
    await run.start_server()
    await run.start_watch()
    await run.begin_attack()
    key = os.urandom(4)
    fragments = 250_000  # 500,000 bytes in 2-byte fragments; none has FIN: never finished
    body = frame(1, b"ab", fin=False, key=key) + frame(0, b"ab", fin=False, key=key) * (
        fragments - 1
    )
    sockets: list[RawWS | None] = [None] * 20
    progress: list[Json] = [{} for _ in range(20)]

    async def open_one(i: int) -> None:
        try:
            sockets[i] = await run.connect("/ws")
        except NETWORK_ERRORS as exc:
            progress[i]["error"] = f"upgrade: {describe(exc)}"

    async def send_one(i: int, ws: RawWS) -> None:
        try:
            view = memoryview(body)
            for offset in range(0, len(view), 65536):
                await ws.send_raw(view[offset : offset + 65536])
                progress[i]["sent"] = offset + len(view[offset : offset + 65536])
            progress[i]["done_at_s"] = run.since_attack()
        except NETWORK_ERRORS as exc:
            progress[i]["error"] = describe(exc)

    # All 20 connect first (a busy server would otherwise keep the last ones waiting),
    # then send at once. The server parses every 2-byte fragment: sending them all takes
    # it most of a minute on a small VM. What was sent by the limit is reported.
    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(open_one, i)
    send_limit = run.pick(65, 40)
    with trio.move_on_after(send_limit):
        async with trio.open_nursery() as nursery:
            for i, ws in enumerate(sockets):
                if ws is not None:
                    nursery.start_soon(send_one, i, ws)
    sent_fraction = sum(p.get("sent", 0) for p in progress) / (20 * len(body))
    run.mark("fragments sent", fraction=round(sent_fraction, 3))
    await run.observe(min_s=1, max_s=5, quiet_s=2)
    reads: list[Json] = []

    async def read_one(ws: RawWS) -> None:
        reads.append(await ws.drain(0.5))

    async with trio.open_nursery() as nursery:
        for ws in sockets:
            if ws is not None:
                nursery.start_soon(read_one, ws)
    for ws in sockets:
        if ws is not None:
            ws.abort()
    run.mark("attackers left")
    await run.settle(4)
    done = sum("done_at_s" in p for p in progress)
    errors = Counter(p["error"] for p in progress if "error" in p)
    closes = Counter(str(r["close_code"] or r["ended"] or "open") for r in reads)
    return {
        "attack": {
            "connections": 20,
            "message_bytes": 2 * fragments,
            "fragment_bytes": 2,
            "wire_bytes_each": len(body),
        },
        "attacker": {
            "sent_everything": done,
            "sent_fraction_of_all_bytes": round(sent_fraction, 3),
            "send_limit_s": send_limit,
            "progress": progress,
            "read_before_leaving": reads,
            "outcomes": dict(closes),
        },
        "attacker_summary": (
            f"{done}/20 sent all their fragments within {send_limit:g} s "
            f"({sent_fraction:.0%} of all bytes)"
            + (f"; errors {dict(errors)}" if errors else "")
            + f"; before leaving: {dict(closes)}"
        ),
    }


async def case_history_resume(run: Run) -> Json:
    server = await run.start_server(["--history-size", "1000"])
    await run.start_watch()
    await run.begin_attack()  # the baseline is the fresh server: filling history is part of it
    blob = "x" * (200 * KiB)
    fill = await publish_many(
        server.port, 1000, lambda i: "big", lambda i: {"i": i, "blob": blob}, window=8, limit=60
    )
    filled = server.rss()
    run.mark("history filled", fill=fill)
    readers: list[RawWS] = []
    for i in range(8):
        ws = await run.connect("/ws", rcvbuf=4096)
        await ws.send_json(
            {"type": "subscribe", "topic": "big", "requestId": f"r{i}", "payload": {"since": 0}}
        )
        readers.append(ws)
    run.mark("8 resumers subscribed")
    await run.observe(min_s=5, max_s=run.pick(30, 20), quiet_s=5)
    reads: list[Json] = []

    async def read_one(ws: RawWS) -> None:
        reads.append(await ws.drain(1.0))

    async with trio.open_nursery() as nursery:
        for ws in readers:
            nursery.start_soon(read_one, ws)
    for ws in readers:
        ws.abort()
    run.mark("resumers left")
    await run.settle(3)
    assert run.sampler is not None
    first_texts = [f.get("text", "")[:120] for r in reads for f in r["first_frames"][:1]]
    closes = Counter(str(r["close_code"] or r["ended"] or "open") for r in reads)
    return {
        "attack": {
            "history": "1,000 events of 200 KiB on 'big'",
            "resumers": 8,
            "rcvbuf": 4096,
            "fill": fill,
        },
        "rss_after_fill_bytes": filled,
        "growth_over_filled_history_bytes": (run.sampler.peak() - filled) if filled else None,
        "attacker": {
            "read_before_leaving": reads,
            "outcomes": dict(closes),
            "first_frame_of_each": first_texts,
        },
        "attacker_summary": (
            f"fill {fill['acked']}/1000 acked {fill['errors'] or ''}; resumers: {dict(closes)}"
        ),
    }


async def tenant_b_checks(port: int, token: str | None) -> Json:
    """Another tenant (or client) subscribes and publishes, each on a fresh topic."""
    result: Json = {}
    try:
        ws = await RawWS.connect(port, "/ws", token=token)
    except NETWORK_ERRORS as exc:
        return {"connect": describe(exc)}
    try:
        result["connect"] = "101"
        for name, message in (
            ("subscribe", {"type": "subscribe", "topic": "b-news", "requestId": "s"}),
            ("publish", {"type": "publish", "topic": "b-news", "requestId": "p", "payload": 1}),
            (
                "publish_new_topic",
                {"type": "publish", "topic": "b-other", "requestId": "q", "payload": 2},
            ),
        ):
            try:
                result[name] = outcome(await request(ws, message))
            except NETWORK_ERRORS as exc:
                result[name] = describe(exc)
                break
    finally:
        ws.abort()
    return result


async def publish_once(port: int, topic: str, token: str | None = None) -> str:
    """One publish from a fresh connection: "ok" or the error code."""
    try:
        ws = await RawWS.connect(port, "/ws", token=token, limit=5.0)
    except NETWORK_ERRORS as exc:
        return describe(exc)
    try:
        message = {"type": "publish", "topic": topic, "requestId": "p", "payload": 1}
        return outcome(await request(ws, message))
    except NETWORK_ERRORS as exc:
        return describe(exc)
    finally:
        ws.abort()


async def api_publish(port: int, topic: str, tenant: str | None = None) -> str:
    body: Json = {"topic": topic, "payload": {"from": "api"}}
    if tenant is not None:
        body["tenant"] = tenant
    try:
        answer = await api(port, "publish", body)
    except (*NETWORK_ERRORS, ValueError) as exc:
        return describe(exc)
    if answer.status == 200:
        return "200"
    try:
        return f"{answer.status} {answer.json()['error']['code']}"
    except (ValueError, KeyError, TypeError):
        return str(answer.status)


TOPIC_CAP = 2000


async def subscribe_flood(run: Run, token: str, topics: int) -> Json:
    """Tenant A subscribes to ``topics`` new topics over as many connections as
    ``max_subscriptions`` (1000 by default) needs, and stays connected: a subscribed topic
    cannot be freed, whatever the node does with idle ones."""
    per_connection = int(run.help.default("--max-subscriptions") or 1000)
    done = 0
    refused: Json | None = None
    connections: list[str] = []
    while done < topics and refused is None:
        try:
            ws = await run.connect("/ws", token=token, limit=5.0)
        except NETWORK_ERRORS as exc:
            refused = {"code": f"upgrade {describe(exc)}", "after_subscriptions": done}
            break
        base, count = done, min(per_connection, topics - done)
        result = await send_many(
            ws,
            count,
            lambda i, base=base: {"type": "subscribe", "topic": f"a-pinned-{base + i}"},
            window=50,
            stop_on_error=True,
            limit=30,
        )
        done += result["acked"]
        connections.append(
            f"{result['acked']} subscribed"
            + (f", then {result['first_error']['code']}" if result["first_error"] else "")
        )
        if result["first_error"] or result["ended"] or result["acked"] < count:
            refused = {
                **(result["first_error"] or {"code": result["ended"]}),
                "after_subscriptions": done,
            }
    return {"subscribed": done, "refused": refused, "connections": connections}


async def case_tenant_quota(run: Run) -> Json:
    args = ["--max-topics", str(TOPIC_CAP), "--api-key", API_KEY]
    tenant_cap = None
    if run.help.has("--tenant-max-topics"):
        tenant_cap = TOPIC_CAP // 2
        args += ["--tenant-max-topics", str(tenant_cap)]
    server = await run.start_server(args, env={"TIDINGS_JWT_SECRET": JWT_SECRET})
    await run.start_watch(token=make_token("watcher", publish=["*"]))
    await run.begin_attack()
    a_token = make_token("mallory", "a", publish=["*"])
    # Tenant A creates topics until refused, first by publishing to new topics (as the
    # issue did), then by subscribing to new ones and staying, which pins them.
    flood = await publish_many(
        server.port,
        TOPIC_CAP + 200,
        lambda i: f"a-{i}",
        lambda i: {"i": i},
        token=a_token,
        window=50,
        stop_on_error=True,
        limit=60,
    )
    pinned = await subscribe_flood(run, a_token, TOPIC_CAP + 200)
    info = await health(server.port)
    run.mark("tenant a at its quota", published=flood["acked"], subscribed=pinned["subscribed"])
    b = await tenant_b_checks(server.port, make_token("bob", "b", publish=["*"]))
    api_b = await api_publish(server.port, "api-news", "b")
    api_default = await api_publish(server.port, "api-news")
    run.mark("others tried")
    for ws in run.sockets:
        ws.abort()
    run.mark("tenant a left")
    await run.settle(2)
    publish_refusal = (flood["first_error"] or {}).get("code", "no refusal")
    subscribe_refusal = (pinned["refused"] or {}).get("code", "no refusal")
    return {
        "attack": {
            "max_topics": TOPIC_CAP,
            "tenant_max_topics": tenant_cap,
            "note": f"max_topics lowered to {TOPIC_CAP} (issue: 100,000) to be quick",
            "publish_flood": flood,
            "subscribe_flood": pinned,
        },
        "attacker": {
            "published_to_new_topics": flood["acked"],
            "publish_refused_with": flood["first_error"],
            "subscribed_to_new_topics": pinned["subscribed"],
            "subscribe_refused_with": pinned["refused"],
        },
        "topics_on_node_at_quota": info.get("topics"),
        "tenant_b": b,
        "api_publish_tenant_b": api_b,
        "api_publish_default_tenant": api_default,
        "attacker_summary": (
            f"tenant a published to {flood['acked']} new topics, then {publish_refusal}; "
            f"subscribed to {pinned['subscribed']} more, then {subscribe_refusal}; node held "
            f"{info.get('topics')} topics; b: {b}; API: b {api_b}, default {api_default}"
        ),
    }


async def case_topic_cap_none(run: Run) -> Json:
    server = await run.start_server(["--max-topics", str(TOPIC_CAP), "--api-key", API_KEY])
    await run.start_watch()
    await run.begin_attack()
    flood = await publish_many(
        server.port,
        TOPIC_CAP + 200,
        lambda i: f"flood-{i}",
        lambda i: {"i": i},
        window=50,
        stop_on_error=True,
        limit=60,
    )
    left_at = trio.current_time()
    run.mark("flooder left", created=flood["acked"])
    api_status = await api_publish(server.port, "api-new")
    polls: list[Json] = []
    freed_after: float | None = None
    window = run.pick(60, 20)
    while trio.current_time() - left_at < window:
        tick = trio.current_time()
        info = await health(server.port)
        probe = await publish_once(server.port, f"probe-{len(polls)}")
        polls.append(
            {
                "t": round(tick - left_at, 1),
                "topics": info.get("topics"),
                "new_topic_publish": probe,
            }
        )
        if probe == "ok":
            freed_after = round(tick - left_at, 1)
            break
        await trio.sleep_until(tick + 1.0)
    run.mark("polled")
    await run.settle(1)
    return {
        "attack": {
            "max_topics": TOPIC_CAP,
            "note": "auth none; one connection publishes to "
            "distinct topics until refused, then leaves",
            "flood": flood,
        },
        "attacker": {"topics_created": flood["acked"], "refused_with": flood["first_error"]},
        "api_publish_new_topic_after_flood": api_status,
        "cap_full_for_s": freed_after if freed_after is not None else f">= {window}",
        "freed_after_s": freed_after,
        "poll_window_s": window,
        "polls": polls[:5] + polls[-3:] if len(polls) > 8 else polls,
        "attacker_summary": (
            f"created {flood['acked']} topics, then "
            f"{(flood['first_error'] or {}).get('code', 'no refusal')}; API new topic: "
            f"{api_status}; a new topic was "
            + (
                f"accepted {freed_after} s after"
                if freed_after is not None
                else f"still refused {window} s after"
            )
        ),
    }


async def case_slow_handshakes(run: Run) -> Json:
    server = await run.start_server(nofile=1024)
    await run.start_watch(source=OTHER_HOST)
    await run.begin_attack()
    duration = run.pick(30, 15)
    slow = Counter[str]()
    lifetimes: list[float] = []
    responses: Counter[str] = Counter()
    open_now = 0
    peak_open = 0
    healthy: list[Json] = []

    async def slow_socket() -> None:
        nonlocal open_now, peak_open
        while True:
            try:
                stream = await open_tcp(server.port, source=HOST, limit=5.0)
            except NETWORK_ERRORS as exc:
                slow[f"connect failed: {describe(exc)}"] += 1
                await trio.sleep(1.0)
                continue
            slow["connected"] += 1
            open_now += 1
            peak_open = max(peak_open, open_now)
            opened = trio.current_time()
            try:
                for byte in upgrade_request(server.port, "/ws"):
                    await stream.send_all(bytes([byte]))
                    with trio.move_on_after(1.0):  # paces the bytes and sees the server close
                        data = await stream.receive_some(4096)
                        responses[data.split(b"\r\n", 1)[0].decode(errors="replace") or "EOF"] += 1
                        slow["closed by server"] += 1
                        break
            except NETWORK_ERRORS as exc:
                slow[f"closed by server: {describe(exc)}"] += 1
            finally:
                open_now -= 1
                lifetimes.append(trio.current_time() - opened)
                stream.socket.close()
            await trio.sleep(1.0)  # then open another, as a slowloris does

    async def healthy_connect(at: float) -> None:
        await trio.sleep_until(at)
        started = trio.current_time()
        entry: Json = {"at_s": run.since_attack()}
        try:
            ws = await RawWS.connect(server.port, "/ws", source=OTHER_HOST, limit=5.0)
            try:
                reply = await request(ws, {"type": "subscribe", "topic": "watch", "requestId": "h"})
                entry["result"] = "101, " + outcome(reply)
            finally:
                ws.abort()
        except NETWORK_ERRORS as exc:
            entry["result"] = describe(exc)
        entry["seconds"] = round(trio.current_time() - started, 2)
        healthy.append(entry)

    attempts = 10 if duration >= 30 else 5
    spacing = (duration - 4.0) / attempts  # the last one starts 4 s or more before the end
    async with trio.open_nursery() as healthy_clients:
        for i in range(attempts):
            healthy_clients.start_soon(healthy_connect, run.attack_at + 2.0 + spacing * i)
        async with trio.open_nursery() as attackers:
            for _ in range(1100):
                attackers.start_soon(slow_socket)
            await trio.sleep(duration)
            attackers.cancel_scope.cancel()
    run.mark("attackers left")
    await run.settle(3)
    ok = sum(h["result"].startswith("101") for h in healthy)
    lifetimes.sort()
    return {
        "attack": {
            "sockets": 1100,
            "source": HOST,
            "rate": "1 byte/s of an upgrade request, reopened 1 s after it was closed",
            "duration_s": duration,
            "server_nofile": 1024,
        },
        "attacker": {
            "events": dict(slow),
            "peak_open": peak_open,
            "server_responses": dict(responses.most_common(5)),
            "median_lifetime_s": round(lifetimes[len(lifetimes) // 2], 1) if lifetimes else None,
        },
        "healthy_connects": healthy,
        "healthy_connects_ok": ok,
        "attacker_summary": (
            f"peak {peak_open} slow sockets open, {slow['connected']} connects; "
            f"healthy from {OTHER_HOST}: {ok}/{len(healthy)} got 101"
        ),
    }


async def case_no_connect(run: Run) -> Json:
    connect_timeout = run.help.seconds("--connect-timeout", 10.0)
    args = ["--read-timeout", "5", "--ping-interval", "2", "--max-connections", "102"]
    server = await run.start_server(args, env={"TIDINGS_JWT_SECRET": JWT_SECRET})
    token = make_token("watcher", publish=["*"])
    await run.start_watch(token=token)  # two connections: the watch and its publisher
    await run.begin_attack()
    window = 20.0
    sockets: list[Json] = []

    async def squatter(entry: Json) -> None:
        try:
            ws = await RawWS.connect(server.port, "/connection/websocket", limit=5.0)
        except NETWORK_ERRORS as exc:
            entry["upgrade"] = describe(exc)
            return
        entry["upgrade"] = "101"
        opened = trio.current_time()

        async def keep_sending() -> None:
            try:
                while True:
                    await ws.send_text(b"{}")
                    await trio.sleep(1.0)
            except NETWORK_ERRORS as exc:  # the reader sees the close too
                entry["send_failed"] = describe(exc)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_sending)
                try:
                    while True:
                        await ws.next_message(answer_pings=False)
                except NETWORK_ERRORS as exc:
                    entry["closed"] = describe(exc)
                    entry["closed_after_s"] = round(trio.current_time() - opened, 2)
                nursery.cancel_scope.cancel()
        finally:
            ws.abort()

    async def valid_client() -> str:
        try:
            ws = await RawWS.connect(server.port, "/ws", token=token, limit=5.0)
        except NETWORK_ERRORS as exc:
            return describe(exc)
        ws.abort()
        return "101"

    async with trio.open_nursery() as nursery:
        for _ in range(100):
            sockets.append({})
            nursery.start_soon(squatter, sockets[-1])
        await trio.sleep(3)
        early = await valid_client()
        await trio.sleep_until(run.attack_at + connect_timeout + 3)
        after_deadline = await valid_client()
        await trio.sleep_until(run.attack_at + window)
        still_open = sum(s.get("upgrade") == "101" and "closed" not in s for s in sockets)
        late = await valid_client()
        nursery.cancel_scope.cancel()
    run.mark("squatters left")
    await run.settle(2)
    upgraded = [s for s in sockets if s.get("upgrade") == "101"]
    closed_times = sorted(s["closed_after_s"] for s in upgraded if "closed_after_s" in s)
    return {
        "attack": {
            "sockets": 100,
            "path": "/connection/websocket",
            "sends": "{} every second",
            "read_timeout_s": 5,
            "ping_interval_s": 2,
            "max_connections": 102,
            "connect_timeout_s": connect_timeout,
            "connect_timeout_flag": run.help.has("--connect-timeout"),
        },
        "attacker": {
            "upgrades": dict(Counter(s.get("upgrade", "?") for s in sockets)),
            "still_open_after_s": {str(window): still_open},
            "closes": dict(Counter(s.get("closed", "open") for s in upgraded)),
            "closed_after_s": {"min": closed_times[0], "max": closed_times[-1]}
            if closed_times
            else None,
        },
        "valid_jwt_client_on_ws": {
            "at_3s": early,
            f"at_{connect_timeout + 3:g}s": after_deadline,
            f"at_{window:g}s": late,
        },
        "connect_timeout_s": connect_timeout,
        "attacker_summary": (
            f"{len(upgraded)} upgraded, {still_open} still open after {window:g} s, "
            f"closes {dict(Counter(s.get('closed', 'open') for s in upgraded))}; valid JWT "
            f"on /ws: {early} at 3 s, {after_deadline} at {connect_timeout + 3:g} s, "
            f"{late} at {window:g} s"
        ),
    }


async def case_slow_reader(run: Run) -> Json:
    """Readers take 10 events/s while 50/s are published; then they read at full speed, and
    a last marker event shows any drop at the tail as a gap too. Every published event must
    then be either received or visible as a gap, on a connection that stayed open."""
    server = await run.start_server()
    await run.start_watch()
    await run.begin_attack()
    duration = run.pick(30, 12)
    readers: list[Json] = [{"events": 0, "gaps": 0} for _ in range(5)]
    fast = trio.Event()
    dropped_before = dropped_total(await metrics(server.port)) or 0

    async def reader(state: Json) -> None:
        try:
            ws = await RawWS.connect(server.port, "/ws", rcvbuf=16384)
        except NETWORK_ERRORS as exc:
            state["closed"] = f"upgrade: {describe(exc)}"
            return
        try:
            reply = await request(ws, {"type": "subscribe", "topic": "slow", "requestId": "s"})
            last = state["subscribed_seq"] = reply.get("payload", {}).get("seq")
            started = trio.current_time()
            while True:
                message = await ws.next_json()  # answers the server's pings
                state["last_message_at"] = trio.current_time()
                if message.get("type") == "event":
                    seq = message["seq"]
                    if last is not None and seq > last + 1:
                        state["gaps"] += seq - last - 1
                    last = state["last_seq"] = seq
                    state["events"] += 1
                if not fast.is_set():
                    state["events_while_slow"] = state["events"]
                    state["gaps_while_slow"] = state["gaps"]
                    await trio.sleep_until(started + state["events"] / 10)  # 10/s at most
        except NETWORK_ERRORS as exc:
            state["closed"] = describe(exc)
            state["closed_at_s"] = run.since_attack()
        finally:
            ws.abort()

    def idle(seconds: float) -> bool:
        now = trio.current_time()
        return all("closed" in s or now - s.get("last_message_at", 0) >= seconds for s in readers)

    publisher = Publisher(server.port, "slow", 50.0, pad=PAD_1K)
    marker: Json = {}
    async with trio.open_nursery() as nursery:
        for state in readers:
            nursery.start_soon(reader, state)
        await trio.sleep(0.5)
        nursery.start_soon(publisher.run)
        await trio.sleep(duration)
        await publisher.stop()
        run.mark("publishing stopped; readers now read at full speed")
        fast.set()
        await wait_until(lambda: idle(1.0), 15.0)
        marker = await publish_many(server.port, 1, lambda i: "slow", lambda i: {"marker": 1})
        top = marker["last_seq"] or 0
        await wait_until(
            lambda: all("closed" in s or s.get("last_seq", 0) >= top for s in readers), 3.0
        )
        nursery.cancel_scope.cancel()
    dropped = (dropped_total(await metrics(server.port)) or 0) - dropped_before
    run.mark("readers left")
    await run.settle(2)
    top = marker.get("last_seq")
    for state in readers:
        state.pop("last_message_at", None)
        state["connected_throughout"] = "closed" not in state
        if top is not None and state.get("subscribed_seq") is not None:
            expected = top - state["subscribed_seq"]
            state["missing_at_end"] = top - state.get("last_seq", state["subscribed_seq"])
            state["accounted"] = state["events"] + state["gaps"] == expected
    connected = sum(s["connected_throughout"] for s in readers)
    return {
        "attack": {
            "readers": 5,
            "reader_rate": 10,
            "publish_rate": 50,
            "event_bytes": "~1 KiB",
            "duration_s": duration,
            "reader_rcvbuf": 16384,
            "policy": "drop (default)",
        },
        "publisher": publisher.result(),
        "marker_seq": top,
        "readers": readers,
        "readers_connected_throughout": connected,
        "dropped_metric_delta": dropped,
        "attacker_summary": (
            f"{connected}/5 readers stayed connected; while slow: events "
            f"{[s.get('events_while_slow', 0) for s in readers]}, gaps "
            f"{[s.get('gaps_while_slow', 0) for s in readers]}; in all: events "
            f"{[s['events'] for s in readers]}, gaps {[s['gaps'] for s in readers]}, "
            f"missing at end {[s.get('missing_at_end') for s in readers]}; server counted "
            f"{dropped:g} drops; closes {[s['closed'] for s in readers if 'closed' in s]}"
        ),
    }


# --- the smaller items (point 9) ---


async def redis_ping(port: int) -> bool:
    try:
        with trio.fail_after(1):
            stream = await open_tcp(port, limit=1)
            async with stream:
                await stream.send_all(b"PING\r\n")
                return (await stream.receive_some(64)).startswith(b"+PONG")
    except NETWORK_ERRORS:
        return False


async def case_redis_freeze(run: Run) -> Json:
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        return {"skipped": "redis-server not found on PATH"}
    redis_port = free_port()
    fd, log_name = tempfile.mkstemp(prefix="hostile-redis-", suffix=".log")
    os.close(fd)
    redis = spawn(
        [
            redis_server,
            "--port",
            str(redis_port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        Path(log_name),
        dict(os.environ),
    )
    run.others.append(redis)
    if not await _await_redis(redis_port):
        return {"skipped": "redis-server did not answer PING"}
    server = await run.start_server(
        ["--backplane", f"redis://{HOST}:{redis_port}/0", "--api-key", API_KEY]
    )
    await run.start_watch()
    await run.begin_attack()
    before = await health(server.port)
    freeze = 10.0
    os.kill(redis.pid, signal.SIGSTOP)
    frozen_at = trio.current_time()
    run.mark("redis frozen (SIGSTOP)")
    ticks: list[Json] = []

    async def probe_health(entry: Json) -> None:
        try:
            info = await health(server.port)
            entry["health"] = f"{info['status_code']} {info.get('status')}"
        except (*NETWORK_ERRORS, ValueError) as exc:
            entry["health"] = describe(exc)

    async def probe_publish(entry: Json) -> None:
        started = trio.current_time()
        entry["publish"] = await api_publish(server.port, "frozen")
        entry["publish_s"] = round(trio.current_time() - started, 2)

    try:
        # Once a second, a /health and an API publish, each in its own task: a publish
        # that waits for Redis does not delay the next tick.
        async with trio.open_nursery() as nursery:
            while trio.current_time() - frozen_at < freeze:
                tick = trio.current_time()
                ticks.append({"t": round(tick - frozen_at, 1)})
                nursery.start_soon(probe_health, ticks[-1])
                nursery.start_soon(probe_publish, ticks[-1])
                await trio.sleep_until(tick + 1.0)
    finally:
        os.kill(redis.pid, signal.SIGCONT)
    run.mark("redis resumed (SIGCONT)")
    await trio.sleep(3)
    after = await health(server.port)
    publish_after = await api_publish(server.port, "thawed")
    await run.settle(1)
    failed = [t for t in ticks if t.get("publish") != "200"]
    # The tick at t=0 probes /health in the same instant Redis stops: nothing
    # has waited on it yet, so no server can know. From t=1 on, one has.
    ok_while_failing = [
        t for t in failed if t["t"] >= 1 and str(t.get("health", "")).endswith(" ok")
    ]
    return {
        "attack": {"freeze_s": freeze, "redis_port": redis_port},
        "health_before": before.get("status"),
        "ticks": ticks,
        "publishes_failed": len(failed),
        "health_ok_while_publish_failed": len(ok_while_failing),
        "health_after": after.get("status"),
        "publish_after": publish_after,
        "attacker_summary": (
            f"{len(failed)}/{len(ticks)} API publishes failed during the freeze "
            f"({Counter(t.get('publish') for t in ticks)}); /health said "
            f"{dict(Counter(t.get('health') for t in ticks))}; after: {after.get('status')}, "
            f"publish {publish_after}"
        ),
    }


async def _await_redis(port: int) -> bool:
    deadline = trio.current_time() + 10
    while trio.current_time() < deadline:
        if await redis_ping(port):
            return True
        await trio.sleep(0.1)
    return False


async def case_string_number(run: Run) -> Json:
    server = await run.start_server()
    await publish_many(server.port, 5, lambda i: "amp", lambda i: {"i": i})
    await run.start_watch()
    await run.begin_attack()
    log_before = server.log_summary()
    ws = await run.connect("/connection/websocket")
    await ws.send_text(b'{"id":1,"connect":{}}')
    with trio.fail_after(5):
        connect_reply = (await ws.next_message()).decode(errors="replace")
    lines, size, k = [], 0, 2
    while size < 300_000:
        line = f'{{"id":{k},"history":{{"channel":"amp","limit":"\u00b2"}}}}'
        lines.append(line)
        size += len(line.encode()) + 1
        k += 1
    data = "\n".join(lines).encode()
    await ws.send_text(data)
    replies: Counter[str] = Counter()
    ended = None
    with trio.move_on_after(5):
        try:
            while True:
                for reply_line in (await ws.next_message()).splitlines():
                    with contextlib.suppress(ValueError, AttributeError):
                        reply = orjson.loads(reply_line)
                        error = reply.get("error")
                        replies[f"error {error.get('code')}" if error else "result"] += 1
        except NETWORK_ERRORS as exc:
            ended = describe(exc)
    ws.abort()
    await trio.sleep(1)
    log_after = server.log_summary()
    run.mark("attacker left")
    await run.settle(1)
    tracebacks = log_after["traceback_lines"] - log_before["traceback_lines"]
    log_growth = log_after["bytes"] - log_before["bytes"]
    return {
        "attack": {"frame_bytes": len(data), "commands": len(lines), "limit": "\u00b2"},
        "connect_reply": connect_reply[:200],
        "attacker": {"replies": dict(replies), "ended": ended},
        "traceback_lines_added": tracebacks,
        "log_bytes_added": log_growth,
        "attacker_summary": (
            f"{len(lines)} commands in {len(data):,} bytes: replies {dict(replies)}, "
            f"{ended or 'still open'}; server log +{log_growth:,} bytes, "
            f"+{tracebacks} traceback lines"
        ),
    }


async def case_jwt_exp_string(run: Run) -> Json:
    server = await run.start_server(env={"TIDINGS_JWT_SECRET": JWT_SECRET})
    await run.start_watch(token=make_token("watcher", publish=["*"]))
    await run.begin_attack()
    token = make_token("eve", exp=str(int(time.time()) + 3600))
    try:
        ws = await RawWS.connect(server.port, "/ws", token=token, limit=5)
        ws.abort()
        native = "101"
    except NETWORK_ERRORS as exc:
        native = describe(exc)
    centrifugo = "?"
    try:
        ws = await RawWS.connect(server.port, "/connection/websocket", limit=5)
        try:
            await ws.send_text(orjson.dumps({"id": 1, "connect": {"token": token}}))
            with trio.fail_after(5):
                reply = orjson.loads((await ws.next_message()).splitlines()[0])
            centrifugo = "accepted" if "connect" in reply else f"error {reply.get('error')}"
        finally:
            ws.abort()
    except NETWORK_ERRORS as exc:
        centrifugo = describe(exc)
    run.mark("attacker left")
    await run.settle(1)
    return {
        "attack": {"claims": {"sub": "eve", "exp": "<a numeric string, an hour ahead>"}},
        "native_upgrade": native,
        "centrifugo_connect": centrifugo,
        "attacker_summary": f"/ws upgrade: {native}; Centrifugo connect: {centrifugo}",
    }


async def case_cl_te(run: Run) -> Json:
    server = await run.start_server(["--api-key", API_KEY])
    await run.start_watch()
    await run.begin_attack()
    body = b'{"topic":"clte","payload":1}'
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    head = (
        f"POST /api/publish HTTP/1.1\r\nHost: {HOST}:{server.port}\r\n"
        f"Authorization: apikey {API_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    result: Json = {}
    stream = await open_tcp(server.port)
    try:
        await stream.send_all(head + chunked)
        data = bytearray()
        with trio.move_on_after(3):
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
        raw_head, _, rest = bytes(data).partition(b"\r\n\r\n")
        if raw_head:
            status, headers = parse_head(raw_head)
            result["status"] = status
            result["connection_header"] = headers.get("connection")
            length = int(headers.get("content-length", "0") or 0)
            with trio.move_on_after(2):
                while len(rest) < length:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    rest += chunk
            result["body"] = rest[:200].decode(errors="replace")
        else:
            result["status"] = None
        # Does the connection stay open? Wait for EOF, then try a second request on it.
        state = "open after 2 s"
        with trio.move_on_after(2):
            try:
                chunk = await stream.receive_some(65536)
                state = "closed by server" if not chunk else "more data"
            except NETWORK_ERRORS as exc:
                state = f"closed by server ({describe(exc)})"
        result["connection"] = state
        if state.startswith("open"):
            try:
                await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                with trio.fail_after(2):
                    second = await stream.receive_some(65536)
                result["second_request"] = second.split(b"\r\n", 1)[0].decode() or "EOF"
            except NETWORK_ERRORS as exc:
                result["second_request"] = describe(exc)
    except NETWORK_ERRORS as exc:
        result["error"] = describe(exc)
    finally:
        stream.socket.close()
    run.mark("attacker left")
    await run.settle(1)
    return {
        "attack": {
            "request": "POST /api/publish with Content-Length and Transfer-Encoding: chunked"
        },
        "attacker": result,
        "attacker_summary": (
            f"answered {result.get('status')}, connection {result.get('connection')}"
            + (
                f", second request: {result['second_request']}"
                if "second_request" in result
                else ""
            )
        ),
    }


def disconnect_counts(values: dict[str, float]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for key, value in values.items():
        if key.startswith("tidings_disconnects_total{"):
            match = re.search(r'code="(\d+)"', key)
            reason = re.search(r'reason="([^"]*)"', key)
            if match:
                counts[f"{match[1]} {reason[1] if reason else ''}".strip()] += int(value)
    return counts


def dropped_total(values: dict[str, float]) -> float | None:
    found = [
        v
        for k, v in values.items()
        if k.startswith("tidings_events_dropped_total") and 'reason="overflow"' in k
    ]
    return sum(found) if found else None


#: Events published at a client that does not read, in small/disconnect-overflow.
OVERFLOW_EVENTS = 6000


async def case_disconnect_overflow(run: Run) -> Json:
    server = await run.start_server(["--overflow-policy", "disconnect"])
    write_timeout = run.help.seconds("--write-timeout", 10.0)
    await run.start_watch()
    await run.begin_attack()
    before = await metrics(server.port)
    ws = await run.connect("/ws", rcvbuf=4096)
    reply = await request(ws, {"type": "subscribe", "topic": "flood", "requestId": "s"})
    run.mark("non-reader subscribed", reply=outcome(reply))
    # More than the kernel holds between the two ends (loopback send buffers grow
    # to 4 MiB): with 1,000 events every one of them fit, nothing waited in the
    # outbox, and there was nothing to overflow.
    fill = await publish_many(
        server.port,
        OVERFLOW_EVENTS,
        lambda i: "flood",
        lambda i: {"i": i, "pad": PAD_1K},
        window=100,
    )
    published_at = trio.current_time()
    run.mark(f"{OVERFLOW_EVENTS:,} events published", fill=fill)
    with trio.move_on_after(write_timeout + 5):
        while True:  # until the server records a close it made itself
            recorded = disconnect_counts(await metrics(server.port)) - disconnect_counts(before)
            if any(not key.endswith("by client") for key in recorded):
                break
            await trio.sleep(0.5)
    seen_after = round(trio.current_time() - published_at, 1)
    got = await ws.drain(3.0)
    ws.abort()
    await trio.sleep(0.5)
    after = await metrics(server.port)
    recorded = disconnect_counts(after) - disconnect_counts(before)
    left = {key: n for key, n in recorded.items() if key.endswith("by client")}
    recorded = Counter({key: n for key, n in recorded.items() if key not in left})
    log = server.log_summary()
    run.mark("attacker left")
    await run.settle(1)
    metric = dropped_total(after)
    return {
        "attack": {
            "policy": "disconnect",
            "events": OVERFLOW_EVENTS,
            "event_bytes": "~1 KiB",
            "rcvbuf": 4096,
            "write_timeout_s": write_timeout,
        },
        "server_recorded_closes": dict(recorded),
        "clients_that_left": left,
        "recorded_within_s": seen_after,
        "attacker": {"read_after": got},
        "client_saw_close_code": got["close_code"],
        "dropped_metric": metric,
        "dropped_per_connection_in_log": log["dropped_in_disconnect_lines"],
        "attacker_summary": (
            f"server recorded {dict(recorded)}; the client then read "
            f"{got['bytes_read']:,} bytes, close frame {got['close_code']}, "
            f"{got['ended'] or 'still open'}; dropped metric {metric} vs "
            f"{log['dropped_in_disconnect_lines']} in the connections' own counts"
        ),
    }


# --- targets ------------------------------------------------------------------------


def check(must: str, met: bool | None, observed: str) -> Json:
    return {"must": must, "met": met, "observed": observed}


def growth(result: Json) -> int | None:
    rss = result.get("rss")
    return rss["growth_peak_bytes"] if rss else None


def growth_check(result: Json, limit_mb: float, what: str = "RSS growth at peak") -> Json:
    value = growth(result)
    if value is None:
        return check(f"{what} < {limit_mb:g} MB", None, "not measured")
    return check(f"{what} < {limit_mb:g} MB", value < limit_mb * MB, f"+{value / MB:.1f} MB")


def serving_check(result: Json) -> Json:
    watch = result.get("watch")
    if not watch:
        return check(
            "node serving (healthy client missed nothing, /health answered)",
            None,
            "no healthy client",
        )
    ok = not watch["missed_anything"] and not watch["health_probe"]["failed"]
    return check(
        "node serving (healthy client missed nothing, /health answered)", ok, watch_line(watch)
    )


def judge_amplification(result: Json) -> list[Json]:
    return [growth_check(result, 50), serving_check(result)]


def judge_ping_flood(result: Json) -> list[Json]:
    closed = (result.get("attacker") or {}).get("client_closed")
    return [
        growth_check(result, 20),
        check("client closed", closed, "closed" if closed else "not closed"),
    ]


def judge_fragments(result: Json) -> list[Json]:
    rss = result.get("rss") or {}
    held = rss.get("growth_held_bytes")
    return [
        growth_check(result, 40),
        check(
            "(reported) growth held after they left",
            None,
            f"+{held / MB:.1f} MB" if held is not None else "not measured",
        ),
    ]


def judge_history_resume(result: Json) -> list[Json]:
    extra = result.get("growth_over_filled_history_bytes")
    return [
        growth_check(result, 300, "RSS growth at peak, from the fresh server (history included)"),
        check(
            "(reported) growth from the 8 resumers alone",
            None,
            f"+{extra / MB:.1f} MB" if extra is not None else "not measured",
        ),
    ]


def judge_tenant_quota(result: Json) -> list[Json]:
    if "tenant_b" not in result:
        return [check("B and the API unaffected", None, "not measured")]
    b = result["tenant_b"]
    b_ok = all(b.get(k) == "ok" for k in ("subscribe", "publish", "publish_new_topic"))
    api_ok = (
        result["api_publish_tenant_b"] == "200" and result["api_publish_default_tenant"] == "200"
    )
    return [
        check("tenant B unaffected (subscribe, publish, new topic)", b_ok, str(b)),
        check(
            "the HTTP API unaffected",
            api_ok,
            f"tenant b {result['api_publish_tenant_b']}, "
            f"default {result['api_publish_default_tenant']}",
        ),
    ]


def judge_topic_cap_none(result: Json) -> list[Json]:
    if "poll_window_s" not in result:
        return [check("cap not pinned", None, "not measured")]
    freed = result["freed_after_s"]
    return [
        check(
            "(no figure in the table) the API keeps publishing while the cap is full",
            result["api_publish_new_topic_after_flood"] == "200",
            result["api_publish_new_topic_after_flood"],
        ),
        check(
            "(no figure in the table) a publish-only flood does not pin the cap for minutes"
            f" (freed within the {result['poll_window_s']:g} s polled)",
            freed is not None,
            f"a new topic accepted {freed} s after the flooder left"
            if freed is not None
            else f"still full {result['poll_window_s']:g} s after the flooder left",
        ),
    ]


def judge_slow_handshakes(result: Json) -> list[Json]:
    healthy = result.get("healthy_connects")
    if not healthy:
        return [check(f"healthy clients from {OTHER_HOST} all connect", None, "not measured")]
    ok = result["healthy_connects_ok"]
    return [
        check(
            f"healthy clients from {OTHER_HOST} all connect (101)",
            ok == len(healthy),
            f"{ok}/{len(healthy)}: {Counter(h['result'] for h in healthy)}",
        )
    ]


def judge_no_connect(result: Json) -> list[Json]:
    attacker = result.get("attacker")
    if not attacker:
        return [check("all closed within connect_timeout + 2 s", None, "not measured")]
    limit = result["connect_timeout_s"] + 2
    closed = attacker["closed_after_s"]
    upgraded = attacker["upgrades"].get("101", 0)
    all_closed = (
        upgraded > 0
        and sum(attacker["closes"].values()) - attacker["closes"].get("open", 0) == upgraded
        and closed is not None
        and closed["max"] <= limit
    )
    late = list(result["valid_jwt_client_on_ws"].values())[-1]
    return [
        check(
            f"all closed within connect_timeout + 2 s ({limit:g} s)",
            all_closed,
            f"{attacker['still_open_after_s']} still open; closes {attacker['closes']}; "
            f"closed after {closed}",
        ),
        check(
            "a client with a valid JWT still connects to /ws",
            late == "101",
            str(result["valid_jwt_client_on_ws"]),
        ),
    ]


def judge_slow_reader(result: Json) -> list[Json]:
    readers = result.get("readers")
    if not readers:
        return [check("stays connected, sees the drops as seq gaps", None, "not measured")]
    connected = all(r["connected_throughout"] for r in readers)
    accounted = all(r.get("accounted") for r in readers)
    gaps = sum(r["gaps"] for r in readers)
    visible = gaps > 0 or not result["dropped_metric_delta"]
    return [
        check(
            "stays connected, sees the drops as seq gaps (every event received or a gap)",
            connected and accounted and visible,
            result["attacker_summary"],
        )
    ]


def judge_redis_freeze(result: Json) -> list[Json]:
    if "skipped" in result or "ticks" not in result:
        return [check("/health not ok while publishes fail", None, result.get("skipped", "?"))]
    failed = result["publishes_failed"]
    bad = result["health_ok_while_publish_failed"]
    return [
        check(
            "/health not 'ok' while the backplane cannot publish",
            bad == 0,
            f"{failed} publishes failed, /health said ok at {bad} of those ticks"
            " (from 1 s into the freeze)",
        )
    ]


def judge_string_number(result: Json) -> list[Json]:
    if "traceback_lines_added" not in result:
        return [check("no traceback per command", None, "not measured")]
    tracebacks, grown = result["traceback_lines_added"], result["log_bytes_added"]
    return [
        check(
            "a Centrifugo error, no traceback, the client logged once (log < 20 KB)",
            tracebacks == 0 and grown < 20_000,
            f"+{tracebacks} traceback lines, log +{grown:,} bytes",
        )
    ]


def judge_jwt_exp_string(result: Json) -> list[Json]:
    native = result.get("native_upgrade")
    return [
        check(
            "a JWT whose exp is a string is refused (401)",
            native == "HTTP 401",
            f"/ws: {native}; Centrifugo connect: {result.get('centrifugo_connect')}",
        )
    ]


def judge_cl_te(result: Json) -> list[Json]:
    attacker = result.get("attacker") or {}
    ok = attacker.get("status") == 400 and str(attacker.get("connection", "")).startswith("closed")
    return [
        check(
            "400 and the connection closed",
            ok,
            f"{attacker.get('status')}, {attacker.get('connection')}",
        )
    ]


def judge_disconnect_overflow(result: Json) -> list[Json]:
    if "server_recorded_closes" not in result:
        return [check("1008", None, "not measured")]
    recorded = result["server_recorded_closes"]
    got_1008 = any(key.startswith("1008") for key in recorded)
    metric, own = result["dropped_metric"], result["dropped_per_connection_in_log"]
    return [
        check(
            "under disconnect, the client that stopped reading is closed with 1008",
            got_1008,
            f"server recorded {recorded}; client saw close frame {result['client_saw_close_code']}",
        ),
        check(
            "dropped-events metric counts only outboxes still open",
            None if metric is None else metric == own,
            f"metric {metric} vs {own} counted by the connections themselves",
        ),
    ]


# --- the registry and the runner ----------------------------------------------------


@dataclass
class Case:
    name: str
    must: str
    run: Callable[[Run], Awaitable[Json]]
    judge: Callable[[Json], list[Json]]
    in_quick: bool = True

    @property
    def group(self) -> str:
        return self.name.split("/", 1)[0]


CASES = [
    Case(
        "centrifugo-history-amplification/10KiB",
        "< 50 MB, node serving (today +394 MB)",
        functools.partial(case_amplification, frame_kib=10),
        judge_amplification,
    ),
    Case(
        "centrifugo-history-amplification/32KiB",
        "< 50 MB, node serving (today +1.22 GB)",
        functools.partial(case_amplification, frame_kib=32),
        judge_amplification,
        in_quick=False,
    ),
    Case("ping-flood", "< 20 MB, client closed (today +138 MB)", case_ping_flood, judge_ping_flood),
    Case("fragments", "< 40 MB (today +300 MB, +305 MB held)", case_fragments, judge_fragments),
    Case("history-resume", "< 300 MB (today 2.27 GB)", case_history_resume, judge_history_resume),
    Case(
        "tenant-topic-quota/jwt",
        "B and the API unaffected (today B locked out, API 503)",
        case_tenant_quota,
        judge_tenant_quota,
    ),
    Case(
        "tenant-topic-quota/auth-none",
        "API unaffected; cap not pinned for minutes (today full 300 s after)",
        case_topic_cap_none,
        judge_topic_cap_none,
    ),
    Case(
        "slow-handshakes",
        f"clients from {OTHER_HOST} all connect (today 3 of 5 failed)",
        case_slow_handshakes,
        judge_slow_handshakes,
    ),
    Case(
        "centrifugo-no-connect",
        "all closed within connect_timeout + 2 s (today open forever)",
        case_no_connect,
        judge_no_connect,
    ),
    Case(
        "slow-reader-drop",
        "stays connected, sees the drops as seq gaps (today closed)",
        case_slow_reader,
        judge_slow_reader,
    ),
    Case(
        "small/redis-freeze-health",
        "/health degraded while the backplane cannot publish",
        case_redis_freeze,
        judge_redis_freeze,
    ),
    Case(
        "small/centrifugo-string-number",
        "Centrifugo error, no traceback per command",
        case_string_number,
        judge_string_number,
    ),
    Case("small/jwt-exp-string", "401", case_jwt_exp_string, judge_jwt_exp_string),
    Case("small/content-length-and-chunked", "400 and close", case_cl_te, judge_cl_te),
    Case(
        "small/disconnect-overflow",
        "1008; dropped metric counts open outboxes only",
        case_disconnect_overflow,
        judge_disconnect_overflow,
    ),
]


def leaf_exceptions(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or ``exc`` itself."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaf_exceptions(inner)]
    return [exc]


async def run_case(case: Case, quick: bool, help_: ServerHelp) -> Json:
    result: Json = {"case": case.name, "must": case.must}
    started = time.monotonic()
    run: Run | None = None
    try:
        async with trio.open_nursery() as nursery:
            run = Run(case.name, quick, help_, nursery)
            with trio.move_on_after(CASE_DEADLINE) as deadline:
                result |= await case.run(run)
            if deadline.cancelled_caught:
                result["deadline_hit"] = f"stopped at the {CASE_DEADLINE:g} s deadline"
            await run.finish()
            nursery.cancel_scope.cancel()
    except Exception as exc:  # a case that breaks is reported, the others still run
        result["error"] = "; ".join(
            f"{type(leaf).__name__}: {leaf}" for leaf in leaf_exceptions(exc)
        )
        result["traceback"] = traceback.format_exc()[-3000:]
        if run is not None and run.log is None and run.server is not None:
            run.log = run.server.log_summary()
    finally:
        if run is not None:
            run.close()
    if run is not None:
        result["rss"] = run.rss_report()
        result["watch"] = run.watch.result() if run.watch else None
        result["server"] = {
            "argv": run.servers[-1].argv()[3:] if run.servers else None,
            "exit_status": run.servers[-1].exit_status if run.servers else None,
            "log": run.log,
        }
        result["timeline"] = run.timeline
    result["seconds"] = round(time.monotonic() - started, 1)
    result["load_average_after"] = os.getloadavg()  # other work on the machine skews timings
    try:
        result["checks"] = case.judge(result)
    except Exception as exc:
        result["checks"] = [check(case.must, None, f"could not judge: {exc!r}")]
    return result


def met_word(met: bool | None) -> str:
    return {True: "MET", False: "NOT MET", None: "n/a"}[met]


def print_case(result: Json) -> None:
    load = result["load_average_after"][0]
    print(f"\n== {result['case']} ({result['seconds']} s, fresh server, load average {load:.1f})")
    rss = result.get("rss")
    if rss:
        print(
            f"   rss: baseline {mb(rss['baseline_bytes'])} MB, peak {mb(rss['peak_bytes'])} MB "
            f"(+{mb(rss['growth_peak_bytes'])} MB at {rss['peak_at_s']} s), end "
            f"{mb(rss['end_bytes'])} MB (+{mb(rss['growth_held_bytes'])} MB held); "
            f"VmHWM {mb(rss['vmhwm_bytes'])} MB"
        )
    for key in ("skipped", "error", "deadline_hit"):
        if key in result:
            print(f"   {key}: {result[key]}")
    if "attacker_summary" in result:
        print(f"   attacker: {result['attacker_summary']}")
    if result.get("watch"):
        print(
            f"   healthy client ({result['watch']['source_address']}): "
            f"{watch_line(result['watch'])}"
        )
    log = (result.get("server") or {}).get("log")
    if log:
        print(
            f"   server log: {log['bytes']:,} bytes, {log['traceback_lines']} traceback lines, "
            f"{log['too_many_open_files_lines']} 'too many open files'; {log['path']}"
        )
        for key, closes in log["server_closes"].items():
            print(
                f"   server closed {closes['count']} x {key}, after "
                f"{closes['after_s_min']}-{closes['after_s_max']} s connected"
            )
    for item in result.get("checks", []):
        print(f"   must: {item['must']}: {met_word(item['met'])} ({item['observed']})")


def short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def print_table(results: list[Json]) -> None:
    print("\n" + "case".ljust(40) + "growth".rjust(11) + "held".rjust(10) + "  met      healthy")
    for result in results:
        rss = result.get("rss") or {}
        peak, held = rss.get("growth_peak_bytes"), rss.get("growth_held_bytes")
        verdicts = [c["met"] for c in result.get("checks", []) if c["met"] is not None]
        met = "n/a" if not verdicts else ("yes" if all(verdicts) else "NO")
        watch = result.get("watch")
        healthy = (
            "?"
            if not watch
            else (
                "ok"
                if not watch["affected"]
                else ("missed" if watch["missed_anything"] else "affected")
            )
        )
        print(
            short(result["case"], 39).ljust(40)
            + (f"+{peak / MB:.1f} MB" if peak is not None else "-").rjust(11)
            + (f"+{held / MB:.1f} MB" if held is not None else "-").rjust(10)
            + f"  {met:<8} {healthy}"
        )


def machine() -> Json:
    """The machine, and the tidings code the servers run (the package this Python imports)."""

    def run(*argv: str, cwd: Path = ROOT) -> str:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    package = Path(run(sys.executable, "-c", "import tidings; print(tidings.__file__)")).parent
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": len(os.sched_getaffinity(0)),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "load_average_at_start": os.getloadavg(),
        "tidings_package": str(package),
        "git_commit": run("git", "rev-parse", "HEAD", cwd=package),
        "src_modified": bool(run("git", "status", "--porcelain", ".", cwd=package)),
    }


def select(names: str | None, quick: bool) -> list[Case]:
    if not names:
        return [case for case in CASES if case.in_quick or not quick]
    chosen: list[Case] = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        matches = [case for case in CASES if name in (case.name, case.group)]
        if not matches:
            raise SystemExit(f"unknown case {name!r}; --list shows them")
        chosen += [case for case in matches if case not in chosen]
    return chosen


async def main(cases: list[Case], quick: bool, help_: ServerHelp, results: list[Json]) -> None:
    for case in cases:
        result = await run_case(case, quick, help_)
        results.append(result)
        print_case(result)


def raise_own_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(hard, 8192):  # 1,100 slow sockets and the rest
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", help="comma-separated case or group names (default: all)")
    parser.add_argument(
        "--quick", action="store_true", help="shorter windows, the 10 KiB amplification frame only"
    )
    parser.add_argument("--out", type=Path, help="JSON results path")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args()
    if args.list:
        for case in CASES:
            print(
                f"{case.name:<42} must: {case.must}" + ("" if case.in_quick else "  (not --quick)")
            )
        return
    cases = select(args.cases, args.quick)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or ROOT / "bench" / "results" / f"hostile-{stamp}.json"
    raise_own_nofile()
    help_ = ServerHelp.load()
    report: Json = {
        "started_utc": stamp,
        "command": [Path(sys.executable).name, *sys.argv],
        "quick": args.quick,
        "machine": machine(),
        "server_flags": help_.flags(),
        "units": "bytes; printed as MB = 10^6 bytes",
        "cases": [],
    }
    print(
        f"hostile suite: {len(cases)} cases, each on a fresh server running "
        f"{report['machine']['tidings_package']}; results to {out}"
    )
    started = time.monotonic()
    try:
        trio.run(main, cases, args.quick, help_, report["cases"])
    except* KeyboardInterrupt:  # trio may deliver it inside an exception group
        report["interrupted"] = True
        print("\ninterrupted: writing what was measured")
    finally:
        stop_all_processes()
        report["seconds"] = round(time.monotonic() - started, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print_table(report["cases"])
    print(f"\nwrote {out} ({report['seconds']} s)")
    if report.get("interrupted"):
        sys.exit(130)


if __name__ == "__main__":
    cli()
