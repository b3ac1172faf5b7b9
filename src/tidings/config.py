"""Configuration: one frozen attrs class, layered from four sources.

In rising priority: the defaults below, a TOML file, ``TIDINGS_*``
environment variables, command-line flags. Every key has the same name in
all four (``max_message_size`` in TOML, ``TIDINGS_MAX_MESSAGE_SIZE`` in the
environment, ``--max-message-size`` on the command line). Unknown keys are
errors, so a typo fails at startup instead of being ignored.

Durations are seconds, as numbers or with a unit (``"500ms"``, ``"30s"``,
``"2m"``, ``"1h"``); sizes are bytes, as numbers or with a unit (``"512KiB"``,
``"1MiB"``).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import time
import tomllib
from collections.abc import Iterable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, NewType, get_args, get_origin
from urllib.parse import urlsplit

import attrs
import cattrs

from ._version import __version__
from .backplane.url import parse_url as parse_backplane_url
from .broker.namespaces import Namespace, Namespaces
from .broker.outbox import OverflowPolicy
from .errors import ConfigError
from .protocol.topics import TopicFilter

Seconds = NewType("Seconds", float)
Bytes = NewType("Bytes", int)
TransportName = Literal["builtin", "hypercorn"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
AuthMode = Literal["auto", "none", "token", "jwt"]
BackplaneDurability = Literal["primary", "replicated"]
ProxyFallback = Literal["refuse", "allow"]

#: The upgrade's headers hook calls carry unless ``proxy_forward_headers`` says otherwise.
DEFAULT_FORWARD_HEADERS = ("Cookie", "Authorization", "Origin", "User-Agent", "X-Forwarded-For")
#: Headers that describe the hook call itself (its body, its connection): forwarding
#: the client's would corrupt the call.
UNFORWARDABLE_HEADERS = frozenset(
    {
        "accept-encoding", "connection", "content-encoding", "content-length", "content-type",
        "expect", "host", "keep-alive", "proxy-connection", "te", "trailer",
        "transfer-encoding", "upgrade",
    }
)  # fmt: skip
#: The hooks of the ``[proxy]`` table: ``proxy_<hook>`` keys holding a URL.
PROXY_HOOKS = ("connect", "subscribe", "publish", "refresh", "rpc")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")

ENV_PREFIX = "TIDINGS_"
#: ``TIDINGS_*`` variables that are not settings, and so not unknown.
OTHER_VARIABLES: dict[str, str] = {
    "TIDINGS_CONFIG": "the TOML config file",
    "TIDINGS_DEBUG": "1: errors of the tidings command show their traceback",
    "TIDINGS_CLIENT_TOKEN": "the token watch, publish and request present",
    "TIDINGS_URL": "the node's HTTP address, where the publisher examples read it",
    # The test suite's switches (.ci/run sets them): skipping is then a failure.
    "TIDINGS_REQUIRE_REDIS": "tests: the Redis tests must run",
    "TIDINGS_REQUIRE_NODE": "tests: the Node SDK tests must run",
    "TIDINGS_REQUIRE_BROWSER": "tests: the browser tests must run",
    "TIDINGS_SCHEMATHESIS_EXAMPLES": "tests: examples schemathesis sends per API operation",
}
#: Keys whose values are credentials: redacted by ``tidings config show``.
SECRETS = ("token", "jwt_secret", "api_key")
#: What ``tidings config show`` prints for a secret that is set.
REDACTED = "***"


_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*([0-9]+)\s*(B|KiB|MiB|GiB|KB|MB|GB|k|K|M)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3,
    "k": 1024, "K": 1024, "M": 1024**2, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
}  # fmt: skip
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_duration(value: str | float) -> float:
    """Seconds from a number or a string with a unit (``500ms``, ``30s``, ``2m``, ``1h``)."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds, not a boolean")
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a duration (e.g. 30, 30s, 500ms, 2m)")
    return float(match[1]) * _DURATION_UNITS[match[2]]


def parse_size(value: str | int) -> int:
    """Bytes from a number or a string with a unit (``512KiB``, ``1MiB``)."""
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes, not a boolean")
    if isinstance(value, int):
        return value
    match = _SIZE.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a size (e.g. 524288, 512KiB, 1MiB)")
    return int(match[1]) * _SIZE_UNITS[match[2]]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def _optional_duration(value: Any) -> float | None:
    return None if value is None else parse_duration(value)


def _optional_size(value: Any) -> int | None:
    return None if value is None else parse_size(value)


@attrs.frozen(kw_only=True)
class NamespaceConfig:
    """One ``[namespaces.NAME]`` table: settings for topics ``NAME:...``.

    Every setting left out is taken from the top level (the default namespace),
    except ``topics``, whose default is to allow every ``NAME:`` topic.
    """

    history_size: int | None = None
    history_ttl: Seconds | None = attrs.field(default=None, converter=_optional_duration)
    history_max_bytes: Bytes | None = attrs.field(default=None, converter=_optional_size)
    client_publish: bool | None = None
    presence: bool | None = None
    join_leave: bool | None = None
    overflow_policy: OverflowPolicy | None = attrs.field(
        default=None, converter=attrs.converters.optional(OverflowPolicy)
    )
    outbox_size: int | None = None
    topics: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    local: bool | None = None
    """With a backplane, keep these topics on each node (not shared through Redis)."""
    compression: bool | None = None
    """Whether this namespace's events are compressed for clients that negotiated it."""


