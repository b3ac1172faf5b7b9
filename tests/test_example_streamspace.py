"""examples/streamspace: the StreamSpace seed (002) on tidings, over real sockets.

Shapes are checked field by field against the seed: SessionEvent
(``type, sessionId, userId, timestamp, data``) with each type's data, the hubs'
``sessions_update``/``metrics_update``, and the agents' ``command`` message.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jwt
import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection
from trio_websocket import open_websocket_url as ws_open

from examples.streamspace import FIELDS, AgentNotConnected, Settings, StreamSpace
from examples.streamspace.app import watch_topic
from tidings import open_server

from .conftest import TEST_TIMEOUT, subscribe
from .redis_fixture import RedisServer, eventually, free_port

ROOT = Path(__file__).resolve().parent.parent
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
SECONDS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
SECRET = "a-secret-of-thirty-two-bytes-at-least"
QUIET = {"sessions_interval": 3600.0, "metrics_interval": 3600.0}


@asynccontextmanager
async def streamspace(
    *, backplane: str = "memory", node: str = "", **settings: Any
) -> AsyncIterator[StreamSpace]:
    app = StreamSpace(Settings(**(QUIET | settings)))
    config = app.config(port=0, log_level="warning", backplane=backplane, node_id=node)
    async with (
        open_server(config, endpoints=app.endpoints) as server,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(app.run, server)
        yield app
        nursery.cancel_scope.cancel()


def url(app: StreamSpace, path: str, **query: str) -> str:
    return f"ws://127.0.0.1:{app.node.port}{path}?{urlencode(query)}"


async def frame(ws: WebSocketConnection) -> dict[str, Any]:
    return orjson.loads(await ws.get_message())  # type: ignore[no-any-return]


def refused(status: int) -> Any:
    return pytest.raises(ConnectionRejected, check=lambda exc: exc.status_code == status)


async def until(condition: Callable[[], bool]) -> None:
    """A bounded poll of something observable (the test's fail_after bounds it)."""
    while not condition():  # noqa: ASYNC110 - app state, not an event anyone sets
        await trio.sleep(0.005)


def subscribers(app: StreamSpace, topic: str, org: str) -> int:
    stats = app.node.broker.topic_stats(topic, org)
    return 0 if stats is None else stats.subscribers


async def watching(app: StreamSpace, org: str, user: str = "", session: str = "") -> None:
    await until(lambda: subscribers(app, watch_topic(user, session), org) > 0)


def event(kind: str, session: str, user: str, data: Any = None) -> dict[str, Any]:
    shape = {"type": kind, "sessionId": session, "userId": user}
    return shape if data is None else shape | {"data": data}


def without_stamp(received: dict[str, Any]) -> dict[str, Any]:
    assert STAMP.match(received.pop("timestamp")), received
    return received


# --- the Notifier ------------------------------------------------------------------------

SEED_EVENTS: list[tuple[str, dict[str, Any] | None]] = [
    ("session.created", {"template": "firefox-browser", "state": "running", "resources": {}}),
    ("session.updated", {"description": "mine"}),
    ("session.state.changed", {"oldState": "running", "newState": "hibernated"}),
    ("session.connected", {"connectionId": "c1", "clientIP": "10.0.0.1", "userAgent": "ua"}),
    ("session.disconnected", {"connectionId": "c1", "duration": 12}),
    ("session.heartbeat", {"timestamp": "2025-01-15T10:30:00Z", "activeConnections": 2}),
    ("session.idle", {"idleDuration": 300}),
    ("session.active", None),
    ("session.resources.updated", {"resources": {"cpu": "2000m", "memory": "4096Mi"}}),
    ("session.tags.updated", {"tags": ["a", "b"]}),
    ("session.unshared", {"unsharedFrom": "u2"}),
    ("session.error", {"error": "pod failed", "code": "POD_FAILED"}),
    ("session.deleted", None),
]
SEED_TYPES = {kind for kind, _ in SEED_EVENTS} | {"session.shared"}


async def test_every_session_event_has_the_seeds_shape() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with streamspace() as app:
            async with ws_open(url(app, "/ws/sessions", org_id="acme", user_id="u1")) as ws:
                await watching(app, "acme", "u1")
                for kind, data in SEED_EVENTS:
                    assert await app.notify("acme", kind, "s1", "u1", data) == 1
                    assert without_stamp(await frame(ws)) == event(kind, "s1", "u1", data)
                # Shared: the owner hears sharedWith, the other user (not watched here) sharedBy.
                await app.share("acme", "s1", "u1", "u2", ["view"])
                shared = {"sharedWith": "u2", "permissions": ["view"]}
                assert without_stamp(await frame(ws)) == event("session.shared", "s1", "u1", shared)
            with pytest.raises(ValueError, match="oldState"):
                await app.notify("acme", "session.state.changed", "s1", "u1", {"state": "x"})
            with pytest.raises(KeyError):
                await app.notify("acme", "session.exploded", "s1", "u1")
    assert set(FIELDS) == SEED_TYPES  # all fourteen of the seed's EventType constants


async def test_events_are_routed_by_user_and_by_session_once_each() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with streamspace() as app:
            path = "/ws/sessions"
            async with (
                ws_open(url(app, path, org_id="acme", user_id="u1")) as by_user,
                ws_open(url(app, path, org_id="acme", session_id="s2")) as by_session,
                ws_open(url(app, path, org_id="acme", user_id="u1", session_id="s2")) as both,
                ws_open(url(app, path, org_id="acme", user_id="u9")) as other,
            ):
                await watching(app, "acme", "u1")
                await watching(app, "acme", "", "s2")
                await watching(app, "acme", "u1", "s2")
                await watching(app, "acme", "u9")
                assert await app.notify("acme", "session.active", "s1", "u1") == 2
                assert await app.notify("acme", "session.active", "s2", "u2") == 2
                assert await app.notify("acme", "session.active", "s2", "u1") == 3
                assert await app.notify("acme", "session.active", "s3", "u3") == 0
                mark = {"error": "end", "code": "END"}
                await app.notify("acme", "session.error", "s2", "u1", mark)
                await app.notify("acme", "session.error", "s9", "u9", mark)
                seen = {}
                for name, ws in [("user", by_user), ("session", by_session), ("both", both)]:
                    seen[name] = []
                    while (got := without_stamp(await frame(ws)))["type"] != "session.error":
                        seen[name].append((got["sessionId"], got["userId"]))
                assert seen == {
                    "user": [("s1", "u1"), ("s2", "u1")],
                    "session": [("s2", "u2"), ("s2", "u1")],
                    "both": [("s1", "u1"), ("s2", "u2"), ("s2", "u1")],  # never twice
                }
                assert without_stamp(await frame(other)) == event("session.error", "s9", "u9", mark)
            # Ids that make no topic (over 256 characters): closed, 1008.
            async with ws_open(url(app, path, org_id="acme", user_id="u" * 300)) as too_long:
                with pytest.raises(ConnectionClosed) as closed:
                    await too_long.get_message()
                assert closed.value.reason.code == 1008


# --- the hubs ------------------------------------------------------------------------------


async def test_hubs_broadcast_per_org_and_skip_orgs_nobody_listens_to() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with streamspace(sessions_interval=0.03, metrics_interval=0.05) as app:
            created = {"template": "firefox-browser", "state": "running"}
            await app.notify("acme", "session.created", "s1", "u1", created)
            await app.notify("acme", "session.connected", "s1", "u1", CONNECTED)
            await app.notify("globex", "session.created", "g1", "g7", created)
            # Nobody connected: each tick of each hub skips both orgs, and publishes nothing.
            await until(lambda: min(app.skipped.values()) >= 4)
            assert app.broadcasts == {"sessions": 0, "metrics": 0}
            async with (
                ws_open(url(app, "/ws/sessions", org_id="acme")) as sessions,
                ws_open(url(app, "/ws/metrics", org_id="acme")) as metrics,
            ):
                update = await frame(sessions)
                assert set(update) == {"type", "sessions", "count", "org_id", "timestamp"}
                assert SECONDS.match(update["timestamp"])
                assert (update["type"], update["count"], update["org_id"]) == (
                    "sessions_update",
                    1,
                    "acme",
                )
                (session,) = update["sessions"]
                assert SECONDS.match(session.pop("createdAt"))
                assert session == {
                    "name": "s1",
                    "namespace": "streamspace",
                    "user": "u1",
                    "template": "firefox-browser",
                    "state": "running",
                    "activeConnections": 1,
                    "status": {"phase": "Running"},
                }
                update = await frame(metrics)
                assert SECONDS.match(update.pop("timestamp"))
                assert update == {
                    "type": "metrics_update",
                    "org_id": "acme",
                    "metrics": {
                        "sessions": {"running": 1, "hibernated": 0, "total": 1},
                        "activeConnections": 1,
                        "repositories": 0,
                        "templates": 0,
                    },
                }
                # globex still has nobody: its broadcasts keep being skipped.
                skipped = dict(app.skipped)
                await until(lambda: all(app.skipped[h] > skipped[h] for h in skipped))
                assert (await frame(sessions))["org_id"] == "acme"
            assert app.broadcasts["sessions"] >= 1 and app.broadcasts["metrics"] >= 1


CONNECTED = {"connectionId": "c1", "clientIP": "10.0.0.1", "userAgent": "ua"}


# --- tenant isolation ------------------------------------------------------------------------


async def test_an_org_never_hears_another_orgs_events_or_broadcasts() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with streamspace(sessions_interval=0.03) as app:
            await app.notify("globex", "session.created", "s1", "u1", {"state": "running"})
            same = {"user_id": "u1", "session_id": "s1"}  # the same ids in both orgs
            async with (
                ws_open(url(app, "/ws/sessions", org_id="acme", **same)) as acme,
                ws_open(url(app, "/ws/sessions", org_id="globex", **same)) as globex,
                ws_open(app.node.url) as native,
            ):
                await watching(app, "acme", "u1", "s1")
                await watching(app, "globex", "u1", "s1")
                # Whatever acme's client sends (tidings' own subscribe, garbage) changes nothing.
                for hostile in [
                    {"type": "subscribe", "topic": watch_topic("u1", "s1"), "org_id": "globex"},
                    {"type": "subscribe", "topic": app.hub_topic("sessions")},
                    {"org_id": "globex"},
                ]:
                    await acme.send_message(orjson.dumps(hostile).decode())
                # The native endpoint's clients live in a tenant of their own.
                await subscribe(native, watch_topic("u1", "s1"))
                await app.notify("globex", "session.idle", "s1", "u1", {"idleDuration": 5})
                await app.notify("acme", "session.idle", "s1", "u1", {"idleDuration": 7})
                got = without_stamp(await frame(globex))
                while got["type"] == "sessions_update":
                    assert got["org_id"] == "globex" and got["count"] == 1
                    got = without_stamp(await frame(globex))
                assert got == event("session.idle", "s1", "u1", {"idleDuration": 5})
                while (got := await frame(acme))["type"] == "sessions_update":
                    assert (got["org_id"], got["sessions"]) == ("acme", [])  # its own, empty
                assert without_stamp(got) == event("session.idle", "s1", "u1", {"idleDuration": 7})
                await app.node.publish(watch_topic("u1", "s1"), {"mark": 1}, tenant="_native")
                while (got := await frame(native)).get("type") != "event":
                    pass
                assert got["payload"] == {"mark": 1}
            for org in ("_agents", "_native"):  # the reserved tenants are no org's
                with refused(401):
                    async with ws_open(url(app, "/ws/sessions", org_id=org)):
                        pass


async def test_with_a_jwt_the_org_is_the_tokens_whatever_the_query_says() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with streamspace(jwt_secret=SECRET) as app:
            claims = {"sub": "u1", "tenant": "globex", "exp": 4_000_000_000}
            token = jwt.encode(claims, SECRET, algorithm="HS256")
            with refused(401):
                async with ws_open(url(app, "/ws/sessions", org_id="globex", user_id="u1")):
                    pass
            query = {"org_id": "acme", "user_id": "u1", "token": token}
            async with ws_open(url(app, "/ws/sessions", **query)) as ws:
                await watching(app, "globex", "u1")
                assert await app.notify("acme", "session.active", "s1", "u1") == 0
                assert await app.notify("globex", "session.active", "s1", "u1") == 1
                assert without_stamp(await frame(ws)) == event("session.active", "s1", "u1")


# --- the AgentHub ---------------------------------------------------------------------------


def agent_url(app: StreamSpace, agent: str, platform: str = "kubernetes") -> str:
    return url(app, "/api/v1/agents/connect", agent_id=agent, platform=platform)


async def beat(ws: WebSocketConnection, period: float) -> None:
    heartbeat = {"type": "heartbeat", "timestamp": "2025-11-21T10:30:00Z"}
    heartbeat["payload"] = {"status": "online", "activeSessions": 1}  # type: ignore[assignment]
    with contextlib.suppress(ConnectionClosed):  # until the server closes this connection
        while True:
            await ws.send_message(orjson.dumps(heartbeat).decode())
            await trio.sleep(period)  # the agent's own schedule, not a synchronisation


def assert_command(received: dict[str, Any], action: str, payload: dict[str, Any]) -> str:
    assert set(received) == {"type", "timestamp", "payload"} and received["type"] == "command"
    assert STAMP.match(received["timestamp"])
    command = received["payload"]
    assert set(command) == {"commandId", "action", "payload"}
    assert (command["action"], command["payload"]) == (action, payload)
    return str(command["commandId"])


async def test_agents_commands_list_broadcast_and_stale_removal() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with streamspace(heartbeat_interval=0.06, stale_timeout=0.25) as app:
            with refused(401):  # "agent_id cannot be empty"
                async with ws_open(url(app, "/api/v1/agents/connect", platform="docker")):
                    pass
            async with (
                ws_open(agent_url(app, "k8s-1")) as k8s,
                ws_open(agent_url(app, "docker-1", "docker")) as docker,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(beat, k8s, 0.03)  # docker-1 never sends a heartbeat
                await until(lambda: len(app.agents) == 2)
                assert await app.connected_agents() == ["docker-1", "k8s-1"]
                assert await app.connected_agents(everywhere=True) == ["docker-1", "k8s-1"]
                sent = await app.send_command("k8s-1", "start_session", {"sessionId": "s1"})
                assert (
                    assert_command(await frame(k8s), "start_session", {"sessionId": "s1"}) == sent
                )
                with pytest.raises(AgentNotConnected, match="agent ghost is not connected"):
                    await app.send_command("ghost", "stop_session")
                # A broadcast to every agent but one.
                shutdown = {"type": "shutdown", "payload": {}}
                assert await app.broadcast_to_agents(shutdown, exclude="k8s-1") == ["docker-1"]
                assert await frame(docker) == shutdown
                await app.send_command("k8s-1", "stop_session", {"sessionId": "s1"}, "cmd-2")
                assert (
                    assert_command(await frame(k8s), "stop_session", {"sessionId": "s1"}) == "cmd-2"
                )
                # docker-1 goes stale: closed and removed; k8s-1, heartbeating, stays.
                with pytest.raises(ConnectionClosed) as closed:
                    await docker.get_message()
                assert closed.value.reason.code == 1001
                assert closed.value.reason.reason == "stale connection: no heartbeat"
                assert await app.connected_agents() == ["k8s-1"]
                assert not await app.is_agent_connected("docker-1")
                assert await app.is_agent_connected("k8s-1")
                assert app.agents["k8s-1"].state["heartbeat"] == {
                    "status": "online",
                    "activeSessions": 1,
                }
                # The same agent connecting again replaces the old connection, as in the seed.
                async with ws_open(agent_url(app, "k8s-1")) as again:
                    with pytest.raises(ConnectionClosed) as replaced:
                        while True:
                            await k8s.get_message()
                    assert replaced.value.reason.code == 1008
                    await until(lambda: subscribers(app, "agent:k8s-1", "_agents") == 1)
                    await app.send_command("k8s-1", "stop_session", {}, "cmd-3")
                    assert assert_command(await frame(again), "stop_session", {}) == "cmd-3"
                nursery.cancel_scope.cancel()


async def test_is_agent_connected_across_nodes_through_redis(redis_server: RedisServer) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            streamspace(backplane=redis_server.url, node="one") as one,
            streamspace(backplane=redis_server.url, node="two") as two,
        ):
            async with ws_open(agent_url(one, "k8s-prod-us-east-1")) as agent:
                await eventually(lambda: two.is_agent_connected("k8s-prod-us-east-1"), bool)
                assert await two.connected_agents() == []  # GetConnectedAgents is per node
                everywhere = await two.connected_agents(everywhere=True)
                assert everywhere == ["k8s-prod-us-east-1"]
                # A command sent from node two reaches the agent connected to node one.
                sent = await two.send_command("k8s-prod-us-east-1", "wake_session", {"x": 1})
                assert assert_command(await frame(agent), "wake_session", {"x": 1}) == sent
                assert await two.broadcast_to_agents({"type": "ping"}) == ["k8s-prod-us-east-1"]
                assert await frame(agent) == {"type": "ping"}
                # And a session event emitted on node one reaches a browser on node two.
                async with ws_open(url(two, "/ws/sessions", org_id="acme", user_id="u1")) as ws:
                    await watching(two, "acme", "u1")
                    sent_to = await eventually(
                        lambda: one.notify("acme", "session.active", "s1", "u1"), bool
                    )
                    assert sent_to == 1
                    assert without_stamp(await frame(ws)) == event("session.active", "s1", "u1")
            await eventually(lambda: two.is_agent_connected("k8s-prod-us-east-1"), lambda c: not c)
            with pytest.raises(AgentNotConnected):
                await two.send_command("k8s-prod-us-east-1", "stop_session")


# --- as the README says ------------------------------------------------------------------------


@pytest.mark.slow
async def test_runs_as_the_readme_says() -> None:
    port = free_port()
    command = [
        sys.executable, "-m", "examples.streamspace", "--port", str(port),
        "--demo", "--demo-interval", "0.02", "--sessions-interval", "0.1",
        "--log-level", "warning",
    ]  # fmt: skip
    with trio.fail_after(TEST_TIMEOUT):
        process = await trio.lowlevel.open_process(command, cwd=ROOT, stdout=subprocess.PIPE)
        try:
            assert process.stdout is not None
            line = b""
            while not line.endswith(b"\n"):
                line += await process.stdout.receive_some(200)
            assert b"streamspace listening on ws://127.0.0.1:%d" % port in line
            base = f"ws://127.0.0.1:{port}"
            async with (
                ws_open(f"{base}/ws/sessions?user_id=demo-user") as ws,
                ws_open(f"{base}/api/v1/agents/connect?agent_id=a1&platform=docker") as agent,
            ):
                kinds = set()
                while len(kinds) < 15:
                    got = await frame(ws)
                    kinds.add(got["type"])
                    if got["type"] == "sessions_update":
                        assert got["org_id"] == "default-org"
                    else:
                        assert (got["sessionId"], got["userId"]) == ("demo-session", "demo-user")
                assert kinds == {*SEED_TYPES, "sessions_update"}
                assert (await frame(agent))["type"] == "command"
        finally:
            process.terminate()
            assert await process.wait() == 0
