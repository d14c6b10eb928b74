"""The route wrapper over real HTTP on loopback: what a handler raises becomes the contract's
JSON answer, a bug is logged and answered 500 without details, and every answer is counted
under its route's label."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import cast

import aiohttp
import pytest
from aiohttp import web

from daemon.auth import Authenticator
from daemon.errors import Conflict, QueueFull
from daemon.metrics import Metrics
from daemon.routing import STREAM, UNMATCHED, Routes
from daemon.runtime import Runtime
from tests.logevents import log_event


async def broken(request: web.Request) -> web.Response:
    raise RuntimeError("secret detail of a bug")


async def busy(request: web.Request) -> web.Response:
    error = QueueFull("too many", pending=10, needed=1)
    error.retry_after = 7
    raise error


async def taken(request: web.Request) -> web.Response:
    raise Conflict(f"item {request.match_info['name']} is taken", field="name")


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


async def stream_then_fail(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    request[STREAM] = response
    await response.write(b"first part\n")
    raise RuntimeError("broke mid-stream")


async def stream_until_gone(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    request[STREAM] = response
    await response.write(b"started\n")
    while True:  # until a write meets the closed connection
        await response.write(b"more\n")
        await asyncio.sleep(0.01)


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, Metrics]]:
    metrics = Metrics()
    # The wrapper reads only these attributes of the runtime.
    rt = cast(Runtime, SimpleNamespace(auth=Authenticator([], []), metrics=metrics))
    app = web.Application()
    routes = Routes(app, rt)
    routes.add("/broken", GET=broken)
    routes.add("/busy", POST=busy)
    routes.add("/items/{name}", PUT=taken, GET=hello)
    routes.add("/stream", head=False, GET=stream_then_fail)
    routes.add("/endless", GET=stream_until_gone)
    routes.close()
    # As the daemon serves (http_server.py): a handler is not cancelled when its client goes.
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}", metrics
    finally:
        await runner.cleanup()


async def test_a_bug_is_logged_and_answered_500_without_its_details(
    served: tuple[str, Metrics], caplog: pytest.LogCaptureFixture
) -> None:
    url, metrics = served
    with caplog.at_level(logging.ERROR, logger="daemon.routing"):
        async with aiohttp.ClientSession() as http, http.get(url + "/broken") as reply:
            body = await reply.json()
            status = reply.status
    assert status == 500
    assert body["error"]["code"] == "internal"
    assert "secret" not in body["error"]["message"]
    (record,) = [r for r in caplog.records if getattr(r, "event", None) == "http.bug"]
    assert record.exc_info is not None and "secret detail" in str(record.exc_info[1])
    assert metrics.http.counts[("/broken", "500")] == 1


async def test_errors_keep_their_status_field_and_headers(served: tuple[str, Metrics]) -> None:
    url, metrics = served
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/busy") as reply:
            assert reply.status == 503
            assert reply.headers["Retry-After"] == "7"
            assert (await reply.json())["error"]["code"] == "queue_full"
        async with http.put(url + "/items/a") as reply:
            assert reply.status == 409
            error = (await reply.json())["error"]
            assert (error["code"], error["field"]) == ("conflict", "name")
            assert "item a is taken" in error["message"]
    assert metrics.http.counts[("/busy", "503")] == 1
    assert metrics.http.counts[("/items/{name}", "409")] == 1


async def test_other_methods_and_paths_answer_405_and_404_in_the_same_shape(
    served: tuple[str, Metrics],
) -> None:
    url, metrics = served
    async with aiohttp.ClientSession() as http:
        async with http.head(url + "/items/a") as reply:
            assert reply.status == 200  # a GET route answers HEAD too
        async with http.delete(url + "/items/a") as reply:
            assert reply.status == 405
            assert set(reply.headers["Allow"].split(",")) == {"GET", "HEAD", "PUT"}
            assert (await reply.json())["error"]["code"] == "method_not_allowed"
        for path in ("/nowhere", "/items/a/b"):
            async with http.get(url + path) as reply:
                assert reply.status == 404
                assert (await reply.json())["error"]["code"] == "not_found"
    assert metrics.http.counts[("/items/{name}", "200")] == 1
    assert metrics.http.counts[("/items/{name}", "405")] == 1
    assert metrics.http.counts[(UNMATCHED, "404")] == 2


async def test_a_stream_that_fails_ends_without_a_second_response(
    served: tuple[str, Metrics], caplog: pytest.LogCaptureFixture
) -> None:
    url, _ = served
    with caplog.at_level(logging.ERROR, logger="daemon.routing"):
        async with aiohttp.ClientSession() as http, http.get(url + "/stream") as reply:
            status = reply.status
            body = await reply.read()  # a complete chunked body: the stream was ended
    assert status == 200
    assert body == b"first part\n"  # no error document inside the stream
    assert [r.event for r in caplog.records if hasattr(r, "event")] == ["http.bug"]


async def test_a_client_that_goes_away_is_not_a_bug(
    served: tuple[str, Metrics], caplog: pytest.LogCaptureFixture
) -> None:
    url, metrics = served
    with (
        log_event("daemon.routing", "http.client_gone") as gone,
        caplog.at_level(logging.DEBUG, logger="daemon.routing"),
    ):
        async with aiohttp.ClientSession() as http, http.get(url + "/endless") as reply:
            assert await reply.content.readline() == b"started\n"
        # Leaving the block closed the connection mid-stream.
        async with asyncio.timeout(10):
            await gone.wait()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [key for key in metrics.http.counts if key[0] == "/endless"]


async def test_a_stream_route_without_head_answers_head_405(served: tuple[str, Metrics]) -> None:
    url, _ = served
    async with aiohttp.ClientSession() as http, http.head(url + "/stream") as reply:
        assert reply.status == 405
        assert reply.headers["Allow"] == "GET"
