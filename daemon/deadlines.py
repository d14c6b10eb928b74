"""Run timeouts with one timer for all the runs of a daemon.

A timer per run (`loop.call_later` when it starts, `cancel()` when it ends) cost each task
about 4 µs on the event loop: uvloop makes, arms, stops and closes a libuv handle for a
timeout that almost never fires. Here a run only notes its deadline; one timer waits for
the earliest deadline it knows of, and when it fires it stops the runs past theirs and
waits for the next. A run that ends first costs nothing more; the timer then fires for
nothing at most once per timeout's length, and looks at the running tasks (at most
`workers.concurrency` of them).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterable
from typing import Protocol


class Timed(Protocol):
    """A run as this module sees it: when it must end, and how it is stopped."""

    deadline: float  # on the loop's clock (`loop.time()`)

    def stop(self, reason: str) -> None: ...


class Deadlines:
    """Stops with reason "timeout", once, each of `runs()` (those running now) when the
    loop's clock passes its deadline; `watch()` each one as it starts."""

    def __init__(self, runs: Callable[[], Iterable[Timed]]) -> None:
        self._runs = runs
        self._at = math.inf  # when the timer fires (inf: no timer)
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, run: Timed, loop: asyncio.AbstractEventLoop) -> None:
        if run.deadline < self._at:
            self._arm(run.deadline, loop)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._at = None, math.inf

    def _arm(self, at: float, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._at = at
        self._timer = loop.call_at(at, self._fire, loop)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer, self._at = None, math.inf
        now = loop.time()
        late = []
        earliest = math.inf
        for run in self._runs():
            if run.deadline <= now:
                late.append(run)
            elif run.deadline < earliest:
                earliest = run.deadline
        if earliest < math.inf:
            self._arm(earliest, loop)
        # Stopped after the scan: a stop may end its run, and so change the runs. A run
        # stopped here has no deadline any more, so a later timer does not stop it again
        # while it unwinds.
        for run in late:
            run.deadline = math.inf
            run.stop("timeout")
