"""The native dialect on its own: no sockets, no trio."""

from __future__ import annotations

import orjson
import pytest

from tidings.protocol.codes import ErrorCode
from tidings.protocol.messages import (
    Ack,
    Answer,
    Error,
    Event,
    Ping,
    Pong,
    Position,
    Publish,
    Published,
    Request,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
)
from tidings.protocol.native import NativeDialect

dialect = NativeDialect()


def decode_one(frame: str | bytes) -> object:
    (item,) = dialect.decode(frame)
    return item


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ({"type": "subscribe", "topic": "t"}, Subscribe("t")),
        (
            {
                "type": "subscribe",
                "topic": "t",
                "requestId": "r",
                "payload": {"since": 4, "epoch": "e"},
            },
            Subscribe("t", "r", 4, "e"),
        ),
        ({"type": "unsubscribe", "topic": "t", "requestId": 7}, Unsubscribe("t", 7)),
        ({"type": "publish", "topic": "t", "payload": [1, 2]}, Publish("t", [1, 2])),
        ({"type": "publish", "topic": "t", "payload": None}, Publish("t", None)),
        ({"type": "request", "topic": "t", "payload": {"a": 1}}, Request("t", {"a": 1})),
        ({"type": "request", "topic": "t"}, Request("t", None)),
        ({"type": "ack", "topic": "t", "seq": 3}, Ack("t", 3)),
        ({"type": "ping", "requestId": "p"}, Ping("p")),
        # Unknown fields are ignored: the dorgu seed's clients send a timestamp.
        ({"type": "ping", "timestamp": "2026-03-23T10:00:00Z", "x": 1}, Ping()),
    ],
)
def test_decodes_every_command(frame: dict[str, object], expected: object) -> None:
    assert decode_one(orjson.dumps(frame).decode()) == expected


@pytest.mark.parametrize(
    ("frame", "code", "words"),
    [
        ("not json", ErrorCode.INVALID_JSON, "not valid JSON"),
        ("", ErrorCode.INVALID_JSON, "not valid JSON"),
        ("[1, 2]", ErrorCode.INVALID_MESSAGE, "not list"),
        ("null", ErrorCode.INVALID_MESSAGE, "not null"),
        ('"subscribe"', ErrorCode.INVALID_MESSAGE, "not str"),
        ("{}", ErrorCode.MISSING_FIELD, "'type'"),
        ('{"type": 5}', ErrorCode.INVALID_FIELD, "'type' must be a string"),
        ('{"type": "launch"}', ErrorCode.UNKNOWN_TYPE, "unknown type 'launch'"),
        ('{"type": "subscribe"}', ErrorCode.MISSING_FIELD, "'topic'"),
        ('{"type": "subscribe", "topic": ["a"]}', ErrorCode.INVALID_FIELD, "'topic'"),
        ('{"type": "subscribe", "topic": ""}', ErrorCode.INVALID_TOPIC, "empty"),
        ('{"type": "subscribe", "topic": "a\\u0000b"}', ErrorCode.INVALID_TOPIC, "control"),
        ('{"type": "subscribe", "topic": "' + "x" * 300 + '"}', ErrorCode.INVALID_TOPIC, "longer"),
        ('{"type": "subscribe", "topic": "t", "payload": 3}', ErrorCode.INVALID_FIELD, "'payload'"),
        (
            '{"type": "subscribe", "topic": "t", "payload": {"since": -1}}',
            ErrorCode.INVALID_FIELD,
            "payload.since",
        ),
        (
            '{"type": "subscribe", "topic": "t", "payload": {"since": true}}',
            ErrorCode.INVALID_FIELD,
            "payload.since",
        ),
        (
            '{"type": "subscribe", "topic": "t", "payload": {"epoch": 1}}',
            ErrorCode.INVALID_FIELD,
            "payload.epoch",
        ),
        ('{"type": "publish", "topic": "t"}', ErrorCode.MISSING_FIELD, "'payload'"),
        ('{"type": "ack", "topic": "t"}', ErrorCode.MISSING_FIELD, "'seq'"),
        ('{"type": "ack", "topic": "t", "seq": "3"}', ErrorCode.INVALID_FIELD, "'seq'"),
        ('{"type": "ping", "requestId": [1]}', ErrorCode.INVALID_FIELD, "'requestId'"),
        ('{"type": "ping", "requestId": true}', ErrorCode.INVALID_FIELD, "'requestId'"),
    ],
)
def test_every_malformed_frame_becomes_an_error(frame: str, code: ErrorCode, words: str) -> None:
    error = decode_one(frame)
    assert isinstance(error, Error)
    assert error.code == code
    assert words in error.message


def test_binary_frames_are_an_error_not_a_crash() -> None:
    error = decode_one(b'{"type": "ping"}')
    assert isinstance(error, Error)
    assert error.code == ErrorCode.UNSUPPORTED_FRAME


def test_errors_echo_request_id_and_topic_when_known() -> None:
    error = decode_one('{"type": "subscribe", "topic": "t", "requestId": "r1", "payload": 1}')
    assert isinstance(error, Error)
    assert (error.request_id, error.topic) == ("r1", "t")
    frame = orjson.loads(dialect.encode_reply(error))
    assert frame["type"] == "error"
    assert frame["requestId"] == "r1"
    assert frame["topic"] == "t"
    assert frame["payload"] == {"code": "invalid_field", "message": error.message}


def test_event_frame_carries_every_field_and_the_payload_as_published() -> None:
    payload = {"step": "build", "nested": {"n": [1, 2.5, None]}}
    event = Event("deploys", 12, "ab12", payload, "2026-03-23T10:00:00.000Z", orjson.dumps(payload))
    assert orjson.loads(dialect.encode_event(event)) == {
        "type": "event",
        "topic": "deploys",
        "seq": 12,
        "epoch": "ab12",
        "payload": payload,
        "timestamp": "2026-03-23T10:00:00.000Z",
    }


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (
            Subscribed("t", "r", Position(5, "e")),
            {"status": "subscribed", "topic": "t", "seq": 5, "epoch": "e"},
        ),
        (
            Subscribed("t", "r", Position(5, "e"), recovered=False, replayed=2),
            {
                "status": "subscribed",
                "topic": "t",
                "seq": 5,
                "epoch": "e",
                "recovered": False,
                "replayed": 2,
            },
        ),
        (Unsubscribed("t", "r"), {"status": "unsubscribed", "topic": "t"}),
        (Published("t", "r", Position(6, "e")), {"status": "published", "seq": 6, "epoch": "e"}),
        (Answer("t", "r", {"answer": 42}), {"answer": 42}),
    ],
)
def test_responses(reply: object, expected: dict[str, object]) -> None:
    frame = orjson.loads(dialect.encode_reply(reply))  # type: ignore[arg-type]
    assert frame["type"] == "response"
    assert frame["requestId"] == "r"
    assert frame["topic"] == "t"
    assert frame["payload"] == expected
    assert frame["timestamp"].endswith("Z")


def test_pong_without_request_id_has_none() -> None:
    frame = orjson.loads(dialect.encode_reply(Pong()))
    assert frame["type"] == "pong"
    assert "requestId" not in frame
