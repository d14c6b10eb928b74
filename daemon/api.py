"""The HTTP API (v1): routes and handlers. Handlers decode, call admission or the store, and
encode; they never build error answers (raise an `OffloadError`; see `routing.py`)."""

from __future__ import annotations

import asyncio
import logging
import re
import time

from aiohttp import web
from multidict import MultiMapping

from daemon import admission, api_events, api_flow, auth
from daemon.body import read_json
from daemon.errors import (
    Invalid,
    NotFound,
    OffloadError,
    QueueFull,
)
from daemon.ids import is_id, new_ids
from daemon.metrics import CONTENT_TYPE
from daemon.models import SCAN_ROWS, NewTask, Task, TaskQuery, TaskState
from daemon.openapi import serve_openapi
from daemon.routing import Routes, json_response
from daemon.runtime import RUNTIME, Runtime
from daemon.wire import BatchRequest, SubmitRequest, TaskPage, decode_body, only_params, view

MAX_PAGE = 1000
# Payload and result bytes a list page holds before it ends early (at least one task).
PAGE_BYTES = 8 * 1024 * 1024
TASK_ID = "{id:(?!batch$)[^/]+}"
METRICS_STORE_WAIT = 2.0  # seconds /metrics waits for the store's gauges before leaving them out
_INTEGER = re.compile(r"[0-9]+")
_NUMBER = re.compile(r"-?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?")

logger = logging.getLogger(__name__)


def make_app(rt: Runtime) -> web.Application:
    app = web.Application(client_max_size=rt.config.server.max_body)
    app[RUNTIME] = rt
    routes = Routes(app, rt)
    routes.add("/v1/tasks", POST=submit, GET=list_tasks)
    routes.add("/v1/tasks/batch", POST=submit_batch)
    # A task id is never "batch": that path belongs to POST /v1/tasks/batch alone (405).
    routes.add(f"/v1/tasks/{TASK_ID}", GET=get_task, DELETE=cancel_task)
    routes.add(f"/v1/tasks/{TASK_ID}/retry", POST=retry_task)
    routes.add("/healthz", GET=healthz)
    routes.add("/readyz", GET=readyz)
    routes.add("/metrics", GET=metrics)
    api_flow.add_routes(routes)
    api_events.add_routes(routes)
    routes.add("/openapi.json", GET=serve_openapi)
    routes.close()
    return app


async def submit(request: web.Request) -> web.StreamResponse:
    """One task: 202 with it. A replay of an Idempotency-Key answers the original task."""
    tasks, replayed = await _admit(request, batch=False)
    (task,) = tasks
    response = json_response(view(task), status=202)
    response.headers["Location"] = f"/v1/tasks/{task.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


async def submit_batch(request: web.Request) -> web.StreamResponse:
    """Up to `server.max_batch` tasks, validated all-or-nothing, committed in one
    transaction, answered with their ids in order. Ids alone: the client sent the rest, and
    the views of a batch of 100 cost the event loop a quarter of its time per task."""
    tasks, replayed = await _admit(request, batch=True)
    response = json_response({"ids": [t.id for t in tasks]}, status=202)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


async def _admit(request: web.Request, *, batch: bool) -> tuple[list[Task], bool]:
    rt = request.app[RUNTIME]
    try:
        if rt.draining.is_set():
            raise admission.draining_refusal(rt)
        body = await read_json(request, rt.config.server.max_body)
        now = time.time()
        if batch:
            reqs = decode_body(body, BatchRequest).tasks
            if not 1 <= len(reqs) <= rt.config.server.max_batch:
                raise Invalid(
                    f"a batch holds 1 to {rt.config.server.max_batch} tasks", field="tasks"
                )
            ids = new_ids(len(reqs), now)
            new = [_build(rt, req, now, i, ids[i]) for i, req in enumerate(reqs)]
        else:
            new = [admission.build(rt, decode_body(body, SubmitRequest), now)]
        key = admission.idempotency(
            rt, request.headers.get("Idempotency-Key"), request[auth.CALLER], body, now
        )
        return await admission.admit(rt, new, key)
    except OffloadError as exc:
        rt.metrics.rejected.add((exc.code,))
        raise


def _build(rt: Runtime, req: SubmitRequest, now: float, i: int, task_id: str) -> NewTask:
    """`admission.build` for the i-th task of a batch: errors name `tasks[i].field`."""
    try:
        return admission.build(rt, req, now, task_id)
    except OffloadError as exc:
        exc.field = f"tasks[{i}].{exc.field}" if exc.field else f"tasks[{i}]"
        raise


async def _task_or_404(rt: Runtime, task_id: str) -> Task:
    task = await rt.store.get(task_id) if is_id(task_id) else None
    if task is None:
        raise NotFound(f"no task {task_id}", field="id")
    return task


def _wait_param(query: MultiMapping[str], cap: float) -> float:
    raw = query.get("wait")
    if raw is None:
        return 0.0
    try:
        if not _NUMBER.fullmatch(raw):
            raise ValueError(raw)
        wait = float(raw)
    except ValueError:
        raise Invalid(f"wait must be a number of seconds, got {raw!r}", field="wait") from None
    if not 0 <= wait <= cap:
        raise Invalid(f"wait must be between 0 and {cap:g} seconds", field="wait")
    return wait


