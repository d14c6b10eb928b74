"""Claims on PostgreSQL are durable, and a node never runs two claims of one task at once.

A claim's handler starts as soon as the claim commits, so the claim must survive a crash of
PostgreSQL: one undone by the crash puts the task back to `queued` under its old attempt
count while the handler runs on, and it is claimed and run again (the same attempt, on this
node or another). The test server's default is `synchronous_commit = off` (tests/pg.py), as
an operator's may be: the store's own transactions must not depend on it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from daemon.config import StoreConfig
from daemon.errors import StoreUnavailable
from daemon.models import Claim, Failed, Outcome, Released, Retry, Succeeded
from daemon.store import open_store
from tests import pg, pghandlers
from tests.harness import Offload
from tests.test_postgres_cluster import all_succeeded, node_config, noop_task, rows, until

WITHIN = 60.0  # seconds for what a loaded 2-CPU machine does in well under one


async def test_claims_and_admissions_survive_a_crash_of_postgresql(
    offload: Offload, tmp_path: Path
) -> None:
    # The WAL writer flushes an asynchronous commit only every 10 s: a commit that leaves
    # its flush to it is lost by the crash below, whenever it happens.
    server = pg.start_server({"wal_writer_delay": "10s"})
    try:
        url = await pg.new_database(server)
        await _crash(server, url, offload, tmp_path)
    finally:
        await offload.kill_all()
        server.destroy()


async def _crash(server: pg.PostgresServer, url: str, offload: Offload, tmp_path: Path) -> None:
    log, release = tmp_path / "runs.log", tmp_path / "release"
    nodes = [
        await offload.start(node_config(offload, url, f"n{i}", {"lease": "60s"})) for i in range(2)
    ]
    body = {"log": str(log), "release": str(release)}
    ids = [t.id for node in nodes for t in await node.submit_many("hold", [body] * 10)]
    await until(lambda: _ran(log, len(ids)), WITHIN, "every task started")

    await asyncio.to_thread(server.halt, "immediate")  # a crash: no checkpoint, no flush
    await asyncio.to_thread(server.resume)
    found = await rows(url)
    assert {found[t]["state"] if t in found else "lost" for t in ids} == {"running"}
    assert {found[t]["attempts"] for t in ids} == {1}

    release.touch()
    await until(lambda: all_succeeded(url, len(ids)), WITHIN, "every task succeeded")
    ran = pghandlers.runs(str(log))
    assert sorted((t, a) for t, a, _ in ran) == sorted((t, 1) for t in ids)
    assert {(r["state"], r["attempts"]) for r in (await rows(url)).values()} == {("succeeded", 1)}


async def test_every_write_that_answers_someone_survives_a_crash_of_postgresql() -> None:
    """Admissions, claims, each kind of outcome, a put-back, a retry and cancels: each is
    committed, then PostgreSQL crashes at once, with its WAL writer too slow to have
    flushed anything the commit left to it."""
    server = pg.start_server({"wal_writer_delay": "10s"})
    try:
        url = await pg.new_database(server)
        async with open_store(StoreConfig(url=url, pool_size=2)) as store:

            async def crash_after(write: Callable[[], Awaitable[object]]) -> dict[str, Any]:
                """`write()` (tried again while the pool finds its connections dead after
                the previous crash), then a crash; the rows as they are after it."""
                async with asyncio.timeout(WITHIN):
                    while True:
                        try:
                            await write()
                            break
                        except StoreUnavailable:
                            await asyncio.sleep(0.1)  # the pool reconnects
                await asyncio.to_thread(server.halt, "immediate")
                await asyncio.to_thread(server.resume)
                found = await rows(url)
                return {t: (found[t]["state"], found[t]["attempts"]) for t in found}

            tasks = [noop_task(b"{}") for _ in range(6)]
            ids = [t.id for t in tasks]
            now = time.time()
            found = await crash_after(lambda: store.admit(tasks[:5], max_pending=100))
            assert [found.get(t) for t in ids[:5]] == [("queued", 0)] * 5
            claims: dict[str, Claim] = {}

            async def claim() -> None:
                batch = await store.claim(owner="crash:1", limit=5, now=now, lease=60.0)
                claims.update((c.task.id, c) for c in batch.claims)

            found = await crash_after(claim)
            assert [found[t] for t in ids[:5]] == [("running", 1)] * 5
            outcomes: list[tuple[Outcome, tuple[str, int]]] = [
                (Succeeded(result=b"1", finished_at=now), ("succeeded", 1)),
                (Failed(error="no", finished_at=now, duration=0.1), ("failed", 1)),
                (Retry(error="again", run_at=now + 3600, duration=0.1), ("queued", 1)),
                (Released(), ("queued", 0)),  # its attempt not spent
            ]
            for task_id, (outcome, after) in zip(ids, outcomes, strict=False):
                found = await crash_after(partial(store.record, claims[task_id], outcome))
                assert found[task_id] == after, outcome
            found = await crash_after(lambda: store.retry(ids[1], now=now, max_pending=100))
            assert found[ids[1]] == ("queued", 1)
            found = await crash_after(lambda: store.cancel(ids[4], now=now))  # running
            assert found[ids[4]] == ("cancelled", 1)
            found = await crash_after(lambda: store.admit(tasks[5:], max_pending=100))
            assert found.get(ids[5]) == ("queued", 0)
            found = await crash_after(lambda: store.cancel(ids[5], now=now))  # queued
            assert found[ids[5]] == ("cancelled", 0)
    finally:
        server.destroy()


async def test_a_task_claimed_again_while_its_run_goes_on_is_stopped_before_it_runs_again(
    offload: Offload, tmp_path: Path
) -> None:
    log, release = tmp_path / "runs.log", tmp_path / "release"
    async with pg.open_database() as url:
        node = await offload.start(
            node_config(offload, url, "n", {"concurrency": 4, "lease": "60s"})
        )
        body = {"log": str(log), "release": str(release)}
        task_id = (await node.submit("span", body)).id
        await until(lambda: _marks(log, 1), WITHIN, "the run started")

        # What a crash that undid the claim's commit leaves behind (as does a rescue of a
        # lease this node let lapse, before its heartbeat notices): the row queued again,
        # its attempt not counted, while the run goes on. Then the node is woken to claim.
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                "UPDATE offload_tasks SET state = 'queued', attempts = attempts - 1, "
                "owner = NULL, lease_until = NULL, started_at = NULL WHERE id = $1",
                task_id,
            )
            await conn.execute("SELECT pg_notify('offload_work', 'test|')")
        finally:
            await conn.close()
        marks = await until(lambda: _marks(log, 3), WITHIN, "the task started again")

        # The first run was stopped before the second started: never both at once.
        assert [(kind, attempt) for kind, _, attempt, _ in marks] == [("S", 1), ("E", 1), ("S", 1)]
        assert marks[1][3] <= marks[2][3]
        release.touch()
        done = await node.task(task_id, wait=WITHIN)
        assert (done.state, done.attempts) == ("succeeded", 1)
        assert [kind for kind, *_ in pghandlers.spans(str(log))] == ["S", "E", "S", "E"]
        assert "event=task.lost" in node.log_path.read_text()


async def _marks(log: Path, count: int) -> list[tuple[str, str, int, float]] | None:
    marks = pghandlers.spans(str(log))
    return marks if len(marks) >= count else None


async def _ran(log: Path, count: int) -> bool | None:
    return True if len(pghandlers.runs(str(log))) >= count else None
