"""JSON structured logging: one object per line with ts, level, service, logger, message,
request_id and the domain ids (import_id, campaign_id, ...) bound in the current context."""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

#: Context fields added to every record logged while they are bound.
_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar(
    "mailgenius_log_ctx", default={}  # noqa: B039 - never mutated: bind() sets a new dict
)

RESERVED_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def bind(**fields: Any) -> contextvars.Token:
    """Add fields (request_id, import_id, campaign_id, ...) to every later record in this context."""
    merged = {**_context.get(), **{k: v for k, v in fields.items() if v is not None}}
    return _context.set(merged)


def reset(token: contextvars.Token) -> None:
    _context.reset(token)


@contextlib.contextmanager
def bound(**fields: Any) -> Iterator[None]:
    token = bind(**fields)
    try:
        yield
    finally:
        _context.reset(token)


def current(name: str) -> Any:
    return _context.get().get(name)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        obj.update(_context.get())
        for key, value in record.__dict__.items():
            if key not in RESERVED_ATTRS and not key.startswith("_"):
                obj[key] = value
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str, ensure_ascii=False)


def setup_logging(service: str, level: str = "INFO", stream=None) -> logging.Handler:
    """Replace the root handlers with one JSON handler; returns it (tests attach a buffer)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # aiohttp's access log repeats what our metrics middleware already records
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return handler
