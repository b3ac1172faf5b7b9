"""Where does an idle connection's memory go? tracemalloc, per connection.

Runs a tidings server in this process with tracemalloc on, opens N idle
subscribed WebSocket connections from a child process (so only the server's
allocations are traced), and prints the Python memory each connection holds,
grouped by the line that allocated it, next to the RSS growth.

    .venv/bin/python bench/connection_memory.py [--connections 2000] [--frames 1]
"""

from __future__ import annotations

import argparse
import gc
import resource
import subprocess
import sys
import textwrap
import tracemalloc

import trio

import tidings

CLIENT = textwrap.dedent(
    """
    import base64, os, socket, sys, time
    port, count = int(sys.argv[1]), int(sys.argv[2])
    socks = []
    for i in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall((f"GET /ws HTTP/1.1\\r\\nHost: x\\r\\nUpgrade: websocket\\r\\n"
                   f"Connection: Upgrade\\r\\nSec-WebSocket-Key: {key}\\r\\n"
                   f"Sec-WebSocket-Version: 13\\r\\n\\r\\n").encode())
        head = b""
        while b"\\r\\n\\r\\n" not in head:
            head += s.recv(4096)
        msg = ('{"type":"subscribe","topic":"t%d","requestId":1}' % (i % 100)).encode()
        mask = os.urandom(4)
        masked = bytes(b ^ mask[j % 4] for j, b in enumerate(msg))
        s.sendall(bytes([0x81, 0x80 | len(msg)]) + mask + masked)
        socks.append(s)
    print("ready", flush=True)
    sys.stdin.readline()
    """
)


def rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def main(args: argparse.Namespace) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    config = tidings.Config(port=0, log_level="warning", max_connections=args.connections + 10)
    async with tidings.open_server(config) as server:
        gc.collect()
        if args.trace:
            tracemalloc.start(args.frames)
        before = tracemalloc.take_snapshot() if args.trace else None
        rss_before = rss()
        child = await trio.lowlevel.open_process(
            [sys.executable, "-c", CLIENT, str(server.port), str(args.connections)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert child.stdout is not None and child.stdin is not None
        await child.stdout.receive_some(100)
        while server.statistics().subscriptions < args.connections:  # noqa: ASYNC110 - a bench polls
            await trio.sleep(0.05)
        await trio.sleep(0.5)
        gc.collect()
        rss_after = rss()
        n = args.connections
        print(f"{n} idle subscribed connections")
        print(f"RSS growth: {(rss_after - rss_before) / n:,.0f} bytes per connection", end="")
        print(" (tracemalloc on: it adds its own)" if args.trace else "")
        if before is None:
            await child.stdin.send_all(b"\n")
            await child.wait()
            return
        after = tracemalloc.take_snapshot()
        stats = after.compare_to(before, "traceback" if args.frames > 1 else "lineno")
        total = sum(s.size_diff for s in stats)
        print(f"Python heap (tracemalloc): {total / n:,.0f} bytes per connection\n")
        by_file: dict[str, int] = {}
        for stat in stats:
            name = stat.traceback[0].filename
            short = name.split("site-packages/")[-1].split("/src/")[-1]
            package = short.split("/")[0] if "/" in short else short
            by_file[package] = by_file.get(package, 0) + stat.size_diff
        for package, size in sorted(by_file.items(), key=lambda item: -item[1])[:8]:
            print(f"{size / n:8,.0f} B  {package}")
        print()
        for stat in stats[: args.top]:
            if stat.size_diff / n < 8:
                break
            where = stat.traceback.format(limit=args.frames)
            size, blocks = stat.size_diff / n, stat.count_diff / n
            print(f"{size:8,.0f} B {blocks:5.1f} blocks  {where[0].strip()}")
            for line in where[1:]:
                print(f"{'':27}{line.strip()}")
        await child.stdin.send_all(b"\n")
        await child.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--frames", type=int, default=1, help="traceback depth to group by")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument(
        "--no-trace", dest="trace", action="store_false", help="RSS only, tracemalloc off"
    )
    trio.run(main, parser.parse_args())
