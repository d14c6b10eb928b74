"""Counters of what this process did, and the recent completion rate behind `Retry-After`."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

WINDOW = 30  # seconds of completions the rate is averaged over


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
    _buckets: deque[list[int]] = field(default_factory=deque)  # [second, completions]

    def completed(self, now: float | None = None) -> None:
        """Count one run that ended, whatever its outcome: it freed a slot."""
        second = int(time.monotonic() if now is None else now)
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += 1
            return
        self._buckets.append([second, 1])
        while self._buckets[0][0] <= second - WINDOW:
            self._buckets.popleft()

    def completion_rate(self, now: float | None = None) -> float:
        """Runs ended per second over the last `WINDOW` seconds (0.0 if none)."""
        second = int(time.monotonic() if now is None else now)
        recent = sum(n for s, n in self._buckets if s > second - WINDOW)
        span = min(WINDOW, max(1.0, second - self.started))
        return recent / span

    def retry_after(self, needed: int, *, cap: int = 60, now: float | None = None) -> int:
        """Whole seconds until `needed` slots should have freed at the recent rate."""
        rate = self.completion_rate(now)
        if rate <= 0:
            return cap
        return max(1, min(cap, math.ceil(needed / rate)))
