"""The ``tidings`` command: ``serve``, ``watch``, ``publish``, ``request``, ``config``."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import attrs
import orjson
import trio
from rich.console import Console
from rich.markup import escape

from . import client as tidings_client
from . import logs, workers
from ._version import __version__
from .config import FIELDS, Config, choices
from .errors import ConfigError
from .protocol.messages import Event
from .server import open_server

LOGGER = logging.getLogger("tidings.cli")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for workers (tidings serve)
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(f"tidings: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `tidings config | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps interpreter exit quiet
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tidings", description="A real-time event server on Trio."
    )
    parser.add_argument("--version", action="version", version=f"tidings {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run a server",
        description="Serve /ws and /health on one port. Every option is also a key of the "
        "TOML config file and a TIDINGS_<KEY> environment variable; flags win.",
    )
    serve.add_argument("--config", metavar="FILE", help="TOML config file")
    _add_config_flags(serve)
    serve.set_defaults(run=_run_serve)

    watch = commands.add_parser("watch", help="print a topic's events live")
    watch.add_argument("topics", nargs="+", metavar="TOPIC")
    watch.add_argument("--url", default=tidings_client.DEFAULT_URL)
    _add_token(watch)
    watch.add_argument("--since", type=int, help="replay events after this seq first")
    watch.add_argument("--json", action="store_true", help="print each event as raw JSON")
    watch.set_defaults(run=_run_watch)

    publish = commands.add_parser("publish", help="publish one event and print its seq")
    publish.add_argument("topic", metavar="TOPIC")
    publish.add_argument("payload", metavar="JSON", help="the event's payload, as JSON")
    publish.add_argument("--url", default=tidings_client.DEFAULT_URL)
    _add_token(publish)
    publish.add_argument("--timeout", type=float, default=10.0)
    publish.set_defaults(run=_run_publish)

    request = commands.add_parser("request", help="send a request and print the answer")
    request.add_argument("topic", metavar="TOPIC")
    request.add_argument("payload", metavar="JSON", nargs="?", help="the request's payload")
    request.add_argument("--url", default=tidings_client.DEFAULT_URL)
    _add_token(request)
    request.add_argument("--timeout", type=float, default=10.0)
    request.set_defaults(run=_run_request)

    config = commands.add_parser("config", help="print the effective configuration as TOML")
    config.add_argument("--config", metavar="FILE", help="TOML config file")
    config.add_argument("--defaults", action="store_true", help="print the defaults only")
    _add_config_flags(config)
    config.set_defaults(run=_run_config)
    return parser


def _add_token(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token",
        default=os.environ.get("TIDINGS_CLIENT_TOKEN"),
        help="token to present (Authorization: Bearer); default $TIDINGS_CLIENT_TOKEN",
    )


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings")
    for name, field in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        allowed = choices(name)
        if field.type is bool:
            group.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS, help=help_text,
            )  # fmt: skip
        else:
            group.add_argument(
                flag, dest=name, metavar=name.upper(), default=argparse.SUPPRESS,
                choices=allowed or None, help=f"{help_text} (default: {_show(field.default)})",
            )  # fmt: skip


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    return str(value)


# --- serve ---------------------------------------------------------------------------


def _run_serve(args: argparse.Namespace) -> int:
    config = Config.load(args.config, overrides=_overrides(args))
    logs.configure(config.log_level, config.log_format)
    if config.workers > 1:
        return workers.run(config, args.argv)
    trio.run(_serve, config)
    return 0


async def _serve(config: Config) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_server(config) as server:
            # Everything loaded so far lives as long as the process: keep the
            # cyclic garbage collector from traversing it on every full
            # collection (35,000 objects, ~15 ms each time, a latency spike).
            gc.freeze()
            workers.watch_supervisor()  # if this process is one of `--workers`
            http = server.url.replace("ws://", "http://", 1).removesuffix(config.ws_path)
            print(f"tidings {__version__} listening on {server.url}", flush=True)
            print(f"  health: {http}/health", flush=True)
            if config.demo:
                print(
                    "  demo: publishing to 'deploys' and 'functions'; "
                    f"try: tidings watch deploys functions --url {server.url}",
                    flush=True,
                )
            async for signum in signals:
                LOGGER.info("%s received: shutting down", signal.Signals(signum).name)
                break


# --- watch ---------------------------------------------------------------------------


def _run_watch(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    console = Console(highlight=False, soft_wrap=True)
    status = Console(highlight=False, soft_wrap=True, stderr=True)
    refused: list[str] = []
    trio.run(_watch_until_signal, args, console, status, refused)
    return 1 if refused else 0


async def _watch_until_signal(
    args: argparse.Namespace, console: Console, status: Console, refused: list[str]
) -> None:
    """Watch until Ctrl-C or SIGTERM, then leave quietly."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                await _watch(args, console, status, refused)
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


