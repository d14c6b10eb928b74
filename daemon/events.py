"""Live task events: the store's changes fanned out to subscribers in memory.

The store calls `publish()` after each commit with the tasks it changed (each carrying its
change sequence). A subscriber has a bounded buffer: one that falls behind is told so and
its stream ends, and the client resumes from the store with Last-Event-ID.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from daemon.models import Task

BUFFER = 10_000  # events a subscriber may fall behind by before its stream ends


@dataclass(frozen=True)
class Filter:
    task_id: str | None = None
    type: str | None = None
    queue: str | None = None

    def matches(self, task: Task) -> bool:
        return (
            (self.task_id is None or task.id == self.task_id)
            and (self.type is None or task.type == self.type)
            and (self.queue is None or task.queue == self.queue)
        )


@dataclass(eq=False)
class Subscription:
    filter: Filter
    pending: deque[Task] = field(default_factory=deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    overflowed: bool = False

    def offer(self, tasks: list[Task]) -> None:
        for task in tasks:
            if not self.filter.matches(task):
                continue
            if len(self.pending) >= BUFFER:
                self.overflowed = True
                break
            self.pending.append(task)
        if self.pending or self.overflowed:
            self.ready.set()


class Bus:
    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()
        self.closed = asyncio.Event()

    def publish(self, tasks: list[Task]) -> None:
        for sub in self._subscribers:
            sub.offer(tasks)

    @contextmanager
    def subscribe(self, filter: Filter) -> Iterator[Subscription]:
        sub = Subscription(filter)
        self._subscribers.add(sub)
        try:
            yield sub
        finally:
            self._subscribers.discard(sub)

    def close(self) -> None:
        """End every stream (the server is closing)."""
        self.closed.set()
        for sub in self._subscribers:
            sub.ready.set()
