"""Tenant isolation, as a property over real sockets.

Hypothesis draws a few clients of a few tenants (from their JWTs) and a
sequence of subscribe / resume / unsubscribe / publish / presence commands on
topic names every tenant shares. A model of what each client must see runs
alongside: per-tenant offsets, history, presence and join/leave. Each example
runs one server in its own ``trio.run`` and asserts, besides the model's exact
answers, the property itself: no event, join, leave, presence entry, topic or
history ever shows another tenant.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import AsyncExitStack
from typing import Any

import attrs
import jwt
import orjson
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import WebSocketConnection, open_websocket_url

from tidings import ErrorCode, Server
from tidings.config import NamespaceConfig

from .conftest import TEST_TIMEOUT, http_request, receive, running_server, send

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
API_KEY = "tenant-test-key"
DEFAULT_TENANT = "default"
#: None: a token without a tenant claim, which puts the client in the default tenant.
TENANTS = ["acme", "globex", None]
#: Shared by every tenant, so that names collide across tenants.
TOPICS = ["news", "alerts", "chat:lobby"]
#: Weighted towards what can leak: publications, and subscriptions that replay history.
COMMANDS = ["subscribe", "resume", "resume", "unsubscribe", "publish", "publish", "presence"]


@attrs.frozen
class Scenario:
    tenants: list[str | None]
    """One entry per client."""
    steps: list[tuple[int, str, str]]
    """(client index, command, topic)."""


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    # At least two tenants among two to five clients.
    first, second = draw(st.permutations(TENANTS))[:2]
    tenants = [first, second, *draw(st.lists(st.sampled_from(TENANTS), max_size=3))]
    step = st.tuples(
        st.integers(0, len(tenants) - 1), st.sampled_from(COMMANDS), st.sampled_from(TOPICS)
    )
    return Scenario(tenants, draw(st.lists(step, min_size=5, max_size=40)))


class Model:
    """What each client must see, from the commands so far."""

    def __init__(self, tenants: list[str | None]) -> None:
        self.tenant = [tenant or DEFAULT_TENANT for tenant in tenants]
        self.user = [f"user{i}" for i in range(len(tenants))]
        self.subscribed: list[set[str]] = [set() for _ in tenants]
        self.history: dict[tuple[str, str], list[Any]] = defaultdict(list)
        self.pushes: list[list[tuple[Any, ...]]] = [[] for _ in tenants]
        """Frames each client receives unasked, in order: events, joins, leaves."""

    def members(self, tenant: str, topic: str) -> list[int]:
        return [
            i
            for i, topics in enumerate(self.subscribed)
            if topic in topics and self.tenant[i] == tenant
        ]

    def subscribe(self, client: int, topic: str, *, resume: bool) -> dict[str, Any] | str:
        if topic in self.subscribed[client]:
            return ErrorCode.ALREADY_SUBSCRIBED
        tenant = self.tenant[client]
        for other in self.members(tenant, topic):
            self.pushes[other].append(("join", topic, self.user[client], tenant))
        self.subscribed[client].add(topic)
        history = self.history[tenant, topic]
        if resume:
            self.pushes[client].extend(("event", topic, payload) for payload in history)
        return {"seq": len(history), "replayed": len(history) if resume else None}

    def unsubscribe(self, client: int, topic: str) -> dict[str, Any] | str:
        if topic not in self.subscribed[client]:
            return ErrorCode.NOT_SUBSCRIBED
        self.subscribed[client].discard(topic)
        tenant = self.tenant[client]
        for other in self.members(tenant, topic):
            self.pushes[other].append(("leave", topic, self.user[client], tenant))
        return {"status": "unsubscribed"}

    def publish(self, client: int, topic: str, payload: Any) -> dict[str, Any]:
        tenant = self.tenant[client]
        history = self.history[tenant, topic]
        history.append(payload)
        for member in self.members(tenant, topic):
            self.pushes[member].append(("event", topic, payload))
        return {"seq": len(history)}

    def presence(self, client: int, topic: str) -> set[tuple[str, str]]:
        tenant = self.tenant[client]
        return {(self.user[i], tenant) for i in self.members(tenant, topic)}

    def channels(self, tenant: str) -> dict[str, int]:
        counts = {topic: len(self.members(tenant, topic)) for topic in TOPICS}
        return {topic: count for topic, count in counts.items() if count}


def token(client: int, tenant: str | None) -> str:
    claims: dict[str, Any] = {"sub": f"user{client}", "exp": time.time() + 300, "publish": ["*"]}
    if tenant is not None:
        claims["tenant"] = tenant
    return jwt.encode(claims, SECRET, algorithm="HS256")


def push_of(frame: dict[str, Any]) -> tuple[Any, ...]:
    """A frame the client did not ask for, as the model writes it."""
    if frame["type"] == "event":
        return ("event", frame["topic"], frame["payload"])
    if frame["type"] in ("join", "leave"):
        entry = frame["payload"]
        return (frame["type"], frame["topic"], entry["user"], entry["tenant"])
    raise AssertionError(f"unexpected frame {frame}")


class Client:
    def __init__(self, ws: WebSocketConnection, tenant: str) -> None:
        self.ws = ws
        self.tenant = tenant
        self.frames: list[dict[str, Any]] = []
        """Frames received that answered no command (events, joins, leaves)."""

    async def command(self, message: dict[str, Any]) -> dict[str, Any]:
        await send(self.ws, message)
        while True:
            frame = await receive(self.ws)
            if frame.get("requestId") == message["requestId"]:
                return frame
            self.frames.append(frame)


async def api(server: Server, method: str, body: dict[str, Any]) -> dict[str, Any]:
    status, _, content = await http_request(
        server.port,
        "POST",
        f"/api/{method}",
        orjson.dumps(body),
        f"Authorization: apikey {API_KEY}\r\nContent-Type: application/json\r\n",
    )
    assert status == 200, content
    return orjson.loads(content)  # type: ignore[no-any-return]


async def run_scenario(scenario: Scenario) -> None:
    model = Model(scenario.tenants)
    async with (
        running_server(
            jwt_secret=SECRET,
            api_key=API_KEY,
            presence=True,
            join_leave=True,
            namespaces={"chat": NamespaceConfig()},
        ) as server,
        AsyncExitStack() as stack,
    ):
        clients: list[Client] = []
        for i, tenant in enumerate(scenario.tenants):
            headers = [(b"Authorization", f"Bearer {token(i, tenant)}".encode())]
            ws = await stack.enter_async_context(
                open_websocket_url(server.url, extra_headers=headers)
            )
            clients.append(Client(ws, model.tenant[i]))
        await play(server, model, scenario, clients)


async def play(server: Server, model: Model, scenario: Scenario, clients: list[Client]) -> None:
    for n, (i, command, topic) in enumerate(scenario.steps):
        client = clients[i]
        request_id = f"r{n}"
        if command in ("subscribe", "resume"):
            message: dict[str, Any] = {"type": "subscribe", "topic": topic, "requestId": request_id}
            if command == "resume":
                message["payload"] = {"since": 0}
            reply = await client.command(message)
            expected = model.subscribe(i, topic, resume=command == "resume")
            if isinstance(expected, str):
                assert reply["payload"]["code"] == expected, reply
            else:
                assert reply["payload"]["seq"] == expected["seq"], (n, reply)
                assert reply["payload"].get("replayed") == expected["replayed"], (n, reply)
        elif command == "unsubscribe":
            reply = await client.command(
                {"type": "unsubscribe", "topic": topic, "requestId": request_id}
            )
            expected = model.unsubscribe(i, topic)
            if isinstance(expected, str):
                assert reply["payload"]["code"] == expected, reply
            else:
                assert reply["payload"]["status"] == "unsubscribed", reply
        elif command == "publish":
            payload = {"tenant": client.tenant, "client": i, "n": n}
            reply = await client.command(
                {"type": "publish", "topic": topic, "payload": payload, "requestId": request_id}
            )
            assert reply["payload"]["seq"] == model.publish(i, topic, payload)["seq"], (n, reply)
        else:
            reply = await client.command(
                {"type": "presence", "topic": topic, "requestId": request_id}
            )
            seen = {(entry["user"], entry["tenant"]) for entry in reply["payload"]["clients"]}
            assert {tenant for _, tenant in seen} <= {client.tenant}, reply
            assert seen == model.presence(i, topic), (n, reply)

    # Whatever was queued for a client comes before the answer to its last ping.
    for i, client in enumerate(clients):
        await client.command({"type": "ping", "requestId": "last"})
        for frame in client.frames:
            # The property, stated on its own: nothing of another tenant arrives.
            if frame["type"] == "event":
                assert frame["payload"]["tenant"] == client.tenant, (i, frame)
            else:
                assert frame["payload"]["tenant"] == client.tenant, (i, frame)
        assert [push_of(frame) for frame in client.frames] == model.pushes[i], i

    # What the HTTP API lists for each tenant: its topics, presence and history only.
    for tenant in sorted({DEFAULT_TENANT, *model.tenant}):
        listed = await api(server, "channels", {"tenant": tenant})
        channels = {entry["topic"]: entry["subscribers"] for entry in listed["channels"]}
        assert channels == model.channels(tenant), tenant
        for topic in TOPICS:
            presence = await api(server, "presence", {"tenant": tenant, "topic": topic})
            users = {(entry["user"], entry["tenant"]) for entry in presence["clients"]}
            expected = {(model.user[i], tenant) for i in model.members(tenant, topic)}
            assert users == expected, (tenant, topic)
            history = await api(server, "history", {"tenant": tenant, "topic": topic})
            payloads = [event["payload"] for event in history["events"]]
            assert payloads == model.history[tenant, topic], (tenant, topic)


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(scenario=scenarios())
def test_no_event_presence_or_topic_ever_crosses_tenants(scenario: Scenario) -> None:
    async def main() -> None:
        with trio.fail_after(TEST_TIMEOUT):
            await run_scenario(scenario)

    trio.run(main)


def test_the_same_topic_name_in_two_tenants_is_two_topics() -> None:
    """One fixed case of the property, readable on its own."""
    scenario = Scenario(
        ["acme", "globex", "acme"],
        [
            (0, "subscribe", "news"),
            (1, "subscribe", "news"),
            (2, "publish", "news"),
            (1, "publish", "news"),
            (1, "presence", "news"),
            (0, "unsubscribe", "news"),
            (0, "resume", "news"),  # acme's own event, seq 1
            (1, "unsubscribe", "news"),
            (1, "resume", "news"),  # globex's own event, also seq 1
            (2, "presence", "news"),
        ],
    )

    async def main() -> None:
        with trio.fail_after(TEST_TIMEOUT):
            await run_scenario(scenario)

    trio.run(main)
