"""Group commit of successes for the PostgreSQL store: outcomes that arrive while one
batch is being written wait and go together in the next statement, so a busy node writes
its successes in a few round trips, not one per task."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from daemon.models import (
    Claim,
    Succeeded,
    Task,
)

logger = logging.getLogger(__name__)

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
