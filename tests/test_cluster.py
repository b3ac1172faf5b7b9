"""Several real ``tidings serve`` processes sharing a real Redis (issue 5).

Each test starts its own redis-server (``tests/redis_fixture.py``) and two or
three nodes on it, talks to them over real sockets on 127.0.0.1 with
trio-websocket and the HTTP API, and checks what a user of a cluster relies
on: one order of events everywhere, resume on another node, cluster-wide
presence and disconnect, tenants kept apart, one Redis subscription per node
and topic, and no acknowledged event lost or duplicated when Redis stops or
crashes under traffic, when a node is cut off from it, or when a node is
killed.

Nothing here sleeps to synchronise: tests wait on frames they receive, on
answers, or poll ``/health`` with a bound. The only sleeps pace publishers.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import jwt
import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, connect_websocket_url

from .conftest import call, http_request, send, subscribe
from .redis_fixture import API_KEY, Node, Nodes, RedisServer, eventually, free_port

pytestmark = pytest.mark.slow

JWT_SECRET = "a cluster secret of at least 32 bytes"
#: Pause between two publications of a steady publisher: pacing, not synchronisation.
PACE = 0.01


def token(user: str, tenant: str | None = None) -> str:
    """An HS256 JWT for ``user`` (in ``tenant``), valid for ten minutes."""
    claims: dict[str, Any] = {"sub": user, "exp": int(time.time()) + 600}
    if tenant is not None:
        claims["tenant"] = tenant
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


async def start_nodes(nodes: Nodes, names: list[str], *args: str, **kwargs: Any) -> list[Node]:
    """Start several nodes at once (each takes about a second to boot)."""
    started: dict[str, Node] = {}

    async def one(name: str) -> None:
        started[name] = await nodes.start(name, *args, **kwargs)

    async with trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(one, name)
    return [started[name] for name in names]


class Follower:
    """One subscriber of one topic, possibly across several connections (it moves).

    Records every event frame in arrival order, and the other frames too.
    """

    def __init__(self, name: str, topic: str) -> None:
        self.name = name
        self.topic = topic
        self.events: list[dict[str, Any]] = []
        self.frames: list[dict[str, Any]] = []
        self.replies: list[dict[str, Any]] = []
        self.ws: WebSocketConnection | None = None
        self.closed: Any = None
        self._pings = 0
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def follow(
        self,
        nursery: trio.Nursery,
        node: Node,
        *,
        since: int | None = None,
        epoch: str | None = None,
        bearer: str | None = None,
    ) -> dict[str, Any]:
        """Connect (with a token) and subscribe, resuming if told; returns the reply's payload."""
        url = node.url + (f"?token={bearer}" if bearer else "")
        self.ws = ws = await connect_websocket_url(nursery, url)
        self.closed = None
        resume = {
            key: value for key, value in (("since", since), ("epoch", epoch)) if value is not None
        }
        reply = await subscribe(ws, self.topic, **resume)
        self.replies.append(reply["payload"])
        nursery.start_soon(self._read, ws)
        return reply["payload"]  # type: ignore[no-any-return]

    async def _read(self, ws: WebSocketConnection) -> None:
        try:
            while True:
                frame = orjson.loads(await ws.get_message())
                (self.events if frame.get("type") == "event" else self.frames).append(frame)
                self._notify()
        except ConnectionClosed as exc:
            self.closed = exc.reason
            self._notify()

    async def wait(self, predicate: Callable[[Follower], bool]) -> None:
        while not predicate(self):
            await self._changed.wait()

    async def wait_events(self, count: int) -> None:
        await self.wait(lambda f: len(f.events) >= count)

    async def settle(self) -> None:
        """Round-trip a ping: every event the node had queued for us has arrived."""
        assert self.ws is not None
        self._pings += 1
        request_id = f"settle-{self._pings}"
        await send(self.ws, {"type": "ping", "requestId": request_id})
        await self.wait(lambda f: any(frame.get("requestId") == request_id for frame in f.frames))

    @property
    def position(self) -> tuple[int, str]:
        """(seq, epoch) to resume from: the last event, else the last subscribe reply."""
        if self.events:
            return self.events[-1]["seq"], self.events[-1]["epoch"]
        return self.replies[-1]["seq"], self.replies[-1]["epoch"]

    def seqs(self) -> list[int]:
        return [event["seq"] for event in self.events]


class Ledger:
    """What publishers were told: acknowledged (with seq and epoch), refused, or no answer."""

    def __init__(self) -> None:
        self.acked: dict[str, dict[str, Any]] = {}
        self.refused: dict[str, str] = {}
        self.unanswered: set[str] = set()
        self.unsure: set[str] = set()
        self.other: list[tuple[str, Any]] = []
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def sending(self, key: str) -> None:
        self.unanswered.add(key)
        self._notify()

    def ack(self, key: str, seq: int, epoch: str) -> None:
        self.unanswered.discard(key)
        self.acked[key] = {"seq": seq, "epoch": epoch}
        self._notify()

    def refuse(self, key: str, code: str, message: str) -> None:
        self.unanswered.discard(key)
        self.refused[key] = code
        if code == "unconfirmed":
            # Sent, never confirmed: maybe published (docs/deployment.md, "Redis answers late").
            self.unsure.add(key)
        self._notify()

    def strange(self, key: str, answer: Any) -> None:
        self.unanswered.discard(key)
        self.other.append((key, answer))
        self._notify()

    def count(self, prefix: str, *, refused: bool = False) -> int:
        keys = self.refused if refused else self.acked
        return sum(1 for key in keys if key.startswith(prefix))

    async def wait(self, predicate: Callable[[Ledger], bool]) -> None:
        while not predicate(self):
            await self._changed.wait()

    def by_seq(self) -> dict[int, str]:
        return {ack["seq"]: key for key, ack in self.acked.items()}


