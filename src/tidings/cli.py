"""The ``tidings`` command: ``serve``, ``watch``, ``publish``, ``request``, ``config``, ``token``.

Every error a user can cause ends in one line on stderr that says what failed
and why, and exit status 1 (2 for usage and configuration errors); ``--debug``
or ``TIDINGS_DEBUG=1`` adds the traceback. Output into a closed pipe
(``tidings watch ... | head``) ends quietly with the status of SIGPIPE.
"""

from __future__ import annotations

import argparse
import errno
import gc
import heapq
import logging
import math
import os
import signal
import socket
import sys
import textwrap
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from typing import Any, NoReturn
from urllib.parse import urlsplit

import attrs
import jwt
import orjson
import trio
from rich.console import Console
from rich.markup import escape

from . import client as tidings_client
from . import logs, workers
from ._version import __version__
from .backplane.url import redacted
from .config import (
    FIELDS,
    PROXY_HOOKS,
    SECRETS,
    Bytes,
    Config,
    Seconds,
    check,
    choices,
    format_duration,
    format_size,
    parse_duration,
    suggest,
    to_toml,
    unknown_environment,
    warnings,
)
from .errors import AuthError, ConfigError
from .node.server import Server
from .protocol.messages import Event
from .server import open_server
from .tokens import mint, verify

LOGGER = logging.getLogger("tidings.cli")

EXIT_ERROR = 1
EXIT_USAGE = 2  # usage and configuration errors, as argparse has it
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell reports for `yes | head`
#: Allocations between young garbage collections in `tidings serve` (CPython's default: 700).
GC_YOUNG_THRESHOLD = 10_000


class CliError(Exception):
    """An error the user can cause: reported as one line, with an exit status."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in arguments or os.environ.get("TIDINGS_DEBUG", "") in {"1", "true", "yes"}
    try:
        args = _parser().parse_args(arguments)
        args.argv = arguments  # a supervisor starts its workers with them (--workers)
        return int(args.run(args))
    except SystemExit:  # --help, --version
        raise
    except BaseException as exc:  # every failure ends in one line
        return _report(exc, debug)


def _report(exc: BaseException, debug: bool) -> int:
    """Say what went wrong in one line on stderr; the exit status."""
    error = _leaf(exc)
    if isinstance(error, BrokenPipeError):
        # Whoever read our output has gone: nothing to say, and nothing may be
        # written at exit either (Python flushes stdout then).
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if debug:
        traceback.print_exception(exc)
    status = EXIT_ERROR
    if isinstance(error, CliError):
        line, status = str(error), error.status
    elif isinstance(error, ConfigError):
        line, status = f"configuration error: {error}", EXIT_USAGE
    elif isinstance(error, tidings_client.TidingsError):
        line = f"the server refused: {error}"
    elif isinstance(error, ConnectionError | trio.TooSlowError):
        line = str(error) or "no answer in time"
    else:
        line = (
            f"internal error: {type(error).__name__}: {error} "
            "(a bug: run again with --debug for the traceback, and report it)"
        )
    line = " ".join(line.split())  # one line, whatever the message held
    print(line if line.startswith("tidings ") else f"tidings: {line}", file=sys.stderr)
    return status


def _leaf(exc: BaseException) -> BaseException:
    """The error that matters in what trio.run raised (nurseries group errors)."""
    leaves: list[BaseException] = []

    def collect(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                collect(inner)
        elif not isinstance(error, trio.Cancelled):
            leaves.append(error)

    collect(exc)
    for kind in (BrokenPipeError, KeyboardInterrupt):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return leaves[0] if leaves else exc


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no stdout to speak of
        pass


class _Console(Console):
    """rich's Console, whose reaction to a closed pipe is left to :func:`main`."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError(errno.EPIPE, "broken pipe")


# --- the parser --------------------------------------------------------------------------


