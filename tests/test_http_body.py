"""`server.body_timeout` on a real `offload serve` over loopback: a body that stops half-way,
or that comes a byte at a time for longer than the timeout, is answered 408 within it and
its connection closed, with nothing admitted; a body sent in pieces that ends in time is
taken; a client that goes away mid-body is still only a client gone.

Raw connections, since the point is what the bytes do on the wire. Every wait is bounded
by `asyncio.timeout()` or a read with a timeout; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.harness import Daemon, Offload
from tests.test_http_edge import NOOP, QUICK, Conn, connect, request, start

BODY_TIMEOUT = 1.0  # seconds: the daemon's server.body_timeout in the 408 tests
MARGIN = 4.0  # seconds an answer may come after the deadline on a loaded machine
LENGTH = 200  # the Content-Length the tests' requests announce


def submission(path: str) -> bytes:
    """A body of exactly LENGTH bytes for `path` that would be admitted if it all came."""

    def wrapped(task: dict[str, Any]) -> bytes:
        return json.dumps({"tasks": [task]} if path.endswith("batch") else task).encode()

    unpadded = len(wrapped({**NOOP, "payload": ""}))
    body = wrapped({**NOOP, "payload": "x" * (LENGTH - unpadded)})
    assert len(body) == LENGTH
    return body


def post(daemon: Daemon, path: str, body: bytes) -> tuple[bytes, bytes]:
    """(the request's line and headers, its body), Content-Length saying the whole body."""
    whole = request(daemon, "POST", path, body, Content_Type="application/json")
    return whole[: -len(body)], body


async def answer(conn: Conn) -> tuple[int, dict[str, str], bytes]:
    """(status, headers by lower-case name, body) of the next answer."""
    head = await conn.reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers = {name.lower(): value for name, _, value in (h.partition(": ") for h in lines)}
    body = await conn.reader.readexactly(int(headers["content-length"]))
    return int(status_line.split(" ")[1]), headers, body


async def answered_within(reply: asyncio.Task[Any], seconds: float) -> bool:
    """Whether `reply` (a read of the next answer) is done within `seconds`: the daemon
    said something in that time."""
    done, _ = await asyncio.wait({reply}, timeout=seconds)
    return bool(done)


def assert_timed_out(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 408, body
    error = json.loads(body)["error"]
    assert (error["code"], error["field"]) == ("request_timeout", "body"), error
    assert "server.body_timeout" in error["message"], error
    assert headers.get("connection", "").lower() == "close", headers


async def listed(daemon: Daemon) -> list[str]:
    reply = await daemon.request("GET", "/v1/tasks")
    assert reply.status == 200, reply.body
    return [task["id"] for task in json.loads(reply.body)["tasks"]]


async def timed_out(conn: Conn, rest: bytes, *, every: float | None) -> float:
    """After the request's head, send `rest` at once (`every` None), or a byte of it every
    `every` s until answered; then read the answer, check it is the 408, and return how long
    after the head it came (at most BODY_TIMEOUT + MARGIN)."""
    loop = asyncio.get_running_loop()
    sent_at = loop.time()
    reading = asyncio.create_task(answer(conn))
    try:
        async with asyncio.timeout(BODY_TIMEOUT + MARGIN):
            if every is None:
                conn.send(rest)
            else:
                for i in range(len(rest)):
                    conn.send(rest[i : i + 1])
                    if await answered_within(reading, every):
                        break
            reply = await reading
    finally:
        reading.cancel()
    assert_timed_out(*reply)
    return loop.time() - sent_at


async def test_a_body_that_stops_or_dribbles_past_body_timeout_is_answered_408_and_closed(
    offload: Offload,
) -> None:
    """A body that stops half-way, and one that keeps coming a byte every 0.2 s (never
    idle for long, but slower in all than the deadline allows): each is answered 408
    between body_timeout and body_timeout + MARGIN after its headers, the connection
    closes, and nothing is admitted; the daemon serves on."""
    daemon = await start(offload, server=f'body_timeout = "{BODY_TIMEOUT:g}s"')

    for path in ("/v1/tasks", "/v1/tasks/batch"):
        head, body = post(daemon, path, submission(path))
        for rest, every in [(body[: LENGTH // 2], None), (body, 0.2)]:
            async with connect(daemon) as conn:
                conn.send(head)
                took = await timed_out(conn, rest, every=every)
                assert took >= BODY_TIMEOUT * 0.9, (path, every, took)
                assert await conn.closed(), (path, every)

    assert await listed(daemon) == []
    metrics = (await daemon.request("GET", "/metrics")).body.decode()
    for route in ("/v1/tasks", "/v1/tasks/batch"):
        assert f'offload_http_requests_total{{code="408",route="{route}"}} 2.0' in metrics
    # Still serving: a submission sent whole is taken.
    reply = await daemon.request("POST", "/v1/tasks", json=NOOP)
    assert reply.status == 202, reply.body
    assert await listed(daemon) == [json.loads(reply.body)["id"]]


async def test_a_body_sent_in_pieces_that_ends_in_time_is_taken(offload: Offload) -> None:
    """The deadline is for the whole body: pieces with a pause between them, all in well
    within body_timeout, make a 202, and the connection stays open for the next request."""
    daemon = await start(offload, server='body_timeout = "5s"')
    head, body = post(daemon, "/v1/tasks", submission("/v1/tasks"))
    async with connect(daemon) as conn:
        conn.send(head + body[:10])
        reading = asyncio.create_task(answer(conn))
        try:
            # Nothing is answered while the body is on its way.
            assert not await answered_within(reading, 0.5)
            conn.send(body[10:100])
            assert not await answered_within(reading, 0.5)
            conn.send(body[100:])
            async with asyncio.timeout(QUICK):
                status, _, got = await reading
        finally:
            reading.cancel()
        assert status == 202, got
        task_id = json.loads(got)["id"]
        conn.send(request(daemon, "GET", f"/v1/tasks/{task_id}"))
        assert (await conn.answer())[0] == 200
    assert await listed(daemon) == [task_id]


async def test_a_client_gone_mid_body_is_neither_a_timeout_nor_an_error(
    offload: Offload,
) -> None:
    """A client that stops sending half-way through a body (its side shut, so the daemon
    sees the end of the stream, as at a close) admits nothing and is answered nothing: the
    daemon closes its side at once, well before body_timeout (60 s here), with no 408 (it
    was not slow) and no 500 (it is no bug)."""
    daemon = await start(offload, server='body_timeout = "60s"')
    head, body = post(daemon, "/v1/tasks", submission("/v1/tasks"))
    async with connect(daemon) as conn:
        conn.send(head + body[: LENGTH // 2])
        conn.writer.write_eof()
        assert await conn.closed()  # within QUICK, and without a byte of an answer
    metrics = (await daemon.request("GET", "/metrics")).body.decode()
    assert 'route="/v1/tasks"' not in metrics  # a client gone is logged, not counted
    assert await listed(daemon) == []