async def api_publish(node: Node, ledger: Ledger, topic: str, key: str) -> None:
    """Publish ``{"key": key}`` through the HTTP API of ``node`` and record the outcome."""
    ledger.sending(key)
    status, body = await node.api("publish", topic=topic, payload={"key": key})
    if status == 200 and "seq" in body:
        ledger.ack(key, body["seq"], body["epoch"])
    elif status == 503 and body.get("error", {}).get("code") in ("unavailable", "unconfirmed"):
        ledger.refuse(key, body["error"]["code"], body["error"]["message"])
    else:
        ledger.strange(key, (status, body))


async def ws_publish(ws: WebSocketConnection, ledger: Ledger, topic: str, key: str) -> None:
    """Publish ``{"key": key}`` as a client and record the outcome."""
    ledger.sending(key)
    reply = await call(
        ws, {"type": "publish", "topic": topic, "payload": {"key": key}, "requestId": key}
    )
    if reply["type"] == "response":
        ledger.ack(key, reply["payload"]["seq"], reply["payload"]["epoch"])
    elif reply["type"] == "error" and reply["payload"]["code"] in ("unavailable", "unconfirmed"):
        ledger.refuse(key, reply["payload"]["code"], reply["payload"]["message"])
    else:
        ledger.strange(key, reply)


def check_delivery(
    follower: Follower, ledger: Ledger, *, may_also: frozenset[str] = frozenset()
) -> None:
    """The follower got every acknowledged event once, in seq order, with the acked seq.

    Publications refused as "not published" never arrive. Those the node sent
    but Redis never confirmed ("may have been published"), and ``may_also``
    (no answer at all: their publisher died), may arrive, once.
    """
    seqs = follower.seqs()
    assert seqs == sorted(set(seqs)), f"{follower.name}: out of order or duplicated: {seqs}"
    keys = [event["payload"]["key"] for event in follower.events]
    assert len(keys) == len(set(keys)), f"{follower.name}: a publication arrived twice: {keys}"
    delivered = {event["payload"]["key"]: event for event in follower.events}
    missing = sorted(set(ledger.acked) - set(delivered), key=lambda k: ledger.acked[k]["seq"])
    assert not missing, f"{follower.name} never got acknowledged {missing}"
    unexpected = set(delivered) - set(ledger.acked) - ledger.unsure - may_also
    assert not unexpected, (
        f"{follower.name} got {sorted(unexpected)}, which were not acknowledged "
        f"(refused: {sorted(unexpected & set(ledger.refused))})"
    )
    for key, ack in ledger.acked.items():
        event = delivered[key]
        assert (event["seq"], event["epoch"]) == (ack["seq"], ack["epoch"]), (key, event, ack)


# --- the harness itself --------------------------------------------------------------


async def test_the_redis_fixture_restarts_on_its_port_with_its_data(
    redis_server: RedisServer,
) -> None:
    with trio.fail_after(20):
        await redis_server.command("XADD", "probe", "*", "k", "v")
        port = redis_server.port
        await redis_server.stop()
        assert not redis_server.running
        with pytest.raises(OSError):
            await redis_server.command("PING")
        await redis_server.start()
        assert redis_server.port == port
        assert await redis_server.command("XLEN", "probe") == 1
        assert port != 6379


# --- delivery and order -------------------------------------------------------------


