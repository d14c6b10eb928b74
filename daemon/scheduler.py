"""Cron schedules: each fire enqueues one task, exactly once.

The store keeps each schedule's last fire; a fire is claimed there by compare-and-set in the
same transaction that admits its task, so a restart at the moment of a fire, or several
daemons on one database, still fire it once. Time comes from an injectable clock. The loop
sleeps until the next fire, or until a pause, resume or reload wakes it: no polling.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable
from zoneinfo import ZoneInfo

import msgspec
from croniter import croniter

from daemon import admission
from daemon.config import ScheduleConfig
from daemon.errors import OffloadError
from daemon.models import NewTask, ScheduleState
from daemon.runtime import Runtime
from daemon.wire import SubmitRequest

logger = logging.getLogger(__name__)


def next_fire(schedule: ScheduleConfig, after: float) -> float:
    """The first fire time strictly after `after` (Unix seconds)."""
    start = dt.datetime.fromtimestamp(after, ZoneInfo(schedule.timezone))
    return float(croniter(schedule.cron, start).get_next(float))


def latest_fire(schedule: ScheduleConfig, now: float) -> float:
    """The last fire time at or before `now`."""
    start = dt.datetime.fromtimestamp(now + 0.000001, ZoneInfo(schedule.timezone))
    return float(croniter(schedule.cron, start).get_prev(float))


class Scheduler:
    def __init__(self, rt: Runtime, clock: Callable[[], float] = time.time) -> None:
        self.rt = rt
        self.clock = clock

    @property
    def schedules(self) -> list[ScheduleConfig]:
        return self.rt.config.schedules

    async def tick(self) -> float | None:
        """Fire what is due now; returns when the next fire is due (None: none is)."""
        now = self.clock()
        states = await self.rt.store.schedules()
        upcoming = []
        for schedule in self.schedules:
            state = states.get(schedule.name, ScheduleState())
            if state.paused:
                continue
            try:
                last = await self._fire_if_due(schedule, state.last_fire, now)
                upcoming.append(next_fire(schedule, last))
            except ValueError as exc:  # croniter's errors: the config check should have caught it
                logger.error(
                    "schedule %s cannot be computed, skipped: %s",
                    schedule.name,
                    exc,
                    extra={"event": "schedule.error"},
                )
        return min(upcoming) if upcoming else None

    async def _fire_if_due(self, schedule: ScheduleConfig, last: float | None, now: float) -> float:
        """Fire `schedule` if a fire is due; returns the last fire after this call."""
        latest = latest_fire(schedule, now)
        if last is None:
            # First sight of this schedule: start from the latest fire, without running it.
            await self.rt.store.fire(schedule.name, due=latest, previous=None, task=None)
            return latest
        if next_fire(schedule, last) > now:
            return last
        on_time = now - latest <= schedule.misfire_grace
        run = on_time or schedule.misfire == "catch_up"
        task = self._task(schedule, now) if run else None
        won = await self.rt.store.fire(schedule.name, due=latest, previous=last, task=task)
        if won and task is not None:
            self.rt.stats.accepted += 1
            self.rt.workers.feeder.wake()
            logger.info(
                "schedule %s fired for %s%s",
                schedule.name,
                dt.datetime.fromtimestamp(latest, dt.UTC).isoformat(),
                "" if on_time else " (catching up on missed fires)",
                extra={
                    "event": "schedule.fired",
                    "task_id": task.id,
                    "task_type": task.type,
                    "queue": task.queue,
                },
            )
        elif won:
            logger.warning(
                "schedule %s skipped missed fires up to %s",
                schedule.name,
                dt.datetime.fromtimestamp(latest, dt.UTC).isoformat(),
                extra={"event": "schedule.skipped"},
            )
        return latest

    def _task(self, schedule: ScheduleConfig, now: float) -> NewTask:
        req = SubmitRequest(
            type=schedule.type,
            payload=msgspec.Raw(msgspec.json.encode(schedule.payload)),
            queue=schedule.queue,
        )
        return admission.build(self.rt, req, now)

    async def run(self) -> None:
        """Fire schedules until cancelled."""
        changed = self.rt.schedules_changed
        while True:
            changed.clear()
            try:
                due = await self.tick()
            except OffloadError as exc:
                logger.error("schedules could not fire: %s", exc, extra={"event": "schedule.error"})
                due = self.clock() + 5
            delay = None if due is None else max(0.0, due - self.clock())
            try:
                async with asyncio.timeout(delay):
                    await changed.wait()
            except TimeoutError:
                pass
