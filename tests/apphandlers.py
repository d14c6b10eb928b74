"""Task handlers for the in-process tests, named in their config as `tests.apphandlers:NAME`.

The daemon runs on the test's own event loop, so a test steers a `block` run through a
`Gate`: it learns when the run started, lets it finish, and sees whether it was cancelled.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import msgspec

from daemon.executors.base import JSON, Job, Permanent


class Gate:
    """One `block` run's rendezvous with its test."""

    def __init__(self) -> None:
        self.key = uuid.uuid4().hex
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.unwound = asyncio.Event()  # a cancelled run's clean-up is over (slow_unwind)
        self.runs = 0


GATES: dict[str, Gate] = {}


def open_gate() -> Gate:
    """A new gate, registered until `close_gate()`."""
    gate = Gate()
    GATES[gate.key] = gate
    return gate


def close_gate(gate: Gate) -> None:
    gate.release.set()
    GATES.pop(gate.key, None)


class GatePayload(msgspec.Struct, forbid_unknown_fields=True):
    gate: str


async def _hold(gate: Gate, clean_up: asyncio.Event | None = None) -> None:
    """Until the test releases `gate`; a cancel marks it, and waits for `clean_up` first."""
    gate.runs += 1
    gate.started.set()
    try:
        await gate.release.wait()
    except asyncio.CancelledError:
        gate.cancelled.set()
        if clean_up is not None:
            await clean_up.wait()
            gate.unwound.set()
        raise


async def block(payload: GatePayload) -> JSON:
    """Run until the test releases the gate; mark the gate if the run is cancelled."""
    gate = GATES[payload.gate]
    await _hold(gate)
    return {"gate": payload.gate, "runs": gate.runs}


class FlagPayload(msgspec.Struct, forbid_unknown_fields=True):
    flag: str


def fail_while_flag(payload: FlagPayload) -> JSON:
    """Fail while the file `flag` exists. A plain function: it runs in the thread pool."""
    if Path(payload.flag).exists():
        raise RuntimeError(f"flag {payload.flag} is set")
    return {"ok": True}


async def always_fail(payload: JSON) -> JSON:
    raise RuntimeError("always fails")


async def permanent(payload: JSON) -> JSON:
    raise Permanent("this input can never work")


async def inner_timeout(payload: JSON) -> JSON:
    """Times out on its own, with asyncio.timeout, and says so: it relies on the task it
    runs in having no cancellation left over from an earlier run."""
    try:
        async with asyncio.timeout(0.01):
            await asyncio.sleep(10)
    except TimeoutError:
        return {"inner": "timed out"}
    return {"inner": "slept"}


class Unwind(msgspec.Struct, forbid_unknown_fields=True):
    first: str  # the gate of the first run: cancelled, it unwinds until released
    second: str  # the gate of the second run (a retry): it runs until released


async def slow_unwind(payload: Unwind, job: Job) -> JSON:
    """The first run takes its time to clean up after a cancel; the second just blocks."""
    gate = GATES[payload.first if job.attempt == 1 else payload.second]
    await _hold(gate, clean_up=GATES[payload.first].release)
    return {"attempt": job.attempt}


async def loose(payload: dict[str, object]) -> JSON:
    """Annotated with a type msgspec checks payloads against but cannot describe."""
    return {"keys": sorted(payload)}
