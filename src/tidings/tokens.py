"""Tokens for local development: mint a JWT the node accepts, and check one.

``tidings token`` and ``tidings token check`` (Centrifugo's ``gentoken`` and
``checktoken``) are built on these. Minting signs with the node's own HS256
``jwt_secret``, with the claims of ``docs/auth.md``; checking runs the very
:class:`~tidings.auth.Authenticator` the node runs at the upgrade.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jwt

from .auth import Identity
from .config import Config
from .errors import AuthError, ConfigError
from .node.server import authenticator


def mint(
    config: Config,
    *,
    user: str,
    ttl: float,
    tenant: str | None = None,
    topics: Sequence[str] | None = None,
    publish: Sequence[str] | None = None,
    now: float | None = None,
) -> str:
    """An HS256 JWT signed with ``config.jwt_secret`` that a node with ``config`` accepts.

    ``topics`` and ``publish`` become the claims of the same names when given
    (``[]``: none); ``aud`` and ``iss`` are added when the node requires them.

    Raises:
        ConfigError: the node has no ``jwt_secret`` to sign with.
    """
    if not config.jwt_secret:
        if config.jwt_public_key:
            raise ConfigError(
                "the node verifies RS256 tokens with jwt_public_key: sign them with its"
                " private key; tidings token signs with jwt_secret (HS256) only"
            )
        raise ConfigError(
            "no jwt_secret to sign with: set TIDINGS_JWT_SECRET (or jwt_secret in --config FILE)"
        )
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"sub": user, "iat": issued, "exp": issued + max(1, round(ttl))}
    if tenant is not None:
        claims["tenant"] = tenant
    if topics is not None:
        claims["topics"] = list(topics)
    if publish is not None:
        claims["publish"] = list(publish)
    if config.jwt_audience:
        claims["aud"] = config.jwt_audience
    if config.jwt_issuer:
        claims["iss"] = config.jwt_issuer
    return jwt.encode(claims, config.jwt_secret, algorithm="HS256")


def verify(config: Config, token: str) -> Identity:
    """The identity a node with ``config`` gives a client presenting ``token``.

    Raises:
        AuthError: the node would refuse it (the message is the 401's).
    """
    return authenticator(config).verify(token.strip())


__all__ = ["AuthError", "authenticator", "mint", "verify"]
