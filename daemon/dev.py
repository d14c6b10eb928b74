"""An app factory for `adev runserver daemon/dev.py --app-factory create_app` (`make dev`):
the HTTP API with its store, feeder, consumers, callbacks, scheduler and retention, rebuilt
on every code change. Config from $OFFLOAD_CONFIG (default config.example.toml).
Development only: production is `offload serve`, which also handles signals, systemd,
reloads and the ordered stop."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from typing import Any

from aiohttp import web

from daemon import logs
from daemon.api import make_app
from daemon.config import load
from daemon.executors.http import HttpClient
from daemon.metrics import Metrics
from daemon.runtime import assemble
from daemon.services import services
from daemon.stats import Stats
from daemon.store import open_store
from daemon.store.base import Hooks
from daemon.tasktypes import build_types
from daemon.watch import Watchers


async def create_app() -> web.Application:
    config = load(os.environ.get("OFFLOAD_CONFIG", "config.example.toml"))
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
        rt.draining.set()
        await workers.drain(config.workers.grace_period, asyncio.Event())
        rt.events.close()
        for task in background:
            task.cancel()
        await asyncio.gather(*tasks, *background, return_exceptions=True)
        await stack.aclose()

    app.cleanup_ctx.append(run_workers)
    return app
