"""How fast a backend publishes through the HTTP API: sequential POST /api/publish.

Starts ``tidings serve`` with an API key on a free port of 127.0.0.1, then
publishes from one keep-alive HTTP connection, one request at a time (what a
simple backend does), and prints requests per second and the mean round trip.
Writes JSON to bench/results/api-publish-<timestamp>.json.

    .venv/bin/python bench/api_publish.py [--requests 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
KEY = "bench-key"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_ready(port: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            connection.request("GET", "/health")
            connection.getresponse().read()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("tidings serve did not answer /health")


def publish_many(port: int, count: int) -> float:
    """Seconds for ``count`` sequential publishes (a new connection when told to close)."""
    body = json.dumps({"topic": "bench", "payload": {"n": 1}})
    headers = {"Authorization": f"apikey {KEY}", "Content-Type": "application/json"}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    started = time.perf_counter()
    for _ in range(count):
        connection.request("POST", "/api/publish", body, headers)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"publish answered {response.status}")
        if response.getheader("connection") == "close":
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    elapsed = time.perf_counter() - started
    connection.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    port = free_port()
    env = dict(os.environ, TIDINGS_API_KEY=KEY)
    command = [sys.executable, "-m", "tidings", "serve", "--port", str(port)]
    server = subprocess.Popen([*command, "--log-level", "warning"], env=env)
    try:
        wait_ready(port)
        rates = []
        for round_ in range(1, args.rounds + 1):
            elapsed = publish_many(port, args.requests)
            rates.append(args.requests / elapsed)
            print(
                f"round {round_}: {rates[-1]:,.0f} publishes/s, "
                f"{elapsed / args.requests * 1e6:,.0f} µs per round trip"
            )
    finally:
        server.terminate()
        server.wait(timeout=10)
    median = statistics.median(rates)
    print(f"median: {median:,.0f} sequential API publishes/s over one keep-alive connection")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"api-publish-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps({"requests": args.requests, "rates": rates, "median": median}, indent=2)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
