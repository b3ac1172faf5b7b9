"""The idempotency window: publications a node remembers by key, so retries publish once.

A publication that carries an idempotency key is looked up here before the
broker sequences it. A key seen within the window for the same (tenant,
topic) answers with the first publication's position and publishes nothing
(the payload must be the same: another payload under the same key is refused
with ``idempotency_conflict``, since a retry that changed what it publishes is
a bug the caller should hear about). Otherwise the broker publishes it and
:meth:`IdempotencyWindow.remember` records the position it got.

Each tenant has its own window, bounded by age (``window`` seconds), by count
(``max_keys``) and by bytes (``max_bytes``, an estimate per entry); when full,
its oldest keys are forgotten first. A forgotten key is simply unknown: a
retry under it after that publishes again. One tenant's keys never push out
another's.

This is the window of the memory backplane (and of a Redis node's ``local``
namespaces); with Redis, the publishing script keeps the same records in
Redis, for every node at once (:mod:`tidings.backplane.redis`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

import attrs

from ..errors import BrokerError
from ..protocol.codes import ErrorCode
from ..protocol.messages import Position

#: Bytes one remembered key costs beyond its strings: the dict slot, the
#: tuple key, the entry object and its fingerprint (measured roughly, so the
#: byte bound is an estimate of the real footprint, not an exact count).
ENTRY_OVERHEAD: Final = 240


@attrs.define(slots=True)
class _Entry:
    fingerprint: str
    seq: int
    epoch: str
    at: float
    size: int


class _TenantKeys:
    """One tenant's remembered keys, oldest first."""

    __slots__ = ("bytes", "entries")

    def __init__(self) -> None:
        self.entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self.bytes = 0

    def pop_oldest(self) -> None:
        _, entry = self.entries.popitem(last=False)
        self.bytes -= entry.size


class IdempotencyWindow:
    """Keys of recent publications, per tenant, bounded by age, count and bytes."""

    def __init__(
        self, window: float = 300.0, max_keys: int = 10_000, max_bytes: int = 4 * 1024 * 1024
    ) -> None:
        if window <= 0 or max_keys < 1 or max_bytes < 1:
            raise ValueError("window, max_keys and max_bytes must be positive")
        self.window = window
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self._tenants: dict[str, _TenantKeys] = {}
        self.replayed = 0
        """Publications answered from the window (retries that published nothing)."""
        self.conflicts = 0
        """Publications refused because their key was used with another payload."""
        self.evicted = 0
        """Keys forgotten before their window ended, to stay within the bounds."""

    def check(
        self, tenant: str, topic: str, key: str, fingerprint: str, now: float
    ) -> Position | BrokerError | None:
        """The first publication's position if ``key`` was seen (an error if with
        another payload), or None: publish it, then :meth:`remember` it."""
        keys = self._tenants.get(tenant)
        if keys is None:
            return None
        self._expire(keys, now)
        entry = keys.entries.get((topic, key))
        if entry is None:
            return None
        if entry.fingerprint != fingerprint:
            self.conflicts += 1
            return BrokerError(
                ErrorCode.IDEMPOTENCY_CONFLICT,
                f"idempotency key {key[:64]!r} was used for another payload on {topic[:64]!r}"
                f" within the last {self.window:g} s",
            )
        self.replayed += 1
        return Position(entry.seq, entry.epoch)

    def remember(
        self, tenant: str, topic: str, key: str, fingerprint: str, *, position: Position, now: float
    ) -> None:
        """Record the position a keyed publication got; evicts the oldest beyond the bounds."""
        keys = self._tenants.get(tenant)
        if keys is None:
            keys = self._tenants[tenant] = _TenantKeys()
        self._expire(keys, now)
        size = ENTRY_OVERHEAD + len(topic) + len(key) + len(position.epoch)
        previous = keys.entries.pop((topic, key), None)
        if previous is not None:  # an expired twin of the same key: replaced
            keys.bytes -= previous.size
        keys.entries[topic, key] = _Entry(fingerprint, position.seq, position.epoch, now, size)
        keys.bytes += size
        while len(keys.entries) > self.max_keys or keys.bytes > self.max_bytes:
            keys.pop_oldest()
            self.evicted += 1

    def sweep(self, now: float) -> None:
        """Forget expired keys of every tenant, and tenants with none left."""
        for tenant in list(self._tenants):
            keys = self._tenants[tenant]
            self._expire(keys, now)
            if not keys.entries:
                del self._tenants[tenant]

    def keys(self, tenant: str) -> int:
        """How many keys a tenant's window holds (expired ones not yet swept included)."""
        keys = self._tenants.get(tenant)
        return 0 if keys is None else len(keys.entries)

    def bytes(self, tenant: str) -> int:
        """The estimated bytes a tenant's window holds."""
        keys = self._tenants.get(tenant)
        return 0 if keys is None else keys.bytes

    def _expire(self, keys: _TenantKeys, now: float) -> None:
        # Entries are in the order they were remembered, and time only goes forward.
        cutoff = now - self.window
        entries = keys.entries
        while entries and next(iter(entries.values())).at <= cutoff:
            keys.pop_oldest()
