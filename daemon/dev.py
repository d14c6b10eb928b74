"""An app factory for `adev runserver daemon/dev.py --app-factory create_app` (`make dev`):
the HTTP API with its store, feeder, consumers, callbacks, scheduler and retention, rebuilt
on every code change. Config from $OFFLOAD_CONFIG (default config.example.toml).
Development only: production is `offload serve`, which also handles systemd, reloads and the
ordered stop with the configured grace period.

How adev (aiohttp-devtools 1.1.2) runs it: the app lives in a child process that adev stops
for each reload, and at Ctrl-C, with a SIGINT, and SIGKILLs 5 s later if it has not exited
(`_stop_dev_server` in aiohttp_devtools/runserver/watch.py). So the drain here gives running
tasks at most DEV_GRACE, then stops them and puts them back (their attempt not spent) and
closes the store, all before that SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from typing import Any

from aiohttp import web

from daemon import logs
from daemon.api import make_app
from daemon.config import Config, load
from daemon.executors.http import HttpClient
from daemon.metrics import Metrics
from daemon.runtime import assemble
from daemon.services import services
from daemon.stats import Stats
from daemon.store import open_store
from daemon.store.base import Hooks
from daemon.tasktypes import build_types
from daemon.watch import Watchers

# Seconds running tasks get at a reload or Ctrl-C (less if workers.grace_period is less):
# adev's SIGKILL comes 5 s after its SIGINT, and stopping the runs, writing them back and
# closing the store need the rest.
DEV_GRACE = 3.0
LOOPBACK = "127.0.0.1"
# adev's modules that hold the address its app (serve) and aux server (main) bind.
_ADEV_MODULES = ("aiohttp_devtools.runserver.serve", "aiohttp_devtools.runserver.main")


def bind_adev_to_loopback() -> None:
    """Make adev bind its app and aux server to 127.0.0.1 rather than 0.0.0.0.

    The dev app has no tokens, which the daemon allows on loopback only, and aiohttp-devtools
    up to 1.1.2 has no option to choose the address (`--host` only names the host in the
    livereload URLs). It reads the module global HOST when it binds,
    after importing this module: in its parent process (the aux server) and in the app's
    process alike. Outside adev, neither module is loaded and this does nothing."""
    for name in _ADEV_MODULES:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "HOST"):
            setattr(module, "HOST", LOOPBACK)  # noqa: B010 -- a module mypy cannot see into


bind_adev_to_loopback()


async def create_app() -> web.Application:
    """adev's app factory: `dev_app()` of $OFFLOAD_CONFIG, stopped by SIGINT as described
    above."""
    app = await dev_app(load(os.environ.get("OFFLOAD_CONFIG", "config.example.toml")))
    # First in, so last out: the handler stays until the drain and the store's close are done.
    app.cleanup_ctx.insert(0, _stop_on_sigint)
    return app


async def _stop_on_sigint(app: web.Application) -> AsyncIterator[None]:
    """End adev's `run_forever()` at the first SIGINT, so that it runs the app's cleanup (the
    drain), and ignore later ones. Ctrl-C sends two: the terminal's, then adev's own as it
    stops its child. Python's default handler would raise KeyboardInterrupt for each, and
    the second would abort the drain half way."""
    loop = asyncio.get_running_loop()
    interrupted = False

    def on_sigint() -> None:
        nonlocal interrupted
        if not interrupted:
            interrupted = True
            loop.stop()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)


async def dev_app(config: Config) -> web.Application:
    """The API of `config` with the runtime `offload serve` assembles; its cleanup drains
    (running tasks get at most DEV_GRACE), then closes the store."""
    logs.setup(config.log.level, config.log.format)
    stack = AsyncExitStack()
    threads = ThreadPoolExecutor(config.workers.concurrency, thread_name_prefix="handler")
    stack.callback(threads.shutdown, wait=False, cancel_futures=True)
    metrics, watchers = Metrics(), Watchers()
    hooks = Hooks(on_commit=metrics.observe_commit, on_ended=watchers.ended)
    store = await stack.enter_async_context(open_store(config.store, hooks))
    http = HttpClient()
    stack.push_async_callback(http.aclose)
    rt = await assemble(
        config,
        store,
        hooks,
        types=build_types(config, threads, http),
        stats=Stats(),
        watchers=watchers,
        metrics=metrics,
        owner=f"dev:{os.getpid()}",
    )
    rt.ready = True
    beside = services(rt, hooks, http)
    workers = rt.workers
    app = make_app(rt)

    async def run_workers(app: web.Application) -> AsyncIterator[None]:
        tasks: list[asyncio.Task[None]] = []

        def spawn(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
            tasks.append(asyncio.create_task(coro, name=name))
            return tasks[-1]

        workers.start(spawn)
        background = [asyncio.create_task(coro, name=name) for coro, name in beside]
        yield
        rt.ready = False
        rt.draining.set()
        await workers.drain(min(config.workers.grace_period, DEV_GRACE), asyncio.Event())
        rt.events.close()
        for task in background:
            task.cancel()
        await asyncio.gather(*tasks, *background, return_exceptions=True)
        await stack.aclose()

    app.cleanup_ctx.append(run_workers)
    return app
