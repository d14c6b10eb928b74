"""The PostgreSQL store: several daemons share one queue through one database.

Every method is one short transaction on a connection of a small asyncpg pool, and most are
one statement (one round trip); no session waits on anything but the database while a
transaction is open, and handlers never run inside one. Admission counts unfinished tasks
cluster-wide (`offload_pending`, summed under an advisory lock), a claim is `FOR UPDATE SKIP
LOCKED`, and every write about a run is fenced on (id, state, attempt, owner). Leases are
measured on the database's clock, so the nodes' clocks need not agree. What a node does in
the background (lease heartbeat, rescue of expired leases, LISTEN/NOTIFY hints) lives in
`postgres_node.py`. Driver errors that mean "the database cannot be reached" become
`StoreUnavailable`; the pool reconnects by itself when the database is back.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import random
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import msgspec

from daemon.config import StoreConfig
from daemon.errors import Conflict, IdempotencyKeyReused, NotFound, QueueFull, StoreUnavailable
from daemon.models import (
    Attempt,
    Claim,
    Counts,
    IdempotencyKey,
    NewTask,
    Outcome,
    QueueHealth,
    Released,
    Retry,
    ScheduleState,
    Succeeded,
    Task,
    TaskQuery,
    TaskState,
)
from daemon.store.base import ClaimBatch, Hooks
from daemon.store.postgres_node import Node, unavailable
from daemon.store.postgres_schema import (
    ADMIT_LOCK,
    LOCK_SPACE,
    PENDING_SLOTS,
    SchemaTooNew,
    migrate,
)
from daemon.store.postgres_sql import (
    ADMIT_SQL,
    CALLBACK_LEASE,
    CANCEL_SQL,
    CHANGE,
    CLAIM_SETTINGS,
    COLUMNS,
    DUE_CALLBACKS_SQL,
    FAILED_SQL,
    INTERRUPTED,
    KEEP_KEY_SQL,
    LEASE_EXPIRED,
    RECOVER,
    RELEASED_SQL,
    RESCUE_BATCH,
    RESCUE_EXPIRED,
    RETRY_SQL,
    RETRY_TASK_SQL,
    SUCCEEDED_MANY_SQL,
    UNBOUNDED,
    claim_filter,
    claim_sql,
)

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0  # seconds to open one connection
COMMAND_TIMEOUT = 30.0  # seconds for one statement; past it the database counts as gone
ACQUIRE_TIMEOUT = 10.0  # seconds to wait for a pooled connection
CLAIM_RETRY = 1.0  # seconds until the feeder tries again when the database is unreachable
RECORD_PATIENCE_MAX = 60.0  # seconds an outcome is retried through an outage (at most)
SESSION_SETTINGS = {
    "application_name": "offload",
    # A safety net: our transactions last milliseconds; a session stuck in one (a frozen
    # daemon) is ended by the server so its locks go with it.
    "idle_in_transaction_session_timeout": "5s",
    # A daemon that vanished without closing its sockets is noticed within ~30 s.
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "4",
}

_history_decoder = msgspec.json.Decoder(list[Attempt])
_encode = msgspec.json.encode


def _task(row: Any, at: int = 0) -> Task:
    """A task from `row[at:]`, laid out as COLUMNS."""
    history = row[at + 16]
    return Task(
        id=row[at],
        type=row[at + 1],
        queue=row[at + 2],
        state=TaskState(row[at + 3]),
        payload=row[at + 4],
        priority=row[at + 5],
        run_at=row[at + 6],
        created_at=row[at + 7],
        timeout=row[at + 8],
        max_attempts=row[at + 9],
        attempts=row[at + 10],
        attempt_floor=row[at + 11],
        started_at=row[at + 12],
        finished_at=row[at + 13],
        result=row[at + 14],
        last_error=row[at + 15],
        history=() if history is None else tuple(_history_decoder.decode(history)),
        changed=row[at + 17],
        callback=row[at + 18],
        callback_state=row[at + 19],
        callback_attempts=row[at + 20],
        callback_error=row[at + 21],
    )


def _columns(tasks: Sequence[NewTask]) -> list[list[Any]]:
    """The arrays ADMIT_SQL unnests, one per column."""
    return [
        [t.id for t in tasks],
        [t.type for t in tasks],
        [t.queue for t in tasks],
        [t.payload for t in tasks],
        [t.priority for t in tasks],
        [t.run_at for t in tasks],
        [t.created_at for t in tasks],
        [t.timeout for t in tasks],
        [t.max_attempts for t in tasks],
    ]


def _admit_args(tasks: Sequence[NewTask], max_pending: int) -> list[Any]:
    """The arguments of ADMIT_SQL."""
    return [*_columns(tasks), len(tasks), max_pending, _slot(), [t.callback for t in tasks]]


async def _seen(conn: Any, idem: IdempotencyKey) -> list[Task] | None:
    """The tasks admitted under this key within its window, as they are now (those that
    retention deleted since are left out); raises `IdempotencyKeyReused` for another body."""
    row = await conn.fetchrow(
        "SELECT fingerprint, task_ids FROM offload_idempotency "
        "WHERE scope = $1 AND key = $2 AND created_at >= $3",
        idem.scope,
        idem.key,
        idem.not_before,
    )
    if row is None:
        return None
    if row[0] != idem.fingerprint:
        raise IdempotencyKeyReused(
            "this Idempotency-Key was used for a different request body",
            field="Idempotency-Key",
        )
    found = {
        r[0]: _task(r)
        for r in await conn.fetch(
            f"SELECT {COLUMNS} FROM offload_tasks WHERE id = ANY($1::text[])", row[1]
        )
    }
    return [found[i] for i in row[1] if i in found]


def _slot() -> int:
    return random.randrange(PENDING_SLOTS)


def describe_url(url: str) -> str:
    """`url` without its password or query (which may carry one), for logs."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


