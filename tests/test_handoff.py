"""The hand-off between the feeder and the consumers: order, waiting consumers woken one per
claim, and a consumer cancelled after it was woken passing its claim on."""

from __future__ import annotations

import asyncio

import pytest

from daemon.handoff import Handoff


async def waiting(handoff: Handoff[str], n: int) -> None:
    """Yield to the loop until `n` consumers wait on `handoff` (5 s at most)."""
    deadline = asyncio.get_running_loop().time() + 5
    while handoff.waiting != n:
        assert asyncio.get_running_loop().time() < deadline, f"{handoff.waiting} waiting"
        await asyncio.sleep(0)


async def test_items_come_out_in_the_order_they_went_in() -> None:
    handoff: Handoff[int] = Handoff()
    for i in range(5):
        handoff.put_nowait(i)
    assert handoff.qsize() == 5
    assert [await handoff.get() for _ in range(3)] == [0, 1, 2]
    assert [handoff.get_nowait(), handoff.get_nowait()] == [3, 4]
    assert handoff.empty()
    with pytest.raises(IndexError):
        handoff.get_nowait()


async def test_each_item_wakes_one_waiting_consumer_in_turn() -> None:
    handoff: Handoff[str] = Handoff()
    got: list[tuple[int, str]] = []

    async def consumer(n: int) -> None:
        got.append((n, await handoff.get()))

    consumers = [asyncio.create_task(consumer(n)) for n in range(3)]
    await waiting(handoff, 3)
    handoff.put_nowait("a")
    handoff.put_nowait("b")
    await asyncio.wait_for(asyncio.gather(consumers[0], consumers[1]), 5)
    assert got == [(0, "a"), (1, "b")]
    assert not consumers[2].done()
    handoff.put_nowait("c")
    await asyncio.wait_for(consumers[2], 5)
    assert got[-1] == (2, "c")
    assert handoff.empty()


async def test_a_consumer_cancelled_while_waiting_leaves_no_trace() -> None:
    handoff: Handoff[str] = Handoff()
    gone = asyncio.create_task(handoff.get())
    await waiting(handoff, 1)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert handoff.waiting == 0
    handoff.put_nowait("x")
    assert await asyncio.wait_for(handoff.get(), 5) == "x"


async def test_a_consumer_cancelled_after_its_wake_up_passes_the_item_on() -> None:
    handoff: Handoff[str] = Handoff()
    first = asyncio.create_task(handoff.get())
    second = asyncio.create_task(handoff.get())
    await waiting(handoff, 2)
    handoff.put_nowait("only")  # wakes `first`, which is cancelled before it runs
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await asyncio.wait_for(second, 5) == "only"
