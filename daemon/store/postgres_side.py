"""The PostgreSQL store's operations beside the task lifecycle: queue pauses, cron fires,
idempotency keys, completion callbacks, retention, counts and table health."""

from __future__ import annotations

import builtins
from collections.abc import Collection
from typing import Any

from daemon.models import (
    Counts,
    NewTask,
    QueueHealth,
    ScheduleState,
    Task,
)
from daemon.store.postgres_connections import Connections
from daemon.store.postgres_rows import (
    admit_args,
    task_from_row,
)
from daemon.store.postgres_sql import (
    ADMIT_SQL,
    CALLBACK_LEASE,
    CHANGE,
    COLUMNS,
    DUE_CALLBACKS_SQL,
    DURABLE_SETTING,
    UNBOUNDED,
)


class SideOps(Connections):
    async def forget_keys(self, *, before: float, limit: int) -> int:
        async with self._conn() as conn:
            status: str = await conn.execute(
                "DELETE FROM offload_idempotency WHERE (scope, key) IN (SELECT scope, key "
                "FROM offload_idempotency WHERE created_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
                before,
                limit,
            )
        return int(status.rsplit(" ", 1)[-1])

    async def purge(
        self,
        *,
        finished_before: float,
        limit: int,
        only_type: str | None = None,
        skip_types: Collection[str] = (),
    ) -> int:
        """One statement; rows another node is deleting at the same time are skipped."""
        narrow = ""
        args: list[Any] = [finished_before, limit]
        if only_type is not None:
            narrow, args = " AND type = $3", [*args, only_type]
        elif skip_types:
            narrow, args = " AND type <> ALL($3::text[])", [*args, list(skip_types)]
        sql = (
            "DELETE FROM offload_tasks WHERE id IN (SELECT id FROM offload_tasks "
            "WHERE finished_at < $1 AND state IN ('succeeded', 'failed', 'cancelled')"
            f"{narrow} LIMIT $2 FOR UPDATE SKIP LOCKED)"
        )
        async with self._conn() as conn:
            status: str = await conn.execute(sql, *args)
        return int(status.rsplit(" ", 1)[-1])

    async def set_paused(self, queue: str, paused: bool) -> None:
        await self._fetch(
            "INSERT INTO offload_queues (name, paused) VALUES ($1, $2) "
            "ON CONFLICT (name) DO UPDATE SET paused = excluded.paused",
            queue,
            paused,
        )
        if not paused:
            self._node.hint_work()

    async def paused_queues(self) -> set[str]:
        rows = await self._fetch("SELECT name FROM offload_queues WHERE paused")
        return {r[0] for r in rows}

    async def schedules(self) -> dict[str, ScheduleState]:
        rows = await self._fetch("SELECT name, last_fire, paused FROM offload_schedules")
        return {name: ScheduleState(last, paused) for name, last, paused in rows}

    async def set_schedule_paused(self, name: str, paused: bool) -> None:
        await self._fetch(
            "INSERT INTO offload_schedules (name, paused) VALUES ($1, $2) "
            "ON CONFLICT (name) DO UPDATE SET paused = excluded.paused",
            name,
            paused,
        )

    async def fire(
        self, name: str, *, due: float, previous: float | None, task: NewTask | None
    ) -> bool:
        """One transaction: a compare-and-set of the schedule's last fire (a node that
        races us waits on the row, then finds it changed and loses), then the task's
        admission, which like SQLite's is not held to max_pending."""
        async with self._conn() as conn, conn.transaction():
            await conn.execute(DURABLE_SETTING)  # an admission: it must survive a crash
            await conn.execute(
                "INSERT INTO offload_schedules (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
                name,
            )
            won = await conn.fetchval(
                "UPDATE offload_schedules SET last_fire = $2 "
                "WHERE name = $1 AND last_fire IS NOT DISTINCT FROM $3 RETURNING true",
                name,
                due,
                previous,
            )
            fired = None
            if won and task is not None:
                row = await conn.fetchrow(ADMIT_SQL, *admit_args([task], UNBOUNDED))
                fired = Task.admitted(task, row["changed"][0])
        if fired is not None:
            self._node.hint_work()
            self._node.changed([fired])
        return bool(won)

    async def check(self) -> None:
        async with self._conn() as conn:
            await conn.fetchval("SELECT 1")

    # -- reads ---------------------------------------------------------------------------

    async def counts(self) -> Counts:
        rows = await self._scan_fetch("SELECT state, count(*) FROM offload_tasks GROUP BY state")
        return Counts(**{r[0]: r[1] for r in rows})

    async def due_callbacks(
        self, *, now: float, limit: int
    ) -> tuple[builtins.list[Task], float | None]:
        """One statement that also hands the deliveries to this node: their next attempt
        moves CALLBACK_LEASE seconds on, so no other node delivers them meanwhile (and one
        does if this node dies before `callback_attempted`)."""
        rows = await self._fetch(DUE_CALLBACKS_SQL, now, limit, CALLBACK_LEASE)
        due = [task_from_row(r) for r in rows if r[0] is not None]
        return due, rows[0]["later"] if rows else None

    async def callback_attempted(
        self, task_id: str, *, error: str | None, retry_at: float | None
    ) -> Task | None:
        state = "delivered" if error is None else ("pending" if retry_at is not None else "failed")
        rows = await self._fetch(
            f"UPDATE offload_tasks SET callback_state = $1, "
            f"callback_attempts = callback_attempts + 1, callback_error = $2, "
            f"callback_next = $3, {CHANGE} "
            f"WHERE id = $4 AND callback_state = 'pending' RETURNING {COLUMNS}",
            state,
            error,
            retry_at or 0.0,
            task_id,
        )
        if not rows:
            return None
        task = task_from_row(rows[0])
        self._node.changed([task])
        return task

    async def unfinished_by_queue(self) -> dict[str, Counts]:
        rows = await self._fetch(
            "SELECT queue, state, count(*) FROM offload_tasks "
            "WHERE state IN ('queued', 'running') GROUP BY queue, state"
        )
        found: dict[str, dict[str, int]] = {}
        for queue, state, n in rows:
            found.setdefault(queue, {})[state] = n
        return {queue: Counts(**by_state) for queue, by_state in found.items()}

    async def queue_health(self) -> QueueHealth | None:
        """Live and dead row versions of the task table, from PostgreSQL's statistics (a
        growing dead count means vacuum does not keep up, and claims slow down)."""
        return await self._node.queue_health()
