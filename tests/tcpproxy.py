"""TCP proxies for tests that lose answers and connections on purpose.

Both forward every connection to a target port on 127.0.0.1. After
:meth:`CuttingProxy.cut_next_answer`, the next bytes the target sends on any
connection are thrown away and that connection is closed on both sides: the
request reached the server and was handled, the client never hears back. That
is the failure idempotency keys are for. :class:`SwitchingProxy` is a network
that goes away and comes back: what a browser's reconnect is for.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import trio


class CuttingProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.cuts = 0
        """Answers thrown away so far."""
        self._cut = False
        self._cut_done = trio.Event()

    def cut_next_answer(self) -> None:
        self._cut = True
        self._cut_done = trio.Event()

    async def wait_cut(self) -> None:
        """Return once the answer asked for by :meth:`cut_next_answer` was thrown away."""
        await self._cut_done.wait()

    async def _pipe(
        self, source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope, up: bool
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                if not up and self._cut:
                    self._cut = False
                    self.cuts += 1
                    self._cut_done.set()
                    break
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            except OSError:
                return
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe, client, upstream, nursery.cancel_scope, True)
                nursery.start_soon(self._pipe, upstream, client, nursery.cancel_scope, False)


@asynccontextmanager
async def cutting_proxy(target_port: int) -> AsyncIterator[CuttingProxy]:
    """A :class:`CuttingProxy` listening on a free port of 127.0.0.1 for the block."""
    proxy = CuttingProxy(target_port)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), proxy._handle, 0)
        proxy.port = listeners[0].socket.getsockname()[1]
        yield proxy
        nursery.cancel_scope.cancel()


class SwitchingProxy:
    """A TCP proxy that can be switched off and on, as a network that fails.

    :meth:`cut` drops every connection it carries (both sides closed at once,
    as a lost network would look to the server and the browser) and refuses new
    ones, closing them unanswered, until :meth:`restore`. It counts the bytes
    each way and keeps the head of every request it forwarded, so a test can
    see what a browser sent when it reconnected (``Last-Event-ID``) and how many
    bytes crossed the wire.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.up = True
        self.requests: list[bytes] = []
        """The first bytes (up to the end of the head) of each forwarded connection."""
        self.to_client = 0
        self.to_server = 0
        self._live: set[trio.CancelScope] = set()

    def cut(self) -> None:
        self.up = False
        for scope in list(self._live):
            scope.cancel()

    def restore(self) -> None:
        self.up = True

    def headers_of(self, index: int) -> dict[str, str]:
        lines = self.requests[index].decode("latin-1").split("\r\n")[1:]
        return {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines)
            if name
        }

    async def _pipe(self, source: trio.SocketStream, sink: trio.SocketStream, up: bool) -> None:
        head = bytearray()
        try:
            while data := await source.receive_some(65536):
                if up:
                    self.to_server += len(data)
                    if len(head) < 16384 and b"\r\n\r\n" not in head:
                        head += data
                        if b"\r\n\r\n" in head:
                            self.requests.append(bytes(head).partition(b"\r\n\r\n")[0])
                else:
                    self.to_client += len(data)
                await sink.send_all(data)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await sink.send_eof()  # a response that ended: the other side sees its end
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            if not self.up:
                return  # refused: closed before a byte is answered
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            except OSError:
                return
            async with upstream:
                with trio.CancelScope() as scope:
                    self._live.add(scope)
                    try:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._pipe, client, upstream, True)
                            nursery.start_soon(self._pipe, upstream, client, False)
                    finally:
                        self._live.discard(scope)
                if not scope.cancelled_caught:
                    return
                # Cut: lost, not closed politely (a reset, as a network that fails).
                for stream in (client, upstream):
                    with contextlib.suppress(OSError):
                        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                 struct.pack("ii", 1, 0))  # fmt: skip


@asynccontextmanager
async def switching_proxy(target_port: int) -> AsyncIterator[SwitchingProxy]:
    """A :class:`SwitchingProxy` listening on a free port of 127.0.0.1 for the block."""
    proxy = SwitchingProxy(target_port)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), proxy._handle, 0)
        proxy.port = listeners[0].socket.getsockname()[1]
        yield proxy
        nursery.cancel_scope.cancel()
