"""Baseline fan-out benchmark: one topic, N WebSocket subscribers, one publisher.

Run ``.venv/bin/python bench/fanout.py [--transport builtin|hypercorn] [--quick]``;
``bench/README.md`` explains every figure. In short, for one transport:

1. **Fan-out** (a fresh server): N subscriber connections, spread over several
   subscriber processes, subscribe to the topic ``bench``; a separate publisher
   process then publishes

   * ``rate`` phase: at ``--rate`` events per second for ``--duration`` seconds;
   * ``max`` phase: as fast as it can, keeping ``--inflight`` publishes
     unanswered at most, for ``--duration`` seconds.

   Each phase reports deliveries per second, the delivered fraction, drops
   (seq gaps), publish-to-receive latency, server RSS and CPU, and the load
   generator's own CPU.
2. **Idle memory** (another fresh server): RSS with no connection, then with
   each of ``--idle-counts`` idle subscribed connections; per-connection
   memory is the difference divided by the count.

The server runs as ``python -m tidings serve`` in its own process; on a
machine with two or more CPUs and ``taskset``, it is pinned to the first CPU
and every load process (and this orchestrator) to the second. Every wait has
a timeout, and every child process is stopped on the way out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import platform
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from multiprocessing.context import SpawnContext, SpawnProcess
from pathlib import Path
from typing import Any, Final

import loadgen  # bench/loadgen.py: sys.path[0] is this script's directory
import psutil

BENCH_DIR: Final = Path(__file__).resolve().parent
PROJECT_DIR: Final = BENCH_DIR.parent
HOST: Final = "127.0.0.1"
WS_PATH: Final = "/ws"
TOPIC: Final = "bench"
IDLE_TOPIC: Final = "idle"
SETTLE_SECONDS: Final = 1.0
"""Pause before an RSS reading, so that allocation after a burst of work has settled."""
DRAIN_TIMEOUT: Final = 15.0
"""Longest wait, after publishing stops, for the subscribers' counts to stop moving."""
DRAIN_STABLE: Final = 1.0
"""Counts unchanged for this long mean the server has nothing left to deliver."""
COMMAND_TIMEOUT: Final = 30.0
BUSY_MACHINE: Final = 10.0
"""Other CPU use (percent of one CPU) above which a run is flagged as disturbed."""
LISTENING = re.compile(rb"tidings (\S+) listening on ws://[^:/]+:(\d+)/")


class BenchError(RuntimeError):
    """The benchmark could not run as planned (a process did not start or answer in time)."""


# --- options ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What to run; see ``--help``."""

    transport: str
    subscribers: int
    duration: float
    rate: float
    inflight: int
    processes: int
    idle_counts: tuple[int, ...]
    sample_every: int
    payload_bytes: int
    concurrency: int
    server_args: tuple[str, ...]
    quick: bool
    out: Path


def parse_options(argv: Sequence[str] | None = None) -> Options:
    """Command-line options; ``--quick`` changes the defaults to a small, fast run."""
    parser = argparse.ArgumentParser(
        description="tidings fan-out benchmark: one topic, N subscribers, one publisher."
    )
    parser.add_argument("--transport", choices=("builtin", "hypercorn"), default="builtin")
    parser.add_argument("--subscribers", type=int, help="subscriber connections (1000)")
    parser.add_argument("--duration", type=float, help="seconds of publishing per phase (10)")
    parser.add_argument("--rate", type=float, help="events per second in the rate phase (5)")
    parser.add_argument(
        "--inflight", type=int, default=32, help="unanswered publishes in the max phase (32)"
    )
    parser.add_argument("--processes", type=int, help="subscriber processes (4)")
    parser.add_argument(
        "--idle-counts", help="idle connection counts for RSS per connection (1000,10000)"
    )
    parser.add_argument(
        "--sample-every", type=int, default=50, help="latency sample: 1 event in k (50)"
    )
    parser.add_argument(
        "--payload-bytes", type=int, default=64, help="padding in each event payload (64)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=50, help="handshakes in flight per process (50)"
    )
    parser.add_argument(
        "--server-args",
        default="",
        help="extra 'tidings serve' flags, e.g. --server-args='--outbox-size 64'",
    )
    parser.add_argument("--quick", action="store_true", help="a small, fast smoke-test run")
    parser.add_argument("--out", type=Path, help="JSON results (bench/results/fanout-T.json)")
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    idle = (
        args.idle_counts if args.idle_counts is not None else ("100,500" if quick else "1000,10000")
    )
    options = Options(
        transport=args.transport,
        subscribers=args.subscribers or (100 if quick else 1000),
        duration=args.duration or (2.0 if quick else 10.0),
        rate=args.rate or (50.0 if quick else 5.0),
        inflight=args.inflight,
        processes=args.processes or (2 if quick else 4),
        idle_counts=tuple(sorted({int(n) for n in idle.split(",") if n.strip()})),
        sample_every=args.sample_every,
        payload_bytes=args.payload_bytes,
        concurrency=args.concurrency,
        server_args=tuple(shlex.split(args.server_args)),
        quick=quick,
        out=args.out
        or BENCH_DIR / "results" / f"fanout-{args.transport}{'-quick' if quick else ''}.json",
    )
    if min(options.subscribers, options.processes, options.inflight, options.sample_every) < 1:
        parser.error("--subscribers, --processes, --inflight and --sample-every must be >= 1")
    if options.rate <= 0 or options.duration <= 0:
        parser.error("--rate and --duration must be positive")
    return options


