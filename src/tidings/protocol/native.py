"""The native tidings dialect: one JSON object per text frame.

Envelope (``docs/protocol.md`` is the reference)::

    {"type": ..., "topic": ..., "requestId": ..., "payload": ...,
     "seq": ..., "epoch": ..., "timestamp": ...}

Decoding never raises: every malformed frame becomes an :class:`Error` with a
stable code and a message a human can act on. Unknown fields are ignored so
that clients may add their own (the dorgu seed sends ``timestamp``).
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from .clock import rfc3339_now
from .codes import ErrorCode
from .idempotency import idempotency_key_problem
from .messages import (
    Ack,
    Acked,
    Answer,
    ClientInfo,
    Command,
    Error,
    Event,
    Ping,
    Pong,
    PresenceChange,
    PresenceList,
    PresenceQuery,
    Publish,
    Published,
    Refresh,
    Refreshed,
    Reply,
    Request,
    RequestId,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
)
from .topics import topic_problem

MAX_REQUEST_ID_LENGTH: Final = 256
COMMAND_TYPES: Final = (
    "subscribe",
    "unsubscribe",
    "publish",
    "request",
    "ack",
    "ping",
    "presence",
    "refresh",
)


def presence_entry(client: ClientInfo) -> dict[str, Any]:
    """How presence, join and leave show a client."""
    return {
        "client": client.id,
        "user": client.user,
        "tenant": client.tenant,
        "connectedAt": rfc3339_now(client.connected_at),
    }


class _Invalid(Exception):
    """Raised inside the decoder; always turned into an :class:`Error`."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _is_int(value: object) -> bool:
    # bool is an int subclass, but ``true`` is not an offset.
    return type(value) is int


