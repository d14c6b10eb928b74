"""The SQLite store's connections: one writer thread with group commit, two reader threads
(point reads, scans), the change sequence and the unfinished-task count (both kept in the
writer thread)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from daemon.errors import QueueFull, StoreUnavailable
from daemon.models import Task
from daemon.store.base import Hooks
from daemon.store.sqlite_admissions import Admissions, Waiting
from daemon.store.sqlite_insert import Insert
from daemon.store.sqlite_insert import run as insert_rows
from daemon.store.sqlite_reader import Reader
from daemon.store.sqlite_schema import migrate
from daemon.store.sqlite_unfinished import Unfinished
from daemon.store.sqlite_writer import Writer


class Connections:
    """What every part of the SQLite store stands on. Constructing it opens nothing."""

    def __init__(self, path: Path, synchronous: str) -> None:
        self._path = path
        self._synchronous = synchronous.upper()
        self._writer = Writer(self._connect, f"{path}-wal", full=self._synchronous == "FULL")
        self._writer.on_rollback = self._recount
        # Reads whose cost is bounded by an index (a task by id, callbacks due, pauses) and
        # reads that walk many rows (listings, the event replay, counts) each have their own
        # connection and thread: however many scans callers queue, a status read, a
        # long-poll or the feeder never waits for them.
        self._points = Reader(path, "sqlite-points", cache_kib=4096)
        self._scans = Reader(path, "sqlite-scans", cache_kib=8192)
        self._unfinished = Unfinished()  # changed only in the writer thread
        self._admissions = Admissions(
            lambda op: self._writer.submit(op, atomic=True),
            self._write_admissions,
            self._changed,
        )
        self._change = 0  # the change sequence; touched only in the writer thread
        # Writer thread: no deferred task comes due before this (0.0: unknown), so a claim
        # until then skips promoting them, a statement fewer (see SQLiteStore.claim).
        self._promote_at = 0.0
        self.hooks = Hooks()  # read at each call: the daemon fills some in after opening

    @property
    def description(self) -> str:
        return f"sqlite:{self._path} (synchronous={self._synchronous.lower()})"

    @property
    def shared(self) -> bool:
        return False  # one daemon per file (the lock)

    @property
    def writer(self) -> Writer:
        return self._writer

    # -- connections -------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA journal_size_limit = 67108864")
        conn.execute("PRAGMA cache_size = -16384")  # 16 MiB
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # Writer checkpoints after commits
        return conn

    async def _read(self, fn: Any, *args: Any) -> Any:
        """A read whose cost an index bounds, on the point reader."""
        return await self._points.run(fn, *args)

    async def _scan(self, fn: Any, *args: Any) -> Any:
        """A read that walks rows (bound it: see models.SCAN_ROWS), on the scan reader."""
        return await self._scans.run(fn, *args)

    async def _write(
        self, op: Any, *, atomic: bool = False, background: bool = False, lazy: bool = False
    ) -> Any:
        return await self._writer.submit(op, atomic=atomic, background=background, lazy=lazy)

    def _setup(self, conn: sqlite3.Connection) -> None:
        migrate(conn)
        self._recount(conn)
        self._change = conn.execute("SELECT coalesce(max(changed), 0) FROM tasks").fetchone()[0]
        conn.create_function("next_change", 0, self._next_change)

    def _changed(self, tasks: list[Task]) -> None:
        if tasks:
            self.hooks.on_change(tasks)

    def _recount(self, conn: sqlite3.Connection) -> None:
        self._unfinished.recount(conn)

    # -- writes ---------------------------------------------------------------------------

    def _insert(self, conn: sqlite3.Connection, *inserts: Insert) -> int:
        """Run `inserts` (writer thread); returns the first of their change numbers."""
        first = self._change + 1
        insert_rows(conn, inserts, first)
        for insert in inserts:
            self._promote_at = min(self._promote_at, insert.deferred_due)
            self._change += len(insert.tasks)
            for (queue, state), n in insert.kinds.items():
                self._unfinished.add(queue, state, n)
        return first

    def _write_admissions(
        self, conn: sqlite3.Connection, batch: list[Waiting]
    ) -> list[int | QueueFull]:
        """The writer's side of `Admissions`: each admission in order, refused if it does
        not fit under its max_pending, the others inserted together."""
        pending = self._unfinished.total
        fits: list[int | QueueFull] = []
        for waiting in batch:
            n = len(waiting.insert.tasks)
            if pending + n > waiting.max_pending:
                fits.append(QueueFull(
                    f"{pending} tasks are unfinished (max_pending is {waiting.max_pending})",
                    pending=pending, needed=pending + n - waiting.max_pending,
                ))  # fmt: skip
                continue
            fits.append(n)
            pending += n
        accepted = [w.insert for w, fit in zip(batch, fits, strict=True) if isinstance(fit, int)]
        if not accepted:
            return fits
        try:
            change = self._insert(conn, *accepted)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"the store could not admit: {exc}") from exc
        firsts: list[int | QueueFull] = []
        for fit in fits:
            firsts.append(fit if isinstance(fit, QueueFull) else change)
            change += fit if isinstance(fit, int) else 0
        return firsts

    def _next_change(self) -> int:
        """The next value of the change sequence (writer thread only; also the SQL function
        `next_change()`, so each row a statement changes gets its own)."""
        self._change += 1
        return self._change

    async def _close_readers(self) -> None:
        await asyncio.gather(self._points.close(), self._scans.close())
