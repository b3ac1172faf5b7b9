"""A small real HTTP server playing the application's backend for proxy hook tests.

It listens on 127.0.0.1 (h11 over Trio, keep-alive, in the test's own Trio
run) and answers each POST with what the test's function for that path
returns: a JSON answer, or one of the misbehaviours below. Every call is
recorded with its headers and JSON body, and the server counts how many calls
it holds at once, so a test can see the node's bound on calls in flight.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import h11
import orjson
import trio


@attrs.define
class Call:
    path: str
    headers: dict[str, str]
    """Lower-case names; a repeated header joined with ', '."""
    body: Any
    nth: int = 1
    """Which request of its (kept-alive) connection this is."""


@attrs.frozen
class Raw:
    """An answer as given: status, body, headers."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


@attrs.frozen
class Hold:
    """Hold the call until ``release`` is set (or forever), then answer ``then``."""

    release: trio.Event | None = None
    then: Any = attrs.field(factory=lambda: {"result": {}})


@attrs.frozen
class Flood:
    """Announce ``size`` bytes and send zeros until the client stops reading."""

    size: int


@attrs.frozen
class HangUp:
    """Close the connection without answering."""


Handler = Callable[[Call], Awaitable[Any]]


class Backend:
    """The application's hook endpoints: ``handlers`` by path."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}
        self.calls: list[Call] = []
        self.port = 0
        self.holding = 0
        """Calls held now (by :class:`Hold`)."""
        self.peak = 0
        """The most calls held at once."""
        self.flooded = 0
        """Bytes a :class:`Flood` managed to send before the client went away."""
        self.flood_done = trio.Event()
        self._changed = trio.Event()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def on(self, path: str, answer: Any) -> None:
        """Answer every call to ``path`` with ``answer`` (a function of the call, or a value)."""

        async def handler(call: Call) -> Any:
            if not callable(answer):
                return answer
            result = answer(call)
            return await result if inspect.isawaitable(result) else result

        self.handlers[path] = handler

    def calls_to(self, path: str) -> list[Call]:
        return [call for call in self.calls if call.path == path]

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Return once ``condition()`` holds (it is checked whenever a call comes or goes)."""
        while not condition():
            await self._changed.wait()

    def _note(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        http = h11.Connection(h11.SERVER)
        nth = 0
        try:
            while True:
                request, body = await _read_request(stream, http)
                if request is None:
                    return
                nth += 1
                call = Call(
                    request.target.decode(),
                    _headers(request.headers),
                    orjson.loads(body) if body else None,
                    nth,
                )
                self.calls.append(call)
                self._note()
                handler = self.handlers.get(call.path)
                answer: Any = Raw(404, b"{}") if handler is None else await handler(call)
                if isinstance(answer, Hold):
                    answer = await self._hold(answer)
                if isinstance(answer, HangUp):
                    return
                if isinstance(answer, Flood):
                    await self._flood(stream, http, answer.size)
                    return
                if not isinstance(answer, Raw):
                    answer = Raw(200, orjson.dumps(answer))
                await _respond(stream, http, answer)
                if http.our_state is h11.MUST_CLOSE:
                    return
                http.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    async def _hold(self, hold: Hold) -> Any:
        self.holding += 1
        self.peak = max(self.peak, self.holding)
        self._note()
        try:
            if hold.release is None:
                await trio.sleep_forever()
            else:
                await hold.release.wait()
        finally:
            self.holding -= 1
            self._note()
        return hold.then

    async def _flood(self, stream: trio.SocketStream, http: h11.Connection, size: int) -> None:
        head = h11.Response(
            status_code=200,
            headers=[("content-type", "application/json"), ("content-length", str(size))],
        )
        await stream.send_all(http.send(head))
        chunk = b" " * 65536
        try:
            while self.flooded < size:
                await stream.send_all(chunk)
                self.flooded += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.flood_done.set()


@asynccontextmanager
async def running_backend() -> AsyncIterator[Backend]:
    """A backend listening on 127.0.0.1 for the block."""
    backend = Backend()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, backend._serve_connection, 0, host="127.0.0.1")
        )
        backend.port = listeners[0].socket.getsockname()[1]
        try:
            yield backend
        finally:
            nursery.cancel_scope.cancel()


async def _read_request(
    stream: trio.SocketStream, http: h11.Connection
) -> tuple[h11.Request | None, bytes]:
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = http.next_event()
        if event is h11.NEED_DATA:
            http.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return request, bytes(body)
        else:  # closed
            return None, b""


async def _respond(stream: trio.SocketStream, http: h11.Connection, answer: Raw) -> None:
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(answer.body))),
        *answer.headers,
    ]
    data = http.send(h11.Response(status_code=answer.status, headers=headers))
    data += http.send(h11.Data(data=answer.body))
    data += http.send(h11.EndOfMessage())
    await stream.send_all(data)


def _headers(pairs: list[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in pairs:
        key, text = name.decode().lower(), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers
