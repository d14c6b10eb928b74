"""The `Store` contract: each behaviour of `daemon/store/base.py` asserted once, run against
every backend through the parametrized `store` fixture (see `STORE_BACKENDS` in inproc.py).
The SQLite-only behaviours (the file lock, the bounded WAL, group commit) come last."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import msgspec
import pytest

from daemon.config import StoreConfig
from daemon.errors import Conflict, NotFound, QueueFull, StoreLocked
from daemon.ids import new_id
from daemon.models import (
    SCAN_ROWS,
    Attempt,
    Changes,
    Claim,
    Counts,
    Failed,
    Listing,
    NewTask,
    Outcome,
    Released,
    Retry,
    Succeeded,
    Task,
    TaskQuery,
    TaskState,
)
from daemon.store import Store, sqlite_writer
from daemon.store.postgres import PostgresStore
from daemon.store.sqlite import SQLiteStore, open_sqlite
from daemon.store.sqlite_batch import PROMOTE_ROWS
from daemon.store.sqlite_schema import MIGRATIONS
from tests.harness import eventually
from tests.inproc import store_fixture  # noqa: F401 (the `store` fixture)

OWNER = "test-host:1"
LEASE = 60.0
ROOM = 1_000_000  # a max_pending that never binds
T0 = time.time()


def new_task(
    n: int,
    *,
    type: str = "noop",
    queue: str = "default",
    priority: int = 0,
    delay: float = 0.0,
    max_attempts: int = 3,
) -> NewTask:
    """The `n`th task of a test: created `n` ms after T0, so ids sort by `n`."""
    created = T0 + n / 1000
    return NewTask(
        id=new_id(created),
        type=type,
        queue=queue,
        payload=b'{"n":%d}' % n,
        priority=priority,
        run_at=created + delay,
        created_at=created,
        timeout=30.0,
        max_attempts=max_attempts,
    )


async def admit(store: Store, *tasks: NewTask) -> list[Task]:
    return await store.admit(tasks, max_pending=ROOM)


async def claim(store: Store, limit: int = 100, now: float = T0 + 1) -> list[Claim]:
    return (await store.claim(owner=OWNER, limit=limit, now=now, lease=LEASE)).claims


async def claim_one(store: Store, task: NewTask, now: float = T0 + 1) -> Claim:
    """Admit `task` alone and claim it."""
    await admit(store, task)
    (claimed,) = await claim(store, now=now)
    assert claimed.task.id == task.id
    return claimed


async def state(store: Store, task_id: str) -> TaskState:
    task = await store.get(task_id)
    assert task is not None
    return task.state


def ids(tasks: Sequence[Task | NewTask | Claim]) -> list[str]:
    return [t.task.id if isinstance(t, Claim) else t.id for t in tasks]


async def listed(store: Store, query: TaskQuery) -> list[Task]:
    """The tasks of a page, where the test needs no more of it."""
    return (await store.list(query)).tasks


async def changed(
    store: Store, *, after: int, limit: int, task_id: str | None = None, type: str | None = None
) -> list[Task]:
    """The tasks of `changes()`, where the test needs no more of it."""
    return (await store.changes(after=after, limit=limit, task_id=task_id, type=type)).tasks


# -- admit, get ------------------------------------------------------------------------------


async def test_admitted_tasks_are_queued_and_readable(store: Store) -> None:
    new = new_task(1, type="sleep", queue="reports", priority=3, delay=5, max_attempts=4)

    (admitted,) = await admit(store, new)

    assert await store.get(new.id) == admitted
    assert admitted == Task.admitted(new, changed=admitted.changed)
    assert admitted.changed > 0
    assert admitted.state is TaskState.QUEUED
    assert (admitted.attempts, admitted.started_at, admitted.history) == (0, None, ())
    assert await store.get(new_id()) is None


async def test_admit_is_all_or_nothing_past_max_pending(store: Store) -> None:
    await store.admit([new_task(1), new_task(2)], max_pending=3)
    over = [new_task(3), new_task(4)]

    with pytest.raises(QueueFull) as refused:
        await store.admit(over, max_pending=3)

    assert (refused.value.pending, refused.value.needed) == (2, 1)
    assert [await store.get(t.id) for t in over] == [None, None]
    assert await store.counts() == Counts(queued=2)
    await store.admit([new_task(5)], max_pending=3)  # exactly at the limit is fine
    assert await store.counts() == Counts(queued=3)


# -- claim -----------------------------------------------------------------------------------


async def test_claim_takes_highest_priority_then_oldest(store: Store) -> None:
    low, high, low2, high2, lowest = (
        new_task(1),
        new_task(2, priority=5),
        new_task(3),
        new_task(4, priority=5),
        new_task(5, priority=-1),
    )
    await admit(store, low, high, low2, high2, lowest)
    now = T0 + 1

    first = await claim(store, limit=3, now=now)

    assert ids(first) == [high.id, high2.id, low.id]
    for c in first:
        assert (c.owner, c.attempt, c.lease_until) == (OWNER, 1, now + LEASE)
        assert c.task.state is TaskState.RUNNING
        assert (c.task.attempts, c.task.started_at) == (1, now)
        assert await store.get(c.task.id) == c.task
    assert ids(await claim(store)) == [low2.id, lowest.id]
    assert await claim(store) == []


async def test_a_run_starts_no_earlier_than_its_task_was_created(store: Store) -> None:
    # The feeder takes `now` before its claim reaches the store, and a task admitted in
    # between (due at once; or due in the past, as a client may ask) is claimed with it.
    late = msgspec.structs.replace(new_task(500), run_at=T0)
    await admit(store, late)

    (claimed,) = await claim(store, now=T0 + 0.25)

    assert claimed.task.started_at == late.created_at
    assert (await store.get(late.id)) == claimed.task


async def test_claim_can_be_narrowed_by_type(store: Store) -> None:
    a, b, c = new_task(1, type="a"), new_task(2, type="b"), new_task(3, type="c")
    await admit(store, a, b, c)

    only_b = await store.claim(owner=OWNER, limit=10, now=T0 + 1, lease=LEASE, only_type="b")
    not_c = await store.claim(owner=OWNER, limit=10, now=T0 + 1, lease=LEASE, skip_types=["c"])

    assert ids(only_b.claims) == [b.id]
    assert ids(not_c.claims) == [a.id]
    assert await state(store, c.id) is TaskState.QUEUED


async def test_a_delayed_task_is_not_claimed_before_run_at(store: Store) -> None:
    later, now_ = new_task(1, delay=60), new_task(2)
    await admit(store, later, now_)

    batch = await store.claim(owner=OWNER, limit=10, now=T0 + 1, lease=LEASE)

    assert ids(batch.claims) == [now_.id]
    assert batch.next_due == pytest.approx(later.run_at)
    early = await store.claim(owner=OWNER, limit=10, now=later.run_at - 0.5, lease=LEASE)
    assert early.claims == []
    assert early.next_due == pytest.approx(later.run_at)
    due = await store.claim(owner=OWNER, limit=10, now=later.run_at, lease=LEASE)
    assert (ids(due.claims), due.next_due) == ([later.id], None)


async def test_a_task_that_came_due_is_claimed_by_priority_among_the_others(
    store: Store,
) -> None:
    waiting = [new_task(n, delay=10, priority=n % 3) for n in range(1, 7)]
    ready = [new_task(n, priority=1) for n in range(7, 10)]
    await admit(store, *waiting, *ready)

    before = await store.claim(owner=OWNER, limit=2, now=T0 + 1, lease=LEASE)
    after = await store.claim(owner=OWNER, limit=100, now=T0 + 11, lease=LEASE)

    assert ids(before.claims) == ids(ready[:2])
    # Highest priority first, then in order of admission, delayed or not.
    left = [*waiting, ready[2]]
    order = sorted(range(len(left)), key=lambda i: (-left[i].priority, i))
    assert ids(after.claims) == [left[i].id for i in order]
    assert after.next_due is None


# -- record ----------------------------------------------------------------------------------


async def test_success_is_recorded(store: Store) -> None:
    claimed = await claim_one(store, new_task(1))

    done = await store.record(claimed, Succeeded(result=b'{"ok":true}', finished_at=T0 + 2))

    assert done is not None
    assert (done.state, done.result, done.finished_at) == (
        TaskState.SUCCEEDED,
        b'{"ok":true}',
        T0 + 2,
    )
    assert await store.get(done.id) == done
    assert await store.counts() == Counts(succeeded=1)


async def test_bytes_and_times_survive_claim_and_record_exactly(store: Store) -> None:
    payload = '{ "text": "caf\u00e9 \\u00e9 \\"q\\"",\n  "n": 1.50 }'.encode()
    task = msgspec.structs.replace(new_task(1), payload=payload, run_at=T0 + 0.123456789)
    claimed = await claim_one(store, task, now=T0 + 1)
    assert (claimed.task.payload, claimed.task.run_at) == (payload, task.run_at)
    assert claimed.task.created_at == task.created_at

    result = '["\u00fcber", {"x": null}]'.encode()
    done = await store.record(claimed, Succeeded(result=result, finished_at=T0 + 2.000001))

    assert done is not None and done.result == result
    assert await store.get(task.id) == done


async def test_a_claimed_task_is_the_row_as_the_claim_left_it(store: Store) -> None:
    # Every field set, and a second attempt (so a history and an error), as the store's
    # claim and admission make their tasks without reading the rows back.
    new = msgspec.structs.replace(
        new_task(1, type="sleep", queue="reports", priority=4, delay=0.5, max_attempts=5),
        callback="example",
        timeout=12.5,
    )
    (admitted,) = await admit(store, new)
    assert await store.get(new.id) == admitted
    assert admitted.callback_state == "pending"
    (claimed,) = await claim(store, now=T0 + 1)
    assert await store.get(new.id) == claimed.task
    await store.record(claimed, Retry(error="again", run_at=T0 + 2, duration=0.25))
    (again,) = await claim(store, now=T0 + 3)

    assert await store.get(new.id) == again.task
    assert (again.attempt, again.task.attempts, again.task.last_error) == (2, 2, "again")
    assert again.task.history == (
        Attempt(attempt=1, started_at=T0 + 1, duration=0.25, error="again"),
    )
    assert (again.owner, again.lease_until) == (OWNER, T0 + 3 + LEASE)
    assert admitted.changed < claimed.task.changed < again.task.changed


async def test_record_many_keeps_order_and_reports_each(store: Store) -> None:
    await admit(store, *(new_task(n) for n in range(4)))
    claims = await claim(store)
    lost = claims[1]
    await store.record(lost, Succeeded(result=None, finished_at=T0 + 2))
    outcomes: list[tuple[Claim, Outcome]] = [
        (claims[0], Succeeded(result=b"0", finished_at=T0 + 2)),
        (lost, Succeeded(result=b"late", finished_at=T0 + 3)),
        (claims[2], Retry(error="again", run_at=T0 + 9, duration=0.5)),
        (claims[3], Succeeded(result=b"3", finished_at=T0 + 2)),
    ]

    recorded = await store.record_many(outcomes)

    assert recorded[1] is None
    states = [r.state if isinstance(r, Task) else r for r in recorded]
    assert states == [TaskState.SUCCEEDED, None, TaskState.QUEUED, TaskState.SUCCEEDED]
    for claimed, found in zip(claims, recorded, strict=True):
        if isinstance(found, Task):
            assert await store.get(claimed.task.id) == found
    assert (await store.get(lost.task.id)).result is None  # type: ignore[union-attr]


async def test_record_is_fenced_on_the_claim(store: Store) -> None:
    claimed = await claim_one(store, new_task(1))
    done = await store.record(claimed, Succeeded(result=b"1", finished_at=T0 + 2))

    again = await store.record(claimed, Failed(error="late", finished_at=T0 + 3, duration=1))
    twice = await store.record(claimed, Succeeded(result=b"2", finished_at=T0 + 3))

    assert (again, twice) == (None, None)
    assert await store.get(claimed.task.id) == done


async def test_record_of_an_older_attempt_changes_nothing(store: Store) -> None:
    first = await claim_one(store, new_task(1))
    await store.record(first, Retry(error="e1", run_at=T0 + 2, duration=0.1))
    (second,) = await claim(store, now=T0 + 2)
    assert second.attempt == 2

    stale = await store.record(first, Succeeded(result=b"1", finished_at=T0 + 3))

    assert stale is None
    assert await store.get(first.task.id) == second.task


async def test_record_after_cancel_changes_nothing(store: Store) -> None:
    claimed = await claim_one(store, new_task(1))
    cancelled, before = await store.cancel(claimed.task.id, now=T0 + 2)

    late = await store.record(claimed, Succeeded(result=b"1", finished_at=T0 + 3))

    assert late is None
    assert before is TaskState.RUNNING
    assert await store.get(claimed.task.id) == cancelled
    assert cancelled.result is None


async def test_released_goes_back_without_spending_an_attempt(store: Store) -> None:
    claimed = await claim_one(store, new_task(1))

    back = await store.record(claimed, Released())

    assert back is not None
    assert (back.state, back.attempts, back.started_at) == (TaskState.QUEUED, 0, None)
    (again,) = await claim(store, now=T0 + 2)
    assert again.attempt == 1


async def test_retry_outcome_requeues_until_run_at_with_the_error(store: Store) -> None:
    claimed = await claim_one(store, new_task(1), now=T0 + 1)

    back = await store.record(claimed, Retry(error="boom", run_at=T0 + 30, duration=0.5))

    assert back is not None
    assert (back.state, back.attempts, back.run_at) == (TaskState.QUEUED, 1, T0 + 30)
    assert back.last_error == "boom"
    assert back.history == (Attempt(attempt=1, started_at=T0 + 1, duration=0.5, error="boom"),)
    batch = await store.claim(owner=OWNER, limit=10, now=T0 + 2, lease=LEASE)
    assert (batch.claims, batch.next_due) == ([], T0 + 30)


async def test_a_retried_task_is_claimed_again_once_due(store: Store) -> None:
    claimed = await claim_one(store, new_task(1), now=T0 + 1)
    await store.record(claimed, Retry(error="boom", run_at=T0 + 30, duration=0.5))

    early = await store.claim(owner=OWNER, limit=10, now=T0 + 29, lease=LEASE)
    due = await store.claim(owner=OWNER, limit=10, now=T0 + 30, lease=LEASE)

    assert (early.claims, early.next_due) == ([], T0 + 30)
    assert [(c.task.id, c.attempt) for c in due.claims] == [(claimed.task.id, 2)]


async def test_failed_outcome_ends_the_task(store: Store) -> None:
    claimed = await claim_one(store, new_task(1), now=T0 + 1)

    done = await store.record(claimed, Failed(error="bad", finished_at=T0 + 2, duration=1.0))

    assert done is not None
    assert (done.state, done.finished_at, done.last_error) == (TaskState.FAILED, T0 + 2, "bad")
    assert done.history == (Attempt(attempt=1, started_at=T0 + 1, duration=1.0, error="bad"),)
    assert await store.counts() == Counts(failed=1)


# -- cancel, retry ---------------------------------------------------------------------------


async def test_cancel_of_queued_running_terminal_and_unknown(store: Store) -> None:
    queued, running, done = new_task(1, delay=60), new_task(2), new_task(3, delay=60)
    await admit(store, queued, running)
    (claimed,) = await claim(store)
    assert claimed.task.id == running.id
    await admit(store, done)
    await store.cancel(done.id, now=T0 + 1)

    assert (await store.cancel(queued.id, now=T0 + 5))[1] is TaskState.QUEUED
    cancelled, before = await store.cancel(running.id, now=T0 + 5)
    assert before is TaskState.RUNNING
    assert (cancelled.state, cancelled.finished_at) == (TaskState.CANCELLED, T0 + 5)
    assert await store.get(running.id) == cancelled
    with pytest.raises(Conflict):
        await store.cancel(done.id, now=T0 + 6)
    with pytest.raises(NotFound):
        await store.cancel(new_id(), now=T0 + 6)
    assert await store.counts() == Counts(cancelled=3)


async def test_cancel_frees_room_for_admission(store: Store) -> None:
    first = new_task(1)
    await store.admit([first], max_pending=1)
    await store.cancel(first.id, now=T0 + 1)

    await store.admit([new_task(2)], max_pending=1)

    assert await store.counts() == Counts(queued=1, cancelled=1)


async def test_retry_of_a_failed_task_gives_a_fresh_attempt_budget(store: Store) -> None:
    claimed = await claim_one(store, new_task(1, max_attempts=1))
    await store.record(claimed, Failed(error="bad", finished_at=T0 + 2, duration=1))

    back = await store.retry(claimed.task.id, now=T0 + 10, max_pending=ROOM)

    assert (back.state, back.run_at, back.finished_at) == (TaskState.QUEUED, T0 + 10, None)
    assert (back.attempts, back.attempts_left) == (1, 1)
    assert await store.get(back.id) == back
    (again,) = await claim(store, now=T0 + 10)
    assert again.attempt == 2
    done = await store.record(again, Succeeded(result=None, finished_at=T0 + 11))
    assert done is not None
    assert done.state is TaskState.SUCCEEDED


async def test_retry_refuses_unfinished_unknown_and_over_max_pending(store: Store) -> None:
    queued, cancelled = new_task(1), new_task(2)
    await admit(store, queued, cancelled)
    await store.cancel(cancelled.id, now=T0 + 1)

    with pytest.raises(Conflict):
        await store.retry(queued.id, now=T0 + 2, max_pending=ROOM)
    with pytest.raises(NotFound):
        await store.retry(new_id(), now=T0 + 2, max_pending=ROOM)
    with pytest.raises(QueueFull):
        await store.retry(cancelled.id, now=T0 + 2, max_pending=1)
    assert await state(store, cancelled.id) is TaskState.CANCELLED
    back = await store.retry(cancelled.id, now=T0 + 2, max_pending=2)
    assert back.state is TaskState.QUEUED


# -- recover ---------------------------------------------------------------------------------


async def test_recover_puts_running_tasks_back_or_fails_them(store: Store) -> None:
    spare, last, waiting = new_task(1), new_task(2, max_attempts=1), new_task(3, delay=60)
    await admit(store, spare, last, waiting)
    assert len(await claim(store, now=T0 + 1)) == 2

    # Restarted under the same name (a shared store leaves another name's unexpired leases
    # to expire: tests/test_postgres_liveness.py).
    recovered = await store.recover(owner=OWNER, now=T0 + 5)

    assert recovered == 2
    back = await store.get(spare.id)
    assert back is not None
    assert (back.state, back.attempts, back.run_at) == (TaskState.QUEUED, 1, T0 + 5)
    assert back.last_error is not None
    assert [(h.attempt, h.started_at) for h in back.history] == [(1, T0 + 1)]
    gone = await store.get(last.id)
    assert gone is not None
    assert (gone.state, gone.finished_at, gone.attempts) == (TaskState.FAILED, T0 + 5, 1)
    assert len(gone.history) == 1
    assert await state(store, waiting.id) is TaskState.QUEUED
    assert await store.counts() == Counts(queued=2, failed=1)
    (again,) = await claim(store, now=T0 + 5)
    assert (again.task.id, again.attempt) == (spare.id, 2)


# -- list, counts ----------------------------------------------------------------------------


async def test_list_filters_and_pages_newest_first(store: Store) -> None:
    tasks = [
        new_task(n, type="a" if n % 2 else "b", queue="q1" if n < 4 else "q2") for n in range(7)
    ]
    await admit(store, *tasks)
    (claimed,) = await claim(store, limit=1)
    newest_first = sorted(ids(tasks), reverse=True)

    assert ids(await listed(store, TaskQuery())) == newest_first
    type_a = {t.id for t in tasks if t.type == "a"}
    assert ids(await listed(store, TaskQuery(type="a"))) == [i for i in newest_first if i in type_a]
    assert ids(await listed(store, TaskQuery(queue="q2", type="b"))) == [tasks[6].id, tasks[4].id]
    assert ids(await listed(store, TaskQuery(state=TaskState.RUNNING))) == [claimed.task.id]
    pages: list[str] = []
    before: str | None = None
    while page := await listed(store, TaskQuery(limit=3, before=before)):
        assert len(page) <= 3
        pages += ids(page)
        before = page[-1].id
    assert pages == newest_first


async def test_a_page_ends_at_the_task_that_passes_its_byte_budget(store: Store) -> None:
    tasks = [msgspec.structs.replace(new_task(n), payload=b'"%s"' % (b"x" * 98)) for n in range(5)]
    await admit(store, *tasks)
    newest_first = sorted(ids(tasks), reverse=True)

    # 100 bytes each: the third passes 250 and ends the page; alone, one is always there.
    assert ids(await listed(store, TaskQuery(max_bytes=250))) == newest_first[:3]
    assert ids(await listed(store, TaskQuery(max_bytes=10))) == newest_first[:1]
    assert ids(await listed(store, TaskQuery(max_bytes=10_000))) == newest_first
    after = await listed(store, TaskQuery(max_bytes=250, before=newest_first[2]))
    assert ids(after) == newest_first[3:]


async def test_results_count_toward_a_pages_byte_budget(store: Store) -> None:
    tasks = [msgspec.structs.replace(new_task(n), payload=b'"%s"' % (b"x" * 98)) for n in range(3)]
    await admit(store, *tasks)
    claims = {c.task.id: c for c in await claim(store, limit=3)}
    result = b'"%s"' % (b"r" * 198)  # the middle task: 100 + 200 bytes
    await store.record(claims[tasks[1].id], Succeeded(result=result, finished_at=T0 + 1))
    newest_first = sorted(ids(tasks), reverse=True)  # sizes 100, 300, 100

    assert ids(await listed(store, TaskQuery(max_bytes=450))) == newest_first  # 100, 400, 500
    assert ids(await listed(store, TaskQuery(max_bytes=350))) == newest_first[:2]
    assert ids(await listed(store, TaskQuery(max_bytes=50))) == newest_first[:1]


async def test_a_page_after_a_cursor_whose_task_was_purged_goes_on_below_it(
    store: Store,
) -> None:
    tasks = [new_task(n) for n in range(6)]
    await admit(store, *tasks)
    newest_first = sorted(ids(tasks), reverse=True)
    first = await listed(store, TaskQuery(limit=2))
    cursor = first[-1]
    # Retention deletes the task the cursor names between two pages.
    claimed = {c.task.id: c for c in await claim(store, limit=6)}
    await store.record(claimed[cursor.id], Succeeded(result=None, finished_at=T0 + 1))
    assert await store.purge(finished_before=T0 + 2, limit=10) == 1

    rest = await listed(store, TaskQuery(limit=10, before=cursor.id))

    assert ids(rest) == newest_first[2:]


async def test_a_filtered_page_examines_at_most_max_scan_tasks(store: Store) -> None:
    # 50 tasks, 3 of them needles; pages of a filter examine 10 tasks each.
    planted = {7, 8, 31}
    tasks = [new_task(n, type="needle" if n in planted else "hay") for n in range(50)]
    await admit(store, *tasks)
    newest_first = sorted(ids(tasks), reverse=True)

    # A type no task has: each page is empty and ends at the 10th task below its cursor,
    # the last (the oldest task examined) included; the one after finds nothing more.
    stops, before = [], None
    for _ in range(10):
        page = await store.list(TaskQuery(type="nope", before=before, max_scan=10))
        assert page.tasks == []
        stops.append(page.scanned_to)
        if page.scanned_to is None:
            break
        before = page.scanned_to
    assert stops == [newest_first[9], newest_first[19], newest_first[29], newest_first[39],
                     newest_first[49], None]  # fmt: skip

    # Following the pages as the API does finds every needle once, newest first.
    found, before, pages = [], None, 0
    while True:
        pages += 1
        page = await store.list(TaskQuery(type="needle", before=before, limit=2, max_scan=10))
        found += ids(page.tasks)
        if len(page.tasks) == 2:
            before = page.tasks[-1].id
            assert page.scanned_to is None
        elif page.scanned_to is not None:
            before = page.scanned_to
        else:
            break
    assert found == [tasks[31].id, tasks[8].id, tasks[7].id]
    # Tasks 49..40, 39..30 (31), 29..20, 19..10, 9..7 (8 and 7: a full page), 6..0 (fewer
    # than 10 left: the end).
    assert pages == 6


async def test_max_scan_counts_the_tasks_of_the_state_and_bounds_only_filters(
    store: Store,
) -> None:
    tasks = [new_task(n) for n in range(30)]
    await admit(store, *tasks)
    running = await claim(store, limit=3)
    newest_first = sorted(ids(tasks), reverse=True)

    # Three running tasks, fewer than the window: the page saw them all and says so.
    page = await store.list(TaskQuery(state=TaskState.RUNNING, type="nope", max_scan=10))
    assert page == Listing([], scanned_to=None)
    page = await store.list(TaskQuery(state=TaskState.RUNNING, type="noop", max_scan=10))
    assert ids(page.tasks) == sorted(ids(running), reverse=True)
    # Without a type or queue every task examined is a match: the bound does not apply.
    assert ids((await store.list(TaskQuery(max_scan=10))).tasks) == newest_first
    # A queue, like a type, is bounded.
    page = await store.list(TaskQuery(queue="default", limit=100, max_scan=10))
    assert (ids(page.tasks), page.scanned_to) == (newest_first[:10], newest_first[9])


async def test_filtered_changes_examine_at_most_max_scan_tasks(store: Store) -> None:
    planted = {3, 4, 17, 25}
    tasks = await admit(
        store, *(new_task(n, type="needle" if n in planted else "hay") for n in range(30))
    )
    in_change_order = sorted(tasks, key=lambda t: t.changed)
    start = in_change_order[0].changed - 1

    first = await store.changes(after=start, limit=500, type="nope", max_scan=10)
    assert first == Changes([], scanned_to=in_change_order[9].changed)

    # Resuming as the event replay does finds every needle once, in change order.
    found, after, reads = [], start, 0
    while True:
        reads += 1
        page = await store.changes(after=after, limit=1, type="needle", max_scan=10)
        found += ids(page.tasks)
        if page.tasks:
            after = page.tasks[-1].changed
        if page.scanned_to is not None:
            after = page.scanned_to
        elif len(page.tasks) < 1:
            break
        assert reads < 20, "the replay does not end"
    assert found == [t.id for t in in_change_order if t.type == "needle"]
    # By task id there is no window: the index finds the one task.
    by_id = await store.changes(after=start, limit=10, task_id=tasks[25].id, max_scan=1)
    assert (ids(by_id.tasks), by_id.scanned_to) == ([tasks[25].id], None)


@contextlib.asynccontextmanager
async def scans_held(store: Store) -> AsyncIterator[None]:
    """Every scan of `store` (listings, changes, counts) waits until the block is left: its
    scan thread (SQLite) or its one scan connection (PostgreSQL) is held meanwhile."""
    if isinstance(store, SQLiteStore):
        loop = asyncio.get_running_loop()
        held, release = asyncio.Event(), threading.Event()

        def hold(conn: sqlite3.Connection) -> None:
            loop.call_soon_threadsafe(held.set)
            release.wait(30)

        holding = asyncio.ensure_future(store._scans.run(hold))
        try:
            async with asyncio.timeout(10):
                await held.wait()
            yield
        finally:
            release.set()
            await holding
    else:
        assert isinstance(store, PostgresStore)
        async with store._scans:
            yield


async def test_a_point_read_never_waits_for_scans(store: Store) -> None:
    (task,) = await admit(store, new_task(1))
    async with scans_held(store):
        scans: list[asyncio.Task[Listing | Changes]] = [
            asyncio.create_task(store.list(TaskQuery(type="nope", max_scan=SCAN_ROWS)))
            for _ in range(20)
        ]
        scans.append(asyncio.create_task(store.changes(after=0, limit=10, type="nope")))
        # By construction: with the scans held, a read that queued behind them would not
        # be answered at all.
        async with asyncio.timeout(10):
            assert await store.get(task.id) == task
        assert not any(scan.done() for scan in scans)
    async with asyncio.timeout(10):
        answers = await asyncio.gather(*scans)
    assert [a.tasks for a in answers] == [[]] * 21


async def test_counts_by_state(store: Store) -> None:
    tasks = [new_task(n) for n in range(6)]
    await admit(store, *tasks)
    ok, bad, running = await claim(store, limit=3)
    await store.record(ok, Succeeded(result=None, finished_at=T0 + 2))
    await store.record(bad, Failed(error="x", finished_at=T0 + 2, duration=1))
    await store.cancel(tasks[5].id, now=T0 + 2)

    counts = await store.counts()

    assert counts == Counts(queued=2, running=1, succeeded=1, failed=1, cancelled=1)
    assert counts.pending == 3
    assert running.task.state is TaskState.RUNNING


async def test_unfinished_by_queue(store: Store) -> None:
    a1, a2, b1, b2 = (
        new_task(1, queue="a"),
        new_task(2, queue="a", delay=60),
        new_task(3, queue="b"),
        new_task(4, queue="c"),
    )
    await admit(store, a1, a2, b1, b2)
    claims = await claim(store, limit=3)
    assert ids(claims) == [a1.id, b1.id, b2.id]
    await store.record(claims[2], Succeeded(result=None, finished_at=T0 + 2))

    by_queue = await store.unfinished_by_queue()

    assert by_queue == {"a": Counts(queued=1, running=1), "b": Counts(running=1)}


async def unfinished_in_rows(store: Store) -> dict[str, Counts]:
    """What `unfinished_by_queue()` should say, from the tasks themselves."""
    found: dict[str, dict[str, int]] = {}
    for state in (TaskState.QUEUED, TaskState.RUNNING):
        for task in await listed(store, TaskQuery(state=state, limit=1000)):
            by_state = found.setdefault(task.queue, {})
            by_state[state.value] = by_state.get(state.value, 0) + 1
    return {queue: Counts(**by_state) for queue, by_state in found.items()}


async def test_unfinished_by_queue_follows_every_kind_of_change(store: Store) -> None:
    tasks = [new_task(n, queue="abc"[n % 3], max_attempts=1 + n % 2) for n in range(12)]
    await admit(store, *tasks)
    first = await claim(store, limit=8)
    outcomes: list[Outcome] = [
        Succeeded(result=None, finished_at=T0 + 2),
        Failed(error="bad", finished_at=T0 + 2, duration=0.1),
        Retry(error="again", run_at=T0 + 60, duration=0.1),
        Released(),
    ]
    await store.record_many([(c, outcomes[i % 4]) for i, c in enumerate(first[:6])])
    await store.cancel(first[6].task.id, now=T0 + 3)  # running
    await store.cancel(tasks[11].id, now=T0 + 3)  # queued
    await store.retry(first[1].task.id, now=T0 + 4, max_pending=ROOM)  # failed, queued again
    assert await store.unfinished_by_queue() == await unfinished_in_rows(store)
    await store.claim(owner=OWNER, limit=100, now=T0 + 61, lease=LEASE)
    assert await store.unfinished_by_queue() == await unfinished_in_rows(store)


async def test_check_answers(store: Store) -> None:
    async with asyncio.timeout(5):
        await store.check()


# -- SQLite only -----------------------------------------------------------------------------


def sqlite_config(tmp_path: Path) -> StoreConfig:
    return StoreConfig(url=f"sqlite:{tmp_path / 'solo.db'}", synchronous="normal")


async def test_changes_list_each_changed_task_once_in_change_order(store: Store) -> None:
    first, second, third = (new_task(n, type="t" if n else "u") for n in range(3))
    (a,) = await admit(store, first)
    await admit(store, second, third)
    claims = await claim(store, limit=1)  # `first`, the oldest
    done = await store.record(claims[0], Succeeded(result=None, finished_at=T0 + 2))
    assert done is not None

    changes = await changed(store, after=a.changed - 1, limit=10)
    # `first` changed last (it ran): once, in its latest state, after the others.
    assert ids(changes) == [second.id, third.id, first.id]
    assert changes[-1].state is TaskState.SUCCEEDED
    assert [c.changed for c in changes] == sorted(c.changed for c in changes)
    # Resume after an event: only what came later; filters narrow it.
    assert ids(await changed(store, after=changes[0].changed, limit=10)) == [third.id, first.id]
    assert ids(await changed(store, after=0, limit=10, type="t")) == [second.id, third.id]
    assert ids(await changed(store, after=0, limit=10, task_id=first.id)) == [first.id]
    assert len(await changed(store, after=0, limit=2)) == 2


async def test_purge_deletes_only_ended_tasks_finished_before_the_cutoff(store: Store) -> None:
    old, fresh, other, pending = (new_task(n, type="t" if n != 2 else "u") for n in range(4))
    await admit(store, old, fresh, other, pending)
    claims = {c.task.id: c for c in await claim(store, limit=3)}
    for task, finished in ((old, T0 + 10), (fresh, T0 + 100), (other, T0 + 10)):
        await store.record(claims[task.id], Succeeded(result=None, finished_at=finished))

    # Only `t` tasks, ended before T0 + 50: `old`. Not `fresh` (too recent), not `other` (a
    # `u`), never `pending` (not ended).
    assert await store.purge(finished_before=T0 + 50, limit=10, only_type="t") == 1
    assert await store.get(old.id) is None
    assert {t.id for t in await listed(store, TaskQuery())} == {fresh.id, other.id, pending.id}

    # Every type but `t`, in batches of `limit`.
    assert await store.purge(finished_before=T0 + 200, limit=10, skip_types=("t",)) == 1
    assert await store.get(other.id) is None
    assert await store.purge(finished_before=T0 + 200, limit=10) == 1
    assert {t.id for t in await listed(store, TaskQuery())} == {pending.id}


async def test_purge_deletes_in_batches_of_limit(store: Store) -> None:
    tasks = [new_task(n) for n in range(7)]
    await admit(store, *tasks)
    for claimed in await claim(store, limit=7):
        await store.record(claimed, Succeeded(result=None, finished_at=T0 + 1))
    deleted = [await store.purge(finished_before=T0 + 2, limit=3) for _ in range(4)]
    assert deleted == [3, 3, 1, 0]


async def test_sqlite_tasks_that_came_due_in_bulk_are_claimed_over_several_claims(
    tmp_path: Path,
) -> None:
    many = PROMOTE_ROWS + 1
    async with open_sqlite(sqlite_config(tmp_path)) as store:
        await admit(store, *(new_task(n, delay=10) for n in range(many)))

        first = await store.claim(owner=OWNER, limit=many, now=T0 + 20, lease=LEASE)
        # Not all came due in that claim: the next due time says to claim again now.
        assert len(first.claims) == PROMOTE_ROWS
        assert first.next_due is not None and first.next_due <= T0 + 20
        second = await store.claim(owner=OWNER, limit=many, now=T0 + 20, lease=LEASE)
        assert (len(second.claims), second.next_due) == (1, None)


async def test_sqlite_claims_promote_deferred_tasks_only_once_one_may_be_due(
    tmp_path: Path,
) -> None:
    async with open_sqlite(sqlite_config(tmp_path)) as store:
        promotions: list[str] = []

        def trace(conn: sqlite3.Connection) -> None:
            def seen(sql: str) -> None:
                if sql.startswith("UPDATE tasks SET deferred = 0"):
                    promotions.append(sql)

            conn.set_trace_callback(seen)

        await store.writer.submit(trace)
        await claim(store, now=T0 + 1)  # nothing is known of deferred tasks yet
        await claim(store, now=T0 + 2)  # the first claim found none
        assert len(promotions) == 1

        delayed = new_task(1, delay=100)
        await admit(store, delayed)
        assert await claim(store, now=T0 + 50) == []
        assert len(promotions) == 1  # none due yet: the admission said when one will be
        claimed = await claim(store, now=T0 + 101)
        assert ids(claimed) == [delayed.id] and len(promotions) == 2

        # A retry's run_at counts too, after a claim that found nothing deferred left.
        await store.record(claimed[0], Retry(error="boom", run_at=T0 + 200, duration=0.1))
        assert await claim(store, now=T0 + 150) == []
        assert len(promotions) == 2
        assert ids(await claim(store, now=T0 + 201)) == [delayed.id]
        assert len(promotions) == 3


async def test_sqlite_migration_keeps_delayed_tasks_waiting(tmp_path: Path) -> None:
    """A file from before `deferred` (schema 2): its delayed task still waits for run_at."""
    config = sqlite_config(tmp_path)
    conn = sqlite3.connect(tmp_path / "solo.db", isolation_level=None)
    for migration in MIGRATIONS[:2]:
        conn.executescript(migration)
    conn.execute("PRAGMA user_version = 2")
    for n, run_at in ((1, T0 + 60), (2, T0)):
        conn.execute(
            "INSERT INTO tasks (id, type, queue, state, payload, priority, run_at, created_at, "
            "timeout, max_attempts) VALUES (?, 'noop', 'default', 'queued', x'7b7d', 0, ?, ?, "
            "60, 3)",
            (new_id(T0 + n / 1000), run_at, T0),
        )
    conn.close()
    async with open_sqlite(config) as store:
        due = await store.claim(owner=OWNER, limit=10, now=T0 + 1, lease=LEASE)
        later = await store.claim(owner=OWNER, limit=10, now=T0 + 60, lease=LEASE)

    assert [c.task.run_at for c in due.claims] == [T0]
    assert due.next_due == T0 + 60
    assert [c.task.run_at for c in later.claims] == [T0 + 60]


async def test_sqlite_unfinished_counts_survive_a_reopen_and_a_crash_recovery(
    tmp_path: Path,
) -> None:
    config = sqlite_config(tmp_path)
    async with open_sqlite(config) as store:
        await admit(store, *(new_task(n, queue="ab"[n % 2]) for n in range(5)))
        await claim(store, limit=3)
    async with open_sqlite(config) as again:
        assert await again.unfinished_by_queue() == {
            "a": Counts(queued=1, running=2),
            "b": Counts(queued=1, running=1),
        }
        await again.recover(owner=OWNER, now=T0 + 5)
        assert await again.unfinished_by_queue() == {"a": Counts(queued=3), "b": Counts(queued=2)}
        assert await again.unfinished_by_queue() == await unfinished_in_rows(again)


async def test_sqlite_admissions_that_meet_in_one_insert_are_each_held_to_max_pending(
    tmp_path: Path,
) -> None:
    async with open_sqlite(sqlite_config(tmp_path)) as store:
        sizes = [4, 4, 4, 2, 1]
        batches = [[new_task(10 * b + i) for i in range(n)] for b, n in enumerate(sizes)]

        results = await asyncio.gather(
            *(store.admit(batch, max_pending=10) for batch in batches), return_exceptions=True
        )

        # In order: 4 + 4 fit, the third 4 would make 12, then 2 fits (10), then 1 does not.
        fitted = [not isinstance(r, BaseException) for r in results]
        assert fitted == [True, True, False, True, False]
        assert all(
            isinstance(r, QueueFull) for r, ok in zip(results, fitted, strict=True) if not ok
        )
        admitted = [t for r in results if isinstance(r, list) for t in r]
        assert ids(admitted) == ids(
            [t for b, ok in zip(batches, fitted, strict=True) if ok for t in b]
        )
        stored = await listed(store, TaskQuery(limit=100))
        assert sorted(ids(stored)) == sorted(ids(admitted))
        assert await store.unfinished_by_queue() == {"default": Counts(queued=10)}


@contextlib.asynccontextmanager
async def writer_held(store: SQLiteStore) -> AsyncIterator[None]:
    """The writer thread busy in an operation until the block ends: what is submitted
    meanwhile waits for it, and goes in one batch after it."""
    held, go = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        held.set()
        go.wait(10)

    blocker = store.writer.submit(hold)
    await asyncio.to_thread(held.wait, 10)
    try:
        yield
    finally:
        go.set()
        await blocker


async def test_sqlite_admissions_over_one_statement_get_every_row_in_order(
    tmp_path: Path,
) -> None:
    async with open_sqlite(sqlite_config(tmp_path)) as store:
        batches = [[new_task(1000 * b + i) for i in range(400)] for b in range(3)]
        # The writer held, so that all three wait for it and meet in one operation.
        async with writer_held(store):
            admitting = asyncio.gather(*(admit(store, *batch) for batch in batches))

            async def all_waiting() -> bool | None:
                return len(store._admissions._waiting) == len(batches) or None

            async with asyncio.timeout(10):
                await eventually(all_waiting, every=0.001)
        results = await admitting

        admitted = [t for r in results for t in r]
        assert [t.changed for t in admitted] == sorted({t.changed for t in admitted})
        changes = await changed(store, after=0, limit=len(admitted))
        assert [(t.id, t.changed) for t in changes] == [(t.id, t.changed) for t in admitted]


async def test_sqlite_second_open_is_locked_out(tmp_path: Path) -> None:
    config = sqlite_config(tmp_path)
    async with open_sqlite(config) as first:
        await admit(first, new_task(1))
        with pytest.raises(StoreLocked):
            async with open_sqlite(config):
                pass
        assert await first.counts() == Counts(queued=1)
    async with open_sqlite(config) as again:
        assert await again.counts() == Counts(queued=1)


async def test_sqlite_group_commit_batches_concurrent_admits(tmp_path: Path) -> None:
    async with open_sqlite(sqlite_config(tmp_path)) as store:
        before = store.writer.commits

        await asyncio.gather(*(admit(store, new_task(n)) for n in range(200)))

        assert store.writer.commits - before < 100
        assert await store.counts() == Counts(queued=200)


async def test_sqlite_a_lone_atomic_operation_commits_by_itself_others_share_one(
    tmp_path: Path,
) -> None:
    async with open_sqlite(sqlite_config(tmp_path)) as store:

        def in_transaction(conn: sqlite3.Connection) -> bool:
            return conn.in_transaction

        assert await store.writer.submit(in_transaction, atomic=True) is False
        assert await store.writer.submit(in_transaction) is True  # it gets a savepoint

        async with writer_held(store):  # the next two wait together and go in one batch
            together = [store.writer.submit(in_transaction, atomic=True) for _ in range(2)]
        assert await asyncio.gather(*together) == [True, True]
        # Autocommit left nothing open: the next transaction begins and commits.
        await admit(store, new_task(1))
        assert await store.counts() == Counts(queued=1)


async def test_sqlite_background_operations_commit_after_the_others_of_their_batch(
    tmp_path: Path,
) -> None:
    async with open_sqlite(sqlite_config(tmp_path)) as store:
        seen: list[tuple[str, int, bool]] = []  # (name, commits before it, in a transaction)

        def note(name: str) -> Callable[[sqlite3.Connection], None]:
            def op(conn: sqlite3.Connection) -> None:
                seen.append((name, store.writer.commits, conn.in_transaction))

            return op

        async with writer_held(store):  # all four wait together and go in one batch
            submitted = [
                store.writer.submit(note("claim"), atomic=True, background=True),
                store.writer.submit(note("admission"), atomic=True),
                store.writer.submit(note("record"), atomic=True, background=True),
                store.writer.submit(note("pause")),
            ]
        await asyncio.gather(*submitted)

        names = [name for name, _, _ in seen]
        assert names == ["admission", "pause", "claim", "record"]
        first, second = {c for _, c, _ in seen[:2]}, {c for _, c, _ in seen[2:]}
        # Two transactions, the background one committed after the other one.
        assert len(first) == len(second) == 1 and second == {first.pop() + 1}
        assert all(in_transaction for _, _, in_transaction in seen)

        # Alone, a background operation is just a batch of its own (autocommit if atomic).
        assert await store.writer.submit(lambda c: c.in_transaction, atomic=True,
                                         background=True) is False  # fmt: skip


async def test_sqlite_a_retry_committed_ahead_of_a_claim_runs_no_earlier_than_it(
    tmp_path: Path,
) -> None:
    async with open_sqlite(sqlite_config(tmp_path)) as store:
        failed = await claim_one(store, new_task(1, max_attempts=1))
        await store.record(failed, Failed(error="boom", finished_at=T0 + 2, duration=1.0))
        async with writer_held(store):  # the claim, then the retry, go in one batch
            claiming = asyncio.create_task(claim(store, now=T0 + 3))
            retrying = asyncio.create_task(
                store.retry(failed.task.id, now=T0 + 4, max_pending=ROOM)
            )

            async def both_waiting() -> bool | None:
                return store.writer._items.qsize() == 2 or None

            async with asyncio.timeout(10):
                await eventually(both_waiting, every=0.001)
        retried = await retrying
        (claimed,) = await claiming

        assert claimed.task.id == retried.id
        assert retried.run_at == T0 + 4
        assert claimed.task.started_at == retried.run_at
        assert await store.get(retried.id) == claimed.task


async def test_sqlite_wal_stays_bounded_under_constant_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The mechanism at a small scale: checked every 16 commits, forced past 256 KiB.
    limit = 256 * 1024
    monkeypatch.setattr(sqlite_writer, "WAL_LIMIT", limit)
    monkeypatch.setattr(sqlite_writer, "WAL_CHECK_EVERY", 16)
    config = sqlite_config(tmp_path)
    wal = Path(f"{tmp_path / 'solo.db'}-wal")
    payload = b'{"pad":"%s"}' % (b"x" * 8000)
    async with open_sqlite(config) as store:
        reading = asyncio.Event()
        done = asyncio.Event()

        async def read_constantly() -> int:
            reads = 0
            while not done.is_set():
                await listed(store, TaskQuery(limit=20))
                reads += 1
                reading.set()
            return reads

        reader = asyncio.create_task(read_constantly())
        await reading.wait()
        biggest = 0
        for n in range(600):
            padded = msgspec.structs.replace(new_task(n), payload=payload)
            await store.admit([padded], max_pending=ROOM)
            biggest = max(biggest, os.stat(wal).st_size)
        done.set()
        reads = await reader

    assert reads >= 10  # the reader really kept a snapshot open most of the time
    # Without the forced checkpoint this WAL grows past 4 MiB; with it, it stays near the
    # limit plus what 16 commits add (~40 KiB each).
    assert biggest < limit + 1024 * 1024, biggest


async def test_sqlite_checkpoints_off_the_commit_path_keep_the_wal_small(tmp_path: Path) -> None:
    # SQLite's automatic checkpoint is off; the writer's own, between batches, must do its
    # work, or these 600 commits of ~8 KiB (over 5 MiB in all) pile up in the WAL.
    config = sqlite_config(tmp_path)
    wal = Path(f"{tmp_path / 'solo.db'}-wal")
    payload = b'{"pad":"%s"}' % (b"x" * 8000)
    async with open_sqlite(config) as store:
        biggest = 0
        for n in range(600):
            padded = msgspec.structs.replace(new_task(n), payload=payload)
            await store.admit([padded], max_pending=ROOM)
            biggest = max(biggest, os.stat(wal).st_size)
        assert await store.counts() == Counts(queued=600)

    assert biggest < 2 * 1024 * 1024, biggest
