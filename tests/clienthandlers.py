"""Task handlers for the client, CLI and fuzz tests, named in their configs as
`tests.clienthandlers:NAME`. Each finishes at once or waits on a file the test creates, so
nothing a test submits keeps a worker for long."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Annotated

import msgspec

from daemon.executors.base import JSON, Permanent

RELEASE_POLL = 0.05  # seconds between looks at a release file
HOLD_AT_MOST = 60.0  # seconds a `hold` run waits for its release file


class Echo(msgspec.Struct, forbid_unknown_fields=True):
    """A typed payload with required and optional fields, for the spec's payload schemas."""

    text: Annotated[str, msgspec.Meta(max_length=200)]
    times: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1


async def echo(payload: Echo) -> JSON:
    """Succeed with the text repeated."""
    return {"echo": payload.text * payload.times}


async def fail(payload: JSON) -> JSON:
    """Fail at once, without further attempts."""
    raise Permanent(f"refused payload {payload!r}")


class Hold(msgspec.Struct, forbid_unknown_fields=True):
    release: str


async def hold(payload: Hold) -> JSON:
    """Run until the file `release` exists (or HOLD_AT_MOST seconds pass)."""
    deadline = time.monotonic() + HOLD_AT_MOST
    while time.monotonic() < deadline:
        # The test process creates the file; there is no event to wait on.
        if os.path.exists(payload.release):  # noqa: ASYNC240
            return {"released": True}
        await asyncio.sleep(RELEASE_POLL)
    return {"released": False}
