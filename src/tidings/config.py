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

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, NewType, get_args, get_origin

import attrs
import cattrs

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

ENV_PREFIX = "TIDINGS_"


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


@attrs.frozen(kw_only=True)
class NamespaceConfig:
    """One ``[namespaces.NAME]`` table: settings for topics ``NAME:...``.

    Every setting left out is taken from the top level (the default namespace),
    except ``topics``, whose default is to allow every ``NAME:`` topic.
    """

    history_size: int | None = None
    history_ttl: Seconds | None = attrs.field(default=None, converter=_optional_duration)
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


def _namespace_tables(value: Any) -> dict[str, NamespaceConfig]:
    """``Config(namespaces={"chat": {"history_size": 50}})`` as well as NamespaceConfig values."""
    if not isinstance(value, Mapping):
        raise ConfigError("namespaces: expected a table of namespace tables")
    tables: dict[str, NamespaceConfig] = {}
    for name, table in value.items():
        if isinstance(table, NamespaceConfig):
            tables[str(name)] = table
        elif isinstance(table, Mapping):
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
    transport: TransportName = attrs.field(
        default="builtin",
        metadata=_help("server for the port: builtin (h11 + wsproto) or hypercorn (ASGI)"),
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
    max_topics: int = attrs.field(default=100_000, metadata=_help("topics one node holds at most"))
    max_connections: int = attrs.field(
        default=100_000, metadata=_help("WebSocket connections one node accepts at most")
    )
    max_subscriptions: int = attrs.field(
        default=1000, metadata=_help("subscriptions per connection")
    )
    max_pending_requests: int = attrs.field(
        default=16, metadata=_help("requests one connection may have in flight")
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
        default=0, metadata=_help("WebSocket connections from one address; 0 is no limit")
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

    def __attrs_post_init__(self) -> None:
        problems = list(_semantic_problems(self))
        if problems:
            raise ConfigError("; ".join(problems))

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
            publish=self.client_publish,
            presence=self.presence,
            join_leave=self.join_leave,
            overflow_policy=self.overflow_policy,
            outbox_size=self.outbox_size,
            topics=TopicFilter(self.topics),
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
        env = os.environ if env is None else env
        layers: dict[str, Any] = {}
        path = path or env.get(ENV_PREFIX + "CONFIG")
        if path:
            layers.update(_from_toml(Path(path)))
        layers.update(_from_env(env))
        for key, value in (overrides or {}).items():
            _check_key(key, "command line")
            layers[key] = _parse_text(key, value) if isinstance(value, str) else value
        return structure(layers)


attrs.resolve_types(Config)  # the annotations are strings (PEP 563); cattrs needs the types
FIELDS: dict[str, attrs.Attribute[Any]] = {field.name: field for field in attrs.fields(Config)}


def _semantic_problems(config: Config) -> list[str]:
    problems = []
    for name in ("transport", "log_level", "log_format", "auth", "backplane_durability"):
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
        "history_ttl",
        "backplane_timeout",
        "backplane_max_lag",
        "rate_period",
    ):
        if not getattr(config, name) > 0:
            problems.append(f"{name} must be greater than 0")
    for name in ("rate_limit", "rate_burst", "rate_limit_violations", "max_connections_per_ip"):
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
    key = config.jwt_public_key
    if key and not key.lstrip().startswith("-----BEGIN") and not Path(key).is_file():
        problems.append(f"jwt_public_key is neither a PEM key nor a readable file: {key[:200]!r}")
    if config.auth == "jwt" and not (config.jwt_secret or config.jwt_public_key):
        problems.append("auth jwt needs jwt_secret (HS256) or jwt_public_key (RS256)")
    if config.auth == "token" and not config.token:
        problems.append("auth token needs token")
    if config.auth == "auto" and config.auth_mode == "none" and not _is_loopback(config.host):
        problems.append(
            f"listening on {config.host} needs client authentication: set jwt_secret,"
            " jwt_public_key or token, or auth = 'none' to open it on purpose"
        )
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
        raise ConfigError(f"{key}: {text!r} is not a boolean (use true or false)")
    if kind == tuple[str, ...]:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if kind == dict[str, NamespaceConfig]:
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{key}: not valid JSON: {exc}") from None
    return text


_converter = cattrs.Converter(forbid_extra_keys=True)


def _structure_seconds(value: Any, _: Any) -> float:
    return parse_duration(value)


def _structure_bytes(value: Any, _: Any) -> int:
    return parse_size(value)


def _structure_int(value: Any, _: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{value!r} is not an integer")
    return int(value)


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


def structure(values: Mapping[str, Any]) -> Config:
    """A :class:`Config` from a flat mapping of keys to values.

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
        messages = cattrs.transform_error(exc, path="config", format_exception=_describe)
        raise ConfigError("; ".join(_readable(m) for m in messages)) from None


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


def _readable(message: str) -> str:
    # cattrs says "<problem> @ config.port"; lead with the key.
    text, _, where = message.partition(" @ ")
    key = where.removeprefix("config").removeprefix(".") if where else ""
    return f"{key}: {text}" if key else text


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_key(key: str, source: str) -> None:
    if key not in FIELDS:
        close = [name for name in FIELDS if name.startswith(key[:4])]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown key {key!r} in {source}{hint}")


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for key in data:
        _check_key(key, str(path))
    return data


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key in FIELDS:
            values[key] = _parse_text(key, text)
    return values


def choices(key: str) -> tuple[str, ...]:
    """The allowed values of a key with a fixed set of them (for ``--help``)."""
    return _choices(FIELDS[key].type)
