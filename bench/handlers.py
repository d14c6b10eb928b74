"""Task handlers the benchmarks configure (the daemon imports them from the repository root,
see `harness.daemon`)."""

from __future__ import annotations

import time
from typing import Any


async def stamp(payload: Any) -> dict[str, float]:
    """Return the Unix time at which the handler started: the latency benchmark's clock."""
    return {"started": time.time()}
