"""The OpenAPI 3 document of the HTTP API, served at ``/api/openapi.json``.

Written by hand next to ``api.py`` and checked against the running server by
``tests/test_api.py`` with schemathesis: what it says is what the server does.
"""

from __future__ import annotations

from typing import Any, Final

from .inspect import CLIENT_SORTS, TOPIC_SORTS

#: The console's session: its cookie, and the header that must come with it.
SESSION_COOKIE: Final = "tidings_console"
CSRF_HEADER: Final = "X-CSRF-Token"

#: No control characters. The server's rule is Python's ``str.isprintable()``,
#: which also refuses format, separator (except the space), private-use and
#: unassigned characters; JSON Schema can only say the common part.
PRINTABLE = r"^[^\u0000-\u001f\u007f-\u009f]*$"
PRINTABLE_RULE = (
    "printable characters: no control characters, and, as Python's `str.isprintable()`"
    " has it, no format, private-use, unassigned or separator characters except the space"
)
TOPIC = {
    "type": "string",
    "minLength": 1,
    "maxLength": 256,
    "pattern": PRINTABLE,
    "description": f"A topic: 1 to 256 {PRINTABLE_RULE} (`invalid_topic` otherwise)."
    " `ns:rest` is in namespace `ns`.",
}
TENANT = {
    "type": "string",
    "minLength": 1,
    "maxLength": 128,
    "pattern": PRINTABLE,
    "description": "The tenant whose topics are meant; the node's default tenant if omitted."
    f" 1 to 128 {PRINTABLE_RULE} (`invalid_field` otherwise).",
}
#: Integers are JSON integers, as over the WebSocket: ``3.0`` is refused.
INTEGER_RULE = "A JSON integer without a fraction or exponent (`3.0` is `invalid_field`)."
SEQ = {"type": "integer", "minimum": 0, "description": "The topic's offset."}
EPOCH = {"type": "string", "description": "Identifies the topic's stream; offsets restart with it."}
ANY_JSON: dict[str, Any] = {"description": "Any JSON value."}
IDEMPOTENCY_KEY = {
    "type": "string",
    "minLength": 1,
    "maxLength": 256,
    "pattern": PRINTABLE,
    "description": "Send the same key with every retry of one publication: a key seen for the"
    " topic within the node's `idempotency_window` answers with the first publication's"
    " position and publishes nothing (another payload under it: 409 `idempotency_conflict`)."
    f" 1 to 256 {PRINTABLE_RULE} (`invalid_field` otherwise).",
}

ERROR_BODY: dict[str, Any] = {
    "type": "object",
    "required": ["code", "message"],
    "properties": {
        "code": {"type": "string", "description": "Stable: branch on it."},
        "message": {"type": "string", "description": "For humans."},
    },
}
ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": ERROR_BODY},
}

EVENT = {
    "type": "object",
    "required": ["topic", "seq", "epoch", "payload", "timestamp"],
    "properties": {
        "topic": {"type": "string"},
        "seq": SEQ,
        "epoch": EPOCH,
        "payload": ANY_JSON,
        "timestamp": {"type": "string", "description": "RFC 3339 UTC, when sequenced."},
    },
}

CLIENT = {
    "type": "object",
    "required": ["client", "user", "tenant", "connectedAt"],
    "properties": {
        "client": {"type": "string"},
        "user": {"type": ["string", "null"]},
        "tenant": {"type": "string"},
        "connectedAt": {"type": "string", "description": "RFC 3339 UTC."},
    },
}

SAMPLE = {
    "type": "object",
    "required": ["t", "published", "delivered", "dropped", "connections", "subscriptions"],
    "properties": {
        "t": {"type": "number", "description": "When it was taken, seconds since the epoch."},
        "published": {"type": "number", "description": "Events sequenced per second."},
        "delivered": {"type": "number", "description": "Deliveries per second."},
        "dropped": {"type": "number", "description": "Drops per second."},
        "connections": {"type": "integer"},
        "subscriptions": {"type": "integer"},
    },
}

POSITION = {
    "type": "object",
    "required": ["topic", "seq", "epoch"],
    "properties": {"topic": {"type": "string"}, "seq": SEQ, "epoch": EPOCH},
}


