"""Stop requests. The signal handlers only set events: the first SIGTERM or SIGINT asks for
a graceful stop, a second one says hurry (skip the rest of the grace period)."""

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
def stop_on_signals(stop: Stop) -> Iterator[None]:
    """Install SIGTERM and SIGINT handlers on the running loop; remove them on exit."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.request)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
