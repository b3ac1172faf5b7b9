"""The one HTTP/1.1 request most connections make, parsed without h11.

A WebSocket client's first request is a GET with a handful of headers and
no body. h11 parses it correctly and generally, and that generality was a
sixth of the CPU time of accepting a client (a reconnect storm is 10,000 of
them; ``docs/benchmarks.md``). :func:`parse_upgrade` recognises exactly the
upgrade GET, strictly, and says None to everything else, a valid request or
not: the caller then hands the same bytes to h11, which answers them as
before. So this parser never rejects anything; it only takes the common case
off h11's hands, and the two agree on every request it takes
(``tests/test_http1.py`` checks that against h11 on generated requests).
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Final

import attrs

#: The request line of an upgrade: GET, an origin-form target, HTTP/1.1.
_REQUEST_LINE: Final = re.compile(rb"GET (/[\x21-\x7e]*) HTTP/1\.1")
#: A header name (RFC 9110 token).
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Control characters a head may not hold (tab aside; CR and LF are counted
#: apart). Deleting them with ``bytes.translate`` is a C loop: ~10x faster than
#: a regular expression with look-arounds over a whole head.
_CONTROLS: Final = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
#: Headers whose presence sends the request to h11: a body, or a framing h11 must judge.
_BODY_HEADERS: Final = frozenset({b"content-length", b"transfer-encoding"})

END_OF_HEAD: Final = b"\r\n\r\n"
_PHRASES: Final = {status.value: status.phrase.encode() for status in HTTPStatus}


@attrs.frozen(slots=True)
class UpgradeHead:
    """A WebSocket upgrade request's head: target and headers (lower-case names)."""

    target: bytes
    headers: list[tuple[bytes, bytes]]
    key: bytes
    """``Sec-WebSocket-Key``."""


def parse_upgrade(head: bytes) -> UpgradeHead | None:
    """The upgrade request in ``head`` (ending with its blank line), or None.

    None means "not one this parser takes": anything but an HTTP/1.1 GET with
    ``Host``, ``Upgrade: websocket``, ``Connection: upgrade``,
    ``Sec-WebSocket-Version: 13`` and a ``Sec-WebSocket-Key``, without a
    body, with nothing h11 would question.
    """
    if not head.endswith(END_OF_HEAD) or len(head.translate(None, _CONTROLS)) != len(head):
        return None
    pairs = head.count(b"\r\n")
    if head.count(b"\r") != pairs or head.count(b"\n") != pairs:
        return None  # a lone CR or LF
    lines = head[: -len(END_OF_HEAD)].split(b"\r\n")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        return None
    headers: list[tuple[bytes, bytes]] = []
    upgrade = connection = version = key = None
    hosts = 0
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            return None  # obs-fold, a space before the colon, an empty line: h11's call
        name = name.lower()
        value = value.strip(b" \t")
        headers.append((name, value))
        if name == b"host":
            hosts += 1
        elif name == b"upgrade":
            upgrade = value
        elif name == b"connection":
            connection = value
        elif name == b"sec-websocket-version":
            version = value
        elif name == b"sec-websocket-key":
            key = value
        elif name in _BODY_HEADERS:
            return None
    if (
        hosts != 1
        or upgrade is None
        or upgrade.lower() != b"websocket"
        or connection is None
        or b"upgrade" not in connection.lower()
        or version != b"13"
        or not key
    ):
        return None
    return UpgradeHead(match[1], headers, key)


def http_head(status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A response's status line and headers, ready to send."""
    lines = [b"HTTP/1.1 %d %s" % (status, _PHRASES.get(status, b""))]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + END_OF_HEAD
