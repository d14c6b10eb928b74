"""A stop is not a failure: SIGTERM and SIGINT sent to a real `offload serve` process.

While it drains, POST answers 503 `draining` with Retry-After and /readyz fails, but reads
still work. Runs that outlast the grace period go back to `queued` without spending an
attempt and run after a restart; a second signal skips the rest of the grace; runs that end
within the grace end `succeeded`; the process exits 0 in every case.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.harness import Daemon, ErrorJson, Offload, eventually, executions, read_rows, runs

HOLD = {"hold": "tests.handlers:hold"}
STOP_SIGNALS = [
    pytest.param(signal.SIGTERM, id="SIGTERM"),
    pytest.param(signal.SIGINT, id="SIGINT"),
]
STARTED_TIMEOUT = 15.0  # seconds for submitted tasks to start running
EXIT_SLACK = 15.0  # seconds a stop may take past the grace period (far below the holds')
HURRIED_EXIT = 10.0  # seconds within which a stop must end when the grace is 60 s


def hold_payload(tmp_path: Path) -> dict[str, object]:
    """A `hold` task of 60 s, cut short once `tmp_path/release` exists."""
    return {"log": str(tmp_path / "runs.log"), "release": str(tmp_path / "release"), "seconds": 60}


async def wait_started(log: Path, n: int) -> set[str]:
    """The ids of the tasks whose handler has started, once there are `n`."""

    async def probe() -> set[str] | None:
        started = set(executions(log))
        return started if len(started) >= n else None

    async with asyncio.timeout(STARTED_TIMEOUT):
        return await eventually(probe)


async def wait_draining(daemon: Daemon) -> None:
    async def probe() -> bool | None:
        return True if (await daemon.request("GET", "/readyz")).status == 503 else None

    async with asyncio.timeout(10):
        await eventually(probe)


async def wait_all_claimed(daemon: Daemon, ids: set[str]) -> None:
    """Until every task of `ids` is claimed: `running`, one attempt counted."""

    async def probe() -> bool | None:
        found = [await daemon.task(i) for i in ids]
        return True if {(t.state, t.attempts) for t in found} == {("running", 1)} else None

    async with asyncio.timeout(10):
        await eventually(probe)


@pytest.mark.parametrize("sig", STOP_SIGNALS)
async def test_runs_that_outlast_the_grace_are_put_back_unspent_and_run_after_restart(
    offload: Offload, tmp_path: Path, sig: signal.Signals
) -> None:
    grace = 1.0
    config = offload.config(
        types=HOLD, workers={"concurrency": 4, "prefetch": 2, "grace_period": "1s"}
    )
    daemon = await offload.start(config)
    # Six 60 s tasks: four run, two are claimed ahead into the hand-off queue.
    tasks = await daemon.submit_many("hold", [hold_payload(tmp_path)] * 6)
    ids = {t.id for t in tasks}
    # The first ones find idle consumers and are admitted running; the rest queue.
    assert {(t.state, t.attempts) for t in tasks} <= {("queued", 0), ("running", 1)}
    started = await wait_started(tmp_path / "runs.log", 4)
    assert len(started) == 4  # the concurrency
    await wait_all_claimed(daemon, ids)

    t0 = time.monotonic()
    daemon.signal(sig)
    async with asyncio.timeout(grace + EXIT_SLACK + 5):
        assert await daemon.wait_exit() == 0
    elapsed = time.monotonic() - t0
    assert grace <= elapsed < grace + EXIT_SLACK, elapsed

    # Every task is queued again, as if it had never started.
    rows = read_rows(config.db)
    assert set(rows) == ids
    for row in rows.values():
        assert (row.state, row.attempts, row.started_at, row.last_error) == (
            "queued",
            0,
            None,
            None,
        ), row
    assert executions(tmp_path / "runs.log") == Counter(dict.fromkeys(started, 1))

    # After a restart (now released) each one succeeds on its first counted attempt.
    (tmp_path / "release").touch()
    daemon = await offload.start(config)
    for task_id in ids:
        done = await daemon.task(task_id, wait=30)
        assert (done.state, done.attempts, done.last_error) == ("succeeded", 1, None), done
        assert done.result == {"attempt": 1, "released": True}
    log = tmp_path / "runs.log"
    assert executions(log) == Counter({i: 2 if i in started else 1 for i in ids})
    assert {attempt for _, attempt in runs(log)} == {1}  # the stopped runs were not counted
    daemon.signal(signal.SIGTERM)
    async with asyncio.timeout(HURRIED_EXIT):
        assert await daemon.wait_exit() == 0


@pytest.mark.parametrize("sig", STOP_SIGNALS)
async def test_draining_refuses_work_keeps_reads_and_a_second_signal_skips_the_grace(
    offload: Offload, tmp_path: Path, sig: signal.Signals
) -> None:
    config = offload.config(types=HOLD, workers={"concurrency": 2, "grace_period": "60s"})
    daemon = await offload.start(config)
    tasks = await daemon.submit_many("hold", [hold_payload(tmp_path)] * 2)
    ids = {t.id for t in tasks}
    await wait_started(tmp_path / "runs.log", 2)

    daemon.signal(sig)
    await wait_draining(daemon)
    readyz = await daemon.request("GET", "/readyz")
    assert (readyz.status, readyz.json(dict[str, str])) == (503, {"status": "draining"})
    refused = await daemon.request(
        "POST", "/v1/tasks", json={"type": "hold", "payload": hold_payload(tmp_path)}
    )
    assert refused.status == 503
    assert refused.json(ErrorJson).error.code == "draining"
    assert int(refused.headers["Retry-After"]) >= 1
    assert (await daemon.request("GET", "/healthz")).status == 200
    for task_id in ids:
        still = await daemon.task(task_id)
        assert (still.state, still.attempts) == ("running", 1)
    assert {t.id for t in await daemon.tasks()} == ids  # the refused POST wrote nothing
    assert daemon.returncode is None  # still within the 60 s grace

    t0 = time.monotonic()
    daemon.signal(sig)
    async with asyncio.timeout(HURRIED_EXIT + 5):
        assert await daemon.wait_exit() == 0
    assert time.monotonic() - t0 < HURRIED_EXIT

    rows = read_rows(config.db)
    assert set(rows) == ids
    assert {(r.state, r.attempts) for r in rows.values()} == {("queued", 0)}


async def test_runs_that_end_within_the_grace_succeed(offload: Offload, tmp_path: Path) -> None:
    config = offload.config(
        types=HOLD, workers={"concurrency": 2, "prefetch": 2, "grace_period": "60s"}
    )
    daemon = await offload.start(config)
    tasks = await daemon.submit_many("hold", [hold_payload(tmp_path)] * 4)
    ids = {t.id for t in tasks}
    started = await wait_started(tmp_path / "runs.log", 2)
    assert len(started) == 2  # the concurrency
    waiting = ids - started
    await wait_all_claimed(daemon, ids)  # two run, two wait in the hand-off queue

    daemon.signal(signal.SIGTERM)
    await wait_draining(daemon)

    # The drain puts back at once, unspent, what was claimed ahead but not started.
    async def put_back() -> bool | None:
        found = [await daemon.task(i) for i in waiting]
        return True if {(t.state, t.attempts) for t in found} == {("queued", 0)} else None

    async with asyncio.timeout(10):
        await eventually(put_back)

    # The two running tasks end during the grace, and the drain ends as soon as they do.
    t0 = time.monotonic()
    (tmp_path / "release").touch()
    async with asyncio.timeout(HURRIED_EXIT + 5):
        assert await daemon.wait_exit() == 0
    assert time.monotonic() - t0 < HURRIED_EXIT

    rows = read_rows(config.db)
    assert {i: (rows[i].state, rows[i].attempts) for i in ids} == {
        **dict.fromkeys(started, ("succeeded", 1)),
        **dict.fromkeys(waiting, ("queued", 0)),
    }
    assert executions(tmp_path / "runs.log") == Counter(dict.fromkeys(started, 1))


async def test_a_sync_handler_that_ignores_its_cancel_does_not_hold_the_exit(
    offload: Offload, tmp_path: Path
) -> None:
    grace = 1.0
    config = offload.config(
        types={"deaf": "tests.handlers:deaf"},
        workers={"concurrency": 1, "grace_period": f"{grace:g}s"},
    )
    daemon = await offload.start(config)
    payload = {**hold_payload(tmp_path), "seconds": 120}  # far past the stop's bound
    task = await daemon.submit("deaf", payload)
    await wait_started(tmp_path / "runs.log", 1)

    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    async with asyncio.timeout(grace + EXIT_SLACK):
        assert await daemon.wait_exit() == 0
    assert time.monotonic() - started >= grace
    # Its run was stopped and put back, unspent, as any other past the grace.
    (row,) = read_rows(config.db).values()
    assert (row.id, row.state, row.attempts) == (task.id, "queued", 0)
    (tmp_path / "release").touch()  # let the orphaned thread's sleep end (it is gone anyway)
