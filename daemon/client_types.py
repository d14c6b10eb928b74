"""The typed answers of offload's HTTP API as the Python client decodes them
(daemon/client.py re-exports them): tasks, submissions' answers, pages, queues, schedules,
health, and the counts of /metrics."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

import msgspec
from prometheus_client.parser import text_string_to_metric_families

from daemon.models import TaskState

__all__ = [
    "Attempt",
    "Callback",
    "Health",
    "Queue",
    "QueueCounts",
    "Schedule",
    "Stats",
    "Submission",
    "Submitted",
    "SubmittedIds",
    "Task",
    "TaskPage",
    "TaskState",
    "parse_stats",
]


class Submission(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One task to submit (`OffloadClient.submit_batch`); unset fields take the server's
    defaults. `run_at` must be an aware datetime; `delay` (seconds) excludes it."""

    type: str
    payload: Any = msgspec.UNSET
    queue: str | msgspec.UnsetType = msgspec.UNSET
    priority: int | msgspec.UnsetType = msgspec.UNSET
    delay: float | msgspec.UnsetType = msgspec.UNSET
    run_at: dt.datetime | msgspec.UnsetType = msgspec.UNSET
    timeout: float | msgspec.UnsetType = msgspec.UNSET
    max_attempts: int | msgspec.UnsetType = msgspec.UNSET
    callback: str | msgspec.UnsetType = msgspec.UNSET


class Attempt(msgspec.Struct, frozen=True):
    """One failed run in a task's `history`."""

    attempt: int
    started_at: dt.datetime | None
    duration: float
    error: str


class Callback(msgspec.Struct, frozen=True):
    """The delivery of a task's completion callback (`[callbacks.NAME]`)."""

    name: str
    state: str  # "pending" until delivered, "delivered", or "failed" (retries exhausted)
    attempts: int
    last_error: str | None


_STATES = frozenset(s.value for s in TaskState)


class Task(msgspec.Struct, frozen=True):
    """A task as the server returns it (see the README's HTTP API). `payload` and `result`
    are the decoded JSON; times are aware UTC datetimes."""

    id: str
    type: str
    queue: str
    # A `TaskState` (a str enum) for every state this client knows; a newer server's state
    # it does not know stays a plain str, so that one task cannot fail a whole page.
    state: str
    payload: Any
    attempts: int
    max_attempts: int
    priority: int
    timeout: float
    run_at: dt.datetime | None
    created_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    result: Any
    last_error: str | None
    history: tuple[Attempt, ...] = ()
    callback: Callback | None = None

    def __post_init__(self) -> None:
        if self.state in _STATES:
            msgspec.structs.force_setattr(self, "state", TaskState(self.state))

    @property
    def ended(self) -> bool:
        """The task is `succeeded`, `failed` or `cancelled`: it will not change by itself (a
        state this client does not know is taken as not ended)."""
        return isinstance(self.state, TaskState) and self.state.terminal


class Submitted(Task, frozen=True):
    """A task as `OffloadClient.submit` answers it: a `Task`, and `replayed`, True when the
    server answered a retry of an earlier submission (the same `Idempotency-Key` and body)
    with that submission's task as it is now, creating nothing (`Idempotent-Replayed`)."""

    # Not a field the server sends in the task: it comes from the answer's header.
    replayed: bool = False


class SubmittedIds(list[str]):
    """The ids `OffloadClient.submit_batch` answers, in the order sent: a list of str, with
    `replayed` True when the server answered a retry of an earlier batch (the same
    `Idempotency-Key` and body) with that batch's ids, creating nothing."""

    def __init__(self, ids: Iterable[str] = (), *, replayed: bool = False) -> None:
        super().__init__(ids)
        self.replayed = replayed


class TaskPage(msgspec.Struct, frozen=True):
    """One page of a listing; pass `next_cursor` back as `cursor` (None on the last page).
    A page may hold fewer than `limit` tasks, even none, and not be the last."""

    tasks: list[Task]
    next_cursor: str | None


class Health(msgspec.Struct, frozen=True):
    """/healthz and /readyz: `ok`, `ready`, `starting` or `draining`."""

    status: str


class Queue(msgspec.Struct, frozen=True):
    """A queue as `GET /v1/queues` lists it: its settings (the defaults for a queue only
    tasks name, `configured` False), whether it is paused, its unfinished tasks and its
    recent completion rate."""

    name: str
    paused: bool
    weight: int
    concurrency: int
    rate: float
    burst: int
    queued: int
    running: int
    completed_per_second: float
    configured: bool = True


class Schedule(msgspec.Struct, frozen=True):
    """A cron schedule as `GET /v1/schedules` lists it."""

    name: str
    cron: str
    timezone: str
    type: str
    queue: str | None
    misfire: str
    paused: bool
    last_fire: dt.datetime | None
    next_fire: dt.datetime | None


class QueueCounts(msgspec.Struct, frozen=True):
    queued: int = 0
    running: int = 0


class Stats(msgspec.Struct, frozen=True):
    """Counts read from /metrics. `queues`: unfinished tasks per queue, from the store (at
    most a few seconds old). `since_start`: runs that ended in each outcome (succeeded,
    failed, retried, cancelled, released) and `accepted` tasks, since this daemon started."""

    queues: dict[str, QueueCounts]
    since_start: dict[str, int]
    accepted: int
    running_here: int


def parse_stats(text: str) -> Stats:
    """`Stats` from the Prometheus text of /metrics."""
    queues: dict[str, dict[str, int]] = {}
    since_start: dict[str, int] = {}
    accepted = running_here = 0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            value = int(sample.value)
            if sample.name == "offload_tasks":
                queue = queues.setdefault(sample.labels["queue"], {})
                queue[sample.labels["state"]] = value
            elif sample.name == "offload_tasks_total":
                outcome = sample.labels["outcome"]
                since_start[outcome] = since_start.get(outcome, 0) + value
            elif sample.name == "offload_tasks_accepted_total":
                accepted += value
            elif sample.name == "offload_tasks_running":
                running_here = value
    return Stats(
        queues={name: msgspec.convert(c, QueueCounts) for name, c in sorted(queues.items())},
        since_start=dict(sorted(since_start.items())),
        accepted=accepted,
        running_here=running_here,
    )


# The envelopes the API wraps lists in (and the batch request's body): the client's own,
# not part of what it exports.
class BatchBody(msgspec.Struct):
    tasks: list[Submission]


class IdList(msgspec.Struct):
    ids: list[str]


class QueueList(msgspec.Struct):
    queues: list[Queue]


class ScheduleList(msgspec.Struct):
    schedules: list[Schedule]
