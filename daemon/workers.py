"""The workers: the feeder (`feeder.py`) and N consumers (`consumer.py`), from claimed
tasks in the store to recorded outcomes, and their stop.

`Workers` holds what they share: the bounded hand-off queue, the slots in use per type and
queue, and the runs. A lone task for an idle consumer may start at admission (`start_now`).
`drain()` is the stop: put back what was claimed but not started, give running tasks the
grace period, then stop the rest and put them back without spending an attempt.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from daemon.config import WorkersConfig
from daemon.consumer import Run, consume, settle
from daemon.deadlines import Deadlines
from daemon.errors import OffloadError
from daemon.feeder import Feeder
from daemon.flow import Flow
from daemon.handoff import Handoff
from daemon.metrics import Metrics
from daemon.models import Claim, NewTask, Released, StartNow, Task, TaskState
from daemon.recorder import Ended, Recorder, left_running
from daemon.stats import Stats
from daemon.store.base import Store
from daemon.tasktypes import TaskType
from daemon.watch import Watchers

logger = logging.getLogger(__name__)

STOP_DEADLINE = 10.0  # seconds a stopped run gets to unwind after the grace period
Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


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
    flow: Flow
    # Other daemons admit into the same store (PostgreSQL): their work may be due at any
    # time, so every freed slot looks for it.
    shared: bool = False
    runs: dict[str, Run] = field(default_factory=dict)
    inflight: int = 0  # claimed (or started at admission) and not yet ended or put back
    busy: collections.Counter[str] = field(default_factory=collections.Counter)  # per type
    retiring: int = 0  # consumers asked to exit after their current task (a smaller pool)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _consumers: set[asyncio.Task[None]] = field(default_factory=set)
    _recording: asyncio.Task[None] | None = None
    _spawn: Spawn | None = None
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        # The feeder never holds more than `capacity` claims (queued or running): that
        # bounds the hand-off.
        self.handoff: Handoff[Claim] = Handoff()
        self.deadlines = Deadlines(self.runs.values)
        self.feeder = Feeder(self)
        self.recorder = Recorder(
            self.store, lambda ended, result: settle(self, ended, result), self._record_failed
        )
        self._idle.set()

    @property
    def capacity(self) -> int:
        return self.config.concurrency + self.config.prefetch

    def start(self, spawn: Spawn) -> None:
        """Start the feeder and `concurrency` consumers as tasks made by `spawn` (the
        TaskGroup's create_task)."""
        self._spawn = spawn
        spawn(self.feeder.run(), "feeder")
        self._recording = spawn(self.recorder.run(), "recorder")
        self.resize(self.config)

    def resize(self, config: WorkersConfig) -> None:
        """Apply a new `[workers]` section: more consumers start now, surplus ones exit
        after their current task."""
        assert self._spawn is not None, "start() first"
        self.config = config
        if self.stopping.is_set():
            return  # a reload during the stop: no consumer may start that nobody would end
        surplus = len(self._consumers) - self.retiring - config.concurrency
        if surplus > 0:
            self.retiring += surplus
            return
        cancelled_retirements = min(self.retiring, -surplus)
        self.retiring -= cancelled_retirements
        for _ in range(-surplus - cancelled_retirements):
            task = self._spawn(consume(self), f"consumer-{len(self._consumers)}")
            self._consumers.add(task)
            task.add_done_callback(self._consumers.discard)
        self.feeder.wake()

    def stop_run(self, task_id: str, reason: str) -> bool:
        run = self.runs.get(task_id)
        if run is None:
            # Claimed but not started yet (prefetched, or a consumer is about to take it):
            # it must not start. The store already wrote why (a cancel, a lost lease).
            claim = self.handoff.take(lambda c: c.task.id == task_id)
            if claim is None:
                return False
            self.finished(claim)
            return True
        run.stop(reason)
        return True

    def _record_failed(self, error: OffloadError, waiting: int, pause: float) -> None:
        self.metrics.store_errors.add(("record",))
        logger.error(
            "could not write the outcomes of %d runs (trying again in %.1fs): %s",
            waiting,
            pause,
            error,
            extra={"event": "task.record_failed"},
        )

    def claimed(self, claims: list[Claim]) -> None:
        for claim in claims:
            self._hold(claim.task.type, claim.task.queue)

    def finished(self, claim: Claim) -> None:
        """A claim's run ended (its outcome goes to the recorder) or it was put back."""
        self._let_go(claim.task.type, claim.task.queue)

    def _hold(self, type: str, queue: str) -> None:
        if self.inflight == 0:  # idle no more (the Event is touched only when that changes)
            self._idle.clear()
        self.inflight += 1
        self.busy[type] += 1
        self.flow.busy[queue] += 1

    def _let_go(self, type: str, queue: str) -> None:
        self.inflight -= 1
        self.busy[type] -= 1
        busy = self.flow.busy
        busy[queue] -= 1
        if not busy[queue]:
            del busy[queue]  # queues come and go by name (a Counter reads 0 for it)
        if self.inflight == 0:
            self._idle.set()
        self.feeder.freed()

    # -- starting at admission -------------------------------------------------------------

    def start_now(self, task: NewTask, now: float) -> StartNow | None:
        """A slot for `task` to be admitted already running, or None. Only while a consumer
        idles and the feeder has nothing claimed, nothing to claim and no claim under way:
        then no queued task can be overtaken. Weighted, strict, capped or rate-limited
        queues always go through the feeder."""
        if (
            task.run_at > now  # the cheap tests first: they decide under load
            or self.inflight >= self.config.concurrency
            or self.stopping.is_set()
            or not self.feeder.quiet
            or not self.handoff.empty()
            or task.queue in self.flow.paused
            or not self.flow.simple
        ):
            return None
        task_type = self.types.get(task.type)
        if task_type is None:
            return None
        cap = task_type.config.concurrency
        if cap and self.busy[task.type] >= cap:
            return None
        self._hold(task.type, task.queue)
        return StartNow(owner=self.owner, lease=self.config.lease)

    def started(self, new: NewTask, admitted: Task | None) -> None:
        """After the admission `start_now()` held a slot for: the run goes to a consumer,
        or (not started: refused, replayed, or the store does not start) the slot is free."""
        if admitted is None or admitted.id != new.id or admitted.state is not TaskState.RUNNING:
            self._let_go(new.type, new.queue)
            return
        started = admitted.started_at or time.time()
        claim = Claim(admitted, self.owner, admitted.attempts, started + self.config.lease)
        if self.stopping.is_set():
            # The drain began while this admission committed, and may have emptied the
            # hand-off queue already: put the run back, unspent, as the drain would.
            self._let_go(new.type, new.queue)
            self.recorder.add(Ended(claim, Released(), 0.0))
            return
        self.handoff.put_nowait(claim)

    async def put_back(self, claims: list[Claim]) -> None:
        results: list[object] = []
        if claims:
            try:
                results = list(await self.store.record_many([(c, Released()) for c in claims]))
            except OffloadError as exc:
                results = [exc] * len(claims)
        for claim, result in zip(claims, results, strict=True):
            if isinstance(result, OffloadError):
                logger.error(
                    "could not put back task %s: %s",
                    claim.task.id,
                    result,
                    extra={"event": "task.put_back_failed", "task_id": claim.task.id},
                )
            self.finished(claim)
        self.stats.released += len(claims)

    # -- the stop ----------------------------------------------------------------------

    async def drain(self, grace: float, hurry: asyncio.Event) -> None:
        """Stop taking work, let running tasks finish within `grace` (or until `hurry` is
        set), then stop the rest and put them back; finally end the idle consumers."""
        self.stopping.set()
        await self.feeder.stop()
        waiting = []
        while not self.handoff.empty():
            waiting.append(self.handoff.get_nowait())
        await self.put_back(waiting)
        # `inflight`, not `runs`: an admission that starts its task at once holds a slot
        # before its run exists, and hands the run back (unspent) to the recorder.
        if self.inflight:
            logger.info(
                "draining: %d running tasks get up to %gs",
                self.inflight,
                grace,
                extra={"event": "drain.start"},
            )
            await _within(grace, self._idle, hurry)
        # One deadline past the grace for the stopped runs and the last writes together, so
        # that the stop's bound (lifecycle.py, TimeoutStopSec) holds.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_DEADLINE
        if self.inflight:
            logger.warning(
                "grace period over: stopping %d running tasks and putting them back",
                len(self.runs),
                extra={"event": "drain.stop_running"},
            )
            for run in list(self.runs.values()):
                run.stop("shutdown")
            await _within(STOP_DEADLINE, self._idle)
        self.recorder.hurry()
        await _within(max(0.0, deadline - loop.time()), self.recorder.idle)
        if self.recorder.waiting:
            logger.error(
                "stopping with %d outcomes not written (the store fails): %s, counting the "
                "interrupted run as an attempt",
                self.recorder.waiting,
                left_running(self.shared, self.config.lease),
                extra={"event": "drain.outcomes_lost"},
            )
        # Every consumer now waits on the empty queue (or, past STOP_DEADLINE, on a run
        # that ignores cancellation): end them, and the recorder, which has written all.
        for task in list(self._consumers):
            task.cancel()
        self.deadlines.close()
        if self._recording is not None:
            self._recording.cancel()


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
