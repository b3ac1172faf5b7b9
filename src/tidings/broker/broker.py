"""The broker: one task that sequences events and fans them out.

Publishers hand events to the broker through a bounded inbox; the broker task
stamps each with its topic's next offset, appends it to the topic's history,
encodes it once per dialect and offers the frame to every subscriber's outbox.
It never awaits a subscriber: a full outbox is that subscriber's problem
(:class:`~tidings.broker.outbox.OverflowPolicy`).

Topics belong to a tenant: the same name in two tenants is two topics, and
nothing a client of one tenant does can reach the other's. Each topic's
namespace (``chat:`` in ``chat:lobby``) sets its history, its overflow limits
and whether subscribers hear who joins and leaves.

Subscribing and unsubscribing are synchronous methods. Under Trio only one
task runs at a time, so a synchronous call is atomic with respect to fan-out:
``subscribe`` registers the subscriber and reads the replay from history with
no event slipping in between, which is what makes resume gap-free and
duplicate-free.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterator, Sequence
from enum import StrEnum
from typing import Any, Final

import attrs
import orjson
import trio

from ..errors import BrokerError
from ..protocol.clock import rfc3339_now
from ..protocol.codes import ErrorCode
from ..protocol.idempotency import fingerprint
from ..protocol.messages import ClientInfo, Event, Position, PresenceChange
from .backplane import Backplane, Publication
from .history import History
from .idempotency import IdempotencyWindow
from .namespaces import Namespace, Namespaces
from .outbox import Outbox, Replay
from .quotas import Ledger
from .subscription import as_event

LOGGER = logging.getLogger("tidings.broker")

#: How often idle topics and expired history are swept, at most.
MAX_SWEEP_INTERVAL: Final = 10.0
#: Forgotten topics whose position the node remembers (see Broker._remember):
#: a few hundred bytes each, the oldest let go first beyond this.
MAX_REMEMBERED: Final = 16_384
#: Publications sequenced per wake-up of the broker task. Fanning out a batch
#: before yielding lets each writer find several frames queued and send them in
#: one write; the cap keeps one wake-up's latency bounded.
MAX_BATCH: Final = 64

Encoder = Callable[[Event], Any]
"""Turns an event into what a subscriber's outbox carries (a frame, or the event itself)."""


DEFAULT_TENANT: Final = "default"

PresenceEncoder = Callable[[PresenceChange], Any]


class Subscriber:
    """One consumer of topics: a WebSocket connection or an in-process subscription."""

    __slots__ = (
        "encode",
        "encode_presence",
        "label",
        "max_topics",
        "outbox",
        "presence",
        "tenant",
        "topics",
    )

    def __init__(
        self,
        outbox: Outbox[Any],
        encode: Encoder,
        *,
        tenant: str = DEFAULT_TENANT,
        max_topics: int = 1000,
        label: str = "",
        presence: ClientInfo | None = None,
        encode_presence: PresenceEncoder | None = None,
    ) -> None:
        self.outbox = outbox
        self.encode = encode
        self.tenant = tenant
        self.max_topics = max_topics
        self.label = label
        self.presence = presence
        """What others see of this subscriber in presence (None: it is not listed)."""
        self.encode_presence = encode_presence
        """Encodes join/leave messages for it (None: it does not receive them)."""
        self.topics: set[str] = set()
        """Names of the topics this subscriber is subscribed to (kept by the broker)."""


