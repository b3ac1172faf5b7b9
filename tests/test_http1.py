"""The upgrade fast path (transport/http1.py) agrees with h11 on every request it takes.

It may decline anything (h11 then answers); what it must never do is take a
request h11 would refuse, or read one differently.
"""

from __future__ import annotations

import h11
from hypothesis import event, given, settings
from hypothesis import strategies as st

from tidings.transport.base import UpgradeRequest
from tidings.transport.http1 import http_head, parse_upgrade

UPGRADE = (
    b"GET /ws?token=abc HTTP/1.1\r\n"
    b"Host: example.com\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: keep-alive, Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Origin: https://app.example.com\r\n"
    b"\r\n"
)


def h11_request(data: bytes) -> h11.Request | None:
    """What h11 makes of ``data``: the request, or None if it refuses or wants more."""
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    connection.receive_data(data)
    try:
        event = connection.next_event()
    except h11.RemoteProtocolError:
        return None
    return event if isinstance(event, h11.Request) else None


def test_a_browser_upgrade_is_taken_with_its_headers_as_h11_reads_them() -> None:
    head = parse_upgrade(UPGRADE)
    assert head is not None
    assert head.target == b"/ws?token=abc"
    assert head.key == b"dGhlIHNhbXBsZSBub25jZQ=="
    request = h11_request(UPGRADE)
    assert request is not None
    assert head.headers == [(name, value) for name, value in request.headers]


def test_requests_that_are_not_a_plain_upgrade_are_left_to_h11() -> None:
    declined = [
        UPGRADE.replace(b"GET", b"POST"),
        UPGRADE.replace(b"HTTP/1.1", b"HTTP/1.0"),
        UPGRADE.replace(b"Host: example.com\r\n", b""),  # h11 answers 400
        UPGRADE.replace(b"Host: example.com\r\n", b"Host: a\r\nHost: b\r\n"),
        UPGRADE.replace(b"Upgrade: websocket", b"Upgrade: h2c"),
        UPGRADE.replace(b"Connection: keep-alive, Upgrade", b"Connection: close"),
        UPGRADE.replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"),
        UPGRADE.replace(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b""),
        UPGRADE.replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\n"),
        UPGRADE.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n"),
        UPGRADE.replace(b"Origin:", b" Origin:"),  # obs-fold
        UPGRADE.replace(b"Origin:", b"Origin :"),
        UPGRADE.replace(b"Origin: https", b"Origin: \x00https"),
        UPGRADE.replace(b"Origin: https", b"Origin: \rhttps"),
        UPGRADE.replace(b"\r\nOrigin", b"\nOrigin"),
        UPGRADE.replace(b"/ws?", b"http://example.com/ws?"),  # absolute-form
        b"\r\n" + UPGRADE,
        UPGRADE[:-2],  # no end of head
    ]
    for data in declined:
        assert parse_upgrade(data) is None, data


HEADER_NAMES = st.sampled_from(
    [b"Host", b"host", b"Upgrade", b"Connection", b"Sec-WebSocket-Key", b"Sec-WebSocket-Version",
     b"Origin", b"Cookie", b"X-Custom", b"Content-Length", b"Transfer-Encoding", b"Bad Name",
     b"", b"Sec-WebSocket-Extensions", b"User-Agent"]
)  # fmt: skip
HEADER_VALUES = st.one_of(
    st.sampled_from([b"websocket", b"Upgrade", b"13", b"x", b"dGhlIHNhbXBsZSBub25jZQ==", b""]),
    st.from_regex(rb"[\x20-\x7e\x80-\xff\t]{0,12}", fullmatch=True),
    st.binary(max_size=12),
)


@settings(max_examples=2000, deadline=None)
@given(
    method=st.sampled_from([b"GET", b"GET", b"GET", b"POST", b"get"]),
    target=st.sampled_from([b"/ws", b"/ws?a=b", b"/ws", b"/", b"*", b"/w s", b"/\xff"]),
    version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2"]),
    headers=st.lists(st.tuples(HEADER_NAMES, st.sampled_from([b":", b": ", b":  "]), HEADER_VALUES,
                               st.sampled_from([b"", b" ", b"\t"])), max_size=4),
    base=st.booleans(),
)  # fmt: skip
def test_whatever_the_fast_path_takes_h11_takes_the_same_way(
    method: bytes,
    target: bytes,
    version: bytes,
    headers: list[tuple[bytes, bytes, bytes, bytes]],
    base: bool,
) -> None:
    lines = [method + b" " + target + b" " + version]
    if base:  # start from a valid upgrade, so that many generated requests are taken
        lines += UPGRADE.split(b"\r\n")[1:-2]
    lines += [name + colon + value + trail for name, colon, value, trail in headers]
    data = b"\r\n".join(lines) + b"\r\n\r\n"
    _agrees_with_h11(data)


@settings(max_examples=2000, deadline=None)
@given(
    extra=st.lists(
        st.tuples(
            st.sampled_from([b"Origin", b"Cookie", b"X-Custom", b"User-Agent", b"Upgrade",
                             b"Connection", b"Sec-WebSocket-Extensions", b"Accept-Encoding"]),
            st.from_regex(rb"[\x20-\x7e\x80-\xff\t]{0,24}", fullmatch=True),
        ),
        max_size=6,
    ),
    query=st.from_regex(rb"[\x21-\x7e]{0,20}", fullmatch=True),
)  # fmt: skip
def test_upgrades_with_any_printable_headers_are_read_as_h11_reads_them(
    extra: list[tuple[bytes, bytes]], query: bytes
) -> None:
    lines = [b"GET /ws?" + query + b" HTTP/1.1", *UPGRADE.split(b"\r\n")[1:-2]]
    lines += [name + b": " + value for name, value in extra]
    _agrees_with_h11(b"\r\n".join(lines) + b"\r\n\r\n")


def _agrees_with_h11(data: bytes) -> None:
    head = parse_upgrade(data)
    event("taken" if head is not None else "declined")
    if head is None:
        return
    request = h11_request(data)
    assert request is not None, data
    assert request.method == b"GET" and request.http_version == b"1.1"
    assert request.target == head.target
    assert [(name, value) for name, value in request.headers] == head.headers
    names = [name for name, _ in request.headers]
    assert b"content-length" not in names and b"transfer-encoding" not in names


def test_a_response_head_ends_with_its_blank_line() -> None:
    head = http_head(101, [(b"upgrade", b"websocket")])
    assert head == b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n"
    assert http_head(599, []) == b"HTTP/1.1 599 \r\n\r\n"


@settings(max_examples=500, deadline=None)
@given(
    headers=st.lists(
        st.tuples(
            st.sampled_from([b"origin", b"authorization", b"x-origin", b"cookie", b"origin2"]),
            st.from_regex(rb"[\x20-\x7e\x80-\xff]{0,12}", fullmatch=True),
        ),
        max_size=5,
    ),
    name=st.sampled_from(["origin", "authorization", "cookie", "missing"]),
)
def test_an_upgrade_requests_header_is_the_first_of_its_name(
    headers: list[tuple[bytes, bytes]], name: str
) -> None:
    request = UpgradeRequest.build("/ws", "", headers, "127.0.0.1:1")
    expected = next((value for key, value in request.headers if key == name), None)
    assert request.header(name) == expected
