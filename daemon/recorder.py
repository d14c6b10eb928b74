"""Outcomes written behind the consumers, many per store operation.

A consumer hands the outcome of its run to the `Recorder` and takes its next task at once:
waiting for the commit itself would leave its slot empty for a commit's time after every
run. Outcomes that arrive while one batch is being written go together in the next. What
follows a write (the log line, the counters, waking long-polls) happens in `settle`, once
the outcome is durable, never before.

A crash between the hand-over and the commit loses nothing: the row is still `running`, so
recovery (on PostgreSQL, the lease's expiry) puts the task back, as for a crash during the
run.

A write that fails (the store is locked by another program, the disk is full, PostgreSQL is
down) is tried again, with a growing pause, until it succeeds or the daemon stops: on SQLite
nothing else would ever end a run whose outcome was not written before the next start.
Writes are fenced on the claim, so one that did commit before its error came back changes
nothing the second time (its run is reported as lost).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from daemon.backoff import STORE_RETRY, backoff_delay
from daemon.errors import OffloadError
from daemon.models import Claim, Outcome, Task
from daemon.store.base import Store

logger = logging.getLogger(__name__)
MAX_BATCH = 1024


@dataclass(slots=True)
class Ended:
    """A run that ended: what to record, and how long it ran."""

    claim: Claim
    outcome: Outcome
    duration: float


def left_running(shared: bool, lease: float | None = None) -> str:
    """What becomes of the tasks of runs whose outcome was not written, for the log."""
    if not shared:  # the store is this daemon's alone: only its next start looks
        return "their tasks stay running until the next start puts them back"
    lease_text = f"workers.lease, {lease:g}s" if lease is not None else "workers.lease"
    return (
        f"their tasks stay running until their leases expire ({lease_text}); then a daemon "
        f"puts them back"
    )


Settle = Callable[[Ended, "Task | None"], None]
# Told of a failed write: the error, how many outcomes wait, and the pause before the next try.
Failed = Callable[[OffloadError, int, float], None]


class Recorder:
    def __init__(self, store: Store, settle: Settle, failed: Failed) -> None:
        self._store = store
        self._settle = settle
        self._failed = failed
        self._waiting: list[Ended] = []
        self._more = asyncio.Event()
        self._hurry = asyncio.Event()  # the stop: try again now, not after the pause
        self.idle = asyncio.Event()  # set while nothing waits to be written or settled
        self.idle.set()

    @property
    def waiting(self) -> int:
        """Outcomes not written yet."""
        return len(self._waiting)

    def hurry(self) -> None:
        """End the pause after a failed write, if one is under way: the daemon stops."""
        self._hurry.set()

    def add(self, ended: Ended) -> None:
        self._waiting.append(ended)
        self.idle.clear()
        self._more.set()

    async def run(self) -> None:
        """Write batches until cancelled; the drain waits for `idle` first."""
        failures = 0
        while True:
            await self._more.wait()
            self._more.clear()
            while self._waiting:
                batch = self._waiting[:MAX_BATCH]
                error = await self._write(batch)
                if error is None:
                    failures = 0
                    continue
                failures += 1
                pause = backoff_delay(STORE_RETRY, failures)
                self._failed(error, len(self._waiting), pause)
                try:
                    async with asyncio.timeout(pause):
                        await self._hurry.wait()
                except TimeoutError:
                    pass
                self._hurry.clear()
            self.idle.set()

    async def _write(self, batch: list[Ended]) -> OffloadError | None:
        """Write `batch` (the head of `_waiting`) and settle what was written; what could
        not be stays at the head, and the error is returned."""
        try:
            results = await self._store.record_many([(e.claim, e.outcome) for e in batch])
        except OffloadError as exc:
            return exc
        except Exception:  # a bug: trying again would fail alike, and hold every later write
            logger.exception(
                "could not write the outcomes of %d runs; %s, the run counted as an attempt",
                len(batch),
                left_running(self._store.shared),
                extra={"event": "task.record_bug"},
            )
            del self._waiting[: len(batch)]
            return None
        del self._waiting[: len(batch)]
        again: list[Ended] = []
        error = None
        for ended, result in zip(batch, results, strict=True):
            if isinstance(result, OffloadError):
                again.append(ended)
                error = result
            else:
                self._settle(ended, result)
        self._waiting[:0] = again
        return error
