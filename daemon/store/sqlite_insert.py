"""Admissions as multi-row INSERT statements, prepared on the event loop.

The writer thread is the store's one serial resource, and every bit of Python it runs waits
for the GIL while the loop is busy. So the statements and their values are built before the
operation is queued; the writer only writes in each row's change number, binds and steps,
and the tasks as admitted are made back on the loop from the first change number.

Binding is most of the writer's Python: the sqlite3 module binds an int, float or str
directly but sends None and bytes through its adapter lookup, about five times slower. So
what every queued row has in common is written into the SQL, absent values travel as ''
(NULLIF turns them back into NULL) and payloads as bytearray: half the insert's time.
"""

from __future__ import annotations

import functools
import math
import sqlite3
from collections.abc import Sequence
from itertools import chain

from msgspec.structs import replace

from daemon.models import NewTask, StartNow, Task, TaskState

MAX_ROWS = 1024  # rows per statement (13,312 values), where SQLite allows that many
_WIDTH = 13
_CHANGED = 9  # where each queued row's change number goes
_INTO = (
    "INSERT INTO tasks (id, type, queue, payload, priority, run_at, created_at, timeout, "
    "max_attempts, changed, callback, callback_state, deferred, state, attempts, started_at, "
    "owner, lease_until) "
)
# A task started at admission: its claim (owner, lease) is in the same row.
_RUNNING_SQL = (
    _INTO + "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULLIF(?, ''), NULLIF(?, ''), 0, 'running', "
    "1, ?, ?, ?)"
)
# Preparing a statement costs more than running it (~10 µs a row), so statements come in
# a few sizes that stay prepared: powers of two, the last rows padded with rows whose id is
# '' that the WHERE drops.
_PAD: list[object] = ["", *[0] * (_WIDTH - 1)]


@functools.lru_cache(maxsize=16)
def _sql(rows: int) -> str:
    values = ", ".join(["(" + ", ".join("?" * _WIDTH) + ")"] * rows)
    return (
        _INTO + "SELECT column1, column2, column3, column4, column5, column6, column7, "
        "column8, column9, column10, NULLIF(column11, ''), NULLIF(column12, ''), column13, "
        f"'queued', 0, NULL, NULL, NULL FROM (VALUES {values}) WHERE column1 != ''"
    )


def statement_rows(conn: sqlite3.Connection) -> int:
    """The most rows one statement may hold on this SQLite (its variable limit is 32,766
    by default, 999 before 3.32): a power of two."""
    fit = min(MAX_ROWS, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // _WIDTH)
    return 1 << (fit.bit_length() - 1)


def _row(t: NewTask) -> tuple[object, ...]:
    """A queued row's values, column1 to column13 of `_sql`, the change number still 0."""
    return (
        t.id, t.type, t.queue, bytearray(t.payload), t.priority, t.run_at, t.created_at,
        t.timeout, t.max_attempts, 0, t.callback or "", "pending" if t.callback else "",
        int(t.run_at > t.created_at),
    )  # fmt: skip


class Insert:
    """`tasks` inserted as queued, the first already running for `start` (owner, lease)
    from `now` on when given."""

    __slots__ = ("deferred_due", "head", "kinds", "now", "start", "tasks", "values")

    def __init__(
        self, tasks: Sequence[NewTask], start: StartNow | None = None, now: float = 0.0
    ) -> None:
        self.tasks, self.start, self.now = tasks, start, now
        self.kinds: dict[tuple[str, str], int] = {}  # (queue, state): rows
        self.head: list[object] | None = None  # the running first row's values, if any
        self.values: list[object] = []  # every queued row's, one after the other
        self.deferred_due = math.inf  # the earliest run_at of the rows queued for later
        rest = tasks
        if start is not None and tasks:
            first, rest = tasks[0], tasks[1:]
            self.kinds[(first.queue, "running")] = 1
            self.head = [*_row(first)[: _CHANGED + 3], now, start.owner, now + start.lease]
        for t in rest:
            kind = (t.queue, "queued")
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
            self.values += _row(t)
            if t.run_at > t.created_at and t.run_at < self.deferred_due:
                self.deferred_due = t.run_at

    def admitted(self, first_change: int) -> list[Task]:
        tasks = [Task.admitted(t, first_change + i) for i, t in enumerate(self.tasks)]
        if self.start is not None and tasks:
            tasks[0] = replace(tasks[0], state=TaskState.RUNNING, attempts=1, started_at=self.now)
        return tasks


def run(conn: sqlite3.Connection, inserts: Sequence[Insert], first_change: int) -> None:
    """In the writer thread: the rows of `inserts`, in order, in statements of up to
    `statement_rows` rows, with change numbers from `first_change` on. Several statements
    are one savepoint, so that a failure leaves none of the rows."""
    statements: list[tuple[str, list[object]]] = []
    queued: list[list[object]] = []  # values lists not yet in a statement
    most = statement_rows(conn)
    change = first_change
    for insert in inserts:
        if insert.head is not None:
            _queued_statements(queued, statements, most)
            insert.head[_CHANGED] = change
            change += 1
            statements.append((_RUNNING_SQL, insert.head))
        values = insert.values
        for at in range(_CHANGED, len(values), _WIDTH):
            values[at] = change
            change += 1
        if values:
            queued.append(values)
    _queued_statements(queued, statements, most)
    if not statements:
        return
    if len(statements) == 1:
        conn.execute(*statements[0])
        return
    conn.execute("SAVEPOINT rows")
    try:
        for sql, values in statements:
            conn.execute(sql, values)
    except BaseException:
        conn.execute("ROLLBACK TO rows")
        raise
    finally:
        conn.execute("RELEASE rows")


def _queued_statements(
    queued: list[list[object]], statements: list[tuple[str, list[object]]], most: int
) -> None:
    """Move the `queued` rows into `statements` of up to `most` rows each, the last padded
    to a power of two."""
    if not queued:
        return
    values = queued[0] if len(queued) == 1 else list(chain(*queued))
    queued.clear()
    step = most * _WIDTH
    for at in range(0, len(values), step):
        chunk = values[at : at + step] if len(values) > step else values
        rows = len(chunk) // _WIDTH
        size = 1 << (rows - 1).bit_length()
        if size > rows:
            chunk = chunk + _PAD * (size - rows)
        statements.append((_sql(size), chunk))
