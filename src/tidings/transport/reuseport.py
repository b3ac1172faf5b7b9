"""Listening sockets that several processes share (``SO_REUSEPORT``), for workers.

:func:`trio.open_tcp_listeners` without the option it cannot set: each worker
of ``tidings serve --workers N`` binds the same address, and the kernel spreads
incoming connections over their sockets (Linux balances them by a hash of the
connection's addresses).
"""

from __future__ import annotations

import socket

import trio


async def open_reuse_port_listeners(
    port: int, *, host: str, backlog: int
) -> list[trio.SocketListener]:
    """Listeners on every address of ``host`` at ``port``, with SO_REUSEPORT set.

    Raises:
        OSError: the address cannot be bound (another user holds it, or no such host).
    """
    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners: list[trio.SocketListener] = []
    try:
        for family, kind, proto, _, address in infos:
            sock = trio.socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(address)
                sock.listen(backlog)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            await listener.aclose()
        raise
    return listeners
