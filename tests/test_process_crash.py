"""Nothing accepted is lost: `kill -9` of a real `offload serve` process mid-work, and the
lock that keeps a second daemon off the same SQLite file.

After a kill, recovery (`SQLiteStore.recover`) puts every `running` row back to `queued`,
counting the interrupted claim as an attempt and naming the interruption in `last_error`;
what had succeeded before the kill never runs again.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from tests.harness import Offload, TaskJson, count_states, eventually, executions, read_rows

TYPES = {
    "record": "tests.handlers:record",
    "hold": "tests.handlers:hold",
    "noop": "tests.handlers:noop",
}
STARTED_TIMEOUT = 30.0
FINISHED_TIMEOUT = 90.0
EXIT_TIMEOUT = 15.0


async def wait_runs(log: Path, n: int) -> Counter[str]:
    """The executions noted in `log`, once at least `n` tasks have started."""

    async def probe() -> Counter[str] | None:
        found = executions(log)
        return found if len(found) >= n else None

    async with asyncio.timeout(STARTED_TIMEOUT):
        return await eventually(probe)


async def wait_succeeded(db: Path, n: int) -> None:
    """Until `n` rows of `db` are `succeeded` (read from the file, not through the API)."""

    async def probe() -> bool | None:
        return True if count_states(db)["succeeded"] >= n else None

    async with asyncio.timeout(FINISHED_TIMEOUT):
        await eventually(probe, every=0.1)


async def test_kill_9_loses_no_task_and_reruns_only_interrupted_ones(
    offload: Offload, tmp_path: Path
) -> None:
    concurrency, quick_n, held_n = 50, 100, 900
    log, release = tmp_path / "runs.log", tmp_path / "release"
    config = offload.config(
        types=TYPES,
        # No prefetch: every claim is a run that started.
        workers={"concurrency": concurrency, "prefetch": 0, "max_pending": 5000},
        synchronous="normal",  # the weaker setting, which still promises to survive kill -9
    )
    daemon = await offload.start(config)

    # A batch that finishes before the kill...
    quick = {t.id for t in await daemon.submit_many("record", [{"log": str(log)}] * quick_n)}
    await wait_succeeded(config.db, quick_n)
    # ...then tasks that hold every consumer until the release file exists.
    payload = {"log": str(log), "release": str(release), "seconds": 120}
    held = {t.id for t in await daemon.submit_many("hold", [payload] * held_n)}
    started = set(await wait_runs(log, quick_n + concurrency)) - quick
    assert len(started) == concurrency

    daemon.kill()
    async with asyncio.timeout(EXIT_TIMEOUT):
        assert await daemon.wait_exit() == -signal.SIGKILL

    # Every accepted task is in the file; the runs in progress are `running` there.
    rows = read_rows(config.db)
    assert set(rows) == quick | held
    assert {rows[i].state for i in quick} == {"succeeded"}
    interrupted = {i for i, row in rows.items() if row.state == "running"}
    assert interrupted == started
    assert Counter(row.state for row in rows.values()) == {
        "succeeded": quick_n,
        "running": concurrency,
        "queued": held_n - concurrency,
    }
    assert executions(log) == Counter(dict.fromkeys(quick | started, 1))

    # A restart (now released) recovers the interrupted runs and finishes everything.
    release.touch()
    daemon = await offload.start(config)
    await wait_succeeded(config.db, quick_n + held_n)
    sample = await daemon.task(min(started))
    assert [h.attempt for h in sample.history] == [1]
    assert "interrupted" in sample.history[0].error
    daemon.signal(signal.SIGTERM)
    async with asyncio.timeout(EXIT_TIMEOUT):
        assert await daemon.wait_exit() == 0

    rows = read_rows(config.db)
    assert Counter(row.state for row in rows.values()) == {"succeeded": quick_n + held_n}
    for task_id, row in rows.items():
        if task_id in started:
            assert row.attempts == 2, row
            assert row.last_error is not None and "interrupted" in row.last_error, row
        else:
            assert (row.attempts, row.last_error) == (1, None), row
    # Once for what had succeeded and what had not started; twice for what was killed.
    expected = Counter(dict.fromkeys(quick | held, 1))
    expected.update(started)
    assert executions(log) == expected


async def test_kill_9_does_not_fail_a_task_that_waited_for_a_consumer(
    offload: Offload, tmp_path: Path
) -> None:
    """With the default prefetch (0) a task is claimed only for an idle consumer, so tasks
    waiting behind a busy one stay `queued`, and a kill -9 costs them nothing: even with
    max_attempts = 1 they run once after the restart. (A claim counts an attempt: with
    prefetch > 0, tasks claimed ahead spend one if the daemon is killed; README, Stopping.)"""
    log, release = tmp_path / "runs.log", tmp_path / "release"
    config = offload.config(types=TYPES, workers={"concurrency": 1})
    daemon = await offload.start(config)
    payload = {"log": str(log), "release": str(release), "seconds": 120}
    ids = set()
    for _ in range(3):
        reply = await daemon.request(
            "POST", "/v1/tasks", json={"type": "hold", "payload": payload, "max_attempts": 1}
        )
        assert reply.status == 202
        ids.add(reply.json(TaskJson).id)
    (running,) = await wait_runs(log, 1)
    waiting = ids - {running}
    assert {(await daemon.task(i)).state for i in waiting} == {"queued"}
    daemon.kill()
    async with asyncio.timeout(EXIT_TIMEOUT):
        assert await daemon.wait_exit() == -signal.SIGKILL

    release.touch()
    daemon = await offload.start(config)
    for task_id in waiting:
        done = await daemon.task(task_id, wait=30)
        assert (done.state, done.attempts, executions(log)[task_id]) == ("succeeded", 1, 1), done
    # The one that was running when killed had spent its only attempt: it ends failed, with
    # the interruption as its error, as the README says.
    interrupted = await daemon.task(running, wait=30)
    assert interrupted.state == "failed"
    assert interrupted.last_error is not None and "interrupted" in interrupted.last_error


async def test_a_second_daemon_on_the_same_database_refuses_to_start(
    offload: Offload, tmp_path: Path
) -> None:
    first_config = offload.config(types=TYPES)
    first = await offload.start(first_config)
    second_config = offload.config(types=TYPES, db=first_config.db)
    second = await offload.start(second_config, ready=False)
    async with asyncio.timeout(20):
        assert await second.wait_exit() == 1
    with pytest.raises(aiohttp.ClientConnectionError):
        await second.request("GET", "/healthz")

    # The first one is unaffected: it still takes and runs work.
    assert (await first.request("GET", "/readyz")).status == 200
    task = await first.submit("noop", {})
    assert (await first.task(task.id, wait=10)).state == "succeeded"

    # Once the first stops, the lock is free and the same config starts.
    first.signal(signal.SIGTERM)
    async with asyncio.timeout(EXIT_TIMEOUT):
        assert await first.wait_exit() == 0
    second = await offload.start(second_config)
    assert (await second.task(task.id)).state == "succeeded"
    second.signal(signal.SIGTERM)
    async with asyncio.timeout(EXIT_TIMEOUT):
        assert await second.wait_exit() == 0
    rows = read_rows(first_config.db)
    assert [(r.id, r.state, r.attempts) for r in rows.values()] == [(task.id, "succeeded", 1)]
