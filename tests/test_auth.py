"""Client authentication over real sockets: JWT (HS256, RS256), the static token, expiry.

Tokens are minted here with PyJWT, as a backend would mint them for its
browsers; a bad one must be refused at the upgrade (401), before the client
can say anything.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jwt
import orjson
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
)

import tidings.client
from tidings import CloseCode, Config, ConfigError, ErrorCode, Server, open_server
from tidings.auth import Authenticator, AuthError

from .conftest import TEST_TIMEOUT, Disconnects, call, receive, running_server, subscribe

SECRET = "a-test-secret-that-is-long-enough-for-hs256"


def mint(
    claims: dict[str, Any] | None = None,
    *,
    key: Any = SECRET,
    algorithm: str = "HS256",
    lifetime: float = 300,
) -> str:
    """A token for user alice, valid for ``lifetime`` seconds; ``None`` values drop a claim."""
    body: dict[str, Any] = {"sub": "alice", "exp": time.time() + lifetime}
    body.update(claims or {})
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=algorithm)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_hs256(claims: dict[str, Any], key: bytes) -> str:
    """An HS256 token signed with any bytes (PyJWT refuses to sign with a PEM key), its
    claims written by ``json`` as an issuer might (``Infinity`` and ``NaN`` included)."""
    head = _b64(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
    body = _b64(json.dumps(claims).encode())
    signature = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(signature)}"


@asynccontextmanager
async def connected(
    server: Server, token: str | None = None, *, query: str | None = None, scheme: str = "Bearer"
) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket with ``token`` in the Authorization header and/or ``query`` as ?token=."""
    url = server.url + (f"?token={quote(query, safe='')}" if query is not None else "")
    headers = [(b"Authorization", f"{scheme} {token}".encode())] if token is not None else []
    async with open_websocket_url(url, extra_headers=headers) as ws:
        yield ws


