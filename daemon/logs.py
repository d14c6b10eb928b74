"""Logging for journald and terminals: one event per line, fields as key=value (or JSON).

Records carry an `event` name and, for task lines, `task_id`, `task_type`, `queue` and
`attempt` through `extra=`. Under systemd the journal gets them as fields (`journal.py`).

A text line is one line whatever a message or a value holds (a handler's stderr, a client's
input): control characters are escaped as repr() writes them, a field value that is not one
plain word is quoted, and a field name in a message is not followed by a bare `=`, so that
neither a terminal nor a key=value parser reads a line or a field that was not written.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import msgspec

from daemon.journal import JournalHandler, stderr_is_journal

FIELDS = ("event", "task_id", "task_type", "queue", "attempt")
_EVERY_FIELD = "".join(f" {field}=%s" for field in FIELDS)
_STARTED: float = logging._startTime  # type: ignore[attr-defined]  # relativeCreated is from it
_MILLIS = [f"{ms:03d}" for ms in range(1000)]  # a format spec costs a line ~0.5 µs more
_UNKNOWN_FILE = "(unknown file)"  # the pathname of a record whose caller was not looked up
# Escaped in a text line, as repr() writes them: the C0 controls (newline, carriage return,
# ESC, ...), DEL, the C1 controls, and the two separators that str.splitlines() breaks on.
_ESCAPE = {
    code: repr(chr(code))[1:-1] for code in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
}
# Escaped in a JSON line, where msgspec writes them raw (it escapes only the C0 controls).
_JSON_ESCAPE = {code: f"\\u{code:04x}" for code in (*range(0x7F, 0xA0), 0x2028, 0x2029)}
# A field value written as it is: one word, nothing a key=value parser reads otherwise.
_PLAIN = re.compile(r'[^\s="\\\x00-\x1f\x7f-\x9f]+')
# Event, type and queue names a task's line found plain before (`_learn`).
_PLAIN_WORDS: set[str] = set()
_MAX_WORDS = 4096
_MAX_WORD = 64
# A field's name in a message as it would start a field: its "=" is written as \x3d.
_NAMED = re.compile(r"(?<!\S)(event|task_id|task_type|queue|attempt|exception)=")
_LEVELS = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}


class Record(logging.LogRecord):
    """Every record of this process (`setup()` makes it the record factory): LogRecord's
    fields without the work for what `setup()` turned off. LogRecord parses the file name
    of the caller (a constant here: nobody looked it up) with two posixpath calls on each
    record, ~40 % of making one, and one is made for each task that ends."""

    def __init__(  # noqa: PLR0917 (LogRecord's signature: makeRecord passes them by position)
        self,
        name: str,
        level: int,
        pathname: str,
        lineno: int,
        msg: object,
        args: Any,
        exc_info: Any,
        func: str | None = None,
        sinfo: str | None = None,
        **kwargs: Any,
    ) -> None:
        if pathname != _UNKNOWN_FILE:  # a caller was looked up after all
            super().__init__(
                name, level, pathname, lineno, msg, args, exc_info, func, sinfo, **kwargs
            )
            return
        created = time.time()
        self.name = name
        self.msg = msg
        # As LogRecord does: a lone non-empty mapping is the arguments by name.
        if args and len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
            args = args[0]
        self.args = args
        self.levelname = logging.getLevelName(level)
        self.levelno = level
        self.pathname = self.filename = self.module = pathname
        self.exc_info = exc_info
        self.exc_text = None
        self.stack_info = sinfo
        self.lineno = lineno
        self.funcName = func  # type: ignore[assignment]  # None, as in LogRecord
        self.created = created
        self.msecs = int((created - int(created)) * 1000) + 0.0
        self.relativeCreated = (created - _STARTED) * 1000
        self.thread = self.threadName = self.processName = self.process = None


def task_line(
    logger: logging.Logger, level: int, fields: dict[str, object], msg: str, *args: object
) -> None:
    """`logger.log(level, msg, *args, extra=fields)` for the lines written as tasks end
    (one per task). When the line would reach only the handler `install()` set, it goes
    to that handler without a LogRecord (making one and passing it through the logger and
    handler took two thirds of the ~12 µs a line cost); otherwise a record is made here and
    handed to the logger's handlers, without `Logger._log` and `makeRecord`'s check of every
    field against the record's own names (FIELDS never clash with them)."""
    if not logger.isEnabledFor(level):
        return
    handler = _only_handler(logger, level)
    if handler is not None and handler.event(level, logger.name, msg % args, fields):
        return
    record = Record(logger.name, level, _UNKNOWN_FILE, 0, msg, args, None)
    record.__dict__.update(fields)
    logger.handle(record)


