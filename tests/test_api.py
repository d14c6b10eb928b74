"""The HTTP API of DESIGN.md, end to end in process: a real daemon on 127.0.0.1, a real
SQLite file, real handlers. Each test asserts what a client observes."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web_request

from daemon import api as daemon_api
from daemon.client import OffloadClient
from daemon.ids import new_id
from daemon.models import SCAN_ROWS, Counts
from tests.harness import eventually
from tests.inproc import (  # noqa: F401 (api_fixture is the `api` fixture)
    Daemon,
    api_fixture,
    assert_error,
    delayed_tasks,
    open_daemon,
    prefill,
    stored_counts,
)

CONTRACT_FIELDS = {
    "id",
    "type",
    "queue",
    "state",
    "payload",
    "attempts",
    "max_attempts",
    "priority",
    "run_at",
    "created_at",
    "started_at",
    "finished_at",
    "result",
    "last_error",
}
LATER = 3600  # a delay that keeps a task queued for the whole test
QUICK = 5.0  # seconds: "at once", with room for a loaded CI machine


def when(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp).timestamp()


async def test_submit_answers_202_with_the_task_and_its_location(api: Daemon) -> None:
    body = {
        "type": "sleep",
        "payload": {"seconds": 0},
        "queue": "reports",
        "priority": 7,
        "timeout": 10,
        "max_attempts": 2,
    }
    reply = await api.request("POST", "/v1/tasks", json=body)

    assert reply.status == 202, reply.body
    task = reply.body
    assert set(task) >= CONTRACT_FIELDS
    assert reply.headers["Location"] == f"/v1/tasks/{task['id']}"
    assert task["type"] == "sleep"
    assert task["queue"] == "reports"
    # Queued, or running already when a consumer was idle (see the next test).
    started = task["state"] == "running"
    assert (task["state"], task["attempts"]) == (("running", 1) if started else ("queued", 0))
    assert (task["started_at"] is not None) == started
    assert task["payload"] == {"seconds": 0}
    assert task["priority"] == 7
    assert task["max_attempts"] == 2
    assert task["timeout"] == 10
    assert task["finished_at"] is None
    assert task["result"] is None
    assert task["last_error"] is None
    assert when(task["run_at"]) == when(task["created_at"])

    located = await api.request("GET", reply.headers["Location"])
    assert located.status == 200
    assert located.body["id"] == task["id"]
    ended = await api.ended(task["id"])
    assert ended["state"] == "succeeded"
    assert ended["result"] == {"slept": 0}
    assert ended["attempts"] == 1
    assert when(ended["created_at"]) <= when(ended["started_at"]) <= when(ended["finished_at"])


@pytest.mark.parametrize("task_id", ["not-an-id", new_id()], ids=["malformed", "unknown"])
async def test_get_of_a_missing_task_is_404(api: Daemon, task_id: str) -> None:
    assert_error(await api.request("GET", f"/v1/tasks/{task_id}"), 404, "not_found", "id")


async def test_long_poll_returns_as_soon_as_the_task_ends(api: Daemon) -> None:
    task = await api.submit({"type": "sleep", "payload": {"seconds": 0.3}})

    reply = await api.request("GET", f"/v1/tasks/{task['id']}", params={"wait": "20"})

    assert reply.status == 200
    assert reply.body["state"] == "succeeded"
    assert reply.elapsed < QUICK  # the task took 0.3s; the wait allowed 20s


async def test_a_lone_task_for_an_idle_consumer_is_committed_running(tmp_path: Path) -> None:
    # One slot: a task that finds its consumer idle (and the feeder with nothing under way,
    # as it is once the daemon settles) is admitted already running: one commit, not two.
    # A task that finds the consumer busy is queued like any other.
    one_slot = {"workers": {"concurrency": 1, "prefetch": 0}}
    async with open_daemon(tmp_path, one_slot) as api:

        async def started_at_once() -> dict[str, Any] | None:
            task = await api.submit({"type": "noop"})
            if task["state"] == "running":
                return task
            await api.ended(task["id"])  # the next try meets an idle consumer again
            return None

        async with asyncio.timeout(QUICK):
            first = await eventually(started_at_once)
        assert first["attempts"] == 1 and first["started_at"] is not None
        done = await api.ended(first["id"])
        assert (done["state"], done["attempts"]) == ("succeeded", 1)

        gate = api.gate()
        await api.submit({"type": "block", "payload": {"gate": gate.key}})
        async with asyncio.timeout(QUICK):
            await gate.started.wait()
        second = await api.submit({"type": "noop"})
        assert (second["state"], second["attempts"], second["started_at"]) == ("queued", 0, None)
        gate.release.set()
        done = await api.ended(second["id"])
        assert (done["state"], done["attempts"]) == ("succeeded", 1)


async def test_long_poll_answers_the_current_state_at_timeout(api: Daemon) -> None:
    gate = api.gate()
    task = await api.submit({"type": "block", "payload": {"gate": gate.key}})
    async with asyncio.timeout(QUICK):
        await gate.started.wait()

    reply = await api.request("GET", f"/v1/tasks/{task['id']}", params={"wait": "0.3"})

    assert reply.status == 200
    assert reply.body["state"] == "running"
    assert 0.25 <= reply.elapsed < QUICK
    gate.release.set()
    assert (await api.ended(task["id"]))["state"] == "succeeded"


async def test_wait_takes_any_decimal_and_no_other_parameter(api: Daemon) -> None:
    task = await api.submit({"type": "noop", "delay": LATER})
    path = f"/v1/tasks/{task['id']}"
    reply = await api.request("GET", path, params={"wait": ".2"})
    assert (reply.status, reply.body["state"]) == (200, "queued")
    assert reply.elapsed >= 0.2  # it waited, the task did not end
    assert_error(await api.request("GET", path, params={"wiat": "30"}), 422, "invalid", "wiat")
    negative = await api.request("GET", path, params={"wait": "-1"})
    assert_error(negative, 422, "invalid", "wait")
    assert "between 0 and" in negative.body["error"]["message"]


@pytest.mark.parametrize("wait", ["soon", "-1", "31", "nan", "inf", ""])
async def test_wait_must_be_seconds_up_to_max_wait(api: Daemon, wait: str) -> None:
    task = await api.submit({"type": "noop", "delay": LATER})
    reply = await api.request("GET", f"/v1/tasks/{task['id']}", params={"wait": wait})
    assert_error(reply, 422, "invalid", "wait")


async def test_cancel_of_a_queued_task_means_it_never_runs(tmp_path: Path) -> None:
    # One slot and no prefetch: while `blocker` runs, `victim` waits in the store.
    one_slot = {"workers": {"concurrency": 1, "prefetch": 0}}
    async with open_daemon(tmp_path, one_slot) as api:
        gate = api.gate()
        blocker = await api.submit({"type": "block", "payload": {"gate": gate.key}})
        async with asyncio.timeout(QUICK):
            await gate.started.wait()
        victim = await api.submit({"type": "noop"})

        reply = await api.request("DELETE", f"/v1/tasks/{victim['id']}")

        assert reply.status == 200, reply.body
        assert reply.body["state"] == "cancelled"
        assert reply.body["finished_at"] is not None
        # Free the slot; a task admitted after the victim runs, so the victim's turn passed.
        gate.release.set()
        marker = await api.submit({"type": "noop"})
        assert (await api.ended(marker["id"]))["state"] == "succeeded"
        assert (await api.ended(blocker["id"]))["state"] == "succeeded"
        after = await api.task(victim["id"])
        assert after["state"] == "cancelled"
        assert after["attempts"] == 0
        assert after["started_at"] is None


async def test_cancel_of_a_running_task_stops_its_handler(
    api: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="daemon.api")
    gate = api.gate()
    task = await api.submit({"type": "block", "payload": {"gate": gate.key}})
    async with asyncio.timeout(QUICK):
        await gate.started.wait()

    reply = await api.request("DELETE", f"/v1/tasks/{task['id']}")

    assert reply.status == 200, reply.body
    assert reply.body["state"] == "cancelled"
    async with asyncio.timeout(QUICK):
        await gate.cancelled.wait()
    # Let the stopped run's consumer finish: a later task runs to completion on the same
    # daemon, and the cancelled task is still cancelled, unchanged, run once.
    later = await api.submit({"type": "noop"})
    assert (await api.ended(later["id"]))["state"] == "succeeded"
    after = await api.task(task["id"])
    assert after["state"] == "cancelled"
    assert after["finished_at"] == reply.body["finished_at"]
    assert after["result"] is None
    assert gate.runs == 1
    # The task's end has its line, as every end does.
    (line,) = [r for r in caplog.records if getattr(r, "event", None) == "task.cancelled"]
    assert (line.task_id, line.task_type, line.attempt) == (task["id"], "block", 1)  # type: ignore[attr-defined]
    assert line.getMessage() == f"task {task['id']} cancelled while running"


async def test_a_retry_that_starts_while_its_cancelled_run_unwinds_is_tracked(
    tmp_path: Path,
) -> None:
    unwind = {"kind": "python", "handler": "tests.apphandlers:slow_unwind"}
    async with open_daemon(tmp_path, {"types": {"unwind": unwind}}) as api:
        first, second = api.gate(), api.gate()
        payload = {"first": first.key, "second": second.key}
        task = await api.submit({"type": "unwind", "payload": payload})
        async with asyncio.timeout(QUICK):
            await first.started.wait()
        assert (await api.request("DELETE", f"/v1/tasks/{task['id']}")).status == 200
        async with asyncio.timeout(QUICK):
            await first.cancelled.wait()  # cancelled, and still cleaning up
        retried = await api.request("POST", f"/v1/tasks/{task['id']}/retry")
        assert retried.status == 200, retried.body
        async with asyncio.timeout(QUICK):
            await second.started.wait()  # the retry runs beside the first run's clean-up

        first.release.set()  # the first run ends: the second must stay known
        async with asyncio.timeout(QUICK):
            await first.unwound.wait()
        second.release.set()

        ended = await api.ended(task["id"])
        assert (ended["state"], ended["attempts"]) == ("succeeded", 2), ended
        assert not api.serving.done()


async def test_cancel_of_a_claimed_task_not_yet_started_means_it_never_starts(
    tmp_path: Path,
) -> None:
    # One slot and one prefetched claim: while `blocker` runs, `victim` waits claimed.
    async with open_daemon(tmp_path, {"workers": {"concurrency": 1, "prefetch": 1}}) as api:
        blocker, victim_gate = api.gate(), api.gate()
        first = await api.submit({"type": "block", "payload": {"gate": blocker.key}})
        async with asyncio.timeout(QUICK):
            await blocker.started.wait()
        victim = await api.submit({"type": "block", "payload": {"gate": victim_gate.key}})

        async def claimed() -> bool | None:
            return True if (await api.task(victim["id"]))["state"] == "running" else None

        async with asyncio.timeout(QUICK):
            await eventually(claimed)
        reply = await api.request("DELETE", f"/v1/tasks/{victim['id']}")
        assert (reply.status, reply.body["state"]) == (200, "cancelled"), reply.body

        blocker.release.set()
        assert (await api.ended(first["id"]))["state"] == "succeeded"
        # The one consumer takes claims in order: once a later task ran, the victim's
        # claim is behind it.
        later = await api.submit({"type": "noop"})
        assert (await api.ended(later["id"]))["state"] == "succeeded"
        assert victim_gate.runs == 0
        assert (await api.task(victim["id"]))["state"] == "cancelled"


async def test_cancel_of_a_finished_task_is_409(api: Daemon) -> None:
    task = await api.submit({"type": "noop"})
    assert (await api.ended(task["id"]))["state"] == "succeeded"

    reply = await api.request("DELETE", f"/v1/tasks/{task['id']}")

    assert_error(reply, 409, "conflict", "id")
    assert (await api.task(task["id"]))["state"] == "succeeded"
    assert_error(await api.request("DELETE", f"/v1/tasks/{new_id()}"), 404, "not_found", "id")
    assert_error(await api.request("DELETE", "/v1/tasks/nope"), 404, "not_found", "id")


async def test_retry_of_a_failed_task_runs_it_again(api: Daemon, tmp_path: Path) -> None:
    flag = tmp_path / "broken"
    flag.touch()
    body = {"type": "flaky", "payload": {"flag": str(flag)}, "max_attempts": 1}
    task = await api.submit(body)
    failed = await api.ended(task["id"])
    assert failed["state"] == "failed"
    assert failed["attempts"] == 1
    assert "is set" in failed["last_error"]

    flag.unlink()
    reply = await api.request("POST", f"/v1/tasks/{task['id']}/retry")

    assert reply.status == 200, reply.body
    assert reply.body["state"] == "queued"
    assert reply.body["finished_at"] is None
    done = await api.ended(task["id"])
    assert done["state"] == "succeeded"
    assert done["attempts"] == 2
    assert done["result"] == {"ok": True}


async def test_retry_of_a_queued_task_is_409(api: Daemon) -> None:
    task = await api.submit({"type": "noop", "delay": LATER})

    reply = await api.request("POST", f"/v1/tasks/{task['id']}/retry")

    assert_error(reply, 409, "conflict", "id")
    assert (await api.task(task["id"]))["state"] == "queued"
    missing = await api.request("POST", f"/v1/tasks/{new_id()}/retry")
    assert_error(missing, 404, "not_found", "id")


async def test_list_pages_are_disjoint_complete_and_newest_first(api: Daemon) -> None:
    submitted = {(await api.submit({"type": "noop", "delay": LATER}))["id"] for _ in range(25)}

    pages: list[list[dict[str, Any]]] = []
    params = {"limit": "10"}
    while True:
        reply = await api.request("GET", "/v1/tasks", params=params)
        assert reply.status == 200, reply.body
        pages.append(reply.body["tasks"])
        cursor = reply.body["next_cursor"]
        if cursor is None:
            break
        assert len(pages) < 5, "pagination does not end"
        params = {"limit": "10", "cursor": cursor}

    assert [len(p) for p in pages] == [10, 10, 5]
    ids = [t["id"] for page in pages for t in page]
    assert len(set(ids)) == len(ids) == 25
    assert set(ids) == submitted
    assert ids == sorted(ids, reverse=True)
    created = [when(t["created_at"]) for page in pages for t in page]
    assert created == sorted(created, reverse=True)


async def test_a_list_page_of_big_payloads_ends_early_and_paging_goes_on(
    api: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(daemon_api, "PAGE_BYTES", 250)  # 100-byte payloads: 3 a page
    big = {"type": "noop", "payload": "x" * 98, "delay": LATER}
    submitted = [(await api.submit(big))["id"] for _ in range(5)]

    first = await api.request("GET", "/v1/tasks", params={"limit": "100"})
    assert [t["id"] for t in first.body["tasks"]] == submitted[::-1][:3]
    assert first.body["next_cursor"] == submitted[::-1][2]
    rest = await api.request("GET", "/v1/tasks", params={"cursor": first.body["next_cursor"]})
    assert [t["id"] for t in rest.body["tasks"]] == submitted[::-1][3:]
    assert rest.body["next_cursor"] is None


async def test_list_filters_by_state_type_and_queue(api: Daemon) -> None:
    in_a = await api.submit({"type": "noop", "queue": "a", "delay": LATER})
    in_b = await api.submit({"type": "noop", "queue": "b", "delay": LATER})
    slept = await api.submit({"type": "sleep", "payload": {"seconds": 0}})
    broken = await api.submit({"type": "permanent"})
    assert (await api.ended(slept["id"]))["state"] == "succeeded"
    assert (await api.ended(broken["id"]))["state"] == "failed"

    async def ids(**params: str) -> set[str]:
        return {t["id"] for t in await api.list_all(**params)}

    assert await ids() == {in_a["id"], in_b["id"], slept["id"], broken["id"]}
    assert await ids(state="queued") == {in_a["id"], in_b["id"]}
    assert await ids(state="succeeded") == {slept["id"]}
    assert await ids(state="failed") == {broken["id"]}
    assert await ids(state="running") == set()
    assert await ids(type="noop") == {in_a["id"], in_b["id"]}
    assert await ids(queue="a") == {in_a["id"]}
    assert await ids(type="noop", queue="b", state="queued") == {in_b["id"]}
    assert await ids(type="sleep", queue="a") == set()


async def test_a_filtered_listing_of_a_large_store_answers_in_bounded_pages(
    tmp_path: Path,
) -> None:
    # More tasks than two listing reads examine, three of them (old, middle, new) `sleep`.
    count = 2 * SCAN_ROWS + 5000
    planted = (10, SCAN_ROWS + 7, count - 3)
    tasks = delayed_tasks(count, types=dict.fromkeys(planted, "sleep"))
    await prefill(tmp_path, tasks)
    async with open_daemon(tmp_path) as api:
        # A type no task has: each answer is an empty page with a cursor SCAN_ROWS tasks
        # further down, and the cursors run out.
        cursors, params = [], {"type": "nope", "limit": "1"}
        for _ in range(10):
            reply = await api.request("GET", "/v1/tasks", params=params)
            assert reply.status == 200, reply.body
            assert reply.body["tasks"] == []
            if reply.body["next_cursor"] is None:
                break
            cursors.append(reply.body["next_cursor"])
            params["cursor"] = cursors[-1]
        assert cursors == [tasks[-SCAN_ROWS].id, tasks[-2 * SCAN_ROWS].id]
        # The same for a queue, among the tasks of a state.
        reply = await api.request("GET", "/v1/tasks", params={"queue": "nope", "state": "queued"})
        assert (reply.body["tasks"], reply.body["next_cursor"]) == ([], tasks[-SCAN_ROWS].id)

        # Following the cursors finds exactly the planted tasks, newest first: the
        # daemon's pages, and the Python client's iter_tasks() over pages of one.
        planted_ids = [tasks[n].id for n in reversed(planted)]
        assert [t["id"] for t in await api.list_all(type="sleep")] == planted_ids
        async with OffloadClient(f"http://{api.config.server.listen}") as client:
            assert [t.id async for t in client.iter_tasks(type="sleep", page_size=1)] == (
                planted_ids
            )
        # Unfiltered, every task examined is one: full pages as before.
        reply = await api.request("GET", "/v1/tasks", params={"limit": "1000"})
        assert [t["id"] for t in reply.body["tasks"]] == [t.id for t in tasks[:-1001:-1]]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"state": "done"}, "state"),
        ({"limit": "0"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"sort": "id"}, "sort"),
    ],
)
async def test_list_rejects_bad_parameters(api: Daemon, params: dict[str, str], field: str) -> None:
    assert_error(await api.request("GET", "/v1/tasks", params=params), 422, "invalid", field)


async def test_health_and_readiness(api: Daemon) -> None:
    health = await api.request("GET", "/healthz")
    ready = await api.request("GET", "/readyz")
    assert (health.status, health.body) == (200, {"status": "ok"})
    assert (ready.status, ready.body) == (200, {"status": "ready"})


async def test_draining_refuses_new_work_and_still_answers_reads(api: Daemon) -> None:
    gate = api.gate()
    task = await api.submit({"type": "block", "payload": {"gate": gate.key}})
    async with asyncio.timeout(QUICK):
        await gate.started.wait()

    api.stop.request()  # a graceful stop: the running task gets the grace period
    async with asyncio.timeout(QUICK):
        while (ready := await api.request("GET", "/readyz")).status == 200:
            await asyncio.wait({api.serving}, timeout=0.01)

    assert (ready.status, ready.body) == (503, {"status": "draining"})
    refused = await api.request("POST", "/v1/tasks", json={"type": "noop"})
    assert_error(refused, 503, "draining")
    grace = api.config.workers.grace_period
    assert refused.headers["Retry-After"] == str(int(grace))
    read = await api.request("GET", f"/v1/tasks/{task['id']}")
    assert (read.status, read.body["state"]) == (200, "running")
    listed = await api.request("GET", "/v1/tasks")
    assert listed.status == 200
    assert [t["id"] for t in listed.body["tasks"]] == [task["id"]]

    gate.release.set()  # the run ends within the grace period, so the drain completes
    await api.shutdown()
    counts = await stored_counts(api.config)
    assert counts == Counts(succeeded=1)


async def test_a_full_queue_answers_503_until_tasks_complete(tmp_path: Path) -> None:
    limits = {"workers": {"concurrency": 1, "prefetch": 0, "max_pending": 3}}
    async with open_daemon(tmp_path, limits) as api:
        gates = [api.gate() for _ in range(3)]
        tasks = [await api.submit({"type": "block", "payload": {"gate": g.key}}) for g in gates]

        refused = await api.request("POST", "/v1/tasks", json={"type": "noop"})

        assert_error(refused, 503, "queue_full")
        retry_after = refused.headers["Retry-After"]
        assert retry_after.isdigit()
        assert int(retry_after) >= 1
        assert await api.count() == 3

        for gate in gates:
            gate.release.set()
        for task in tasks:
            assert (await api.ended(task["id"]))["state"] == "succeeded"
        accepted = await api.request("POST", "/v1/tasks", json={"type": "noop"})
        assert accepted.status == 202, accepted.body


async def test_a_retry_into_a_full_queue_answers_503_with_retry_after(tmp_path: Path) -> None:
    limits = {"workers": {"concurrency": 1, "max_pending": 2}}
    async with open_daemon(tmp_path, limits) as api:
        cancelled = await api.submit({"type": "noop", "delay": LATER})
        assert (await api.request("DELETE", f"/v1/tasks/{cancelled['id']}")).status == 200
        later = [await api.submit({"type": "noop", "delay": LATER}) for _ in range(2)]

        refused = await api.request("POST", f"/v1/tasks/{cancelled['id']}/retry")

        assert_error(refused, 503, "queue_full")
        # Nothing has completed yet, so the estimate is its ceiling, not the store's
        # placeholder of one second.
        assert refused.headers["Retry-After"].isdigit()
        assert int(refused.headers["Retry-After"]) > 1
        assert (await api.task(cancelled["id"]))["state"] == "cancelled"
        assert (await api.request("DELETE", f"/v1/tasks/{later[0]['id']}")).status == 200
        again = await api.request("POST", f"/v1/tasks/{cancelled['id']}/retry")
        assert again.status == 200, again.body
        assert again.body["state"] == "queued"


async def test_a_failing_task_is_retried_with_backoff_then_fails(api: Daemon) -> None:
    task = await api.submit({"type": "always_fail"})

    ended = await api.ended(task["id"])

    assert ended["state"] == "failed"
    assert ended["attempts"] == ended["max_attempts"] == 3
    assert ended["last_error"] == "RuntimeError: always fails"
    history = ended["history"]
    assert [h["attempt"] for h in history] == [1, 2, 3]
    assert {h["error"] for h in history} == {"RuntimeError: always fails"}
    starts = [when(h["started_at"]) for h in history]
    # Backoff of 10ms then 20ms (no jitter); stamps are cut to the millisecond.
    assert starts[1] - starts[0] >= 0.010 - 0.002
    assert starts[2] - starts[1] >= 0.020 - 0.002


async def test_a_permanent_error_fails_at_once(api: Daemon) -> None:
    task = await api.submit({"type": "permanent"})

    ended = await api.ended(task["id"])

    assert ended["state"] == "failed"
    assert ended["attempts"] == 1
    assert ended["max_attempts"] == 5
    assert ended["last_error"] == "Permanent: this input can never work"
    assert len(ended["history"]) == 1


async def test_a_slow_handler_times_out(api: Daemon) -> None:
    body = {"type": "sleep", "payload": {"seconds": 60}, "timeout": 0.2, "max_attempts": 1}
    task = await api.submit(body)

    ended = await api.ended(task["id"])

    assert ended["state"] == "failed"
    assert ended["attempts"] == 1
    assert ended["last_error"] == "timed out after 0.2s"
    assert [h["error"] for h in ended["history"]] == ["timed out after 0.2s"]


async def test_a_consumer_runs_on_cleanly_after_a_run_was_stopped(tmp_path: Path) -> None:
    """Runs share their consumer's asyncio task: a timeout, then a cancel, must leave it
    nothing that would disturb the next run's own asyncio.timeout()."""
    async with open_daemon(tmp_path, {"workers": {"concurrency": 1}}) as api:
        slow = {"type": "sleep", "payload": {"seconds": 60}, "max_attempts": 1}
        timed_out = await api.submit({**slow, "timeout": 0.2})
        assert (await api.ended(timed_out["id"]))["last_error"] == "timed out after 0.2s"
        cancelled = await api.submit(slow)

        async def running() -> bool | None:
            return (await api.task(cancelled["id"]))["state"] == "running" or None

        async with asyncio.timeout(10):
            await eventually(running)
        assert (await api.request("DELETE", f"/v1/tasks/{cancelled['id']}")).status == 200
        after = [await api.submit({"type": "inner_timeout"}) for _ in range(3)]

        ended = [await api.ended(task["id"]) for task in after]

    assert [(t["state"], t["result"]) for t in ended] == [("succeeded", {"inner": "timed out"})] * 3


