"""Logging of the entry points: one line per event on stderr, as text or as JSON.

``QUEUE_LOG_LEVEL`` (debug, info, warning, error, critical) and ``QUEUE_LOG_FORMAT`` (``text`` or
``json``) choose. A JSON line is one object: ``time``, ``level``, ``logger``, ``pid``,
``message``, and for a job's events ``job_id``, ``job_name``, ``queue``, ``attempt`` (and
``traceback`` when an attempt failed). A text line never spans lines: a traceback is folded
into it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

from corral.errors import ConfigError

LOG_LEVEL_ENV = "QUEUE_LOG_LEVEL"
LOG_FORMAT_ENV = "QUEUE_LOG_FORMAT"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s[%(process)d] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

JOB_FIELDS = ("job_id", "job_name", "queue", "attempt")


class OneLineFormatter(logging.Formatter):
    """The text format, with an exception's traceback folded onto the same line."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT, DATE_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text.replace("\r\n", " | ").replace("\n", " | ")


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for name in (*JOB_FIELDS, "traceback"):
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(
    level: str | None = None, *, default: str = "info", fmt: str | None = None
) -> None:
    """Log one line per event to stderr at ``level`` in ``fmt``.

    ``level`` falls back to ``QUEUE_LOG_LEVEL``, then to ``default``; ``fmt`` to
    ``QUEUE_LOG_FORMAT``, then to ``text``.

    Raises:
        ConfigError: the level or the format is not one corral knows.
    """
    name = (level or os.environ.get(LOG_LEVEL_ENV) or default).strip().lower()
    if name not in LOG_LEVELS:
        source = "--log-level" if level else LOG_LEVEL_ENV
        raise ConfigError(f"{source} must be one of {', '.join(LOG_LEVELS)}, got {name!r}")
    style = (fmt or os.environ.get(LOG_FORMAT_ENV) or "text").strip().lower()
    if style not in LOG_FORMATS:
        source = "--log-format" if fmt else LOG_FORMAT_ENV
        raise ConfigError(f"{source} must be one of {', '.join(LOG_FORMATS)}, got {style!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if style == "json" else OneLineFormatter())
    logging.basicConfig(level=name.upper(), handlers=[handler], force=True)
