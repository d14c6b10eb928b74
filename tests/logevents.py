"""Waiting for a log event of an in-process daemon (or of a piece of it) without polling."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def log_event(logger: str, event: str) -> Iterator[asyncio.Event]:
    """An Event set once `logger` emits a record whose `event` field is `event`. The record
    must come from the event loop's thread (asyncio.Event is not thread-safe)."""
    seen = asyncio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "event", None) == event:
                seen.set()

    watch = Watch()
    logging.getLogger(logger).addHandler(watch)
    try:
        yield seen
    finally:
        logging.getLogger(logger).removeHandler(watch)
