"""The client commands of `offload`: submit, status, cancel, retry, list, stats for tasks;
queues, schedules, pause and resume for flow control.

Each command makes one `OffloadClient` (daemon/client.py) for `--url`/`$OFFLOAD_URL` (an
http:// URL, or unix:/path for a unix socket) and `--token`/`$OFFLOAD_TOKEN`, writes its
answer on stdout (a table or `key: value` lines on a terminal, JSON with `--json` or when
stdout is not a terminal: daemon/client_cli_output.py), and turns the outcome into one of
the exit codes below. Server errors are written as the server's message, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from daemon.client import DEFAULT_URL, OffloadClient, Task
from daemon.client_cli_output import Output
from daemon.client_errors import ClientError, Unreachable
from daemon.config import parse_duration
from daemon.models import TaskState

# Exit codes of the client commands (the README's table).
EXIT_OK = 0  # done; with --wait: the task succeeded
EXIT_FAILED = 1  # with --wait: the task failed
EXIT_USAGE = 2  # bad arguments or --payload (argparse's code)
EXIT_CANCELLED = 3  # with --wait: the task was cancelled
EXIT_NOT_ENDED = 4  # with --wait: still queued or running when --wait-timeout ran out
EXIT_REFUSED = 5  # the server refused the request (4xx): invalid, unknown, conflict, auth
EXIT_UNAVAILABLE = 6  # the server cannot take it now (503: full, draining) or broke (5xx)
EXIT_UNREACHABLE = 7  # no answer from the server
EXIT_INTERRUPTED = 130  # Ctrl-C

COMMANDS = (
    *("submit", "status", "cancel", "retry", "list", "stats"),
    *("queues", "schedules", "pause", "resume"),
)
_ENDED_EXIT = {
    TaskState.SUCCEEDED: EXIT_OK,
    TaskState.FAILED: EXIT_FAILED,
    TaskState.CANCELLED: EXIT_CANCELLED,
}
_STATES = [s.value for s in TaskState]


class UsageError(Exception):
    """An argument argparse could not check (a payload that is not JSON, say)."""


# -- arguments -------------------------------------------------------------------------


def add_commands(sub: Any) -> None:
    """Add the client commands to `sub`, the `offload` parser's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get("OFFLOAD_URL", DEFAULT_URL),
        help=(
            "the daemon's URL: http://HOST:PORT, or unix:/PATH for a unix socket "
            f"(default $OFFLOAD_URL or {DEFAULT_URL})"
        ),
    )
    common.add_argument(
        "--token",
        default=os.environ.get("OFFLOAD_TOKEN"),
        help="bearer token (default $OFFLOAD_TOKEN; prefer the variable: flags show in ps)",
    )
    common.add_argument("--json", action="store_true", help="write JSON even on a terminal")
    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("--wait", action="store_true", help="wait until the task ends")
    waiting.add_argument(
        "--wait-timeout", type=_duration, help='give up waiting after this long ("30s", "5m")'
    )

    submit = sub.add_parser("submit", parents=[common, waiting], help="submit a task")
    submit.add_argument("type", help="a [types.NAME] of the daemon's config")
    submit.add_argument(
        "--payload", help="JSON text, @FILE to read it from a file, or - for stdin (default {})"
    )
    submit.add_argument("--queue", help="overrides the type's queue")
    submit.add_argument("--priority", type=int, help="-1000..1000, higher first (default 0)")
    submit.add_argument("--delay", type=_duration, help='run after this long ("30s", "5m")')
    submit.add_argument("--run-at", type=_time, help="run at this RFC 3339 time (with a zone)")
    submit.add_argument("--timeout", type=_duration, help="run timeout, at most the type's")
    submit.add_argument("--max-attempts", type=int, help="1..100 (default the type's)")
    submit.add_argument("--callback", help="a [callbacks.NAME] to POST the task to when it ends")
    submit.add_argument("--idempotency-key", help="resubmitting with the same key is a no-op")

    status = sub.add_parser("status", parents=[common, waiting], help="show a task")
    status.add_argument("id")
    for name, text in (("cancel", "cancel a queued or running task"), ("retry", "retry a task")):
        sub.add_parser(name, parents=[common], help=text).add_argument("id")

    listing = sub.add_parser("list", parents=[common], help="list tasks, newest first")
    listing.add_argument("--state", choices=_STATES)
    listing.add_argument("--type")
    listing.add_argument("--queue")
    listing.add_argument("--limit", type=_positive, default=50, help="at most this many (50)")
    sub.add_parser("stats", parents=[common], help="unfinished tasks by queue, outcomes")

    sub.add_parser("queues", parents=[common], help="queues: paused or not, counts, limits")
    sub.add_parser("schedules", parents=[common], help="cron schedules: next and last fire")
    for name, text in (
        ("pause", "pause a queue (its tasks are accepted, none runs) or a schedule"),
        ("resume", "resume a paused queue or schedule"),
    ):
        flow = sub.add_parser(name, parents=[common], help=text)
        flow.add_argument("what", choices=("queue", "schedule"))
        flow.add_argument("name", help="the queue's or the schedule's name")