# --- the machine -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pinning:
    """Which CPU the server and the load processes run on (None: not pinned)."""

    server_cpu: int | None
    load_cpu: int | None

    def server_prefix(self) -> list[str]:
        """The ``taskset`` words to put in front of the server's command line."""
        if self.server_cpu is None:
            return []
        return ["taskset", "-c", str(self.server_cpu)]

    def describe(self) -> str:
        if self.server_cpu is None:
            return "not pinned (needs taskset and at least 2 CPUs)"
        return (
            f"server on CPU {self.server_cpu} (taskset); load processes and orchestrator "
            f"on CPU {self.load_cpu} (sched_setaffinity)"
        )


def choose_pinning() -> Pinning:
    """Server on the first allowed CPU and load on the second, if taskset exists."""
    cpus = sorted(os.sched_getaffinity(0))
    if shutil.which("taskset") is None or len(cpus) < 2:
        return Pinning(None, None)
    return Pinning(cpus[0], cpus[1])


def machine_info(pinning: Pinning) -> dict[str, Any]:
    """nproc, CPU model, memory, OS and Python, as recorded with the results."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "pinning": pinning.describe(),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "src_modified": bool(_git("status", "--porcelain", "--", "src")),
        "source_digest": source_digest(),
    }


def source_digest() -> str:
    """A short SHA-256 of the server's source files, to tell runs of different code apart.

    The git commit alone does not say it when the work tree has changes.
    """
    digest = hashlib.sha256()
    for path in sorted((PROJECT_DIR / "src" / "tidings").rglob("*.py")):
        digest.update(str(path.relative_to(PROJECT_DIR)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _git(*args: str) -> str | None:
    """The output of a git command in the project, or None if git is not usable."""
    try:
        result = subprocess.run(
            ["git", *args],
            cwd=PROJECT_DIR,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


# --- the server ------------------------------------------------------------------------------


class ServerProcess:
    """``python -m tidings serve`` on a free port, in its own (pinned) process.

    Use as a context manager: the server is stopped with SIGTERM (then SIGKILL
    after 15 s) on the way out, whatever happened.
    """

    def __init__(
        self,
        transport: str,
        max_connections: int,
        pinning: Pinning,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.argv = [
            *pinning.server_prefix(),
            sys.executable,
            "-m",
            "tidings",
            "serve",
            "--host",
            HOST,
            "--port",
            "0",
            "--transport",
            transport,
            "--log-level",
            "warning",
            "--max-connections",
            str(max_connections),
            *extra_args,
        ]
        self.port = 0
        self.version = "?"
        self.exit_code: int | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - read until the server is gone
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        self._proc = subprocess.Popen(
            self.argv, cwd=PROJECT_DIR, stdout=subprocess.PIPE, stderr=self._log
        )
        try:
            self._await_banner(timeout=30.0)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def _await_banner(self, timeout: float) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        stdout = self._proc.stdout
        deadline = time.monotonic() + timeout
        seen = b""
        while (match := LISTENING.search(seen)) is None:
            left = deadline - time.monotonic()
            if left <= 0 or self._proc.poll() is not None:
                raise BenchError(f"the server did not start: {self.log_lines()[-5:]}")
            ready, _, _ = select.select([stdout], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(stdout.fileno(), 4096)
                if not chunk:
                    raise BenchError(f"the server exited: {self.log_lines()[-5:]}")
                seen += chunk
        self.version = match.group(1).decode()
        self.port = int(match.group(2))

    def stop(self) -> None:
        """SIGTERM, wait up to 15 s, then SIGKILL; records the exit code."""
        proc = self._proc
        if proc is None or self.exit_code is not None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.exit_code = proc.returncode
        if proc.stdout is not None:
            proc.stdout.close()

    def health(self) -> dict[str, Any]:
        """The ``/health`` JSON body."""
        url = f"http://{HOST}:{self.port}/health"
        with urllib.request.urlopen(url, timeout=5) as response:
            body: dict[str, Any] = json.loads(response.read())
            return body

    def rss(self) -> int:
        """The server's resident set size in bytes."""
        return int(psutil.Process(self.pid).memory_info().rss)

    def log_lines(self) -> list[str]:
        """Everything the server wrote on stderr so far."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace").splitlines()

    def log_summary(self) -> dict[str, Any]:
        """Counts of warnings, errors and tracebacks in the server's stderr, and its last lines."""
        lines = self.log_lines()
        return {
            "lines": len(lines),
            "warnings": sum(" WARNING " in line for line in lines),
            "errors": sum(" ERROR " in line or " CRITICAL " in line for line in lines),
            "tracebacks": sum(line.startswith("Traceback") for line in lines),
            "tail": lines[-15:],
        }


