"""Outcomes written behind the consumers, many per store operation.

A consumer hands the outcome of its run to the `Recorder` and takes its next task at once:
waiting for the commit itself would leave its slot empty for a commit's time after every
run. Outcomes that arrive while one batch is being written go together in the next. What
follows a write (the log line, the counters, waking long-polls) happens in `settle`, once
the outcome is durable, never before.

A crash between the hand-over and the commit loses nothing: the row is still `running`, so
recovery (or, on PostgreSQL, the lease) puts the task back, as for a crash during the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from daemon.errors import OffloadError
from daemon.models import Claim, Outcome, Task
from daemon.store.base import Store

MAX_BATCH = 1024


@dataclass(slots=True)
class Ended:
    """A run that ended: what to record, and how long it ran."""

    claim: Claim
    outcome: Outcome
    duration: float


Settle = Callable[[Ended, "Task | OffloadError | None"], None]


class Recorder:
    def __init__(self, store: Store, settle: Settle) -> None:
        self._store = store
        self._settle = settle
        self._waiting: list[Ended] = []
        self._more = asyncio.Event()
        self.idle = asyncio.Event()  # set while nothing waits to be written or settled
        self.idle.set()

    def add(self, ended: Ended) -> None:
        self._waiting.append(ended)
        self.idle.clear()
        self._more.set()

    async def run(self) -> None:
        """Write batches until cancelled; the drain waits for `idle` first."""
        while True:
            await self._more.wait()
            self._more.clear()
            while self._waiting:
                batch = self._waiting[:MAX_BATCH]
                del self._waiting[:MAX_BATCH]
                await self._write(batch)
            self.idle.set()

    async def _write(self, batch: list[Ended]) -> None:
        results: list[Task | OffloadError | None]
        try:
            results = await self._store.record_many([(e.claim, e.outcome) for e in batch])
        except OffloadError as exc:
            results = [exc] * len(batch)
        for ended, result in zip(batch, results, strict=True):
            self._settle(ended, result)
