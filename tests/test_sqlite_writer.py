"""The SQLite writer thread on a real file: a batch whose transaction SQLite rolled back as a
whole (on a full disk or an I/O error, which an operation may meet and keep to itself) fails
as a whole, and nothing of it is committed; a bug in one batch fails its callers, and the
thread serves the next one."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from daemon.errors import StoreUnavailable
from daemon.store.sqlite_writer import Writer


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[Writer]:
    db = tmp_path / "w.db"

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode = WAL")
        return conn

    w = Writer(connect, f"{db}-wal", full=True)
    await w.start(lambda conn: conn.execute("CREATE TABLE t (name TEXT PRIMARY KEY)"))
    try:
        yield w
    finally:
        await w.stop()


@asynccontextmanager
async def one_batch(writer: Writer) -> AsyncIterator[None]:
    """What is submitted inside reaches the writer as one batch: the writer is held in an
    operation until the block ends (otherwise it may take the first item alone)."""
    busy, go = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        busy.set()
        go.wait(10)

    held = writer.submit(hold)
    assert await asyncio.to_thread(busy.wait, 10)
    try:
        yield
    finally:
        go.set()
        await held


def insert(name: str) -> Callable[[sqlite3.Connection], str]:
    def op(conn: sqlite3.Connection) -> str:
        conn.execute("INSERT INTO t VALUES (?)", (name,))
        return name

    return op


def rolled_back_and_kept_quiet(conn: sqlite3.Connection) -> None:
    """What SQLite does to the transaction on SQLITE_FULL, met by an operation that keeps
    the error to itself (as recording outcomes does, per outcome)."""
    conn.execute("ROLLBACK")


def names(writer: Writer) -> asyncio.Future[list[str]]:
    return writer.submit(lambda conn: [r[0] for r in conn.execute("SELECT name FROM t")])


async def test_a_batch_rolled_back_as_a_whole_fails_as_a_whole(writer: Writer) -> None:
    async with one_batch(writer):  # three background operations: one transaction
        futures: list[asyncio.Future[object]] = [
            writer.submit(insert("a"), atomic=True, background=True),
            writer.submit(rolled_back_and_kept_quiet, atomic=True, background=True),
            writer.submit(insert("b"), atomic=True, background=True),
        ]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results), results
    assert await names(writer) == []  # "b" did not commit on its own after the rollback


async def test_a_batch_that_fails_in_an_unforeseen_way_leaves_the_writer_serving(
    writer: Writer,
) -> None:
    def broken_hook(seconds: float, operations: int) -> None:
        raise RuntimeError("a bug in the commit hook")

    writer.on_commit = broken_hook
    first = writer.submit(insert("a"))
    assert await first == "a"  # its answer went out before the hook failed
    writer.on_commit = None
    assert await writer.submit(insert("b")) == "b"
    assert sorted(await names(writer)) == ["a", "b"]


def synchronous(conn: sqlite3.Connection) -> int:
    value: int = conn.execute("PRAGMA synchronous").fetchone()[0]
    return value


async def test_a_lazy_operation_commits_without_waiting_for_the_disk_before_the_others(
    writer: Writer,
) -> None:
    # A claim (lazy) and recorded outcomes (background) reach the writer together: the claim
    # commits first, in its own transaction, not synced (1: NORMAL); the outcomes are (2: FULL).
    order: list[str] = []

    def outcomes(conn: sqlite3.Connection) -> int:
        order.append("outcomes")
        return synchronous(conn)

    def claim(conn: sqlite3.Connection) -> int:
        order.append("claim")
        return synchronous(conn)

    async with one_batch(writer):
        both = asyncio.gather(
            writer.submit(outcomes, atomic=True, background=True),
            writer.submit(claim, atomic=True, lazy=True),
        )
    written, claimed = await both
    assert (order, claimed, written) == (["claim", "outcomes"], 1, 2)
    assert await writer.submit(synchronous) == 2  # and FULL again after it