#: ``clients`` and ``topics``: the paging fields, and the answer's frame.
def _paging(sorts: tuple[str, ...]) -> dict[str, Any]:
    return {
        "filter": {
            "type": "string",
            "maxLength": 200,
            "description": "Only entries containing this text (case-insensitive).",
        },
        "tenant": {
            **TENANT,
            "description": "Only this tenant's entries; every tenant if omitted."
            f" 1 to 128 {PRINTABLE_RULE} (`invalid_field` otherwise).",
        },
        "sort": {"enum": list(sorts), "default": sorts[0], "description": "The field to sort by."},
        "order": {"enum": ["asc", "desc"], "default": "asc"},
        "offset": {
            "type": "integer",
            "minimum": 0,
            "maximum": 10000,
            "default": 0,
            "description": f"Entries to skip. {INTEGER_RULE}",
        },
        "limit": {
            "type": "integer",
            "minimum": 1,
            "maximum": 500,
            "default": 50,
            "description": f"Entries to return at most. {INTEGER_RULE}",
        },
    }


def _page(kind: str, entry: dict[str, Any]) -> dict[str, Any]:
    return _obj(
        ["total", "offset", "limit", kind, "missing"],
        {
            "total": {"type": "integer", "minimum": 0, "description": "Entries that match."},
            "offset": {"type": "integer", "minimum": 0},
            "limit": {"type": "integer", "minimum": 1},
            kind: {"type": "array", "items": entry},
            "missing": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Nodes that did not answer in time (their entries are absent).",
            },
        },
    )


COUNT = {"type": "integer", "minimum": 0}

CLIENT_ENTRY = {
    "type": "object",
    "required": [
        "client", "node", "user", "tenant", "remote", "dialect", "path", "connectedAt",
        "subscriptions", "topics", "queued", "peakQueued", "queuedBytes", "dropped",
    ],
    "properties": {
        "client": {"type": "string", "description": "The connection's id (for `disconnect`)."},
        "node": {"type": "string", "description": "The node it is connected to."},
        "user": {"type": ["string", "null"]},
        "tenant": {"type": "string"},
        "remote": {"type": "string", "description": "The peer's address, `host:port`."},
        "dialect": {"type": "string", "description": "`native`, `centrifugo`, ..."},
        "path": {"type": "string", "description": "The WebSocket path it connected to."},
        "connectedAt": {"type": "string", "description": "RFC 3339 UTC."},
        "subscriptions": COUNT,
        "topics": {
            "type": "array",
            "items": {"type": "string"},
            "maxItems": 20,
            "description": "Its topics, sorted: the first 20.",
        },
        "queued": {**COUNT, "description": "Messages in its outbox now."},
        "peakQueued": {**COUNT, "description": "The most its outbox ever held."},
        "queuedBytes": {**COUNT, "description": "Bytes its outbox holds now (or in flight)."},
        "dropped": {**COUNT, "description": "Events dropped because its outbox was full."},
    },
}  # fmt: skip

TOPIC_ENTRY = {
    "type": "object",
    "required": [
        "topic", "tenant", "node", "subscribers", "seq", "epoch", "history", "historyAge",
        "published", "delivered", "dropped",
    ],
    "properties": {
        "topic": {"type": "string"},
        "tenant": {"type": "string"},
        "node": {"type": "string", "description": "The node holding this copy of the topic."},
        "subscribers": COUNT,
        "seq": SEQ,
        "epoch": EPOCH,
        "history": {**COUNT, "description": "Events the node's history holds."},
        "historyAge": {
            "type": ["number", "null"],
            "minimum": 0,
            "description": "Seconds since the oldest of them; null when history is empty.",
        },
        "published": {**COUNT, "description": "Events the node sequenced or applied."},
        "delivered": {**COUNT, "description": "Events queued for a subscriber."},
        "dropped": {**COUNT, "description": "Events dropped for a full outbox."},
    },
}  # fmt: skip