async def test_unknown_routes_and_methods_answer_the_error_shape(api: Daemon) -> None:
    assert_error(await api.request("GET", "/v2/tasks"), 404, "not_found")
    wrong_method = await api.request("PUT", "/v1/tasks")
    assert_error(wrong_method, 405, "method_not_allowed")
    assert {"GET", "POST"} <= set(wrong_method.headers["Allow"].split(","))


async def test_metrics_count_what_happened(api: Daemon) -> None:
    task = await api.submit({"type": "noop"})
    assert (await api.ended(task["id"]))["state"] == "succeeded"
    await api.submit({"type": "noop", "queue": "later", "delay": LATER})

    reply = await api.request("GET", "/metrics")

    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    samples = {
        name: float(value)
        for name, _, value in (line.rpartition(" ") for line in reply.body.splitlines())
        if name and not name.startswith("#")
    }
    assert samples['offload_tasks_accepted_total{queue="default",type="noop"}'] == 1
    assert samples['offload_tasks_accepted_total{queue="later",type="noop"}'] == 1
    assert samples['offload_tasks_total{outcome="succeeded",queue="default",type="noop"}'] == 1
    assert samples['offload_tasks{queue="later",state="queued"}'] == 1


TOKENS = {
    "reader": ("read", "r" * 20),
    "submitter": ("submit", "s" * 20),
    "boss": ("admin", "a" * 20),
}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name][1]}"}


