"""Wake long-polling readers when a task ends, without polling the store."""

from __future__ import annotations

import asyncio


class Watchers:
    def __init__(self) -> None:
        self._waiting: dict[str, set[asyncio.Future[None]]] = {}

    def watch(self, task_id: str) -> asyncio.Future[None]:
        """A future resolved when `task_id` ends; pass it to `forget()` when done with it."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(task_id, set()).add(future)
        return future

    def forget(self, task_id: str, future: asyncio.Future[None]) -> None:
        waiting = self._waiting.get(task_id)
        if waiting is not None:
            waiting.discard(future)
            if not waiting:
                del self._waiting[task_id]

    def ended(self, task_id: str) -> None:
        for future in self._waiting.pop(task_id, ()):
            if not future.done():
                future.set_result(None)

    def wake_all(self) -> None:
        """Answer every waiter now (the server is closing)."""
        for task_id in list(self._waiting):
            self.ended(task_id)
