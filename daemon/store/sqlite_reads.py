"""The SQLite store's reads of tasks: one, a page, and the changes after an event id. They go
through the readers, never the writer: a task by id through the point reader, pages and
changes through the scan reader. Neither `type` nor `queue` has an index (each would cost
every admission an entry), so a page or a replay filtered by them first finds the edge of a
window of `max_scan` rows in index order, then tests only the rows inside it."""

from __future__ import annotations

import builtins
import sqlite3

from daemon.models import Changes, Listing, Task, TaskQuery
from daemon.store.sqlite_connections import Connections
from daemon.store.sqlite_rows import COLUMNS, task_from_row

_TOP = 9223372036854775807  # above every seq
# Pages follow seq, as ids do. If the cursor's task is gone (retention deleted it between
# two pages), the page starts below the next id after it instead.
_CURSOR_SQL = (
    "SELECT coalesce((SELECT seq FROM tasks WHERE id = ?), "
    f"(SELECT seq FROM tasks WHERE id > ? ORDER BY id LIMIT 1), {_TOP})"
)


def _filters(**values: str | None) -> tuple[str, list[str]]:
    """`AND column = ?` for each value given, and the arguments."""
    sql, args = "", []
    for column, value in values.items():
        if value is not None:
            sql += f" AND {column} = ?"
            args.append(value)
    return sql, args


class ReadOps(Connections):
    async def get(self, task_id: str) -> Task | None:
        def fn(conn: sqlite3.Connection, task_id: str) -> Task | None:
            row = conn.execute(f"SELECT {COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
            return None if row is None else task_from_row(row)

        return await self._read(fn, task_id)  # type: ignore[no-any-return]

    async def list(self, query: TaskQuery) -> Listing:
        """Walks `tasks_state` (state, seq) for a state, else the table in seq order. One
        read on the scan reader; its statements see the table as it is when each runs."""
        state = [] if query.state is None else [str(query.state)]
        of_state = "state = ? AND " if state else ""
        narrow, narrow_args = _filters(type=query.type, queue=query.queue)
        scan = query.max_scan if narrow else None
        # The lowest task the page may examine: the max_scan-th of the state below the cursor.
        edge_sql = (
            f"SELECT seq, id FROM tasks WHERE {of_state}seq < ? ORDER BY seq DESC LIMIT 1 OFFSET ?"
        )

        def fn(conn: sqlite3.Connection) -> Listing:
            top = _TOP
            if query.before is not None:
                top = conn.execute(_CURSOR_SQL, (query.before, query.before)).fetchone()[0]
            edge = None
            if scan is not None:
                edge = conn.execute(edge_sql, (*state, top, scan - 1)).fetchone()
            window, window_args = ("", []) if edge is None else (" AND seq >= ?", [edge[0]])
            sql = (
                f"SELECT {COLUMNS} FROM tasks WHERE {of_state}seq < ?{window}{narrow} "
                "ORDER BY seq DESC LIMIT ?"
            )
            args = (*state, top, *window_args, *narrow_args, query.limit)
            page, full = _page(conn.execute(sql, args), query.max_bytes)
            if edge is None or full or len(page) >= query.limit:
                return Listing(page)
            return Listing(page, scanned_to=edge[1])

        return await self._scan(fn)  # type: ignore[no-any-return]

    async def changes(
        self,
        *,
        after: int,
        limit: int,
        task_id: str | None = None,
        type: str | None = None,
        queue: str | None = None,
        max_scan: int | None = None,
    ) -> Changes:
        """Walks `tasks_changed`, or finds the one task by id. One read on the scan reader."""
        narrow, args = _filters(id=task_id, type=type, queue=queue)
        # A task id needs no window: its index finds the one row.
        scan = max_scan if narrow and task_id is None else None

        def fn(conn: sqlite3.Connection) -> Changes:
            edge = None
            if scan is not None:
                row = conn.execute(
                    "SELECT changed FROM tasks WHERE changed > ? ORDER BY changed LIMIT 1 OFFSET ?",
                    (after, scan - 1),
                ).fetchone()
                edge = None if row is None else row[0]
            window, window_args = ("", []) if edge is None else (" AND changed <= ?", [edge])
            sql = (
                f"SELECT {COLUMNS} FROM tasks WHERE changed > ?{window}{narrow} "
                "ORDER BY changed LIMIT ?"
            )
            rows = conn.execute(sql, (after, *window_args, *args, limit)).fetchall()
            found = [task_from_row(r) for r in rows]
            if edge is None or len(found) >= limit:
                return Changes(found)
            return Changes(found, scanned_to=edge)

        return await self._scan(fn)  # type: ignore[no-any-return]


def _page(rows: sqlite3.Cursor, budget: int | None) -> tuple[builtins.list[Task], bool]:
    """The tasks of `rows`, ending at the one whose payload and result bring the total past
    `budget` (that one included); and whether the budget ended the page."""
    if budget is None:
        return [task_from_row(r) for r in rows.fetchall()], False
    page, total = [], 0
    for row in rows:  # a row at a time, to stop at the budget
        page.append(task_from_row(row))
        total += len(row[4]) + len(row[14] or b"")  # payload, result
        if total > budget:
            return page, True
    return page, False
