"""The Redis backplane: one set of topics, history and presence for many nodes.

How an event travels. A node hands the publication to :meth:`RedisBackplane.send`;
a publisher task runs a Lua script per publication, a batch of them pipelined in
one round trip, that increments the topic's offset, appends the event to the
topic's stream (its history, trimmed to the namespace's size) and publishes it on
the topic's channel, all atomically. Every node that has subscribers for the
topic is subscribed to that channel, receives the event once, and fans it out
locally through :meth:`~tidings.broker.broker.Broker.deliver`. So Redis traffic
grows with nodes, not clients, and the offset order is Redis's order everywhere.

Both hot paths have sockets of their own (:mod:`.link`, :mod:`.resp`), not
coredis: the pub/sub listener parses everything one socket read brought and
delivers it (up to the broker's batch size) before it yields, so each
connection's writer finds those events queued together and sends them in one
write, as it does for the broker's own batches; and the publisher writes a
batch of script calls in one write and parses the answers itself. The
listener reads only as fast as the node fans out, so what a node has not
handled yet waits in the kernel and in Redis's output buffer for it (bounded by
``client-output-buffer-limit pubsub``), not in the node. coredis serves the
rest: history, catching up, the node registry, cluster-wide questions.

Redis pub/sub is at most once: a node that loses its connection misses what
was published meanwhile, silently. Offsets make that visible: an event whose
offset is not the next one makes the node fetch the missing ones from the
stream first (and when the stream no longer reaches back, close the topic's
subscribers with 4010 so they resume and learn what is gone). After a
reconnect every tracked topic is checked the same way.

Epochs and failover. Redis may lose the last writes it acknowledged: a failover
to a replica that lagged, a crash with ``appendfsync everysec``. Their offsets
must not be handed out again to other events in the same epoch, where nodes
would take them for events they already delivered. So every topic records the
Redis process (its ``run_id``) that last wrote it, and the first write by
another process moves the topic to a new epoch that continues the offsets,
recording where the old epoch left off on this server (``p``). Nodes and
resuming clients that are at or before that point carry on with nothing lost;
those that saw later events of the old epoch (events this server lost) are
closed with 4010 and, resuming, get everything the new epoch holds with
``recovered: false``. With ``durability="replicated"`` a publication is
acknowledged only once a replica has it too (``WAIT``), so none that was
acknowledged is lost at a failover.

In a Redis Cluster each topic's keys and channel share one hash slot, and the
channel is a shard channel (``SPUBLISH``/``SSUBSCRIBE``, Redis 7): an event
crosses only its shard. A node keeps a pub/sub and a publishing link to every
primary; when slots move it reconnects and resynchronises.

Cluster-wide questions (presence, channels, disconnecting a user) go to every
live node over a control channel and are answered from each node's memory;
nodes announce themselves and their counters in a hash every second.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final, Literal

import attrs
import coredis
import orjson
import trio
from coredis.connection import TCPLocation

from ..broker.backplane import Publication
from ..broker.broker import MAX_BATCH, Broker, Delivery
from ..errors import BrokerError
from ..protocol.clock import rfc3339_now
from ..protocol.codes import CloseCode, ErrorCode
from ..protocol.idempotency import fingerprint
from ..protocol.messages import ClientInfo, Event, Position
from .link import (
    Link,
    LinkClosed,
    key_slot,
    milliseconds,
    parse_cluster_slots,
    sentinel_primary,
)
from .resp import ProtocolError, ReplyError, Value, command
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
#: A pub/sub link silent this long is pinged; silent as long again, it is dead.
KEEPALIVE: Final = 1.0
#: A publication batch unanswered this long means Redis is stalled (frozen,
#: swapping, a slow script): /health says degraded before the timeout gives up.
STALL_AFTER: Final = 0.5
#: How many ``backplane_timeout`` a subscribe waits for a topic's first sync
#: while Redis answers in time: the node itself is slow then (a reconnect
#: storm), and a client refused would only come back and add to the herd.
SLOW_NODE_PATIENCE: Final = 3
#: Epochs of a topic a node remembers having left, to ignore their late events.
RETIRED_EPOCHS: Final = 4
#: Error replies that mean "this server no longer serves this key": reconnect.
_MOVED: Final = frozenset({"MOVED", "READONLY", "MASTERDOWN", "LOADING"})
#: Error replies that mean "try again shortly" (a slot being migrated).
_BUSY: Final = frozenset({"ASK", "TRYAGAIN", "CLUSTERDOWN", "BUSY"})

Durability = Literal["primary", "replicated"]
"""When a publication is acknowledged: once the primary has it, or a replica too."""

# Lua shared by the scripts below (KEYS[1] meta hash, KEYS[2] stream; NEW_EPOCH
# and RUN_ID name arguments). A topic without metadata (new, expired, or lost
# with Redis) starts a new epoch at offset 0 and drops any stream left over.
# A topic that another Redis process wrote last (before a failover or a restart,
# which may have lost that process's latest writes) goes on in a new epoch with
# the same offsets; 'p' keeps the old epoch and the last offset held of it.
_START_STREAM: Final = """
local meta = redis.call('HMGET', KEYS[1], 'e', 'r', 's')
local epoch = meta[1]
if not epoch then
  epoch = NEW_EPOCH
  redis.call('HSET', KEYS[1], 'e', epoch, 's', 0, 'r', RUN_ID)
  redis.call('DEL', KEYS[2])
elseif meta[2] ~= RUN_ID then
  redis.call('HSET', KEYS[1], 'p', epoch .. ' ' .. meta[3], 'e', NEW_EPOCH, 'r', RUN_ID)
  epoch = NEW_EPOCH