# --- load processes --------------------------------------------------------------------------


def _receive(pipe: Any, timeout: float, what: str) -> Any:
    try:
        if not pipe.poll(timeout):
            raise BenchError(f"no answer from {what} within {timeout:g} s")
        return pipe.recv()
    except (EOFError, OSError) as exc:
        raise BenchError(f"{what} went away ({type(exc).__name__})") from exc


def _stop_process(process: SpawnProcess, pipe: Any) -> None:
    with suppress(OSError, ValueError):
        pipe.send(("quit",))
    process.join(timeout=5)
    if process.is_alive():
        process.terminate()
        process.join(timeout=5)
    if process.is_alive():
        process.kill()
        process.join(timeout=5)
    pipe.close()


def split(total: int, parts: int) -> list[int]:
    """``total`` spread as evenly as possible over ``parts``."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class SubscriberPool:
    """The subscriber processes (``loadgen.SubscriberProcess``), driven over pipes."""

    def __init__(
        self,
        ctx: SpawnContext,
        count: int,
        port: int,
        topic: str,
        options: Options,
        pinning: Pinning,
        fd_limit: int,
    ) -> None:
        self._workers: list[tuple[SpawnProcess, Any]] = []
        for index in range(count):
            ours, theirs = ctx.Pipe()
            process = ctx.Process(
                target=loadgen.subscriber_main,
                args=(theirs, HOST, port, WS_PATH, topic, options.sample_every),
                kwargs={"cpu": pinning.load_cpu, "fd_limit": fd_limit},
                name=f"subscribers-{index}",
                daemon=True,
            )
            self._workers.append((process, ours))

    def __enter__(self) -> SubscriberPool:
        try:
            for process, _ in self._workers:
                process.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        for process, pipe in self._workers:
            if process.pid is not None:
                _stop_process(process, pipe)

    @property
    def pids(self) -> list[int]:
        return [process.pid for process, _ in self._workers if process.pid is not None]

    def ask(self, commands: Sequence[tuple[Any, ...]], timeout: float) -> list[Any]:
        """Send one command to each process, then collect the replies (all within ``timeout``)."""
        for (process, pipe), command in zip(self._workers, commands, strict=True):
            try:
                pipe.send(command)
            except OSError as exc:
                raise BenchError(f"{process.name} went away ({type(exc).__name__})") from exc
        deadline = time.monotonic() + timeout
        return [
            _receive(pipe, max(0.0, deadline - time.monotonic()), process.name)
            for process, pipe in self._workers
        ]

    def ask_all(self, command: tuple[Any, ...], timeout: float = COMMAND_TIMEOUT) -> list[Any]:
        """The same command to every process."""
        return self.ask([command] * len(self._workers), timeout)

    def connect(self, total: int, concurrency: int) -> dict[str, Any]:
        """Open ``total`` more subscribed connections; returns counts, errors and timing.

        Connections that fail are tried once more (a second round for the
        shortfall): ``failed`` and ``errors`` count every failed attempt,
        ``ok`` the connections open at the end.
        """
        started = time.monotonic()
        ok = failed = rounds = 0
        errors: dict[str, int] = {}
        while ok < total and rounds < 2:
            rounds += 1
            wanted = total - ok
            timeout = 30.0 + wanted / 100
            replies = self.ask(
                [("connect", n, concurrency, timeout) for n in split(wanted, len(self._workers))],
                timeout + 15,
            )
            for reply in replies:
                ok += reply["ok"]
                failed += reply["failed"]
                for reason, count in reply["errors"].items():
                    errors[reason] = errors.get(reason, 0) + count
        seconds = time.monotonic() - started
        return {
            "requested": total,
            "ok": ok,
            "failed": failed,
            "rounds": rounds,
            "errors": errors,
            "seconds": round(seconds, 3),
            "per_second": round(ok / seconds, 1) if seconds > 0 else None,
        }


class PublisherHandle:
    """The publisher process (``loadgen.PublisherProcess``)."""

    def __init__(self, ctx: SpawnContext, port: int, options: Options, pinning: Pinning) -> None:
        self._pipe, theirs = ctx.Pipe()
        self._process = ctx.Process(
            target=loadgen.publisher_main,
            args=(theirs, HOST, port, WS_PATH, TOPIC, options.payload_bytes, pinning.load_cpu),
            name="publisher",
            daemon=True,
        )

    def __enter__(self) -> PublisherHandle:
        self._process.start()
        try:
            answer = _receive(self._pipe, 20, "the publisher")
            if answer != "ready":
                raise BenchError(f"the publisher could not connect: {answer}")
        except BaseException:
            _stop_process(self._process, self._pipe)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        _stop_process(self._process, self._pipe)

    @property
    def pid(self) -> int:
        assert self._process.pid is not None
        return self._process.pid

    def sync(self, timeout: float) -> dict[str, Any]:
        """Wait for answers to every publish so far; returns ``last_seq`` and ``unanswered``."""
        self._pipe.send(("sync", timeout))
        answer: dict[str, Any] = _receive(self._pipe, timeout + 10, "the publisher")
        return answer

    def start(self, mode: str, value: float, duration: float, drain_timeout: float) -> None:
        """Begin a publishing run; collect its result with :meth:`result`."""
        self._pipe.send(("run", mode, value, duration, drain_timeout))

    def result(self, timeout: float, tick: Callable[[], None]) -> dict[str, Any]:
        """Wait for the run's :class:`loadgen.PublishResult`, calling ``tick`` every 0.25 s."""
        deadline = time.monotonic() + timeout
        while not self._pipe.poll(0.25):
            tick()
            if time.monotonic() > deadline or not self._process.is_alive():
                raise BenchError("the publisher did not finish in time (or died)")
        result: dict[str, Any] = self._pipe.recv()
        return result


