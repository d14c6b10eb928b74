"""How the `offload` client commands (daemon/client_cli.py) write their answers: on stdout
JSON as the API serves it (`--json`, or stdout not a terminal), or `key: value` lines for
one thing and a table for several, for a person; notes and errors on stderr, prefixed
`offload:`. It writes only: what an answer means for the exit code is the commands' job.
"""

from __future__ import annotations

import datetime as dt
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import msgspec

from daemon.client import Queue, Schedule, Stats, Task

KEY_WIDTH = 12  # the column of the values of `key: value` lines, at least


class Output:
    """Writes answers on stdout (JSON, or text for a person) and errors on stderr."""

    def __init__(self, *, json: bool) -> None:
        self.json_mode = json

    def line(self, text: str) -> None:
        sys.stdout.write(text + "\n")

    def error(self, text: str) -> None:
        sys.stderr.write(f"offload: {text}\n")

    def json_value(self, value: Any) -> None:
        plain = msgspec.to_builtins(value, builtin_types=(dt.datetime,))
        self.line(msgspec.json.encode(_as_served(plain)).decode())

    # -- tasks -----------------------------------------------------------------------------

    def task(self, task: Task) -> None:
        if self.json_mode:
            # The task as the API serves it: a submission's `replayed` is its answer's
            # header, not a field of the task (the command notes it on stderr).
            self.json_value({name: getattr(task, name) for name in Task.__struct_fields__})
            return
        self._fields(
            [
                ("id", task.id),
                ("type", task.type),
                ("queue", task.queue),
                ("state", str(task.state)),
                ("attempts", f"{task.attempts} (max {task.max_attempts})"),
                ("priority", str(task.priority)),
                ("created", _when(task.created_at)),
                ("run at", _when(task.run_at)),
                ("started", _when(task.started_at)),
                ("finished", _when(task.finished_at)),
                ("payload", _json_text(task.payload)),
                ("result", _json_text(task.result)),
                ("last error", task.last_error or "-"),
            ]
        )

    def tasks(self, tasks: Sequence[Task]) -> None:
        if self.json_mode:
            self.json_value(tasks)
            return
        header = ("ID", "TYPE", "QUEUE", "STATE", "ATTEMPTS", "CREATED", "LAST ERROR")
        rows = [
            (
                t.id,
                t.type,
                t.queue,
                str(t.state),
                f"{t.attempts}/{t.max_attempts}",
                _when(t.created_at),
                (t.last_error or "").replace("\n", " "),
            )
            for t in tasks
        ]
        self._table(header, rows, empty="(no tasks)")

    def stats(self, stats: Stats) -> None:
        if self.json_mode:
            self.json_value(stats)
            return
        rows = [(name, str(c.queued), str(c.running)) for name, c in stats.queues.items()]
        total_queued = sum(c.queued for c in stats.queues.values())
        total_running = sum(c.running for c in stats.queues.values())
        rows.append(("(all)", str(total_queued), str(total_running)))
        self._table(("QUEUE", "QUEUED", "RUNNING"), rows)
        outcomes = ", ".join(f"{k} {v}" for k, v in stats.since_start.items()) or "none"
        self.line(f"\nsince the daemon started: accepted {stats.accepted}; runs ended: {outcomes}")

    # -- queues and schedules --------------------------------------------------------------

    def queue(self, queue: Queue) -> None:
        if self.json_mode:
            self.json_value(queue)
            return
        self._fields(
            [
                ("queue", queue.name),
                ("paused", _yes(queue.paused)),
                ("configured", _yes(queue.configured)),
                ("queued", str(queue.queued)),
                ("running", str(queue.running)),
                ("done/s", f"{queue.completed_per_second:g}"),
                ("weight", str(queue.weight)),
                ("concurrency", str(queue.concurrency)),
                ("rate", f"{queue.rate:g}"),
                ("burst", str(queue.burst)),
            ]
        )

    def queues(self, queues: Sequence[Queue]) -> None:
        if self.json_mode:
            self.json_value(queues)
            return
        header = (
            *("QUEUE", "PAUSED", "QUEUED", "RUNNING", "DONE/S"),
            *("WEIGHT", "CONCURRENCY", "RATE", "BURST", "CONFIGURED"),
        )
        rows = [
            (
                q.name,
                _yes(q.paused),
                str(q.queued),
                str(q.running),
                f"{q.completed_per_second:g}",
                str(q.weight),
                str(q.concurrency),
                f"{q.rate:g}",
                str(q.burst),
                _yes(q.configured),
            )
            for q in queues
        ]
        self._table(header, rows, empty="(no queues)")

    def schedule(self, schedule: Schedule) -> None:
        if self.json_mode:
            self.json_value(schedule)
            return
        self._fields(
            [
                ("schedule", schedule.name),
                ("cron", schedule.cron),
                ("timezone", schedule.timezone),
                ("paused", _yes(schedule.paused)),
                ("next fire", _when(schedule.next_fire)),
                ("last fire", _when(schedule.last_fire)),
                ("type", schedule.type),
                ("queue", schedule.queue or "-"),
                ("misfire", schedule.misfire),
            ]
        )

    def schedules(self, schedules: Sequence[Schedule]) -> None:
        if self.json_mode:
            self.json_value(schedules)
            return
        # The cron expression last: it holds spaces of its own.
        header = (
            "SCHEDULE",
            "PAUSED",
            "NEXT FIRE",
            "LAST FIRE",
            "TYPE",
            "QUEUE",
            "TIMEZONE",
            "CRON",
        )
        rows = [
            (
                s.name,
                _yes(s.paused),
                _when(s.next_fire),
                _when(s.last_fire),
                s.type,
                s.queue or "-",
                s.timezone,
                s.cron,
            )
            for s in schedules
        ]
        self._table(header, rows, empty="(no schedules)")

    # -- layout ----------------------------------------------------------------------------

    def _fields(self, rows: Sequence[tuple[str, str]]) -> None:
        width = max(KEY_WIDTH, *(len(key) + 2 for key, _ in rows))
        for key, value in rows:
            self.line(f"{key + ':':<{width}}{value}")

    def _table(
        self, header: Sequence[str], rows: Sequence[Sequence[str]], *, empty: str = ""
    ) -> None:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        room = shutil.get_terminal_size().columns
        for row in [header, *rows]:
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
            self.line("  ".join(cells).rstrip()[:room])
        if empty and not rows:
            sys.stderr.write(f"{empty}\n")


def _when(value: dt.datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _as_served(value: Any) -> Any:
    """`value` with its times written as the server writes them (RFC 3339, UTC, to the
    millisecond; msgspec would write microseconds), so the CLI's JSON is the API's."""
    if isinstance(value, dt.datetime):
        text = value.astimezone(dt.UTC).isoformat(timespec="milliseconds")
        return text.removesuffix("+00:00") + "Z"
    if isinstance(value, dict):
        return {k: _as_served(v) for k, v in value.items()}
    # A list or a tuple: to_builtins keeps the tuples of a struct (a task's history) as they are.
    if isinstance(value, list | tuple):
        return [_as_served(v) for v in value]
    return value


def _json_text(value: Any) -> str:
    return "-" if value is None else msgspec.json.encode(value).decode()
