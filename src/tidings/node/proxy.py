"""The application's hooks over HTTP: Centrifugo's proxy, for every tidings client.

A node configured with ``[proxy]`` URLs POSTs a JSON body to the application
when a client connects without a token (``connect``), subscribes
(``subscribe``), publishes (``publish``), sends a request no in-process
handler answers (``rpc``), or holds a session about to expire (``refresh``),
and does what the answer says. The bodies and answers follow Centrifugo's
proxy (``{"result": ...}``, ``{"error": {"code", "message", "temporary"}}``,
``{"disconnect": {"code", "reason"}}``), so its backends work unchanged;
``docs/proxy.md`` has every field.

What the backend costs the node is bounded: one pooled HTTP client per node,
at most ``proxy_max_in_flight`` calls at once (more wait for a slot), each
call, waiting included, within ``proxy_timeout``, and at most
``proxy_max_response_size`` bytes of answer read. A backend that is down,
slow or answers nonsense is the node's ``unavailable`` error (temporary) for
the one client whose command needed it, or, with ``proxy_unavailable =
"allow"``, as if the hook were not configured. Subscribe answers may be kept
per (tenant, user, topic) for ``proxy_cache_ttl`` seconds, at most
``proxy_cache_size`` of them.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import httpx
import orjson
import trio

from .._version import __version__
from ..app import ClientInfo
from ..auth import ALLOW_ALL, Identity
from ..config import PROXY_HOOKS, Config
from ..connection.hooks import HookOrigin, Refreshed, forwarded_headers
from ..errors import ProxyDisconnect, ProxyError
from ..protocol.codes import ErrorCode
from ..protocol.topics import TopicFilter, topic_problem
from ..transport.base import UpgradeRequest

LOGGER = logging.getLogger("tidings.proxy")

#: What a call to a hook ended in (the labels of ``tidings_proxy_calls_total``).
OUTCOMES: Final = ("allowed", "refused", "disconnected", "unavailable", "cached")
#: One log line per hook per interval while its backend fails, not one per call.
LOG_INTERVAL: Final = 10.0
#: Bounds on what a backend may hand the node to keep.
MAX_USER: Final = 1024
MAX_TENANT: Final = 128
MAX_CODE: Final = 64
MAX_MESSAGE: Final = 512
#: A result's close code must be one a WebSocket peer may be sent, not one of the protocol's.
CLOSE_CODES: Final = range(3000, 5000)
#: Seconds an idle connection to the backend is kept for the next call.
KEEPALIVE: Final = 2.0
#: A call that ends so, with no answer, may have met a connection the backend closed.
_STALE: Final = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
_ABSENT: Final = object()


class Unavailable(ProxyError):
    """The backend was down, slow, or answered nonsense: nothing was decided."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, message, temporary=True)


class _Garbage(Exception):
    """An answer the node cannot read as a hook's answer."""


