"""Who pays for the broker's memory: per-tenant and node-wide quotas of topics
and history bytes.

Every topic belongs to a tenant, and its topics and their history are charged
to that tenant's :class:`Ledger` and to the node's. A ledger at its limit makes
room from its *own* least recently used topics first:

* **topics**: a new topic takes the place of the tenant's least recently
  published topic that nobody subscribes to (its history goes with it, and a
  client resuming it learns so from a new epoch); only when every topic of
  the tenant is in use is the new one refused (``too_many_topics``);
* **history bytes**: an append past the limit trims the oldest events of the
  tenant's least recently appended topics.

So one tenant at its quota affects only itself. The node's own limits
(``max_topics``, ``history_node_bytes``) are the last line, shared by all.
Trusted publishers (the HTTP API, in-process code) are exempt from the
tenant's topic quota, not from the node's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Ledger(Generic[K, V]):
    """What one tenant (or the node) holds, its limits, and its topics in LRU order."""

    __slots__ = ("history_bytes", "lru", "max_history_bytes", "max_topics")

    def __init__(self, max_topics: int = 0, max_history_bytes: int = 0) -> None:
        self.max_topics = max_topics
        """Topics it may hold; 0: no limit of its own."""
        self.max_history_bytes = max_history_bytes
        """Bytes its topics' history may hold; 0: no limit of its own."""
        self.history_bytes = 0
        self.lru: OrderedDict[K, V] = OrderedDict()
        """Its topics, least recently used first."""

    @property
    def topics(self) -> int:
        return len(self.lru)

    def full(self) -> bool:
        """Whether a new topic needs room first."""
        return bool(self.max_topics) and len(self.lru) >= self.max_topics

    def over_history(self) -> bool:
        return bool(self.max_history_bytes) and self.history_bytes > self.max_history_bytes

    def add(self, key: K, value: V) -> None:
        self.lru[key] = value

    def touch(self, key: K) -> None:
        """The topic was used: it moves to the back of the eviction line."""
        self.lru.move_to_end(key)

    def remove(self, key: K) -> None:
        self.lru.pop(key, None)

    def evict_one(self, evictable: Callable[[V], bool], evict: Callable[[K], None]) -> bool:
        """Evict the least recently used topic that ``evictable`` allows.

        Topics that are not evictable (in use) move to the back as they are
        passed over, so repeated calls do not scan them again and again.
        Returns False if no topic could be evicted.
        """
        for _ in range(len(self.lru)):
            key, value = next(iter(self.lru.items()))
            if evictable(value):
                evict(key)
                return True
            self.lru.move_to_end(key)
        return False
