"""Cron schedules: each fire enqueues exactly one task, also across a restart straddling the
fire and with two schedulers racing; misfire policies; pause; the API. Time is driven
through the scheduler's injectable clock, against a real SQLite store."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

from daemon.auth import Authenticator
from daemon.config import Config, parse
from daemon.flow import load_flow
from daemon.metrics import Metrics
from daemon.models import TaskQuery
from daemon.runtime import Runtime
from daemon.scheduler import Scheduler, next_fire
from daemon.stats import Stats
from daemon.store import open_store
from daemon.tasktypes import build_types
from daemon.watch import Watchers
from daemon.workers import Workers
from tests.inproc import open_daemon


def at(hhmmss: str) -> float:
    """A Unix time on a fixed day, UTC."""
    return dt.datetime.fromisoformat(f"2026-03-02T{hhmmss}+00:00").timestamp()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def schedule_config(tmp_path: Path, **schedule: Any) -> Config:
    entry = {"name": "tick", "cron": "* * * * *", "type": "noop", **schedule}
    return parse(
        {
            "store": {"url": f"sqlite:{tmp_path / 'offload.db'}", "synchronous": "normal"},
            "types": {"noop": {"kind": "python", "handler": "daemon.builtins:noop"}},
            "schedules": [entry],
        }
    )


@asynccontextmanager
async def runtime(config: Config) -> AsyncIterator[Runtime]:
    """What the scheduler needs of a running daemon, without its HTTP or consumers: a
    restart is leaving this block and entering it again."""
    with ThreadPoolExecutor(1) as threads:
        async with open_store(config.store) as store:
            types = build_types(config, threads)
            stats, watchers, metrics = Stats(), Watchers(), Metrics()
            flow = await load_flow(config, store)
            workers = Workers(
                config.workers, store, types, stats, watchers, metrics, "test:1", flow
            )
            yield Runtime(
                config, store, types, workers, stats, watchers, metrics, Authenticator([], [])
            )


async def fired(rt: Runtime) -> int:
    return len((await rt.store.list(TaskQuery(type="noop", limit=1000))).tasks)


async def test_each_fire_runs_once_across_a_restart_straddling_it(tmp_path: Path) -> None:
    config = schedule_config(tmp_path)
    clock = Clock(at("12:00:30"))
    async with runtime(config) as rt:
        scheduler = Scheduler(rt, clock)
        assert await scheduler.tick() == at("12:01:00")  # first sight: no fire, a baseline
        clock.now = at("12:00:59.900")
        assert await scheduler.tick() == at("12:01:00")
        assert await fired(rt) == 0
    # The daemon stops just before the fire and starts again just after it.
    clock.now = at("12:01:00.400")
    async with runtime(config) as rt:
        assert await Scheduler(rt, clock).tick() == at("12:02:00")
        assert await fired(rt) == 1
    # ...and once more, still within the same minute: the fire is not repeated.
    clock.now = at("12:01:00.700")
    async with runtime(config) as rt:
        scheduler = Scheduler(rt, clock)
        await scheduler.tick()
        assert await fired(rt) == 1
        for minute in range(2, 6):
            clock.now = at(f"12:0{minute}:00.050")
            await scheduler.tick()
            await scheduler.tick()
            assert await fired(rt) == minute


async def test_two_schedulers_racing_fire_once(tmp_path: Path) -> None:
    config = schedule_config(tmp_path)
    clock = Clock(at("12:00:10"))
    async with runtime(config) as rt:
        first, second = Scheduler(rt, clock), Scheduler(rt, clock)
        await first.tick()
        clock.now = at("12:01:00.010")
        await asyncio.gather(first.tick(), second.tick(), first.tick())
        assert await fired(rt) == 1


async def test_missed_fires_are_skipped_by_default(tmp_path: Path) -> None:
    config = schedule_config(tmp_path, misfire="skip", misfire_grace="10s")
    clock = Clock(at("12:00:05"))
    async with runtime(config) as rt:
        await Scheduler(rt, clock).tick()
    clock.now = at("12:10:30")  # down from 12:00:05 to 12:10:30: ten fires missed
    async with runtime(config) as rt:
        scheduler = Scheduler(rt, clock)
        assert await scheduler.tick() == at("12:11:00")
        assert await fired(rt) == 0
        clock.now = at("12:11:00.100")
        await scheduler.tick()
        assert await fired(rt) == 1  # the schedule goes on


async def test_catch_up_runs_one_task_for_the_missed_fires(tmp_path: Path) -> None:
    config = schedule_config(tmp_path, misfire="catch_up", misfire_grace="10s")
    clock = Clock(at("12:00:05"))
    async with runtime(config) as rt:
        await Scheduler(rt, clock).tick()
    clock.now = at("12:10:30")
    async with runtime(config) as rt:
        scheduler = Scheduler(rt, clock)
        await scheduler.tick()
        await scheduler.tick()
        assert await fired(rt) == 1
        clock.now = at("12:11:00.100")
        await scheduler.tick()
        assert await fired(rt) == 2


async def test_a_paused_schedule_does_not_fire(tmp_path: Path) -> None:
    config = schedule_config(tmp_path)
    clock = Clock(at("12:00:05"))
    async with runtime(config) as rt:
        scheduler = Scheduler(rt, clock)
        await scheduler.tick()
        await rt.store.set_schedule_paused("tick", True)
        clock.now = at("12:01:00.100")
        assert await scheduler.tick() is None
        assert await fired(rt) == 0


def test_cron_is_read_in_the_schedule_time_zone(tmp_path: Path) -> None:
    config = schedule_config(tmp_path, cron="0 9 * * *", timezone="Europe/Paris")
    (schedule,) = config.schedules
    # 09:00 in Paris is 08:00 UTC in winter (CET) and 07:00 UTC in summer (CEST).
    assert next_fire(schedule, at("00:00:00")) == at("08:00:00")
    summer = dt.datetime(2026, 7, 1, tzinfo=dt.UTC).timestamp()
    assert next_fire(schedule, summer) == dt.datetime(2026, 7, 1, 7, tzinfo=dt.UTC).timestamp()


async def test_the_api_lists_pauses_and_resumes_schedules(tmp_path: Path) -> None:
    overrides = {"schedules": [{"name": "hourly", "cron": "0 * * * *", "type": "noop"}]}
    async with open_daemon(tmp_path, overrides) as daemon:
        reply = await daemon.request("GET", "/v1/schedules")
        assert reply.status == 200
        (listed,) = reply.body["schedules"]
        assert (listed["name"], listed["paused"]) == ("hourly", False)
        assert listed["next_fire"].endswith(":00:00.000Z")
        reply = await daemon.request("POST", "/v1/schedules/hourly/pause")
        assert (reply.status, reply.body["paused"], reply.body["next_fire"]) == (200, True, None)
        reply = await daemon.request("POST", "/v1/schedules/hourly/resume")
        assert (reply.status, reply.body["paused"]) == (200, False)
        reply = await daemon.request("POST", "/v1/schedules/nope/pause")
        assert (reply.status, reply.body["error"]["field"]) == (404, "name")


async def test_a_schedule_that_cannot_be_computed_is_skipped_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The config check refuses a cron with no date; should one reach the scheduler anyway
    (a croniter that disagrees with the check), the others still fire."""
    config = schedule_config(tmp_path)
    broken = msgspec.structs.replace(config.schedules[0], name="never", cron="0 0 31 4 *")
    config = msgspec.structs.replace(config, schedules=[broken, *config.schedules])
    clock = Clock(at("12:00:05"))
    caplog.set_level(logging.ERROR, logger="daemon.scheduler")
    async with runtime(config) as rt:
        scheduler = Scheduler(rt, clock)
        await scheduler.tick()
        clock.now = at("12:01:00.100")
        assert await scheduler.tick() == at("12:02:00")
        assert await fired(rt) == 1
    errors = [r for r in caplog.records if getattr(r, "event", None) == "schedule.error"]
    assert errors and all("never" in r.getMessage() for r in errors)
