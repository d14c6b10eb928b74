"""The SQLite store's reads of tasks: one, a page, and the changes after an event id. They go
through the reader connection, never the writer."""

from __future__ import annotations

import builtins
import sqlite3

from daemon.models import Task, TaskQuery
from daemon.store.sqlite_connections import Connections
from daemon.store.sqlite_rows import COLUMNS, task_from_row


class ReadOps(Connections):
    async def get(self, task_id: str) -> Task | None:
        def fn(conn: sqlite3.Connection, task_id: str) -> Task | None:
            row = conn.execute(f"SELECT {COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
            return None if row is None else task_from_row(row)

        return await self._read(fn, task_id)  # type: ignore[no-any-return]

    async def list(self, query: TaskQuery) -> list[Task]:
        where, args = [], []
        for column, value in (("state", query.state), ("type", query.type), ("queue", query.queue)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(str(value))
        if query.before is not None:
            # Pages follow seq, as ids do. If the cursor's task is gone (retention deleted
            # it between two pages), the page starts below the next id after it instead.
            where.append(
                "seq < coalesce((SELECT seq FROM tasks WHERE id = ?), "
                "(SELECT seq FROM tasks WHERE id > ? ORDER BY id LIMIT 1), 9223372036854775807)"
            )
            args += [query.before, query.before]
        sql = f"SELECT {COLUMNS} FROM tasks"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(str(query.limit))

        budget = query.max_bytes

        def fn(conn: sqlite3.Connection) -> list[Task]:
            if budget is None:
                return [task_from_row(r) for r in conn.execute(sql, args).fetchall()]
            page, total = [], 0
            for row in conn.execute(sql, args):  # a row at a time, to stop at the budget
                page.append(task_from_row(row))
                total += len(row[4]) + len(row[14] or b"")  # payload, result
                if total > budget:
                    break
            return page

        return await self._read(fn)  # type: ignore[no-any-return]

    async def changes(
        self,
        *,
        after: int,
        limit: int,
        task_id: str | None = None,
        type: str | None = None,
        queue: str | None = None,
    ) -> builtins.list[Task]:
        where, args = ["changed > ?"], [str(after)]
        for column, value in (("id", task_id), ("type", type), ("queue", queue)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = f"SELECT {COLUMNS} FROM tasks WHERE {' AND '.join(where)} ORDER BY changed LIMIT ?"

        def fn(conn: sqlite3.Connection) -> builtins.list[Task]:
            return [task_from_row(r) for r in conn.execute(sql, (*args, limit)).fetchall()]

        return await self._read(fn)  # type: ignore[no-any-return]