async def _watch(
    args: argparse.Namespace, console: Console, status: Console, refused: list[str]
) -> None:
    backoff = 0.2
    while True:
        try:
            async with tidings_client.connect(args.url, token=args.token) as client:
                backoff = 0.2
                status.print(f"[dim]connected to {escape(args.url)}[/dim]")
                async with trio.open_nursery() as nursery:
                    for topic in args.topics:
                        nursery.start_soon(_watch_topic, client, topic, args, console, refused)
                return
        except ConnectionError as exc:
            status.print(f"[yellow]{escape(str(exc))}; retrying in {backoff:.1f} s[/]")
        await trio.sleep(backoff)
        backoff = min(backoff * 2, 10.0)


async def _watch_topic(
    client: tidings_client.Client,
    topic: str,
    args: argparse.Namespace,
    console: Console,
    refused: list[str],
) -> None:
    try:
        async with client.subscribe(topic, since=args.since) as events:
            await _print_events(topic, events, args, console)
    except tidings_client.TidingsError as exc:
        refused.append(topic)
        print(f"tidings: cannot watch {topic!r}: {exc}", file=sys.stderr)


async def _print_events(
    topic: str,
    events: tidings_client.ClientSubscription,
    args: argparse.Namespace,
    console: Console,
) -> None:
    last: tuple[str, int] | None = None
    async for event in events:
        if args.json:
            print(orjson.dumps(attrs.asdict(event, filter=_public)).decode(), flush=True)
            continue
        if last is not None and event.epoch == last[0] and event.seq > last[1] + 1:
            console.print(
                f"[yellow]{escape(topic)}: {event.seq - last[1] - 1} events missed "
                "(history no longer reaches back)[/]"
            )
        last = (event.epoch, event.seq)
        console.print(render_event(event))


def _public(attribute: attrs.Attribute[Any], _: Any) -> bool:
    return attribute.name != "payload_json"


def render_event(event: Event) -> str:
    """One readable line (rich markup) for an event."""
    clock = event.timestamp[11:23] if len(event.timestamp) >= 23 else event.timestamp
    head = f"[dim]{clock}[/dim] [bold cyan]{escape(event.topic)}[/] [dim]#{event.seq}[/dim]"
    payload = event.payload
    if isinstance(payload, dict) and isinstance(payload.get("type"), str):
        # The Norn envelope ({type, appId, payload}) and others shaped like it.
        kind = payload["type"]
        style = "red" if "fail" in kind else "green" if "complet" in kind else "magenta"
        app = payload.get("appId")
        details = payload.get("payload", {k: v for k, v in payload.items() if k != "type"})
        body = orjson.dumps(details).decode() if details is not None else ""
        who = f" [bold]{escape(str(app))}[/bold]" if app is not None else ""
        return f"{head} [{style}]{escape(kind)}[/]{who} {escape(body)}"
    return f"{head} {escape(orjson.dumps(payload).decode())}"


# --- publish, request --------------------------------------------------------------------


def _parse_json(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise SystemExit(f"tidings: the payload is not valid JSON: {exc}") from None


def _run_publish(args: argparse.Namespace) -> int:
    payload = _parse_json(args.payload)

    async def publish() -> int:
        async with tidings_client.connect(args.url, reconnect=False, token=args.token) as client:
            position = await client.publish(args.topic, payload, timeout=args.timeout)
            print(position.seq)
            return 0

    return _run_client(publish)


def _run_request(args: argparse.Namespace) -> int:
    payload = _parse_json(args.payload)

    async def request() -> int:
        async with tidings_client.connect(args.url, reconnect=False, token=args.token) as client:
            answer = await client.request(args.topic, payload, timeout=args.timeout)
            print(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode())
            return 0

    return _run_client(request)


def _run_client(fn: Any) -> int:
    try:
        return int(trio.run(fn))
    except tidings_client.TidingsError as exc:
        print(f"tidings: the server refused: {exc}", file=sys.stderr)
        return 1
    except (ConnectionError, trio.TooSlowError) as exc:
        print(f"tidings: {exc or 'no answer in time'}", file=sys.stderr)
        return 1


# --- config ----------------------------------------------------------------------------


def _run_config(args: argparse.Namespace) -> int:
    config = Config() if args.defaults else Config.load(args.config, overrides=_overrides(args))
    print(f"# tidings {__version__} configuration, {time.strftime('%Y-%m-%d')}")
    for name, field in FIELDS.items():
        value = getattr(config, name)
        print(f"# {field.metadata.get('help', '')}")
        print(f"{name} = {_toml(value)}")
    return 0


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return orjson.dumps(str(value)).decode()
