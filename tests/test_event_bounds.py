"""GET /v1/events within bounds, against a real `offload serve`: a stream whose client reads
nothing is reset; one that reads too slowly gets `event: overflow` (and resumes losing
nothing); streams past `server.max_streams` are refused with 503. And the bus itself: a
change reaches exactly the subscribers whose filter matches, and a subscriber holds at most
`BUFFER_BYTES` of tasks."""

from __future__ import annotations

import asyncio
import json
import re
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path
from typing import Any

import msgspec

from daemon import events
from daemon.events import Bus, Filter
from daemon.models import Task, TaskState
from tests.harness import ErrorJson, Offload, TomlValue, eventually
from tests.slowclients import (
    read_answer,
    read_to_end,
    read_until,
    request,
    reset,
    unread_connection,
    write_config,
)

WAIT = 30.0
BLOB = "x" * 900_000  # each event of such a task is about as big
TASKS = 8  # their events are well past what the kernel buffers for one connection
EVENT = re.compile(rb"id: (\d+)\nevent: task\ndata: ([^\n]*)\n\n")
OVERFLOW = b"event: overflow\ndata: {}\n\n"
HEARTBEAT = 30.0  # seconds; where a test must see no heartbeat
EVENTS_ANSWERED = 'offload_http_requests_total{{code="{code}",route="/v1/events"}} {count}'


def task_events(raw: bytes) -> list[tuple[int, dict[str, Any]]]:
    """(event id, task) of every task event in `raw` (chunk framing and all)."""
    return [(int(m[1]), json.loads(m[2])) for m in EVENT.finditer(raw)]


async def test_a_stream_whose_client_reads_nothing_is_reset(
    offload: Offload, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "offload.toml", server={"sse_heartbeat": "1s"})
    daemon = await offload.start(config)
    async with unread_connection(daemon.url, request("/v1/events")) as stuck:
        async with asyncio.timeout(WAIT):
            await read_until(stuck, b": connected")
        # Not another byte is read: the daemon must not hold the events it cannot send.
        # One task at a time, so the stream's write waits before its buffer overflows (a
        # burst could overflow it first, and the stream would end with `event: overflow`).
        for _ in range(TASKS):
            task = await daemon.submit("noop", {"blob": BLOB})
            assert (await daemon.task(task.id, wait=10)).state == "succeeded"
        async with asyncio.timeout(WAIT):  # two heartbeats after its writes stopped
            await eventually(lambda: reset(stuck))
    assert (await daemon.request("GET", "/readyz")).status == 200


async def test_a_reader_too_slow_for_the_events_gets_overflow_and_resumes_losing_nothing(
    offload: Offload, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "offload.toml", server={"sse_heartbeat": "10s"})
    daemon = await offload.start(config)
    sent = request("/v1/events", "Connection: close")
    async with unread_connection(daemon.url, sent) as slow:
        async with asyncio.timeout(WAIT):
            await read_until(slow, b": connected")
        tasks = await daemon.submit_many("noop", [{"blob": BLOB}] * TASKS, at_once=2)
        for task in tasks:  # meanwhile the stream's writes wait on its client
            assert (await daemon.task(task.id, wait=10)).state == "succeeded"
        async with asyncio.timeout(WAIT):  # it reads again: what was sent, then overflow
            raw = await read_to_end(slow)
    assert OVERFLOW in raw, raw[-300:]
    assert not EVENT.search(raw, raw.index(OVERFLOW))  # nothing after it
    seen = task_events(raw)
    assert len(seen) < 2 * TASKS  # each task ran at once: running, then succeeded
    last = seen[-1][0] if seen else 0

    # Resumed from the last id it got, it learns the end of every task it did not see end.
    done = {task["id"] for _, task in seen if task["state"] == "succeeded"}
    missing = {task.id for task in tasks} - done
    assert missing
    resume = request("/v1/events", f"Last-Event-ID: {last}")
    replayed: list[tuple[int, dict[str, Any]]] = []
    async with unread_connection(daemon.url, resume, rcvbuf=None) as again:
        unparsed = bytearray()
        async with asyncio.timeout(WAIT):
            while not missing <= {t["id"] for _, t in replayed if t["state"] == "succeeded"}:
                chunk = await asyncio.get_running_loop().sock_recv(again, 1 << 20)
                assert chunk, "the resumed stream ended"
                unparsed += chunk
                end = unparsed.rfind(b"\n\n", max(0, len(unparsed) - len(chunk) - 1)) + 2
                if end > 1:  # events end with a blank line, and never hold one
                    replayed += task_events(bytes(unparsed[:end]))
                    del unparsed[:end]
    assert all(event_id > last for event_id, _ in replayed)


