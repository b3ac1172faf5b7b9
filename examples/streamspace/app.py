"""StreamSpace's real-time server (seed 002) on tidings: the hubs, the Notifier, the AgentHub.

Orgs are tidings tenants, so nothing published for one org reaches another's
clients. Browsers listen on their node's hub topics and on one ``watch:`` topic
named after the user and session they watch; agents listen on ``agent:ID``, in
a tenant of their own. README.md tells the whole story.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import parse_qs

import attrs
import orjson
import trio

from tidings import (
    AppMessage,
    Authenticator,
    AuthError,
    CloseCode,
    CloseInfo,
    Config,
    Endpoint,
    Identity,
    JsonDialect,
    Server,
    Session,
    UpgradeRequest,
    topic_problem,
)

LOGGER = logging.getLogger("streamspace")
AGENTS = "_agents"
"""The tenant of agent connections (org ids may not start with ``_``)."""

# Topic families: hub:sessions (each node's own: local), watch:["USER","SESSION"], agent:ID.
NAMESPACES: dict[str, dict[str, Any]] = {
    name: {"history_size": 16, "client_publish": False} for name in ("hub", "watch", "agent")
}
NAMESPACES["hub"]["local"] = True  # one update per tick per client, even with a backplane

DEFAULTS = {"namespace": "streamspace", "template": "", "state": "pending", "activeConnections": 0}

# The data each session event carries (None: free-form, or two shapes for "shared").
FIELDS: dict[str, tuple[str, ...] | None] = {
    "session.created": None,
    "session.updated": None,
    "session.deleted": (),
    "session.state.changed": ("oldState", "newState"),
    "session.connected": ("connectionId", "clientIP", "userAgent"),
    "session.disconnected": ("connectionId", "duration"),
    "session.heartbeat": ("timestamp", "activeConnections"),
    "session.idle": ("idleDuration",),
    "session.active": (),
    "session.resources.updated": ("resources",),
    "session.tags.updated": ("tags",),
    "session.shared": None,
    "session.unshared": ("unsharedFrom",),
    "session.error": ("error", "code"),
}


def now(*, fraction: bool = True) -> str:
    """RFC 3339 in UTC, as Go marshals time.Time (``fraction``) or formats RFC3339."""
    stamp = datetime.now(UTC).isoformat(timespec="microseconds" if fraction else "seconds")
    return stamp.replace("+00:00", "Z")


def watch_topic(user: str, session: str) -> str:
    return "watch:" + orjson.dumps([user, session]).decode()  # namespace "watch"


class AgentNotConnected(Exception):
    """SendCommandToAgent's error: the agent is connected to no node."""


@attrs.define
class Settings:
    sessions_interval: float = 3.0
    metrics_interval: float = 5.0
    heartbeat_interval: float = 30.0  # agents' period; staleness is checked every third of it
    stale_timeout: float = 45.0
    default_org: str = "default-org"
    jwt_secret: str | None = None  # browsers then present a JWT whose tenant claim is the org


