"""A read-only connection to the SQLite file with the one thread that uses it. Its reads run
one at a time, in the order they came: the store keeps two, so that point reads never queue
behind scans (see sqlite_connections.py)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from daemon.errors import StoreUnavailable


class Reader:
    """Constructing it opens nothing: the thread opens the connection before its first read.
    `close()` waits for the reads queued before it, then closes the connection."""

    def __init__(self, path: Path, name: str, cache_kib: int) -> None:
        self._path = path
        self._cache_kib = cache_kib
        self._conn: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(1, name, initializer=self._open)

    def _open(self) -> None:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA query_only = 1")
        conn.execute(f"PRAGMA cache_size = -{self._cache_kib}")
        self._conn = conn

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(connection, *args)` in the reader's thread; an SQLite error becomes
        `StoreUnavailable`."""

        def call() -> Any:
            assert self._conn is not None  # opened by the thread's initializer
            return fn(self._conn, *args)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, call)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"the store could not be read: {exc}") from exc

    async def close(self) -> None:
        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._thread, close)
        self._thread.shutdown(wait=True)
