"""Admissions as multi-row INSERT statements, prepared on the event loop.

The writer thread is the store's one serial resource, and every bit of Python it runs waits
for the GIL while the loop is busy. So the statements and their values are built before the
operation is queued; the writer only writes in each row's change number, binds and steps,
and the tasks as admitted are made back on the loop from the first change number.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence
from itertools import chain

from msgspec.structs import replace

from daemon.models import NewTask, StartNow, Task, TaskState

ROWS = 500  # rows per statement: 18 values each, well under SQLite's 32,766
_WIDTH = 18
_CHANGED = 14  # where each row's change number goes


@functools.lru_cache(maxsize=64)
def _sql(rows: int) -> str:
    row = "(" + ", ".join("?" * _WIDTH) + ")"
    return (
        "INSERT INTO tasks (id, type, queue, state, payload, priority, run_at, created_at, "
        "timeout, max_attempts, attempts, started_at, owner, lease_until, changed, callback, "
        "callback_state, deferred) VALUES " + ", ".join([row] * rows)
    )


class Insert:
    """`tasks` inserted as queued, the first already running for `start` (owner, lease)
    from `now` on when given."""

    __slots__ = ("kinds", "now", "start", "tasks", "values")

    def __init__(
        self, tasks: Sequence[NewTask], start: StartNow | None = None, now: float = 0.0
    ) -> None:
        self.tasks, self.start, self.now = tasks, start, now
        self.kinds: dict[tuple[str, str], int] = {}  # (queue, state): rows
        self.values: list[object] = []  # every row's, one after the other
        for i, t in enumerate(tasks):
            running = i == 0 and start is not None
            kind = (t.queue, "running" if running else "queued")
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
            self.values += (
                t.id, t.type, t.queue, kind[1], t.payload, t.priority, t.run_at,
                t.created_at, t.timeout, t.max_attempts, int(running),
                now if running else None, start.owner if running and start else None,
                now + start.lease if running and start else None, 0, t.callback,
                "pending" if t.callback else None, int(t.run_at > t.created_at),
            )  # fmt: skip

    def admitted(self, first_change: int) -> list[Task]:
        tasks = [Task.admitted(t, first_change + i) for i, t in enumerate(self.tasks)]
        if self.start is not None and tasks:
            tasks[0] = replace(tasks[0], state=TaskState.RUNNING, attempts=1, started_at=self.now)
        return tasks


def run(conn: sqlite3.Connection, inserts: Sequence[Insert], first_change: int) -> None:
    """In the writer thread: the rows of `inserts`, in order, in statements of up to ROWS
    rows, with change numbers from `first_change` on. Several statements are one savepoint,
    so that a failure leaves none of the rows."""
    values = inserts[0].values if len(inserts) == 1 else list(chain(*(i.values for i in inserts)))
    for change, at in enumerate(range(_CHANGED, len(values), _WIDTH), first_change):
        values[at] = change
    step = ROWS * _WIDTH
    if not values:
        return
    if len(values) <= step:
        conn.execute(_sql(len(values) // _WIDTH), values)
        return
    conn.execute("SAVEPOINT rows")
    try:
        for at in range(0, len(values), step):
            chunk = values[at : at + step]
            conn.execute(_sql(len(chunk) // _WIDTH), chunk)
    except BaseException:
        conn.execute("ROLLBACK TO rows")
        raise
    finally:
        conn.execute("RELEASE rows")