async def test_streams_past_max_streams_are_refused_until_one_ends(
    offload: Offload, tmp_path: Path
) -> None:
    server: dict[str, TomlValue] = {"max_streams": 2, "sse_heartbeat": "200ms"}
    config = write_config(tmp_path / "offload.toml", server=server)
    daemon = await offload.start(config)
    async with AsyncExitStack() as stack:
        streams = [
            await stack.enter_async_context(unread_connection(daemon.url, request("/v1/events")))
            for _ in range(2)
        ]
        async with asyncio.timeout(WAIT):
            for stream in streams:
                await read_until(stream, b": connected")
        async with unread_connection(daemon.url, request("/v1/events?type=noop")) as third:
            status, headers, body = await read_answer(third)
        assert status == 503
        assert int(headers["retry-after"]) > 0
        assert msgspec.json.decode(body, type=ErrorJson).error.code == "too_many_streams"
        assert (await daemon.request("GET", "/v1/tasks")).status == 200  # the rest serves

        streams[0].close()  # its slot is free once the daemon sees the connection close

        async def admitted() -> bool | None:
            async with unread_connection(daemon.url, request("/v1/events")) as stream:
                status, _, _ = await read_answer(stream)
            return True if status == 200 else None

        async with asyncio.timeout(WAIT):
            await eventually(admitted)


async def test_a_stream_whose_client_went_away_frees_its_slot_before_any_write(
    offload: Offload, tmp_path: Path
) -> None:
    # No heartbeat is written within the test: only seeing the connection close can end the
    # stream in time, not a write failing on it.
    server: dict[str, TomlValue] = {"max_streams": 1, "sse_heartbeat": f"{HEARTBEAT:g}s"}
    config = write_config(tmp_path / "offload.toml", server=server)
    daemon = await offload.start(config)
    async with unread_connection(daemon.url, request("/v1/events")) as gone:
        async with asyncio.timeout(WAIT):
            await read_until(gone, b": connected")
        scraped = (await daemon.request("GET", "/metrics")).body.decode()
        assert "offload_event_streams 1.0" in scraped
        async with unread_connection(daemon.url, request("/v1/events")) as second:
            assert (await read_answer(second))[0] == 503  # the one slot is taken
    # `gone` is closed: its stream ends, and is counted as answered, once the daemon sees it.

    async def ended() -> bool | None:
        metrics = (await daemon.request("GET", "/metrics")).body.decode()
        return True if EVENTS_ANSWERED.format(code=200, count="1.0") in metrics else None

    async with asyncio.timeout(HEARTBEAT / 3):
        await eventually(ended)
        # Counted once its handler returned, so its subscription is gone already.
        async with unread_connection(daemon.url, request("/v1/events")) as again:
            head = await read_until(again, b": connected")  # may come with the head
        assert head.startswith(b"HTTP/1.1 200 "), head
    metrics = (await daemon.request("GET", "/metrics")).body.decode()
    assert EVENTS_ANSWERED.format(code=503, count="1.0") in metrics  # `second`, only

    async def none_open() -> bool | None:
        metrics = (await daemon.request("GET", "/metrics")).body.decode()
        return True if "offload_event_streams 0.0" in metrics else None

    async with asyncio.timeout(HEARTBEAT / 3):
        await eventually(none_open)  # `again` closed too, seen without a heartbeat


def _task(task_id: str, type_: str, queue: str, size: int = 10) -> Task:
    return Task(task_id, type_, queue, TaskState.QUEUED, b'"' + b"x" * size + b'"', 0, 0, 0, 1, 1)


def test_a_change_reaches_exactly_the_subscribers_whose_filter_matches() -> None:
    bus = Bus()
    filters = {
        "all": Filter(),
        "task a": Filter(task_id="a"),
        "task z": Filter(task_id="z"),
        "type t1": Filter(type="t1"),
        "queue q1": Filter(queue="q1"),
        "type t1, queue q2": Filter(type="t1", queue="q2"),
        "task a, type t2": Filter(task_id="a", type="t2"),
    }
    with ExitStack() as stack:
        subs = {
            name: stack.enter_context(bus.subscribe(f, limit=10)) for name, f in filters.items()
        }
        bus.publish([_task("a", "t1", "q1"), _task("b", "t2", "q2"), _task("c", "t1", "q2")])
        got = {name: [t.id for t in sub.pending] for name, sub in subs.items()}
        assert got == {
            "all": ["a", "b", "c"],
            "task a": ["a"],
            "task z": [],
            "type t1": ["a", "c"],
            "queue q1": ["a"],
            "type t1, queue q2": ["c"],
            "task a, type t2": [],
        }
        assert all(sub.ready.is_set() == bool(sub.pending) for sub in subs.values())
    assert bus.streams == 0
    bus.publish([_task("a", "t1", "q1")])  # nobody left: nothing to do, nothing kept


def test_a_subscriber_past_its_byte_budget_is_told_and_holds_nothing() -> None:
    bus = Bus()
    third = events.BUFFER_BYTES // 3
    with bus.subscribe(Filter(), limit=1) as sub:
        bus.publish([_task("a", "t", "q", third), _task("b", "t", "q", third)])
        assert [t.id for t in sub.pending] == ["a", "b"]
        assert not sub.overflowed
        bus.publish([_task("c", "t", "q", third)])
        assert sub.overflowed
        assert not sub.pending
        assert sub.pending_bytes == 0
        bus.publish([_task("d", "t", "q")])
        assert not sub.pending
    with bus.subscribe(Filter(), limit=1) as sub:
        # One event is always taken, however large.
        bus.publish([_task("big", "t", "q", 2 * events.BUFFER_BYTES)])
        assert [t.id for t in sub.pending] == ["big"]
        assert not sub.overflowed
