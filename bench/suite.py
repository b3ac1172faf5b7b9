"""Side-by-side benchmark suite: tidings and three peer hubs under one compiled load generator.

One command runs every scenario against every server, one server at a time, on
this machine, and prints a table per scenario with the ratios tidings / peer::

    .venv/bin/python bench/suite.py                      # all servers, all scenarios (~6 min)
    .venv/bin/python bench/suite.py --quick              # smaller and shorter (~2 min)
    .venv/bin/python bench/suite.py --servers tidings,gorilla --scenarios fanout-max,latency-100

Servers (each started fresh for each scenario, stopped right after):

* ``tidings``: ``python -m tidings serve`` (the work tree's ``src/``);
* ``websockets``: ``bench/peers/websockets_hub.py`` (Python asyncio, ``websockets``);
* ``ws``: ``bench/peers/ws_hub.js`` (Node.js, ``ws``);
* ``gorilla``: ``bench/peers/gorilla_hub/gorilla_hub`` (Go, gorilla/websocket);
* ``baseline``: tidings from another checkout (``--baseline PYTHON``: that tree's
  virtualenv interpreter), for before/after figures taken in the same run.

The load generator is ``bench/loadgen_go`` (Go, one epoll loop, a lean RFC 6455
client), built here if its binary is missing or older than its sources. The
server is pinned to CPU 0 and the load generator to CPU 1 with ``taskset``;
both inherit this script's RLIMIT_NOFILE, raised to 65536 (or to the hard
limit, where that is lower). Every wait has a timeout and every process this
script starts is stopped on the way out, also on errors and Ctrl-C.

Results go to ``bench/results/suite/suite-<date>.json`` (``--out`` to change);
``bench/plot.py`` draws the PNGs of ``docs/img/`` from such a file.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
LOADGEN_DIR = BENCH / "loadgen_go"
LOADGEN = LOADGEN_DIR / "loadgen"
PEERS = BENCH / "peers"
RESULTS = BENCH / "results" / "suite"
PYTHON = ROOT / ".venv" / "bin" / "python"
NOFILE = 65536
SERVER_CPU, LOAD_CPU = 0, 1

ALL_SERVERS = ("tidings", "websockets", "ws", "gorilla", "baseline")
#: The interpreter of another tidings checkout (``--baseline``), for ``baseline``.
BASELINE_PYTHON: list[Path] = []
ALL_SCENARIOS = ("fanout-max", "fanout-rate", "latency-100", "many-topics", "idle-10k")

# loadgen flags per scenario: (full run, --quick)
SCENARIO_ARGS: dict[str, tuple[list[str], list[str]]] = {
    "fanout-max": (
        ["-subscribers", "1000", "-inflight", "64", "-duration", "10s", "-sample-every", "10"],
        ["-subscribers", "200", "-inflight", "64", "-duration", "3s", "-sample-every", "10"],
    ),
    "fanout-rate": (
        ["-subscribers", "1000", "-rate", "1000", "-duration", "10s", "-sample-every", "10"],
        ["-subscribers", "200", "-rate", "1000", "-duration", "3s", "-sample-every", "10"],
    ),
    "latency-100": (
        ["-subscribers", "100", "-rate", "100", "-duration", "10s"],
        ["-subscribers", "100", "-rate", "100", "-duration", "3s"],
    ),
    "many-topics": (
        ["-subscribers", "10000", "-topic-rate", "2000", "-shared-rate", "5", "-duration", "10s"],
        ["-subscribers", "2000", "-topic-rate", "1000", "-shared-rate", "5", "-duration", "3s"],
    ),
    "idle-10k": (
        ["-subscribers", "10000", "-idle-settle", "3s"],
        ["-subscribers", "2000", "-idle-settle", "2s"],
    ),
}

READY = re.compile(rb"listening on ws://127\.0\.0\.1:(\d+)/ws")


# --- servers ---------------------------------------------------------------------------------


def server_command(name: str, port: int, tidings_args: list[str]) -> list[str]:
    if name in ("tidings", "baseline"):
        python = PYTHON if name == "tidings" else BASELINE_PYTHON[0]
        return [
            str(python), "-m", "tidings", "serve", "--port", str(port),
            "--log-level", "warning", "--max-connections", "20000", *tidings_args,
        ]  # fmt: skip
    if name == "websockets":
        return [str(PYTHON), str(PEERS / "websockets_hub.py"), "--port", str(port)]
    if name == "ws":
        return ["node", str(PEERS / "ws_hub.js"), "--port", str(port)]
    if name == "gorilla":
        return [str(PEERS / "gorilla_hub" / "gorilla_hub"), "--port", str(port)]
    raise ValueError(name)


def server_missing(name: str) -> str | None:
    """Why this server cannot run here, or None."""
    if name == "baseline":
        if not BASELINE_PYTHON:
            return "no --baseline interpreter given"
        return None if BASELINE_PYTHON[0].exists() else f"{BASELINE_PYTHON[0]} is missing"
    needs = {
        "tidings": [ROOT / "src" / "tidings" / "__main__.py", PYTHON],
        "websockets": [PEERS / "websockets_hub.py"],
        "ws": [PEERS / "ws_hub.js", PEERS / "node_modules" / "ws"],
        "gorilla": [PEERS / "gorilla_hub" / "gorilla_hub"],
    }[name]
    for path in needs:
        if not path.exists():
            return f"{path.relative_to(ROOT)} is missing"
    if name == "ws" and shutil.which("node") is None:
        return "node is not installed"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _raise_nofile() -> None:
    """RLIMIT_NOFILE to NOFILE, or to the hard limit where this user may not raise that."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    except (ValueError, OSError):
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Server:
    """One server process, pinned to SERVER_CPU; stdout watched for the ready line."""

    def __init__(self, name: str, cmd: list[str], log_path: Path) -> None:
        self.name = name
        self.cmd = ["taskset", "-c", str(SERVER_CPU), *cmd]
        self.log_path = log_path
        self.lines: list[bytes] = []
        self.port: int | None = None
        self._ready = threading.Event()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"{self.name}: no 'listening on' line within {timeout:.0f} s")
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name}: exited with {self.proc.returncode} at start")
        url = f"http://127.0.0.1:{self.port}/health"
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        json.loads(resp.read())
                        return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: GET /health did not answer 200")
            time.sleep(0.1)

    def _pump(self) -> None:
        assert self.proc and self.proc.stdout
        with open(self.log_path, "wb") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                if len(self.lines) < 10000:
                    self.lines.append(line)
                if not self._ready.is_set():
                    m = READY.search(line)
                    if m:
                        self.port = int(m.group(1))
                        self._ready.set()
        self._ready.set()

    @property
    def pid(self) -> int:
        assert self.proc
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> dict[str, Any]:
        """SIGTERM, then SIGKILL after ``timeout``; returns how it went and a log summary."""
        out: dict[str, Any] = {}
        if self.proc is None:
            return out
        was_alive = self.proc.poll() is None
        out["alive_at_end"] = was_alive
        if was_alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                out["killed"] = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        out["exit_code"] = self.proc.returncode
        text = b"".join(self.lines).decode(errors="replace")
        lines = [ln for ln in text.splitlines() if ln.strip()]
        out["log_lines"] = len(lines)
        out["tracebacks"] = text.count("Traceback")
        out["error_lines"] = sum(1 for ln in lines if re.search(r"error|exception", ln, re.I))
        out["log_tail"] = lines[-8:]
        return out


