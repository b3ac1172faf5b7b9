"""The console's own routes: its page and assets, login, logout and the session.

Everything the console shows or does goes through the HTTP API (``/api/``),
authenticated by the session cookie this module sets plus the session's CSRF
token in a header (:meth:`Console.authorize`). Nothing here reads the node's
state: the page is static, and the data comes from documented endpoints.
"""

from __future__ import annotations

import hashlib
import hmac
from importlib import resources
from typing import Any, Final

import orjson

from ..._version import __version__
from ...errors import HttpError
from ...node.server import Server
from ...protocol.clock import rfc3339_now
from ...transport.asgi import Receive, Scope, Send
from ..openapi import CSRF_HEADER, SESSION_COOKIE
from ..responses import Headers, error_body, header, read_body, send_bytes
from .sessions import ConsoleSession, SessionKeys

#: Content types of the files the console ships, by extension.
CONTENT_TYPES: Final = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".txt": b"text/plain; charset=utf-8",
}
#: The page runs only its own scripts and styles, talks only to its own node, and
#: cannot be framed: an injected payload or user name can never become code.
CONTENT_SECURITY_POLICY: Final = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    b"connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS: Final[Headers] = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
#: Static files: the browser asks again each time (no-cache) and gets 304 while
#: the ETag matches, so a new version is picked up at once.
ASSET_CACHE: Final = b"no-cache"

#: What a browser says about where a request came from (``Sec-Fetch-Site``):
#: the console's calls come from its own page, or from the address bar.
_SAME_ORIGIN: Final = frozenset({"same-origin", "none"})


class Asset:
    """One file of the console, read once."""

    __slots__ = ("content_type", "data", "etag")

    def __init__(self, data: bytes, content_type: bytes) -> None:
        self.data = data
        self.content_type = content_type
        self.etag = b'"' + hashlib.sha256(data).hexdigest()[:32].encode() + b'"'


def load_assets() -> dict[str, Asset]:
    """The files under ``assets/`` that the console serves, by name."""
    assets: dict[str, Asset] = {}
    for item in (resources.files(__package__) / "assets").iterdir():
        suffix = "." + item.name.rpartition(".")[2]
        if item.is_file() and suffix in CONTENT_TYPES:
            assets[item.name] = Asset(item.read_bytes(), CONTENT_TYPES[suffix])
    return assets