end"""

# KEYS: meta hash, stream. ARGV: channel, payload, history size, history ttl (ms),
# meta ttl (ms), epoch for a new stream, wall time (ms), timestamp (RFC 3339).
# The message is "seq epoch ms timestamp payload": the payload last, as is.
#
# KEYS[3] remembers this node's recent publications (a ring of DEDUPE_RING
# slots, ARGV[9] being the node's publication number): a batch retried after
# a broken connection must not publish twice what Redis had already applied.
#
# ARGV[11] is the server's run_id (see _START_STREAM), ARGV[12] the command that
# publishes on the channel: PUBLISH, or SPUBLISH for a shard channel (Cluster); or
# empty, and the script returns the message for the caller to publish once a
# replica has the event (durability "replicated"), from the stream if it is a retry.
#
# A publication with an idempotency key (ARGV[13]; absent otherwise, and so is
# all of this) is checked against the topic's window, for every node at once:
# KEYS[4] a hash key -> "seq epoch fingerprint ms", KEYS[5] the same keys by
# time. ARGV[14] is the payload's fingerprint, ARGV[15] the window (ms),
# ARGV[16] the most keys kept per topic (the oldest go first). A key seen before
# answers {seq, epoch, '', 'replayed'} (or 'conflict', for another payload):
# four elements, unlike every other answer.
PUBLISH_SCRIPT: Final = (
    """
local slot = tostring(tonumber(ARGV[9]) % tonumber(ARGV[10]))
local seen = redis.call('HGET', KEYS[3], slot)
if seen then
  local number, seen_seq, seen_epoch = string.match(seen, '^(%d+) (%d+) (%S+)$')
  if number == ARGV[9] then
    if ARGV[12] ~= '' then return {tonumber(seen_seq), seen_epoch} end
    local id = seen_seq .. '-1'
    local entry = redis.call('XRANGE', KEYS[2], id, id)[1]
    return {tonumber(seen_seq), seen_epoch, entry and entry[2][2] or false}
  end
end
local key = ARGV[13]
if key then
  local cutoff = tonumber(ARGV[7]) - tonumber(ARGV[15])
  local expired = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', cutoff, 'LIMIT', 0, 64)
  if #expired > 0 then
    redis.call('HDEL', KEYS[4], unpack(expired))
    redis.call('ZREM', KEYS[5], unpack(expired))
  end
  local known = redis.call('HGET', KEYS[4], key)
  if known then
    local known_seq, known_epoch, print, at = string.match(known, '^(%d+) (%S+) (%S+) (%d+)$')
    if tonumber(at) > cutoff then
      local outcome = (print == ARGV[14]) and 'replayed' or 'conflict'
      return {tonumber(known_seq), known_epoch, '', outcome}
    end
  end
end
"""
    + _START_STREAM.replace("NEW_EPOCH", "ARGV[6]").replace("RUN_ID", "ARGV[11]")
    + """
