"""The dorgu operator's WebSocket server, on tidings.

tidings serves ``/ws`` and ``/health``, sequences and fans out the four topics,
bounds every client (512 KB messages, 30 s pings, 60 s read and 10 s write
timeouts, 256 queued messages, dropping on full) and answers ``request`` with
the handlers below. What is dorgu's own: its frames (a trimmed native dialect),
the in-memory store of personas and clusters, and a simulated operator that
changes them over time and broadcasts PersonaEvent, ClusterEvent and
ValidationEvent.
"""

from __future__ import annotations

import argparse
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import trio

from tidings import (
    Config,
    Endpoint,
    ErrorCode,
    NativeDialect,
    RequestContext,
    RequestError,
    Server,
    open_server,
)
from tidings import messages as wire

TOPICS = ("personas", "cluster", "deployments", "events")
Published = list[tuple[str, dict[str, Any]]]


def make_config(host: str = "127.0.0.1", port: int = 9090, **overrides: Any) -> Config:
    """The seed's connection management, through tidings' configuration."""
    settings: dict[str, Any] = {
        "max_message_size": "512KiB", "ping_interval": 30, "write_timeout": 10,
        "read_timeout": 60, "outbox_size": 256, "overflow_policy": "drop",
        "topics": TOPICS, "client_publish": False, "log_level": "warning",
    }  # fmt: skip
    return Config(host=host, port=port, **{**settings, **overrides})


class DorguDialect(NativeDialect):
    """The native protocol in dorgu's shapes: no positions on events or confirmations."""

    name = "dorgu"  # type: ignore[misc]

    def decode(self, frame: str | bytes) -> list[wire.Command | wire.Error]:
        """Only subscribe, unsubscribe and request: no publish, ack, presence or ping."""
        refused = "expected subscribe, unsubscribe or request"
        return [
            item
            if isinstance(item, wire.Subscribe | wire.Unsubscribe | wire.Request | wire.Error)
            else wire.Error(ErrorCode.UNKNOWN_TYPE, refused, getattr(item, "request_id", None))
            for item in super().decode(frame)
        ]

    def encode_event(self, event: wire.Event) -> bytes:
        return orjson.dumps({
            "type": "event", "topic": event.topic,
            "payload": orjson.Fragment(event.payload_json), "timestamp": event.timestamp,
        })  # fmt: skip

    def encode_reply(self, reply: wire.Reply) -> bytes:
        if isinstance(reply, wire.Subscribed):  # the seed's payload, without seq and epoch
            payload = {"status": "subscribed", "topic": reply.topic}
            reply = wire.Answer(reply.topic, reply.request_id, payload)
        return super().encode_reply(reply)


