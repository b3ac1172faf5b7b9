"""What applications plug into a server: request handlers and the types they see."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import attrs

from .errors import RequestError
from .protocol.messages import ClientInfo

__all__ = ["ClientInfo", "CloseInfo", "RequestContext", "RequestError", "RequestHandler"]


@attrs.frozen(slots=True)
class CloseInfo:
    """How a connection ended.

    ``code`` is the WebSocket close code sent or received; 1006 when the
    connection ended without a close frame (a reset, a write timeout).
    """

    code: int
    reason: str
    initiated_by: str
    """``"server"`` or ``"client"``."""


@attrs.frozen(slots=True)
class RequestContext:
    """A ``request`` a client sent, handed to the handler registered for its topic."""

    topic: str
    payload: Any
    client: ClientInfo | None
    """None when the request did not come from a WebSocket client."""


RequestHandler: TypeAlias = Callable[[RequestContext], Awaitable[Any]]
"""``async def handler(request: RequestContext) -> Any``: the JSON-serializable answer."""
