"""Signals. The handlers only set events: the first SIGTERM or SIGINT asks for a graceful
stop, a second one says hurry (skip the rest of the grace period); SIGHUP asks for a reload."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Stop:
    requested: asyncio.Event = field(default_factory=asyncio.Event)
    hurry: asyncio.Event = field(default_factory=asyncio.Event)

    def request(self) -> None:
        if self.requested.is_set():
            self.hurry.set()
        self.requested.set()


@contextmanager
def handle_signals(stop: Stop, reload: asyncio.Event) -> Iterator[None]:
    """Install SIGTERM, SIGINT and SIGHUP handlers on the running loop; remove them on exit."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.request)
    loop.add_signal_handler(signal.SIGINT, stop.request)
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    try:
        yield
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
