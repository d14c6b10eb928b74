"""Handlers for the execution-policy tests (`tests.policyhandlers:NAME` in their config).
They run on the test's own loop (an in-process daemon), so they report through module state."""

from __future__ import annotations

import asyncio
import threading
import time

import msgspec

from daemon.executors.base import JSON, Job


class Gauge:
    """How many runs of a type are in flight now, and the most ever seen."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self.done = 0


GAUGES: dict[str, Gauge] = {}


class Work(msgspec.Struct, forbid_unknown_fields=True):
    gauge: str
    seconds: float = 0.02


async def measured(payload: Work) -> JSON:
    """Hold a slot for `seconds`, counting concurrent runs in the named gauge."""
    gauge = GAUGES.setdefault(payload.gauge, Gauge())
    gauge.now += 1
    gauge.peak = max(gauge.peak, gauge.now)
    try:
        await asyncio.sleep(payload.seconds)
    finally:
        gauge.now -= 1
        gauge.done += 1
    return None


SYNC_SEEN_CANCEL: dict[str, threading.Event] = {}
SYNC_STARTED: dict[str, threading.Event] = {}


def stubborn(payload: JSON, job: Job) -> JSON:
    """A sync handler that runs until it is told, through its context, to stop."""
    SYNC_STARTED.setdefault(job.task_id, threading.Event()).set()
    seen = SYNC_SEEN_CANCEL.setdefault(job.task_id, threading.Event())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if job.cancelled.wait(0.01):
            seen.set()
            return {"stopped": True}
    return {"stopped": False}


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise ValueError("no text for this one")


async def hostile(payload: str) -> JSON:
    """End in a way a careless handler might: each must fail its run, never the daemon."""
    if payload == "exit":
        raise SystemExit(3)  # a reused command-line main
    if payload == "unprintable":
        raise _Unprintable
    if payload == "retry-after-none":
        from daemon.executors.base import RetryAfter

        raise RetryAfter("come back later", None)  # type: ignore[arg-type]
    if payload == "retry-after-huge":
        from daemon.executors.base import RetryAfter

        raise RetryAfter("come back much later", 10**400)
    if payload == "cyclic":
        result: list[object] = []
        result.append(result)
        return result
    return None


DEAF_RELEASE = threading.Event()


def deaf(payload: JSON, job: Job) -> JSON:
    """A sync handler that ignores its cancellation, until the test lets it return."""
    SYNC_STARTED.setdefault(job.task_id, threading.Event()).set()
    DEAF_RELEASE.wait(60)
    return None
