"""Task handlers for the end-to-end tests, named in the configs that `tests.harness` writes.

`record` and `hold` append one line, "<task id> <attempt>", to the file named in their
payload as they start, with one `O_APPEND` write, so a test counts executions outside the
store, even across a `kill -9`. `hold` then waits until its release file exists (or its
`seconds` pass); it waits with `asyncio.sleep`, so a cancel stops it at once.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Annotated

import msgspec

from daemon.executors.base import JSON, Job

RELEASE_POLL = 0.05  # seconds between looks at the release file


class Record(msgspec.Struct, forbid_unknown_fields=True):
    log: str


class Hold(msgspec.Struct, forbid_unknown_fields=True):
    log: str
    release: str
    seconds: Annotated[float, msgspec.Meta(ge=0, le=600)] = 60.0


def note(log: str, job: Job) -> None:
    """Append "<task id> <attempt>" to `log` in a single write (atomic with O_APPEND)."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{job.task_id} {job.attempt}\n".encode())
    finally:
        os.close(fd)


async def record(payload: Record, job: Job) -> JSON:
    """Note the run and return at once."""
    note(payload.log, job)
    return {"attempt": job.attempt}


async def released(path: str, seconds: float) -> bool:
    """Whether the file `path` appeared within `seconds`. The test process creates it: there
    is no event to wait on, so look again every RELEASE_POLL seconds (a stat of a local
    file; it does not hold the loop)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if os.path.exists(path):  # noqa: ASYNC240
            return True
        await asyncio.sleep(RELEASE_POLL)
    return False


async def hold(payload: Hold, job: Job) -> JSON:
    """Note the run, then wait until `release` exists or `seconds` pass."""
    note(payload.log, job)
    return {"attempt": job.attempt, "released": await released(payload.release, payload.seconds)}


async def noop(payload: JSON) -> JSON:
    """Do nothing."""
    return None


def deaf(payload: Hold, job: Job) -> JSON:
    """A sync handler that ignores its cancel: note the run, then block its thread until the
    release file exists or `seconds` pass, whatever `job.cancelled` says."""
    note(payload.log, job)
    deadline = time.monotonic() + payload.seconds
    while time.monotonic() < deadline and not os.path.exists(payload.release):
        time.sleep(RELEASE_POLL)
    return None
