"""Reconnect storm: a node is killed under 10,000 subscribers, who all resume on another at once.

Issue 14: "A storm of 10,000 clients reconnecting at once with since/epoch after a
node is killed: every client resumed with recovered: true, none refused for a
reason other than a configured limit, time to all resumed measured"::

    .venv/bin/python bench/storm.py                       # 10,000 clients, ~1 min
    .venv/bin/python bench/storm.py --quick               # 1,000 clients
    .venv/bin/python bench/storm.py --jitter 2            # reconnects spread over 2 s
    .venv/bin/python bench/storm.py --to restarted        # back to A, restarted on its port
    .venv/bin/python bench/storm.py --profile             # py-spy on B during the storm

What it does, on 127.0.0.1 only:

1. starts its own ``redis-server`` on a free port (no persistence; never 6379)
   and two ``tidings serve`` nodes A and B on it (``--backplane redis://...``),
   both pinned to CPU 0 (``taskset``); Redis, the load generator, the publisher
   and this script run on CPU 1;
2. a publisher thread publishes to the K topics (``storm0`` ...) through B's
   HTTP API at ``--rate`` events/s, round-robin, for the whole run, so there is
   always something to recover;
3. the load generator (``bench/loadgen_go``, scenario ``storm``) connects N
   subscribers to A, each subscribed to topic i mod K, and says ``ready``;
4. after ``--traffic`` seconds of events, A gets SIGKILL; every subscriber
   sees its connection drop and reconnects at once (``--jitter 0``: the
   thundering herd) to B (or to A restarted on its port, ``--to restarted``),
   resubscribing with the ``since``/``epoch`` of the last event it got; a
   refused attempt is retried after 50 ms doubling to 1 s (+-50%);
5. once all have resumed, publishing goes on for ``--after`` seconds; then it
   stops, and the load generator reports.

Figures: time from the kill to all resumed (the last subscribe reply), per
subscriber p50/p99/max from the first lost connection, the same to the end of
each one's replay (caught up), ``recovered`` true/false counts, refusals by
reason, gaps and duplicates in every subscriber's seq stream across the move,
subscribers that ended behind the publisher's last acknowledged seq, B's CPU
and RSS over the storm (from ``/proc``, every 0.1 s) and the load generator's
CPU. Every wait has a timeout; every process started here is stopped on the
way out, also on errors and Ctrl-C.

Results: ``bench/results/storm-<date>.json`` (``--out`` to change), a summary
on stdout; with ``--profile``, a speedscope file next to it and its top frames
in the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import queue
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import suite  # bench/suite.py: sys.path[0] is this script's directory
from cluster import RedisServer, health, wait_backplane
from suite import LOADGEN, PYTHON, ROOT, Server, build_loadgen, free_port

RESULTS = ROOT / "bench" / "results"
PY_SPY = ROOT / ".venv" / "bin" / "py-spy"
API_KEY = "storm-bench-key"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- /proc -------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, in seconds."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Sampler(threading.Thread):
    """Every 0.1 s: (unix ns, CPU seconds, RSS) of each watched process."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids = dict(pids)
        self.rows: dict[str, list[tuple[int, float, int]]] = {name: [] for name in pids}
        self.stop_flag = threading.Event()

    def watch(self, name: str, pid: int) -> None:
        self.pids[name] = pid
        self.rows.setdefault(name, [])

    def run(self) -> None:
        while not self.stop_flag.is_set():
            now = time.time_ns()
            for name, pid in list(self.pids.items()):
                cpu, rss = cpu_seconds(pid), rss_bytes(pid)
                if cpu is not None and rss is not None:
                    self.rows[name].append((now, cpu, rss))
            self.stop_flag.wait(0.1)

    def window(self, name: str, start_ns: int, end_ns: int) -> dict[str, Any]:
        """CPU % of one CPU and RSS over [start, end] (samples nearest inside)."""
        rows = [r for r in self.rows.get(name, []) if start_ns - 150_000_000 <= r[0] <= end_ns]
        if len(rows) < 2:
            return {"samples": len(rows)}
        first, last = rows[0], rows[-1]
        seconds = (last[0] - first[0]) / 1e9
        return {
            "seconds": round(seconds, 2),
            "cpu_percent": round(100 * (last[1] - first[1]) / seconds, 1) if seconds else None,
            "rss_before_bytes": first[2],
            "rss_peak_bytes": max(r[2] for r in rows),
            "rss_end_bytes": last[2],
            "samples": len(rows),
        }


