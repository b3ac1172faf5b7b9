"""PNG plots of one ``bench/suite.py`` results file, for ``docs/benchmarks.md``.

    .venv/bin/python bench/plot.py              # the newest bench/results/suite/suite-*.json
    .venv/bin/python bench/plot.py bench/results/suite/suite-20261122-062841.json --out docs/img

Writes (to ``docs/img/`` by default):

* ``suite-deliveries.png``: deliveries per second per server, fanout-max and fanout-rate;
* ``suite-latency.png``: latency-100's latency distribution per server (percentile curve);
* ``suite-idle-rss.png``: server RSS per idle connection (idle-10k), with the 12 KiB target;
* ``suite-many-topics.png``: many-topics latency p50/p99 per server.

A plot whose scenario is missing from the file is skipped. Needs matplotlib
(``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "suite"
LABELS = {
    "tidings": "tidings (Python, Trio)",
    "websockets": "websockets (Python, asyncio)",
    "ws": "ws (Node.js)",
    "gorilla": "gorilla (Go)",
}
COLORS = {"tidings": "#d1495b", "websockets": "#4f6d7a", "ws": "#edae49", "gorilla": "#00798c"}


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _servers(doc: dict[str, Any], scenario: str) -> list[str]:
    runs = doc["scenarios"].get(scenario) or {}
    return [s for s in runs if not _get(runs[s], "result", "error")]


def _caption(doc: dict[str, Any]) -> str:
    m = doc.get("machine", {})
    return (
        f"{doc.get('started', '')[:10]} · {m.get('nproc')} CPUs ({m.get('cpu_model', '')}) · "
        f"server on CPU {m.get('server_cpu')}, load generator on CPU {m.get('loadgen_cpu')}"
        + (" · --quick" if doc.get("quick") else "")
    )


def _bar_labels(ax: Any, bars: Any, fmt: str) -> None:
    for bar in bars:
        h = bar.get_height()
        ax.annotate(
            fmt.format(h),
            (bar.get_x() + bar.get_width() / 2, h),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 2),
            textcoords="offset points",
        )


def _round_dots(ax: Any, runs: dict[str, Any], servers: list[str], scale: float = 1.0) -> None:
    """Every round's headline figure as a dot on its server's bar (suite --rounds N)."""
    for i, s in enumerate(servers):
        values = _get(runs[s], "rounds", "values") or []
        xs = [i] * len(values)
        ys = [v / scale for v in values if isinstance(v, int | float)]
        if len(ys) > 1:
            ax.scatter(xs[: len(ys)], ys, color="black", s=10, zorder=3)


def plot_deliveries(doc: dict[str, Any], out: Path) -> Path | None:
    scenarios = [s for s in ("fanout-max", "fanout-rate") if _servers(doc, s)]
    if not scenarios:
        return None
    fig, axes = plt.subplots(1, len(scenarios), figsize=(5.2 * len(scenarios), 4.2), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios, strict=True):
        servers = _servers(doc, scenario)
        runs = doc["scenarios"][scenario]
        vals = [_get(runs[s], "result", "phase", "deliveries_per_second") or 0 for s in servers]
        bars = ax.bar(range(len(servers)), vals, color=[COLORS.get(s, "grey") for s in servers])
        _bar_labels(ax, bars, "{:,.0f}")
        _round_dots(ax, runs, servers)
        ax.set_xticks(
            range(len(servers)),
            [LABELS.get(s, s).replace(" (", "\n(") for s in servers],
            fontsize=8,
        )
        ax.set_ylabel("deliveries / s (summed over subscribers)")
        params = _get(runs[servers[0]], "result", "params") or {}
        subs = params.get("subscribers")
        if scenario == "fanout-max":
            title = f"fanout-max: {subs} subscribers, {params.get('inflight')} publishes in flight"
        else:
            title = f"fanout-rate: {subs} subscribers, {params.get('rate'):.0f} events/s offered"
        ax.set_title(title, fontsize=10)
        ax.ticklabel_format(axis="y", style="plain")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.margins(y=0.12)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Fan-out throughput, one server core", fontsize=12)
    fig.text(0.5, 0.005, _caption(doc), ha="center", fontsize=7, color="dimgray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = out / "suite-deliveries.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_latency(doc: dict[str, Any], out: Path) -> Path | None:
    servers = _servers(doc, "latency-100")
    if not servers:
        return None
    runs = doc["scenarios"]["latency-100"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ticks: set[tuple[float, str]] = set()
    for s in servers:
        dist = _get(runs[s], "result", "phase", "latency", "percentiles_ms") or []
        pts = [(p, v) for p, v in dist if v is not None]
        if not pts:
            continue
        # x: "nines" scale, -log10(1 - p/100), with max drawn at the end
        xs, ys = [], []
        for p, v in pts:
            x = 5.0 if p >= 100 else -math.log10(1 - p / 100)
            xs.append(x)
            ys.append(v)
            ticks.add((x, "max" if p >= 100 else f"p{p:g}"))
        ax.plot(xs, ys, marker="o", ms=3, label=LABELS.get(s, s), color=COLORS.get(s, "grey"))
    tick_x = sorted(ticks)
    keep = [t for t in tick_x if t[1] in ("p50", "p90", "p99", "p99.9", "p99.99", "max")]
    ax.set_xticks([t[0] for t in keep], [t[1] for t in keep])
    ax.set_ylabel("publish → receive latency, ms")
    params = _get(runs[servers[0]], "result", "params") or {}
    ax.set_title(
        f"latency-100: {params.get('subscribers')} subscribers, {params.get('rate'):.0f} events/s, "
        "every delivery sampled",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_ylim(bottom=0)
    fig.text(0.5, 0.005, _caption(doc), ha="center", fontsize=7, color="dimgray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = out / "suite-latency.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_idle(doc: dict[str, Any], out: Path) -> Path | None:
    servers = [
        s
        for s in _servers(doc, "idle-10k")
        if _get(doc["scenarios"]["idle-10k"][s], "result", "rss_per_connection_bytes")
    ]
    if not servers:
        return None
    runs = doc["scenarios"]["idle-10k"]
    vals = [runs[s]["result"]["rss_per_connection_bytes"] / 1024 for s in servers]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    bars = ax.bar(range(len(servers)), vals, color=[COLORS.get(s, "grey") for s in servers])
    _bar_labels(ax, bars, "{:.1f} KiB")
    _round_dots(ax, runs, servers, scale=1024)
    ax.axhline(12, color="black", ls="--", lw=1)
    ax.annotate("tidings target: 12 KiB", (-0.45, 12.3), ha="left", va="bottom", fontsize=8)
    ax.set_xticks(
        range(len(servers)), [LABELS.get(s, s).replace(" (", "\n(") for s in servers], fontsize=8
    )
    ax.set_ylabel("server RSS per idle connection, KiB")
    n = _get(runs[servers[0]], "result", "params", "subscribers")
    ax.set_title(
        f"idle-10k: (RSS with {n:,} subscribed idle connections - RSS fresh) / {n:,}", fontsize=10
    )
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)
    fig.text(0.5, 0.005, _caption(doc), ha="center", fontsize=7, color="dimgray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = out / "suite-idle-rss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_many_topics(doc: dict[str, Any], out: Path) -> Path | None:
    servers = _servers(doc, "many-topics")
    if not servers:
        return None
    runs = doc["scenarios"]["many-topics"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    width = 0.38
    for k, (key, label, alpha) in enumerate((("p50_ms", "p50", 0.55), ("p99_ms", "p99", 1.0))):
        vals = [_get(runs[s], "result", "phase", "latency", key) or 0 for s in servers]
        bars = ax.bar(
            [i + (k - 0.5) * width for i in range(len(servers))],
            vals,
            width,
            color=[COLORS.get(s, "grey") for s in servers],
            alpha=alpha,
            label=label,
        )
        _bar_labels(ax, bars, "{:.0f}")
    ax.set_xticks(
        range(len(servers)), [LABELS.get(s, s).replace(" (", "\n(") for s in servers], fontsize=8
    )
    ax.set_ylabel("latency, ms (left bar p50, right bar p99)")
    p = _get(runs[servers[0]], "result", "params") or {}
    ax.set_title(
        f"many-topics: {p.get('subscribers'):,} connections, own topic + shared; "
        f"{p.get('topic_rate'):.0f}/s + {p.get('shared_rate'):.0f}/s",
        fontsize=10,
    )
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)
    fig.text(0.5, 0.005, _caption(doc), ha="center", fontsize=7, color="dimgray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = out / "suite-many-topics.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "results", nargs="?", type=Path, help="suite JSON (default: the newest full run)"
    )
    ap.add_argument(
        "--out", type=Path, default=ROOT / "docs" / "img", help="directory for the PNGs"
    )
    args = ap.parse_args(argv)
    path = args.results
    if path is None:
        candidates = sorted(
            p for p in RESULTS.glob("suite-*.json") if not p.stem.endswith("-quick")
        )
        candidates = candidates or sorted(RESULTS.glob("suite-*.json"))
        if not candidates:
            print(f"no suite-*.json in {RESULTS}", file=sys.stderr)
            return 1
        path = candidates[-1]
    doc = json.loads(path.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"plotting {path}")
    for fn in (plot_deliveries, plot_latency, plot_idle, plot_many_topics):
        written = fn(doc, args.out)
        if written:
            print(f"  wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
