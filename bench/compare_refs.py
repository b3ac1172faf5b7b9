"""Before/after with ``bench/cluster.py``: several commits, interleaved rounds, medians.

On a shared machine a figure moves with whatever else runs; measuring commit A
for three rounds and then commit B for three more puts that drift between A
and B. This runs ``cluster.py --ref REF --rounds 1`` for every ref in turn,
round after round (A B C A B C ...), keeps each run's JSON, and prints the
median of each figure per ref and configuration::

    .venv/bin/python bench/compare_refs.py --refs 711e75e,HEAD --rounds 3 \\
        -- --configs memory,redis --phases max
    .venv/bin/python bench/compare_refs.py --show bench/results/compare-DATE.json

Everything after ``--`` goes to ``cluster.py`` unchanged. The merged results
(every run, the load average before each, the medians) go to
``bench/results/compare-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PYTHON = ROOT / ".venv" / "bin" / "python"

#: (label, phase, figure, format) shown by default.
FIGURES = [
    ("deliveries/s", "max", "deliveries_per_second", "{:,.0f}"),
    ("publishes/s acknowledged", "max", "publish_rate", "{:,.0f}"),
    ("node 1 CPU %", "max", "node1_cpu_percent", "{:.0f}"),
    ("node 2 CPU %", "max", "node2_cpu_percent", "{:.0f}"),
    ("redis-server CPU %", "max", "redis_cpu_percent", "{:.1f}"),
    ("server CPU µs per delivery", "max", "cpu_us_per_delivery", "{:.2f}"),
    ("node CPU µs per publication", "max", "node_cpu_us_per_publication", "{:.1f}"),
    ("server CPU µs per publication", "max", "server_cpu_us_per_publication", "{:.1f}"),
    ("events per read", "max", "events_per_read", "{:.1f}"),
    ("latency p50 ms", "max", "p50_ms", "{:,.1f}"),
    ("others CPU %", "max", "others_cpu_percent", "{:.0f}"),
    ("latency p50 ms", "rate", "p50_ms", "{:.2f}"),
    ("latency p99 ms", "rate", "p99_ms", "{:.2f}"),
    ("server CPU µs per delivery", "rate", "cpu_us_per_delivery", "{:.2f}"),
    ("others CPU %", "rate", "others_cpu_percent", "{:.0f}"),
]


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(args: argparse.Namespace) -> dict[str, Any]:
    stamp = datetime.now(UTC)
    doc: dict[str, Any] = {
        "benchmark": "compare_refs",
        "started": stamp.isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "bench/compare_refs.py", *sys.argv[1:]]),
        "refs": args.refs,
        "cluster_args": args.cluster_args,
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="tidings-compare-") as tmp:
        for round_number in range(1, args.rounds + 1):
            for ref in args.refs:
                out = Path(tmp) / f"{ref.replace('/', '_')}-{round_number}.json"
                before = load_average()
                print(f"round {round_number}/{args.rounds}: {ref} (load {before})", flush=True)
                command = [
                    str(PYTHON), str(ROOT / "bench" / "cluster.py"), "--ref", ref,
                    "--rounds", "1", "--out", str(out), *args.cluster_args,
                ]  # fmt: skip
                started = time.monotonic()
                subprocess.run(command, check=False, stdout=subprocess.DEVNULL, timeout=3600)
                if not out.exists():
                    print(f"  {ref}: no results", flush=True)
                    continue
                result = json.loads(out.read_text())
                for entry in result["runs"]:
                    doc["runs"].append(
                        {
                            "ref": ref,
                            "commit": result["code"]["git_commit"],
                            "round": round_number,
                            "load_before": before,
                            "config": entry["config"],
                            "phase": entry["phase"],
                            "figures": entry["figures"],
                        }
                    )
                print(f"  {time.monotonic() - started:.0f} s", flush=True)
    doc["medians"] = medians(doc)
    return doc


def medians(doc: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for entry in doc["runs"]:
        key = f"{entry['ref']} {entry['config']} {entry['phase']}"
        slot = out.setdefault(key, {})
        for name, value in entry["figures"].items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                slot.setdefault(name, []).append(value)
    return {
        key: {name: {"median": statistics.median(v), "values": v} for name, v in figures.items()}
        for key, figures in out.items()
    }


def report(doc: dict[str, Any]) -> None:
    configs = sorted({(e["config"], e["phase"]) for e in doc["runs"]})
    for config, phase in configs:
        rows = [[f"{config} / {phase}", *doc["refs"]]]
        for label, figure_phase, figure, spec in FIGURES:
            if figure_phase != phase:
                continue
            row = [label]
            for ref in doc["refs"]:
                found = doc["medians"].get(f"{ref} {config} {phase}", {}).get(figure)
                row.append(spec.format(found["median"]) if found else "-")
            if any(cell != "-" for cell in row[1:]):
                rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        print()
        for n, row in enumerate(rows):
            cells = [
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ]
            print("| " + " | ".join(cells) + " |")
            if n == 0:
                print("| " + " | ".join("-" * w for w in widths) + " |")


def main() -> int:
    argv = sys.argv[1:]
    cluster_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, cluster_args = argv[:cut], argv[cut + 1 :]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--refs", help="comma-separated git revisions to compare")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--show", type=Path, help="only print the medians of a results file")
    args = ap.parse_args(argv)
    if args.show:
        report(json.loads(args.show.read_text()))
        return 0
    if not args.refs:
        ap.error("--refs is required")
    args.refs = [r.strip() for r in args.refs.split(",") if r.strip()]
    args.cluster_args = cluster_args
    doc = run(args)
    out = args.out or RESULTS / f"compare-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    report(doc)
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
