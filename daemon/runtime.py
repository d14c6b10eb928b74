"""What the HTTP handlers share with the workers while the daemon runs."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass, field

from aiohttp import web

from daemon.auth import Authenticator, load_tokens
from daemon.config import Config, ServerConfig
from daemon.events import Bus
from daemon.flow import load_flow
from daemon.metrics import Metrics
from daemon.stats import Stats
from daemon.store.base import Hooks, Store
from daemon.tasktypes import TaskType
from daemon.watch import Watchers
from daemon.workers import Workers


@dataclass
class Runtime:
    config: Config
    store: Store
    types: dict[str, TaskType]
    workers: Workers
    stats: Stats
    watchers: Watchers
    metrics: Metrics
    auth: Authenticator
    ready: bool = False
    """True once recovery is done and the listener is bound, until the stop begins."""
    store_trouble: str | None = None
    """Why the store failed its last health check (lifecycle's pulse), None while it passes:
    /readyz answers 503 meanwhile."""
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    schedules_changed: asyncio.Event = field(default_factory=asyncio.Event)
    events: Bus = field(default_factory=Bus)
    listening: tuple[tuple[str, int] | str, ...] = ()
    """Where the HTTP server listens: (host, port) or a unix socket's name. A reload may
    not leave a non-loopback one without tokens."""
    """Set on a pause, resume or reload, so the scheduler recomputes its next fire."""


RUNTIME = web.AppKey("runtime", Runtime)


async def assemble(
    config: Config,
    store: Store,
    hooks: Hooks,
    *,
    types: dict[str, TaskType],
    stats: Stats,
    watchers: Watchers,
    metrics: Metrics,
    owner: str,
) -> Runtime:
    """The runtime over an open store (`offload serve` and the development server both):
    runs left by a crash recovered, the flow read, the workers made and the store's hooks
    that reach them set."""
    stats.recovered = await store.recover(owner=owner, now=time.time())
    flow = await load_flow(config, store)
    workers = Workers(
        config.workers, store, types, stats, watchers, metrics, owner, flow, shared=store.shared
    )
    hooks.on_new_work = workers.feeder.wake
    hooks.on_lost = lambda task_id: workers.stop_run(task_id, "cancel")
    authenticator = Authenticator(load_tokens(config.auth), list(config.auth.open))
    rt = Runtime(config, store, types, workers, stats, watchers, metrics, authenticator)
    rt.listening = listening(config.server)
    return rt


def listening(server: ServerConfig) -> tuple[tuple[str, int] | str, ...]:
    """Where `open_http` listens: on every socket systemd passed (LISTEN_FDS, read here
    before `open_http` takes them, through copies of their descriptors), else on
    `server.listen`."""
    from daemon.http_server import parse_listen  # it imports this module

    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return (parse_listen(server.listen),)
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        count = 0
    found: list[tuple[str, int] | str] = []
    for fd in range(3, 3 + count):  # SD_LISTEN_FDS_START
        try:
            duplicate = os.dup(fd)
        except OSError:
            continue  # not open: open_http refuses it, and the daemon stops
        try:
            copy = socket.socket(fileno=duplicate)
        except OSError:
            os.close(duplicate)
            continue  # not a socket: the same
        with copy:
            name = copy.getsockname()
        if copy.family == socket.AF_UNIX:
            found.append(name if isinstance(name, str) else repr(name))
        else:
            found.append((name[0], name[1]))
    return tuple(found)
