"""The Redis backplane: one set of topics, history and presence for many nodes.

How an event travels. A node hands the publication to :meth:`RedisBackplane.send`;
a publisher task runs a Lua script per publication (pipelined in batches) that
increments the topic's offset, appends the event to the topic's stream (its
history, trimmed to the namespace's size) and PUBLISHes it on the topic's
channel, all atomically. Every node that has subscribers for the topic is
subscribed to that channel, receives the event once, and fans it out locally
through :meth:`~tidings.broker.broker.Broker.deliver`. So Redis traffic grows
with nodes, not clients, and the offset order is Redis's order everywhere.

Redis pub/sub is at most once: a node that loses its connection misses what
was published meanwhile, silently. Offsets make that visible: an event whose
offset is not the next one makes the node fetch the missing ones from the
stream first (and when the stream no longer reaches back, close the topic's
subscribers with 4010 so they resume and learn what is gone). After a
reconnect every tracked topic is checked the same way.

Cluster-wide questions (presence, channels, disconnecting a user) go to every
live node over a control channel and are answered from each node's memory;
nodes announce themselves and their counters in a hash every second.
"""

from __future__ import annotations

import hashlib
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import attrs
import coredis
import orjson
import trio
from coredis.connection import TCPLocation

from ..broker.backplane import Publication
from ..broker.broker import Broker, Delivery
from ..errors import BrokerError
from ..protocol.clock import rfc3339_now
from ..protocol.codes import CloseCode, ErrorCode
from ..protocol.idempotency import fingerprint
from ..protocol.messages import ClientInfo, Event, Position
from .url import parse_url, redacted

LOGGER = logging.getLogger("tidings.backplane")

PREFIX: Final = "tidings"
#: Publications per pipelined round trip.
PUBLISH_BATCH: Final = 128
#: Each node writes its counters this often; a node silent for NODE_TTL is gone.
ANNOUNCE_INTERVAL: Final = 1.0
NODE_TTL: Final = 5.0
#: Reconnect backoff: doubles from the first delay up to the last, with jitter.
BACKOFF_FIRST: Final = 0.05
BACKOFF_MAX: Final = 1.0
#: Topic metadata (offset, epoch) outlives the history by at least this much,
#: so a quiet topic keeps its epoch and clients can still resume against it.
META_TTL: Final = 24 * 3600.0
#: Events held per topic while it is being synchronised.
SYNC_BUFFER: Final = 10_000
#: Publications a node remembers per topic to recognise its own retries;
#: larger than a batch, so every publication of a retried batch is found.
DEDUPE_RING: Final = 4 * PUBLISH_BATCH
#: Control messages waiting to be answered.
CONTROL_BACKLOG: Final = 256

# Lua shared by the scripts below (KEYS[1] meta hash, KEYS[2] stream): a topic
# without metadata (new, expired, or lost with Redis) starts a new epoch at
# offset 0 and drops any stream left over. NEW_EPOCH names the argument.
_START_STREAM: Final = """
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = NEW_EPOCH
  redis.call('HSET', KEYS[1], 'e', epoch, 's', 0)
  redis.call('DEL', KEYS[2])
end"""

