"""Every error tidings raises for a reason a caller can act on, in one hierarchy.

Each carries a stable ``code`` (the protocol's :class:`~tidings.ErrorCode`
values, or a few of its own such as ``api_disabled``) and a human ``message``;
the WebSocket, the HTTP API and the CLI all report them as ``{code, message}``.
Catch :class:`TidingsError` to handle them all::

    TidingsError
    ├── BrokerError    the broker or the backplane refused a command
    ├── RequestError   an application handler answers with an error of its own
    │   └── ProxyError     the application's backend (a hook) refused, or was unavailable
    ├── ProxyDisconnect    the application's backend asked to close the client
    ├── AuthError      a token is missing, invalid or expired
    ├── HttpError      an HTTP API or application route answers with a status
    ├── RemoteError    a server answered the Python client with an error
    ├── ApiCallError   a call of tidings.publisher failed (status, code, retryable)
    │   ├── ApiUnavailableError  the node is unreachable, busy or unsure: retryable
    │   ├── ApiAuthError         the API key is wrong, or the API is off
    │   ├── ApiConflictError     the idempotency key was used with another payload
    │   └── ApiRejectedError     anything else the API refused (a bad field, ...)
    └── ConfigError    the configuration is invalid (also a ValueError)

Errors of the wire itself (a peer that closed, a write that timed out) are the
transport's (:mod:`tidings.transport.base`), not these: they end a connection
rather than answer a command.
"""

from __future__ import annotations

from collections.abc import Sequence

from .protocol.codes import ErrorCode

__all__ = [
    "ApiAuthError",
    "ApiCallError",
    "ApiConflictError",
    "ApiRejectedError",
    "ApiUnavailableError",
    "AuthError",
    "BrokerError",
    "ConfigError",
    "ErrorCode",
    "HttpError",
    "ProxyDisconnect",
    "ProxyError",
    "RemoteError",
    "RequestError",
    "TidingsError",
]


class TidingsError(Exception):
    """An error with a stable ``code`` and a ``message`` for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class BrokerError(TidingsError):
    """A command the broker (or the backplane behind it) refused."""


class RequestError(TidingsError):
    """Raise from a request handler to answer with an ``error`` of your own code.

    The client receives ``{"type": "error", "payload": {"code": code, "message": message}}``.
    """


class ProxyError(RequestError):
    """An application's hook (``docs/proxy.md``) refused a client's command, or
    could not be asked: ``unavailable``, ``temporary``, when its backend was
    down, slow or answered nonsense.

    ``code`` is the backend's own (a number, as Centrifugo's backends send,
    is kept as its digits); ``temporary`` tells Centrifugo's SDKs to try again.
    """

    def __init__(self, code: str, message: str, *, temporary: bool = False) -> None:
        super().__init__(code, message)
        self.temporary = temporary


class ProxyDisconnect(TidingsError):
    """An application's hook asked to close the client's connection with ``close_code``."""

    def __init__(self, close_code: int, reason: str) -> None:
        super().__init__("disconnect", reason)
        self.close_code = close_code
        self.reason = reason


class AuthError(TidingsError):
    """The token was missing, invalid or expired; the message says which."""

    def __init__(self, message: str, code: str = ErrorCode.UNAUTHORIZED) -> None:
        super().__init__(code, message)


class HttpError(TidingsError):
    """Answered as ``{"error": {"code", "message"}}`` with an HTTP ``status``.

    Raise it from an application route (:meth:`tidings.Server.http_route`);
    the HTTP API answers its own errors with it.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(code, message)
        self.status = status


class RemoteError(TidingsError):
    """The server answered a command with an ``error`` (raised by :mod:`tidings.client`)."""

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ApiCallError(TidingsError):
    """A call of :mod:`tidings.publisher` to the HTTP API failed.

    ``status`` is the HTTP status (None when no answer came: the node was
    unreachable or too slow), ``code`` the API's stable error code (or
    ``unreachable``, ``timeout``, ``http_<status>``), ``retryable`` whether
    the publisher retries it (it did, ``attempts`` times in all, before
    raising).
    """

    retryable = False

    def __init__(self, status: int | None, code: str, message: str, *, attempts: int = 1) -> None:
        super().__init__(code, message)
        self.status = status
        self.attempts = attempts

    def __str__(self) -> str:
        if not self.attempts:
            return f"{self.code} (not sent): {self.message}"
        status = "no answer" if self.status is None else f"HTTP {self.status}"
        return f"{self.code} ({status}, after {self.attempts} attempts): {self.message}"


class ApiUnavailableError(ApiCallError):
    """The node could not be reached, timed out, or answered 5xx (``unavailable``,
    ``unconfirmed``, ``too_many_topics``): safe to retry with the same idempotency key."""

    retryable = True


class ApiAuthError(ApiCallError):
    """401 ``unauthorized`` (a missing or wrong API key) or 403 ``api_disabled``."""


class ApiConflictError(ApiCallError):
    """409 ``idempotency_conflict``: the key was used within the window with another payload."""


class ApiRejectedError(ApiCallError):
    """Any other refusal (400 ``invalid_field``, ``unknown_namespace``, 404, 413, ...):
    sending the same call again would be refused again."""


class ConfigError(TidingsError, ValueError):
    """The configuration is invalid; the message says which key and why.

    ``problems`` holds each problem on its own; the message joins them.
    """

    def __init__(
        self, message: str, code: str = "invalid_config", *, problems: Sequence[str] = ()
    ) -> None:
        super().__init__(code, message)
        self.problems: tuple[str, ...] = tuple(problems) or (message,)
