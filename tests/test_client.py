"""daemon/client.py against a real daemon in process (tests/inproc.py): every call, the typed
answers, and `ClientError` carrying the server's status, code, message, field and
Retry-After."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import errno
import math
import os
import pickle
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.api_flow import QueueView, ScheduleView
from daemon.client import (
    MIN_POLL,
    OffloadClient,
    Queue,
    Schedule,
    Submission,
    Submitted,
    SubmittedIds,
    Task,
    TaskState,
)
from daemon.client_errors import ClientError, Unreachable
from daemon.client_types import Stats, TaskPage, parse_stats
from daemon.ids import new_id
from daemon.wire import TaskView
from tests.harness import Offload, eventually, free_port, read_rows
from tests.inproc import (  # noqa: F401 (api_fixture is the `api` fixture)
    Daemon,
    api_fixture,
    open_daemon,
)
from tests.test_client_cli import start_on_unix, unix_socket_path

QUICK = 5.0  # seconds: "at once", with room for a loaded machine
LATER = 3600.0  # a delay that keeps a task queued for the whole test


def url(daemon: Daemon) -> str:
    return f"http://{daemon.config.server.listen}"


async def test_submit_get_and_wait_return_typed_tasks(api: Daemon) -> None:
    async with OffloadClient(url(api)) as client:
        task = await client.submit("sleep", {"seconds": 0})
        assert isinstance(task, Task)
        # Queued, or already running when a consumer was idle (test_api shows which).
        assert task.state in (TaskState.QUEUED, TaskState.RUNNING)
        assert task.type == "sleep"
        assert task.payload == {"seconds": 0}
        assert task.created_at is not None
        assert task.created_at.tzinfo is not None
        assert abs(task.created_at - dt.datetime.now(dt.UTC)) < dt.timedelta(seconds=QUICK)

        async with asyncio.timeout(QUICK):
            done = await client.wait(task.id)
        assert done.id == task.id
        assert done.state is TaskState.SUCCEEDED
        assert done.ended
        assert done.result == {"slept": 0}
        assert done.attempts == 1
        assert done.finished_at is not None
        assert await client.get(task.id) == done
        assert await client.get(task.id, wait=1) == done  # ended: answered at once


async def test_submit_sends_every_option(api: Daemon) -> None:
    run_at = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    async with OffloadClient(url(api)) as client:
        later = await client.submit(
            "noop",
            [1, "two"],
            queue="reports",
            priority=7,
            run_at=run_at,
            timeout=30,
            max_attempts=2,
            idempotency_key="order-17",
        )
        delayed = await client.submit("noop", delay=dt.timedelta(hours=1))
        with pytest.raises(ValueError, match="time zone"):
            await client.submit("noop", run_at=dt.datetime(2030, 1, 1))

    assert (later.queue, later.priority, later.timeout, later.max_attempts) == (
        "reports",
        7,
        30,
        2,
    )
    assert later.payload == [1, "two"]
    assert later.run_at is not None
    assert abs(later.run_at - run_at) < dt.timedelta(milliseconds=2)
    assert delayed.payload == {}  # no payload: the server's default
    assert delayed.run_at is not None
    assert delayed.created_at is not None
    # Each time is rounded down to its millisecond on its own: they may differ by one more.
    gap = delayed.run_at - delayed.created_at - dt.timedelta(hours=1)
    assert dt.timedelta(0) <= abs(gap) <= dt.timedelta(milliseconds=1)
    assert await api.count() == 2  # the naive run_at never left the client


async def test_batches_are_all_or_nothing_and_keys_make_submissions_idempotent(
    api: Daemon,
) -> None:
    async with OffloadClient(url(api)) as client:
        batch = [
            Submission(type="noop", payload={"n": 0}, delay=LATER),
            Submission(type="sleep", payload={"seconds": 0}, priority=3, delay=LATER),
            Submission(type="noop", payload={"n": 2}, queue="other", delay=LATER),
        ]
        made = [await client.get(task_id) for task_id in await client.submit_batch(batch)]
        assert [(t.type, t.payload, t.priority, t.queue) for t in made] == [
            ("noop", {"n": 0}, 0, "default"),
            ("sleep", {"seconds": 0}, 3, "default"),
            ("noop", {"n": 2}, 0, "other"),
        ]
        with pytest.raises(ClientError) as refused:
            await client.submit_batch([batch[0], Submission(type="sleep", payload={})])
        assert (refused.value.status, refused.value.field) == (422, "tasks[1].payload.seconds")
        assert await api.count() == 3  # nothing of the refused batch

        first = await client.submit("noop", {"order": 17}, delay=LATER, idempotency_key="o-17")
        again = await client.submit("noop", {"order": 17}, delay=LATER, idempotency_key="o-17")
        assert again.id == first.id
        with pytest.raises(ClientError) as reused:
            await client.submit("noop", {"order": 18}, delay=LATER, idempotency_key="o-17")
        assert (reused.value.status, reused.value.code) == (422, "idempotency_key_reused")
        assert reused.value.field == "Idempotency-Key"
        assert await api.count() == 4


async def test_a_replayed_submission_says_so_and_a_new_one_does_not(api: Daemon) -> None:
    """The server's `Idempotent-Replayed: true` becomes `replayed` on what submit and
    submit_batch return; otherwise they are the Task and the list of ids they were."""
    async with OffloadClient(url(api)) as client:
        first = await client.submit("noop", {"order": 5}, delay=LATER, idempotency_key="o-5")
        again = await client.submit("noop", {"order": 5}, delay=LATER, idempotency_key="o-5")
        keyless = await client.submit("noop", {"order": 5}, delay=LATER)
        assert (first.replayed, again.replayed, keyless.replayed) == (False, True, False)
        assert again.id == first.id
        assert keyless.id != first.id
        assert isinstance(again, Task)
        # The original task as it is now: cancelled since, a replay says so.
        await client.cancel(first.id)
        late = await client.submit("noop", {"order": 5}, delay=LATER, idempotency_key="o-5")
        assert (late.id, late.replayed, late.state) == (first.id, True, TaskState.CANCELLED)

        batch = [Submission(type="noop", payload={"n": n}, delay=LATER) for n in range(2)]
        ids = await client.submit_batch(batch, idempotency_key="b-1")
        replayed_ids = await client.submit_batch(batch, idempotency_key="b-1")
        assert isinstance(ids, SubmittedIds)
        assert (ids.replayed, replayed_ids.replayed) == (False, True)
        assert replayed_ids == ids
        assert isinstance(replayed_ids, list)
        assert all(isinstance(i, str) for i in replayed_ids)
    assert await api.count() == 4  # o-5's task, the keyless one, b-1's two


def test_submitted_is_the_servers_task_and_the_replay_flag() -> None:
    ours = {f.name for f in msgspec.structs.fields(Submitted)}
    assert ours == {f.name for f in msgspec.structs.fields(TaskView)} | {"replayed"}
    kept = pickle.loads(pickle.dumps(SubmittedIds(["a", "b"], replayed=True)))
    assert (kept, kept.replayed) == (["a", "b"], True)


async def test_errors_carry_the_servers_status_code_message_and_field(api: Daemon) -> None:
    async with OffloadClient(url(api)) as client:
        with pytest.raises(ClientError) as invalid:
            await client.submit("sleep", {"seconds": "soon"})
        assert (invalid.value.status, invalid.value.code) == (422, "invalid")
        assert invalid.value.field == "payload.seconds"
        assert "Expected `float`" in invalid.value.message
        assert "payload.seconds" in str(invalid.value)

        with pytest.raises(ClientError) as unknown:
            await client.submit("nope")
        assert (unknown.value.status, unknown.value.field) == (422, "type")

        missing = new_id()
        with pytest.raises(ClientError) as not_found:
            await client.get(missing)
        assert (not_found.value.status, not_found.value.code) == (404, "not_found")
        assert not_found.value.message == f"no task {missing}"

        with pytest.raises(ClientError) as bad_wait:
            await client.get(missing, wait=api.config.server.max_wait + 1)
        assert (bad_wait.value.status, bad_wait.value.field) == (422, "wait")

        with pytest.raises(ClientError) as bad_state:
            await client.list(state="lost")
        assert (bad_state.value.status, bad_state.value.field) == (422, "state")
    assert await api.count() == 0


async def test_cancel_and_retry(api: Daemon) -> None:
    gate = api.gate()
    async with OffloadClient(url(api)) as client:
        running = await client.submit("block", {"gate": gate.key})
        async with asyncio.timeout(QUICK):
            await gate.started.wait()
        cancelled = await client.cancel(running.id)
        assert cancelled.state is TaskState.CANCELLED
        async with asyncio.timeout(QUICK):
            await gate.cancelled.wait()  # the handler was stopped

        with pytest.raises(ClientError) as again:
            await client.cancel(running.id)
        assert (again.value.status, again.value.code, again.value.field) == (409, "conflict", "id")

        retried = await client.retry(running.id)
        assert retried.state is TaskState.QUEUED
        with pytest.raises(ClientError) as queued:
            await client.retry(running.id)
        assert (queued.value.status, queued.value.code) == (409, "conflict")

        async with asyncio.timeout(QUICK):
            await gate.started.wait()
        gate.release.set()
        async with asyncio.timeout(QUICK):
            done = await client.wait(running.id)
        assert done.state is TaskState.SUCCEEDED
        assert done.attempts == 2


async def test_list_pages_filters_and_iterates_every_page(api: Daemon) -> None:
    async with OffloadClient(url(api)) as client:
        made = [await client.submit("noop", {"n": n}, delay=LATER) for n in range(5)]
        other = await client.submit("sleep", {"seconds": 0}, queue="other", delay=LATER)
        newest_first = [t.id for t in reversed(made)]

        page = await client.list(type="noop", limit=2)
        assert [t.id for t in page.tasks] == newest_first[:2]
        assert page.next_cursor == newest_first[1]
        following = await client.list(type="noop", limit=2, cursor=page.next_cursor)
        assert [t.id for t in following.tasks] == newest_first[2:4]

        every = [t.id async for t in client.iter_tasks(type="noop", page_size=2)]
        assert every == newest_first
        by_queue = [t.id async for t in client.iter_tasks(queue="other")]
        assert by_queue == [other.id]
        await client.cancel(made[0].id)
        cancelled = [t.id async for t in client.iter_tasks(state=TaskState.CANCELLED)]
        assert cancelled == [made[0].id]
        assert (await client.list(state="succeeded")).tasks == []


async def test_wait_is_bounded_by_the_caller_and_reads_the_servers_longest_poll(
    tmp_path: Path,
) -> None:
    async with open_daemon(tmp_path, {"server": {"max_wait": "1s"}}) as api:
        gate = api.gate()
        async with OffloadClient(url(api)) as client:
            task = await client.submit("block", {"gate": gate.key})
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.5):
                    await client.wait(task.id)  # polls of at most 1 s: a 25 s one is a 422
            assert client.wait_step == 1.0  # read from the server's /openapi.json

            gate.release.set()
            async with asyncio.timeout(QUICK):
                done = await client.wait(task.id)
            assert done.state is TaskState.SUCCEEDED


async def test_a_full_queue_and_a_drain_are_503_with_retry_after(tmp_path: Path) -> None:
    limits = {"workers": {"concurrency": 1, "max_pending": 1}}
    async with open_daemon(tmp_path, limits) as api:
        gate = api.gate()
        async with OffloadClient(url(api)) as client:
            await client.submit("block", {"gate": gate.key})
            with pytest.raises(ClientError) as full:
                await client.submit("noop")
            assert (full.value.status, full.value.code) == (503, "queue_full")
            assert full.value.retry_after is not None
            assert full.value.retry_after >= 1

            async with asyncio.timeout(QUICK):
                await gate.started.wait()
            assert (await client.ready()).status == "ready"
            api.stop.request()  # draining: the blocked run holds the daemon in its grace
            async with asyncio.timeout(QUICK):
                while True:
                    try:
                        await client.ready()
                    except ClientError as exc:
                        not_ready = exc
                        break
                    await asyncio.wait({api.serving}, timeout=0.01)
            assert (not_ready.status, not_ready.code) == (503, "draining")
            assert (await client.health()).status == "ok"
            with pytest.raises(ClientError) as draining:
                await client.submit("noop")
            assert (draining.value.status, draining.value.code) == (503, "draining")
            assert draining.value.retry_after == api.config.workers.grace_period
            gate.release.set()


async def test_tokens_are_sent_and_refusals_are_client_errors(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("reader read reader-token-0123456789\nops admin admin-token-0123456789\n")
    async with open_daemon(tmp_path, {"auth": {"tokens_file": str(tokens)}}) as api:
        async with OffloadClient(url(api)) as anonymous:
            with pytest.raises(ClientError) as unauthorized:
                await anonymous.list()
            assert (unauthorized.value.status, unauthorized.value.code) == (401, "unauthorized")
            assert unauthorized.value.field == "Authorization"
            assert (await anonymous.health()).status == "ok"  # an open path
        async with OffloadClient(url(api), token="reader-token-0123456789") as reader:
            assert (await reader.list()).tasks == []
            with pytest.raises(ClientError) as forbidden:
                await reader.submit("noop")
            assert (forbidden.value.status, forbidden.value.field) == (403, "scope")
        async with OffloadClient(url(api), token="admin-token-0123456789") as admin:
            task = await admin.submit("noop")
            assert (await admin.get(task.id)).id == task.id
            assert (await admin.openapi())["openapi"] == "3.1.0"


async def test_an_unreachable_server_is_a_client_error_with_status_0() -> None:
    async with OffloadClient(f"http://127.0.0.1:{free_port()}", request_timeout=QUICK) as client:
        with pytest.raises(Unreachable) as unreachable:
            await client.health()
    assert isinstance(unreachable.value, ClientError)
    assert (unreachable.value.status, unreachable.value.code) == (0, "unreachable")


async def test_the_client_speaks_to_a_unix_socket(offload: Offload, tmp_path: Path) -> None:
    """A real `offload serve` with server.listen = "unix:...": both sessions (calls, and the
    long-polls of get(wait=) and wait()) reach it over the socket."""
    release = tmp_path / "release"
    with unix_socket_path() as sock:
        daemon = await start_on_unix(offload, sock)
        async with OffloadClient(f"unix:{sock}", request_timeout=QUICK) as client:
            assert client.url == f"unix:{sock}"
            held = await client.submit("hold", {"release": str(release)})
            echo = await client.submit("echo", {"text": "u", "times": 2})
            async with asyncio.timeout(QUICK):
                echoed = await client.wait(echo.id)
            assert (echoed.state, echoed.result) == (TaskState.SUCCEEDED, {"echo": "uu"})
            # The server holds this poll until it times out: the task waits for its release.
            started = asyncio.get_running_loop().time()
            polled = await client.get(held.id, wait=0.3)
            assert asyncio.get_running_loop().time() - started >= 0.25
            assert not polled.ended
            release.touch()
            async with asyncio.timeout(QUICK):
                released = await client.wait(held.id)
            assert (released.state, released.result) == (TaskState.SUCCEEDED, {"released": True})
            page = await client.list()
    rows = read_rows(daemon.config.db)
    assert {t.id: t.state for t in page.tasks} == {r.id: r.state for r in rows.values()}
    assert {t.id for t in page.tasks} == {held.id, echo.id}


async def test_a_unix_socket_that_is_absent_or_refuses_is_unreachable() -> None:
    with unix_socket_path() as absent:
        stale = absent.parent / "stale.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
            bound.bind(str(stale))  # a socket file that no one listens on: refused
            for path, reason in ((absent, errno.ENOENT), (stale, errno.ECONNREFUSED)):
                async with OffloadClient(f"unix:{path}", request_timeout=QUICK) as client:
                    with pytest.raises(Unreachable) as unreachable:
                        await client.submit("noop")
                assert (unreachable.value.status, unreachable.value.code) == (0, "unreachable")
                assert unreachable.value.message == (
                    f"cannot reach offload at unix:{path}: {os.strerror(reason)}"
                )


async def test_stats_count_unfinished_tasks_by_queue_and_outcomes(api: Daemon) -> None:
    async with OffloadClient(url(api)) as client:
        for _ in range(3):
            await client.submit("noop", delay=LATER)
        await client.submit("noop", queue="other", delay=LATER)
        done = await client.submit("sleep", {"seconds": 0})
        async with asyncio.timeout(QUICK):
            await client.wait(done.id)
            # The counters follow the stored outcome: the run is counted when the event loop
            # settles its write, which a reader may see committed a moment before.
            stats = await eventually(lambda: _counted(client, "succeeded"))
    assert stats.queues["default"].queued == 3
    assert stats.queues["other"].queued == 1
    assert stats.accepted == 5
    assert stats.since_start["succeeded"] == 1


async def _counted(client: OffloadClient, outcome: str) -> Stats | None:
    stats = await client.stats()
    return stats if outcome in stats.since_start else None


def test_stats_parse_the_metrics_text() -> None:
    text = (
        "# TYPE offload_tasks_total counter\n"
        'offload_tasks_total{type="a",queue="q",outcome="failed"} 2.0\n'
        'offload_tasks_total{type="b",queue="q",outcome="failed"} 3.0\n'
        "# TYPE offload_tasks gauge\n"
        'offload_tasks{queue="q",state="queued"} 4.0\n'
        'offload_tasks{queue="q",state="running"} 1.0\n'
        "# TYPE offload_tasks_running gauge\n"
        "offload_tasks_running 1.0\n"
    )
    stats = parse_stats(text)
    assert stats.since_start == {"failed": 5}
    assert (stats.queues["q"].queued, stats.queues["q"].running) == (4, 1)
    assert (stats.accepted, stats.running_here) == (0, 1)


@pytest.mark.parametrize(
    ("client_type", "server_type"),
    [(Task, TaskView), (Queue, QueueView), (Schedule, ScheduleView)],
    ids=["task", "queue", "schedule"],
)
def test_the_client_types_have_every_field_the_server_sends(
    client_type: type[msgspec.Struct], server_type: type[msgspec.Struct]
) -> None:
    """The client's types mirror the server's views (times as datetimes, not text), so the
    client does not import the server's modules; the names must not drift apart."""
    ours = {f.name for f in msgspec.structs.fields(client_type)}
    assert ours == {f.name for f in msgspec.structs.fields(server_type)}


