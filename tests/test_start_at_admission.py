"""Start at admission against a real SQLite store, at the one edge the HTTP tests cannot
time: the drain begins while an admission that started its task is committing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from daemon.config import parse
from daemon.flow import load_flow
from daemon.ids import new_id
from daemon.metrics import Metrics
from daemon.models import NewTask, StartNow, TaskState
from daemon.stats import Stats
from daemon.store import Store, open_store
from daemon.tasktypes import build_types
from daemon.watch import Watchers
from daemon.workers import Workers
from tests.harness import eventually

QUICK = 5.0


@dataclass
class Running:
    workers: Workers
    store: Store


@asynccontextmanager
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    """Workers (feeder, consumers, recorder) over a real SQLite store."""
    config = parse(
        {
            "store": {"url": f"sqlite:{tmp_path / 'offload.db'}", "synchronous": "normal"},
            "types": {"noop": {"kind": "python", "handler": "daemon.builtins:noop"}},
        }
    )
    with ThreadPoolExecutor(1) as threads:
        async with open_store(config.store) as store:
            flow = await load_flow(config, store)
            workers = Workers(
                config.workers,
                store,
                build_types(config, threads),
                Stats(),
                Watchers(),
                Metrics(),
                "test:1",
                flow,
            )
            async with asyncio.TaskGroup() as tg:
                workers.start(lambda coro, name: tg.create_task(coro, name=name))
                yield Running(workers, store)


async def held_slot(workers: Workers) -> tuple[NewTask, StartNow]:
    """A new noop task and the slot `start_now` holds for it."""
    now = time.time()
    new = NewTask(
        id=new_id(now), type="noop", queue="default", payload=b"{}", priority=0,
        run_at=now, created_at=now, timeout=30.0, max_attempts=3,
    )  # fmt: skip

    async def slot() -> StartNow | None:
        return workers.start_now(new, now)  # None while the feeder's first round runs

    async with asyncio.timeout(QUICK):
        return new, await eventually(slot)


async def test_a_run_started_at_admission_that_meets_the_drain_is_put_back_unspent(
    tmp_path: Path,
) -> None:
    async with running(tmp_path) as run:
        workers, store = run.workers, run.store
        new, start = await held_slot(workers)
        (admitted,) = await store.admit([new], max_pending=100, start=start)
        assert (admitted.state, admitted.attempts) == (TaskState.RUNNING, 1)

        workers.stopping.set()  # the drain has begun meanwhile
        workers.started(new, admitted)
        async with asyncio.timeout(QUICK):
            await workers.recorder.idle.wait()

        back = await store.get(new.id)
        assert back is not None
        assert (back.state, back.attempts, back.started_at) == (TaskState.QUEUED, 0, None)
        assert (workers.inflight, workers.handoff.qsize()) == (0, 0)
        await workers.drain(0.0, asyncio.Event())


async def test_the_drain_waits_for_a_run_an_admission_is_starting(tmp_path: Path) -> None:
    async with running(tmp_path) as run:
        workers, store = run.workers, run.store
        new, start = await held_slot(workers)
        drain = asyncio.create_task(workers.drain(5.0, asyncio.Event()))
        (admitted,) = await store.admit([new], max_pending=100, start=start)
        # No run exists yet, but a slot is held: the drain must not end (and end the
        # recorder) before the admission hands its run back.
        assert not drain.done()
        workers.started(new, admitted)
        async with asyncio.timeout(QUICK):
            await drain
        back = await store.get(new.id)
        assert back is not None
        assert (back.state, back.attempts) == (TaskState.QUEUED, 0)
