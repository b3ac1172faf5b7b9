"""What every dialect provides. The connection is written against this alone."""

from __future__ import annotations

from typing import Any, Protocol

from .messages import Command, Error, Event, PresenceChange, Reply


class Dialect(Protocol):
    """A sans-IO codec between WebSocket messages and the neutral model.

    ``encode_event`` doubles as the broker's fan-out key: subscribers that share
    an encoder share one encoded frame per event.
    """

    @property
    def name(self) -> str:
        """Short name for logs and statistics."""
        ...

    @property
    def text(self) -> bool:
        """Whether frames go out as WebSocket text (True) or binary frames."""
        ...

    def decode(self, frame: str | bytes) -> list[Command | Error]:
        """The commands one incoming message carries; malformed input becomes errors."""
        ...

    def encode_event(self, event: Event) -> bytes:
        """One event as a frame."""
        ...

    def encode_presence(self, change: PresenceChange) -> bytes:
        """A client joined or left a topic."""
        ...

    def encode_reply(self, reply: Reply) -> bytes:
        """One reply as a frame."""
        ...

    def encode_message(self, message: Any) -> bytes:
        """A frame an application sends to one client (a JSON value, as the dialect frames it)."""
        ...
