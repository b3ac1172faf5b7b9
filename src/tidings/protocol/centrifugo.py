"""Centrifugo's bidirectional JSON client protocol, as a sans-IO codec.

What the unmodified Centrifugo SDKs (centrifuge-js, centrifuge-python, ...)
send and expect over a WebSocket, checked against their source
(``docs/centrifugo.md`` has the frames and the code mappings):

* a client frame holds one or more commands, one JSON object per line:
  ``{"id": 3, "subscribe": {"channel": "news"}}``; ``send`` carries no id;
  a command with no id (``{}``) is a pong;
* the server answers each command with ``{"id": 3, "subscribe": {...}}`` or
  ``{"id": 3, "error": {"code": 103, "message": "..."}}``; the answers to the
  commands of one frame go out in one frame, one per line;
* pushes have no id: ``{"push": {"channel": "news", "pub": {...}}}``;
* the server pings with ``{}``.

This module turns frames into :class:`~tidings.protocol.messages.AppMessage`
values named by the command's method (the endpoint in
:mod:`tidings.endpoints.centrifugo` handles them) and builds every frame the server
sends. A frame that breaks the protocol decodes to a message of kind
:data:`BAD_REQUEST`, after the commands before it: the endpoint closes the
connection with 3501, as Centrifugo does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import IntEnum
from typing import Any, Final

import orjson

from .codes import ErrorCode
from .messages import AppMessage, Command, Error, Event, PresenceChange, Reply

METHODS: Final = frozenset(
    {
        "connect",
        "subscribe",
        "unsubscribe",
        "publish",
        "presence",
        "presence_stats",
        "history",
        "ping",
        "send",
        "rpc",
        "refresh",
        "sub_refresh",
    }
)
"""The request keys of a command (protocol v2, JSON)."""

PONG: Final = "_pong"
"""Kind of a command without an id (other than ``send``): the answer to a ping."""
BAD_REQUEST: Final = "_bad_request"
"""Kind of what broke the protocol (``body["reason"]`` says what): close with 3501."""

PING: Final = b"{}"
"""The server's ping frame."""

MAX_COMMAND_ID: Final = 2**32 - 1


class DisconnectCode(IntEnum):
    """Centrifugo's close codes that tidings sends itself on this protocol.

    Every other close keeps tidings' code (``docs/centrifugo.md`` says how
    the SDKs take each one: 3000-3499 and 4000-4499 reconnect, 3500-3999 and
    4500-4999 stop, others reconnect).
    """

    INVALID_TOKEN = 3500
    BAD_REQUEST = 3501
    STALE = 3502
    """No ``connect`` within ``connect_timeout`` of the upgrade."""
    CONNECTION_LIMIT = 3504


class CentrifugoError:
    """Error codes of Centrifugo that no :class:`ErrorCode` means (strings, as
    :class:`~tidings.protocol.messages.Error` carries them)."""

    NOT_AVAILABLE = "centrifugo_not_available"  # 108: history or presence off
    TOKEN_EXPIRED = "centrifugo_token_expired"  # 109: get a new token
    UNRECOVERABLE_POSITION = "centrifugo_unrecoverable_position"  # 112


#: tidings' error codes (and the Centrifugo-only ones above) -> (Centrifugo code, temporary).
ERROR_CODES: Final[Mapping[str, tuple[int, bool]]] = {
    ErrorCode.INVALID_JSON: (107, False),
    ErrorCode.INVALID_MESSAGE: (107, False),
    ErrorCode.UNSUPPORTED_FRAME: (107, False),
    ErrorCode.UNKNOWN_TYPE: (107, False),
    ErrorCode.MISSING_FIELD: (107, False),
    ErrorCode.INVALID_FIELD: (107, False),
    ErrorCode.INVALID_TOPIC: (107, False),
    ErrorCode.UNKNOWN_TOPIC: (102, False),
    ErrorCode.UNKNOWN_NAMESPACE: (102, False),
    ErrorCode.FORBIDDEN: (103, False),
    ErrorCode.NOT_SUBSCRIBED: (103, False),
    ErrorCode.ALREADY_SUBSCRIBED: (105, False),
    ErrorCode.TOO_MANY_SUBSCRIPTIONS: (106, False),
    ErrorCode.TOO_MANY_TOPICS: (106, False),
    ErrorCode.TOO_MANY_CONNECTIONS: (106, False),
    ErrorCode.UNAUTHORIZED: (101, False),
    ErrorCode.NOT_FOUND: (104, False),
    ErrorCode.RATE_LIMITED: (111, True),
    ErrorCode.REQUEST_FAILED: (100, True),
    ErrorCode.REQUEST_TIMEOUT: (100, True),
    ErrorCode.UNAVAILABLE: (100, True),
    # It may have been published: not 'temporary', so nothing retries it blindly.
    ErrorCode.UNCONFIRMED: (100, False),
    ErrorCode.IDEMPOTENCY_CONFLICT: (107, False),
    CentrifugoError.NOT_AVAILABLE: (108, False),
    CentrifugoError.TOKEN_EXPIRED: (109, False),
    CentrifugoError.UNRECOVERABLE_POSITION: (112, False),
}