class _Installed:
    # What install() put on the root logger. Both kinds take an event as its parts, without a
    # LogRecord, through `event()`, which answers False if it cannot.
    handler: LineHandler | JournalHandler | None = None


def _only_handler(logger: logging.Logger, level: int) -> LineHandler | JournalHandler | None:
    """The installed handler if a record of `level` from `logger` would reach it and no
    other handler, filter or disabled logger on the way (what `Logger.handle` checks)."""
    handler = _Installed.handler
    if handler is None or handler.filters or level < handler.level:
        return None
    if logger.filters:  # (isEnabledFor said no for a disabled logger)
        return None
    node: logging.Logger | None = logger
    while node is not None:
        if node.parent is None:  # the root
            handlers = node.handlers
            return handler if len(handlers) == 1 and handlers[0] is handler else None
        if node.handlers or not node.propagate:
            return None
        node = node.parent
    return None


# An event as a formatter composes it: level, logger name, message, fields, time (Unix
# seconds), the formatted exception if any.
Parts = tuple[int, str, str, Mapping[str, object], float, str | None]


class LineFormatter(logging.Formatter):
    """A formatter that makes its line from an event's parts, so that a task's line can be
    made without a LogRecord (`task_line`)."""

    def format(self, record: logging.LogRecord) -> str:
        exception = self.formatException(record.exc_info) if record.exc_info else None
        return self.compose(
            (record.levelno, record.name, record.getMessage(), record.__dict__, record.created,
             exception)
        )  # fmt: skip

    def compose(self, parts: Parts) -> str:
        raise NotImplementedError


