"""The SQLite store's operations beside the task lifecycle: queue pauses, cron fires,
idempotency keys, completion callbacks, retention and counts."""

from __future__ import annotations

import builtins
import sqlite3
from collections.abc import Collection

from daemon.models import Counts, NewTask, QueueHealth, ScheduleState, Task
from daemon.store.sqlite_connections import Connections
from daemon.store.sqlite_insert import Insert
from daemon.store.sqlite_rows import COLUMNS, ENDED, task_from_row, type_filter


class SideOps(Connections):
    async def queue_health(self) -> QueueHealth | None:
        return None  # SQLite keeps no such statistics; VACUUM is not needed for a queue

    async def forget_keys(self, *, before: float, limit: int) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM idempotency WHERE rowid IN (SELECT rowid FROM idempotency "
                "WHERE created_at < ? LIMIT ?)",
                (before, limit),
            ).rowcount

        return await self._write(op)  # type: ignore[no-any-return]

    async def purge(
        self,
        *,
        finished_before: float,
        limit: int,
        only_type: str | None = None,
        skip_types: Collection[str] = (),
    ) -> int:
        narrow, args = type_filter(only_type, skip_types)
        sql = (
            f"DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks INDEXED BY tasks_finished "
            f"WHERE finished_at < ? "
            f"AND {ENDED}{narrow} LIMIT ?)"
        )

        def op(conn: sqlite3.Connection) -> int:
            return conn.execute(sql, (finished_before, *args, limit)).rowcount

        return await self._write(op)  # type: ignore[no-any-return]

    async def set_paused(self, queue: str, paused: bool) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO queues (name, paused) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET paused = excluded.paused",
                (queue, int(paused)),
            )

        await self._write(op)

    async def paused_queues(self) -> set[str]:
        def fn(conn: sqlite3.Connection) -> set[str]:
            return {r[0] for r in conn.execute("SELECT name FROM queues WHERE paused = 1")}

        return await self._read(fn)  # type: ignore[no-any-return]

    async def schedules(self) -> dict[str, ScheduleState]:
        def fn(conn: sqlite3.Connection) -> dict[str, ScheduleState]:
            rows = conn.execute("SELECT name, last_fire, paused FROM schedules")
            return {name: ScheduleState(last, bool(paused)) for name, last, paused in rows}

        return await self._read(fn)  # type: ignore[no-any-return]

    async def set_schedule_paused(self, name: str, paused: bool) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO schedules (name, paused) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET paused = excluded.paused",
                (name, int(paused)),
            )

        await self._write(op)

    async def fire(
        self, name: str, *, due: float, previous: float | None, task: NewTask | None
    ) -> bool:
        insert = Insert([task] if task is not None else [])

        def op(conn: sqlite3.Connection) -> int | None:
            conn.execute("INSERT OR IGNORE INTO schedules (name) VALUES (?)", (name,))
            won = conn.execute(
                "UPDATE schedules SET last_fire = ? WHERE name = ? AND last_fire IS ?",
                (due, name, previous),
            ).rowcount
            if not won:
                return None
            return self._insert(conn, insert)

        first: int | None = await self._write(op)
        if first is not None and task is not None:
            self._changed(insert.admitted(first))
        return first is not None

    async def check(self) -> None:
        def op(conn: sqlite3.Connection) -> None:
            return None

        await self._write(op)

    # -- reads ---------------------------------------------------------------------------

    async def counts(self) -> Counts:
        def fn(conn: sqlite3.Connection) -> Counts:
            rows = conn.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall()
            return Counts(**{state: n for state, n in rows})

        return await self._scan(fn)  # type: ignore[no-any-return]

    async def due_callbacks(
        self, *, now: float, limit: int
    ) -> tuple[builtins.list[Task], float | None]:
        ended = f"callback_state = 'pending' AND {ENDED}"

        def fn(conn: sqlite3.Connection) -> tuple[builtins.list[Task], float | None]:
            rows = conn.execute(
                f"SELECT {COLUMNS} FROM tasks INDEXED BY tasks_callbacks "
                f"WHERE {ended} AND callback_next <= ? "
                f"ORDER BY callback_next LIMIT ?",
                (now, limit),
            ).fetchall()
            later = conn.execute(
                f"SELECT min(callback_next) FROM tasks INDEXED BY tasks_callbacks "
                f"WHERE {ended} AND callback_next > ?",
                (now,),
            ).fetchone()[0]
            return [task_from_row(r) for r in rows], later

        return await self._read(fn)  # type: ignore[no-any-return]

    async def callback_attempted(
        self, task_id: str, *, error: str | None, retry_at: float | None
    ) -> Task | None:
        state = "delivered" if error is None else ("pending" if retry_at is not None else "failed")

        def op(conn: sqlite3.Connection) -> Task | None:
            row = conn.execute(
                f"UPDATE tasks SET callback_state = ?, callback_attempts = callback_attempts + 1, "
                f"callback_error = ?, callback_next = ?, changed = next_change() "
                f"WHERE id = ? AND callback_state = 'pending' RETURNING {COLUMNS}",
                (state, error, retry_at or 0.0, task_id),
            ).fetchone()
            return None if row is None else task_from_row(row)

        task: Task | None = await self._write(op)
        if task is not None:
            self._changed([task])
        return task

    async def unfinished_by_queue(self) -> dict[str, Counts]:
        return self._unfinished.by_queue()

    # -- lifecycle -----------------------------------------------------------------------
