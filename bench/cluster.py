"""Several nodes: one node on the memory backplane, one and two nodes on the Redis backplane.

One command measures, with the same load generator (``bench/loadgen_go``) and the
same parameters, these configurations one after the other::

    .venv/bin/python bench/cluster.py                 # 1 round, ~1.5 min (busy machine: ~3)
    .venv/bin/python bench/cluster.py --rounds 3      # medians of 3 rounds, ~5 min
    .venv/bin/python bench/cluster.py --ref HEAD      # measure a commit, not the work tree
    .venv/bin/python bench/cluster.py --rounds 3 --ref HEAD --profile redis --plot
    .venv/bin/python bench/cluster.py --show bench/results/cluster-DATE.json

* ``memory``: one ``tidings serve`` node, memory backplane (the single-node baseline);
* ``redis``: one node on the Redis backplane;
* ``redis-2``: two nodes on the Redis backplane, both pinned to the node CPU;
* ``redis-2-spread``: two nodes on the Redis backplane, one per CPU.

In every configuration the subscribers are split evenly over the nodes (the
load generator's ``-sub-urls``: subscriber i goes to node i mod n) and one
publisher publishes to node 1, so with two nodes half of the deliveries are
made by a node the event reached only through Redis. Each configuration runs
two phases, each on fresh processes (a new ``redis-server`` and new nodes):

* ``max``: the load generator's ``fanout-max``: publish as fast as the
  publishes are acknowledged, ``--inflight`` unanswered at most; read
  deliveries per second;
* ``rate``: ``fanout-rate`` at a moderate fixed ``--rate``, every delivery's
  latency sampled; read latency p50/p99.

CPU placement, on a 2-CPU machine: every node of ``memory``, ``redis`` and
``redis-2`` runs on CPU 0 (``--node-cpu``), so the server side has one CPU in
each, and ``redis-2`` shows what the backplane and a second node cost, not how
two nodes scale. ``redis-2-spread`` puts node 2 on CPU 1, which it shares with
``redis-server``, the load generator and this script (``--aux-cpu``). Nothing
here can show how far N nodes on N machines scale: two CPUs are not two machines.

Our own ``redis-server`` is started on a free port in a temporary directory
(``--save "" --appendonly no``), never the instance on 6379. The CPU of each
node and of Redis is read from ``/proc`` by the load generator over the phase
(publishing and drain; its ``-watch-pids``), Redis's also from its ``INFO``
counters; a sampler reads Redis's ``CLIENT LIST`` and ``/proc/net/tcp`` every
0.5 s for what waits between Redis and the nodes. ``--profile CONFIG`` adds a
``max`` run of CONFIG with ``py-spy record`` on node 1 (not in the medians).
Every wait has a timeout and every process is stopped on the way out, also on
errors and Ctrl-C; a default run cannot take more than 8 x 108 s of load
generator time plus start and stop timeouts, and takes 1.5 to 3 minutes.

Results: a table per phase on stdout and ``bench/results/cluster-<date>.json``
(``--out`` to change); ``--plot`` also draws ``docs/img/cluster.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import suite  # bench/suite.py: sys.path[0] is this script's directory
from suite import LOADGEN, PYTHON, ROOT, Server, build_loadgen, free_port, wait_quiet

RESULTS = ROOT / "bench" / "results"
PY_SPY = ROOT / ".venv" / "bin" / "py-spy"
PLOT = ROOT / "docs" / "img" / "cluster.png"
TOPIC = "bench"


@dataclass(frozen=True)
class Config:
    name: str
    backplane: str  # "memory" or "redis"
    nodes: int
    spread: bool  # node k on CPU (node_cpu, aux_cpu)[k % 2] instead of all on node_cpu
    what: str
    workers: int = 0  # one `tidings serve --workers N` (worker k pinned as node k), not nodes


CONFIGS: dict[str, Config] = {
    c.name: c
    for c in (
        Config("memory", "memory", 1, False, "1 node, memory backplane"),
        Config("redis", "redis", 1, False, "1 node, Redis backplane"),
        Config("redis-2", "redis", 2, False, "2 nodes on one CPU, Redis backplane"),
        Config("redis-2-spread", "redis", 2, True, "2 nodes, one per CPU, Redis backplane"),
        Config("workers-2", "redis", 1, True, "tidings serve --workers 2, one worker per CPU", 2),
    )
}
PHASES = ("max", "rate")


# --- a tiny Redis client (RESP over a socket) ------------------------------------------------


class RedisConn:
    """Just enough RESP2 for PING, INFO and CLIENT LIST; every call has a timeout."""

    def __init__(self, port: int, timeout: float = 2.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def call(self, *args: str) -> Any:
        out = f"*{len(args)}\r\n".encode()
        for a in args:
            b = a.encode()
            out += b"$%d\r\n%s\r\n" % (len(b), b)
        self.sock.sendall(out)
        return self._read()

    def _read(self) -> Any:
        line = self.file.readline()
        if not line:
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.file.read(n + 2)[:-2]
            return data.decode(errors="replace")
        if kind == b"*":
            return [self._read() for _ in range(int(rest))]
        raise RuntimeError(f"unexpected reply {line!r}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


def parse_info(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith("#"):
            k, v = line.split(":", 1)
            out[k] = v.strip()
    return out


class RedisServer:
    """Our own redis-server on a free port, pinned, in a temporary directory."""

    def __init__(self, cpu: int, workdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir / f"redis-{self.port}"
        self.dir.mkdir()
        self.cmd = [
            "taskset", "-c", str(cpu), shutil.which("redis-server") or "redis-server",
            "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn = RedisConn(self.port)
                try:
                    if conn.call("PING") == "PONG":
                        return
                finally:
                    conn.close()
            except (OSError, RuntimeError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def info(self) -> dict[str, Any]:
        conn = RedisConn(self.port)
        try:
            info = parse_info(conn.call("INFO", "all"))
        finally:
            conn.close()
        keep = ("total_commands_processed", "total_net_input_bytes", "total_net_output_bytes",
                "used_cpu_sys", "used_cpu_user", "used_memory", "pubsub_channels",
                "client_recent_max_output_buffer", "redis_version")  # fmt: skip
        out: dict[str, Any] = {k: info[k] for k in keep if k in info}
        for key, value in info.items():
            if key.startswith("cmdstat_") and any(
                c in key for c in ("evalsha", "eval", "publish", "xrange", "xrevrange", "hset")
            ):
                out[key] = value
        return out

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


class Sampler(threading.Thread):
    """Every 0.5 s: Redis's output buffer per pub/sub client, and each node's RSS."""

    def __init__(self, redis: RedisServer | None, node_pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.redis, self.node_pids = redis, node_pids
        self.stop_flag = threading.Event()
        self.max_pubsub_omem = 0
        self.max_pubsub_oll = 0
        self.max_rss = [0] * len(node_pids)
        self.max_socket_queue = 0
        self.errors = 0

    def socket_queue(self) -> int:
        """Bytes Redis sent on its connections that the nodes have not read yet (kernel queues)."""
        assert self.redis is not None
        port = f"{self.redis.port:04X}"
        total = 0
        with contextlib.suppress(OSError):
            for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
                f = line.split()
                tx, rx = (int(x, 16) for x in f[4].split(":"))
                if f[1].endswith(":" + port):
                    total += tx  # sent by Redis, not yet acknowledged
                elif f[2].endswith(":" + port):
                    total += rx  # received by a node, not yet read
        return total

    def run(self) -> None:
        conn = None
        while not self.stop_flag.wait(0.5):
            for i, pid in enumerate(self.node_pids):
                with contextlib.suppress(OSError, ValueError):
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            self.max_rss[i] = max(self.max_rss[i], int(line.split()[1]) * 1024)
            if self.redis is None:
                continue
            self.max_socket_queue = max(self.max_socket_queue, self.socket_queue())
            try:
                if conn is None:
                    conn = RedisConn(self.redis.port)
                for line in conn.call("CLIENT", "LIST", "TYPE", "pubsub").splitlines():
                    fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
                    self.max_pubsub_omem = max(self.max_pubsub_omem, int(fields.get("omem", 0)))
                    self.max_pubsub_oll = max(self.max_pubsub_oll, int(fields.get("oll", 0)))
            except (OSError, RuntimeError, ValueError):
                self.errors += 1
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def finish(self) -> dict[str, Any]:
        self.stop_flag.set()
        self.join(5)
        out: dict[str, Any] = {"node_rss_peak_bytes": self.max_rss}
        if self.redis is not None:
            out["redis_pubsub_output_buffer_peak_bytes"] = self.max_pubsub_omem
            out["redis_pubsub_output_list_peak"] = self.max_pubsub_oll
            out["redis_socket_queue_peak_bytes"] = self.max_socket_queue
            out["sampler_errors"] = self.errors
        return out


# --- one run: one configuration, one phase ---------------------------------------------------


def health(port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            body: dict[str, Any] = json.loads(resp.read())
            return body
    except (OSError, ValueError) as exc:
        return {"error": repr(exc)}


def wait_backplane(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        body = health(port)
        if (body.get("backplane") or {}).get("connected"):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"node on port {port}: backplane not connected: {body}")
        time.sleep(0.1)


def wait_workers(supervisor: int, port: int, count: int, timeout: float = 20.0) -> list[int]:
    """The pids of a supervisor's workers, once each answers /health connected to Redis."""
    deadline = time.monotonic() + timeout
    ready: set[str] = set()
    while True:
        # Trio starts processes from a worker thread: they are that thread's children.
        children = [
            pid
            for task in Path(f"/proc/{supervisor}/task").glob("*")
            for pid in (task / "children").read_text().split()
        ]
        body = health(port)
        if (body.get("backplane") or {}).get("connected"):
            ready.add(str(body.get("node")))
        if len(children) == count and len(ready) == count:
            return sorted(int(pid) for pid in children)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} workers not ready: {children}, {sorted(ready)}")
        time.sleep(0.05)


