"""A spawn the daemon cannot make for want of file descriptors or processes (EMFILE,
ENFILE, EAGAIN, ENOMEM, ENOBUFS: a connection flood, TasksMax) is not the task's fault: the
run waits and tries again, 50 ms then doubling to 1 s apart, for as long as the task's
timeout allows; only then does the attempt fail (`Shortage`, retryable)."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from daemon.executors.base import Job

T = TypeVar("T")

# Errors of a spawn that say the daemon, not the program, is short of something. -1: uvloop
# (0.23) reports a failed socketpair() with its return value rather than its errno, as
# "[Errno -1] Unknown error -1"; socketpair fails for want of descriptors or memory.
_SHORTAGE = frozenset({errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM, errno.ENOBUFS, -1})
_PAUSE = 0.05  # first wait before trying a spawn again; doubled up to _PAUSE_MAX
_PAUSE_MAX = 1.0  # asyncio's own accept loop waits 1 s on EMFILE
# Pipes a spawn holds at its peak (three socketpairs for stdio, uvloop's and libuv's error
# pipes: five), and one more. uvloop keeps for good the descriptors of a spawn that fails
# half way, so a spawn is tried only when they are all free.
_SPAWN_PIPES = 6


class Shortage(Exception):
    """The daemon stayed short of file descriptors or processes for the whole timeout of
    the run, so the program could not start: retryable."""


async def when_possible(job: Job, spawn: Callable[[], Awaitable[T]]) -> T:
    """`spawn()`; while it fails for want of descriptors or processes, wait and try again,
    until the task's deadline is near: then raise `Shortage`. No event tells when a
    descriptor is freed (connections closing, other runs ending), hence the waits; a cancel
    or a stop during one leaves nothing to clean up."""
    pause = _PAUSE
    waited = False
    while True:
        try:
            return await spawn()
        except OSError as exc:
            if exc.errno not in _SHORTAGE:
                raise
            reason = _describe(exc)
            if time.time() + pause >= job.deadline:
                raise Shortage(
                    f"the program could not start in the task's timeout: {reason}"
                ) from exc
            if not waited:
                waited = True
                job.logger.warning(
                    "the program cannot start yet, %s; trying again until the task's timeout",
                    reason,
                    extra={"event": "task.spawn_deferred"},
                )
        await asyncio.sleep(pause)
        pause = min(pause * 2, _PAUSE_MAX)


def check_descriptors() -> None:
    """Raise OSError (EMFILE, ENFILE) unless the descriptors a spawn needs are free: made
    and closed at once (~20 µs; a spawn takes milliseconds). Call it in the same step of the
    loop as the spawn, so that no connection accepted in between takes what it found free."""
    opened: list[int] = []
    try:
        for _ in range(_SPAWN_PIPES):
            opened.extend(os.pipe())
    finally:
        for fd in opened:
            os.close(fd)


def _describe(exc: OSError) -> str:
    code = exc.errno or 0
    if code == -1:  # uvloop's lost errno (see _SHORTAGE)
        return "the daemon is out of file descriptors (socketpair failed)"
    name = errno.errorcode.get(code, str(code))
    if code in (errno.EMFILE, errno.ENFILE):
        return f"the daemon is out of file descriptors ({name})"
    return f"the daemon cannot make another process ({name})"
