"""Lean WebSocket load processes for ``bench/fanout.py``: subscribers and one publisher.

The load generator must cost far less CPU than the server it measures, so it
avoids every general-purpose layer: raw non-blocking sockets, one ``epoll``
object per process, a hand-written RFC 6455 handshake, and a frame scanner
that reads only what it counts. For each event frame it finds the ``seq``
field with ``bytes.find`` (no JSON decoding) to count deliveries and seq gaps;
only every k-th event per subscriber is read further, for the publish stamp
that gives the publish-to-receive latency.

The processes are driven over a :mod:`multiprocessing` pipe by the
orchestrator in ``fanout.py``; every command gets exactly one reply, a plain
tuple or dict (see :class:`SubscriberProcess` and :class:`PublisherProcess`).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import os
import random
import resource
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Final

GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
RECV_SIZE: Final = 256 * 1024
MAX_HEAD: Final = 16 * 1024

OP_TEXT: Final = 0x1
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
TEXT_FRAME: Final = 0x80 | OP_TEXT  # FIN + text: the only data frame the server sends

EVENT_PREFIX: Final = b'{"type":"event"'
ERROR_PREFIX: Final = b'{"type":"error"'
RESPONSE_PREFIX: Final = b'{"type":"response"'
SEQ_KEY: Final = b'"seq":'
REQUEST_ID_KEY: Final = b'"requestId":'
STAMP_KEY: Final = b'"payload":{"t":'
"""The publisher puts its ``time.monotonic_ns()`` stamp first in the payload, as ``t``."""

_CONNECTING, _UPGRADING, _SUBSCRIBING, _READY, _CLOSED = range(5)


class ProtocolError(Exception):
    """The server sent something this client does not expect (a refused upgrade, a bad frame)."""


# --- process setup ---------------------------------------------------------------------------


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE to ``wanted`` if the hard limit allows; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, wanted)
    if hard != resource.RLIM_INFINITY and target > hard:
        try:  # only root may raise the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (ValueError, OSError):
            target = hard
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pin_to_cpu(cpu: int | None) -> None:
    """Restrict this process to one CPU (what ``taskset -c`` does), if one is given."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


# --- the wire format -------------------------------------------------------------------------


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client-to-server frame (RFC 6455 section 5.2)."""
    size = len(payload)
    first = 0x80 | opcode
    if size < 126:
        header = struct.pack("!BB", first, 0x80 | size)
    elif size < 65536:
        header = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, size)
    key = random.getrandbits(32).to_bytes(4, "big")
    if not size:
        return header + key
    stream = (key * (size // 4 + 1))[:size]
    masked = int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")
    return header + key + masked.to_bytes(size, "big")


def upgrade_request(host: str, port: int, path: str) -> tuple[bytes, bytes]:
    """The HTTP upgrade request and the ``Sec-WebSocket-Accept`` value it must get back."""
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    request = (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    return request, accept


def upgrade_head_length(data: bytes, accept: bytes) -> int | None:
    """Length of a complete ``101`` response head at the start of ``data``; None if incomplete.

    Raises:
        ProtocolError: the server refused the upgrade or sent the wrong accept key.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if len(data) > MAX_HEAD:
            raise ProtocolError("upgrade response head too long")
        return None
    status, _, headers = data[:end].partition(b"\r\n")
    if not status.startswith(b"HTTP/1.1 101"):
        raise ProtocolError(f"upgrade refused: {status.decode('latin-1')[:80]}")
    for line in headers.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-accept" and value.strip() == accept:
            return end + 4
    raise ProtocolError("upgrade response lacks the right Sec-WebSocket-Accept")


def next_frame(data: bytes, pos: int) -> tuple[int, int, int] | None:
    """``(first byte, payload start, payload end)`` of the server frame at ``pos``, or None.

    None means the frame is not complete in ``data`` yet.

    Raises:
        ProtocolError: a masked frame (servers never mask, RFC 6455 section 5.1).
    """
    available = len(data) - pos
    if available < 2:
        return None
    size = data[pos + 1]
    if size & 0x80:
        raise ProtocolError("the server sent a masked frame")
    start = pos + 2
    if size == 126:
        if available < 4:
            return None
        size = (data[pos + 2] << 8) | data[pos + 3]
        start = pos + 4
    elif size == 127:
        if available < 10:
            return None
        size = int.from_bytes(data[pos + 2 : pos + 10], "big")
        start = pos + 10
    end = start + size
    if end > len(data):
        return None
    return data[pos], start, end


