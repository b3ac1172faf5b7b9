"""The console's HTTP side without a browser: the cookie, CSRF, who may see it, its files.

Real sockets to a real node, as a browser (or an attacker's page) would make
the requests; the browser itself is in ``test_console.py``.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from html.parser import HTMLParser
from importlib import resources
from typing import Any

import orjson
import pytest
import trio

from tidings import Config, Server, open_server
from tidings.errors import ConfigError
from tidings.http.console import SessionKeys
from tidings.http.console.sessions import MAX_REVOKED

from .conftest import TEST_TIMEOUT, http_request, running_server, subscribe, ws_client

KEY = "console-http-key-91d2"
COOKIE = "tidings_console"


async def login(
    server: Server, key: str = KEY, headers: str = ""
) -> tuple[int, dict[str, str], Any]:
    status, response_headers, content = await http_request(
        server.port, "POST", "/console/login", orjson.dumps({"key": key}), headers
    )
    return status, response_headers, orjson.loads(content)


async def session_of(server: Server) -> tuple[str, str]:
    """Log in; the session cookie's value and the CSRF token."""
    status, headers, answer = await login(server)
    assert status == 200, answer
    token = re.match(rf"{COOKIE}=([^;]+);", headers["set-cookie"])
    assert token is not None
    return token[1], answer["csrf"]


def forged(cookie: str) -> str:
    """The cookie with its signature's last character changed (never left as it was)."""
    return cookie[:-1] + ("1" if cookie.endswith("0") else "0")


async def api_with(
    server: Server,
    method: str,
    cookie: str | None,
    csrf: str | None,
    extra: str = "",
    body: Any = None,
) -> tuple[int, Any]:
    """``POST /api/<method>`` as the console's page makes it: the cookie and the CSRF header."""
    headers = extra
    if cookie is not None:
        headers += f"Cookie: theme=dark; {COOKIE}={cookie}\r\n"
    if csrf is not None:
        headers += f"X-CSRF-Token: {csrf}\r\n"
    status, _, content = await http_request(
        server.port, "POST", f"/api/{method}", orjson.dumps(body or {}), headers
    )
    return status, orjson.loads(content)


def code(answer: Any) -> str:
    return str(answer["error"]["code"])


# --- the cookie ------------------------------------------------------------------------


async def test_login_sets_an_httponly_samesite_strict_cookie_that_expires() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(api_key=KEY, console_session_ttl="10m") as server:
            status, headers, answer = await login(server)
            assert status == 200
            attributes = [part.strip() for part in headers["set-cookie"].split(";")]
            assert attributes[0].startswith(f"{COOKIE}=v1.")
            assert set(attributes[1:]) == {"Path=/", "Max-Age=600", "HttpOnly", "SameSite=Strict"}
            assert headers["cache-control"] == "no-store"
            assert answer["loggedIn"] is True
            assert (answer["csrfHeader"], answer["api"]) == ("X-CSRF-Token", "/api/")
            assert re.fullmatch(r"[0-9a-f]{64}", answer["csrf"])
            # Behind a TLS proxy the cookie is also Secure (never sent over plain HTTP).
            _, headers, _ = await login(server, headers="X-Forwarded-Proto: https\r\n")
            assert headers["set-cookie"].endswith("; Secure")


async def test_a_wrong_key_gets_401_and_no_cookie() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(api_key=KEY) as server:
            for key in ("wrong", "", KEY + "x", KEY[:-1]):
                status, headers, answer = await login(server, key)
                assert (status, code(answer)) == (401, "unauthorized")
                assert "set-cookie" not in headers
            status, _, _ = await http_request(server.port, "POST", "/console/login", b"not json")
            assert status == 400


async def test_the_session_page_says_whether_the_cookie_is_a_valid_session() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(api_key=KEY, node_id="node-h") as server:
            cookie, csrf = await session_of(server)
            for sent, logged_in in [
                (f"Cookie: {COOKIE}={cookie}\r\n", True),
                ("", False),
                (f"Cookie: {COOKIE}={forged(cookie)}\r\n", False),  # a forged signature
                (f"Cookie: {COOKIE}=v1.9999999999.00.{cookie.rsplit('.', 1)[1]}\r\n", False),
            ]:
                status, _, content = await http_request(
                    server.port, "GET", "/console/session", b"", sent
                )
                answer = orjson.loads(content)
                assert (status, answer["loggedIn"]) == (200, logged_in)
                if logged_in:
                    assert (answer["csrf"], answer["node"]) == (csrf, "node-h")


# --- the API with the cookie -----------------------------------------------------------------