class StreamSpace:
    """The Manager, Notifier and AgentHub of one node. ``endpoints`` go to open_server."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.server: Server | None = None
        self.sessions: dict[str, dict[str, dict[str, Any]]] = {}  # org -> id -> (the seed's DB)
        self.repositories = self.templates = 0
        self.broadcasts = {"sessions": 0, "metrics": 0}
        self.skipped = {"sessions": 0, "metrics": 0}  # org broadcasts nobody was there to hear
        self.agents: dict[str, Session] = {}  # connected to this node
        secret, org = self.settings.jwt_secret, self.settings.default_org
        self._jwt = Authenticator("jwt", jwt_secret=secret, default_tenant=org) if secret else None
        self.endpoints = [self._browsers("sessions"), self._browsers("metrics"), self._agents()]

    def config(self, **settings: Any) -> Config:
        """A tidings Config for this app: its namespaces, and no org as the native tenant."""
        return Config(namespaces=NAMESPACES, default_tenant="_native", **settings)

    @property
    def node(self) -> Server:
        assert self.server is not None, "StreamSpace.run has not started"
        return self.server

    async def run(self, server: Server, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The broadcasters and the stale-agent check, until cancelled."""
        self.server = server
        s = self.settings
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._broadcast, "sessions", s.sessions_interval, self.sessions_at)
            nursery.start_soon(self._broadcast, "metrics", s.metrics_interval, self.metrics_at)
            nursery.start_soon(self._remove_stale_agents)
            task_status.started()

    # --- the hubs -----------------------------------------------------------------

    def hub_topic(self, hub: str) -> str:
        """Each node broadcasts its own hub topics (a local namespace)."""
        return f"hub:{hub}"

    def _browsers(self, hub: str) -> Endpoint:
        dialect = JsonDialect(hub, kind_of=lambda _: "message")
        endpoint = Endpoint(f"/ws/{hub}", dialect, authenticate=self._browser)

        @endpoint.on_connect
        async def joined(session: Session) -> None:
            user, watched = session.query.get("user_id", ""), session.query.get("session_id", "")
            if topic_problem(watch := watch_topic(user, watched)):
                session.close(CloseCode.POLICY_VIOLATION, "invalid user_id or session_id")
                return
            await session.subscribe(self.hub_topic(hub))
            if hub == "sessions" and (user or watched):
                await session.subscribe(watch)

        @endpoint.on("message")
        async def ignored(session: Session, message: AppMessage) -> None:
            """The seed's hubs only log what browsers send."""

        return endpoint

    def _browser(self, request: UpgradeRequest) -> Identity:
        """The org, decided before the upgrade; what the browser watches is the hook's."""
        if self._jwt is not None:  # the org is the token's, whatever the query says
            identity = self._jwt.authenticate(request)
        else:
            org = parse_qs(request.query).get("org_id", [""])[0]
            identity = Identity(org or self.settings.default_org)
        if identity.tenant.startswith("_"):
            raise AuthError("invalid org_id")
        return identity

    async def _broadcast(self, hub: str, interval: float, frame: Callable[[str], Any]) -> None:
        topic = self.hub_topic(hub)
        while True:
            await trio.sleep(interval)
            stats = self.node.broker.topics()
            listening = {t.tenant for t in stats if t.name == topic and t.subscribers}
            for org in sorted(listening | set(self.sessions)):
                if org not in listening:  # nobody of this org to tell: skip the work
                    self.skipped[hub] += 1
                    continue
                await self.node.publish(topic, frame(org), tenant=org)
                self.broadcasts[hub] += 1

    def sessions_at(self, org: str) -> dict[str, Any]:
        newest = reversed(self.sessions.get(org, {}).values())  # the newest first on a tie
        alive = sorted(newest, key=lambda s: str(s["createdAt"]), reverse=True)
        alive = [s for s in alive if s["state"] != "terminated"]
        frame = {"type": "sessions_update", "sessions": alive, "count": len(alive), "org_id": org}
        return frame | {"timestamp": now(fraction=False)}

    def metrics_at(self, org: str) -> dict[str, Any]:
        sessions = list(self.sessions.get(org, {}).values())
        count = [s["state"] for s in sessions].count
        states = {"running": count("running"), "hibernated": count("hibernated")}
        metrics = {
            "sessions": states | {"total": len(sessions)},
            "activeConnections": sum(s["activeConnections"] for s in sessions),
            "repositories": self.repositories,  # the seed counts tables this example lacks
            "templates": self.templates,
        }
        frame = {"type": "metrics_update", "org_id": org, "metrics": metrics}
        return frame | {"timestamp": now(fraction=False)}

    # --- the Notifier ---------------------------------------------------------------

    async def notify(
        self, org: str, kind: str, session_id: str, user_id: str, data: dict[str, Any] | None = None
    ) -> int:
        """NotifySessionEvent: to every client watching the user or the session; how many topics."""
        fields = FIELDS[kind]
        if fields is not None and set(data or {}) != set(fields):
            raise ValueError(f"{kind} carries {fields}, not {sorted(data or {})}")
        self._record(org, kind, session_id, user_id, data or {})
        event: dict[str, Any] = {"type": kind, "sessionId": session_id, "userId": user_id}
        event["timestamp"] = now()
        if data:
            event["data"] = data
        sent = 0
        for topic in await self.node.channels(tenant=org, pattern="watch:*"):
            user, session = orjson.loads(topic.removeprefix("watch:"))
            if (user and user == user_id) or (session and session == session_id):
                await self.node.publish(topic, event, tenant=org)
                sent += 1
        return sent

    async def share(
        self, org: str, session_id: str, owner: str, shared_with: str, permissions: list[str]
    ) -> None:
        """NotifySessionShared: the owner hears sharedWith, the other user sharedBy."""
        data = {"sharedWith": shared_with, "permissions": permissions}
        await self.notify(org, "session.shared", session_id, owner, data)
        data = {"sharedBy": owner, "permissions": permissions}
        await self.notify(org, "session.shared", session_id, shared_with, data)

    def _record(self, org: str, kind: str, sid: str, user: str, data: dict[str, Any]) -> None:
        """Keep the org's sessions (what the hubs broadcast) in step with the events."""
        sessions = self.sessions.setdefault(org, {})
        session = sessions.get(sid)
        if kind == "session.created":
            new = {"name": sid, "user": user, "createdAt": now(fraction=False)} | DEFAULTS
            session = sessions[sid] = new | data
        elif session is None:
            return
        elif kind == "session.deleted":
            del sessions[sid]
        elif kind == "session.state.changed":
            session["state"] = data["newState"]
        elif kind in ("session.connected", "session.disconnected"):
            session["activeConnections"] += 1 if kind == "session.connected" else -1
        session["status"] = {"phase": str(session["state"]).capitalize()}

    # --- the AgentHub ----------------------------------------------------------------

    def _agents(self) -> Endpoint:
        endpoint = Endpoint(
            "/api/v1/agents/connect", JsonDialect("streamspace-agent"), authenticate=_agent
        )

        @endpoint.on_connect
        async def register(session: Session) -> None:
            agent = cast(str, session.identity.user)
            replaced = self.agents.get(agent)
            if replaced is not None:  # the seed closes the old connection
                replaced.unsubscribe(f"agent:{agent}")
                replaced.close(CloseCode.POLICY_VIOLATION, "replaced by a new connection")
            await session.subscribe(f"agent:{agent}")
            session.state["last_ping"] = trio.current_time()
            self.agents[agent] = session
            platform = session.query.get("platform", "kubernetes")
            LOGGER.info("agent %s connected (%s)", agent, platform)

        @endpoint.on_disconnect
        async def unregister(session: Session, closed: CloseInfo) -> None:
            if self.agents.get(agent := cast(str, session.identity.user)) is session:
                del self.agents[agent]

        @endpoint.on("heartbeat")
        async def heartbeat(session: Session, message: AppMessage) -> None:
            session.state["last_ping"] = trio.current_time()
            session.state["heartbeat"] = message.body.get("payload")

        @endpoint.on("ack")
        @endpoint.on("complete")
        @endpoint.on("failed")
        @endpoint.on("status")
        async def report(session: Session, message: AppMessage) -> None:
            LOGGER.info("agent %s: %s %s", session.identity.user, message.kind, message.body)

        return endpoint

    async def _remove_stale_agents(self) -> None:
        while True:
            await trio.sleep(self.settings.heartbeat_interval / 3)
            for agent, session in list(self.agents.items()):
                if trio.current_time() - session.state["last_ping"] > self.settings.stale_timeout:
                    LOGGER.warning("agent %s is stale (no heartbeat): removed", agent)
                    del self.agents[agent]
                    session.unsubscribe(f"agent:{agent}")
                    session.close(CloseCode.GOING_AWAY, "stale connection: no heartbeat")

    async def connected_agents(self, *, everywhere: bool = False) -> list[str]:
        """GetConnectedAgents: of this node, or of every node."""
        if not everywhere:
            return sorted(self.agents)
        found = await self.node.channels(tenant=AGENTS, pattern="agent:*")
        return sorted(topic.removeprefix("agent:") for topic in found)

    async def is_agent_connected(self, agent_id: str) -> bool:
        """IsAgentConnected: here, or on another node (presence through the backplane)."""
        if agent_id in self.agents:
            return True
        return bool(await self.node.presence_everywhere(f"agent:{agent_id}", tenant=AGENTS))

    async def send_command(
        self, agent_id: str, action: str, payload: Any = None, command_id: str = ""
    ) -> str:
        """SendCommandToAgent: a ``command`` message; raises AgentNotConnected."""
        if not await self.is_agent_connected(agent_id):
            raise AgentNotConnected(f"agent {agent_id} is not connected")
        command_id = command_id or f"cmd-{secrets.token_hex(6)}"
        command = {"commandId": command_id, "action": action, "payload": payload or {}}
        frame = {"type": "command", "timestamp": now(), "payload": command}
        await self.node.publish(f"agent:{agent_id}", frame, tenant=AGENTS)
        return command_id

    async def broadcast_to_agents(self, message: Any, exclude: str = "") -> list[str]:
        """BroadcastToAllAgents (every node's agents); returns who was sent it."""
        targets = [a for a in await self.connected_agents(everywhere=True) if a != exclude]
        for agent in targets:
            await self.node.publish(f"agent:{agent}", message, tenant=AGENTS)
        return targets


def _agent(request: UpgradeRequest) -> Identity:
    agent = parse_qs(request.query).get("agent_id", [""])[0]
    if not agent or topic_problem(f"agent:{agent}"):
        raise AuthError("agent_id cannot be empty")
    return Identity(AGENTS, agent)
