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
        )