def int_after(data: bytes, key: bytes, start: int, end: int) -> int:
    """The integer that follows ``key`` in ``data[start:end]`` (a JSON number, by position)."""
    at = data.find(key, start, end) + len(key)
    stop = at
    while stop < end and data[stop] in b"0123456789-":
        stop += 1
    return int(data[at:stop])


def publish_frame(topic: str, request_id: int, pad: str) -> bytes:
    """A masked ``publish`` frame whose payload carries ``t``, the ``monotonic_ns`` stamp."""
    text = (
        f'{{"type":"publish","topic":"{topic}","payload":{{"t":{time.monotonic_ns()},'
        f'"pad":"{pad}"}},"requestId":{request_id}}}'
    )
    return client_frame(OP_TEXT, text.encode())


def subscribe_frame(topic: str, request_id: int) -> bytes:
    """A masked ``subscribe`` frame."""
    text = f'{{"type":"subscribe","topic":"{topic}","requestId":{request_id}}}'
    return client_frame(OP_TEXT, text.encode())


# --- subscribers -----------------------------------------------------------------------------


class _Conn:
    """One subscriber connection and what the scanner remembers about it."""

    __slots__ = ("accept", "buf", "cid", "last_seq", "sock", "state")

    def __init__(self, sock: socket.socket, cid: int, accept: bytes) -> None:
        self.sock = sock
        self.cid = cid
        self.accept = accept
        self.state = _CONNECTING
        self.buf = b""
        self.last_seq = 0


@dataclass
class PhaseCounters:
    """What the subscribers of one process saw since the phase began.

    ``delivered``: event frames with a seq above the previous one on their connection;
    ``gaps``: events skipped inside a connection's stream (seq jumps; dropped by the server);
    ``stale``: events from before the phase; ``reordered``: seq at or below one already seen;
    ``closed``: connections the server closed or lost; ``latency_ns``: sampled
    receive time minus publish stamp, both ``CLOCK_MONOTONIC``.
    """

    delivered: int = 0
    gaps: int = 0
    stale: int = 0
    reordered: int = 0
    closed: int = 0
    pings: int = 0
    other_frames: int = 0
    first_rx_ns: int = 0
    last_rx_ns: int = 0
    latency_ns: list[int] = field(default_factory=list)


@dataclass
class _ConnectBatch:
    """An open ``connect`` command: connections still to open, and the outcome so far."""

    pending: int
    concurrency: int
    deadline: float
    started: float
    in_progress: int = 0
    ok: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def count_failure(self, reason: str) -> None:
        """Count one connection that could not be opened and subscribed, by reason."""
        self.failed += 1
        self.errors[reason] = self.errors.get(reason, 0) + 1