class TextFormatter(LineFormatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def compose(self, parts: Parts) -> str:
        """The line of an event: local time to the millisecond, level, message, fields."""
        level, _, message, fields, created, exception = parts
        second = int(created)
        if second != self._second:  # one strftime a second, not one a line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second))
        # Two scans in C for the usual message, the work only for one that needs it.
        if not message.isprintable():
            message = message.translate(_ESCAPE)
        if "=" in message and _names_a_field(message):
            message = _NAMED.sub(r"\1\\x3d", message)
        # The milliseconds as LogRecord computes `msecs`.
        line = (
            f"{self._stamp}.{_MILLIS[int((created - second) * 1000)]} "
            f"{_LEVELS.get(level) or logging.getLevelName(level).lower()} {message}"
        )
        get = fields.get
        values = (get("event"), get("task_id"), get("task_type"), get("queue"), get("attempt"))
        if None not in values:  # a task's line: one format, not five
            event, task_id, task_type, queue, attempt = values
            words = _PLAIN_WORDS
            try:  # set lookups: scanning each value cost a task's line a quarter more
                plain = event in words and task_type in words and queue in words
            except TypeError:  # an unhashable value
                plain = False
            if (
                plain
                and type(task_id) is str
                and type(attempt) is int
                and task_id.isascii()
                and task_id.encode().isalnum()  # bytes' test costs half of str's
            ):
                line += _EVERY_FIELD % values
            else:
                for field, value in zip(FIELDS, values, strict=True):
                    line += f" {field}={_value(value)}"
                _learn(event, task_type, queue)
        else:
            for field, value in zip(FIELDS, values, strict=True):
                if value is not None:
                    line += f" {field}={_value(value)}"
        if exception is not None:
            line += " exception=" + _value(exception)
        return line


def _names_a_field(message: str) -> bool:
    """Whether a field's name and "=" may stand in `message`: substring searches in C, which
    cost a tenth of what the regex that tells (`_NAMED`) costs."""
    return (
        "event=" in message
        or "task_id=" in message
        or "task_type=" in message
        or "queue=" in message
        or "attempt=" in message
        or "exception=" in message
    )


def _learn(*names: object) -> None:
    """Remember the names that are plain words (names of events, types and queues: a few
    dozen, from the code and the config), up to _MAX_WORDS of at most _MAX_WORD characters;
    past the bound, lines check every value."""
    for name in names:
        if (
            type(name) is str
            and len(name) <= _MAX_WORD
            and len(_PLAIN_WORDS) < _MAX_WORDS
            and _PLAIN.fullmatch(name)
        ):
            _PLAIN_WORDS.add(name)


def _value(value: object) -> str:
    """A field's value as a text line writes it: as it is when it is one plain word, else in
    double quotes with `\\` and `"` escaped and control characters as repr() writes them."""
    text = str(value)
    if _PLAIN.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').translate(_ESCAPE) + '"'


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Each record as one line on a stream (stderr), written whole under the handler's lock.

    StreamHandler gets there through five Python calls more for each record (filter,
    acquire, emit, format, then flush with its own acquire and release: ~1 µs of the ~9 µs
    a task's line took to handle); stderr writes through (or is line buffered) by itself,
    so flushing is needed only for a stream that does neither."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._flush = _needs_flush(stream)

    def setStream(self, stream: TextIO) -> TextIO | None:
        old = super().setStream(stream)
        self._flush = _needs_flush(stream)
        return old

    def handle(self, record: logging.LogRecord) -> bool:
        if self.filters and not self.filter(record):
            return False
        try:
            self._write((self.formatter or logging.Formatter()).format(record) + "\n")
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
        return True

    def event(self, level: int, name: str, message: str, fields: Mapping[str, object]) -> bool:
        """A task's line without a LogRecord (`task_line`); False if this handler's
        formatter is not one of ours, or the write failed (the record path then reports it
        as logging does)."""
        formatter = self.formatter
        if not isinstance(formatter, LineFormatter):
            return False
        try:
            self._write(formatter.compose((level, name, message, fields, time.time(), None)) + "\n")
        except RecursionError:
            raise
        except Exception:
            return False
        return True

    def _write(self, line: str) -> None:
        with self.lock:  # type: ignore[union-attr]  # Handler.__init__ made it
            self.stream.write(line)
            if self._flush:
                self.stream.flush()


def _needs_flush(stream: TextIO) -> bool:
    return not (getattr(stream, "write_through", False) or getattr(stream, "line_buffering", False))


class JsonFormatter(LineFormatter):
    def compose(self, parts: Parts) -> str:
        """The event as one JSON object: ts, level, logger, message, fields, exception."""
        level, name, message, fields, created, exception = parts
        entry: dict[str, Any] = {
            "ts": created,
            "level": _LEVELS.get(level) or logging.getLevelName(level).lower(),
            "logger": name,
            "message": message,
        }
        for field in FIELDS:
            value = fields.get(field)
            if value is not None:
                entry[field] = value
        if exception is not None:
            entry["exception"] = exception
        line = msgspec.json.encode(entry).decode()
        # They can stand only inside strings, where \u escapes keep the values as they are.
        if "\x7f" in line or (not line.isascii() and not line.isprintable()):
            line = line.translate(_JSON_ESCAPE)
        return line


def setup(level: str = "info", fmt: str = "text") -> None:
    """Log to the journal's native socket when systemd gave us the journal as stderr,
    otherwise one line per event on stderr."""
    # No line shows where a call was made, nor thread or process names: not gathering
    # them saves a third of each record's cost (the logging HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.setLogRecordFactory(Record)
    handler: JournalHandler | LineHandler
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    if stderr_is_journal():
        handler = JournalHandler(fallback=formatter)
    else:
        handler = LineHandler(sys.stderr)
        handler.setFormatter(formatter)
    for old in install(handler):
        old.close()
    set_level(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def install(handler: LineHandler | JournalHandler) -> list[logging.Handler]:
    """Make `handler` the root logger's only one (task lines may then skip the LogRecord);
    returns the handlers it replaced."""
    root = logging.getLogger()
    replaced = list(root.handlers)
    for old in replaced:
        root.removeHandler(old)
    root.addHandler(handler)
    _Installed.handler = handler
    return replaced


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
