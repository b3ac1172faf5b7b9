"""The HTTP server API: ``POST /api/<method>`` for backends that are not Python.

Every call carries ``Authorization: apikey KEY`` and a JSON object whose names
are the native protocol's (``topic``, ``topics``, ``payload``, ``since``,
``limit``, ``tenant``, ``client``, ``user``). Answers are JSON; errors are
``{"error": {"code", "message"}}`` with the WebSocket protocol's stable codes.
An optional field that is ``null`` counts as left out, as over the WebSocket.
Without a configured key the API is refused, not open. ``docs/api.md`` is the
reference, and ``/api/openapi.json`` describes the same in OpenAPI 3
(``openapi.py``; a test checks the server against it with schemathesis).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson

from .._version import __version__
from ..errors import BrokerError, HttpError
from ..node.server import Server
from ..protocol.codes import ErrorCode
from ..protocol.idempotency import idempotency_key_problem
from ..protocol.messages import Event
from ..protocol.native import presence_entry
from ..protocol.topics import topic_problem
from .openapi import openapi_document

MAX_HISTORY_LIMIT: Final = 1000
MAX_BROADCAST_TOPICS: Final = 1000


Method = Callable[["Api", dict[str, Any]], Awaitable[dict[str, Any]]]


class Api:
    """The API's methods, over one server."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.document = orjson.dumps(openapi_document(__version__))

    def check_key(self, authorization: str | None) -> None:
        """Raises HttpError unless the request carries the configured key."""
        key = self.server.config.api_key
        if not key:
            raise HttpError(403, "api_disabled", "the HTTP API is off: configure api_key")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "apikey" or not hmac.compare_digest(
            given.strip().encode(), key.encode()
        ):
            raise HttpError(401, ErrorCode.UNAUTHORIZED, "missing or wrong API key")

    async def call(self, name: str, body: bytes) -> dict[str, Any]:
        method = METHODS.get(name)
        if method is None:
            raise HttpError(404, ErrorCode.NOT_FOUND, f"no API method {name[:64]!r}")
        try:
            arguments = orjson.loads(body or b"{}")
        except orjson.JSONDecodeError as exc:
            message = f"body is not valid JSON: {exc.msg}"
            raise HttpError(400, ErrorCode.INVALID_JSON, message) from None
        if not isinstance(arguments, dict):
            raise HttpError(400, ErrorCode.INVALID_MESSAGE, "body must be a JSON object")
        return await method(self, arguments)

    # --- the methods ---------------------------------------------------------------

    async def publish(self, body: dict[str, Any]) -> dict[str, Any]:
        topic = _topic(body)
        tenant = self._tenant(body)
        if "payload" not in body:
            raise _missing("payload")
        key = _idempotency_key(body)
        position = await self._publish(topic, body["payload"], tenant, key)
        return {"topic": topic, "seq": position.seq, "epoch": position.epoch}

    async def broadcast(self, body: dict[str, Any]) -> dict[str, Any]:
        topics = body.get("topics")
        if topics is None:
            raise _missing("topics")
        if not isinstance(topics, list) or not topics:
            raise _invalid("topics", "must be a non-empty array of topics")
        if len(topics) > MAX_BROADCAST_TOPICS:
            raise _invalid("topics", f"may name at most {MAX_BROADCAST_TOPICS} topics")
        for topic in topics:
            _topic({"topic": topic})
        if "payload" not in body:
            raise _missing("payload")
        tenant = self._tenant(body)
        # One key for the call: each topic is published once under it, so a
        # retried broadcast publishes only to the topics that failed before.
        key = _idempotency_key(body)
        results: list[dict[str, Any]] = []
        for topic in topics:
            try:
                position = await self._publish(topic, body["payload"], tenant, key)
            except HttpError as exc:
                results.append(
                    {"topic": topic, "error": {"code": exc.code, "message": exc.message}}
                )
            else:
                results.append({"topic": topic, "seq": position.seq, "epoch": position.epoch})
        return {"results": results}

    async def history(self, body: dict[str, Any]) -> dict[str, Any]:
        topic = _topic(body)
        tenant = self._tenant(body)
        since = _integer(body, "since", default=0, minimum=0)
        limit = _integer(body, "limit", default=100, minimum=1, maximum=MAX_HISTORY_LIMIT)
        try:
            events, position = await self.server.history(topic, since, limit, tenant=tenant)
        except BrokerError as exc:
            raise _broker_error(exc) from None
        return {
            "topic": topic,
            "seq": position.seq if position else 0,
            "epoch": position.epoch if position else None,
            "events": [_event(event) for event in events],
        }

    async def presence(self, body: dict[str, Any]) -> dict[str, Any]:
        topic = _topic(body)
        clients = await self.server.presence_everywhere(topic, tenant=self._tenant(body))
        return {"topic": topic, "clients": [presence_entry(client) for client in clients]}

    async def presence_stats(self, body: dict[str, Any]) -> dict[str, Any]:
        topic = _topic(body)
        clients = await self.server.presence_everywhere(topic, tenant=self._tenant(body))
        users = {client.user for client in clients if client.user is not None}
        return {"topic": topic, "clients": len(clients), "users": len(users)}

    async def channels(self, body: dict[str, Any]) -> dict[str, Any]:
        tenant = self._tenant(body)
        pattern = body.get("pattern")
        if pattern is not None and not isinstance(pattern, str):
            raise _invalid("pattern", "must be a string (shell-style, e.g. chat:*)")
        counts = await self.server.channels(tenant=tenant, pattern=pattern)
        channels = [{"topic": name, "subscribers": count} for name, count in counts.items()]
        channels.sort(key=lambda channel: str(channel["topic"]))
        return {"channels": channels}

    async def disconnect(self, body: dict[str, Any]) -> dict[str, Any]:
        client, user = body.get("client"), body.get("user")
        if (client is None) == (user is None):
            raise HttpError(400, ErrorCode.MISSING_FIELD, "give exactly one of 'client' and 'user'")
        code = _integer(body, "code", default=1000, minimum=1000, maximum=4999)
        if not (code == 1000 or 3000 <= code <= 4999):
            raise _invalid("code", "must be 1000 or between 3000 and 4999")
        reason = body.get("reason")
        if reason is None:
            reason = ""
        if not isinstance(reason, str) or len(reason.encode()) > 123:
            raise _invalid("reason", "must be a string of at most 123 bytes")
        tenant = self._tenant(body)
        if client is not None:
            if not isinstance(client, str):
                raise _invalid("client", "must be a string")
        elif not isinstance(user, str):
            raise _invalid("user", "must be a string")
        closed = await self.server.disconnect_everywhere(
            client=client, user=user, code=code, reason=reason, tenant=tenant
        )
        return {"disconnected": closed}

    async def info(self, body: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "node": self.server.node_id,
            "version": __version__,
            **self.server.node_stats(),
        }
        if self.server.backplane is not None:
            # Cluster-wide: every live node's counters as it last announced them.
            nodes = await self.server.nodes()
            answer["nodes"] = nodes
            answer["backplane"] = self.server.backplane.status()
            answer["cluster"] = {
                name: sum(int(node.get(name, 0)) for node in nodes)
                for name in ("connections", "subscriptions", "published", "delivered", "dropped")
            }
        return answer

    # --- helpers -------------------------------------------------------------------

    async def _publish(self, topic: str, payload: Any, tenant: str, key: str | None) -> Any:
        try:
            return await self.server.publish(topic, payload, tenant=tenant, idempotency_key=key)
        except BrokerError as exc:
            raise _broker_error(exc) from None
        except TypeError as exc:  # a value orjson cannot write back
            raise _invalid("payload", str(exc)) from None

    def _tenant(self, body: dict[str, Any]) -> str:
        tenant = body.get("tenant")
        if tenant is None:
            return self.server.config.default_tenant
        if not isinstance(tenant, str) or topic_problem(tenant) is not None or len(tenant) > 128:
            raise _invalid("tenant", "must be a printable string of at most 128 characters")
        return tenant