async def test_every_subscriber_on_every_node_gets_every_event_in_one_order(
    tidings_nodes: Nodes,
) -> None:
    with trio.fail_after(40):
        a, b, c = await start_nodes(tidings_nodes, ["a", "b", "c"])
        async with trio.open_nursery() as nursery:
            followers = []
            for node in (a, b, c):
                for k in range(2):
                    follower = Follower(f"{node.name}{k}", "orders")
                    reply = await follower.follow(nursery, node)
                    assert reply["seq"] == 0, reply
                    followers.append(follower)

            ledger = Ledger()

            async def through_the_api() -> None:
                for i in range(50):
                    await api_publish(a, ledger, "orders", f"api-{i}")

            async def from_a_client() -> None:
                ws = await connect_websocket_url(nursery, b.url)
                for i in range(50):
                    await ws_publish(ws, ledger, "orders", f"ws-{i}")
                await ws.aclose()

            async with trio.open_nursery() as publishers:
                publishers.start_soon(through_the_api)
                publishers.start_soon(from_a_client)
            assert not ledger.other and not ledger.refused, (ledger.other, ledger.refused)
            assert len(ledger.acked) == 100

            for follower in followers:
                await follower.wait_events(100)
                await follower.settle()
                check_delivery(follower, ledger)
                assert len(follower.events) == 100
            # One order everywhere, one epoch, seq assigned once for the whole cluster.
            reference = [(e["seq"], e["epoch"], e["payload"]) for e in followers[0].events]
            for follower in followers[1:]:
                assert [(e["seq"], e["epoch"], e["payload"]) for e in follower.events] == reference
            assert len({epoch for _, epoch, _ in reference}) == 1
            assert [seq for seq, _, _ in reference] == list(range(1, 101))
            # Each publisher's events keep the order it published them in.
            for prefix in ("api-", "ws-"):
                mine = [ledger.acked[f"{prefix}{i}"]["seq"] for i in range(50)]
                assert mine == sorted(mine)

            # History is the cluster's: a node that saw none of the publications has it all.
            history = await c.call("history", topic="orders", since=0, limit=1000)
            assert [(e["seq"], e["epoch"], e["payload"]) for e in history["events"]] == reference
            assert history["seq"] == 100
            for follower in followers:
                assert follower.ws is not None
                await follower.ws.aclose()
            nursery.cancel_scope.cancel()
        # A node with a backplane shuts down cleanly on SIGTERM, like one without.
        exits: dict[str, int] = {}

        async def stop(node: Node) -> None:
            exits[node.name] = await node.stop()

        async with trio.open_nursery() as stopping:
            for node in (a, b, c):
                stopping.start_soon(stop, node)
        assert exits == {"a": 0, "b": 0, "c": 0}, tidings_nodes.report()


async def test_a_client_resumes_on_another_node_with_exactly_what_it_missed(
    tidings_nodes: Nodes,
) -> None:
    with trio.fail_after(30):
        a, b = await start_nodes(tidings_nodes, ["a", "b"])
        async with trio.open_nursery() as nursery:
            first = Follower("on-a", "feed")
            await first.follow(nursery, a)
            before = [await b.call("publish", topic="feed", payload={"i": i}) for i in range(5)]
            await first.wait_events(5)
            assert first.seqs() == [ack["seq"] for ack in before]
            seq, epoch = first.position
            assert first.ws is not None
            await first.ws.aclose()

            missed = [await a.call("publish", topic="feed", payload={"i": i}) for i in range(5, 12)]
            second = Follower("on-b", "feed")
            reply = await second.follow(nursery, b, since=seq, epoch=epoch)
            assert reply["recovered"] is True, reply
            assert reply["replayed"] == 7, reply
            assert (reply["seq"], reply["epoch"]) == (missed[-1]["seq"], epoch), reply
            await second.wait_events(7)
            assert second.seqs() == [ack["seq"] for ack in missed]
            assert [e["payload"]["i"] for e in second.events] == list(range(5, 12))

            live = await a.call("publish", topic="feed", payload={"i": 12})
            await second.wait_events(8)
            await second.settle()
            assert second.seqs() == [ack["seq"] for ack in [*missed, live]]
            assert {e["epoch"] for e in second.events} == {epoch}
            nursery.cancel_scope.cancel()


# --- presence and disconnect -----------------------------------------------------------


def users(presence: dict[str, Any]) -> list[str]:
    return sorted(entry["user"] for entry in presence["clients"])


async def test_presence_channels_and_info_answer_for_the_whole_cluster(
    tidings_nodes: Nodes,
) -> None:
    with trio.fail_after(30):
        a, b = await start_nodes(
            tidings_nodes, ["a", "b"], "--jwt-secret", JWT_SECRET, "--presence"
        )
        async with trio.open_nursery() as nursery:
            alice = await connect_websocket_url(nursery, f"{a.url}?token={token('alice')}")
            bob = await connect_websocket_url(nursery, f"{b.url}?token={token('bob')}")
            carol = await connect_websocket_url(nursery, f"{b.url}?token={token('carol')}")
            for ws in (alice, bob, carol):
                await subscribe(ws, "room")
            await subscribe(carol, "lobby")

            for node in (a, b):
                presence = await node.call("presence", topic="room")
                assert users(presence) == ["alice", "bob", "carol"], (node.name, presence)
                entries = presence["clients"]
                assert len({entry["client"] for entry in entries}) == 3
                assert all(entry["tenant"] == "default" for entry in entries)
                assert all(entry["connectedAt"] for entry in entries)
                stats = await node.call("presence_stats", topic="room")
                assert (stats["clients"], stats["users"]) == (3, 3), (node.name, stats)
                channels = await node.call("channels")
                counts = {c["topic"]: c["subscribers"] for c in channels["channels"]}
                assert counts == {"room": 3, "lobby": 1}, (node.name, channels)

            # A client's own presence query is the cluster's too.
            reply = await call(alice, {"type": "presence", "topic": "room", "requestId": "who"})
            assert users(reply["payload"]) == ["alice", "bob", "carol"], reply

            # info: this node's counters, every node's, and the cluster's totals. Nodes
            # announce their counters periodically, so wait for the latest announcement.
            info = await eventually(
                lambda: a.call("info"),
                lambda info: (
                    {n["node"]: n["connections"] for n in info.get("nodes", [])} == {"a": 1, "b": 2}
                ),
            )
            assert info["node"] == "a" and info["connections"] == 1, info
            assert info["cluster"]["connections"] == 3, info
            assert info["cluster"]["subscriptions"] == 4, info

            # A client that leaves leaves the cluster's presence.
            await bob.aclose()
            await eventually(
                lambda: a.call("presence", topic="room"),
                lambda presence: users(presence) == ["alice", "carol"],
                within=5,
            )
            stats = await a.call("presence_stats", topic="room")
            assert (stats["clients"], stats["users"]) == (2, 2)
            channels = await a.call("channels")
            assert {c["topic"]: c["subscribers"] for c in channels["channels"]} == {
                "room": 2,
                "lobby": 1,
            }
            nursery.cancel_scope.cancel()


