"""The pinger: a connection's clock.

It sleeps until the next thing that is due for its client, then does it:

* a ping every ``ping_interval`` (a WebSocket ping, or the endpoint's own ping
  frame for protocols whose clients expect one);
* the read timeout: a client silent for ``read_timeout`` is closed (1011);
* the token's expiry: an expired token closes the connection (4002) unless it
  was refreshed; with a refresh hook, the hook is asked a little before;
* the connect deadline, for protocols that authenticate after the upgrade
  (Centrifugo's ``connect``): a client that has not done so within
  ``connect_timeout`` is closed; nothing it sends before counts as activity;
* one log line per interval for a client that is dropping events, not one
  per event.

It sleeps on the node's :class:`~tidings.connection.alarms.AlarmClock`
rather than ``trio.sleep``: an idle connection's pinger then holds no cancel
scope of its own.
"""

from __future__ import annotations

import logging
from time import time as _wall_now
from typing import Protocol

import trio

from ..app import ClientInfo
from ..auth import Identity
from ..broker.outbox import Outbox
from ..protocol.codes import CloseCode
from ..stats import NodeCounters
from ..transport.base import Outgoing, PingFrame, Transport
from .alarms import AlarmClock
from .limits import ConnectionLimits

LOGGER = logging.getLogger("tidings.connection")


class Pingable(Protocol):
    """What the pinger needs of its connection."""

    @property
    def outbox(self) -> Outbox[Outgoing]: ...
    @property
    def transport(self) -> Transport: ...
    @property
    def limits(self) -> ConnectionLimits: ...
    @property
    def identity(self) -> Identity: ...
    @property
    def info(self) -> ClientInfo: ...
    @property
    def counters(self) -> NodeCounters: ...
    @property
    def app_ping(self) -> Outgoing | None:
        """The endpoint's own ping frame, framed; None: WebSocket pings."""

    @property
    def connect_deadline(self) -> float | None:
        """When the client must have authenticated by (None: it has, or need not)."""

    @property
    def connect_timeout_code(self) -> int:
        """The close code for a client that did not authenticate in time."""

    @property
    def refresh_due_in(self) -> float | None:
        """Seconds until the refresh hook should extend the session (None: never)."""

    def refresh_session(self) -> None:
        """Ask the refresh hook to extend the session (without waiting for it)."""

    def close(self, code: int, reason: str, *, flush: bool = True) -> None: ...


async def run_pinger(connection: Pingable, alarms: AlarmClock) -> None:
    """Keep the connection's deadlines until it is cancelled."""
    limits = connection.limits
    transport = connection.transport
    outbox = connection.outbox
    interval = limits.ping_interval
    app_ping = connection.app_ping
    watch_silence = transport.supports_ping or app_ping is not None
    next_ping = trio.current_time() + interval
    reported = 0
    while True:
        if outbox.closing is not None:
            # The writer finishes the close; the nursery ends this task with it.
            await trio.sleep_forever()
        deadline = next_ping
        if watch_silence:
            deadline = min(deadline, transport.last_received + limits.read_timeout)
        expires = connection.identity.expires_at
        if expires is not None:
            # Wall-clock expiry, on Trio's clock: checked again when it comes.
            deadline = min(deadline, trio.current_time() + max(expires - _wall_now(), 0.0))
        connect_by = connection.connect_deadline
        if connect_by is not None:
            deadline = min(deadline, connect_by)
        refresh_in = connection.refresh_due_in
        if refresh_in is not None:
            deadline = min(deadline, trio.current_time() + refresh_in)
        await alarms.sleep_until(deadline)
        if outbox.closing is not None:
            continue
        now = trio.current_time()
        connection.counters.outbox_depth.observe(len(outbox))
        dropped = outbox.dropped
        if dropped > reported:  # one line per wake at most, not per event
            LOGGER.warning(
                "client %s is not keeping up: %d events dropped (%d in all)",
                connection.info.id,
                dropped - reported,
                dropped,
                extra={"event": "overflow", "client": connection.info.id, "dropped": dropped},
            )
            reported = dropped
        expires = connection.identity.expires_at
        if expires is not None and expires <= _wall_now():
            LOGGER.info("closing %s: its token expired", connection.info.id)
            connection.close(CloseCode.TOKEN_EXPIRED, "token expired", flush=False)
            continue
        if connection.refresh_due_in == 0.0:
            connection.refresh_session()
        connect_by = connection.connect_deadline
        if connect_by is not None and now >= connect_by:
            LOGGER.info(
                "closing %s: no connect within %.1f s", connection.info.id, limits.connect_timeout
            )
            connection.close(connection.connect_timeout_code, "connect timeout", flush=False)
            continue
        if watch_silence and now - transport.last_received >= limits.read_timeout:
            LOGGER.info("closing %s: silent for %.1f s", connection.info.id, limits.read_timeout)
            connection.close(CloseCode.INTERNAL_ERROR, "read timeout", flush=False)
            continue
        if now >= next_ping:
            if app_ping is not None:
                outbox.put_control(app_ping)
            elif transport.supports_ping:
                outbox.put_control(transport.frame_control(PingFrame()))
            next_ping = now + interval
