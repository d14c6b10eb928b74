"""Task ids: 26-character, time-ordered (ULID layout), so listing by id is listing by age.

Within one process ids are strictly increasing, also within one millisecond (the random part
is incremented, as monotonic ULIDs do), so their order is the order of admission.
"""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: no I, L, O, U
_RANDOM_BITS = 80
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]  # every 10-bit value, encoded
_SHIFTS = range(120, -10, -10)


class _Last:
    """The last id issued, as an integer (behind a lock: sync handlers run in threads)."""

    lock = threading.Lock()
    value = 0


def new_id(now: float | None = None) -> str:
    """48 bits of milliseconds then 80 random bits, base32-encoded."""
    millis = int((time.time() if now is None else now) * 1000)
    value = (millis << _RANDOM_BITS) | int.from_bytes(os.urandom(10), "big")
    with _Last.lock:
        if value >> _RANDOM_BITS <= _Last.value >> _RANDOM_BITS:
            value = _Last.value + 1  # same (or an earlier) millisecond: keep increasing
        _Last.value = value
    # 130 bits (2 zero bits, then the 128) as 13 groups of 10 bits, two characters each.
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in _SHIFTS])


def is_id(text: str) -> bool:
    return len(text) == 26 and all(c in _ALPHABET for c in text)
