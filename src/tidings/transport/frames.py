"""A sans-IO parser of the frames a WebSocket client sends (RFC 6455), for the server.

The built-in transport used wsproto's ``FrameProtocol``: per connection a
parser, its buffer, a message decoder and a generator (several hundred bytes
while idle, and their set-up on every handshake), and per frame its generic
machinery (named tuples, enums, extension hooks). A server needs much less:
client frames are always masked, the only extension is permessage-deflate,
and the payload of a data frame can be handed on as it arrives. This parser
is one object of a few slots, holds no buffer between reads (only an
incomplete header or control frame, at most 130 bytes) and makes one tuple
per frame.

It follows wsproto's server-side rules exactly, both for what is an error
and for the close code it implies (``tests/test_frames.py`` checks it against
wsproto with generated frame sequences), and it raises at the same point of
the input as wsproto does:

* 1002: a reserved opcode, a fragmented control frame or one longer than 125
  bytes, an extended length that a shorter form could have said, a 64-bit
  length with its top bit set, an RSV bit the connection did not negotiate
  (RSV1 on a continuation or control frame even with permessage-deflate), an
  unmasked frame, a continuation with no message started or a new message
  before the last ended, a close payload of one byte or with a code a peer
  may not send;
* 1007: a text message (checked as it arrives, across fragments) or a close
  reason that is not UTF-8, and compressed data that does not inflate.

One difference, with permessage-deflate: a new message started inside an
unfinished compressed one is 1002 at once; wsproto (with the extension the
transport had) first inflated the intruder's payload with the unfinished
message's decompressor, and could fail with 1007 instead.

:meth:`FrameParser.next_frame` yields ``(opcode, payload, finished)``: a data
frame's payload in pieces as its bytes arrive (so that a size limit can
refuse a large message early), text as ``str``, binary as ``bytes``, with
``opcode`` the message's (TEXT or BINARY, also for its continuation frames)
and ``finished`` true on the message's last piece; a ping's or pong's payload
as bytes; a close frame's as ``(code, reason)`` (1005 when it had none),
after which the parser reads nothing more.
"""

from __future__ import annotations

import codecs
from typing import Final, Protocol, TypeAlias

from .base import ProtocolViolation

CONTINUATION: Final = 0x0
TEXT: Final = 0x1
BINARY: Final = 0x2
CLOSE: Final = 0x8
PING: Final = 0x9
PONG: Final = 0xA

PROTOCOL_ERROR: Final = 1002
INVALID_DATA: Final = 1007
NO_STATUS: Final = 1005
"""The code a close frame without a payload stands for (RFC 6455 7.1.5)."""

Payload: TypeAlias = bytes | str | tuple[int, str]
Frame: TypeAlias = tuple[int, Payload, bool]
"""``(opcode, payload, finished)``: see the module's documentation."""

_OPCODES: Final = frozenset({CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG})
_RSV1: Final = 0x40
_RSV2_RSV3: Final = 0x30
_MAX_CONTROL: Final = 125
#: Close codes of 1000-2999 a peer may send: those RFC 6455 and IANA define,
#: less 1005, 1006 and 1015, which only say what happened locally. 3000-4999
#: are for libraries and applications, and all allowed.
_PEER_CLOSE_CODES: Final = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013}
)

# Parser states (``_op``) besides a data frame's opcode while its payload is read.
_HEADER: Final = -1  # between frames: the next bytes are a header
_CLOSED: Final = -2  # a close frame was read: nothing more is
# A data frame whose message state is wrong: the error is raised with its
# first payload byte (or at once if it has none), where wsproto raises it.
# Reserved opcodes, which never get that far: above BINARY, below CLOSE.
_UNEXPECTED_CONTINUATION: Final = 0x3
_UNEXPECTED_START: Final = 0x4

_utf8_decoder = codecs.getincrementaldecoder("utf-8")


class Inflater(Protocol):
    """What the parser needs of permessage-deflate (``deflate.InboundDeflate``)."""

    def begin(self) -> None:
        """A compressed message starts."""

    def inflate(self, data: bytes) -> bytes:
        """Some of the message's compressed bytes, inflated; raises ProtocolViolation if invalid."""
        ...

    def finish(self) -> bytes:
        """The message ended: what is left of it, inflated."""
        ...


