"""The HTTP API for flow control: queues (list, pause, resume) and cron schedules (list,
pause, resume). Pauses are kept in the store, so they survive a restart."""

from __future__ import annotations

import re
import time

import msgspec
from aiohttp import web

from daemon.config import QueueConfig, ScheduleConfig
from daemon.errors import NotFound
from daemon.models import NAME_PATTERN, Counts, ScheduleState
from daemon.routing import Routes, json_response
from daemon.runtime import RUNTIME, Runtime
from daemon.scheduler import next_fire
from daemon.wire import rfc3339


class QueueView(msgspec.Struct, frozen=True):
    name: str
    # False for a queue only tasks name: it has the default settings and runs after the
    # configured ones.
    configured: bool
    paused: bool
    weight: int
    concurrency: int
    rate: float
    burst: int
    queued: int
    running: int
    completed_per_second: float


class ScheduleView(msgspec.Struct, frozen=True):
    name: str
    cron: str
    timezone: str
    type: str
    queue: str | None
    misfire: str
    paused: bool
    last_fire: str | None
    next_fire: str | None


_QUEUE_NAME = re.compile(NAME_PATTERN)


def add_routes(routes: Routes) -> None:
    routes.add("/v1/queues", GET=list_queues)
    routes.add("/v1/queues/{name}/pause", POST=pause_queue)
    routes.add("/v1/queues/{name}/resume", POST=resume_queue)
    routes.add("/v1/schedules", GET=list_schedules)
    routes.add("/v1/schedules/{name}/pause", POST=pause_schedule)
    routes.add("/v1/schedules/{name}/resume", POST=resume_schedule)


def _queue_view(rt: Runtime, name: str, counts: Counts) -> QueueView:
    q = rt.workers.flow.queues.get(name)
    configured = q is not None
    q = q or QueueConfig()
    return QueueView(
        name=name,
        configured=configured,
        paused=name in rt.workers.flow.paused,
        weight=q.weight,
        concurrency=q.concurrency,
        rate=q.rate,
        burst=q.burst,
        queued=counts.queued,
        running=counts.running,
        completed_per_second=round(rt.stats.completion_rate(queue=name), 3),
    )


async def list_queues(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    counts = await rt.store.unfinished_by_queue()
    flow = rt.workers.flow
    names = sorted({*flow.queues, *flow.paused, *(n for n, c in counts.items() if c.pending)})
    views = [_queue_view(rt, n, counts.get(n, Counts())) for n in names]
    return json_response({"queues": views})


async def _set_queue_paused(request: web.Request, paused: bool) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    name = request.match_info["name"]
    # Any queue a task could name may be paused, configured or not (a tenant's queue).
    if not _QUEUE_NAME.fullmatch(name):
        raise NotFound(f"no queue {name!r}: names are 1-64 of A-Z a-z 0-9 _ . -", field="name")
    await rt.store.set_paused(name, paused)
    if paused:
        rt.workers.flow.paused.add(name)
    else:
        rt.workers.flow.paused.discard(name)
        rt.workers.feeder.wake()
    counts = (await rt.store.unfinished_by_queue()).get(name, Counts())
    return json_response(_queue_view(rt, name, counts))


async def pause_queue(request: web.Request) -> web.StreamResponse:
    return await _set_queue_paused(request, True)


async def resume_queue(request: web.Request) -> web.StreamResponse:
    return await _set_queue_paused(request, False)


def _schedule_view(schedule: ScheduleConfig, state: ScheduleState) -> ScheduleView:
    base = state.last_fire if state.last_fire is not None else time.time()
    return ScheduleView(
        name=schedule.name,
        cron=schedule.cron,
        timezone=schedule.timezone,
        type=schedule.type,
        queue=schedule.queue,
        misfire=schedule.misfire,
        paused=state.paused,
        last_fire=rfc3339(state.last_fire),
        next_fire=None if state.paused else rfc3339(next_fire(schedule, base)),
    )


async def list_schedules(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    states = await rt.store.schedules()
    views = [_schedule_view(s, states.get(s.name, ScheduleState())) for s in rt.config.schedules]
    return json_response({"schedules": views})


async def _set_schedule_paused(request: web.Request, paused: bool) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    name = request.match_info["name"]
    schedule = next((s for s in rt.config.schedules if s.name == name), None)
    if schedule is None:
        raise NotFound(f"no schedule {name!r} is configured", field="name")
    await rt.store.set_schedule_paused(name, paused)
    rt.schedules_changed.set()
    state = (await rt.store.schedules()).get(name, ScheduleState())
    return json_response(_schedule_view(schedule, state))


async def pause_schedule(request: web.Request) -> web.StreamResponse:
    return await _set_schedule_paused(request, True)


async def resume_schedule(request: web.Request) -> web.StreamResponse:
    return await _set_schedule_paused(request, False)
