"""A TCP proxy for tests that loses an answer on purpose.

It forwards every connection to a target port on 127.0.0.1. After
:meth:`CuttingProxy.cut_next_answer`, the next bytes the target sends on any
connection are thrown away and that connection is closed on both sides: the
request reached the server and was handled, the client never hears back. That
is the failure idempotency keys are for.
"""

from __future__ import annotations

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