def unmask(data: bytes, mask: bytes) -> bytes:
    """``data`` XOR the 4-byte ``mask`` repeated, with no loop over bytes in Python.

    Short payloads (most messages) as one big-integer XOR; from 1 KiB on, as
    four ``bytes.translate`` over strided slices, one XOR table per byte of
    the mask. Measured (``bench/frame_cost.py``): the integer XOR is 2-4x
    faster under 1 KiB, the tables 1.3-2x faster from 16 KiB on (converting
    to and from an integer costs more per byte than a table lookup).
    """
    n = len(data)
    if n < _TRANSLATE_FROM:
        if not n:
            return b""
        key = (mask * ((n >> 2) + 1))[:n]
        return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(
            n, "little"
        )
    out = bytearray(data)
    for i in range(4):
        out[i::4] = out[i::4].translate(_xor_table(mask[i]))
    return bytes(out)


_TRANSLATE_FROM: Final = 1024
_IDENTITY: Final = bytes(range(256))
_xor_tables: list[bytes | None] = [None] * 256


def _xor_table(byte: int) -> bytes:
    """The translation table of XOR with ``byte`` (made the first time it is needed)."""
    table = _xor_tables[byte]
    if table is None:
        table = _xor_tables[byte] = unmask(_IDENTITY, bytes((byte, byte, byte, byte)))
    return table