# --- the publisher -----------------------------------------------------------------------------


class Publisher(threading.Thread):
    """POST /api/publish to one node at ``rate``/s over ``topics``, open loop, keep-alive.

    Records each topic's highest acknowledged seq and epoch, and every failure.
    """

    def __init__(self, port: int, topics: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.port, self.topics, self.rate = port, topics, rate
        self.stop_flag = threading.Event()
        self.acked: dict[str, tuple[int, str]] = {}
        self.sent = self.ok = 0
        self.errors: dict[str, int] = {}
        self.latencies_ms: list[float] = []
        self.behind_max_s = 0.0

    def _conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)

    def run(self) -> None:
        conn = self._conn()
        interval = 1.0 / self.rate
        due = time.monotonic()
        i = 0
        headers = {"Authorization": f"apikey {API_KEY}", "Content-Type": "application/json"}
        while not self.stop_flag.is_set():
            now = time.monotonic()
            if now < due:
                self.stop_flag.wait(due - now)
                continue
            self.behind_max_s = max(self.behind_max_s, now - due)
            topic = f"storm{i % self.topics}"
            body = json.dumps({"topic": topic, "payload": {"n": i}})
            t0 = time.monotonic()
            self.sent += 1
            try:
                conn.request("POST", "/api/publish", body, headers)
                resp = conn.getresponse()
                data = resp.read()
                if resp.status == 200:
                    answer = json.loads(data)
                    seq, epoch = answer["seq"], answer["epoch"]
                    if topic not in self.acked or self.acked[topic][0] < seq:
                        self.acked[topic] = (seq, epoch)
                    self.ok += 1
                    self.latencies_ms.append((time.monotonic() - t0) * 1000)
                else:
                    key = f"HTTP {resp.status}: {data[:100].decode(errors='replace')}"
                    self.errors[key] = self.errors.get(key, 0) + 1
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                key = type(exc).__name__
                self.errors[key] = self.errors.get(key, 0) + 1
                conn.close()
                conn = self._conn()
            i += 1
            due += interval
        conn.close()

    def finish(self) -> dict[str, Any]:
        self.stop_flag.set()
        self.join(10)
        lat = sorted(self.latencies_ms)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 2) if lat else None

        return {
            "rate": self.rate,
            "sent": self.sent,
            "acknowledged": self.ok,
            "errors": self.errors,
            "latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)},
            "behind_schedule_max_s": round(self.behind_max_s, 3),
        }


# --- py-spy -----------------------------------------------------------------------------------


