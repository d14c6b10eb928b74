"""Completion callbacks: when a task submitted with `"callback": "NAME"` ends, POST its final
representation to `[callbacks.NAME]`'s URL, signed like the http executor
(`X-Offload-Signature: t=…,v1=HMAC-SHA256(secret, "<t>." + body)`), retried with backoff
until a 2xx or `max_attempts`. The delivery state lives on the task, in the store, so a
restart resumes pending deliveries. Woken by ended tasks and by the next retry's time.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from daemon.backoff import backoff_delay
from daemon.errors import OffloadError
from daemon.executors.http import SIGNATURE_HEADER, HttpClient, read_secret, sign
from daemon.models import Task
from daemon.runtime import Runtime
from daemon.wire import encode, view

logger = logging.getLogger(__name__)

BATCH = 100


class Deliverer:
    def __init__(self, rt: Runtime, http: HttpClient) -> None:
        self.rt = rt
        self.http = http
        self.wake = asyncio.Event()

    def changed(self, tasks: list[Task]) -> None:
        """Store hook: a task with a callback ended (or was retried): look again."""
        for t in tasks:  # a loop, not any() over a generator: this sees every change
            if t.callback is not None and t.state.terminal:
                self.wake.set()
                return

    async def run(self) -> None:
        while True:
            self.wake.clear()
            try:
                due, later = await self.rt.store.due_callbacks(now=time.time(), limit=BATCH)
            except OffloadError as exc:
                logger.error("callbacks: %s", exc, extra={"event": "callback.store_error"})
                due, later = [], time.time() + 5
            await asyncio.gather(*(self.deliver(task) for task in due))
            if len(due) == BATCH:
                continue
            delay = None if later is None else max(0.0, later - time.time())
            try:
                async with asyncio.timeout(delay):
                    await self.wake.wait()
            except TimeoutError:
                pass

    async def deliver(self, task: Task) -> None:
        assert task.callback is not None
        target = self.rt.config.callbacks.get(task.callback)
        fields = {"event": "callback.attempt", "task_id": task.id, "task_type": task.type}
        if target is None:
            await self._record(task, "the callback is no longer configured", None)
            return
        body = encode(view(task))
        headers = {"Content-Type": "application/json", "X-Offload-Task-Id": task.id}
        error: str | None = None
        try:
            if target.secret_file is not None:
                # Read at each delivery, so that a rotated secret applies at once; a file
                # gone or emptied fails this attempt (retried), not the daemon.
                headers[SIGNATURE_HEADER] = sign(
                    read_secret(target.secret_file), body, int(time.time())
                )
            async with self.http.session().post(
                target.url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=target.timeout),
            ) as resp:
                if not 200 <= resp.status < 300:
                    error = f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        retry_at = None
        if error is not None and task.callback_attempts + 1 < target.max_attempts:
            retry_at = time.time() + backoff_delay(target.backoff, task.callback_attempts + 1)
        await self._record(task, error, retry_at)
        if error is None:
            logger.info("callback %s delivered", task.callback, extra=fields)
        else:
            logger.warning(
                "callback %s failed (%s)%s",
                task.callback,
                error,
                "; will retry" if retry_at is not None else "; giving up",
                extra=fields,
            )

    async def _record(self, task: Task, error: str | None, retry_at: float | None) -> None:
        try:
            await self.rt.store.callback_attempted(task.id, error=error, retry_at=retry_at)
        except OffloadError as exc:
            logger.error(
                "callback state of task %s not recorded: %s",
                task.id,
                exc,
                extra={"event": "callback.store_error", "task_id": task.id},
            )
