"""An async Python client of offload's HTTP API (v1), on aiohttp.

`OffloadClient` owns one `aiohttp.ClientSession`: use it as an async context manager, or
call `aclose()`. Answers are decoded into the structs of daemon/client_types.py. Every
answer that is not 2xx raises `ClientError` with the server's `code`, `message` and
`field` (and `retry_after` on a 503); when the server cannot be reached at all,
`Unreachable`, a `ClientError` with status 0 (both in daemon/client_errors.py, and
importable from here with the answer types as the client's whole surface). The `offload`
command's client commands (daemon/client_cli.py) are built on it.

    async with OffloadClient("http://127.0.0.1:8080", token=os.environ.get("OFFLOAD_TOKEN")) as c:
        task = await c.submit("resize", {"image": "cat.png"}, idempotency_key=order_id)
        async with asyncio.timeout(300):
            done = await c.wait(task.id)
        if done.state is TaskState.SUCCEEDED:
            use(done.result)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import aiohttp
import msgspec

from daemon.client_errors import ClientError, Unreachable, answer_error, decode_answer
from daemon.client_types import (
    Attempt,
    Callback,
    Health,
    QueueCounts,
    Stats,
    Submission,
    Task,
    TaskPage,
    TaskState,
    parse_stats,
)

__all__ = [
    "DEFAULT_URL",
    "Attempt",
    "Callback",
    "ClientError",
    "Health",
    "OffloadClient",
    "QueueCounts",
    "Stats",
    "Submission",
    "Task",
    "TaskPage",
    "TaskState",
    "Unreachable",
]

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_WAIT_STEP = 25.0  # seconds per long-poll at most (the server's max_wait is 60 s)
DEFAULT_REQUEST_TIMEOUT = 30.0  # seconds for one request, on top of any long-poll wait
PAGE_SIZE = 1000  # the server's largest page


# -- the client ------------------------------------------------------------------------


class OffloadClient:
    """A client of one offload daemon at `url` (`http://host:port`, optionally with a path
    prefix), sending `token` as a bearer token when given.

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
        self.url = url.rstrip("/")
        self.wait_step = wait_step
        self.request_timeout = request_timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session (idempotent)."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers)
        return self._session

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
    ) -> Task:
        """Submit a task of `type` (a `[types.NAME]` of the server's config) and return it as
        committed (`queued`). `payload` is any JSON-encodable value (or `msgspec.Raw` JSON);
        without it the server uses `{}`. `delay` (seconds) and `run_at` (an aware datetime)
        are exclusive. `callback` names a `[callbacks.NAME]` to be POSTed the task when it
        ends. With `idempotency_key`, a retry of the same submission answers the original
        task instead of creating another (the same key with another body: 422)."""
        if run_at is not None and run_at.tzinfo is None:
            raise ValueError("run_at needs a time zone (an aware datetime)")
        if isinstance(delay, dt.timedelta):
            delay = delay.total_seconds()
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
        raw = await self._post_json("/v1/tasks", body, idempotency_key)
        return decode_answer(raw, Task)

    async def submit_batch(
        self, tasks: Sequence[Submission], *, idempotency_key: str | None = None
    ) -> list[str]:
        """Submit `tasks` (up to the server's `server.max_batch`) all-or-nothing in one
        transaction; returns their ids, in order, once committed. A refusal names
        `tasks[i].field`."""
        raw = await self._post_json("/v1/tasks/batch", _Batch(list(tasks)), idempotency_key)
        return decode_answer(raw, _IdList).ids

    async def _post_json(self, path: str, body: object, idempotency_key: str | None) -> bytes:
        headers = {"Content-Type": "application/json"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        return await self._request("POST", path, data=msgspec.json.encode(body), headers=headers)

    async def get(self, task_id: str, *, wait: float | None = None) -> Task:
        """The task now; with `wait`, the server holds the answer until the task ends or
        `wait` seconds pass (at most its `server.max_wait`)."""
        params = {} if wait is None else {"wait": f"{max(wait, 0.0):.3f}"}
        raw = await self._request("GET", f"/v1/tasks/{task_id}", params=params, extra=wait)
        return decode_answer(raw, Task)

    async def wait(self, task_id: str) -> Task:
        """Long-poll (`wait_step` seconds at a time) until the task ends, and return it.
        Bound the wait with `asyncio.timeout()`: the poll in flight is cancelled with it."""
        step = await self._wait_step()
        while True:
            task = await self.get(task_id, wait=step)
            if task.ended:
                return task

    async def _wait_step(self) -> float:
        """`wait_step`, or the server's longest `wait` (from its OpenAPI document, once)."""
        if self.wait_step is None:
            self.wait_step = DEFAULT_WAIT_STEP
            try:
                document = await self.openapi()
                operation = document["paths"]["/v1/tasks/{id}"]["get"]
                (wait,) = (p for p in operation["parameters"] if p["name"] == "wait")
                self.wait_step = min(float(wait["schema"]["maximum"]), DEFAULT_WAIT_STEP)
            except (ClientError, LookupError, TypeError, ValueError):
                pass  # a server without the document (or an older one): the default
        return self.wait_step

    async def cancel(self, task_id: str) -> Task:
        """Cancel a queued or running task (a running handler is stopped); returns it
        `cancelled`. A task that already ended: `ClientError` 409 `conflict`."""
        return decode_answer(await self._request("DELETE", f"/v1/tasks/{task_id}"), Task)

    async def retry(self, task_id: str) -> Task:
        """Put a `failed` or `cancelled` task back to `queued` with a fresh budget of
        attempts. Any other state: `ClientError` 409 `conflict`."""
        return decode_answer(await self._request("POST", f"/v1/tasks/{task_id}/retry"), Task)

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
        return decode_answer(await self._request("GET", "/v1/tasks", params=params), TaskPage)

    async def iter_tasks(
        self,
        *,
        state: TaskState | str | None = None,
        type: str | None = None,
        queue: str | None = None,
        page_size: int = PAGE_SIZE,
    ) -> AsyncIterator[Task]:
        """Every task matching the filters, newest first, page after page."""
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

    # -- operations ------------------------------------------------------------------------

    async def health(self) -> Health:
        """GET /healthz: the process answers."""
        return decode_answer(await self._request("GET", "/healthz"), Health)

    async def ready(self) -> Health:
        """GET /readyz: `ready`; while starting or draining, `ClientError` 503 with `code`
        `starting` or `draining`."""
        return decode_answer(await self._request("GET", "/readyz"), Health)

    async def metrics(self) -> str:
        """GET /metrics: the Prometheus text."""
        return (await self._request("GET", "/metrics")).decode()

    async def stats(self) -> Stats:
        """Counts by queue and by outcome, read from /metrics (see `Stats`)."""
        return parse_stats(await self.metrics())

    async def openapi(self) -> dict[str, Any]:
        """GET /openapi.json: the OpenAPI 3.1 document of this server."""
        document = decode_answer(await self._request("GET", "/openapi.json"), dict)
        return {str(k): v for k, v in document.items()}

    # -- HTTP ------------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        extra: float | None = None,
    ) -> bytes:
        """The body of a 2xx answer; `ClientError` for any other, `Unreachable` for none.
        `extra` seconds (a long-poll) are added to the request's timeout."""
        timeout = aiohttp.ClientTimeout(total=self.request_timeout + (extra or 0.0))
        try:
            async with self._open().request(
                method, self.url + path, params=params, data=data, headers=headers, timeout=timeout
            ) as resp:
                body = await resp.read()
                if resp.status >= 300:
                    raise answer_error(resp.status, resp.reason, resp.headers, body)
                return body
        except aiohttp.ClientError as exc:
            raise Unreachable(f"cannot reach offload at {self.url}: {exc}") from exc
        except TimeoutError:
            raise Unreachable(f"no answer from offload at {self.url} in time") from None


class _Batch(msgspec.Struct):
    tasks: list[Submission]


class _IdList(msgspec.Struct):
    ids: list[str]


def _unset(value: Any) -> Any:
    return msgspec.UNSET if value is None else value