class _Formatter(argparse.HelpFormatter):
    """Wraps prose; keeps paragraphs whose lines are indented (tables, examples) as written."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.split("\n\n"):
            if any(line.startswith(" ") for line in paragraph.splitlines()[1:]):
                paragraphs.append(paragraph)
            else:
                paragraphs.append(textwrap.fill(" ".join(paragraph.split()), width))
        return "\n\n".join(paragraphs)


class _Parser(argparse.ArgumentParser):
    """No abbreviations, one-line errors, and a suggestion for a misspelt option."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{self.prog}: {message} (see '{self.prog} --help')", EXIT_USAGE)

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: None = None
    ) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser: _Parser = getattr(parsed, "parser", self)
            parser.error(parser.unrecognized(extras))
        return parsed

    def unrecognized(self, extras: list[str]) -> str:
        first = extras[0]
        if not first.startswith("-") or first == "-":
            return f"unexpected argument {first!r}"
        flag = first.split("=", 1)[0]
        options = [option for action in self._actions for option in action.option_strings]
        close = suggest(flag, options)
        return f"unknown option {flag}" + (f" (did you mean {close}?)" if close else "")


SERVE_DESCRIPTION = """\
Run a tidings node. On one port it serves:
  /ws                     the native WebSocket protocol (docs/protocol.md)
  /connection/websocket   Centrifugo's client protocol, for its SDKs (docs/centrifugo.md)
  /api/...                the HTTP server API, once api_key is set (docs/api.md)
  /metrics                Prometheus metrics
  /health                 health, for probes and load balancers

Every setting is also a key of the TOML file (--config FILE) and an environment
variable TIDINGS_<KEY>; a flag wins over the environment, which wins over the
file (docs/configuration.md)."""

SETTINGS_USAGE = "%(prog)s [-h] [--debug] [--config FILE] [--SETTING VALUE ...]"
SERVE_EPILOG = """\
examples:
  tidings serve --demo                                  a simulated deploy pipeline
  TIDINGS_API_KEY=$(openssl rand -hex 16) tidings serve  with the HTTP API
  TIDINGS_JWT_SECRET=$(openssl rand -hex 32) tidings serve --host 0.0.0.0"""