class Console:
    """The web console at ``path``: served only when the node has an API key."""

    def __init__(self, server: Server, path: str) -> None:
        self.server = server
        self.path = path
        key = server.config.api_key
        self.keys = SessionKeys(key, server.config.console_session_ttl) if key else None
        """None while the console is off (no ``api_key``)."""
        self.assets = load_assets()
        server.answer("console.revoke", self._revoke)

    @property
    def enabled(self) -> bool:
        """Whether the console serves: only with an API key, whatever the address."""
        return self.keys is not None

    def owns(self, path: str) -> bool:
        """Whether ``path`` is the console's."""
        return path == self.path or path.startswith(self.path + "/")

    # --- the API's side ------------------------------------------------------------

    def has_session(self, scope: Scope) -> bool:
        """Whether the request carries a console session cookie (valid or not)."""
        return self.enabled and _cookie(scope, SESSION_COOKIE) is not None

    def authorize(self, scope: Scope) -> ConsoleSession:
        """Check an API call made with the session cookie: the session and its CSRF token.

        Raises:
            HttpError: 401 ``unauthorized`` (no valid session), 403 ``csrf_failed``.
        """
        _same_origin(scope)
        session = self._session(scope)
        assert self.keys is not None  # _session raised otherwise
        if not self.keys.csrf_matches(session, header(scope, CSRF_HEADER.lower().encode())):
            raise HttpError(
                403, "csrf_failed", f"a call with the console's session needs its {CSRF_HEADER}"
            )
        return session

    # --- the console's routes ------------------------------------------------------

    async def __call__(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        method = str(scope.get("method", "GET"))  # HEAD's body is dropped by the routes
        root = str(scope.get("root_path", ""))
        if not self.enabled:
            await _json(
                send,
                403,
                error_body(
                    "console_disabled",
                    "the console is off: it is served only when api_key is configured",
                ),
            )
            return
        name = path[len(self.path) + 1 :] if path != self.path else None
        try:
            if name is None or name == "":
                if not _allowed(method, ("GET", "HEAD")):
                    raise _method_not_allowed("GET")
                if name is None:  # relative links in the page need the slash
                    location = f"{root}{self.path}/".encode()
                    await send_bytes(send, 308, b"", b"text/plain", [(b"location", location)])
                    return
                await self._asset("index.html", scope, send)
            elif name == "login":
                if not _allowed(method, ("POST",)):
                    raise _method_not_allowed("POST")
                await self._login(scope, receive, send)
            elif name == "logout":
                if not _allowed(method, ("POST",)):
                    raise _method_not_allowed("POST")
                session = self.authorize(scope)
                await self.server.ask(
                    "console.revoke", {"nonce": session.nonce, "expires": session.expires}
                )
                await _json(send, 200, {"loggedOut": True}, [_clear_cookie(scope)])
            elif name == "session":
                if not _allowed(method, ("GET", "HEAD")):
                    raise _method_not_allowed("GET")
                # Logged out is an answer, not an error: the page asks on every load.
                found = self.keys.check(_cookie(scope, SESSION_COOKIE)) if self.keys else None
                answer = self._describe(found, root) if found else {"loggedIn": False}
                await _json(send, 200, answer)
            elif name in self.assets and name != "index.html":
                if not _allowed(method, ("GET", "HEAD")):
                    raise _method_not_allowed("GET")
                await self._asset(name, scope, send)
            else:
                raise HttpError(404, "not_found", f"no console file {name[:100]!r}")
        except HttpError as exc:
            extra = [(b"allow", exc.allow.encode())] if isinstance(exc, _MethodNotAllowed) else []
            await _json(send, exc.status, error_body(exc.code, exc.message), extra)

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.keys is not None
        _same_origin(scope)
        body = await read_body(receive)
        try:
            given = orjson.loads(body or b"{}").get("key")
        except (orjson.JSONDecodeError, AttributeError):
            raise HttpError(400, "invalid_json", 'the body is {"key": "..."}') from None
        key = self.server.config.api_key or ""
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), key.encode()):
            raise HttpError(401, "unauthorized", "wrong API key")
        session = self.keys.issue()
        cookie = _session_cookie(scope, session.token, int(self.keys.ttl))
        root = str(scope.get("root_path", ""))
        await _json(send, 200, self._describe(session, root), [cookie])

    def _session(self, scope: Scope) -> ConsoleSession:
        if self.keys is None:
            raise HttpError(401, "unauthorized", "the console is off")
        session = self.keys.check(_cookie(scope, SESSION_COOKIE))
        if session is None:
            raise HttpError(401, "unauthorized", "not logged in, or the session has expired")
        return session

    def _describe(self, session: ConsoleSession, root: str) -> dict[str, Any]:
        """What the page needs to know of its session and its node."""
        return {
            "loggedIn": True,
            "csrf": session.csrf,
            "csrfHeader": CSRF_HEADER,
            "expires": rfc3339_now(session.expires),
            "api": f"{root}/api/",
            "node": self.server.node_id,
            "version": __version__,
            "clustered": self.server.backplane is not None,
        }

    async def _asset(self, name: str, scope: Scope, send: Send) -> None:
        asset = self.assets.get(name)
        if asset is None:  # pragma: no cover - a wheel built without its assets
            raise HttpError(404, "not_found", f"the console's {name} is missing")
        headers = [(b"etag", asset.etag), *SECURITY_HEADERS]
        status = 304 if header(scope, b"if-none-match") == asset.etag.decode() else 200
        await send_bytes(send, status, asset.data, asset.content_type, headers, cache=ASSET_CACHE)

    def _revoke(self, body: dict[str, Any]) -> bool:
        """This node's part of a logout: refuse the session from now on."""
        nonce, expires = body.get("nonce"), body.get("expires")
        if self.keys is None or not isinstance(nonce, str) or not isinstance(expires, int | float):
            return False
        self.keys.revoke(nonce, float(expires))
        return True


async def _json(send: Send, status: int, body: Any, extra: Headers | None = None) -> None:
    await send_bytes(
        send, status, orjson.dumps(body), b"application/json", [*SECURITY_HEADERS, *(extra or [])]
    )


def _allowed(method: str, allowed: tuple[str, ...]) -> bool:
    return method in allowed


class _MethodNotAllowed(HttpError):
    def __init__(self, allow: str) -> None:
        super().__init__(405, "method_not_allowed", f"use {allow}")
        self.allow = allow


def _method_not_allowed(allow: str) -> HttpError:
    return _MethodNotAllowed(allow)


def _same_origin(scope: Scope) -> None:
    """Refuse a request a browser says another site made (``Sec-Fetch-Site``).

    SameSite=Strict already keeps the cookie off such requests; this also
    covers the login (no cookie yet) and browsers that ignore SameSite.
    Clients that are not browsers send no such header and are not affected.
    """
    site = header(scope, b"sec-fetch-site")
    if site is not None and site not in _SAME_ORIGIN:
        raise HttpError(403, "csrf_failed", "the console accepts calls from its own page only")


def _cookie(scope: Scope, name: str) -> str | None:
    for key, value in scope.get("headers", []):
        if bytes(key).lower() != b"cookie":
            continue
        for part in bytes(value).decode("latin-1").split(";"):
            cookie_name, _, cookie_value = part.strip().partition("=")
            if cookie_name == name:
                return cookie_value.strip('"')
    return None


def _secure(scope: Scope) -> bool:
    """Whether the browser reached us over HTTPS (directly, or through a TLS proxy)."""
    forwarded = (header(scope, b"x-forwarded-proto") or "").split(",")[0].strip().lower()
    return scope.get("scheme") == "https" or forwarded == "https"


def _session_cookie(scope: Scope, token: str, max_age: int) -> tuple[bytes, bytes]:
    # Path=/ because the API the page calls is at /api/, beside the console.
    value = f"{SESSION_COOKIE}={token}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict"
    if _secure(scope):
        value += "; Secure"
    return b"set-cookie", value.encode()


def _clear_cookie(scope: Scope) -> tuple[bytes, bytes]:
    return _session_cookie(scope, "", 0)