# KEYS: meta hash, stream. ARGV: channel, payload, history size, history ttl (ms),
# meta ttl (ms), epoch for a new stream, wall time (ms), timestamp (RFC 3339).
# The message is "seq epoch ms timestamp payload": the payload last, as is.
#
# KEYS[3] remembers this node's recent publications (a ring of DEDUPE_RING
# slots, ARGV[9] being the node's publication number): a batch retried after
# a broken connection must not publish twice what Redis had already applied.
#
# A publication with an idempotency key (ARGV[11]; absent otherwise, and so is
# all of this) is checked against the topic's window, for every node at once:
# KEYS[4] a hash key -> "seq epoch fingerprint ms", KEYS[5] the same keys by
# time. ARGV[12] is the payload's fingerprint, ARGV[13] the window (ms),
# ARGV[14] the most keys kept per topic (the oldest go first).
PUBLISH_SCRIPT: Final = (
    """
local slot = tostring(tonumber(ARGV[9]) % tonumber(ARGV[10]))
local seen = redis.call('HGET', KEYS[3], slot)
if seen then
  local number, seen_seq, seen_epoch = string.match(seen, '^(%d+) (%d+) (%S+)$')
  if number == ARGV[9] then return {tonumber(seen_seq), seen_epoch} end
end
local key = ARGV[11]
if key then
  local cutoff = tonumber(ARGV[7]) - tonumber(ARGV[13])
  local expired = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', cutoff, 'LIMIT', 0, 64)
  if #expired > 0 then
    redis.call('HDEL', KEYS[4], unpack(expired))
    redis.call('ZREM', KEYS[5], unpack(expired))
  end
  local known = redis.call('HGET', KEYS[4], key)
  if known then
    local known_seq, known_epoch, print, at = string.match(known, '^(%d+) (%S+) (%S+) (%d+)$')
    if tonumber(at) > cutoff then
      if print == ARGV[12] then return {tonumber(known_seq), known_epoch, 'replayed'} end
      return {tonumber(known_seq), known_epoch, 'conflict'}
    end
  end
end
"""
    + _START_STREAM.replace("NEW_EPOCH", "ARGV[6]")
    + """
local seq = redis.call('HINCRBY', KEYS[1], 's', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
local message = seq .. ' ' .. epoch .. ' ' .. ARGV[7] .. ' ' .. ARGV[8] .. ' ' .. ARGV[2]
local size = tonumber(ARGV[3])
if size > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', size, seq .. '-1', 'm', message)
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
redis.call('PUBLISH', ARGV[1], message)
redis.call('HSET', KEYS[3], slot, ARGV[9] .. ' ' .. seq .. ' ' .. epoch)
redis.call('PEXPIRE', KEYS[3], 60000)
if key then
  redis.call('HSET', KEYS[4], key, seq .. ' ' .. epoch .. ' ' .. ARGV[12] .. ' ' .. ARGV[7])
  redis.call('ZADD', KEYS[5], ARGV[7], key)
  local excess = redis.call('ZCARD', KEYS[5]) - tonumber(ARGV[14])
  if excess > 0 then
    local oldest = redis.call('ZPOPMIN', KEYS[5], excess)
    for i = 1, #oldest, 2 do redis.call('HDEL', KEYS[4], oldest[i]) end
  end
  redis.call('PEXPIRE', KEYS[4], ARGV[13])
  redis.call('PEXPIRE', KEYS[5], ARGV[13])
end
return {seq, epoch}
"""
)

# KEYS: meta hash, stream. ARGV: epoch for a new stream, meta ttl (ms).
# Gives a followed topic an epoch before its first event, so subscribers get a
# position they can resume from.
ENSURE_SCRIPT: Final = (
    """
"""
    + _START_STREAM.replace("NEW_EPOCH", "ARGV[1]")
    + """
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {redis.call('HGET', KEYS[1], 's'), epoch}
"""
)

# KEYS: meta hash, stream. ARGV: the epoch to retire, its successor, meta ttl (ms).
NEW_EPOCH_SCRIPT: Final = """
if redis.call('HGET', KEYS[1], 'e') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'e', ARGV[2], 's', 0)
  redis.call('DEL', KEYS[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {redis.call('HGET', KEYS[1], 's'), redis.call('HGET', KEYS[1], 'e')}
"""

Answerer = Callable[[str, dict[str, Any]], Any]
"""Answers a cluster-wide question (``presence``, ``channels``, ``disconnect``) for this node."""


class BackplaneUnavailable(Exception):
    """Redis could not be reached within the backplane timeout."""


def _unavailable(message: str) -> BrokerError:
    return BrokerError(ErrorCode.UNAVAILABLE, message)


def topic_id(tenant: str, topic: str) -> str:
    """A key-safe name for a (tenant, topic): names may hold any printable character."""
    digest = hashlib.blake2b(f"{tenant}\0{topic}".encode(), digest_size=16).hexdigest()
    # The braces make both keys of a topic one hash slot, for Redis Cluster.
    return "{" + digest + "}"


@attrs.define(slots=True, eq=False)
class _Tracked:
    """A topic this node follows: subscribed to its channel, holding its state."""

    tenant: str
    topic: str
    channel: bytes
    ready: trio.Event = attrs.Factory(trio.Event)
    synced: bool = False
    syncing: bool = False
    buffer: list[Event] = attrs.Factory(list)
    overflowed: bool = False
    retire: bool = False
    """Redis reissued an offset: retire the epoch at the next sync."""
    stale: bool = False
    """Events were skipped while the node was behind: refill from the stream."""


@attrs.define(slots=True, eq=False)
class _Pending:
    publication: Publication
    deadline: float
    number: int
    """This node's publication number: stable across retries of the same one."""
    attempted: bool = False
    """Sent to Redis at least once: if refused now, it may have been applied."""


@attrs.define(slots=True, eq=False)
class _Question:
    expected: set[str]
    answers: dict[str, Any]
    done: trio.Event = attrs.Factory(trio.Event)


