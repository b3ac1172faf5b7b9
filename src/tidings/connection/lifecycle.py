"""A connection's life from open to closed, as an explicit state machine (sans I/O).

::

    OPEN ─close(flush)─► DRAINING ─drained─► CLOSING ─close_sent─► CLOSE_SENT ─peer_closed─► CLOSED
      │                                        ▲                      │
      ├─close(no flush)────────────────────────┘                      └─close_timed_out─► CLOSED
      └─peer_closed─► CLOSING (answer it) ─close_sent─► CLOSED

    any state but CLOSED ──lost──► LOST

* **OPEN**: commands are read and answered, events flow.
* **DRAINING**: a close was asked for after what is queued (a shutdown):
  nothing new is queued; the writer empties the queue.
* **CLOSING**: the close frame is the next (and last) thing to write: its code
  is ours, or the peer's echoed when the peer closed first.
* **CLOSE_SENT**: our close frame is on the wire; the peer's is awaited for
  ``close_timeout`` (or not at all when nobody reads any more).
* **CLOSED**: the close handshake is done (or the peer never answered ours).
* **LOST**: the connection ended without one (EOF, reset, a write that timed
  out or left half a frame on the wire).

The connection's tasks drive it: the reader reports the peer's close and a
lost socket, the writer reports what it wrote, anyone may ask to close. It
answers what they ask: may a command still be handled, is a close frame due,
is the connection over, and how it ended (:attr:`Lifecycle.info`). No trio,
no sockets: ``tests/test_lifecycle.py`` drives it alone.
"""

from __future__ import annotations

from enum import Enum
from typing import Final

from ..app import CloseInfo

#: A close frame without a status code (1005) is answered with 1000.
NO_STATUS: Final = 1005
ABNORMAL: Final = 1006
NORMAL: Final = 1000


class State(Enum):
    OPEN = "open"
    DRAINING = "draining"
    CLOSING = "closing"
    CLOSE_SENT = "close sent"
    CLOSED = "closed"
    LOST = "lost"


class Lifecycle:
    """The state of one connection's close handshake."""

    __slots__ = ("_by", "_code", "_peer_code", "_peer_reason", "_reason", "reading", "state")

    def __init__(self) -> None:
        self.state = State.OPEN
        self.reading = True
        """Whether the reader is still reading (it stops after the peer's close
        frame or a protocol error): only then is the peer's close awaited."""
        self._code = 0
        self._reason = ""
        self._by = ""
        self._peer_code: int | None = None
        self._peer_reason = ""

    def __repr__(self) -> str:
        return f"<Lifecycle {self.state.value} code={self._code or None}>"

    # --- questions ---------------------------------------------------------------------

    @property
    def open(self) -> bool:
        """Whether commands are still handled and events queued."""
        return self.state is State.OPEN

    @property
    def finished(self) -> bool:
        """Whether the connection is over: its tasks may all end now."""
        return self.state is State.CLOSED or self.state is State.LOST

    @property
    def awaits_peer(self) -> bool:
        """Whether, our close frame sent, the peer's is still to be read."""
        return self.state is State.CLOSE_SENT and self.reading

    @property
    def close_frame(self) -> tuple[int, str]:
        """The code and reason the close frame carries."""
        return self._code, self._reason

    @property
    def info(self) -> CloseInfo:
        """How it ended (or is ending); 1006 for a connection lost without a close."""
        if self.state is State.OPEN:
            return CloseInfo(ABNORMAL, "still open", "server")
        return CloseInfo(self._code, self._reason, self._by)

    # --- transitions -------------------------------------------------------------------

    def close(self, code: int, reason: str, *, flush: bool, by: str = "server") -> bool:
        """Begin closing with ``code``; the first close wins. Returns whether it began here."""
        if self.state is not State.OPEN:
            if self.state is State.DRAINING and not flush:
                self.state = State.CLOSING  # a harder close overtakes the drain, same code
            return False
        self._code, self._reason, self._by = code, reason, by
        self.state = State.DRAINING if flush else State.CLOSING
        return True

    def drained(self) -> None:
        """What was queued before the close is written: the close frame is next."""
        if self.state is State.DRAINING:
            self.state = State.CLOSING

    def peer_closed(self, code: int, reason: str = "") -> None:
        """The peer's close frame arrived (the reader stops reading)."""
        self.reading = False
        if self.finished:
            return
        self._peer_code, self._peer_reason = code, reason
        if self.state is State.CLOSE_SENT:
            self.state = State.CLOSED  # the answer to ours: the handshake is done
            return
        if self.state is State.OPEN:
            # The peer began: answer with its code, as RFC 6455 asks.
            answer = NORMAL if code in (NO_STATUS, ABNORMAL) else code
            self._code, self._reason, self._by = answer, reason, "client"
        # Whatever was still to be drained is for a peer that no longer reads.
        self.state = State.CLOSING

    def stopped_reading(self) -> None:
        """The reader ended without a close frame (a protocol error it closes for)."""
        self.reading = False

    def close_sent(self) -> None:
        """Our close frame is on the wire."""
        if self.finished:
            return  # lost meanwhile (the reader saw the socket go): nothing to wait for
        if self.state is not State.CLOSING:
            raise RuntimeError(f"a close frame written in state {self.state.value}")
        self.state = State.CLOSED if self._peer_code is not None else State.CLOSE_SENT

    def close_timed_out(self) -> None:
        """The peer did not answer our close frame in time: closed all the same."""
        if self.state is State.CLOSE_SENT:
            self.state = State.CLOSED

    def lost(self, reason: str, by: str) -> None:
        """The connection ended without (finishing) a close handshake."""
        if self.finished:
            return
        if self.state is State.CLOSE_SENT:
            # Ours is out; the peer dropped the connection instead of answering.
            self.state = State.CLOSED
            return
        if self.state is State.OPEN:
            self._code, self._reason, self._by = ABNORMAL, reason, by
        elif self._by == "server":
            # Ours was decided but could not be delivered: the cause stays what it was.
            self._reason = f"{self._reason} (close frame not delivered: {reason})"
        # else the peer closed properly; it just did not wait for our answer.
        self.state = State.LOST
