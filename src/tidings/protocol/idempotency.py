"""Idempotency keys: what a valid one is, and what identifies a publication under it.

A publisher that retries (after a timeout, a lost connection, ``unavailable``
or ``unconfirmed``) sends the same key with every attempt; the node publishes
the first and answers the others with the first one's position. The key names
one publication per (tenant, topic): a broadcast under one key publishes once
to each of its topics.
"""

from __future__ import annotations

import hashlib
from typing import Final

MAX_KEY_LENGTH: Final = 256


def idempotency_key_problem(key: object) -> str | None:
    """Why ``key`` is not a valid idempotency key, or None when it is.

    A key is a string of 1 to 256 printable characters (a UUID is a good one).
    """
    if not isinstance(key, str):
        return "must be a string"
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        return f"must be 1 to {MAX_KEY_LENGTH} printable characters"
    return None


def fingerprint(payload_json: bytes) -> str:
    """What a retry must repeat: the payload as serialized (32 hex digits).

    A digest rather than the payload itself, so a remembered key costs the
    same few bytes whatever was published under it.
    """
    return hashlib.blake2b(payload_json, digest_size=16).hexdigest()