class RedisBackplane:
    """Shares topics, history, presence and control between nodes through Redis.

    Run it with ``await nursery.start(backplane.run)`` after attaching it to
    the broker. It never fails because Redis is away: it reports
    :attr:`connected` False, refuses what needs Redis with ``unavailable``
    after ``timeout`` seconds, and reconnects with backoff.
    """

    def __init__(
        self,
        url: str,
        broker: Broker,
        *,
        node_id: str,
        timeout: float = 2.0,
        buffer: int = 10_000,
        max_lag: float = 10.0,
        answer: Answerer | None = None,
        node_stats: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.url = url
        self.kind, self._hosts, self._db, self._service, self._username, self._password = parse_url(
            url
        )
        self.broker = broker
        self.node_id = node_id
        self.timeout = timeout
        self.buffer = buffer
        self.max_lag = max_lag
        self._shedding = False
        self._shed_before = 0
        self.shed = 0
        """Events skipped because the node's fan-out fell more than ``max_lag`` behind."""
        self._answer = answer or (lambda _op, _body: None)
        # coredis logs each failed attempt (with tracebacks); the backplane reports
        # the outage itself, once, and /health and metrics show it.
        logging.getLogger("coredis").setLevel(logging.CRITICAL)
        self._node_stats = node_stats or dict
        self.connected = False
        """True while the node holds a working connection to Redis."""
        self.dropped = 0
        """Publications refused because Redis was away too long or the buffer was full."""
        self.unconfirmed = 0
        """Publications sent to Redis that it never confirmed (answered ``unconfirmed``)."""
        self.reconnects = 0
        self._connections = 0
        self.sequenced = 0
        """Publications of this node that Redis sequenced (each event counted once, on its node)."""
        self.gaps = 0
        """Times a topic's events arrived with a hole that had to be filled from history."""
        self.lost = 0
        """Times a hole could not be filled: subscribers were closed with 4010."""
        self.replayed = 0
        """Publications whose idempotency key Redis already held: answered, not published."""
        self.conflicts = 0
        """Publications refused: their idempotency key was held for another payload."""
        self._client: Any = None
        self._pubsub: Any = None
        self._script: Any = None
        self._connected = trio.Event()
        self._tracked: dict[bytes, _Tracked] = {}
        self._unsubscribe: set[bytes] = set()
        self._pending: deque[_Pending] = deque()
        self._published = 0
        # Numbers restart with the process, so retries are recognised per incarnation.
        self._incarnation = f"{node_id}:{secrets.token_hex(4)}"
        self._wake_publisher = trio.Event()
        self._wake_unsubscriber = trio.Event()
        self._questions: dict[str, _Question] = {}
        self._control_send, self._control_receive = trio.open_memory_channel[dict[str, Any]](
            CONTROL_BACKLOG
        )
        self._nursery: trio.Nursery | None = None
        self._control_channel = f"{PREFIX}:control".encode()
        self._reply_channel = f"{PREFIX}:control:{node_id}".encode()
        self._nodes_key = f"{PREFIX}:nodes"

    # --- the broker's side (broker.backplane.Backplane) ----------------------------------

    def send(self, publication: Publication) -> None:
        if len(self._pending) >= self.buffer:
            self._refuse(publication, "the backplane's buffer is full (Redis is slow or away)")
            return
        self._published += 1
        self._pending.append(
            _Pending(publication, trio.current_time() + self.timeout, self._published)
        )
        self._wake_publisher.set()

    async def track(self, tenant: str, topic: str) -> None:
        channel = self._channel(tenant, topic)
        self._unsubscribe.discard(channel)
        tracked = self._tracked.get(channel)
        if tracked is None:
            tracked = self._tracked[channel] = _Tracked(tenant, topic, channel)
            self._start_sync(tracked, resume=False)
        if tracked.synced:
            return
        with trio.move_on_after(self.timeout):
            await tracked.ready.wait()
        if not tracked.synced:
            if self._tracked.get(channel) is tracked and not self._broker_has(tenant, topic):
                del self._tracked[channel]
                self._unsubscribe.add(channel)
                self._wake_unsubscriber.set()
            raise _unavailable("the backplane (Redis) is not reachable; try again")

    def _broker_has(self, tenant: str, topic: str) -> bool:
        return self.broker.position(topic, tenant) is not None

    def untrack(self, tenant: str, topic: str) -> None:
        channel = self._channel(tenant, topic)
        tracked = self._tracked.pop(channel, None)
        if tracked is not None:
            tracked.ready.set()  # wake waiters; they find it untracked and retry or fail
        self._unsubscribe.add(channel)
        self._wake_unsubscriber.set()

    async def history(
        self, tenant: str, topic: str, since: int, limit: int | None
    ) -> tuple[list[Event], Position | None]:
        namespace = self.broker.namespaces.resolve(topic)
        if namespace is None:
            return [], None
        count = limit if limit is not None else max(namespace.history_size, 1)
        try:
            with trio.fail_after(self.timeout):
                position, events = await self._fetch(
                    tenant, topic, after=since, count=count, ttl=namespace.history_ttl
                )
        except Exception as exc:  # unreachable, timed out, or the connection broke
            raise _unavailable("the backplane (Redis) is not reachable; try again") from exc
        return events, position

    # --- cluster-wide questions ------------------------------------------------------------

    async def ask(self, op: str, body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Ask every live node; returns (answers by node id, nodes that did not answer).

        This node answers itself without a round trip. Without Redis only this
        node's answer comes back (and no node is known to be missing).
        """
        answers: dict[str, Any] = {self.node_id: self._answer(op, body)}
        if not self.connected:
            return answers, []
        question: _Question | None = None
        try:
            with trio.fail_after(self.timeout):
                others = [node for node in await self._live_nodes() if node != self.node_id]
                if not others:
                    return answers, []
                question = _Question(set(others), {})
                qid = secrets.token_hex(8)
                self._questions[qid] = question
                try:
                    message = {"op": op, "id": qid, "from": self.node_id, "body": body}
                    await self._client.publish(self._control_channel, orjson.dumps(message))
                    await question.done.wait()
                finally:
                    del self._questions[qid]
        except Exception as exc:  # Redis went away, or a node did not answer in time
            LOGGER.warning("cluster-wide %s incomplete: %r", op, exc)
        if question is None:
            return answers, []
        answers.update(question.answers)
        return answers, sorted(question.expected - set(question.answers))

    async def presence(self, tenant: str, topic: str) -> list[ClientInfo]:
        answers, _missing = await self.ask("presence", {"topic": topic, "tenant": tenant})
        return [
            ClientInfo(**entry)
            for node in sorted(answers)
            for entry in (answers[node] or [])
            if isinstance(entry, dict)
        ]

    async def nodes(self) -> list[dict[str, Any]]:
        """Every live node's latest announcement (this one's as of now)."""
        own = {"node": self.node_id, **self._node_stats()}
        if not self.connected:
            return [own]
        try:
            with trio.fail_after(self.timeout):
                raw = await self._client.hgetall(self._nodes_key)
        except Exception:
            return [own]
        now = time.time()
        found = [own]
        for node, value in raw.items():
            entry = orjson.loads(value)
            if node.decode() != self.node_id and now - entry.get("at", 0) <= NODE_TTL:
                found.append(entry)
        return found

    async def wait_connected(self) -> None:
        """Return once the node is connected to Redis (at once if it is)."""
        await self._connected.wait()

    def status(self) -> dict[str, Any]:
        """For /health and metrics."""
        return {
            "kind": self.kind,
            "url": redacted(self.url),
            "connected": self.connected,
            "pending": len(self._pending),
            "dropped": self.dropped,
            "unconfirmed": self.unconfirmed,
            "reconnects": self.reconnects,
            "gaps": self.gaps,
            "lost": self.lost,
            "shed": self.shed,
            "topics": len(self._tracked),
        }

    # --- running -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a connection to Redis (reconnecting with backoff) until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._publisher)
            nursery.start_soon(self._unsubscriber)
            nursery.start_soon(self._responder)
            nursery.start_soon(self._announcer)
            task_status.started()
            delay = BACKOFF_FIRST
            while True:
                started = trio.current_time()
                try:
                    await self._connect_and_listen()
                except Exception as exc:
                    if self.connected:
                        LOGGER.warning(
                            "lost the connection to the backplane (%s); reconnecting",
                            _cause(exc),
                        )
                    elif delay == BACKOFF_FIRST:  # once per outage, not once per attempt
                        LOGGER.warning(
                            "backplane %s unreachable: %s", redacted(self.url), _cause(exc)
                        )
                finally:
                    # Also on cancellation (shutdown), which is not worth a warning.
                    if self.connected:
                        self.connected = False
                        self._connected = trio.Event()
                    self._client = self._pubsub = None
                if trio.current_time() - started > 10 * BACKOFF_MAX:
                    delay = BACKOFF_FIRST  # it had been up a while: retry quickly
                await trio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, BACKOFF_MAX)

    @asynccontextmanager
    async def _open_client(self) -> AsyncIterator[Any]:
        options: dict[str, Any] = {
            "connect_timeout": self.timeout,
            "stream_timeout": None,
            "decode_responses": False,
            "username": self._username,
            "password": self._password,
        }
        if self.kind == "cluster":
            # Every listed node is a way in: the first that answers tells the layout.
            nodes = [TCPLocation(host, port) for host, port in self._hosts]
            client: Any = coredis.RedisCluster(startup_nodes=nodes, **options)
        elif self.kind == "sentinel":
            # Asks the sentinels for the current primary on every (re)connect,
            # so a failover is followed by the next reconnect.
            sentinels = [TCPLocation(host, port) for host, port in self._hosts]
            async with coredis.Sentinel(
                sentinels, sentinel_kwargs={"connect_timeout": self.timeout}
            ) as sentinel:
                client = sentinel.primary_for(self._service, db=self._db, **options)
                async with client:
                    yield client
            return
        else:
            host, port = self._hosts[0]
            client = coredis.Redis(host=host, port=port, db=self._db, **options)
        async with client:
            yield client

    async def _connect_and_listen(self) -> None:
        try:
            await self._listen()
        except BaseExceptionGroup as group:
            # On cancellation coredis's pub/sub cleanup writes to a connection
            # its pool already closed and adds that error to the Cancelled:
            # let only the cancellation through.
            cancelled, _ = group.split(trio.Cancelled)
            if cancelled is not None:
                raise cancelled from None
            raise

    async def _listen(self) -> None:
        async with self._open_client() as client:
            with trio.fail_after(self.timeout):
                await client.ping()
            pubsub = client.pubsub(
                retry_policy=None, ignore_subscribe_messages=True, max_idle_seconds=1
            )
            async with pubsub:
                with trio.fail_after(self.timeout):
                    await pubsub.subscribe(self._control_channel, self._reply_channel)
                self._client, self._pubsub = client, pubsub
                self._script = client.register_script(PUBLISH_SCRIPT)
                if self._connections or self._tracked:
                    LOGGER.info(
                        "backplane connected; resynchronising %d topics", len(self._tracked)
                    )
                self.connected = True
                # The first connection is no reconnect (/health said 1 after it).
                self.reconnects = self._connections
                self._connections += 1
                self._connected.set()
                self._wake_publisher.set()
                for tracked in list(self._tracked.values()):
                    self._start_sync(tracked, resume=tracked.synced)
                async for message in pubsub:
                    if message["type"] == "message":
                        self._on_message(message["channel"], message["data"])
            raise BackplaneUnavailable("the pub/sub connection ended")

    # --- receiving -------------------------------------------------------------------

    def _on_message(self, channel: bytes, data: bytes) -> None:
        if channel == self._control_channel:
            try:
                self._control_send.send_nowait(orjson.loads(data))
            except trio.WouldBlock:
                LOGGER.warning("control backlog full: a cluster-wide question went unanswered")
            return
        if channel == self._reply_channel:
            reply = orjson.loads(data)
            question = self._questions.get(reply.get("id", ""))
            if question is not None:
                question.answers[reply["node"]] = reply.get("result")
                if question.expected <= set(question.answers):
                    question.done.set()
            return
        tracked = self._tracked.get(channel)
        if tracked is None:
            return  # unsubscribing from it
        if self._behind(data):
            # The node's fan-out is more than max_lag behind Redis: its publishers
            # outrun it, and coredis queues without bound. Skipping the fan-out is
            # cheap, so the queue drains; once caught up, the skipped topics are
            # filled in from their streams, as after a reconnect.
            self.shed += 1
            tracked.stale = True
            return
        event = _decode(tracked.topic, data)
        if tracked.syncing:
            if len(tracked.buffer) < SYNC_BUFFER:
                tracked.buffer.append(event)
            else:
                tracked.overflowed = True
            return
        delivery = self.broker.deliver(tracked.tenant, event)
        if delivery is Delivery.GAP:
            self.gaps += 1
            tracked.buffer.append(event)
            self._start_sync(tracked, resume=True)
        elif delivery is Delivery.DUPLICATE and self._reissued(tracked, event):
            tracked.retire = True
            self._start_sync(tracked, resume=True)

    def _behind(self, data: bytes) -> bool:
        """Whether this event waited longer than ``max_lag`` (hysteresis: half to recover)."""
        age = time.time() - int(data.split(b" ", 3)[2]) / 1000
        if self._shedding:
            if age > self.max_lag / 2:
                return True
            self._shedding = False
            stale = [tracked for tracked in self._tracked.values() if tracked.stale]
            LOGGER.warning(
                "caught up with Redis after skipping %d events; refilling %d topics from history",
                self.shed - self._shed_before,
                len(stale),
            )
            for tracked in stale:
                tracked.stale = False
                self._start_sync(tracked, resume=True)
            return False
        if age > self.max_lag:
            self._shedding = True
            self._shed_before = self.shed
            LOGGER.warning(
                "fan-out is %.1f s behind Redis (max_lag %.1f s): skipping events until caught up",
                age,
                self.max_lag,
            )
            return True
        return False

    def _reissued(self, tracked: _Tracked, event: Event) -> bool:
        """Whether an offset this node already delivered came back with another event.

        A duplicate is normal just after a sync (the pub/sub copy of an event
        the sync fetched arrives late); the same offset with other content
        means Redis went back in time and is handing offsets out again.
        """
        events, _ = self.broker.history(event.topic, event.seq - 1, 1, tracked.tenant)
        if not events or events[0].seq != event.seq:
            return False  # not retained here: nothing to compare with
        known = events[0]
        return (known.timestamp, known.payload_json) != (event.timestamp, event.payload_json)

    def _start_sync(self, tracked: _Tracked, *, resume: bool) -> None:
        if tracked.syncing or self._nursery is None:
            return
        tracked.syncing = True
        self._nursery.start_soon(self._sync, tracked, resume)

    async def _sync(self, tracked: _Tracked, resume: bool) -> None:
        """Subscribe to a topic's channel, then bring the node's copy up to date.

        Subscribing first and reading second means nothing published in
        between is missed: it is either in what we read or in the buffer.
        """
        try:
            while True:
                await self._connected.wait()
                if self._tracked.get(tracked.channel) is not tracked:
                    return
                try:
                    with trio.fail_after(self.timeout):
                        await self._pubsub.subscribe(tracked.channel)
                        await self._catch_up(tracked, resume)
                except Exception as exc:
                    LOGGER.warning("synchronising %r failed: %s", tracked.topic, _cause(exc))
                    if self._connected.is_set():
                        await trio.sleep(BACKOFF_MAX)
                    continue
                if not tracked.overflowed:
                    break
                tracked.overflowed = False
                resume = True
        finally:
            tracked.syncing = False
        buffered, tracked.buffer = tracked.buffer, []
        for event in sorted(buffered, key=lambda e: e.seq):
            if self.broker.deliver(tracked.tenant, event) is Delivery.GAP:
                # Only a stream reset races with a sync; start over.
                tracked.buffer.append(event)
                self._start_sync(tracked, resume=True)
                return
        tracked.synced = True
        tracked.ready.set()

    async def _catch_up(self, tracked: _Tracked, resume: bool) -> None:
        tenant, topic = tracked.tenant, tracked.topic
        namespace = self.broker.namespaces.resolve(topic)
        if namespace is None:
            return
        known = self.broker.position(topic, tenant) if resume else None
        size = max(namespace.history_size, 1)
        position, events = await self._fetch(
            tenant,
            topic,
            after=None if known is None else known.seq,
            count=size,
            ttl=namespace.history_ttl,
            ensure=True,
        )
        assert position is not None  # ensure=True gives every topic an epoch
        if known is None:
            self.broker.load(tenant, topic, position, events)
            return
        if position == known and not tracked.retire:
            return
        retire, tracked.retire = tracked.retire, False
        if position.epoch == known.epoch and (retire or position.seq < known.seq):
            # Redis lost writes this node saw (a failover to a lagging replica, a
            # crash with fsync every second). Its offsets would be handed out a
            # second time, to other events: retire the epoch instead.
            position = await self._new_epoch(tenant, topic, known.epoch)
            events = []
        elif position.epoch == known.epoch:
            if events and events[0].seq == known.seq + 1 and events[-1].seq == position.seq:
                for event in events:
                    self.broker.deliver(tenant, event)
                return
        else:
            # A new stream (Redis lost the old one, or it expired). If all of
            # it is still retained, subscribers just continue with it.
            _, events = await self._fetch(
                tenant, topic, after=0, count=size, ttl=namespace.history_ttl
            )
            if (not events and position.seq == 0) or (
                events and events[0].seq == 1 and events[-1].seq == position.seq
            ):
                self.broker.load(tenant, topic, Position(0, position.epoch), [])
                for event in events:
                    self.broker.deliver(tenant, event)
                return
        self.lost += 1
        closed = self.broker.lost(
            tenant, topic, CloseCode.INSUFFICIENT_STATE, "events were lost; resume to see which"
        )
        LOGGER.warning(
            "%r: events after %d (epoch %s) are no longer in Redis; closed %d subscribers",
            topic,
            known.seq,
            known.epoch,
            closed,
        )
        _, tail = await self._fetch(
            tenant, topic, after=None, count=size, ttl=namespace.history_ttl
        )
        self.broker.load(tenant, topic, position, tail)

    async def _new_epoch(self, tenant: str, topic: str, retired: str) -> Position:
        """Replace a topic's epoch (if it is still ``retired``) and start its offsets over."""
        tid = topic_id(tenant, topic)
        seq, epoch = await self._client.eval(
            NEW_EPOCH_SCRIPT,
            keys=[f"{PREFIX}:{tid}:meta", f"{PREFIX}:{tid}:stream"],
            args=[retired, secrets.token_hex(4), int(META_TTL * 1000)],
        )
        LOGGER.warning("%r: Redis is behind this node; epoch %s retired", topic, retired)
        return Position(int(seq), _text(epoch))

    async def _fetch(
        self,
        tenant: str,
        topic: str,
        *,
        after: int | None,
        count: int,
        ttl: float,
        ensure: bool = False,
    ) -> tuple[Position | None, list[Event]]:
        """A topic's position and its retained events (after an offset, or the latest).

        With ``ensure``, a topic without metadata gets an epoch at offset 0.
        """
        tid = topic_id(tenant, topic)
        meta_key, stream_key = f"{PREFIX}:{tid}:meta", f"{PREFIX}:{tid}:stream"
        client = self._client
        if client is None:
            raise BackplaneUnavailable("not connected to Redis")
        async with client.pipeline(transaction=True) as pipe:
            if ensure:
                meta_request = pipe.eval(
                    ENSURE_SCRIPT,
                    keys=[meta_key, stream_key],
                    args=[secrets.token_hex(4), int(META_TTL * 1000)],
                )
            else:
                meta_request = pipe.hmget(meta_key, ["s", "e"])
            if after is None:
                entries_request = pipe.xrevrange(stream_key, "+", "-", count=count)
            else:
                entries_request = pipe.xrange(stream_key, f"{after + 1}-0", "+", count=count)
        seq, epoch = await meta_request
        entries = list(await entries_request or ())
        if after is None:
            entries.reverse()
        if seq is None or epoch is None:
            return None, []
        cutoff = (time.time() - ttl) * 1000
        events: list[Event] = []
        for entry in entries:
            data = entry.field_values[b"m"]
            if int(data.split(b" ", 3)[2]) >= cutoff:
                events.append(_decode(topic, data))
        return Position(int(seq), _text(epoch)), events

    # --- background tasks ----------------------------------------------------------------

    async def _publisher(self) -> None:
        while True:
            if not self._pending:
                await self._wake_publisher.wait()
                self._wake_publisher = trio.Event()
                continue
            self._expire_pending()
            if not self.connected:
                # Wait for Redis, but no longer than the oldest publication may.
                if self._pending:
                    with trio.move_on_at(self._pending[0].deadline):
                        await self._connected.wait()
                continue
            batch = [self._pending.popleft() for _ in range(min(PUBLISH_BATCH, len(self._pending)))]
            for item in batch:
                item.attempted = True
            try:
                results = await self._publish_batch(batch)
            except Exception as exc:
                # Put them back in order and let the reconnect loop notice;
                # the script recognises those Redis had applied already.
                LOGGER.warning("publishing to the backplane failed: %s", _cause(exc))
                self._pending.extendleft(reversed(batch))
                with trio.move_on_after(BACKOFF_FIRST * 4):
                    await trio.sleep_forever()
                continue
            for item, result in zip(batch, results, strict=True):
                on_done = item.publication.on_done
                if on_done is not None:
                    on_done(result)

    async def _publish_batch(self, batch: list[_Pending]) -> list[Position | BrokerError]:
        now_ms = str(int(time.time() * 1000))
        timestamp = rfc3339_now()
        # The epoch a topic gets if this publication starts its stream: one per
        # batch (os.urandom per publication was 7% of a publishing node's CPU).
        new_epoch = secrets.token_hex(4)
        with trio.fail_after(self.timeout):
            async with self._client.pipeline(transaction=False) as pipe:
                requests = [
                    self._script(
                        *self._script_call(item, new_epoch, now_ms, timestamp), client=pipe
                    )
                    for item in batch
                ]
            results = [await request for request in requests]
        outcomes = [_outcome(result) for result in results]
        for result in results:
            if len(result) == 2:
                self.sequenced += 1
            elif _text(result[2]) == "replayed":
                self.replayed += 1
            else:
                self.conflicts += 1
        return outcomes

    def _script_call(
        self, item: _Pending, new_epoch: str, now_ms: str, timestamp: str
    ) -> tuple[list[str], list[Any]]:
        """The keys and arguments of PUBLISH_SCRIPT for one publication."""
        publication = item.publication
        namespace = self.broker.namespaces.resolve(publication.topic)
        size = namespace.history_size if namespace else 0
        ttl_ms = int((namespace.history_ttl if namespace else 0) * 1000) or 1
        tid = topic_id(publication.tenant, publication.topic)
        keys = [
            f"{PREFIX}:{tid}:meta",
            f"{PREFIX}:{tid}:stream",
            f"{PREFIX}:{tid}:sent:{self._incarnation}",
        ]
        args = [
            f"{PREFIX}:topic:{tid}",
            publication.payload_json,
            size,
            ttl_ms,
            int(max(META_TTL, ttl_ms / 1000) * 1000),
            new_epoch,
            now_ms,
            timestamp,
            item.number,
            DEDUPE_RING,
        ]
        key = publication.idempotency_key
        if key is not None:
            window = self.broker.idempotency
            keys += [f"{PREFIX}:{tid}:idem", f"{PREFIX}:{tid}:idem-at"]
            args += [
                key,
                fingerprint(publication.payload_json),
                int(window.window * 1000) or 1,
                window.max_keys,
            ]
        return keys, args

    def _expire_pending(self) -> None:
        now = trio.current_time()
        while self._pending and self._pending[0].deadline <= now:
            item = self._pending.popleft()
            if item.attempted:
                # Sent, but Redis never confirmed: it may or may not be published.
                self._refuse(
                    item.publication, "Redis did not confirm the event in time", unsure=True
                )
            else:
                self._refuse(item.publication, "the backplane (Redis) is away")

    def _refuse(self, publication: Publication, why: str, *, unsure: bool = False) -> None:
        if unsure:
            self.unconfirmed += 1
            refusal = BrokerError(ErrorCode.UNCONFIRMED, f"{why}; it may have been published")
        else:
            self.dropped += 1
            refusal = _unavailable(f"{why}; the event was not published")
        if publication.on_done is not None:
            publication.on_done(refusal)

    async def _unsubscriber(self) -> None:
        while True:
            await self._wake_unsubscriber.wait()
            self._wake_unsubscriber = trio.Event()
            channels = [c for c in self._unsubscribe if c not in self._tracked]
            self._unsubscribe.clear()
            if not channels or self._pubsub is None:
                continue  # after a reconnect only tracked channels are subscribed
            try:
                with trio.fail_after(self.timeout):
                    await self._pubsub.unsubscribe(*channels)
            except Exception as exc:
                LOGGER.debug("unsubscribing from %d channels failed: %s", len(channels), exc)

    async def _responder(self) -> None:
        async for question in self._control_receive:
            try:
                if question.get("from") == self.node_id:
                    continue
                result = self._answer(str(question.get("op")), question.get("body") or {})
                reply = {"id": question.get("id"), "node": self.node_id, "result": result}
                channel = f"{PREFIX}:control:{question.get('from')}"
                if self._client is not None:
                    with trio.fail_after(self.timeout):
                        await self._client.publish(channel, orjson.dumps(reply))
            except Exception as exc:
                LOGGER.warning("answering a cluster-wide question failed: %s", exc)

    async def _announcer(self) -> None:
        # At once on (re)connecting, so a new node answers cluster-wide questions
        # from its first second; then every ANNOUNCE_INTERVAL.
        while True:
            await self._connected.wait()
            entry = {"node": self.node_id, "at": time.time(), **self._node_stats()}
            try:
                with trio.fail_after(self.timeout):
                    await self._client.hset(self._nodes_key, {self.node_id: orjson.dumps(entry)})
            except Exception as exc:
                LOGGER.debug("announcing this node failed: %s", exc)
            await trio.sleep(ANNOUNCE_INTERVAL)

    async def _live_nodes(self) -> list[str]:
        raw = await self._client.hgetall(self._nodes_key)
        now = time.time()
        live: list[str] = []
        gone: list[str] = []
        for node, value in raw.items():
            at = orjson.loads(value).get("at", 0)
            (live if now - at <= NODE_TTL else gone).append(node.decode())
        if gone:
            await self._client.hdel(self._nodes_key, gone)
        return live

    async def forget_self(self) -> None:
        """Leave the node registry (on a graceful shutdown)."""
        if self._client is None or not self.connected:
            return  # the others stop counting it within NODE_TTL anyway
        try:
            with trio.move_on_after(self.timeout):
                await self._client.hdel(self._nodes_key, [self.node_id])
        except Exception as exc:
            LOGGER.debug("leaving the node registry failed: %s", _cause(exc))

    def _channel(self, tenant: str, topic: str) -> bytes:
        return f"{PREFIX}:topic:{topic_id(tenant, topic)}".encode()


def _outcome(result: list[Any]) -> Position | BrokerError:
    """What PUBLISH_SCRIPT answered: a position, the first one of a key seen
    before (``replayed``), or the key's conflict with another payload."""
    position = Position(int(result[0]), _text(result[1]))
    if len(result) > 2 and _text(result[2]) == "conflict":
        return BrokerError(
            ErrorCode.IDEMPOTENCY_CONFLICT,
            "the idempotency key was used for another payload on this topic within the window",
        )
    return position


def _decode(topic: str, data: bytes) -> Event:
    seq, epoch, _ms, timestamp, payload = data.split(b" ", 4)
    return Event(
        topic, int(seq), epoch.decode(), orjson.loads(payload), timestamp.decode(), payload
    )


def _cause(exc: BaseException) -> str:
    """The first real error inside the exception groups coredis and Trio wrap it in."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


__all__ = ["RedisBackplane", "parse_url", "redacted", "topic_id"]