class SubscriberProcess:
    """Holds many subscriber connections in one process and counts what they receive.

    Commands (a tuple on the pipe) and replies:

    * ``("connect", count, concurrency, timeout)``: open ``count`` more connections,
      at most ``concurrency`` handshakes at once, and subscribe each to the topic;
      replies ``{"ok", "failed", "errors", "seconds"}`` when all are done or the time is up.
    * ``("begin", seq)``: start a phase whose first event will have ``seq + 1``.
    * ``("poll",)``: replies ``(delivered, last_rx_ns)`` so far in the phase.
    * ``("end", seq)``: end the phase, ``seq`` being the last one published; replies
      the :class:`PhaseCounters` as a dict plus ``tail`` (events missing after the
      last one each connection received) and ``connections``.
    * ``("close",)``: close every connection; replies the number closed.
    * ``("quit",)``: exit; no reply.
    """

    def __init__(
        self, pipe: Connection, host: str, port: int, path: str, topic: str, sample_every: int
    ) -> None:
        self.pipe = pipe
        self.host = host
        self.port = port
        self.path = path
        self.topic = topic
        self.sample_every = max(1, sample_every)
        self.epoll = select.epoll()
        self.by_fd: dict[int, _Conn] = {}
        self.ready: list[_Conn] = []
        self.phase_conns: list[_Conn] = []
        self.phase_start_seq = 0
        self.counters = PhaseCounters()
        self.batch: _ConnectBatch | None = None
        self.next_cid = 0
        self.running = True

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> None:
        """Serve commands and sockets until ``quit`` (or the orchestrator goes away)."""
        pipe_fd = self.pipe.fileno()
        self.epoll.register(pipe_fd, select.EPOLLIN)
        by_fd = self.by_fd
        while self.running:
            for fd, mask in self.epoll.poll(0.2):
                if fd == pipe_fd:
                    self._command()
                    continue
                conn = by_fd.get(fd)
                if conn is None:
                    continue
                if conn.state == _READY:
                    self._read_events(conn)
                else:
                    self._advance(conn, mask)
            if self.batch is not None:
                self._pump_connects()

    def _command(self) -> None:
        try:
            command = self.pipe.recv()
        except EOFError:
            self.running = False
            return
        name = command[0]
        if name == "connect":
            self._begin_connects(*command[1:])
        elif name == "begin":
            self._begin_phase(command[1])
        elif name == "poll":
            self.pipe.send((self.counters.delivered, self.counters.last_rx_ns))
        elif name == "end":
            self.pipe.send(self._end_phase(command[1]))
        elif name == "close":
            self.pipe.send(self._close_all())
        elif name == "quit":
            self.running = False

    # --- phases -------------------------------------------------------------------------

    def _begin_phase(self, start_seq: int) -> None:
        self.phase_start_seq = start_seq
        self.phase_conns = [conn for conn in self.ready if conn.state == _READY]
        for conn in self.phase_conns:
            conn.last_seq = start_seq
        self.counters = PhaseCounters()
        self.pipe.send(len(self.phase_conns))

    def _end_phase(self, last_seq: int) -> dict[str, Any]:
        counters = self.counters
        tail = sum(max(0, last_seq - conn.last_seq) for conn in self.phase_conns)
        result = dict(vars(counters))
        result["tail"] = tail
        result["connections"] = len(self.phase_conns)
        self.counters = PhaseCounters()
        return result

    # --- receiving events ----------------------------------------------------------------

    def _read_events(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            self._lost(conn)
            return
        if not chunk:
            self._lost(conn)
            return
        now = time.monotonic_ns()
        data = conn.buf + chunk if conn.buf else chunk
        try:
            conn.buf = data[self._scan(conn, data, now) :]
        except ProtocolError:
            self._lost(conn)

    def _scan(self, conn: _Conn, data: bytes, now: int) -> int:
        """Count the complete frames in ``data``; returns where the first incomplete one starts.

        This is the load generator's hot loop, so the frame header is parsed
        inline (see :func:`next_frame` for the readable version) and only
        ``seq`` is read from an event, plus the stamp of every k-th one.
        """
        counters = self.counters
        size = len(data)
        pos = 0
        last = conn.last_seq
        delivered = gaps = 0
        every = self.sample_every
        offset = conn.cid
        samples = counters.latency_ns
        while size - pos >= 2:
            length = data[pos + 1]
            if length < 126:
                start = pos + 2
            elif length == 126:
                if size - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 4
            else:
                frame = next_frame(data, pos)  # 64-bit length, or a protocol error
                if frame is None:
                    break
                _, start, end = frame
                length = end - start
            end = start + length
            if end > size:
                break
            if data[pos] == TEXT_FRAME and data.startswith(EVENT_PREFIX, start):
                at = data.find(SEQ_KEY, start, end) + 6
                seq = int(data[at : data.find(b",", at, end)])
                if seq > last:
                    gaps += seq - last - 1
                    last = seq
                    delivered += 1
                    if (seq + offset) % every == 0:
                        samples.append(now - int_after(data, STAMP_KEY, at, end))
                elif seq <= self.phase_start_seq:
                    counters.stale += 1
                else:
                    counters.reordered += 1
            else:
                self._control(conn, data[pos], data[start:end])
            pos = end
        conn.last_seq = last
        if delivered:
            counters.delivered += delivered
            counters.gaps += gaps
            if not counters.first_rx_ns:
                counters.first_rx_ns = now
            counters.last_rx_ns = now
        return pos

    def _control(self, conn: _Conn, first: int, payload: bytes) -> None:
        opcode = first & 0x0F
        if opcode == OP_PING:
            self.counters.pings += 1
            self._send(conn, client_frame(OP_PONG, payload))
        elif opcode == OP_CLOSE:
            self._send(conn, client_frame(OP_CLOSE, payload[:2]))
            self._lost(conn)
        elif opcode != OP_PONG:
            self.counters.other_frames += 1

    def _send(self, conn: _Conn, frame: bytes) -> None:
        with contextlib.suppress(OSError):  # if the socket is gone, recv will say so
            conn.sock.send(frame)

    def _lost(self, conn: _Conn) -> None:
        if conn.state == _READY:
            self.counters.closed += 1
        self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        if conn.state == _CLOSED:
            return
        conn.state = _CLOSED
        fd = conn.sock.fileno()
        self.by_fd.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(fd)
        conn.sock.close()

    def _close_all(self) -> int:
        closed = 0
        for conn in list(self.by_fd.values()):
            closed += conn.state == _READY
            self._drop(conn)
        self.ready = []
        self.phase_conns = []
        return closed

    # --- opening connections -------------------------------------------------------------

    def _begin_connects(self, count: int, concurrency: int, timeout: float) -> None:
        now = time.monotonic()
        self.batch = _ConnectBatch(count, max(1, concurrency), now + timeout, now)
        self._pump_connects()

    def _pump_connects(self) -> None:
        batch = self.batch
        assert batch is not None
        while batch.pending and batch.in_progress < batch.concurrency:
            batch.pending -= 1
            self._open()
        if time.monotonic() > batch.deadline:
            for conn in list(self.by_fd.values()):
                if conn.state != _READY:
                    self._fail(conn, "timeout")
            batch.failed += batch.pending
            batch.pending = 0
        if not batch.pending and not batch.in_progress:
            self.batch = None
            self.pipe.send(
                {
                    "ok": batch.ok,
                    "failed": batch.failed,
                    "errors": batch.errors,
                    "seconds": time.monotonic() - batch.started,
                }
            )

    def _open(self) -> None:
        batch = self.batch
        assert batch is not None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request, accept = upgrade_request(self.host, self.port, self.path)
        conn = _Conn(sock, self.next_cid, accept)
        conn.buf = request  # the request waits here until the socket is connected
        self.next_cid += 1
        batch.in_progress += 1
        code = sock.connect_ex((self.host, self.port))
        if code not in (0, errno.EINPROGRESS):
            batch.in_progress -= 1
            batch.count_failure(errno.errorcode.get(code, str(code)))
            sock.close()
            return
        self.by_fd[sock.fileno()] = conn
        self.epoll.register(sock.fileno(), select.EPOLLOUT)

    def _advance(self, conn: _Conn, mask: int) -> None:
        """Move a connection through connect, upgrade and subscribe."""
        try:
            if conn.state == _CONNECTING:
                code = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise ConnectionError(errno.errorcode.get(code, str(code)))
                conn.sock.send(conn.buf)  # ~150 bytes: fits any fresh socket buffer
                conn.buf = b""
                conn.state = _UPGRADING
                self.epoll.modify(conn.sock.fileno(), select.EPOLLIN)
                return
            chunk = conn.sock.recv(RECV_SIZE)
            if not chunk:
                raise ConnectionError("closed during handshake")
            conn.buf += chunk
            if conn.state == _UPGRADING:
                head = upgrade_head_length(conn.buf, conn.accept)
                if head is None:
                    return
                conn.buf = conn.buf[head:]
                conn.state = _SUBSCRIBING
                conn.sock.send(subscribe_frame(self.topic, conn.cid))
            self._await_subscribed(conn)
        except BlockingIOError:
            return
        except (OSError, ProtocolError) as exc:
            self._fail(conn, type(exc).__name__ + (f": {exc}" if str(exc) else ""))

    def _await_subscribed(self, conn: _Conn) -> None:
        pos = 0
        while (frame := next_frame(conn.buf, pos)) is not None:
            first, start, end = frame
            payload = conn.buf[start:end]
            pos = end
            if first & 0x0F != OP_TEXT:
                self._control(conn, first, payload)
                if conn.state == _CLOSED:
                    raise ProtocolError("closed by the server while subscribing")
                continue
            if payload.startswith(RESPONSE_PREFIX) and b'"status":"subscribed"' in payload:
                conn.buf = conn.buf[pos:]
                conn.last_seq = int_after(payload, SEQ_KEY, 0, len(payload))
                conn.state = _READY
                self.ready.append(conn)
                batch = self.batch
                assert batch is not None
                batch.in_progress -= 1
                batch.ok += 1
                return
            if payload.startswith(ERROR_PREFIX):
                raise ProtocolError(payload.decode(errors="replace")[:120])
        conn.buf = conn.buf[pos:]

    def _fail(self, conn: _Conn, reason: str) -> None:
        batch = self.batch
        if batch is not None and conn.state != _READY:
            batch.in_progress -= 1
            batch.count_failure(reason)
        self._drop(conn)


def subscriber_main(
    pipe: Connection,
    host: str,
    port: int,
    path: str,
    topic: str,
    sample_every: int,
    cpu: int | None,
    fd_limit: int,
) -> None:
    """Entry point of a subscriber process (a :mod:`multiprocessing` target)."""
    pin_to_cpu(cpu)
    raise_fd_limit(fd_limit)
    SubscriberProcess(pipe, host, port, path, topic, sample_every).run()


# --- the publisher ---------------------------------------------------------------------------


@dataclass
class PublishResult:
    """One publishing phase as the publisher saw it.

    ``sent``: publish frames written; ``acked``: ``published`` responses received;
    ``errors``: ``error`` responses; ``first_seq``/``last_seq``: the lowest and
    highest seq the server gave this phase's events; ``start_ns``/``stop_ns``:
    when publishing began and stopped (``CLOCK_MONOTONIC``); ``done_ns``: when
    the last response arrived.
    """

    sent: int = 0
    acked: int = 0
    errors: int = 0
    first_seq: int = 0
    last_seq: int = 0
    start_ns: int = 0
    stop_ns: int = 0
    done_ns: int = 0


class PublisherProcess:
    """One publishing connection, paced by rate or by the number of publishes in flight.

    Commands and replies:

    * ``("sync", timeout)``: wait until every publish sent so far is answered;
      replies ``{"last_seq", "unanswered"}``, the topic's last seq as far as known.
    * ``("run", mode, value, duration, drain_timeout)``: mode ``"rate"`` (value:
      events per second, open loop) or ``"max"`` (value: publishes in flight);
      publishes for ``duration`` s, then waits up to ``drain_timeout`` s for the
      answers; replies a :class:`PublishResult` as a dict.
    * ``("quit",)``: exit; no reply.
    """

    def __init__(self, pipe: Connection, host: str, port: int, path: str, topic: str, pad: int):
        self.pipe = pipe
        self.topic = topic
        self.pad = "x" * pad
        self.sock = self._connect(host, port, path)
        self.buf = b""
        self.out = bytearray()
        self.poller = select.poll()
        self.poller.register(self.sock.fileno(), select.POLLIN)
        self.sent = 0
        """Publishes sent on this connection; each one's requestId is its number."""
        self.answered = 0
        self.last_seq = 0
        self.result = PublishResult()
        self.first_id = 1
        """The requestId of the running phase's first publish (earlier answers are not its own)."""

    @staticmethod
    def _connect(host: str, port: int, path: str) -> socket.socket:
        sock = socket.create_connection((host, port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request, accept = upgrade_request(host, port, path)
        sock.sendall(request)
        data = b""
        while (head := upgrade_head_length(data, accept)) is None:
            chunk = sock.recv(4096)
            if not chunk:
                raise ProtocolError("closed during handshake")
            data += chunk
        if data[head:]:
            raise ProtocolError("unexpected data after the upgrade response")
        sock.setblocking(False)
        return sock

    def serve(self) -> None:
        """Run commands until ``quit`` or the pipe closes."""
        self.pipe.send("ready")
        while True:
            try:
                command = self.pipe.recv()
            except EOFError:
                return
            if command[0] == "sync":
                self._wait_answers(time.monotonic_ns() + int(command[1] * 1e9))
                unanswered = self.sent - self.answered
                self.pipe.send({"last_seq": self.last_seq, "unanswered": unanswered})
            elif command[0] == "run":
                _, mode, value, duration, drain_timeout = command
                self.pipe.send(vars(self.run(mode, value, duration, drain_timeout)))
            else:
                return

    def run(self, mode: str, value: float, duration: float, drain_timeout: float) -> PublishResult:
        """Publish for ``duration`` seconds, then wait up to ``drain_timeout`` for the answers."""
        result = self.result = PublishResult(start_ns=time.monotonic_ns())
        self.first_id = self.sent + 1
        stop = result.start_ns + int(duration * 1e9)
        while (now := time.monotonic_ns()) < stop:
            self._queue_publishes(mode, value, now)
            self._exchange(self._wait_ms(mode, value, now, stop))
        result.stop_ns = time.monotonic_ns()
        self._wait_answers(result.stop_ns + int(drain_timeout * 1e9))
        return result

    def _wait_answers(self, give_up_ns: int) -> None:
        while self.answered < self.sent and time.monotonic_ns() < give_up_ns:
            self._exchange(100)

    def _queue_publishes(self, mode: str, value: float, now: int) -> None:
        result = self.result
        if mode == "rate":
            due = int((now - result.start_ns) * value / 1e9) + 1
        else:
            due = result.acked + result.errors + int(value)
        while result.sent < due:
            self.sent += 1
            self.out += publish_frame(self.topic, self.sent, self.pad)
            result.sent += 1

    def _wait_ms(self, mode: str, value: float, now: int, stop: int) -> int:
        if mode == "rate":
            next_due = self.result.start_ns + int(self.result.sent * 1e9 / value)
            return max(0, min(100, (min(next_due, stop) - now) // 1_000_000))
        return 100

    def _exchange(self, timeout_ms: int) -> None:
        """Write what is queued, wait up to ``timeout_ms`` for the socket, read answers."""
        if self.out:
            with contextlib.suppress(BlockingIOError):  # the socket buffer is full: wait
                del self.out[: self.sock.send(self.out)]
        fd = self.sock.fileno()
        self.poller.modify(fd, select.POLLIN | (select.POLLOUT if self.out else 0))
        for _, events in self.poller.poll(timeout_ms):
            if events & (select.POLLIN | select.POLLERR | select.POLLHUP):
                self._receive()

    def _receive(self) -> None:
        try:
            chunk = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        if not chunk:
            raise ProtocolError("the server closed the publishing connection")
        data = self.buf + chunk
        pos = 0
        while (frame := next_frame(data, pos)) is not None:
            first, start, end = frame
            pos = end
            opcode = first & 0x0F
            if opcode == OP_PING:
                self.out += client_frame(OP_PONG, data[start:end])
            elif opcode == OP_CLOSE:
                raise ProtocolError("the server closed the publishing connection")
            elif opcode == OP_TEXT:
                self._answer(data, start, end)
        self.buf = data[pos:]

    def _answer(self, data: bytes, start: int, end: int) -> None:
        is_error = data.startswith(ERROR_PREFIX, start)
        if not (is_error or data.startswith(RESPONSE_PREFIX, start)):
            return
        self.answered += 1
        seq = 0 if is_error else int_after(data, SEQ_KEY, start, end)
        self.last_seq = max(self.last_seq, seq)
        if int_after(data, REQUEST_ID_KEY, start, end) < self.first_id:
            return  # a late answer to an earlier phase
        result = self.result
        result.done_ns = time.monotonic_ns()
        if is_error:
            result.errors += 1
            return
        result.acked += 1
        result.first_seq = min(result.first_seq or seq, seq)
        result.last_seq = max(result.last_seq, seq)


def publisher_main(
    pipe: Connection, host: str, port: int, path: str, topic: str, pad: int, cpu: int | None
) -> None:
    """Entry point of the publisher process (a :mod:`multiprocessing` target)."""
    pin_to_cpu(cpu)
    try:
        publisher = PublisherProcess(pipe, host, port, path, topic, pad)
    except (OSError, ProtocolError) as exc:
        pipe.send(f"error: {exc}")
        return
    publisher.serve()
