"""The feeder against a real SQLite store: an admission wakes it only when it would claim."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import msgspec

from daemon.config import parse
from daemon.flow import load_flow
from daemon.ids import new_id
from daemon.metrics import Metrics
from daemon.models import NewTask, TaskState
from daemon.stats import Stats
from daemon.store import Store, open_store
from daemon.tasktypes import build_types
from daemon.watch import Watchers
from daemon.workers import Workers
from tests.harness import eventually

QUICK = 10.0


def task(type: str, payload: dict[str, object]) -> NewTask:
    now = time.time()
    return NewTask(
        id=new_id(now), type=type, queue="default", payload=json.dumps(payload).encode(),
        priority=0, run_at=now, created_at=now, timeout=30.0, max_attempts=3,
    )  # fmt: skip


@dataclass
class Running:
    workers: Workers
    store: Store

    async def admit(self, new: NewTask) -> None:
        """Commit `new` and tell the feeder, as admission does."""
        await self.store.admit([new], max_pending=100)
        self.workers.feeder.due_at(new.run_at, new.queue)

    async def asleep(self) -> None:
        async def feeder_asleep() -> bool | None:
            return self.workers.feeder.quiet or None

        async with asyncio.timeout(QUICK):
            await eventually(feeder_asleep)

    async def succeeded(self, task_id: str) -> None:
        async def done() -> bool | None:
            found = await self.store.get(task_id)
            return (found is not None and found.state is TaskState.SUCCEEDED) or None

        async with asyncio.timeout(QUICK):
            await eventually(done)


@asynccontextmanager
async def running(tmp_path: Path, concurrency: int) -> AsyncIterator[Running]:
    """Workers (feeder, consumers) over a real SQLite store, drained at the end."""
    config = parse(
        {
            "store": {"url": f"sqlite:{tmp_path / 'offload.db'}", "synchronous": "normal"},
            "workers": {"concurrency": concurrency},
            "types": {
                "noop": {"kind": "python", "handler": "daemon.builtins:noop"},
                "hold": {"kind": "python", "handler": "tests.handlers:hold"},
            },
        }
    )
    with ThreadPoolExecutor(1) as threads:
        async with open_store(config.store) as store:
            flow = await load_flow(config, store)
            workers = Workers(
                config.workers, store, build_types(config, threads), Stats(), Watchers(),
                Metrics(), "test:1", flow,
            )  # fmt: skip
            async with asyncio.TaskGroup() as tg:
                workers.start(lambda coro, name: tg.create_task(coro, name=name))
                yield Running(workers, store)
                async with asyncio.timeout(QUICK):
                    await workers.drain(1.0, asyncio.Event())


async def test_an_admission_with_no_room_leaves_the_feeder_asleep_until_a_slot_frees(
    tmp_path: Path,
) -> None:
    log, release = tmp_path / "runs.log", tmp_path / "release"
    async with running(tmp_path, concurrency=2) as run:
        for _ in range(2):
            await run.admit(task("hold", {"log": str(log), "release": str(release)}))

        async def both_running() -> bool | None:
            return (log.exists() and len(log.read_text().splitlines()) == 2) or None

        async with asyncio.timeout(QUICK):
            await eventually(both_running)
        await run.asleep()

        later = task("noop", {})
        await run.admit(later)  # both slots are taken: no claim could be made now
        assert run.workers.feeder.quiet

        release.touch()  # the holds end; the first freed slot wakes the feeder
        await run.succeeded(later.id)


async def test_an_admission_into_a_paused_queue_leaves_the_feeder_asleep(
    tmp_path: Path,
) -> None:
    async with running(tmp_path, concurrency=2) as run:
        await run.asleep()
        run.workers.flow.paused.add("default")
        paused = task("noop", {})
        await run.admit(paused)  # slots are free, but nothing of it can be claimed
        assert run.workers.feeder.quiet

        run.workers.flow.paused.discard("default")
        run.workers.feeder.wake()  # what resuming the queue does
        await run.succeeded(paused.id)


async def test_a_task_for_later_sets_the_feeders_alarm_to_its_run_at(tmp_path: Path) -> None:
    async with running(tmp_path, concurrency=2) as run:
        await run.asleep()
        later = msgspec.structs.replace(task("noop", {}), run_at=time.time() + 60)
        await run.admit(later)

        async def alarm() -> float | None:
            return run.workers.feeder.wakes_at

        async with asyncio.timeout(QUICK):
            at = await eventually(alarm)
        # It sleeps until then, not for a polling interval (test_flow times the start).
        assert abs(at - later.run_at) < 0.05, (at, later.run_at)