def summarize_speedscope(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive shares by function of a py-spy speedscope file (all threads)."""
    doc = json.loads(path.read_text())
    frames = doc["shared"]["frames"]

    def name(k: int) -> str:
        f = frames[k]
        file = (f.get("file") or "").split("/site-packages/")[-1].split("/src/")[-1]
        return f"{f.get('name')} ({file})"

    own: dict[str, float] = {}
    incl: dict[str, float] = {}
    total = 0.0
    for profile in doc["profiles"]:
        for stack, weight in zip(profile["samples"], profile["weights"], strict=False):
            total += weight
            if not stack:
                continue
            names = [name(k) for k in stack]
            own[names[-1]] = own.get(names[-1], 0) + weight
            for n in set(names):
                incl[n] = incl.get(n, 0) + weight

    def share(d: dict[str, float], k: int) -> list[list[Any]]:
        ranked = sorted(d.items(), key=lambda kv: -kv[1])[:k]
        return [[round(100 * n / max(total, 1), 1), f] for f, n in ranked]

    return {"samples": total, "self_percent": share(own, top), "inclusive_percent": share(incl, 25)}


# --- one run -----------------------------------------------------------------------------------


def node_command(name: str, port: int, redis_url: str, extra: list[str]) -> list[str]:
    return [
        str(PYTHON), "-m", "tidings", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--node-id", name, "--backplane", redis_url, "--log-level", "warning",
        "--max-connections", "20000", *extra,
    ]  # fmt: skip


def start_node(name: str, port: int, redis_url: str, args: argparse.Namespace, log: Path) -> Server:
    node = Server(name, node_command(name, port, redis_url, args.server_args), log)
    node.cmd = ["taskset", "-c", str(args.server_cpu), *node.cmd[3:]]
    node.start()
    assert node.port is not None
    wait_backplane(node.port)
    return node


class Lines(threading.Thread):
    """The load generator's stdout, line by line, into a queue (the last line is its JSON)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.q: queue.Queue[str | None] = queue.Queue()
        self.lines: list[str] = []

    def run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self.q.put(line.rstrip("\n"))
        self.q.put(None)

    def wait_for(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"load generator: no {prefix!r} line within {timeout:.0f} s")
            try:
                line = self.q.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                tail = "; ".join(self.lines[-3:])
                raise RuntimeError(f"load generator ended before {prefix!r}: {tail}")
            if line.startswith(prefix):
                return line


def run(args: argparse.Namespace, workdir: Path, logdir: Path) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    redis = RedisServer(args.aux_cpu, workdir)
    nodes: dict[str, Server] = {}
    publisher: Publisher | None = None
    sampler: Sampler | None = None
    loadgen: subprocess.Popen[str] | None = None
    spy: subprocess.Popen[bytes] | None = None
    try:
        redis.start()
        entry["redis_command"] = redis.cmd
        port_a, port_b = free_port(), free_port()
        nodes["a"] = start_node("a", port_a, redis.url, args, logdir / "node-a.log")
        nodes["b"] = start_node("b", port_b, redis.url, args, logdir / "node-b.log")
        entry["node_commands"] = [n.cmd for n in nodes.values()]
        target_url = f"ws://127.0.0.1:{port_a if args.to == 'restarted' else port_b}/ws"
        publisher = Publisher(port_b, args.topics, args.rate)
        publisher.start()
        cmd = [
            "taskset", "-c", str(args.aux_cpu), str(LOADGEN), "-scenario", "storm",
            "-url", f"ws://127.0.0.1:{port_a}/ws", "-storm-url", target_url,
            "-subscribers", str(args.clients), "-storm-topics", str(args.topics),
            "-storm-jitter", f"{args.jitter}s", "-storm-timeout", f"{args.storm_timeout}s",
            "-concurrency", "64", "-settle", "1s", "-max-time", f"{args.max_time}s",
        ]  # fmt: skip
        entry["loadgen_command"] = cmd
        loadgen = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        lines = Lines(loadgen)
        lines.start()
        t0 = time.monotonic()
        lines.wait_for("ready", 120)
        entry["connect_seconds"] = round(time.monotonic() - t0, 2)
        target = "b" if args.to == "b" else "a"
        sampler = Sampler({"b": nodes["b"].pid, "loadgen": loadgen.pid, "redis": redis.pid})
        sampler.start()
        time.sleep(args.traffic)  # pacing: events flow to the subscribers on A
        entry["rss_before_kill"] = {
            "a": rss_bytes(nodes["a"].pid),
            "b": rss_bytes(nodes["b"].pid),
        }
        if args.profile and target == "b":
            spy = start_spy(args, nodes["b"].pid, logdir, entry)
        # the kill
        a = nodes["a"]
        assert a.proc is not None
        kill_ns = time.time_ns()
        os.killpg(a.proc.pid, signal.SIGKILL)
        a.proc.wait(10)
        entry["kill_unix_ns"] = kill_ns
        if args.to == "restarted":
            t_restart = time.monotonic()
            nodes["a"] = start_node("a", port_a, redis.url, args, logdir / "node-a2.log")
            entry["restart_seconds"] = round(time.monotonic() - t_restart, 2)
            sampler.watch("a2", nodes["a"].pid)
            if args.profile:
                spy = start_spy(args, nodes["a"].pid, logdir, entry)
        try:
            lines.wait_for("resumed", args.storm_timeout + 15)
            entry["resumed_line_after_kill_s"] = round((time.time_ns() - kill_ns) / 1e9, 3)
        except RuntimeError as exc:
            entry["storm_error"] = str(exc)
        resumed_ns = time.time_ns()
        time.sleep(args.after)  # pacing: live events after the storm
        entry["publisher"] = publisher.finish()
        entry["acked_by_topic"] = {t: list(v) for t, v in sorted(publisher.acked.items())}
        publisher = None
        time.sleep(0.5)  # the last acknowledged events reach the subscribers
        assert loadgen.stdin is not None
        loadgen.stdin.write("stop\n")
        loadgen.stdin.flush()
        try:
            loadgen.wait(30)
        except subprocess.TimeoutExpired:
            entry["loadgen_error"] = "did not report within 30 s of stop"
        lines.join(5)
        last = lines.lines[-1] if lines.lines else ""
        try:
            entry["result"] = json.loads(last)
        except json.JSONDecodeError:
            entry["result"] = {"error": f"no JSON from the load generator: {last[:200]!r}"}
        if loadgen.stderr is not None:
            err = loadgen.stderr.read().strip()
            if err:
                entry["loadgen_stderr"] = err.splitlines()[-10:]
        if spy is not None:
            finish_spy(spy, entry)
            spy = None
        storm = (entry.get("result") or {}).get("storm") or {}
        end_ns = (
            storm.get("all_caught_up_unix_ns") or storm.get("all_resumed_unix_ns") or resumed_ns
        )
        who = "b" if args.to == "b" else "a2"
        entry["server_during_storm"] = sampler.window(who, kill_ns, end_ns)
        entry["loadgen_during_storm"] = sampler.window("loadgen", kill_ns, end_ns)
        entry["redis_during_storm"] = sampler.window("redis", kill_ns, end_ns)
        entry["health_after"] = {
            name: health(n.port) for name, n in nodes.items() if n.port and n.alive()
        }
        entry["metrics_after"] = metrics(nodes[target].port)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        entry.setdefault("error", f"{type(exc).__name__}: {exc}")
    finally:
        if publisher is not None:
            publisher.finish()
        if sampler is not None:
            sampler.stop_flag.set()
        if spy is not None:
            finish_spy(spy, entry)
        if loadgen is not None and loadgen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(loadgen.pid, signal.SIGKILL)
            loadgen.wait(5)
        entry["node_exit"] = {name: n.stop() for name, n in nodes.items()}
        redis.stop()
    return entry


def start_spy(
    args: argparse.Namespace, pid: int, workdir: Path, entry: dict[str, Any]
) -> subprocess.Popen[bytes]:
    out = args.out.with_suffix(".speedscope.json")
    spy_cmd = [
        "taskset", "-c", str(args.aux_cpu), str(PY_SPY), "record", "--nonblocking", "-r", "100",
        "--format", "speedscope", "-o", str(out), "-d", str(args.profile_seconds),
        "-p", str(pid),
    ]  # fmt: skip
    entry["profile_command"] = spy_cmd
    entry["profile_seconds"] = args.profile_seconds
    entry["profile_file"] = str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out)
    log = (workdir / "py-spy.log").open("wb")
    return subprocess.Popen(spy_cmd, stdout=log, stderr=subprocess.STDOUT)


