"""permessage-deflate (RFC 7692) for the built-in transport, compressed once per event.

Negotiated only with ``server_no_context_takeover`` and
``client_no_context_takeover``, so that every message stands alone:

* **outgoing**, a message compresses to the same bytes whoever receives it,
  so the broker compresses each event once and every subscriber of the fan-out
  group gets those bytes (:class:`DeflateFramer`: one per server and kind of
  frame, the same object for every compressed connection, hence one fan-out
  group). No connection holds a compressor.
* **incoming**, a message is inflated by a decompressor made for it and
  dropped after it (:class:`InboundDeflate`): no connection holds a
  decompressor's 32 KiB window while idle. Inflating is bounded by the
  message size limit, in output and in input: a decompression bomb closes
  the connection with 1009 after at most ``max_message_size`` bytes of
  output, whatever the frame claims.

Inflating is also paced: 500 bytes of deflate can hold 500 KiB of JSON, so
without a bound a client with a slow link could make the node inflate and
parse at its full speed (measured: 1.3 ms of server CPU per 553-byte
message). A connection's messages inflate to at most :data:`INFLATE_RATE`
bytes a second on average (or ``max_message_size`` a second, if larger), in
bursts of twice ``max_message_size``; past that, the server reads that
connection more slowly (:meth:`InboundDeflate.wait`), and TCP pushes back.

Frames shorter than the minimum size go out uncompressed (RSV1 clear), which
RFC 7692 allows on a connection that negotiated compression: compressing a
100-byte JSON object saves a few bytes and costs the client an inflate.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import Final

from .base import ProtocolViolation
from .frames import INVALID_DATA

EXTENSION: Final = "permessage-deflate"
#: The parameters tidings accepts an offer with, and answers.
RESPONSE: Final = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
#: What a sync flush leaves at the end of every message: RFC 7692 drops it on
#: the wire and the receiver puts it back.
_TAIL: Final = b"\x00\x00\xff\xff"
_RSV1: Final = 0x40
_WINDOW_BITS: Final = 15
#: Offers longer than this are not read (a header is bounded by the request's,
#: but nothing legitimate comes near it).
MAX_OFFER: Final = 4096
#: Bytes a second a connection's compressed messages may inflate to, on average.
INFLATE_RATE: Final = 1024 * 1024


def negotiate(offers: Iterable[str]) -> str | None:
    """The ``Sec-WebSocket-Extensions`` answer for a client's offers, or None (declined).

    ``offers`` are the header's values. The first ``permessage-deflate`` offer
    tidings can honour is accepted: unknown parameters, repeated ones, or a
    ``server_max_window_bits`` below 15 (every subscriber shares one
    compressed form, made with a 32 KiB window) make an offer unusable. The
    client's own window (``client_max_window_bits``) needs nothing from us:
    a decompressor with the largest window inflates any smaller one.
    """
    text = ",".join(offers)
    if len(text) > MAX_OFFER:
        return None
    for offer in text.split(","):
        name, *params = (part.strip() for part in offer.split(";"))
        if name.lower() == EXTENSION and _acceptable(params):
            return RESPONSE
    return None


def _acceptable(params: list[str]) -> bool:
    seen: set[str] = set()
    for param in params:
        key, _, value = param.partition("=")
        key, value = key.strip().lower(), value.strip().strip('"')
        if key in seen:
            return False
        seen.add(key)
        if key in ("server_no_context_takeover", "client_no_context_takeover"):
            if value:
                return False
        elif key == "client_max_window_bits":
            if value and not (value.isdigit() and 8 <= int(value) <= 15):
                return False
        elif key == "server_max_window_bits":
            if not (value.isdigit() and int(value) == _WINDOW_BITS):
                return False
        else:
            return False
    return True


def _header(first_byte: int, length: int) -> bytes:
    if length < 126:
        return bytes((first_byte, length))
    if length < 65536:
        return bytes((first_byte, 126)) + length.to_bytes(2, "big")
    return bytes((first_byte, 127)) + length.to_bytes(8, "big")


class DeflateFramer:
    """Frames a message for compressed connections, compressing it if it is worth it.

    One per server and kind of frame (text or binary), shared by every
    connection that negotiated compression: the broker groups subscribers
    by framer, so an event is compressed once for all of them. Its one
    compressor is reset after every message (a full flush), which keeps
    each message independent of the ones before, as
    ``server_no_context_takeover`` promises, without making a compressor
    (a quarter of a megabyte of zlib state) for every event.
    """

    __slots__ = ("_compressor", "_opcode", "min_size", "uncompressed")

    def __init__(self, text: bool, min_size: int, level: int = zlib.Z_DEFAULT_COMPRESSION) -> None:
        self._opcode = 0x81 if text else 0x82  # FIN + text or binary
        self.min_size = min_size
        """Messages shorter than this (in bytes) are sent as they are."""
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, -_WINDOW_BITS)
        self.uncompressed = self.frame_plain
        """The framer of the same kind without compression (for topics whose
        namespace turns it off), also one object per server."""

    def __call__(self, data: bytes) -> bytes:
        """The complete server frame for one message."""
        if len(data) < self.min_size:
            return _header(self._opcode, len(data)) + data
        compressor = self._compressor
        body = compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)
        body = body[:-4]  # the flush's 00 00 ff ff: the receiver appends it
        return _header(self._opcode | _RSV1, len(body)) + body

    def frame_plain(self, data: bytes) -> bytes:
        """The frame without compression."""
        return _header(self._opcode, len(data)) + data


class InboundDeflate:
    """Inflates a client's compressed messages, within ``max_message_size``.

    The frame parser (:class:`~tidings.transport.frames.FrameParser`) calls
    :meth:`begin` when a message with RSV1 starts, :meth:`inflate` with each
    piece of its payload and :meth:`finish` when it ends. Each compressed
    message gets a decompressor of its own (the client agreed to
    ``client_no_context_takeover``), dropped when the message ends: an idle
    connection holds none. The compressed bytes of one message and what they
    inflate to are both bounded by ``max_message_size``: past either, the
    rest of the message is skipped without inflating it and :attr:`too_big`
    is set, for the transport to close with 1009 as it does for any
    oversized message (the parser goes on, to read the peer's close). Data
    that does not inflate is a :class:`~tidings.transport.base.ProtocolViolation`
    with 1007.
    """

    __slots__ = (
        "_decompressor",
        "_inflated",
        "_read",
        "_stamp",
        "_tokens",
        "burst",
        "framers",
        "limit",
        "rate",
        "too_big",
    )

    def __init__(
        self,
        max_message_size: int,
        framers: tuple[DeflateFramer, DeflateFramer],
        *,
        now: float = 0.0,
    ) -> None:
        self.limit = max_message_size
        self.framers = framers
        """The server's (text, binary) compressing framers, which every
        compressed connection shares; kept here, where the connection's
        compression state lives."""
        self.rate = float(max(INFLATE_RATE, max_message_size))
        """Bytes a second the connection's messages may inflate to, on average."""
        self.burst = 2.0 * max_message_size
        self._tokens = self.burst
        self._stamp = now
        self._decompressor: zlib._Decompress | None = None
        self._inflated = 0
        self._read = 0
        self.too_big = False
        """The message being read went past the limit (the transport resets it)."""

    def begin(self) -> None:
        """A compressed message starts: a decompressor for it alone."""
        self._decompressor = zlib.decompressobj(-_WINDOW_BITS)
        self._inflated = self._read = 0

    def inflate(self, data: bytes) -> bytes:
        """A piece of the message's payload, inflated (nothing once it is too big)."""
        if self._decompressor is None:
            return b""  # the message went past the limit: skipped, not inflated
        return self._inflate(data)

    def finish(self) -> bytes:
        """The message's last bytes, once the tail a sender drops is put back."""
        if self._decompressor is None:
            return b""
        result = self._inflate(_TAIL)
        self._decompressor = None  # no context takeover: the next message starts afresh
        return result

    def wait(self, now: float) -> float:
        """Seconds to wait before reading more: what was inflated beyond the budget."""
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def _inflate(self, data: bytes) -> bytes:
        decompressor = self._decompressor
        assert decompressor is not None
        self._read += len(data)
        if self._read > self.limit + len(_TAIL):
            return self._too_big()
        room = self.limit - self._inflated
        try:
            # One byte more than the room: getting it means the message is too big.
            out = decompressor.decompress(data, room + 1)
        except zlib.error:
            self._decompressor = None
            raise ProtocolViolation(INVALID_DATA, "compressed data does not inflate") from None
        self._inflated += len(out)
        self._tokens -= len(out)
        if self._inflated > self.limit or decompressor.unconsumed_tail:
            return self._too_big()
        return out

    def _too_big(self) -> bytes:
        self._decompressor = None
        self.too_big = True
        return b""
