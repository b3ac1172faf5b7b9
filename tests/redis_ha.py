"""Redis deployments that fail over, for the failover tests: Sentinel and Cluster.

Every process is a real ``redis-server`` of the test alone, on free ports of
127.0.0.1, in the test's temporary directory: never the instance on 6379.

``Sentinels`` is a primary, one replica and three sentinels (quorum 2) with
short timeouts (``DOWN_AFTER_MS``), so a SIGKILLed primary is replaced within
a few seconds. ``RedisCluster`` is three primaries without replicas, created
with ``redis-cli --cluster create``, and moves one slot between them under
traffic (``migrate_slot``), the way ``redis-cli --cluster reshard`` does.

Every wait is a bounded poll of something Redis answers (PING, INFO, SENTINEL
and CLUSTER commands), never a bare sleep standing in for synchronisation.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from .redis_fixture import RedisServer, _stop_process, free_port, redis_binary

#: A sentinel takes the primary for dead after this long without an answer.
#: Shorter makes the tests faster, but on a busy machine (CI, or two CPUs shared
#: with other test runs) 400 ms let a healthy new primary look dead and fail
#: over a second time, to an instance that had no data yet.
DOWN_AFTER_MS = 1000
#: Sentinel's failover timeout (it also delays re-pointing misconfigured replicas).
FAILOVER_TIMEOUT_MS = 4000
#: How long anything here may take to come up, at most.
READY_TIMEOUT = 15.0


async def poll(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    """Run ``check`` every 20 ms until it is true; fail after ``within`` seconds."""
    with trio.move_on_after(within):
        while True:
            try:
                if await check():
                    return
            except (OSError, ConnectionError, RuntimeError):
                pass  # not up yet
            await trio.sleep(0.02)
    raise AssertionError(f"not so within {within} s: {what}")


def info_fields(text: bytes) -> dict[str, str]:
    fields = {}
    for line in text.decode().splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            fields[key] = value.strip()
    return fields


class Instance(RedisServer):
    """One redis-server (or sentinel) with the arguments given, restartable."""

    def __init__(self, binary: str, directory: Path, args: list[str], port: int | None = None):
        directory.mkdir(parents=True, exist_ok=True)
        super().__init__(binary, directory)
        if port is not None:
            self.port = port
        self.args = args

    async def start(self) -> None:
        command = [
            self.binary, *self.args,
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
            "--save", "", "--daemonize", "no", "--protected-mode", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        self.process = await trio.lowlevel.open_process(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.starts += 1
        await poll(self._pong, READY_TIMEOUT, f"redis on {self.port} answers PING")

    async def _pong(self) -> bool:
        assert self.process is not None
        if self.process.returncode is not None:
            raise AssertionError(f"redis on {self.port} exited:\n{self.log()}")
        return bool(await self.command("PING") == "PONG")

    async def info(self, section: str) -> dict[str, str]:
        return info_fields(await self.command("INFO", section))


class Sentinels:
    """A primary, a replica, three sentinels monitoring them as ``main``."""

    def __init__(self, directory: Path) -> None:
        binary = redis_binary()
        self.directory = directory
        # A replica's first sync starts at once (Redis waits 5 s by default for
        # more replicas to join the same transfer).
        data = ["--appendonly", "no", "--repl-diskless-sync-delay", "0"]
        self.primary = Instance(binary, directory / "a", data)
        self.replica = Instance(
            binary, directory / "b", [*data, "--replicaof", "127.0.0.1", str(self.primary.port)]
        )
        self.sentinels: list[Instance] = []
        for k in range(3):
            port = free_port()
            conf = directory / f"sentinel{k}" / "sentinel.conf"
            conf.parent.mkdir(parents=True)
            conf.write_text(
                f"sentinel monitor main 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds main {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout main {FAILOVER_TIMEOUT_MS}\n"
                "sentinel parallel-syncs main 1\n"
            )
            self.sentinels.append(Instance(binary, conf.parent, [str(conf), "--sentinel"], port))

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/main/0"

    async def start(self) -> None:
        await self.primary.start()
        await self.replica.start()
        await poll(self._replica_in_sync, READY_TIMEOUT, "the replica is in sync")
        for sentinel in self.sentinels:
            await sentinel.start()
        # A failover needs a quorum of sentinels that know each other and the replica.
        await poll(self._sentinels_ready, READY_TIMEOUT, "the sentinels know each other")

    async def _replica_in_sync(self) -> bool:
        return (await self.replica.info("replication")).get("master_link_status") == "up"

    async def _sentinels_ready(self) -> bool:
        for sentinel in self.sentinels:
            master = await sentinel.command("SENTINEL", "MASTER", "main")
            fields = dict(zip(master[::2], master[1::2], strict=True))
            if int(fields[b"num-other-sentinels"]) < 2 or int(fields[b"num-slaves"]) < 1:
                return False
        return True

    async def primary_port(self) -> int:
        """The port of the primary as the first sentinel names it now."""
        _, port = await self.sentinels[0].command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "main")
        return int(port)

    async def cut_replica(self) -> None:
        """The replica stops receiving writes (it replicates a port nobody listens on).

        It keeps what it has and can still be promoted: a replica that lags.
        """
        await self.replica.command("REPLICAOF", "127.0.0.1", free_port())

    async def wait_failover(self, within: float) -> None:
        """Until every sentinel names the replica as the primary."""

        async def promoted() -> bool:
            for sentinel in self.sentinels:
                _, port = await sentinel.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "main")
                if int(port) != self.replica.port:
                    return False
            return (await self.replica.info("replication")).get("role") == "master"

        await poll(promoted, within, "the sentinels promoted the replica")

    async def restart_old_primary(self) -> None:
        """The SIGKILLed primary comes back as a replica of the new one, and syncs.

        Started as a replica (not empty and a primary, as its configuration
        would have it), and never to be promoted (replica-priority 0): on a busy
        machine a sentinel once took the new primary for dead a second after
        the failover and promoted this one while its first sync was still
        waiting, empty.
        """
        self.primary.args = [
            *self.primary.args, "--replicaof", "127.0.0.1", str(self.replica.port),
            "--replica-priority", "0",
        ]  # fmt: skip
        await self.primary.start()

        async def in_sync() -> bool:
            return (await self.primary.info("replication")).get("master_link_status") == "up"

        await poll(in_sync, READY_TIMEOUT, "the old primary is a replica in sync")

    async def stop(self) -> None:
        with trio.CancelScope(shield=True):
            for instance in [*self.sentinels, self.replica, self.primary]:
                if instance.process is not None:
                    await _stop_process(instance.process, grace=2)

    def report(self) -> str:
        parts = []
        for name, instance in [
            ("primary", self.primary),
            ("replica", self.replica),
            *((f"sentinel{k}", s) for k, s in enumerate(self.sentinels)),
        ]:
            parts.append(f"----- {name} (port {instance.port}) -----")
            parts.append(instance.log()[-2500:])
        return "\n".join(parts)


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 <= 65535:
            try:
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


class RedisCluster:
    """Three primaries sharing the 16384 slots."""

    def __init__(self, directory: Path) -> None:
        binary = redis_binary()
        cli = shutil.which("redis-cli")
        if cli is None:
            pytest.skip("redis-cli is not installed (it comes with redis-server's package)")
        self.cli = cli
        options = ["--appendonly", "no", "--cluster-enabled", "yes"]
        options += ["--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"]
        self.nodes = [
            Instance(binary, directory / f"node{k}", options, cluster_port()) for k in range(3)
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    async def start(self) -> None:
        for node in self.nodes:
            await node.start()
        await trio.run_process(
            [self.cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-yes"],
            capture_stdout=True,
        )  # fmt: skip
        await poll(self._ready, READY_TIMEOUT, "every node says cluster_state:ok")

    async def _ready(self) -> bool:
        for node in self.nodes:
            if info_fields(await node.command("CLUSTER", "INFO")).get("cluster_state") != "ok":
                return False
        return True

    async def node_id(self, node: Instance) -> str:
        return (await node.command("CLUSTER", "MYID")).decode()  # type: ignore[no-any-return]

    async def owner(self, slot: int) -> Instance:
        """The primary serving ``slot``, as the first node says."""
        for first, last, primary, *_ in await self.nodes[0].command("CLUSTER", "SLOTS"):
            if first <= slot <= last:
                return next(n for n in self.nodes if n.port == primary[1])
        raise AssertionError(f"nobody serves slot {slot}")

    async def migrate_slot(self, slot: int, target: Instance) -> None:
        """Move ``slot`` and its keys to ``target`` while clients use it.

        The steps of ``redis-cli --cluster reshard`` for one slot: importing on
        the target, migrating on the source, MIGRATE the keys, then every node
        is told the new owner.
        """
        source = await self.owner(slot)
        assert source is not target
        source_id, target_id = await self.node_id(source), await self.node_id(target)
        await target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        await source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while keys := await source.command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            await source.command(
                "MIGRATE",
                "127.0.0.1",
                target.port,
                "",
                0,
                5000,
                "KEYS",
                *[k.decode() for k in keys],
            )
        for node in [target, source, *(n for n in self.nodes if n not in (source, target))]:
            await node.command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

    async def stop(self) -> None:
        with trio.CancelScope(shield=True):
            for node in self.nodes:
                if node.process is not None:
                    await _stop_process(node.process, grace=2)

    def report(self) -> str:
        return "\n".join(
            f"----- cluster node {n.port} -----\n{n.log()[-2000:]}" for n in self.nodes
        )