def _namespace_tables(value: Any) -> dict[str, NamespaceConfig]:
    """``Config(namespaces={"chat": {"history_size": 50}})`` as well as NamespaceConfig values."""
    if not isinstance(value, Mapping):
        raise ConfigError("namespaces: expected a table of namespace tables")
    tables: dict[str, NamespaceConfig] = {}
    for name, table in value.items():
        if isinstance(table, NamespaceConfig):
            tables[str(name)] = table
        elif isinstance(table, Mapping):
            for key in table:
                if key not in NAMESPACE_KEYS:
                    hint = _suggest(str(key), NAMESPACE_KEYS)
                    raise ConfigError(f"namespaces.{name}: unknown key {key!r}{hint}")
            try:
                tables[str(name)] = _converter.structure(dict(table), NamespaceConfig)
            except Exception as exc:
                problems = "; ".join(cattrs.transform_error(exc, path=f"namespaces.{name}"))
                raise ConfigError(problems) from None
        else:
            raise ConfigError(f"namespaces.{name}: expected a table")
    return tables


@attrs.frozen(kw_only=True)
class Config:
    """Everything a tidings node can be told. Defaults follow ``DESIGN.md``."""

    host: str = attrs.field(default="127.0.0.1", metadata=_help("address to listen on"))
    port: int = attrs.field(default=8800, metadata=_help("TCP port; 0 picks a free one"))
    ws_path: str = attrs.field(default="/ws", metadata=_help("path of the WebSocket endpoint"))
    centrifugo_path: str = attrs.field(
        default="/connection/websocket",
        metadata=_help("path where Centrifugo's client SDKs connect; empty: not served"),
    )
    sse_path: str = attrs.field(
        default="/sse",
        metadata=_help(
            "path of the Server-Sent Events endpoint (GET ?topic=...); empty: not served"
        ),
    )
    stream_path: str = attrs.field(
        default="/stream",
        metadata=_help("path of the NDJSON streaming endpoint (GET ?topic=...); empty: not served"),
    )
    sse_retry: Seconds = attrs.field(
        default=Seconds(3.0),
        converter=parse_duration,
        metadata=_help(
            "reconnect delay SSE streams announce (retry:), each spread up to 1.5 times"
        ),
    )
    stream_max_topics: int = attrs.field(
        default=32,
        metadata=_help("topics one SSE or NDJSON stream may follow (each SSE id names them all)"),
    )
    compression: bool = attrs.field(
        default=True,
        metadata=_help(
            "permessage-deflate for WebSocket clients that offer it (built-in transport),"
            " each event compressed once for all of them"
        ),
    )
    compression_min_size: Bytes = attrs.field(
        default=Bytes(256),
        converter=parse_size,
        metadata=_help("frames shorter than this go out uncompressed"),
    )
    transport: TransportName = attrs.field(
        default="builtin",
        metadata=_help("server for the port: builtin (tidings' own) or hypercorn (ASGI)"),
    )
    max_message_size: Bytes = attrs.field(
        default=Bytes(512 * 1024),
        converter=parse_size,
        metadata=_help("largest message a client may send; 1009 beyond"),
    )
    ping_interval: Seconds = attrs.field(
        default=Seconds(30.0),
        converter=parse_duration,
        metadata=_help("how often the server pings each client"),
    )
    read_timeout: Seconds = attrs.field(
        default=Seconds(60.0),
        converter=parse_duration,
        metadata=_help("silence after which a client is closed (1011)"),
    )
    write_timeout: Seconds = attrs.field(
        default=Seconds(10.0),
        converter=parse_duration,
        metadata=_help("a write blocked longer drops the client"),
    )
    write_delay: Seconds = attrs.field(
        default=Seconds(0.0),
        converter=parse_duration,
        metadata=_help(
            "a client's writer, woken, waits this long to gather more into one write"
            " (events a backplane delivers one at a time); 0: writes at once"
        ),
    )
    close_timeout: Seconds = attrs.field(
        default=Seconds(2.0),
        converter=parse_duration,
        metadata=_help("how long to wait for the peer's close frame"),
    )
    handshake_timeout: Seconds = attrs.field(
        default=Seconds(10.0),
        converter=parse_duration,
        metadata=_help("time allowed to send an HTTP request head"),
    )
    shutdown_timeout: Seconds = attrs.field(
        default=Seconds(5.0),
        converter=parse_duration,
        metadata=_help("time clients get to drain on shutdown"),
    )
    reconnect_window: Seconds = attrs.field(
        default=Seconds(5.0),
        converter=parse_duration,
        metadata=_help(
            "on shutdown each client is asked to come back after a random delay up to this"
            " (retry=MS in the close reason), not all at once; 0: no hint"
        ),
    )
    request_timeout: Seconds = attrs.field(
        default=Seconds(10.0),
        converter=parse_duration,
        metadata=_help("time a request handler gets to answer"),
    )
    outbox_size: int = attrs.field(
        default=256, metadata=_help("messages queued per client before the overflow policy acts")
    )
    overflow_policy: OverflowPolicy = attrs.field(
        default=OverflowPolicy.DROP,
        converter=OverflowPolicy,
        metadata=_help("full outbox: drop the event for that client, or disconnect it (1008)"),
    )
    inbox_size: int = attrs.field(
        default=1024, metadata=_help("publications queued for the broker before publishers wait")
    )
    history_size: int = attrs.field(
        default=1000, metadata=_help("events kept per topic for resume; 0 keeps none")
    )
    history_ttl: Seconds = attrs.field(
        default=Seconds(300.0),
        converter=parse_duration,
        metadata=_help("age after which an event leaves history"),
    )
    history_max_bytes: Bytes = attrs.field(
        default=Bytes(16 * 1024 * 1024),
        converter=parse_size,
        metadata=_help("bytes one topic's history holds at most; 0: no byte bound"),
    )
    history_node_bytes: Bytes = attrs.field(
        default=Bytes(256 * 1024 * 1024),
        converter=parse_size,
        metadata=_help("bytes all history of the node holds at most; 0: no byte bound"),
    )
    max_topics: int = attrs.field(default=100_000, metadata=_help("topics one node holds at most"))
    idempotency_window: Seconds = attrs.field(
        default=Seconds(300.0),
        converter=parse_duration,
        metadata=_help("how long a publish's idempotency key is remembered"),
    )
    idempotency_max_keys: int = attrs.field(
        default=10_000,
        metadata=_help("idempotency keys remembered per tenant (per topic with Redis); oldest go"),
    )
    idempotency_max_bytes: Bytes = attrs.field(
        default=Bytes(4 * 1024 * 1024),
        converter=parse_size,
        metadata=_help("memory the idempotency keys of one tenant may take; oldest go"),
    )
    max_connections: int = attrs.field(
        default=100_000,
        metadata=_help("connections (WebSocket and streams) one node accepts at most"),
    )
    tenant_max_topics: int = attrs.field(
        default=50_000,
        metadata=_help(
            "topics one tenant's clients may hold on a node (idle ones make room); 0: no limit"
        ),
    )
    tenant_max_connections: int = attrs.field(
        default=50_000, metadata=_help("connections of one tenant on a node; 0: no limit")
    )
    tenant_history_bytes: Bytes = attrs.field(
        default=Bytes(128 * 1024 * 1024),
        converter=parse_size,
        metadata=_help("bytes of history one tenant's topics hold on a node; 0: no limit"),
    )
    max_partial_bytes: Bytes = attrs.field(
        default=Bytes(64 * 1024 * 1024),
        converter=parse_size,
        metadata=_help("bytes of unfinished (fragmented) messages the node holds for all clients"),
    )
    max_pending_handshakes: int = attrs.field(
        default=4096,
        metadata=_help(
            "connections accepted and not yet upgraded; at the limit, accepting pauses"
            " (never more than half the process's file descriptors)"
        ),
    )
    max_pending_handshakes_per_ip: int = attrs.field(
        default=256,
        metadata=_help("pending handshakes from one address; more are closed at once; 0: none"),
    )
    max_subscriptions: int = attrs.field(
        default=1000, metadata=_help("subscriptions per connection")
    )
    max_pending_requests: int = attrs.field(
        default=16, metadata=_help("requests one connection may have in flight")
    )
    max_queued_bytes: Bytes = attrs.field(
        default=Bytes(1024 * 1024),
        converter=parse_size,
        metadata=_help(
            "byte budget of everything queued toward one client (events, replies, replays,"
            " pongs); events beyond it meet the overflow policy"
        ),
    )
    max_commands_per_frame: int = attrs.field(
        default=1000,
        metadata=_help("commands one frame may carry (Centrifugo batches); more close it"),
    )
    connect_timeout: Seconds = attrs.field(
        default=Seconds(10.0),
        converter=parse_duration,
        metadata=_help("time a Centrifugo client gets to send connect after the upgrade"),
    )
    history_max_reply: int = attrs.field(
        default=100,
        metadata=_help("events one history answer or subscribe-with-recovery may carry"),
    )
    presence_max_reply: int = attrs.field(
        default=1000, metadata=_help("clients one presence answer may list")
    )
    topics: tuple[str, ...] = attrs.field(
        default=(),
        converter=tuple,
        metadata=_help(
            "allowed topic patterns of the default namespace (shell-style); empty allows all"
        ),
    )
    client_publish: bool | None = attrs.field(
        default=None,
        metadata=_help(
            "may clients publish (default namespace)? unset: yes without auth, else the token's"
            " publish claim decides"
        ),
    )
    presence: bool = attrs.field(
        default=False, metadata=_help("clients may ask who is subscribed (default namespace)")
    )
    join_leave: bool = attrs.field(
        default=False, metadata=_help("subscribers get join/leave messages (default namespace)")
    )
    namespaces: dict[str, NamespaceConfig] = attrs.field(
        factory=dict,
        converter=_namespace_tables,
        metadata=_help("[namespaces.NAME] tables for topics NAME:...; JSON in the environment"),
    )
    allow_unknown_namespaces: bool = attrs.field(
        default=False, metadata=_help("treat NAME: topics of unconfigured namespaces as default")
    )
    auth: AuthMode = attrs.field(
        default="auto",
        metadata=_help("client authentication: auto (from the keys set), none, token, jwt"),
    )
    token: str | None = attrs.field(
        default=None, metadata=_help("the static token clients must present (auth token)")
    )
    jwt_secret: str | None = attrs.field(
        default=None, metadata=_help("HS256 secret for client JWTs (auth jwt)")
    )
    jwt_public_key: str | None = attrs.field(
        default=None, metadata=_help("RS256 public key for client JWTs: PEM text or a file path")
    )
    jwt_audience: str | None = attrs.field(
        default=None, metadata=_help("required aud claim of client JWTs, if set")
    )
    jwt_issuer: str | None = attrs.field(
        default=None, metadata=_help("required iss claim of client JWTs, if set")
    )
    default_tenant: str = attrs.field(
        default="default", metadata=_help("tenant of clients whose token names none")
    )
    api_key: str | None = attrs.field(
        default=None, metadata=_help("key of the HTTP API (Authorization: apikey KEY); unset: off")
    )
    console_path: str = attrs.field(
        default="/console",
        metadata=_help("path of the web console, served only with api_key; empty: not served"),
    )
    console_session_ttl: Seconds = attrs.field(
        default=Seconds(8 * 3600.0),
        converter=parse_duration,
        metadata=_help("how long a console login lasts before the key is asked again"),
    )
    allowed_origins: tuple[str, ...] = attrs.field(
        default=(),
        converter=tuple,
        metadata=_help("browser origins allowed besides localhost (comma-separated)"),
    )
    rate_limit: int = attrs.field(
        default=0, metadata=_help("messages a client may send per rate_period; 0 is no limit")
    )
    rate_period: Seconds = attrs.field(
        default=Seconds(1.0),
        converter=parse_duration,
        metadata=_help("the period of rate_limit (5 per 60s: rate_limit 5, rate_period 60s)"),
    )
    rate_burst: int = attrs.field(
        default=0, metadata=_help("messages a client may send at once; 0 means rate_limit")
    )
    rate_limit_violations: int = attrs.field(
        default=10,
        metadata=_help("rate-limited messages before a client is closed (4029); 0 never"),
    )
    max_connections_per_ip: int = attrs.field(
        default=0,
        metadata=_help("connections (WebSocket and streams) from one address; 0 is no limit"),
    )
    metrics: bool = attrs.field(default=True, metadata=_help("serve GET /metrics (Prometheus)"))
    log_format: LogFormat = attrs.field(default="text", metadata=_help("text or json"))
    node_id: str = attrs.field(
        default="", metadata=_help("this node's name in the API and logs; default host-pid")
    )
    backplane: str = attrs.field(
        default="memory",
        metadata=_help(
            "memory (one node), or redis://HOST:PORT/DB, redis+cluster://HOST:PORT,"
            " redis+sentinel://HOST:PORT/SERVICE to share topics between nodes"
        ),
    )
    backplane_timeout: Seconds = attrs.field(
        default=Seconds(2.0),
        converter=parse_duration,
        metadata=_help("how long a publication or cluster-wide query waits for Redis"),
    )
    backplane_max_lag: Seconds = attrs.field(
        default=Seconds(10.0),
        converter=parse_duration,
        metadata=_help(
            "a node whose fan-out falls this far behind Redis skips events, then refills"
            " from history"
        ),
    )
    backplane_buffer: int = attrs.field(
        default=10_000,
        metadata=_help("publications held while Redis is away; beyond it they are refused"),
    )
    backplane_durability: BackplaneDurability = attrs.field(
        default="primary",
        metadata=_help(
            "acknowledge a publication once the Redis primary has it (primary), or once a"
            " replica has it too (replicated: it survives a failover)"
        ),
    )
    workers: int = attrs.field(
        default=1,
        metadata=_help(
            "processes serving the port, each a node on the Redis backplane (tidings serve)"
        ),
    )
    reuse_port: bool = attrs.field(
        default=False,
        metadata=_help("listen with SO_REUSEPORT, sharing the port with other processes"),
    )
    demo: bool = attrs.field(
        default=False, metadata=_help("publish a simulated deploy pipeline to deploys/functions")
    )
    log_level: LogLevel = attrs.field(default="info", metadata=_help("debug, info, warning, error"))
    # The application's hooks (docs/proxy.md): the [proxy] table of a file, whose
    # keys are these without "proxy_" (TIDINGS_PROXY_CONNECT, --proxy-connect).
    proxy_connect: str | None = attrs.field(
        default=None,
        metadata=_help(
            "URL the node POSTs a client's connect to when it presents no token; the"
            " answer names its user, tenant, expiry and topics, or refuses it"
        ),
    )
    proxy_subscribe: str | None = attrs.field(
        default=None, metadata=_help("URL asked whether a client may subscribe to a topic")
    )
    proxy_publish: str | None = attrs.field(
        default=None,
        metadata=_help("URL asked whether a client may publish; it may replace the payload"),
    )
    proxy_refresh: str | None = attrs.field(
        default=None,
        metadata=_help("URL asked to extend a client's session before it expires"),
    )
    proxy_rpc: str | None = attrs.field(
        default=None,
        metadata=_help("URL that answers requests (rpc) no in-process handler answers"),
    )
    proxy_timeout: Seconds = attrs.field(
        default=Seconds(1.0),
        converter=parse_duration,
        metadata=_help(
            "time a hook call gets in all (waiting for a slot included); then the client"
            " is refused with a temporary error"
        ),
    )
    proxy_forward_headers: tuple[str, ...] = attrs.field(
        default=DEFAULT_FORWARD_HEADERS,
        converter=tuple,
        metadata=_help("headers of the client's upgrade request that hook calls carry"),
    )
    proxy_max_in_flight: int = attrs.field(
        default=64, metadata=_help("hook calls one node has in flight at most; more wait")
    )
    proxy_cache_ttl: Seconds = attrs.field(
        default=Seconds(0.0),
        converter=parse_duration,
        metadata=_help("how long a subscribe hook's answer is kept per (user, topic); 0: not kept"),
    )
    proxy_cache_size: int = attrs.field(
        default=10_000, metadata=_help("subscribe answers kept at most; the oldest go first")
    )
    proxy_max_response_size: Bytes = attrs.field(
        default=Bytes(1024 * 1024),
        converter=parse_size,
        metadata=_help("largest answer read from a hook; a longer one is an error"),
    )
    proxy_unavailable: ProxyFallback = attrs.field(
        default="refuse",
        metadata=_help(
            "when a hook's backend is down, slow or answers nonsense: refuse (a temporary"
            " error), or allow (decide as if the hook were not configured)"
        ),
    )

    def __attrs_post_init__(self) -> None:
        problems = list(_semantic_problems(self))
        if problems:
            raise ConfigError("; ".join(problems), problems=problems)

    @property
    def auth_mode(self) -> Literal["none", "token", "jwt"]:
        """The authentication in force: ``auto`` resolved from the keys that are set."""
        if self.auth != "auto":
            return self.auth
        if self.jwt_secret or self.jwt_public_key:
            return "jwt"
        return "token" if self.token else "none"

    def build_namespaces(self) -> Namespaces:
        """The default namespace from the top-level settings, and the named ones."""
        default = Namespace(
            name="",
            history_size=self.history_size,
            history_ttl=self.history_ttl,
            history_max_bytes=self.history_max_bytes,
            publish=self.client_publish,
            presence=self.presence,
            join_leave=self.join_leave,
            overflow_policy=self.overflow_policy,
            outbox_size=self.outbox_size,
            topics=TopicFilter(self.topics),
            compression=self.compression,
        )
        named = {}
        for name, table in self.namespaces.items():
            settings = {
                key: value
                for key, value in attrs.asdict(table, recurse=False).items()
                if value is not None and key != "topics"
            }
            if "client_publish" in settings:
                settings["publish"] = settings.pop("client_publish")
            named[name] = attrs.evolve(
                default, name=name, topics=TopicFilter(table.topics), **settings
            )
        return Namespaces(default, named, allow_unknown=self.allow_unknown_namespaces)

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Config:
        """Build a config from a TOML file, the environment and explicit overrides.

        ``env`` defaults to ``os.environ``; ``TIDINGS_CONFIG`` there names the
        file when ``path`` is None. ``overrides`` (command-line flags) take
        strings or typed values.

        Raises:
            ConfigError: a file that cannot be read, an unknown key, a bad value.
        """
        layers = _Layers.gather(path, os.environ if env is None else env, overrides or {})
        config = layers.build()
        if layers.problems:
            raise ConfigError("; ".join(layers.problems), problems=layers.problems)
        assert config is not None
        return config