def _parser() -> _Parser:
    parser = _Parser(
        prog="tidings",
        description="A real-time event server on Trio: publish events, fan them out over "
        "WebSocket.",
        epilog="Run 'tidings COMMAND --help' for a command's options. "
        "Errors show their traceback with --debug or TIDINGS_DEBUG=1.",
    )
    parser.add_argument(
        "--version", action="version", version=f"tidings {__version__}", help="print the version"
    )
    _add_debug(parser)
    commands = parser.add_subparsers(
        title="commands", metavar="COMMAND", parser_class=_Parser, required=True
    )

    def command(name: str, help_text: str, **kwargs: Any) -> _Parser:
        sub: _Parser = commands.add_parser(name, help=help_text, **kwargs)
        sub.set_defaults(parser=sub)
        _add_debug(sub)
        return sub

    serve = command(
        "serve", "run a node", description=SERVE_DESCRIPTION, epilog=SERVE_EPILOG,
        usage=SETTINGS_USAGE,
    )  # fmt: skip
    _add_config_file(serve)
    _add_config_flags(serve)
    serve.set_defaults(run=_run_serve)

    watch = command(
        "watch",
        "print topics' events as they come",
        description="Subscribe to topics and print their events, one line each; "
        "reconnects and resumes by itself. Status lines go to stderr, events to stdout.",
    )
    watch.add_argument("topics", nargs="+", metavar="TOPIC", help="a topic to watch")
    _add_client_options(watch)
    watch.add_argument(
        "--since",
        type=_offset,
        metavar="SEQ",
        help="first replay each topic's events after this seq from the node's history "
        "(0: all it holds), then carry on live",
    )
    watch.add_argument(
        "--epoch",
        metavar="EPOCH",
        help="the epoch --since belongs to (as publish prints it), so that a restarted "
        "topic is noticed; with one TOPIC",
    )
    watch.add_argument(
        "--json", action="store_true", help="print each event as one JSON object per line"
    )
    watch.set_defaults(run=_run_watch)

    publish = command(
        "publish",
        "publish one event; prints its seq and epoch",
        description="Publish one event and print its position, 'SEQ EPOCH' "
        '(with --json: {"topic", "seq", "epoch"}).',
    )
    publish.add_argument("topic", metavar="TOPIC", help="the topic to publish to")
    publish.add_argument("payload", metavar="JSON", help="the event's payload, as JSON")
    _add_client_options(publish)
    _add_timeout(publish)
    publish.add_argument("--json", action="store_true", help="print the position as JSON")
    publish.set_defaults(run=_run_publish)

    request = command(
        "request",
        "ask a node's request handler; prints the answer",
        description="Send a request to the handler the node registered for TOPIC and "
        "print its answer as JSON.",
    )
    request.add_argument("topic", metavar="TOPIC", help="the request's topic")
    request.add_argument(
        "payload", metavar="JSON", nargs="?", help="the request's payload, as JSON"
    )
    _add_client_options(request)
    _add_timeout(request)
    request.set_defaults(run=_run_request)

    config = command(
        "config",
        "show, check or start a configuration",
        description="'tidings config' alone is 'tidings config show'.",
        usage="%(prog)s [-h] [ACTION] [--config FILE] [--SETTING VALUE ...]",
    )
    _add_config_file(config)
    config.add_argument(
        "--defaults",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the defaults only (no file, environment or flags)",
    )
    _add_config_flags(config)
    config.set_defaults(run=_run_config_show)
    actions = config.add_subparsers(title="actions", metavar="ACTION", parser_class=_Parser)

    def action(name: str, help_text: str, **kwargs: Any) -> _Parser:
        sub: _Parser = actions.add_parser(name, help=help_text, **kwargs)
        sub.set_defaults(parser=sub)
        _add_debug(sub)
        return sub

    show = action(
        "show",
        "print the effective configuration as TOML (secrets as ***)",
        usage=SETTINGS_USAGE,
        description="Print the configuration a node would run with (defaults < file < "
        'environment < flags) as TOML. Secrets that are set read "***", unset keys '
        "are commented out.",
    )
    _add_config_file(show)
    show.add_argument(
        "--defaults",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the defaults only (no file, environment or flags)",
    )
    _add_config_flags(show)
    show.set_defaults(run=_run_config_show)

    checker = action(
        "check",
        "validate file + environment + flags",
        usage=SETTINGS_USAGE,
        description="Check the configuration a node would run with, and print one line "
        "per problem. Unknown TIDINGS_* variables are errors here. Exit status 0 when "
        "it is valid (warnings, e.g. of weak secrets, do not count), 2 when it is not.",
    )
    _add_config_file(checker)
    _add_config_flags(checker)
    checker.set_defaults(run=_run_config_check)

    init = action(
        "init",
        "print a commented TOML file of every setting at its default",
        description="Print a TOML file with every setting at its default and its help as "
        "a comment, to start a config file from: tidings config init > tidings.toml",
    )
    init.set_defaults(run=_run_config_init)

    token = command(
        "token",
        "mint a JWT for local development, or check one",
        usage="%(prog)s [-h] [--user USER] [--tenant TENANT] [--topics PATTERNS]\n"
        "                     [--publish PATTERNS] [--ttl DURATION] [--config FILE]\n"
        "       %(prog)s check [-h] [--config FILE] TOKEN",
        description="Mint an HS256 JWT that this node accepts, signed with its jwt_secret "
        "(from TIDINGS_JWT_SECRET or --config FILE), for local development and tests. "
        "'tidings token check TOKEN' says whether the node accepts a token, and why not. "
        "The claims are those of docs/auth.md.",
    )
    _add_config_file(token)
    token.add_argument("--user", default="dev", help="the sub claim (default: dev)")
    token.add_argument("--tenant", help="the tenant claim (default: none, the node's default)")
    token.add_argument(
        "--topics",
        type=_patterns,
        metavar="PATTERNS",
        help="comma-separated topic patterns the client may subscribe to (default: "
        "no claim, every topic; '' for none)",
    )
    token.add_argument(
        "--publish",
        type=_patterns,
        metavar="PATTERNS",
        help="comma-separated topic patterns the client may publish to (default: no "
        "claim, the namespace decides; '' for none)",
    )
    token.add_argument(
        "--ttl", type=_duration, default=3600.0, metavar="DURATION", help="lifetime (default: 1h)"
    )
    token.set_defaults(run=_run_token)
    token_actions = token.add_subparsers(title="actions", metavar="ACTION", parser_class=_Parser)
    token_check = token_actions.add_parser(
        "check",
        help="say whether the node accepts a token",
        description="Check TOKEN as the node does at the upgrade (its auth mode, keys, "
        "audience and issuer): exit 0 and what it proves when accepted, 1 and why not.",
    )
    token_check.set_defaults(parser=token_check, run=_run_token_check)
    _add_debug(token_check)
    _add_config_file(token_check)
    token_check.add_argument("token", metavar="TOKEN", help="the token to check")
    return parser


