"""Which running tasks a starting PostgreSQL node takes back at once, and the liveness lock
each daemon holds on its listener session.

A node that starts rescues at once only the runs of its own name (the name's liveness lock,
which it takes first, proves the earlier holder gone) and expired leases. No session holding
another owner's lock proves nothing: a live daemon lacks it while its listener reconnects,
or while the server still keeps its old session. That daemon retakes the lock as soon as the
server lets it go.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest

from daemon.config import StoreConfig
from daemon.ids import new_id
from daemon.models import NewTask, TaskState
from daemon.store import open_store
from daemon.store.postgres_schema import LIVENESS_SPACE
from tests import pg, pghandlers
from tests.harness import Daemon, Offload
from tests.test_postgres_cluster import all_succeeded, hold_tasks, node_config, rows, until

WITHIN = 60.0  # seconds; the listener notices a silent session within 10 s


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A fresh database on the session's PostgreSQL, dropped after the test."""
    async with pg.open_database() as url:
        yield url


def new_task() -> NewTask:
    now = time.time()
    return NewTask(
        id=new_id(now), type="noop", queue="default", payload=b"{}", priority=0,
        run_at=now, created_at=now, timeout=60.0, max_attempts=3,
    )  # fmt: skip


async def test_recovery_takes_at_once_only_its_own_names_runs_and_expired_leases() -> None:
    async with (
        pg.open_database() as url,
        open_store(StoreConfig(url=url, pool_size=2)) as elsewhere,
        open_store(StoreConfig(url=url, pool_size=2)) as starting,
    ):
        tasks = [new_task() for _ in range(3)]
        await elsewhere.admit(tasks, max_pending=10)
        claims = {}
        # Claimed by owners that hold no liveness lock here: "live:1" stands for a live
        # daemon whose listener is reconnecting; "restarted:2" for an earlier process of
        # the starting daemon's name; "gone:3" for a dead daemon whose lease has expired.
        for owner in ("live:1", "restarted:2", "gone:3"):
            batch = await elsewhere.claim(owner=owner, limit=1, now=time.time(), lease=60.0)
            claims[owner] = batch.claims[0].task.id
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                "UPDATE offload_tasks SET lease_until = extract(epoch FROM now()) - 1 "
                "WHERE id = $1",
                claims["gone:3"],
            )
        finally:
            await conn.close()

        await starting.recover(owner="restarted:2", now=time.time())

        found = {owner: await starting.get(task_id) for owner, task_id in claims.items()}
        states = {owner: (t.state, t.attempts) for owner, t in found.items() if t is not None}
        assert states == {
            "live:1": (TaskState.RUNNING, 1),  # an unexpired lease of another name
            "restarted:2": (TaskState.QUEUED, 1),
            "gone:3": (TaskState.QUEUED, 1),
        }


@contextmanager
def frozen(pid: int) -> Iterator[None]:
    """SIGSTOP the server process `pid` until the block ends (SIGCONT, whatever happens)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def liveness_holder(url: str, owner: str) -> int | None:
    """The server pid of the session holding `owner`'s liveness lock, None if none does."""
    conn = await asyncpg.connect(url)
    try:
        pid: int | None = await conn.fetchval(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND classid = $1::oid AND objsubid = 2 "
            "AND objid::int8 = (hashtext($2)::int8 & 4294967295) "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            LIVENESS_SPACE,
            owner,
        )
        return pid
    finally:
        await conn.close()


async def logged(daemon: Daemon, text: str) -> bool | None:
    """Whether the daemon logged `text` (what is under test here is a log line)."""
    return True if text in daemon.log_path.read_text() else None


async def test_a_daemon_without_its_liveness_lock_keeps_its_tasks_and_takes_the_lock_back(
    pg_url: str, offload: Offload, tmp_path: Path
) -> None:
    log, release = tmp_path / "runs.log", tmp_path / "release"
    first = await offload.start(node_config(offload, pg_url, "first", {"lease": "60s"}))
    owner = f"{socket.gethostname()}:{first.pid}"
    ids = await hold_tasks(first, log, release, 10)
    session = await until(lambda: liveness_holder(pg_url, owner), WITHIN, "the lock is held")

    # The server process of its listener session stops answering: the listener gives up
    # on it and connects again, but the server still holds the lock for the old session.
    with frozen(session):
        await until(lambda: logged(first, "event=store.owner_"), WITHIN, "the lock missed")
        # An empty TimeoutError is named, not logged as "".
        assert await logged(first, "PostgreSQL unavailable (listener): TimeoutError; trying")

    # The old session ends once it runs again: the lock is taken back within a second.
    retaken = await until(
        lambda: _other_holder(pg_url, owner, session), WITHIN, "the lock taken back"
    )
    assert retaken != session
    assert await logged(first, "event=store.owner_lost")
    assert await logged(first, "event=store.owner_retaken")
    # A node that starts now finds the first one alive, and leaves its tasks alone.
    second = await offload.start(node_config(offload, pg_url, "second", {"lease": "60s"}))
    found = await rows(pg_url)  # its recovery is over: it is ready
    assert {(found[t]["state"], found[t]["owner"]) for t in ids} == {("running", owner)}

    release.touch()
    await until(lambda: all_succeeded(pg_url, len(ids)), WITHIN, "every task succeeded")
    ran = pghandlers.runs(str(log))
    assert sorted((t, a, p) for t, a, p in ran) == sorted((t, 1, first.pid) for t in ids)
    assert first.returncode is None and second.returncode is None


async def _other_holder(url: str, owner: str, old: int) -> int | None:
    pid = await liveness_holder(url, owner)
    return pid if pid is not None and pid != old else None