attrs.resolve_types(Config)  # the annotations are strings (PEP 563); cattrs needs the types
FIELDS: dict[str, attrs.Attribute[Any]] = {field.name: field for field in attrs.fields(Config)}
attrs.resolve_types(NamespaceConfig)
_NAMESPACE_FIELDS = {field.name: field for field in attrs.fields(NamespaceConfig)}
NAMESPACE_KEYS: tuple[str, ...] = tuple(_NAMESPACE_FIELDS)
#: The keys of a file's ``[proxy]`` table: ``proxy_KEY`` settings.
PROXY_KEYS: tuple[str, ...] = tuple(
    name.removeprefix("proxy_") for name in FIELDS if name.startswith("proxy_")
)
#: Keys that hold text or nothing (unset): secrets, JWT claims required.
OPTIONAL_TEXT: tuple[str, ...] = tuple(
    name for name, field in FIELDS.items() if field.type == str | None
)


def _semantic_problems(config: Config) -> list[str]:
    problems = []
    for name in (
        "transport",
        "log_level",
        "log_format",
        "auth",
        "proxy_unavailable",
        "backplane_durability",
    ):
        allowed = _choices(FIELDS[name].type)
        if getattr(config, name) not in allowed:
            problems.append(f"{name} must be one of {', '.join(allowed)}")
    if not 0 <= config.port <= 65535:
        problems.append(f"port must be between 0 and 65535, not {config.port}")
    if not config.ws_path.startswith("/"):
        problems.append("ws_path must start with '/'")
    if config.centrifugo_path and not config.centrifugo_path.startswith("/"):
        problems.append("centrifugo_path must start with '/' (or be empty: not served)")
    if config.centrifugo_path == config.ws_path:
        problems.append("centrifugo_path must differ from ws_path")
    for name in (
        "max_message_size",
        "outbox_size",
        "inbox_size",
        "max_topics",
        "max_connections",
        "max_subscriptions",
        "max_pending_requests",
        "backplane_buffer",
        "max_queued_bytes",
        "max_commands_per_frame",
        "history_max_reply",
        "presence_max_reply",
        "max_pending_handshakes",
        "idempotency_max_keys",
        "idempotency_max_bytes",
        "stream_max_topics",
        "proxy_max_in_flight",
        "proxy_cache_size",
        "proxy_max_response_size",
        "workers",
    ):
        if getattr(config, name) < 1:
            problems.append(f"{name} must be at least 1")
    if config.history_size < 0:
        problems.append("history_size must not be negative")
    for name in (
        "ping_interval",
        "read_timeout",
        "write_timeout",
        "close_timeout",
        "handshake_timeout",
        "shutdown_timeout",
        "request_timeout",
        "connect_timeout",
        "history_ttl",
        "idempotency_window",
        "backplane_timeout",
        "backplane_max_lag",
        "rate_period",
        "console_session_ttl",
        "sse_retry",
        "proxy_timeout",
    ):
        if not getattr(config, name) > 0:
            problems.append(f"{name} must be greater than 0")
    problems.extend(_console_path_problems(config))
    problems.extend(_stream_path_problems(config))
    for name in (
        "rate_limit",
        "rate_burst",
        "rate_limit_violations",
        "max_connections_per_ip",
        "history_max_bytes",
        "history_node_bytes",
        "tenant_max_topics",
        "tenant_max_connections",
        "tenant_history_bytes",
        "max_partial_bytes",
        "max_pending_handshakes_per_ip",
        "compression_min_size",
        "write_delay",
        "proxy_cache_ttl",
    ):
        if getattr(config, name) < 0:
            problems.append(f"{name} must not be negative")
    if config.workers > 1 and config.backplane == "memory":
        problems.append(
            "workers > 1 needs a Redis backplane: on the memory backplane each worker would be"
            " a node of its own, and a client would miss what was published through the others"
        )
    if config.backplane != "memory":
        try:
            parse_backplane_url(config.backplane)
        except ValueError as exc:
            problems.append(str(exc))
    for name in OPTIONAL_TEXT:
        value = getattr(config, name)
        if value is not None and value.strip() in ("None", "null", REDACTED):
            # Earlier versions of `tidings config` printed unset keys as "None", and
            # `config show` prints secrets as ***: neither may become a credential.
            problems.append(
                f"{name} = {value!r} is a placeholder, not a value: leave {name} out to unset it"
            )
    if config.jwt_public_key:
        problem = _public_key_problem(config.jwt_public_key)
        if problem is not None:
            problems.append(problem)
    if config.auth == "jwt" and not (config.jwt_secret or config.jwt_public_key):
        problems.append("auth jwt needs jwt_secret (HS256) or jwt_public_key (RS256)")
    if config.auth == "token" and not config.token:
        problems.append("auth token needs token")
    if (
        config.auth == "auto"
        and config.auth_mode == "none"
        and not config.proxy_connect
        and not _is_loopback(config.host)
    ):
        problems.append(
            f"listening on {config.host} needs client authentication: set jwt_secret,"
            " jwt_public_key, token or proxy_connect, or auth = 'none' to open it on purpose"
        )
    problems.extend(_proxy_problems(config))
    for name, namespace in config.namespaces.items():
        if not name or ":" in name:
            problems.append(f"namespace names are non-empty and have no ':' ({name!r})")
        if namespace.outbox_size is not None and namespace.outbox_size < 1:
            problems.append(f"namespaces.{name}.outbox_size must be at least 1")
    if config.read_timeout <= config.ping_interval:
        problems.append(
            "read_timeout must be longer than ping_interval, or clients are closed before a ping"
        )
    return problems


