"""Admission: a validated submission becomes a committed task, or a clear refusal.

Order matters: refuse while draining, validate everything (nothing is written for bad
input), then commit; the store enforces `max_pending` in the same transaction as the insert.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import math

import msgspec

from daemon.errors import Invalid, QueueFull, Unavailable
from daemon.ids import new_id
from daemon.models import IdempotencyKey, NewTask, Task, TaskState
from daemon.runtime import Runtime
from daemon.wire import SubmitRequest, invalid


def draining_refusal(rt: Runtime) -> Unavailable:
    return Unavailable(
        "offload is shutting down and takes no new tasks",
        retry_after=max(1, math.ceil(rt.config.workers.grace_period)),
        code="draining",
    )


def build(rt: Runtime, req: SubmitRequest, now: float, task_id: str | None = None) -> NewTask:
    """Check a decoded request against the configured type and limits; the task gets
    `task_id` (from `new_ids`, for a batch) or a new id."""
    task_type = rt.types.get(req.type)
    if task_type is None:
        known = ", ".join(sorted(rt.types)) or "none"
        raise Invalid(f"unknown task type {req.type!r} (configured: {known})", field="type")
    try:
        task_type.check_payload(req.payload)
    except msgspec.ValidationError as exc:
        raise invalid(exc, prefix="payload") from None
    tc = task_type.config
    if req.delay is not None and req.run_at is not None:
        raise Invalid("give delay or run_at, not both", field="run_at")
    run_at = now
    if req.delay is not None:
        run_at = now + req.delay
    elif req.run_at is not None:
        if req.run_at.tzinfo is None:
            raise Invalid("run_at needs a time zone, e.g. 2026-01-01T12:00:00Z", field="run_at")
        run_at = min(max(now, req.run_at.timestamp()), MAX_RUN_AT)
    timeout = float(tc.timeout)
    if req.timeout is not None:
        if req.timeout > tc.timeout:
            raise Invalid(
                f"timeout {req.timeout:g}s is over the type's maximum ({tc.timeout:g}s)",
                field="timeout",
            )
        timeout = req.timeout
    if req.callback is not None and req.callback not in rt.config.callbacks:
        known = ", ".join(sorted(rt.config.callbacks)) or "none"
        raise Invalid(f"unknown callback {req.callback!r} (configured: {known})", field="callback")
    return NewTask(
        id=task_id or new_id(now),
        type=req.type,
        queue=req.queue or tc.queue,
        payload=bytes(req.payload),
        priority=req.priority,
        run_at=run_at,
        created_at=now,
        timeout=timeout,
        max_attempts=req.max_attempts or tc.max_attempts,
        callback=req.callback,
    )


MAX_KEY = 255
# The last instant RFC 3339 can write; later run_at values are clamped to it.
MAX_RUN_AT = dt.datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=dt.UTC).timestamp()


def idempotency(
    rt: Runtime, key: str | None, caller: str, body: bytes, now: float
) -> IdempotencyKey | None:
    """The Idempotency-Key of a request, scoped to its caller, or None without one."""
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_KEY or not key.isprintable():
        raise Invalid(
            f"Idempotency-Key must be 1 to {MAX_KEY} printable characters",
            field="Idempotency-Key",
        )
    return IdempotencyKey(
        scope=caller,
        key=key,
        fingerprint=hashlib.sha256(body).digest(),
        not_before=now - rt.config.server.idempotency_window,
    )


async def admit(
    rt: Runtime, tasks: list[NewTask], key: IdempotencyKey | None = None
) -> tuple[list[Task], bool]:
    """Commit `tasks` (or find what an earlier request with the same key committed: then the
    second value is True); on a full queue, say when to come back from the completion rate."""
    if rt.draining.is_set():
        raise draining_refusal(rt)
    # A lone task with a consumer idle starts with its own commit, not after another.
    start = rt.workers.start_now(tasks[0], tasks[0].created_at) if len(tasks) == 1 else None
    admitted: list[Task] = []
    try:
        admitted = await rt.store.admit(
            tasks, max_pending=rt.config.workers.max_pending, idempotency=key, start=start
        )
    except QueueFull as exc:
        exc.retry_after = rt.stats.retry_after(exc.needed)
        raise
    finally:
        if start is not None:
            rt.workers.started(tasks[0], admitted[0] if admitted else None)
    if key is not None and admitted and admitted[0].id != tasks[0].id:
        return admitted, True  # only a key finds what an earlier request committed
    rt.stats.accepted += len(admitted)
    if len(admitted) == 1:
        only = admitted[0]
        rt.metrics.accepted.add((only.type, only.queue))
        if start is None or only.state is not TaskState.RUNNING:
            rt.workers.feeder.due_at(only.run_at, only.queue)
        return admitted, False
    kinds: collections.Counter[tuple[str, str]] = collections.Counter()
    earliest: dict[str, float] = {}  # by queue: the feeder is told once per queue
    for task in admitted:
        kinds[(task.type, task.queue)] += 1
        earliest[task.queue] = min(task.run_at, earliest.get(task.queue, task.run_at))
    for kind, count in kinds.items():
        rt.metrics.accepted.add(kind, count)
    for queue, when in earliest.items():
        rt.workers.feeder.due_at(when, queue)
    return admitted, False
