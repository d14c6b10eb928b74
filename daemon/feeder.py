"""The feeder: claims due tasks into the workers' hand-off queue when there is room.

It is woken by admissions, by freed slots and by the next `run_at` (no polling), and
claims in batches. It honours per-type concurrency caps by claiming capped types
separately, never more than their free slots, and shares room among weighted queues by
the flow's plan.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from daemon.backoff import STORE_RETRY, backoff_delay
from daemon.errors import OffloadError

if TYPE_CHECKING:
    from daemon.workers import Workers

logger = logging.getLogger(__name__)

PAUSED_EVERY = 2.0  # seconds between reads of the paused queues


class Feeder:
    """The feeder's own state; it reads and fills the `Workers` it serves. Only the event
    loop touches it."""

    def __init__(self, workers: Workers) -> None:
        self.w = workers
        self._nudge = asyncio.Event()
        self._fed = asyncio.Event()  # the feeder has exited
        self._feeding = False  # a round (its claims) is under way
        self._paused_read = 0.0  # when the paused queues were last read from the store
        self._full = False  # the current round: a claim came back full
        # Whether the store may hold due work that no claim has taken: a freed slot wakes
        # the feeder only then, so that an idle daemon does not claim (and commit) for
        # nothing after each run, and a new task can start at admission meanwhile.
        self._more = True
        self._wakes = 0  # wake() calls so far: a round that overlapped one proves nothing
        self._due: list[float] = []  # the current round: next run_at seen
        # When the sleeping feeder claims next by itself (None: only when nudged).
        self._sleeps_until: float | None = None

    @property
    def wakes_at(self) -> float | None:
        """When the sleeping feeder looks again by itself (None: only when woken)."""
        return self._sleeps_until

    @property
    def quiet(self) -> bool:
        """Neither claiming nor about to: a task started at admission overtakes nothing."""
        return not self._feeding and not self._nudge.is_set()

    def wake(self) -> None:
        """New work may be due (an admission, a retry, a resumed queue, a hint)."""
        self._wakes += 1
        self._more = True
        self._nudge.set()

    def due_at(self, when: float, queue: str) -> None:
        """Work was queued in `queue` that is due at `when` (a delayed admission). A feeder
        that will claim by then anyway learns of it from that claim; only an earlier one is
        woken, and only if it would claim now: else the next slot a run frees wakes it
        (`freed`). Under a stream of admissions that spares the feeder a wake-up each, for
        nothing. Work in a paused queue wakes nobody: its resume does (a claim would only
        walk past the paused backlog, which every such claim read again)."""
        if queue in self.w.flow.paused:
            return
        if not (self._feeding or self._sleeps_until is None or when < self._sleeps_until):
            return
        self._wakes += 1
        self._more = True
        if self._worth_claiming():
            self._nudge.set()

    def freed(self) -> None:
        """A slot came free: claim into it if the store may hold due work."""
        if self._more or self.w.shared:
            self._nudge.set()

    async def stop(self) -> None:
        """Return once the feeder has made its last claim (`stopping` is set)."""
        self._nudge.set()
        await self._fed.wait()

    async def run(self) -> None:
        """Claim due work into the hand-off queue until `stopping` is set."""
        failures = 0
        try:
            while not self.w.stopping.is_set():
                self._nudge.clear()
                self._feeding = True
                try:
                    delay = await self._feed_once()
                    failures = 0
                except OffloadError as exc:
                    # The store is locked by another program, or the disk is full: try
                    # again later; what runs keeps running.
                    failures += 1
                    delay = backoff_delay(STORE_RETRY, failures)
                    self.w.metrics.store_errors.add(("claim",))
                    logger.error(
                        "could not claim work (trying again in %.1fs): %s",
                        delay,
                        exc,
                        extra={"event": "feeder.claim_failed"},
                    )
                finally:
                    self._feeding = False
                if failures:
                    # The whole pause, whatever wakes the feeder meanwhile (freed slots,
                    # admissions): only the stop cuts it short.
                    try:
                        async with asyncio.timeout(delay):
                            await self.w.stopping.wait()
                    except TimeoutError:
                        pass
                    continue
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
        return self.w.capacity - self.w.inflight

    def _worth_claiming(self) -> bool:
        """Claim in batches: wait for a quarter of the room unless the consumers starve."""
        room = self._room()
        return room > 0 and (room >= max(1, self.w.capacity // 4) or self.w.handoff.empty())

    async def _feed_once(self) -> float | None:
        """Claim once if worthwhile; returns how long to sleep, None for 'until nudged'."""
        if not self._worth_claiming():
            return None
        w = self.w
        room = self._room()
        self._full, self._due, wakes = False, [], self._wakes
        await self._refresh_paused()
        paused = tuple(w.flow.paused)
        # Types with their own cap are claimed apart, never past their free slots.
        caps = {n: t.config.concurrency for n, t in w.types.items() if t.config.concurrency}
        # A type left unclaimed for want of a slot may have work due: so may one at its
        # cap when the round ends. Either way a freed slot must wake the feeder, even if
        # the run that held it back ends while this round is still claiming.
        capped = False
        for name, cap in caps.items():
            free = min(room, cap - w.busy[name])
            if free > 0:
                room -= await self._claim(free, only_type=name, skip_queues=paused)
            else:
                capped = True
        if room > 0 and w.flow.simple:
            await self._claim(room, skip_types=tuple(caps), skip_queues=paused)
        elif room > 0:
            await self._claim_by_queue(room, tuple(caps))
        capped = capped or any(cap <= w.busy[name] for name, cap in caps.items())
        if not (self._full or capped or self._wakes != wakes) and w.flow.simple:
            self._more = False  # everything due was claimed: until the next wake()
        if self._full:
            return 0.0
        waits = [due - time.time() for due in self._due]
        if (token := w.flow.wake_in()) is not None:
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
            self.w.flow.paused = await self.w.store.paused_queues()
        except OffloadError as exc:
            logger.warning("could not read paused queues: %s", exc, extra={"event": "flow.stale"})

    async def _claim_by_queue(self, room: int, skip_types: tuple[str, ...]) -> None:
        """Share `room` among the queues by the flow's plan until it is used or they run dry."""
        flow = self.w.flow
        active = list(flow.queues)
        while room > 0 and active:
            plan = flow.shares(room, active)
            if not plan:
                break
            for queue, asked in plan:
                got = await self._claim(asked, only_queue=queue, skip_types=skip_types)
                flow.taken(queue, got, asked)
                room -= got
                if got < asked:
                    active.remove(queue)
        if room > 0:
            # Tasks of queues no longer configured still run, after the others.
            known = tuple(flow.queues)
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
        w = self.w
        batch = await w.store.claim(
            owner=w.owner,
            limit=limit,
            now=time.time(),
            lease=w.config.lease,
            only_type=only_type,
            skip_types=skip_types,
            only_queue=only_queue,
            skip_queues=skip_queues,
        )
        w.claimed(batch.claims)
        if w.stopping.is_set():
            await w.put_back(batch.claims)
            return 0
        for claim in batch.claims:
            w.handoff.put_nowait(claim)
        if len(batch.claims) == limit:
            self._full = True
        if batch.next_due is not None:
            self._due.append(batch.next_due)
        return len(batch.claims)