def _obj(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema``, or null: the server takes an optional field that is null as left out."""
    if "enum" in schema and None not in schema["enum"]:
        return {**schema, "enum": [*schema["enum"], None]}
    kind = schema.get("type")
    if kind is None:
        return schema
    kinds = kind if isinstance(kind, list) else [kind]
    return {**schema, "type": [*kinds, "null"]}


def _request(required: list[str], properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A request body: its optional fields may be null."""
    return {
        **_obj(
            required,
            {
                name: schema if name in required else _nullable(schema)
                for name, schema in properties.items()
            },
        ),
        **extra,
    }


METHODS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "publish": (
        "Publish one event to one topic; answers with its position.",
        _request(
            ["topic", "payload"],
            {
                "topic": TOPIC,
                "payload": ANY_JSON,
                "tenant": TENANT,
                "idempotency_key": IDEMPOTENCY_KEY,
            },
        ),
        POSITION,
    ),
    "broadcast": (
        "Publish one payload to many topics; one result per topic, in order.",
        _request(
            ["topics", "payload"],
            {
                "topics": {"type": "array", "items": TOPIC, "minItems": 1, "maxItems": 1000},
                "payload": ANY_JSON,
                "tenant": TENANT,
                "idempotency_key": {
                    **IDEMPOTENCY_KEY,
                    "description": "One key for the whole call: each topic is published once"
                    " under it, so a retried broadcast publishes only where it failed before. "
                    + str(IDEMPOTENCY_KEY["description"]),
                },
            },
        ),
        _obj(
            ["results"],
            {
                "results": {
                    "type": "array",
                    "items": {
                        "oneOf": [
                            POSITION,
                            _obj(
                                ["topic", "error"],
                                {
                                    "topic": {"type": "string"},
                                    "error": ERROR_BODY,
                                },
                            ),
                        ]
                    },
                }
            },
        ),
    ),
    "history": (
        "A topic's retained events after offset `since` (oldest first), at most `limit`.",
        _request(
            ["topic"],
            {
                "topic": TOPIC,
                "since": {
                    "type": "integer",
                    "minimum": 0,
                    "default": 0,
                    "description": f"Events after this offset. {INTEGER_RULE}",
                },
                "limit": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": 1000,
                    "default": 100,
                    "description": f"At most this many events. {INTEGER_RULE}",
                },
                "tenant": TENANT,
            },
        ),
        _obj(
            ["topic", "seq", "epoch", "events"],
            {
                "topic": {"type": "string"},
                "seq": SEQ,
                "epoch": {"type": ["string", "null"], "description": "null: no state for it"},
                "events": {"type": "array", "items": EVENT},
            },
        ),
    ),
    "presence": (
        "Who on this node is subscribed to a topic.",
        _request(["topic"], {"topic": TOPIC, "tenant": TENANT}),
        _obj(
            ["topic", "clients"],
            {"topic": {"type": "string"}, "clients": {"type": "array", "items": CLIENT}},
        ),
    ),
    "presence_stats": (
        "How many clients (and distinct users) are subscribed to a topic.",
        _request(["topic"], {"topic": TOPIC, "tenant": TENANT}),
        _obj(
            ["topic", "clients", "users"],
            {
                "topic": {"type": "string"},
                "clients": {"type": "integer", "minimum": 0},
                "users": {"type": "integer", "minimum": 0},
            },
        ),
    ),
    "channels": (
        "Topics with subscribers, with their counts; `pattern` is shell-style (`chat:*`).",
        _request([], {"tenant": TENANT, "pattern": {"type": "string"}}),
        _obj(
            ["channels"],
            {
                "channels": {
                    "type": "array",
                    "items": _obj(
                        ["topic", "subscribers"],
                        {"topic": {"type": "string"}, "subscribers": {"type": "integer"}},
                    ),
                }
            },
        ),
    ),
    "disconnect": (
        "Close one client's connection, or every connection of a user, with a code and reason.",
        _request(
            [],
            {
                "client": {"type": "string", "description": "A client id, as presence lists it."},
                "user": {"type": "string", "description": "Every connection of this user."},
                "tenant": TENANT,
                "code": {
                    "type": "integer",
                    "anyOf": [{"const": 1000}, {"minimum": 3000, "maximum": 4999}],
                    "default": 1000,
                    "description": f"The close code: 1000, or 3000 to 4999. {INTEGER_RULE}",
                },
                "reason": {
                    "type": "string",
                    "maxLength": 123,
                    "description": "The close reason: at most 123 bytes in UTF-8.",
                },
            },
            oneOf=[
                {"required": ["client"], "properties": {"client": {"type": "string"}}},
                {"required": ["user"], "properties": {"user": {"type": "string"}}},
            ],
            description="Exactly one of `client` and `user` (`missing_field` otherwise).",
        ),
        _obj(["disconnected"], {"disconnected": {"type": "integer", "minimum": 0}}),
    ),
    "info": (
        "The node's identity and counters.",
        {"type": "object"},
        _obj(
            [
                "node",
                "version",
                "uptime",
                "connections",
                "topics",
                "subscriptions",
                "published",
                "delivered",
                "dropped",
            ],
            {
                "node": {"type": "string"},
                "version": {"type": "string"},
                "uptime": {"type": "number"},
                "connections": {"type": "integer"},
                "topics": {"type": "integer"},
                "subscriptions": {"type": "integer"},
                "published": {"type": "integer"},
                "delivered": {"type": "integer"},
                "dropped": {"type": "integer"},
                "nodes": {
                    "type": "array",
                    "description": "With a backplane: every live node's counters.",
                    "items": _obj(["node"], {"node": {"type": "string"}}),
                },
                "cluster": {
                    "type": "object",
                    "description": "With a backplane: the counters summed over the nodes.",
                    "additionalProperties": {"type": "integer"},
                },
            },
        ),
    ),
    "clients": (
        "The WebSocket clients of every node, filtered, sorted and one page at a time, with"
        " each connection's outbox statistics.",
        _request([], _paging(CLIENT_SORTS)),
        _page("clients", CLIENT_ENTRY),
    ),
    "topics": (
        "The topics every node holds, filtered, sorted and one page at a time, with their"
        " counters.",
        _request([], _paging(TOPIC_SORTS)),
        _page("topics", TOPIC_ENTRY),
    ),
    "series": (
        "Every node's rates over the last minutes: one sample per `interval` seconds.",
        _request(
            [],
            {
                "since": {
                    "type": "number",
                    "minimum": 0,
                    "default": 0,
                    "description": "Only samples taken after this time (seconds since the epoch).",
                }
            },
        ),
        _obj(
            ["interval", "nodes", "missing"],
            {
                "interval": {"type": "number", "description": "Seconds between samples."},
                "nodes": {
                    "type": "array",
                    "items": _obj(
                        ["node", "samples"],
                        {
                            "node": {"type": "string"},
                            "samples": {"type": "array", "items": SAMPLE},
                        },
                    ),
                },
                "missing": {"type": "array", "items": {"type": "string"}},
            },
        ),
    ),
}

