"""Log output: one JSON object per line for log collectors, or plain text for people at a terminal.

Handlers are configured here and only from the command line entry point; modules log through their own
``logging.getLogger(__name__)``. A record's ``fields`` extra (the access log's method, code, latency, masked
customer, model version) become keys of their own in JSON, so a collector needs no message parsing.

A server logs off its event loop: a record is put on a queue where it was made and a background thread
formats and writes it (``QueueHandler``/``QueueListener``). :func:`stop_logging` writes what is still
queued; the entry points call it when they end, and it is registered to run at exit as well.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import queue
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from logging.handlers import QueueHandler, QueueListener
from typing import Any, TextIO

import orjson

LOG_FORMATS = ("json", "text")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_WRITE_INTERVAL_S = 0.02


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", ...fields}`` on one line; exceptions as one string."""

    def __init__(self) -> None:
        super().__init__()
        # For what orjson refuses (an integer beyond 64 bits, a key that is not a string): built once.
        self._fallback = json.JSONEncoder(ensure_ascii=False, default=str).encode
        self._second: tuple[int, str] = (-1, "")  # one attribute: two threads may format at once

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        exception = self.formatException(record.exc_info) if record.exc_info else None
        return self.line(
            record.created,
            record.levelname,
            record.name,
            record.process,
            record.getMessage(),
            fields if isinstance(fields, dict) else None,
            exception,
        )

    def line(
        self,
        created: float,
        level: str,
        logger: str,
        pid: int | None,
        message: str,
        fields: dict[str, object] | None = None,
        exception: str | None = None,
    ) -> str:
        """One line: of a record, or of an access-log line handed over without one (:class:`AccessLines`)."""
        entry: dict[str, object] = {
            "time": self._time(created),
            "level": level,
            "logger": logger,
            "pid": pid,  # tells the workers of `serve --workers N` apart
            "message": message,
        }
        if fields:
            entry.update(fields)
        if exception:
            entry["exception"] = exception
        # orjson, not the standard library's encoder: a server writes a line per call, and encoding it took
        # 3.0 µs against 0.4 µs; behind an empty handler at 64 calls in flight, 0.69 against 0.74 of the
        # echo's throughput, medians of nine runs (README, "The interceptor chain").
        try:
            return orjson.dumps(entry, default=str).decode()
        except TypeError:  # orjson.JSONEncodeError is one
            return self._fallback(entry)

    def _time(self, created: float) -> str:
        """ISO 8601 in UTC to the millisecond; the date and time of a second are made once per second."""
        second, text = self._second
        if second != int(created):
            second = int(created)
            text = datetime.fromtimestamp(second, UTC).isoformat()[:19]
            self._second = (second, text)
        return f"{text}.{int((created - int(created)) * 1000):03d}+00:00"  # msecs, as LogRecord takes them


