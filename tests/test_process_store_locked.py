"""The SQLite file locked by another program (a backup tool, an operator's shell) for longer
than the daemon's busy timeout: claims and outcome writes fail, and the daemon keeps
running, tries them again, and finishes every task once the lock is gone. Before, the
failed claim ended the daemon's TaskGroup (exit 70, every running task interrupted)."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path

from tests.harness import Daemon, Offload, TaskJson, eventually, executions

TYPES = {"hold": "tests.handlers:hold", "noop": "tests.handlers:noop"}
WAIT = 60.0  # seconds: the busy timeout (5 s) and the retries fit well within it


async def store_errors(daemon: Daemon) -> dict[str, float]:
    """offload_store_errors_total by operation, from /metrics."""
    text = (await daemon.request("GET", "/metrics")).body.decode()
    found = re.findall(r'^offload_store_errors_total\{operation="(\w+)"\} (\S+)$', text, re.M)
    return {operation: float(value) for operation, value in found}


async def test_claims_and_outcomes_wait_out_a_lock_held_by_another_program(
    offload: Offload, tmp_path: Path
) -> None:
    log, release = tmp_path / "runs.log", tmp_path / "release"
    config = offload.config(types=TYPES)
    daemon = await offload.start(config)
    held = await daemon.submit("hold", {"log": str(log), "release": str(release)})

    async def started() -> bool | None:
        return True if executions(log)[held.id] == 1 else None

    async with asyncio.timeout(WAIT):
        await eventually(started)

    # Due once the lock is held: its claim will fail.
    due = await daemon.request("POST", "/v1/tasks", json={"type": "noop", "delay": 1})
    assert due.status == 202, due.body
    lock = sqlite3.connect(config.db, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # the write lock, until ROLLBACK
    try:
        # An admission meets the lock after its busy timeout: 503, and nothing written.
        refused = await daemon.request("POST", "/v1/tasks", json={"type": "noop"})
        assert refused.status == 503, refused.body
        assert refused.json(dict)["error"]["code"] == "store_unavailable"
        release.touch()  # the held run ends: its outcome's write fails too

        async def both_failed() -> dict[str, float] | None:
            errors = await store_errors(daemon)
            return errors if {"claim", "record"} <= set(errors) else None

        async with asyncio.timeout(WAIT):
            await eventually(both_failed)
        assert daemon.returncode is None, daemon.log_tail()
    finally:
        lock.execute("ROLLBACK")
        lock.close()

    later = await daemon.submit("noop", {})
    for task_id in (held.id, due.json(TaskJson).id, later.id):
        ended = await daemon.task(task_id, wait=WAIT)
        assert ended.state == "succeeded", ended
    assert executions(log)[held.id] == 1  # its outcome was written late, not its run repeated
    assert daemon.returncode is None


async def test_readiness_fails_while_the_lock_is_held_and_metrics_still_answer(
    offload: Offload, tmp_path: Path
) -> None:
    config = offload.config(types=TYPES)
    daemon = await offload.start(config)

    async def readiness(status: int) -> dict[str, object] | None:
        reply = await daemon.request("GET", "/readyz")
        return reply.json(dict) if reply.status == status else None

    lock = sqlite3.connect(config.db, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        # The health check (every 5 s, bounded by as much) meets the lock: not ready.
        async with asyncio.timeout(WAIT):
            body = await eventually(lambda: readiness(503))
        assert body["status"] == "store_unavailable", body
        assert body["error"]["code"] == "store_unavailable", body  # type: ignore[index]
        scraped = await daemon.request("GET", "/metrics")
        assert scraped.status == 200, scraped.body
        assert "offload_tasks_running 0.0" in scraped.body.decode()
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    async with asyncio.timeout(WAIT):
        assert await eventually(lambda: readiness(200)) == {"status": "ready"}
