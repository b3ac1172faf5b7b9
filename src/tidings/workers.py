"""``tidings serve --workers N``: N processes on one port, supervised by the first.

One tidings process uses one core. To use more on one host, the supervisor
(this module, in the process ``tidings serve`` started) starts N workers, each
``tidings serve`` with the same settings plus ``--reuse-port``: every worker
listens on the same address with ``SO_REUSEPORT``, and the kernel spreads new
connections over them. Each worker is a full node on the configured Redis
backplane, so a client on any worker sees every topic, and a client whose
worker died resumes on another. (With the memory backplane each worker would
be a node of its own, which is why ``workers`` > 1 needs Redis.)

The supervisor only supervises: it holds the port while no worker does
(``port = 0`` picks one once, for all of them), restarts a worker that exits
unexpectedly (after 0.1 s, doubling to 5 s while they keep failing), and on
SIGTERM or SIGINT sends SIGTERM to every worker, which then drains like a
single node (1001 to each client), waits for them, and exits 0 if they all did.
Each worker holds the reading end of a pipe whose writing end only the
supervisor has (the lifeline): when the supervisor dies, however it dies, the
pipe ends, and the worker shuts down as on SIGTERM, so none is left serving
alone.

Worker ``k`` is node ``<node_id>-w<k>`` (``node_id`` defaulting to
``HOSTNAME-PID`` of the supervisor): the same id across its restarts.
``/health`` and ``/metrics`` answer for whichever worker the connection lands
on (the body of ``/health`` names it); ``info`` of the HTTP API answers for
all of them, as for any cluster.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Final

import trio

from .config import Config

LOGGER = logging.getLogger("tidings.workers")

#: A worker that exits unexpectedly is restarted after this long, doubling up to the max.
RESTART_FIRST: Final = 0.1
RESTART_MAX: Final = 5.0
#: A worker that ran this long before it failed is restarted quickly again.
RESTART_RESET_AFTER: Final = 30.0
#: After SIGTERM, workers get their shutdown_timeout and this much more, then SIGKILL.
STOP_MARGIN: Final = 5.0

#: Names the worker's end of the lifeline (a file descriptor number).
LIFELINE: Final = "TIDINGS_WORKER_LIFELINE"


def run(config: Config, argv: Sequence[str]) -> int:
    """Supervise ``config.workers`` workers until SIGTERM or SIGINT; the exit status.

    ``argv`` is the command line of ``tidings serve`` (what follows ``tidings``),
    which each worker is started with, and overridden where it must differ.
    """
    # The lifeline: os.pipe is close-on-exec, so the workers get only the end
    # passed to them, and the writing end dies with this process.
    lifeline, held = os.pipe()
    try:
        return trio.run(_supervise, config, list(argv), lifeline)
    finally:
        os.close(lifeline)
        os.close(held)


async def _supervise(config: Config, argv: list[str], lifeline: int) -> int:
    # Held, bound but never listening, for as long as the supervisor runs: the
    # port is chosen once (port 0), and stays ours while every worker restarts.
    holder = _hold_port(config.host, config.port)
    port = holder.getsockname()[1]
    base = config.node_id or f"{socket.gethostname()}-{os.getpid()}"
    workers = [
        _Worker(index, _command(argv, port, f"{base}-w{index}"), lifeline)
        for index in range(1, config.workers + 1)
    ]
    stopping = trio.Event()
    with holder, trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        host = f"[{config.host}]" if ":" in config.host else config.host
        print(
            f"tidings: {config.workers} workers on ws://{host}:{port}{config.ws_path}"
            f" (supervisor pid {os.getpid()})",
            flush=True,
        )
        async with trio.open_nursery() as nursery:
            for worker in workers:
                nursery.start_soon(worker.keep_running, stopping)
            async for signum in signals:
                LOGGER.info(
                    "%s received: stopping %d workers",
                    signal.Signals(signum).name,
                    len(workers),
                )
                stopping.set()
                break
            with trio.move_on_after(config.shutdown_timeout + STOP_MARGIN) as waited:
                for worker in workers:
                    worker.terminate()
                for worker in workers:
                    await worker.stopped.wait()
            if waited.cancelled_caught:
                for worker in workers:
                    worker.kill()
            nursery.cancel_scope.cancel()
    failed = [worker.index for worker in workers if worker.status != 0]
    if failed:
        LOGGER.warning("workers %s did not stop cleanly", failed)
        return 1
    return 0


class _Worker:
    """One worker process, restarted whenever it exits while the supervisor runs."""

    def __init__(self, index: int, command: list[str], lifeline: int) -> None:
        self.index = index
        self.command = command
        self.lifeline = lifeline
        self.process: trio.Process | None = None
        self.status: int | None = None
        self.stopped = trio.Event()

    async def keep_running(self, stopping: trio.Event) -> None:
        delay = RESTART_FIRST
        try:
            while not stopping.is_set():
                started = trio.current_time()
                self.process = await trio.lowlevel.open_process(
                    self.command,
                    stdin=subprocess.DEVNULL,
                    pass_fds=(self.lifeline,),
                    env={**os.environ, LIFELINE: str(self.lifeline)},
                )
                LOGGER.info("worker %d started (pid %d)", self.index, self.process.pid)
                if stopping.is_set():  # the signal came while it started
                    self.terminate()
                # Shielded: on shutdown the supervisor waits for the exit itself.
                with trio.CancelScope(shield=True):
                    self.status = await self.process.wait()
                if stopping.is_set():
                    break
                if trio.current_time() - started > RESTART_RESET_AFTER:
                    delay = RESTART_FIRST
                LOGGER.warning(
                    "worker %d (pid %d) exited with %s; restarting in %.1f s",
                    self.index,
                    self.process.pid,
                    _describe(self.status),
                    delay,
                )
                with trio.move_on_after(delay):
                    await stopping.wait()
                delay = min(delay * 2, RESTART_MAX)
        finally:
            self.stopped.set()

    def terminate(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            LOGGER.warning("worker %d did not stop in time: killed", self.index)
            self.process.kill()


def _command(argv: list[str], port: int, node_id: str) -> list[str]:
    # Flags given later win over earlier ones, the config file and the environment.
    return [
        sys.executable, "-m", "tidings", *argv,
        "--workers", "1", "--reuse-port", "--port", str(port), "--node-id", node_id,
    ]  # fmt: skip


def _hold_port(host: str, port: int) -> socket.socket:
    """A socket bound to the workers' address, with SO_REUSEPORT, never listening.

    Connections go only to listening sockets, so this one takes none; it keeps
    the port chosen (and in the workers' hands: SO_REUSEPORT groups need the
    same user) while no worker listens, between restarts.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def watch_supervisor() -> None:
    """In a worker: shut down (as on SIGTERM) once the supervisor is gone.

    Does nothing in a process that no supervisor started. Call it from inside
    ``trio.run``, with the SIGTERM handler of ``tidings serve`` in place.
    """
    fd = os.environ.pop(LIFELINE, None)
    if fd is not None:
        trio.lowlevel.spawn_system_task(_wait_for_the_end, int(fd))


async def _wait_for_the_end(fd: int) -> None:
    # Nobody writes to the lifeline: it turns readable when its writer, the
    # supervisor, is gone, and then reads as the end of the file.
    while True:
        await trio.lowlevel.wait_readable(fd)
        if not os.read(fd, 1):
            LOGGER.warning("the supervisor is gone: shutting down")
            os.kill(os.getpid(), signal.SIGTERM)
            return


def _describe(status: int | None) -> str:
    if status is not None and status < 0:
        return f"signal {signal.Signals(-status).name}"
    return f"status {status}"


__all__ = ["run", "watch_supervisor"]
