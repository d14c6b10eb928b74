"""When a failed attempt runs again: exponential backoff with jitter."""

from __future__ import annotations

import random

from daemon.config import BackoffConfig


def backoff_delay(policy: BackoffConfig, attempt: int, *, rand: float | None = None) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): `initial *
    multiplier**(attempt-1)`, capped at `max`, then spread by ±`jitter` (a fraction) and
    capped again. `rand` in [0, 1) replaces the random draw (for tests)."""
    base = min(policy.max, policy.initial * policy.multiplier ** (attempt - 1))
    draw = random.random() if rand is None else rand
    spread = base * policy.jitter * (2 * draw - 1)
    return max(0.0, min(policy.max, base + spread))
