"""The services that run beside the workers for as long as the daemon serves: completion
callbacks, the scheduler and retention. `offload serve` and the development app factory
start the same ones."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from daemon.callbacks import Deliverer
from daemon.executors.http import HttpClient
from daemon.models import Task
from daemon.retention import keep_pruning
from daemon.runtime import Runtime
from daemon.scheduler import Scheduler
from daemon.store.base import Hooks


def services(
    rt: Runtime, hooks: Hooks, http: HttpClient
) -> list[tuple[Coroutine[Any, Any, None], str]]:
    """Their coroutines, with a name each, to run until cancelled; every task change now
    reaches the event streams and the callback deliverer."""
    deliverer = Deliverer(rt, http)

    def changed(tasks: list[Task]) -> None:
        rt.events.publish(tasks)
        deliverer.changed(tasks)

    hooks.on_change = changed
    return [
        (keep_pruning(rt), "retention"),
        (deliverer.run(), "callbacks"),
        (Scheduler(rt).run(), "scheduler"),
    ]
