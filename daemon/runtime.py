"""What the HTTP handlers share with the workers while the daemon runs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web

from daemon.auth import Authenticator
from daemon.config import Config
from daemon.events import Bus
from daemon.metrics import Metrics
from daemon.stats import Stats
from daemon.store.base import Store
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
