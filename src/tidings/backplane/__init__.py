"""Backplanes: how several nodes share topics, history and presence.

``memory`` (the default) is no backplane at all: the broker sequences events
itself and the node stands alone. ``redis://``, ``redis+cluster://`` and
``redis+sentinel://`` URLs select :class:`~tidings.backplane.redis.RedisBackplane`.
"""

from __future__ import annotations

from .url import parse_url, redacted

__all__ = ["parse_url", "redacted"]