class HistoryReplay(Replay[Any]):
    """The events a resume must replay, read from the topic's history when wanted.

    Made by :meth:`Broker.subscribe`; it holds no event, only where the replay
    starts and ends. Queue it in the subscriber's outbox with an encoder
    (:meth:`queue`), and the writer pulls the frames as the client's budget
    allows; or take the events at once (:meth:`events`) where a protocol puts
    them in its subscribe reply.
    """

    __slots__ = ("_encode", "_next", "_topic", "epoch", "last")

    def __init__(self, topic: _Topic | None, first: int, last: int) -> None:
        self._topic = topic
        self._next = first
        self.last = last
        self.epoch = topic.epoch if topic is not None else ""
        self._encode: Encoder | None = None

    def __len__(self) -> int:
        """How many events the replay carries."""
        return max(0, self.last - self._next + 1)

    @property
    def done(self) -> bool:
        return self._next > self.last

    def events(self, limit: int | None = None) -> list[Event]:
        """The events, read now (at most ``limit``); the cursor does not move."""
        topic = self._topic
        if topic is None or self.done:
            return []
        count = len(self) if limit is None else min(len(self), limit)
        events, _ = topic.history.after(self._next - 1, trio.current_time(), count)
        return events

    def queue(self, outbox: Outbox[Any], encode: Encoder) -> None:
        """Queue the replay in ``outbox``: ahead of every live event after it."""
        if self.done:
            return
        self._encode = encode
        outbox.put_replay(self)

    def pull(self, max_bytes: int) -> tuple[list[Any], int, int]:
        topic, encode = self._topic, self._encode
        assert topic is not None and encode is not None
        previous = topic.previous
        moved_on = previous is not None and previous.epoch == self.epoch
        if topic.epoch != self.epoch and not moved_on:  # the stream restarted: the rest is gone
            missed = len(self)
            self._next = self.last + 1
            return [], 0, missed
        history = topic.history
        first = history.first_seq
        missed = 0
        if first is None or first > self._next:
            skip_to = self.last + 1 if first is None else min(first, self.last + 1)
            missed = skip_to - self._next
            self._next = skip_to
        frames: list[Any] = []
        size = 0
        if not self.done:
            events, _ = history.after(self._next - 1, trio.current_time(), len(self))
            for event in events:
                frame = encode(event)
                frames.append(frame)
                size += len(frame)
                self._next = event.seq + 1
                if size >= max_bytes or self.done:
                    break
            else:
                if not events or self._next <= self.last:
                    # Expired meanwhile: the rest of the replay is gone too.
                    missed += len(self)
                    self._next = self.last + 1
        return frames, size, missed


@attrs.frozen(slots=True)
class SubscribeResult:
    """What ``subscribe`` found: where the stream stands and what to replay first.

    ``recovered`` is None when no resume was asked for, otherwise whether the
    replay covers every event after the requested offset.
    """

    position: Position
    recovered: bool | None
    replay: HistoryReplay


@attrs.frozen(slots=True)
class TopicStats:
    name: str
    tenant: str
    seq: int
    epoch: str
    subscribers: int
    history: int
    published: int
    delivered: int
    dropped: int


@attrs.frozen(slots=True)
class BrokerStats:
    topics: int
    subscriptions: int
    published: int
    delivered: int
    dropped: int
    inbox_depth: int
    inbox_capacity: int
    history_bytes: int = 0
    evicted_topics: int = 0
    """Idle topics forgotten to make room for new ones (their history with them)."""


class _Topic:
    __slots__ = (
        "capacity",
        "delivered",
        "dropped",
        "epoch",
        "groups",
        "history",
        "name",
        "namespace",
        "policy",
        "previous",
        "published",
        "seq",
        "subscribers",
        "tenant",
    )

    def __init__(
        self, tenant: str, name: str, namespace: Namespace, ledgers: Sequence[Ledger[Any, Any]] = ()
    ) -> None:
        self.tenant = tenant
        self.name = name
        self.namespace = namespace
        self.capacity = namespace.outbox_size
        self.policy = namespace.overflow_policy
        self.epoch = secrets.token_hex(4)
        self.seq = 0
        # Where this epoch took over from the one before (a backplane's failover):
        # a resume from the old epoch is answered across it.
        self.previous: Position | None = None
        self.history = History(
            namespace.history_size,
            namespace.history_ttl,
            namespace.history_max_bytes,
            ledgers=tuple(ledgers),
        )
        # Subscribers grouped by encoder, so each event is encoded once per group.
        self.groups: dict[Encoder, dict[Outbox[Any], Subscriber]] = {}
        self.subscribers = 0
        self.published = 0
        self.delivered = 0
        self.dropped = 0

    @property
    def position(self) -> Position:
        return Position(self.seq, self.epoch)

    def idle(self) -> bool:
        return self.subscribers == 0 and len(self.history) == 0

    def members(self) -> Iterator[Subscriber]:
        for group in self.groups.values():
            yield from group.values()

    def statistics(self) -> TopicStats:
        return TopicStats(
            self.name,
            self.tenant,
            self.seq,
            self.epoch,
            self.subscribers,
            len(self.history),
            self.published,
            self.delivered,
            self.dropped,
        )


