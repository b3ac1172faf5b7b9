"""The limits one connection lives under: timeouts, queue bounds, rates."""

from __future__ import annotations

import attrs

from ..broker.outbox import OverflowPolicy
from ..config import Config


@attrs.frozen(kw_only=True)
class ConnectionLimits:
    """The per-connection limits of :class:`~tidings.Config`.

    An endpoint may replace some of them for its own path
    (:class:`~tidings.Endpoint` ``limits``).
    """

    ping_interval: float = 30.0
    read_timeout: float = 60.0
    write_timeout: float = 10.0
    close_timeout: float = 2.0
    outbox_size: int = 256
    overflow_policy: OverflowPolicy = OverflowPolicy.DROP
    max_subscriptions: int = 1000
    max_pending_requests: int = 16
    request_timeout: float = 10.0
    rate_limit: float = 0.0
    """Messages per second a client may send; 0 is no limit."""
    rate_burst: float = 0.0
    rate_limit_violations: int = 10
    """Messages over the limit before the connection is closed (4029); 0 never."""
    max_queued_bytes: int = 1024 * 1024
    """The byte budget of everything queued toward the client (see :mod:`tidings.broker.outbox`)."""
    connect_timeout: float = 10.0
    """For protocols that authenticate after the upgrade: time allowed to do so."""
    history_max_reply: int = 100
    """Events one answer may carry (a history, a recovery inside a subscribe reply)."""
    presence_max_reply: int = 1000
    """Clients one presence answer may list."""
    write_delay: float = 0.0
    """Seconds the writer waits, once woken, to gather more into one write; 0: none."""

    @classmethod
    def from_config(cls, config: Config) -> ConnectionLimits:
        """The limits a node's configuration sets for its connections."""
        return cls(
            ping_interval=config.ping_interval,
            read_timeout=config.read_timeout,
            write_timeout=config.write_timeout,
            close_timeout=config.close_timeout,
            outbox_size=config.outbox_size,
            overflow_policy=config.overflow_policy,
            max_subscriptions=config.max_subscriptions,
            max_pending_requests=config.max_pending_requests,
            request_timeout=config.request_timeout,
            rate_limit=config.rate_limit / config.rate_period,
            rate_burst=config.rate_burst or config.rate_limit,
            rate_limit_violations=config.rate_limit_violations,
            max_queued_bytes=config.max_queued_bytes,
            connect_timeout=config.connect_timeout,
            history_max_reply=config.history_max_reply,
            presence_max_reply=config.presence_max_reply,
            write_delay=config.write_delay,
        )


class TenantSeats:
    """Connections per tenant on one node, within ``limit`` (0: no limit).

    Taken at the upgrade; moved when a protocol establishes the client's
    identity later (Centrifugo's ``connect``); given back when it ends.
    """

    __slots__ = ("_held", "limit")

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self._held: dict[str, int] = {}

    def held(self, tenant: str) -> int:
        return self._held.get(tenant, 0)

    def take(self, tenant: str) -> bool:
        """Take a seat for ``tenant``; False if it holds its limit already."""
        held = self._held.get(tenant, 0)
        if self.limit and held >= self.limit:
            return False
        self._held[tenant] = held + 1
        return True

    def give_back(self, tenant: str) -> None:
        left = self._held.pop(tenant, 1) - 1
        if left > 0:
            self._held[tenant] = left

    def move(self, old: str, new: str) -> bool:
        """Move a seat from ``old`` to ``new``; False (nothing moved) if ``new`` is full."""
        if old == new:
            return True
        if not self.take(new):
            return False
        self.give_back(old)
        return True
