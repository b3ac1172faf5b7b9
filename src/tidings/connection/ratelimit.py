"""A token bucket: the per-connection limit on messages a client sends."""

from __future__ import annotations


class TokenBucket:
    """Allows ``rate`` messages per second on average and ``burst`` at once."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one; False means over the limit."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False