async def get_task(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    task_id = request.match_info["id"]
    only_params(request.query, {"wait"})
    wait = _wait_param(request.query, rt.config.server.max_wait)
    task = await _task_or_404(rt, task_id)
    if wait > 0 and not task.state.terminal:
        task = await _wait_until_ended(rt, task_id, wait)
    return json_response(view(task))


async def _wait_until_ended(rt: Runtime, task_id: str, wait: float) -> Task:
    ended = rt.watchers.watch(task_id)
    try:
        # Read again after watching, so an end between the first read and now is not missed.
        task = await _task_or_404(rt, task_id)
        if not task.state.terminal:
            try:
                async with asyncio.timeout(wait):
                    await ended
            except TimeoutError:
                pass
            task = await _task_or_404(rt, task_id)
    finally:
        rt.watchers.forget(task_id, ended)
    return task


async def cancel_task(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    task_id = request.match_info["id"]
    if not is_id(task_id):
        raise NotFound(f"no task {task_id}", field="id")
    task, before = await rt.store.cancel(task_id, now=time.time())
    if before is TaskState.RUNNING:
        rt.workers.stop_run(task_id, "cancel")
    rt.stats.cancelled += 1
    rt.metrics.tasks.add((task.type, task.queue, "cancelled"))
    rt.watchers.ended(task_id)
    fields = {
        "event": "task.cancelled",
        "task_id": task.id,
        "task_type": task.type,
        "queue": task.queue,
        "attempt": task.attempts,
    }
    logger.info("task %s cancelled while %s", task.id, before.value, extra=fields)
    return json_response(view(task))


async def retry_task(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    task_id = request.match_info["id"]
    if not is_id(task_id):
        raise NotFound(f"no task {task_id}", field="id")
    if rt.draining.is_set():
        raise admission.draining_refusal(rt)
    try:
        task = await rt.store.retry(
            task_id, now=time.time(), max_pending=rt.config.workers.max_pending
        )
    except QueueFull as exc:
        exc.retry_after = rt.stats.retry_after(exc.needed)
        raise
    rt.workers.feeder.wake()
    return json_response(view(task))


async def list_tasks(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    q = request.query
    only_params(q, {"state", "type", "queue", "limit", "cursor"})
    state = q.get("state")
    if state is not None and state not in TaskState.__members__.values():
        allowed = ", ".join(s.value for s in TaskState)
        raise Invalid(f"state must be one of {allowed}", field="state")
    try:
        raw_limit = q.get("limit", "100")
        if not _INTEGER.fullmatch(raw_limit):
            raise ValueError(raw_limit)
        limit = int(raw_limit)
    except ValueError:
        raise Invalid("limit must be an integer", field="limit") from None
    if not 1 <= limit <= MAX_PAGE:
        raise Invalid(f"limit must be between 1 and {MAX_PAGE}", field="limit")
    cursor = q.get("cursor")
    if cursor is not None and not is_id(cursor):
        raise Invalid("cursor is not one this server gave out", field="cursor")
    query = TaskQuery(
        state=TaskState(state) if state is not None else None,
        type=q.get("type"),
        queue=q.get("queue"),
        before=cursor,
        limit=limit + 1,
        max_bytes=PAGE_BYTES,
        max_scan=SCAN_ROWS,
    )
    listing = await rt.store.list(query)
    tasks = listing.tasks
    # More after this page: a task past `limit`, or the page ended at its byte budget (the
    # next page may then be empty): it ends at its last task. Or the scan stopped at its
    # budget of rows before it found `limit` tasks (this page may be short, even empty): the
    # next page starts below the last task it examined.
    next_cursor = None
    if len(tasks) > limit or sum(len(t.payload) + len(t.result or b"") for t in tasks) > (
        PAGE_BYTES
    ):
        tasks = tasks[:limit]
        next_cursor = tasks[-1].id
    elif listing.scanned_to is not None:
        next_cursor = listing.scanned_to
    return json_response(TaskPage(tasks=[view(t) for t in tasks], next_cursor=next_cursor))


async def healthz(request: web.Request) -> web.StreamResponse:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    """Ready: recovered, bound, not stopping, and the store passed its last health check
    (the pulse's, every few seconds: a probe costs no store round trip)."""
    rt = request.app[RUNTIME]
    if rt.draining.is_set():
        return json_response({"status": "draining"}, status=503)
    if not rt.ready:
        return json_response({"status": "starting"}, status=503)
    if rt.store_trouble is not None:
        error = {"code": "store_unavailable", "message": f"the store fails: {rt.store_trouble}"}
        return json_response({"status": "store_unavailable", "error": error}, status=503)
    return json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.StreamResponse:
    """Always 200 with what this process knows: its own counters, and the gauges read from
    the store (unfinished tasks, table health) when the store answers within
    METRICS_STORE_WAIT. When it does not, those gauges are left out rather than shown
    stale (a gap in the series, not a flat line); the last vacuum's time stays, being a
    fact. The store is asked at most once per snapshot interval (SNAPSHOT_TTL)."""
    rt = request.app[RUNTIME]
    m = rt.metrics
    if m.stale():
        try:
            async with asyncio.timeout(METRICS_STORE_WAIT):
                unfinished = await rt.store.unfinished_by_queue()
                health = await rt.store.queue_health()
        except (OffloadError, TimeoutError):
            m.refresh({}, len(rt.workers.runs))
            m.store_tuples.clear()
        else:
            m.refresh(unfinished, len(rt.workers.runs))
            if health is not None:
                m.store_tuples.labels("live").set(health.live_tuples)
                m.store_tuples.labels("dead").set(health.dead_tuples)
                if health.last_vacuum is not None:
                    m.store_vacuumed.set(health.last_vacuum)
    else:
        m.running.set(len(rt.workers.runs))
    m.streams.set(rt.events.streams)
    return web.Response(body=m.render(), headers={"Content-Type": CONTENT_TYPE})
