"""The composition root: a node with everything a deployment expects around it.

The core (:class:`tidings.node.server.Server`) knows its broker, its
connections and its transports. What sits above it is put together here, and
only here: the Centrifugo endpoint, the application's endpoints, the HTTP side
(``/health``, the server API, ``/metrics``, the web console, the application's
routes) and the demo. ``open_server`` is the one way in, for the CLI and for applications::

    async with tidings.open_server(Config(port=8800)) as server:
        await server.publish("deploys", {"step": "build"})
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import trio

from .config import Config
from .connection.endpoint import Endpoint
from .demo import run_demo
from .endpoints.centrifugo import centrifugo_endpoint
from .http.api import Api
from .http.console import Console
from .http.metrics import registry_for, render
from .http.routes import HttpRoutes
from .node.server import EndpointSource, Server

__all__ = ["assemble", "open_server", "serve"]


def assemble(config: Config, endpoints: Iterable[EndpointSource] = ()) -> Server:
    """A node for ``config`` with its endpoints and HTTP side, not yet running.

    The native endpoint is the core's own; Centrifugo's goes at
    ``config.centrifugo_path``; then the application's ``endpoints`` (an
    endpoint, or a function of the server that makes one), which may replace
    either at their path.
    """
    return _assemble(config, endpoints)[0]


def _assemble(config: Config, endpoints: Iterable[EndpointSource]) -> tuple[Server, Api]:
    server = Server(config)
    if config.centrifugo_path:
        server.add_endpoint(centrifugo_endpoint(server, config.centrifugo_path))
    for endpoint in endpoints:
        # A factory gets the server, so its handlers can publish through it.
        server.add_endpoint(endpoint if isinstance(endpoint, Endpoint) else endpoint(server))
    registry = registry_for(server)
    api = Api(server)
    server.http = HttpRoutes(
        server.health,
        # Stream paths too: under any transport they are answered before the routes.
        ws_path=lambda path: server.accepts(path) or server.stream_kind(path) is not None,
        metrics=(lambda: render(registry)) if config.metrics else None,
        api=api,
        console=Console(server, config.console_path) if config.console_path else None,
    )
    return server, api


@asynccontextmanager
async def open_server(
    config: Config | None = None,
    *,
    listen: bool = True,
    endpoints: Iterable[EndpointSource] = (),
) -> AsyncIterator[Server]:
    """Run a tidings node for the duration of the ``async with`` block.

    With ``listen`` (the default) it serves ``config.host:config.port``;
    without, it runs only the broker, for in-process use or for mounting
    :attr:`Server.asgi_app` in another ASGI server. Leaving the block shuts
    down gracefully: clients are closed with 1001 after their queues drain.
    """
    server, api = _assemble(config or Config(), endpoints)
    async with server.running(listen=listen) as nursery:
        if server.config.api_key:  # the API's series: only a key can read it
            nursery.start_soon(api.rates.run)
        if server.config.demo:
            nursery.start_soon(run_demo, server)
        yield server


async def serve(
    config: Config | None = None,
    *,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``await nursery.start(serve, config)`` returns the :class:`Server`."""
    async with open_server(config) as server:
        task_status.started(server)
        await trio.sleep_forever()