def _duration(text: str) -> float:
    value: str | float = text
    with contextlib.suppress(ValueError):
        value = float(text)  # plain seconds, as the API takes them
    try:
        return float(parse_duration(value))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _time(text: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected an RFC 3339 time") from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError("needs a time zone, e.g. 2030-01-01T12:00:00Z")
    return when


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError("expected a positive integer")
    return value


def read_payload(spec: str | None) -> msgspec.Raw | None:
    """The --payload argument as JSON: literal text, `@FILE`, or `-` (stdin)."""
    if spec is None:
        return None
    if spec == "-":
        raw = sys.stdin.buffer.read()
    elif spec.startswith("@"):
        try:
            raw = Path(spec[1:]).read_bytes()
        except OSError as exc:
            raise UsageError(f"--payload {spec}: {exc.strerror}") from None
    else:
        raw = spec.encode()
    try:
        msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise UsageError(f"--payload is not JSON: {exc}") from None
    return msgspec.Raw(raw.strip())


# -- running a command -----------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run the client command of `args` and return its exit code."""
    out = Output(json=args.json or not sys.stdout.isatty())
    command = _COMMANDS[args.command]
    try:
        return asyncio.run(_with_client(args, command, out))
    except UsageError as exc:
        out.error(str(exc))
        return EXIT_USAGE
    except Unreachable as exc:
        out.error(exc.message)
        return EXIT_UNREACHABLE
    except ClientError as exc:
        out.error(f"{exc.code}: {exc.message}" + (f" (field: {exc.field})" if exc.field else ""))
        if exc.retry_after is not None:
            out.error(f"retry after {exc.retry_after:g}s")
        return EXIT_REFUSED if 400 <= exc.status < 500 else EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


Command = Callable[[OffloadClient, argparse.Namespace, Output], Awaitable[int]]


async def _with_client(args: argparse.Namespace, command: Command, out: Output) -> int:
    if getattr(args, "wait_timeout", None) is not None and not getattr(args, "wait", False):
        raise UsageError("--wait-timeout needs --wait")
    try:
        client = OffloadClient(args.url, args.token)
    except ValueError as exc:  # a URL without its scheme, "unix:relative.sock", a bad token
        raise UsageError(str(exc)) from None
    async with client:
        return await command(client, args, out)


async def submit(client: OffloadClient, args: argparse.Namespace, out: Output) -> int:
    payload = read_payload(args.payload)
    task = await client.submit(
        args.type,
        msgspec.UNSET if payload is None else payload,
        queue=args.queue,
        priority=args.priority,
        delay=args.delay,
        run_at=args.run_at,
        timeout=args.timeout,
        max_attempts=args.max_attempts,
        callback=args.callback,
        idempotency_key=args.idempotency_key,
    )
    if task.replayed:
        # On stderr: stdout stays the id (or the task) either way, for scripts.
        out.error(
            f"replayed: task {task.id} was submitted before with this idempotency key; "
            "nothing new was created"
        )
    if not args.wait:
        if args.json:
            out.task(task)
        else:
            out.line(task.id)
        return EXIT_OK
    return await _wait(client, task, args, out, result_only=not args.json)


async def status(client: OffloadClient, args: argparse.Namespace, out: Output) -> int:
    task = await client.get(args.id)
    if not args.wait:
        out.task(task)
        return EXIT_OK
    return await _wait(client, task, args, out, result_only=False)


async def _wait(
    client: OffloadClient, task: Task, args: argparse.Namespace, out: Output, *, result_only: bool
) -> int:
    """Wait for `task` to end; write its result (or the task) and exit by its final state."""
    if not task.ended:
        try:
            async with asyncio.timeout(args.wait_timeout):
                task = await client.wait(task.id)
        except TimeoutError:
            out.error(f"task {task.id} has not ended after {args.wait_timeout:g}s")
            return EXIT_NOT_ENDED
        except (ClientError, asyncio.CancelledError):
            # Interrupted (Ctrl-C) or refused while waiting: the task exists all the same,
            # and its id may have been printed nowhere yet.
            out.error(f"task {task.id} was accepted; see it with: offload status {task.id} --wait")
            raise
    if not result_only:
        out.task(task)
    elif task.state is TaskState.SUCCEEDED:
        out.json_value(task.result)
    if task.state is TaskState.FAILED:
        out.error(f"task {task.id} failed: {task.last_error}")
    elif task.state is TaskState.CANCELLED:
        out.error(f"task {task.id} was cancelled")
    return _ENDED_EXIT[TaskState(task.state)]


async def cancel(client: OffloadClient, args: argparse.Namespace, out: Output) -> int:
    out.task(await client.cancel(args.id))
    return EXIT_OK


async def retry(client: OffloadClient, args: argparse.Namespace, out: Output) -> int:
    out.task(await client.retry(args.id))
    return EXIT_OK


async def list_tasks(client: OffloadClient, args: argparse.Namespace, out: Output) -> int:
    tasks: list[Task] = []
    page_size = min(args.limit, 1000)
    async for task in client.iter_tasks(
        state=args.state, type=args.type, queue=args.queue, page_size=page_size
    ):
        tasks.append(task)
        if len(tasks) >= args.limit:
            break
    out.tasks(tasks)
    return EXIT_OK


async def stats(client: OffloadClient, args: argparse.Namespace, out: Output) -> int:
    out.stats(await client.stats())
    return EXIT_OK


async def queues(client: OffloadClient, args: argparse.Namespace, out: Output) -> int:
    out.queues(await client.queues())
    return EXIT_OK


async def schedules(client: OffloadClient, args: argparse.Namespace, out: Output) -> int:
    out.schedules(await client.schedules())
    return EXIT_OK


async def pause(client: OffloadClient, args: argparse.Namespace, out: Output) -> int:
    if args.what == "queue":
        out.queue(await client.pause_queue(args.name))
    else:
        out.schedule(await client.pause_schedule(args.name))
    return EXIT_OK


async def resume(client: OffloadClient, args: argparse.Namespace, out: Output) -> int:
    if args.what == "queue":
        out.queue(await client.resume_queue(args.name))
    else:
        out.schedule(await client.resume_schedule(args.name))
    return EXIT_OK


_COMMANDS: dict[str, Command] = {
    "submit": submit,
    "status": status,
    "cancel": cancel,
    "retry": retry,
    "list": list_tasks,
    "stats": stats,
    "queues": queues,
    "schedules": schedules,
    "pause": pause,
    "resume": resume,
}