#: An application's own error code (a request handler's RequestError) that is
#: not a number: Centrifugo's 'internal server error', the code kept in the message.
APPLICATION_ERROR: Final = 100


def centrifugo_error(code: str) -> tuple[int, bool, bool]:
    """``(centrifugo code, temporary, known)`` for one of tidings' error codes.

    An application's numeric code (``RequestError("4004", ...)``) is passed on
    as that number; any other unknown code becomes :data:`APPLICATION_ERROR`
    (``known`` is then False, and the message should name the code).
    """
    known = ERROR_CODES.get(code)
    if known is not None:
        return known[0], known[1], True
    if code.isascii() and code.isdigit() and len(code) <= 9:
        return int(code), False, True
    return APPLICATION_ERROR, False, False


# --- decoding ------------------------------------------------------------------------


def decode_frame(frame: str | bytes, max_commands: int = 0) -> list[AppMessage]:
    """The commands of one client frame, in order.

    Lines are separated by ``\\n``; blank lines (and a trailing newline) are
    skipped. A line that is not a valid command ends the list with a
    :data:`BAD_REQUEST` message: the commands before it stand. So does a
    frame of more than ``max_commands`` commands (0: no limit), which is
    decoded no further.
    """
    if isinstance(frame, bytes):
        try:
            frame = frame.decode()
        except UnicodeDecodeError:
            return [_bad_request("a frame is not UTF-8")]
    decoded: list[AppMessage] = []
    start, end = 0, len(frame)
    while start < end:
        stop = frame.find("\n", start)
        if stop < 0:
            stop = end
        line = frame[start:stop]
        start = stop + 1
        if not line or line.isspace():
            continue
        if max_commands and len(decoded) >= max_commands:
            decoded.append(_bad_request(f"a frame carries at most {max_commands} commands"))
            return decoded
        try:
            command = orjson.loads(line)
        except orjson.JSONDecodeError:
            decoded.append(_bad_request("a command is not valid JSON"))
            return decoded
        message = decode_command(command)
        decoded.append(message)
        if message.kind == BAD_REQUEST:
            return decoded
    return decoded


def decode_command(command: Any) -> AppMessage:
    """One parsed command as an AppMessage: kind = method, body = request, id."""
    if not isinstance(command, dict):
        return _bad_request("a command is a JSON object")
    command_id = command.get("id", 0)
    if command_id is None:
        command_id = 0
    if (
        not isinstance(command_id, int)
        or isinstance(command_id, bool)
        or not 0 <= command_id <= MAX_COMMAND_ID
    ):
        return _bad_request("a command id is an unsigned 32-bit integer")
    if command_id == 0:
        send = command.get("send")
        if send is None:
            return AppMessage(PONG, {})  # whatever else it holds, as Centrifugo
        if not isinstance(send, dict):
            return _bad_request("send holds an object")
        return AppMessage("send", send)
    # The first method present, as Centrifugo; fields it does not know are ignored.
    for key, request in command.items():
        if key not in METHODS or request is None:
            continue
        if not isinstance(request, dict):
            return _bad_request(f"{key} holds an object")
        return AppMessage(key, request, command_id)
    others = sorted(key for key in command if key != "id")
    return _bad_request(f"unknown method {others[0][:32]!r}" if others else "no method")


def _bad_request(reason: str) -> AppMessage:
    return AppMessage(BAD_REQUEST, {"reason": reason})


# --- encoding --------------------------------------------------------------------------


def encode_result(command_id: int, method: str, result: Mapping[str, Any]) -> bytes:
    """``{"id": N, "<method>": result}``; values may be :class:`orjson.Fragment`."""
    return orjson.dumps({"id": command_id, method: result})


