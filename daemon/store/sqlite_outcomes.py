"""The SQLite store's record of how runs ended: successes in one statement per batch, the
other outcomes one by one, every change fenced on id, attempt and owner."""

from __future__ import annotations

import builtins
import sqlite3
from collections.abc import Sequence

from msgspec.structs import replace

from daemon.errors import OffloadError, StoreUnavailable
from daemon.models import (
    Attempt,
    Claim,
    Failed,
    Outcome,
    Released,
    Retry,
    Succeeded,
    Task,
    TaskState,
)
from daemon.store.sqlite_batch import succeed
from daemon.store.sqlite_connections import Connections
from daemon.store.sqlite_rows import FENCE, with_attempt
from daemon.store.sqlite_unfinished import QUEUED, RUNNING


class OutcomeOps(Connections):
    async def record(self, claim: Claim, outcome: Outcome) -> Task | None:
        (recorded,) = await self.record_many([(claim, outcome)])
        if isinstance(recorded, Exception):
            raise recorded
        return recorded

    async def record_many(
        self, outcomes: Sequence[tuple[Claim, Outcome]]
    ) -> builtins.list[Task | OffloadError | None]:
        """One writer operation for all of them, the successes in one statement. Nothing is
        read back: the new row is the claimed one with what the statement set."""

        done = [(i, c, o) for i, (c, o) in enumerate(outcomes) if isinstance(o, Succeeded)]
        Results = builtins.list[Task | OffloadError | None]

        def op(conn: sqlite3.Connection) -> tuple[Results, int, set[int]]:
            results: Results = [None] * len(outcomes)
            first, lost = self._change + 1, set()
            if done:
                self._change += len(done)
                try:
                    lost = succeed(conn, [(c, o) for _, c, o in done], first)
                except sqlite3.OperationalError as exc:  # a lock, a full disk: tried again
                    lost = set(range(len(done)))
                    for i, _, _ in done:
                        results[i] = StoreUnavailable(f"the store could not record: {exc}")
                for n, (_, claim, _) in enumerate(done):
                    if n not in lost:
                        self._unfinished.remove(claim.task.queue, RUNNING)
            for i, (claim, outcome) in enumerate(outcomes):
                if isinstance(outcome, Succeeded):
                    continue
                try:
                    results[i] = self._apply_outcome(conn, claim, outcome)
                except sqlite3.OperationalError as exc:
                    # If this also ended the transaction, the commit fails and says so for all.
                    results[i] = StoreUnavailable(f"the store could not record: {exc}")
            return results, first, lost

        # Background: the recorder's; no request waits on it (see sqlite_writer).
        recorded, first, lost = await self._write(op, atomic=True, background=True)
        # The successes as written, made here rather than in the writer thread.
        for n, (i, claim, success) in enumerate(done):
            if n not in lost:
                recorded[i] = replace(
                    claim.task,
                    state=TaskState.SUCCEEDED,
                    changed=first + n,
                    result=success.result,
                    finished_at=success.finished_at,
                )
        self._changed([t for t in recorded if isinstance(t, Task)])
        return recorded  # type: ignore[no-any-return]

    def _apply_outcome(
        self, conn: sqlite3.Connection, claim: Claim, outcome: Failed | Retry | Released
    ) -> Task | None:
        task = claim.task
        fence = (task.id, claim.attempt, claim.owner)
        changed = self._next_change()
        if isinstance(outcome, Released):
            done = conn.execute(
                f"UPDATE tasks SET state = 'queued', changed = ?, attempts = attempts - 1, "
                f"owner = NULL, lease_until = NULL, started_at = NULL WHERE {FENCE}",
                (changed, *fence),
            )
            if done.rowcount != 1:
                return None
            self._unfinished.move(task.queue, RUNNING, QUEUED)
            return replace(
                task,
                state=TaskState.QUEUED,
                changed=changed,
                attempts=task.attempts - 1,
                started_at=None,
            )
        found = conn.execute(f"SELECT history FROM tasks WHERE {FENCE}", fence).fetchone()
        if found is None:
            return None
        entry = Attempt(claim.attempt, task.started_at or 0.0, outcome.duration, outcome.error)
        history, past = with_attempt(found[0], entry)
        # A retry goes back to the queue until `run_at`; a failure ends the task.
        if isinstance(outcome, Retry):
            state, column, value = TaskState.QUEUED, "run_at", outcome.run_at
        else:
            state, column, value = TaskState.FAILED, "finished_at", outcome.finished_at
        # Deferred even if due already: the feeder is woken and its claim finds it due.
        if state is TaskState.QUEUED:
            self._promote_at = min(self._promote_at, value)
        conn.execute(
            f"UPDATE tasks SET state = ?, changed = ?, {column} = ?, last_error = ?, "
            f"history = ?, owner = NULL, lease_until = NULL, deferred = ? WHERE {FENCE}",
            (state.value, changed, value, outcome.error, history, int(state.value == "queued"),
             *fence),
        )  # fmt: skip
        if state is TaskState.QUEUED:
            self._unfinished.move(task.queue, RUNNING, QUEUED)
        else:
            self._unfinished.remove(task.queue, RUNNING)
        return replace(
            task,
            state=state,
            changed=changed,
            last_error=outcome.error,
            history=past,
            **{column: value},
        )
