"""The embedded SQLite store: one file, one daemon, WAL, group commit.

Writes go through `Writer` (one connection in its own thread, many operations per
transaction); reads go through a second, read-only connection in another thread, so neither
blocks the event loop. An exclusive `flock` on `<file>.lock` keeps a second daemon away.
The unfinished-task count that bounds admission lives in the writer thread and is recounted
from the table whenever a transaction rolls back.
"""

from __future__ import annotations

import asyncio
import builtins
import fcntl
import os
import sqlite3
from collections.abc import AsyncIterator, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from daemon.config import StoreConfig
from daemon.errors import (
    Conflict,
    IdempotencyKeyReused,
    NotFound,
    QueueFull,
    StoreLocked,
    StoreUnavailable,
)
from daemon.models import (
    Attempt,
    Claim,
    Counts,
    IdempotencyKey,
    NewTask,
    Outcome,
    Released,
    Retry,
    ScheduleState,
    Succeeded,
    Task,
    TaskQuery,
    TaskState,
)
from daemon.store.base import ClaimBatch, Hooks
from daemon.store.sqlite_schema import SchemaTooNew, migrate
from daemon.store.sqlite_writer import Writer

T = TypeVar("T")
HISTORY_LIMIT = 10
COLUMNS = (
    "id, type, queue, state, payload, priority, run_at, created_at, timeout, max_attempts, "
    "attempts, attempt_floor, started_at, finished_at, result, last_error, history, changed, "
    "callback, callback_state, callback_attempts, callback_error"
)
FENCE = "id = ? AND state = 'running' AND attempts = ? AND owner = ?"
_history_decoder = msgspec.json.Decoder(list[Attempt])
_encode = msgspec.json.encode


def database_path(url: str) -> Path:
    """`sqlite:relative/path.db` (from the working directory) or `sqlite:///absolute.db`."""
    rest = url.removeprefix("sqlite:")
    if rest.startswith("//"):
        rest = rest[2:]
    if not rest:
        raise ValueError("expected sqlite:PATH")
    return Path(rest)


def _task(row: tuple[Any, ...]) -> Task:
    history = () if row[16] is None else tuple(_history_decoder.decode(row[16]))
    return Task(
        id=row[0],
        type=row[1],
        queue=row[2],
        state=TaskState(row[3]),
        payload=row[4],
        priority=row[5],
        run_at=row[6],
        created_at=row[7],
        timeout=row[8],
        max_attempts=row[9],
        attempts=row[10],
        attempt_floor=row[11],
        started_at=row[12],
        finished_at=row[13],
        result=row[14],
        last_error=row[15],
        history=history,
        changed=row[17],
        callback=row[18],
        callback_state=row[19],
        callback_attempts=row[20],
        callback_error=row[21],
    )


def _type_filter(
    only: str | None, skip: Collection[str], *, column: str = "type"
) -> tuple[str, list[str]]:
    """An SQL condition (with its arguments) narrowing a query to some types (or queues)."""
    if only is not None:
        return f" AND {column} = ?", [only]
    if skip:
        return f" AND {column} NOT IN ({', '.join('?' * len(skip))})", list(skip)
    return "", []


def _with_attempt(history: bytes | None, entry: Attempt) -> bytes:
    past = [] if history is None else _history_decoder.decode(history)
    past.append(entry)
    return _encode(past[-HISTORY_LIMIT:])