# --- measuring -------------------------------------------------------------------------------


@dataclass
class CpuSnapshot:
    """CPU seconds used so far by some processes (user, system), and by each CPU."""

    wall: float
    user: dict[int, float]
    system: dict[int, float]
    core_busy: list[float]
    core_total: list[float]


def cpu_snapshot(pids: Sequence[int]) -> CpuSnapshot:
    """User and system CPU seconds of each pid, and busy/total seconds of each CPU."""
    user: dict[int, float] = {}
    system: dict[int, float] = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            user[pid], system[pid] = times.user, times.system
        except psutil.Error:
            user[pid] = system[pid] = 0.0
    busy, total = _core_times()
    return CpuSnapshot(time.monotonic(), user, system, busy, total)


def _core_times() -> tuple[list[float], list[float]]:
    """Busy and total seconds of each CPU (guest time is already in user; steal is not busy)."""
    busy: list[float] = []
    total: list[float] = []
    for core in psutil.cpu_times(percpu=True):
        used = core.user + core.nice + core.system
        used += getattr(core, "irq", 0.0) + getattr(core, "softirq", 0.0)
        busy.append(used)
        total.append(used + core.idle + getattr(core, "iowait", 0.0) + getattr(core, "steal", 0.0))
    return busy, total


def cpu_percent(
    before: CpuSnapshot, after: CpuSnapshot, pids: Sequence[int], *, kinds: str = "user+system"
) -> float:
    """CPU used by ``pids`` between two snapshots, in percent of one CPU.

    ``kinds`` is ``"user"``, ``"system"`` (kernel time: for a server on loopback
    this includes the TCP work of delivering to the receiving socket) or both.
    """
    used = 0.0
    for kind in kinds.split("+"):
        start, end = getattr(before, kind), getattr(after, kind)
        used += sum(end.get(pid, 0.0) - start[pid] for pid in pids)
    return round(100 * used / max(after.wall - before.wall, 1e-9), 1)


def core_percent(before: CpuSnapshot, after: CpuSnapshot) -> list[float]:
    """How busy each CPU was between two snapshots (all processes, kernel included), percent."""
    return [
        round(
            100
            * (after.core_busy[i] - before.core_busy[i])
            / max(total - before.core_total[i], 1e-9),
            1,
        )
        for i, total in enumerate(after.core_total)
    ]


def others_percent(before: CpuSnapshot, after: CpuSnapshot, pids: Sequence[int]) -> float:
    """CPU used by everything but ``pids`` (other processes, unattributed kernel work).

    In percent of one CPU; well above a few percent means the machine was not
    quiet and the figures of that phase are suspect.
    """
    wall = max(after.wall - before.wall, 1e-9)
    busy = sum(after.core_busy) - sum(before.core_busy)
    return round(max(0.0, 100 * busy / wall - cpu_percent(before, after, pids)), 1)


def background_cpu_percent(seconds: float = 2.0) -> float:
    """How busy the machine is before the benchmark starts, in percent of one CPU."""
    start = _core_times()[0]
    time.sleep(seconds)
    return round(100 * (sum(_core_times()[0]) - sum(start)) / seconds, 1)


def percentile(ordered: Sequence[int], fraction: float) -> int:
    """Nearest-rank percentile of an ascending sequence."""
    rank = max(1, round(fraction * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


def latency_summary(samples_ns: list[int]) -> dict[str, Any]:
    """p50, p90, p99 and max of publish-to-receive latency samples, in milliseconds."""
    if not samples_ns:
        return {"samples": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(samples_ns)
    return {
        "samples": len(ordered),
        "p50_ms": round(percentile(ordered, 0.50) / 1e6, 3),
        "p90_ms": round(percentile(ordered, 0.90) / 1e6, 3),
        "p99_ms": round(percentile(ordered, 0.99) / 1e6, 3),
        "max_ms": round(ordered[-1] / 1e6, 3),
    }


@dataclass
class RssWatch:
    """The highest server RSS seen while a phase runs (sampled every 0.25 s)."""

    server: ServerProcess
    peak: int = 0
    samples: list[int] = field(default_factory=list)

    def tick(self) -> None:
        try:
            rss = self.server.rss()
        except psutil.Error:
            return
        self.samples.append(rss)
        self.peak = max(self.peak, rss)


def wait_for_drain(pool: SubscriberPool, expected: int, tick: Callable[[], None]) -> str:
    """Wait until subscribers got ``expected`` events or their count stopped moving.

    Returns ``"complete"`` (everything delivered), ``"settled"`` (no delivery
    for :data:`DRAIN_STABLE` s: the rest was dropped) or ``"timeout"``.
    """
    deadline = time.monotonic() + DRAIN_TIMEOUT
    last = -1
    last_change = time.monotonic()
    while time.monotonic() < deadline:
        total = sum(delivered for delivered, _ in pool.ask_all(("poll",)))
        if total >= expected:
            return "complete"
        now = time.monotonic()
        if total != last:
            last, last_change = total, now
        elif now - last_change >= DRAIN_STABLE:
            return "settled"
        tick()
        time.sleep(0.1)
    return "timeout"


# --- the fan-out phases ----------------------------------------------------------------------


@dataclass
class Phase:
    """A publishing phase: ``mode`` is ``rate`` (value: events/s) or ``max`` (value: in flight)."""

    name: str
    mode: str
    value: float


def run_phase(
    phase: Phase,
    options: Options,
    server: ServerProcess,
    pool: SubscriberPool,
    publisher: PublisherHandle,
) -> dict[str, Any]:
    """Publish for ``options.duration`` s, wait for delivery to finish, and sum up."""
    synced = publisher.sync(DRAIN_TIMEOUT)
    start_seq = synced["last_seq"]
    connections = sum(pool.ask_all(("begin", start_seq)))
    watch = RssWatch(server)
    load_pids = [*pool.pids, publisher.pid]
    ours = [server.pid, *load_pids, os.getpid()]
    before = cpu_snapshot(ours)
    publisher.start(phase.mode, phase.value, options.duration, drain_timeout=DRAIN_TIMEOUT)
    published = publisher.result(options.duration + DRAIN_TIMEOUT + 15, watch.tick)
    drain = wait_for_drain(pool, published["acked"] * connections, watch.tick)
    after = cpu_snapshot(ours)
    watch.tick()
    parts = pool.ask_all(("end", published["last_seq"]))
    result = summarize_phase(phase, published, parts, start_seq)
    result.update(
        unanswered_before=synced["unanswered"],
        drain=drain,
        server={
            "cpu_percent": cpu_percent(before, after, [server.pid]),
            "cpu_user_percent": cpu_percent(before, after, [server.pid], kinds="user"),
            "cpu_system_percent": cpu_percent(before, after, [server.pid], kinds="system"),
            "rss_peak_bytes": watch.peak,
            "rss_end_bytes": watch.samples[-1] if watch.samples else None,
        },
        load={
            "subscriber_cpu_percent": cpu_percent(before, after, pool.pids),
            "publisher_cpu_percent": cpu_percent(before, after, [publisher.pid]),
            "total_cpu_percent": cpu_percent(before, after, load_pids),
            "per_process_cpu_percent": [cpu_percent(before, after, [pid]) for pid in load_pids],
        },
        orchestrator_cpu_percent=cpu_percent(before, after, [os.getpid()]),
        others_cpu_percent=others_percent(before, after, ours),
        core_busy_percent=core_percent(before, after),
        cpu_window_seconds=round(after.wall - before.wall, 3),
    )
    return result


def summarize_phase(
    phase: Phase, published: dict[str, Any], parts: list[dict[str, Any]], start_seq: int
) -> dict[str, Any]:
    """Turn the publisher's and the subscribers' counts into the figures of one phase."""
    connections = sum(part["connections"] for part in parts)
    delivered = sum(part["delivered"] for part in parts)
    gaps = sum(part["gaps"] for part in parts)
    tail = sum(part["tail"] for part in parts)
    acked = published["acked"]
    expected = acked * connections
    publish_seconds = (published["stop_ns"] - published["start_ns"]) / 1e9
    last_rx = max((part["last_rx_ns"] for part in parts), default=0)
    window = (last_rx - published["start_ns"]) / 1e9 if last_rx else 0.0
    samples = [sample for part in parts for sample in part["latency_ns"]]
    result: dict[str, Any] = {
        "mode": phase.mode,
        "target_rate": phase.value if phase.mode == "rate" else None,
        "inflight": int(phase.value) if phase.mode == "max" else None,
        "subscribers": connections,
        "publish_seconds": round(publish_seconds, 3),
        "published": acked,
        "publish_errors": published["errors"],
        "publish_unanswered": published["sent"] - acked - published["errors"],
        "publish_rate": round(acked / publish_seconds, 1) if publish_seconds else None,
        "seq_range": [start_seq + 1, published["last_seq"]],
        "expected_deliveries": expected,
        "delivered": delivered,
        "delivered_fraction": round(delivered / expected, 6) if expected else None,
        "drops": gaps + tail,
        "drops_in_stream": gaps,
        "drops_at_end": tail,
        "stale": sum(part["stale"] for part in parts),
        "reordered": sum(part["reordered"] for part in parts),
        "disconnects": sum(part["closed"] for part in parts),
        "pings_answered": sum(part["pings"] for part in parts),
        "delivery_window_seconds": round(window, 3),
        "deliveries_per_second": round(delivered / window, 1) if window > 0 else None,
        "latency": latency_summary(samples),
    }
    if published["first_seq"] != start_seq + 1 or published["last_seq"] - start_seq != acked:
        result["warning"] = "the acknowledged seqs are not contiguous from the phase start"
    return result


def measure_fanout(
    options: Options, pinning: Pinning, ctx: SpawnContext, fd_limit: int
) -> dict[str, Any]:
    """Both publishing phases against one fresh server with ``options.subscribers`` subscribers."""
    phases = [
        Phase("rate", "rate", options.rate),
        Phase("max", "max", float(options.inflight)),
    ]
    with ServerProcess(
        options.transport, options.subscribers + 1000, pinning, options.server_args
    ) as server:
        time.sleep(SETTLE_SECONDS)
        rss_fresh = server.rss()
        processes = min(options.processes, options.subscribers)
        pool = SubscriberPool(ctx, processes, server.port, TOPIC, options, pinning, fd_limit)
        with pool:
            connect = pool.connect(options.subscribers, options.concurrency)
            print(f"  {connect['ok']} subscribers connected in {connect['seconds']} s", flush=True)
            if connect["ok"] == 0:
                raise BenchError(f"no subscriber could connect: {connect['errors']}")
            time.sleep(SETTLE_SECONDS)
            rss_subscribed = server.rss()
            results: dict[str, Any] = {}
            with PublisherHandle(ctx, server.port, options, pinning) as publisher:
                for phase in phases:
                    print(
                        f"  phase {phase.name}: publishing for {options.duration:g} s", flush=True
                    )
                    results[phase.name] = run_phase(phase, options, server, pool, publisher)
                    time.sleep(SETTLE_SECONDS)
            health = server.health()
            pool.ask_all(("close",))
        server.stop()
        return {
            "server_version": server.version,
            "server_command": server.argv,
            "connect": connect,
            "rss_fresh_bytes": rss_fresh,
            "rss_subscribed_idle_bytes": rss_subscribed,
            "health_after_phases": health,
            "phases": results,
            "server_exit_code": server.exit_code,
            "server_log": server.log_summary(),
        }


# --- idle memory -----------------------------------------------------------------------------


def measure_idle(
    options: Options, pinning: Pinning, ctx: SpawnContext, fd_limit: int
) -> dict[str, Any]:
    """Server RSS with 0 and with each of ``options.idle_counts`` idle subscribed connections."""
    largest = max(options.idle_counts)
    rows: list[dict[str, Any]] = []
    with ServerProcess(options.transport, largest + 1000, pinning, options.server_args) as server:
        time.sleep(SETTLE_SECONDS)
        base = server.rss()
        processes = min(options.processes, largest)
        with SubscriberPool(
            ctx, processes, server.port, IDLE_TOPIC, options, pinning, fd_limit
        ) as pool:
            have = 0
            for count in options.idle_counts:
                connect = pool.connect(count - have, options.concurrency)
                have += connect["ok"]
                print(f"  idle: {have} connections ({connect['seconds']} s)", flush=True)
                time.sleep(SETTLE_SECONDS)
                rss = server.rss()
                health = server.health()
                rows.append(
                    {
                        "connections": have,
                        "server_reports": {
                            "connections": health.get("connections"),
                            "subscriptions": health.get("subscriptions"),
                        },
                        "rss_bytes": rss,
                        "rss_delta_bytes": rss - base,
                        "rss_per_connection_bytes": round((rss - base) / have) if have else None,
                        "connect": connect,
                    }
                )
            pool.ask_all(("close",))
        server.stop()
        return {
            "rss_no_connections_bytes": base,
            "rows": rows,
            "server_exit_code": server.exit_code,
            "server_log": server.log_summary(),
        }


# --- report ----------------------------------------------------------------------------------


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _failures(connect: dict[str, Any]) -> str:
    if not connect["failed"]:
        return ""
    reasons = ", ".join(f"{reason} x{count}" for reason, count in connect["errors"].items())
    return f" ({connect['failed']} failed attempts: {reasons})"


def render(results: dict[str, Any]) -> str:
    """A plain-text summary of a results document."""
    fanout = results["fanout"]
    lines = [
        f"tidings {fanout['server_version']} fan-out, transport {results['transport']}, "
        f"{results['settings']['subscribers']} subscribers, {results['machine']['nproc']} CPUs",
        f"pinning: {results['machine']['pinning']}",
        f"server RSS: fresh {_mib(fanout['rss_fresh_bytes'])} MiB, "
        f"with idle subscribers {_mib(fanout['rss_subscribed_idle_bytes'])} MiB",
        f"subscribers connected in {fanout['connect']['seconds']} s" + _failures(fanout["connect"]),
        "",
        f"{'phase':<6}{'pub/s':>9}{'deliv/s':>11}{'fraction':>10}{'drops':>10}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'srv cpu%':>9}{'load cpu%':>10}"
        f"{'rss MiB':>9}",
    ]
    for name, phase in fanout["phases"].items():
        latency = phase["latency"]
        lines.append(
            f"{name:<6}{_num(phase['publish_rate']):>9}"
            f"{_num(phase['deliveries_per_second'], 0):>11}"
            f"{_num(phase['delivered_fraction'], 4):>10}{phase['drops']:>10}"
            f"{_num(latency['p50_ms'], 2):>9}{_num(latency['p99_ms'], 2):>9}"
            f"{_num(latency['max_ms'], 2):>9}{phase['server']['cpu_percent']:>9}"
            f"{phase['load']['total_cpu_percent']:>10}{_mib(phase['server']['rss_peak_bytes']):>9}"
        )
    for name, phase in fanout["phases"].items():
        if phase["others_cpu_percent"] > BUSY_MACHINE:
            lines.append(
                f"warning: phase {name}: other processes used {phase['others_cpu_percent']}% "
                "of a CPU meanwhile; its figures are disturbed"
            )
    idle = results.get("idle")
    if idle:
        lines.append("")
        lines.append(f"idle RSS, no connections: {_mib(idle['rss_no_connections_bytes'])} MiB")
        for row in idle["rows"]:
            lines.append(
                f"  {row['connections']:>6} connections: {_mib(row['rss_bytes'])} MiB, "
                f"{_num(row['rss_per_connection_bytes'] / 1024, 1)} KiB per connection, "
                f"connected in {row['connect']['seconds']} s" + _failures(row["connect"])
            )
    for section in ("fanout", "idle"):
        log = (results.get(section) or {}).get("server_log")
        if log and (log["errors"] or log["tracebacks"] or log["warnings"]):
            lines.append(
                f"server log ({section}): {log['warnings']} warnings, {log['errors']} errors, "
                f"{log['tracebacks']} tracebacks; see the JSON for the last lines"
            )
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------


@contextmanager
def _pinned(cpu: int | None) -> Iterator[None]:
    """Run the orchestrator on the load CPU, restoring its affinity afterwards."""
    previous = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


def run(options: Options) -> dict[str, Any]:
    """Run the whole benchmark for one transport; returns the results document."""
    pinning = choose_pinning()
    needed = max((options.subscribers, *options.idle_counts)) + 2000
    fd_limit = loadgen.raise_fd_limit(needed)  # inherited by the server process
    if fd_limit < needed:
        print(f"warning: RLIMIT_NOFILE is {fd_limit}, below the {needed} wanted", file=sys.stderr)
    ctx = multiprocessing.get_context("spawn")
    started = time.monotonic()
    results: dict[str, Any] = {
        "benchmark": "fanout",
        "transport": options.transport,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [Path(sys.executable).name, *sys.argv],
        "machine": machine_info(pinning),
        "settings": {
            **{k: v for k, v in asdict(options).items() if k != "out"},
            "topic": TOPIC,
            "fd_limit": fd_limit,
        },
    }
    background = background_cpu_percent()
    results["machine"]["background_cpu_percent"] = background
    if background > BUSY_MACHINE:
        print(
            f"warning: the machine is busy before the run ({background}% of a CPU); "
            "the figures will be disturbed",
            file=sys.stderr,
        )
    with _pinned(pinning.load_cpu):
        print(f"fan-out ({options.transport}): {pinning.describe()}", flush=True)
        results["fanout"] = measure_fanout(options, pinning, ctx, fd_limit)
        if options.idle_counts:
            results["idle"] = measure_idle(options, pinning, ctx, fd_limit)
    results["elapsed_seconds"] = round(time.monotonic() - started, 1)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run, print the summary, write the JSON; exit status 1 if the benchmark failed."""
    options = parse_options(argv)
    try:
        results = run(options)
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(render(results))
    print(f"\nwritten to {options.out} ({results['elapsed_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
