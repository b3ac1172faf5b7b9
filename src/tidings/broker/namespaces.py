"""Namespaces: per-family-of-topics settings, chosen by the topic's prefix.

A topic ``chat:lobby`` belongs to namespace ``chat``; a topic without a colon
belongs to the default namespace, whose settings are the node's top-level
ones. A named namespace inherits every setting it does not set from the
default namespace.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from ..protocol.topics import TopicFilter
from .outbox import OverflowPolicy

SEPARATOR = ":"


@attrs.frozen(kw_only=True)
class Namespace:
    """What applies to every topic of one namespace."""

    name: str
    """The prefix before ``:``; empty for the default namespace."""
    history_size: int = 1000
    history_ttl: float = 300.0
    history_max_bytes: int = 16 * 1024 * 1024
    """Bytes one topic's history may hold (see :func:`~tidings.broker.history.event_size`);
    0: no byte bound of its own."""
    publish: bool | None = None
    """May clients publish? None: yes without authentication; with tokens, their
    ``publish`` claim decides. True: any client may. False: none may."""
    presence: bool = False
    """Whether clients may ask who is subscribed."""
    join_leave: bool = False
    """Whether subscribers receive ``join``/``leave`` messages."""
    overflow_policy: OverflowPolicy = OverflowPolicy.DROP
    outbox_size: int = 256
    """Queued messages past which this namespace's events meet the overflow policy."""
    topics: TopicFilter = attrs.field(factory=TopicFilter)
    """Allowed topic patterns (whole topic names, prefix included); empty allows all."""
    local: bool = False
    """With a backplane: this node's own topics, sequenced and kept here, never
    shared (a node's periodic status broadcasts, for example)."""
    compression: bool = True
    """Whether events are compressed for WebSocket clients that negotiated
    permessage-deflate (off: already compressed payloads, tiny events)."""


class Namespaces:
    """Finds the namespace of a topic."""

    __slots__ = ("_allow_unknown", "_named", "default")

    def __init__(
        self,
        default: Namespace | None = None,
        named: Mapping[str, Namespace] | None = None,
        *,
        allow_unknown: bool = False,
    ) -> None:
        self.default = default or Namespace(name="")
        self._named = dict(named or {})
        self._allow_unknown = allow_unknown

    def resolve(self, topic: str) -> Namespace | None:
        """The namespace of ``topic``, or None if it names one that does not exist."""
        name, separator, _ = topic.partition(SEPARATOR)
        if not separator:
            return self.default
        namespace = self._named.get(name)
        if namespace is None and self._allow_unknown:
            return self.default
        return namespace

    def named(self) -> list[Namespace]:
        """The configured namespaces other than the default one."""
        return list(self._named.values())
