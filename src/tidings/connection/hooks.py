"""The application's hooks, as a connection sees them.

A node may ask the application's backend whether a client may subscribe or
publish (and what to publish), to answer a request no in-process handler
answers, and to extend a session before it expires (``docs/proxy.md``). The
node's implementation calls HTTP endpoints (:mod:`tidings.node.proxy`); the
connection knows it only through :class:`Hooks`, as it knows the node's clock
and seats, so it imports nothing above itself.

A hook answers by returning, or refuses by raising
:class:`~tidings.ProxyError` (the client gets an error, the connection stays)
or :class:`~tidings.ProxyDisconnect` (the connection is closed with its code).
Every call is bounded by the hook's timeout, so a slow backend holds a
connection's reader for that long at most and never holds another connection.
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs

from ..app import ClientInfo


@attrs.frozen(slots=True)
class HookOrigin:
    """What a client's upgrade request said that every hook call passes on."""

    transport: str
    """``websocket``, or the kind of HTTP stream (``sse``, ...)."""
    query: str
    """The upgrade URL's query string, as sent."""
    headers: tuple[tuple[str, str], ...]
    """The upgrade's headers named by ``proxy_forward_headers`` (names as configured)."""


@attrs.frozen(slots=True)
class Refreshed:
    """What the refresh hook decided about a session."""

    expires_at: float | None
    """The new expiry (seconds since the epoch); None: the session no longer expires."""
    expired: bool = False
    """The session is over: close the connection now (4002)."""


class Hooks(Protocol):
    """The hooks a node has (each flag says whether that one is configured)."""

    @property
    def subscribes(self) -> bool: ...
    @property
    def publishes(self) -> bool: ...
    @property
    def answers(self) -> bool:
        """Whether requests without an in-process handler go to the rpc hook."""

    @property
    def refreshes(self) -> bool: ...
    @property
    def refresh_lead(self) -> float:
        """Seconds before a session's expiry at which the refresh hook is first asked."""

    @property
    def refresh_retry(self) -> float:
        """Seconds between attempts while the refresh hook cannot be asked."""

    async def subscribe(
        self, client: ClientInfo, origin: HookOrigin, topic: str, data: Any = None
    ) -> None:
        """Return if ``client`` may subscribe to ``topic``; raise to refuse."""
        ...

    async def publish(
        self, client: ClientInfo, origin: HookOrigin, topic: str, payload: Any
    ) -> Any:
        """The payload to publish (``payload``, or the backend's replacement); raise to refuse."""
        ...

    async def rpc(self, client: ClientInfo, origin: HookOrigin, method: str, data: Any) -> Any:
        """The backend's answer to a request; raise to answer with an error."""
        ...

    async def refresh(self, client: ClientInfo, origin: HookOrigin) -> Refreshed:
        """The session's new expiry; raises ProxyError while the backend cannot say."""
        ...


@attrs.define(slots=True)
class ClientHooks:
    """One connection's hooks: the node's, with what its upgrade said.

    Made only on nodes that have hooks, so other connections pay one empty slot.
    """

    hooks: Hooks
    origin: HookOrigin
    refreshing: bool = False
    """A refresh hook call (or its retries) is under way."""
    refresh_after: float = 0.0
    """Wall-clock time before which the refresh hook is not asked again."""


def forwarded_headers(
    headers: list[tuple[str, str]], names: tuple[str, ...]
) -> tuple[tuple[str, str], ...]:
    """The headers (lower-case names, as an upgrade request keeps them) named in
    ``names``, each once, under the name as configured; repeated ones joined."""
    wanted = {name.lower(): name for name in names}
    found: dict[str, list[str]] = {}
    for name, value in headers:
        if name in wanted:
            found.setdefault(name, []).append(value)
    # Cookies join with "; " (RFC 6265 5.4); other repeated headers with ", ".
    return tuple(
        (wanted[name], ("; " if name == "cookie" else ", ").join(values))
        for name, values in found.items()
    )