def finish_spy(spy: subprocess.Popen[bytes], entry: dict[str, Any]) -> None:
    try:
        spy.wait(int(entry.get("profile_seconds", 15)) + 30)
    except subprocess.TimeoutExpired:
        spy.send_signal(signal.SIGINT)  # py-spy writes what it has and exits
        try:
            spy.wait(20)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(5)
    path = ROOT / entry.get("profile_file", "")
    if path.is_file():
        try:
            entry["profile"] = summarize_speedscope(path)
        except (ValueError, KeyError) as exc:
            entry["profile"] = {"error": repr(exc)}


def metrics(port: int | None) -> dict[str, float]:
    """The few /metrics samples that say how many clients the node holds."""
    if port is None:
        return {}
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
    except (OSError, http.client.HTTPException):
        return {}
    keep = ("tidings_connections", "tidings_subscriptions", "tidings_disconnects_total")
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(keep):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


# --- report ------------------------------------------------------------------------------------


def figures(entry: dict[str, Any]) -> dict[str, Any]:
    """The headline figures, in the units the summary and docs/benchmarks.md use."""
    r = entry.get("result") or {}
    s = r.get("storm") or {}
    kill = entry.get("kill_unix_ns")
    out: dict[str, Any] = {}
    if kill and s.get("all_resumed_unix_ns"):
        out["kill_to_all_resumed_s"] = round((s["all_resumed_unix_ns"] - kill) / 1e9, 3)
    if kill and s.get("all_caught_up_unix_ns"):
        out["kill_to_all_caught_up_s"] = round((s["all_caught_up_unix_ns"] - kill) / 1e9, 3)
    if kill and s.get("first_lost_unix_ns"):
        out["kill_to_first_lost_ms"] = round((s["first_lost_unix_ns"] - kill) / 1e6, 1)
    for key in (
        "resumed", "not_resumed", "recovered_true", "recovered_false", "recovered_missing",
        "refusals", "gaps", "duplicates", "epoch_changes", "replayed", "attempts_max",
        "behind_at_end", "lost_spread_ms",
    ):  # fmt: skip
        out[key] = s.get(key)
    for key in ("resume_ms", "caught_up_ms"):
        h = s.get(key) or {}
        out[key] = {k: h.get(k) for k in ("p50_ms", "p99_ms", "max_ms")}
    # subscribers behind what the publisher was told at the end
    acked = entry.get("acked_by_topic") or {}
    final = s.get("final_seq_by_topic") or {}
    out["topics_behind_publisher"] = {
        t: [acked[t][0], final.get(t)] for t in acked if final.get(t) != acked[t][0]
    }
    srv = entry.get("server_during_storm") or {}
    out["server_cpu_percent"] = srv.get("cpu_percent")
    out["server_rss_before_mib"] = _mib(srv.get("rss_before_bytes"))
    out["server_rss_peak_mib"] = _mib(srv.get("rss_peak_bytes"))
    out["loadgen_cpu_percent"] = (entry.get("loadgen_during_storm") or {}).get("cpu_percent")
    out["redis_cpu_percent"] = (entry.get("redis_during_storm") or {}).get("cpu_percent")
    return out


