"""The PostgreSQL store: several daemons share one queue through one database.

Every method is one short transaction on a connection of a small asyncpg pool, and most are
one statement (one round trip); no session waits on anything but the database while a
transaction is open, and handlers never run inside one. Admission counts unfinished tasks
cluster-wide (`offload_pending`, summed under an advisory lock), a claim is `FOR UPDATE SKIP
LOCKED`, and every write about a run is fenced on (id, state, attempt, owner). Leases are
measured on the database's clock; `run_at` (delays, backoff, cron fires, rescues) on the
nodes' own, which the operator keeps in step (NTP). What a node does in the background
(lease heartbeat, rescue of expired leases, LISTEN/NOTIFY hints) lives in
`postgres_node.py`. Driver errors that mean "the database cannot be reached" become
`StoreUnavailable`; the pool reconnects by itself when the database is back.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

import msgspec

from daemon.errors import Conflict, NotFound, OffloadError, QueueFull, StoreUnavailable
from daemon.models import (
    Attempt,
    Claim,
    IdempotencyKey,
    NewTask,
    Outcome,
    Released,
    Retry,
    StartNow,
    Succeeded,
    Task,
    TaskState,
)
from daemon.store.base import ClaimBatch
from daemon.store.postgres_commit import GroupCommit
from daemon.store.postgres_connections import SCANS
from daemon.store.postgres_node import Node
from daemon.store.postgres_reads import ReadOps
from daemon.store.postgres_rows import (
    admit_args,
    pending_slot,
    seen_key,
    task_from_row,
)
from daemon.store.postgres_schema import (
    ADMIT_LOCK,
    LOCK_SPACE,
)
from daemon.store.postgres_side import SideOps
from daemon.store.postgres_sql import (
    ADMIT_LOCK_SQL,
    ADMIT_SQL,
    CANCEL_SQL,
    CLAIM_SETTINGS,
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
    claim_filter,
    claim_sql,
)

logger = logging.getLogger(__name__)

CLAIM_RETRY = 1.0  # seconds until the feeder tries again when the database is unreachable
RECORD_PATIENCE_MAX = 60.0  # seconds an outcome is retried through an outage (at most)

_encode = msgspec.json.encode


class PostgresStore(SideOps, ReadOps):
    """The `Store` over a PostgreSQL database. Build it with `open_postgres()`."""

    def __init__(self, pool: Any, node: Node, description: str) -> None:
        self._pool = pool
        self._node = node
        self._description = description
        self._scans = asyncio.Semaphore(SCANS)
        self._successes = GroupCommit(self._commit_successes)
        self._claims: dict[tuple[str | None, str | None], str] = {}

    # -- writes ---------------------------------------------------------------------------

    async def admit(
        self,
        tasks: Sequence[NewTask],
        *,
        max_pending: int,
        idempotency: IdempotencyKey | None = None,
        start: StartNow | None = None,
    ) -> list[Task]:
        """One transaction under the admission lock, so that the sum of `offload_pending`
        read here is every committed admission's (completions need not take the lock: a
        count read too high only refuses early), and so that of two admissions racing
        with one idempotency key the second finds the first's key. Its commit is durable
        whatever the database's default (see DURABLE in postgres_sql.py). `start` is not
        taken: here claims stay with the claim query, whose leases the node renews."""
        if not tasks:
            return []
        async with self._conn() as conn, conn.transaction():
            await conn.execute(ADMIT_LOCK_SQL, LOCK_SPACE, ADMIT_LOCK)
            if idempotency is not None:
                seen = await seen_key(conn, idempotency)
                if seen is not None:
                    return seen
            row = await conn.fetchrow(ADMIT_SQL, *admit_args(tasks, max_pending))
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
            Claim(task=task_from_row(r), owner=owner, attempt=r[10], lease_until=now + lease)
            for r in found
        ]
        self._node.changed([c.task for c in claims])
        self._node.held_add(claims)
        return ClaimBatch(claims=claims, next_due=rows[0]["next_due"] if rows else None)

    async def record(self, claim: Claim, outcome: Outcome) -> Task | None:
        """One statement, fenced on the claim. An outcome other than `Released` is retried
        through an outage for up to the claim's lease (the run is worth keeping); a
        `Released` is not (a stopping daemon must not wait, and the lease puts it back)."""
        self._node.recording(claim)
        try:
            return await self._record(claim, outcome)
        finally:
            self._node.recorded(claim)

    async def _record(self, claim: Claim, outcome: Outcome) -> Task | None:
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
        args = (*fence, outcome.finished_at, outcome.error, entry, pending_slot())
        return await self._persist(claim, lambda: self._record_once(FAILED_SQL, args, ended=True))

    async def record_many(
        self, outcomes: Sequence[tuple[Claim, Outcome]]
    ) -> builtins.list[Task | OffloadError | None]:
        """Each on its own: successes already share statements through the group commit,
        and the other outcomes are rare."""
        found = await asyncio.gather(
            *(self.record(claim, outcome) for claim, outcome in outcomes), return_exceptions=True
        )
        for result in found:
            if isinstance(result, BaseException) and not isinstance(result, OffloadError):
                raise result
        return found  # type: ignore[return-value]

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
        task = task_from_row(rows[0])
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
            pending_slot(),
        )
        done = [task_from_row(r) for r in rows]
        self._node.changed(done)
        for task in done:
            self._node.hint_ended(task.id)
        return done

    async def cancel(self, task_id: str, *, now: float) -> tuple[Task, TaskState]:
        """One statement. A running task's owner is told through a hint (and, should the
        hint be lost, by its next heartbeat)."""
        rows = await self._fetch(CANCEL_SQL, task_id, now, pending_slot())
        if not rows:
            raise NotFound(f"no task {task_id}", field="id")
        row = rows[0]
        before = TaskState(row["before"])
        if before.terminal:
            raise Conflict(f"task {task_id} already ended {before.value}", field="id")
        if before is TaskState.RUNNING and row["before_owner"] is not None:
            self._node.cancelled_running(row["before_owner"], task_id)
        self._node.hint_ended(task_id)
        cancelled = task_from_row(row, 2)
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
            await conn.execute(ADMIT_LOCK_SQL, LOCK_SPACE, ADMIT_LOCK)
            pending = int(await conn.fetchval("SELECT coalesce(sum(n), 0) FROM offload_pending"))
            if pending + 1 > max_pending:
                raise QueueFull(
                    f"{pending} tasks are unfinished (max_pending is {max_pending})",
                    pending=pending,
                    needed=1,
                )
            row = await conn.fetchrow(RETRY_TASK_SQL, task_id, now, pending_slot())
        retried = task_from_row(row)
        self._node.hint_work()
        self._node.changed([retried])
        return retried

    async def recover(self, *, owner: str, now: float) -> int:
        """Start serving as `owner`: take its liveness lock, then put back (or fail) the
        running tasks of this very owner name (an earlier process under the same name, as a
        container restarted with the same hostname and pid: holding the name's lock proves
        it gone) and those whose lease expired. Another owner's unexpired lease is left
        alone even if no session holds its liveness lock now (a live daemon lacks it while
        its listener reconnects): its tasks are rescued when the lease expires (see
        RECOVER). Batches of RESCUE_BATCH, each one statement."""
        await self._node.become(owner)
        total = 0
        while True:
            rows = await self._fetch(RECOVER, now, INTERRUPTED, RESCUE_BATCH, pending_slot(), owner)
            total += len(rows)
            self._node.rescued([(r[0], task_from_row(r, 1)) for r in rows])
            if len(rows) < RESCUE_BATCH:
                return total

    async def rescue_expired(self, *, now: float) -> int:
        """Put back (or fail) running tasks whose lease expired, whoever held them."""
        total = 0
        while True:
            rows = await self._fetch(
                RESCUE_EXPIRED, now, LEASE_EXPIRED, RESCUE_BATCH, pending_slot()
            )
            total += len(rows)
            self._node.rescued([(r[0], task_from_row(r, 1)) for r in rows])
            if len(rows) < RESCUE_BATCH:
                return total
