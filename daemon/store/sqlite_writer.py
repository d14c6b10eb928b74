"""One SQLite connection in a dedicated thread that commits many operations per transaction.

Callers on the event loop submit functions of the connection and await a future. The thread
takes whatever is waiting (up to `MAX_BATCH`), runs each in its own savepoint inside one
`BEGIN IMMEDIATE` transaction, commits once, and only then settles the futures: so a future
resolves only after its writes are durable, and an operation that raises undoes only itself.
An operation submitted as `atomic` needs no savepoint: each of its writing statements may
stand alone (SQLite undoes a failed one by itself), or it opens its own savepoint around
those that must go together. It skips the savepoint (two statements fewer per task) and,
alone in a batch, runs in SQLite's autocommit, without BEGIN and COMMIT either. If the
commit fails every operation of the batch fails with `StoreUnavailable`.

An operation submitted as `background` (a claim, recorded outcomes: no HTTP answer waits
for it) commits after the others of its batch, in a transaction of its own, so that those
others are answered first. Each statement costs the writer a wait for the GIL while the
event loop is busy, and a claim and a record bring five to seven of them: in one
transaction with an admission they held every submission of that commit back.

A `lazy` operation (a claim) commits before the other background ones, in a transaction of
its own that does not wait for the disk even with synchronous = FULL: the claimed tasks
start while the outcomes of the runs before them are written and synced (in a drain the
event loop would otherwise idle through that sync for every claim). The next synced commit
syncs the claim with it (the WAL is one file, synced in order); until then only a power cut
can undo it, and then the task is queued again with the attempts it had, as if that claim
had not been made. A crash of the process loses nothing SQLite wrote.

SQLite's operational errors (a file locked too long, a full disk, an I/O error) reach callers
as `StoreUnavailable`, which every caller knows how to wait out; its other errors are bugs,
and reach them as raised. If
SQLite rolled the whole transaction back on an operation's error (it does for SQLITE_FULL
and I/O errors), what the batch did before is gone too, and every operation of it fails.
Nothing ends the thread but `stop()`: a batch that fails in an unforeseen way fails its
callers, and the next batch is served.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from daemon.errors import StoreUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]
MAX_BATCH = 1024
# Under constant reads the WAL may never reset by itself; past this size we force it.
WAL_LIMIT = 64 * 1024 * 1024
WAL_CHECK_EVERY = 256  # commits
# SQLite's automatic checkpoint runs inside the commit that crosses its threshold, so the
# tasks waiting on that commit wait for the copy (and, with synchronous = FULL, an fsync of
# the database file) too. The writer turns it off and checkpoints between batches instead,
# after the commit's callers have their answers; nothing is written meanwhile, so the
# checkpoint completes and the next transaction starts the WAL over.
CHECKPOINT_EVERY = 32  # commits (~1,000 pages, SQLite's own default)


class _Item:
    __slots__ = ("atomic", "background", "future", "lazy", "op")

    def __init__(
        self, op: Op, future: asyncio.Future[Any], atomic: bool, background: bool, lazy: bool
    ) -> None:
        self.op = op
        self.future = future
        self.atomic = atomic
        self.background = background
        self.lazy = lazy


class Writer:
    """Owns the write connection. `start()` connects (in the thread) and runs `setup`;
    `submit()` queues an operation; `stop()` finishes what was queued and closes."""

    def __init__(
        self, connect: Callable[[], sqlite3.Connection], wal_path: str, *, full: bool = False
    ) -> None:
        self._connect = connect
        self._wal_path = wal_path
        self._full = full  # the connection syncs each commit (synchronous = FULL)
        self._items: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_rollback: Callable[[sqlite3.Connection], None] | None = None
        # Called in the writer thread after each commit with (seconds, operations).
        self.on_commit: Callable[[float, int], None] | None = None
        self.last_commit = time.monotonic()
        self.commits = 0
        self._wal_over = False  # the WAL was over WAL_LIMIT and could not be emptied yet

    async def start(self, setup: Callable[[sqlite3.Connection], T]) -> T:
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[Any] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(setup, ready), name="sqlite-writer", daemon=True
        )
        self._thread.start()
        return await ready  # type: ignore[no-any-return]

    def submit(
        self,
        op: Callable[[sqlite3.Connection], T],
        *,
        atomic: bool = False,
        background: bool = False,
        lazy: bool = False,
    ) -> asyncio.Future[T]:
        """Queue `op`; `atomic` only for an operation whose writing statements may each
        commit alone, `background` for one no caller waits on to answer a request, `lazy`
        (background too) for one whose commit need not reach the disk before its caller
        goes on (see the module's docstring)."""
        assert self._loop is not None, "Writer.start() first"
        future: asyncio.Future[T] = self._loop.create_future()
        self._items.put(_Item(op, future, atomic, background or lazy, lazy))
        return future

    async def stop(self) -> None:
        if self._thread is None:
            return
        self._items.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    def _run(self, setup: Callable[[sqlite3.Connection], Any], ready: asyncio.Future[Any]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            conn = self._connect()
            value = setup(conn)
        except BaseException as exc:  # reported to start(); the thread ends here
            loop.call_soon_threadsafe(_settle_one, ready, False, exc)
            return
        loop.call_soon_threadsafe(_settle_one, ready, True, value)
        try:
            self._serve(conn, loop)
        finally:
            conn.close()

    def _serve(self, conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> None:
        stopping = False
        while not stopping:
            first = self._items.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    item = self._items.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            answered = [item for item in batch if not item.background]
            if answered and len(answered) < len(batch):
                self._guarded(conn, loop, answered)
                batch = [item for item in batch if item.background]
            lazy = [item for item in batch if item.lazy]
            if lazy and len(lazy) < len(batch) and not answered:
                self._guarded(conn, loop, lazy)
                batch = [item for item in batch if not item.lazy]
            self._guarded(conn, loop, batch)

    def _guarded(
        self, conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop, batch: list[_Item]
    ) -> None:
        try:
            self._commit(conn, loop, batch)
        except Exception as exc:  # the thread serves on; these callers learn of it
            logger.exception("sqlite writer: a batch failed", extra={"event": "store.bug"})
            if conn.in_transaction:  # never leave the next batch inside this one
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    logger.exception("sqlite rollback failed", extra={"event": "store.bug"})
            error = StoreUnavailable(f"the store could not write: {exc}")
            # A future settled already (results went out before the failure) stays as it is.
            loop.call_soon_threadsafe(_settle, batch, [(False, error)] * len(batch))

    def _commit(
        self, conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop, batch: list[_Item]
    ) -> None:
        began = time.perf_counter()
        if self._full and all(item.lazy for item in batch):
            conn.execute("PRAGMA synchronous = NORMAL")
            try:
                results = self._apply(conn, batch)
            finally:
                conn.execute("PRAGMA synchronous = FULL")
        else:
            results = self._apply(conn, batch)
        loop.call_soon_threadsafe(_settle, batch, results)
        self.commits += 1
        self.last_commit = time.monotonic()
        try:
            if self.on_commit is not None:
                self.on_commit(time.perf_counter() - began, len(batch))
        finally:  # the WAL's upkeep, whatever the hook did
            if self.commits % CHECKPOINT_EVERY == 0:
                self._checkpoint(conn)
            if self._wal_over or self.commits % WAL_CHECK_EVERY == 0:
                self._bound_wal(conn)

    def _apply(self, conn: sqlite3.Connection, batch: list[_Item]) -> list[tuple[bool, Any]]:
        if len(batch) == 1 and batch[0].atomic:
            # Its statements commit by themselves. Each statement the writer runs gives the GIL
            # up and waits to take it back, with a busy event loop for up to the switch
            # interval (5 ms): BEGIN and COMMIT around one statement tripled that wait.
            try:
                return [(True, batch[0].op(conn))]
            except Exception as exc:  # the operation's own error, for its caller
                return [(False, _for_caller(exc))]
        results: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for item in batch:
                if item.atomic:
                    try:
                        results.append((True, item.op(conn)))
                    except Exception as exc:  # the operation's own error, for its caller
                        results.append((False, _for_caller(exc)))
                    # Even after a success: an operation may have met (and kept to itself)
                    # an error on which SQLite rolled the whole transaction back.
                    _still_open(conn, results[-1][1] if not results[-1][0] else "an error")
                    continue
                conn.execute("SAVEPOINT op")
                try:
                    results.append((True, item.op(conn)))
                except Exception as exc:  # the operation's own error, handed to its caller
                    _still_open(conn, exc)
                    conn.execute("ROLLBACK TO op")
                    results.append((False, _for_caller(exc)))
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            logger.error(
                "sqlite transaction failed: %s", exc, extra={"event": "store.commit_failed"}
            )
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if self.on_rollback is not None:
                    self.on_rollback(conn)
            except sqlite3.Error as again:  # the next batch begins afresh, or fails alike
                logger.error(
                    "sqlite rollback failed: %s", again, extra={"event": "store.commit_failed"}
                )
            error = StoreUnavailable(f"the store could not commit: {exc}")
            return [(False, error)] * len(batch)
        return results

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:  # the next one tries again; commits are unaffected
            logger.warning("wal checkpoint failed: %s", exc, extra={"event": "store.checkpoint"})

    def _bound_wal(self, conn: sqlite3.Connection) -> None:
        try:
            size = os.stat(self._wal_path).st_size
        except OSError:
            return
        self._wal_over = size > WAL_LIMIT
        if self._wal_over:
            # TRUNCATE waits (busy_timeout) for readers to finish, then empties the WAL. It
            # gives up at once while the checkpoint thread is at work: then try again after
            # the next commit, not WAL_CHECK_EVERY commits later.
            try:
                busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            except sqlite3.Error as exc:  # the next commit tries again
                logger.warning(
                    "wal truncation failed: %s", exc, extra={"event": "store.checkpoint"}
                )
                return
            self._wal_over = bool(busy)


def _for_caller(exc: Exception) -> Exception:
    """What an operation's caller gets for `exc`: SQLite's operational errors (a lock held
    too long, a full disk, an I/O error) as `StoreUnavailable`; others are bugs, as raised."""
    if isinstance(exc, sqlite3.OperationalError):
        error = StoreUnavailable(f"the store could not write: {exc}")
        error.__cause__ = exc
        return error
    return exc


def _still_open(conn: sqlite3.Connection, cause: object) -> None:
    """Raise if SQLite rolled the whole transaction back (on a full disk, an I/O error):
    the batch's earlier work is gone, so it must fail as a whole."""
    if not conn.in_transaction:
        raise sqlite3.OperationalError(f"the transaction was rolled back: {cause}")


def _settle_one(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


def _settle(batch: list[_Item], results: list[tuple[bool, Any]]) -> None:
    for item, (ok, value) in zip(batch, results, strict=True):
        _settle_one(item.future, ok, value)
