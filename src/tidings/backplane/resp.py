"""RESP2, the Redis protocol, without I/O: commands out, replies in.

The backplane's two hot paths, reading pub/sub messages and sending pipelined
publications, speak it over sockets of their own (:mod:`.link`) instead of
through coredis: there a message costs a chain of tasks and checkpoints, so a
node could neither hand the broker everything one socket read carried nor
send a batch of publications cheaply. This module is only the wire format,
so it is tested (and fuzzed) without a server.

Replies become Python values: bulk and simple strings ``bytes``, integers
``int``, nulls ``None``, arrays ``list``, and error replies
:class:`ReplyError` instances, returned as values (a pipeline's other replies
are still good). Anything else, or a reply larger than the parser's bounds, is
a :class:`ProtocolError`: the connection cannot be trusted and is dropped.
"""

from __future__ import annotations

from typing import Final, TypeAlias

#: A reply larger than this (one bulk string, or everything one reply holds) is refused.
MAX_REPLY: Final = 64 * 1024 * 1024
#: Arrays nest at most this deep (Redis's own replies nest three levels).
MAX_DEPTH: Final = 8
#: A line (a header, a simple string, an error) is at most this long.
MAX_LINE: Final = 64 * 1024

_BULK: Final = 36  # $
_ARRAY: Final = 42  # *
_INTEGER: Final = 58  # :
_SIMPLE: Final = 43  # +
_ERROR: Final = 45  # -

Arg: TypeAlias = bytes | str | int


class ReplyError(Exception):
    """An error reply (``-ERR ...``, ``-MOVED 3999 host:port``, ``-NOSCRIPT ...``)."""

    @property
    def kind(self) -> str:
        """The error's first word, which Redis uses as its code (``MOVED``, ``NOSCRIPT``)."""
        return str(self).split(" ", 1)[0]


class ProtocolError(Exception):
    """The peer sent something that is not RESP2, or a reply beyond the bounds."""


Value: TypeAlias = "bytes | int | ReplyError | list[Value] | None"


def command(*args: Arg) -> bytes:
    """One command as RESP2 (an array of bulk strings)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int):
            data = b"%d" % arg
        else:
            raise TypeError(f"a Redis argument is bytes, str or int, not {type(arg).__name__}")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Incomplete(Exception):
    """The buffer ends inside a reply: wait for more bytes."""


class Parser:
    """Turns bytes from Redis into replies, however the bytes were split.

    :meth:`feed` what the socket gave, then take every complete reply with
    :meth:`replies`. The bytes of an incomplete reply stay buffered, bounded by
    ``max_reply``.
    """

    __slots__ = ("_buffer", "_max_depth", "_max_reply", "_pos")

    def __init__(self, *, max_reply: int = MAX_REPLY, max_depth: int = MAX_DEPTH) -> None:
        self._buffer = bytearray()
        self._pos = 0
        self._max_reply = max_reply
        self._max_depth = max_depth

    def __len__(self) -> int:
        """Bytes buffered and not yet returned as replies."""
        return len(self._buffer) - self._pos

    def feed(self, data: bytes) -> None:
        """Add bytes received from Redis."""
        if self._pos:
            del self._buffer[: self._pos]
            self._pos = 0
        self._buffer += data

    def replies(self, limit: int | None = None) -> list[Value]:
        """Every complete reply buffered (at most ``limit``), in order.

        Raises:
            ProtocolError: the bytes are not RESP2, or a reply exceeds the bounds.
        """
        found: list[Value] = []
        buffer = self._buffer
        while self._pos < len(buffer) and (limit is None or len(found) < limit):
            try:
                value, self._pos = self._parse(self._pos, 0)
            except _Incomplete:
                if len(buffer) - self._pos > self._max_reply:
                    raise ProtocolError("a reply exceeds the size limit") from None
                break
            found.append(value)
        return found

    def _parse(self, pos: int, depth: int) -> tuple[Value, int]:
        buffer = self._buffer
        end = buffer.find(b"\r\n", pos)
        if end < 0:
            if len(buffer) - pos > MAX_LINE:
                raise ProtocolError("a line without an end")
            raise _Incomplete
        kind = buffer[pos]
        if kind == _ARRAY:
            count = _number(buffer[pos + 1 : end])
            if count < 0:
                if count != -1:
                    raise ProtocolError(f"bad array length {count}")
                return None, end + 2
            if depth >= self._max_depth:
                raise ProtocolError("arrays nest too deeply")
            # Every element takes at least 3 bytes ("+\r\n"): a length that
            # cannot fit the bound is refused before it is read.
            if count > self._max_reply // 3:
                raise ProtocolError(f"an array of {count} elements exceeds the size limit")
            items: list[Value] = []
            pos = end + 2
            size = len(buffer)
            for _ in range(count):
                # Bulk strings, the elements of pub/sub messages, inline: this
                # loop runs for every event a node receives.
                if pos < size and buffer[pos] == _BULK:
                    end = buffer.find(b"\r\n", pos)
                    if end >= 0:
                        length = _number(buffer[pos + 1 : end])
                        if 0 <= length <= self._max_reply:
                            start = end + 2
                            stop = start + length
                            if size < stop + 2:
                                raise _Incomplete
                            if buffer[stop : stop + 2] != b"\r\n":
                                raise ProtocolError(
                                    "a bulk string does not end where its length says"
                                )
                            items.append(bytes(buffer[start:stop]))
                            pos = stop + 2
                            continue
                item, pos = self._parse(pos, depth + 1)
                items.append(item)
            return items, pos
        if kind == _BULK:
            length = _number(buffer[pos + 1 : end])
            if length < 0:
                if length != -1:
                    raise ProtocolError(f"bad bulk length {length}")
                return None, end + 2
            if length > self._max_reply:
                raise ProtocolError(f"a bulk string of {length} bytes exceeds the size limit")
            start = end + 2
            stop = start + length
            if len(buffer) < stop + 2:
                raise _Incomplete
            if buffer[stop : stop + 2] != b"\r\n":
                raise ProtocolError("a bulk string does not end where its length says")
            return bytes(buffer[start:stop]), stop + 2
        if kind == _INTEGER:
            return _number(buffer[pos + 1 : end]), end + 2
        if kind == _SIMPLE:
            return bytes(buffer[pos + 1 : end]), end + 2
        if kind == _ERROR:
            return ReplyError(buffer[pos + 1 : end].decode("utf-8", "replace")), end + 2
        raise ProtocolError(f"unknown reply type {bytes([kind])!r}")


def _number(digits: bytearray) -> int:
    # int() also takes spaces, underscores and a '+': RESP does not.
    if not (digits.isdigit() or (digits[:1] == b"-" and digits[1:].isdigit())):
        raise ProtocolError(f"bad number {bytes(digits[:32])!r}")
    if len(digits) > 20:
        raise ProtocolError("a number too long for 64 bits")
    return int(digits)


__all__ = ["MAX_REPLY", "Parser", "ProtocolError", "ReplyError", "Value", "command"]
