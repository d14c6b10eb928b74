"""Rows of the SQLite `tasks` table and the SQL fragments shared by the store's modules."""

from __future__ import annotations

from collections.abc import Collection

import msgspec

from daemon.models import Attempt, Task, decode_history

HISTORY_LIMIT = 10
COLUMNS = (
    "id, type, queue, state, payload, priority, run_at, created_at, timeout, max_attempts, "
    "attempts, attempt_floor, started_at, finished_at, result, last_error, history, changed, "
    "callback, callback_state, callback_attempts, callback_error"
)
FENCE = "id = ? AND state = 'running' AND attempts = ? AND owner = ?"
ENDED = "state IN ('succeeded', 'failed', 'cancelled')"
encode = msgspec.json.encode
task_from_row = Task.from_columns  # a row laid out as COLUMNS


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
    past = list(decode_history(history))
    past.append(entry)
    kept = tuple(past[-HISTORY_LIMIT:])
    return encode(kept), kept