def _add_debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of an error (also TIDINGS_DEBUG=1)",
    )


def _add_config_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="TOML config file (default: $TIDINGS_CONFIG, else none)",
    )


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=tidings_client.DEFAULT_URL,
        help=f"WebSocket URL of the node (default: {tidings_client.DEFAULT_URL})",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("TIDINGS_CLIENT_TOKEN"),
        help="token to present (Authorization: Bearer); default: $TIDINGS_CLIENT_TOKEN. "
        "'tidings token' mints one",
    )


def _add_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=_duration,
        default=10.0,
        metavar="DURATION",
        help="give up after this long without an answer (default: 10s)",
    )


_METAVARS: dict[Any, str] = {Seconds: "DURATION", Bytes: "SIZE", int: "N", tuple[str, ...]: "LIST"}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "settings", "each also TIDINGS_<KEY> in the environment and a key of --config FILE"
    )
    for name, field in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        if name in SECRETS:
            help_text += f"; better TIDINGS_{name.upper()}, as flags show in the process list"
        if "default" not in help_text:
            help_text += f" (default: {_default_text(name)})"
        if field.type is bool:
            group.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS, help=help_text,
            )  # fmt: skip
            continue
        allowed = choices(name)
        metavar = None if allowed else _METAVARS.get(field.type, name.upper())
        if name == "namespaces":
            metavar = "JSON"
        elif name.removeprefix("proxy_") in PROXY_HOOKS:
            metavar = "URL"
        elif field.type == bool | None:
            metavar = "{true,false}"
        group.add_argument(
            flag, dest=name, metavar=metavar, default=argparse.SUPPRESS,
            choices=allowed or None, help=help_text,
        )  # fmt: skip


def _default_text(name: str) -> str:
    """A default as the docs write it: ``512KiB``, ``30s``, ``unset``, ``none``."""
    field = FIELDS[name]
    value: Any = field.default
    if isinstance(value, attrs.Factory):  # type: ignore[arg-type]
        value = value.factory()
    if value is None:
        return "unset"
    if name == "node_id" and not value:
        return "HOSTNAME-PID"
    if field.type is Seconds:
        return format_duration(value)
    if field.type is Bytes:
        return format_size(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | dict):
        return ",".join(value) or "none"
    return str(value)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration")
    return seconds


