"""What one daemon does in the background of the PostgreSQL store: renew its leases, rescue
expired ones (any node's), and trade LISTEN/NOTIFY hints with the other nodes.

Hints are only wake-ups: they are sent after the commit they describe, in a transaction of
their own with `synchronous_commit = off` (NOTIFY serialises committing transactions
database-wide, so it must stay out of the task writes), and a lost one only delays: the
feeder is woken every POLL_EVERY seconds anyway, and the heartbeat finds runs that were
cancelled or taken back elsewhere. Hints are received, and this daemon's liveness lock
held, on a listener connection of its own (daemon/store/postgres_listen.py). Nothing here
raises out of its task: an unreachable database is logged (at most every WARN_EVERY
seconds) and tried again.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from daemon.errors import StoreUnavailable
from daemon.models import Claim, QueueHealth, Task
from daemon.store.base import Hooks
from daemon.store.postgres_errors import describe, unavailable
from daemon.store.postgres_listen import ENDED, LOST, WORK, Listener

logger = logging.getLogger(__name__)

POLL_EVERY = 5.0  # seconds between wake-ups of the feeder without a hint
MIN_TICK = 0.1  # seconds; the heartbeat runs every lease / 3, but not more often than this
WARN_EVERY = 10.0  # seconds between two warnings about the same unreachable operation
HINT_WINDOW = 0.005  # seconds hints gather before they are sent together
IDS_PER_HINT = 250  # task ids per notification (a payload holds at most 8000 bytes)

# Without a WAL flush (see RELAXED in postgres_sql.py): a renewal lost in a crash only lets the
# lease expire sooner.
RENEW_SQL = """
    WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true))
    UPDATE offload_tasks t SET lease_until = extract(epoch FROM clock_timestamp()) + $4
    FROM unnest($1::text[], $2::int[]) AS h(id, attempt), relaxed
    WHERE t.id = h.id AND t.attempts = h.attempt AND t.state = 'running' AND t.owner = $3
    RETURNING t.id
"""
HEALTH_SQL = """
    SELECT n_live_tup, n_dead_tup,
           extract(epoch FROM greatest(last_vacuum, last_autovacuum))::float8
    FROM pg_stat_user_tables
    WHERE relname = 'offload_tasks' AND schemaname = current_schema()
