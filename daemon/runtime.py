"""What the HTTP handlers share with the workers while the daemon runs."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from aiohttp import web

from daemon.auth import Authenticator, load_tokens
from daemon.config import Config
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
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    schedules_changed: asyncio.Event = field(default_factory=asyncio.Event)
    events: Bus = field(default_factory=Bus)
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
    return Runtime(config, store, types, workers, stats, watchers, metrics, authenticator)
