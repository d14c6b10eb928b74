"""Retention: ended tasks are deleted `retention` after they finished (per type; tasks of
types no longer configured keep the default of 7 days). Deletes go in small batches, each
its own short transaction, so admissions interleave and are never stalled."""

from __future__ import annotations

import asyncio
import logging
import time

from daemon.config import DEFAULT_RETENTION
from daemon.errors import OffloadError
from daemon.runtime import Runtime

logger = logging.getLogger(__name__)

EVERY = 60.0  # seconds between sweeps
BATCH = 500  # rows per delete transaction


async def sweep(rt: Runtime) -> int:
    """One pass over every type; returns how many tasks were deleted."""
    now = time.time()
    plans: list[tuple[float, str | None, tuple[str, ...]]] = [
        (now - float(t.config.retention), name, ()) for name, t in rt.types.items()
    ]
    plans.append((now - DEFAULT_RETENTION, None, tuple(rt.types)))
    deleted = 0
    window = rt.config.server.idempotency_window
    while await rt.store.forget_keys(before=now - window, limit=BATCH) == BATCH:
        pass
    for cutoff, only_type, skip in plans:
        while True:
            n = await rt.store.purge(
                finished_before=cutoff, limit=BATCH, only_type=only_type, skip_types=skip
            )
            deleted += n
            if n < BATCH:
                break
    return deleted


async def keep_pruning(rt: Runtime) -> None:
    """Sweep every `EVERY` seconds until cancelled."""
    while True:
        try:
            deleted = await sweep(rt)
        except OffloadError as exc:
            logger.warning("retention sweep failed: %s", exc, extra={"event": "retention.failed"})
        else:
            if deleted:
                logger.info(
                    "retention: deleted %d ended tasks",
                    deleted,
                    extra={"event": "retention.deleted"},
                )
        await asyncio.sleep(EVERY)
