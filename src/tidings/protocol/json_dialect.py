"""A dialect for applications whose protocol is JSON objects of their own shape.

Everything a client sends becomes an :class:`~tidings.protocol.messages.AppMessage`
named by one field (``type`` unless told otherwise), for the endpoint's
handlers; every event goes out as its payload, as published. So the
application publishes whole frames (``{"type": "deploy.step", "appId": ...}``)
and the broker still sequences, bounds and fans them out, encoding each once.

The pieces that differ between protocols are parameters: which field names a
message, how errors and pongs look. Each seed system in ``examples/`` is one
instance of this class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from .codes import ErrorCode
from .messages import AppMessage, Command, Error, Event, PresenceChange, Reply

KindOf = Callable[[dict[str, Any]], str | None]
ErrorEncoder = Callable[[Error], Any]


def kind_from_field(field: str) -> KindOf:
    """Messages are named by ``field`` (``{"type": "init", ...}``)."""

    def kind_of(message: dict[str, Any]) -> str | None:
        kind = message.get(field)
        return kind if isinstance(kind, str) and kind else None

    return kind_of


def plain_error(error: Error) -> dict[str, Any]:
    """``{"type": "error", "code": ..., "message": ...}`` (plus ``requestId`` if any)."""
    frame: dict[str, Any] = {"type": "error", "code": error.code, "message": error.message}
    if error.request_id is not None:
        frame["requestId"] = error.request_id
    return frame


class JsonDialect:
    """JSON text frames of an application's own shapes.

    Args:
        name: for logs and ``ClientInfo.dialect``.
        kind_of: names the handler of an incoming object (None: unknown).
        encode_error: the frame for an error (a refused message, a rate limit).
        max_batch: a frame may hold a JSON array of messages, at most this many
            (0: one object per frame only).
    """

    text = True

    def __init__(
        self,
        name: str,
        *,
        kind_of: KindOf | None = None,
        encode_error: ErrorEncoder = plain_error,
        max_batch: int = 0,
    ) -> None:
        self.name = name
        self.kind_of = kind_of or kind_from_field("type")
        self.error_frame = encode_error
        self.max_batch = max_batch

    def decode(self, frame: str | bytes) -> list[Command | Error]:
        if isinstance(frame, bytes) and not self.text:
            return [Error(ErrorCode.UNSUPPORTED_FRAME, "binary frames are not accepted")]
        try:
            value = orjson.loads(frame)
        except orjson.JSONDecodeError:
            return [Error(ErrorCode.INVALID_JSON, "the message is not valid JSON")]
        items = value if isinstance(value, list) and self.max_batch else [value]
        if len(items) > max(self.max_batch, 1):
            return [Error(ErrorCode.INVALID_MESSAGE, f"at most {self.max_batch} messages a frame")]
        decoded: list[Command | Error] = []
        for item in items:
            if not isinstance(item, dict):
                decoded.append(Error(ErrorCode.INVALID_MESSAGE, "a message is a JSON object"))
                continue
            request_id = item.get("requestId")
            if not isinstance(request_id, str | int) or isinstance(request_id, bool):
                request_id = None
            kind = self.kind_of(item)
            if kind is None:
                decoded.append(
                    Error(ErrorCode.UNKNOWN_TYPE, "the message names no known type", request_id)
                )
                continue
            decoded.append(AppMessage(kind, item, request_id))
        return decoded

    def encode_event(self, event: Event) -> bytes:
        # The application published the whole frame; it was serialized once.
        return event.payload_json or orjson.dumps(event.payload)

    def encode_presence(self, change: PresenceChange) -> bytes:
        return orjson.dumps(
            {
                "type": change.kind,
                "topic": change.topic,
                "client": change.client.id,
                "user": change.client.user,
            }
        )

    def encode_reply(self, reply: Reply) -> bytes:
        if isinstance(reply, Error):
            return orjson.dumps(self.error_frame(reply))
        # Tidings commands are not decoded by this dialect, so only errors reply.
        return orjson.dumps({"type": type(reply).__name__.lower()})

    def encode_message(self, message: Any) -> bytes:
        return orjson.dumps(message)