async def test_tokens_and_scopes_guard_the_api(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("".join(f"{n} {scope} {secret}\n" for n, (scope, secret) in TOKENS.items()))
    async with open_daemon(tmp_path, {"auth": {"tokens_file": str(tokens)}}) as api:
        anonymous = await api.request("GET", "/v1/tasks")
        assert_error(anonymous, 401, "unauthorized", "Authorization")
        assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = {"Authorization": "Bearer " + "x" * 20}
        assert_error(
            await api.request("GET", "/v1/tasks", headers=wrong),
            401,
            "unauthorized",
            "Authorization",
        )
        body = {"type": "noop", "delay": LATER}
        refused = await api.request("POST", "/v1/tasks", json=body, headers=bearer("reader"))
        assert_error(refused, 403, "forbidden", "scope")
        assert (await api.request("GET", "/healthz")).status == 200  # an open path

        made = await api.request("POST", "/v1/tasks", json=body, headers=bearer("submitter"))
        assert made.status == 202, made.body
        path = f"/v1/tasks/{made.body['id']}"
        denied = await api.request("DELETE", path, headers=bearer("submitter"))
        assert_error(denied, 403, "forbidden", "scope")
        cancelled = await api.request("DELETE", path, headers=bearer("boss"))
        assert (cancelled.status, cancelled.body["state"]) == (200, "cancelled")
        listed = await api.request("GET", "/v1/tasks", headers=bearer("reader"))
        assert [t["id"] for t in listed.body["tasks"]] == [made.body["id"]]


async def test_the_first_request_of_a_process_is_answered(
    api: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiohttp warns (NotAppKeyWarning) once per process for each str key put in a request's
    # storage; with warnings as errors that first request answered 500. Forget the keys
    # seen so far, so this holds whichever test runs first.
    monkeypatch.setattr(web_request.BaseRequest, "_seen_str_keys", set())

    reply = await api.request("GET", "/healthz")

    assert reply.status == 200, reply.body
