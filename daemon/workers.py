"""The feeder and the consumers: from claimed tasks in the store to recorded outcomes.

The feeder claims due tasks into a bounded hand-off queue when there is room, woken by
admissions, by freed slots and by the next `run_at` (no polling). N consumers take claims
from the queue and run them (see `consumer.py`). `drain()` is the stop: put back what was
claimed but not started, give running tasks the grace period, then stop the rest and put
them back without spending an attempt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from daemon.config import WorkersConfig
from daemon.metrics import Metrics
from daemon.models import Claim, Released
from daemon.stats import Stats
from daemon.store.base import Store
from daemon.tasktypes import TaskType
from daemon.watch import Watchers

logger = logging.getLogger(__name__)

STOP_DEADLINE = 10.0  # seconds a stopped run gets to unwind after the grace period


@dataclass
class Run:
    """One task running in this process; `reason` says why it was stopped, if it was."""

    claim: Claim
    task: asyncio.Task[object] | None = None
    reason: str | None = None  # "cancel" | "shutdown"

    def stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        if self.task is not None:
            self.task.cancel()


@dataclass
class Workers:
    """Shared state of the feeder and the consumers. Only the event loop touches it."""

    config: WorkersConfig
    store: Store
    types: dict[str, TaskType]
    stats: Stats
    watchers: Watchers
    metrics: Metrics
    owner: str
    runs: dict[str, Run] = field(default_factory=dict)
    inflight: int = 0  # claimed and not yet recorded
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _nudge: asyncio.Event = field(default_factory=asyncio.Event)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    _fed: asyncio.Event = field(default_factory=asyncio.Event)  # the feeder has exited

    def __post_init__(self) -> None:
        self.capacity = self.config.concurrency + self.config.prefetch
        self.handoff: asyncio.Queue[Claim | None] = asyncio.Queue(self.capacity)
        self._idle.set()

    def wake(self) -> None:
        """New work may be due (an admission, a retry, a freed slot)."""
        self._nudge.set()

    def stop_run(self, task_id: str, reason: str) -> bool:
        run = self.runs.get(task_id)
        if run is None:
            return False
        run.stop(reason)
        return True

    def claimed(self, n: int) -> None:
        self.inflight += n
        if n:
            self._idle.clear()

    def finished(self) -> None:
        """A claim left the process: recorded, or put back."""
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()
        self._nudge.set()

    # -- the feeder --------------------------------------------------------------------

    async def feed(self) -> None:
        """Claim due work into the hand-off queue until `stopping` is set."""
        try:
            while not self.stopping.is_set():
                self._nudge.clear()
                delay = await self._feed_once()
                if delay is not None and delay <= 0:
                    continue
                if not self._nudge.is_set():
                    try:
                        async with asyncio.timeout(delay):
                            await self._nudge.wait()
                    except TimeoutError:
                        pass
        finally:
            self._fed.set()

    async def _feed_once(self) -> float | None:
        """Claim once if worthwhile; returns how long to sleep, None for 'until nudged'."""
        room = self.capacity - self.inflight
        # Claim in batches: wait for a quarter of the room unless the consumers are starving.
        if room <= 0 or (room < max(1, self.capacity // 4) and not self.handoff.empty()):
            return None
        now = time.time()
        batch = await self.store.claim(
            owner=self.owner, limit=room, now=now, lease=self.config.lease
        )
        self.claimed(len(batch.claims))
        if self.stopping.is_set():
            await self._put_back(batch.claims)
            return None
        for claim in batch.claims:
            self.handoff.put_nowait(claim)
        if len(batch.claims) == room:
            return 0.0
        if batch.next_due is None:
            return None
        return max(0.001, batch.next_due - time.time())

    async def _put_back(self, claims: list[Claim]) -> None:
        results = await asyncio.gather(
            *(self.store.record(c, Released()) for c in claims), return_exceptions=True
        )
        for claim, result in zip(claims, results, strict=True):
            if isinstance(result, BaseException):
                logger.error(
                    "could not put back task %s: %s",
                    claim.task.id,
                    result,
                    extra={"event": "task.put_back_failed", "task_id": claim.task.id},
                )
            self.finished()
        self.stats.released += len(claims)

    # -- the stop ----------------------------------------------------------------------

    async def drain(self, grace: float, hurry: asyncio.Event) -> None:
        """Stop taking work, let running tasks finish within `grace` (or until `hurry` is
        set), then stop the rest and put them back; finally let the consumers exit."""
        self.stopping.set()
        self._nudge.set()
        await self._fed.wait()
        waiting = []
        while not self.handoff.empty():
            claim = self.handoff.get_nowait()
            if claim is not None:
                waiting.append(claim)
        await self._put_back(waiting)
        if self.runs:
            logger.info(
                "draining: %d running tasks get up to %gs",
                len(self.runs),
                grace,
                extra={"event": "drain.start"},
            )
            await _within(grace, self._idle, hurry)
        if self.runs:
            logger.warning(
                "grace period over: stopping %d running tasks and putting them back",
                len(self.runs),
                extra={"event": "drain.stop_running"},
            )
            for run in list(self.runs.values()):
                run.stop("shutdown")
            await _within(STOP_DEADLINE, self._idle)
        for _ in range(self.config.concurrency):
            self.handoff.put_nowait(None)


async def _first_set(*events: asyncio.Event) -> None:
    """Return as soon as one of `events` is set; callers bound the time with asyncio.timeout."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def _within(seconds: float, *events: asyncio.Event) -> None:
    """Wait for the first of `events`, at most `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            await _first_set(*events)
    except TimeoutError:
        pass