class Store:
    """ApplicationPersonas and ClusterPersonas, as the operator would watch them."""

    def __init__(self) -> None:
        self.clusters = [
            {"name": "my-cluster", "environment": "production", "phase": "Ready",
             "kubernetesVersion": "v1.29.0", "platform": "EKS", "nodeCount": 3,
             "applicationCount": 0, "addons": ["argocd", "prometheus", "cert-manager"]},
            {"name": "dev-cluster", "environment": "development", "phase": "Ready",
             "kubernetesVersion": "v1.30.2", "platform": "kind", "nodeCount": 1,
             "applicationCount": 0, "addons": ["prometheus"]},
        ]  # fmt: skip
        self.personas: dict[tuple[str, str], dict[str, Any]] = {}
        for namespace, name, kind, tier in (
            ("production", "nginx", "web", "frontend"), ("production", "orders", "api", "backend"),
            ("staging", "nginx", "web", "frontend"), ("staging", "orders", "api", "backend"),
            ("production", "billing", "worker", "backend"),
        ):  # fmt: skip
            self.persona(namespace, name, type=kind, tier=tier)

    def persona(self, namespace: str, name: str, **fields: Any) -> Published:
        """Create or update a persona; its PersonaEvent."""
        key = (namespace, name)
        event_type = "updated" if key in self.personas else "created"
        persona = self.personas.setdefault(key, {
            "namespace": namespace, "name": name, "appName": name, "type": "web",
            "tier": "frontend", "phase": "Active", "health": "Healthy",
        })  # fmt: skip
        persona.update(fields)
        counted = self._count() if event_type == "created" else []
        return [("personas", self._persona_event(event_type, persona)), *counted]

    def delete(self, namespace: str, name: str) -> Published:
        persona = self.personas.pop((namespace, name))
        return [("personas", self._persona_event("deleted", persona)), *self._count()]

    def _count(self) -> Published:
        return self.cluster(applicationCount=len(self.personas))

    def cluster(self, event_type: str = "updated", **fields: Any) -> Published:
        """Change the first cluster; its ClusterEvent."""
        cluster = self.clusters[0]
        cluster.update(fields)
        keys = ("name", "phase", "nodeCount", "applicationCount")
        return [("cluster", {"eventType": event_type, **{k: cluster[k] for k in keys}})]

    @staticmethod
    def validation(namespace: str, name: str, issues: list[str], severity: str) -> Published:
        return [("events", {
            "namespace": namespace, "name": name, "passed": not issues,
            "issueCount": len(issues), "severity": severity, "issues": issues,
        })]  # fmt: skip

    @staticmethod
    def _persona_event(event_type: str, persona: dict[str, Any]) -> dict[str, Any]:
        keys = ("namespace", "name", "phase", "health")
        return {"eventType": event_type, **{k: persona[k] for k in keys}}

    def script(self) -> Iterator[Published]:
        """The simulated operator's changes, one batch a tick, round and round."""
        issues = ["replicas below minimum", "runAsNonRoot not enforced"]
        while True:
            yield self.persona("production", "nginx", phase="Degraded", health="Unhealthy") + (
                self.validation("production", "nginx", issues, "error")
            )
            nodes = self.clusters[0]["nodeCount"]
            yield self.cluster("nodeAdded", nodeCount=nodes + 1)
            yield self.persona("staging", "orders", phase="Degraded", health="Progressing") + (
                self.validation("staging", "orders", issues[1:], "warning")
            )
            yield self.persona("production", "search", type="api", tier="backend")
            yield self.persona("production", "nginx", phase="Active", health="Healthy") + (
                self.validation("production", "nginx", [], "info")
            )
            yield self.cluster("nodeRemoved", nodeCount=nodes)
            yield self.persona("staging", "orders", phase="Active", health="Healthy")
            yield self.delete("production", "search")

    # --- requests ------------------------------------------------------------------

    async def list_personas(self, request: RequestContext) -> dict[str, Any]:
        namespace = _argument(request, "namespace")
        return {"personas": [
            dict(p) for p in self.personas.values() if namespace in (None, p["namespace"])
        ]}  # fmt: skip

    async def cluster_info(self, request: RequestContext) -> dict[str, Any]:
        name = _argument(request, "name")
        for cluster in self.clusters:
            if name in (None, cluster["name"]):
                return dict(cluster)
        raise RequestError(ErrorCode.NOT_FOUND, f"no ClusterPersona named {name!r}")


def _argument(request: RequestContext, key: str) -> str | None:
    payload = request.payload or {}
    value = payload.get(key) if isinstance(payload, dict) else None
    if value is not None and not isinstance(value, str):
        raise RequestError(ErrorCode.INVALID_FIELD, f"payload.{key} must be a string")
    return value or None


@asynccontextmanager
async def running(
    config: Config, *, interval: float = 1.0, listen: bool = True
) -> AsyncIterator[tuple[Server, Store, Iterator[Published]]]:
    """The operator: its server, store and script (stepped every ``interval`` s; 0: never)."""
    store = Store()
    script = store.script()
    async with (
        open_server(config, listen=listen, endpoints=[Endpoint("/ws", DorguDialect())]) as server,
        trio.open_nursery() as nursery,
    ):
        server.on_request("personas", store.list_personas)
        server.on_request("cluster", store.cluster_info)
        if interval > 0:
            nursery.start_soon(operate, server, script, interval)
        yield server, store, script
        nursery.cancel_scope.cancel()


async def step(server: Server, script: Iterator[Published]) -> Published:
    """Apply the operator's next change and broadcast its events."""
    events = next(script)
    for topic, payload in events:
        await server.publish(topic, payload)
    return events


async def operate(server: Server, script: Iterator[Published], interval: float) -> None:
    while True:
        await trio.sleep(interval)
        await step(server, script)


# --- the command line ---------------------------------------------------------------


def serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dorgu-operator")
    parser.add_argument("--enable-websocket", action="store_true", help="serve /ws and /health")
    parser.add_argument("--websocket-addr", default=":9090", metavar="[HOST]:PORT")
    parser.add_argument("--port", type=int, help="the WebSocket port (implies --enable-websocket)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between changes")
    parser.add_argument("--ping-interval", type=float, default=30.0)
    parser.add_argument("--read-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    host, _, port = args.websocket_addr.rpartition(":")
    port = args.port if args.port is not None else int(port)
    timeouts = {"ping_interval": args.ping_interval, "read_timeout": args.read_timeout}
    config = make_config(host=host.strip("[]") or "127.0.0.1", port=port, **timeouts)
    trio.run(_serve, config, args.interval, args.enable_websocket or args.port is not None)
    return 0


async def _serve(config: Config, interval: float, listen: bool) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with running(config, interval=interval, listen=listen) as (server, _, _):
            where = f"on {server.url}" if listen else "disabled (--enable-websocket)"
            print(f"dorgu operator: WebSocket server {where}", flush=True)
            async for _ in signals:
                break
