"""The `Store` protocol: coarse, atomic operations that speak models, never rows.

Every method is one transaction. A write about a running task is fenced on
(id, state, attempt, owner), so a late or duplicate writer changes nothing and learns so
from the return value. Backends raise `StoreUnavailable` when they cannot reach their
storage; they never acknowledge what they did not commit.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

import msgspec

from daemon.config import StoreConfig
from daemon.errors import ConfigError, OffloadError
from daemon.models import (
    Changes,
    Claim,
    Counts,
    IdempotencyKey,
    Listing,
    NewTask,
    Outcome,
    QueueHealth,
    ScheduleState,
    StartNow,
    Task,
    TaskQuery,
    TaskState,
)


class ClaimBatch(msgspec.Struct, frozen=True):
    claims: list[Claim]
    next_due: float | None
    """When the earliest queued task not yet due becomes due, so the feeder can sleep
    until then; None when no task waits for a time."""


class Store(Protocol):
    @property
    def description(self) -> str:
        """Where the data lives, for the startup line (no secrets)."""
        ...

    @property
    def shared(self) -> bool:
        """Whether other daemons admit into and claim from this store too."""
        ...

    def admit(
        self,
        tasks: Sequence[NewTask],
        *,
        max_pending: int,
        idempotency: IdempotencyKey | None = None,
        start: StartNow | None = None,
    ) -> Awaitable[list[Task]]:
        """Commit all of `tasks` as `queued`, or none: raises `QueueFull` if they would take
        the unfinished count past `max_pending`. Returns only after the commit. With
        `idempotency`, a key first seen after its `not_before` returns the tasks it admitted
        then, as they are now, and admits nothing (the caller tells by the ids); with
        another fingerprint it raises `IdempotencyKeyReused`. With `start`, the store may
        commit the first task already `running` for `start.owner`, its first attempt
        counted, as a claim would (the caller tells by its state). An awaitable rather than
        a coroutine, so that a store may hand back the future its commit resolves."""
        ...

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
        """Move up to `limit` due queued tasks to `running` for `owner`, counting an attempt,
        leased until `now + lease`. Highest priority first, then oldest. The `only_*` and
        `skip_*` filters narrow the claim (caps, weights, paused queues)."""
        ...

    async def record(self, claim: Claim, outcome: Outcome) -> Task | None:
        """Apply the outcome of a run, fenced on the claim. None if the claim was lost
        (cancelled, rescued, or already recorded)."""
        ...

    async def record_many(
        self, outcomes: Sequence[tuple[Claim, Outcome]]
    ) -> builtins.list[Task | OffloadError | None]:
        """`record()` for each, in order, written together where the store can; a run
        whose outcome could not be written gets its error in its place."""
        ...

    async def get(self, task_id: str) -> Task | None:
        """One task by id. Never waits behind a `list()` or `changes()`: a store that
        queues reads keeps point reads apart from scans."""
        ...

    async def list(self, query: TaskQuery) -> Listing:
        """Tasks matching `query`, newest first, at most `query.limit`; filtered by type or
        queue, after examining at most `query.max_scan` tasks (see `Listing`)."""
        ...

    async def cancel(self, task_id: str, *, now: float) -> tuple[Task, TaskState]:
        """Move a queued or running task to `cancelled`; returns it and its state before.
        Raises `NotFound`, or `Conflict` if it already ended."""
        ...

    async def retry(self, task_id: str, *, now: float, max_pending: int) -> Task:
        """Put a failed or cancelled task back to `queued` with a fresh attempt budget.
        Raises `NotFound`, `Conflict` if it is not failed or cancelled, or `QueueFull`."""
        ...

    async def recover(self, *, owner: str, now: float) -> int:
        """Start serving as `owner` and put back the `running` tasks whose run is known to
        be over: for an exclusive store every one; for a shared one those of `owner`'s name
        (an earlier process of it) and those whose lease expired, never another owner's
        unexpired lease. Counts the interrupted run as an attempt; fails those with none
        left. Returns how many were put back or failed."""
        ...

    async def forget_keys(self, *, before: float, limit: int) -> int:
        """Delete up to `limit` idempotency keys first seen before `before`."""
        ...

    async def purge(
        self,
        *,
        finished_before: float,
        limit: int,
        only_type: str | None = None,
        skip_types: Collection[str] = (),
    ) -> int:
        """Delete up to `limit` ended tasks that finished before `finished_before`, of
        `only_type` or of any type but `skip_types`; returns how many. One transaction."""
        ...

    async def counts(self) -> Counts: ...

    async def due_callbacks(
        self, *, now: float, limit: int
    ) -> tuple[builtins.list[Task], float | None]:
        """Ended tasks whose completion callback is due by `now` (at most `limit`), and when
        the next later one is due (None: none waits)."""
        ...

    async def callback_attempted(
        self, task_id: str, *, error: str | None, retry_at: float | None
    ) -> Task | None:
        """Record a delivery attempt: delivered (`error` None), to be retried at `retry_at`,
        or failed for good (`retry_at` None). None if no delivery was pending."""
        ...

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
        """Tasks whose last change is after the sequence value `after`, oldest change first:
        each task once, in its current state (the event stream's resume), at most `limit`;
        filtered by type or queue, after examining at most `max_scan` tasks (see
        `Changes`)."""
        ...

    async def unfinished_by_queue(self) -> dict[str, Counts]:
        """Queued and running tasks per queue (the other states are left at 0)."""
        ...

    async def set_paused(self, queue: str, paused: bool) -> None:
        """Remember that `queue` is paused (or not): a paused queue accepts tasks and runs none."""
        ...

    async def paused_queues(self) -> set[str]: ...

    async def schedules(self) -> dict[str, ScheduleState]:
        """The stored state of every schedule that has fired or been paused."""
        ...

    async def set_schedule_paused(self, name: str, paused: bool) -> None: ...

    async def fire(
        self, name: str, *, due: float, previous: float | None, task: NewTask | None
    ) -> bool:
        """Record that schedule `name` fired for the time `due` and admit `task` (None: the
        fire is skipped), in one transaction, only if the stored last fire is still
        `previous`: of several schedulers (or a restart racing a fire) exactly one wins.
        Returns whether this call fired."""
        ...

    async def queue_health(self) -> QueueHealth | None:
        """Dead and live row versions of the task table, where the database keeps such
        statistics (PostgreSQL); None otherwise."""
        ...

    async def check(self) -> None:
        """Return once the store has answered a round trip through the path writes take
        (the writer thread, the pool); the watchdog withholds its ping until then."""
        ...


def _ignore(*args: object) -> None:
    return None


@dataclass
class Hooks:
    """What a store tells the daemon that it learns on its own. A store shared by several
    daemons (PostgreSQL) calls the last three when another node changes things; all may be
    called from the event loop only, except `on_commit` (any thread)."""

    on_commit: Callable[[float, int], None] = _ignore
    """(seconds, operations) after each committed batch."""
    on_new_work: Callable[[], None] = _ignore
    """Work may have become due (an admission or retry elsewhere): wake the feeder."""
    on_lost: Callable[[str], object] = _ignore
    """A task this node runs was cancelled or taken back elsewhere: stop its run."""
    on_ended: Callable[[str], None] = _ignore
    """A task ended elsewhere: answer its long-poll waiters."""
    on_change: Callable[[list[Task]], None] = _ignore
    """Tasks whose state this store just changed (each with its `changed` sequence), after
    the commit, on the event loop: the live event stream."""


@asynccontextmanager
async def open_store(config: StoreConfig, hooks: Hooks | None = None) -> AsyncIterator[Store]:
    """Open, migrate and lock the store named by `config.url`; close it on exit."""
    hooks = hooks or Hooks()
    scheme = config.url.partition(":")[0]
    if scheme == "sqlite":
        from daemon.store.sqlite import open_sqlite

        async with open_sqlite(config, hooks) as store:
            yield store
    elif scheme in ("postgresql", "postgres"):
        from daemon.store.postgres_pool import open_postgres

        async with open_postgres(config, hooks) as pg_store:
            yield pg_store
    else:
        # The URL may hold a password: name only its scheme, if it has one.
        named = f", not a {scheme}: one" if ":" in config.url else ""
        raise ConfigError(
            "<config>", [f"store.url: expected a sqlite: or postgresql:// URL{named}"]
        )
