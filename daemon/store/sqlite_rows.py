"""Rows of the SQLite `tasks` table and the SQL fragments shared by the store's modules."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import msgspec

from daemon.models import Attempt, Task

HISTORY_LIMIT = 10
COLUMNS = (
    "id, type, queue, state, payload, priority, run_at, created_at, timeout, max_attempts, "
    "attempts, attempt_floor, started_at, finished_at, result, last_error, history, changed, "
    "callback, callback_state, callback_attempts, callback_error"
)
FENCE = "id = ? AND state = 'running' AND attempts = ? AND owner = ?"
ENDED = "state IN ('succeeded', 'failed', 'cancelled')"
_history_decoder = msgspec.json.Decoder(list[Attempt])
encode = msgspec.json.encode


def task_from_row(row: tuple[Any, ...]) -> Task:
    history = () if row[16] is None else tuple(_history_decoder.decode(row[16]))
    return Task.from_columns(row, history)


def type_filter(
    only: str | None, skip: Collection[str], *, column: str = "type"
) -> tuple[str, list[str]]:
    """An SQL condition (with its arguments) narrowing a query to some types (or queues)."""
    if only is not None:
        return f" AND {column} = ?", [only]
    if skip:
        return f" AND {column} NOT IN ({', '.join('?' * len(skip))})", list(skip)
    return "", []


def with_attempt(history: bytes | None, entry: Attempt) -> tuple[bytes, tuple[Attempt, ...]]:
    """The history with `entry` added (oldest dropped past the limit): encoded, and as values."""
    past = [] if history is None else _history_decoder.decode(history)
    past.append(entry)
    kept = tuple(past[-HISTORY_LIMIT:])
    return encode(kept), kept
