"""Logging for journald and terminals: one event per line, fields as key=value (or JSON).

Records carry an `event` name and, for task lines, `task_id`, `task_type`, `queue` and
`attempt` through `extra=`. Under journald (`JOURNAL_STREAM` set) lines start with the
syslog priority `<N>` that journald reads, and carry no timestamp (the journal adds one).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import msgspec

FIELDS = ("event", "task_id", "task_type", "queue", "attempt")
_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


class TextFormatter(logging.Formatter):
    def __init__(self, *, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if self.journal:
            parts.append(f"<{_PRIORITY.get(record.levelname, 6)}>{record.levelname.lower()}")
        else:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
            parts.append(f"{stamp}.{int(record.msecs):03d} {record.levelname.lower()}")
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
    handler = logging.StreamHandler(sys.stderr)
    journal = bool(os.environ.get("JOURNAL_STREAM"))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(journal=journal))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
