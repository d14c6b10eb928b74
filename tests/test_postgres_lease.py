"""The PostgreSQL store keeps renewing a run's lease while its outcome is being written: a
write that waits (a busy pool, a long group commit) must not let the lease expire, or
another node would rescue the task and run it a second time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from daemon.config import StoreConfig
from daemon.ids import new_id
from daemon.models import Claim, NewTask, Succeeded, TaskState
from daemon.store import open_store
from daemon.store.postgres import PostgresStore
from tests import pg
from tests.harness import eventually

LEASE = 3.0  # seconds; the heartbeat renews every LEASE / 3 (room for a stalled second)


async def test_a_run_being_recorded_keeps_its_lease_until_the_write_is_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = time.time()
    task = NewTask(
        id=new_id(now), type="noop", queue="default", payload=b"{}", priority=0,
        run_at=now, created_at=now, timeout=30.0, max_attempts=1,
    )  # fmt: skip
    async with (
        pg.open_database() as url,
        open_store(StoreConfig(url=url, pool_size=4)) as store,
    ):
        assert isinstance(store, PostgresStore)
        await store.admit([task], max_pending=10)
        (claim,) = (await store.claim(owner="lease-test:1", limit=1, now=now, lease=LEASE)).claims
        db = await asyncpg.connect(url)
        try:

            async def lease_until() -> float:
                sql = "SELECT lease_until FROM offload_tasks WHERE id = $1"
                until = await db.fetchval(sql, task.id)
                assert until is not None, "the lease expired and the task was taken back"
                return float(until)

            claimed_until = await lease_until()
            # The success waits in the group commit until released, as behind a slow batch.
            release = asyncio.Event()
            submit: Callable[[Claim, Succeeded], Awaitable[Any]] = store._successes.submit

            async def held(claim: Claim, success: Succeeded) -> Any:
                await release.wait()
                return await submit(claim, success)

            monkeypatch.setattr(store._successes, "submit", held)
            writing = asyncio.create_task(
                store.record(claim, Succeeded(result=None, finished_at=time.time()))
            )

            async def renewed_past_its_first_lease() -> bool | None:
                # Past the claim's own lease, and renewed beyond it: never expired meanwhile.
                return (
                    time.time() > claimed_until + LEASE / 2 and await lease_until() > time.time()
                ) or None

            async with asyncio.timeout(15):
                await eventually(renewed_past_its_first_lease, every=0.05)
            release.set()
            recorded = await writing
        finally:
            await db.close()

        assert recorded is not None and recorded.state is TaskState.SUCCEEDED
        done = await store.get(task.id)
        assert done is not None and (done.state, done.attempts) == (TaskState.SUCCEEDED, 1)
