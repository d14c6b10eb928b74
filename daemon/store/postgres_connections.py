"""The PostgreSQL store's pooled connections: an unreachable database becomes
`StoreUnavailable`. Reads that walk many rows take one connection at a time between them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from daemon.errors import StoreUnavailable
from daemon.store.postgres_errors import describe, unavailable
from daemon.store.postgres_node import Node

ACQUIRE_TIMEOUT = 10.0  # seconds to wait for a pooled connection
# Connections that reads walking many rows (listings, the event replay, counts) hold at once:
# however many of them callers send, the rest of the pool serves admissions, outcomes and
# point reads (a task by id, long-polls), as the SQLite store's own scan thread does.
SCANS = 1


class Connections:
    """What every part of the PostgreSQL store stands on."""

    _pool: Any
    _node: Node
    _description: str
    _scans: asyncio.Semaphore  # SCANS: scans waiting for it hold no connection

    @property
    def description(self) -> str:
        return self._description

    @property
    def shared(self) -> bool:
        return True

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[Any]:
        """A pooled connection; an unreachable database becomes `StoreUnavailable`."""
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                yield conn
        except Exception as exc:
            if unavailable(exc):
                raise StoreUnavailable(f"PostgreSQL cannot be reached: {describe(exc)}") from exc
            raise

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        async with self._conn() as conn:
            return list(await conn.fetch(sql, *args))

    async def _scan_fetch(self, sql: str, *args: Any) -> list[Any]:
        """`_fetch()` for a read that walks rows (bound it: see models.SCAN_ROWS)."""
        async with self._scans:
            return await self._fetch(sql, *args)
