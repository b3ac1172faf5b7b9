"""RFC 3339 timestamps, cheap enough to stamp every event."""

from __future__ import annotations

import time

_cached_second = -1
_cached_prefix = ""


def rfc3339_now(now: float | None = None) -> str:
    """The current UTC time as ``2026-03-23T10:00:00.123Z`` (millisecond precision).

    The date-and-second prefix is cached, so a burst of events within one second
    costs a division and a format each, not a calendar computation.
    """
    global _cached_second, _cached_prefix  # noqa: PLW0603 - a one-entry cache
    if now is None:
        now = time.time()
    second = int(now)
    if second != _cached_second:
        _cached_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _cached_second = second
    return f"{_cached_prefix}.{int((now - second) * 1000):03d}Z"
