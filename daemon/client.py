"""An async Python client of offload's HTTP API (v1), on aiohttp.

`OffloadClient` owns two `aiohttp.ClientSession`s, for calls and for long-polls
(daemon/client_http.py): use it as an async context manager, or call `aclose()`. Answers
are decoded into the structs of daemon/client_types.py. Every answer that is not 2xx
raises `ClientError` with the server's `code`, `message` and `field` (and `retry_after` on
a 503); when the server cannot be reached at all (no such unix socket, say),
`Unreachable`, a `ClientError` with status 0 (both in daemon/client_errors.py, and
importable from here with the answer types as the client's whole surface). The `offload`
command's client commands (daemon/client_cli.py) are built on it.

    async with OffloadClient("http://127.0.0.1:8080", token=os.environ.get("OFFLOAD_TOKEN")) as c:
        task = await c.submit("resize", {"url": "s3://b/cat.png", "width": 640},
                              idempotency_key=order_id)
        async with asyncio.timeout(300):
            done = await c.wait(task.id)
        if done.state is TaskState.SUCCEEDED:
            use(done.result)
"""

from __future__ import annotations

import asyncio
import builtins
import datetime as dt
import math
import time
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import msgspec

from daemon.client_errors import ClientError, Unreachable, decode_answer
from daemon.client_http import Http
from daemon.client_types import (
    Attempt,
    BatchBody,
    Callback,
    Health,
    IdList,
    Queue,
    QueueCounts,
    QueueList,
    Schedule,
    ScheduleList,
    Stats,
    Submission,
    Submitted,
    SubmittedIds,
    Task,
    TaskPage,
    TaskState,
    parse_stats,
)
from daemon.ids import is_id

__all__ = [
    "DEFAULT_URL",
    "Attempt",
    "Callback",
    "ClientError",
    "Health",
    "OffloadClient",
    "Queue",
    "QueueCounts",
    "Schedule",
    "Stats",
    "Submission",
    "Submitted",
    "SubmittedIds",
    "Task",
    "TaskPage",
    "TaskState",
    "Unreachable",
]

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_WAIT_STEP = 25.0  # seconds per long-poll at most (the server's max_wait is 60 s)
DEFAULT_REQUEST_TIMEOUT = 30.0  # seconds for one request, on top of any long-poll wait
PAGE_SIZE = 1000  # the server's largest page
MIN_POLL = 0.5  # seconds between the polls of `wait()` at least (a server with max_wait 0)
# `wait()` outlives a daemon that restarts or drains: it asks again after this pause,
# doubling up to the second figure.
WAIT_RETRY = (0.25, 5.0)


# -- the client ------------------------------------------------------------------------


