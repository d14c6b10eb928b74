"""Answers their client does not read (`daemon/answer.py`): a page of tasks left unread is
reset by a real `offload serve` once its connection stalls, and, past the budget of unsent
bytes of all such connections, the one watched longest is reset at once."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from daemon import answer
from daemon.answer import JsonAnswer
from tests.harness import Offload, eventually
from tests.slowclients import read_until, request, reset, unread_connection, write_config

WAIT = 30.0
MIB = 1024 * 1024
PAGE_TASKS = 12  # of ~1 MB each: a page is cut at 8 MiB, past what the kernel buffers


async def test_a_page_of_tasks_its_client_does_not_read_is_reset(
    offload: Offload, tmp_path: Path
) -> None:
    daemon = await offload.start(write_config(tmp_path / "offload.toml"))
    tasks = await daemon.submit_many("noop", [{"blob": "x" * 1_000_000}] * PAGE_TASKS, at_once=2)
    for task in tasks:
        assert (await daemon.task(task.id, wait=10)).state == "succeeded"
    async with unread_connection(daemon.url, request("/v1/tasks?limit=1000")) as stuck:
        async with asyncio.timeout(WAIT):  # it sent nothing more in `answer.STALL` seconds
            await eventually(lambda: reset(stuck))
    # A client that reads gets every page.
    assert {t.id for t in await daemon.tasks()} == {t.id for t in tasks}


async def test_past_the_budget_the_longest_watched_connection_is_reset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(answer, "UNSENT_BUDGET", 6 * MIB)
    monkeypatch.setattr(answer, "STALL", 3600.0)  # here only the budget resets
    body = b'"' + b"x" * (4 * MIB) + b'"'

    async def big(request: web.Request) -> web.StreamResponse:
        # The kernel takes little of the answer: what is unsent stays in the transport.
        assert request.transport is not None
        sock = request.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return JsonAnswer(body)

    app = web.Application()
    app.router.add_get("/big", big)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    url = f"http://127.0.0.1:{server.port}"
    try:
        async with (
            unread_connection(url, request("/big")) as first,
            asyncio.timeout(WAIT),
        ):
            await read_until(first, b"\r\n\r\n")  # its answer is written, and watched
            async with unread_connection(url, request("/big")) as second:
                await read_until(second, b"\r\n\r\n")  # 8 MiB unsent in all: over budget
                await eventually(lambda: reset(first))
                assert await reset(second) is None  # 4 MiB alone is within it
    finally:
        await server.close()
