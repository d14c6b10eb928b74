"""Native journald logging: one datagram per record to the journal socket, with structured
fields (MESSAGE, PRIORITY, EVENT, TASK_ID, TASK_TYPE, QUEUE, ATTEMPT), so that
`journalctl -u offload TASK_ID=<id>` shows the story of one task.

Used only when stderr is the journal stream (`$JOURNAL_STREAM` names stderr's device and
inode), which is how systemd runs us; elsewhere logs go to stderr as lines.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
from collections.abc import Mapping

JOURNAL_SOCKET = "/run/systemd/journal/socket"
MAX_VALUE = 48 * 1024  # a datagram must fit the socket's buffer; longer values are cut
# Syslog priorities by logging level; any other level is sent as info (6).
_PRIORITY = {
    logging.DEBUG: "7",
    logging.INFO: "6",
    logging.WARNING: "4",
    logging.ERROR: "3",
    logging.CRITICAL: "2",
}
_FIELDS = {
    "event": "EVENT",
    "task_id": "TASK_ID",
    "task_type": "TASK_TYPE",
    "queue": "QUEUE",
    "attempt": "ATTEMPT",
}


def stderr_is_journal() -> bool:
    """True when systemd connected our stderr to the journal."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return st.st_dev == int(device) and st.st_ino == int(inode)


def encode_entry(fields: dict[str, str]) -> bytes:
    """The journal's native format: `KEY=value\\n`, or for values with a newline
    `KEY\\n<64-bit little-endian length><value>\\n`."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", errors="replace")[:MAX_VALUE]
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """Writes each record to the journal socket; if that fails, to stderr as a line."""

    def __init__(
        self,
        address: str = JOURNAL_SOCKET,
        identifier: str = "offload",
        fallback: logging.Formatter | None = None,
    ) -> None:
        """`fallback` formats the lines written to stderr when the socket fails: stderr is
        the journal's stream then, which splits entries at newlines (logs.TextFormatter
        escapes them)."""
        super().__init__()
        self.address = address
        self.identifier = identifier
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._fallback = logging.StreamHandler(sys.stderr)
        if fallback is not None:
            self._fallback.setFormatter(fallback)

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        return self._entry(record.levelno, record.name, message, record.__dict__)

    def _entry(
        self, level: int, name: str, message: str, extra: Mapping[str, object]
    ) -> dict[str, str]:
        fields = {
            "MESSAGE": message,
            "PRIORITY": _PRIORITY.get(level, "6"),
            "SYSLOG_IDENTIFIER": self.identifier,
            "LOGGER": name,
        }
        for attr, key in _FIELDS.items():
            value = extra.get(attr)
            if value is not None:
                fields[key] = str(value)
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._sock.sendto(encode_entry(self.fields(record)), self.address)
        except OSError:
            self._fallback.emit(record)

    def event(self, level: int, name: str, message: str, fields: Mapping[str, object]) -> bool:
        """A task's line without a LogRecord (`logs.task_line`); False when the journal
        socket refuses it, so that the record path falls back to stderr."""
        try:
            self._sock.sendto(encode_entry(self._entry(level, name, message, fields)), self.address)
        except OSError:
            return False
        return True

    def close(self) -> None:
        self._sock.close()
        super().close()
