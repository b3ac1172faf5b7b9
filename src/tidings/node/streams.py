"""The node's HTTP streams: ``/sse`` (Server-Sent Events) and ``/stream`` (NDJSON).

A stream client is a real connection: it is admitted by :meth:`Server.admit`
like a WebSocket (draining, connection caps per node, address and tenant,
origin, token from ``?token=`` or ``Authorization``), runs the same nursery
with the same outbox, budgets and overflow policy, and subscribes through
the same broker. What is its own lives here:

* **at admission**, :meth:`StreamEndpoint.plan` reads the URL (topics, where
  to resume them, ``Last-Event-ID``) and checks each topic against the
  namespaces and the token, so a stream that cannot be served is refused
  with an HTTP status before its ``200``;
* **when it starts** (the endpoint's connect hook, inside the connection's
  nursery, before its writer runs), :meth:`StreamEndpoint.begin` subscribes
  it to every topic, queues for each topic that cannot be resumed an
  in-band ``reset`` ahead of what is replayed, and gives an SSE transport the
  stream's :class:`~tidings.protocol.sse.StreamIds`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Final

import attrs

from ..auth import Identity
from ..broker.namespaces import Namespaces
from ..connection.connection import Connection
from ..connection.endpoint import Endpoint
from ..connection.session import Session
from ..errors import BrokerError
from ..protocol.codes import CloseCode, ErrorCode
from ..protocol.messages import Position
from ..protocol.sse import (
    SSE,
    NdjsonDialect,
    Reset,
    SseDialect,
    StreamIds,
    StreamProblem,
    StreamRequest,
    parse_request,
)
from ..transport.base import Rejection, UpgradeRequest
from ..transport.sse import EventStream

LOGGER = logging.getLogger("tidings.streams")

#: Where a stream's plan waits, in its session's state, for the connect hook.
_PLAN: Final = "tidings.stream"
#: The reconnect delay a stream announces is ``retry`` times 1 to this.
RETRY_JITTER: Final = 1.5


@attrs.frozen(slots=True)
class StreamPlan:
    """An admitted stream: what to subscribe to, and the reconnect delay it announces."""

    request: StreamRequest
    retry_ms: int


class StreamEndpoint(Endpoint):
    """An HTTP stream path (``kind`` ``sse`` or ``ndjson``) of the node.

    Args:
        path: where it is served (``/sse``, ``/stream``).
        kind: its framing.
        retry: the reconnect delay announced to ``EventSource`` (seconds),
            spread by up to half again per stream so that the clients of a node
            that restarts do not all come back at once.
        max_topics: topics one stream may follow.
        connection_of: finds a running connection by id (the server's table).
    """

    def __init__(
        self,
        path: str,
        kind: str,
        *,
        retry: float,
        max_topics: int,
        connection_of: Callable[[str], Connection | None],
    ) -> None:
        super().__init__(path, SseDialect() if kind == SSE else NdjsonDialect())
        self.kind = kind
        self.retry = retry
        self.max_topics = max_topics
        self._connection_of = connection_of
        self.connect_hooks.append(self.begin)

    def plan(
        self, request: UpgradeRequest, identity: Identity, namespaces: Namespaces
    ) -> StreamPlan | Rejection:
        """Read the stream's URL and check each topic; a refusal if it cannot be served."""
        try:
            wanted = parse_request(
                request.query, request.header("last-event-id"), max_topics=self.max_topics
            )
        except StreamProblem as exc:
            return Rejection(400, exc.message, exc.code)
        for entry in wanted.topics:
            refusal = _refusal(entry.topic, identity, namespaces)
            if refusal is not None:
                return refusal
        retry = self.retry * random.uniform(1.0, RETRY_JITTER)  # a spread, not a secret
        return StreamPlan(wanted, max(1, round(retry * 1000)))

    def attach(self, session: Session, plan: StreamPlan) -> None:
        """Hand an admitted stream's plan to its connection (before it runs)."""
        session.state[_PLAN] = plan

    async def begin(self, session: Session) -> None:
        """Subscribe the stream to its topics (its connect hook)."""
        plan: StreamPlan | None = session.state.pop(_PLAN, None)
        connection = self._connection_of(session.id)
        if plan is None or connection is None:  # pragma: no cover - attach() always ran
            session.close(CloseCode.INTERNAL_ERROR, "stream not planned")
            return
        topics = [entry.topic for entry in plan.request.topics]
        ids: StreamIds | None = None
        transport = connection.transport
        if self.kind == SSE and isinstance(transport, EventStream):
            ids = StreamIds(topics, plan.retry_ms)
            transport.numbering = ids
            # First in the outbox: the retry and the starting id, written before
            # any event (they are filled in by begin() below, before the writer runs).
            connection.outbox.put(ids.preamble)
        starts: list[Position] = []
        broker, subscriber, outbox = connection.broker, connection.subscriber, connection.outbox
        tenant = connection.identity.tenant
        for entry in plan.request.topics:
            try:
                await broker.prepare(entry.topic, tenant)
                result = broker.subscribe(
                    subscriber, entry.topic, since=entry.since, epoch=entry.epoch
                )
            except BrokerError as exc:
                LOGGER.info("stream %s cannot follow %r: %s", session.id, entry.topic, exc.message)
                session.close(CloseCode.INTERNAL_ERROR, f"cannot follow {entry.topic!r}: {exc}")
                return
            # No await from here to the replay: the reset, the replay, then live events.
            replay = result.replay
            start = Position(result.position.seq - len(replay), result.position.epoch)
            if plan.request.unreadable_id or (entry.since is not None and not result.recovered):
                reset = self.dialect.encode_message(Reset(entry.topic, start))
                outbox.put(transport.framer(self.dialect.text)(reset))
            replay.queue(outbox, subscriber.encode)
            starts.append(start)
        if ids is not None:
            ids.begin(starts)


def _refusal(topic: str, identity: Identity, namespaces: Namespaces) -> Rejection | None:
    """Why a stream may not follow ``topic``: the checks a ``subscribe`` command gets
    (the topic's namespace, its allowed topics, the token's ``topics`` claim)."""
    namespace = namespaces.resolve(topic)
    if namespace is None:
        prefix = topic.partition(":")[0]
        return Rejection(
            404, f"namespace {prefix[:100]!r} is not configured", ErrorCode.UNKNOWN_NAMESPACE
        )
    if not namespace.topics.allows(topic):
        return Rejection(404, f"topic {topic[:100]!r} is not served here", ErrorCode.UNKNOWN_TOPIC)
    if not identity.subscribe.allows(topic):
        return Rejection(
            403, f"your token does not allow topic {topic[:100]!r}", ErrorCode.FORBIDDEN
        )
    return None
