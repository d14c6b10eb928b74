"""The hand-off from the feeder to the consumers: claims in order, and the consumers that
wait for one.

An `asyncio.Queue` did this at a cost paid by every task: on Python 3.11 each wait on an
empty one asks `get_running_loop()`, which makes a system call (getpid), and it keeps a
bound and `join()` accounting that nothing here uses (the feeder never claims more than
`Workers.capacity`). This one asks for the loop once and does only what the workers use.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Handoff(Generic[T]):
    """First in, first out; `get()` waits, the rest do not. Only the event loop touches it."""

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    @property
    def waiting(self) -> int:
        """Consumers waiting for an item."""
        return sum(not w.done() for w in self._waiters)

    def put_nowait(self, item: T) -> None:
        self._items.append(item)
        self._wake_next()

    def get_nowait(self) -> T:
        """The oldest item; `IndexError` when there is none."""
        return self._items.popleft()

    def take(self, matches: Callable[[T], bool]) -> T | None:
        """Remove and return the first item that `matches`, if one waits."""
        for item in self._items:
            if matches(item):
                self._items.remove(item)
                return item
        return None

    async def get(self) -> T:
        while not self._items:
            loop = self._loop = self._loop or asyncio.get_running_loop()
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                waiter.cancel()
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif not waiter.cancelled() and self._items:
                    # Woken for an item, then cancelled before taking it: wake another.
                    self._wake_next()
                raise
        return self._items.popleft()

    def _wake_next(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