"""


def _literal(text: str) -> str:
    """`text` as an SQL string literal (standard_conforming_strings is on since 9.1)."""
    return "'" + text.replace("'", "''") + "'"


class Node:
    """This daemon's presence in the cluster. Only the event loop touches it."""

    def __init__(
        self,
        pool: Any,
        url: str,
        hooks: Hooks,
        settings: dict[str, str],
        connect_timeout: float,
    ) -> None:
        self._pool = pool
        self._hooks = hooks
        self.lease = 60.0  # seconds; the latest lease a claim asked for
        self._held: dict[str, Claim] = {}  # claimed here and running
        # Runs whose outcome is being written: their leases are still renewed (a slow write
        # must not let another node rescue and run the task again), but a renewal that
        # finds the claim gone reports nothing (the write itself is fenced).
        self._recording: dict[str, Claim] = {}
        self._tick = asyncio.Event()
        self._outbox = asyncio.Event()
        self._work_hint = False
        self._ended: list[str] = []
        self._lost: list[tuple[str, str]] = []
        self._warned: dict[str, float] = collections.defaultdict(lambda: -WARN_EVERY)
        self._listener = Listener(
            url,
            settings,
            connect_timeout,
            hooks,
            lose=self._lose,
            reconnected=self._tick.set,
            warn=self.warn_unavailable,
        )

    # -- what the store tells the node -------------------------------------------------

    def held_add(self, claims: list[Claim]) -> None:
        for claim in claims:
            if claim.task.id in self._held:
                # Claimed again while an earlier claim of ours is held: the database no
                # longer knows that one (taken back, or a commit lost in a crash). Its run
                # is stopped before the new one starts, not left running untracked.
                self._lose(claim.task.id, "claimed again: this node's earlier claim was void")
            self._held[claim.task.id] = claim

    def recording(self, claim: Claim) -> None:
        """The run ended and its outcome is about to be written (before the write, so a
        heartbeat racing it never reports the task lost)."""
        if self._held.get(claim.task.id) == claim:
            del self._held[claim.task.id]
            self._recording[claim.task.id] = claim

    def recorded(self, claim: Claim) -> None:
        """The write of its outcome is over (done or given up): its lease is no longer ours."""
        if self._recording.get(claim.task.id) == claim:
            del self._recording[claim.task.id]

    def hint_work(self) -> None:
        self._work_hint = True
        self._outbox.set()

    def hint_ended(self, task_id: str) -> None:
        self._ended.append(task_id)
        self._outbox.set()

    def cancelled_running(self, owner: str, task_id: str) -> None:
        """A running task was cancelled: its owner must stop the run."""
        if owner in self._listener.owners:
            # Cancelled through this node's API, which stops the run itself.
            self._held.pop(task_id, None)
        else:
            self._lost.append((owner, task_id))
            self._outbox.set()

    def changed(self, tasks: list[Task]) -> None:
        if tasks:
            self._hooks.on_change(tasks)

    def rescued(self, found: list[tuple[str, Task]]) -> None:
        """(old owner, task) of the tasks a rescue or recovery put back or failed."""
        self.changed([task for _, task in found])
        for owner, task in found:
            task_id, state = task.id, task.state
            logger.warning(
                "task %s of %s was %s: its owner is gone or its lease expired",
                task_id,
                owner,
                "put back" if state == "queued" else "failed (no attempt left)",
                extra={"event": "task.rescued", "task_id": task_id, "owner": owner},
            )
            if owner in self._listener.owners:
                self._lose(task_id, "taken back after its lease expired")
            if state == "queued":
                self.hint_work()
            else:
                self.hint_ended(task_id)

    def _lose(self, task_id: str, why: str) -> None:
        self._recording.pop(task_id, None)  # its write will find the claim gone
        claim = self._held.pop(task_id, None)
        if claim is not None:
            logger.warning(
                "lost task %s (%s): stopping its run; its outcome will not be written",
                task_id,
                why,
                extra={"event": "task.lost", "task_id": task_id},
            )
        self._hooks.on_lost(task_id)

    def warn_unavailable(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned[what] >= WARN_EVERY:
            self._warned[what] = now
            logger.warning(
                "PostgreSQL unavailable (%s): %s; trying again",
                what,
                describe(exc),
                extra={"event": "store.unavailable"},
            )

    async def become(self, owner: str) -> None:
        """Serve as `owner` from now on (see `Listener.become`)."""
        await self._listener.become(owner)

    async def queue_health(self) -> QueueHealth:
        try:
            async with self._pool.acquire() as conn:
                row = await conn.fetchrow(HEALTH_SQL)
        except Exception as exc:
            if unavailable(exc):
                raise StoreUnavailable(f"PostgreSQL cannot be reached: {describe(exc)}") from exc
            raise
        if row is None:
            return QueueHealth(live_tuples=0, dead_tuples=0, last_vacuum=None)
        return QueueHealth(live_tuples=row[0], dead_tuples=row[1], last_vacuum=row[2])

    # -- the background tasks ------------------------------------------------------------

    @asynccontextmanager
    async def running(self, rescue: Callable[..., Awaitable[int]]) -> AsyncIterator[None]:
        """Run the listener, the heartbeat-and-rescue loop and the hint sender until exit;
        then send the last hints (briefly), stop the tasks and end the listener session."""
        tasks = [
            asyncio.create_task(self._listener.run(), name="pg-listener"),
            asyncio.create_task(self._maintain(rescue), name="pg-maintain"),
            asyncio.create_task(self._send_hints(), name="pg-hints"),
        ]
        try:
            yield
        finally:
            try:
                async with asyncio.timeout(1.0):
                    await self._flush_hints()
            except TimeoutError:
                pass
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _maintain(self, rescue: Callable[..., Awaitable[int]]) -> None:
        """Renew this node's leases every lease / 3, rescue expired ones as often, and wake
        the feeder every POLL_EVERY seconds (the fallback for lost hints)."""
        loop = asyncio.get_running_loop()
        next_poll = loop.time() + POLL_EVERY
        while True:
            every = max(MIN_TICK, self.lease / 3)
            try:
                async with asyncio.timeout(min(every, POLL_EVERY) * random.uniform(0.9, 1.0)):
                    await self._tick.wait()
            except TimeoutError:
                pass
            self._tick.clear()
            await self._renew()
            try:
                await rescue(now=time.time())
            except StoreUnavailable as exc:
                self.warn_unavailable("rescue", exc)
            except Exception:
                logger.exception("rescue failed", extra={"event": "store.bug"})
            if loop.time() >= next_poll:
                next_poll = loop.time() + POLL_EVERY
                self._hooks.on_new_work()

    async def _renew(self) -> None:
        by_owner: dict[str, list[Claim]] = {}
        for claim in [*self._held.values(), *self._recording.values()]:
            by_owner.setdefault(claim.owner, []).append(claim)
        for owner, claims in by_owner.items():
            ids = [c.task.id for c in claims]
            attempts = [c.attempt for c in claims]
            try:
                async with self._pool.acquire() as conn:
                    rows = await conn.fetch(RENEW_SQL, ids, attempts, owner, self.lease)
            except Exception as exc:
                if unavailable(exc):
                    self.warn_unavailable("heartbeat", exc)
                else:
                    logger.exception("heartbeat failed", extra={"event": "store.bug"})
                return
            renewed = {r[0] for r in rows}
            for claim in claims:
                if claim.task.id not in renewed and self._held.get(claim.task.id) == claim:
                    self._lose(claim.task.id, "cancelled or taken back elsewhere")

    async def _send_hints(self) -> None:
        while True:
            await self._outbox.wait()
            await asyncio.sleep(HINT_WINDOW)  # let hints of concurrent writes gather
            await self._flush_hints()

    async def _flush_hints(self) -> None:
        self._outbox.clear()
        work, self._work_hint = self._work_hint, False
        ended, self._ended = self._ended, []
        lost, self._lost = self._lost, []
        notes: list[tuple[str, str]] = []
        if work:
            notes.append((WORK, ""))
        for i in range(0, len(ended), IDS_PER_HINT):
            notes.append((ENDED, ",".join(ended[i : i + IDS_PER_HINT])))
        for i in range(0, len(lost), IDS_PER_HINT // 2):
            notes.append((LOST, ",".join(f"{o} {t}" for o, t in lost[i : i + IDS_PER_HINT // 2])))
        if not notes:
            return
        me = self._listener.me
        script = ";".join(
            [
                "BEGIN",
                "SET LOCAL synchronous_commit TO off",
                *(
                    f"SELECT pg_notify({_literal(ch)}, {_literal(me + '|' + body)})"
                    for ch, body in notes
                ),
                "COMMIT",
            ]
        )
        try:
            async with self._pool.acquire() as conn:
                await conn.execute(script)
        except Exception as exc:
            if not unavailable(exc):
                logger.exception("could not send hints", extra={"event": "store.bug"})
            self.warn_unavailable("hints", exc)
