r"""Server-Sent Events and newline-delimited JSON: one-way streams of events, sans I/O.

A stream follows the topics its URL names (``/sse?topic=orders&topic=deploys``)
and carries their events, each the native protocol's ``event`` envelope.
Two framings, one model:

* **SSE** (``text/event-stream``), for ``EventSource``: each event is an
  ``id:`` line and a ``data:`` line. The ``id`` holds the position of *every*
  topic of the stream, so the ``Last-Event-ID`` a browser sends when it
  reconnects by itself resumes all of them exactly::

      id: 412e1a7c:41,8b3964b5:7
      data: {"type":"event","topic":"orders","seq":41,"epoch":"412e1a7c",...}

  Control messages are named events (``event: reset``, ``join``, ``leave``,
  ``close``), so a page's ``onmessage`` sees topic events only.
* **NDJSON** (``application/x-ndjson``), for ``curl -N`` and programs: one JSON
  object per line, events as they are (they carry ``topic``, ``seq`` and
  ``epoch``: a client resumes with ``since``/``epoch``), resets as
  ``{"type":"reset",...}``.

**The id**: one ``<epoch>:<seq>`` per topic, in the order of the stream's
``topic`` parameters, joined by ``,`` (:func:`format_id`, :func:`parse_id`).
Each event is encoded once and shared by every SSE client
(:class:`EventBlock`), with the id of a stream of that one topic in front:
a one-topic stream writes those bytes as they are; a stream of several
writes its own id line, then the shared ``data:`` line (:class:`StreamIds`).
A stream starts with ``retry:`` and an id and no data (which sets the
browser's last event id without an event), so even a stream cut before its
first event resumes.

Everything a client sends is bounded here: topics per stream, the id
(:data:`MAX_SEQ_DIGITS` per offset, :data:`MAX_EPOCH_LENGTH` per epoch, one
segment per topic), the parameters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import parse_qsl

import attrs
import orjson

from .codes import ErrorCode
from .messages import Command, Error, Event, Position, PresenceChange, Reply
from .native import NativeDialect, presence_entry
from .topics import topic_problem

#: Query parameters a stream reads; any other is ignored (a cache buster, ``token``).
TOPIC: Final = "topic"
SINCE: Final = "since"
EPOCH: Final = "epoch"
LAST_EVENT_ID: Final = "lastEventId"
#: Digits an offset may have in a query or an id (offsets fit in 63 bits).
MAX_SEQ_DIGITS: Final = 19
MAX_EPOCH_LENGTH: Final = 64
_EPOCH: Final = re.compile(r"[0-9A-Za-z_-]{1,64}")
_SEGMENT: Final = re.compile(r"([0-9A-Za-z_-]{1,64}):([0-9]{1,19})")
#: Parameters a stream's query may have in all (topics, offsets, anything else).
MAX_PARAMETERS: Final = 1024

SSE: Final = "sse"
NDJSON: Final = "ndjson"


@attrs.frozen(slots=True)
class TopicRequest:
    """One topic of a stream, and where the client asks to resume it (if it does)."""

    topic: str
    since: int | None = None
    epoch: str | None = None


@attrs.frozen(slots=True)
class StreamRequest:
    """What a stream's URL (and ``Last-Event-ID``) asks for, checked."""

    topics: tuple[TopicRequest, ...]
    unreadable_id: bool = False
    """A ``Last-Event-ID`` was given that does not name this stream's topics: every
    topic starts afresh and is told so (``reset``)."""


