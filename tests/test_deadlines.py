"""One timer stops every run at its deadline: runs that end first cost nothing, a run with an
earlier deadline brings the timer forward, a later one is stopped when its own time comes."""

from __future__ import annotations

import asyncio

from daemon.deadlines import Deadlines


class FakeRun:
    def __init__(self, deadline: float) -> None:
        self.deadline = self.due = deadline  # `due` keeps it: a stopped run's is cleared
        self.stopped: list[tuple[str, float]] = []  # (reason, loop time)
        self.event = asyncio.Event()

    def stop(self, reason: str) -> None:
        self.stopped.append((reason, asyncio.get_running_loop().time()))
        self.event.set()


async def stopped(run: FakeRun, within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        await run.event.wait()


async def test_each_run_is_stopped_at_its_deadline_and_not_before() -> None:
    loop = asyncio.get_running_loop()
    running: dict[str, FakeRun] = {}
    deadlines = Deadlines(running.values)
    now = loop.time()
    later, sooner, ends_first = FakeRun(now + 0.4), FakeRun(now + 0.04), FakeRun(now + 0.02)
    for name, run in (("later", later), ("sooner", sooner), ("ends_first", ends_first)):
        running[name] = run
        deadlines.watch(run, loop)
    del running["ends_first"]  # it ended before its deadline: nothing may stop it

    await stopped(sooner)
    if loop.time() < later.due:  # else a stalled loop may have stopped both at once, rightly
        assert not later.stopped
    await stopped(later)

    assert ends_first.stopped == []
    for run in (sooner, later):
        assert len(run.stopped) == 1
        reason, at = run.stopped[0]
        assert reason == "timeout" and at >= run.due
    deadlines.close()


async def test_a_run_due_sooner_than_the_timer_brings_it_forward() -> None:
    loop = asyncio.get_running_loop()
    running: dict[str, FakeRun] = {}
    deadlines = Deadlines(running.values)
    now = loop.time()
    running["long"] = FakeRun(now + 3600)
    deadlines.watch(running["long"], loop)
    running["short"] = FakeRun(now + 0.03)
    deadlines.watch(running["short"], loop)

    await stopped(running["short"])

    assert running["long"].stopped == []
    deadlines.close()


async def test_close_stops_nothing_more() -> None:
    loop = asyncio.get_running_loop()
    running = {"a": FakeRun(loop.time() + 0.02), "b": FakeRun(loop.time() + 0.05)}
    deadlines = Deadlines(running.values)
    for run in running.values():
        deadlines.watch(run, loop)
    deadlines.close()
    # A watched run after the close: the timer is armed again for it alone.
    probe = FakeRun(loop.time() + 0.08)
    running["probe"] = probe
    deadlines.watch(probe, loop)

    await stopped(probe)

    # The closed timer never fired: the two runs past their deadlines by now were
    # stopped only by the probe's timer, together with it.
    assert running["a"].stopped and running["b"].stopped
    assert running["a"].stopped[0][1] >= probe.due
    deadlines.close()
