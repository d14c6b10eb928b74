"""The log records and lines of `daemon.logs`: the lean record factory makes what
logging's own LogRecord makes, and a line carries its fields on one line."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable

import pytest

from daemon import logs
from tests.conftest import InstallHandler

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


# -- task lines without a LogRecord -----------------------------------------------------------

TASK = {
    "event": "task.succeeded",
    "task_id": "01JTESTTASK0000000000000000",
    "task_type": "noop",
    "queue": "default",
    "attempt": 1,
}


@pytest.fixture
def installed(install_handler: InstallHandler) -> Callable[[logging.Formatter], io.StringIO]:
    """Installs a LineHandler on a fresh stream with the given formatter."""

    def install(formatter: logging.Formatter) -> io.StringIO:
        stream = io.StringIO()
        handler = logs.LineHandler(stream)
        handler.setFormatter(formatter)
        install_handler(handler)
        return stream

    return install


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_task_line_without_a_record_is_the_line_of_one(
    installed: Callable[[logging.Formatter], io.StringIO], fmt: str
) -> None:
    formatter = logs.TextFormatter() if fmt == "text" else logs.JsonFormatter()
    stream = installed(formatter)
    logger = logging.getLogger("daemon.test.direct")
    before = time.time()
    logs.task_line(logger, logging.INFO, TASK, "task %s succeeded in %.3fs", TASK["task_id"], 0.25)
    (line,) = stream.getvalue().splitlines()
    message = f"task {TASK['task_id']} succeeded in 0.250s"
    if fmt == "json":
        entry = json.loads(line)
        assert before <= entry.pop("ts") <= time.time()
        assert entry == {"level": "info", "logger": logger.name, "message": message, **TASK}
    else:
        fields = " ".join(f"{k}={v}" for k, v in TASK.items())
        assert line.split(" ", 1)[1] == f"info {message} {fields}"
    # The record path writes the same line.
    record = logging.LogRecord(
        logger.name, logging.INFO, "(unknown file)", 0, "task %s succeeded in %.3fs",
        (TASK["task_id"], 0.25), None,
    )  # fmt: skip
    record.__dict__.update(TASK)
    again = formatter.format(record)
    if fmt == "json":
        assert {**json.loads(again), "ts": 0} == {**json.loads(line), "ts": 0}
    else:
        assert again.split(" ", 1)[1] == line.split(" ", 1)[1]


class Catch(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize(
    ("change", "written", "caught"),
    [
        ("nothing", 1, 0),
        ("another handler on the root", 1, 1),
        ("a handler on the logger", 1, 1),
        ("a handler on the logger, which does not propagate", 0, 1),
        ("a handler on the parent logger", 1, 1),
        ("the logger does not propagate, and has no handler", 0, 0),
        ("a filter on the logger that drops it", 0, 0),
        ("the logger disabled", 0, 0),
        ("a filter on the handler that drops it", 0, 0),
        ("the handler's level above the line's", 0, 0),
    ],
)
def test_a_task_line_goes_where_logging_would_send_its_record(
    installed: Callable[[logging.Formatter], io.StringIO], change: str, written: int, caught: int
) -> None:
    stream = installed(logs.TextFormatter())
    root = logging.getLogger()
    (handler,) = root.handlers
    parent = logging.getLogger(f"offload.test.route{id(stream)}")
    logger = logging.getLogger(f"{parent.name}.child")
    catch = Catch()
    if change == "another handler on the root":
        root.addHandler(catch)
    elif change.startswith("a handler on the logger"):
        logger.addHandler(catch)
        logger.propagate = "not propagate" not in change
    elif change == "a handler on the parent logger":
        parent.addHandler(catch)
    elif change == "the logger does not propagate, and has no handler":
        logger.propagate = False
    elif change == "a filter on the logger that drops it":
        logger.addFilter(lambda record: False)
    elif change == "the logger disabled":
        logger.disabled = True
    elif change == "a filter on the handler that drops it":
        handler.addFilter(lambda record: False)
    elif change == "the handler's level above the line's":
        handler.setLevel(logging.WARNING)
    try:
        logs.task_line(logger, logging.INFO, TASK, "task %s ended", TASK["task_id"])
    finally:
        root.removeHandler(catch)
        for each in (logger, parent):
            each.handlers.clear()
            each.filters.clear()
            each.propagate, each.disabled = True, False
    assert len(stream.getvalue().splitlines()) == written
    assert [r.getMessage() for r in catch.records] == [f"task {TASK['task_id']} ended"] * caught
    if caught:
        assert catch.records[0].task_id == TASK["task_id"]  # type: ignore[attr-defined]


def test_a_task_line_goes_the_record_way_when_its_stream_fails(
    installed: Callable[[logging.Formatter], io.StringIO], monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = installed(logs.TextFormatter())
    stream.close()  # writes now raise ValueError
    reported: list[logging.LogRecord] = []
    (handler,) = logging.getLogger().handlers
    monkeypatch.setattr(handler, "handleError", reported.append)
    logs.task_line(logging.getLogger("daemon.test.closed"), logging.INFO, TASK, "task gone")
    # Reported once, as logging reports a handler's failure, and the caller carries on.
    assert [r.getMessage() for r in reported] == ["task gone"]
