"""Handlers for the flow-control tests (`tests.flowhandlers:NAME`). The daemon runs on the
test's loop, so runs are recorded in module state the test reads."""

from __future__ import annotations

import time

import msgspec

from daemon.executors.base import JSON


class Start(msgspec.Struct, frozen=True):
    label: str
    at: float


STARTS: list[Start] = []
RUNNING: dict[str, int] = {}
PEAK: dict[str, int] = {}


class Mark(msgspec.Struct, forbid_unknown_fields=True):
    label: str
    hold: float = 0.0


async def mark(payload: Mark) -> JSON:
    """Record when a run of `label` started, and how many of `label` ran at once."""
    import asyncio

    STARTS.append(Start(payload.label, time.time()))
    RUNNING[payload.label] = RUNNING.get(payload.label, 0) + 1
    PEAK[payload.label] = max(PEAK.get(payload.label, 0), RUNNING[payload.label])
    try:
        if payload.hold:
            await asyncio.sleep(payload.hold)
    finally:
        RUNNING[payload.label] -= 1
    return None


def reset() -> None:
    STARTS.clear()
    RUNNING.clear()
    PEAK.clear()