def _stream_path_problems(config: Config) -> list[str]:
    problems = []
    taken = {config.ws_path, config.centrifugo_path, config.console_path, "/health", "/metrics"}
    for name in ("sse_path", "stream_path"):
        path = getattr(config, name)
        if not path:
            continue
        if not path.startswith("/") or "?" in path or "#" in path:
            problems.append(f"{name} must start with '/' (or be empty: not served)")
        elif path in taken or path == "/api" or path.startswith("/api/"):
            problems.append(f"{name} {path!r} is taken by another endpoint")
        taken.add(path)
    return problems


def _proxy_problems(config: Config) -> list[str]:
    problems = []
    for hook in PROXY_HOOKS:
        url = getattr(config, f"proxy_{hook}")
        if url is None:
            continue
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append(f"proxy_{hook} must be an http:// or https:// URL, not {url[:200]!r}")
        elif parts.password == REDACTED:
            problems.append(f"proxy_{hook}: the password {REDACTED!r} is a placeholder")
    seen: set[str] = set()
    for name in config.proxy_forward_headers:
        lowered = name.lower()
        if not _HEADER_NAME.match(name):
            problems.append(f"proxy_forward_headers: {name[:100]!r} is not a header name")
        elif lowered in UNFORWARDABLE_HEADERS:
            problems.append(
                f"proxy_forward_headers: {name} describes the hook call itself; it is not forwarded"
            )
        elif lowered in seen:
            problems.append(f"proxy_forward_headers: {name} is listed twice")
        seen.add(lowered)
    return problems


