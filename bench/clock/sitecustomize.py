"""Imported at start by a Python whose path holds this directory (`instructions.py
--slow-clock N` puts it there for the daemon): `time.time()` then advances N times slower
than the wall clock, from the moment of the start.

Under callgrind a request takes ~50 times as long as under load, so what the daemon keys on
the clock (task ids and timestamps share work within one millisecond) would miss far more
often than it does for its users; slowing the clock by as much restores the hits. Only
`time.time()` is slowed: timers and timeouts run on `time.monotonic()`.
"""

from __future__ import annotations

import os
import time

_RATE = float(os.environ.get("OFFLOAD_BENCH_SLOW_CLOCK", "1"))
if _RATE > 1:
    _wall = time.time
    _start = _wall()

    def _slowed() -> float:
        return _start + (_wall() - _start) / _RATE

    time.time = _slowed
