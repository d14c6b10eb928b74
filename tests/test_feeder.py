"""The feeder against a real SQLite store: an admission wakes it only when it would claim."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from daemon.config import parse
from daemon.flow import load_flow
from daemon.ids import new_id
from daemon.metrics import Metrics
from daemon.models import NewTask, TaskState
from daemon.stats import Stats
from daemon.store import open_store
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


async def test_an_admission_with_no_room_leaves_the_feeder_asleep_until_a_slot_frees(
    tmp_path: Path,
) -> None:
    config = parse(
        {
            "store": {"url": f"sqlite:{tmp_path / 'offload.db'}", "synchronous": "normal"},
            "workers": {"concurrency": 2},
            "types": {
                "noop": {"kind": "python", "handler": "daemon.builtins:noop"},
                "hold": {"kind": "python", "handler": "tests.handlers:hold"},
            },
        }
    )
    log, release = tmp_path / "runs.log", tmp_path / "release"
    with ThreadPoolExecutor(1) as threads:
        async with open_store(config.store) as store:
            flow = await load_flow(config, store)
            workers = Workers(
                config.workers, store, build_types(config, threads), Stats(), Watchers(),
                Metrics(), "test:1", flow,
            )  # fmt: skip

            async def admit(new: NewTask) -> None:
                await store.admit([new], max_pending=100)
                workers.feeder.due_at(new.run_at)

            async with asyncio.TaskGroup() as tg:
                workers.start(lambda coro, name: tg.create_task(coro, name=name))
                for _ in range(2):
                    await admit(task("hold", {"log": str(log), "release": str(release)}))

                async def both_running() -> bool | None:
                    return (log.exists() and len(log.read_text().splitlines()) == 2) or None

                async def feeder_asleep() -> bool | None:
                    return workers.feeder.quiet or None

                async with asyncio.timeout(QUICK):
                    await eventually(both_running)
                    await eventually(feeder_asleep)

                later = task("noop", {})
                await admit(later)  # both slots are taken: no claim could be made now
                assert workers.feeder.quiet

                release.touch()  # the holds end; the first freed slot wakes the feeder

                async def later_done() -> bool | None:
                    found = await store.get(later.id)
                    return (found is not None and found.state is TaskState.SUCCEEDED) or None

                async with asyncio.timeout(QUICK):
                    await eventually(later_done)
                    await workers.drain(1.0, asyncio.Event())