class OffloadClient:
    """A client of one offload daemon at `url` (`http://host:port`, optionally with a path
    prefix, or `unix:/path/to.sock` for a unix socket, spelled as in `server.listen`),
    sending `token` as a bearer token when given. A `url` of neither form is a `ValueError`.

    The session opens on `__aenter__` (or the first request) and closes on `__aexit__` /
    `aclose()`. `wait_step` is the length of each long-poll of `wait()`, at most the
    server's `server.max_wait`; by default the first `wait()` reads that limit from the
    server's /openapi.json (25 s if it cannot). `request_timeout` bounds each request, on
    top of its long-poll wait."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        wait_step: float | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        if token is not None and any(c in token for c in "\r\n\x00"):
            raise ValueError("the token holds a line break or NUL (read from a file with one?)")
        self.wait_step = wait_step
        self._wait_step_given = wait_step is not None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = Http(url, headers, request_timeout)  # ValueError: not a URL it takes
        self.url = self._http.url

    async def __aenter__(self) -> Self:
        self._http.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the sessions (idempotent)."""
        await self._http.aclose()

    # -- tasks -----------------------------------------------------------------------------

    async def submit(
        self,
        type: str,
        payload: Any = msgspec.UNSET,
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay: float | dt.timedelta | None = None,
        run_at: dt.datetime | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 -- the task's run timeout, not ours
        max_attempts: int | None = None,
        callback: str | None = None,
        idempotency_key: str | None = None,
    ) -> Submitted:
        """Submit a task of `type` (a `[types.NAME]` of the server's config) and return it as
        committed: `queued`, or already `running` when an idle consumer started it in the
        same commit. `payload` is any JSON-encodable value (or `msgspec.Raw` JSON); without
        it the server uses `{}`. `delay` (seconds) and `run_at` (an aware datetime) are
        exclusive. `callback` names a `[callbacks.NAME]` to be POSTed the task when it
        ends. With `idempotency_key`, a retry of the same submission answers the original
        task as it is now, `replayed` True, instead of creating another (the same key with
        another body: 422)."""
        if run_at is not None and run_at.tzinfo is None:
            raise ValueError("run_at needs a time zone (an aware datetime)")
        if isinstance(delay, dt.timedelta):
            delay = delay.total_seconds()
        _check_finite(payload, "payload")
        body = Submission(
            type=type,
            payload=payload,
            queue=_unset(queue),
            priority=_unset(priority),
            delay=_unset(delay),
            run_at=_unset(run_at),
            timeout=_unset(timeout),
            max_attempts=_unset(max_attempts),
            callback=_unset(callback),
        )
        task, replayed = await self._post_json("/v1/tasks", body, idempotency_key, Submitted)
        if replayed:
            return msgspec.structs.replace(task, replayed=True)
        return task

    async def submit_batch(
        self, tasks: Sequence[Submission], *, idempotency_key: str | None = None
    ) -> SubmittedIds:
        """Submit `tasks` (up to the server's `server.max_batch`) all-or-nothing in one
        transaction; returns their ids, in order, once committed (`replayed` True when
        `idempotency_key` repeats an earlier batch's: its ids, nothing created). A refusal
        names `tasks[i].field`."""
        sent = []
        for i, given in enumerate(tasks):
            _check_finite(given.payload, f"tasks[{i}].payload")
            task = given
            if isinstance(given.delay, dt.timedelta):  # as submit() takes it
                task = msgspec.structs.replace(given, delay=given.delay.total_seconds())
            sent.append(task)
        answer, replayed = await self._post_json(
            "/v1/tasks/batch", BatchBody(sent), idempotency_key, IdList
        )
        return SubmittedIds(answer.ids, replayed=replayed)

    async def _post_json(
        self, path: str, body: object, idempotency_key: str | None, answer: type[T]
    ) -> tuple[T, bool]:
        """The answer decoded as `answer`, and whether it replays an earlier request's."""
        headers = {"Content-Type": "application/json"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        data = msgspec.json.encode(body)
        reply = await self._http.exchange("POST", path, data=data, headers=headers)
        replayed = reply.headers.get("Idempotent-Replayed", "").strip().lower() == "true"
        return decode_answer(reply.body, answer, reply.status), replayed

    async def get(self, task_id: str, *, wait: float | None = None) -> Task:
        """The task now; with `wait`, the server holds the answer until the task ends or
        `wait` seconds pass (at most its `server.max_wait`)."""
        params = {} if wait is None else {"wait": f"{max(wait, 0.0):.3f}"}
        return await self._http.call(Task, "GET", _task_path(task_id), params=params, extra=wait)

    async def wait(self, task_id: str) -> Task:
        """Long-poll (`wait_step` seconds at a time) until the task ends, and return it.
        A daemon that cannot answer meanwhile (restarting, draining, down for a moment) is
        asked again after a pause that grows from 0.25 to 5 s. Bound the wait with
        `asyncio.timeout()`: the poll in flight is cancelled with it."""
        pause = WAIT_RETRY[0]
        while True:
            step = await self._wait_step()
            polled = time.monotonic()
            try:
                task = await self.get(task_id, wait=step)
            except ClientError as exc:
                if exc.status == 422 and exc.field == "wait" and not self._wait_step_given:
                    self.wait_step = None  # the server's limit changed: read it again
                    continue
                if exc.status not in (0, 502, 503, 504):
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, WAIT_RETRY[1])
                continue
            if task.ended:
                return task
            pause = WAIT_RETRY[0]
            # A server that holds no poll (max_wait 0) is not asked again at once.
            await asyncio.sleep(max(0.0, MIN_POLL - (time.monotonic() - polled)))

    async def _wait_step(self) -> float:
        """`wait_step`, or the server's longest `wait` (from its OpenAPI document, once it
        could be read)."""
        if self.wait_step is None:
            self.wait_step = DEFAULT_WAIT_STEP
            try:
                document = await self.openapi()
                operation = document["paths"]["/v1/tasks/{id}"]["get"]
                (wait,) = (p for p in operation["parameters"] if p["name"] == "wait")
                self.wait_step = min(float(wait["schema"]["maximum"]), DEFAULT_WAIT_STEP)
            except Unreachable:
                self.wait_step = None  # no answer yet: ask again next time
                return DEFAULT_WAIT_STEP
            except (ClientError, LookupError, TypeError, ValueError):
                pass  # a server without the document (or an older one): the default
        return self.wait_step

    async def cancel(self, task_id: str) -> Task:
        """Cancel a queued or running task (a running handler is stopped); returns it
        `cancelled`. A task that already ended: `ClientError` 409 `conflict`."""
        return await self._http.call(Task, "DELETE", _task_path(task_id))

    async def retry(self, task_id: str) -> Task:
        """Put a `failed` or `cancelled` task back to `queued` with a fresh budget of
        attempts. Any other state: `ClientError` 409 `conflict`."""
        return await self._http.call(Task, "POST", _task_path(task_id) + "/retry")

    async def list(
        self,
        *,
        state: TaskState | str | None = None,
        type: str | None = None,
        queue: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> TaskPage:
        """One page of tasks, newest first, filtered by `state`, `type` and `queue`;
        `limit` per page (server default 100, at most 1000)."""
        params = {
            key: str(value)
            for key, value in (
                ("state", state),
                ("type", type),
                ("queue", queue),
                ("limit", limit),
                ("cursor", cursor),
            )
            if value is not None
        }
        return await self._http.call(TaskPage, "GET", "/v1/tasks", params=params)

    async def iter_tasks(
        self,
        *,
        state: TaskState | str | None = None,
        type: str | None = None,
        queue: str | None = None,
        page_size: int = PAGE_SIZE,
    ) -> AsyncIterator[Task]:
        """Every task matching the filters, newest first, page after page (following
        `next_cursor` until it is None: a filtered page may be short, even empty)."""
        cursor: str | None = None
        while True:
            page = await self.list(
                state=state, type=type, queue=queue, limit=page_size, cursor=cursor
            )
            for task in page.tasks:
                yield task
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    # -- queues and schedules --------------------------------------------------------------

    async def queues(self) -> builtins.list[Queue]:
        """The configured queues, and any other with unfinished tasks or paused."""
        return (await self._http.call(QueueList, "GET", "/v1/queues")).queues

    async def pause_queue(self, name: str) -> Queue:
        """Keep accepting the queue's tasks but run none (kept across restarts)."""
        return await self._http.call(Queue, "POST", f"/v1/queues/{_segment(name)}/pause")

    async def resume_queue(self, name: str) -> Queue:
        return await self._http.call(Queue, "POST", f"/v1/queues/{_segment(name)}/resume")

    async def schedules(self) -> builtins.list[Schedule]:
        """The configured cron schedules, with their last and next fire."""
        return (await self._http.call(ScheduleList, "GET", "/v1/schedules")).schedules

    async def pause_schedule(self, name: str) -> Schedule:
        return await self._http.call(Schedule, "POST", f"/v1/schedules/{_segment(name)}/pause")

    async def resume_schedule(self, name: str) -> Schedule:
        return await self._http.call(Schedule, "POST", f"/v1/schedules/{_segment(name)}/resume")

    # -- operations ------------------------------------------------------------------------

    async def health(self) -> Health:
        """GET /healthz: the process answers."""
        return await self._http.call(Health, "GET", "/healthz")

    async def ready(self) -> Health:
        """GET /readyz: `ready`; while starting or draining, `ClientError` 503 with `code`
        `starting` or `draining`."""
        return await self._http.call(Health, "GET", "/readyz")

    async def metrics(self) -> str:
        """GET /metrics: the Prometheus text."""
        return (await self._http.exchange("GET", "/metrics")).body.decode()

    async def stats(self) -> Stats:
        """Counts by queue and by outcome, read from /metrics (see `Stats`)."""
        return parse_stats(await self.metrics())

    async def openapi(self) -> dict[str, Any]:
        """GET /openapi.json: the OpenAPI 3.1 document of this server."""
        document = await self._http.call(dict, "GET", "/openapi.json")
        return {str(k): v for k, v in document.items()}


def _task_path(task_id: str) -> str:
    """The task's path; what is not a task id is refused here as the server would (404),
    so that no text can make the path another one."""
    if not is_id(task_id):
        raise ClientError(404, "not_found", f"no task {task_id}", field="id")
    return f"/v1/tasks/{task_id}"


def _segment(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _check_finite(value: Any, where: str) -> None:
    """JSON has no NaN or infinity; msgspec would send them as null, silently."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} holds {value}, which JSON cannot carry")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")


def _unset(value: Any) -> Any:
    return msgspec.UNSET if value is None else value
