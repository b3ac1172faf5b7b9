"""What one delivery costs the server, measured inside one process.

N real connections (the built-in transport's WebSocketStream over socketpairs,
each with its reader, writer and pinger in a nursery, exactly as a client's)
subscribe to one topic; events are published one at a time, each fanned out and
written to every socket before the next (the latency-100 pattern), or in bursts
of 64 (the fanout-max pattern). It prints microseconds of CPU per delivery and,
with ``--callgrind``, runs itself under valgrind and prints instructions per
delivery: a figure that does not move with the machine's load, for comparing
two versions of the hot path.

    .venv/bin/python bench/delivery_cost.py [--subscribers 100] [--events 2000] [--burst 1]
    .venv/bin/python bench/delivery_cost.py --callgrind [--python OTHER/.venv/bin/python]
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
import trio.testing

from tidings.broker.broker import Broker
from tidings.connection.alarms import AlarmClock
from tidings.connection.connection import Connection
from tidings.connection.limits import ConnectionLimits
from tidings.protocol.native import NativeDialect
from tidings.transport.base import UpgradeRequest
from tidings.transport.builtin import WebSocketStream

ROOT = Path(__file__).resolve().parent.parent


async def run(subscribers: int, events: int, burst: int) -> float:
    broker = Broker()
    alarms = AlarmClock()
    dialect = NativeDialect()  # one per endpoint, as in a server: subscribers share its frames
    peers: list[socket.socket] = []
    connections: list[Connection] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.run)
        await nursery.start(alarms.run)
        for _ in range(subscribers):
            ours, theirs = socket.socketpair()
            ours.setblocking(False)
            theirs.setblocking(False)
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            peers.append(theirs)
            transport = WebSocketStream(ours, "pair:0", max_message_size=1 << 20)
            connection = Connection(
                transport,
                UpgradeRequest("/ws", "", b"", "pair:0"),
                dialect=dialect,
                broker=broker,
                limits=ConnectionLimits(),
                handlers={},
                alarms=alarms,
            )
            connections.append(connection)
            nursery.start_soon(connection.run)
        await trio.testing.wait_all_tasks_blocked()
        for connection in connections:
            broker.subscribe(connection.subscriber, "bench")
        payload = {"pad": "x" * 64}
        started = time.process_time()
        sent = 0
        while sent < events:
            for _ in range(burst):
                broker.submit_nowait("bench", payload)
                sent += 1
            await trio.testing.wait_all_tasks_blocked()  # every writer has written
            if sent % 256 < burst:
                for peer in peers:  # keep the socketpairs from filling up
                    try:
                        while peer.recv(1 << 20):
                            pass
                    except BlockingIOError:
                        pass
        cpu = time.process_time() - started
        nursery.cancel_scope.cancel()
    return cpu / max(1, events * subscribers) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--burst", type=int, default=1, help="events published together")
    parser.add_argument("--callgrind", action="store_true", help="count instructions")
    parser.add_argument("--python", type=Path, default=Path(sys.executable))
    args = parser.parse_args()
    if args.callgrind:
        return callgrind(args)
    per = trio.run(run, args.subscribers, args.events, args.burst)
    print(
        f"{args.subscribers} subscribers, {args.events} events in bursts of {args.burst}: "
        f"{per:.2f} us of CPU per delivery"
    )
    return 0


def instructions(args: argparse.Namespace, events: int) -> int:
    """Instructions of one whole run with ``events`` events (start-up included)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cg.out"
        command = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
            str(args.python), __file__,
            "--subscribers", str(args.subscribers), "--events", str(events),
            "--burst", str(args.burst),
        ]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True)
        text = subprocess.run(
            ["callgrind_annotate", str(out)], check=True, capture_output=True, text=True
        ).stdout
    match = re.search(r"([\d,]+)\s+\(?[\d.]*%?\)?\s*PROGRAM TOTALS", text)
    if match is None:
        raise RuntimeError(text[:2000])
    return int(match[1].replace(",", ""))


def callgrind(args: argparse.Namespace) -> int:
    """Instructions per delivery: a run with events minus one without (start-up, setup)."""
    if shutil.which("valgrind") is None:
        print("valgrind is needed", file=sys.stderr)
        return 2
    with_events = instructions(args, args.events)
    without = instructions(args, 0)
    deliveries = args.subscribers * args.events
    print(
        f"{args.subscribers} subscribers, {args.events} events in bursts of {args.burst}: "
        f"{(with_events - without) / deliveries:,.0f} instructions per delivery "
        f"({args.python})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
