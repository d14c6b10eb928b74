"""Execution policy around the executors: per-type concurrency caps, the backoff schedule,
and the documented limit of cancelling a sync handler. A real in-process daemon."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from pathlib import Path
from typing import Any

import pytest

from daemon.backoff import backoff_delay
from daemon.config import BackoffConfig, Duration
from daemon.executors import python as python_executor
from tests import policyhandlers
from tests.inproc import open_daemon
from tests.logevents import log_event

POLICY_TYPES: dict[str, Any] = {
    "types": {
        "capped": {
            "kind": "python",
            "handler": "tests.policyhandlers:measured",
            "concurrency": 2,
        },
        "free": {"kind": "python", "handler": "tests.policyhandlers:measured"},
        "block": {"kind": "python", "handler": "tests.apphandlers:block", "concurrency": 1},
        "stubborn": {"kind": "python", "handler": "tests.policyhandlers:stubborn"},
        "deaf": {"kind": "python", "handler": "tests.policyhandlers:deaf"},
        "schedule": {
            "kind": "python",
            "handler": "tests.apphandlers:always_fail",
            "max_attempts": 4,
            "backoff": {"initial": "200ms", "multiplier": 2.0, "max": "500ms", "jitter": 0.0},
        },
    },
    "workers": {"concurrency": 8},
}


def _time(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


async def test_a_type_never_runs_more_than_its_concurrency(tmp_path: Path) -> None:
    async with open_daemon(tmp_path, POLICY_TYPES) as daemon:
        capped = policyhandlers.GAUGES["capped-load"] = policyhandlers.Gauge()
        free = policyhandlers.GAUGES["free-load"] = policyhandlers.Gauge()
        batch = [
            {"type": kind, "payload": {"gauge": f"{kind}-load"}}
            for _ in range(30)
            for kind in ("capped", "free")
        ]
        reply = await daemon.request("POST", "/v1/tasks/batch", json={"tasks": batch})
        assert reply.status == 202
        for task_id in reply.body["ids"]:
            assert (await daemon.ended(task_id, within=30))["state"] == "succeeded"
        assert (capped.done, free.done) == (30, 30)
        assert capped.peak == 2  # the cap, reached and never passed
        assert free.peak > 2  # the other type was not held to it


async def test_a_type_at_its_cap_does_not_block_other_types(tmp_path: Path) -> None:
    async with open_daemon(tmp_path, POLICY_TYPES) as daemon:
        gate = daemon.gate()
        held = await daemon.submit({"type": "block", "payload": {"gate": gate.key}})
        async with asyncio.timeout(10):
            await gate.started.wait()
        waiting = await daemon.submit({"type": "block", "payload": {"gate": gate.key}})
        other = await daemon.submit({"type": "free", "payload": {"gauge": "other"}})
        assert (await daemon.ended(other["id"]))["state"] == "succeeded"
        # The second `block` is still queued behind its type's cap of 1.
        assert (await daemon.task(waiting["id"]))["state"] == "queued"
        gate.release.set()
        for task in (held, waiting):
            assert (await daemon.ended(task["id"]))["state"] == "succeeded"


async def test_retries_follow_the_configured_backoff(tmp_path: Path) -> None:
    async with open_daemon(tmp_path, POLICY_TYPES) as daemon:
        task = await daemon.submit({"type": "schedule", "payload": {}})
        ended = await daemon.ended(task["id"], within=20)
    assert ended["state"] == "failed"
    assert ended["attempts"] == 4
    history = ended["history"]
    assert [h["attempt"] for h in history] == [1, 2, 3, 4]
    # Each attempt starts no sooner than the previous one ended plus its backoff:
    # 200 ms, 400 ms, then 500 ms (the cap).
    for earlier, later, backoff in zip(history, history[1:], (0.2, 0.4, 0.5), strict=False):
        gap = _time(later["started_at"]) - (_time(earlier["started_at"]) + earlier["duration"])
        assert backoff - 0.01 <= gap <= backoff + 10.0, (gap, backoff)  # never early


@pytest.mark.parametrize(
    ("attempt", "expected"), [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (9, 10.0)]
)
def test_backoff_grows_by_the_multiplier_up_to_the_cap(attempt: int, expected: float) -> None:
    policy = BackoffConfig(initial=Duration(1), max=Duration(10), multiplier=2.0, jitter=0.0)
    assert backoff_delay(policy, attempt) == expected


def test_jitter_spreads_within_its_fraction_and_never_past_max() -> None:
    policy = BackoffConfig(initial=Duration(4), max=Duration(5), multiplier=2.0, jitter=0.25)
    assert backoff_delay(policy, 1, rand=0.0) == 3.0
    assert backoff_delay(policy, 1, rand=0.5) == 4.0
    assert backoff_delay(policy, 1, rand=0.999) == pytest.approx(4.998)
    assert backoff_delay(policy, 2, rand=0.999) == 5.0  # 5 * (1 + 0.25) capped at max


async def test_cancelling_a_sync_handler_tells_it_through_its_context(tmp_path: Path) -> None:
    async with open_daemon(tmp_path, POLICY_TYPES) as daemon:
        task = await daemon.submit({"type": "stubborn", "payload": {}})
        started = policyhandlers.SYNC_STARTED.setdefault(task["id"], threading.Event())
        assert await asyncio.to_thread(started.wait, 10)
        reply = await daemon.request("DELETE", f"/v1/tasks/{task['id']}")
        assert reply.status == 200
        assert reply.body["state"] == "cancelled"
        seen = policyhandlers.SYNC_SEEN_CANCEL.setdefault(task["id"], threading.Event())
        assert await asyncio.to_thread(seen.wait, 5)
        # The thread's late return changes nothing: the task stays cancelled.
        assert (await daemon.task(task["id"]))["state"] == "cancelled"


async def test_a_sync_handler_that_ignores_its_cancellation_is_logged_holding_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(python_executor, "STUCK_AFTER", 0.2)
    policyhandlers.DEAF_RELEASE.clear()
    try:
        one_slot = {**POLICY_TYPES, "workers": {"concurrency": 1}}
        with log_event(python_executor.__name__, "task.thread_stuck") as stuck:
            async with open_daemon(tmp_path, one_slot) as daemon:
                task = await daemon.submit({"type": "deaf", "payload": {}})
                started = policyhandlers.SYNC_STARTED.setdefault(task["id"], threading.Event())
                assert await asyncio.to_thread(started.wait, 10)
                assert (await daemon.request("DELETE", f"/v1/tasks/{task['id']}")).status == 200
                async with asyncio.timeout(10):
                    await stuck.wait()
                assert len(python_executor._stuck) == 1
                # The one slot is free again, and the next sync run gets a thread of its own.
                sync = {"type": "flaky", "payload": {"flag": str(tmp_path / "never")}}
                quick = await daemon.submit(sync)
                assert (await daemon.ended(quick["id"]))["state"] == "succeeded"
                policyhandlers.DEAF_RELEASE.set()  # it returns at last: its thread is free
                async with asyncio.timeout(10):
                    while python_executor._stuck:  # noqa: ASYNC110 (cleared in the pool's thread)
                        await asyncio.sleep(0.01)
    finally:
        policyhandlers.DEAF_RELEASE.set()


@pytest.mark.parametrize(
    ("how", "attempts"),
    # A result that cannot be encoded fails at once: running again would not change it.
    [
        ("exit", 2),
        ("unprintable", 2),
        ("retry-after-none", 2),
        ("retry-after-huge", 2),
        ("cyclic", 1),
    ],
)
async def test_a_hostile_handler_fails_its_run_and_the_daemon_goes_on(
    tmp_path: Path, how: str, attempts: int
) -> None:
    hostile = {
        "kind": "python",
        "handler": "tests.policyhandlers:hostile",
        "max_attempts": 2,  # a retry is scheduled once: the backoff sees RetryAfter's delay
        "backoff": {"initial": "10ms", "max": "10ms"},
    }
    async with open_daemon(tmp_path, {"types": {"hostile": hostile}}) as api:
        task = await api.submit({"type": "hostile", "payload": how})
        ended = await api.ended(task["id"])
        assert (ended["state"], ended["attempts"]) == ("failed", attempts), ended
        assert ended["last_error"], ended
        # The consumers are all still there: a task after it runs.
        after = await api.submit({"type": "noop"})
        assert (await api.ended(after["id"]))["state"] == "succeeded"
        assert not api.serving.done()
