"""Streams on their own (SSE and NDJSON, ``tidings.protocol.sse``): no sockets, no trio.

The URL a stream is opened with, the id format that resumes every topic of a
stream, the lines the transport writes before each event, and the bounds on
everything a client controls.
"""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidings.protocol.codes import ErrorCode
from tidings.protocol.messages import Event, Pong, Position
from tidings.protocol.sse import (
    MAX_EPOCH_LENGTH,
    MAX_SEQ_DIGITS,
    EventBlock,
    NdjsonDialect,
    Reset,
    SseDialect,
    StreamIds,
    StreamProblem,
    StreamRequest,
    TopicRequest,
    format_id,
    parse_id,
    parse_request,
)


def event(topic: str, seq: int, epoch: str = "412e1a7c") -> Event:
    return Event(topic, seq, epoch, {"n": seq}, "2026-12-06T10:00:00.000Z", b'{"n":%d}' % seq)


# --- the URL --------------------------------------------------------------------------------


def test_since_and_epoch_apply_to_the_topic_named_before_them() -> None:
    request = parse_request(
        "topic=orders&since=41&epoch=412e1a7c&topic=deploys&token=x&_=123", max_topics=8
    )
    assert request == StreamRequest(
        (TopicRequest("orders", 41, "412e1a7c"), TopicRequest("deploys", None, None))
    )


def test_topics_are_url_decoded_and_keep_their_order() -> None:
    request = parse_request("topic=chat%3Alobby&topic=a%20b&topic=z", max_topics=8)
    assert [t.topic for t in request.topics] == ["chat:lobby", "a b", "z"]


@pytest.mark.parametrize(
    ("query", "code", "words"),
    [
        ("", ErrorCode.MISSING_FIELD, "at least one topic"),
        ("token=x", ErrorCode.MISSING_FIELD, "at least one topic"),
        ("since=3&topic=a", ErrorCode.INVALID_FIELD, "topic before it"),
        ("topic=a&topic=a", ErrorCode.INVALID_FIELD, "named twice"),
        ("topic=", ErrorCode.INVALID_TOPIC, "empty"),
        ("topic=a%0Ab", ErrorCode.INVALID_TOPIC, "control"),
        ("topic=" + "x" * 257, ErrorCode.INVALID_TOPIC, "longer than 256"),
        ("topic=a&since=-1", ErrorCode.INVALID_FIELD, "non-negative integer"),
        ("topic=a&since=1.5", ErrorCode.INVALID_FIELD, "non-negative integer"),
        ("topic=a&since=%D9%A3", ErrorCode.INVALID_FIELD, "non-negative integer"),  # Arabic 3
        ("topic=a&since=" + "9" * 20, ErrorCode.INVALID_FIELD, "non-negative integer"),
        ("topic=a&since=1&since=2", ErrorCode.INVALID_FIELD, "given twice"),
        ("topic=a&epoch=ab:cd", ErrorCode.INVALID_FIELD, "'epoch'"),
        ("topic=a&epoch=" + "e" * 65, ErrorCode.INVALID_FIELD, "'epoch'"),
        ("topic=a&topic=b&topic=c", ErrorCode.TOO_MANY_SUBSCRIPTIONS, "at most 2 topics"),
    ],
)
def test_a_request_that_cannot_be_served_says_why(query: str, code: str, words: str) -> None:
    with pytest.raises(StreamProblem) as caught:
        parse_request(query, max_topics=2)
    assert caught.value.code == code
    assert words in caught.value.message


def test_a_thousand_topics_are_refused_at_the_limit() -> None:
    query = "&".join(f"topic=t{i}" for i in range(1000))
    with pytest.raises(StreamProblem) as caught:
        parse_request(query, max_topics=32)
    assert caught.value.code == ErrorCode.TOO_MANY_SUBSCRIPTIONS
    assert "at most 32 topics" in caught.value.message


def test_a_query_of_too_many_parameters_is_refused() -> None:
    query = "topic=a&" + "&".join(f"x{i}=1" for i in range(2000))
    with pytest.raises(StreamProblem, match="at most 1024 parameters"):
        parse_request(query, max_topics=32)


def test_last_event_id_replaces_since_and_epoch_for_every_topic() -> None:
    # EventSource reconnects to the same URL, since= and all: the id must win.
    request = parse_request(
        "topic=orders&since=1&epoch=aaaa&topic=deploys", "412e1a7c:44,8b3964b5:7", max_topics=8
    )
    assert request == StreamRequest(
        (TopicRequest("orders", 44, "412e1a7c"), TopicRequest("deploys", 7, "8b3964b5"))
    )


def test_last_event_id_may_come_in_the_query_and_the_header_wins() -> None:
    query = "topic=a&lastEventId=e1%3A5"
    assert parse_request(query, max_topics=1).topics == (TopicRequest("a", 5, "e1"),)
    assert parse_request(query, "e2:9", max_topics=1).topics == (TopicRequest("a", 9, "e2"),)


@pytest.mark.parametrize(
    "given",
    [
        "garbage",
        "e1:5",  # one topic's position for a stream of two
        "e1:5,e2:6,e3:7",
        "e1:5,e2:-6",
        "e1:5,e2:" + "1" * (MAX_SEQ_DIGITS + 1),
        "e1:5," + "e" * (MAX_EPOCH_LENGTH + 1) + ":6",
        "e1:5,e/2:6",
        "x" * 1_000_000,
    ],
)
def test_an_id_that_does_not_name_the_streams_topics_resumes_nothing(given: str) -> None:
    request = parse_request("topic=a&since=3&topic=b", given, max_topics=8)
    assert request.unreadable_id
    assert request.topics == (TopicRequest("a"), TopicRequest("b"))


