"""Log output: one JSON object per line for log collectors, or plain text for people at a terminal.

Handlers are configured here and only from the command line entry point; modules log through their own
``logging.getLogger(__name__)``. A record's ``fields`` extra (the access log's method, code, latency, masked
customer, model version) become keys of their own in JSON, so a collector needs no message parsing.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

LOG_FORMATS = ("json", "text")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", ...fields}`` on one line; exceptions as one string."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,  # tells the workers of `serve --workers N` apart
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: int, log_format: str) -> None:
    """Send every log record at ``level`` or above to stderr in ``log_format`` ("json" or "text")."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    if level > logging.DEBUG:
        # Alembic narrates every migration step at INFO; operators need only our summary line.
        logging.getLogger("alembic").setLevel(logging.WARNING)