class _Enqueue(QueueHandler):
    """Hands a record to the writing thread with as little work as possible on the caller's thread."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The access log's arguments are strings and numbers made for it: the writing thread renders its
        # message. Any other record's message is rendered now, while its arguments are as they were; its
        # exception stays for the formatter (the JSON one writes it as a key of its own).
        if record.name != "posguard_server.access":
            record.msg, record.args = record.getMessage(), None
        return record


class _Writer(QueueListener):
    """Formats queued records and writes them in batches.

    Under load this thread wakes, and writes, at most once per ``_WRITE_INTERVAL_S``, so it seldom takes the
    interpreter from the event loop; an idle server's line is written as soon as it is logged.
    """

    def __init__(self, records: queue.SimpleQueue[Any], handler: logging.StreamHandler[TextIO]) -> None:
        super().__init__(records, handler)
        self._records = records
        self._handler = handler
        self._lines: list[str] = []
        self._pid = os.getpid()  # the thread lives in the process that started it

    def dequeue(self, block: bool) -> Any:
        if self._records.empty():  # the queue ran dry: write what there is, let the next records gather
            self._write()
            time.sleep(_WRITE_INTERVAL_S)
        return self._records.get(block)

    def handle(self, record: logging.LogRecord | _Line) -> None:
        if isinstance(record, tuple):  # an access-log line handed over without a record
            formatter = self._handler.formatter
            assert isinstance(formatter, JsonFormatter)  # AccessLines hands lines over only to JSON output
            created, lines, args = record
            message, fields = lines.template % args, lines.fields(args)
            self._lines.append(formatter.line(created, "INFO", lines.name, self._pid, message, fields) + "\n")
            return
        try:
            self._lines.append(self._handler.format(record) + self._handler.terminator)
        except Exception:
            self._handler.handleError(record)

    def stop(self) -> None:
        super().stop()
        # What came just before the end, and a line handed over while the thread was stopping.
        while not self._records.empty():
            item = self._records.get_nowait()
            if item is not None:  # the stop signal
                self.handle(item)
        self._write()

    def _write(self) -> None:
        if self._lines:
            text, self._lines = "".join(self._lines), []
            with self._handler.lock or contextlib.nullcontext():
                self._handler.stream.write(text)
                self._handler.flush()


_listener: _Writer | None = None
# An INFO line as AccessLines hands it to the writing thread: its time, the AccessLines, its arguments.
_Line = tuple[float, "AccessLines", tuple[object, ...]]
_lines: queue.SimpleQueue[Any] | None = None  # the writing thread's queue, when its output is JSON


class AccessLines:
    """One logger's INFO lines of one form: a message ``template`` and its JSON ``fields``, both made from the
    line's arguments, where the line is written.

    A server's access log writes a line per call. Made into a ``LogRecord`` and passed through ``logging``'s
    handlers, the pipeline with its line took 19 µs of CPU per call in process; handed over as parts, 11 µs.
    When logging is set up as a server sets it up (JSON, written by the background thread, the root logger's
    only handler, none on this logger), :meth:`write` puts the line's time and arguments onto the queue, and
    the writing thread makes its message and fields and formats it exactly as it formats a record: the serving
    thread makes neither. Otherwise (a process with other handlers, text output, tests listening on the
    logger) it logs a record the ordinary way.
    """

    def __init__(
        self,
        logger: logging.Logger,
        template: str,
        fields: Callable[[tuple[Any, ...]], dict[str, object]],
    ) -> None:
        self._logger = logger
        self._root = logging.getLogger()
        self.name = logger.name
        self.template = template
        self.fields = fields

    def write(self, args: tuple[object, ...]) -> None:
        """Log one line of these arguments at INFO."""
        if self.info(args) or not self._logger.isEnabledFor(logging.INFO):
            return
        # A record made directly: no search of the stack for the caller.
        logger = self._logger
        extra = {"fields": self.fields(args)}
        record = logger.makeRecord(logger.name, logging.INFO, "", 0, self.template, args, None, extra=extra)
        logger.handle(record)

    def info(self, args: tuple[object, ...]) -> bool:
        """Hand the line to the writing thread; False when it must be logged as a record instead."""
        lines, logger = _lines, self._logger
        if lines is None or logger.handlers or not logger.isEnabledFor(logging.INFO):
            return False
        handlers = self._root.handlers
        if len(handlers) != 1 or not isinstance(handlers[0], _Enqueue):
            return False
        lines.put((time.time(), self, args))
        return True


def configure_logging(level: int, log_format: str, *, background: bool = False) -> None:
    """Send every log record at ``level`` or above to stderr in ``log_format`` ("json" or "text").

    ``background`` (a server) writes from a thread of its own; :func:`stop_logging` drains it. A process
    whose root logger has handlers already keeps them, as with ``logging.basicConfig``.
    """
    global _listener, _lines
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT))
        if background:
            records: queue.SimpleQueue[Any] = queue.SimpleQueue()
            _listener = _Writer(records, handler)
            _listener.start()
            atexit.register(stop_logging)
            root.addHandler(_Enqueue(records))
            _lines = records if log_format == "json" else None
        else:
            root.addHandler(handler)
        root.setLevel(level)
    if level > logging.DEBUG:
        # Alembic narrates every migration step at INFO; operators need only our summary line.
        logging.getLogger("alembic").setLevel(logging.WARNING)


def stop_logging() -> None:
    """Write every record still queued, then write on the caller's thread again. Safe to call twice."""
    global _listener, _lines
    listener, _listener = _listener, None
    _lines = None  # from now on the access log makes records again, which the handlers below write
    if listener is None:
        return
    root = logging.getLogger()
    # Direct handlers first, then drain: a record logged meanwhile is written, never queued with no reader.
    for handler in listener.handlers:
        root.addHandler(handler)
    for handler in [h for h in root.handlers if isinstance(h, _Enqueue)]:
        root.removeHandler(handler)
    listener.stop()
