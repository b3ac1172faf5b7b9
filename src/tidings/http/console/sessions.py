"""Console sessions: signed, expiring tokens that every node holding the key accepts.

A login hands the browser a token in an HttpOnly cookie. The token is signed
with a key derived from ``api_key``, not stored, so that any node of a cluster
(which all share the key) accepts a session another node opened, and so that
changing ``api_key`` ends every session at once. Logging out revokes the
token's nonce on every node (the revocation is a cluster-wide question, see
:meth:`tidings.Server.ask`); revocations are kept until the token would have
expired anyway, and their number is bounded.

Each session has a CSRF token derived from its own token: the page reads it
once (from the login answer, or ``GET <console>/session``) and sends it as a
header with every call. A page of another site can make the browser send the
cookie (SameSite=Strict already stops that) but can never read the token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from typing import Final

import attrs

#: Revoked sessions remembered per node; past this, the ones closest to expiry go first.
MAX_REVOKED: Final = 10_000
_VERSION: Final = "v1"


@attrs.frozen(slots=True)
class ConsoleSession:
    """A valid session: its token, its CSRF token, and when it expires."""

    token: str
    nonce: str
    csrf: str
    expires: float
    """Wall-clock time, seconds since the epoch."""


class SessionKeys:
    """Issues and checks console session tokens for one ``api_key``."""

    def __init__(self, api_key: str, ttl: float, clock: Callable[[], float] = time.time) -> None:
        # Derived, so that a token (or its signature) never says anything about the key.
        self._secret = hmac.new(api_key.encode(), b"tidings console session", "sha256").digest()
        self.ttl = ttl
        self.clock = clock
        self._revoked: dict[str, float] = {}

    def issue(self) -> ConsoleSession:
        """A new session, valid for ``ttl`` seconds."""
        expires = int(self.clock() + self.ttl)
        nonce = secrets.token_hex(16)
        token = self._sign(f"{_VERSION}.{expires}.{nonce}")
        return ConsoleSession(token, nonce, self._csrf(token), float(expires))

    def check(self, token: str | None) -> ConsoleSession | None:
        """The session ``token`` belongs to, or None: forged, expired or revoked."""
        if not token or len(token) > 200:
            return None
        body, _, signature = token.rpartition(".")
        version, _, rest = body.partition(".")
        expires_text, _, nonce = rest.partition(".")
        expected = self._signature(body)
        if version != _VERSION or not hmac.compare_digest(signature, expected):
            return None
        try:
            expires = int(expires_text)
        except ValueError:  # pragma: no cover - signed by us, so well formed
            return None
        if expires <= self.clock() or nonce in self._revoked:
            return None
        return ConsoleSession(token, nonce, self._csrf(token), float(expires))

    def csrf_matches(self, session: ConsoleSession, given: str | None) -> bool:
        """Whether ``given`` is the session's CSRF token (compared in constant time)."""
        return given is not None and hmac.compare_digest(given.encode(), session.csrf.encode())

    def revoke(self, nonce: str, expires: float) -> None:
        """Refuse the session with ``nonce`` from now on (until it expires anyway)."""
        now = self.clock()
        if expires <= now:
            return
        if len(self._revoked) >= MAX_REVOKED:
            for old, until in list(self._revoked.items()):
                if until <= now:
                    del self._revoked[old]
        while len(self._revoked) >= MAX_REVOKED:
            del self._revoked[min(self._revoked, key=self._revoked.__getitem__)]
        self._revoked[nonce] = expires

    def _sign(self, body: str) -> str:
        return f"{body}.{self._signature(body)}"

    def _signature(self, body: str) -> str:
        return hmac.new(self._secret, body.encode(), hashlib.sha256).hexdigest()

    def _csrf(self, token: str) -> str:
        return hmac.new(self._secret, b"csrf." + token.encode(), hashlib.sha256).hexdigest()