def _mib(v: Any) -> float | None:
    return round(v / 2**20, 1) if isinstance(v, int | float) else None


def summary(doc: dict[str, Any]) -> list[str]:
    f = doc["figures"]
    p = doc["settings"]
    lines = [
        f"storm: {p['clients']:,} subscribers on {p['topics']} topics, A killed, to {p['to']}"
        f" (jitter {p['jitter']} s), publisher {p['rate']}/s via B",
        f"  kill -> all resumed     {f.get('kill_to_all_resumed_s')} s"
        f"   (all replays done {f.get('kill_to_all_caught_up_s')} s;"
        f" first loss seen {f.get('kill_to_first_lost_ms')} ms after the kill)",
        f"  per subscriber resume  p50 {f['resume_ms']['p50_ms']} ms,"
        f" p99 {f['resume_ms']['p99_ms']} ms, max {f['resume_ms']['max_ms']} ms"
        " (from the first lost connection)",
        f"  resumed {f.get('resumed')}, not resumed {f.get('not_resumed')};"
        f" recovered true {f.get('recovered_true')}, false {f.get('recovered_false')},"
        f" missing {f.get('recovered_missing')}",
        f"  refusals {f.get('refusals')}"
        f" (most attempts by one subscriber: {f.get('attempts_max')})",
        f"  gaps {f.get('gaps')}, duplicates {f.get('duplicates')},"
        f" epoch changes {f.get('epoch_changes')}, events replayed {f.get('replayed')},"
        f" behind at end {f.get('behind_at_end')}, topics behind the publisher"
        f" {len(f.get('topics_behind_publisher') or {})}",
        f"  server CPU {f.get('server_cpu_percent')} %, RSS {f.get('server_rss_before_mib')}"
        f" -> peak {f.get('server_rss_peak_mib')} MiB; load generator CPU"
        f" {f.get('loadgen_cpu_percent')} %; redis CPU {f.get('redis_cpu_percent')} %",
    ]
    for name, log in (doc.get("server_logs") or {}).items():
        if log.get("warnings"):
            lines.append(f"  {name}: {log['warnings']} warning/error lines")
    if doc.get("error"):
        lines.append(f"  error: {doc['error']}")
    prof = doc.get("profile") or {}
    if prof.get("self_percent"):
        lines.append("  py-spy, self % (top 8):")
        lines += [f"    {pct:5.1f}  {fn}" for pct, fn in prof["self_percent"][:8]]
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=None, help="subscribers (10000; --quick 1000)")
    ap.add_argument("--quick", action="store_true", help="1,000 subscribers")
    ap.add_argument("--topics", type=int, default=100, help="topics (default 100)")
    ap.add_argument("--rate", type=float, default=100, help="publications/s through B (100)")
    ap.add_argument("--to", choices=("b", "restarted"), default="b", help="where clients go")
    ap.add_argument(
        "--jitter", type=float, default=0, help="spread reconnects over this many s (0: herd)"
    )
    ap.add_argument("--traffic", type=float, default=3, help="s of events before the kill (3)")
    ap.add_argument("--after", type=float, default=2, help="s of events after all resumed (2)")
    ap.add_argument("--storm-timeout", type=float, default=60, help="a client gives up after")
    ap.add_argument("--profile", action="store_true", help="py-spy record on B during the storm")
    ap.add_argument("--profile-seconds", type=int, default=15, help="py-spy duration (15)")
    ap.add_argument("--server-args", default="", help="extra 'tidings serve' flags for A and B")
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--aux-cpu", type=int, default=1, help="redis, load generator, this script")
    ap.add_argument("--out", type=Path, help="results JSON (bench/results/storm-<date>.json)")
    args = ap.parse_args(argv)
    if args.clients is None:
        args.clients = 1000 if args.quick else 10000
    args.server_args = args.server_args.split()
    args.max_time = int(args.storm_timeout + args.traffic + args.after + 200)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        print("this benchmark needs 2 CPUs", file=sys.stderr)
        return 2
    suite._raise_nofile()
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile < args.clients + 1000:
        print(f"RLIMIT_NOFILE is {nofile}: too low for {args.clients} clients", file=sys.stderr)
        return 2
    os.environ["TIDINGS_API_KEY"] = API_KEY
    build_loadgen()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    args.out = (args.out or RESULTS / f"storm-{stamp}.json").absolute()
    doc: dict[str, Any] = {
        "started": stamp,
        "command": " ".join([".venv/bin/python", "bench/storm.py", *(argv or sys.argv[1:])]),
        "settings": {
            "clients": args.clients,
            "topics": args.topics,
            "rate": args.rate,
            "to": args.to,
            "jitter": args.jitter,
            "traffic": args.traffic,
            "after": args.after,
            "server_args": args.server_args,
            "server_cpu": args.server_cpu,
            "aux_cpu": args.aux_cpu,
        },
        "machine": suite.machine_info(),
        "code": suite.code_info(),
        "background_busy_percent": suite.cores_busy(1.0),
    }
    logdir = RESULTS / "logs" / f"storm-{stamp}"  # bench/results/logs/ is not committed
    logdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tidings-storm-") as tmp, suite.pinned_to(args.aux_cpu):
        entry = run(args, Path(tmp), logdir)
    logs = {}
    for name in ("node-a.log", "node-a2.log", "node-b.log"):
        path = logdir / name
        if path.exists():
            lines = path.read_text(errors="replace").splitlines()
            warnings = [ln for ln in lines if " WARNING " in ln or " ERROR " in ln]
            logs[name] = {"lines": len(lines), "warnings": len(warnings), "tail": lines[-15:]}
    entry["server_logs"] = logs
    entry["server_logs_dir"] = str(logdir.relative_to(ROOT))
    doc.update(entry)
    doc["figures"] = figures(doc)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print("\n".join(summary(doc)))
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0 if not doc.get("error") else 1


if __name__ == "__main__":
    sys.exit(main())