def _offset(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seq (0, 1, 2, ...)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seq (0, 1, 2, ...)")
    return value


def _patterns(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme in {"ws", "wss"} and parts.hostname:
        return
    hint = ""
    if parts.scheme in {"http", "https"} and parts.hostname:
        hint = f" (did you mean {url.replace('http', 'ws', 1)}?)"
    raise CliError(
        f"--url {url}: not a WebSocket URL; it reads ws://HOST:PORT/PATH{hint}", EXIT_USAGE
    )


# --- serve ---------------------------------------------------------------------------


def _run_serve(args: argparse.Namespace) -> int:
    config = Config.load(getattr(args, "config", None), overrides=_overrides(args))
    logs.configure(config.log_level, config.log_format)
    if config.workers > 1:
        return workers.run(config, args.argv)
    notes = [f"{problem}: ignored" for problem in unknown_environment(os.environ)]
    notes += warnings(config)
    listening: list[Server] = []
    try:
        trio.run(_serve, config, notes, listening)
    except BaseException as exc:
        error = _leaf(exc)
        if isinstance(error, OSError) and not listening:
            raise CliError(_cannot_listen(config, error)) from exc
        raise
    return 0


def _cannot_listen(config: Config, error: OSError) -> str:
    host = f"[{config.host}]" if ":" in config.host else config.host
    where = f"cannot listen on {host}:{config.port}"
    if isinstance(error, socket.gaierror):
        return f"{where}: cannot resolve {config.host!r} ({error.strerror})"
    if error.errno == errno.EADDRINUSE:
        return (
            f"{where}: the address is in use (another program, maybe another tidings, "
            "listens there; choose another --port, or 0 for a free one)"
        )
    if error.errno == errno.EADDRNOTAVAIL:
        return f"{where}: {config.host} is not an address of this machine"
    if error.errno == errno.EACCES:
        return f"{where}: permission denied (ports below 1024 need privileges)"
    return f"{where}: {error.strerror or error}"


async def _serve(config: Config, notes: list[str], listening: list[Server]) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_server(config) as server:
            listening.append(server)
            # Everything loaded so far lives as long as the process: keep the
            # cyclic garbage collector from traversing it on every full
            # collection (35,000 objects, ~15 ms each time, a latency spike).
            gc.freeze()
            # Each connection leaves ~100 long-lived objects; at the default
            # threshold (700) 10,000 clients arriving at once set off 10 full
            # collections, 1.7 s of the 3.6 s they took, pauses up to 390 ms
            # (bench/connect_cost.py, docs/benchmarks.md). Young collections
            # 14x rarer: none full in the same storm; at most ~10,000 young
            # objects of cyclic garbage wait (a few MB).
            gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
            workers.watch_supervisor()  # if this process is one of `--workers`
            _announce(server)
            # After the banner: a node that cannot start says only why.
            for note in notes:
                LOGGER.warning("%s", note, extra={"event": "config_warning"})
            async for signum in signals:
                LOGGER.info("%s received: shutting down", signal.Signals(signum).name)
                break


def banner(server: Server) -> dict[str, Any]:
    """What a started node serves, where, and how it is set up (the start-up banner)."""
    config = server.config
    origins = []
    for host, port in server.addresses or [(config.host, config.port)]:
        origins.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    endpoints = {path: endpoint.dialect.name for path, endpoint in server.endpoints.items()}
    http = ["/health"] + (["/metrics"] if config.metrics else []) + ["/api/"]
    if config.console_path and config.api_key:
        http.append(f"{config.console_path}/")
    auth: str = config.auth_mode
    if auth == "jwt":
        algorithms = ["HS256"] * bool(config.jwt_secret) + ["RS256"] * bool(config.jwt_public_key)
        auth = f"jwt ({', '.join(algorithms)})"
    hooks = [hook for hook in PROXY_HOOKS if getattr(config, f"proxy_{hook}")]
    if config.proxy_connect:
        hook = "the connect hook (docs/proxy.md)"
        auth = hook if auth == "none" else f"{auth}; without a token, {hook}"
    return {
        "version": __version__,
        "url": server.url,
        "addresses": origins,
        "websocket": endpoints,
        "http": http,
        "api": bool(config.api_key),
        "auth": auth,
        "backplane": redacted(config.backplane),
        "transport": config.transport,
        "node": server.node_id,
        "demo": config.demo,
        "hooks": hooks,
    }


def _announce(server: Server) -> None:
    facts = banner(server)
    if server.config.log_format == "json":
        logs.announce(LOGGER, f"listening on {facts['url']}", event="listening", **facts)
        return
    first = f"http://{facts['addresses'][0]}"
    ws = ", ".join(
        f"{server.url.removesuffix(server.config.ws_path)}{path} ({dialect})"
        for path, dialect in facts["websocket"].items()
    )
    api = "on" if facts["api"] else "off: no api_key"
    lines = [
        f"tidings {__version__} listening on {facts['url']}",
        f"  websocket  {ws}",
        f"  http       {first}{', '.join(facts['http'])} (api {api})",
        f"  auth       {facts['auth']}"
        + (" (no token needed: local development)" if facts["auth"] == "none" else ""),
        f"  backplane  {facts['backplane']}"
        + (" (this node alone)" if facts["backplane"] == "memory" else ""),
        f"  node       {facts['node']}, transport {facts['transport']}",
    ]
    if facts["hooks"]:
        lines.append(f"  hooks      {', '.join(facts['hooks'])}")
    if len(facts["addresses"]) > 1:
        lines.insert(1, f"  addresses  {', '.join(facts['addresses'])}")
    if facts["demo"]:
        lines.append(
            "  demo       publishing to 'deploys' and 'functions'; "
            f"try: tidings watch deploys functions --url {server.url}"
        )
    print("\n".join(lines), flush=True)


# --- watch ---------------------------------------------------------------------------


def _run_watch(args: argparse.Namespace) -> int:
    _check_url(args.url)
    if args.epoch is not None and (args.since is None or len(args.topics) > 1):
        raise CliError(
            "tidings watch: --epoch goes with --since and one TOPIC (each topic has its own)",
            EXIT_USAGE,
        )
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    watcher = _Watcher(args)
    trio.run(watcher.run_until_signal)
    return EXIT_ERROR if watcher.refused else 0


class _Watcher:
    """``tidings watch``: replay in time order, then live; say what could not be had."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = _Console(highlight=False, soft_wrap=True)
        self.err = _Console(highlight=False, soft_wrap=True, stderr=True)
        self.refused: list[str] = []
        self.last: dict[str, tuple[str, int]] = {}

    async def run_until_signal(self) -> None:
        """Watch until Ctrl-C or SIGTERM, then leave quietly."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    await self.run()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    async def run(self) -> None:
        url, backoff = self.args.url, 0.2
        while True:
            try:
                async with tidings_client.connect(url, token=self.args.token) as client:
                    self.err.print(f"[dim]connected to {escape(url)}[/dim]")
                    await self.watch(client)
                    return
            except tidings_client.ConnectionRejectedError as exc:
                if 400 <= exc.status < 500 and exc.status != 429:  # asking again changes nothing
                    raise CliError(_rejected(exc, self.args.token)) from None
                self.err.print(f"[yellow]{escape(str(exc))}; retrying in {backoff:.1f} s[/]")
            except ConnectionError as exc:
                self.err.print(f"[yellow]{escape(str(exc))}; retrying in {backoff:.1f} s[/]")
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def watch(self, client: tidings_client.Client) -> None:
        async with AsyncExitStack() as stack:
            subscriptions = []
            for topic in dict.fromkeys(self.args.topics):
                try:
                    subscription = await stack.enter_async_context(
                        client.subscribe(topic, since=self.args.since, epoch=self.args.epoch)
                    )
                except tidings_client.TidingsError as exc:
                    self.refused.append(topic)
                    self.err.print(f"tidings: cannot watch {topic!r}: {escape(str(exc))}")
                    continue
                subscriptions.append(subscription)
            if not subscriptions:
                return
            if self.args.since is not None:
                await self.replay(subscriptions)
            else:
                for subscription in subscriptions:
                    answer = subscription.answer
                    self.last[subscription.topic] = (answer.get("epoch", ""), answer.get("seq", 0))
            async with trio.open_nursery() as nursery:
                for subscription in subscriptions:
                    nursery.start_soon(self.follow, subscription)

    async def replay(self, subscriptions: list[tidings_client.ClientSubscription]) -> None:
        """Print what each topic replays, merged in time order, then mark the live edge."""
        batches = []
        for subscription in subscriptions:
            answer = subscription.answer
            # The replayed events directly follow the subscribe response.
            events = [await anext(subscription) for _ in range(answer.get("replayed", 0))]
            self.say_if_not_recovered(subscription.topic, answer, events)
            start = events[0].seq - 1 if events else answer.get("seq", 0)
            self.last[subscription.topic] = (answer.get("epoch", ""), start)
            batches.append(events)
        # Each topic's events stay in seq order; across topics, by time.
        for event in heapq.merge(*batches, key=lambda event: event.timestamp):
            self.print_event(event)
        count = sum(len(batch) for batch in batches)
        self.err.print(
            f"[dim]-- {count} event{'s' * (count != 1)} replayed from history; "
            "live from here --[/dim]"
        )

    def say_if_not_recovered(self, topic: str, answer: dict[str, Any], events: list[Event]) -> None:
        if answer.get("recovered") is not False:
            return
        since, seq, epoch = self.args.since, answer.get("seq", 0), answer.get("epoch", "")
        if self.args.epoch is not None and self.args.epoch != epoch:
            what = (
                f"epoch {self.args.epoch} is gone (the topic started over as epoch {epoch}, "
                f"now at #{seq}); carrying on from #{seq + 1}"
            )
        elif since > seq:
            what = (
                f"#{since} is beyond the topic's last event (#{seq}, epoch {epoch}); "
                f"carrying on from #{seq + 1}"
            )
        else:
            resume = events[0].seq if events else seq + 1
            lost = f"#{since + 1}" if resume - 1 == since + 1 else f"#{since + 1}-#{resume - 1}"
            what = (
                f"history no longer reaches back to #{since + 1}: {lost} lost; "
                f"carrying on from #{resume}"
            )
        self.err.print(f"[bold yellow]! {escape(topic)}: not recovered:[/] {escape(what)}")

    async def follow(self, subscription: tidings_client.ClientSubscription) -> None:
        async for event in subscription:
            epoch, seq = self.last.get(event.topic, (event.epoch, event.seq - 1))
            if event.epoch != epoch:
                self.err.print(
                    f"[yellow]! {escape(event.topic)}: the topic started over "
                    f"(epoch {escape(event.epoch)}); events before #{event.seq} are not its[/]"
                )
            elif event.seq > seq + 1:
                missed = event.seq - seq - 1
                self.err.print(
                    f"[yellow]! {escape(event.topic)}: {missed} event{'s' * (missed != 1)} "
                    "missed (history no longer reaches back)[/]"
                )
            self.print_event(event)

    def print_event(self, event: Event) -> None:
        self.last[event.topic] = (event.epoch, event.seq)
        if self.args.json:
            line = orjson.dumps(attrs.asdict(event, filter=_public)).decode()
            print(line, flush=True)
        else:
            self.out.print(render_event(event))


def _public(attribute: attrs.Attribute[Any], _: Any) -> bool:
    return attribute.name != "payload_json"


def _rejected(exc: tidings_client.ConnectionRejectedError, token: str | None) -> str:
    text = str(exc)
    if exc.status == 401:
        text += (
            " (give a token with --token or TIDINGS_CLIENT_TOKEN; 'tidings token' mints one)"
            if token is None
            else " ('tidings token check TOKEN' tells why)"
        )
    return text


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
        raise CliError(f"the payload is not valid JSON: {exc}", EXIT_USAGE) from None


def _run_publish(args: argparse.Namespace) -> int:
    _check_url(args.url)
    payload = _parse_json(args.payload)

    async def publish() -> None:
        async with _connect(args) as client:
            position = await client.publish(args.topic, payload, timeout=args.timeout)
        if args.json:
            answer = {"topic": args.topic, "seq": position.seq, "epoch": position.epoch}
            print(orjson.dumps(answer).decode(), flush=True)
        else:
            print(position.seq, position.epoch, flush=True)

    _run_client(publish, args, f"publish to {args.topic!r}")
    return 0


def _run_request(args: argparse.Namespace) -> int:
    _check_url(args.url)
    payload = _parse_json(args.payload)

    async def request() -> None:
        async with _connect(args) as client:
            answer = await client.request(args.topic, payload, timeout=args.timeout)
        print(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode(), flush=True)

    _run_client(request, args, f"request {args.topic!r}")
    return 0


def _connect(args: argparse.Namespace) -> Any:
    return tidings_client.connect(
        args.url, reconnect=False, token=args.token, connect_timeout=args.timeout
    )


def _run_client(fn: Callable[[], Awaitable[None]], args: argparse.Namespace, what: str) -> None:
    """Run a one-shot client command; its failures as :class:`CliError`."""
    try:
        trio.run(fn)
    except BaseException as exc:
        error = _leaf(exc)
        if isinstance(error, tidings_client.TidingsError):
            raise CliError(f"{what} refused: {error.code}: {error.message}") from exc
        if isinstance(error, trio.TooSlowError):
            raise CliError(
                f"{what}: no answer from {args.url} within {format_duration(args.timeout)}"
            ) from exc
        if isinstance(error, tidings_client.ConnectionLostError):
            raise CliError(
                f"{what}: the connection to {args.url} closed before the answer "
                "(it may or may not have been done)"
            ) from exc
        if isinstance(error, tidings_client.ConnectionRejectedError):
            raise CliError(_rejected(error, args.token)) from exc
        if isinstance(error, ConnectionError):
            raise CliError(str(error)) from exc
        raise


# --- config ----------------------------------------------------------------------------


def _run_config_show(args: argparse.Namespace) -> int:
    if getattr(args, "defaults", False):
        config, title = Config(), "the defaults"
    else:
        config = Config.load(getattr(args, "config", None), overrides=_overrides(args))
        title = "the effective configuration"
    sys.stdout.write(to_toml(config, redact=True, title=title))
    sys.stdout.flush()
    return 0


def _run_config_check(args: argparse.Namespace) -> int:
    path = getattr(args, "config", None) or os.environ.get("TIDINGS_CONFIG")
    report = check(path, overrides=_overrides(args))
    for error in report.errors:
        print(f"error: {error}", file=sys.stderr)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if report.config is None:
        return EXIT_USAGE
    config = report.config
    sources = " + ".join([*([path] if path else []), "environment", "flags"])
    api = "on" if config.api_key else "off"
    print(
        f"configuration OK ({sources}): {config.host}:{config.port}, auth {config.auth_mode}"
        f"{' + connect hook' if config.proxy_connect else ''}, "
        f"api {api}, backplane {redacted(config.backplane)}",
        flush=True,
    )
    return 0


def _run_config_init(args: argparse.Namespace) -> int:
    sys.stdout.write(to_toml(Config(), redact=False, title="every setting at its default"))
    sys.stdout.flush()
    return 0


# --- token -----------------------------------------------------------------------------


def _run_token(args: argparse.Namespace) -> int:
    config = Config.load(getattr(args, "config", None))
    token = mint(
        config,
        user=args.user,
        ttl=args.ttl,
        tenant=args.tenant,
        topics=args.topics,
        publish=args.publish,
    )
    print(token, flush=True)
    if config.auth_mode != "jwt":
        print(
            f"tidings: warning: this node's auth is {config.auth_mode}: it does not check JWTs",
            file=sys.stderr,
        )
    return 0


def _run_token_check(args: argparse.Namespace) -> int:
    config = Config.load(getattr(args, "config", None))
    try:
        identity = verify(config, args.token)
    except AuthError as exc:
        raise CliError(f"the node would refuse this token: {exc}") from None
    mode = config.auth_mode
    if mode == "none":
        print("accepted: this node does not authenticate clients (auth none); any token is")
        return 0
    if mode == "token":
        print(f"accepted: the node's static token (tenant {identity.tenant})")
        return 0
    claims = jwt.decode(args.token.strip(), options={"verify_signature": False})
    expires = identity.expires_at or 0
    left = _human(expires - time.time())
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))
    topics = ", ".join(claims["topics"]) if "topics" in claims else "every topic"
    publish = (
        ", ".join(claims["publish"]) or "none"
        if "publish" in claims
        else "as the namespace decides (client_publish)"
    )
    print(
        f"accepted: user {identity.user!r}, tenant {identity.tenant!r}, expires {stamp} "
        f"(in {left}); subscribe: {topics or 'none'}; publish: {publish}"
    )
    return 0


def _human(seconds: float) -> str:
    """``59m59s``, ``1h``, ``2d3h``: a lifetime at a glance."""
    left, parts = max(0, math.ceil(seconds)), list[str]()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size or (unit == "s" and not parts):
            parts.append(f"{left // size}{unit}")
            left %= size
    return "".join(parts[:2])
