"""When a failed attempt runs again: exponential backoff with jitter."""

from __future__ import annotations

import random

from daemon.config import BackoffConfig, Duration

# Claims and outcome writes that met a store error are tried again after this: 0.5 s,
# doubling to 32 s while they keep failing (README, "When the store cannot be written").
STORE_RETRY = BackoffConfig(initial=Duration(0.5), max=Duration(32), multiplier=2.0, jitter=0.0)


def backoff_delay(policy: BackoffConfig, attempt: int, *, rand: float | None = None) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): `initial *
    multiplier**(attempt-1)`, capped at `max`, then spread by ±`jitter` (a fraction) and
    capped again. `rand` in [0, 1) replaces the random draw (for tests)."""
    base = min(policy.max, policy.initial * policy.multiplier ** (attempt - 1))
    draw = random.random() if rand is None else rand
    spread = base * policy.jitter * (2 * draw - 1)
    return max(0.0, min(policy.max, base + spread))