def encode_error(command_id: int, code: int, message: str, temporary: bool = False) -> bytes:
    """``{"id": N, "error": {"code", "message"[, "temporary"]}}``."""
    error: dict[str, Any] = {"code": code, "message": message}
    if temporary:
        error["temporary"] = True
    return orjson.dumps({"id": command_id, "error": error})


def encode_tidings_error(command_id: int, code: str, message: str) -> bytes:
    """A tidings error (or an application's) as Centrifugo's error reply."""
    number, temporary, known = centrifugo_error(code)
    if not known:
        message = f"{code}: {message}"
    return encode_error(command_id, number, message, temporary)


def join_frames(replies: Iterable[bytes]) -> bytes:
    """Several replies as one frame, one per line."""
    return b"\n".join(replies)


def payload_json(event: Event) -> bytes:
    """The event's payload as JSON, as the broker serialized it (once)."""
    return event.payload_json or orjson.dumps(event.payload)


def publication(event: Event) -> dict[str, Any]:
    """A Publication object for a reply (``subscribe``, ``history``)."""
    return {"data": orjson.Fragment(payload_json(event)), "offset": event.seq}


def encode_publication_push(event: Event) -> bytes:
    """``{"push":{"channel":C,"pub":{"data":<payload>,"offset":N}}}``, built around
    the payload's JSON without parsing or serializing it again."""
    return b"".join(
        (
            b'{"push":{"channel":',
            orjson.dumps(event.topic),
            b',"pub":{"data":',
            payload_json(event),
            b',"offset":',
            str(event.seq).encode(),
            b"}}}",
        )
    )


def client_info(client_id: str, user: str | None) -> dict[str, str]:
    """A ClientInfo object: ``{"client", "user"}`` (user ``""`` when anonymous)."""
    return {"client": client_id, "user": user or ""}


def encode_presence_push(change: PresenceChange) -> bytes:
    """``{"push":{"channel":C,"join":{"info":{...}}}}`` (or ``leave``)."""
    kind = "join" if change.kind == "join" else "leave"
    info = client_info(change.client.id, change.client.user)
    return orjson.dumps({"push": {"channel": change.topic, kind: {"info": info}}})


def encode_unsubscribe_push(channel: str, code: int, reason: str) -> bytes:
    """The server ended a subscription: below 2500 it stays ended, from 2500 on
    the SDKs subscribe again (and recover)."""
    return orjson.dumps(
        {"push": {"channel": channel, "unsubscribe": {"code": code, "reason": reason}}}
    )


def encode_message_push(data: Any) -> bytes:
    """``{"push":{"message":{"data":...}}}``: an asynchronous message to one client."""
    return orjson.dumps({"push": {"message": {"data": data}}})


def encode_disconnect_push(code: int, reason: str, reconnect: bool) -> bytes:
    """A disconnect push (the SDKs decide by ``code``; on WebSocket the close frame
    carries the same, and is what tidings sends)."""
    return orjson.dumps(
        {"push": {"disconnect": {"code": code, "reason": reason, "reconnect": reconnect}}}
    )


class CentrifugoDialect:
    """The :class:`~tidings.protocol.dialect.Dialect` of the Centrifugo endpoint.

    The endpoint's handlers answer commands themselves (with pre-encoded
    frames, which :meth:`encode_message` passes through); the connection uses
    :meth:`encode_reply` only for errors it raises on a handler's behalf (a
    rate limit, a timeout).
    """

    name = "centrifugo"
    text = True

    def __init__(self, max_commands: int = 0) -> None:
        self.max_commands = max_commands
        """Commands one frame may carry; 0: no limit."""

    def decode(self, frame: str | bytes) -> list[Command | Error]:
        return list(decode_frame(frame, self.max_commands))

    def encode_event(self, event: Event) -> bytes:
        return encode_publication_push(event)

    def encode_presence(self, change: PresenceChange) -> bytes:
        return encode_presence_push(change)

    def encode_reply(self, reply: Reply) -> bytes:
        if isinstance(reply, Error) and isinstance(reply.request_id, int) and reply.request_id:
            return encode_tidings_error(reply.request_id, reply.code, reply.message)
        # No command to answer (a rate-limited pong or send): an empty frame,
        # which both SDKs skip. No other reply is ever asked of this dialect.
        return b""

    def encode_message(self, message: Any) -> bytes:
        if isinstance(message, bytes):
            return message
        return orjson.dumps(message)