class AnswerCache:
    """Subscribe answers by (tenant, user, topic): kept ``ttl`` seconds, ``size`` at most.

    Only answers that decided something are kept (an allowance, a refusal that
    is not temporary); the oldest go first when it is full.
    """

    def __init__(self, size: int, ttl: float) -> None:
        self.size = size
        self.ttl = ttl
        self._entries: OrderedDict[tuple[str, str, str], tuple[float, ProxyError | None]] = (
            OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def get(self, key: tuple[str, str, str]) -> tuple[bool, ProxyError | None]:
        """``(found, refusal)``: a refusal, or None for an allowance."""
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        if entry[0] <= trio.current_time():
            del self._entries[key]
            return False, None
        return True, entry[1]

    def put(self, key: tuple[str, str, str], refusal: ProxyError | None) -> None:
        self._entries.pop(key, None)
        self._entries[key] = (trio.current_time() + self.ttl, refusal)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


class Proxy:
    """The hooks of one node (:class:`tidings.connection.hooks.Hooks`, and connect).

    Created with the node and run with it (:meth:`running`), which holds the
    pooled HTTP client.
    """

    def __init__(self, config: Config) -> None:
        self.urls: dict[str, str | None] = {
            hook: getattr(config, f"proxy_{hook}") for hook in PROXY_HOOKS
        }
        self.timeout = config.proxy_timeout
        self.forward = config.proxy_forward_headers
        self.max_response_size = config.proxy_max_response_size
        self.max_in_flight = config.proxy_max_in_flight
        self.allow_when_unavailable = config.proxy_unavailable == "allow"
        self.default_tenant = config.default_tenant
        self.cache = AnswerCache(config.proxy_cache_size, config.proxy_cache_ttl)
        self.calls: dict[tuple[str, str], int] = {}
        """Calls by (hook, outcome), for the metrics."""
        self.in_flight = 0
        """Calls the backend holds now."""
        self.waiting = 0
        """Calls waiting for one of the ``proxy_max_in_flight`` slots."""
        self._slots = trio.Semaphore(config.proxy_max_in_flight)
        self._client: httpx.AsyncClient | None = None
        self._failures: dict[str, tuple[float, int]] = {}  # hook -> (last logged, since)

    # --- which hooks (the Hooks protocol) -------------------------------------------

    @property
    def connects(self) -> bool:
        return self.urls["connect"] is not None

    @property
    def subscribes(self) -> bool:
        return self.urls["subscribe"] is not None

    @property
    def publishes(self) -> bool:
        return self.urls["publish"] is not None

    @property
    def answers(self) -> bool:
        return self.urls["rpc"] is not None

    @property
    def refreshes(self) -> bool:
        return self.urls["refresh"] is not None

    @property
    def after_upgrade(self) -> bool:
        """Whether any hook is asked after the upgrade (the connect hook alone is not)."""
        return self.subscribes or self.publishes or self.answers or self.refreshes

    @property
    def refresh_lead(self) -> float:
        # Time for two calls before the expiry: one slow call does not end a session.
        return 2 * self.timeout

    @property
    def refresh_retry(self) -> float:
        return max(self.timeout / 2, 0.1)

    # --- running ----------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Hold the node's HTTP client (one connection pool) for the block."""
        limits = httpx.Limits(
            max_connections=self.max_in_flight,
            max_keepalive_connections=self.max_in_flight,
            # Idle connections go before the common servers' own idle timeouts
            # (5 s for uvicorn and hypercorn), so that few are closed under a call.
            keepalive_expiry=KEEPALIVE,
        )
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout),
            limits=limits,
            # The backend is where the URL says: no proxy from the environment.
            trust_env=False,
            follow_redirects=False,
            headers={"user-agent": f"tidings/{__version__}"},
        ) as client:
            self._client = client
            try:
                yield
            finally:
                self._client = None

    def origin(self, request: UpgradeRequest, transport: str = "websocket") -> HookOrigin:
        """What hook calls pass on of a client's upgrade request."""
        headers = forwarded_headers(request.headers, self.forward)
        return HookOrigin(transport, request.query, headers)

    # --- the hooks ---------------------------------------------------------------------

    async def connect(
        self,
        client: ClientInfo,
        origin: HookOrigin,
        *,
        data: Any = _ABSENT,
        name: str | None = None,
        version: str | None = None,
    ) -> Identity:
        """Who the client is, as the connect hook says.

        Raises:
            ProxyError: refused (``unavailable`` when the backend could not say).
            ProxyDisconnect: the backend asked to close the connection.
        """
        body = _common(client, origin, identified=False)
        if name:
            body["name"] = name
        if version:
            body["version"] = version
        if data is not _ABSENT:
            body["data"] = data
        identity: Identity = await self._call("connect", body, origin, self._identity)
        return identity

    async def subscribe(
        self, client: ClientInfo, origin: HookOrigin, topic: str, data: Any = None
    ) -> None:
        """Return if the subscribe hook allows it (or a kept answer did)."""
        key: tuple[str, str, str] | None = None
        # Only a known user's answers are kept: anonymous clients may differ in
        # what their cookies say, and so may the answers for them.
        if self.cache.enabled and client.user and data is None:
            key = (client.tenant, client.user, topic)
            found, refusal = self.cache.get(key)
            if found:
                self._count("subscribe", "cached")
                if refusal is not None:
                    raise ProxyError(refusal.code, refusal.message, temporary=False)
                return
        body = _common(client, origin)
        body["channel"] = topic
        if data is not None:
            body["data"] = data
        try:
            await self._call("subscribe", body, origin)
        except Unavailable:
            if self.allow_when_unavailable:
                return
            raise
        except ProxyError as exc:
            if key is not None and not exc.temporary:
                self.cache.put(key, exc)
            raise
        if key is not None:
            self.cache.put(key, None)

    async def publish(
        self, client: ClientInfo, origin: HookOrigin, topic: str, payload: Any
    ) -> Any:
        """The payload to publish: the client's, or the hook's ``data`` in its place."""
        body = _common(client, origin)
        body["channel"] = topic
        body["data"] = payload
        try:
            result = await self._call("publish", body, origin)
        except Unavailable:
            if self.allow_when_unavailable:
                return payload
            raise
        replaced = result.get("data")
        return payload if replaced is None else replaced

    async def rpc(self, client: ClientInfo, origin: HookOrigin, method: str, data: Any) -> Any:
        """The rpc hook's ``data``: the answer to a request (there is nothing to allow)."""
        body = _common(client, origin)
        body["method"] = method
        body["data"] = data
        result = await self._call("rpc", body, origin)
        return result.get("data")

    async def refresh(self, client: ClientInfo, origin: HookOrigin) -> Refreshed:
        """The session's new expiry, as the refresh hook says.

        An ``error`` answer has no client to go to (as in Centrifugo): like a
        backend that is down, it is asked again until the session expires.
        """
        try:
            refreshed: Refreshed = await self._call(
                "refresh", _common(client, origin), origin, _refreshed
            )
        except Unavailable:
            if self.allow_when_unavailable:
                # Kept alive while the backend is away: asked again shortly.
                return Refreshed(time.time() + self.refresh_lead + self.refresh_retry)
            raise
        except ProxyError as exc:
            raise Unavailable(f"the refresh hook answered an error: {exc.message}") from None
        return refreshed

    # --- one call -----------------------------------------------------------------------

    async def _call(
        self,
        hook: str,
        body: dict[str, Any],
        origin: HookOrigin,
        read: Callable[[dict[str, Any]], Any] | None = None,
    ) -> Any:
        """The ``result`` of the hook's answer (as ``read`` makes it, if given).

        Raises:
            ProxyError: the backend refused (its ``error``), or ``unavailable``.
            ProxyDisconnect: the backend asked to close the connection.
            TypeError: the body holds what JSON cannot carry (a client's payload).
        """
        url = self.urls[hook]
        assert url is not None
        content = orjson.dumps(body)
        # As bytes, as they came: header values may hold any byte but control ones
        # (obs-text), which httpx would refuse to encode from str.
        headers = [(name.encode(), value.encode("latin-1")) for name, value in origin.headers]
        headers.append((b"content-type", b"application/json"))
        # Read as sent: a compressed answer could grow past any bound as it is inflated.
        headers.append((b"accept-encoding", b"identity"))
        if self._client is None:
            raise self._unavailable(hook, "the node is not running")
        try:
            with trio.fail_after(self.timeout):
                try:
                    raw = await self._post(url, content, headers)
                except _STALE:
                    if hook == "rpc":
                        raise  # an rpc may do something: asking twice is for the client to decide
                    # Most likely a kept-alive connection the backend had closed
                    # meanwhile (its idle timeout, or an answer sent before it read
                    # the body): once more, on a new connection, within the timeout.
                    raw = await self._post(url, content, headers)
        except trio.TooSlowError:
            raise self._unavailable(hook, f"no answer within {self.timeout:g} s") from None
        except _Garbage as exc:
            raise self._unavailable(hook, f"its answer {exc}") from None
        except (httpx.HTTPError, OSError) as exc:
            raise self._unavailable(hook, _describe(exc)) from None
        try:
            result = _result(raw)
            if read is not None:
                result = read(result)
        except _Garbage as exc:
            raise self._unavailable(hook, f"its answer {exc}") from None
        except ProxyDisconnect:
            self._count(hook, "disconnected")
            raise
        except ProxyError:
            self._count(hook, "refused")
            raise
        self._count(hook, "allowed")
        return result

    async def _post(self, url: str, content: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
        """POST to the backend within a slot; the answer's body, read up to the cap."""
        client = self._client
        assert client is not None
        self.waiting += 1
        waiting = True
        try:
            async with self._slots:
                self.waiting -= 1
                waiting = False
                self.in_flight += 1
                try:
                    async with client.stream("POST", url, content=content, headers=headers) as r:
                        return await self._read(r)
                finally:
                    self.in_flight -= 1
        finally:
            if waiting:
                self.waiting -= 1

    async def _read(self, response: httpx.Response) -> bytes:
        if response.status_code != 200:
            raise _Garbage(f"was HTTP {response.status_code}, not 200")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise _Garbage(f"was compressed ({encoding[:32]}) though identity was asked for")
        cap = self.max_response_size
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > cap:
            raise _Garbage(f"is longer than proxy_max_response_size ({cap} bytes)")
        body = bytearray()
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > cap:
                # Not read any further: leaving the block drops the connection.
                raise _Garbage(f"is longer than proxy_max_response_size ({cap} bytes)")
        return bytes(body)

    # --- answers ------------------------------------------------------------------------

    def _identity(self, result: dict[str, Any]) -> Identity:
        user = result.get("user", _ABSENT)
        if not isinstance(user, str) or len(user) > MAX_USER:
            raise _Garbage(f"has no user (a string of at most {MAX_USER} characters)")
        tenant = result.get("tenant")
        if tenant is None:
            tenant = self.default_tenant
        elif not isinstance(tenant, str) or topic_problem(tenant) or len(tenant) > MAX_TENANT:
            raise _Garbage(f"has a tenant that is not a name of at most {MAX_TENANT} characters")
        expires_at = _expiry(result)
        if expires_at is not None and expires_at <= time.time():
            raise _Garbage("has an expire_at in the past")
        return Identity(
            tenant=tenant,
            user=user or None,
            expires_at=expires_at,
            subscribe=_patterns(result, "topics") or ALLOW_ALL,
            publish=_patterns(result, "publish"),
            # Vouched for by the application: publishes as a token's holder would.
            authenticated=True,
        )

    def _unavailable(self, hook: str, reason: str) -> Unavailable:
        self._count(hook, "unavailable")
        now = time.monotonic()
        logged, since = self._failures.get(hook, (-math.inf, 0))
        since += 1
        if now - logged >= LOG_INTERVAL:
            LOGGER.warning(
                "the %s hook's backend is unavailable: %s (%d calls since the last report)",
                hook,
                reason,
                since,
                extra={"event": "proxy_unavailable", "hook": hook, "reason": reason},
            )
            logged, since = now, 0
        self._failures[hook] = (logged, since)
        return Unavailable(f"the application's {hook} hook is unavailable; try again later")

    def _count(self, hook: str, outcome: str) -> None:
        key = (hook, outcome)
        self.calls[key] = self.calls.get(key, 0) + 1


def _common(client: ClientInfo, origin: HookOrigin, *, identified: bool = True) -> dict[str, Any]:
    """The fields of every hook's body (Centrifugo's first, then tidings' own)."""
    body: dict[str, Any] = {
        "client": client.id,
        "transport": origin.transport,
        "protocol": "json",
        "encoding": "json",
    }
    if identified:
        body["user"] = client.user or ""
        body["tenant"] = client.tenant
    body["remote"] = client.remote
    body["dialect"] = client.dialect
    body["path"] = client.path
    body["query"] = origin.query
    body["headers"] = dict(origin.headers)
    return body


def _result(raw: bytes) -> dict[str, Any]:
    """The ``result`` object of an answer, or the refusal it holds, raised."""
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _Garbage("is not JSON") from None
    if not isinstance(answer, dict):
        raise _Garbage("is not a JSON object")
    disconnect = answer.get("disconnect")
    if disconnect is not None:
        if not isinstance(disconnect, dict):
            raise _Garbage("has a disconnect that is not an object")
        code = disconnect.get("code")
        if not isinstance(code, int) or isinstance(code, bool) or code not in CLOSE_CODES:
            raise _Garbage("has a disconnect code outside 3000-4999")
        reason = disconnect.get("reason", "")
        if not isinstance(reason, str):
            raise _Garbage("has a disconnect reason that is not a string")
        raise ProxyDisconnect(code, reason)
    error = answer.get("error")
    if error is not None:
        if not isinstance(error, dict):
            raise _Garbage("has an error that is not an object")
        code = error.get("code")
        if isinstance(code, int) and not isinstance(code, bool) and 0 <= code < 2**32:
            code = str(code)
        elif not (isinstance(code, str) and 0 < len(code) <= MAX_CODE and code.isprintable()):
            raise _Garbage("has an error code that is neither a number nor a short string")
        message = error.get("message", "")
        if not isinstance(message, str):
            raise _Garbage("has an error message that is not a string")
        temporary = _optional_bool(error, "temporary")
        raise ProxyError(code, message[:MAX_MESSAGE], temporary=temporary)
    result = answer.get("result")
    if not isinstance(result, dict):
        raise _Garbage("has no result, error or disconnect object")
    return result


def _refreshed(result: dict[str, Any]) -> Refreshed:
    expired = _optional_bool(result, "expired")
    expires_at = _expiry(result)
    if expired or (expires_at is not None and expires_at <= time.time()):
        return Refreshed(None, expired=True)
    return Refreshed(expires_at)


def _optional_bool(holder: dict[str, Any], name: str) -> bool:
    value = holder.get(name, False)
    if not isinstance(value, bool):
        raise _Garbage(f"has a {name} that is not true or false")
    return value


def _expiry(result: dict[str, Any]) -> float | None:
    """``expire_at`` (seconds since the epoch; 0 or absent: no expiry)."""
    value = result.get("expire_at", 0)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 2**53:
        raise _Garbage("has an expire_at that is not a time in seconds")
    return float(value) or None


def _patterns(result: dict[str, Any], name: str) -> TopicFilter | None:
    value = result.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _Garbage(f"has {name} that is not a list of topic patterns")
    return TopicFilter(value, empty_allows_all=False)


def _describe(exc: BaseException) -> str:
    """What went wrong talking to the backend, in a few words (no URL, no body)."""
    if isinstance(exc, httpx.ConnectError):
        return "cannot connect"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "broke HTTP"
    return type(exc).__name__