async def test_the_cookie_works_on_the_api_only_with_its_csrf_token() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(api_key=KEY) as server, ws_client(server) as ws:
            await subscribe(ws, "t")
            cookie, csrf = await session_of(server)
            other_cookie, other_csrf = await session_of(server)
            publish = {"topic": "t", "payload": "forged"}
            for sent_csrf, extra in [
                (None, ""),  # a form another site posts: no header it could know
                ("", ""),
                ("0" * 64, ""),
                (other_csrf, ""),  # another session's token
                (csrf, "Sec-Fetch-Site: cross-site\r\n"),
                (csrf, "Sec-Fetch-Site: same-site\r\n"),
            ]:
                status, answer = await api_with(
                    server, "publish", cookie, sent_csrf, extra, publish
                )
                assert (status, code(answer)) == (403, "csrf_failed"), (sent_csrf, extra)
            assert server.statistics().published == 0

            status, answer = await api_with(
                server,
                "publish",
                cookie,
                csrf,
                "Sec-Fetch-Site: same-origin\r\n",
                {"topic": "t", "payload": "from the console"},
            )
            assert (status, answer["seq"]) == (200, 1)
            status, _ = await api_with(server, "info", other_cookie, other_csrf)
            assert status == 200
            # A forged cookie is no session, whatever the header says.
            status, answer = await api_with(server, "info", forged(cookie), csrf)
            assert (status, code(answer)) == (401, "unauthorized")
            # The key, when given, decides alone: a good cookie does not rescue a wrong key.
            status, answer = await api_with(
                server, "info", cookie, csrf, "Authorization: apikey wrong\r\n"
            )
            assert (status, code(answer)) == (401, "unauthorized")


async def test_logout_needs_the_csrf_token_and_ends_the_session() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(api_key=KEY) as server:
            cookie, csrf = await session_of(server)
            sent = f"Cookie: {COOKIE}={cookie}\r\n"
            status, _, content = await http_request(
                server.port, "POST", "/console/logout", b"", sent
            )
            assert (status, code(orjson.loads(content))) == (403, "csrf_failed")
            assert (await api_with(server, "info", cookie, csrf))[0] == 200  # still logged in

            status, headers, content = await http_request(
                server.port, "POST", "/console/logout", b"", sent + f"X-CSRF-Token: {csrf}\r\n"
            )
            assert (status, orjson.loads(content)) == (200, {"loggedOut": True})
            assert headers["set-cookie"].startswith(f"{COOKIE}=; Path=/; Max-Age=0;")
            status, answer = await api_with(server, "info", cookie, csrf)
            assert (status, code(answer)) == (401, "unauthorized")
            _, _, content = await http_request(server.port, "GET", "/console/session", b"", sent)
            assert orjson.loads(content) == {"loggedIn": False}


async def test_a_login_another_site_makes_the_browser_send_is_refused() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(api_key=KEY) as server:
            status, headers, answer = await login(server, headers="Sec-Fetch-Site: cross-site\r\n")
            assert (status, code(answer)) == (403, "csrf_failed")
            assert "set-cookie" not in headers


# --- who may see it ----------------------------------------------------------------------------


async def test_without_an_api_key_the_console_is_refused_not_open() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server:
            for method, path in [
                ("GET", "/console/"),
                ("GET", "/console"),
                ("GET", "/console/console.js"),
                ("GET", "/console/session"),
                ("POST", "/console/login"),
            ]:
                status, _, content = await http_request(server.port, method, path, b"{}")
                assert (status, code(orjson.loads(content))) == (403, "console_disabled"), path
            status, _, content = await http_request(server.port, "GET", "/")
            assert status == 404  # nothing to lead a visitor to
            # Nor does a cookie open the API.
            status, answer = await api_with(server, "info", "v1.1.2.3", "x")
            assert (status, code(answer)) == (403, "api_disabled")


async def asgi_get(server: Server, path: str) -> tuple[int, dict[bytes, bytes]]:
    """One GET through the node's ASGI app, for a node that must not listen (see below)."""
    scope = {"type": "http", "method": "GET", "path": path, "headers": [], "root_path": ""}
    messages: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        messages.append(message)

    await server.asgi_app(scope, receive, send)
    return messages[0]["status"], dict(messages[0]["headers"])


async def test_on_a_public_address_the_console_needs_a_key_and_then_asks_for_it() -> None:
    # Not listening: a test never opens a port on every interface. The decision
    # is the same code the built-in server runs for each request.
    public = {"host": "0.0.0.0", "jwt_secret": "a-secret-long-enough-for-hs256-0123456789abcdef"}
    with trio.fail_after(TEST_TIMEOUT):
        async with open_server(Config(**public, port=0), listen=False) as server:
            assert (await asgi_get(server, "/console/"))[0] == 403
        async with open_server(Config(**public, port=0, api_key=KEY), listen=False) as server:
            status, headers = await asgi_get(server, "/console/")
            assert status == 200  # the page, which asks for the key before anything else
            assert headers[b"content-type"].startswith(b"text/html")
            assert (await asgi_get(server, "/console/session"))[0] == 200


async def test_the_node_address_leads_to_the_console_when_it_is_on() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(api_key=KEY) as server:
            status, headers, _ = await http_request(server.port, "GET", "/")
            assert (status, headers["location"]) == (303, "/console/")
            status, headers, _ = await http_request(server.port, "GET", "/console")
            assert (status, headers["location"]) == (308, "/console/")
        async with running_server(api_key=KEY, console_path="/ops/console") as server:
            status, headers, _ = await http_request(server.port, "GET", "/")
            assert (status, headers["location"]) == (303, "/ops/console/")
            status, _, _ = await http_request(server.port, "GET", "/ops/console/")
            assert status == 200
            assert (await http_request(server.port, "GET", "/console/"))[0] == 404
        async with running_server(api_key=KEY, console_path="") as server:
            assert (await http_request(server.port, "GET", "/console/"))[0] == 404
            assert (await http_request(server.port, "GET", "/"))[0] == 404