async def test_clients_topics_series_and_the_console_session_span_the_cluster(
    tidings_nodes: Nodes,
) -> None:
    """What the console reads and does, asked of one node, is about every node."""
    with trio.fail_after(30):
        a, b = await start_nodes(tidings_nodes, ["a", "b"], "--jwt-secret", JWT_SECRET)
        async with trio.open_nursery() as nursery:
            alice = await connect_websocket_url(nursery, f"{a.url}?token={token('alice')}")
            bob = await connect_websocket_url(nursery, f"{b.url}?token={token('bob')}")
            carol = await connect_websocket_url(nursery, f"{b.url}?token={token('carol')}")
            for ws in (alice, bob, carol):
                await subscribe(ws, "room")
            await subscribe(carol, "lobby")

            for node in (a, b):
                clients = await node.call("clients", sort="user")
                assert clients["total"] == 3, (node.name, clients)
                assert [(c["user"], c["node"]) for c in clients["clients"]] == [
                    ("alice", "a"),
                    ("bob", "b"),
                    ("carol", "b"),
                ]
                page = await node.call("clients", sort="user", order="desc", limit=1, offset=1)
                assert [c["user"] for c in page["clients"]] == ["bob"]
                assert (page["total"], page["missing"]) == (3, [])
                only = await node.call("clients", filter="lobby")
                assert [c["user"] for c in only["clients"]] == ["carol"]

                topics = await node.call("topics")
                held = sorted((t["node"], t["topic"], t["subscribers"]) for t in topics["topics"])
                assert held == [("a", "room", 1), ("b", "lobby", 1), ("b", "room", 2)]

                series = await node.call("series")
                assert sorted(n["node"] for n in series["nodes"]) == ["a", "b"]

            # A console session opened on one node is good on the other (they share the
            # key), and logging out on one ends it on both.
            status, headers, body = await http_request(
                a.port, "POST", "/console/login", orjson.dumps({"key": API_KEY})
            )
            assert status == 200, body
            cookie = headers["set-cookie"].split(";", 1)[0]
            csrf = orjson.loads(body)["csrf"]
            sent = f"Cookie: {cookie}\r\nX-CSRF-Token: {csrf}\r\n"
            status, _, body = await http_request(b.port, "POST", "/api/clients", b"{}", sent)
            assert (status, orjson.loads(body)["total"]) == (200, 3)
            status, _, _ = await http_request(a.port, "POST", "/console/logout", b"", sent)
            assert status == 200
            for node in (a, b):
                status, _, _ = await http_request(node.port, "POST", "/api/info", b"{}", sent)
                assert status == 401, node.name
            nursery.cancel_scope.cancel()


async def test_tenants_stay_apart_across_nodes(tidings_nodes: Nodes) -> None:
    """The same topic name in two tenants is two topics, on every node."""
    with trio.fail_after(30):
        a, b = await start_nodes(tidings_nodes, ["a", "b"], "--jwt-secret", JWT_SECRET)
        async with trio.open_nursery() as nursery:
            followers = {}
            for tenant, node in (("acme", a), ("acme", b), ("globex", a), ("globex", b)):
                follower = Follower(f"{tenant}@{node.name}", "news")
                await follower.follow(nursery, node, bearer=token(f"u-{tenant}", tenant))
                followers[follower.name] = follower
            acme = [
                await a.call("publish", topic="news", payload=i, tenant="acme") for i in range(3)
            ]
            globex = await b.call("publish", topic="news", payload="g", tenant="globex")
            # Each tenant has its own offsets: globex's first event is its seq 1.
            assert [ack["seq"] for ack in acme] == [1, 2, 3] and globex["seq"] == 1
            for name, follower in followers.items():
                expected = [0, 1, 2] if name.startswith("acme") else ["g"]
                await follower.wait_events(len(expected))
                await follower.settle()
                assert [e["payload"] for e in follower.events] == expected, name
            for node in (a, b):
                presence = await node.call("presence", topic="news", tenant="acme")
                assert users(presence) == ["u-acme", "u-acme"], presence
                channels = await node.call("channels", tenant="globex")
                assert channels["channels"] == [{"topic": "news", "subscribers": 2}], channels
                history = await node.call("history", topic="news", tenant="globex")
                assert [e["payload"] for e in history["events"]] == ["g"], history
            # Disconnecting a user of one tenant leaves the other's namesake alone.
            answer = await b.call("disconnect", user="u-acme", tenant="globex")
            assert answer == {"disconnected": 0}, answer
            nursery.cancel_scope.cancel()


