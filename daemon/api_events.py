"""`GET /v1/events`: task state changes as Server-Sent Events.

Each event is `id: <change sequence>`, `event: task`, `data: <the task>`. With
`Last-Event-ID` (header, or `last_event_id` in the query) the stream first replays, from the
store, every matching task changed since, once each in its current state, then goes live.
A comment line every `server.sse_heartbeat` keeps proxies from closing an idle stream.
An error once the stream has begun (the store failing during the replay) comes as an
`event: error` with the error's JSON body, and ends the stream.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from daemon.errors import Invalid, OffloadError
from daemon.events import Filter, Subscription
from daemon.ids import is_id
from daemon.models import Task
from daemon.routing import STREAM, Routes
from daemon.runtime import RUNTIME, Runtime
from daemon.wire import ErrorBody, ErrorResponse, encode, only_params, view

PAGE = 500
MAX_EVENT_ID = 2**63 - 1  # change numbers are 64-bit integers in both stores


def add_routes(routes: Routes) -> None:
    routes.add("/v1/events", head=False, GET=events)


def _filter(request: web.Request) -> Filter:
    q = request.query
    only_params(q, {"task_id", "type", "queue", "last_event_id"})
    task_id = q.get("task_id")
    if task_id is not None and not is_id(task_id):
        raise Invalid("task_id is not a task id", field="task_id")
    return Filter(task_id=task_id, type=q.get("type"), queue=q.get("queue"))


def _last_event_id(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID", request.query.get("last_event_id"))
    if raw is None or raw == "":
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19 or int(raw) > MAX_EVENT_ID:
        raise Invalid("Last-Event-ID must be an id this server sent", field="Last-Event-ID")
    return int(raw)


async def _send(response: web.StreamResponse, task: Task) -> None:
    data = encode(view(task)).decode()
    await response.write(f"id: {task.changed}\nevent: task\ndata: {data}\n\n".encode())


async def events(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    wanted = _filter(request)
    last = _last_event_id(request)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
        }
    )
    # Subscribe before replaying, so nothing that changes meanwhile is missed; what the
    # replay already sent is skipped by its change sequence.
    with rt.events.subscribe(wanted) as sub:
        await response.prepare(request)
        request[STREAM] = response
        await response.write(b": connected\n\n")
        try:
            if last is not None:
                last = await _replay(rt, response, wanted, last)
            await _live(rt, response, sub, last or 0)
        except OffloadError as exc:
            error = ErrorResponse(ErrorBody(code=exc.code, message=exc.message, field=exc.field))
            await response.write(b"event: error\ndata: " + encode(error) + b"\n\n")
    return response


async def _replay(rt: Runtime, response: web.StreamResponse, wanted: Filter, last: int) -> int:
    while True:
        page = await rt.store.changes(
            after=last, limit=PAGE, task_id=wanted.task_id, type=wanted.type, queue=wanted.queue
        )
        for task in page:
            await _send(response, task)
            last = task.changed
        if len(page) < PAGE:
            return last


async def _live(rt: Runtime, response: web.StreamResponse, sub: Subscription, last: int) -> None:
    heartbeat = rt.config.server.sse_heartbeat
    while not rt.events.closed.is_set():
        try:
            async with asyncio.timeout(heartbeat):
                await sub.ready.wait()
        except TimeoutError:
            await response.write(b": keep-alive\n\n")
            continue
        sub.ready.clear()
        while sub.pending:
            task = sub.pending.popleft()
            if task.changed > last:
                await _send(response, task)
                last = task.changed
        if sub.overflowed:
            # Too far behind: end the stream; the client resumes with Last-Event-ID.
            await response.write(b"event: overflow\ndata: {}\n\n")
            return
