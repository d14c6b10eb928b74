"""The task and what happens to it, as plain values shared by the store, the API and the workers.

Times are Unix seconds (floats) everywhere inside; the API turns them into RFC 3339 text.
Payloads and results stay as JSON bytes from admission to the store and back.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec

# Names of queues, task types, schedules and callbacks: in the config, in the API's paths
# and bodies, in the OpenAPI document. Python's `$` also matches before a trailing newline
# ("billing\n" would pass); `\Z` is not ECMA-262, the JSON Schema dialect of the document.
# The lookahead refuses a newline anywhere and reads the same in both.
NAME_PATTERN = r"^(?!.*\n)[A-Za-z0-9_.-]{1,64}$"
Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]


class TaskState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})
UNFINISHED = (TaskState.QUEUED, TaskState.RUNNING)


class Attempt(msgspec.Struct, frozen=True):
    """One failed run, kept in a task's bounded history."""

    attempt: int
    started_at: float
    duration: float
    error: str


class NewTask(msgspec.Struct, frozen=True):
    """A task validated by admission, not yet committed."""

    id: str
    type: str
    queue: str
    payload: bytes
    priority: int
    run_at: float
    created_at: float
    timeout: float
    max_attempts: int
    callback: str | None = None


class Task(msgspec.Struct, frozen=True):
    """A task as the store holds it. `attempts` counts every run claimed, ever (started,
    or about to); `attempt_floor` is `attempts` at the last manual retry, so the budget is
    `max_attempts` runs after it."""

    id: str
    type: str
    queue: str
    state: TaskState
    payload: bytes
    priority: int
    run_at: float
    created_at: float
    timeout: float
    max_attempts: int
    attempts: int = 0
    attempt_floor: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    result: bytes | None = None
    last_error: str | None = None
    history: tuple[Attempt, ...] = ()
    callback: str | None = None
    callback_state: str | None = None  # "pending" (until delivered), "delivered", "failed"
    callback_attempts: int = 0
    callback_error: str | None = None
    changed: int = 0
    """The store's change sequence at this task's last state change: the event id of it."""

    @classmethod
    def admitted(cls, new: NewTask, changed: int = 0) -> Task:
        # Positional, in the fields' order: keywords made one take four times as long, and
        # one is made for every admission.
        return cls(
            new.id,
            new.type,
            new.queue,
            TaskState.QUEUED,
            new.payload,
            new.priority,
            new.run_at,
            new.created_at,
            new.timeout,
            new.max_attempts,
            0,  # attempts
            0,  # attempt_floor
            None,  # started_at
            None,  # finished_at
            None,  # result
            None,  # last_error
            (),  # history
            new.callback,
            "pending" if new.callback else None,  # callback_state
            0,  # callback_attempts
            None,  # callback_error
            changed,
        )

    @classmethod
    def from_columns(cls, row: Sequence[Any], at: int = 0) -> Task:
        """The task in `row[at:]`, laid out as the stores' COLUMNS: Task's fields in order
        but `changed` right after `history` (JSON text, or NULL for none)."""
        # Positional: keywords made a task take four times as long (a page holds 1,000).
        r = row[at:] if at else row
        return cls(
            r[0],  # id
            r[1],  # type
            r[2],  # queue
            TaskState(r[3]),
            r[4],  # payload
            r[5],  # priority
            r[6],  # run_at
            r[7],  # created_at
            float(r[8]),  # timeout: an expression's value may come back an integer
            r[9],  # max_attempts
            r[10],  # attempts
            r[11],  # attempt_floor
            r[12],  # started_at
            r[13],  # finished_at
            r[14],  # result
            r[15],  # last_error
            decode_history(r[16]),
            r[18],  # callback
            r[19],  # callback_state
            r[20],  # callback_attempts
            r[21],  # callback_error
            r[17],  # changed
        )

    @property
    def attempts_left(self) -> int:
        return self.max_attempts - (self.attempts - self.attempt_floor)