class NativeDialect:
    """Codec for the native protocol. Stateless: one instance serves every connection."""

    name: Final = "native"
    text: Final = True

    # --- decoding -----------------------------------------------------------

    def decode(self, frame: str | bytes) -> list[Command | Error]:
        """Turn one WebSocket message into the command it carries, or an error."""
        if not isinstance(frame, str):
            return [
                Error(
                    ErrorCode.UNSUPPORTED_FRAME,
                    "binary frames are not part of this protocol; send JSON in a text frame",
                )
            ]
        try:
            message = orjson.loads(frame)
        except orjson.JSONDecodeError as exc:
            return [Error(ErrorCode.INVALID_JSON, f"frame is not valid JSON: {exc.msg}")]
        if not isinstance(message, dict):
            kind = type(message).__name__ if message is not None else "null"
            return [Error(ErrorCode.INVALID_MESSAGE, f"frame must be a JSON object, not {kind}")]

        request_id: RequestId = None
        topic: str | None = None
        try:
            request_id = self._request_id(message)
            kind_value = message.get("type")
            if kind_value is None:
                raise _Invalid(ErrorCode.MISSING_FIELD, "field 'type' is required")
            if not isinstance(kind_value, str):
                raise _Invalid(ErrorCode.INVALID_FIELD, "field 'type' must be a string")
            kind = kind_value
            if kind == "ping":
                return [Ping(request_id)]
            if kind == "refresh":
                return [self._refresh(message, request_id)]
            if kind not in COMMAND_TYPES:
                raise _Invalid(
                    ErrorCode.UNKNOWN_TYPE,
                    f"unknown type {kind[:64]!r}; expected one of {', '.join(COMMAND_TYPES)}",
                )
            topic = self._topic(message)
            return [self._command(kind, topic, request_id, message)]
        except _Invalid as exc:
            return [Error(exc.code, exc.message, request_id, topic)]

    @staticmethod
    def _request_id(message: dict[str, Any]) -> RequestId:
        request_id = message.get("requestId")
        if request_id is None:
            return None
        if isinstance(request_id, str):
            if len(request_id) > MAX_REQUEST_ID_LENGTH:
                raise _Invalid(
                    ErrorCode.INVALID_FIELD,
                    f"field 'requestId' must be at most {MAX_REQUEST_ID_LENGTH} characters",
                )
            return request_id
        if _is_int(request_id):
            return int(request_id)
        raise _Invalid(ErrorCode.INVALID_FIELD, "field 'requestId' must be a string or an integer")

    @staticmethod
    def _topic(message: dict[str, Any]) -> str:
        topic = message.get("topic")
        if topic is None:
            raise _Invalid(ErrorCode.MISSING_FIELD, "field 'topic' is required")
        if not isinstance(topic, str):
            raise _Invalid(ErrorCode.INVALID_FIELD, "field 'topic' must be a string")
        problem = topic_problem(topic)
        if problem is not None:
            raise _Invalid(ErrorCode.INVALID_TOPIC, problem)
        return topic

    @staticmethod
    def _refresh(message: dict[str, Any], request_id: RequestId) -> Refresh:
        payload = message.get("payload")
        if not isinstance(payload, dict):
            raise _Invalid(ErrorCode.MISSING_FIELD, "field 'payload.token' is required")
        token = payload.get("token")
        if token is None:
            raise _Invalid(ErrorCode.MISSING_FIELD, "field 'payload.token' is required")
        if not isinstance(token, str):
            raise _Invalid(ErrorCode.INVALID_FIELD, "field 'payload.token' must be a string")
        return Refresh(token, request_id)

    @staticmethod
    def _command(kind: str, topic: str, request_id: RequestId, message: dict[str, Any]) -> Command:
        if kind == "subscribe":
            payload = message.get("payload")
            if payload is None:
                return Subscribe(topic, request_id)
            if not isinstance(payload, dict):
                raise _Invalid(ErrorCode.INVALID_FIELD, "field 'payload' must be an object")
            since = payload.get("since")
            if since is not None and not (_is_int(since) and since >= 0):
                raise _Invalid(
                    ErrorCode.INVALID_FIELD, "field 'payload.since' must be a non-negative integer"
                )
            epoch = payload.get("epoch")
            if epoch is not None and not isinstance(epoch, str):
                raise _Invalid(ErrorCode.INVALID_FIELD, "field 'payload.epoch' must be a string")
            return Subscribe(topic, request_id, since, epoch)
        if kind == "unsubscribe":
            return Unsubscribe(topic, request_id)
        if kind == "publish":
            if "payload" not in message:
                raise _Invalid(ErrorCode.MISSING_FIELD, "field 'payload' is required")
            key = message.get("idempotencyKey")
            if key is not None and (problem := idempotency_key_problem(key)) is not None:
                raise _Invalid(ErrorCode.INVALID_FIELD, f"field 'idempotencyKey' {problem}")
            return Publish(topic, message["payload"], request_id, key)
        if kind == "request":
            return Request(topic, message.get("payload"), request_id)
        if kind == "presence":
            return PresenceQuery(topic, request_id)
        # ack
        seq = message.get("seq")
        if seq is None:
            raise _Invalid(ErrorCode.MISSING_FIELD, "field 'seq' is required")
        if not (_is_int(seq) and seq >= 0):
            raise _Invalid(ErrorCode.INVALID_FIELD, "field 'seq' must be a non-negative integer")
        return Ack(topic, seq, request_id)

    # --- encoding -----------------------------------------------------------

    def encode_event(self, event: Event) -> bytes:
        """The ``event`` frame for one event; called once per event, shared by subscribers."""
        return orjson.dumps(
            {
                "type": "event",
                "topic": event.topic,
                "seq": event.seq,
                "epoch": event.epoch,
                "payload": orjson.Fragment(event.payload_json),
                "timestamp": event.timestamp,
            }
        )

    def encode_presence(self, change: PresenceChange) -> bytes:
        """A ``join`` or ``leave`` frame."""
        return orjson.dumps(
            {
                "type": change.kind,
                "topic": change.topic,
                "payload": presence_entry(change.client),
                "timestamp": rfc3339_now(),
            }
        )

    def encode_message(self, message: Any) -> bytes:
        """An application's own frame to one client: the JSON value as it is."""
        return orjson.dumps(message)

    def encode_reply(self, reply: Reply) -> bytes:
        """The frame answering one command."""
        frame: dict[str, Any]
        if isinstance(reply, Subscribed):
            body: dict[str, Any] = {
                "status": "subscribed",
                "topic": reply.topic,
                "seq": reply.position.seq,
                "epoch": reply.position.epoch,
            }
            if reply.recovered is not None:
                body["recovered"] = reply.recovered
                body["replayed"] = reply.replayed
            frame = {"type": "response", "topic": reply.topic, "payload": body}
        elif isinstance(reply, Published):
            frame = {
                "type": "response",
                "topic": reply.topic,
                "payload": {
                    "status": "published",
                    "seq": reply.position.seq,
                    "epoch": reply.position.epoch,
                },
            }
        elif isinstance(reply, Unsubscribed):
            frame = {
                "type": "response",
                "topic": reply.topic,
                "payload": {"status": "unsubscribed", "topic": reply.topic},
            }
        elif isinstance(reply, Acked):
            frame = {
                "type": "response",
                "topic": reply.topic,
                "payload": {"status": "acked", "seq": reply.seq},
            }
        elif isinstance(reply, PresenceList):
            frame = {
                "type": "response",
                "topic": reply.topic,
                "payload": {"clients": [presence_entry(client) for client in reply.clients]},
            }
        elif isinstance(reply, Refreshed):
            frame = {
                "type": "response",
                "payload": {"status": "refreshed", "expiresAt": reply.expires_at},
            }
        elif isinstance(reply, Answer):
            frame = {"type": "response", "topic": reply.topic, "payload": reply.payload}
        elif isinstance(reply, Pong):
            frame = {"type": "pong"}
        else:
            frame = {
                "type": "error",
                "payload": {"code": str(reply.code), "message": reply.message},
            }
            if reply.topic is not None:
                frame["topic"] = reply.topic
        if reply.request_id is not None:
            frame["requestId"] = reply.request_id
        frame["timestamp"] = rfc3339_now()
        return orjson.dumps(frame)