# --- machine ---------------------------------------------------------------------------------


def cores_busy(interval: float) -> list[float]:
    """Percent busy per CPU over ``interval`` seconds, everything included."""

    def read() -> list[tuple[float, float]]:
        rows = []
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu") and not line.startswith("cpu "):
                v = [float(x) for x in line.split()[1:]]
                total = sum(v[:8])
                rows.append((total - v[3] - v[4], total))
        return rows

    a = read()
    time.sleep(interval)
    b = read()
    return [
        round(100 * (bb - ab) / (bt - at), 1) if bt > at else 0.0
        for (ab, at), (bb, bt) in zip(a, b, strict=False)
    ]


def wait_quiet(limit: float, max_wait: float) -> dict[str, Any]:
    """Measure the background load; wait up to ``max_wait`` s for it to drop under ``limit``."""
    t0 = time.monotonic()
    while True:
        busy = cores_busy(1.0)
        total = sum(busy)
        if total <= limit or time.monotonic() - t0 >= max_wait:
            return {
                "background_busy_percent": busy,
                "waited_seconds": round(time.monotonic() - t0, 1),
                "quiet": total <= limit,
            }


def run_text(cmd: list[str], timeout: float = 10) -> str:
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_info() -> dict[str, Any]:
    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    websockets_version = run_text(
        [str(PYTHON), "-c", "import websockets; print(websockets.__version__)"]
    )
    ws_version = ""
    with contextlib.suppress(OSError, ValueError):
        ws_version = json.loads((PEERS / "node_modules" / "ws" / "package.json").read_text())[
            "version"
        ]
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": run_text([str(PYTHON), "-c", "import sys; print(sys.version.split()[0])"]),
        "go": run_text(["go", "version"]),
        "node": run_text(["node", "--version"]),
        "websockets": websockets_version,
        "ws": ws_version,
        "gorilla_websocket": run_text(
            ["dpkg-query", "-W", "-f=${Version}", "golang-github-gorilla-websocket-dev"]
        ),
        "server_cpu": SERVER_CPU,
        "loadgen_cpu": LOAD_CPU,
    }


