"""Who a client is: its token, checked at the upgrade and on refresh.

Three modes (``Config.auth``): ``none`` (local development: every client is
anonymous in the default tenant), ``token`` (one static shared token, as the
agent messaging seed's ``SetToken``), and ``jwt`` (HS256 with a secret, RS256
with a public key; PyJWT). A token comes as ``Authorization: Bearer TOKEN`` on
the upgrade request, or as a ``token`` query parameter for browsers, which
cannot set headers on a WebSocket.

JWT claims: ``sub`` (the user, required), ``exp`` (required), ``tenant``
(optional; the default tenant otherwise), ``topics`` and ``publish`` (optional
lists of shell-style patterns the client may subscribe and publish to).
"""

from __future__ import annotations

import hmac
import time
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs

import attrs
import jwt

from .broker.namespaces import Namespace
from .errors import AuthError
from .protocol.topics import TopicFilter, topic_problem
from .transport.base import UpgradeRequest

AuthMode = Literal["none", "token", "jwt"]
MAX_TOKEN_LENGTH = 8192

ALLOW_ALL = TopicFilter()


@attrs.frozen(slots=True)
class Identity:
    """What the server knows of a client once its token is checked."""

    tenant: str
    user: str | None = None
    expires_at: float | None = None
    """Wall-clock time (seconds since the epoch) the token expires, if it does."""
    subscribe: TopicFilter = ALLOW_ALL
    """Topics the token allows subscribing to (namespace rules apply as well)."""
    publish: TopicFilter | None = None
    """Topics the token allows publishing to; None: the token says nothing."""
    authenticated: bool = False
    """False in mode ``none``: an anonymous local client."""


class Authenticator:
    """Checks tokens for one server."""

    def __init__(
        self,
        mode: AuthMode,
        *,
        default_tenant: str = "default",
        token: str | None = None,
        jwt_secret: str | None = None,
        jwt_public_key: str | None = None,
        audience: str | None = None,
        issuer: str | None = None,
    ) -> None:
        self.mode = mode
        self.default_tenant = default_tenant
        self._token = token
        self._keys: dict[str, Any] = {}
        if jwt_secret:
            self._keys["HS256"] = jwt_secret
        if jwt_public_key:
            self._keys["RS256"] = _load_public_key(jwt_public_key)
        self._audience = audience
        self._issuer = issuer
        # Frozen, so every anonymous client can share it.
        self._anonymous = Identity(default_tenant)

    def authenticate(self, request: UpgradeRequest) -> Identity:
        """The identity of the client making ``request``.

        Raises:
            AuthError: no token where one is needed, or a token that does not verify.
        """
        if self.mode == "none":
            return self._anonymous
        token = token_of(request)
        if token is None:
            raise AuthError("a token is required (Authorization: Bearer, or ?token=)")
        return self.verify(token)

    def verify(self, token: str) -> Identity:
        """The identity a token proves.

        Raises:
            AuthError: the token does not verify, has expired or lacks a claim.
        """
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthError("token too long")
        if self.mode == "token":
            assert self._token is not None
            if not hmac.compare_digest(token.encode(), self._token.encode()):
                raise AuthError("invalid token")
            return Identity(self.default_tenant, publish=ALLOW_ALL, authenticated=True)
        if self.mode == "jwt":
            return self._verify_jwt(token)
        return Identity(self.default_tenant)

    def _verify_jwt(self, token: str) -> Identity:
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError:
            raise AuthError("invalid token: not a JWT") from None
        key = self._keys.get(str(algorithm))
        if key is None:
            accepted = ", ".join(sorted(self._keys)) or "none"
            raise AuthError(f"token algorithm {algorithm!r} not accepted (accepted: {accepted})")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[str(algorithm)],
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise AuthError("token signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        for claim in ("exp", "nbf", "iat"):
            value = claims.get(claim)
            # PyJWT takes "123" for 123; RFC 7519 says NumericDate is a JSON number.
            if claim in claims and (not isinstance(value, int | float) or isinstance(value, bool)):
                raise AuthError(f"invalid token: the {claim!r} claim is not a number")
        return Identity(
            tenant=_tenant(claims.get("tenant"), self.default_tenant),
            user=_string_claim(claims, "sub"),
            expires_at=float(claims["exp"]),
            subscribe=_patterns(claims, "topics") or ALLOW_ALL,
            publish=_patterns(claims, "publish"),
            authenticated=True,
        )


def token_of(request: UpgradeRequest) -> str | None:
    """The bearer token of an upgrade request: the header first, then ``?token=``."""
    authorization = request.header("authorization")
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    values = parse_qs(request.query).get("token")
    return values[0] if values else None


def expired(identity: Identity, now: float | None = None) -> bool:
    """Whether the identity's token has expired (at ``now``, wall clock)."""
    return identity.expires_at is not None and (now or time.time()) >= identity.expires_at


def may_publish(identity: Identity, namespace: Namespace, topic: str) -> bool:
    """Whether a client may publish to ``topic``.

    A namespace that forbids publishing wins; then a token's ``publish`` claim
    decides; without one, the namespace's ``client_publish`` does, and when
    that is unset only anonymous clients (no authentication configured, local
    development) may publish.
    """
    if namespace.publish is False:
        return False
    if identity.publish is not None:
        return identity.publish.allows(topic)
    if namespace.publish is True:
        return True
    return not identity.authenticated


def _string_claim(claims: dict[str, Any], name: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value:
        raise AuthError(f"claim {name!r} must be a non-empty string")
    return value


def _tenant(value: Any, default: str) -> str:
    if value is None:
        return default
    if not isinstance(value, str) or topic_problem(value) is not None or len(value) > 128:
        raise AuthError("claim 'tenant' must be a printable string of at most 128 characters")
    return value


def _patterns(claims: dict[str, Any], name: str) -> TopicFilter | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise AuthError(f"claim {name!r} must be a list of topic patterns")
    return TopicFilter(value, empty_allows_all=False)


def _load_public_key(value: str) -> str:
    if value.lstrip().startswith("-----BEGIN"):
        return value
    try:
        return Path(value).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read jwt_public_key file {value}: {exc.strerror}") from None
