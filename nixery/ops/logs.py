"""Structured logs: one line per event, as JSON or as readable text.

Fields that describe the current request (its id, the image and tag it asks
for) live in a context variable, so every line logged while serving it
carries them without each call passing them along.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import sys
from contextvars import ContextVar
from typing import Any

try:  # python-json-logger 3
    from pythonjsonlogger.core import RESERVED_ATTRS
    from pythonjsonlogger.json import JsonFormatter
except ImportError:  # python-json-logger 2, as in nixpkgs 24.11
    from pythonjsonlogger.jsonlogger import (  # type: ignore[no-redef]
        RESERVED_ATTRS,
        JsonFormatter,
    )

FORMATS = ("text", "json")
_STANDARD = frozenset(RESERVED_ATTRS) | {"taskName"}
# Libraries that log whole requests at debug level: S3 request headers carry
# the access key id and signatures, presigned URLs are credentials.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
QUIET_LIBRARIES = ("botocore", "boto3", "s3transfer", "urllib3")
_context: ContextVar[dict[str, Any]] = ContextVar("nixery_log_context", default={})  # noqa: B039


def begin(**fields: Any) -> None:
    """Start a new context (a request) with these fields."""
    _context.set(dict(fields))


def bind(**fields: Any) -> None:
    """Add fields to the current context."""
    _context.set({**_context.get(), **fields})


def context() -> dict[str, Any]:
    return dict(_context.get())


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if key not in record.__dict__:
                setattr(record, key, value)
        return True


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value ...`"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802
        # Messages quote client input (paths, tags): a line break in it must
        # not start a line that reads as another event.
        return _CONTROL.sub(lambda m: repr(m[0])[1:-1], super().formatMessage(record))

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [f"{k}={_text(v)}" for k, v in record.__dict__.items() if k not in _STANDARD]
        if not extras:
            return line
        head, sep, tail = line.partition("\n")  # keep a traceback below the fields
        return f"{head} {' '.join(extras)}{sep}{tail}"


def _text(value: Any) -> str:
    text = str(value)
    return repr(text) if not text or any(c.isspace() or c in "\"'=" for c in text) else text


class _JsonFormatter(JsonFormatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        # RFC 3339 in UTC: what log collectors parse, whatever the host's zone.
        return dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")


def json_formatter() -> logging.Formatter:
    return _JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
    )


def setup(level: str = "info", fmt: str = "text") -> None:
    """Send every log line to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(json_formatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(root.level, logging.INFO))
