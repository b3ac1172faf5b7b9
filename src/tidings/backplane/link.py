"""One connection to one Redis server, for the backplane's hot paths.

A :class:`Link` is a Trio TCP stream and a :class:`~.resp.Parser`, nothing
more: no pool, no retries, no background task. Whoever owns it reads it (the
pub/sub listener, or the publisher waiting for its pipeline's replies); any
error means the link is dropped and the backplane reconnects, so there is no
state to repair. It also finds where to connect: the primary a Sentinel names,
and the primaries of a Redis Cluster with the slots each serves.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import deque
from typing import Final

import trio

from .resp import Arg, Parser, ProtocolError, ReplyError, Value, command

#: Bytes asked of the socket per read. A read's replies are delivered before
#: the next read, so this also bounds one batch (about 300 small events).
READ_SIZE: Final = 65536
#: How long a write may wait for Redis to take it. The write is shielded from
#: its caller's cancellation (it may carry other tasks' commands, and a write
#: cut short would leave half a command on the link); past this, the link is
#: closed and the backplane reconnects.
SEND_TIMEOUT: Final = 10.0
#: Redis Cluster's slots, and the CRC16 (XMODEM) that maps a key to one.
SLOTS: Final = 16384


class LinkClosed(Exception):
    """Redis closed the connection."""


class Link:
    """A RESP2 connection to one Redis server (see the module docstring).

    Open it with :meth:`connect`; close it with :meth:`aclose`. Several tasks
    may send on a pub/sub link (their commands go out in the order of the
    calls); only one task may read.
    """

    __slots__ = (
        "_outgoing",
        "_parser",
        "_ready",
        "_stream",
        "_writing",
        "address",
        "waiting_since",
    )

    def __init__(self, stream: trio.SocketStream, address: tuple[str, int]) -> None:
        self._stream = stream
        self._parser = Parser()
        self._ready: deque[Value] = deque()
        self._outgoing: list[bytes] = []
        self._writing = False
        self.address = address
        self.waiting_since: float | None = None
        """When the pipeline waiting for its replies was sent (Trio's clock), or None."""

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        connect_timeout: float,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        name: str | None = None,
    ) -> Link:
        """Connect, authenticate and select ``db``, within ``connect_timeout`` seconds.

        Raises:
            OSError: the server cannot be reached.
            ReplyError: it refused the credentials or the database.
            trio.TooSlowError: it did not answer in time.
        """
        with trio.fail_after(connect_timeout):
            stream = await trio.open_tcp_stream(host, port)
            link = cls(stream, (host, port))
            try:
                setup: list[bytes] = []
                if password is not None:
                    auth = (username, password) if username else (password,)
                    setup.append(command("AUTH", *auth))
                if db:
                    setup.append(command("SELECT", db))
                if name:
                    setup.append(command("CLIENT", "SETNAME", name))
                if setup:
                    for reply in await link.pipeline(b"".join(setup), len(setup)):
                        if isinstance(reply, ReplyError):
                            raise reply
            except BaseException:
                await link.aclose()
                raise
        return link

    async def aclose(self) -> None:
        """Close the connection (never raises, never waits long)."""
        with (
            trio.move_on_after(1, shield=True),
            contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await self._stream.aclose()

    async def send(self, data: bytes) -> None:
        """Write encoded commands (:func:`~.resp.command`), after those sent before.

        A call made while another task writes leaves its commands to that
        task, which writes them next, all in one write, and returns at once.
        With a lock each caller would wait its turn, one pass of the scheduler
        per turn: in a reconnect storm, a hundred topics' ``SUBSCRIBE`` took
        seconds to leave a node busy with thousands of handshakes.

        Raises:
            LinkClosed: Redis took nothing for ``SEND_TIMEOUT``; the link is closed.
        """
        self._outgoing.append(data)
        if self._writing:
            await trio.lowlevel.checkpoint()
            return
        self._writing = True
        try:
            while self._outgoing:
                data = b"".join(self._outgoing)
                self._outgoing.clear()
                with trio.CancelScope(shield=True), trio.move_on_after(SEND_TIMEOUT) as timer:
                    await self._stream.send_all(data)
                if timer.cancelled_caught:
                    await self.aclose()
                    raise LinkClosed(f"Redis took nothing for {SEND_TIMEOUT:.0f} s")
        finally:
            self._writing = False
        await trio.lowlevel.checkpoint()  # a send is a checkpoint, as it was under the lock

    async def receive(self) -> list[Value]:
        """Every reply that is complete, waiting for the socket until there is one.

        Replies already parsed come first and without a read; otherwise this
        is exactly one read (one checkpoint), whatever it brings.

        Raises:
            LinkClosed: Redis closed the connection.
            ProtocolError: what it sent is not RESP2.
        """
        if self._ready:
            ready = list(self._ready)
            self._ready.clear()
            return ready
        while True:
            data = await self._stream.receive_some(READ_SIZE)
            if not data:
                raise LinkClosed("Redis closed the connection")
            self._parser.feed(data)
            replies = self._parser.replies()
            if replies:
                return replies

    def receive_nowait(self) -> list[Value]:
        """Replies completed by whatever the socket holds now; no waiting, no checkpoint.

        Lets the pub/sub listener fill a batch with what arrived while it was
        delivering the previous read, before it yields to the writers.

        Raises:
            LinkClosed: Redis closed the connection.
            ProtocolError: what it sent is not RESP2.
        """
        try:
            # The socket is non-blocking (Trio's): no data is BlockingIOError.
            data = os.read(self._stream.socket.fileno(), READ_SIZE)
        except BlockingIOError:
            return []
        if not data:
            raise LinkClosed("Redis closed the connection")
        self._parser.feed(data)
        return self._parser.replies()

    async def pipeline(self, data: bytes, count: int) -> list[Value]:
        """Send ``count`` encoded commands at once and return their ``count`` replies.

        Error replies are returned as :class:`~.resp.ReplyError` values.
        """
        self.waiting_since = trio.current_time()
        try:
            await self.send(data)
            replies: list[Value] = []
            while len(replies) < count:
                if not self._ready:
                    self._ready.extend(await self.receive())
                while self._ready and len(replies) < count:
                    replies.append(self._ready.popleft())
            return replies
        finally:
            self.waiting_since = None

    async def call(self, *args: Arg) -> Value:
        """One command's reply.

        Raises:
            ReplyError: Redis answered with an error.
        """
        (reply,) = await self.pipeline(command(*args), 1)
        if isinstance(reply, ReplyError):
            raise reply
        return reply


# --- finding the servers -----------------------------------------------------------------


async def sentinel_primary(
    sentinels: list[tuple[str, int]], service: str, *, each_timeout: float
) -> tuple[str, int]:
    """The address of ``service``'s primary, as the first Sentinel that knows says.

    Each Sentinel gets ``each_timeout`` seconds to answer, so that one that is
    down costs only that.

    Raises:
        OSError: no Sentinel answered with an address.
    """
    problems: list[str] = []
    for host, port in sentinels:
        try:
            link = await Link.connect(host, port, connect_timeout=each_timeout)
        except (OSError, ReplyError, trio.TooSlowError) as exc:
            problems.append(f"{host}:{port}: {exc!r}")
            continue
        try:
            with trio.fail_after(each_timeout):
                reply = await link.call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", service)
        except (OSError, ReplyError, ProtocolError, LinkClosed, trio.TooSlowError) as exc:
            problems.append(f"{host}:{port}: {exc!r}")
            continue
        finally:
            await link.aclose()
        if isinstance(reply, list) and len(reply) == 2:
            address, number = reply
            if isinstance(address, bytes) and isinstance(number, bytes):
                return address.decode(), int(number)
        problems.append(f"{host}:{port}: does not know {service!r}")
    raise OSError(f"no Sentinel named the primary of {service!r}: {'; '.join(problems)}")


def parse_cluster_slots(reply: Value) -> list[tuple[int, int, tuple[str, int]]]:
    """(first slot, last slot, primary address) of each range in a ``CLUSTER SLOTS`` reply.

    Raises:
        ProtocolError: the reply does not have that shape.
    """
    ranges: list[tuple[int, int, tuple[str, int]]] = []
    if not isinstance(reply, list):
        raise ProtocolError("CLUSTER SLOTS did not answer with an array")
    for entry in reply:
        if not (isinstance(entry, list) and len(entry) >= 3 and isinstance(entry[2], list)):
            raise ProtocolError(f"unexpected CLUSTER SLOTS entry {entry!r}")
        first, last, primary = entry[0], entry[1], entry[2]
        if not (isinstance(first, int) and isinstance(last, int) and len(primary) >= 2):
            raise ProtocolError(f"unexpected CLUSTER SLOTS entry {entry!r}")
        host, port = primary[0], primary[1]
        if not (isinstance(host, bytes) and isinstance(port, int)):
            raise ProtocolError(f"unexpected CLUSTER SLOTS entry {entry!r}")
        ranges.append((first, last, (host.decode(), port)))
    return ranges


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return table


_CRC16: Final = _crc16_table()


def key_slot(key: bytes) -> int:
    """The Redis Cluster slot of a key (of its ``{hash tag}``, if it has one)."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    crc = 0
    for byte in key:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ byte) & 0xFF]
    return crc % SLOTS


def milliseconds(seconds: float) -> int:
    """A positive whole number of milliseconds (Redis reads 0 as "forever")."""
    return max(1, math.ceil(seconds * 1000))


__all__ = [
    "Link",
    "LinkClosed",
    "key_slot",
    "milliseconds",
    "parse_cluster_slots",
    "sentinel_primary",
]
