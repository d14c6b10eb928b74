"""The PostgreSQL store's reads of tasks: one, a page, and the changes after an event id.

A task by id takes any pooled connection. Pages and changes walk rows: they take one
connection at a time between them (`Connections._scan_fetch`), so that however many a
caller sends, the rest of the pool stays free for admissions, outcomes and point reads.
Neither `type` nor `queue` has an index (each would cost every admission an entry), so a
page or a replay filtered by them first finds the edge of a window of `max_scan` rows in
index order, then tests only the rows inside it.
"""

from __future__ import annotations

from typing import Any

from daemon.models import Changes, Listing, Task, TaskQuery
from daemon.store.postgres_connections import Connections
from daemon.store.postgres_rows import task_from_row
from daemon.store.postgres_sql import COLUMNS


class _Args:
    """The arguments of one statement: each call adds one and returns its `$n`."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"

    def where(self, conditions: list[tuple[str, Any]]) -> str:
        """` WHERE` and the conditions (templates with one `{}` for the value), or ""."""
        if not conditions:
            return ""
        return " WHERE " + " AND ".join(c.format(self(v)) for c, v in conditions)


def _equal(**values: Any) -> list[tuple[str, Any]]:
    return [(f"{column} = {{}}", v) for column, v in values.items() if v is not None]


class ReadOps(Connections):
    async def get(self, task_id: str) -> Task | None:
        rows = await self._fetch(f"SELECT {COLUMNS} FROM offload_tasks WHERE id = $1", task_id)
        return task_from_row(rows[0]) if rows else None

    async def list(self, query: TaskQuery) -> Listing:
        """Walks the primary key (ids are time-ordered), or an index of the state where one
        holds it. The edge and the page are two statements: a task admitted between them is
        above the edge, so the page may hold it; none below the edge is skipped."""
        scope = _equal(state=None if query.state is None else str(query.state))
        if query.before is not None:
            scope.append(("id < {}", query.before))
        narrow = _equal(type=query.type, queue=query.queue)
        scan = query.max_scan if narrow else None
        edge = None
        if scan is not None:
            args = _Args()
            where = args.where(scope)
            rows = await self._scan_fetch(
                f"SELECT id FROM offload_tasks{where} ORDER BY id DESC "
                f"OFFSET {args(scan - 1)} LIMIT 1",
                *args.values,
            )
            edge = rows[0][0] if rows else None
        window = [] if edge is None else [("id >= {}", edge)]
        rows = await self._scan_fetch(*_page_sql(scope + window + narrow, query))
        tasks = [task_from_row(r) for r in rows]
        ended = query.max_bytes is not None and (
            sum(len(t.payload) + len(t.result or b"") for t in tasks) > query.max_bytes
        )
        if edge is None or ended or len(tasks) >= query.limit:
            return Listing(tasks)
        return Listing(tasks, scanned_to=edge)

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
        """Walks the index of change numbers, or finds the one task by id. Change numbers
        come from a sequence, taken when a row is written, not when it commits: a reader
        resuming from a number may miss a change that a slower transaction committed later
        with a smaller one (rare; it needs two writers racing within one round trip of the
        reader)."""
        narrow = _equal(id=task_id, type=type, queue=queue)
        # A task id needs no window: its index finds the one row.
        scan = max_scan if narrow and task_id is None else None
        edge = None
        if scan is not None:
            rows = await self._scan_fetch(
                "SELECT changed FROM offload_tasks WHERE changed > $1 ORDER BY changed "
                "OFFSET $2 LIMIT 1",
                after,
                scan - 1,
            )
            edge = rows[0][0] if rows else None
        window = [] if edge is None else [("changed <= {}", edge)]
        args = _Args()
        where = args.where([("changed > {}", after), *window, *narrow])
        sql = f"SELECT {COLUMNS} FROM offload_tasks{where} ORDER BY changed LIMIT {args(limit)}"
        tasks = [task_from_row(r) for r in await self._scan_fetch(sql, *args.values)]
        if edge is None or len(tasks) >= limit:
            return Changes(tasks)
        return Changes(tasks, scanned_to=edge)


def _page_sql(conditions: list[tuple[str, Any]], query: TaskQuery) -> tuple[Any, ...]:
    """The statement of a page, and its arguments."""
    args = _Args()
    source = "offload_tasks"
    if query.max_bytes is not None:
        # The running total of payload and result bytes, newest first: a row is in the
        # page while the rows before it stay within the budget.
        size = "(octet_length(payload) + coalesce(octet_length(result), 0))"
        source = (
            f"(SELECT {COLUMNS}, sum({size}) OVER (ORDER BY id DESC ROWS UNBOUNDED "
            f"PRECEDING) - {size} AS before_it FROM offload_tasks{args.where(conditions)} "
            f"ORDER BY id DESC LIMIT {args(query.limit)}) AS page"
        )
        return (
            f"SELECT {COLUMNS} FROM {source} WHERE before_it <= {args(query.max_bytes)} "
            "ORDER BY id DESC",
            *args.values,
        )
    sql = (
        f"SELECT {COLUMNS} FROM offload_tasks{args.where(conditions)} ORDER BY id DESC "
        f"LIMIT {args(query.limit)}"
    )
    return (sql, *args.values)
