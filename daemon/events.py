"""Live task events: the store's changes fanned out to subscribers in memory.

The store calls `publish()` after each commit with the tasks it changed (each carrying its
change sequence). Subscribers are indexed by their filter's most selective field, so a
change costs nothing for those that cannot want it. A subscriber has a bounded buffer, in
events and in bytes: one that falls behind has its buffer dropped and is told so, its
stream ends, and the client resumes from the store with Last-Event-ID. At most `limit`
streams are open at once (`server.max_streams`); past it `subscribe()` refuses (503). After
a reload that changed the tokens, `end_unauthorized()` ends the streams whose caller would
now be refused.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from daemon.errors import Unavailable
from daemon.models import Task

BUFFER = 10_000  # events a subscriber may fall behind by before its stream ends
# Bytes of tasks (payloads, results, errors) a subscriber may hold before its stream ends;
# one event is always taken, however large.
BUFFER_BYTES = 1024 * 1024
EVENT_OVERHEAD = 512  # bytes an event takes beyond its payload, result and errors
RETRY_STREAMS = 5  # seconds in Retry-After when every stream is taken


def event_size(task: Task) -> int:
    """Roughly the bytes `task` holds and its event will take."""
    size = EVENT_OVERHEAD + len(task.payload)
    if task.result is not None:
        size += len(task.result)
    if task.last_error is not None:
        size += len(task.last_error)
    for attempt in task.history:
        size += len(attempt.error)
    return size


def too_many_streams(limit: int) -> Unavailable:
    """The refusal of a stream past `limit` open ones (also the OpenAPI document's example)."""
    return Unavailable(
        f"{limit} event streams are open, the most this server allows "
        f"(server.max_streams); retry later",
        retry_after=RETRY_STREAMS,
        code="too_many_streams",
    )


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


def _always() -> bool:
    return True


@dataclass(eq=False)
class Subscription:
    filter: Filter
    allowed: Callable[[], bool] = _always
    """Whether the caller may still read the stream (asked again after a reload)."""
    pending: deque[Task] = field(default_factory=deque)
    pending_bytes: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    overflowed: bool = False
    revoked: bool = False

    def put(self, task: Task) -> None:
        """Buffer `task` (it matches); past the bounds, drop the buffer and mark the
        subscription overflowed, so its stream says so next, ahead of anything else."""
        if self.overflowed or self.revoked:
            return
        size = event_size(task)
        if self.pending and (
            len(self.pending) >= BUFFER or self.pending_bytes + size > BUFFER_BYTES
        ):
            self.overflowed = True
            self._drop()
        else:
            self.pending.append(task)
            self.pending_bytes += size
        self.ready.set()

    def take(self) -> Task:
        """The oldest buffered task (there is one)."""
        task = self.pending.popleft()
        self.pending_bytes -= event_size(task)
        return task

    def revoke(self) -> None:
        """The caller may no longer read: nothing buffered is sent, the stream ends."""
        self.revoked = True
        self._drop()
        self.ready.set()

    def _drop(self) -> None:
        self.pending.clear()
        self.pending_bytes = 0


class Bus:
    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()
        # Each subscriber is in one group: by task id, else type, else queue, else all.
        self._everything: set[Subscription] = set()
        self._by_task: dict[str, set[Subscription]] = {}
        self._by_type: dict[str, set[Subscription]] = {}
        self._by_queue: dict[str, set[Subscription]] = {}
        self.closed = asyncio.Event()

    @property
    def streams(self) -> int:
        """How many subscriptions are open."""
        return len(self._subscribers)

    def publish(self, tasks: list[Task]) -> None:
        if not self._subscribers:
            return
        everything, by_task = self._everything, self._by_task
        by_type, by_queue = self._by_type, self._by_queue
        for task in tasks:
            for sub in everything:
                sub.put(task)
            for group in (
                by_task.get(task.id) if by_task else None,
                by_type.get(task.type) if by_type else None,
                by_queue.get(task.queue) if by_queue else None,
            ):
                if group:
                    for sub in group:
                        if sub.filter.matches(task):
                            sub.put(task)

    @contextmanager
    def subscribe(
        self, filter: Filter, *, limit: int, allowed: Callable[[], bool] = _always
    ) -> Iterator[Subscription]:
        """A subscription for as long as the block runs; `Unavailable` (503) when `limit`
        streams are open already."""
        if len(self._subscribers) >= limit:
            raise too_many_streams(limit)
        sub = Subscription(filter, allowed)
        group = self._group(filter)
        self._subscribers.add(sub)
        group.add(sub)
        try:
            yield sub
        finally:
            self._subscribers.discard(sub)
            group.discard(sub)
            if not group and group is not self._everything:
                self._forget(filter)

    def end_unauthorized(self) -> int:
        """End the streams whose caller `allowed()` no longer; returns how many."""
        ended = 0
        for sub in self._subscribers:
            if not sub.revoked and not sub.allowed():
                sub.revoke()
                ended += 1
        return ended

    def close(self) -> None:
        """End every stream (the server is closing)."""
        self.closed.set()
        for sub in self._subscribers:
            sub.ready.set()

    def _group(self, filter: Filter) -> set[Subscription]:
        if filter.task_id is not None:
            return self._by_task.setdefault(filter.task_id, set())
        if filter.type is not None:
            return self._by_type.setdefault(filter.type, set())
        if filter.queue is not None:
            return self._by_queue.setdefault(filter.queue, set())
        return self._everything

    def _forget(self, filter: Filter) -> None:
        """Remove the empty group of `filter` (client-chosen keys must not pile up)."""
        if filter.task_id is not None:
            del self._by_task[filter.task_id]
        elif filter.type is not None:
            del self._by_type[filter.type]
        elif filter.queue is not None:
            del self._by_queue[filter.queue]