async def redis_subscriptions(redis: RedisServer) -> int:
    """How many channel and pattern subscriptions Redis holds, over all its clients."""
    clients = (await redis.command("CLIENT", "LIST")).decode()
    total = 0
    for line in clients.splitlines():
        fields = dict(field.split("=", 1) for field in line.split() if "=" in field)
        total += int(fields.get("sub", 0)) + int(fields.get("psub", 0))
    return total


async def test_a_node_follows_a_topic_in_redis_once_however_many_clients(
    tidings_nodes: Nodes, redis_server: RedisServer
) -> None:
    """Redis traffic grows with nodes, not clients: one subscription per node and topic."""
    with trio.fail_after(30):
        a, b = await start_nodes(tidings_nodes, ["a", "b"])
        idle = await redis_subscriptions(redis_server)
        async with trio.open_nursery() as nursery:
            crowd = [Follower(f"crowd{i}", "wide") for i in range(20)]
            for follower in crowd:
                await follower.follow(nursery, a)
            assert await redis_subscriptions(redis_server) == idle + 1
            lone = Follower("lone", "wide")
            await lone.follow(nursery, b)
            assert await redis_subscriptions(redis_server) == idle + 2
            assert lone.ws is not None
            await lone.ws.aclose()
            # b no longer has subscribers of the topic, so it stops following it.
            await eventually(
                lambda: redis_subscriptions(redis_server), lambda count: count == idle + 1
            )
            ack = await a.call("publish", topic="wide", payload={"key": "k"})
            for follower in crowd:
                await follower.wait_events(1)
                assert follower.events[0]["seq"] == ack["seq"]
            nursery.cancel_scope.cancel()


