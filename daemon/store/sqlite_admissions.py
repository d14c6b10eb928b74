"""Admissions that arrive while the writer is busy share one operation and one INSERT.

Group commit already puts them in one transaction; as separate operations each still cost
the writer thread a statement, and each statement a wait for the GIL while the event loop
is busy. So a plain admission (no Idempotency-Key, not started at admission) joins the
ones waiting for the writer: the first queues one operation, which takes all that joined
by the time it runs, checks each against `max_pending` in order, and inserts the rest in
one statement. Each caller still gets its own answer; the store hears of all the tasks of a
commit at once (`on_admitted`), even those whose caller has gone meanwhile.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

from daemon.errors import QueueFull
from daemon.models import Task
from daemon.store.sqlite_insert import Insert

# (the writer's connection, the admissions in order) -> each one's first change number,
# or QueueFull for one that did not fit under its max_pending
WriteMany = Callable[[sqlite3.Connection, list["Waiting"]], list[int | QueueFull]]
Submit = Callable[[Callable[[sqlite3.Connection], Any]], "asyncio.Future[Any]"]


class Waiting:
    __slots__ = ("future", "insert", "max_pending")

    def __init__(
        self, insert: Insert, max_pending: int, future: asyncio.Future[list[Task]]
    ) -> None:
        self.insert, self.max_pending, self.future = insert, max_pending, future


class Admissions:
    def __init__(
        self,
        submit: Submit,
        write_many: WriteMany,
        on_admitted: Callable[[list[Task]], None],
    ) -> None:
        self._submit = submit
        self._write_many = write_many
        self._on_admitted = on_admitted
        self._lock = threading.Lock()  # the writer thread takes what the loop adds
        self._waiting: list[Waiting] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def admit(self, insert: Insert, max_pending: int) -> asyncio.Future[list[Task]]:
        """Insert `insert`'s rows; the future has their tasks once committed. A plain
        function, not a coroutine: the caller awaits the future itself, one frame fewer to
        suspend and resume on the way to every answer."""
        # The loop, asked once: get_running_loop() makes a system call (getpid) each time.
        loop = self._loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[list[Task]] = loop.create_future()
        with self._lock:
            self._waiting.append(Waiting(insert, max_pending, future))
            first = len(self._waiting) == 1
        if first:
            self._queue()
        return future

    def _queue(self) -> None:
        taken: list[Waiting] = []

        def op(conn: sqlite3.Connection) -> list[int | QueueFull]:
            with self._lock:
                taken.extend(self._waiting)
                self._waiting = []
            return self._write_many(conn, taken)

        def answer(done: asyncio.Future[list[int | QueueFull]]) -> None:
            error = asyncio.CancelledError() if done.cancelled() else done.exception()
            if error is None:
                self._answer(taken, done.result())
                return
            if not taken:  # the operation never ran, so took nothing: fail what waits
                with self._lock:
                    taken.extend(self._waiting)
                    self._waiting = []
            for waiting in taken:
                if not waiting.future.done():
                    waiting.future.set_exception(error)

        self._submit(op).add_done_callback(answer)

    def _answer(self, taken: list[Waiting], results: list[int | QueueFull]) -> None:
        # Callers resume only after this returns (a result schedules them, it does not
        # call them), so the hook hears of the tasks before any caller answers.
        every: list[Task] = []
        for waiting, result in zip(taken, results, strict=True):
            future = waiting.future
            if isinstance(result, QueueFull):
                if not future.done():
                    future.set_exception(result)
                continue
            tasks = waiting.insert.admitted(result)
            every += tasks
            if not future.done():  # else its caller is gone; its tasks stay committed
                future.set_result(tasks)
        if every:
            self._on_admitted(every)