def loadgen_flags(phase: str, args: argparse.Namespace) -> list[str]:
    common = ["-subscribers", str(args.subscribers), "-duration", f"{args.duration}s",
              "-payload-bytes", str(args.payload_bytes),
              "-drain-timeout", f"{args.drain_timeout}s"]  # fmt: skip
    if phase == "max":
        return ["-scenario", "fanout-max", *common, "-inflight", str(args.inflight),
                "-sample-every", "10"]  # fmt: skip
    return ["-scenario", "fanout-rate", *common, "-rate", str(args.rate), "-sample-every", "1"]


def run_one(
    config: Config,
    phase: str,
    args: argparse.Namespace,
    workdir: Path,
    tag: str,
    profile: Path | None = None,
) -> dict[str, Any]:
    entry: dict[str, Any] = {"config": config.name, "phase": phase}
    redis: RedisServer | None = None
    nodes: list[Server] = []
    sampler: Sampler | None = None
    try:
        if config.backplane == "redis":
            redis = RedisServer(args.aux_cpu, workdir)
            redis.start()
            entry["redis_command"] = redis.cmd
        placement = {"redis": args.aux_cpu if redis else None, "loadgen": args.aux_cpu}
        for k in range(config.nodes):
            cpu = (args.node_cpu, args.aux_cpu)[k % 2] if config.spread else args.node_cpu
            cmd = [
                str(PYTHON), "-m", "tidings", "serve", "--port", "0", "--log-level", "warning",
                "--max-connections", "20000", "--node-id", f"bench-n{k + 1}",
                "--backplane", redis.url if redis else "memory", *args.tidings_args,
            ]  # fmt: skip
            if config.workers:
                cmd += ["--workers", str(config.workers)]
            node = Server(f"node{k + 1}", cmd, workdir / f"{tag}-node{k + 1}.log")
            node.cmd = ["taskset", "-c", str(cpu), *cmd]
            nodes.append(node)
            node.start()
            if redis:
                assert node.port is not None
                wait_backplane(node.port)
            placement[f"node{k + 1}"] = cpu
        entry["placement_cpu"] = placement
        entry["node_commands"] = [n.cmd for n in nodes]
        pids = [n.pid for n in nodes]
        if config.workers:
            # The workers are the nodes (the supervisor only waits): worker k on
            # the CPU node k would have.
            assert nodes[0].port is not None
            pids = wait_workers(nodes[0].pid, nodes[0].port, config.workers)
            for k, pid in enumerate(pids):
                cpu = (args.node_cpu, args.aux_cpu)[k % 2]
                os.sched_setaffinity(pid, {cpu})
                placement[f"node{k + 1}"] = cpu
            entry["worker_pids"] = pids
        time.sleep(0.5)
        entry["machine_before"] = wait_quiet(args.quiet_limit, args.quiet_wait)
        watch = pids[1:] + ([redis.pid] if redis else [])
        urls = [f"ws://127.0.0.1:{n.port}/ws" for n in nodes]
        cmd = [
            "taskset", "-c", str(args.aux_cpu), str(LOADGEN), "-url", urls[0],
            "-sub-urls", ",".join(urls), "-server-pid", str(pids[0]),
            "-max-time", f"{args.run_timeout}s", *loadgen_flags(phase, args),
        ]  # fmt: skip
        if watch:
            cmd += ["-watch-pids", ",".join(map(str, watch))]
        entry["loadgen_command"] = cmd
        entry["pids"] = {f"node{i + 1}": p for i, p in enumerate(pids)}
        if redis:
            entry["pids"]["redis"] = redis.pid
        sampler = Sampler(redis, pids)
        sampler.start()
        if redis:
            entry["redis_info_before"] = redis.info()
        spy = None
        if profile is not None:
            spy_cmd = ["taskset", "-c", str(args.aux_cpu), str(PY_SPY), "record", "-r", "100",
                       "-f", "raw", "-o", str(profile), "--pid", str(pids[0])]  # fmt: skip
            entry["profile_command"] = spy_cmd
            spy = subprocess.Popen(spy_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=args.run_timeout + 15, check=False
            )
            lines = proc.stdout.strip().splitlines()
            entry["result"] = json.loads(lines[-1]) if lines else {"error": "no output"}
            if proc.returncode != 0 and "error" not in entry["result"]:
                entry["result"]["error"] = f"loadgen exited {proc.returncode}"
            if proc.stderr.strip():
                entry["loadgen_stderr"] = proc.stderr.strip().splitlines()[-10:]
        except subprocess.TimeoutExpired:
            entry["result"] = {"error": f"loadgen timed out after {args.run_timeout + 15} s"}
        except json.JSONDecodeError as exc:
            entry["result"] = {"error": f"loadgen output is not JSON: {exc}"}
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes what it has and exits
                try:
                    spy.wait(30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait(5)
        entry["samples"] = sampler.finish()
        sampler = None
        entry["health"] = [health(n.port) for n in nodes if n.port]
        if redis:
            entry["redis_info"] = redis.info()
        entry["nodes_alive_after"] = [n.alive() for n in nodes]
    except (RuntimeError, OSError) as exc:
        entry.setdefault("result", {"error": str(exc)})
    finally:
        if sampler is not None:
            sampler.finish()
        entry["node_exit"] = [n.stop() for n in nodes]
        if redis is not None:
            redis.stop()
    entry["figures"] = figures(entry, config)
    return entry


def _get(d: Any, *path: Any) -> Any:
    for key in path:
        found = (isinstance(d, dict) and key in d) or (
            isinstance(d, list) and isinstance(key, int) and -len(d) <= key < len(d)
        )
        if not found:
            return None
        d = d[key]
    return d


def figures(entry: dict[str, Any], config: Config) -> dict[str, Any]:
    """The figures the tables show, flattened from the load generator's result."""
    r = entry.get("result") or {}
    p = r.get("phase") or {}
    cpu = p.get("cpu_total") or {}
    watched = cpu.get("watched_cpu_percent") or {}
    pids = entry.get("pids") or {}
    f: dict[str, Any] = {
        "error": r.get("error"),
        "deliveries_per_second": p.get("deliveries_per_second"),
        "publish_rate": p.get("publish_rate"),
        "published": p.get("published"),
        "delivered_fraction": p.get("delivered_fraction"),
        "drops_in_stream": p.get("drops_in_stream"),
        "drops_at_end": p.get("drops_at_end"),
        "out_of_order": p.get("out_of_order"),
        "publish_errors": p.get("publish_errors"),
        "drain": p.get("drain"),
        "drain_seconds": p.get("drain_seconds"),
        "p50_ms": _get(p, "latency", "p50_ms"),
        "p99_ms": _get(p, "latency", "p99_ms"),
        "p999_ms": _get(p, "latency", "p999_ms"),
        "max_ms": _get(p, "latency", "max_ms"),
        "node1_cpu_percent": cpu.get("server_cpu_percent"),
        "node2_cpu_percent": watched.get(str(pids.get("node2"))) if "node2" in pids else None,
        "redis_cpu_percent": watched.get(str(pids.get("redis"))) if "redis" in pids else None,
        "loadgen_cpu_percent": cpu.get("loadgen_cpu_percent"),
        "others_cpu_percent": cpu.get("others_cpu_percent"),
        "core_busy_percent": cpu.get("core_busy_percent"),
        "wall_seconds": cpu.get("wall_seconds"),
        "redis_pubsub_buffer_peak_mib": None,
        "events_per_read": p.get("events_per_read"),
        "node_rss_peak_mib": None,
        "redis_socket_queue_peak_kib": None,
    }
    for i, busy in enumerate(cpu.get("core_busy_percent") or []):
        f[f"cpu{i}_busy_percent"] = busy
    rss = _get(entry, "samples", "node_rss_peak_bytes")
    if rss:
        f["node_rss_peak_mib"] = round(max(rss) / 2**20, 1)
    queue = _get(entry, "samples", "redis_socket_queue_peak_bytes")
    if isinstance(queue, int):
        f["redis_socket_queue_peak_kib"] = round(queue / 1024, 1)
    peak = _get(entry, "samples", "redis_pubsub_output_buffer_peak_bytes")
    if isinstance(peak, int):
        f["redis_pubsub_buffer_peak_mib"] = round(peak / 2**20, 2)
    nodes_cpu = [v for v in (f["node1_cpu_percent"], f["node2_cpu_percent"]) if v is not None]
    f["nodes_cpu_percent"] = round(sum(nodes_cpu), 1) if nodes_cpu else None
    d = f["deliveries_per_second"]
    if d and f["published"] and f["wall_seconds"]:
        f["events_per_second_per_subscriber"] = round(d / r["params"]["subscribers"], 1)
    if d and f["nodes_cpu_percent"]:
        # server-side CPU (nodes + Redis) per delivery, in µs
        total = f["nodes_cpu_percent"] + (f["redis_cpu_percent"] or 0)
        f["cpu_us_per_delivery"] = round(total / 100 * 1e6 / d, 2)
    rate = f["publish_rate"]
    if rate and f["nodes_cpu_percent"]:
        # CPU per acknowledged publication, in µs: the nodes', and with Redis's
        f["node_cpu_us_per_publication"] = round(f["nodes_cpu_percent"] / 100 * 1e6 / rate, 1)
        total = f["nodes_cpu_percent"] + (f["redis_cpu_percent"] or 0)
        f["server_cpu_us_per_publication"] = round(total / 100 * 1e6 / rate, 1)
    redis_pct, published = f["redis_cpu_percent"], f["published"]
    if isinstance(redis_pct, int | float) and published and f["wall_seconds"]:
        f["redis_cpu_us_per_publication"] = round(
            redis_pct / 100 * f["wall_seconds"] / published * 1e6, 1
        )
    # Redis's own getrusage counters (INFO) over the whole load generator run
    # (connect, publish, drain): finer than /proc's 10 ms ticks
    before, after = entry.get("redis_info_before"), entry.get("redis_info")
    if before and after and published:
        used = sum(float(after[k]) - float(before[k]) for k in ("used_cpu_sys", "used_cpu_user"))
        f["redis_info_cpu_ms"] = round(used * 1000, 1)
        f["redis_info_cpu_us_per_publication"] = round(used / published * 1e6, 1)
        calls = [
            dict(kv.split("=") for kv in str(x.get("cmdstat_evalsha", "calls=0,usec=0")).split(","))
            for x in (before, after)
        ]
        n = int(calls[1]["calls"]) - int(calls[0]["calls"])
        if n > 0:
            f["redis_evalsha_us_per_call"] = round(
                (int(calls[1]["usec"]) - int(calls[0]["usec"])) / n, 1
            )
    by_url = p.get("by_sub_url") or []
    for k, g in enumerate(by_url):
        f[f"node{k + 1}_deliveries_per_second"] = g.get("deliveries_per_second")
        f[f"node{k + 1}_p50_ms"] = _get(g, "latency", "p50_ms")
        f[f"node{k + 1}_p99_ms"] = _get(g, "latency", "p99_ms")
    gaps = [_get(h, "backplane", "gaps") for h in entry.get("health") or []]
    f["backplane_gaps"] = sum(g for g in gaps if isinstance(g, int)) if gaps else None
    dropped = [_get(h, "backplane", "dropped") for h in entry.get("health") or []]
    f["backplane_dropped"] = sum(g for g in dropped if isinstance(g, int)) if dropped else None
    f["node_tracebacks"] = sum((x or {}).get("tracebacks", 0) for x in entry.get("node_exit", []))
    return f


def summarize_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive shares by function (line numbers folded) of a py-spy raw file."""

    def fold(frame: str) -> str:
        name, _, where = frame.partition(" (")
        return f"{name} ({where.rsplit(':', 1)[0]})" if where else name

    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [fold(f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            incl[frame] = incl.get(frame, 0) + n

    def share(d: dict[str, int], k: int) -> list[list[Any]]:
        ranked = sorted(d.items(), key=lambda kv: -kv[1])[:k]
        return [[round(100 * n / max(total, 1), 1), f] for f, n in ranked]

    return {
        "samples": total,
        "self_percent": share(own, top),
        "inclusive_percent": share(incl, 2 * top),
    }


# --- reporting -------------------------------------------------------------------------------

# (label, figure, format); the table shows the median over rounds
ROWS: dict[str, list[tuple[str, str, str]]] = {
    "max": [
        ("deliveries/s", "deliveries_per_second", "{:,.0f}"),
        ("events/s to each subscriber", "events_per_second_per_subscriber", "{:,.1f}"),
        ("publishes/s acknowledged", "publish_rate", "{:,.0f}"),
        ("delivered fraction", "delivered_fraction", "{:.4f}"),
        ("drain after publishing, s", "drain_seconds", "{:.1f}"),
        ("latency p50 ms", "p50_ms", "{:,.1f}"),
        ("latency p99 ms", "p99_ms", "{:,.1f}"),
        ("node 1 CPU %", "node1_cpu_percent", "{:.0f}"),
        ("node 2 CPU %", "node2_cpu_percent", "{:.0f}"),
        ("redis-server CPU %", "redis_cpu_percent", "{:.1f}"),
        ("redis-server CPU µs per publication", "redis_info_cpu_us_per_publication", "{:.0f}"),
        ("Lua script time per call µs (wall)", "redis_evalsha_us_per_call", "{:.0f}"),
        ("load generator CPU %", "loadgen_cpu_percent", "{:.0f}"),
        ("others CPU %", "others_cpu_percent", "{:.0f}"),
        ("CPU 0 / CPU 1 busy %", "cpu0_busy_percent|cpu1_busy_percent", "{:.0f}"),
        ("server CPU µs per delivery", "cpu_us_per_delivery", "{:.2f}"),
        ("node CPU µs per publication", "node_cpu_us_per_publication", "{:.1f}"),
        ("events per read (load generator)", "events_per_read", "{:.1f}"),
        ("node RSS peak MiB (largest node)", "node_rss_peak_mib", "{:.1f}"),
        ("Redis pub/sub output buffer peak MiB", "redis_pubsub_buffer_peak_mib", "{:.1f}"),
        ("Redis->node socket queues peak KiB", "redis_socket_queue_peak_kib", "{:,.0f}"),
    ],
    "rate": [
        ("deliveries/s", "deliveries_per_second", "{:,.0f}"),
        ("delivered fraction", "delivered_fraction", "{:.4f}"),
        ("latency p50 ms", "p50_ms", "{:.2f}"),
        ("latency p99 ms", "p99_ms", "{:.2f}"),
        ("latency p99.9 ms", "p999_ms", "{:.2f}"),
        ("node 1 subscribers p50 / p99 ms", "node1_p50_ms|node1_p99_ms", "{:.2f}"),
        ("node 2 subscribers p50 / p99 ms", "node2_p50_ms|node2_p99_ms", "{:.2f}"),
        ("node 1 CPU %", "node1_cpu_percent", "{:.0f}"),
        ("node 2 CPU %", "node2_cpu_percent", "{:.0f}"),
        ("redis-server CPU %", "redis_cpu_percent", "{:.1f}"),
        ("load generator CPU %", "loadgen_cpu_percent", "{:.0f}"),
        ("others CPU %", "others_cpu_percent", "{:.0f}"),
        ("server CPU µs per delivery", "cpu_us_per_delivery", "{:.2f}"),
    ],
}
SANITY = ("drops_in_stream", "drops_at_end", "out_of_order", "publish_errors",
          "backplane_gaps", "backplane_dropped", "node_tracebacks")  # fmt: skip


def summarize(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Per figure: the median over the rounds that ran, and every round's value."""
    keys = sorted({k for e in entries for k in e["figures"]})
    out: dict[str, Any] = {"rounds": len(entries)}
    for key in keys:
        vals = [e["figures"].get(key) for e in entries]
        nums = [v for v in vals if isinstance(v, int | float) and not isinstance(v, bool)]
        if nums and key not in SANITY:
            out[key] = {"median": round(statistics.median(nums), 3), "values": vals}
        elif nums:
            out[key] = {"max": max(nums), "values": vals}
        else:
            out[key] = {"values": vals}
    return out


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    try:
        return spec.format(value)
    except (TypeError, ValueError):
        return str(value)


def table(phase: str, summary: dict[str, dict[str, Any]]) -> list[str]:
    configs = list(summary)
    head = ["metric", *configs]
    rows = [head]
    for label, key, spec in ROWS[phase]:
        row = [label]
        for c in configs:
            cells = [_fmt(_get(summary[c], k, "median"), spec) for k in key.split("|")]
            row.append(" / ".join(cells) if any(x != "-" for x in cells) else "-")
        rows.append(row)
    row = ["drops, gaps, out of order"]
    for c in configs:
        bad = {k: _get(summary[c], k, "max") for k in SANITY}
        row.append(", ".join(f"{k}={v}" for k, v in bad.items() if v) or "none")
    rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for n, r in enumerate(rows):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if n == 0:
            lines.append(
                "| "
                + " | ".join(["-" * widths[0], *[("-" * (w - 1)) + ":" for w in widths[1:]]])
                + " |"
            )
    return lines


def notes(entry: dict[str, Any]) -> list[str]:
    f = entry["figures"]
    out = []
    if f.get("error"):
        out.append(f"error: {f['error']}")
    for key in SANITY:
        if f.get(key):
            out.append(f"{key}={f[key]}")
    if f.get("drain") not in (None, "complete"):
        out.append(f"drain {f['drain']}")
    if isinstance(f.get("others_cpu_percent"), int | float) and f["others_cpu_percent"] > 15:
        out.append(f"others used {f['others_cpu_percent']:.0f}% of a CPU meanwhile (disturbed)")
    if not _get(entry, "machine_before", "quiet"):
        busy = _get(entry, "machine_before", "background_busy_percent")
        out.append(f"machine busy before the run: {busy}")
    if entry.get("nodes_alive_after") and not all(entry["nodes_alive_after"]):
        out.append("a node died during the run")
    return out


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 - only for --plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    configs = doc["configs"]
    mx = doc["summary"]["max"]
    rt = doc["summary"]["rate"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    vals = [_get(mx, c, "deliveries_per_second", "median") or 0 for c in configs]
    bars = a1.bar(configs, vals, color=["#777", "#c44", "#c84", "#48c", "#4a4"][: len(configs)])
    a1.set_yscale("log")
    a1.set_ylim(1e4, max([*vals, 1e5]) * 3)
    a1.set_title(f"max: deliveries/s, {doc['settings']['subscribers']:,} subscribers (log)")
    for b, v in zip(bars, vals, strict=True):
        a1.annotate(
            f"{v:,.0f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8
        )
    x = range(len(configs))
    p50 = [_get(rt, c, "p50_ms", "median") or 0 for c in configs]
    p99 = [_get(rt, c, "p99_ms", "median") or 0 for c in configs]
    a2.bar([i - 0.2 for i in x], p50, 0.4, label="p50")
    a2.bar([i + 0.2 for i in x], p99, 0.4, label="p99")
    a2.set_xticks(list(x), configs)
    a2.set_title(f"rate: latency ms at {doc['settings']['rate']:g} events/s")
    a2.set_ylim(0, max([*p99, 1]) * 1.3)
    a2.legend(loc="upper right", ncol=2)
    for ax in (a1, a2):
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(
        f"tidings {doc['code']['short']}: one node vs the Redis backplane (2 CPUs, see docs)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--configs", default=",".join(CONFIGS), help="comma-separated subset of %(default)s"
    )
    ap.add_argument(
        "--phases", default=",".join(PHASES), help="comma-separated subset of %(default)s"
    )
    ap.add_argument(
        "--rounds", type=int, default=1, help="runs of each configuration, round-robin (1)"
    )
    ap.add_argument(
        "--subscribers", type=int, default=1000, help="subscriber connections in all (1000)"
    )
    ap.add_argument("--duration", type=float, default=3, help="seconds of publishing per phase (3)")
    ap.add_argument(
        "--rate", type=float, default=20, help="events/s offered in the rate phase (20)"
    )
    ap.add_argument(
        "--inflight", type=int, default=64, help="unanswered publishes in the max phase (64)"
    )
    ap.add_argument("--payload-bytes", type=int, default=64, help="padding in each event (64)")
    ap.add_argument(
        "--drain-timeout", type=float, default=30, help="longest drain after publishing (30 s)"
    )
    ap.add_argument("--node-cpu", type=int, default=0, help="CPU of the nodes (0)")
    ap.add_argument(
        "--aux-cpu",
        type=int,
        default=1,
        help="CPU of redis-server, the load generator, this script, and node 2 when spread (1)",
    )
    ap.add_argument(
        "--ref",
        help="measure this git revision (exported to a temporary directory), "
        "not the work tree's src/",
    )
    ap.add_argument("--tidings-args", default="", help="extra 'tidings serve' flags for every node")
    ap.add_argument(
        "--quiet-limit",
        type=float,
        default=25,
        help="background CPU %% (both CPUs) considered quiet (25)",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=5,
        help="longest wait for a quiet machine before each run (5 s)",
    )
    ap.add_argument(
        "--profile",
        metavar="CONFIG",
        help="after the rounds, one more 'max' run of CONFIG with py-spy on node 1 "
        "(not in the medians); the profile goes into the JSON",
    )
    ap.add_argument("--plot", action="store_true", help=f"draw {PLOT.relative_to(ROOT)}")
    ap.add_argument(
        "--show", type=Path, metavar="JSON", help="only print the tables of a results file"
    )
    ap.add_argument(
        "--replot", type=Path, metavar="JSON", help="only draw the plot from a results file"
    )
    ap.add_argument("--out", type=Path, help="results JSON (bench/results/cluster-<date>.json)")
    args = ap.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    for c in args.configs:
        if c not in CONFIGS:
            ap.error(f"unknown configuration {c!r}")
    if args.profile and args.profile not in CONFIGS:
        ap.error(f"unknown configuration {args.profile!r}")
    for p in args.phases:
        if p not in PHASES:
            ap.error(f"unknown phase {p!r}")
    if args.rounds < 1 or args.subscribers < 2 or args.duration <= 0 or args.rate <= 0:
        ap.error("--rounds >= 1, --subscribers >= 2, positive --duration and --rate")
    args.tidings_args = args.tidings_args.split()
    # one load generator run: connect, publish, drain, and some slack
    args.run_timeout = int(args.duration + args.drain_timeout + 60)
    return args


def export_ref(ref: str, workdir: Path) -> tuple[str, Path]:
    """``git archive`` of ``ref``'s src/ into workdir; returns (full commit, path of src)."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=ROOT, capture_output=True,
        text=True, check=True, timeout=10,
    ).stdout.strip()  # fmt: skip
    dest = workdir / "ref"
    dest.mkdir()
    archive = subprocess.run(
        ["git", "archive", commit, "src"], cwd=ROOT, capture_output=True, check=True, timeout=30
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=30)
    return commit, dest / "src"


def report(doc: dict[str, Any]) -> None:
    """The tables of a results document, as printed at the end of a run."""
    s = doc["settings"]
    for phase in doc["summary"]:
        what = (
            f"as fast as acknowledged, {s['inflight']} in flight"
            if phase == "max"
            else f"{s['rate']:g} events/s offered, every delivery timed"
        )
        rounds = f"median of {s['rounds']} rounds" if s["rounds"] > 1 else "1 round"
        print(
            f"\n## {phase}: {s['subscribers']:,} subscribers split over the nodes, "
            f"1 publisher on node 1, {what}, {s['duration']:g} s ({rounds})\n"
        )
        print("\n".join(table(phase, doc["summary"][phase])))
    print(
        f"\nplacement: nodes on CPU {s['node_cpu']} (redis-2-spread: node 2 on CPU "
        f"{s['aux_cpu']}); redis-server, load generator and this script on CPU {s['aux_cpu']}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.show:
        doc = json.loads(args.show.read_text())
        # figures from the raw results, so that older files get newer rows too
        for entry in doc["runs"]:
            entry["figures"] = figures(entry, CONFIGS[entry["config"]])
        doc["summary"] = {
            phase: {
                c: summarize([e for e in doc["runs"] if e["config"] == c and e["phase"] == phase])
                for c in doc["configs"]
            }
            for phase in doc["summary"]
        }
        print(f"{args.show}: tidings {doc['code']['short']}, {doc['started']}")
        report(doc)
        return 0
    if args.replot:
        plot(json.loads(args.replot.read_text()), PLOT)
        print(f"drew {PLOT.relative_to(ROOT)} from {args.replot}")
        return 0
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or shutil.which("taskset") is None:
        print("this benchmark needs 2 CPUs and taskset", file=sys.stderr)
        return 2
    if {args.node_cpu, args.aux_cpu} - set(cpus) or args.node_cpu == args.aux_cpu:
        print(f"--node-cpu and --aux-cpu must be two different CPUs of {cpus}", file=sys.stderr)
        return 2
    if any(CONFIGS[c].backplane == "redis" for c in args.configs) and not shutil.which(
        "redis-server"
    ):
        print("redis-server is not installed (apt-get install redis-server)", file=sys.stderr)
        return 2
    suite._raise_nofile()
    build_loadgen()
    stamp = datetime.now(UTC)
    out_path = args.out or RESULTS / f"cluster-{stamp.strftime('%Y%m%d-%H%M%S')}.json"
    code = suite.code_info()
    doc: dict[str, Any] = {
        "benchmark": "cluster",
        "started": stamp.isoformat(timespec="seconds"),
        "command": " ".join(
            [".venv/bin/python", "bench/cluster.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": {
            **suite.machine_info(),
            "server_cpu": None,
            "loadgen_cpu": None,
            "redis_server": subprocess.run(
                ["redis-server", "--version"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout.strip(),
        },
        "code": code,
        "placement": {
            "nodes": f"CPU {args.node_cpu}",
            "redis-2-spread": f"node 1 on CPU {args.node_cpu}, node 2 on CPU {args.aux_cpu}",
            "workers-2": f"worker 1 on CPU {args.node_cpu}, worker 2 on CPU {args.aux_cpu}",
            "redis_server": f"CPU {args.aux_cpu}",
            "load_generator": f"CPU {args.aux_cpu}",
            "this_script": f"CPU {args.aux_cpu}",
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "plot")},
        "configs": args.configs,
        "config_descriptions": {c: CONFIGS[c].what for c in args.configs},
        "runs": [],
    }
    t0 = time.monotonic()
    previous_affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {args.aux_cpu})  # stay off the nodes' CPU
    workdir = Path(tempfile.mkdtemp(prefix="tidings-cluster-"))
    old_pythonpath = os.environ.get("PYTHONPATH")
    try:
        if args.ref:
            commit, src = export_ref(args.ref, workdir)
            os.environ["PYTHONPATH"] = str(src)  # ahead of the editable install's src/
            code = {
                "git_commit": commit,
                "src_modified": False,
                "source": f"git archive {commit} (--ref {args.ref})",
            }
            doc["code"] = code
        doc["code"]["short"] = doc["code"]["git_commit"][:7]
        dirty = " + work tree changes" if doc["code"].get("src_modified") else ""
        print(
            f"tidings {doc['code']['short']}{dirty}; "
            f"nodes on CPU {args.node_cpu}, redis-server + load generator on CPU {args.aux_cpu}",
            flush=True,
        )
        for rnd in range(args.rounds):
            for cname in args.configs:
                for phase in args.phases:
                    label = f" round {rnd + 1}/{args.rounds}" if args.rounds > 1 else ""
                    print(
                        f"[{time.monotonic() - t0:5.0f} s] {cname} / {phase}{label} ...", flush=True
                    )
                    entry = run_one(
                        CONFIGS[cname], phase, args, workdir, f"{cname}-{phase}-r{rnd + 1}"
                    )
                    entry["round"] = rnd + 1
                    doc["runs"].append(entry)
                    f = entry["figures"]
                    print(
                        f"         {_fmt(f['deliveries_per_second'], '{:,.0f}')} deliveries/s, "
                        f"p50 {_fmt(f['p50_ms'], '{:,.2f}')} ms, "
                        f"p99 {_fmt(f['p99_ms'], '{:,.2f}')} ms, "
                        f"redis CPU {_fmt(f['redis_cpu_percent'], '{:.1f}')} %",
                        flush=True,
                    )
                    for line in notes(entry):
                        print(f"         note: {line}", flush=True)
        if args.profile:
            print(
                f"[{time.monotonic() - t0:5.0f} s] {args.profile} / max with py-spy ...", flush=True
            )
            raw = workdir / "profile.txt"
            entry = run_one(CONFIGS[args.profile], "max", args, workdir, "profile", profile=raw)
            entry["profile"] = summarize_profile(raw) if raw.exists() else {"error": "no output"}
            doc["profile"] = entry
            for share, frame in entry["profile"].get("self_percent", [])[:8]:
                print(f"         {share:5.1f} % {frame}")
    finally:
        os.sched_setaffinity(0, previous_affinity)
        if old_pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_pythonpath
        shutil.rmtree(workdir, ignore_errors=True)
        doc["seconds"] = round(time.monotonic() - t0, 1)
        doc["summary"] = {
            phase: {
                c: summarize([e for e in doc["runs"] if e["config"] == c and e["phase"] == phase])
                for c in args.configs
            }
            for phase in args.phases
        }
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(doc, indent=1) + "\n")
    report(doc)
    if args.plot and {"max", "rate"} <= set(args.phases):
        plot(doc, PLOT)
        print(f"drew {PLOT.relative_to(ROOT)}")
    shown = out_path.resolve()
    shown_text = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    print(f"wrote {shown_text} ({doc['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