class StreamProblem(ValueError):
    """Why a stream's request is refused (HTTP 400)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse_request(
    query: str, last_event_id: str | None = None, *, max_topics: int
) -> StreamRequest:
    """The topics of a stream and where to resume them.

    ``topic`` may be repeated; ``since`` and ``epoch`` apply to the ``topic``
    named before them (``?topic=a&since=4&epoch=412e1a7c&topic=b``). A
    ``Last-Event-ID`` (the header, or ``lastEventId`` in the query) replaces
    them all: it is where the client stopped, topic by topic.

    Raises:
        StreamProblem: no topic, too many, a repeated or invalid one, an offset
            or epoch that cannot be one, too many parameters.
    """
    try:
        pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=MAX_PARAMETERS)
    except ValueError:
        raise StreamProblem(
            ErrorCode.INVALID_FIELD, f"a stream's query has at most {MAX_PARAMETERS} parameters"
        ) from None
    topics: list[list[Any]] = []
    seen: set[str] = set()
    for name, value in pairs:
        if name == TOPIC:
            if len(topics) >= max_topics:
                raise StreamProblem(
                    ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                    f"a stream follows at most {max_topics} topics",
                )
            problem = topic_problem(value)
            if problem is not None:
                raise StreamProblem(ErrorCode.INVALID_TOPIC, problem)
            if value in seen:
                raise StreamProblem(ErrorCode.INVALID_FIELD, f"topic {value!r} is named twice")
            seen.add(value)
            topics.append([value, None, None])
        elif name in (SINCE, EPOCH):
            if not topics:
                raise StreamProblem(
                    ErrorCode.INVALID_FIELD, f"{name!r} applies to the topic before it: name one"
                )
            index = 1 if name == SINCE else 2
            if topics[-1][index] is not None:
                raise StreamProblem(
                    ErrorCode.INVALID_FIELD, f"{name!r} is given twice for topic {topics[-1][0]!r}"
                )
            topics[-1][index] = _offset(value) if name == SINCE else _epoch(value)
        elif name == LAST_EVENT_ID and last_event_id is None:
            last_event_id = value
    if not topics:
        raise StreamProblem(
            ErrorCode.MISSING_FIELD, "name at least one topic: ?topic=NAME (repeat for more)"
        )
    if last_event_id is not None and last_event_id != "":
        positions = parse_id(last_event_id, len(topics))
        if positions is None:
            return StreamRequest(tuple(TopicRequest(t[0]) for t in topics), unreadable_id=True)
        return StreamRequest(
            tuple(
                TopicRequest(t[0], p.seq, p.epoch) for t, p in zip(topics, positions, strict=True)
            )
        )
    return StreamRequest(tuple(TopicRequest(*t) for t in topics))


def _offset(value: str) -> int:
    if not (value.isdigit() and value.isascii() and len(value) <= MAX_SEQ_DIGITS):
        raise StreamProblem(
            ErrorCode.INVALID_FIELD, "'since' must be a non-negative integer (an offset)"
        )
    return int(value)


def _epoch(value: str) -> str:
    if not _EPOCH.fullmatch(value):
        raise StreamProblem(
            ErrorCode.INVALID_FIELD,
            f"'epoch' must be 1 to {MAX_EPOCH_LENGTH} letters, digits, '-' or '_'",
        )
    return value


def format_id(positions: Sequence[Position]) -> str:
    """The id naming these positions, one per topic in the stream's order."""
    return ",".join(f"{p.epoch}:{p.seq}" for p in positions)


def parse_id(text: str, topics: int) -> list[Position] | None:
    """The positions an id names, if it names ``topics`` of them; None if it cannot be read.

    Bounded before anything is split: an id longer than ``topics`` segments
    could be is not read at all.
    """
    if len(text) > topics * (MAX_EPOCH_LENGTH + MAX_SEQ_DIGITS + 2):
        return None
    segments = text.strip().split(",")
    if len(segments) != topics:
        return None
    positions = []
    for segment in segments:
        match = _SEGMENT.fullmatch(segment)
        if match is None:
            return None
        positions.append(Position(int(match[2]), match[1]))
    return positions


# --- what the transport writes ----------------------------------------------------------


class EventBlock(bytes):
    """An SSE block that moves one topic of the stream to a new position.

    Made once per event and shared by every SSE subscriber: ``id:`` with the
    topic's position alone, then the rest (``data: ...``, after ``head``
    bytes). A stream of that one topic writes it as it is; a stream of
    several writes its own id line (:class:`StreamIds`) and the rest.
    """

    topic: str
    segment: bytes
    """``<epoch>:<seq>`` of the position, as it goes into an id."""
    head: int
    """The length of the block's own id line."""


def _block(data: bytes, topic: str, position: Position, event: bytes = b"") -> EventBlock:
    segment = b"%s:%d" % (position.epoch.encode(), position.seq)
    line = b"id: " + segment + b"\n"
    block = EventBlock(line + event + b"data: " + data + b"\n\n")
    block.topic = topic
    block.segment = segment
    block.head = len(line)
    return block


class _Preamble(bytes):
    """Marks where the stream's first lines go: ``retry:`` and the starting id."""