METHODS: Final[dict[str, Method]] = {
    "publish": Api.publish,
    "broadcast": Api.broadcast,
    "history": Api.history,
    "presence": Api.presence,
    "presence_stats": Api.presence_stats,
    "channels": Api.channels,
    "disconnect": Api.disconnect,
    "info": Api.info,
}


def _broker_error(exc: BrokerError) -> HttpError:
    unavailable = exc.code in (
        ErrorCode.TOO_MANY_TOPICS,
        ErrorCode.UNAVAILABLE,
        ErrorCode.UNCONFIRMED,
    )
    if exc.code == ErrorCode.IDEMPOTENCY_CONFLICT:
        return HttpError(409, exc.code, exc.message)
    return HttpError(503 if unavailable else 400, exc.code, exc.message)


def _idempotency_key(body: dict[str, Any]) -> str | None:
    key = body.get("idempotency_key")
    if key is None:
        return None
    problem = idempotency_key_problem(key)
    if problem is not None:
        raise _invalid("idempotency_key", problem)
    return str(key)


def _missing(name: str) -> HttpError:
    return HttpError(400, ErrorCode.MISSING_FIELD, f"field {name!r} is required")


def _invalid(name: str, problem: str) -> HttpError:
    return HttpError(400, ErrorCode.INVALID_FIELD, f"field {name!r} {problem}")


def _topic(body: dict[str, Any]) -> str:
    topic = body.get("topic")
    if topic is None:
        raise _missing("topic")
    if not isinstance(topic, str):
        raise _invalid("topic", "must be a string")
    problem = topic_problem(topic)
    if problem is not None:
        raise HttpError(400, ErrorCode.INVALID_TOPIC, problem)
    return topic


def _integer(
    body: dict[str, Any], name: str, *, default: int, minimum: int, maximum: int | None = None
) -> int:
    value = body.get(name)
    if value is None:  # null is the same as leaving the field out, as over the WebSocket
        return default
    if type(value) is not int or value < minimum or (maximum is not None and value > maximum):
        bounds = f"at least {minimum}" + (f" and at most {maximum}" if maximum else "")
        raise _invalid(name, f"must be an integer {bounds}")
    return value


def _event(event: Event) -> dict[str, Any]:
    return {
        "topic": event.topic,
        "seq": event.seq,
        "epoch": event.epoch,
        "payload": event.payload,
        "timestamp": event.timestamp,
    }
