"""Stable error codes and WebSocket close codes.

Both are part of the public protocol (``docs/protocol.md``): clients branch on
them, so a value never changes meaning once released.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class ErrorCode(StrEnum):
    """The ``payload.code`` of an ``error`` frame."""

    INVALID_JSON = "invalid_json"
    """The frame is not valid JSON."""
    INVALID_MESSAGE = "invalid_message"
    """The frame is JSON but not an object."""
    UNSUPPORTED_FRAME = "unsupported_frame"
    """A binary frame on a dialect that speaks text."""
    UNKNOWN_TYPE = "unknown_type"
    """``type`` names no command."""
    MISSING_FIELD = "missing_field"
    """A required field is absent."""
    INVALID_FIELD = "invalid_field"
    """A field has the wrong type or an impossible value."""
    INVALID_TOPIC = "invalid_topic"
    """The topic name is empty, too long or has control characters."""
    UNKNOWN_TOPIC = "unknown_topic"
    """Topics are restricted by configuration and this one is not allowed."""
    ALREADY_SUBSCRIBED = "already_subscribed"
    """``subscribe`` to a topic this connection is already subscribed to."""
    NOT_SUBSCRIBED = "not_subscribed"
    """``unsubscribe`` or ``ack`` for a topic this connection is not subscribed to."""
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    """The connection holds ``max_subscriptions`` subscriptions already."""
    TOO_MANY_TOPICS = "too_many_topics"
    """The node, or the client's tenant, holds its limit of topics, all in use."""
    TOO_MANY_CONNECTIONS = "too_many_connections"
    """The node, the client's address or its tenant holds its limit of connections."""
    UNKNOWN_NAMESPACE = "unknown_namespace"
    """The topic's prefix (``ns:`` in ``ns:topic``) names no configured namespace."""
    FORBIDDEN = "forbidden"
    """The client's token, or the namespace, does not allow this on this topic."""
    UNAUTHORIZED = "unauthorized"
    """A token (in ``refresh``) that is invalid, expired, or for someone else."""
    RATE_LIMITED = "rate_limited"
    """The client sent more messages than its rate limit allows."""
    NOT_FOUND = "not_found"
    """``request`` on a topic no handler is registered for."""
    REQUEST_FAILED = "request_failed"
    """The request handler raised."""
    REQUEST_TIMEOUT = "request_timeout"
    """The request handler did not answer within ``request_timeout``."""
    UNAVAILABLE = "unavailable"
    """The backplane (Redis) cannot be reached: nothing was done; retry later."""
    UNCONFIRMED = "unconfirmed"
    """A publication reached Redis but was not confirmed in time: it may have been published."""
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    """A publish reused an idempotency key of the window with another payload."""


class CloseCode(IntEnum):
    """WebSocket close codes tidings sends."""

    NORMAL = 1000
    GOING_AWAY = 1001
    """The server is shutting down; reconnect (to another node) and resume."""
    PROTOCOL_ERROR = 1002
    """The peer broke the WebSocket framing rules."""
    INVALID_DATA = 1007
    """A text frame that is not UTF-8."""
    POLICY_VIOLATION = 1008
    """Outbox overflow under the ``disconnect`` policy, or another policy."""
    MESSAGE_TOO_BIG = 1009
    """A message larger than ``max_message_size``."""
    INTERNAL_ERROR = 1011
    """Read timeout (the peer stayed silent too long) or an internal failure."""
    SERVICE_RESTART = 1012
    """Not sent by tidings itself: for applications closing clients before a restart."""
    UNAUTHORIZED = 4001
    """The token is invalid (where it could only be checked after the upgrade)."""
    TOKEN_EXPIRED = 4002
    """The token expired and was not refreshed: get a new one and reconnect."""
    INSUFFICIENT_STATE = 4010
    """Events of a subscribed topic were lost between nodes (a backplane outage
    longer than its history): reconnect and resume; ``recovered`` says what is gone."""
    RATE_LIMITED = 4029
    """Too many messages over the rate limit: reconnect later, more slowly."""
    ABNORMAL = 1006
    """Never sent: reported when the TCP connection ended without a close frame."""
