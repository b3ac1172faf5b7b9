"""``python -m examples.norn [--port P] [--no-demo]`` runs the hub;
``python -m examples.norn deploy APP [--url ws://HOST:PORT/ws]`` deploys and renders it live.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson
import trio
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

STATUS = {"complete": ("✓", "green"), "failed": ("✗", "red")}


class DeployView:
    """The CLI's model of one deploy, updated by each event (as the Bubble Tea model is)."""

    def __init__(self, app: str, watch: bool) -> None:
        self.app, self.saga = app, None
        self.follow = "deploy.step" if watch else "deploy.accepted"  # how it learns its saga
        self.steps: dict[str, str] = {}
        self.progress = ""
        self.outcome: str | None = None
        self.detail = ""

    def update(self, event: dict[str, Any]) -> None:
        kind, payload = event.get("type"), event.get("payload") or {}
        if event.get("appId") != self.app:
            return
        if self.saga is None and kind == self.follow:
            self.saga = payload.get("sagaId")
        if payload.get("sagaId") != self.saga:
            return
        if kind == "deploy.step":
            self.steps[payload["step"]] = payload["status"]
        elif kind == "deploy.progress":
            self.progress = payload["message"]
        elif kind in ("deploy.completed", "deploy.failed"):
            self.outcome = kind.removeprefix("deploy.")
            self.detail = payload.get("imageTag") or payload.get("error", "")

    def __rich__(self) -> RenderableType:
        table = Table.grid(padding=(0, 1))
        for step, status in self.steps.items():
            icon, style = STATUS.get(status, ("", "cyan"))
            mark = Text(icon, style=style) if icon else Spinner("dots", style=style)
            table.add_row(mark, Text(step, style="bold"), Text(status, style=style))
        saga = f" (saga {self.saga})" if self.saga else ""
        lines: list[RenderableType] = [Text(f"Deploying {self.app}{saga}", style="bold"), table]
        if self.progress and self.outcome is None:
            lines.append(Text(f"  {self.progress}", style="dim"))
        return Group(*lines)


def deploy(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="norn deploy")
    parser.add_argument("app", metavar="APP")
    parser.add_argument("--url", default="ws://localhost:8800/ws")
    parser.add_argument("--watch", action="store_true", help="follow the next deploy of APP only")
    parser.add_argument("--fail-at", metavar="STEP", help="(simulation) make this step fail")
    parser.add_argument("--no-color", action="store_true")
    args = parser.parse_args(argv)
    console = Console(no_color=args.no_color, highlight=False)
    view = DeployView(args.app, args.watch)
    try:
        trio.run(_deploy, args, view, console)
    except (OSError, HandshakeError, ConnectionClosed) as exc:
        print(f"norn: {args.url}: {exc.__cause__ or exc!r}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if not console.is_terminal:
        console.line()  # rich leaves the last frame of a non-terminal Live without one
    if view.outcome == "completed":
        console.print(f"[green]✓ Deployed {args.app}[/] image {view.detail}")
        return 0
    console.print(f"[red]✗ Deploy of {args.app} failed:[/] {view.detail}")
    return 1


async def _deploy(args: argparse.Namespace, view: DeployView, console: Console) -> None:
    async with open_websocket_url(args.url) as ws:
        if not args.watch:
            trigger = {"type": "deploy", "appId": args.app}
            if args.fail_at:
                trigger["failAt"] = args.fail_at
            await ws.send_message(orjson.dumps(trigger).decode())
        with Live(view, console=console, refresh_per_second=12):
            while view.outcome is None:
                view.update(orjson.loads(await ws.get_message()))


def main(argv: list[str]) -> int:
    if argv[:1] == ["deploy"]:
        return deploy(argv[1:])
    from .app import serve  # noqa: PLC0415 - the deploy command starts faster without tidings

    return serve(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