def redact_url(url: str) -> str:
    """``url`` with the password of its user part, if any, read ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username}:{REDACTED}@{host}").geturl()


def _console_path_problems(config: Config) -> list[str]:
    path = config.console_path
    if not path:
        return []
    if not path.startswith("/") or path.endswith("/") or "?" in path or "#" in path:
        return ["console_path must start with '/' and not end with it (or be empty: not served)"]
    taken = {config.ws_path, config.centrifugo_path, "/health", "/metrics"}
    if path in taken or path == "/api" or path.startswith("/api/"):
        return [f"console_path {path!r} is taken by another endpoint"]
    return []


# --- parsing -----------------------------------------------------------------------


def _parse_text(key: str, text: str) -> Any:
    """Turn the text of an environment variable or flag into the field's value."""
    kind = FIELDS[key].type
    if kind is bool or kind == bool | None:
        if not text.strip() and kind is not bool:
            return None
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{text!r} is not a boolean (use true or false)")
    if kind == tuple[str, ...]:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if kind == dict[str, NamespaceConfig]:
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"not valid JSON: {exc}") from None
    return text


_converter = cattrs.Converter(forbid_extra_keys=True)


def _structure_seconds(value: Any, _: Any) -> float:
    return parse_duration(value)


def _structure_bytes(value: Any, _: Any) -> int:
    return parse_size(value)


