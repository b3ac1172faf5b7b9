"""Which server transport can keep tidings' promises? Two measurements per transport.

1. write timeout: a subscriber stops reading while events keep coming. How long
   after the publishing stops is it cut off? The promise: within the write
   timeout plus a second.
2. SIGTERM: how many of N connected clients receive a 1001 close frame, how
   long until the process exits, and with which status?

Usage: .venv/bin/python bench/transports.py [--clients 100] [--out bench/results/transports.json]
Each server is a real ``tidings serve`` process on 127.0.0.1; everything stops by itself.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from rawws import RawWebSocket  # noqa: E402 - the suite's minimal hostile client

WRITE_TIMEOUT = 2.0
GIVE_UP_AFTER = 30.0


async def start_server(transport: str, *extra: str) -> tuple[trio.Process, int]:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tidings", "serve", "--port", "0", "--transport", transport,
         "--log-level", "warning", *extra],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    buffer = b""
    while b"listening on" not in buffer:
        buffer += await process.stdout.receive_some(4096)
    line = next(x for x in buffer.decode().splitlines() if "listening on" in x)
    port = int(line.rsplit(":", 1)[1].split("/")[0])
    return process, port


async def connections(port: int) -> int:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return int(orjson.loads(data.partition(b"\r\n\r\n")[2])["connections"])


async def measure_write_timeout(transport: str) -> dict[str, Any]:
    process, port = await start_server(
        transport, "--write-timeout", str(WRITE_TIMEOUT), "--outbox-size", "100000"
    )
    try:
        stalled = await RawWebSocket.connect("127.0.0.1", port, receive_buffer=4096)
        await stalled.send_json({"type": "subscribe", "topic": "t", "requestId": "s"})
        await stalled.receive_json()  # the subscribe reply; after this it never reads
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws") as publisher:
            blob = "x" * 32_000
            for i in range(400):  # ~13 MB, far beyond the socket buffers
                await publisher.send_message(
                    orjson.dumps(
                        {"type": "publish", "topic": "t", "payload": {"i": i, "blob": blob}}
                    ).decode()
                )
                await publisher.get_message()
            published_at = trio.current_time()
            cut_after = None
            while trio.current_time() - published_at < GIVE_UP_AFTER:
                if await connections(port) == 1:  # only the publisher is left
                    cut_after = trio.current_time() - published_at
                    break
                await trio.sleep(0.05)
        await stalled.aclose()
        return {
            "write_timeout_s": WRITE_TIMEOUT,
            "stalled_client_cut_after_s": None if cut_after is None else round(cut_after, 2),
            "kept_promise": cut_after is not None and cut_after <= WRITE_TIMEOUT + 1,
        }
    finally:
        process.kill()
        await process.wait()


async def measure_sigterm(transport: str, clients: int) -> dict[str, Any]:
    process, port = await start_server(transport, "--shutdown-timeout", "5")
    codes: list[int | None] = []
    try:
        async with trio.open_nursery() as nursery:
            ready = trio.Semaphore(0)
            done = trio.Event()

            async def client() -> None:
                async with open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws:
                    await ws.send_message('{"type":"subscribe","topic":"t","requestId":"s"}')
                    await ws.get_message()
                    ready.release()
                    try:
                        with trio.move_on_after(15):
                            while True:
                                await ws.get_message()
                        codes.append(None)
                    except ConnectionClosed as exc:
                        codes.append(exc.reason.code if exc.reason else None)
                    if len(codes) == clients:
                        done.set()

            for _ in range(clients):
                nursery.start_soon(client)
            for _ in range(clients):
                await ready.acquire()
            started = trio.current_time()
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(20):
                status = await process.wait()
            exited_after = trio.current_time() - started
            await done.wait()
        return {
            "clients": clients,
            "received_1001": codes.count(1001),
            "other_codes": sorted({str(c) for c in codes if c != 1001}),
            "exit_status": status,
            "exit_after_s": round(exited_after, 2),
            "kept_promise": codes.count(1001) == clients and status == 0,
        }
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def main(args: argparse.Namespace) -> None:
    results: dict[str, Any] = {"machine": {"cpus": len(__import__("os").sched_getaffinity(0)),
                                          "python": sys.version.split()[0],
                                          "host": socket.gethostname()}}  # fmt: skip
    for transport in ("builtin", "hypercorn"):
        results[transport] = {
            "write_timeout": await measure_write_timeout(transport),
            "sigterm": await measure_sigterm(transport, args.clients),
        }
        print(transport, json.dumps(results[transport], indent=2), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/transports.json")
    started = time.time()
    trio.run(main, parser.parse_args())
    print(f"done in {time.time() - started:.0f} s")
