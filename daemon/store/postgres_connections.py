"""The PostgreSQL store's pooled connections: an unreachable database becomes
`StoreUnavailable`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from daemon.errors import StoreUnavailable
from daemon.store.postgres_errors import describe, unavailable
from daemon.store.postgres_node import Node

ACQUIRE_TIMEOUT = 10.0  # seconds to wait for a pooled connection


class Connections:
    """What every part of the PostgreSQL store stands on."""

    _pool: Any
    _node: Node
    _description: str

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
