"""Writes on a connection's non-blocking descriptor, shared by every transport
that writes its socket directly (WebSocket and the HTTP streams).

A batch goes out in one ``write(2)``, which almost always takes it all; what
it does not take is written as the socket drains, the timeout bounding a
stall (no byte taken), not the whole write.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import trio

from .base import ConnectionLost, WriteTimeout


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
