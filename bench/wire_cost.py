"""What one delivery costs over each transport: WebSocket, WebSocket compressed, SSE.

The fan-out of ``bench/suite.py`` (one topic, 1,000 subscribers, the publisher
keeping 64 publishes in flight) against a fresh ``tidings serve`` per run, with
the Go load generator's subscribers speaking one of:

* ``ws`` / ``ws-1k``: plain WebSocket, events with 64 B or 1 KiB of padding;
* ``deflate-1k``: WebSocket offering ``permessage-deflate`` as Chromium does
  (``-deflate``), 1 KiB events: each event is compressed once for all;
* ``sse`` / ``sse-1k``: Server-Sent Events (``-sse``: ``GET /sse?topic=``).

The 1 KiB padding is log-like text (``-pad-text``), which compresses about as
JSON events do (a repeated letter would flatter compression). Variants run
interleaved, round after round, so a drift of the machine (2 CPUs shared with
other work) hits each alike; every run records how busy the rest of the
machine was. The figure that survives contention best is the server's CPU
time per delivery; deliveries per second are reported too, with their spread.

Then, in this process, the parts alone: ``StreamIds.render`` per event for SSE
streams of 1 to 32 topics (the id line), and compressing one 1 KiB event
(``DeflateFramer``, once per event whatever the number of subscribers);
``--micro-only`` measures just these.

    .venv/bin/python bench/wire_cost.py                  # ~4 min
    .venv/bin/python bench/wire_cost.py --rounds 5 --variants ws-1k,deflate-1k

Results go to ``bench/results/wire-cost-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite  # the suite's servers, pinning and machine records

VARIANTS: dict[str, list[str]] = {
    "ws": [],
    "sse": ["-sse"],
    "ws-1k": ["-payload-bytes", "1024", "-pad-text"],
    "deflate-1k": ["-payload-bytes", "1024", "-pad-text", "-deflate"],
    "sse-1k": ["-payload-bytes", "1024", "-pad-text", "-sse"],
}
FANOUT = ["-scenario", "fanout-max", "-inflight", "64", "-sample-every", "10"]


def run(variant: str, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    quiet = suite.wait_quiet(args.quiet_limit, args.quiet_wait)
    server = suite.Server("tidings", suite.server_command("tidings", 0, []), log)
    entry: dict[str, Any] = {"variant": variant, "machine_before": quiet}
    try:
        server.start()
        time.sleep(1.0)
        cmd = [
            "taskset", "-c", str(suite.LOAD_CPU), str(suite.LOADGEN),
            "-url", f"ws://127.0.0.1:{server.port}/ws", "-server-pid", str(server.pid),
            "-subscribers", str(args.subscribers), "-duration", f"{args.duration}s",
            *FANOUT, *VARIANTS[variant],
        ]  # fmt: skip
        entry["loadgen_command"] = cmd
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        lines = proc.stdout.strip().splitlines()
        entry["result"] = json.loads(lines[-1]) if lines else {"error": proc.stderr[-500:]}
    except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        entry["result"] = {"error": str(exc)}
    finally:
        entry["server_exit"] = server.stop()
    return entry


def figures(entry: dict[str, Any]) -> dict[str, Any] | None:
    phase = entry.get("result", {}).get("phase")
    if not isinstance(phase, dict) or not phase.get("deliveries"):
        return None
    cpu = phase["cpu_publishing"]
    total = phase.get("cpu_total", {})
    deliveries = phase["deliveries"]
    return {
        "deliveries_per_second": phase.get("deliveries_per_second"),
        "server_us_per_delivery": round(
            1e6 * total.get("server_cpu_seconds", cpu["server_cpu_seconds"]) / deliveries, 3
        ),
        "wire_bytes_per_delivery": phase.get("wire_bytes_per_delivery"),
        "delivered_fraction": phase.get("delivered_fraction"),
        "server_cpu_percent": cpu.get("server_cpu_percent"),
        "loadgen_cpu_percent": cpu.get("loadgen_cpu_percent"),
        "others_cpu_percent": cpu.get("others_cpu_percent"),
        "latency_p50_ms": phase.get("latency", {}).get("p50_ms"),
        "latency_p99_ms": phase.get("latency", {}).get("p99_ms"),
        "inflate_cache_hits": phase.get("inflate_cache_hits"),
    }


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float | None:
        values = [row[key] for row in rows if isinstance(row.get(key), int | float)]
        return round(statistics.median(values), 3) if values else None

    rates = [row["deliveries_per_second"] for row in rows]
    return {
        "runs": len(rows),
        "deliveries_per_second_median": med("deliveries_per_second"),
        "deliveries_per_second_range": [min(rates), max(rates)] if rates else None,
        "server_us_per_delivery_median": med("server_us_per_delivery"),
        "wire_bytes_per_delivery_median": med("wire_bytes_per_delivery"),
        "delivered_fraction_min": min((r["delivered_fraction"] or 0) for r in rows),
        "others_cpu_percent_median": med("others_cpu_percent"),
    }


def id_line_cost() -> dict[str, float]:
    """Microseconds of ``StreamIds.render`` per event, by topics per stream (one
    event a batch: the costliest case; a batch of many spreads the join)."""
    from tidings.protocol.messages import Event, Position  # noqa: PLC0415
    from tidings.protocol.sse import SseDialect, StreamIds  # noqa: PLC0415

    dialect = SseDialect()
    out: dict[str, float] = {}
    for topics in (1, 2, 8, 32):
        names = [f"topic-{i}" for i in range(topics)]
        ids = StreamIds(names, 3000)
        ids.begin([Position(0, "412e1a7c")] * topics)
        payload = b'{"t":1,"pad":"' + b"x" * 64 + b'"}'
        stamp = "2026-12-06T10:00:00Z"
        blocks = [
            dialect.encode_event(Event(names[0], n, "412e1a7c", None, stamp, payload))
            for n in range(1, 2001)
        ]
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for block in blocks:
                ids.render([block])
            best = min(best, (time.perf_counter() - start) / len(blocks))
        out[str(topics)] = round(best * 1e6, 3)
    return out


def compress_cost() -> dict[str, float]:
    """Microseconds to compress one event with the server's framer, and its sizes."""
    import orjson  # noqa: PLC0415

    from tidings.transport.deflate import DeflateFramer  # noqa: PLC0415

    pad = (
        subprocess.run(
            [str(suite.LOADGEN), "-print-pad", "1024"], capture_output=True, text=True, check=False
        ).stdout.strip()
        or "x" * 1024
    )
    event = orjson.dumps(
        {"type": "event", "topic": "bench", "seq": 1, "epoch": "412e1a7c",
         "payload": {"t": 1795328203610675639, "pad": pad}, "timestamp": "2026-12-06T10:00:00Z"}
    )  # fmt: skip
    framer = DeflateFramer(True, 256)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(2000):
            framed = framer(event)
        best = min(best, (time.perf_counter() - start) / 2000)
    return {
        "us_per_event": round(best * 1e6, 2),
        "event_bytes": len(event),
        "frame_bytes": len(framed),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help="subset of %(default)s")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--quiet-limit", type=float, default=25)
    ap.add_argument("--quiet-wait", type=float, default=20)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--micro-only", action="store_true", help="only the in-process figures")
    args = ap.parse_args(argv)
    if args.micro_only:
        suite.build_loadgen()
        micro = {"sse_id_render_us_per_event": id_line_cost(), "deflate_1k": compress_cost()}
        print(json.dumps(micro, indent=1))
        if args.out:
            args.out.write_text(json.dumps(micro, indent=1) + "\n")
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}")
    suite._raise_nofile()
    suite.build_loadgen()
    stamp = datetime.now(UTC)
    out = args.out or suite.BENCH / "results" / f"wire-cost-{stamp:%Y%m%d-%H%M%S}.json"
    logs = Path(tempfile.mkdtemp(prefix="wire-cost-"))  # server logs: not kept in the tree
    doc: dict[str, Any] = {
        "started": stamp.isoformat(timespec="seconds"),
        "command": " ".join(["bench/wire_cost.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": suite.machine_info(),
        "code": suite.code_info(),
        "load_average_before": Path("/proc/loadavg").read_text().split()[:3],
        "server_logs": str(logs),
        "runs": [],
    }
    with suite.pinned_to(suite.LOAD_CPU):
        for rnd in range(args.rounds):
            for variant in variants:  # interleaved: each round runs every variant once
                print(f"round {rnd + 1}/{args.rounds}: {variant} ...", flush=True)
                entry = run(variant, args, logs / f"{variant}-r{rnd + 1}.log")
                entry["round"] = rnd + 1
                entry["figures"] = figures(entry)
                doc["runs"].append(entry)
                print(f"  {entry['figures'] or entry['result'].get('error')}", flush=True)
                out.write_text(json.dumps(doc, indent=1) + "\n")
    doc["load_average_after"] = Path("/proc/loadavg").read_text().split()[:3]
    doc["summary"] = {
        v: summary([r["figures"] for r in doc["runs"] if r["variant"] == v and r["figures"]])
        for v in variants
    }
    doc["sse_id_render_us_per_event"] = id_line_cost()
    doc["deflate_1k"] = compress_cost()
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["summary"], indent=1))
    print("StreamIds.render, us per event by topics per stream:", doc["sse_id_render_us_per_event"])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
