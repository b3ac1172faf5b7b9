"""Live traffic for newcomers: a simulated deploy pipeline and function runs.

The events have the shapes of the Norn seed (``{type, appId, payload}`` with
``deploy.step``, ``deploy.progress``, ``deploy.completed``, ``deploy.failed``,
``app.restarted``, ``app.scaled``, ``function.completed``), published to the
topics ``deploys`` and ``functions``. A ``request`` on topic ``apps`` lists
the simulated apps and their last state.
"""

from __future__ import annotations

import logging
import random
import secrets
from typing import Any, Final

import trio

from .app import RequestContext
from .node.server import Server

LOGGER = logging.getLogger("tidings.demo")

APPS: Final = ("billing", "checkout", "search", "notifier")
STEPS: Final = ("clone", "build", "test", "snapshot", "migrate", "submit", "healthy")
FUNCTIONS: Final = ("resize-image", "send-digest", "sync-ledger")


def envelope(kind: str, app_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """A Norn event: ``{"type": ..., "appId": ..., "payload": {...}}``."""
    return {"type": kind, "appId": app_id, "payload": payload}


async def run_demo(server: Server, *, speed: float = 1.0, seed: int | None = None) -> None:
    """Publish the simulated pipeline until cancelled. ``speed`` > 1 runs faster."""
    rng = random.Random(seed)
    state: dict[str, dict[str, Any]] = {
        app: {"appId": app, "status": "idle", "imageTag": None, "replicas": 2} for app in APPS
    }

    async def apps(_: RequestContext) -> dict[str, Any]:
        return {"apps": list(state.values())}

    server.on_request("apps", apps)
    LOGGER.info("demo: publishing to topics 'deploys' and 'functions'")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_deploys, server, rng, state, speed)
        nursery.start_soon(_functions, server, rng, speed)


async def _deploys(
    server: Server, rng: random.Random, state: dict[str, dict[str, Any]], speed: float
) -> None:
    while True:
        app = rng.choice(APPS)
        saga = secrets.token_hex(4)
        state[app]["status"] = "deploying"
        failed_at = rng.choice(STEPS) if rng.random() < 0.15 else None
        for step in STEPS:
            await server.publish(
                "deploys",
                envelope("deploy.step", app, {"step": step, "sagaId": saga, "status": "running"}),
            )
            await trio.sleep(rng.uniform(0.3, 0.9) / speed)
            if step == "healthy":
                for healthy in range(1, 3):
                    await server.publish(
                        "deploys",
                        envelope(
                            "deploy.progress",
                            app,
                            {"sagaId": saga, "message": f"{healthy}/2 allocations healthy"},
                        ),
                    )
                    await trio.sleep(0.3 / speed)
            if step == failed_at:
                await server.publish(
                    "deploys",
                    envelope(
                        "deploy.step", app, {"step": step, "sagaId": saga, "status": "failed"}
                    ),
                )
                await server.publish(
                    "deploys",
                    envelope("deploy.failed", app, {"sagaId": saga, "error": f"{step} failed"}),
                )
                state[app]["status"] = "failed"
                break
            await server.publish(
                "deploys",
                envelope("deploy.step", app, {"step": step, "sagaId": saga, "status": "complete"}),
            )
        else:
            tag = f"{app}:{secrets.token_hex(3)}"
            state[app].update(status="running", imageTag=tag)
            await server.publish(
                "deploys", envelope("deploy.completed", app, {"sagaId": saga, "imageTag": tag})
            )
            if rng.random() < 0.5:
                count = rng.randint(1, 5)
                state[app]["replicas"] = count
                await server.publish(
                    "deploys",
                    envelope("app.scaled", app, {"sagaId": saga, "group": "web", "count": count}),
                )
            else:
                await server.publish("deploys", envelope("app.restarted", app, {"sagaId": saga}))
        await trio.sleep(rng.uniform(1.0, 3.0) / speed)


async def _functions(server: Server, rng: random.Random, speed: float) -> None:
    while True:
        await trio.sleep(rng.uniform(0.8, 2.5) / speed)
        status = "succeeded" if rng.random() < 0.9 else "failed"
        await server.publish(
            "functions",
            envelope(
                "function.completed",
                rng.choice(APPS),
                {
                    "executionId": f"{rng.choice(FUNCTIONS)}-{secrets.token_hex(3)}",
                    "status": status,
                },
            ),
        )
