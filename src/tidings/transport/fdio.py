"""Reads and writes on a connection's non-blocking descriptor, shared by every
transport that uses its socket directly (WebSocket and the HTTP streams).

A batch goes out in one ``write(2)``, which almost always takes it all; what
it does not take is written as the socket drains, the timeout bounding a
stall (no byte taken), not the whole write. Reading is a plain function, the
wait left to the caller: a helper coroutine would be one more frame held by
every idle connection for as long as it waits.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import trio

from .base import ConnectionLost, WriteTimeout


def read_now(fd: int, size: int) -> bytes | None:
    """What the socket holds, up to ``size`` bytes; None when it holds nothing yet.

    Raises:
        ConnectionLost: the peer is gone (an error, or the end of the stream).
    """
    try:
        data = os.read(fd, size)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise ConnectionLost from exc
    if not data:
        raise ConnectionLost
    return data


def write_now(fd: int, data: bytes) -> memoryview | None:
    """Write what the socket takes at once; the rest, or None when it took it all.

    Raises:
        ConnectionLost: the peer is gone.
    """
    try:
        sent = os.write(fd, data)
    except BlockingIOError:
        sent = 0
    except OSError as exc:
        raise ConnectionLost from exc
    return memoryview(data)[sent:] if sent < len(data) else None


async def write_rest(
    fd: int, rest: memoryview, write_timeout: float, closed: Callable[[], bool]
) -> None:
    """Write ``rest`` as the socket drains.

    Raises:
        WriteTimeout: the peer took nothing for ``write_timeout``.
        ConnectionLost: the peer is gone, or ``closed()`` says the stream was closed.
    """
    while rest:
        # The timeout is for a stall: renewed whenever the peer takes something.
        with trio.move_on_after(write_timeout) as waited:
            await trio.lowlevel.wait_writable(fd)
        if waited.cancelled_caught:
            raise WriteTimeout
        if closed():
            raise ConnectionLost
        try:
            rest = rest[os.write(fd, rest) :]
        except BlockingIOError:
            continue
        except OSError as exc:
            raise ConnectionLost from exc
