"""The log records and lines of `daemon.logs`: the lean record factory makes what
logging's own LogRecord makes, and a line carries its fields on one line, whatever a
message or a value holds."""

from __future__ import annotations

import ast
import io
import json
import logging
import re
import struct
import sys
import time
from collections.abc import Callable

import pytest

from daemon import logs
from daemon.journal import encode_entry
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


# -- what a client or a handler wrote cannot break or forge a line ---------------------------

# key=value as a logfmt reader takes it: a key starts a word; a value is a word, or a quoted
# string with backslash escapes (ours are Python's, so ast.literal_eval reads them back).
_PAIR = re.compile(r'(?<!\S)([^\s="]+)=("(?:[^"\\]|\\.)*"|[^\s"]*)')


def logfmt(text: str) -> list[tuple[str, str]]:
    """The (key, value) pairs a key=value reader finds in a line, in order."""
    return [
        (key, ast.literal_eval(value) if value.startswith('"') else value)
        for key, value in _PAIR.findall(text)
    ]


def text_line(msg: str, args: tuple[object, ...], fields: dict[str, object]) -> str:
    """The line of a record, checked to be the line `task_line` writes without one."""
    record = logs.Record("daemon.task.cmd", logging.ERROR, "(unknown file)", 0, msg, args, None)
    record.__dict__.update(fields)
    line = logs.TextFormatter().format(record)
    stream = io.StringIO()
    handler = logs.LineHandler(stream)
    handler.setFormatter(logs.TextFormatter())
    root = logging.getLogger()
    replaced, level = logs.install(handler), root.level
    root.setLevel(logging.INFO)
    try:
        logs.task_line(logging.getLogger("daemon.task.cmd"), logging.ERROR, fields, msg, *args)
    finally:
        root.removeHandler(handler)
        for old in replaced:
            root.addHandler(old)
        root.setLevel(level)
    if None not in (fields.get(name) for name in logs.FIELDS):
        (direct,) = stream.getvalue().splitlines()
        assert direct.split(" ", 1)[1] == line.split(" ", 1)[1]
    return line


FORGED = (
    "processing order 42\r2026-11-23T05:40:00.000 error task 01JX failed: it broke "
    "event=task.failed task_id=01JX queue=billing\x1b[2K\x1b[1A"
)


def test_a_forged_line_in_a_message_stays_inside_the_real_one() -> None:
    """The reviewer's case: a command handler echoes payload text to stderr."""
    fields = dict(TASK, event="task.stderr")
    line = text_line("stderr: %s", (FORGED,), fields)
    assert line.isprintable()  # no CR, ESC, newline: a terminal shows one line as written
    assert "\\r2026-11-23T05:40:00.000 error task 01JX" in line
    assert "\\x1b[2K\\x1b[1A" in line
    # A key=value reader finds the real fields, each once, and nothing from the message.
    assert logfmt(line) == [(key, str(value)) for key, value in fields.items()]


@pytest.mark.parametrize(
    "value",
    ["two words", "a=b", 'say "hi"', "back\\slash", "", "billing\n", "\r\x1b[31m\x7f\x9b",
     "\u2028\u2029\x85", "tab\there", "é ü"],
)  # fmt: skip
@pytest.mark.parametrize("field", logs.FIELDS)
def test_a_value_that_is_not_one_word_is_quoted_and_read_back(value: str, field: str) -> None:
    fields: dict[str, object] = dict(TASK)
    fields[field] = value
    line = text_line("task %s ended", (TASK["task_id"],), fields)
    assert "\n" not in line
    assert "\r" not in line
    assert "\x1b" not in line
    assert logfmt(line) == [(key, str(fields[key])) for key in logs.FIELDS]
    # The same value without the task's other fields takes the other path: the same writing.
    alone = text_line("no task", (), {field: value})
    assert logfmt(alone) == [(field, value)]


def test_plain_names_of_a_task_line_are_written_as_they_are_every_time() -> None:
    for _ in range(3):  # the first line learns the names; the next ones take the short way
        line = text_line("task %s ended", (TASK["task_id"],), dict(TASK))
        assert line.split(" ", 5)[5] == " ".join(f"{k}={v}" for k, v in TASK.items())
    odd = dict(TASK, task_id="01J TEST")  # an id never seen is checked, not trusted
    assert logfmt(text_line("m", (), odd))[1] == ("task_id", "01J TEST")


def test_a_field_name_in_a_message_reads_as_text_not_as_a_field() -> None:
    message = "queue=x\x85event=y (attempt=3) task_id= a=b\u00a0task_type=z exception=e"
    line = text_line("%s", (message,), {"event": "test.names"})
    ours = (*logs.FIELDS, "exception")
    assert [pair for pair in logfmt(line) if pair[0] in ours] == [("event", "test.names")]
    assert ("a", "b") in logfmt(line)  # other words with "=" are left as they are
    assert "queue\\x3dx\\x85event=y (attempt=3) task_id\\x3d a=b" in line


def test_an_exception_is_one_quoted_value() -> None:
    try:
        raise ValueError("bad input\nevent=task.succeeded\r")
    except ValueError:
        record = logs.Record(
            "daemon.x",
            logging.ERROR,
            "(unknown file)",
            0,
            "failed",
            (),
            sys.exc_info(),
        )
    record.__dict__.update(event="test.exception")
    line = logs.TextFormatter().format(record)
    assert line.isprintable()
    ((_, event), (_, exception)) = logfmt(line)
    assert event == "test.exception"
    assert exception.startswith("Traceback (most recent call last):\n")
    assert exception.endswith("ValueError: bad input\nevent=task.succeeded\r")


def test_a_json_line_escapes_what_json_leaves_raw() -> None:
    message = "a\r\x1b[2J\x7f\x85\x9b\u2028\u2029\n é"
    line = logs.JsonFormatter().compose(
        (logging.INFO, "daemon.x", message, {"event": "x\u2028y", "queue": "q\x9b"}, 0.0, None)
    )
    # Nothing a terminal or str.splitlines() acts on; the values read back as they were.
    assert line.isascii() or line.replace("é", "").isascii()
    assert line.isprintable()
    assert len(line.splitlines()) == 1
    entry = json.loads(line)
    assert (entry["message"], entry["event"], entry["queue"]) == (message, "x\u2028y", "q\x9b")


def test_the_journal_gets_a_value_with_a_newline_in_the_length_prefixed_form() -> None:
    data = encode_entry({"MESSAGE": "one\rtwo", "QUEUE": "billing\nEVENT=forged"})
    value = b"billing\nEVENT=forged"
    assert data == (
        b"MESSAGE=one\rtwo\n" + b"QUEUE\n" + struct.pack("<Q", len(value)) + value + b"\n"
    )
