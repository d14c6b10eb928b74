"""The embedded SQLite store: one file, one daemon, WAL, group commit.

Writes go through `Writer` (one connection in its own thread, many operations per
transaction); reads go through two read-only connections, each in a thread of its own: one
for point reads, one for scans (bounded in rows, see sqlite_reads.py), so that no scan
delays a point read and none blocks the event loop. An exclusive `flock` on `<file>.lock`
keeps a second daemon away. The unfinished-task count that bounds admission lives in the
writer thread and is recounted from the table whenever a transaction rolls back.
"""

from __future__ import annotations

import math
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Collection, Sequence
from contextlib import asynccontextmanager

import msgspec

from daemon.config import StoreConfig
from daemon.errors import (
    ConfigError,
    Conflict,
    IdempotencyKeyReused,
    NotFound,
    QueueFull,
    StoreUnavailable,
)
from daemon.models import (
    Attempt,
    IdempotencyKey,
    NewTask,
    StartNow,
    Task,
    TaskState,
)
from daemon.store.base import ClaimBatch, Hooks
from daemon.store.sqlite_batch import PROMOTE_SQL, Row, claim_sql, claims, take
from daemon.store.sqlite_file import database_path, lock
from daemon.store.sqlite_insert import Insert
from daemon.store.sqlite_outcomes import OutcomeOps
from daemon.store.sqlite_reads import ReadOps
from daemon.store.sqlite_rows import (
    COLUMNS,
    encode,
    task_from_row,
    type_filter,
    with_attempt,
)
from daemon.store.sqlite_schema import SchemaTooNew
from daemon.store.sqlite_side import SideOps
from daemon.store.sqlite_unfinished import QUEUED, RUNNING


