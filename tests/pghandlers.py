"""Task handlers for the PostgreSQL cluster tests (tests/test_postgres_cluster.py).

Each appends one line, "<task id> <attempt> <pid>", to the file named in its payload as it
starts, with one `O_APPEND` write, so a test counts executions (and sees which daemon ran
them) outside the store, even across a `kill -9` or a `SIGSTOP`; `span` also marks when each
run starts and ends.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Annotated

import msgspec

from daemon.executors.base import JSON, Job
from tests.handlers import released


class Note(msgspec.Struct, forbid_unknown_fields=True):
    log: str


class Hold(msgspec.Struct, forbid_unknown_fields=True):
    log: str
    release: str
    seconds: Annotated[float, msgspec.Meta(ge=0, le=600)] = 120.0


class Pause(msgspec.Struct, forbid_unknown_fields=True):
    log: str
    seconds: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.1


def note(log: str, job: Job) -> None:
    """Append "<task id> <attempt> <pid>" to `log` in a single write."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{job.task_id} {job.attempt} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


async def record(payload: Note, job: Job) -> JSON:
    """Note the run and return at once."""
    note(payload.log, job)
    return None


async def hold(payload: Hold, job: Job) -> JSON:
    """Note the run, then wait until `release` exists or `seconds` pass."""
    note(payload.log, job)
    if await released(payload.release, payload.seconds):
        return {"pid": os.getpid()}
    return {"pid": os.getpid(), "released": False}


async def pause(payload: Pause, job: Job) -> JSON:
    """Note the run, then take `seconds`."""
    note(payload.log, job)
    await asyncio.sleep(payload.seconds)
    return None


def _mark(log: str, kind: str, job: Job) -> None:
    """Append "<kind> <task id> <attempt> <pid> <time.time()>" to `log`.spans."""
    fd = os.open(log + ".spans", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{kind} {job.task_id} {job.attempt} {os.getpid()} {time.time()!r}\n".encode())
    finally:
        os.close(fd)


async def span(payload: Hold, job: Job) -> JSON:
    """`hold`, also marking in `log`.spans when the run starts ("S") and when it ends ("E"),
    returned or stopped: a test sees whether two runs of one task overlapped."""
    _mark(payload.log, "S", job)
    try:
        return await hold(payload, job)
    finally:
        _mark(payload.log, "E", job)


def spans(log: str) -> list[tuple[str, str, int, float]]:
    """(kind, task id, attempt, time) of every mark in `log`.spans, in the order written."""
    try:
        with open(log + ".spans") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    found = []
    for line in lines:
        kind, task_id, attempt, _pid, at = line.split()
        found.append((kind, task_id, int(attempt), float(at)))
    return found


def runs(log: str) -> list[tuple[str, int, int]]:
    """(task id, attempt, pid) of every run noted in `log`."""
    try:
        with open(log) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    found = []
    for line in lines:
        task_id, attempt, pid = line.split()
        found.append((task_id, int(attempt), int(pid)))
    return found