async def closed_with(ws: WebSocketConnection) -> tuple[int, str]:
    """Read until the server closes; returns (code, reason)."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await ws.get_message()
    return closed.value.reason.code, closed.value.reason.reason


async def test_the_api_disconnects_a_user_on_whichever_node_it_is(tidings_nodes: Nodes) -> None:
    with trio.fail_after(30):
        a, b = await start_nodes(tidings_nodes, ["a", "b"], "--jwt-secret", JWT_SECRET)
        async with trio.open_nursery() as nursery:
            alice_a = await connect_websocket_url(nursery, f"{a.url}?token={token('alice')}")
            alice_b = await connect_websocket_url(nursery, f"{b.url}?token={token('alice')}")
            bob_b = await connect_websocket_url(nursery, f"{b.url}?token={token('bob')}")
            await subscribe(alice_a, "room")
            await subscribe(bob_b, "room")
            for ws in (alice_a, alice_b, bob_b):  # every connection is registered
                assert (await call(ws, {"type": "ping", "requestId": "p"}))["type"] == "pong"

            answer = await a.call("disconnect", user="alice", code=4000, reason="bye")
            assert answer == {"disconnected": 2}, answer
            assert await closed_with(alice_a) == (4000, "bye")
            assert await closed_with(alice_b) == (4000, "bye")
            assert (await call(bob_b, {"type": "ping", "requestId": "q"}))["type"] == "pong"

            # And one client by its id, from the node it is not on.
            presence = await a.call("presence", topic="room")
            (bob,) = [entry for entry in presence["clients"] if entry["user"] == "bob"]
            answer = await a.call("disconnect", client=bob["client"], code=4003, reason="kicked")
            assert answer == {"disconnected": 1}, answer
            assert await closed_with(bob_b) == (4003, "kicked")
            nursery.cancel_scope.cancel()


# --- faults ----------------------------------------------------------------------------


async def metric(node: Node, name: str) -> float:
    return await node.metric(name)


async def test_health_says_degraded_while_redis_is_frozen(
    tidings_nodes: Nodes, redis_server: RedisServer
) -> None:
    """A Redis that holds its connections but answers nothing (SIGSTOP: frozen,
    swapping) makes /health say degraded within a second of a publication
    waiting on it, long before the node gives up on the link; ok again once it
    answers, and the waiting publication is then acknowledged."""
    with trio.fail_after(60):
        # A long timeout: the node stays connected through the freeze.
        node = await tidings_nodes.start("a", "--backplane-timeout", "20")
        assert (await node.health())["status"] == "ok"
        assert redis_server.process is not None
        answers: list[tuple[int, dict[str, Any]]] = []
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            async with trio.open_nursery() as nursery:

                async def publish() -> None:
                    answers.append(await node.api("publish", topic="ticks", payload={"n": 1}))

                nursery.start_soon(publish)
                health = await node.wait_health("degraded")
                assert health["backplane"]["connected"] is True, health
                assert health["backplane"]["stalled"] is True, health
                assert await metric(node, "tidings_backplane_stalled") == 1
                assert not answers, "the publication was answered while Redis was frozen"
                redis_server.process.send_signal(signal.SIGCONT)
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        ((status, body),) = answers
        assert status == 200 and body["seq"] == 1, body
        health = await node.wait_health("ok")
        assert health["backplane"]["stalled"] is False, health
        assert await metric(node, "tidings_backplane_stalled") == 0


@pytest.mark.parametrize("how", ["stopped", "crashed"])
async def test_redis_restarting_under_traffic_loses_no_acknowledged_event(
    tidings_nodes: Nodes, redis_server: RedisServer, how: str
) -> None:
    """Publishers on two nodes go on through a Redis restart (SIGTERM, or SIGKILL).

    Acknowledged publications reach the subscribers on both nodes once each, in
    order; the others were refused with ``unavailable`` and counted as dropped.
    Node a waits 1 s for Redis and holds 4 publications; node b waits 4 s, so
    the publication its client makes last during the outage is held until
    Redis is back (the nodes reconnect within about a second) and sequenced.
    """
    with trio.fail_after(50):
        timeout, buffer = 1.0, 4
        async with trio.open_nursery() as starting:
            starting.start_soon(
                tidings_nodes.start,
                "a", "--backplane-timeout", str(timeout), "--backplane-buffer", str(buffer),
            )  # fmt: skip
            starting.start_soon(tidings_nodes.start, "b", "--backplane-timeout", "4")
        a, b = sorted(tidings_nodes.started, key=lambda node: node.name)
        ledger = Ledger()
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            fa, fb = Follower("sub-a", "ticks"), Follower("sub-b", "ticks")
            await fa.follow(nursery, a)
            await fb.follow(nursery, b)
            publisher_ws = await connect_websocket_url(nursery, b.url)

            async def api_publisher() -> None:
                i = 0
                while not stop.is_set():
                    await api_publish(a, ledger, "ticks", f"a-{i}")
                    i += 1
                    await trio.sleep(PACE)

            async def client_publisher() -> None:
                i = 0
                while not stop.is_set():
                    await ws_publish(publisher_ws, ledger, "ticks", f"b-{i}")
                    i += 1
                    await trio.sleep(PACE)

            async with trio.open_nursery() as publishers:
                publishers.start_soon(api_publisher)
                publishers.start_soon(client_publisher)
                await ledger.wait(lambda led: led.count("a-") >= 10 and led.count("b-") >= 10)
                for node in (a, b):
                    health = await node.health()
                    assert health["status"] == "ok", health
                    assert health["backplane"]["connected"] is True, health
                    assert await metric(node, "tidings_backplane_connected") == 1

                # Redis goes away (its append-only file is fsynced on every write).
                await (redis_server.stop() if how == "stopped" else redis_server.kill())
                for node in (a, b):
                    health = await node.wait_health("degraded", connected=False)
                    assert health["backplane"]["kind"] == "redis", health
                    assert health["backplane"]["connected"] is False, health
                    assert await metric(node, "tidings_backplane_connected") == 0
                # A burst beyond the buffer is refused at once, not queued.
                timings: list[float] = []

                async def burst(i: int) -> None:
                    started = trio.current_time()
                    await api_publish(a, ledger, "ticks", f"a-burst-{i}")
                    timings.append(trio.current_time() - started)

                async with trio.open_nursery() as bursts:
                    for i in range(10):
                        bursts.start_soon(burst, i)
                assert ledger.count("a-burst-", refused=True) == 10, ledger.other
                assert sum(1 for t in timings if t < timeout / 2) >= 10 - buffer, timings
                # Both steady publishers have been refused (b's after its 4 s wait).
                await ledger.wait(
                    lambda led: (
                        led.count("a-", refused=True) >= 2 and led.count("b-", refused=True) >= 1
                    )
                )
                # b's client has its next publication waiting for Redis now.
                await ledger.wait(lambda led: any(k.startswith("b-") for k in led.unanswered))
                waiting = {key for key in ledger.unanswered if key.startswith("b-")}
                # Redis comes back with its data; the nodes reconnect by themselves.
                await redis_server.start()
                for node in (a, b):
                    health = await node.wait_health("ok")
                    assert health["backplane"]["connected"] is True, health
                    assert await metric(node, "tidings_backplane_connected") == 1
                after_a, after_b = ledger.count("a-"), ledger.count("b-")
                await ledger.wait(
                    lambda led: led.count("a-") >= after_a + 10 and led.count("b-") >= after_b + 10
                )
                stop.set()

            assert not ledger.other, ledger.other
            assert not ledger.unanswered, ledger.unanswered
            assert ledger.refused, "no publication was refused while Redis was away"
            assert set(ledger.refused.values()) <= {"unavailable", "unconfirmed"}
            # What was waiting when Redis came back was sequenced, not refused.
            assert waiting <= set(ledger.acked), (waiting, ledger.refused)
            for follower in (fa, fb):
                with trio.fail_after(10):
                    await follower.wait(
                        lambda f: {e["payload"]["key"] for e in f.events} >= set(ledger.acked)
                    )
                await follower.settle()
                check_delivery(follower, ledger)
                assert follower.closed is None, follower.closed  # stayed connected throughout
                # Persistence kept the stream: the restarted Redis (another process)
                # moved it to a new epoch, and its offsets go on with no gap.
                seqs = follower.seqs()
                assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
                epochs = [e["epoch"] for e in follower.events]
                assert len(set(epochs)) == 2 and epochs == sorted(epochs, key=epochs.index)
            for node, prefix in ((a, "a-"), (b, "b-")):
                refused = ledger.count(prefix, refused=True)
                unsure = sum(1 for key in ledger.unsure if key.startswith(prefix))
                assert await metric(node, "tidings_backplane_dropped_total") == refused - unsure
                assert await metric(node, "tidings_backplane_unconfirmed_total") == unsure
            assert a.running and b.running
            nursery.cancel_scope.cancel()


class Proxy:
    """A TCP relay between one node and Redis, for network faults.

    ``cut()`` drops every connection and refuses new ones (a partition) until
    ``restore()``. ``lose_answers_after(command)`` forwards the node's next
    ``command`` to Redis, then drops whatever Redis sends back: Redis runs it,
    the node never hears how it went.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.open = True
        self.losing = False
        self.lost = trio.Event()
        self._trap: bytes | None = None
        self._scopes: set[trio.CancelScope] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await trio.serve_tcp(self._relay, self.port, host="127.0.0.1", task_status=task_status)

    async def _relay(self, client: trio.SocketStream) -> None:
        async with client:
            if not self.open:
                return
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
                    async with upstream, trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope, True)
                        nursery.start_soon(
                            self._pump, upstream, client, nursery.cancel_scope, False
                        )
                except OSError:
                    pass
                finally:
                    self._scopes.discard(scope)

    async def _pump(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        scope: trio.CancelScope,
        to_redis: bool,
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                if to_redis or not self.losing:
                    await sink.send_all(data)
                if to_redis and self._trap is not None and self._trap in data.upper():
                    self._trap = None
                    self.losing = True
                    self.lost.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    def lose_answers_after(self, command: bytes) -> None:
        self._trap = command.upper()
        self.lost = trio.Event()

    def cut(self) -> None:
        self.open = False
        self.losing = False
        for scope in list(self._scopes):
            scope.cancel()

    def restore(self) -> None:
        self.open = True


async def test_a_node_cut_off_from_redis_catches_up_from_the_stream(
    tidings_nodes: Nodes, redis_server: RedisServer
) -> None:
    """Node b loses Redis while a keeps publishing; b's subscriber then gets the gap, in order."""
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            proxy = Proxy(redis_server.port)
            await nursery.start(proxy.run)
            (a,) = await start_nodes(tidings_nodes, ["a"])
            # b reaches Redis only through the proxy.
            b = await tidings_nodes.start("b", "--backplane-timeout", "1", backplane=proxy.url)
            ledger = Ledger()
            stop = trio.Event()
            fa, fb = Follower("sub-a", "news"), Follower("sub-b", "news")
            await fa.follow(nursery, a)
            await fb.follow(nursery, b)

            async def publisher() -> None:
                i = 0
                while not stop.is_set():
                    await api_publish(a, ledger, "news", f"a-{i}")
                    i += 1
                    await trio.sleep(PACE)

            async with trio.open_nursery() as publishers:
                publishers.start_soon(publisher)
                await ledger.wait(lambda led: len(led.acked) >= 10)
                proxy.cut()
                await b.wait_health("degraded")
                assert (await a.health())["status"] == "ok"
                cut_at = len(ledger.acked)
                # While cut off, b refuses publications; a goes on acknowledging.
                await api_publish(b, ledger, "news", "b-cut")
                assert ledger.refused == {"b-cut": "unavailable"}, (ledger.refused, ledger.other)
                await ledger.wait(lambda led: len(led.acked) >= cut_at + 30)
                during = len(ledger.acked) - cut_at
                proxy.restore()
                await b.wait_health("ok")
                restored_at = len(ledger.acked)
                await ledger.wait(lambda led: len(led.acked) >= restored_at + 10)
                stop.set()

            assert not ledger.other, ledger.other
            assert during >= 30
            for follower in (fa, fb):
                with trio.fail_after(10):
                    await follower.wait(
                        lambda f: {e["payload"]["key"] for e in f.events} >= set(ledger.acked)
                    )
                await follower.settle()
                check_delivery(follower, ledger)
                assert follower.closed is None, follower.closed
            assert await metric(b, "tidings_backplane_dropped_total") == 1
            nursery.cancel_scope.cancel()


async def test_a_publication_whose_answer_is_lost_is_sequenced_once(
    tidings_nodes: Nodes, redis_server: RedisServer
) -> None:
    """Redis runs node b's publish script, the answer is lost, the connection drops.

    b reconnects within its backplane timeout and retries; the retry must find
    the publication already done: one event, the publisher told its seq.
    """
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proxy = Proxy(redis_server.port)
            await nursery.start(proxy.run)
            (a,) = await start_nodes(tidings_nodes, ["a"])
            b = await tidings_nodes.start("b", "--backplane-timeout", "4", backplane=proxy.url)
            remote, local = Follower("on-a", "t"), Follower("on-b", "t")
            await remote.follow(nursery, a)
            await local.follow(nursery, b)
            first = await b.call("publish", topic="t", payload="first")
            await remote.wait_events(1)

            # The publish script goes out as EVAL or EVALSHA.
            proxy.lose_answers_after(b"EVAL")
            answered = trio.Event()
            answer: list[tuple[int, dict[str, Any]]] = []

            async def publish() -> None:
                answer.append(await b.api("publish", topic="t", payload="second"))
                answered.set()

            nursery.start_soon(publish)
            await proxy.lost.wait()
            await remote.wait_events(2)  # Redis did run it
            proxy.cut()  # b's connections drop...
            proxy.restore()  # ...and it may reconnect at once
            await answered.wait()
            third = await b.call("publish", topic="t", payload="third")

            ((status, body),) = answer
            assert status == 200, body
            assert [first["seq"], body["seq"], third["seq"]] == [1, 2, 3]
            for follower in (remote, local):
                await follower.wait_events(3)
                await follower.settle()
                assert [(e["seq"], e["payload"]) for e in follower.events] == [
                    (1, "first"),
                    (2, "second"),
                    (3, "third"),
                ], follower.name
            assert await metric(b, "tidings_backplane_dropped_total") == 0
            nursery.cancel_scope.cancel()


async def test_clients_of_a_killed_node_resume_on_another_and_lose_nothing(
    tidings_nodes: Nodes,
) -> None:
    with trio.fail_after(40):
        a, b = await start_nodes(tidings_nodes, ["a", "b"])
        ledger = Ledger()
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            movers = [Follower(f"mover{k}", "jobs") for k in range(3)]
            for follower in movers:
                await follower.follow(nursery, a)
            stayer = Follower("stayer", "jobs")
            await stayer.follow(nursery, b)
            publisher_ws = await connect_websocket_url(nursery, a.url)

            async def api_publisher() -> None:
                i = 0
                while not stop.is_set():
                    await api_publish(b, ledger, "jobs", f"b-{i}")
                    i += 1
                    await trio.sleep(PACE)

            async def doomed_publisher() -> None:
                """Publishes as a client of a until a dies under it."""
                i = 0
                try:
                    while True:
                        await ws_publish(publisher_ws, ledger, "jobs", f"a-{i}")
                        i += 1
                        await trio.sleep(PACE)
                except ConnectionClosed:
                    pass

            async with trio.open_nursery() as publishers:
                publishers.start_soon(api_publisher)
                publishers.start_soon(doomed_publisher)
                await ledger.wait(lambda led: led.count("a-") >= 10 and led.count("b-") >= 10)

                await a.kill()
                for follower in movers:
                    await follower.wait(lambda f: f.closed is not None)
                # Events go on while the movers are away; they must come from history.
                killed_at = ledger.count("b-")
                await ledger.wait(lambda led: led.count("b-") >= killed_at + 5)
                for follower in movers:
                    seq, epoch = follower.position
                    reply = await follower.follow(nursery, b, since=seq, epoch=epoch)
                    assert reply["recovered"] is True, reply
                    assert reply["epoch"] == epoch, reply
                    assert reply["replayed"] >= 5, reply
                resumed_at = ledger.count("b-")
                await ledger.wait(lambda led: led.count("b-") >= resumed_at + 10)
                stop.set()

            assert not ledger.other, ledger.other
            assert not ledger.refused, ledger.refused
            assert len(ledger.unanswered) <= 1, ledger.unanswered
            assert (await b.health())["status"] == "ok"
            for follower in [*movers, stayer]:
                with trio.fail_after(10):
                    await follower.wait(
                        lambda f: {e["payload"]["key"] for e in f.events} >= set(ledger.acked)
                    )
                await follower.settle()
                check_delivery(follower, ledger, may_also=frozenset(ledger.unanswered))
            # Movers and the stayer saw the very same stream.
            assert all(follower.seqs() == stayer.seqs() for follower in movers)
            assert b.running
            # The dead node leaves the cluster's view; its clients are counted once, on b.
            await eventually(
                lambda: b.call("info"), lambda info: [n["node"] for n in info["nodes"]] == ["b"]
            )
            presence = await b.call("presence", topic="jobs")
            assert len(presence["clients"]) == 4, presence
            nursery.cancel_scope.cancel()


async def test_a_node_started_while_redis_is_down_serves_and_joins_when_it_is_up(
    tidings_nodes: Nodes, redis_server: RedisServer
) -> None:
    with trio.fail_after(30):
        await redis_server.stop()
        a = await tidings_nodes.start("a", "--backplane-timeout", "0.5", ready="degraded")
        health = await a.health()
        assert health["backplane"]["connected"] is False, health
        async with trio.open_nursery() as nursery:
            ws = await connect_websocket_url(nursery, a.url)
            assert (await call(ws, {"type": "ping", "requestId": "p"}))["type"] == "pong"
            status, body = await a.api("publish", topic="t", payload=1)
            assert (status, body["error"]["code"]) == (503, "unavailable"), (status, body)

            await redis_server.start()
            await a.wait_health("ok")
            follower = Follower("late", "t")
            await follower.follow(nursery, a)
            ack = await a.call("publish", topic="t", payload={"key": "k"})
            await follower.wait_events(1)
            assert follower.events[0]["seq"] == ack["seq"]
            await ws.aclose()
            nursery.cancel_scope.cancel()
