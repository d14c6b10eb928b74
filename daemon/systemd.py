"""systemd integration without a library: sd_notify over an AF_UNIX datagram socket, the
watchdog, and socket activation (LISTEN_FDS).

`Notifier` is a no-op when `$NOTIFY_SOCKET` is unset, so the daemon behaves the same outside
systemd. Abstract socket names (`@name`) are supported.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable

from daemon.errors import ConfigError, OffloadError

logger = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


class Notifier:
    """Sends sd_notify messages to `$NOTIFY_SOCKET`, if set. Never raises: a lost
    notification is logged once, and the service manager decides what that means."""

    def __init__(self, address: str | None = None) -> None:
        self._address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def send(self, *lines: str) -> None:
        if not self._address:
            return
        target = self._address
        if target.startswith("@"):
            target = "\0" + target[1:]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode(), target)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "cannot notify systemd at %s: %s",
                    self._address,
                    exc,
                    extra={"event": "systemd.notify_failed"},
                )

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Half of `$WATCHDOG_USEC` in seconds, when the watchdog is enabled for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1_000_000 / 2
    except ValueError:
        return None


async def pulse(
    notifier: Notifier,
    interval: float,
    healthy: Callable[[], Awaitable[None]],
    status: Callable[[float], str],
    *,
    watchdog: bool,
) -> None:
    """Every `interval` seconds: run `healthy()` (bounded by the interval), then send
    `STATUS=` and, when `watchdog`, `WATCHDOG=1`.

    The ping says the event loop runs, nothing more: a wedged loop stops it and systemd
    restarts the service. A store that fails or does not answer the check is reported in
    `STATUS=` and the log, and the ping goes on: a restart would not bring back a locked
    file or a database that is down, but would stop every running task, and then fail to
    start until the store is back (on PostgreSQL, on every node at once)."""
    trouble: str | None = None
    while True:
        started = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(interval):
                await healthy()
        except (TimeoutError, OffloadError) as exc:
            now = str(exc) or f"no answer within {interval:.1f}s"
            if trouble is None:
                logger.error(
                    "store health check failed: %s (the daemon goes on and retries)",
                    now,
                    extra={"event": "systemd.store_unhealthy"},
                )
            trouble = now
        else:
            if trouble is not None:
                logger.info(
                    "store health check passes again", extra={"event": "systemd.store_healthy"}
                )
            trouble = None
        text = status(interval) if trouble is None else f"store unavailable: {trouble}"
        lines = [f"STATUS={text}"]
        if watchdog:
            lines.append("WATCHDOG=1")
        notifier.send(*lines)
        elapsed = asyncio.get_running_loop().time() - started
        await asyncio.sleep(max(0.0, interval - elapsed))


def activated_sockets() -> list[socket.socket]:
    """Every socket systemd passed this process (socket activation: `$LISTEN_FDS` of them
    from fd 3 on, when `$LISTEN_PID` is ours), in order; none outside systemd.

    Each must be a listening TCP or unix stream socket; any other raises `ConfigError`
    naming its fd, after closing those taken so far. The variables are removed and the
    sockets made close-on-exec (as sd_listen_fds() does): a command handler must not take
    them as its own, nor hold the port open after offload exits."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count_text = os.environ.get("LISTEN_FDS", "0")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for our children
    try:
        count = int(count_text)
    except ValueError:
        return []
    sockets: list[socket.socket] = []
    try:
        for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
            sockets.append(_listening_socket(fd))
    except ConfigError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _listening_socket(fd: int) -> socket.socket:
    """The socket of `fd` if it is one offload can serve; else `ConfigError`, the socket
    closed if `fd` was one."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise _refused(fd, f"not a socket ({exc.strerror})") from None
    problem = None
    if sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        family = getattr(sock.family, "name", sock.family)
        problem = f"a {family} socket; offload serves TCP and unix sockets"
    elif sock.type != socket.SOCK_STREAM:
        problem = f"a {getattr(sock.type, 'name', sock.type)} socket, not a stream one"
    elif not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        problem = "not listening (with Accept=yes systemd passes a connection, not a listener)"
    if problem is not None:
        sock.close()
        raise _refused(fd, problem)
    sock.set_inheritable(False)
    return sock


def _refused(fd: int, problem: str) -> ConfigError:
    return ConfigError(
        "offload.socket",
        [f"fd {fd} from systemd (LISTEN_FDS): {problem}; offload serves ListenStream= sockets"],
    )
