"""Rows of the SQLite `tasks` table and the SQL fragments shared by the store's modules."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import msgspec

from daemon.models import Attempt, Task, TaskState

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
    return Task(
        id=row[0],
        type=row[1],
        queue=row[2],
        state=TaskState(row[3]),
        payload=row[4],
        priority=row[5],
        run_at=row[6],
        created_at=row[7],
        timeout=row[8],
        max_attempts=row[9],
        attempts=row[10],
        attempt_floor=row[11],
        started_at=row[12],
        finished_at=row[13],
        result=row[14],
        last_error=row[15],
        history=history,
        changed=row[17],
        callback=row[18],
        callback_state=row[19],
        callback_attempts=row[20],
        callback_error=row[21],
    )


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
