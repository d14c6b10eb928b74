"""Rows of the PostgreSQL task table as models, and the small helpers around them."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from daemon.errors import IdempotencyKeyReused
from daemon.models import (
    IdempotencyKey,
    NewTask,
    Task,
)
from daemon.store.postgres_schema import (
    PENDING_SLOTS,
)
from daemon.store.postgres_sql import (
    COLUMNS,
)

task_from_row = Task.from_columns  # a task from `row[at:]`, laid out as COLUMNS


def columns_of(tasks: Sequence[NewTask]) -> list[list[Any]]:
    """The arrays ADMIT_SQL unnests, one per column."""
    return [
        [t.id for t in tasks],
        [t.type for t in tasks],
        [t.queue for t in tasks],
        [t.payload for t in tasks],
        [t.priority for t in tasks],
        [t.run_at for t in tasks],
        [t.created_at for t in tasks],
        [t.timeout for t in tasks],
        [t.max_attempts for t in tasks],
    ]


def admit_args(tasks: Sequence[NewTask], max_pending: int) -> list[Any]:
    """The arguments of ADMIT_SQL."""
    return [
        *columns_of(tasks),
        len(tasks),
        max_pending,
        pending_slot(),
        [t.callback for t in tasks],
    ]


async def seen_key(conn: Any, idem: IdempotencyKey) -> list[Task] | None:
    """The tasks admitted under this key within its window, as they are now (those that
    retention deleted since are left out); raises `IdempotencyKeyReused` for another body."""
    row = await conn.fetchrow(
        "SELECT fingerprint, task_ids FROM offload_idempotency "
        "WHERE scope = $1 AND key = $2 AND created_at >= $3",
        idem.scope,
        idem.key,
        idem.not_before,
    )
    if row is None:
        return None
    if row[0] != idem.fingerprint:
        raise IdempotencyKeyReused(
            "this Idempotency-Key was used for a different request body",
            field="Idempotency-Key",
        )
    found = {
        r[0]: task_from_row(r)
        for r in await conn.fetch(
            f"SELECT {COLUMNS} FROM offload_tasks WHERE id = ANY($1::text[])", row[1]
        )
    }
    return [found[i] for i in row[1] if i in found]


def pending_slot() -> int:
    return random.randrange(PENDING_SLOTS)
