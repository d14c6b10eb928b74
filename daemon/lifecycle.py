"""`serve()`: the daemon from start to exit, in one place, in order.

Start: open (lock, migrate) the store → recover orphaned runs → start the feeder and the
consumers → bind HTTP → ready. Stop, in the reverse order: admission answers 503 and
/readyz fails (status reads still work) → drain within the grace period → stop and put
back the rest → consumers exit → HTTP closes → the store commits and closes.
The stop tells systemd how long it needs (EXTEND_TIMEOUT_USEC with STOPPING=1), so a grace
period longer than the unit's TimeoutStopSec= is not cut short.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

from daemon.api import make_app
from daemon.config import Config
from daemon.errors import OffloadError
from daemon.executors.http import HttpClient
from daemon.http_server import SHUTDOWN_TIMEOUT, open_http
from daemon.metrics import Metrics
from daemon.reload import reload_on_request
from daemon.runtime import Runtime, assemble
from daemon.services import services
from daemon.signals import Stop, handle_signals
from daemon.stats import Stats
from daemon.store import open_store
from daemon.store.base import Hooks
from daemon.systemd import Notifier, pulse, watchdog_interval
from daemon.tasktypes import build_types
from daemon.watch import Watchers
from daemon.workers import STOP_DEADLINE

logger = logging.getLogger(__name__)

STATUS_EVERY = 5.0  # seconds between STATUS= updates when the watchdog does not set a pace
# Seconds a stop may take beyond the grace, the runs' unwinding and the open requests: the
# store's close (a PostgreSQL pool: up to 5 s) and the exit.
STOP_SLACK = 10.0
HANDLER_THREAD = "handler"  # the name (prefix) of the sync handlers' threads
MAX_THREADS = 4096  # the most workers.concurrency may be


async def serve(
    config: Config,
    *,
    stop: Stop | None = None,
    reload: asyncio.Event | None = None,
    config_path: str | None = None,
) -> Stats:
    """Run until `stop` is requested, then drain and return what this process did. Without
    an injected `stop`, SIGTERM/SIGINT request it and SIGHUP sets `reload`, which re-reads
    `config_path`. A bug in a long-lived task ends it with an exception."""
    owns_signals = stop is None
    stop = stop or Stop()
    reload = reload or asyncio.Event()
    stats = Stats()
    # Threads are made as runs need them, and at most `concurrency` sync runs are under way
    # at once: the bound is for threads that sync handlers hold after their cancel (they
    # cannot be interrupted), so that those never leave a run waiting for a thread, even
    # after a reload raised the concurrency.
    threads = ThreadPoolExecutor(MAX_THREADS, thread_name_prefix=HANDLER_THREAD)
    try:
        with handle_signals(stop, reload) if owns_signals else nullcontext():
            await _run(
                config, stop, stats=stats, threads=threads, reload=reload, config_path=config_path
            )
    finally:
        # A sync handler that ignored its cancel keeps its thread; do not wait for it.
        threads.shutdown(wait=False, cancel_futures=True)
    logger.info(
        "offload stopped after %.1fs: accepted %d, succeeded %d, failed %d, retried %d, "
        "cancelled %d, put back %d",
        time.monotonic() - stats.started,
        stats.accepted,
        stats.succeeded,
        stats.failed,
        stats.retried,
        stats.cancelled,
        stats.released,
        extra={"event": "daemon.stopped"},
    )
    return stats


async def _run(
    config: Config,
    stop: Stop,
    *,
    stats: Stats,
    threads: ThreadPoolExecutor,
    reload: asyncio.Event,
    config_path: str | None,
) -> None:
    http = HttpClient()  # the http executor's one session; opens on first use
    types = build_types(config, threads, http)
    watchers = Watchers()
    owner = f"{socket.gethostname()}:{os.getpid()}"
    notifier = Notifier()
    watchdog = watchdog_interval()
    metrics = Metrics()
    # The http session closes after the consumers exit and before the store closes.
    hooks = Hooks(on_commit=metrics.observe_commit, on_ended=watchers.ended)
    async with open_store(config.store, hooks) as store, http:
        rt = await assemble(
            config,
            store,
            hooks,
            types=types,
            stats=stats,
            watchers=watchers,
            metrics=metrics,
            owner=owner,
        )
        workers = rt.workers
        beside = services(rt, hooks, http)
        async with asyncio.TaskGroup() as tg:
            workers.start(lambda coro, name: tg.create_task(coro, name=name))
            beat = _Pulse(rt)
            background = [
                tg.create_task(
                    pulse(
                        notifier,
                        watchdog or STATUS_EVERY,
                        beat.healthy,
                        beat.status,
                        watchdog=watchdog is not None,
                    ),
                    name="systemd-pulse",
                )
            ]
            background += [tg.create_task(coro, name=name) for coro, name in beside]
            if config_path is not None:
                reloader = reload_on_request(
                    rt, config_path, requested=reload, threads=threads, http=http, notifier=notifier
                )
                background.append(tg.create_task(reloader, name="reloader"))
            anonymous = not rt.auth.enabled and not config.auth.allow_anonymous
            http_server = open_http(
                make_app(rt), config.server, rt.metrics.http, anonymous=anonymous
            )
            async with http_server as where:
                rt.ready = True
                await _log_started(rt, where)
                notifier.send("READY=1", f"STATUS=ready on {where}")
                await stop.requested.wait()
                grace = rt.config.workers.grace_period  # a reload may have changed it
                # systemd's TimeoutStopSec= is fixed in the unit, the grace period is not: ask
                # for what this stop needs, so that a longer grace is not cut by a SIGKILL.
                needed = grace + STOP_DEADLINE + SHUTDOWN_TIMEOUT + STOP_SLACK
                notifier.send(
                    "STOPPING=1", "STATUS=draining", f"EXTEND_TIMEOUT_USEC={int(needed * 1e6)}"
                )
                # From here POST answers 503 and /readyz fails; GET keeps working while the
                # running tasks get the grace period.
                rt.ready = False
                rt.draining.set()
                logger.info(
                    "stop requested: draining (grace period %gs)",
                    grace,
                    extra={"event": "daemon.stopping"},
                )
                await workers.drain(grace, stop.hurry)
                watchers.wake_all()
                rt.events.close()
            # HTTP is closed; the consumers were told to exit by drain() and do so now. The
            # watchdog pings until here, since a drain may outlast WatchdogSec.
            for task in background:
                task.cancel()
    notifier.close()
    # The store committed everything queued to it and closed.


class _Pulse:
    """What the systemd pulse checks and reports: a store round trip, then live counts. Its
    verdict is also kept in `rt.store_trouble` (readiness, /metrics)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.accepted = rt.stats.accepted
        self.queued = 0

    async def healthy(self) -> None:
        try:
            await self.rt.store.check()
            counts = await self.rt.store.unfinished_by_queue()
        except OffloadError as exc:
            self.rt.store_trouble = str(exc) or type(exc).__name__
            raise
        except asyncio.CancelledError:  # the pulse's bound passed (or the daemon stops)
            self.rt.store_trouble = "the store did not answer the health check in time"
            raise
        self.rt.store_trouble = None
        self.queued = sum(c.queued for c in counts.values())

    def status(self, interval: float) -> str:
        stats = self.rt.stats
        accepted, self.accepted = stats.accepted - self.accepted, stats.accepted
        prefix = "draining: " if self.rt.draining.is_set() else ""
        return (
            f"{prefix}running {len(self.rt.workers.runs)}, queued {self.queued}, "
            f"accepted {accepted / interval:.1f}/s, succeeded {stats.succeeded}, "
            f"failed {stats.failed}, retried {stats.retried}"
        )


async def _log_started(rt: Runtime, where: str) -> None:
    counts = await rt.store.counts()
    cfg = rt.config
    logger.info(
        "offload started: listening on %s, store %s, concurrency %d, max_pending %d, "
        "grace %gs, types %s; %d unfinished tasks, %d recovered from an earlier run",
        where,
        rt.store.description,
        cfg.workers.concurrency,
        cfg.workers.max_pending,
        cfg.workers.grace_period,
        ",".join(sorted(rt.types)) or "none",
        # Queued and running together: the consumers may have started some already.
        counts.pending,
        rt.stats.recovered,
        extra={"event": "daemon.started"},
    )
