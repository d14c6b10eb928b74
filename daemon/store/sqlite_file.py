"""The SQLite file itself: where `store.url` puts it, and the lock that keeps a second
daemon away from it (an exclusive `flock` on `<file>.lock` holding the owner's pid)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from daemon.errors import StoreLocked


def database_path(url: str) -> Path:
    """`sqlite:relative/path.db` (from the working directory) or `sqlite:///absolute.db`."""
    rest = url.removeprefix("sqlite:")
    if rest.startswith("//"):
        rest = rest[2:]
    if not rest:
        raise ValueError("expected sqlite:PATH")
    return Path(rest)


def lock(path: Path) -> int:
    """Take the file's lock or raise `StoreLocked` naming the holder; returns the open fd."""
    lock_path = f"{path}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreLocked(
            f"another offload daemon (pid {holder}) is already serving {path}; "
            f"one daemon per SQLite file (use PostgreSQL to run several)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd
