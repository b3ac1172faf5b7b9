"""What the API's ``clients`` and ``topics`` methods ask of each node.

Each node answers a page-sized question: it filters its own clients (or
topics), sorts them, and returns the first ``top`` of them with how many
matched. The node that was called merges the nodes' answers, sorts again and
cuts the page out (:func:`merge_page`). So an answer costs each node one pass
over what it holds and at most ``top`` entries on the wire, whatever the
cluster's size, and pages are consistent across nodes because every node sorts
by the same key with the same tie-breaker.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, Final

from ..node.server import Server
from ..protocol.clock import rfc3339_now

#: Subscribed topics listed per client (``subscriptions`` counts them all).
TOPICS_PER_CLIENT: Final = 20

#: Fields ``clients`` may sort by, and the key each sorts on.
CLIENT_SORTS: Final = (
    "connectedAt",
    "client",
    "user",
    "tenant",
    "remote",
    "dialect",
    "subscriptions",
    "queued",
    "peakQueued",
    "queuedBytes",
    "dropped",
    "node",
)
#: Fields ``topics`` may sort by.
TOPIC_SORTS: Final = (
    "topic",
    "tenant",
    "subscribers",
    "seq",
    "history",
    "published",
    "delivered",
    "dropped",
    "node",
)
#: The field that breaks ties, so that pages do not overlap or skip.
_TIE: Final = {"clients": "client", "topics": "topic"}


def node_clients(server: Server, body: dict[str, Any]) -> dict[str, Any]:
    """This node's part of ``clients``: ``{"total", "clients"}`` (the first ``top``)."""
    needle = _text(body.get("filter")).lower()
    tenant = body.get("tenant")
    entries: list[dict[str, Any]] = []
    for info in server.clients():
        if isinstance(tenant, str) and info.tenant != tenant:
            continue
        stats = server.client_statistics(info.id)
        if stats is None:  # pragma: no cover - gone between the two calls (no await here)
            continue
        entry: dict[str, Any] = {
            "client": info.id,
            "node": server.node_id,
            "user": info.user,
            "tenant": info.tenant,
            "remote": info.remote,
            "dialect": info.dialect,
            "path": info.path,
            "connectedAt": rfc3339_now(info.connected_at),
            "subscriptions": stats.subscriptions,
            "queued": stats.queued,
            # The outbox notes its peak when it is drained; one that is stuck
            # holds more now than it has noted.
            "peakQueued": max(stats.peak_queued, stats.queued),
            "queuedBytes": stats.queued_bytes,
            "dropped": stats.dropped,
        }
        if needle and not _matches(needle, entry, server.client_topics(info.id) or ()):
            continue
        entries.append(entry)
    page = _top(entries, body, "clients")
    for entry in page:
        topics = server.client_topics(entry["client"]) or []
        entry["topics"] = topics[:TOPICS_PER_CLIENT]
    return {"total": len(entries), "clients": page}


def node_topics(server: Server, body: dict[str, Any]) -> dict[str, Any]:
    """This node's part of ``topics``: ``{"total", "topics"}`` (the first ``top``)."""
    needle = _text(body.get("filter")).lower()
    tenant = body.get("tenant")
    entries = [
        {
            "topic": stats.name,
            "tenant": stats.tenant,
            "node": server.node_id,
            "subscribers": stats.subscribers,
            "seq": stats.seq,
            "epoch": stats.epoch,
            "history": stats.history,
            "published": stats.published,
            "delivered": stats.delivered,
            "dropped": stats.dropped,
        }
        for stats in server.broker.topics(tenant if isinstance(tenant, str) else None)
        if not needle or needle in stats.name.lower()
    ]
    page = _top(entries, body, "topics")
    now = datetime.now().astimezone()
    for entry in page:
        # Only for the page: reading the oldest retained event is a lookup per topic.
        events, _ = server.broker.history(entry["topic"], 0, 1, entry["tenant"])
        entry["historyAge"] = _age(events[0].timestamp, now) if events else None
    return {"total": len(entries), "topics": page}


def merge_page(
    answers: Iterable[Any], kind: str, body: dict[str, Any], offset: int, limit: int
) -> tuple[int, list[dict[str, Any]]]:
    """The nodes' answers to ``clients`` or ``topics`` as one page: (total, entries)."""
    total = 0
    merged: list[dict[str, Any]] = []
    for answer in answers:
        if not isinstance(answer, dict):  # a node that does not know the question
            continue
        total += int(answer.get("total") or 0)
        merged.extend(entry for entry in answer.get(kind) or () if isinstance(entry, dict))
    return total, _sorted(merged, body, kind)[offset : offset + limit]


def _top(entries: list[dict[str, Any]], body: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    top = body.get("top")
    count = top if isinstance(top, int) and top > 0 else 0
    return _sorted(entries, body, kind)[:count]


def _sorted(entries: list[dict[str, Any]], body: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    field = str(body.get("sort") or _TIE[kind])
    tie = _TIE[kind]

    def key(entry: dict[str, Any]) -> tuple[Any, ...]:
        return (
            *_comparable(entry.get(field)),
            *_comparable(entry.get("node")),
            *_comparable(entry.get("tenant")),
            *_comparable(entry.get(tie)),
        )

    return sorted(entries, key=key, reverse=body.get("order") == "desc")


def _comparable(value: Any) -> tuple[int, Any]:
    """Values of one field compare whatever they are: None first, then numbers, then text."""
    if value is None:
        return (0, 0)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (1, value)
    return (2, str(value))


def _matches(needle: str, entry: dict[str, Any], topics: Iterable[str]) -> bool:
    for name in ("client", "user", "tenant", "remote", "dialect", "path"):
        value = entry.get(name)
        if isinstance(value, str) and needle in value.lower():
            return True
    return any(needle in topic.lower() for topic in topics)


def _age(timestamp: str, now: datetime) -> float | None:
    try:
        then = datetime.fromisoformat(timestamp)
    except ValueError:
        return None
    return round(max((now - then).total_seconds(), 0.0), 3)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""