async def test_a_state_of_a_newer_server_does_not_fail_the_page(api: Daemon) -> None:
    """Real answers, one with its state renamed as a later server might send it: the page
    decodes, known states are `TaskState`s, the unknown one a str that has not ended."""
    async with OffloadClient(url(api)) as client:
        await client.submit("noop", None, delay=LATER)
        await client.submit("noop", None, delay=LATER)
        raw = (await client._http.exchange("GET", "/v1/tasks"))[1]
    page = msgspec.json.decode(raw)
    page["tasks"][0]["state"] = "paused"
    decoded = msgspec.json.decode(msgspec.json.encode(page), type=TaskPage)
    newer, known = decoded.tasks
    assert (newer.state, type(newer.state), newer.ended) == ("paused", str, False)
    assert known.state is TaskState.QUEUED


async def test_wait_outlives_a_daemon_restart(tmp_path: Path) -> None:
    """A wait in flight when the daemon stops keeps asking (0.25 s, doubling to 5 s) and
    answers once the daemon is back: a deploy does not fail the callers that wait."""
    port = free_port()
    fixed = {"server": {"listen": f"127.0.0.1:{port}"}}
    async with OffloadClient(f"http://127.0.0.1:{port}", wait_step=1) as client:
        async with open_daemon(tmp_path, fixed):
            task = await client.submit("noop", None, delay=LATER)
            waiting = asyncio.create_task(client.wait(task.id))
        # The daemon is gone; before the fix, the wait failed at once with Unreachable.
        done, _ = await asyncio.wait({waiting}, timeout=1.0)
        assert not done, waiting.result() if not waiting.cancelled() else None
        async with open_daemon(tmp_path, fixed):
            await client.cancel(task.id)
            async with asyncio.timeout(QUICK + 5):
                ended = await waiting
    assert (ended.id, ended.state) == (task.id, TaskState.CANCELLED)


