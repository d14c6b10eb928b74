"""The log records and lines of `daemon.logs`: the lean record factory makes what
logging's own LogRecord makes, and a line carries its fields on one line."""

from __future__ import annotations

import io
import logging

import pytest

from daemon import logs

TIMES = ("created", "msecs", "relativeCreated")


@pytest.mark.parametrize(
    ("pathname", "msg", "args"),
    [
        ("(unknown file)", "task %s succeeded in %.3fs", ("01ABC", 0.25)),
        ("(unknown file)", "by name %(a)s", ({"a": 1},)),
        ("(unknown file)", "an empty mapping %s", ({},)),
        ("(unknown file)", "no arguments", ()),
        ("/srv/app/handlers.py", "a caller looked up %d", (3,)),
    ],
)
def test_record_has_what_a_log_record_has(
    pathname: str, msg: str, args: tuple[object, ...]
) -> None:
    ours = logs.Record("daemon.x", logging.INFO, pathname, 7, msg, args, None, "f")
    theirs = logging.LogRecord("daemon.x", logging.INFO, pathname, 7, msg, args, None, "f")
    mine = {k: v for k, v in vars(ours).items() if k not in TIMES}
    reference = {k: v for k, v in vars(theirs).items() if k not in TIMES}
    if logging.logThreads or logging.logProcesses:  # setup() turns them off; ours leaves them out
        for key in ("thread", "threadName", "processName", "process"):
            reference[key] = mine[key]
    assert mine == reference
    assert ours.getMessage() == theirs.getMessage()
    assert abs(ours.created - theirs.created) < 1.0
    assert 0 <= ours.msecs < 1000


def test_a_task_line_carries_its_fields_and_stays_one_line() -> None:
    record = logs.Record(
        "daemon.consumer", logging.WARNING, "(unknown file)", 0, "a\nb %s", ("c",), None
    )
    record.__dict__.update(event="task.retry", task_id="01ABC", queue="default", attempt=2)
    line = logs.TextFormatter().format(record)
    assert "\n" not in line
    assert line.split(" ", 1)[1] == (
        "warning a\\nb c event=task.retry task_id=01ABC queue=default attempt=2"
    )


@pytest.mark.parametrize("write_through", [True, False])
def test_the_line_handler_writes_each_record_whole_and_out(write_through: bool) -> None:
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8", write_through=write_through)
    handler = logs.LineHandler(stream)
    handler.setFormatter(logs.TextFormatter())
    for n in range(3):
        record = logs.Record("daemon.x", logging.INFO, "(unknown file)", 0, "n=%d", (n,), None)
        record.__dict__.update(event="test.line", task_id=f"T{n}")
        assert handler.handle(record)
    # Out of the stream's buffer without a flush by anyone else: a crash loses no line.
    lines = raw.getvalue().decode().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        f"info n={n} event=test.line task_id=T{n}" for n in range(3)
    ]


def test_the_line_handler_honours_its_filters() -> None:
    stream = io.StringIO()
    handler = logs.LineHandler(stream)
    handler.setFormatter(logs.TextFormatter())
    handler.addFilter(lambda record: record.levelno >= logging.WARNING)
    for level in (logging.INFO, logging.WARNING):
        handler.handle(logs.Record("daemon.x", level, "(unknown file)", 0, "m", (), None))
    assert [line.split(" ")[1] for line in stream.getvalue().splitlines()] == ["warning"]


def test_the_line_handler_flushes_a_stream_set_later_if_it_must() -> None:
    handler = logs.LineHandler(io.TextIOWrapper(io.BytesIO(), write_through=True))
    handler.setFormatter(logs.TextFormatter())
    raw = io.BytesIO()
    handler.setStream(io.TextIOWrapper(raw, encoding="utf-8", write_through=False))
    handler.handle(logs.Record("daemon.x", logging.INFO, "(unknown file)", 0, "late", (), None))
    assert raw.getvalue().decode().endswith(" info late\n")
