"""What parsing a client's frames costs: wsproto's ``FrameProtocol`` (before) and
``tidings.transport.frames.FrameParser`` (after), side by side, in this process.

Scenarios, each a frame (or message) arriving in a read of its own, as a
client sending one message at a time makes them:

* ``small-text``: a 64-byte JSON text frame (a subscribe, a publish);
* ``text-16k`` / ``binary-16k``: a 16 KiB frame;
* ``fragmented``: a 1 KiB text message in four frames, one read;
* ``new-parser``: making a connection's parser and parsing its first frame
  (what a reconnect storm pays per connection);

then the memory of an idle connection's parser (tracemalloc: 2,000 parsers,
each after one frame, as ``WebSocketStream`` holds it while it waits).

Times are the best of ``--repeat`` runs (the machine is shared); with
``--instructions``, each figure is instead counted by valgrind's callgrind
(deterministic: a run of N and one of 2N frames, the difference divided by
N, so that start-up cancels out). About 20 s; 3 min with ``--instructions``.

    .venv/bin/python bench/frame_cost.py [--repeat 5] [--instructions]

Results go to ``bench/results/frame-cost-<date>.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wsproto.frame_protocol import FrameProtocol

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def _load_frames() -> Any:
    """``tidings.transport.frames`` by its path: the module imports nothing of
    tidings, and importing the package (a second under valgrind's 50x) would
    dwarf what is measured."""
    path = ROOT / "src" / "tidings" / "transport" / "frames.py"
    spec = importlib.util.spec_from_file_location("tidings_frames", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_frames = _load_frames()
FrameParser = _frames.FrameParser
unmask = _frames.unmask
MASK = bytes.fromhex("1f2e3d4c")


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked client frame."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = bytes((first, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + MASK + unmask(payload, MASK)


def scenarios() -> dict[str, bytes]:
    small = b'{"type":"subscribe","topic":"room:lobby","requestId":"r-000001"}'
    text = ("event line, " * 1400).encode()[:16384]
    message = ("x" * 1024).encode()
    return {
        "small-text": client_frame(1, small),
        "text-16k": client_frame(1, text),
        "binary-16k": client_frame(2, os.urandom(16384)),
        "fragmented": b"".join(
            client_frame(1 if i == 0 else 0, message[i * 256 : (i + 1) * 256], fin=i == 3)
            for i in range(4)
        ),
    }


def old_loop(read: bytes, n: int) -> None:
    protocol = FrameProtocol(client=False, extensions=[])
    for _ in range(n):
        protocol.receive_bytes(read)
        for _frame in protocol.received_frames():
            pass


def new_loop(read: bytes, n: int) -> None:
    parser = FrameParser()
    for _ in range(n):
        parser.feed(read)
        while parser.next_frame() is not None:
            pass


def old_new_parser(read: bytes, n: int) -> None:
    for _ in range(n):
        protocol = FrameProtocol(client=False, extensions=[])
        protocol.receive_bytes(read)
        for _frame in protocol.received_frames():
            pass


def new_new_parser(read: bytes, n: int) -> None:
    for _ in range(n):
        parser = FrameParser()
        parser.feed(read)
        while parser.next_frame() is not None:
            pass


Loop = Callable[[bytes, int], None]
LOOPS: dict[str, tuple[Loop, Loop]] = {
    "old": (old_loop, old_new_parser),
    "new": (new_loop, new_new_parser),
}
NAMES = [*scenarios(), "new-parser"]


def loop_for(impl: str, name: str) -> tuple[Loop, bytes]:
    steady, fresh = LOOPS[impl]
    reads = scenarios()
    if name == "new-parser":
        return fresh, reads["small-text"]
    return steady, reads[name]


def iterations(name: str) -> int:
    return 2000 if name in ("text-16k", "binary-16k") else 20000


def best_time(impl: str, name: str, repeat: int) -> float:
    """Nanoseconds per read, the best of ``repeat`` runs."""
    loop, read = loop_for(impl, name)
    n = iterations(name)
    loop(read, n // 10)  # warm up
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        loop(read, n)
        best = min(best, time.perf_counter() - started)
    return best / n * 1e9


def instructions(impl: str, name: str) -> float:
    """Instructions per read under callgrind: (Ir of 2N - Ir of N) / N."""
    n = iterations(name) // 10
    totals = []
    for count in (n, 2 * n):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "callgrind.out"
            subprocess.run(
                [
                    "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                    sys.executable, __file__, "--child", impl, name, str(count),
                ],
                check=True, capture_output=True,
            )  # fmt: skip
            match = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
            assert match, "no totals in callgrind's output"
            totals.append(int(match.group(1)))
    return (totals[1] - totals[0]) / n


def parser_memory(impl: str, count: int = 2000) -> float:
    """Bytes a parser holds after its first frame, as an idle connection's does."""
    read = scenarios()["small-text"]
    keep: list[Any] = []
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(count):
        if impl == "old":
            protocol = FrameProtocol(client=False, extensions=[])
            protocol.receive_bytes(read)
            for _frame in protocol.received_frames():
                pass
            keep.append(protocol)
        else:
            parser = FrameParser()
            parser.feed(read)
            while parser.next_frame() is not None:
                pass
            keep.append(parser)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--instructions", action="store_true", help="count with callgrind")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, name, count = args.child
        loop, read = loop_for(impl, name)
        loop(read, int(count))
        return 0
    if args.instructions and shutil.which("valgrind") is None:
        print("valgrind is needed for --instructions", file=sys.stderr)
        return 2
    unit = "instructions" if args.instructions else "ns"
    results: dict[str, Any] = {"unit": f"{unit} per read", "per_read": {}, "parser_bytes": {}}
    print(f"{'scenario':<12} {'wsproto':>12} {'frames.py':>12}  ratio   ({unit} per read)")
    for name in NAMES:
        figures = {}
        for impl in ("old", "new"):
            if args.instructions:
                figures[impl] = instructions(impl, name)
            else:
                figures[impl] = best_time(impl, name, args.repeat)
        results["per_read"][name] = figures
        ratio = figures["old"] / figures["new"]
        print(f"{name:<12} {figures['old']:>12,.0f} {figures['new']:>12,.0f}  {ratio:4.1f}x")
    for impl in ("old", "new"):
        results["parser_bytes"][impl] = parser_memory(impl)
    old, new = results["parser_bytes"]["old"], results["parser_bytes"]["new"]
    print(f"an idle connection's parser: {old:,.0f} bytes (wsproto), {new:,.0f} (frames.py)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"frame-cost{'-instructions' if args.instructions else ''}-{stamp}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
