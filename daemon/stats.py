"""Counters of what this process did, and recent completion rates: overall (behind
`Retry-After`) and per queue (in GET /v1/queues)."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

WINDOW = 30  # seconds of completions a rate is averaged over


class Rate:
    """Events per second over the last `WINDOW` seconds, in one-second buckets."""

    def __init__(self, started: float) -> None:
        self.started = started
        self._buckets: deque[list[int]] = deque()  # [second, events]

    def add(self, now: float) -> None:
        second = int(now)
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += 1
            return
        self._buckets.append([second, 1])
        while self._buckets[0][0] <= second - WINDOW:
            self._buckets.popleft()

    def idle(self, now: float) -> bool:
        """Nothing happened within the window."""
        return not self._buckets or self._buckets[-1][0] <= int(now) - WINDOW

    def per_second(self, now: float) -> float:
        second = int(now)
        recent = sum(n for s, n in self._buckets if s > second - WINDOW)
        span = min(WINDOW, max(1.0, second - self.started))
        return recent / span


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    accepted: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    cancelled: int = 0
    released: int = 0
    recovered: int = 0
    _queues: dict[str, Rate] = field(default_factory=dict)

    def completed(self, queue: str = "", now: float | None = None) -> None:
        """Count one run that ended, whatever its outcome: it freed a slot. Counted for its
        queue alone (one count a task, not two); the overall rate is their sum."""
        now = time.monotonic() if now is None else now
        rate = self._queues.get(queue)
        if rate is None:  # not setdefault(): that would make a Rate each time
            # A queue not seen lately: forget those idle for a window, so that clients
            # naming a queue per tenant or per job do not grow this for good.
            for name in [n for n, r in self._queues.items() if r.idle(now)]:
                del self._queues[name]
            rate = self._queues[queue] = Rate(self.started)
        rate.add(now)

    def queues_tracked(self) -> int:
        """How many queues a rate is kept for."""
        return len(self._queues)

    def completion_rate(self, now: float | None = None, *, queue: str = "") -> float:
        """Runs ended per second over the last `WINDOW` seconds (0.0 if none), overall or
        for one queue."""
        now = time.monotonic() if now is None else now
        if queue:
            rate = self._queues.get(queue)
            return 0.0 if rate is None else rate.per_second(now)
        return sum(rate.per_second(now) for rate in self._queues.values())

    def retry_after(self, needed: int, *, cap: int = 60, now: float | None = None) -> int:
        """Whole seconds until `needed` slots should have freed at the recent rate."""
        rate = self.completion_rate(now)
        if rate <= 0:
            return cap
        return max(1, min(cap, math.ceil(needed / rate)))
