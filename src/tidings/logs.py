"""Logging for ``tidings serve``: readable lines, or one JSON object per line.

The library itself only logs through ``logging.getLogger("tidings...")``; this
module is what the command line uses to configure it. Log calls that matter to
operators pass structured fields in ``extra`` (``event``, ``client``, ``code``
...); the JSON format puts them in the object, the text format keeps the
readable message.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Final

import orjson

from .protocol.clock import rfc3339_now

_STANDARD: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and the extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": rfc3339_now(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(level: str, fmt: str) -> None:
    """Send tidings' (and hypercorn's) logs to stderr, as text or JSON."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def announce(logger: logging.Logger, message: str, **fields: Any) -> None:
    """Log ``message`` with ``fields`` whatever the level: the start-up banner of
    ``--log-format json``, which must reach the log as the text banner reaches stdout."""
    record = logger.makeRecord(
        logger.name, logging.INFO, "(announce)", 0, message, (), None, extra=fields
    )
    logger.handle(record)
