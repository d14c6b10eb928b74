"""What every executor receives and may raise.

An executor is an async callable `(Job) -> result`. The result must be JSON-serialisable.
Raising `Permanent` ends the task `failed` at once; any other exception is retryable.
Executors do not handle their own deadline: the consumer cancels a run that outlives its
timeout, so an executor must clean up on `CancelledError`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

JSON = Any


class Permanent(Exception):
    """Raise from a handler to fail the task without further attempts."""


class RetryAfter(Exception):
    """A retryable failure that names the earliest useful retry, `delay` seconds from now
    (an HTTP `Retry-After`, a rate limit). The consumer schedules the next attempt no sooner
    than that, and no sooner than the type's backoff; it still spends an attempt."""

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay


class TaskLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger whose every line carries the task's id, type and attempt."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = dict(self.extra or {})
        extra.update(kwargs.get("extra") or {})
        kwargs["extra"] = extra
        return msg, kwargs


@dataclass(slots=True)
class Job:
    """One attempt of one task, as a handler sees it."""

    task_id: str
    type: str
    attempt: int
    payload: JSON
    deadline: float  # Unix time after which the run is cancelled
    logger: logging.LoggerAdapter[logging.Logger]
    _cancelled: threading.Event | None = field(default=None, repr=False)

    @property
    def cancelled(self) -> threading.Event:
        """Set when the run is cancelled or stopped; sync handlers should check it. Made on
        first use, on the event loop (the sync executor asks for it before handing the
        job to a thread), since most runs never look and a threading.Event costs ~3 µs."""
        if self._cancelled is None:
            self._cancelled = threading.Event()
        return self._cancelled


Executor = Callable[[Job], Awaitable[JSON]]
