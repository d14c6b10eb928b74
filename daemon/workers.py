"""The feeder and the consumers: from claimed tasks in the store to recorded outcomes.

The feeder claims due tasks into a bounded hand-off queue when there is room, woken by
admissions, by freed slots and by the next `run_at` (no polling). It honours per-type
concurrency caps by claiming capped types separately, never more than their free slots.
N consumers take claims from the queue and run them (`consumer.py`). `drain()` is the stop:
put back what was claimed but not started, give running tasks the grace period, then stop
the rest and put them back without spending an attempt.
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
from daemon.errors import OffloadError
from daemon.flow import Flow
from daemon.metrics import Metrics
from daemon.models import Claim, NewTask, Released, StartNow, Task, TaskState
from daemon.recorder import Ended, Recorder
from daemon.stats import Stats
from daemon.store.base import Store
from daemon.tasktypes import TaskType
from daemon.watch import Watchers

logger = logging.getLogger(__name__)

STOP_DEADLINE = 10.0  # seconds a stopped run gets to unwind after the grace period
PAUSED_EVERY = 2.0  # seconds between reads of the paused queues
MAX_CAPACITY = 8192  # workers.concurrency + workers.prefetch at most (each is <= 4096)
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
    _nudge: asyncio.Event = field(default_factory=asyncio.Event)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    _fed: asyncio.Event = field(default_factory=asyncio.Event)  # the feeder has exited
    _feeding: bool = False  # a feeder round (its claims) is under way
    _paused_read: float = 0.0  # when the paused queues were last read from the store
    _full: bool = False  # the current feeder round: a claim came back full
    # Whether the store may hold due work that no claim has taken: a freed slot wakes the
    # feeder only then, so that an idle daemon does not claim (and commit) for nothing
    # after each run, and a new task can start at admission meanwhile.
    _more: bool = True
    _wakes: int = 0  # wake() calls so far: a round that overlapped one proves nothing
    _due: list[float] = field(default_factory=list)  # the current round: next run_at seen
    # When the sleeping feeder claims next by itself (None: only when nudged).
    _sleeps_until: float | None = None

    def __post_init__(self) -> None:
        # The feeder never holds more than `capacity` claims (queued or running); a reload
        # may raise that, so the queue's own bound is the most the config allows.
        self.handoff: asyncio.Queue[Claim] = asyncio.Queue(MAX_CAPACITY)
        self.recorder = Recorder(self.store, lambda ended, result: settle(self, ended, result))
        self._idle.set()

    @property
    def capacity(self) -> int:
        return self.config.concurrency + self.config.prefetch

    def start(self, spawn: Spawn) -> None:
        """Start the feeder and `concurrency` consumers as tasks made by `spawn` (the
        TaskGroup's create_task)."""
        self._spawn = spawn
        spawn(self.feed(), "feeder")
        self._recording = spawn(self.recorder.run(), "recorder")
        self.resize(self.config)

    def resize(self, config: WorkersConfig) -> None:
        """Apply a new `[workers]` section: more consumers start now, surplus ones exit
        after their current task."""
        assert self._spawn is not None, "start() first"
        self.config = config
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
        self.wake()

    def wake(self) -> None:
        """New work may be due (an admission, a retry, a resumed queue, a hint)."""
        self._wakes += 1
        self._more = True
        self._nudge.set()

    def due_at(self, when: float) -> None:
        """Work was queued that is due at `when` (a delayed admission). A feeder that will
        claim by then anyway learns of it from that claim; only an earlier one is woken,
        and only if it would claim now: else the next slot a run frees wakes it (`_let_go`).
        Under a stream of admissions that spares the feeder a wake-up each, for nothing."""
        if not (self._feeding or self._sleeps_until is None or when < self._sleeps_until):
            return
        if not self._worth_claiming():
            self._wakes += 1
            self._more = True
            return
        self.wake()

    def stop_run(self, task_id: str, reason: str) -> bool:
        run = self.runs.get(task_id)
        if run is None:
            return False
        run.stop(reason)
        return True

    def claimed(self, claims: list[Claim]) -> None:
        for claim in claims:
            self._hold(claim.task.type, claim.task.queue)

    def finished(self, claim: Claim) -> None:
        """A claim's run ended (its outcome goes to the recorder) or it was put back."""
        self._let_go(claim.task.type, claim.task.queue)

    def _hold(self, type: str, queue: str) -> None:
        self.inflight += 1
        self.busy[type] += 1
        self.flow.busy[queue] += 1
        self._idle.clear()

    def _let_go(self, type: str, queue: str) -> None:
        self.inflight -= 1
        self.busy[type] -= 1
        self.flow.busy[queue] -= 1
        if self.inflight == 0:
            self._idle.set()
        if self._more or self.shared:
            self._nudge.set()

    # -- starting at admission -------------------------------------------------------------

    def start_now(self, task: NewTask, now: float) -> StartNow | None:
        """A slot for `task` to be admitted already running, or None. Only while a consumer
        idles and the feeder has nothing claimed, nothing to claim and no claim under way:
        then no queued task can be overtaken. Weighted, strict, capped or rate-limited
        queues always go through the feeder."""
        if (
            self.stopping.is_set()
            or self._feeding
            or self._nudge.is_set()
            or not self.handoff.empty()
            or self.inflight >= self.config.concurrency
            or task.run_at > now
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

    # -- the feeder --------------------------------------------------------------------

    async def feed(self) -> None:
        """Claim due work into the hand-off queue until `stopping` is set."""
        try:
            while not self.stopping.is_set():
                self._nudge.clear()
                self._feeding = True
                try:
                    delay = await self._feed_once()
                finally:
                    self._feeding = False
                if delay is not None and delay <= 0:
                    continue
                if not self._nudge.is_set():
                    self._sleeps_until = None if delay is None else time.time() + delay
                    try:
                        async with asyncio.timeout(delay):
                            await self._nudge.wait()
                    except TimeoutError:
                        pass
                    finally:
                        self._sleeps_until = None
        finally:
            self._fed.set()

    def _room(self) -> int:
        return self.capacity - self.inflight

    def _worth_claiming(self) -> bool:
        """Claim in batches: wait for a quarter of the room unless the consumers starve."""
        room = self._room()
        return room > 0 and (room >= max(1, self.capacity // 4) or self.handoff.empty())

    async def _feed_once(self) -> float | None:
        """Claim once if worthwhile; returns how long to sleep, None for 'until nudged'."""
        if not self._worth_claiming():
            return None
        room = self._room()
        self._full, self._due, wakes = False, [], self._wakes
        await self._refresh_paused()
        paused = tuple(self.flow.paused)
        # Types with their own cap are claimed apart, never past their free slots.
        caps = {n: t.config.concurrency for n, t in self.types.items() if t.config.concurrency}
        # A type left unclaimed for want of a slot may have work due: so may one at its
        # cap when the round ends. Either way a freed slot must wake the feeder, even if
        # the run that held it back ends while this round is still claiming.
        capped = False
        for name, cap in caps.items():
            free = min(room, cap - self.busy[name])
            if free > 0:
                room -= await self._claim(free, only_type=name, skip_queues=paused)
            else:
                capped = True
        if room > 0 and self.flow.simple:
            await self._claim(room, skip_types=tuple(caps), skip_queues=paused)
        elif room > 0:
            await self._claim_by_queue(room, tuple(caps))
        capped = capped or any(cap <= self.busy[name] for name, cap in caps.items())
        if not (self._full or capped or self._wakes != wakes) and self.flow.simple:
            self._more = False  # everything due was claimed: until the next wake()
        if self._full:
            return 0.0
        waits = [due - time.time() for due in self._due]
        if (token := self.flow.wake_in()) is not None:
            waits.append(token)
        return max(0.001, min(waits)) if waits else None

    async def _refresh_paused(self) -> None:
        """Re-read paused queues now and then: on a shared store another daemon may have
        paused or resumed one (its resume also wakes us)."""
        now = time.monotonic()
        if now - self._paused_read < PAUSED_EVERY:
            return
        self._paused_read = now
        try:
            self.flow.paused = await self.store.paused_queues()
        except OffloadError as exc:
            logger.warning("could not read paused queues: %s", exc, extra={"event": "flow.stale"})

    async def _claim_by_queue(self, room: int, skip_types: tuple[str, ...]) -> None:
        """Share `room` among the queues by the flow's plan until it is used or they run dry."""
        active = list(self.flow.queues)
        while room > 0 and active:
            plan = self.flow.shares(room, active)
            if not plan:
                break
            for queue, asked in plan:
                got = await self._claim(asked, only_queue=queue, skip_types=skip_types)
                self.flow.taken(queue, got, asked)
                room -= got
                if got < asked:
                    active.remove(queue)
        if room > 0:
            # Tasks of queues no longer configured still run, after the others.
            known = tuple(self.flow.queues)
            await self._claim(room, skip_types=skip_types, skip_queues=known)

    async def _claim(
        self,
        limit: int,
        *,
        only_type: str | None = None,
        skip_types: tuple[str, ...] = (),
        only_queue: str | None = None,
        skip_queues: tuple[str, ...] = (),
    ) -> int:
        """Claim into the hand-off queue; returns how many. Notes in `_full` whether the
        claim came back full (there may be more) and in `_due` when the next task is due."""
        batch = await self.store.claim(
            owner=self.owner,
            limit=limit,
            now=time.time(),
            lease=self.config.lease,
            only_type=only_type,
            skip_types=skip_types,
            only_queue=only_queue,
            skip_queues=skip_queues,
        )
        self.claimed(batch.claims)
        if self.stopping.is_set():
            await self._put_back(batch.claims)
            return 0
        for claim in batch.claims:
            self.handoff.put_nowait(claim)
        if len(batch.claims) == limit:
            self._full = True
        if batch.next_due is not None:
            self._due.append(batch.next_due)
        return len(batch.claims)

    async def _put_back(self, claims: list[Claim]) -> None:
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
        self._nudge.set()
        await self._fed.wait()
        waiting = []
        while not self.handoff.empty():
            waiting.append(self.handoff.get_nowait())
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
        await _within(STOP_DEADLINE, self.recorder.idle)
        # Every consumer now waits on the empty queue (or, past STOP_DEADLINE, on a run
        # that ignores cancellation): end them, and the recorder, which has written all.
        for task in list(self._consumers):
            task.cancel()
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