def _structure_int(value: Any, _: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{value!r} is not an integer")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not an integer") from None


def _structure_bool(value: Any, _: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not a boolean")
    return value


def _structure_str_tuple(value: Any, _: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not all(isinstance(item, str) for item in value):
        raise ValueError("expected a list of strings")
    return tuple(value)


_converter.register_structure_hook(Seconds, _structure_seconds)
_converter.register_structure_hook(Bytes, _structure_bytes)
_converter.register_structure_hook(int, _structure_int)
_converter.register_structure_hook(bool, _structure_bool)
_converter.register_structure_hook_func(lambda kind: kind == tuple[str, ...], _structure_str_tuple)
# Namespace tables are checked by the field's converter, whose messages name the
# table and suggest a key; cattrs' own would say "expected None (Extra fields ...)".
_converter.register_structure_hook_func(
    lambda kind: kind == dict[str, NamespaceConfig], lambda value, _: _namespace_tables(value)
)


def structure(values: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> Config:
    """A :class:`Config` from a flat mapping of keys to values.

    ``sources`` names where each key's value came from (``TIDINGS_PORT``,
    ``--port``), for the messages.

    Raises:
        ConfigError: an unknown key or a value of the wrong kind.
    """
    for key in values:
        _check_key(key, "configuration")
    try:
        return _converter.structure(dict(values), Config)
    except ConfigError:
        raise
    except cattrs.BaseValidationError as exc:
        # Config's own checks (__attrs_post_init__) come as one ConfigError of many
        # problems, without a field: keep them apart, one line each.
        checks = [e for e in exc.exceptions if isinstance(e, ConfigError)]
        rest = [e for e in exc.exceptions if not isinstance(e, ConfigError)]
        problems = [problem for error in checks for problem in error.problems]
        if rest:
            group = cattrs.ClassValidationError(str(exc), rest, Config)
            messages = cattrs.transform_error(group, path="config", format_exception=_describe)
            problems.extend(_readable(m, sources or {}) for m in messages)
        raise ConfigError("; ".join(problems), problems=problems) from None


def _describe(exc: BaseException, kind: Any) -> str:
    choices = _choices(kind)
    if choices:
        return f"must be one of {', '.join(choices)}"
    if isinstance(exc, ValueError) and str(exc):
        return str(exc)
    name = getattr(kind, "__name__", str(kind))
    return f"expected {name} ({exc})"


def _choices(kind: Any) -> tuple[str, ...]:
    if get_origin(kind) is Literal:
        return tuple(str(arg) for arg in get_args(kind))
    if isinstance(kind, type) and issubclass(kind, StrEnum):
        return tuple(member.value for member in kind)
    return ()


def _readable(message: str, sources: Mapping[str, str]) -> str:
    # cattrs says "<problem> @ config.port"; lead with the key, or where it was set.
    text, _, where = message.partition(" @ ")
    key = where.removeprefix("config").removeprefix(".") if where else ""
    if not key or text.startswith(key + "."):  # a namespace table names itself
        return text
    return f"{sources.get(key, key)}: {text}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def suggest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``word`` (a misspelt key, flag or variable), if any is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None


def _suggest(word: str, candidates: Iterable[str], quote: bool = True) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or nothing."""
    close = suggest(word, candidates)
    if close is None:
        return ""
    return f" (did you mean {close!r}?)" if quote else f" (did you mean {close}?)"


def _check_key(key: str, source: str) -> None:
    if key not in FIELDS:
        raise ConfigError(f"unknown key {key!r} in {source}{_suggest(key, FIELDS)}")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


@attrs.define
class _Layers:
    """Values from the file, the environment and the flags, where each came from,
    and every problem found on the way (rather than only the first)."""

    values: dict[str, Any] = attrs.Factory(dict)
    sources: dict[str, str] = attrs.Factory(dict)
    problems: list[str] = attrs.Factory(list)

    @classmethod
    def gather(
        cls, path: str | Path | None, env: Mapping[str, str], overrides: Mapping[str, Any]
    ) -> _Layers:
        layers = cls()
        path = path or env.get(ENV_PREFIX + "CONFIG")
        if path:
            try:
                data = _read_toml(Path(path))
            except ConfigError as exc:
                layers.problems.append(str(exc))
                data = {}
            for key, value in data.items():
                if key == "proxy":
                    layers.set_proxy_table(value, str(path))
                else:
                    layers.set(key, value, f"{path}: {key}", str(path), text=False)
        for name, text in sorted(env.items()):
            key = name[len(ENV_PREFIX) :].lower()
            if name.startswith(ENV_PREFIX) and name not in OTHER_VARIABLES and key in FIELDS:
                layers.set(key, text, name, "environment")
        for key, value in overrides.items():
            layers.set(key, value, _flag(key), "command line")
        return layers

    def set(self, key: str, value: Any, label: str, where: str, *, text: bool = True) -> None:
        """Record a value; ``text`` (environment, flags) is parsed by the key's type,
        while TOML values have types of their own."""
        try:
            _check_key(key, where)
            parse = text and isinstance(value, str)
            self.values[key] = _parse_text(key, value) if parse else value
            self.sources[key] = label
        except ConfigError as exc:
            self.problems.append(str(exc) if key not in FIELDS else f"{label}: {exc}")

    def set_proxy_table(self, table: Any, path: str) -> None:
        """A file's ``[proxy]`` table: its keys are the ``proxy_*`` settings."""
        if not isinstance(table, dict):
            self.problems.append(f"{path}: proxy: expected a table ([proxy])")
            return
        for key, value in table.items():
            if key not in PROXY_KEYS:
                hint = _suggest(str(key), PROXY_KEYS)
                self.problems.append(f"{path}: unknown key {key!r} in [proxy]{hint}")
                continue
            self.set(f"proxy_{key}", value, f"{path}: proxy.{key}", path, text=False)

    def build(self) -> Config | None:
        """The config, or None with the problems recorded.

        Built from the values that parsed even when some did not, so that one
        run reports the problems of every layer.
        """
        try:
            config = structure(self.values, self.sources)
        except ConfigError as exc:
            self.problems.extend(self._attribute(problem) for problem in exc.problems)
            return None
        return None if self.problems else config

    def _attribute(self, problem: str) -> str:
        """``port must be ... (TIDINGS_PORT)``: a rule broken says who set the value."""
        key = re.split(r"[ .:\[]", problem, maxsplit=1)[0]
        source = self.sources.get(key)
        if source is None or problem.startswith(source):
            return problem
        return f"{problem} (from {source.split(': ')[0]})"


def choices(key: str) -> tuple[str, ...]:
    """The allowed values of a key with a fixed set of them (for ``--help``)."""
    return _choices(FIELDS[key].type)


def _public_key_problem(value: str) -> str | None:
    """Why ``jwt_public_key`` (PEM text or a file) cannot verify RS256 tokens, if it cannot."""
    # Imported here: only nodes with a public key pay for loading cryptography.
    from cryptography.exceptions import UnsupportedAlgorithm  # noqa: PLC0415
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415

    if value.lstrip().startswith("-----BEGIN"):
        data, what = value.encode(), "the PEM text"
    else:
        try:
            data = Path(value).read_bytes()
        except OSError:
            return f"jwt_public_key is neither a PEM key nor a readable file: {value[:200]!r}"
        what = f"the file {value}"
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return (
            f"jwt_public_key: {what} is not a PEM public key"
            " (-----BEGIN PUBLIC KEY----- ... -----END PUBLIC KEY-----)"
        )
    if not isinstance(key, rsa.RSAPublicKey):
        return f"jwt_public_key: {what} is not an RSA key (RS256 verifies with RSA keys)"
    return None


# --- checking, showing, starting a file ------------------------------------------------


@attrs.frozen
class Report:
    """What ``tidings config check`` found: the config if it is valid, errors, warnings."""

    config: Config | None
    errors: tuple[str, ...]
    warnings: tuple[str, ...]


def check(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Report:
    """Validate file + environment + overrides as :meth:`Config.load` does, collecting
    every problem; unknown ``TIDINGS_*`` variables are errors here (warnings at start)."""
    env = os.environ if env is None else env
    layers = _Layers.gather(path, env, overrides or {})
    config = layers.build()
    errors = [*layers.problems, *unknown_environment(env)]
    if errors:
        return Report(None, tuple(errors), ())
    assert config is not None
    return Report(config, (), tuple(warnings(config)))


def unknown_environment(env: Mapping[str, str]) -> list[str]:
    """A line for each ``TIDINGS_*`` variable that is no setting, with a suggestion."""
    known = [_env_name(key) for key in FIELDS] + list(OTHER_VARIABLES)
    return [
        f"unknown environment variable {name}{_suggest(name, known, quote=False)}"
        for name in sorted(env)
        if name.startswith(ENV_PREFIX) and name not in known
    ]


#: Shortest secrets not worth a warning (bytes): HS256 keys as RFC 7518 asks,
#: shared tokens long enough not to be guessed.
MIN_JWT_SECRET = 32
MIN_TOKEN = 16


def warnings(config: Config) -> list[str]:
    """What is valid but probably not meant: weak secrets, settings that take no effect."""
    found = []
    if config.jwt_secret and len(config.jwt_secret.encode()) < MIN_JWT_SECRET:
        size = len(config.jwt_secret.encode())
        found.append(
            f"jwt_secret is {size} bytes: HS256 wants {MIN_JWT_SECRET} or more"
            " (e.g. the output of: openssl rand -hex 32)"
        )
    for name in ("token", "api_key"):
        value = getattr(config, name)
        if value and len(value) < MIN_TOKEN:
            found.append(f"{name} is {len(value)} characters: use {MIN_TOKEN} or more")
    mode = config.auth_mode
    if config.token and mode != "token":
        found.append(f"token is set but ignored: client authentication is {mode}")
    if (config.jwt_secret or config.jwt_public_key) and mode != "jwt":
        found.append(f"the JWT keys are set but ignored: client authentication is {mode}")
    if mode == "none" and not config.proxy_connect and not _is_loopback(config.host):
        found.append(f"auth none on {config.host}: anyone who reaches the port may connect")
    if config.proxy_connect and config.proxy_timeout >= config.handshake_timeout:
        found.append(
            "proxy_timeout is not below handshake_timeout: a connect hook that slow ends"
            " the upgrade with no answer"
        )
    if config.proxy_rpc and config.proxy_timeout >= config.request_timeout:
        found.append(
            "proxy_timeout is not below request_timeout: an rpc hook that slow is"
            " answered request_timeout"
        )
    if config.proxy_cache_ttl and not config.proxy_subscribe:
        found.append("proxy_cache_ttl is set but takes no effect: it keeps proxy_subscribe answers")
    return found


def format_duration(seconds: float) -> str:
    """Seconds as the docs write them: ``30s``, ``500ms``, ``1h``."""
    if seconds and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    millis = seconds * 1000
    if seconds < 1 and abs(millis - round(millis)) < 1e-9:
        return f"{round(millis)}ms"
    return f"{seconds!r}s"


def format_size(size: int) -> str:
    """Bytes as the docs write them: ``512KiB``, ``1MiB``, or a plain number."""
    for unit in ("GiB", "MiB", "KiB"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return str(size)


def _toml_value(value: Any, kind: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if kind is Seconds or kind == Seconds | None:
        text = format_duration(value)
        return json.dumps(text) if parse_duration(text) == value else repr(float(value))
    if kind is Bytes or kind == Bytes | None:
        text = format_size(value)
        return json.dumps(text) if text != str(value) else text
    if isinstance(value, int):
        return str(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(item, str) for item in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


def _comment(text: str) -> list[str]:
    words, lines, line = text.split(), [], "#"
    for word in words:
        if len(line) + len(word) > 88:
            lines.append(line)
            line = "#"
        line += " " + word
    return [*lines, line]


_NAMESPACE_EXAMPLE = """\
# [namespaces.chat]    # topics chat:..., e.g. chat:lobby
# presence = true
# join_leave = true
# history_ttl = "1h"
"""


def _toml_key(config: Config, name: str, key: str, *, redact: bool) -> list[str]:
    """One setting as commented TOML lines, written as ``key`` (a table's keys are short)."""
    field = FIELDS[name]
    value = getattr(config, name)
    lines = _comment(field.metadata.get("help", name))
    if value is None:
        lines.append(f"# {key} =    (unset)")
    elif redact and name in SECRETS:
        lines.append(f"{key} = {json.dumps(REDACTED)}    # set; not shown")
    elif redact and name.startswith("proxy_") and isinstance(value, str):
        lines.append(f"{key} = {_toml_value(redact_url(value), field.type)}")
    else:
        lines.append(f"{key} = {_toml_value(value, field.type)}")
    lines.append("")
    return lines


def to_toml(config: Config, *, redact: bool = True, title: str = "") -> str:
    """``config`` as a commented TOML file that loads back to the same config.

    Unset keys are commented out (``# token =``); with ``redact``, secrets that
    are set read ``"***"``, which the loader refuses, so a copy cannot start a
    node with a placeholder for a credential.
    """
    lines = [f"# {title or 'tidings configuration'} (tidings {__version__}, "
             f"{time.strftime('%Y-%m-%d')})",
             "# Every key: docs/configuration.md. Durations: 500ms, 30s, 2m, 1h;"
             " sizes: 512KiB, 1MiB.", ""]  # fmt: skip
    for name in FIELDS:
        if name == "namespaces" or name.startswith("proxy_"):
            continue  # tables come last: a key after one would belong to it
        lines.extend(_toml_key(config, name, name, redact=redact))
    lines.append("# The application's hooks (docs/proxy.md); TIDINGS_PROXY_<KEY> in the env.")
    lines.append("[proxy]")
    for key in PROXY_KEYS:
        lines.extend(_toml_key(config, f"proxy_{key}", key, redact=redact))
    lines.extend(_comment(FIELDS["namespaces"].metadata.get("help", "namespaces")))
    if not config.namespaces:
        lines.append(_NAMESPACE_EXAMPLE)
    for table_name, table in config.namespaces.items():
        bare = re.fullmatch(r"[A-Za-z0-9_-]+", table_name)
        lines.append(f"[namespaces.{table_name if bare else json.dumps(table_name)}]")
        for key, field in _NAMESPACE_FIELDS.items():
            value = getattr(table, key)
            if value is None or (key == "topics" and not value):
                continue
            lines.append(f"{key} = {_toml_value(value, field.type)}")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"