class Claim(msgspec.Struct, frozen=True):
    """A running task leased to `owner` until `lease_until`. Every write about this run is
    fenced on (task.id, running, attempt, owner): a writer that lost the task changes nothing."""

    task: Task
    owner: str
    attempt: int
    lease_until: float


class StartNow(msgspec.Struct, frozen=True):
    """Admit the task already running for `owner` (a consumer of it is idle), leased for
    `lease` seconds: one commit from request to start instead of two."""

    owner: str
    lease: float


class Succeeded(msgspec.Struct, frozen=True, tag=True):
    result: bytes | None
    finished_at: float


class Failed(msgspec.Struct, frozen=True, tag=True):
    """No more attempts: the task ends `failed`."""

    error: str
    finished_at: float
    duration: float


class Retry(msgspec.Struct, frozen=True, tag=True):
    """The run failed but attempts remain: back to `queued` until `run_at`."""

    error: str
    run_at: float
    duration: float


class Released(msgspec.Struct, frozen=True, tag=True):
    """The run was stopped by a shutdown: back to `queued`, the attempt not spent."""


Outcome = Succeeded | Failed | Retry | Released


class IdempotencyKey(msgspec.Struct, frozen=True):
    """An Idempotency-Key as the store checks it: scoped (to the caller), with the digest
    of the request body, valid for keys first seen after `not_before`."""

    scope: str
    key: str
    fingerprint: bytes
    not_before: float


# Rows a listing or an event replay filtered by type or queue examines per read at most.
# Neither filter has an index (each would cost every admission an index entry), so such a
# read walks the tasks in order and tests each; bounded, one read takes milliseconds
# however large the store, and the caller goes on from where it stopped.
SCAN_ROWS = 10_000


class TaskQuery(msgspec.Struct, frozen=True):
    """A page of tasks, newest first; `before` is the id the previous page ended at. With
    `max_bytes`, the page ends early at the task whose payload and result bring the page's
    total past it (that task included): a page of big payloads stays bounded in memory.
    With `max_scan`, a page filtered by `type` or `queue` examines at most that many tasks
    (of the `state`, if given) and may end short, even empty (see `Listing.scanned_to`)."""

    state: TaskState | None = None
    type: str | None = None
    queue: str | None = None
    before: str | None = None
    limit: int = 100
    max_bytes: int | None = None
    max_scan: int | None = None


class Listing(msgspec.Struct, frozen=True):
    """A page of `Store.list()`. `scanned_to` is set when the scan examined its `max_scan`
    tasks before it found `limit` or reached the end (nor did the byte budget end it): the
    id of the last task examined. Every match newer than it is in `tasks`; the next page
    starts below it (pass it as `before`)."""

    tasks: list[Task]
    scanned_to: str | None = None


class Changes(msgspec.Struct, frozen=True):
    """What `Store.changes()` found. `scanned_to` is set when the scan examined its
    `max_scan` tasks before it found `limit` or reached the end: the change number of the
    last task examined. Every matching change up to it is in `tasks`; go on after it."""

    tasks: list[Task]
    scanned_to: int | None = None


class Counts(msgspec.Struct, frozen=True):
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0

    @property
    def pending(self) -> int:
        return self.queued + self.running


class QueueHealth(msgspec.Struct, frozen=True):
    """The task table as the database's statistics see it (PostgreSQL)."""

    live_tuples: int
    dead_tuples: int
    last_vacuum: float | None  # Unix time of the last (auto)vacuum, None if never


class ScheduleState(msgspec.Struct, frozen=True):
    """What the store remembers of a cron schedule: its last fire (the time it was due,
    not when it ran) and whether it is paused."""

    last_fire: float | None = None
    paused: bool = False


_history = msgspec.json.Decoder(list[Attempt])


def decode_history(text: bytes | str | None) -> tuple[Attempt, ...]:
    """A task's history as the stores keep it: a JSON array of attempts (None: none)."""
    return () if text is None else tuple(_history.decode(text))
