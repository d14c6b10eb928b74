"""GET /v1/events: Server-Sent Events of task state changes, live and resumed from the store
with Last-Event-ID, filtered, with heartbeats. A real in-process daemon over real HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from daemon.models import SCAN_ROWS
from tests.inproc import Daemon, assert_error, delayed_tasks, open_daemon, prefill


@dataclass(frozen=True)
class Event:
    id: str | None
    name: str | None
    data: Any
    comment: str | None = None


async def read_events(resp: aiohttp.ClientResponse) -> AsyncIterator[Event]:
    """Parse an event stream: events and comment lines, as they arrive."""
    fields: dict[str, str] = {}
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith(":"):
            yield Event(None, None, None, comment=line[1:].strip())
        elif line == "":
            if "data" in fields:
                yield Event(fields.get("id"), fields.get("event"), json.loads(fields["data"]))
            fields = {}
        else:
            name, _, value = line.partition(": ")
            fields[name] = value


async def states(
    daemon: Daemon,
    query: str,
    until: str,
    headers: dict[str, str],
    connected: asyncio.Event | None = None,
) -> list[Event]:
    """Task events of one stream until a task reaches state `until`; `connected` is set
    once the stream is subscribed (its first comment)."""
    seen = []
    async with daemon.http.get(f"/v1/events?{query}", headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async with asyncio.timeout(15):
            async for event in read_events(resp):
                if event.comment == "connected" and connected is not None:
                    connected.set()
                if event.name == "task":
                    seen.append(event)
                    if event.data["state"] == until:
                        return seen
    raise AssertionError("the stream ended")


async def test_a_stream_carries_the_transitions_of_a_real_task(tmp_path: Path) -> None:
    async with open_daemon(tmp_path) as daemon:
        gate = daemon.gate()
        connected = asyncio.Event()
        watching = asyncio.create_task(states(daemon, "type=block", "succeeded", {}, connected))
        async with asyncio.timeout(10):
            await connected.wait()
            task = await daemon.submit({"type": "block", "payload": {"gate": gate.key}})
            await gate.started.wait()
        gate.release.set()
        events = await watching
    # Subscribed before admission: the stream starts at `queued` (or at `running` when the
    # task started at admission); every event is this task, ids increase, and it ends well.
    assert {e.data["id"] for e in events} == {task["id"]}
    assert [e.data["state"] for e in events] in (
        ["queued", "running", "succeeded"],
        ["running", "succeeded"],
    )
    ids = [int(e.id or 0) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


async def test_last_event_id_resumes_from_the_store(tmp_path: Path) -> None:
    async with open_daemon(tmp_path) as daemon:
        first = await daemon.submit({"type": "noop", "payload": {"n": 1}})
        await daemon.ended(first["id"])
        # Everything since the start: `first` once, in its final state.
        replay = await states(daemon, "type=noop", "succeeded", {"Last-Event-ID": "0"})
        assert [(e.data["id"], e.data["state"]) for e in replay] == [(first["id"], "succeeded")]
        mark = replay[-1].id
        assert mark is not None

        second = await daemon.submit({"type": "noop", "payload": {"n": 2}})
        await daemon.ended(second["id"])
        resumed = await states(daemon, "type=noop", "succeeded", {"Last-Event-ID": mark})
        # Only what changed after the mark.
        assert [(e.data["id"], e.data["state"]) for e in resumed] == [(second["id"], "succeeded")]


async def test_a_replay_of_a_large_store_walks_it_in_bounded_reads(tmp_path: Path) -> None:
    # More tasks than two replay reads examine, three of them (old, middle, new) `sleep`.
    count = 2 * SCAN_ROWS + 5000
    planted = (10, SCAN_ROWS + 7, count - 3)
    tasks = delayed_tasks(count, types=dict.fromkeys(planted, "sleep"))
    await prefill(tmp_path, tasks)
    async with open_daemon(tmp_path) as daemon:
        seen: list[str] = []
        query = "/v1/events?type=sleep&last_event_id=0"
        async with daemon.http.get(query) as resp, asyncio.timeout(15):
            assert resp.status == 200
            async for event in read_events(resp):
                if event.name == "task":
                    seen.append(event.data["id"])
                    if len(seen) == len(planted):
                        break
        # Each planted task once, in change order (admission order here), none other.
        assert seen == [tasks[n].id for n in planted]


async def test_filters_keep_other_tasks_out(tmp_path: Path) -> None:
    async with open_daemon(tmp_path) as daemon:
        other = await daemon.submit({"type": "sleep", "payload": {"seconds": 0}})
        mine = await daemon.submit({"type": "noop"})
        await daemon.ended(other["id"])
        await daemon.ended(mine["id"])
        replay = await states(daemon, "type=noop", "succeeded", {"Last-Event-ID": "0"})
        assert {e.data["id"] for e in replay} == {mine["id"]}


async def test_an_idle_stream_gets_heartbeats(tmp_path: Path) -> None:
    async with (
        open_daemon(tmp_path, {"server": {"sse_heartbeat": "100ms"}}) as daemon,
        daemon.http.get("/v1/events") as resp,
    ):
        comments = []
        async with asyncio.timeout(10):
            async for event in read_events(resp):
                if event.comment is not None:
                    comments.append(event.comment)
                if comments.count("keep-alive") == 2:
                    break
        assert comments[0] == "connected"


async def test_bad_stream_parameters_are_refused(tmp_path: Path) -> None:
    async with open_daemon(tmp_path) as daemon:
        reply = await daemon.request("GET", "/v1/events", headers={"Last-Event-ID": "abc"})
        assert_error(reply, 422, "invalid", "Last-Event-ID")
        reply = await daemon.request("GET", "/v1/events?task_id=nope")
        assert_error(reply, 422, "invalid", "task_id")
        reply = await daemon.request("GET", "/v1/events?colour=red")
        assert_error(reply, 422, "invalid", "colour")
        # Past what a 64-bit change number can be (and Python's 4,300-digit limit).
        for huge in ("9" * 20, "9" * 5000):
            reply = await daemon.request("GET", "/v1/events", headers={"Last-Event-ID": huge})
            assert_error(reply, 422, "invalid", "Last-Event-ID")
        # A stream has no end for HEAD to stop at.
        reply = await daemon.request("HEAD", "/v1/events")
        assert reply.status == 405
        assert reply.headers["Allow"] == "GET"