Waiting = tuple[Claim, Succeeded, "asyncio.Future[Task | None]"]


class GroupCommit:
    """Successes recorded together: one statement (one commit, one fsync) for every success
    that arrived while the previous ones were being written, with up to IN_FLIGHT such
    statements at once. Without it a durable commit per task caps a node at a few hundred
    tasks a second on an ordinary disk."""

    IN_FLIGHT = 1
    MAX_BATCH = 500

    def __init__(
        self, commit: Callable[[list[tuple[Claim, Succeeded]]], Awaitable[list[Task]]]
    ) -> None:
        self._commit = commit
        self._waiting: list[Waiting] = []
        self._flushes: set[asyncio.Task[None]] = set()

    async def submit(self, claim: Claim, outcome: Succeeded) -> Task | None:
        """The task as recorded, None if the claim was lost; raises what the commit raised.
        A cancelled caller's success is still written."""
        future: asyncio.Future[Task | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((claim, outcome, future))
        self._start()
        return await future

    def _start(self) -> None:
        while self._waiting and len(self._flushes) < self.IN_FLIGHT:
            batch: list[Waiting] = []
            later: list[Waiting] = []
            seen: set[str] = set()
            for item in self._waiting[: self.MAX_BATCH]:
                # The same task twice in one statement would update its row once: the
                # second write waits for the next batch (where its fence refuses it).
                (later if item[0].task.id in seen else batch).append(item)
                seen.add(item[0].task.id)
            self._waiting = later + self._waiting[self.MAX_BATCH :]
            flush = asyncio.create_task(self._flush(batch), name="pg-group-commit")
            self._flushes.add(flush)
            flush.add_done_callback(self._done)

    def _done(self, flush: asyncio.Task[None]) -> None:
        self._flushes.discard(flush)
        self._start()

    async def _flush(
        self, batch: list[tuple[Claim, Succeeded, asyncio.Future[Task | None]]]
    ) -> None:
        try:
            done = await self._commit([(claim, outcome) for claim, outcome, _ in batch])
        except Exception as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        by_id = {task.id: task for task in done}
        for claim, _, future in batch:
            if not future.done():
                future.set_result(by_id.get(claim.task.id))


class PostgresStore:
    """The `Store` over a PostgreSQL database. Build it with `open_postgres()`."""

    def __init__(self, pool: Any, node: Node, description: str) -> None:
        self._pool = pool
        self._node = node
        self._description = description
        self._successes = GroupCommit(self._commit_successes)
        self._claims: dict[tuple[str | None, str | None], str] = {}

    @property
    def description(self) -> str:
        return self._description

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[Any]:
        """A pooled connection; an unreachable database becomes `StoreUnavailable`."""
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                yield conn
        except Exception as exc:
            if unavailable(exc):
                raise StoreUnavailable(f"PostgreSQL cannot be reached: {exc}") from exc
            raise

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        async with self._conn() as conn:
            return list(await conn.fetch(sql, *args))

    # -- writes ---------------------------------------------------------------------------

    async def admit(
        self,
        tasks: Sequence[NewTask],
        *,
        max_pending: int,
        idempotency: IdempotencyKey | None = None,
    ) -> list[Task]:
        """One transaction under the admission lock, so that the sum of `offload_pending`
        read here is every committed admission's (completions need not take the lock: a
        count read too high only refuses early), and so that of two admissions racing
        with one idempotency key the second finds the first's key."""
        if not tasks:
            return []
        async with self._conn() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", LOCK_SPACE, ADMIT_LOCK)
            if idempotency is not None:
                seen = await _seen(conn, idempotency)
                if seen is not None:
                    return seen
            row = await conn.fetchrow(ADMIT_SQL, *_admit_args(tasks, max_pending))
            pending, inserted, changed = int(row["pending"]), int(row["inserted"]), row["changed"]
            if inserted == 0:
                raise QueueFull(
                    f"{pending} tasks are unfinished (max_pending is {max_pending})",
                    pending=pending,
                    needed=pending + len(tasks) - max_pending,
                )
            if idempotency is not None:
                await conn.execute(
                    KEEP_KEY_SQL,
                    idempotency.scope,
                    idempotency.key,
                    idempotency.fingerprint,
                    [t.id for t in tasks],
                    tasks[0].created_at,
                )
        admitted = [Task.admitted(t, c) for t, c in zip(tasks, changed, strict=True)]
        self._node.hint_work()
        self._node.changed(admitted)
        return admitted

    async def forget_keys(self, *, before: float, limit: int) -> int:
        async with self._conn() as conn:
            status: str = await conn.execute(
                "DELETE FROM offload_idempotency WHERE (scope, key) IN (SELECT scope, key "
                "FROM offload_idempotency WHERE created_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
                before,
                limit,
            )
        return int(status.rsplit(" ", 1)[-1])

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
        """One statement. Queues paused in the database are skipped whatever the caller
        asks, so a pause reaches every node at once. When the database cannot be reached,
        returns no claims and a `next_due` a moment away instead of raising: a claim
        acknowledges nothing, and the feeder simply tries again then."""
        type_mode, types = claim_filter(only_type, skip_types)
        queue_mode, queues = claim_filter(only_queue, skip_queues)
        sql = self._claims.get((type_mode, queue_mode))
        if sql is None:
            sql = self._claims[type_mode, queue_mode] = claim_sql(type_mode, queue_mode)
        self._node.lease = lease
        try:
            async with self._conn() as conn, conn.transaction():
                await conn.execute(CLAIM_SETTINGS)
                rows = await conn.fetch(sql, owner, lease, now, types, limit, queues)
        except StoreUnavailable as exc:
            self._node.warn_unavailable("claim", exc)
            return ClaimBatch(claims=[], next_due=now + CLAIM_RETRY)
        found = sorted((r for r in rows if r[0] is not None), key=lambda r: (-r[5], r[0]))
        claims = [
            Claim(task=_task(r), owner=owner, attempt=r[10], lease_until=now + lease) for r in found
        ]
        self._node.changed([c.task for c in claims])
        self._node.held_add(claims)
        return ClaimBatch(claims=claims, next_due=rows[0]["next_due"] if rows else None)

    async def record(self, claim: Claim, outcome: Outcome) -> Task | None:
        """One statement, fenced on the claim. An outcome other than `Released` is retried
        through an outage for up to the claim's lease (the run is worth keeping); a
        `Released` is not (a stopping daemon must not wait, and the lease puts it back)."""
        self._node.held_drop(claim)
        fence = (claim.task.id, claim.attempt, claim.owner)
        if isinstance(outcome, Released):
            return await self._record_once(RELEASED_SQL, fence, work=True)
        if isinstance(outcome, Succeeded):
            success = outcome
            return await self._persist(claim, lambda: self._successes.submit(claim, success))
        entry = _encode(
            Attempt(claim.attempt, claim.task.started_at or 0.0, outcome.duration, outcome.error)
        ).decode()
        if isinstance(outcome, Retry):
            args: tuple[Any, ...] = (*fence, outcome.run_at, outcome.error, entry)
            return await self._persist(claim, lambda: self._record_once(RETRY_SQL, args, work=True))
        args = (*fence, outcome.finished_at, outcome.error, entry, _slot())
        return await self._persist(claim, lambda: self._record_once(FAILED_SQL, args, ended=True))

    async def _persist(
        self, claim: Claim, once: Callable[[], Awaitable[Task | None]]
    ) -> Task | None:
        """`once()` until it answers, or until the claim's lease (as long as it was when
        claimed) has passed."""
        started = claim.task.started_at or claim.lease_until
        patience = min(RECORD_PATIENCE_MAX, max(0.0, claim.lease_until - started))
        deadline = time.monotonic() + patience
        pause = 0.1
        while True:
            try:
                return await once()
            except StoreUnavailable:
                if time.monotonic() + pause > deadline:
                    raise
            await asyncio.sleep(pause)  # back off while the database is away
            pause = min(2.0, pause * 2)

    async def _record_once(
        self, sql: str, args: tuple[Any, ...], *, work: bool = False, ended: bool = False
    ) -> Task | None:
        rows = await self._fetch(sql, *args)
        if not rows:
            return None
        task = _task(rows[0])
        self._node.changed([task])
        if work:
            self._node.hint_work()
        if ended:
            self._node.hint_ended(task.id)
        return task

    async def _commit_successes(self, batch: list[tuple[Claim, Succeeded]]) -> list[Task]:
        rows = await self._fetch(
            SUCCEEDED_MANY_SQL,
            [c.task.id for c, _ in batch],
            [c.attempt for c, _ in batch],
            [c.owner for c, _ in batch],
            [o.result for _, o in batch],
            [o.finished_at for _, o in batch],
            _slot(),
        )
        done = [_task(r) for r in rows]
        self._node.changed(done)
        for task in done:
            self._node.hint_ended(task.id)
        return done

    async def cancel(self, task_id: str, *, now: float) -> tuple[Task, TaskState]:
        """One statement. A running task's owner is told through a hint (and, should the
        hint be lost, by its next heartbeat)."""
        rows = await self._fetch(CANCEL_SQL, task_id, now, _slot())
        if not rows:
            raise NotFound(f"no task {task_id}", field="id")
        row = rows[0]
        before = TaskState(row["before"])
        if before.terminal:
            raise Conflict(f"task {task_id} already ended {before.value}", field="id")
        if before is TaskState.RUNNING and row["before_owner"] is not None:
            self._node.cancelled_running(row["before_owner"], task_id)
        self._node.hint_ended(task_id)
        cancelled = _task(row, 2)
        self._node.changed([cancelled])
        return cancelled, before

    async def retry(self, task_id: str, *, now: float, max_pending: int) -> Task:
        """One transaction: lock the row, check its state, then count under the admission
        lock as `admit` does."""
        async with self._conn() as conn, conn.transaction():
            found = await conn.fetchval(
                "SELECT state FROM offload_tasks WHERE id = $1 FOR UPDATE", task_id
            )
            if found is None:
                raise NotFound(f"no task {task_id}", field="id")
            before = TaskState(found)
            if before not in (TaskState.FAILED, TaskState.CANCELLED):
                raise Conflict(
                    f"task {task_id} is {before.value}; only failed or cancelled tasks can be "
                    f"retried",
                    field="id",
                )
            await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", LOCK_SPACE, ADMIT_LOCK)
            pending = int(await conn.fetchval("SELECT coalesce(sum(n), 0) FROM offload_pending"))
            if pending + 1 > max_pending:
                raise QueueFull(
                    f"{pending} tasks are unfinished (max_pending is {max_pending})",
                    pending=pending,
                    needed=1,
                )
            row = await conn.fetchrow(RETRY_TASK_SQL, task_id, now, _slot())
        retried = _task(row)
        self._node.hint_work()
        self._node.changed([retried])
        return retried

    async def recover(self, *, owner: str, now: float) -> int:
        """Start serving as `owner`: take its liveness lock, then put back (or fail) every
        running task whose owner is gone: this very owner name (an earlier process under
        the same name, as a container restarted with the same hostname and pid), an owner
        whose daemon holds no liveness lock here (its sessions ended: it exited or was
        killed), or any expired lease. Batches of RESCUE_BATCH, each one statement."""
        await self._node.become(owner)
        total = 0
        while True:
            rows = await self._fetch(RECOVER, now, INTERRUPTED, RESCUE_BATCH, _slot(), owner)
            total += len(rows)
            self._node.rescued([(r[0], _task(r, 1)) for r in rows])
            if len(rows) < RESCUE_BATCH:
                return total

    async def rescue_expired(self, *, now: float) -> int:
        """Put back (or fail) running tasks whose lease expired, whoever held them."""
        total = 0
        while True:
            rows = await self._fetch(RESCUE_EXPIRED, now, LEASE_EXPIRED, RESCUE_BATCH, _slot())
            total += len(rows)
            self._node.rescued([(r[0], _task(r, 1)) for r in rows])
            if len(rows) < RESCUE_BATCH:
                return total

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
                row = await conn.fetchrow(ADMIT_SQL, *_admit_args([task], UNBOUNDED))
                fired = Task.admitted(task, row["changed"][0])
        if fired is not None:
            self._node.hint_work()
            self._node.changed([fired])
        return bool(won)

    async def check(self) -> None:
        async with self._conn() as conn:
            await conn.fetchval("SELECT 1")

    # -- reads ---------------------------------------------------------------------------

    async def get(self, task_id: str) -> Task | None:
        rows = await self._fetch(f"SELECT {COLUMNS} FROM offload_tasks WHERE id = $1", task_id)
        return _task(rows[0]) if rows else None

    async def list(self, query: TaskQuery) -> list[Task]:
        where: list[str] = []
        args: list[Any] = []
        for column, value in (("state", query.state), ("type", query.type), ("queue", query.queue)):
            if value is not None:
                args.append(str(value))
                where.append(f"{column} = ${len(args)}")
        if query.before is not None:
            args.append(query.before)
            where.append(f"id < ${len(args)}")
        sql = f"SELECT {COLUMNS} FROM offload_tasks"
        if where:
            sql += " WHERE " + " AND ".join(where)
        args.append(query.limit)
        sql += f" ORDER BY id DESC LIMIT ${len(args)}"
        return [_task(r) for r in await self._fetch(sql, *args)]

    async def counts(self) -> Counts:
        rows = await self._fetch("SELECT state, count(*) FROM offload_tasks GROUP BY state")
        return Counts(**{r[0]: r[1] for r in rows})

    async def due_callbacks(
        self, *, now: float, limit: int
    ) -> tuple[builtins.list[Task], float | None]:
        """One statement that also hands the deliveries to this node: their next attempt
        moves CALLBACK_LEASE seconds on, so no other node delivers them meanwhile (and one
        does if this node dies before `callback_attempted`)."""
        rows = await self._fetch(DUE_CALLBACKS_SQL, now, limit, CALLBACK_LEASE)
        due = [_task(r) for r in rows if r[0] is not None]
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
        task = _task(rows[0])
        self._node.changed([task])
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
        """Change numbers come from a sequence, taken when a row is written, not when it
        commits: a reader resuming from a number may miss a change that a slower
        transaction committed later with a smaller one (rare; it needs two writers racing
        within one round trip of the reader)."""
        where = ["changed > $1"]
        args: builtins.list[Any] = [after]
        for column, value in (("id", task_id), ("type", type), ("queue", queue)):
            if value is not None:
                args.append(value)
                where.append(f"{column} = ${len(args)}")
        args.append(limit)
        sql = (
            f"SELECT {COLUMNS} FROM offload_tasks WHERE {' AND '.join(where)} "
            f"ORDER BY changed LIMIT ${len(args)}"
        )
        return [_task(r) for r in await self._fetch(sql, *args)]

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


async def _no_reset(conn: Any) -> None:
    """Pool connections carry no session state (no LISTEN, no session locks, no SET), so
    the default reset query, one more round trip per release, is not needed; asyncpg rolls
    back an open transaction before this is called."""
    return None


@asynccontextmanager
async def open_postgres(config: StoreConfig, hooks: Hooks) -> AsyncIterator[PostgresStore]:
    """Connect, migrate and start this node's background work (listener, heartbeat,
    rescue, hints); on exit stop it, end the listener session (and with it this node's
    liveness lock), then close the pool. An unreachable database raises `StoreUnavailable`
    naming it without its password."""
    where = describe_url(config.url)
    try:
        pool = await asyncpg.create_pool(
            config.url,
            min_size=1,
            max_size=config.pool_size,
            timeout=CONNECT_TIMEOUT,
            command_timeout=COMMAND_TIMEOUT,
            server_settings=SESSION_SETTINGS,
            reset=_no_reset,
        )
    except Exception as exc:
        if unavailable(exc) or isinstance(exc, asyncpg.PostgresError | ValueError):
            raise StoreUnavailable(f"cannot connect to {where}: {exc}") from exc
        raise
    try:
        try:
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                await migrate(conn)
        except SchemaTooNew as exc:
            raise StoreUnavailable(f"{where}: {exc}") from exc
        except Exception as exc:
            if unavailable(exc):
                raise StoreUnavailable(f"cannot migrate {where}: {exc}") from exc
            raise
        node = Node(pool, config.url, hooks, SESSION_SETTINGS, CONNECT_TIMEOUT)
        store = PostgresStore(pool, node, f"{where} (pool {config.pool_size})")
        async with node.running(store.rescue_expired):
            yield store
    finally:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await pool.close()
        except TimeoutError:
            pool.terminate()
