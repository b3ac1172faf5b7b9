"""The backplane's RESP2 parser and encoder, alone and fuzzed (no server needed).

The parser reads whatever a Redis connection delivers, split wherever the
kernel split it; a bug there loses or invents events. Properties checked with
hypothesis: any reply encoded and fed in any split comes back equal; arbitrary
bytes never raise anything but ProtocolError, and never grow the buffer past
its bound; nesting and sizes beyond the bounds are refused. A few Redis
replies captured from redis-server 7.0 are checked literally.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidings.backplane.link import key_slot, parse_cluster_slots
from tidings.backplane.resp import Parser, ProtocolError, ReplyError, Value, command


def encode(value: Value) -> bytes:
    """A reference encoder of replies, written the obvious way."""
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, ReplyError):
        return b"-" + str(value).encode() + b"\r\n"
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    return b"*%d\r\n" % len(value) + b"".join(encode(item) for item in value)


def same(a: Value, b: Value) -> bool:
    if isinstance(a, ReplyError) or isinstance(b, ReplyError):
        return type(a) is type(b) and str(a) == str(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


errors = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=40,
).map(ReplyError)
scalars: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.binary(max_size=300),
    errors,
)
replies = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6), max_leaves=30)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    pieces, start = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[start:point])
        start = point
    return pieces


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(replies, min_size=1, max_size=8), st.lists(st.integers(0, 4000), max_size=12))
def test_replies_come_back_whatever_the_split(values: list[Value], cuts: list[int]) -> None:
    data = b"".join(encode(value) for value in values)
    parser = Parser()
    parsed: list[Value] = []
    for piece in split(data, cuts):
        parser.feed(piece)
        parsed.extend(parser.replies())
    assert len(parsed) == len(values)
    assert all(same(a, b) for a, b in zip(parsed, values, strict=True)), (parsed, values)
    assert len(parser) == 0


@settings(max_examples=300)
@given(st.lists(replies, min_size=1, max_size=5), st.integers(1, 5))
def test_a_limit_takes_replies_in_order_and_leaves_the_rest(
    values: list[Value], limit: int
) -> None:
    parser = Parser()
    parser.feed(b"".join(encode(value) for value in values))
    first = parser.replies(limit)
    rest = parser.replies()
    assert len(first) == min(limit, len(values))
    assert all(same(a, b) for a, b in zip(first + rest, values, strict=True))


@settings(max_examples=1000)
@given(st.lists(st.binary(max_size=200), max_size=10))
def test_arbitrary_bytes_parse_or_raise_protocol_error_only(pieces: list[bytes]) -> None:
    parser = Parser(max_reply=4096)
    for piece in pieces:
        parser.feed(piece)
        try:
            parser.replies()
        except ProtocolError:
            return  # the connection would be dropped here
        assert len(parser) <= 4096 + 200  # an incomplete reply stays within the bound


@settings(max_examples=300)
@given(replies, st.binary(min_size=1, max_size=50))
def test_garbage_after_a_good_reply_does_not_change_it(value: Value, garbage: bytes) -> None:
    parser = Parser()
    parser.feed(encode(value) + garbage)
    try:
        found = parser.replies()
    except ProtocolError:
        # Only the garbage may be refused: the good reply alone parses.
        alone = Parser()
        alone.feed(encode(value))
        (reply,) = alone.replies()
        assert same(reply, value)
        return
    assert found and same(found[0], value)


@pytest.mark.parametrize(
    "data",
    [
        b"?what\r\n",  # an unknown type
        b"$-2\r\n",  # a negative length other than -1
        b"*-5\r\n",
        b"$3\r\nabcd\r\n",  # the bulk string is longer than it says
        b":12a\r\n",  # not a number
        b": 12\r\n",
        b":+1\r\n",
        b":1_0\r\n",
        b"$\r\n",
        b"\r\n",
        b":" + b"9" * 30 + b"\r\n",  # more than 64 bits
    ],
)
def test_malformed_replies_are_protocol_errors(data: bytes) -> None:
    parser = Parser()
    parser.feed(data)
    with pytest.raises(ProtocolError):
        parser.replies()


def test_bounds_refuse_what_would_grow_without_end() -> None:
    parser = Parser(max_reply=1000)
    parser.feed(b"$1001\r\n")
    with pytest.raises(ProtocolError):  # refused from its header, before the bytes come
        parser.replies()
    parser = Parser(max_reply=1000)
    parser.feed(b"*10000\r\n")
    with pytest.raises(ProtocolError):
        parser.replies()
    parser = Parser(max_reply=1000)
    parser.feed(b"*2\r\n" + b"$600\r\n" + b"x" * 600 + b"\r\n" + b"$600\r\n" + b"x" * 500)
    with pytest.raises(ProtocolError):  # each part is within the bound, the reply is not
        parser.replies()
    parser = Parser(max_depth=3)
    parser.feed(b"*1\r\n" * 4 + b":1\r\n")
    with pytest.raises(ProtocolError):
        parser.replies()
    parser = Parser()
    parser.feed(b"+" + b"x" * 70_000)  # a line that never ends
    with pytest.raises(ProtocolError):
        parser.replies()


def test_what_redis_sends() -> None:
    """Replies as redis-server 7.0 wrote them (pub/sub, a script's answer, errors)."""
    parser = Parser()
    parser.feed(
        b"*3\r\n$10\r\nssubscribe\r\n$19\r\ntidings:topic:{abc}\r\n:1\r\n"
        b"*3\r\n$8\r\nsmessage\r\n$19\r\ntidings:topic:{abc}\r\n$6\r\nbefore\r\n"
        b"*3\r\n$12\r\nsunsubscribe\r\n$19\r\ntidings:topic:{abc}\r\n:0\r\n"
        b"*2\r\n:42\r\n$8\r\n1a2b3c4d\r\n"
        b"-MOVED 7638 127.0.0.1:17003\r\n"
        b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"
        b"+OK\r\n*-1\r\n"
    )
    found = parser.replies()
    assert found[:4] == [
        [b"ssubscribe", b"tidings:topic:{abc}", 1],
        [b"smessage", b"tidings:topic:{abc}", b"before"],
        [b"sunsubscribe", b"tidings:topic:{abc}", 0],
        [42, b"1a2b3c4d"],
    ]
    moved = found[4]
    assert isinstance(moved, ReplyError) and moved.kind == "MOVED"
    assert found[5:] == [[b"pong", b""], b"OK", None]


def test_commands_are_arrays_of_bulk_strings() -> None:
    assert command("SET", b"k\r\n", 12) == b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n"
    assert command("EVALSHA", "é") == b"*2\r\n$7\r\nEVALSHA\r\n$2\r\n\xc3\xa9\r\n"
    with pytest.raises(TypeError):
        command("SET", 1.5)  # type: ignore[arg-type]
    # What the encoder writes, the parser reads back (as Redis would).
    parser = Parser()
    parser.feed(command("a", b"\x00\xff", 7))
    assert parser.replies() == [[b"a", b"\x00\xff", b"7"]]


def test_cluster_slots_and_key_slots() -> None:
    # CLUSTER KEYSLOT answers of redis-server 7.0 for these keys.
    assert key_slot(b"123456789") == 12739
    assert key_slot(b"foo") == 12182
    assert key_slot(b"tidings:topic:{abc}") == key_slot(b"abc") == 7638
    assert key_slot(b"{}x") == key_slot(b"{}x")  # an empty tag hashes the whole key
    reply: Value = [
        [0, 5460, [b"127.0.0.1", 17001, b"a7809e7b"]],
        [5461, 10922, [b"127.0.0.1", 17002, b"d5e33e45"], [b"127.0.0.1", 17005, b"r"]],
    ]
    assert parse_cluster_slots(reply) == [
        (0, 5460, ("127.0.0.1", 17001)),
        (5461, 10922, ("127.0.0.1", 17002)),
    ]
    with pytest.raises(ProtocolError):
        parse_cluster_slots([[0, 1]])