class FrameParser:
    """Parses one client's frames: :meth:`feed` it bytes, then call
    :meth:`next_frame` until it returns None.

    ``inflate``: the connection negotiated permessage-deflate (RSV1 then marks
    a compressed message, whose payload is handed on inflated).
    """

    __slots__ = (
        "_buffer",
        "_compressed",
        "_decoder",
        "_fin",
        "_inflate",
        "_mask",
        "_message",
        "_op",
        "_pos",
        "_remaining",
    )

    def __init__(self, inflate: Inflater | None = None) -> None:
        # Bytes not parsed yet are _buffer[_pos:]; a read is parsed in place.
        self._buffer = b""
        self._pos = 0
        self._op = _HEADER
        self._fin = False
        self._remaining = 0  # payload bytes of the current data frame still to come
        self._mask = b""  # rotated as pieces of the payload are unmasked
        self._message = 0  # TEXT or BINARY while a message is unfinished
        self._compressed = False  # the unfinished message is
        # Made for a text message that does not arrive in one piece, then dropped.
        self._decoder: codecs.IncrementalDecoder | None = None
        self._inflate = inflate

    def feed(self, data: bytes) -> None:
        """Bytes received from the client."""
        pos = self._pos
        buffer = self._buffer
        if pos >= len(buffer):
            # The usual case: everything before was parsed, and the new bytes
            # are parsed where they are, without a copy.
            self._buffer = data
        else:
            # Left over: an incomplete header or control frame (at most 130 bytes).
            self._buffer = buffer[pos:] + data
        self._pos = 0

    def next_frame(self) -> Frame | None:
        """The next frame (or piece of a data frame's payload), or None until more is fed.

        Raises:
            ProtocolViolation: the client broke the protocol; nothing more can be parsed.
        """
        op = self._op
        if op < 0:
            op = self._header() if op == _HEADER else _CLOSED
            if op < 0:
                if self._pos:
                    # Keep only what is not parsed (nothing, or part of a
                    # header or control frame), not the whole read: a
                    # connection waiting for more holds a few bytes at most.
                    self._buffer = self._buffer[self._pos :]
                    self._pos = 0
                return None
            if op >= CLOSE:
                return self._control(op)
        buffer = self._buffer
        pos = self._pos
        remaining = self._remaining
        n = len(buffer) - pos
        if n >= remaining:
            n = remaining
        elif not n:
            self._buffer = b""  # all parsed: the read is not kept while waiting
            self._pos = 0
            return None
        if op > BINARY:
            kind = "continuation" if op == _UNEXPECTED_CONTINUATION else "new message"
            raise ProtocolViolation(PROTOCOL_ERROR, f"unexpected {kind} frame")
        # A read of exactly this piece is unmasked without a copy.
        data = buffer if n == len(buffer) else buffer[pos : pos + n]
        self._pos = pos + n
        mask = self._mask
        data = unmask(data, mask)
        remaining -= n
        self._remaining = remaining
        finished = False
        if remaining:
            if n & 3:  # the next piece starts elsewhere in the mask
                self._mask = mask[n & 3 :] + mask[: n & 3]
        else:
            self._op = _HEADER
            finished = self._fin
        if self._compressed:
            assert self._inflate is not None
            data = self._inflate.inflate(data)
            if finished:
                data += self._inflate.finish()
        if finished:
            self._message = 0
            self._compressed = False
        if op == BINARY:
            return (BINARY, data, finished)
        decoder = self._decoder
        try:
            if decoder is None:
                if finished:  # a whole text message: the common case
                    return (TEXT, data.decode(), True)
                decoder = self._decoder = _utf8_decoder()
            text = decoder.decode(data, finished)
        except UnicodeDecodeError:
            self._decoder = None
            raise ProtocolViolation(INVALID_DATA, "text frame is not UTF-8") from None
        if finished:
            self._decoder = None
        return (TEXT, text, finished)

    def _header(self) -> int:
        """Parse a frame's header if all of it is here (and a control frame's payload):
        its opcode, or ``_HEADER`` to wait for more."""
        buffer = self._buffer
        start = self._pos
        available = len(buffer) - start
        if available < 2:
            return _HEADER
        first = buffer[start]
        second = buffer[start + 1]
        op = first & 0x0F
        if op not in _OPCODES:
            raise ProtocolViolation(PROTOCOL_ERROR, f"reserved opcode {op:#x}")
        length = second & 0x7F
        size = 2
        if op >= CLOSE:
            if not first & 0x80:
                raise ProtocolViolation(PROTOCOL_ERROR, "fragmented control frame")
            if length > _MAX_CONTROL:
                raise ProtocolViolation(PROTOCOL_ERROR, "control frame longer than 125 bytes")
        elif length == 126:
            if available < 4:
                return _HEADER
            length = (buffer[start + 2] << 8) | buffer[start + 3]
            if length < 126:
                raise ProtocolViolation(PROTOCOL_ERROR, "frame length not in its shortest form")
            size = 4
        elif length == 127:
            if available < 10:
                return _HEADER
            length = int.from_bytes(buffer[start + 2 : start + 10], "big")
            if length < 65536:
                raise ProtocolViolation(PROTOCOL_ERROR, "frame length not in its shortest form")
            if length >> 63:
                raise ProtocolViolation(PROTOCOL_ERROR, "64-bit frame length with its top bit set")
            size = 10
        rsv = first & 0x70
        if rsv and (self._inflate is None or rsv & _RSV2_RSV3 or op == CONTINUATION or op >= CLOSE):
            # permessage-deflate's RSV1 marks a message's first frame, and only that.
            raise ProtocolViolation(PROTOCOL_ERROR, "reserved bit set")
        if not second & 0x80:
            raise ProtocolViolation(PROTOCOL_ERROR, "client frame not masked")
        if available < size + 4:
            return _HEADER
        if op >= CLOSE:
            if available < size + 4 + length:
                return _HEADER  # a control frame is handed on whole
        elif op == CONTINUATION:
            op = self._message or _UNEXPECTED_CONTINUATION
        elif self._message:
            op = _UNEXPECTED_START
        else:
            self._message = op
            if rsv:
                assert self._inflate is not None
                self._compressed = True
                self._inflate.begin()
        self._mask = buffer[start + size : start + size + 4]
        self._pos = start + size + 4
        self._op = op
        self._fin = bool(first & 0x80)
        self._remaining = length
        return op

    def _control(self, op: int) -> Frame:
        """The whole control frame whose header :meth:`_header` just read."""
        pos = self._pos
        end = pos + self._remaining
        payload = unmask(self._buffer[pos:end], self._mask)
        self._pos = end
        self._op = _HEADER
        if op != CLOSE:
            return (op, payload, True)
        self._op = _CLOSED
        return (CLOSE, _close_payload(payload), True)


def _close_payload(payload: bytes) -> tuple[int, str]:
    """A close frame's ``(code, reason)``, checked."""
    if not payload:
        return (NO_STATUS, "")
    if len(payload) == 1:
        raise ProtocolViolation(PROTOCOL_ERROR, "close frame with a one-byte payload")
    code = (payload[0] << 8) | payload[1]
    if not (code in _PEER_CLOSE_CODES or 3000 <= code <= 4999):
        raise ProtocolViolation(PROTOCOL_ERROR, f"close code {code} may not be sent")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise ProtocolViolation(INVALID_DATA, "close reason is not UTF-8") from None
    return (code, reason)