async def refusal(
    server: Server, token: str | None = None, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    """The HTTP status and JSON error of an upgrade the server must refuse."""
    with pytest.raises(ConnectionRejected) as rejected:
        async with connected(server, token, **kwargs):
            pass
    body = rejected.value.body
    assert body is not None
    return rejected.value.status_code, orjson.loads(body)


async def assert_unauthorized(server: Server, token: str | None = None, **kwargs: Any) -> str:
    """Refused with 401 and the code ``unauthorized``; returns the message."""
    status, body = await refusal(server, token, **kwargs)
    assert status == 401, body
    assert body["error"]["code"] == "unauthorized"
    return str(body["error"]["message"])


async def closed_with(ws: WebSocketConnection) -> int:
    """Read until the server closes the connection; returns the close code."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await ws.get_message()
    return int(closed.value.reason.code)


@pytest.fixture(scope="module")
def rsa_keys() -> Iterator[tuple[bytes, str]]:
    """(private key PEM, public key PEM) of a fresh RSA key pair."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    yield private_pem, public_pem


# --- JWT HS256 ---------------------------------------------------------------------


async def test_a_valid_hs256_token_connects_with_its_user_and_tenant() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(jwt_secret=SECRET, presence=True) as server:
            alice = mint({"tenant": "acme"})
            bob = mint({"sub": "bob"})  # no tenant claim: the default tenant
            async with connected(server, alice) as a, connected(server, bob) as b:
                await subscribe(a, "room")
                await subscribe(b, "room")
                reply = await call(a, {"type": "presence", "topic": "room", "requestId": "p"})
                [entry] = reply["payload"]["clients"]
                assert (entry["user"], entry["tenant"]) == ("alice", "acme")
                # bob, of the default tenant, sees only himself on his "room".
                reply = await call(b, {"type": "presence", "topic": "room", "requestId": "p"})
                [entry] = reply["payload"]["clients"]
                assert (entry["user"], entry["tenant"]) == ("bob", "default")
                assert sorted((c.user, c.tenant) for c in server.clients()) == [
                    ("alice", "acme"),
                    ("bob", "default"),
                ]


BAD_HS256_TOKENS = {
    "expired": lambda: mint(lifetime=-30),
    "wrong signature": lambda: mint(key="another-secret-that-is-long-enough-for-hs256"),
    "no sub": lambda: mint({"sub": None}),
    "no exp": lambda: mint({"exp": None}),
    "empty sub": lambda: mint({"sub": ""}),
    "tenant not a string": lambda: mint({"tenant": 42}),
    "tenant with a newline": lambda: mint({"tenant": "acme\nglobex"}),
    "topics not a list": lambda: mint({"topics": "news.*"}),
    "publish not a list of strings": lambda: mint({"publish": [1, 2]}),
    "alg none": lambda: jwt.encode(
        {"sub": "alice", "exp": time.time() + 300}, None, algorithm="none"
    ),
    "not yet valid": lambda: mint({"nbf": time.time() + 600}),
    "another algorithm": lambda: mint(key=SECRET * 2, algorithm="HS512"),
    "not a jwt": lambda: "not.a.jwt",
    "tampered payload": lambda: _tamper(mint({"tenant": "acme"})),
    "too long": lambda: mint({"pad": "x" * 9000}),
}


def _tamper(token: str) -> str:
    """The same signature over a payload that now claims another tenant."""
    head, body, signature = token.split(".")
    claims = orjson.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["tenant"] = "globex"
    return f"{head}.{_b64(orjson.dumps(claims))}.{signature}"


@pytest.mark.parametrize("case", list(BAD_HS256_TOKENS))
async def test_a_bad_jwt_is_refused_at_the_upgrade_with_401(case: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(jwt_secret=SECRET) as server:
            disconnects = Disconnects(server)
            token = BAD_HS256_TOKENS[case]()
            await assert_unauthorized(server, token)
            await assert_unauthorized(server, query=token)  # the browser's way: same answer
            assert server.counters.auth_failures == 2
            assert server.clients() == []
            assert disconnects.closed == []  # refused before a connection existed
            # The same server takes a good token.
            async with connected(server, mint()) as ws:
                assert (await call(ws, {"type": "ping", "requestId": 1}))["type"] == "pong"


async def test_the_401_says_what_is_wrong_with_the_token() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(jwt_secret=SECRET) as server:
            assert "expired" in await assert_unauthorized(server, mint(lifetime=-30))
            assert "'sub'" in await assert_unauthorized(server, mint({"sub": None}))
            assert "signature" in await assert_unauthorized(server, mint(key="x" * 40))
            assert "required" in await assert_unauthorized(server)


@pytest.mark.parametrize("transport", ["builtin", "hypercorn"])
async def test_no_token_or_another_scheme_is_refused_with_401(transport: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(jwt_secret=SECRET, transport=transport) as server:
            await assert_unauthorized(server)
            await assert_unauthorized(server, mint(), scheme="Basic")
            await assert_unauthorized(server, query="")


async def test_the_topics_claim_limits_what_a_client_may_subscribe_to() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(jwt_secret=SECRET, presence=True) as server:
            token = mint({"topics": ["news.*", "weather"]})
            async with connected(server, token) as ws:
                await subscribe(ws, "news.sport")
                await subscribe(ws, "weather")
                for kind in ("subscribe", "presence", "request"):
                    reply = await call(ws, {"type": kind, "topic": "payroll", "requestId": kind})
                    assert reply["type"] == "error", kind
                    assert reply["payload"]["code"] == ErrorCode.FORBIDDEN, kind
                    assert reply["topic"] == "payroll"
                # A refused subscription delivers nothing; the allowed ones still do.
                await server.publish("payroll", "salaries")
                await server.publish("news.sport", "goal")
                event = await receive(ws)
                assert (event["topic"], event["payload"]) == ("news.sport", "goal")
            async with connected(server, mint({"topics": []})) as nothing:
                reply = await call(
                    nothing, {"type": "subscribe", "topic": "news.x", "requestId": 1}
                )
                assert reply["payload"]["code"] == ErrorCode.FORBIDDEN


async def test_the_publish_claim_decides_what_a_client_may_publish() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(jwt_secret=SECRET) as server:
            writer = mint({"publish": ["chat.*"]})
            reader = mint({"sub": "bob"})  # no publish claim: may not publish at all
            async with connected(server, writer) as w, connected(server, reader) as r:
                await subscribe(r, "chat.lobby")
                await subscribe(r, "alerts")
                refused = await call(
                    w, {"type": "publish", "topic": "alerts", "payload": "x", "requestId": 1}
                )
                assert refused["type"] == "error"
                assert refused["payload"]["code"] == ErrorCode.FORBIDDEN
                own = await call(
                    r, {"type": "publish", "topic": "chat.lobby", "payload": "y", "requestId": 2}
                )
                assert own["payload"]["code"] == ErrorCode.FORBIDDEN
                done = await call(
                    w, {"type": "publish", "topic": "chat.lobby", "payload": "hi", "requestId": 3}
                )
                assert done["payload"]["status"] == "published"
                assert done["payload"]["seq"] == 1  # the refused ones were never sequenced
                # Only the permitted publication reaches the subscriber.
                event = await receive(r)
                assert (event["topic"], event["payload"], event["seq"]) == ("chat.lobby", "hi", 1)
            async with connected(server, mint({"publish": []})) as none:
                reply = await call(
                    none, {"type": "publish", "topic": "chat.x", "payload": 0, "requestId": 4}
                )
                assert reply["payload"]["code"] == ErrorCode.FORBIDDEN


CLAIM_NAMES = ["sub", "exp", "tenant", "topics", "publish", "nbf", "iat", "aud", "iss"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)


@settings(max_examples=200, deadline=None)
@given(claims=st.dictionaries(st.sampled_from(CLAIM_NAMES), JSON_VALUES), base=st.booleans())
def test_any_claims_in_a_signed_token_give_a_sane_identity_or_an_auth_error(
    claims: dict[str, Any], base: bool
) -> None:
    """A token the issuer signed, with odd claim values (Infinity, NaN, lists, ...):
    never an exception other than AuthError, which would escape the upgrade."""
    body: dict[str, Any] = {"sub": "alice", "exp": time.time() + 300} if base else {}
    body.update(claims)
    authenticator = Authenticator("jwt", jwt_secret=SECRET)
    try:
        identity = authenticator.verify(sign_hs256(body, SECRET.encode()))
    except AuthError:
        return
    assert isinstance(identity.user, str)
    assert identity.user
    assert isinstance(identity.tenant, str)
    assert identity.tenant
    assert identity.expires_at is not None
    assert identity.expires_at > time.time()
    assert identity.authenticated


# --- JWT RS256 -----------------------------------------------------------------------


@pytest.mark.parametrize("key_source", ["pem", "file"])
async def test_rs256_tokens_verify_with_the_configured_public_key(
    rsa_keys: tuple[bytes, str], key_source: str, tmp_path: Path
) -> None:
    private_pem, public_pem = rsa_keys
    public_key = public_pem
    if key_source == "file":
        path = tmp_path / "jwt.pub"
        path.write_text(public_pem)
        public_key = str(path)
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(jwt_public_key=public_key, presence=True) as server:
            token = mint({"tenant": "acme", "publish": ["*"]}, key=private_pem, algorithm="RS256")
            async with connected(server, token) as ws:
                await subscribe(ws, "t")
                reply = await call(ws, {"type": "presence", "topic": "t", "requestId": "p"})
                [entry] = reply["payload"]["clients"]
                assert (entry["user"], entry["tenant"]) == ("alice", "acme")
                published = await call(
                    ws, {"type": "publish", "topic": "t", "payload": 1, "requestId": 2}
                )
                assert published["payload"]["status"] == "published"


async def test_rs256_refuses_other_keys_expiry_and_the_hs256_confusion_attack(
    rsa_keys: tuple[bytes, str],
) -> None:
    private_pem, public_pem = rsa_keys
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(jwt_public_key=public_pem) as server:
            # Signed by someone else's private key.
            await assert_unauthorized(server, mint(key=stranger, algorithm="RS256"))
            await assert_unauthorized(
                server, mint(key=private_pem, algorithm="RS256", lifetime=-30)
            )
            await assert_unauthorized(
                server, mint({"sub": None}, key=private_pem, algorithm="RS256")
            )
            # HS256 "signed" with the public key, which the attacker knows.
            claims = {"sub": "mallory", "exp": int(time.time()) + 300}
            await assert_unauthorized(server, sign_hs256(claims, public_pem.encode()))
            # No secret is configured, so no HS256 token at all.
            await assert_unauthorized(server, mint())


async def test_an_unreadable_public_key_file_fails_at_startup(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="jwt_public_key"):
        async with running_server(jwt_public_key=str(tmp_path / "missing.pem")):
            pass  # pragma: no cover


async def test_audience_and_issuer_are_checked_when_configured() -> None:
    config = {"jwt_secret": SECRET, "jwt_audience": "tidings", "jwt_issuer": "https://auth.test"}
    good = {"aud": "tidings", "iss": "https://auth.test"}
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(**config) as server:
            async with connected(server, mint(good)) as ws:
                assert (await call(ws, {"type": "ping", "requestId": 1}))["type"] == "pong"
            async with connected(server, mint({**good, "aud": ["other", "tidings"]})):
                pass  # one of several audiences is enough
            for claims in (
                {**good, "aud": "another-service"},
                {**good, "aud": None},
                {**good, "iss": "https://evil.test"},
                {**good, "iss": None},
            ):
                await assert_unauthorized(server, mint(claims))


# --- the static token ------------------------------------------------------------------


async def test_the_static_token_is_accepted_in_the_header_and_in_the_query() -> None:
    token = "s3cret/token+with=symbols"
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(token=token) as server:
            async with connected(server, token) as by_header, connected(server, query=token) as q:
                await subscribe(q, "t")
                reply = await call(
                    by_header, {"type": "publish", "topic": "t", "payload": "hi", "requestId": 1}
                )
                assert reply["payload"]["status"] == "published"
                assert (await receive(q))["payload"] == "hi"
            for wrong in ("wrong", token + "x", token[:-1], mint()):
                await assert_unauthorized(server, wrong)
                await assert_unauthorized(server, query=wrong)
            await assert_unauthorized(server, query="")
            await assert_unauthorized(server)
            await assert_unauthorized(server, token, scheme="Token")
            assert server.counters.auth_failures == 11
            async with connected(server, token) as ws:
                for given, answer in [("wrong", "error"), (token, "response")]:
                    reply = await call(
                        ws, {"type": "refresh", "payload": {"token": given}, "requestId": 1}
                    )
                    assert reply["type"] == answer
                assert reply["payload"] == {"status": "refreshed", "expiresAt": None}


# --- expiry and refresh ------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["builtin", "hypercorn"])
async def test_a_token_that_expires_while_connected_closes_the_connection_with_4002(
    transport: str,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(
            jwt_secret=SECRET,
            ping_interval=0.1,
            read_timeout=1,
            close_timeout=0.2,
            transport=transport,
        ) as server:
            disconnects = Disconnects(server)
            async with connected(server, mint(lifetime=1.5)) as ws:
                await subscribe(ws, "t")
                assert await closed_with(ws) == CloseCode.TOKEN_EXPIRED == 4002
            [closed] = await disconnects.wait()
            assert (closed.code, closed.reason) == (4002, "token expired")


async def test_refresh_with_a_new_token_keeps_the_connection_open() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(
            jwt_secret=SECRET, ping_interval=0.1, read_timeout=1, close_timeout=0.2
        ) as server:
            disconnects = Disconnects(server)
            short = mint(lifetime=1.5)
            async with connected(server, short) as kept, connected(server, short) as lapsed:
                await subscribe(kept, "t")
                later = time.time() + 600
                reply = await call(
                    kept,
                    {"type": "refresh", "payload": {"token": mint(lifetime=600)}, "requestId": 1},
                )
                assert reply["type"] == "response"
                assert reply["payload"]["status"] == "refreshed"
                assert reply["payload"]["expiresAt"] == pytest.approx(later, abs=60)
                # Refreshes that must not extend anything.
                for token, words in [
                    (mint(lifetime=-30), "expired"),
                    (mint({"sub": "mallory"}, lifetime=600), "another user"),
                    (mint({"tenant": "globex"}, lifetime=600), "another user"),
                    (mint(key="y" * 40, lifetime=600), "signature"),
                ]:
                    refused = await call(
                        lapsed, {"type": "refresh", "payload": {"token": token}, "requestId": 2}
                    )
                    assert refused["type"] == "error"
                    assert refused["payload"]["code"] == ErrorCode.UNAUTHORIZED
                    assert words in refused["payload"]["message"]
                # The connection whose refreshes were refused closes when its token expires...
                assert await closed_with(lapsed) == 4002
                [closed] = await disconnects.wait()
                assert closed.code == 4002
                # ... and the refreshed one, with the same first token, lives on.
                await server.publish("t", "still here")
                assert (await receive(kept))["payload"] == "still here"
                assert len(server.clients()) == 1


async def test_the_python_client_sends_its_token_and_refreshes_it() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(
            jwt_secret=SECRET, ping_interval=0.1, read_timeout=1, close_timeout=0.2
        ) as server:
            short = mint(lifetime=1.5)
            with pytest.raises(ConnectionError, match="401"):
                async with tidings.client.connect(server.url, token="bad", reconnect=False):
                    pass  # pragma: no cover
            async with (
                tidings.client.connect(server.url, token=short, reconnect=False) as client,
                client.subscribe("t") as events,
            ):
                fresh = mint(lifetime=600)
                expires = await client.refresh(fresh)
                assert expires is not None
                assert expires > time.time() + 300
                with pytest.raises(tidings.client.TidingsError) as refused:
                    await client.refresh(mint({"sub": "mallory"}))
                assert refused.value.code == ErrorCode.UNAUTHORIZED
                assert client.token == fresh  # what a reconnection would present
                # Another connection with the same first token is closed when it expires...
                async with connected(server, short) as lapsed:
                    assert await closed_with(lapsed) == 4002
                # ... while the client's connection, refreshed, carries on.
                await server.publish("t", "after")
                event = await events.__anext__()
                assert event.payload == "after"
                assert client.connections == 1


async def test_the_python_client_recovers_from_an_expired_token_with_refresh() -> None:
    """Closed with 4002, the client's reconnections are refused (401) until it is given a
    new token; ``refresh`` is how it is given one, connected or not."""
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(
            jwt_secret=SECRET, ping_interval=0.1, read_timeout=1, close_timeout=0.2
        ) as server:
            disconnects = Disconnects(server)
            async with (
                tidings.client.connect(
                    server.url, token=mint(lifetime=1.5), min_backoff=0.05, max_backoff=0.2
                ) as client,
                client.subscribe("t") as events,
            ):
                [closed] = await disconnects.wait()
                assert closed.code == 4002
                await client.refresh(mint(lifetime=600), timeout=5)
                assert client.connected
                await server.publish("t", "back")
                assert (await events.__anext__()).payload == "back"
                assert client.connections == 2


async def test_a_refreshed_token_s_claims_apply_to_later_commands() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(jwt_secret=SECRET) as server,
            connected(server, mint({"publish": ["*"]})) as ws,
        ):
            await subscribe(ws, "a")
            await subscribe(ws, "c")
            narrower = mint({"topics": ["a"], "publish": []})
            reply = await call(
                ws, {"type": "refresh", "payload": {"token": narrower}, "requestId": 1}
            )
            assert reply["payload"]["status"] == "refreshed"
            # The subscription the new token no longer allows ends, and the client is told.
            ended = await receive(ws)
            assert (ended["type"], ended["topic"]) == ("response", "c")
            assert ended["payload"]["status"] == "unsubscribed" and "requestId" not in ended
            refused = await call(ws, {"type": "subscribe", "topic": "b", "requestId": 2})
            assert refused["payload"]["code"] == ErrorCode.FORBIDDEN
            refused = await call(
                ws, {"type": "publish", "topic": "a", "payload": 0, "requestId": 3}
            )
            assert refused["payload"]["code"] == ErrorCode.FORBIDDEN
            # The subscription it allows is kept.
            await server.publish("c", "gone")
            await server.publish("a", "kept")
            assert (await receive(ws))["payload"] == "kept"


async def test_refresh_without_authentication_answers_without_an_expiry(server: Server) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_websocket_url(server.url) as ws:
            reply = await call(ws, {"type": "refresh", "payload": {"token": "x"}, "requestId": 1})
            assert reply["payload"] == {"status": "refreshed", "expiresAt": None}
            missing = await call(ws, {"type": "refresh", "requestId": 2})
            assert missing["payload"]["code"] == ErrorCode.MISSING_FIELD


# --- choosing the mode -------------------------------------------------------------------


def test_jwt_secret_alone_turns_on_jwt_and_token_alone_the_static_token(
    rsa_keys: tuple[bytes, str], tmp_path: Path
) -> None:
    assert Config.load(env={}).auth_mode == "none"
    assert Config.load(env={"TIDINGS_JWT_SECRET": SECRET}).auth_mode == "jwt"
    assert Config.load(env={"TIDINGS_TOKEN": "s3cret"}).auth_mode == "token"
    assert Config.load(env={"TIDINGS_JWT_PUBLIC_KEY": rsa_keys[1]}).auth_mode == "jwt"
    with pytest.raises(ConfigError, match="neither a PEM key nor a readable file"):
        Config.load(env={"TIDINGS_JWT_PUBLIC_KEY": "/nonexistent/key.pem"})
    # A key that is not one is refused at start, not at each client's token.
    garbage = tmp_path / "key.pem"
    garbage.write_text("not a key\n")
    with pytest.raises(ConfigError, match="is not a PEM public key"):
        Config.load(env={"TIDINGS_JWT_PUBLIC_KEY": str(garbage)})
    fake = "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----\n"
    with pytest.raises(ConfigError, match="is not a PEM public key"):
        Config.load(env={"TIDINGS_JWT_PUBLIC_KEY": fake})
    with pytest.raises(ConfigError, match="is not a PEM public key"):
        Config.load(env={"TIDINGS_JWT_PUBLIC_KEY": rsa_keys[0].decode()})  # the private key
    with pytest.raises(ConfigError, match="jwt_secret"):
        Config.load(env={"TIDINGS_AUTH": "jwt"})
    with pytest.raises(ConfigError, match="token"):
        Config.load(env={"TIDINGS_AUTH": "token"})


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_a_non_loopback_host_without_authentication_is_a_config_error(host: str) -> None:
    with pytest.raises(ConfigError, match="authentication"):
        Config.load(env={"TIDINGS_HOST": host})
    with pytest.raises(ConfigError, match="authentication"):
        Config(host=host)
    # Any form of authentication, or opening it on purpose, is fine.
    assert Config.load(env={"TIDINGS_HOST": host, "TIDINGS_JWT_SECRET": SECRET}).host == host
    assert Config.load(env={"TIDINGS_HOST": host, "TIDINGS_TOKEN": "t"}).auth_mode == "token"
    assert Config.load(env={"TIDINGS_HOST": host, "TIDINGS_AUTH": "none"}).auth_mode == "none"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_a_loopback_host_needs_no_authentication(host: str) -> None:
    assert Config.load(env={"TIDINGS_HOST": host}).auth_mode == "none"


async def test_a_server_configured_from_the_environment_enforces_its_jwt_secret() -> None:
    config = Config.load(env={"TIDINGS_JWT_SECRET": SECRET, "TIDINGS_PORT": "0"})
    with trio.fail_after(TEST_TIMEOUT):
        async with open_server(config) as server:
            await assert_unauthorized(server)
            async with connected(server, mint()) as ws:
                assert (await call(ws, {"type": "ping", "requestId": 1}))["type"] == "pong"
    config = Config.load(env={"TIDINGS_TOKEN": "s3cret", "TIDINGS_PORT": "0"})
    with trio.fail_after(TEST_TIMEOUT):
        async with open_server(config) as server:
            await assert_unauthorized(server, mint())
            async with connected(server, query="s3cret") as ws:
                assert (await call(ws, {"type": "ping", "requestId": 1}))["type"] == "pong"
