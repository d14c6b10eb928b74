"""The `python` kind: call `package.module:function` with the payload and a context.

`async def` handlers run on the event loop; plain functions run in a bounded thread pool so
they never block it. A sync handler cannot be interrupted: on cancel or timeout its
`Job.cancelled` event is set and the task is recorded at once, but its thread stays busy
until the function returns. One that has not returned `STUCK_AFTER` seconds later is
logged (`task.thread_stuck`), with how many of the pool's threads such runs hold: once they
hold all of them, every sync task waits for a thread until its own timeout.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import msgspec

from daemon.executors.base import JSON, Executor, Job

logger = logging.getLogger(__name__)
STUCK_AFTER = 30.0  # seconds a cancelled sync handler may take to return before it is logged
_stuck: set[Future[Any]] = set()  # threads held by cancelled sync runs that have not returned


class HandlerError(Exception):
    """The handler named in the config cannot be used."""


def resolve_handler(spec: str) -> Callable[..., Any]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise HandlerError('expected "package.module:function"')
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HandlerError(f"cannot import module {module_name!r}: {exc}") from exc
    except (Exception, SystemExit) as exc:  # its code raised (SyntaxError, sys.exit())
        name = type(exc).__name__
        raise HandlerError(f"importing module {module_name!r} raised {name}: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise HandlerError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(target):
        raise HandlerError(f"{spec} is not callable")
    return target  # type: ignore[no-any-return]


def payload_type(handler: Callable[..., Any]) -> Any:
    """The annotation of the handler's first parameter, used to validate payloads at
    admission; `Any` when it has none."""
    try:
        params = list(inspect.signature(handler).parameters.values())
        hints = inspect.get_annotations(handler, eval_str=True)
    except (TypeError, ValueError, NameError):
        return Any
    if not params:
        return Any
    return hints.get(params[0].name, Any)


def python_executor(
    handler: Callable[..., Any], threads: ThreadPoolExecutor, payload_as: Any
) -> Executor:
    """Build the executor for one handler. `payload_as` is the type the payload is decoded to."""
    wants_job = len(inspect.signature(handler).parameters) >= 2

    def args(job: Job) -> tuple[Any, ...]:
        payload = job.payload
        if payload_as is not Any:
            payload = msgspec.convert(payload, payload_as)
        return (payload, job) if wants_job else (payload,)

    if inspect.iscoroutinefunction(handler):

        async def run_async(job: Job) -> JSON:
            return await handler(*args(job))

        return run_async

    async def run_sync(job: Job) -> JSON:
        loop = asyncio.get_running_loop()
        call_args = args(job)
        cancelled = job.cancelled  # made here, on the loop, before the thread can look
        thread = threads.submit(handler, *call_args)
        try:
            return await asyncio.wrap_future(thread)
        except asyncio.CancelledError:
            cancelled.set()
            loop.call_later(STUCK_AFTER, _check_returned, thread, job)
            raise

    return run_sync


def _check_returned(thread: Future[Any], job: Job) -> None:
    if thread.done():
        return
    _stuck.add(thread)
    thread.add_done_callback(_stuck.discard)
    logger.warning(
        "task %s: its sync handler has not returned %gs after it was cancelled; its thread "
        "stays busy, %d threads are held so (the next runs get threads of their own)",
        job.task_id,
        STUCK_AFTER,
        len(_stuck),
        extra={"event": "task.thread_stuck", "task_id": job.task_id, "task_type": job.type},
    )
