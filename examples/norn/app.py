"""Norn's WebSocket hub, on tidings.

tidings serves ``/ws``, checks origins, fans every event out to every client
through one broadcast queue (256) and a per-client buffer (64) that
disconnects a client when it is full. What is Norn's own: its envelope
(``{type, appId, payload}``, published whole), subscribing everyone on
connect, and a simulated deploy pipeline, restarts, scaling and functions.
"""

from __future__ import annotations

import argparse
import itertools
import os
import secrets
import signal
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import trio

from tidings import (
    AppMessage,
    Config,
    Endpoint,
    JsonDialect,
    RequestError,
    Server,
    Session,
    messages,
    open_server,
)

TOPIC = "norn"
STEPS = ("clone", "build", "test", "snapshot", "migrate", "submit", "healthy")
DEFAULT_ORIGINS = ("http://localhost:5173", "http://localhost:3000")


def allowed_origins(env: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    extra = (origin.strip() for origin in env.get("NORN_ALLOWED_ORIGINS", "").split(","))
    return (*DEFAULT_ORIGINS, *filter(None, extra))


def make_config(port: int = 8800, env: Mapping[str, str] = os.environ, **overrides: Any) -> Config:
    settings: dict[str, Any] = {
        "allowed_origins": allowed_origins(env), "outbox_size": 64,
        "overflow_policy": "disconnect", "inbox_size": 256, "history_size": 0,
        "log_level": "warning",
    }  # fmt: skip
    return Config(host="127.0.0.1", port=port, **{**settings, **overrides})


def envelope_error(error: messages.Error) -> dict[str, Any]:
    return {"type": "error", "appId": "", "payload": {"code": error.code, "message": error.message}}


class Norn:
    """The pipeline and the handlers whose events the hub broadcasts."""

    server: Server  # set by hub(), which open_server calls

    def __init__(self, nursery: trio.Nursery, step_delay: float) -> None:
        self.nursery, self.step_delay = nursery, step_delay

    async def emit(self, kind: str, app_id: str, **payload: Any) -> None:
        """Hub.Broadcast: one envelope to every connected client."""
        await self.server.publish(TOPIC, {"type": kind, "appId": app_id, "payload": payload})

    async def deploy(self, app_id: str, saga: str = "", fail_at: str | None = None) -> bool:
        saga = saga or secrets.token_hex(8)
        for step in STEPS:
            await self.emit("deploy.step", app_id, step=step, sagaId=saga, status="running")
            await trio.sleep(self.step_delay)
            if step == fail_at:
                await self.emit("deploy.step", app_id, step=step, sagaId=saga, status="failed")
                await self.emit("deploy.failed", app_id, sagaId=saga, error=f"{step} failed")
                return False
            if step == "healthy":
                for healthy in (1, 2):
                    message = f"{healthy}/2 allocations healthy"
                    await self.emit("deploy.progress", app_id, sagaId=saga, message=message)
                    await trio.sleep(self.step_delay)
            await self.emit("deploy.step", app_id, step=step, sagaId=saga, status="complete")
        await self.emit("deploy.completed", app_id, sagaId=saga, imageTag=f"{app_id}:{saga[:7]}")
        return True

    async def restart(self, app_id: str) -> None:
        await trio.sleep(self.step_delay)
        await self.emit("app.restarted", app_id, sagaId=secrets.token_hex(8))

    async def scale(self, app_id: str, group: str, count: int) -> None:
        await self.emit("app.scaled", app_id, sagaId=secrets.token_hex(8), group=group, count=count)

    async def invoke(self, app_id: str, function: str, status: str = "success") -> None:
        await trio.sleep(self.step_delay)
        execution = f"{function}-{secrets.token_hex(4)}"
        await self.emit("function.completed", app_id, executionId=execution, status=status)

    async def demo(self) -> None:
        """Every kind of event, round and round; every second deploy fails."""
        for n in itertools.count(1):
            app = ("billing", "checkout", "search")[n % 3]
            await self.deploy(app, fail_at=None if n % 2 else "test")
            await self.restart(app)
            await self.scale(app, "web", 2 + n % 3)
            await self.invoke(app, "send-digest", "success" if n % 2 else "failed")

    def hub(self, server: Server) -> Endpoint:
        """The hub at /ws, made by ``open_server`` (it calls this) before any client connects."""
        self.server = server
        ws = Endpoint("/ws", JsonDialect("norn", encode_error=envelope_error))

        @ws.on_connect
        async def everyone_hears_everything(session: Session) -> None:
            await session.subscribe(TOPIC)

        # Norn starts a deploy over its HTTP API; here a client may ask over the socket.
        @ws.on("deploy")
        async def deploy(session: Session, message: AppMessage) -> None:
            app, saga = _app_id(message), secrets.token_hex(8)
            session.reply({"type": "deploy.accepted", "appId": app, "payload": {"sagaId": saga}})
            self.nursery.start_soon(self.deploy, app, saga, message.body.get("failAt"))

        return ws


def _app_id(message: AppMessage) -> str:
    app = message.body.get("appId")
    if not isinstance(app, str) or not app:
        raise RequestError("invalid_field", "appId must be a non-empty string")
    return app


@asynccontextmanager
async def running(
    config: Config, *, step_delay: float = 0.3, demo: bool = False
) -> AsyncIterator[tuple[Server, Norn, Endpoint]]:
    async with trio.open_nursery() as nursery:
        norn = Norn(nursery, step_delay)
        async with open_server(config, endpoints=[norn.hub]) as server:
            if demo:
                nursery.start_soon(norn.demo)
            yield server, norn, server.endpoints["/ws"]
            nursery.cancel_scope.cancel()


# --- the command line ---------------------------------------------------------------


def serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="norn")
    parser.add_argument("--port", type=int, default=8800)
    parser.add_argument(
        "--demo", action=argparse.BooleanOptionalAction, default=True,
        help="simulate the platform: deploy, restart, scale, run functions (default: on)",
    )  # fmt: skip
    parser.add_argument("--step-delay", type=float, default=0.3, help="seconds per pipeline step")
    args = parser.parse_args(argv)
    trio.run(_serve, make_config(args.port), args)
    return 0


async def _serve(config: Config, args: argparse.Namespace) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with running(config, step_delay=args.step_delay, demo=args.demo) as (server, _, _):
            print(f"norn: WebSocket hub on {server.url}", flush=True)
            async for _ in signals:
                break