class SQLiteStore(OutcomeOps, SideOps, ReadOps):
    """The `Store` over one SQLite file. Build it with `open_sqlite()`."""

    def admit(
        self,
        tasks: Sequence[NewTask],
        *,
        max_pending: int,
        idempotency: IdempotencyKey | None = None,
        start: StartNow | None = None,
    ) -> Awaitable[list[Task]]:
        insert = Insert(tasks, start, time.time() if start is not None else 0.0)
        if idempotency is None and start is None:
            # The admission's own future, not a coroutine around it: one frame fewer to
            # suspend and resume on the way to every answer.
            return self._admissions.admit(insert, max_pending)
        return self._admit_one(insert, max_pending, idempotency)

    async def _admit_one(
        self, insert: Insert, max_pending: int, idempotency: IdempotencyKey | None
    ) -> list[Task]:
        """An admission that commits alone: under an idempotency key, or started."""
        tasks = insert.tasks

        def op(conn: sqlite3.Connection) -> tuple[int | list[Task], bool]:
            if idempotency is not None:
                seen = self._seen(conn, idempotency)
                if seen is not None:
                    return seen, True
            pending = self._unfinished.total
            if pending + len(tasks) > max_pending:
                raise QueueFull(
                    f"{pending} tasks are unfinished (max_pending is {max_pending})",
                    pending=pending,
                    needed=pending + len(tasks) - max_pending,
                )
            first = self._insert(conn, insert)
            if idempotency is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO idempotency (scope, key, fingerprint, task_ids, "
                    "created_at) VALUES (?, ?, ?, ?, ?)",
                    (
                        idempotency.scope,
                        idempotency.key,
                        idempotency.fingerprint,
                        encode([t.id for t in tasks]),
                        tasks[0].created_at,
                    ),
                )
            return first, False

        # Atomic without a key: the insert is then the op's only write, all or nothing by
        # itself (several statements share a savepoint, see sqlite_insert.run).
        found, replayed = await self._write(op, atomic=idempotency is None)
        if replayed:
            return found  # type: ignore[no-any-return]
        admitted = insert.admitted(found)
        self._changed(admitted)
        return admitted

    @staticmethod
    def _seen(conn: sqlite3.Connection, idem: IdempotencyKey) -> list[Task] | None:
        """The tasks admitted under this key within its window, as they are now."""
        row = conn.execute(
            "SELECT fingerprint, task_ids FROM idempotency WHERE scope = ? AND key = ? "
            "AND created_at >= ?",
            (idem.scope, idem.key, idem.not_before),
        ).fetchone()
        if row is None:
            return None
        if row[0] != idem.fingerprint:
            raise IdempotencyKeyReused(
                "this Idempotency-Key was used for a different request body",
                field="Idempotency-Key",
            )
        found = []
        for task_id in msgspec.json.decode(row[1], type=list[str]):
            task = conn.execute(f"SELECT {COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if task is not None:  # retention may have deleted it since
                found.append(task_from_row(task))
        return found

    async def claim(
        self,
        *,
        owner: str,
        limit: int,
        now: float,
        lease: float,
        only_type: str | None = None,
        skip_types: Collection[str] = (),
        only_queue: str | None = None,
        skip_queues: Collection[str] = (),
    ) -> ClaimBatch:
        narrow, narrow_args = type_filter(only_type, skip_types)
        by_queue, queue_args = type_filter(only_queue, skip_queues, column="queue")
        narrow, narrow_args = narrow + by_queue, narrow_args + queue_args
        sql = claim_sql(narrow)
        args = (*narrow_args, limit, *narrow_args)

        def op(conn: sqlite3.Connection) -> tuple[list[Row], int, float | None]:
            if now >= self._promote_at:
                conn.execute(PROMOTE_SQL, (now,))
            found, next_due = conn.execute(sql, args).fetchone()
            if not narrow:  # the earliest deferred task of all: none is due before it
                self._promote_at = math.inf if next_due is None else next_due
            first = self._change + 1
            rows = take(conn, found, first_change=first, owner=owner, now=now,
                        lease_until=now + lease)  # fmt: skip
            self._change += len(rows)
            for row in rows:
                self._unfinished.move(row[3], QUEUED, RUNNING)
            return rows, first, None if len(rows) == limit else next_due

        # Atomic: the claim is one statement; the promotion before it changes nothing any
        # reader sees, so it may stay even if the claim fails. Background: the feeder's,
        # not a request's (see sqlite_writer).
        rows, first, next_due = await self._write(op, atomic=True, lazy=True)
        taken = claims(rows, first_change=first, owner=owner, now=now, lease_until=now + lease)
        self._changed([c.task for c in taken])
        return ClaimBatch(claims=taken, next_due=next_due)

    async def cancel(self, task_id: str, *, now: float) -> tuple[Task, TaskState]:
        def op(conn: sqlite3.Connection) -> tuple[Task, TaskState]:
            before = self._state_of(conn, task_id)
            if before.terminal:
                raise Conflict(f"task {task_id} already ended {before.value}", field="id")
            row = conn.execute(
                f"UPDATE tasks SET state = 'cancelled', changed = next_change(), "
                f"finished_at = ?, owner = NULL, "
                f"lease_until = NULL WHERE id = ? RETURNING {COLUMNS}",
                (now, task_id),
            ).fetchone()
            cancelled = task_from_row(row)
            self._unfinished.remove(cancelled.queue, before.value)
            return cancelled, before

        cancelled: tuple[Task, TaskState] = await self._write(op)
        self._changed([cancelled[0]])
        return cancelled

    async def retry(self, task_id: str, *, now: float, max_pending: int) -> Task:
        def op(conn: sqlite3.Connection) -> Task:
            before = self._state_of(conn, task_id)
            if before not in (TaskState.FAILED, TaskState.CANCELLED):
                raise Conflict(
                    f"task {task_id} is {before.value}; only failed or cancelled tasks can be "
                    f"retried",
                    field="id",
                )
            if self._unfinished.total + 1 > max_pending:
                raise QueueFull(
                    f"{self._unfinished.total} tasks are unfinished (max_pending is {max_pending})",
                    pending=self._unfinished.total,
                    needed=1,
                )
            row = conn.execute(
                f"UPDATE tasks SET state = 'queued', changed = next_change(), "
                f"attempt_floor = attempts, run_at = ?, deferred = 0, "
                f"started_at = NULL, finished_at = NULL, result = NULL, callback_attempts = 0, "
                f"callback_next = 0, callback_error = NULL, callback_state = CASE WHEN callback "
                f"IS NULL THEN NULL ELSE 'pending' END WHERE id = ? "
                f"RETURNING {COLUMNS}",
                (now, task_id),
            ).fetchone()
            task = task_from_row(row)
            self._unfinished.add(task.queue, QUEUED)
            return task

        retried: Task = await self._write(op)
        self._changed([retried])
        return retried

    @staticmethod
    def _state_of(conn: sqlite3.Connection, task_id: str) -> TaskState:
        row = conn.execute("SELECT state FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            raise NotFound(f"no task {task_id}", field="id")
        return TaskState(row[0])

    async def recover(self, *, owner: str, now: float) -> int:
        """This store is exclusive (one daemon per file), so every running row is an orphan."""
        error = "interrupted: the daemon stopped (crash or kill) with this run claimed or under way"

        def op(conn: sqlite3.Connection) -> int:
            rows = conn.execute(f"SELECT {COLUMNS} FROM tasks WHERE state = 'running'").fetchall()
            for row in rows:
                task = task_from_row(row)
                started = task.started_at or now
                entry = Attempt(task.attempts, started, max(0.0, now - started), error)
                history, _ = with_attempt(row[16], entry)
                if task.attempts_left > 0:
                    conn.execute(
                        "UPDATE tasks SET state = 'queued', changed = next_change(), "
                        "run_at = ?, last_error = ?, "
                        "history = ?, owner = NULL, lease_until = NULL WHERE id = ?",
                        (now, error, history, task.id),
                    )
                    self._unfinished.move(task.queue, RUNNING, QUEUED)
                else:
                    conn.execute(
                        "UPDATE tasks SET state = 'failed', changed = next_change(), "
                        "finished_at = ?, last_error = ?, "
                        "history = ?, owner = NULL, lease_until = NULL WHERE id = ?",
                        (now, error, history, task.id),
                    )
                    self._unfinished.remove(task.queue, RUNNING)
            return len(rows)

        return await self._write(op)  # type: ignore[no-any-return]


@asynccontextmanager
async def open_sqlite(
    config: StoreConfig, hooks: Hooks | None = None
) -> AsyncIterator[SQLiteStore]:
    """Lock the file, migrate, and serve; on exit the writer commits what was queued, then
    the connections close and the lock is released."""
    path = database_path(config.url).absolute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreUnavailable(f"cannot create {path.parent}: {exc.strerror}") from exc
    lock_fd = lock(path)
    try:
        store = SQLiteStore(path, config.synchronous)
        hooks = hooks or Hooks()
        store.writer.on_commit = hooks.on_commit
        store.hooks = hooks
        try:
            await store.writer.start(store._setup)
        except SchemaTooNew as exc:
            # An older offload on a newer database: no restart mends that (exit 78).
            raise ConfigError(
                str(path), [f"store.url: {exc}; run that newer offload, or restore a backup"]
            ) from exc
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open {path}: {exc}") from exc
        try:
            yield store
        finally:
            await store.writer.stop()
            await store._close_readers()
    finally:
        os.close(lock_fd)