local seq = redis.call('HINCRBY', KEYS[1], 's', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
local message = seq .. ' ' .. epoch .. ' ' .. ARGV[7] .. ' ' .. ARGV[8] .. ' ' .. ARGV[2]
local size = tonumber(ARGV[3])
if size > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', size, seq .. '-1', 'm', message)
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
redis.call('HSET', KEYS[3], slot, ARGV[9] .. ' ' .. seq .. ' ' .. epoch)
redis.call('PEXPIRE', KEYS[3], 60000)
if key then
  redis.call('HSET', KEYS[4], key, seq .. ' ' .. epoch .. ' ' .. ARGV[14] .. ' ' .. ARGV[7])
  redis.call('ZADD', KEYS[5], ARGV[7], key)
  local excess = redis.call('ZCARD', KEYS[5]) - tonumber(ARGV[16])
  if excess > 0 then
    local oldest = redis.call('ZPOPMIN', KEYS[5], excess)
    for i = 1, #oldest, 2 do redis.call('HDEL', KEYS[4], oldest[i]) end
  end
  redis.call('PEXPIRE', KEYS[4], ARGV[15])
  redis.call('PEXPIRE', KEYS[5], ARGV[15])
end
if ARGV[12] == '' then return {seq, epoch, message} end
redis.call(ARGV[12], ARGV[1], message)
return {seq, epoch}
"""
)

# KEYS: meta hash, stream. ARGV: epoch for a new stream, meta ttl (ms), run_id.
# Gives a followed topic an epoch before its first event, so subscribers get a
# position they can resume from. Returns offset, epoch and the previous epoch.
ENSURE_SCRIPT: Final = (
    """
"""
    + _START_STREAM.replace("NEW_EPOCH", "ARGV[1]").replace("RUN_ID", "ARGV[3]")
    + """
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('HMGET', KEYS[1], 's', 'e', 'p')
"""
)

# KEYS: meta hash. ARGV: the epoch to leave, its successor, meta ttl (ms), run_id.
# Redis handed out again an offset a node had delivered (it lost writes that the
# run_id check could not see): the topic goes on in a new epoch from where Redis is.
FORK_SCRIPT: Final = """
local meta = redis.call('HMGET', KEYS[1], 'e', 's')
if meta[1] == ARGV[1] then
  redis.call('HSET', KEYS[1], 'p', meta[1] .. ' ' .. meta[2], 'e', ARGV[2], 'r', ARGV[4])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return redis.call('HMGET', KEYS[1], 's', 'e', 'p')
"""

Answerer = Callable[[str, dict[str, Any]], Any]
"""Answers a cluster-wide question (``presence``, ``channels``, ``disconnect``) for this node."""


class BackplaneUnavailable(Exception):
    """Redis could not be reached within the backplane timeout."""


class TopologyChanged(Exception):
    """Slots moved, or a primary changed: reconnect and resynchronise."""


def _unavailable(message: str) -> BrokerError:
    return BrokerError(ErrorCode.UNAVAILABLE, message)


@functools.lru_cache(maxsize=65536)
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
    retired: deque[str] = attrs.Factory(lambda: deque(maxlen=RETIRED_EPOCHS))
    """Epochs this node left for a newer one: late events of theirs are ignored."""
    deadline: float = 0.0
    """When the sync's attempt under way times out (trio's clock); 0 before the first."""


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


@attrs.define(slots=True, eq=False)
class _Shard:
    """One primary: a link for pub/sub, a link for publications."""

    pubsub: Link
    publisher: Link
    run_id: bytes
    script: bytes
    """The SHA1 of PUBLISH_SCRIPT, loaded on this server."""
    version: tuple[int, ...]
    confirming: dict[bytes, deque[trio.Event]] = attrs.Factory(dict)
    """Subscriptions sent and not yet confirmed, by channel."""
    unsubscribing: dict[bytes, int] = attrs.Factory(dict)
    """Unsubscriptions sent and not yet confirmed, by channel."""


@attrs.define(slots=True, eq=False)
class _Session:
    """One generation of connections to Redis; any failure ends all of it."""

    shards: list[_Shard] = attrs.Factory(list)
    slots: list[int] | None = None
    """Shard index of every cluster slot (None outside a cluster: one shard)."""
    sharded: bool = False
    """Topic channels are shard channels (SSUBSCRIBE), on their slot's primary."""
    scope: trio.CancelScope | None = None
    error: BaseException | None = None
    ended: bool = False
    closed: trio.Event = attrs.Factory(trio.Event)
    """Set once its links are closed."""

    def shard_of(self, channel: bytes) -> _Shard:
        """The primary that holds the keys of the topic with this channel."""
        if self.slots is None:
            return self.shards[0]
        return self.shards[self.slots[key_slot(channel)]]

    def listener_of(self, channel: bytes) -> _Shard:
        """Where to subscribe to a topic's channel: its primary if sharded, else any."""
        return self.shard_of(channel) if self.sharded else self.shards[0]

    def fail(self, error: BaseException) -> None:
        """End the session (from any task): its links are closed and the node reconnects."""
        if self.error is None:
            self.error = error
        if self.scope is not None:
            self.scope.cancel()

    def end(self) -> None:
        """Wake everyone waiting on this session's links; they find it ended."""
        self.ended = True
        for shard in self.shards:
            for waiters in shard.confirming.values():
                for waiter in waiters:
                    waiter.set()
            shard.confirming.clear()


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
        durability: Durability = "primary",
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
        self.durability = durability
        """``primary``: acknowledge once Redis sequenced a publication; ``replicated``:
        once a replica has it too (``WAIT 1``), so that it survives a failover."""
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
        self.replayed = 0
        """Publications whose idempotency key Redis already held: answered, not published."""
        self.conflicts = 0
        """Publications refused: their idempotency key was held for another payload."""
        self.sequenced = 0
        """Publications of this node that Redis sequenced (each event counted once, on its node)."""
        self.gaps = 0
        """Times a topic's events arrived with a hole that had to be filled from history."""
        self.lost = 0
        """Times a hole could not be filled: subscribers were closed with 4010."""
        self.epochs = 0
        """Times a followed topic went on in a new epoch (a failover or restart of Redis)."""
        self._client: Any = None
        self._session: _Session | None = None
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
        self._unreplicated_warned = False
        self._run_ids: set[bytes] = set()

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
        patience = trio.current_time() + self.timeout * SLOW_NODE_PATIENCE
        with trio.move_on_after(self.timeout):
            await tracked.ready.wait()
        if not tracked.synced and tracked.deadline > trio.current_time():
            # A busy node (a reconnect storm) started the sync late: its attempt
            # is bounded by the same timeout; refusing before it ends would
            # blame Redis for the node's own queue.
            with trio.move_on_at(tracked.deadline):
                await tracked.ready.wait()
        if not tracked.synced and self.healthy and self._tracked.get(channel) is tracked:
            # Redis answers publications in time: the node is what is slow (a
            # reconnect storm runs thousands of handshakes between two steps of
            # a sync). Wait for the sync's next attempt, within bounds.
            with trio.move_on_at(patience):
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
                position, _, events = await self._fetch(
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

    @property
    def stalled(self) -> bool:
        """Connected, but a publication batch has waited STALL_AFTER for Redis's
        answer, or the session is failing and not yet torn down."""
        session = self._session
        if session is None:
            return False
        if session.error is not None:
            return True
        deadline = trio.current_time() - STALL_AFTER
        return any(
            shard.publisher.waiting_since is not None and shard.publisher.waiting_since < deadline
            for shard in session.shards
        )

    @property
    def healthy(self) -> bool:
        """Connected, and Redis answers publications in time."""
        return self.connected and not self.stalled

    def status(self) -> dict[str, Any]:
        """For /health and metrics."""
        session = self._session
        return {
            "kind": self.kind,
            "url": redacted(self.url),
            "connected": self.connected,
            "stalled": self.stalled,
            "durability": self.durability,
            "shards": len(session.shards) if session is not None else 0,
            "pending": len(self._pending),
            "dropped": self.dropped,
            "unconfirmed": self.unconfirmed,
            "reconnects": self.reconnects,
            "gaps": self.gaps,
            "lost": self.lost,
            "epochs": self.epochs,
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
                    self._client = None
                if trio.current_time() - started > 10 * BACKOFF_MAX:
                    delay = BACKOFF_FIRST  # it had been up a while: retry quickly
                await trio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, BACKOFF_MAX)

    @asynccontextmanager
    async def _open_client(self, address: tuple[str, int]) -> AsyncIterator[Any]:
        """coredis, for everything but the hot paths: on the primary the links use,
        or (in a cluster) routing by slot itself."""
        options: dict[str, Any] = {
            "connect_timeout": self.timeout,
            "stream_timeout": None,
            "decode_responses": False,
            "username": self._username,
            "password": self._password,
        }
        client: Any
        if self.kind == "cluster":
            # Every listed node is a way in: the first that answers tells the layout.
            nodes = [TCPLocation(host, port) for host, port in self._hosts]
            client = coredis.RedisCluster(startup_nodes=nodes, **options)
        else:
            client = coredis.Redis(host=address[0], port=address[1], db=self._db, **options)
        async with client:
            yield client

    async def _connect_and_listen(self) -> None:
        try:
            await self._listen()
        except BaseExceptionGroup as group:
            # On cancellation coredis's cleanup may write to a connection its
            # pool already closed and add that error to the Cancelled: let only
            # the cancellation through.
            cancelled, _ = group.split(trio.Cancelled)
            if cancelled is not None:
                raise cancelled from None
            raise

    async def _listen(self) -> None:
        session = _Session()
        try:
            with trio.fail_after(self.timeout * 2):
                await self._open_session(session)
            run_ids = {shard.run_id for shard in session.shards}
            if self._run_ids and not run_ids <= self._run_ids:
                LOGGER.warning(
                    "Redis is served by another process than before (a failover or a restart):"
                    " topics go on in new epochs; publications it had acknowledged and not"
                    " kept are lost%s",
                    "" if self.durability == "replicated" else " (durability primary)",
                )
            self._run_ids = run_ids
            async with self._open_client(session.shards[0].publisher.address) as client:
                with trio.fail_after(self.timeout):
                    await client.ping()
                async with trio.open_nursery() as listeners:
                    session.scope = listeners.cancel_scope
                    for shard in session.shards:
                        listeners.start_soon(self._read, session, shard)
                    with trio.fail_after(self.timeout):
                        await self._subscribe(
                            session,
                            session.shards[0],
                            [self._control_channel, self._reply_channel],
                            "SUBSCRIBE",
                        )
                    self._client, self._session = client, session
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
            raise session.error or BackplaneUnavailable("the pub/sub connection ended")
        finally:
            session.end()
            if self._session is session:
                self._session = None
            with trio.CancelScope(shield=True):
                for shard in session.shards:
                    await shard.pubsub.aclose()
                    await shard.publisher.aclose()
            session.closed.set()

    async def _open_session(self, session: _Session) -> None:
        """Find the primaries (Sentinel, Cluster) and open two links to each."""
        if self.kind == "sentinel":
            address = await sentinel_primary(self._hosts, self._service, each_timeout=self.timeout)
            addresses = [address]
        elif self.kind == "cluster":
            addresses, session.slots = await self._cluster_layout()
        else:
            addresses = [self._hosts[0]]
        for address in addresses:
            session.shards.append(await self._open_shard(address))
        # Shard channels (an event crosses only its shard) came with Redis 7.
        session.sharded = self.kind == "cluster" and session.shards[0].version >= (7,)

    async def _cluster_layout(self) -> tuple[list[tuple[str, int]], list[int]]:
        """The primaries of the cluster, and which of them serves each slot."""
        problems: list[str] = []
        for host, port in self._hosts:
            try:
                link = await self._connect(host, port)
            except (OSError, ReplyError, trio.TooSlowError) as exc:
                problems.append(f"{host}:{port}: {exc!r}")
                continue
            try:
                with trio.fail_after(self.timeout):
                    ranges = parse_cluster_slots(await link.call("CLUSTER", "SLOTS"))
            except (OSError, ReplyError, ProtocolError, LinkClosed, trio.TooSlowError) as exc:
                problems.append(f"{host}:{port}: {exc!r}")
                continue
            finally:
                await link.aclose()
            addresses: list[tuple[str, int]] = []
            slots = [-1] * 16384
            for first, last, address in ranges:
                if address not in addresses:
                    addresses.append(address)
                index = addresses.index(address)
                for slot in range(first, last + 1):
                    slots[slot] = index
            if addresses and -1 not in slots:
                return addresses, slots
            problems.append(f"{host}:{port}: not every slot is served")
        raise BackplaneUnavailable(f"no usable cluster layout: {'; '.join(problems)}")

    async def _connect(self, host: str, port: int) -> Link:
        return await Link.connect(
            host,
            port,
            connect_timeout=self.timeout,
            username=self._username,
            password=self._password,
            db=self._db if self.kind != "cluster" else 0,
        )

    async def _open_shard(self, address: tuple[str, int]) -> _Shard:
        host, port = address
        publisher = await self._connect(host, port)
        try:
            pubsub = await self._connect(host, port)
        except BaseException:
            await publisher.aclose()
            raise
        try:
            with trio.fail_after(self.timeout):
                role = await publisher.call("ROLE")
                if not (isinstance(role, list) and role and role[0] == b"master"):
                    raise TopologyChanged(f"{host}:{port} is not a primary (any more)")
                info = await publisher.call("INFO", "server")
                script = await publisher.call("SCRIPT", "LOAD", PUBLISH_SCRIPT)
        except BaseException:
            await publisher.aclose()
            await pubsub.aclose()
            raise
        run_id = _info_field(info, b"run_id")
        if not run_id or not isinstance(script, bytes):
            await publisher.aclose()
            await pubsub.aclose()
            raise BackplaneUnavailable(f"{host}:{port} did not say its run_id (INFO server)")
        return _Shard(pubsub, publisher, run_id, script, _version(info))

    # --- receiving -------------------------------------------------------------------

    async def _read(self, session: _Session, shard: _Shard) -> None:
        """Deliver what Redis sends on one pub/sub link, a socket read at a time.

        Everything one read brought is handed to the broker before the next
        read, yielding after every MAX_BATCH messages as the broker does for its
        own publications: each connection's writer then finds those events
        queued together and sends them in one write.
        """
        link = shard.pubsub
        pinged = False
        try:
            while True:
                # Silent for KEEPALIVE: ping; no answer within the timeout: dead.
                with trio.move_on_after(self.timeout if pinged else KEEPALIVE) as idle:
                    replies = await link.receive()
                if idle.cancelled_caught:
                    if pinged:
                        raise BackplaneUnavailable("Redis stopped answering (pub/sub ping)")
                    await link.send(command("PING"))
                    pinged = True
                    continue
                pinged = False
                batch = 0
                while replies:
                    for reply in replies:
                        self._on_push(session, shard, reply)
                        batch += 1
                        if batch == MAX_BATCH:
                            await trio.lowlevel.checkpoint()
                            batch = 0
                    # Before yielding to the writers, take what arrived meanwhile,
                    # up to a batch: fewer, fuller writes (events per write).
                    replies = link.receive_nowait() if batch else []
        except (OSError, LinkClosed, ProtocolError, BackplaneUnavailable, TopologyChanged) as exc:
            session.fail(exc)
        except trio.BrokenResourceError as exc:
            session.fail(exc)

    def _on_push(self, session: _Session, shard: _Shard, reply: Value) -> None:
        if isinstance(reply, ReplyError):
            # A subscription refused (MOVED: the slot is served elsewhere now).
            raise TopologyChanged(f"Redis refused a subscription: {reply}")
        if not isinstance(reply, list) or not reply or not isinstance(reply[0], bytes):
            raise ProtocolError(f"unexpected pub/sub reply {reply!r:.200}")
        kind = reply[0]
        if kind in (b"message", b"smessage") and len(reply) == 3:
            channel, data = reply[1], reply[2]
            if isinstance(channel, bytes) and isinstance(data, bytes):
                self._on_message(channel, data)
                return
        elif kind in (b"subscribe", b"ssubscribe") and len(reply) == 3:
            waiters = shard.confirming.get(reply[1])  # type: ignore[arg-type]
            if waiters:
                waiters.popleft().set()
                if not waiters:
                    del shard.confirming[reply[1]]  # type: ignore[arg-type]
            return
        elif kind in (b"unsubscribe", b"sunsubscribe") and len(reply) == 3:
            channel = reply[1]
            assert isinstance(channel, bytes) or channel is None
            asked = shard.unsubscribing.get(channel or b"", 0)
            if asked:
                if asked == 1:
                    del shard.unsubscribing[channel or b""]
                else:
                    shard.unsubscribing[channel or b""] = asked - 1
            elif kind == b"sunsubscribe":
                # Redis dropped our subscription itself: its slot moved to another shard.
                raise TopologyChanged(f"the slot of {channel!r} moved")
            return
        elif kind == b"pong":
            return
        raise ProtocolError(f"unexpected pub/sub reply {reply!r:.200}")

    async def _subscribe(
        self, session: _Session, shard: _Shard, channels: list[bytes], verb: str
    ) -> None:
        """Subscribe on a shard's pub/sub link and wait until Redis confirms it.

        Raises:
            BackplaneUnavailable: the session ended meanwhile.
        """
        waiters: list[trio.Event] = []
        for channel in channels:
            waiter = trio.Event()
            shard.confirming.setdefault(channel, deque()).append(waiter)
            waiters.append(waiter)
        try:
            # One command per channel: shard channels of different slots cannot share one.
            await shard.pubsub.send(b"".join(command(verb, channel) for channel in channels))
            for waiter in waiters:
                await waiter.wait()
        except BaseException:
            # Cancelled (a sync's timeout on a busy node), maybe before Redis got
            # the command or before its confirmation was read: a waiter left queued
            # would take the next confirmation of its channel, and every later
            # subscribe would wait for one confirmation more than it gets: the
            # topic could never be synchronised again. A confirmation that still
            # comes wakes the next waiter early, which is right: the channel is
            # subscribed by then.
            for channel, waiter in zip(channels, waiters, strict=True):
                queued = shard.confirming.get(channel)
                if queued is not None and waiter in queued:
                    queued.remove(waiter)
                    if not queued:
                        del shard.confirming[channel]
            raise
        if session.ended:
            raise BackplaneUnavailable("the connection to Redis ended while subscribing")

    def _on_message(self, channel: bytes, data: bytes) -> None:
        if channel in (self._control_channel, self._reply_channel):
            try:
                message = orjson.loads(data)
            except orjson.JSONDecodeError:
                LOGGER.warning("ignored a control message that is not JSON: %.100r", data)
                return
            if not isinstance(message, dict):
                LOGGER.warning("ignored a control message that is not an object: %.100r", data)
                return
        if channel == self._control_channel:
            try:
                self._control_send.send_nowait(message)
            except trio.WouldBlock:
                LOGGER.warning("control backlog full: a cluster-wide question went unanswered")
            return
        if channel == self._reply_channel:
            question = self._questions.get(str(message.get("id", "")))
            node = message.get("node")
            if question is not None and isinstance(node, str):
                question.answers[node] = message.get("result")
                if question.expected <= set(question.answers):
                    question.done.set()
            return
        tracked = self._tracked.get(channel)
        if tracked is None:
            return  # unsubscribing from it
        if self._behind(data):
            # The node's fan-out is more than max_lag behind Redis: its publishers
            # outrun it. Skipping the fan-out is cheap, so the backlog drains;
            # once caught up, the skipped topics are filled in from their
            # streams, as after a reconnect.
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
            if event.epoch in tracked.retired:
                return  # a late event of an epoch this node has left
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
                session = self._session
                if self._tracked.get(tracked.channel) is not tracked:
                    return
                try:
                    if session is None:
                        raise BackplaneUnavailable("not connected to Redis")
                    tracked.deadline = trio.current_time() + self.timeout
                    with trio.fail_at(tracked.deadline):
                        shard = session.listener_of(tracked.channel)
                        verb = "SSUBSCRIBE" if session.sharded else "SUBSCRIBE"
                        await self._subscribe(session, shard, [tracked.channel], verb)
                        await self._catch_up(tracked, resume)
                except Exception as exc:
                    if isinstance(exc, trio.TooSlowError) and self.healthy:
                        # Redis answers publications in time: this node was too
                        # busy to finish in time (a storm). Again, at once.
                        LOGGER.info(
                            "synchronising %r took over %.1f s on a busy node; again",
                            tracked.topic,
                            self.timeout,
                        )
                        await trio.lowlevel.checkpoint()
                        continue
                    LOGGER.warning("synchronising %r failed: %s", tracked.topic, _cause(exc))
                    if session is not None and self._session is session:
                        await trio.sleep(BACKOFF_MAX)  # Redis refused, not the link: wait
                    else:
                        await trio.lowlevel.checkpoint()  # the next session resyncs it
                    continue
                if not tracked.overflowed:
                    break
                tracked.overflowed = False
                resume = True
        finally:
            tracked.syncing = False
        if self._tracked.get(tracked.channel) is not tracked:
            return  # untracked meanwhile: what it buffered is another sync's to deliver
        buffered, tracked.buffer = tracked.buffer, []
        for event in sorted(buffered, key=lambda e: e.seq):
            if self.broker.deliver(tracked.tenant, event) is Delivery.GAP:
                if event.epoch in tracked.retired:
                    continue  # from before the epoch this sync moved to
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
        position, previous, events = await self._fetch(
            tenant,
            topic,
            after=None if known is None else known.seq,
            count=size,
            ttl=namespace.history_ttl,
            ensure=True,
        )
        assert position is not None  # ensure=True gives every topic an epoch
        if self._tracked.get(tracked.channel) is not tracked:
            # Untracked while fetching (every waiter gave up, or the topic went
            # idle), maybe followed again since by another sync with subscribers
            # on its copy: loading this one would move the topic under them.
            return
        if known is None:
            self.broker.load(tenant, topic, position, events, previous=previous)
            return
        if position == known and not tracked.retire:
            return
        retire, tracked.retire = tracked.retire, False
        if position.epoch == known.epoch:
            if not retire and position.seq > known.seq and _continues(events, known, position):
                for event in events:
                    self.broker.deliver(tenant, event)
                return
            if retire or position.seq < known.seq:
                # Redis lost writes this node saw, and hands their offsets out
                # again in the same epoch (the run_id check catches failovers and
                # restarts; this is the rest): go on in a new epoch from there.
                position, previous = await self._fork(tenant, topic, known.epoch)
                tracked.retired.append(known.epoch)
                events = []
        elif previous is not None and previous.epoch == known.epoch and known.seq <= previous.seq:
            # The stream went on in a new epoch (a failover or a restart of Redis),
            # and nothing this node delivered was lost: deliver the rest of the
            # old epoch, then carry on in the new one.
            if _continues(events, known, position):
                self.epochs += 1
                tracked.retired.append(known.epoch)
                rolled = False
                for event in events:
                    if not rolled and event.seq > previous.seq:
                        rolled = self.broker.rollover(tenant, topic, previous, position.epoch)
                    self.broker.deliver(tenant, event)
                if not rolled:
                    self.broker.rollover(tenant, topic, previous, position.epoch)
                return
        elif previous is None or previous.epoch != known.epoch:
            # A new stream (Redis lost the old one, or it expired). If all of
            # it is still retained, subscribers just continue with it.
            _, _, events = await self._fetch(
                tenant, topic, after=0, count=size, ttl=namespace.history_ttl
            )
            tracked.retired.append(known.epoch)
            if (not events and position.seq == 0) or (
                events and events[0].seq == 1 and events[-1].seq == position.seq
            ):
                self.broker.load(tenant, topic, Position(0, position.epoch), [])
                for event in events:
                    self.broker.deliver(tenant, event)
                return
        if position.epoch != known.epoch:
            self.epochs += 1
            if known.epoch not in tracked.retired:
                tracked.retired.append(known.epoch)
        self.lost += 1
        _, _, tail = await self._fetch(
            tenant, topic, after=None, count=size, ttl=namespace.history_ttl
        )
        # No checkpoint from here on: a closed subscriber that resumes at once
        # must find the topic already in its new state, not the lost one.
        closed = self.broker.lost(
            tenant, topic, CloseCode.INSUFFICIENT_STATE, "events were lost; resume to see which"
        )
        self.broker.load(tenant, topic, position, tail, previous=previous)
        LOGGER.warning(
            "%r: events after %d (epoch %s) are no longer in Redis; closed %d subscribers",
            topic,
            known.seq,
            known.epoch,
            closed,
        )

    async def _fork(
        self, tenant: str, topic: str, retired: str
    ) -> tuple[Position, Position | None]:
        """Move a topic to a new epoch at Redis's offset (if it is still in ``retired``)."""
        tid = topic_id(tenant, topic)
        session = self._session
        if session is None:
            raise BackplaneUnavailable("not connected to Redis")
        run_id = session.shard_of(self._channel(tenant, topic)).run_id
        state = await self._client.eval(
            FORK_SCRIPT,
            keys=[f"{PREFIX}:{tid}:meta"],
            args=[retired, secrets.token_hex(4), int(META_TTL * 1000), run_id],
        )
        LOGGER.warning("%r: Redis is behind this node; epoch %s retired", topic, retired)
        position, previous = _state(state)
        assert position is not None
        return position, previous

    async def _fetch(
        self,
        tenant: str,
        topic: str,
        *,
        after: int | None,
        count: int,
        ttl: float,
        ensure: bool = False,
    ) -> tuple[Position | None, Position | None, list[Event]]:
        """A topic's position, the epoch's predecessor, and its retained events
        (after an offset, or the latest).

        With ``ensure``, a topic without metadata gets an epoch at offset 0 (and
        one written by another Redis process a new epoch; see ``_START_STREAM``).
        """
        tid = topic_id(tenant, topic)
        meta_key, stream_key = f"{PREFIX}:{tid}:meta", f"{PREFIX}:{tid}:stream"
        client, session = self._client, self._session
        if client is None or session is None:
            raise BackplaneUnavailable("not connected to Redis")
        async with client.pipeline(transaction=True) as pipe:
            if ensure:
                run_id = session.shard_of(self._channel(tenant, topic)).run_id
                meta_request = pipe.eval(
                    ENSURE_SCRIPT,
                    keys=[meta_key, stream_key],
                    args=[secrets.token_hex(4), int(META_TTL * 1000), run_id],
                )
            else:
                meta_request = pipe.hmget(meta_key, ["s", "e", "p"])
            if after is None:
                entries_request = pipe.xrevrange(stream_key, "+", "-", count=count)
            else:
                entries_request = pipe.xrange(stream_key, f"{after + 1}-0", "+", count=count)
        position, previous = _state(await meta_request)
        entries = list(await entries_request or ())
        if after is None:
            entries.reverse()
        if position is None:
            return None, None, []
        cutoff = (time.time() - ttl) * 1000
        events: list[Event] = []
        for entry in entries:
            data = entry.field_values[b"m"]
            if int(data.split(b" ", 3)[2]) >= cutoff:
                events.append(_decode(topic, data))
        return position, previous, events

    # --- background tasks ----------------------------------------------------------------

    async def _publisher(self) -> None:
        while True:
            if not self._pending:
                await self._wake_publisher.wait()
                self._wake_publisher = trio.Event()
                continue
            self._expire_pending()
            if not self._pending:
                continue
            session = self._session
            if not self.connected or session is None:
                # Wait for Redis, but no longer than the oldest publication may.
                if self._pending:
                    with trio.move_on_at(self._pending[0].deadline):
                        await self._connected.wait()
                continue
            batch = [self._pending.popleft() for _ in range(min(PUBLISH_BATCH, len(self._pending)))]
            for item in batch:
                item.attempted = True
            retry, failure = await self._publish_batch(session, batch)
            # Back in order, ahead of newer ones; the script recognises those
            # Redis had applied already.
            self._pending.extendleft(sorted(retry, key=lambda item: -item.number))
            if failure is not None:
                LOGGER.warning("publishing to the backplane failed: %s", _cause(failure))
                session.fail(failure)
                if self._pending:
                    with trio.move_on_at(self._pending[0].deadline):
                        await session.closed.wait()
            elif retry:
                await trio.sleep(BACKOFF_FIRST)

    async def _publish_batch(
        self, session: _Session, batch: list[_Pending]
    ) -> tuple[list[_Pending], Exception | None]:
        """Publish a batch, one pipelined round trip per shard, and answer each publication.

        Returns what to send again, and why the session must be renewed (a
        broken link, slots that moved), if it must.
        """
        now_ms = str(int(time.time() * 1000))
        timestamp = rfc3339_now()
        # The epoch a topic gets if this publication starts its stream: one per
        # batch (os.urandom per publication was 7% of a publishing node's CPU).
        new_epoch = secrets.token_hex(4)
        if len(session.shards) == 1:
            groups = [(session.shards[0], batch)]
        else:
            by_shard: dict[int, list[_Pending]] = {}
            for item in batch:
                publication = item.publication
                shard = session.shard_of(self._channel(publication.tenant, publication.topic))
                by_shard.setdefault(id(shard), []).append(item)
            groups = [(s, by_shard[id(s)]) for s in session.shards if id(s) in by_shard]
        retry: list[_Pending] = []
        failure: Exception | None = None
        for shard, items in groups:
            if failure is not None:
                retry.extend(items)
                continue
            try:
                again, failure = await self._publish_on(
                    session, shard, items, (new_epoch, now_ms, timestamp)
                )
            except Exception as exc:  # a broken link: none of these was answered
                retry.extend(items)
                failure = exc
                continue
            retry.extend(again)
        return retry, failure

    async def _publish_on(
        self,
        session: _Session,
        shard: _Shard,
        items: list[_Pending],
        stamp: tuple[str, str, str],
    ) -> tuple[list[_Pending], Exception | None]:
        """Run the script for each publication on one primary and answer each.

        Raises before answering any if the pipeline fails; otherwise returns what
        to send again and, if the slots moved, why the session must be renewed.
        """
        new_epoch, now_ms, timestamp = stamp
        replicate = self.durability == "replicated"
        publish = "SPUBLISH" if session.sharded else "PUBLISH"
        calls = [
            _evalsha(
                shard,
                *self._script_call(item, new_epoch, now_ms, timestamp),
                publish="" if replicate else publish,
            )
            for item in items
        ]
        waiting = 0.0
        if replicate:
            # After the scripts, on the same connection: returns once a replica
            # has every write made so far (or at the deadline, with 0).
            waiting = max(min(item.deadline for item in items) - trio.current_time(), 0.01)
            calls.append(command("WAIT", 1, milliseconds(waiting)))
        with trio.fail_after(self.timeout + waiting):
            replies = await shard.publisher.pipeline(b"".join(calls), len(calls))
        replicated = True
        if replicate:
            replicas = replies.pop()
            replicated = isinstance(replicas, int) and replicas >= 1
            if not replicated and not self._unreplicated_warned:
                self._unreplicated_warned = True
                LOGGER.warning(
                    "no replica confirmed publications in time (durability replicated):"
                    " they are answered unconfirmed"
                )
        retry: list[_Pending] = []
        release: list[bytes] = []
        moved: ReplyError | None = None
        reload = False
        for item, reply in zip(items, replies, strict=True):
            if isinstance(reply, list) and len(reply) == 4:
                self._answer_known_key(item, reply)
            elif isinstance(reply, list) and len(reply) in (2, 3):
                seq, epoch = reply[0], reply[1]
                assert isinstance(seq, int) and isinstance(epoch, bytes)
                if not replicated:
                    self._refuse(
                        item.publication, "no replica confirmed the event in time", unsure=True
                    )
                    continue
                if len(reply) == 3 and isinstance(reply[2], bytes):
                    channel = self._channel(item.publication.tenant, item.publication.topic)
                    release.append(command(publish, channel, reply[2]))
                self.sequenced += 1
                on_done = item.publication.on_done
                if on_done is not None:
                    on_done(Position(seq, epoch.decode()))
            elif isinstance(reply, ReplyError) and reply.kind == "NOSCRIPT":
                reload = True  # scripts are not replicated: a new primary may lack it
                retry.append(item)
            elif isinstance(reply, ReplyError) and reply.kind in _BUSY:
                retry.append(item)
            elif isinstance(reply, ReplyError) and reply.kind in _MOVED:
                moved = reply
                retry.append(item)
            else:
                why = str(reply) if isinstance(reply, ReplyError) else repr(reply)
                LOGGER.warning("Redis refused a publication: %.200s", why)
                self._refuse(item.publication, f"Redis refused it ({why:.200})")
        # From here on every publication of these is answered or to be retried:
        # a failure only renews the session.
        try:
            with trio.fail_after(self.timeout):
                if release:
                    # Replicated and answered: now every node may see them. If
                    # this fails they are in the stream, and the reconnect that
                    # follows resynchronises every topic from there.
                    await shard.publisher.pipeline(b"".join(release), len(release))
                if reload:
                    loaded = await shard.publisher.call("SCRIPT", "LOAD", PUBLISH_SCRIPT)
                    assert isinstance(loaded, bytes)
                    shard.script = loaded
        except Exception as exc:
            return retry, exc
        if moved is not None:
            return retry, TopologyChanged(f"Redis answered {moved}")
        return retry, None

    def _answer_known_key(self, item: _Pending, reply: list[Any]) -> None:
        """The script found the publication's idempotency key: the first publication's
        position (``replayed``), or a refusal (``conflict``: another payload)."""
        on_done = item.publication.on_done
        if _text(reply[3]) == "replayed":
            self.replayed += 1
            if on_done is not None:
                on_done(Position(int(reply[0]), _text(reply[1])))
            return
        self.conflicts += 1
        if on_done is not None:
            on_done(
                BrokerError(
                    ErrorCode.IDEMPOTENCY_CONFLICT,
                    "the idempotency key was used for another payload on this topic"
                    " within the window",
                )
            )

    def _script_call(
        self, item: _Pending, new_epoch: str, now_ms: str, timestamp: str
    ) -> tuple[list[str], list[Any], list[Any]]:
        """The keys and arguments of PUBLISH_SCRIPT for one publication, and the
        arguments that follow the run_id and publish command (an idempotency key's)."""
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
        extra: list[Any] = []
        key = publication.idempotency_key
        if key is not None:
            window = self.broker.idempotency
            keys += [f"{PREFIX}:{tid}:idem", f"{PREFIX}:{tid}:idem-at"]
            extra = [
                key,
                fingerprint(publication.payload_json),
                int(window.window * 1000) or 1,
                window.max_keys,
            ]
        return keys, args, extra

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
            session = self._session
            if not channels or session is None or session.ended:
                continue  # after a reconnect only tracked channels are subscribed
            verb = "SUNSUBSCRIBE" if session.sharded else "UNSUBSCRIBE"
            by_shard: dict[int, list[bytes]] = {}
            for channel in channels:
                shard = session.listener_of(channel)
                shard.unsubscribing[channel] = shard.unsubscribing.get(channel, 0) + 1
                by_shard.setdefault(id(shard), []).append(channel)
            try:
                with trio.fail_after(self.timeout):
                    for shard in session.shards:
                        mine = by_shard.get(id(shard))
                        if mine:
                            await shard.pubsub.send(b"".join(command(verb, c) for c in mine))
            except Exception as exc:
                LOGGER.debug("unsubscribing from %d channels failed: %s", len(channels), exc)
                session.fail(exc)

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


def _decode(topic: str, data: bytes) -> Event:
    seq, epoch, _ms, timestamp, payload = data.split(b" ", 4)
    return Event(
        topic, int(seq), epoch.decode(), orjson.loads(payload), timestamp.decode(), payload
    )


def _evalsha(
    shard: _Shard, keys: list[str], args: list[Any], extra: list[Any], *, publish: str
) -> bytes:
    return command("EVALSHA", shard.script, len(keys), *keys, *args, shard.run_id, publish, *extra)


def _continues(events: list[Event], known: Position, position: Position) -> bool:
    """Whether ``events`` are exactly the offsets after ``known`` up to ``position``."""
    if not events:
        return known.seq == position.seq
    return events[0].seq == known.seq + 1 and events[-1].seq == position.seq


def _state(reply: Any) -> tuple[Position | None, Position | None]:
    """(position, previous epoch's last position) from a meta hash's ``s``, ``e``, ``p``."""
    seq, epoch, previous = [*reply, None, None, None][:3]
    if seq is None or epoch is None:
        return None, None
    before: Position | None = None
    if previous:
        old_epoch, _, old_seq = _text(previous).partition(" ")
        before = Position(int(old_seq), old_epoch)
    return Position(int(seq), _text(epoch)), before


def _version(info: Value) -> tuple[int, ...]:
    """The server's version from an ``INFO server`` answer ((0,) if unreadable)."""
    try:
        return tuple(int(part) for part in _info_field(info, b"redis_version").split(b"."))
    except ValueError:
        return (0,)


def _info_field(info: Value, name: bytes) -> bytes:
    """A field of an ``INFO`` answer (``b""`` if absent)."""
    if isinstance(info, bytes):
        for line in info.splitlines():
            key, _, value = line.partition(b":")
            if key == name:
                return value.strip()
    return b""


def _cause(exc: BaseException) -> str:
    """The first real error inside the exception groups coredis and Trio wrap it in."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


__all__ = ["Durability", "RedisBackplane", "parse_url", "redacted", "topic_id"]
