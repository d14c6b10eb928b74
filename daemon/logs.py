"""Logging for journald and terminals: one event per line, fields as key=value (or JSON).

Records carry an `event` name and, for task lines, `task_id`, `task_type`, `queue` and
`attempt` through `extra=`. Under systemd the journal gets them as fields (`journal.py`).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgspec

from daemon.journal import JournalHandler, stderr_is_journal

FIELDS = ("event", "task_id", "task_type", "queue", "attempt")


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # one strftime a second, not one a line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second))
        parts = [f"{self._stamp}.{int(record.msecs):03d} {record.levelname.lower()}"]
        parts.append(record.getMessage().replace("\n", "\\n"))
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                parts.append(f"{name}={value}")
        if record.exc_info:
            parts.append("exception=" + self.formatException(record.exc_info).replace("\n", "\\n"))
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return msgspec.json.encode(entry).decode()


def setup(level: str = "info", fmt: str = "text") -> None:
    """Log to the journal's native socket when systemd gave us the journal as stderr,
    otherwise one line per event on stderr."""
    # No line shows where a call was made, nor thread or process names: not gathering
    # them saves a third of each record's cost (the logging HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler: logging.Handler
    if stderr_is_journal():
        handler = JournalHandler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    set_level(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