class SQLiteStore:
    """The `Store` over one SQLite file. Build it with `open_sqlite()`."""

    def __init__(self, path: Path, synchronous: str) -> None:
        self._path = path
        self._synchronous = synchronous.upper()
        self._writer = Writer(self._connect, f"{path}-wal")
        self._writer.on_rollback = self._recount
        self._readers = ThreadPoolExecutor(1, "sqlite-reader", initializer=self._open_reader)
        self._local: dict[str, sqlite3.Connection] = {}
        self._pending = 0  # touched only in the writer thread
        self._change = 0  # the change sequence; touched only in the writer thread
        self.hooks = Hooks()  # read at each call: the daemon fills some in after opening

    @property
    def description(self) -> str:
        return f"sqlite:{self._path} (synchronous={self._synchronous.lower()})"

    @property
    def writer(self) -> Writer:
        return self._writer

    # -- connections -------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA journal_size_limit = 67108864")
        conn.execute("PRAGMA cache_size = -16384")  # 16 MiB
        conn.execute("PRAGMA temp_store = MEMORY")
        return conn

    def _open_reader(self) -> None:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA query_only = 1")
        conn.execute("PRAGMA cache_size = -8192")
        self._local["reader"] = conn

    async def _read(self, fn: Any, *args: Any) -> Any:
        def call() -> Any:
            return fn(self._local["reader"], *args)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._readers, call)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"the store could not be read: {exc}") from exc

    async def _write(self, op: Any) -> Any:
        return await self._writer.submit(op)

    def _setup(self, conn: sqlite3.Connection) -> None:
        migrate(conn)
        self._recount(conn)
        self._change = conn.execute("SELECT coalesce(max(changed), 0) FROM tasks").fetchone()[0]
        conn.create_function("next_change", 0, self._next_change)

    def _changed(self, tasks: list[Task]) -> None:
        if tasks:
            self.hooks.on_change(tasks)

    def _recount(self, conn: sqlite3.Connection) -> None:
        row = conn.execute(
            "SELECT count(*) FROM tasks WHERE state IN ('queued', 'running')"
        ).fetchone()
        self._pending = int(row[0])

    # -- writes ---------------------------------------------------------------------------

    def _insert(self, conn: sqlite3.Connection, tasks: Sequence[NewTask]) -> list[Task]:
        admitted = [Task.admitted(t, self._next_change()) for t in tasks]
        conn.executemany(
            "INSERT INTO tasks (id, type, queue, state, payload, priority, run_at, "
            "created_at, timeout, max_attempts, changed, callback, callback_state) "
            "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    t.id,
                    t.type,
                    t.queue,
                    t.payload,
                    t.priority,
                    t.run_at,
                    t.created_at,
                    t.timeout,
                    t.max_attempts,
                    t.changed,
                    t.callback,
                    t.callback_state,
                )
                for t in admitted
            ],
        )
        self._pending += len(tasks)
        return admitted

    def _next_change(self) -> int:
        """The next value of the change sequence (writer thread only; also the SQL function
        `next_change()`, so each row a statement changes gets its own)."""
        self._change += 1
        return self._change

    async def admit(
        self,
        tasks: Sequence[NewTask],
        *,
        max_pending: int,
        idempotency: IdempotencyKey | None = None,
    ) -> list[Task]:
        def op(conn: sqlite3.Connection) -> tuple[list[Task], bool]:
            if idempotency is not None:
                seen = self._seen(conn, idempotency)
                if seen is not None:
                    return seen, True
            if self._pending + len(tasks) > max_pending:
                raise QueueFull(
                    f"{self._pending} tasks are unfinished (max_pending is {max_pending})",
                    pending=self._pending,
                    needed=self._pending + len(tasks) - max_pending,
                )
            admitted = self._insert(conn, tasks)
            if idempotency is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO idempotency (scope, key, fingerprint, task_ids, "
                    "created_at) VALUES (?, ?, ?, ?, ?)",
                    (
                        idempotency.scope,
                        idempotency.key,
                        idempotency.fingerprint,
                        _encode([t.id for t in tasks]),
                        tasks[0].created_at,
                    ),
                )
            return admitted, False

        found, replayed = await self._write(op)
        if not replayed:
            self._changed(found)
        return found  # type: ignore[no-any-return]

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
                found.append(_task(task))
        return found

    async def forget_keys(self, *, before: float, limit: int) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM idempotency WHERE rowid IN (SELECT rowid FROM idempotency "
                "WHERE created_at < ? LIMIT ?)",
                (before, limit),
            ).rowcount

        return await self._write(op)  # type: ignore[no-any-return]

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
        narrow, narrow_args = _type_filter(only_type, skip_types)
        by_queue, queue_args = _type_filter(only_queue, skip_queues, column="queue")
        narrow, narrow_args = narrow + by_queue, narrow_args + queue_args
        claim_sql = (
            f"UPDATE tasks SET state = 'running', changed = next_change(), "
            f"attempts = attempts + 1, owner = ?, "
            f"lease_until = ?, started_at = ? WHERE seq IN (SELECT seq FROM tasks "
            f"WHERE state = 'queued' AND run_at <= ?{narrow} ORDER BY priority DESC, seq "
            f"LIMIT ?) RETURNING seq, {COLUMNS}"
        )
        claim_args = (owner, now + lease, now, now, *narrow_args, limit)

        def op(conn: sqlite3.Connection) -> ClaimBatch:
            rows = conn.execute(claim_sql, claim_args).fetchall()
            rows.sort(key=lambda r: (-r[6], r[0]))
            claims = [
                Claim(task=_task(r[1:]), owner=owner, attempt=r[11], lease_until=now + lease)
                for r in rows
            ]
            next_due = None
            if len(rows) < limit:
                next_due = conn.execute(
                    f"SELECT min(run_at) FROM tasks WHERE state = 'queued' AND run_at > ?{narrow}",
                    (now, *narrow_args),
                ).fetchone()[0]
            return ClaimBatch(claims=claims, next_due=next_due)

        batch: ClaimBatch = await self._write(op)
        self._changed([c.task for c in batch.claims])
        return batch

    async def record(self, claim: Claim, outcome: Outcome) -> Task | None:
        fence = (claim.task.id, claim.attempt, claim.owner)

        def op(conn: sqlite3.Connection) -> Task | None:
            row = self._apply_outcome(conn, claim, outcome, fence)
            if row is None:
                return None
            task = _task(row)
            if task.state.terminal:
                self._pending -= 1
            return task

        recorded: Task | None = await self._write(op)
        if recorded is not None:
            self._changed([recorded])
        return recorded

    def _apply_outcome(
        self, conn: sqlite3.Connection, claim: Claim, outcome: Outcome, fence: tuple[Any, ...]
    ) -> tuple[Any, ...] | None:
        ret = f"RETURNING {COLUMNS}"
        if isinstance(outcome, Succeeded):
            return conn.execute(  # type: ignore[no-any-return]
                f"UPDATE tasks SET state = 'succeeded', changed = next_change(), "
                f"result = ?, finished_at = ?, "
                f"owner = NULL, lease_until = NULL WHERE {FENCE} {ret}",
                (outcome.result, outcome.finished_at, *fence),
            ).fetchone()
        if isinstance(outcome, Released):
            return conn.execute(  # type: ignore[no-any-return]
                f"UPDATE tasks SET state = 'queued', changed = next_change(), "
                f"attempts = attempts - 1, owner = NULL, "
                f"lease_until = NULL, started_at = NULL WHERE {FENCE} {ret}",
                fence,
            ).fetchone()
        found = conn.execute(f"SELECT history FROM tasks WHERE {FENCE}", fence).fetchone()
        if found is None:
            return None
        started = claim.task.started_at or 0.0
        entry = Attempt(claim.attempt, started, outcome.duration, outcome.error)
        history = _with_attempt(found[0], entry)
        if isinstance(outcome, Retry):
            return conn.execute(  # type: ignore[no-any-return]
                f"UPDATE tasks SET state = 'queued', changed = next_change(), "
                f"run_at = ?, last_error = ?, history = ?, "
                f"owner = NULL, lease_until = NULL WHERE {FENCE} {ret}",
                (outcome.run_at, outcome.error, history, *fence),
            ).fetchone()
        return conn.execute(  # type: ignore[no-any-return]
            f"UPDATE tasks SET state = 'failed', changed = next_change(), "
            f"finished_at = ?, last_error = ?, history = ?, "
            f"owner = NULL, lease_until = NULL WHERE {FENCE} {ret}",
            (outcome.finished_at, outcome.error, history, *fence),
        ).fetchone()

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
            self._pending -= 1
            return _task(row), before

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
            if self._pending + 1 > max_pending:
                raise QueueFull(
                    f"{self._pending} tasks are unfinished (max_pending is {max_pending})",
                    pending=self._pending,
                    needed=1,
                )
            row = conn.execute(
                f"UPDATE tasks SET state = 'queued', changed = next_change(), "
                f"attempt_floor = attempts, run_at = ?, "
                f"started_at = NULL, finished_at = NULL, result = NULL, callback_attempts = 0, "
                f"callback_next = 0, callback_error = NULL, callback_state = CASE WHEN callback "
                f"IS NULL THEN NULL ELSE 'pending' END WHERE id = ? "
                f"RETURNING {COLUMNS}",
                (now, task_id),
            ).fetchone()
            self._pending += 1
            return _task(row)

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
        error = "interrupted: the daemon stopped without finishing this run (crash or kill)"

        def op(conn: sqlite3.Connection) -> int:
            rows = conn.execute(f"SELECT {COLUMNS} FROM tasks WHERE state = 'running'").fetchall()
            for row in rows:
                task = _task(row)
                started = task.started_at or now
                entry = Attempt(task.attempts, started, max(0.0, now - started), error)
                history = _with_attempt(row[16], entry)
                if task.attempts_left > 0:
                    conn.execute(
                        "UPDATE tasks SET state = 'queued', changed = next_change(), "
                        "run_at = ?, last_error = ?, "
                        "history = ?, owner = NULL, lease_until = NULL WHERE id = ?",
                        (now, error, history, task.id),
                    )
                else:
                    conn.execute(
                        "UPDATE tasks SET state = 'failed', changed = next_change(), "
                        "finished_at = ?, last_error = ?, "
                        "history = ?, owner = NULL, lease_until = NULL WHERE id = ?",
                        (now, error, history, task.id),
                    )
                    self._pending -= 1
            return len(rows)

        return await self._write(op)  # type: ignore[no-any-return]

    async def purge(
        self,
        *,
        finished_before: float,
        limit: int,
        only_type: str | None = None,
        skip_types: Collection[str] = (),
    ) -> int:
        narrow, args = _type_filter(only_type, skip_types)
        sql = (
            f"DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks WHERE finished_at < ? "
            f"AND state IN ('succeeded', 'failed', 'cancelled'){narrow} LIMIT ?)"
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
        def op(conn: sqlite3.Connection) -> list[Task] | None:
            conn.execute("INSERT OR IGNORE INTO schedules (name) VALUES (?)", (name,))
            won = conn.execute(
                "UPDATE schedules SET last_fire = ? WHERE name = ? AND last_fire IS ?",
                (due, name, previous),
            ).rowcount
            if not won:
                return None
            return self._insert(conn, [task]) if task is not None else []

        admitted: list[Task] | None = await self._write(op)
        if admitted:
            self._changed(admitted)
        return admitted is not None

    async def check(self) -> None:
        def op(conn: sqlite3.Connection) -> None:
            return None

        await self._write(op)

    # -- reads ---------------------------------------------------------------------------

    async def get(self, task_id: str) -> Task | None:
        def fn(conn: sqlite3.Connection, task_id: str) -> Task | None:
            row = conn.execute(f"SELECT {COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
            return None if row is None else _task(row)

        return await self._read(fn, task_id)  # type: ignore[no-any-return]

    async def list(self, query: TaskQuery) -> list[Task]:
        where, args = [], []
        for column, value in (("state", query.state), ("type", query.type), ("queue", query.queue)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(str(value))
        if query.before is not None:
            where.append("seq < coalesce((SELECT seq FROM tasks WHERE id = ?), -1)")
            args.append(query.before)
        sql = f"SELECT {COLUMNS} FROM tasks"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(str(query.limit))

        def fn(conn: sqlite3.Connection) -> list[Task]:
            return [_task(r) for r in conn.execute(sql, args).fetchall()]

        return await self._read(fn)  # type: ignore[no-any-return]

    async def counts(self) -> Counts:
        def fn(conn: sqlite3.Connection) -> Counts:
            rows = conn.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall()
            return Counts(**{state: n for state, n in rows})

        return await self._read(fn)  # type: ignore[no-any-return]

    async def due_callbacks(
        self, *, now: float, limit: int
    ) -> tuple[builtins.list[Task], float | None]:
        ended = "callback_state = 'pending' AND state IN ('succeeded', 'failed', 'cancelled')"

        def fn(conn: sqlite3.Connection) -> tuple[builtins.list[Task], float | None]:
            rows = conn.execute(
                f"SELECT {COLUMNS} FROM tasks WHERE {ended} AND callback_next <= ? "
                f"ORDER BY callback_next LIMIT ?",
                (now, limit),
            ).fetchall()
            later = conn.execute(
                f"SELECT min(callback_next) FROM tasks WHERE {ended} AND callback_next > ?",
                (now,),
            ).fetchone()[0]
            return [_task(r) for r in rows], later

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
            return None if row is None else _task(row)

        task: Task | None = await self._write(op)
        if task is not None:
            self._changed([task])
        return task

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
            return [_task(r) for r in conn.execute(sql, (*args, limit)).fetchall()]

        return await self._read(fn)  # type: ignore[no-any-return]

    async def unfinished_by_queue(self) -> dict[str, Counts]:
        def fn(conn: sqlite3.Connection) -> dict[str, Counts]:
            found: dict[str, dict[str, int]] = {}
            for queue, state, n in conn.execute(
                "SELECT queue, state, count(*) FROM tasks "
                "WHERE state IN ('queued', 'running') GROUP BY queue, state"
            ):
                found.setdefault(queue, {})[state] = n
            return {queue: Counts(**by_state) for queue, by_state in found.items()}

        return await self._read(fn)  # type: ignore[no-any-return]

    # -- lifecycle -----------------------------------------------------------------------

    async def _close_readers(self) -> None:
        def close() -> None:
            conn = self._local.pop("reader", None)
            if conn is not None:
                conn.close()

        await asyncio.get_running_loop().run_in_executor(self._readers, close)
        self._readers.shutdown(wait=True)


@asynccontextmanager
async def open_sqlite(
    config: StoreConfig, hooks: Hooks | None = None
) -> AsyncIterator[SQLiteStore]:
    """Lock the file, migrate, and serve; on exit the writer commits what was queued, then
    both connections close and the lock is released."""
    path = database_path(config.url).absolute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreUnavailable(f"cannot create {path.parent}: {exc.strerror}") from exc
    lock_fd = _lock(path)
    try:
        store = SQLiteStore(path, config.synchronous)
        hooks = hooks or Hooks()
        store.writer.on_commit = hooks.on_commit
        store.hooks = hooks
        try:
            await store.writer.start(store._setup)
        except SchemaTooNew as exc:
            raise StoreUnavailable(f"{path}: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open {path}: {exc}") from exc
        try:
            yield store
        finally:
            await store.writer.stop()
            await store._close_readers()
    finally:
        os.close(lock_fd)


def _lock(path: Path) -> int:
    lock_path = f"{path}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreLocked(
            f"another offload daemon (pid {holder}) is already serving {path}; "
            f"one daemon per SQLite file (use PostgreSQL to run several)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd
