"""What accepting one client costs the server, in instructions: repeatable under load.

Wall time and even CPU time of a handshake move with whatever else the
machine runs; the number of instructions executed does not. This runs
``tidings serve`` under valgrind's callgrind with instrumentation off,
turns it on only while N clients connect, upgrade and subscribe (a plain
Python client in this process, 64 handshakes in flight), turns it off, and
prints the instructions per connection (valgrind's "Ir"), with the functions
that spent the most.

    .venv/bin/python bench/connect_cost.py [--connections 500] [--python PATH] [--top 25]

``--python`` runs another checkout's interpreter (its ``.venv/bin/python``),
for before/after figures. Results go to ``bench/results/connect-cost-<date>.json``.
Under valgrind the server is ~50x slower: 500 connections take about a minute.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
RESULTS = ROOT / "bench" / "results"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def handshake(port: int, topic: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(head[:100].decode(errors="replace"))
    message = json.dumps({"type": "subscribe", "topic": topic, "requestId": 1}).encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(message))
    sock.sendall(bytes([0x81, 0x80 | len(message)]) + mask + masked)
    if b"subscribed" not in head + sock.recv(4096):
        raise ConnectionError("no subscribe answer")
    return sock


def connect_all(port: int, count: int, concurrency: int = 64) -> list[socket.socket]:
    """``count`` clients, ``concurrency`` handshakes at a time (threads: the server is slow)."""
    socks: list[socket.socket] = []
    lock = threading.Lock()
    next_index = iter(range(count))

    def worker() -> None:
        for i in next_index:
            sock = handshake(port, f"t{i % 100}")
            with lock:
                socks.append(sock)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(socks) != count:
        raise RuntimeError(f"only {len(socks)} of {count} clients connected")
    return socks


def wait_healthy(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("the server did not start under valgrind")


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def summary(path: Path, top: int) -> tuple[int, list[tuple[int, str]]]:
    """Total Ir and the ``top`` functions by exclusive Ir (callgrind_annotate)."""
    text = subprocess.run(
        ["callgrind_annotate", "--threshold=100", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    total = 0
    functions: list[tuple[int, str]] = []
    for line in text.splitlines():
        match = re.match(r"\s*([\d,]+)\s+\(?[\d.]*%?\)?\s*PROGRAM TOTALS", line)
        if match:
            total = int(match[1].replace(",", ""))
            continue
        match = re.match(r"\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(\S.*)", line)
        if match and len(functions) < top:
            functions.append((int(match[1].replace(",", "")), match[2].strip()))
    return total, functions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--python", type=Path, default=PYTHON)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate"):
        if shutil.which(tool) is None:
            print(f"{tool} is needed (Debian's valgrind package)", file=sys.stderr)
            return 2
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        server = subprocess.Popen(
            [
                "valgrind", "--tool=callgrind", "--instr-atstart=no",
                f"--callgrind-out-file={out}",
                str(args.python), "-m", "tidings", "serve", "--port", str(port),
                "--log-level", "warning", "--max-connections", "20000",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        socks: list[socket.socket] = []
        try:
            wait_healthy(port, time.monotonic() + 300)
            handshake(port, "warm").close()  # first-use costs (imports, caches) not counted
            control(server.pid, "--instr=on")
            started = time.monotonic()
            socks = connect_all(port, args.connections)
            seconds = time.monotonic() - started
            control(server.pid, "--instr=off")
            control(server.pid, "--dump")
        finally:
            for sock in socks:
                sock.close()
            server.terminate()
            server.wait(timeout=120)
        dumps = sorted(Path(tmp).glob("callgrind.out*"), key=lambda p: p.stat().st_size)
        total, functions = summary(dumps[-1], args.top)
    per = total / args.connections
    print(f"{args.connections} connections (upgrade + subscribe) in {seconds:.1f} s under valgrind")
    print(f"instructions per connection: {per:,.0f}  ({args.python})")
    for ir, name in functions:
        print(f"{ir / args.connections:12,.0f}  {name[:110]}")
    result: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": str(args.python),
        "connections": args.connections,
        "instructions_total": total,
        "instructions_per_connection": per,
        "top": [{"per_connection": ir / args.connections, "function": f} for ir, f in functions],
    }
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = args.out or RESULTS / f"connect-cost-{stamp}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
