"""journald's native protocol, received on a real AF_UNIX datagram socket and parsed back
into fields: first from `JournalHandler` in this process, then from a real `offload serve`
that finds its stderr is the journal stream ($JOURNAL_STREAM names stderr's device:inode).

`daemon/journal.py` sends to the fixed path /run/systemd/journal/socket, as sd-journal does;
for the real daemon the test mounts its own socket there, in a private mount namespace of
the daemon's (root only; skipped otherwise).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from daemon import logs
from daemon.journal import JOURNAL_SOCKET, JournalHandler
from tests.conftest import InstallHandler
from tests.harness import Offload, eventually
from tests.systemd_harness import open_process

WAIT = 20.0
SECRET = "s3cr3t-payload-value"
TASK_FIELDS = {
    "event": "task.retry",
    "task_id": "01JTESTTASK0000000000000000",
    "task_type": "resize",
    "queue": "images",
    "attempt": 2,
}


@dataclass
class Entry:
    fields: dict[str, str]
    binary: set[str]  # the fields sent in the length-prefixed form


def parse_entry(data: bytes) -> Entry:
    """One native journal datagram: `KEY=value\\n`, or `KEY\\n` + 64-bit little-endian
    length + value + `\\n` for values that hold a newline."""
    entry = Entry({}, set())
    pos = 0
    while pos < len(data):
        end = data.index(b"\n", pos)
        line = data[pos:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            pos = end + 1
        else:
            key = line
            (size,) = struct.unpack_from("<Q", data, end + 1)
            start = end + 1 + 8
            value = data[start : start + size]
            assert data[start + size : start + size + 1] == b"\n", data
            pos = start + size + 1
            entry.binary.add(key.decode())
        name = key.decode()
        assert name not in entry.fields, f"field {name} twice"
        entry.fields[name] = value.decode()
    return entry


@dataclass
class JournalSocket:
    """A bound datagram socket playing journald; `entries` keeps what arrived, in order."""

    sock: socket.socket
    path: str
    entries: list[Entry] = field(default_factory=list)

    def take(self) -> list[Entry]:
        """Every datagram waiting in the socket's buffer, parsed."""
        found: list[Entry] = []
        while True:
            try:
                data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                self.entries += found
                return found
            found.append(parse_entry(data))

    async def wait_for(self, **match: str) -> Entry:
        """The first entry (already received or coming) whose fields include `match`."""
        seen = 0
        while True:
            self.take()
            for entry in self.entries[seen:]:
                if match.items() <= entry.fields.items():
                    return entry
            seen = len(self.entries)
            # The sender is another process; look again shortly.
            await asyncio.sleep(0.02)


@pytest.fixture
def journal() -> Iterator[JournalSocket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    with sock, tempfile.TemporaryDirectory(prefix="offload-journal-") as directory:
        path = os.path.join(directory, "socket")  # short: sun_path holds 108 bytes
        sock.bind(path)
        yield JournalSocket(sock, path)


@pytest.fixture
def logger(journal: JournalSocket) -> Iterator[logging.Logger]:
    """A logger whose only handler is a JournalHandler sending to `journal`."""
    handler = JournalHandler(address=journal.path)
    log = logging.getLogger(f"offload.test.journal.{id(journal)}")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    log.addHandler(handler)
    try:
        yield log
    finally:
        log.removeHandler(handler)
        handler.close()


# -- the handler, in this process ------------------------------------------------------------


def test_a_task_line_carries_the_task_fields(
    journal: JournalSocket, logger: logging.Logger
) -> None:
    logger.warning("task %s retrying", TASK_FIELDS["task_id"], extra=TASK_FIELDS)
    (entry,) = journal.take()
    assert entry.fields == {
        "MESSAGE": f"task {TASK_FIELDS['task_id']} retrying",
        "PRIORITY": "4",
        "SYSLOG_IDENTIFIER": "offload",
        "LOGGER": logger.name,
        "EVENT": "task.retry",
        "TASK_ID": TASK_FIELDS["task_id"],
        "TASK_TYPE": "resize",
        "QUEUE": "images",
        "ATTEMPT": "2",
    }
    assert entry.binary == set()


def test_a_line_without_task_fields_has_none(
    journal: JournalSocket, logger: logging.Logger
) -> None:
    logger.info("offload started", extra={"event": "daemon.started"})
    (entry,) = journal.take()
    assert entry.fields["EVENT"] == "daemon.started"
    assert not {"TASK_ID", "TASK_TYPE", "QUEUE", "ATTEMPT"} & set(entry.fields)


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        (logging.DEBUG, "7"),
        (logging.INFO, "6"),
        (logging.WARNING, "4"),
        (logging.ERROR, "3"),
        (logging.CRITICAL, "2"),
    ],
)
def test_levels_map_to_syslog_priorities(
    journal: JournalSocket, logger: logging.Logger, level: int, priority: str
) -> None:
    logger.log(level, "something happened")
    (entry,) = journal.take()
    assert entry.fields["PRIORITY"] == priority


def test_multi_line_values_use_the_length_prefixed_form(
    journal: JournalSocket, logger: logging.Logger
) -> None:
    try:
        raise RuntimeError("the handler broke")
    except RuntimeError:
        logger.exception("task failed:\nsee below", extra=TASK_FIELDS)
    (entry,) = journal.take()
    assert entry.binary == {"MESSAGE"}
    message = entry.fields["MESSAGE"]
    assert message.startswith("task failed:\nsee below\nTraceback (most recent call last):")
    assert "RuntimeError: the handler broke" in message
    assert entry.fields["PRIORITY"] == "3"
    assert entry.fields["TASK_ID"] == TASK_FIELDS["task_id"]


def test_without_the_socket_records_go_to_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = JournalHandler(address=str(tmp_path / "no-journal-here"))
    log = logging.getLogger("offload.test.journal.fallback")
    log.propagate = False
    log.addHandler(handler)
    try:
        log.error("the journal is gone")
    finally:
        log.removeHandler(handler)
        handler.close()
    assert "the journal is gone" in capsys.readouterr().err


def test_stderr_lines_without_the_socket_are_escaped_as_the_text_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """stderr is the journal's stream then: a newline in a message would split the entry,
    a carriage return or an escape sequence would forge or hide part of a line."""
    gone = str(tmp_path / "no-journal-here")
    handler = JournalHandler(address=gone, fallback=logs.TextFormatter())
    log = logging.getLogger("offload.test.journal.fallback-escaped")
    log.propagate = False
    log.addHandler(handler)
    try:
        log.error("order 42\r2026-11-23 error event=task.failed\nsecond\x1b[2K")
    finally:
        log.removeHandler(handler)
        handler.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert "order 42\\r2026-11-23" in lines[0]
    assert "\\nsecond\\x1b[2K" in lines[0]
    assert "\r" not in lines[0] and "\x1b" not in lines[0]


def test_a_task_line_without_a_record_carries_the_same_fields(
    journal: JournalSocket,
    logger: logging.Logger,
    install_handler: InstallHandler,
) -> None:
    install_handler(JournalHandler(address=journal.path))
    task_logger = logging.getLogger(f"offload.test.journal.direct{id(journal)}")
    task_id = TASK_FIELDS["task_id"]
    logs.task_line(task_logger, logging.WARNING, TASK_FIELDS, "task %s retrying", task_id)
    logger.warning("task %s retrying", task_id, extra=TASK_FIELDS)  # the record path
    direct, recorded = journal.take()
    assert direct.fields == {**recorded.fields, "LOGGER": task_logger.name}
    assert direct.fields["TASK_ID"] == task_id
    assert direct.fields["PRIORITY"] == "4"


def test_a_task_line_without_the_journal_goes_to_stderr(
    tmp_path: Path,
    install_handler: InstallHandler,
    capsys: pytest.CaptureFixture[str],
) -> None:
    install_handler(JournalHandler(address=str(tmp_path / "no-journal-here")))
    task_logger = logging.getLogger("offload.test.journal.direct-fallback")
    logs.task_line(task_logger, logging.ERROR, TASK_FIELDS, "task %s failed", "T1")
    assert "task T1 failed" in capsys.readouterr().err


# -- a real daemon whose stderr is the journal stream ------------------------------------------

# Mount `journal`'s socket at the daemon's fixed path, in a mount namespace of its own
# (a tmpfs on /run: the host's /run is untouched), then exec the daemon: its PID stays.
JOURNAL_MOUNT = f"""\
mount -t tmpfs -o mode=0755 offload-test /run &&
mkdir -p {os.path.dirname(JOURNAL_SOCKET)} && : > {JOURNAL_SOCKET} &&
mount --bind "$0" {JOURNAL_SOCKET} && exec "$@"
"""
needs_mount_namespace = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or sys.platform != "linux",
    reason="mounting a socket at the journal's path needs root and unshare",
)


def journal_wrapper(journal: JournalSocket) -> tuple[str, ...]:
    return (
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "/bin/sh",
        "-c",
        JOURNAL_MOUNT,
        journal.path,
    )


def stream_of(path: Path, *, other: bool = False) -> str:
    """$JOURNAL_STREAM naming the file `path` (with `other`, a different inode)."""
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino + 1 if other else st.st_ino}"


@needs_mount_namespace
async def test_the_daemon_writes_native_entries_when_stderr_is_the_journal(
    offload: Offload, tmp_path: Path, journal: JournalSocket
) -> None:
    config = offload.config(types={"noop": "tests.handlers:noop"})
    log = tmp_path / "daemon.log"
    log.touch()
    env = {"JOURNAL_STREAM": stream_of(log)}
    async with open_process(config, log, env=env, wrapper=journal_wrapper(journal)) as daemon:
        async with asyncio.timeout(WAIT):
            started = await journal.wait_for(EVENT="daemon.started")
            task = await daemon.submit("noop", {"token": SECRET})
            done = await journal.wait_for(EVENT="task.succeeded", TASK_ID=task.id)
        daemon.signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT):
            assert await daemon.wait_exit() == 0
            stopped = await journal.wait_for(EVENT="daemon.stopped")

    assert started.fields["PRIORITY"] == "6"
    assert started.fields["SYSLOG_IDENTIFIER"] == "offload"
    assert stopped.fields["PRIORITY"] == "6"
    assert {k: done.fields[k] for k in ("TASK_TYPE", "QUEUE", "ATTEMPT", "PRIORITY")} == {
        "TASK_TYPE": "noop",
        "QUEUE": "default",
        "ATTEMPT": "1",
        "PRIORITY": "6",
    }
    journal.take()
    assert not [e for e in journal.entries if SECRET in str(e.fields)], "a payload was logged"
    assert daemon.log_text() == "", "a record went to stderr besides the journal"


@needs_mount_namespace
async def test_the_daemon_writes_lines_when_stderr_is_not_the_journal(
    offload: Offload, tmp_path: Path, journal: JournalSocket
) -> None:
    config = offload.config(types={"noop": "tests.handlers:noop"})
    log = tmp_path / "daemon.log"
    log.touch()
    env = {"JOURNAL_STREAM": stream_of(log, other=True)}  # e.g. inherited from a parent
    async with open_process(config, log, env=env, wrapper=journal_wrapper(journal)) as daemon:

        async def startup_line() -> bool | None:
            return True if "event=daemon.started" in daemon.log_text() else None

        async with asyncio.timeout(WAIT):
            await eventually(startup_line)
    assert journal.take() == []