@pytest.mark.parametrize(
    "path", ["console", "/console/", "/", "/ws", "/api", "/api/console", "/health", "/metrics"]
)
def test_a_console_path_that_cannot_work_is_a_configuration_error(path: str) -> None:
    with pytest.raises(ConfigError, match="console_path"):
        Config(console_path=path)


# --- its files ------------------------------------------------------------------------------

ASSETS = {
    "console.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}


async def test_the_page_and_its_files_have_their_types_a_strict_policy_and_etags() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(api_key=KEY) as server:
            status, headers, body = await http_request(server.port, "GET", "/console/")
            assert (status, headers["content-type"]) == (200, "text/html; charset=utf-8")
            policy = headers["content-security-policy"]
            assert "script-src 'self';" in policy
            assert "default-src 'none'" in policy
            assert "frame-ancestors 'none'" in policy
            assert "unsafe" not in policy
            assert headers["x-content-type-options"] == "nosniff"
            assert b'<script type="module" src="console.js">' in body
            for name, content_type in ASSETS.items():
                status, headers, body = await http_request(server.port, "GET", f"/console/{name}")
                assert (status, headers["content-type"]) == (200, content_type), name
                assert headers["cache-control"] == "no-cache"
                etag = headers["etag"]
                status, again, body = await http_request(
                    server.port, "GET", f"/console/{name}", b"", f"If-None-Match: {etag}\r\n"
                )
                assert (status, body, again["etag"]) == (304, b"", etag)
                status, _, body = await http_request(server.port, "HEAD", f"/console/{name}")
                assert (status, body) == (200, b"")
            for path in ("/console/nope.js", "/console/../pyproject.toml", "/console/sessions.py"):
                assert (await http_request(server.port, "GET", path))[0] == 404
            status, headers, _ = await http_request(server.port, "POST", "/console/", b"")
            assert (status, headers["allow"]) == (405, "GET")
            status, headers, _ = await http_request(server.port, "GET", "/console/login")
            assert (status, headers["allow"]) == (405, "POST")


class _Markup(HTMLParser):
    """Collects what the Content-Security-Policy would refuse in the page itself."""

    def __init__(self) -> None:
        super().__init__()
        self.inline: list[str] = []
        self.fetched: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        if tag == "script" and "src" not in names:
            self.inline.append("inline <script>")
        if tag == "style":
            self.inline.append("<style>")
        self.inline.extend(
            f"{tag} {name}=" for name in names if name == "style" or name.startswith("on")
        )
        for name in ("src", "href"):
            value = names.get(name) or ""
            if "//" in value:
                self.fetched.append(value)


def test_the_page_has_no_inline_code_and_fetches_nothing_from_elsewhere() -> None:
    assets = resources.files("tidings.http.console") / "assets"
    page = _Markup()
    page.feed((assets / "index.html").read_text())
    assert (page.inline, page.fetched) == ([], [])
    for script in assets.iterdir():
        if script.name.endswith((".js", ".css")):
            text = script.read_text()
            # Imports are relative; nothing names another host, or builds markup from strings.
            assert not re.search(r"""(import|from)\s*\(?\s*["'](https?:)?//""", text), script.name
            assert "innerHTML" not in text and "insertAdjacentHTML" not in text, script.name
            assert "@import" not in text and "url(http" not in text, script.name


# --- sessions, with a clock of their own ----------------------------------------------------


def test_a_session_expires_and_a_revoked_one_stays_refused_until_then() -> None:
    now = [1_000_000.0]
    keys = SessionKeys("the-key", ttl=60, clock=lambda: now[0])
    session = keys.issue()
    assert keys.check(session.token) == session
    assert keys.csrf_matches(session, session.csrf)
    assert not keys.csrf_matches(session, None)
    now[0] += 59
    assert keys.check(session.token) is not None
    now[0] += 1
    assert keys.check(session.token) is None  # expired

    now[0] = 1_000_000.0
    revoked, kept = keys.issue(), keys.issue()
    keys.revoke(revoked.nonce, revoked.expires)
    assert keys.check(revoked.token) is None
    assert keys.check(kept.token) is not None
    # Another key (a changed api_key, or another deployment) accepts none of them.
    assert SessionKeys("another-key", ttl=60, clock=lambda: now[0]).check(kept.token) is None


def test_revocations_are_bounded_and_forget_the_expired_first() -> None:
    now = [0.0]
    keys = SessionKeys("k", ttl=60, clock=lambda: now[0])
    for n in range(MAX_REVOKED):
        keys.revoke(f"old-{n}", 10.0)
    now[0] = 20.0  # all of those have expired by now: they make room first
    fresh = keys.issue()
    keys.revoke(fresh.nonce, fresh.expires)
    assert keys.check(fresh.token) is None
    assert len(keys._revoked) == 1
