"""A consumer: take a claim from the hand-off queue, run its executor under the task's
timeout, and record the outcome. A task's failure is recorded, never raised; only a bug in
this loop escapes to the TaskGroup (and then the process exits non-zero)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from typing import TYPE_CHECKING

import msgspec

from daemon.backoff import backoff_delay
from daemon.executors.base import Job, Permanent, RetryAfter, TaskLogger
from daemon.logs import task_line
from daemon.models import Claim, Failed, Outcome, Released, Retry, Succeeded, Task, TaskState
from daemon.recorder import Ended

if TYPE_CHECKING:
    from daemon.workers import Workers

logger = logging.getLogger(__name__)
_encode = msgspec.json.encode
_decode = msgspec.json.decode


@dataclass
class Run:
    """One task running in this process, in the consumer `task` (its own asyncio task
    would cost each run a task and a wake-up more) until `deadline` (the loop's clock);
    `reason` says why it was stopped."""

    claim: Claim
    task: asyncio.Task[object]
    deadline: float
    reason: str | None = None  # "cancel" | "shutdown" | "timeout"

    def stop(self, reason: str) -> None:
        """Cancel the run once: a second reason (its timeout while a cancel unwinds it)
        must not interrupt the clean-up of the first."""
        if self.reason is not None:
            return
        self.reason = reason
        self.task.cancel()

    def settle_stop(self) -> None:
        """After the run: take back the cancellation `stop()` asked for, so the consumer
        goes on; if someone else cancelled the consumer meanwhile, that one stands."""
        if self.reason is not None and self.task.uncancel() > 0:
            raise asyncio.CancelledError


async def consume(workers: Workers) -> None:
    """Run claims until cancelled (the drain ends idle consumers) or retired (a reload
    lowered the concurrency). Outcomes go to the recorder; the next claim does not wait
    for them to be written."""
    consumer = asyncio.current_task()  # the task each run is stopped through
    assert consumer is not None
    # Asked once: on Python 3.11 each get_running_loop() is a system call (getpid).
    loop = asyncio.get_running_loop()
    while True:
        claim = await workers.handoff.get()
        try:
            ended = await _run(workers, claim, consumer, loop)
        finally:
            workers.finished(claim)
        if ended is not None:
            workers.recorder.add(ended)
        if workers.retiring > 0:
            workers.retiring -= 1
            return


def _fields(claim: Claim, event: str) -> dict[str, object]:
    task = claim.task
    return {
        "event": event,
        "task_id": task.id,
        "task_type": task.type,
        "queue": task.queue,
        "attempt": claim.attempt,
    }


async def _run(
    workers: Workers,
    claim: Claim,
    consumer: asyncio.Task[object],
    loop: asyncio.AbstractEventLoop,
) -> Ended | None:
    task = claim.task
    earlier = workers.runs.get(task.id)
    if earlier is not None and earlier.reason is None:
        _supersede(claim, earlier)
    started = time.monotonic()
    run = Run(claim, consumer, loop.time() + task.timeout)
    workers.runs[task.id] = run
    workers.deadlines.watch(run, loop)
    try:
        outcome = await _outcome(workers, run, started)
    finally:
        # A stopped run may still unwind when a newer run of its task starts here (a retry
        # after a cancel, a claim made again): the newer run holds the id now.
        if workers.runs.get(task.id) is run:
            del workers.runs[task.id]
    run.settle_stop()
    if outcome is None:
        return None  # cancelled through the API, which already recorded it
    return Ended(claim, outcome, time.monotonic() - started)


def _supersede(claim: Claim, earlier: Run) -> None:
    """The store handed over a task that a run here still holds and nobody has stopped: a
    claim the store no longer knows (taken back after its lease expired, or undone by a
    database that lost a commit) and claimed again. That earlier claim is void (the row has
    moved on without it), so its run is stopped now, before the new one starts, rather than
    left running untracked: the new run takes its place in `workers.runs`, and the drain
    still waits for it (it holds its slot until it has unwound). Its clean-up may overlap
    the new run, as after a cancel and a retry. (On PostgreSQL the node stops it already
    when the claim comes back: `Node.held_add`.)"""
    logger.warning(
        "task %s was claimed again (attempt %d) while its attempt %d still ran here: "
        "stopping that run; its outcome will not be written",
        claim.task.id,
        claim.attempt,
        earlier.claim.attempt,
        extra=_fields(claim, "task.claimed_again"),
    )
    earlier.stop("cancel")


def settle(workers: Workers, ended: Ended, recorded: Task | None) -> None:
    """After the outcome of a run was written (or could not be)."""
    claim, outcome = ended.claim, ended.outcome
    task = claim.task
    workers.stats.completed(task.queue)
    if recorded is None:
        logger.warning(
            "task %s was taken from this run (cancelled or rescued); its outcome is dropped",
            task.id,
            extra=_fields(claim, "task.lost_claim"),
        )
        return
    _log_outcome(claim, outcome, ended.duration)
    _count(workers, claim, outcome, ended.duration)
    if recorded.state.terminal:
        workers.watchers.ended(task.id)
    elif recorded.state is TaskState.QUEUED:
        workers.feeder.wake()


@functools.cache
def _task_logger(type: str) -> logging.Logger:
    return logging.getLogger(f"daemon.task.{type}")


async def _execute(workers: Workers, claim: Claim) -> object:
    task = claim.task
    task_type = workers.types.get(task.type)
    if task_type is None:
        raise Permanent(f"task type {task.type!r} is no longer in the configuration")
    extra = _fields(claim, "task.log")
    try:
        payload = _decode(task.payload)
    except msgspec.ValidationError as exc:  # admitted before admission checked this
        raise Permanent(f"the payload cannot be decoded: {exc}") from None
    job = Job(
        task_id=task.id,
        type=task.type,
        attempt=claim.attempt,
        payload=payload,
        deadline=time.time() + task.timeout,
        logger=TaskLogger(_task_logger(task.type), extra),
    )
    return await task_type.executor(job)


async def _outcome(workers: Workers, run: Run, started: float) -> Outcome | None:
    """Wait for the run and turn how it ended into an outcome (None: nothing to record)."""
    claim = run.claim
    try:
        value = await _execute(workers, claim)
    except asyncio.CancelledError:
        if run.reason is None:
            raise  # this consumer itself is being cancelled
        if run.reason == "shutdown":
            return Released()
        if run.reason == "timeout":
            return _failure(workers, claim, f"timed out after {claim.task.timeout:g}s", started)
        return None
    except TimeoutError:  # the handler's own
        return _failure(workers, claim, f"timed out after {claim.task.timeout:g}s", started)
    except RetryAfter as exc:
        delay = _seconds(getattr(exc, "delay", None))
        return _failure(workers, claim, _describe(exc), started, not_before=delay)
    except Permanent as exc:
        return Failed(error=_describe(exc), finished_at=time.time(), duration=_since(started))
    except (Exception, SystemExit, KeyboardInterrupt) as exc:
        # A handler's sys.exit() (a reused command-line main) ends its run, not the daemon.
        return _failure(workers, claim, _describe(exc), started)
    return _success(workers, claim, value, started)


def _success(workers: Workers, claim: Claim, value: object, started: float) -> Outcome:
    if value is None:
        return Succeeded(result=None, finished_at=time.time())
    try:
        result = _encode(value)
    except Exception as exc:  # not JSON, or nested past the encoder's depth (RecursionError)
        return Failed(
            error=f"the handler's result is not JSON-serialisable: {exc}",
            finished_at=time.time(),
            duration=_since(started),
        )
    task_type = workers.types.get(claim.task.type)
    limit = task_type.config.max_result if task_type is not None else 64 * 1024
    if len(result) > limit:
        return Failed(
            error=f"the result is {len(result)} bytes, over max_result ({limit})",
            finished_at=time.time(),
            duration=_since(started),
        )
    return Succeeded(result=result, finished_at=time.time())


def _failure(
    workers: Workers, claim: Claim, error: str, started: float, *, not_before: float = 0.0
) -> Outcome:
    """Retry after the backoff (but not before `not_before` seconds, the server's
    Retry-After), or fail when no attempt is left."""
    task = claim.task
    used = claim.attempt - task.attempt_floor
    task_type = workers.types.get(task.type)
    if used >= task.max_attempts or task_type is None:
        return Failed(error=error, finished_at=time.time(), duration=_since(started))
    delay = max(backoff_delay(task_type.config.backoff, used), not_before)
    return Retry(error=error, run_at=time.time() + delay, duration=_since(started))


def _describe(exc: BaseException) -> str:
    name = type(exc).__name__
    try:
        text = str(exc)
    except Exception:  # a handler's exception whose __str__ fails
        return name
    return f"{name}: {text}"[:2000] if text else name


def _seconds(value: object) -> float:
    """A handler's `RetryAfter.delay` as seconds (0 when it is not a finite number)."""
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except Exception:  # not a number, or one past a double (OverflowError)
        return 0.0
    return seconds if 0 <= seconds < float("inf") else 0.0


def _since(started: float) -> float:
    return time.monotonic() - started


def _count(workers: Workers, claim: Claim, outcome: Outcome, duration: float) -> None:
    stats = workers.stats
    if isinstance(outcome, Succeeded):
        stats.succeeded += 1
        name = "succeeded"
    elif isinstance(outcome, Failed):
        stats.failed += 1
        name = "failed"
    elif isinstance(outcome, Retry):
        stats.retried += 1
        name = "retried"
    else:
        stats.released += 1
        name = "released"
    metrics = workers.metrics
    metrics.tasks.add((claim.task.type, claim.task.queue, name))
    metrics.duration.observe(claim.task.type, duration)


def _log_outcome(claim: Claim, outcome: Outcome, duration: float) -> None:
    task_id = claim.task.id
    if isinstance(outcome, Succeeded):
        # INFO, so that `journalctl TASK_ID=…` tells every task's story; `log.level =
        # "warning"` saves its cost (~2 % of the loop's instructions for a no-op task).
        fields = _fields(claim, "task.succeeded")
        task_line(logger, INFO, fields, "task %s succeeded in %.3fs", task_id, duration)
    elif isinstance(outcome, Retry):
        fields = _fields(claim, "task.retry")
        wait = outcome.run_at - time.time()
        task_line(
            logger, WARNING, fields, "task %s attempt %d failed, retrying in %.1fs: %s",
            task_id, claim.attempt, wait, outcome.error,
        )  # fmt: skip
    elif isinstance(outcome, Failed):
        fields = _fields(claim, "task.failed")
        task_line(logger, ERROR, fields, "task %s failed: %s", task_id, outcome.error)
    else:
        fields = _fields(claim, "task.released")
        task_line(logger, INFO, fields, "task %s stopped by shutdown and put back", task_id)