class Delivery(StrEnum):
    """What became of an event a backplane delivered (:meth:`Broker.deliver`)."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    """Already applied (same epoch, offset not ahead): ignored."""
    GAP = "gap"
    """Events are missing before it: the backplane must fetch them first."""
    UNTRACKED = "untracked"
    """The node holds no state for the topic (nobody here subscribes)."""


class Broker:
    """Topic state and fan-out for one node.

    Run :meth:`run` in a nursery (``await nursery.start(broker.run)``); publish
    with :meth:`publish` or :meth:`submit`; subscribe with :meth:`subscribe`.
    """

    def __init__(
        self,
        *,
        namespaces: Namespaces | None = None,
        max_topics: int = 100_000,
        inbox_size: int = 1024,
        tenant_max_topics: int = 0,
        history_node_bytes: int = 0,
        tenant_history_bytes: int = 0,
        idempotency: IdempotencyWindow | None = None,
    ) -> None:
        self.namespaces = namespaces or Namespaces()
        self.idempotency = idempotency or IdempotencyWindow()
        """Keys of recent publications; with a backplane, its bounds apply in Redis."""
        self.max_topics = max_topics
        self.tenant_max_topics = tenant_max_topics
        self.tenant_history_bytes = tenant_history_bytes
        self._topics: dict[tuple[str, str], _Topic] = {}
        self._node: Ledger[tuple[str, str], _Topic] = Ledger(max_topics, history_node_bytes)
        self._tenants: dict[str, Ledger[tuple[str, str], _Topic]] = {}
        self._evicted = 0
        self._inbox_send, self._inbox_receive = trio.open_memory_channel[Publication](inbox_size)
        self._inbox_capacity = inbox_size
        self._queued = 0  # publications in the inbox, or handed to the broker task and not applied
        self._running = False
        self._published = 0
        self._delivered = 0
        self._dropped = 0
        self._subscriptions = 0
        self.backplane: Backplane | None = None
        """Where events are sequenced when topics are shared with other nodes."""
        self._tracking: dict[tuple[str, str], int] = {}  # tasks inside prepare(), per topic
        # Forgotten topics' positions, oldest first: (epoch, seq, until when).
        self._remembered: dict[tuple[str, str], tuple[str, int, float]] = {}

    # --- publishing -------------------------------------------------------------

    async def submit(
        self,
        topic: str,
        payload: Any,
        on_done: Callable[[Position | BrokerError], None] | None = None,
        *,
        tenant: str = DEFAULT_TENANT,
        idempotency_key: str | None = None,
        trusted: bool = True,
    ) -> None:
        """Queue an event for ``topic``, waiting only while the inbox is full.

        ``on_done`` is called from the broker task with the event's position, or
        the reason it was refused. The payload is serialized here, in the
        caller's task, so that a value JSON cannot carry fails where it was
        published. A client's publication is not ``trusted``: it counts
        against its tenant's topic quota.
        With ``idempotency_key``, a key already seen for the topic
        within the window answers with the first publication's position and
        publishes nothing.

        Raises:
            TypeError: ``payload`` is not JSON-serializable.
        """
        publication = Publication(
            tenant,
            topic,
            payload,
            orjson.dumps(payload),
            on_done,
            idempotency_key=idempotency_key,
            trusted=trusted,
        )
        if self.backplane is not None and self._shared(topic):
            self.backplane.send(publication)
            await trio.lowlevel.checkpoint()
        elif not self._apply_now(publication):
            self._queued += 1
            try:
                await self._inbox_send.send(publication)
            except BaseException:
                self._queued -= 1
                raise
        else:
            await trio.lowlevel.checkpoint()

    def submit_nowait(
        self,
        topic: str,
        payload: Any,
        on_done: Callable[[Position | BrokerError], None] | None = None,
        *,
        tenant: str = DEFAULT_TENANT,
        idempotency_key: str | None = None,
        trusted: bool = True,
    ) -> None:
        """Like :meth:`submit`, but raise ``trio.WouldBlock`` when the inbox is full.

        It does not yield either, so a reader can hand over every publication of
        one socket read before its writers run, which then carry them all.
        """
        publication = Publication(
            tenant,
            topic,
            payload,
            orjson.dumps(payload),
            on_done,
            idempotency_key=idempotency_key,
            trusted=trusted,
        )
        if self.backplane is not None and self._shared(topic):
            self.backplane.send(publication)
        elif not self._apply_now(publication):
            self._inbox_send.send_nowait(publication)
            self._queued += 1

    def _apply_now(self, publication: Publication) -> bool:
        """Sequence a publication in the caller's task when nothing is queued ahead of it.

        The order is the same as through the inbox (nothing is ahead), and the
        event is out one task switch sooner: at low rates that switch was most
        of the latency. Only while the broker task runs, which owns the rest.
        """
        if self._queued or not self._running:
            return False
        self._apply(publication)
        return True

    async def publish(
        self,
        topic: str,
        payload: Any,
        *,
        tenant: str = DEFAULT_TENANT,
        idempotency_key: str | None = None,
        trusted: bool = True,
    ) -> Position:
        """Publish and wait until the event is sequenced; returns its position.

        Raises:
            BrokerError: the broker refused the event (e.g. too many topics, or
                ``idempotency_conflict``).
            TypeError: ``payload`` is not JSON-serializable.
        """
        done = trio.Event()
        outcome: list[Position | BrokerError] = []

        def on_done(result: Position | BrokerError) -> None:
            outcome.append(result)
            done.set()

        await self.submit(
            topic, payload, on_done, tenant=tenant, idempotency_key=idempotency_key, trusted=trusted
        )
        await done.wait()
        result = outcome[0]
        if isinstance(result, BrokerError):
            raise result
        return result

    # --- the broker task ----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sequence and fan out events until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sweep_forever)
            task_status.started()
            receive = self._inbox_receive
            apply = self._apply
            self._running = True
            try:
                while True:
                    publication = await receive.receive()
                    self._queued -= 1
                    apply(publication)
                    for _ in range(MAX_BATCH - 1):
                        try:
                            publication = receive.receive_nowait()
                        except trio.WouldBlock:
                            break
                        self._queued -= 1
                        apply(publication)
            finally:
                self._running = False

    def _apply(self, publication: Publication) -> None:
        if publication.idempotency_key is not None and self._replayed(publication):
            return
        try:
            topic = self._topic(
                publication.tenant, publication.topic, create=True, trusted=publication.trusted
            )
        except BrokerError as exc:
            if publication.on_done is not None:
                publication.on_done(exc)
            return
        assert topic is not None
        topic.seq += 1
        event = Event(
            publication.topic,
            topic.seq,
            topic.epoch,
            publication.payload,
            rfc3339_now(),
            publication.payload_json,
        )
        self._retain(topic, event)
        if publication.idempotency_key is not None:
            self.idempotency.remember(
                publication.tenant,
                publication.topic,
                publication.idempotency_key,
                fingerprint(publication.payload_json),
                position=topic.position,
                now=trio.current_time(),
            )
        if publication.on_done is not None:
            # Before the fan-out, so a publisher subscribed to its own topic
            # reads the reply to its publish before the event itself.
            publication.on_done(Position(topic.seq, topic.epoch))
        self._fan_out(topic, event)

    def _replayed(self, publication: Publication) -> bool:
        """Answer a retry from the idempotency window; False: publish it."""
        assert publication.idempotency_key is not None
        seen = self.idempotency.check(
            publication.tenant,
            publication.topic,
            publication.idempotency_key,
            fingerprint(publication.payload_json),
            trio.current_time(),
        )
        if seen is None:
            return False
        if publication.on_done is not None:
            publication.on_done(seen)
        return True

    def _fan_out(self, topic: _Topic, event: Event) -> None:
        # The hot loop: one method call per subscriber, counting only failures.
        offered = dropped = closing = 0
        now = trio.current_time()  # once for every outbox (each notes when it got work)
        for encode, outboxes in topic.groups.items():
            frame = encode(event)
            offered += len(outboxes)
            # In-process subscribers keep the buffer they asked for; connections
            # meet the namespace's limit and policy.
            capacity, policy = (0, None) if encode is as_event else (topic.capacity, topic.policy)
            for outbox in outboxes:
                if outbox.closing is not None:
                    closing += 1  # on its way out: neither delivered nor dropped
                elif not outbox.offer(frame, capacity, policy, now):
                    dropped += 1
        delivered = offered - dropped - closing
        topic.published += 1
        topic.delivered += delivered
        topic.dropped += dropped
        self._published += 1
        self._delivered += delivered
        self._dropped += dropped

    def _retain(self, topic: _Topic, event: Event) -> None:
        """Append to the topic's history, charged to its tenant and the node."""
        history = topic.history
        if history.max_size == 0:
            return
        history.append(event, trio.current_time())
        key = (topic.tenant, topic.name)
        tenant = self._ledger(topic.tenant)
        tenant.touch(key)
        self._node.touch(key)
        if tenant.over_history():
            self._trim(tenant, topic)
        if self._node.over_history():
            self._trim(self._node, topic)

    def _trim(self, ledger: Ledger[tuple[str, str], _Topic], current: _Topic) -> None:
        """Make ``ledger`` fit its history bytes: oldest events of its least
        recently appended topics first, ``current`` last (and never its newest event)."""
        for _ in range(len(ledger.lru) + 1):
            if not ledger.over_history():
                return
            key, topic = next(iter(ledger.lru.items()))
            if topic is current or not len(topic.history):
                ledger.touch(key)
                if topic is not current:
                    continue
            while ledger.over_history() and len(topic.history) > (topic is current):
                topic.history.pop_oldest()
            ledger.touch(key)

    async def _sweep_forever(self) -> None:
        namespaces = [self.namespaces.default, *self.namespaces.named()]
        ttls = [namespace.history_ttl for namespace in namespaces]
        interval = min(MAX_SWEEP_INTERVAL, max(min(ttls) / 4, 0.05))
        while True:
            await trio.sleep(interval)
            self.sweep()

    def sweep(self) -> None:
        """Expire old history and forget topics nobody uses any more."""
        now = trio.current_time()
        for key in list(self._topics):
            topic = self._topics[key]
            topic.history.expire(now)
            if self._idle(topic):
                self._forget(key)
        for key, (_, _, until) in list(self._remembered.items()):
            if until <= now:
                del self._remembered[key]
        self.idempotency.sweep(now)

    # --- events sequenced elsewhere (a backplane) ------------------------------------

    def attach(self, backplane: Backplane) -> None:
        """Sequence through ``backplane`` from now on (before any topic exists)."""
        if self._topics:
            raise RuntimeError("attach a backplane before the broker holds topics")
        self.backplane = backplane

    async def prepare(self, topic_name: str, tenant: str = DEFAULT_TENANT) -> None:
        """Make the node's copy of a topic current before :meth:`subscribe`.

        With no backplane this returns at once without yielding. With one, it
        waits until the node receives the topic's events and holds its offset
        and history; call :meth:`subscribe` right after, before awaiting
        anything else, so that copy is still current.

        Raises:
            BrokerError: unknown namespace, or the backplane is unreachable.
        """
        if self.backplane is None:
            return
        namespace = self.namespaces.resolve(topic_name)
        if namespace is None:
            raise _unknown_namespace(topic_name)
        if namespace.local:
            return  # sequenced and kept here: nothing to follow
        key = (tenant, topic_name)
        # Counted so that a sweep while we wait does not forget the topic again.
        self._tracking[key] = self._tracking.get(key, 0) + 1
        try:
            await self.backplane.track(tenant, topic_name)
        finally:
            left = self._tracking[key] - 1
            if left:
                self._tracking[key] = left
            else:
                del self._tracking[key]

    def load(
        self,
        tenant: str,
        topic_name: str,
        position: Position,
        events: list[Event],
        *,
        previous: Position | None = None,
    ) -> None:
        """Set a tracked topic's state from the backplane: its offset and recent history.

        Subscribers already here keep their subscription; anything they had not
        been sent before ``position`` is theirs to recover by resuming.
        ``previous``, if the epoch took over from another one, is the last
        position of that one it kept (see :meth:`rollover`).
        """
        topic = self._topic(tenant, topic_name, create=True)
        assert topic is not None
        topic.seq = position.seq
        topic.epoch = position.epoch
        topic.previous = previous
        topic.history.clear()
        for event in events:
            self._retain(topic, event)

    def deliver(self, tenant: str, event: Event) -> Delivery:
        """Fan out an event the backplane sequenced, if it is the next one.

        Events of a tracked topic must arrive in offset order with no hole; a
        duplicate is ignored and a hole is reported, for the backplane to fill
        from the shared history before it delivers this event again.
        """
        topic = self._topics.get((tenant, event.topic))
        if topic is None:
            return Delivery.UNTRACKED
        if event.epoch == topic.epoch:
            if event.seq <= topic.seq:
                return Delivery.DUPLICATE
            if event.seq != topic.seq + 1:
                return Delivery.GAP
        elif event.seq == 1 and topic.seq == 0:
            topic.epoch = event.epoch  # the stream's first event: it names the epoch
        else:
            return Delivery.GAP
        topic.seq = event.seq
        self._retain(topic, event)
        self._fan_out(topic, event)
        return Delivery.APPLIED

    def rollover(self, tenant: str, topic_name: str, previous: Position, epoch: str) -> bool:
        """The topic's stream goes on in ``epoch`` after ``previous``, with the same offsets.

        A backplane calls this when its store moved to a new epoch without
        losing what this node holds (a failover to an up-to-date replica, a
        restart): subscribers carry on, the next event is ``previous.seq + 1``
        in ``epoch``, and a client resuming from ``previous``'s epoch is still
        answered from history. False (nothing changed) unless the topic is at
        ``previous`` now.
        """
        topic = self._topics.get((tenant, topic_name))
        if topic is None or topic.position != previous:
            return False
        topic.epoch = epoch
        topic.previous = previous
        return True

    def lost(self, tenant: str, topic_name: str, code: int, reason: str) -> int:
        """Close every subscriber of a topic whose missed events cannot be recovered.

        They reconnect and resume, and the subscribe reply then tells them
        (``recovered: false``) that some events are gone. Returns how many.
        """
        topic = self._topics.get((tenant, topic_name))
        if topic is None:
            return 0
        members = list(topic.members())
        for member in members:
            member.outbox.close(code, reason)
        return len(members)

    def tracked(self) -> list[tuple[str, str]]:
        """(tenant, topic) of every topic this node holds."""
        return list(self._topics)

    # --- subscribing --------------------------------------------------------------

    def subscribe(
        self,
        subscriber: Subscriber,
        topic_name: str,
        *,
        since: int | None = None,
        epoch: str | None = None,
        trusted: bool = False,
    ) -> SubscribeResult:
        """Add ``subscriber`` to a topic; with ``since``, also say what it missed.

        The replay (a :class:`HistoryReplay`: a cursor, not the events) covers
        the retained events after offset ``since`` in order. Live events are
        offered to the subscriber's outbox from the next fan-out on, so a
        caller that queues the replay before it next awaits gets the stream
        with no gap and no duplicate. ``recovered`` is False when ``epoch``
        names another stream or history no longer reaches back to ``since``.
        A client's subscription is not ``trusted``: a new topic counts against
        its tenant's quota.

        Raises:
            BrokerError: already subscribed, too many subscriptions or topics.
        """
        if topic_name in subscriber.topics:
            raise BrokerError(ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {topic_name!r}")
        if len(subscriber.topics) >= subscriber.max_topics:
            raise BrokerError(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                f"a connection may hold at most {subscriber.max_topics} subscriptions",
            )
        topic = self._topic(
            subscriber.tenant,
            topic_name,
            create=self.backplane is None or not self._shared(topic_name),
            trusted=trusted,
        )
        if topic is None:
            raise BrokerError(
                ErrorCode.UNAVAILABLE, f"{topic_name!r} is not tracked here: call prepare() first"
            )
        replay, recovered = HistoryReplay(None, 1, 0), None
        if since is not None:
            replay, recovered = self._replay(topic, since, epoch)
        self._announce(topic, "join", subscriber)
        topic.groups.setdefault(subscriber.encode, {})[subscriber.outbox] = subscriber
        topic.subscribers += 1
        self._subscriptions += 1
        subscriber.topics.add(topic_name)
        return SubscribeResult(topic.position, recovered, replay)

    def _replay(self, topic: _Topic, since: int, epoch: str | None) -> tuple[HistoryReplay, bool]:
        nothing = HistoryReplay(None, 1, 0)
        complete = True
        if epoch is not None and epoch != topic.epoch:
            previous = topic.previous
            if previous is None or epoch != previous.epoch:
                return nothing, False
            if since > previous.seq:
                # The client saw events of the old epoch that this one does not
                # hold (lost at a failover): it gets everything the new epoch
                # has, and is told that what it missed may be incomplete.
                since, complete = previous.seq, False
        if since >= topic.seq:
            # Nothing missed; an offset from the future means another stream.
            return nothing, complete and since == topic.seq
        topic.history.expire(trio.current_time())
        first = topic.history.first_seq
        if first is None:
            return nothing, False
        replay = HistoryReplay(topic, max(since + 1, first), topic.seq)
        return replay, complete and first <= since + 1

    def unsubscribe(self, subscriber: Subscriber, topic_name: str) -> bool:
        """Remove ``subscriber`` from a topic; False if it was not subscribed."""
        if topic_name not in subscriber.topics:
            return False
        subscriber.topics.discard(topic_name)
        key = (subscriber.tenant, topic_name)
        topic = self._topics.get(key)
        if topic is None:  # pragma: no cover - topics with subscribers are never swept
            return True
        group = topic.groups.get(subscriber.encode)
        if group is not None and group.pop(subscriber.outbox, None) is not None:
            topic.subscribers -= 1
            self._subscriptions -= 1
            if not group:
                del topic.groups[subscriber.encode]
            self._announce(topic, "leave", subscriber)
        if self._idle(topic):
            self._forget(key)
        return True

    def _announce(self, topic: _Topic, kind: str, subscriber: Subscriber) -> None:
        """Tell a topic's other subscribers that ``subscriber`` joined or left."""
        if not topic.namespace.join_leave or subscriber.presence is None:
            return
        change = PresenceChange(topic.name, kind, subscriber.presence)
        frames: dict[PresenceEncoder, Any] = {}
        for member in topic.members():
            encode = member.encode_presence
            if encode is None or member is subscriber:
                continue
            frame = frames.get(encode)
            if frame is None:
                frame = frames[encode] = encode(change)
            member.outbox.offer(frame, topic.capacity, topic.policy)

    def detach(self, subscriber: Subscriber) -> None:
        """Remove ``subscriber`` from every topic (its connection ended)."""
        for name in list(subscriber.topics):
            self.unsubscribe(subscriber, name)

    # --- reading state ------------------------------------------------------------

    def position(self, topic_name: str, tenant: str = DEFAULT_TENANT) -> Position | None:
        """Where a topic stands, or None if the node holds no state for it."""
        topic = self._topics.get((tenant, topic_name))
        return None if topic is None else topic.position

    def history(
        self,
        topic_name: str,
        since: int = 0,
        limit: int | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> tuple[list[Event], Position | None]:
        """Retained events of a topic after offset ``since`` (oldest first)."""
        topic = self._topics.get((tenant, topic_name))
        if topic is None:
            return [], None
        events, _ = topic.history.after(since, trio.current_time(), limit)
        return events, topic.position

    def presence(self, topic_name: str, tenant: str = DEFAULT_TENANT) -> list[ClientInfo]:
        """Who is subscribed to a topic (subscribers that are listed in presence)."""
        topic = self._topics.get((tenant, topic_name))
        if topic is None:
            return []
        return [member.presence for member in topic.members() if member.presence is not None]

    async def presence_everywhere(
        self, topic_name: str, tenant: str = DEFAULT_TENANT
    ) -> list[ClientInfo]:
        """Who is subscribed to a topic on every node sharing the backplane (or this one)."""
        if self.backplane is None:
            return self.presence(topic_name, tenant)
        return await self.backplane.presence(tenant, topic_name)

    def topics(self, tenant: str | None = None) -> list[TopicStats]:
        """Counters of every topic the node holds (of one tenant, if given)."""
        return [
            topic.statistics()
            for topic in self._topics.values()
            if tenant is None or topic.tenant == tenant
        ]

    def topic_stats(self, topic_name: str, tenant: str = DEFAULT_TENANT) -> TopicStats | None:
        topic = self._topics.get((tenant, topic_name))
        return None if topic is None else topic.statistics()

    def statistics(self) -> BrokerStats:
        return BrokerStats(
            topics=len(self._topics),
            subscriptions=self._subscriptions,
            published=self._published,
            delivered=self._delivered,
            dropped=self._dropped,
            inbox_depth=self._inbox_send.statistics().current_buffer_used,
            inbox_capacity=self._inbox_capacity,
            history_bytes=self._node.history_bytes,
            evicted_topics=self._evicted,
        )

    # --- internals ----------------------------------------------------------------

    def _shared(self, topic_name: str) -> bool:
        """Whether a topic goes through the backplane (an unknown namespace: the
        local path refuses it with the right error)."""
        namespace = self.namespaces.resolve(topic_name)
        return namespace is not None and not namespace.local

    def _idle(self, topic: _Topic) -> bool:
        if self.backplane is None or topic.namespace.local:
            return topic.idle()
        # History lives in the backplane: keep only what someone here follows.
        return topic.subscribers == 0 and (topic.tenant, topic.name) not in self._tracking

    def _evictable(self, topic: _Topic) -> bool:
        """Whether a topic may be forgotten to make room: nobody here uses it."""
        return topic.subscribers == 0 and (topic.tenant, topic.name) not in self._tracking

    def _forget(self, key: tuple[str, str]) -> None:
        topic = self._topics.pop(key)
        topic.history.clear()
        self._remember(key, topic)
        self._node.remove(key)
        tenant = self._tenants.get(topic.tenant)
        if tenant is not None:
            tenant.remove(key)
            if not tenant.lru and tenant.history_bytes == 0:
                del self._tenants[topic.tenant]
        if self.backplane is not None and not topic.namespace.local:
            self.backplane.untrack(*key)

    def _remember(self, key: tuple[str, str], topic: _Topic) -> None:
        """Keep a forgotten topic's position for ``history_ttl``, so that it comes back
        in the same epoch.

        A client that lost its connection to a topic nothing was published to
        (its topic forgotten as it left) and comes back after an event was
        published finds that event in the same stream, and resumes with it;
        with a new epoch, it could only be told that the stream restarted.
        A position costs a few hundred bytes, where keeping the topic would cost
        kilobytes; at most :data:`MAX_REMEMBERED` of them, oldest let go first.
        With a backplane, Redis keeps the epochs of shared topics.
        """
        if self.backplane is not None and not topic.namespace.local:
            return
        remembered = self._remembered
        remembered.pop(key, None)
        remembered[key] = (
            topic.epoch,
            topic.seq,
            trio.current_time() + topic.namespace.history_ttl,
        )
        if len(remembered) > MAX_REMEMBERED:
            del remembered[next(iter(remembered))]

    def _evict(self, key: tuple[str, str]) -> None:
        self._evicted += 1
        LOGGER.info(
            "forgetting idle topic %r of tenant %r to make room",
            key[1][:200],
            key[0],
            extra={"event": "topic_evicted", "tenant": key[0], "topic": key[1][:200]},
        )
        self._forget(key)

    def _ledger(self, tenant: str) -> Ledger[tuple[str, str], _Topic]:
        ledger = self._tenants.get(tenant)
        if ledger is None:
            ledger = self._tenants[tenant] = Ledger(
                self.tenant_max_topics, self.tenant_history_bytes
            )
        return ledger

    def _topic(
        self, tenant: str, name: str, *, create: bool, trusted: bool = True
    ) -> _Topic | None:
        key = (tenant, name)
        topic = self._topics.get(key)
        if topic is None and create:
            namespace = self.namespaces.resolve(name)
            if namespace is None:
                raise _unknown_namespace(name)
            ledger = self._ledger(tenant)
            if not trusted and ledger.full() and not ledger.evict_one(self._evictable, self._evict):
                raise BrokerError(
                    ErrorCode.TOO_MANY_TOPICS,
                    f"tenant {tenant!r} holds its limit of {ledger.max_topics} topics, all in use",
                )
            if self._node.full() and not self._node.evict_one(self._evictable, self._evict):
                raise BrokerError(
                    ErrorCode.TOO_MANY_TOPICS,
                    f"this node holds its limit of {self.max_topics} topics, all in use",
                )
            ledger = self._ledger(tenant)  # eviction may have dropped an empty one
            topic = _Topic(tenant, name, namespace, (ledger, self._node))
            remembered = self._remembered.pop(key, None)
            if remembered is not None and remembered[2] > trio.current_time():
                topic.epoch, topic.seq, _ = remembered
            self._topics[key] = topic
            ledger.add(key, topic)
            self._node.add(key, topic)
        return topic


def _unknown_namespace(topic_name: str) -> BrokerError:
    return BrokerError(
        ErrorCode.UNKNOWN_NAMESPACE,
        f"namespace {topic_name.partition(':')[0]!r} is not configured",
    )
