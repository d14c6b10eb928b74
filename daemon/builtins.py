"""Task handlers shipped with offload, declared in config.example.toml: `sleep` and `noop`."""

from __future__ import annotations

import asyncio
from typing import Annotated

import msgspec

from daemon.executors.base import JSON, Job


class SleepPayload(msgspec.Struct, forbid_unknown_fields=True):
    seconds: Annotated[float, msgspec.Meta(ge=0, le=86400)]


async def sleep(payload: SleepPayload, job: Job) -> JSON:
    """Wait `seconds`, then report how long we slept. The classic demo task."""
    job.logger.debug("sleeping %.3fs", payload.seconds)
    await asyncio.sleep(payload.seconds)
    return {"slept": payload.seconds}


async def noop(payload: JSON) -> JSON:
    """Do nothing: measures offload's own overhead per task."""
    return None
