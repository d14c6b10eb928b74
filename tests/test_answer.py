"""JSON answers written as one block (`daemon/answer.py`), read byte for byte off a raw
connection to a real daemon: the headers aiohttp would send, keep-alive as HTTP/1.0 and
1.1 clients ask for it, HEAD without a body, pipelined requests answered in order; and the
way back to aiohttp's own response where an application needs it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from daemon.answer import JsonAnswer
from tests.inproc import (  # noqa: F401 (api_fixture is the `api` fixture)
    Daemon,
    api_fixture,
)

WITHIN = 10.0
NOOP = json.dumps({"type": "noop", "payload": {}}).encode()


@dataclass
class Answer:
    version: str
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> dict[str, object]:
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value


class Connection:
    """One raw TCP connection: requests written as given, answers parsed from the bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def send(self, *requests: bytes) -> None:
        self.writer.write(b"".join(requests))

    async def answer(self, *, head: bool = False) -> Answer:
        async with asyncio.timeout(WITHIN):
            raw = await self.reader.readuntil(b"\r\n\r\n")
            status_line, *lines = raw[:-4].decode("latin-1").split("\r\n")
            version, status, _ = status_line.split(" ", 2)
            assert version in ("HTTP/1.0", "HTTP/1.1"), raw  # not what an answer left behind
            headers: CIMultiDict[str] = CIMultiDict()
            for line in lines:
                name, _, value = line.partition(": ")
                headers.add(name, value)
            length = 0 if head else int(headers["Content-Length"])
            body = await self.reader.readexactly(length)
        return Answer(version, int(status), headers, body)

    async def closed(self) -> bool:
        """True once the server closed the connection (nothing more comes)."""
        async with asyncio.timeout(WITHIN):
            return await self.reader.read(1) == b""


@asynccontextmanager
async def connect(address: str) -> AsyncIterator[Connection]:
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        yield Connection(reader, writer)
    finally:
        writer.close()


async def ask(app: web.Application, request: bytes) -> Answer:
    """Serve `app` on loopback (aiohttp's test server), send `request`, read one answer."""
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with connect(f"127.0.0.1:{server.port}") as conn:
            conn.send(request)
            return await conn.answer()
    finally:
        await server.close()


def post(version: str = "1.1", *extra: str) -> bytes:
    head = [
        f"POST /v1/tasks HTTP/{version}",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        f"Content-Length: {len(NOOP)}",
        *extra,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + NOOP


def get(path: str, method: str = "GET", version: str = "1.1", *extra: str) -> bytes:
    head = [f"{method} {path} HTTP/{version}", "Host: 127.0.0.1", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode()


async def test_a_submission_gets_every_header_and_the_connection_stays_open(
    api: Daemon,
) -> None:
    async with connect(api.config.server.listen) as conn:
        before = time.time()
        conn.send(post())
        accepted = await conn.answer()
        task = accepted.json()
        assert (accepted.version, accepted.status) == ("HTTP/1.1", 202)
        headers = accepted.headers
        assert headers["Content-Type"] == "application/json"
        assert int(headers["Content-Length"]) == len(accepted.body)
        assert headers["Location"] == f"/v1/tasks/{task['id']}"
        assert headers["Server"].startswith("Python/")
        date = parsedate_to_datetime(headers["Date"]).timestamp()
        assert before - 1 <= date <= time.time() + 1
        assert "Connection" not in headers  # HTTP/1.1 keeps it open by default
        assert sorted(str(name) for name in headers) == sorted(
            ["Content-Type", "Server", "Content-Length", "Date", "Location"]
        )

        conn.send(get(f"/v1/tasks/{task['id']}"))
        read = await conn.answer()
        assert read.status == 200
        assert read.json()["id"] == task["id"]


async def test_pipelined_submissions_are_answered_in_order(api: Daemon) -> None:
    async with connect(api.config.server.listen) as conn:
        conn.send(post(), post(), post())
        answers = [await conn.answer() for _ in range(3)]
    ids = [str(a.json()["id"]) for a in answers]
    assert [a.status for a in answers] == [202, 202, 202]
    assert len(set(ids)) == 3
    assert ids == sorted(ids)  # ids grow with admission order


async def test_connection_close_is_answered_and_honoured(api: Daemon) -> None:
    async with connect(api.config.server.listen) as conn:
        conn.send(post("1.1", "Connection: close"))
        answer = await conn.answer()
        assert answer.status == 202
        assert answer.headers["Connection"] == "close"
        assert await conn.closed()


async def test_http_1_0_closes_unless_asked_to_keep_the_connection(api: Daemon) -> None:
    async with connect(api.config.server.listen) as conn:
        conn.send(post("1.0"))
        answer = await conn.answer()
        assert (answer.version, answer.status) == ("HTTP/1.0", 202)
        assert "Connection" not in answer.headers
        assert await conn.closed()
    async with connect(api.config.server.listen) as conn:
        conn.send(post("1.0", "Connection: keep-alive"))
        answer = await conn.answer()
        assert answer.headers["Connection"] == "keep-alive"
        conn.send(post("1.0"))
        assert (await conn.answer()).status == 202
        assert await conn.closed()


async def test_head_answers_the_headers_of_get_without_a_body(api: Daemon) -> None:
    task = await api.submit({"type": "noop", "payload": {}, "delay": 3600})  # stays as it is
    path = f"/v1/tasks/{task['id']}"
    async with connect(api.config.server.listen) as conn:
        conn.send(get(path, "HEAD"), get(path))  # pipelined: a body after HEAD would show
        head = await conn.answer(head=True)
        full = await conn.answer()
    assert (head.status, head.body) == (200, b"")
    assert head.headers["Content-Type"] == full.headers["Content-Type"] == "application/json"
    assert int(head.headers["Content-Length"]) == len(full.body)
    assert full.json()["id"] == task["id"]


async def test_an_answer_goes_aiohttps_way_when_the_app_prepares_responses() -> None:
    # An application whose on_response_prepare receivers change headers: a JsonAnswer must
    # let them, and keep its own headers and body.
    async def answer(request: web.Request) -> web.StreamResponse:
        response = JsonAnswer(b'{"ok":true}', 201)
        response.headers["X-Own"] = "mine"
        return response

    async def stamp(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Prepared"] = "yes"

    for with_receiver in (False, True):
        app = web.Application()
        app.router.add_post("/", answer)
        if with_receiver:
            app.on_response_prepare.append(stamp)
        reply = await ask(app, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert (reply.status, reply.body) == (201, b'{"ok":true}')
        assert reply.headers["X-Own"] == "mine"
        assert reply.headers["Content-Type"] == "application/json"
        assert reply.headers.get("X-Prepared") == ("yes" if with_receiver else None)


async def test_a_header_the_answer_writes_itself_is_sent_once_as_set() -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        response = JsonAnswer(b'{"problem":1}', 200)
        response.headers["Content-Type"] = "application/problem+json"
        response.headers["Server"] = "offload-test"
        return response

    app = web.Application()
    app.router.add_get("/", answer)
    reply = await ask(app, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (reply.status, reply.body) == (200, b'{"problem":1}')
    assert reply.headers.getall("Content-Type") == ["application/problem+json"]
    assert reply.headers.getall("Server") == ["offload-test"]