def code_info() -> dict[str, Any]:
    digest = hashlib.sha256()
    for path in sorted((ROOT / "src" / "tidings").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    status = run_text(["git", "status", "--porcelain", "--", "src"])
    return {
        "git_commit": run_text(["git", "rev-parse", "HEAD"]),
        "src_modified": bool(status),
        "source_digest": digest.hexdigest()[:16],
    }


# --- build -----------------------------------------------------------------------------------


def ensure_go() -> None:
    if shutil.which("go"):
        return
    print("installing golang-go (apt-get) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "golang-go"], check=True, timeout=600, env=env)


def build_loadgen() -> None:
    sources = [*LOADGEN_DIR.glob("*.go"), LOADGEN_DIR / "go.mod"]
    if LOADGEN.exists() and all(LOADGEN.stat().st_mtime >= s.stat().st_mtime for s in sources):
        return
    ensure_go()
    print("building bench/loadgen_go ...", flush=True)
    # standard library only: no module download, works offline
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOPROXY": "off", "CGO_ENABLED": "0"}
    subprocess.run(
        ["go", "build", "-o", str(LOADGEN), "."], cwd=LOADGEN_DIR, check=True, timeout=300, env=env
    )


def setup_peers(servers: list[str]) -> None:
    script = PEERS / "setup.sh"
    if not script.exists() or not set(servers) - {"tidings"}:
        return
    print("bench/peers/setup.sh ...", flush=True)
    proc = subprocess.run(
        ["bash", str(script)], cwd=ROOT, timeout=900, check=False, capture_output=True, text=True
    )
    if proc.returncode != 0:
        print(f"  setup.sh exited {proc.returncode}; peers that are missing are skipped")
        print("  " + "\n  ".join((proc.stdout + proc.stderr).strip().splitlines()[-10:]))


# --- one scenario ----------------------------------------------------------------------------


def run_scenario(name: str, scenario: str, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    flags = SCENARIO_ARGS[scenario][1 if args.quick else 0]
    if args.duration and scenario != "idle-10k":
        flags = [*flags, "-duration", f"{args.duration}s"]
    quiet = wait_quiet(args.quiet_limit, args.quiet_wait)
    server = Server(name, server_command(name, 0, args.tidings_args), log)
    entry: dict[str, Any] = {"server_command": server.cmd, "machine_before": quiet}
    try:
        server.start()
        time.sleep(1.0)  # let it settle: the fresh RSS is read by the load generator
        cmd = [
            "taskset", "-c", str(LOAD_CPU), str(LOADGEN),
            "-url", f"ws://127.0.0.1:{server.port}/ws",
            "-scenario", scenario, "-server-pid", str(server.pid), *flags, *args.loadgen_args,
        ]  # fmt: skip
        entry["loadgen_command"] = cmd
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=args.scenario_timeout,
                check=False,
            )
            out = proc.stdout.strip().splitlines()
            entry["result"] = json.loads(out[-1]) if out else {"error": "no output"}
            if proc.returncode != 0 and "error" not in entry["result"]:
                entry["result"]["error"] = f"loadgen exited {proc.returncode}"
            if proc.stderr.strip():
                entry["loadgen_stderr"] = proc.stderr.strip().splitlines()[-10:]
        except subprocess.TimeoutExpired:
            entry["result"] = {"error": f"loadgen timed out after {args.scenario_timeout} s"}
        except json.JSONDecodeError as exc:
            entry["result"] = {"error": f"loadgen output is not JSON: {exc}"}
        entry["server_alive_after"] = server.alive()
    except RuntimeError as exc:
        entry["result"] = {"error": str(exc)}
    finally:
        entry["server_exit"] = server.stop()
    return entry


# --- reporting -------------------------------------------------------------------------------

# the figure that picks the round shown when a scenario ran more than once
HEADLINE: dict[str, tuple[str, ...]] = {
    "fanout-max": ("phase", "deliveries_per_second"),
    "fanout-rate": ("phase", "deliveries_per_second"),
    "latency-100": ("phase", "latency", "p99_ms"),
    "many-topics": ("phase", "latency", "p99_ms"),
    "idle-10k": ("rss_per_connection_bytes",),
}


def pick_median(scenario: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The round whose headline figure is the median (lower median), with every round's figure."""
    path = HEADLINE[scenario]
    ok = [e for e in entries if isinstance(_get(e, "result", *path), int | float)]
    if not ok:
        chosen = entries[-1]
    else:
        ok.sort(key=lambda e: _get(e, "result", *path))
        chosen = ok[(len(ok) - 1) // 2]
    if len(entries) > 1:
        chosen = dict(chosen)
        chosen["rounds"] = {
            "headline": ".".join(path),
            "values": [_get(e, "result", *path) for e in entries],
            "shown": entries.index(next(e for e in entries if e["result"] is chosen["result"])) + 1,
            "all": [{k: v for k, v in e.items() if k != "rounds"} for e in entries],
        }
    return chosen


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


# (label, path in the loadgen result, format, higher is better?)
Metric = tuple[str, tuple[str, ...], str, bool | None]
_PHASE_CPU: list[Metric] = [
    ("server CPU %", ("phase", "cpu_publishing", "server_cpu_percent"), "{:.0f}", None),
    ("loadgen CPU %", ("phase", "cpu_publishing", "loadgen_cpu_percent"), "{:.0f}", None),
    ("events per read", ("phase", "events_per_read"), "{:.1f}", None),
    ("others CPU %", ("phase", "cpu_publishing", "others_cpu_percent"), "{:.0f}", None),
    ("out of order", ("phase", "out_of_order"), "{:d}", None),
]
_DELIVERY: list[Metric] = [
    ("delivered fraction", ("phase", "delivered_fraction"), "{:.4f}", True),
    ("dropped (seq gaps)", ("phase", "drops_in_stream"), "{:,d}", None),
    ("missing at end", ("phase", "drops_at_end"), "{:,d}", None),
    ("answers missing", ("phase", "publish_answers_missing"), "{:,d}", None),
]
METRICS: dict[str, list[Metric]] = {
    "fanout-max": [
        ("deliveries/s", ("phase", "deliveries_per_second"), "{:,.0f}", True),
        ("publishes/s", ("phase", "publish_rate"), "{:,.0f}", True),
        *_DELIVERY,
        ("latency p50 ms", ("phase", "latency", "p50_ms"), "{:.1f}", False),
        ("latency p99 ms", ("phase", "latency", "p99_ms"), "{:.1f}", False),
        *_PHASE_CPU,
    ],
    "fanout-rate": [
        ("deliveries/s", ("phase", "deliveries_per_second"), "{:,.0f}", True),
        ("events offered", ("phase", "published"), "{:,d}", None),
        ("events sequenced", ("phase", "sequenced"), "{:,d}", None),
        *_DELIVERY,
        ("latency p50 ms", ("phase", "latency", "p50_ms"), "{:.1f}", False),
        ("latency p99 ms", ("phase", "latency", "p99_ms"), "{:.1f}", False),
        ("run+drain s", ("phase", "cpu_total", "wall_seconds"), "{:.1f}", None),
        *_PHASE_CPU,
    ],
    "latency-100": [
        ("latency p50 ms", ("phase", "latency", "p50_ms"), "{:.2f}", False),
        ("latency p99 ms", ("phase", "latency", "p99_ms"), "{:.2f}", False),
        ("latency p99.9 ms", ("phase", "latency", "p999_ms"), "{:.2f}", False),
        ("latency max ms", ("phase", "latency", "max_ms"), "{:.2f}", False),
        ("latency samples", ("phase", "latency", "samples"), "{:,d}", None),
        *_DELIVERY,
        *_PHASE_CPU,
    ],
    "many-topics": [
        ("connect s", ("connect", "seconds"), "{:.1f}", False),
        ("deliveries/s", ("phase", "deliveries_per_second"), "{:,.0f}", True),
        ("publishes/s", ("phase", "publish_rate"), "{:,.0f}", True),
        *_DELIVERY,
        ("latency p50 ms", ("phase", "latency", "p50_ms"), "{:.1f}", False),
        ("latency p99 ms", ("phase", "latency", "p99_ms"), "{:.1f}", False),
        *_PHASE_CPU,
    ],
    "idle-10k": [
        ("KiB per connection", ("rss_per_connection_kib",), "{:.1f}", False),
        ("RSS fresh MiB", ("rss_fresh_mib",), "{:.1f}", False),
        ("RSS connected MiB", ("rss_connected_mib",), "{:.1f}", False),
        ("connect s", ("connect", "seconds"), "{:.1f}", False),
    ],
}


def derive(result: dict[str, Any]) -> None:
    """Add the few figures the tables want in friendlier units."""
    if "rss_per_connection_bytes" in result:
        result["rss_per_connection_kib"] = result["rss_per_connection_bytes"] / 1024
    for src, dst in (
        ("server_rss_fresh_bytes", "rss_fresh_mib"),
        ("server_rss_connected_bytes", "rss_connected_mib"),
    ):
        if isinstance(result.get(src), int) and result[src] > 0:
            result[dst] = result[src] / 2**20


def fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    try:
        return spec.format(value)
    except (ValueError, TypeError):
        return str(value)


def table(scenario: str, runs: dict[str, dict[str, Any]]) -> list[str]:
    """A Markdown table: one row per metric, one column per server, then tidings / peer."""
    servers = list(runs)
    peers = [s for s in servers if s != "tidings"] if "tidings" in servers else []
    head = ["metric", *servers, *[f"tidings/{p}" for p in peers]]
    rows = [head, ["---"] * len(head)]
    for label, path, spec, _better in METRICS[scenario]:
        vals = [_get(runs[s].get("result"), *path) for s in servers]
        row = [label, *[fmt(v, spec) for v in vals]]
        t = _get(runs.get("tidings", {}).get("result"), *path)
        for p in peers:
            v = _get(runs[p].get("result"), *path)
            if (
                isinstance(t, int | float)
                and isinstance(v, int | float)
                and v
                and _better is not None
            ):
                row.append(f"{t / v:.2f}")
            else:
                row.append("")
        rows.append(row)
    errors = [
        f"{s}: {_get(runs[s], 'result', 'error')}"
        for s in servers
        if _get(runs[s], "result", "error")
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for r in rows:
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        if r[0] == "---":
            cells = ["-" * widths[0], *[("-" * (w - 1)) + ":" for w in widths[1:]]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"error: {e}" for e in errors]
    return lines


def anomalies(name: str, scenario: str, entry: dict[str, Any]) -> list[str]:
    """Things a reader should not miss."""
    out = []
    r = entry.get("result") or {}
    p = r.get("phase") or {}
    if _get(p, "out_of_order"):
        out.append(f"{p['out_of_order']} events out of order")
    counters = r.get("counters") or {}
    for key in ("disconnects", "frame_errors", "bad_frames", "error_frames", "wrong_topic"):
        if counters.get(key):
            out.append(f"{key}={counters[key]}")
    if counters.get("read_errors"):
        out.append(f"read errors {counters['read_errors']}")
    if _get(r, "connect", "failed_attempts"):
        out.append(f"failed connect attempts {r['connect']['failed_attempts']}")
    if p.get("publish_errors"):
        sample = (p.get("publish_error_samples") or [""])[0][:120]
        out.append(f"{p['publish_errors']} publish errors, e.g. {sample}")
    if p.get("publish_answers_missing"):
        out.append(f"{p['publish_answers_missing']} publishes never answered")
    if p.get("drain") not in (None, "complete"):
        out.append(f"drain {p['drain']}")
    load = _get(p, "cpu_publishing", "loadgen_cpu_percent")
    if isinstance(load, int | float) and load > 70:
        out.append(f"load generator at {load:.0f}% CPU: it may have limited the server")
    others = _get(p, "cpu_publishing", "others_cpu_percent")
    if isinstance(others, int | float) and others > 15:
        out.append(f"others used {others:.0f}% of a CPU meanwhile (disturbed run)")
    if not (entry.get("machine_before") or {}).get("quiet", True):
        busy = entry["machine_before"]["background_busy_percent"]
        out.append(f"machine busy before the run: {busy}")
    ex = entry.get("server_exit") or {}
    if entry.get("server_alive_after") is False:
        out.append("server died during the run")
    if ex.get("tracebacks"):
        out.append(f"{ex['tracebacks']} tracebacks in the server log")
    if ex.get("killed"):
        out.append("server ignored SIGTERM for 10 s and was killed")
    return [f"{name}/{scenario}: {a}" for a in out]


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--servers",
        default=",".join(s for s in ALL_SERVERS if s != "baseline"),
        help="comma-separated subset of %(default)s (and baseline, with --baseline)",
    )
    ap.add_argument(
        "--scenarios", default=",".join(ALL_SCENARIOS), help="comma-separated subset of %(default)s"
    )
    ap.add_argument(
        "--quick", action="store_true", help="fewer connections and 3 s phases (~2 min)"
    )
    ap.add_argument(
        "--duration", type=float, default=0, help="override every phase's publishing seconds"
    )
    ap.add_argument(
        "--tidings-args",
        default="",
        help="extra 'tidings serve' flags, e.g. '--ping-interval 600 --read-timeout 1200' "
        "(default: none, so tidings pings every 30 s like the peers)",
    )
    ap.add_argument(
        "--scenario-timeout",
        type=float,
        default=180,
        help="seconds one load generator run may take",
    )
    ap.add_argument(
        "--quiet-limit",
        type=float,
        default=25,
        help="background CPU %% (both CPUs summed) considered quiet",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=20,
        help="seconds to wait for a quiet machine before each run",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run each scenario this many times per server, round-robin; the table shows "
        "the round with the median headline figure (default 1; 2 takes ~11 min)",
    )
    ap.add_argument(
        "--loadgen-args",
        default="",
        help="extra load generator flags for every run, e.g. '-batch-wait 0'",
    )
    ap.add_argument("--no-setup", action="store_true", help="do not run bench/peers/setup.sh")
    ap.add_argument(
        "--baseline",
        type=Path,
        help="python of another tidings checkout (its .venv/bin/python): server 'baseline'",
    )
    ap.add_argument(
        "--out", type=Path, help="results JSON (default bench/results/suite/suite-<date>.json)"
    )
    args = ap.parse_args(argv)
    if args.baseline is not None:
        BASELINE_PYTHON[:] = [args.baseline.absolute()]
    args.tidings_args = args.tidings_args.split()
    args.loadgen_args = args.loadgen_args.split()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for s in args.servers:
        if s not in ALL_SERVERS:
            ap.error(f"unknown server {s!r}")
    for s in args.scenarios:
        if s not in ALL_SCENARIOS:
            ap.error(f"unknown scenario {s!r}")
    return args


def _show(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


@contextlib.contextmanager
def pinned_to(cpu: int) -> Iterator[None]:
    """Keep this orchestrator off the server's CPU while it waits."""
    before = os.sched_getaffinity(0)
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, before)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (os.cpu_count() or 1) < 2 or shutil.which("taskset") is None:
        print("this suite needs 2 CPUs and taskset", file=sys.stderr)
        return 2
    _raise_nofile()
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 12000:
        print(
            "RLIMIT_NOFILE stays below 12000: the 10k-connection scenarios will fail",
            file=sys.stderr,
        )
    build_loadgen()
    if not args.no_setup:
        setup_peers(args.servers)
    servers = []
    skipped = {}
    for s in args.servers:
        why = server_missing(s)
        if why:
            skipped[s] = why
            print(f"skipping {s}: {why}", flush=True)
        else:
            servers.append(s)
    stamp = datetime.now(UTC)
    suffix = "-quick" if args.quick else ""
    out_path = args.out or RESULTS / f"suite-{stamp.strftime('%Y%m%d-%H%M%S')}{suffix}.json"
    logdir = out_path.resolve().parent / "logs" / stamp.strftime("%Y%m%d-%H%M%S")
    logdir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "started": stamp.isoformat(timespec="seconds"),
        "command": " ".join(
            [".venv/bin/python", "bench/suite.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "quick": args.quick,
        "machine": machine_info(),
        "code": code_info(),
        "servers": servers,
        "skipped": skipped,
        "scenarios": {},
        "logs": _show(logdir),
    }
    t_start = time.monotonic()
    with pinned_to(LOAD_CPU):
        for scenario in args.scenarios:
            rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
            for rnd in range(args.rounds):
                for name in servers:  # round-robin: drifts of the machine hit every server alike
                    t0 = time.monotonic()
                    label = f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else ""
                    elapsed = time.monotonic() - t_start
                    print(f"[{elapsed:5.0f} s] {scenario} / {name}{label} ...", flush=True)
                    tag = f"-r{rnd + 1}" if args.rounds > 1 else ""
                    entry = run_scenario(
                        name, scenario, args, logdir / f"{name}-{scenario}{tag}.log"
                    )
                    entry["seconds"] = round(time.monotonic() - t0, 1)
                    if isinstance(entry.get("result"), dict):
                        derive(entry["result"])
                    rounds[name].append(entry)
                    for line in anomalies(name, scenario, entry):
                        print("  note: " + line, flush=True)
            runs = {name: pick_median(scenario, entries) for name, entries in rounds.items()}
            doc["scenarios"][scenario] = runs
            print(f"\n## {scenario}\n")
            print("\n".join(table(scenario, runs)) + "\n", flush=True)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(doc, indent=1) + "\n")  # after every scenario
    doc["seconds"] = round(time.monotonic() - t_start, 1)
    doc["notes"] = [
        line
        for scenario, runs in doc["scenarios"].items()
        for name, entry in runs.items()
        for line in anomalies(name, scenario, entry)
    ]
    out_path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {_show(out_path)} ({doc['seconds']:.0f} s); server logs in {_show(logdir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
