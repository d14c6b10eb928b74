"""Task ids: 26-character, time-ordered (ULID layout), so listing by id is listing by age.

Within one process ids are strictly increasing, also within one millisecond (the random part
is incremented, as monotonic ULIDs do), so their order is the order of admission.
"""

from __future__ import annotations

import os
import random
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: no I, L, O, U
_RANDOM_BITS = 80
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]  # every 10-bit value, encoded
# 130 bits (2 zero bits, then the 128) as 13 groups of 10 bits, two characters each; the
# first 11 groups change only when the last 2 (20 bits) wrap.
_SHIFTS = range(120, -10, -10)
_TAIL_BITS = 20


# Seeded from os.urandom once: the random part makes ids of different processes and
# milliseconds unlikely to meet, it is not a secret (ids within a millisecond count up, and
# reading a task needs a token, not its id). os.urandom per id, a system call, was a tenth
# of an admission's time on the event loop.
_random = random.Random(os.urandom(32))


class _Last:
    """The last id issued, as an integer (behind a lock: sync handlers run in threads)."""

    lock = threading.Lock()
    value = 0
    # The first 22 characters of the last single id, and what they encode: ids issued
    # within one millisecond share them, so under load most ids encode only their last 4.
    head: tuple[int, str] = (-1, "")


def new_id(now: float | None = None) -> str:
    value = _reserve(1, now)
    head_of, head = _Last.head  # one tuple: another thread may replace it meanwhile
    if value >> _TAIL_BITS != head_of:
        head_of = value >> _TAIL_BITS
        head = _head(value)
        _Last.head = (head_of, head)
    return head + _PAIRS[(value >> 10) & 1023] + _PAIRS[value & 1023]


def _head(value: int) -> str:
    """The first 22 characters of the id of `value`: all but its last 20 bits."""
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in _SHIFTS[:-2]])


def new_ids(count: int, now: float | None = None) -> list[str]:
    """`count` ids for one moment, in order (a batch)."""
    first = _reserve(count, now)
    ids = []
    head_of, head = -1, ""
    for value in range(first, first + count):
        if value >> _TAIL_BITS != head_of:
            head_of = value >> _TAIL_BITS
            head = _head(value)
        ids.append(head + _PAIRS[(value >> 10) & 1023] + _PAIRS[value & 1023])
    return ids


def _reserve(count: int, now: float | None) -> int:
    """The first of `count` consecutive id values: 48 bits of milliseconds then 80 random
    bits, drawn once a millisecond; the others follow it by one (monotonic ULID)."""
    millis = int((time.time() if now is None else now) * 1000)
    with _Last.lock:
        if millis <= _Last.value >> _RANDOM_BITS:
            first = _Last.value + 1  # same (or an earlier) millisecond: keep increasing
            _Last.value = first + count - 1
            return first
    # A new millisecond: draw its random part outside the lock.
    first = (millis << _RANDOM_BITS) | _random.getrandbits(_RANDOM_BITS)
    with _Last.lock:
        if millis <= _Last.value >> _RANDOM_BITS:
            first = _Last.value + 1  # another thread began this millisecond meanwhile
        _Last.value = first + count - 1
    return first


def is_id(text: str) -> bool:
    return len(text) == 26 and all(c in _ALPHABET for c in text)