ERRORS = {
    "400": "A field is missing or wrong (`missing_field`, `invalid_field`, `invalid_topic`, "
    "`invalid_json`, `unknown_namespace`, ...).",
    "401": "No `Authorization: apikey KEY`, or the wrong key, or an expired console session"
    " (`unauthorized`).",
    "403": "The API is off: no key is configured (`api_disabled`); or a call with the"
    " console's session cookie came without its CSRF token, or from another site"
    " (`csrf_failed`).",
    "413": "The body is larger than 1 MiB.",
    "503": "The node holds its limit of topics (`too_many_topics`), or its cluster backplane"
    " cannot be reached (`unavailable`): nothing was done, retry later; or the backplane did not"
    " confirm a publication (`unconfirmed`): retry it with the same `idempotency_key`.",
}
#: Errors only the publishing methods answer.
PUBLISH_ERRORS = {
    "409": "The `idempotency_key` was used within the window with another payload"
    " (`idempotency_conflict`); nothing was published.",
}


#: Either the key, or the console's session cookie with its CSRF token.
SECURITY: Final[list[dict[str, list[str]]]] = [
    {"apikey": []},
    {"console_session": [], "console_csrf": []},
]


def openapi_document(version: str) -> dict[str, Any]:
    """The whole document."""
    error_response = {
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    }
    paths: dict[str, Any] = {}
    for name, (summary, request, response) in METHODS.items():
        paths[f"/api/{name}"] = {
            "post": {
                "operationId": name,
                "summary": summary,
                "security": SECURITY,
                "requestBody": {
                    # An empty body is taken as {}: optional where nothing is required.
                    "required": bool(request.get("required") or request.get("oneOf")),
                    "content": {"application/json": {"schema": request}},
                },
                "responses": {
                    "200": {
                        "description": "Done.",
                        "content": {"application/json": {"schema": response}},
                    },
                    **{
                        status: {"description": text, **error_response}
                        for status, text in (
                            ERRORS | PUBLISH_ERRORS if name in ("publish", "broadcast") else ERRORS
                        ).items()
                    },
                },
            }
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tidings server API",
            "version": version,
            "description": (
                "Publish, read history and presence, list channels, clients and topics, read "
                "rates, and disconnect clients of a tidings node (of every node, under a Redis "
                "backplane). Every call is POST with a JSON object; errors carry the stable "
                "codes of the WebSocket protocol. An optional field that is null counts as left "
                "out. Authenticated by the API key, or by the web console's session cookie with "
                "its CSRF token."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR},
            "securitySchemes": {
                "apikey": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "`apikey KEY`, KEY being the configured api_key.",
                },
                "console_session": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": SESSION_COOKIE,
                    "description": "The session cookie the console's login sets (docs/console.md).",
                },
                "console_csrf": {
                    "type": "apiKey",
                    "in": "header",
                    "name": CSRF_HEADER,
                    "description": "The session's CSRF token; required with the session cookie.",
                },
            },
        },
    }