def test_an_empty_last_event_id_is_no_id() -> None:
    request = parse_request("topic=a&since=3", "", max_topics=8)
    assert request == StreamRequest((TopicRequest("a", 3),))


# --- the id ----------------------------------------------------------------------------------

positions = st.lists(
    st.builds(
        Position,
        st.integers(min_value=0, max_value=2**63 - 1),
        st.from_regex(r"[0-9A-Za-z_-]{1,64}", fullmatch=True),
    ),
    min_size=1,
    max_size=32,
)


@given(positions)
def test_every_id_reads_back_as_the_positions_it_names(named: list[Position]) -> None:
    assert parse_id(format_id(named), len(named)) == named


def test_an_id_is_short_and_readable() -> None:
    assert format_id([Position(41, "412e1a7c"), Position(7, "8b3964b5")]) == (
        "412e1a7c:41,8b3964b5:7"
    )


def test_each_event_carries_the_position_of_every_topic() -> None:
    dialect = SseDialect()
    ids = StreamIds(["orders", "deploys"], retry_ms=3000)
    ids.begin([Position(40, "412e1a7c"), Position(7, "8b3964b5")])
    first = dialect.encode_event(event("orders", 41))
    pong = dialect.encode_reply(Pong("x"))
    second = dialect.encode_event(event("deploys", 8, "8b3964b5"))
    written = ids.render([ids.preamble, first, pong, second])
    blocks = written.decode().split("\n\n")
    assert blocks[0] == "retry: 3000\nid: 412e1a7c:40,8b3964b5:7"
    assert blocks[1].startswith("id: 412e1a7c:41,8b3964b5:7\ndata: {")
    assert blocks[2].startswith("data: {") and '"pong"' in blocks[2]  # no id: nothing moved
    assert blocks[3].startswith("id: 412e1a7c:41,8b3964b5:8\ndata: {")
    assert ids.current == "412e1a7c:41,8b3964b5:8"
    # Later batches: no preamble again.
    third = dialect.encode_event(event("orders", 42))
    assert ids.render([third]).startswith(b"id: 412e1a7c:42,8b3964b5:8\ndata: ")


def test_a_stream_of_one_topic_writes_the_shared_bytes_as_they_are() -> None:
    dialect = SseDialect()
    ids = StreamIds(["orders"], retry_ms=1000)
    ids.begin([Position(40, "412e1a7c")])
    block = dialect.encode_event(event("orders", 41))
    written = ids.render([ids.preamble, block])
    assert written == b"retry: 1000\nid: 412e1a7c:40\n\n" + block
    assert block.startswith(b"id: 412e1a7c:41\ndata: ")
    assert ids.current == "412e1a7c:41"


def test_the_event_data_is_the_native_envelope_and_shared() -> None:
    block = SseDialect().encode_event(event("orders", 41))
    assert type(block) is EventBlock
    line, rest = block[: block.head], block[block.head :]
    assert line == b"id: 412e1a7c:41\n"
    assert rest.startswith(b"data: ") and rest.endswith(b"\n\n")
    assert b"event:" not in rest  # a plain message: the page's onmessage sees it
    body = orjson.loads(rest[len(b"data: ") : -2])
    assert body == {
        "type": "event",
        "topic": "orders",
        "seq": 41,
        "epoch": "412e1a7c",
        "payload": {"n": 41},
        "timestamp": "2026-12-06T10:00:00.000Z",
    }
    assert block.segment == b"412e1a7c:41"


def test_a_reset_is_a_named_event_that_moves_its_topic() -> None:
    dialect = SseDialect()
    block = dialect.encode_message(Reset("orders", Position(5, "412e1a7c")))
    assert block.startswith(b"id: 412e1a7c:5\nevent: reset\ndata: ")
    assert orjson.loads(block.split(b"data: ", 1)[1]) == {
        "type": "reset",
        "topic": "orders",
        "seq": 5,
        "epoch": "412e1a7c",
        "recovered": False,
    }
    ids = StreamIds(["orders", "other"], retry_ms=1)
    ids.begin([Position(0, "00000000"), Position(3, "e")])
    assert ids.render([block]).startswith(b"id: 412e1a7c:5,e:3\nevent: reset\n")


def test_ndjson_is_one_object_per_line() -> None:
    dialect = NdjsonDialect()
    line = dialect.encode_event(event("orders", 3))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert orjson.loads(line)["seq"] == 3
    reset = orjson.loads(dialect.encode_message(Reset("orders", Position(2, "e"))))
    assert reset == {"type": "reset", "topic": "orders", "seq": 2, "epoch": "e", "recovered": False}


def test_a_stream_takes_no_messages() -> None:
    (error,) = SseDialect().decode('{"type":"ping"}')
    assert error.code == ErrorCode.UNSUPPORTED_FRAME  # type: ignore[union-attr]


def test_a_stream_that_could_not_start_announces_no_id() -> None:
    ids = StreamIds(["a", "b"], retry_ms=1000)
    assert ids.render([ids.preamble]) == b"retry: 1000\n\n"
