"""``python -m examples.streamspace --port 8000 [--backplane redis://...] [--demo]``."""

from __future__ import annotations

import argparse
import contextlib
import signal
from collections.abc import Sequence
from typing import Any

import attrs
import trio

from tidings import configure_logging, open_server

from .app import AgentNotConnected, Settings, StreamSpace, now

DEMO_USER, DEMO_SESSION, VIEWER = "demo-user", "demo-session", "demo-viewer"
DEMO: list[tuple[str, dict[str, Any] | None]] = [
    ("session.created", {"template": "firefox-browser", "state": "running"}),
    ("session.connected", {"connectionId": "conn-1", "clientIP": "10.0.0.7", "userAgent": "demo"}),
    ("session.heartbeat", None),  # timestamp filled in when sent
    ("session.idle", {"idleDuration": 300}),
    ("session.active", None),
    ("session.updated", {"description": "demo session"}),
    ("session.resources.updated", {"resources": {"cpu": "2000m", "memory": "4Gi"}}),
    ("session.tags.updated", {"tags": ["demo"]}),
    ("session.shared", None),
    ("session.unshared", {"unsharedFrom": VIEWER}),
    ("session.error", {"error": "VNC tunnel failed", "code": "VNC_ERROR"}),
    ("session.disconnected", {"connectionId": "conn-1", "duration": 42}),
    ("session.state.changed", {"oldState": "running", "newState": "hibernated"}),
    ("session.deleted", None),
]


async def demo(app: StreamSpace, org: str, interval: float) -> None:
    """Walk demo-session through every session event, one per interval, forever."""
    while True:
        for kind, data in DEMO:
            await trio.sleep(interval)
            if kind == "session.shared":
                await app.share(org, DEMO_SESSION, DEMO_USER, VIEWER, ["view"])
                continue
            if kind == "session.heartbeat":
                data = {"timestamp": now(), "activeConnections": 1}  # noqa: PLW2901
            await app.notify(org, kind, DEMO_SESSION, DEMO_USER, data)
            action = {"session.created": "start_session", "session.deleted": "stop_session"}
            for agent in await app.connected_agents(everywhere=True) if kind in action else []:
                with contextlib.suppress(AgentNotConnected):  # it left meanwhile
                    await app.send_command(agent, action[kind], {"sessionId": DEMO_SESSION})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m examples.streamspace", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backplane", default="memory", help="redis://HOST:PORT/DB for several nodes")
    p.add_argument("--node-id", default="")
    p.add_argument("--sessions-interval", type=float, default=3.0, help="seconds (3)")
    p.add_argument("--metrics-interval", type=float, default=5.0, help="seconds (5)")
    p.add_argument("--heartbeat-interval", type=float, default=30.0, help="seconds (30)")
    p.add_argument("--stale-timeout", type=float, default=45.0, help="seconds (45)")
    p.add_argument("--default-org", default="default-org", help="org of a query without org_id")
    p.add_argument("--jwt-secret", help="browsers present a JWT; its tenant claim is the org")
    p.add_argument("--demo", action="store_true", help="emit demo session events and commands")
    p.add_argument("--demo-interval", type=float, default=2.0)
    p.add_argument("--log-level", default="info")
    return p


async def serve(args: argparse.Namespace) -> None:
    app = StreamSpace(
        Settings(**{name: getattr(args, name) for name in attrs.fields_dict(Settings)})
    )
    server_settings = ("host", "port", "backplane", "node_id", "log_level")
    config = app.config(**{name: getattr(args, name) for name in server_settings})
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with (
            open_server(config, endpoints=app.endpoints) as server,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(app.run, server)
            if args.demo:
                nursery.start_soon(demo, app, args.default_org, args.demo_interval)
            print(f"streamspace listening on ws://{args.host}:{server.port}", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    configure_logging(args.log_level, "text")
    trio.run(serve, args)


if __name__ == "__main__":
    main()