class StreamIds:
    """One SSE stream's positions, and the bytes of what it writes.

    The connection queues :attr:`preamble` first, subscribes, then calls
    :meth:`begin` with where each topic starts; the transport hands every
    batch it writes to :meth:`render`, in order.
    """

    __slots__ = ("_index", "_segments", "preamble", "retry_ms")

    def __init__(self, topics: Sequence[str], retry_ms: int) -> None:
        self._index = {topic: i for i, topic in enumerate(topics)}
        self._segments: list[bytes] = [b""] * len(topics)
        self.retry_ms = retry_ms
        self.preamble: bytes = _Preamble()
        """An empty item to queue before anything else: written as ``retry:`` and the id."""

    def begin(self, positions: Sequence[Position]) -> None:
        """Where each topic starts (in the stream's order), before anything is written."""
        for i, position in enumerate(positions):
            self._segments[i] = b"%s:%d" % (position.epoch.encode(), position.seq)

    def render(self, items: Sequence[object]) -> bytes:
        """The bytes of a batch: each event with this stream's id, the rest as it is."""
        segments = self._segments
        start = b""
        if items and items[0] is self.preamble:  # the first item of the first batch
            start, items = self._start(), items[1:]
        if len(segments) == 1:
            # The shared blocks' own ids are this stream's: no byte is per client.
            for item in reversed(items):
                if type(item) is EventBlock:
                    segments[0] = item.segment
                    break
            return start + b"".join(items)  # type: ignore[arg-type]  # blocks are bytes
        parts: list[Any] = [start]
        append = parts.append
        index = self._index
        for item in items:
            if type(item) is EventBlock:
                segments[index[item.topic]] = item.segment
                append(b"id: " + b",".join(segments) + b"\n")
                append(memoryview(item)[item.head :])  # the shared rest, not copied first
            else:
                append(item)
        return b"".join(parts)

    def _start(self) -> bytes:
        if not all(self._segments):  # a stream closed before it could subscribe to all
            return b"retry: %d\n\n" % self.retry_ms
        return b"retry: %d\nid: %s\n\n" % (self.retry_ms, b",".join(self._segments))

    @property
    def current(self) -> str:
        """The id as it stands (what the last item written carried)."""
        return b",".join(self._segments).decode()


@attrs.frozen(slots=True)
class Reset:
    """A topic could not be resumed where the client asked: the stream carries on
    from ``position`` (``recovered: false``)."""

    topic: str
    position: Position


def reset_body(reset: Reset) -> dict[str, Any]:
    return {
        "type": "reset",
        "topic": reset.topic,
        "seq": reset.position.seq,
        "epoch": reset.position.epoch,
        "recovered": False,
    }


_NATIVE: Final = NativeDialect()


class _StreamDialect:
    """What SSE and NDJSON share: no commands in, the native envelope out."""

    text: Final = True

    def decode(self, frame: str | bytes) -> list[Command | Error]:
        # A stream's transport never hands over a message: a client cannot send any.
        return [Error(ErrorCode.UNSUPPORTED_FRAME, "a stream takes no messages")]

    def encode_reply(self, reply: Reply) -> bytes:
        return self._message(_NATIVE.encode_reply(reply))

    def _message(self, data: bytes) -> bytes:
        raise NotImplementedError


class SseDialect(_StreamDialect):
    """Events as ``data:`` blocks (each shared, its id line added per client); the
    rest as named events."""

    name: Final = "sse"

    def encode_event(self, event: Event) -> bytes:
        return _block(_NATIVE.encode_event(event), event.topic, Position(event.seq, event.epoch))

    def encode_presence(self, change: PresenceChange) -> bytes:
        body = {
            "type": change.kind,
            "topic": change.topic,
            "payload": presence_entry(change.client),
        }
        return b"event: %s\ndata: %s\n\n" % (change.kind.encode(), orjson.dumps(body))

    def encode_message(self, message: Any) -> bytes:
        if isinstance(message, Reset):
            return _block(orjson.dumps(reset_body(message)), message.topic, message.position,
                          b"event: reset\n")  # fmt: skip
        return self._message(orjson.dumps(message))

    def _message(self, data: bytes) -> bytes:
        return b"data: " + data + b"\n\n"


class NdjsonDialect(_StreamDialect):
    """One JSON object per line."""

    name: Final = "ndjson"

    def encode_event(self, event: Event) -> bytes:
        return _NATIVE.encode_event(event) + b"\n"

    def encode_presence(self, change: PresenceChange) -> bytes:
        return _NATIVE.encode_presence(change) + b"\n"

    def encode_message(self, message: Any) -> bytes:
        if isinstance(message, Reset):
            return orjson.dumps(reset_body(message)) + b"\n"
        return orjson.dumps(message) + b"\n"

    def _message(self, data: bytes) -> bytes:
        return data + b"\n"
