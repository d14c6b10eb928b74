"""The SQLite admission statements on a real file: rows in order over several statements of
padded sizes, exactly what was admitted (no padding row kept), all or nothing."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.ids import new_ids
from daemon.models import NewTask, StartNow
from daemon.store import sqlite_insert
from daemon.store.sqlite_insert import Insert, run, statement_rows
from daemon.store.sqlite_schema import migrate

NOW = 1_800_000_000.0


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(tmp_path / "tasks.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    migrate(conn)
    yield conn
    conn.close()


def tasks(count: int, *, callback: str | None = None) -> list[NewTask]:
    return [
        NewTask(
            id=task_id,
            type="noop",
            queue=f"q{n % 3}",
            payload=b'{"n": %d}' % n,
            priority=n % 5,
            run_at=NOW + (60 if n % 2 else 0),
            created_at=NOW,
            timeout=30.0,
            max_attempts=3,
            callback=callback,
        )
        for n, task_id in enumerate(new_ids(count, NOW))
    ]


ROW = (
    "SELECT id, queue, payload, priority, run_at, state, attempts, changed, callback, "
    "callback_state, deferred, started_at, owner, lease_until FROM tasks ORDER BY seq"
)


def expected(task: NewTask, changed: int) -> tuple[object, ...]:
    return (
        task.id, task.queue, task.payload, task.priority, task.run_at, "queued", 0, changed,
        task.callback, "pending" if task.callback else None, int(task.run_at > NOW),
        None, None, None,
    )  # fmt: skip


def test_statement_size_follows_the_sqlite_variable_limit(conn: sqlite3.Connection) -> None:
    conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)  # SQLite's limit before 3.32
    assert statement_rows(conn) == 64  # 999 // 13 values = 76 rows, as a power of two
    conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 32766)
    assert statement_rows(conn) == sqlite_insert.MAX_ROWS


def test_rows_over_several_padded_statements_are_inserted_once_each_in_order(
    conn: sqlite3.Connection,
) -> None:
    conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)  # 64 rows a statement
    inserts = [Insert(tasks(150)), Insert(tasks(1, callback="hook")), Insert(tasks(37))]
    admitted = [t for i in inserts for t in i.tasks]
    run(conn, inserts, first_change=11)
    rows = conn.execute(ROW).fetchall()
    assert rows == [expected(t, 11 + n) for n, t in enumerate(admitted)]


def test_a_task_started_at_admission_is_running_in_its_row(conn: sqlite3.Connection) -> None:
    first, *rest = tasks(3)
    start = StartNow(owner="node-a", lease=30.0)
    run(conn, [Insert([first, *rest], start, now=NOW + 1)], first_change=1)
    rows = conn.execute(ROW).fetchall()
    assert rows[0][5:8] == ("running", 1, 1)
    assert rows[0][-3:] == (NOW + 1, "node-a", NOW + 31)
    assert rows[1:] == [expected(t, 2 + n) for n, t in enumerate(rest)]


def test_a_failing_statement_leaves_none_of_the_rows(conn: sqlite3.Connection) -> None:
    conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
    batch = tasks(100)
    clash = batch[90].id
    run(conn, [Insert([batch[90]])], first_change=1)  # its id is taken
    with pytest.raises(sqlite3.IntegrityError):
        run(conn, [Insert(batch)], first_change=2)  # the clash is in the second statement
    assert conn.execute("SELECT id FROM tasks").fetchall() == [(clash,)]
    assert not conn.in_transaction