async def test_a_server_that_holds_no_poll_is_not_asked_in_a_loop(tmp_path: Path) -> None:
    async with open_daemon(tmp_path, {"server": {"max_wait": "0s"}}) as api:
        gate = api.gate()
        async with OffloadClient(url(api)) as client:
            task = await client.submit("block", {"gate": gate.key})
            started = asyncio.get_running_loop().time()
            waiting = asyncio.create_task(client.wait(task.id))

            async def polls() -> float:
                samples = parse_samples(await client.metrics())
                return samples.get(("/v1/tasks/{id}", "200"), 0.0)

            async with asyncio.timeout(QUICK):
                await eventually(lambda: _at_least(polls, 3))
            gate.release.set()
            async with asyncio.timeout(QUICK):
                assert (await waiting).state is TaskState.SUCCEEDED
            elapsed = asyncio.get_running_loop().time() - started
            # One poll per MIN_POLL at most (and the last one), not thousands a second.
            assert await polls() <= elapsed / MIN_POLL + 3


async def _at_least(probe: Callable[[], Awaitable[float]], n: float) -> bool | None:
    return (await probe()) >= n or None


def parse_samples(text: str) -> dict[tuple[str, str], float]:
    """offload_http_requests_total by (route, code)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "offload_http_requests_total":
                found[(sample.labels["route"], sample.labels["code"])] = sample.value
    return found


async def test_what_is_not_a_task_id_never_reaches_another_path(api: Daemon) -> None:
    async with OffloadClient(url(api)) as client:
        for sneaky in ("../../v1/queues/default/pause?x=", "..", "x/../../queues", ""):
            with pytest.raises(ClientError) as refused:
                await client.retry(sneaky)
            assert (refused.value.status, refused.value.code, refused.value.field) == (
                404,
                "not_found",
                "id",
            )
            with pytest.raises(ClientError):
                await client.get(sneaky)
        assert not [q for q in await client.queues() if q.paused]


async def test_queues_and_schedules_are_listed_paused_and_resumed(tmp_path: Path) -> None:
    schedule = {"name": "nightly", "cron": "0 3 * * *", "type": "noop"}
    async with (
        open_daemon(tmp_path, {"schedules": [schedule]}) as api,
        OffloadClient(url(api)) as client,
    ):
        with pytest.raises(ClientError) as bad_name:
            await client.pause_queue("tenant/../7")  # quoted: one segment, not a queue name
        assert (bad_name.value.status, bad_name.value.field) == (404, "name")
        paused = await client.pause_queue("tenant-7")
        assert (paused.name, paused.paused, paused.configured) == ("tenant-7", True, False)
        assert {q.name for q in await client.queues() if q.paused} == {"tenant-7"}
        assert (await client.resume_queue("tenant-7")).paused is False

        (listed,) = await client.schedules()
        assert (listed.name, listed.cron, listed.paused) == ("nightly", "0 3 * * *", False)
        assert listed.next_fire is not None and listed.next_fire.tzinfo is not None
        assert (await client.pause_schedule("nightly")).paused is True
        assert (await client.resume_schedule("nightly")).paused is False
        with pytest.raises(ClientError) as missing:
            await client.pause_schedule("nope")
        assert missing.value.status == 404


async def test_payloads_json_cannot_carry_are_refused_before_sending(api: Daemon) -> None:
    async with OffloadClient(url(api)) as client:
        with pytest.raises(ValueError, match=r"payload\.x holds nan"):
            await client.submit("noop", {"x": float("nan")})
        with pytest.raises(ValueError, match=r"tasks\[1\]\.payload\[0\] holds inf"):
            await client.submit_batch(
                [Submission(type="noop", payload={}), Submission(type="noop", payload=[math.inf])]
            )
        ids = await client.submit_batch(
            [Submission(type="noop", delay=dt.timedelta(hours=1))]  # type: ignore[arg-type]
        )
        assert (await client.get(ids[0])).state is TaskState.QUEUED
    assert await api.count() == 1


def test_client_errors_survive_pickle_and_copy() -> None:
    error = ClientError(503, "draining", "offload is draining", field="x", retry_after=30.0)
    for again in (pickle.loads(pickle.dumps(error)), copy.copy(error)):
        assert type(again) is ClientError
        assert (again.status, again.code, again.field, again.retry_after) == (
            503,
            "draining",
            "x",
            30.0,
        )
        assert str(again) == str(error)
    gone = pickle.loads(pickle.dumps(Unreachable("no answer")))
    assert (type(gone), gone.status, gone.message) == (Unreachable, 0, "no answer")


def test_a_url_without_scheme_or_a_token_with_a_line_break_is_refused() -> None:
    with pytest.raises(ValueError, match="http:// or https://"):
        OffloadClient("127.0.0.1:8080")
    for malformed in ("unix:", "unix:run/offload.sock", "unix://run/offload.sock"):
        with pytest.raises(ValueError, match='expected "unix:/absolute/path"'):
            OffloadClient(malformed)
    with pytest.raises(ValueError, match="holds a NUL"):
        OffloadClient("unix:/run/off\0load.sock")
    with pytest.raises(ValueError, match="107 bytes at most"):
        OffloadClient("unix:/" + "s" * 107)
    assert OffloadClient("unix:/" + "s" * 106).url == "unix:/" + "s" * 106
    with pytest.raises(ValueError, match="line break"):
        OffloadClient(token="secret-token-0123456789\n")


async def test_many_waits_leave_the_other_calls_a_connection(api: Daemon) -> None:
    """Each long-poll holds a connection for its whole step; more of them than aiohttp's
    pool (100) must not leave a plain call queueing behind them until it times out."""
    gate = api.gate()
    port = int(api.config.server.listen.rpartition(":")[2])
    async with OffloadClient(url(api), wait_step=20, request_timeout=QUICK) as client:
        task = await client.submit("block", {"gate": gate.key})
        waits = [asyncio.create_task(client.wait(task.id)) for _ in range(110)]

        async def pool_full() -> bool | None:
            return True if _established_to(port) >= 100 else None

        async with asyncio.timeout(QUICK):
            await eventually(pool_full)  # the polls hold 100 connections for 20 s
        async with asyncio.timeout(QUICK):
            assert (await client.ready()).status == "ready"
        gate.release.set()
        async with asyncio.timeout(QUICK * 6):
            ended = await asyncio.gather(*waits)
    assert {t.state for t in ended} == {TaskState.SUCCEEDED}


def _established_to(port: int) -> int:
    """Established TCP connections whose server end is 127.0.0.1:`port` (/proc/net/tcp)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "01" and int(local.rpartition(":")[2], 16) == port:
            count += 1
    return count
