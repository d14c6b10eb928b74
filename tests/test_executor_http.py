"""The `http` executor against a real aiohttp server on 127.0.0.1: results, how each status
is classified, Retry-After, timeouts, redirects, headers and the signature a receiver checks."""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import logging
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from daemon.config import HttpType, parse
from daemon.errors import ConfigError
from daemon.executors.base import JSON, Executor, Job, Permanent, RetryAfter, TaskLogger
from daemon.executors.http import (
    ConnectTimeout,
    HttpClient,
    HttpStatusError,
    http_executor,
    parse_retry_after,
    read_secret,
)
from daemon.tasktypes import build_types

SECRET = "s3cret-shared-with-the-receiver"


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A test server that records every request it gets."""

    base: str
    seen: list[Seen] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def paths(self) -> list[str]:
        return [s.path for s in self.seen]


def make_job(
    payload: JSON = None, *, task_id: str = "task-1", attempt: int = 1, within: float = 60
) -> Job:
    return Job(
        task_id=task_id,
        type="hook",
        attempt=attempt,
        payload=payload,
        deadline=time.time() + within,
        logger=TaskLogger(logging.getLogger("tests.http"), {"task_id": task_id}),
    )


def verify(secret: bytes, header: str, body: bytes, now: float, tolerance: float = 300) -> bool:
    """The receiver's check, exactly as daemon/executors/http.py documents it."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    timestamp, given = fields["t"], fields["v1"]
    expected = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, given) and abs(now - int(timestamp)) <= tolerance


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    box: list[Receiver] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        rx = box[0]
        rx.seen.append(Seen(request.path, dict(request.headers), await request.read()))
        path, query = request.path, request.query
        if path == "/json":
            return web.json_response({"ok": True, "echo": await request.json()})
        if path == "/text":
            return web.Response(text="plain words")
        if path == "/empty":
            return web.Response(status=204)
        if path == "/big":
            return web.Response(body=b"x" * 100_000)
        if path == "/slow":
            rx.arrived.set()
            await rx.release.wait()
            return web.json_response({"late": True})
        if path == "/redirect":
            raise web.HTTPFound(rx.url("/target"))
        if path == "/redirect-secret":
            raise web.HTTPFound("http://app:hunter2@127.0.0.1:1/secret?token=abc#frag")
        if path.startswith("/status/"):
            headers = {}
            if "retry_after" in query:
                headers["Retry-After"] = query["retry_after"]
            return web.Response(status=int(path[8:]), text="went wrong", headers=headers)
        return web.json_response({"path": path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    box.append(Receiver(f"http://{host}:{port}"))
    yield box[0]
    box[0].release.set()
    await runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[HttpClient]:
    async with HttpClient() as opened:
        yield opened


def post_to(client: HttpClient, url: str, **settings: Any) -> Executor:
    options: dict[str, Any] = {
        "secret": None,
        "connect_timeout": 5.0,
        "max_connections": 10,
        "max_response": 64 * 1024,
    }
    options.update(settings)
    return http_executor(url, client=client, **options)


async def test_2xx_json_is_the_result_and_headers_name_the_task(
    receiver: Receiver, client: HttpClient
) -> None:
    payload = {"n": 1, "s": "é"}
    run = post_to(client, receiver.url("/json"))
    assert await run(make_job(payload, task_id="abc", attempt=3)) == {"ok": True, "echo": payload}
    [seen] = receiver.seen
    assert seen.body == msgspec.json.encode(payload)
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers["X-Offload-Task-Id"] == "abc"
    assert seen.headers["X-Offload-Attempt"] == "3"
    assert "X-Offload-Signature" not in seen.headers


async def test_2xx_text_is_a_string_and_no_content_is_null(
    receiver: Receiver, client: HttpClient
) -> None:
    assert await post_to(client, receiver.url("/text"))(make_job()) == "plain words"
    assert await post_to(client, receiver.url("/empty"))(make_job()) is None


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503])
async def test_overload_and_server_errors_are_retryable(
    receiver: Receiver, client: HttpClient, status: int
) -> None:
    with pytest.raises(HttpStatusError) as caught:
        await post_to(client, receiver.url(f"/status/{status}"))(make_job())
    assert caught.value.status == status
    assert not isinstance(caught.value, Permanent)


async def test_retry_after_seconds_is_carried(receiver: Receiver, client: HttpClient) -> None:
    with pytest.raises(RetryAfter) as caught:
        await post_to(client, receiver.url("/status/429?retry_after=7"))(make_job())
    assert caught.value.delay == 7


async def test_retry_after_http_date_is_carried(receiver: Receiver, client: HttpClient) -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    url = receiver.url("/status/503?retry_after=" + urllib.parse.quote(when))
    with pytest.raises(RetryAfter) as caught:
        await post_to(client, url)(make_job())
    assert 100 < caught.value.delay <= 121


def test_retry_after_parsing() -> None:
    assert parse_retry_after("120", now=0) == 120
    assert parse_retry_after("Thu, 01 Jan 1970 00:01:40 GMT", now=40) == 60
    assert parse_retry_after("Thu, 01 Jan 1970 00:00:10 GMT", now=40) == 0  # in the past
    assert parse_retry_after("99999999", now=0) == 86400  # clamped to a day
    assert parse_retry_after("soon", now=0) is None
    assert parse_retry_after("-5", now=0) is None
    assert parse_retry_after(None, now=0) is None


@pytest.mark.parametrize("status", [400, 401, 404, 409, 422])
async def test_other_4xx_is_permanent(receiver: Receiver, client: HttpClient, status: int) -> None:
    with pytest.raises(Permanent, match=f"answered {status}"):
        await post_to(client, receiver.url(f"/status/{status}?retry_after=5"))(make_job())


async def test_redirects_are_not_followed(receiver: Receiver, client: HttpClient) -> None:
    with pytest.raises(Permanent, match="redirects are not followed"):
        await post_to(client, receiver.url("/redirect"))(make_job({"x": 1}))
    assert receiver.paths() == ["/redirect"]  # /target was never called


async def test_a_redirect_target_is_quoted_without_its_secrets(
    receiver: Receiver, client: HttpClient
) -> None:
    # last_error is read by every client with the read scope, and the line is logged.
    with pytest.raises(Permanent) as caught:
        await post_to(client, receiver.url("/redirect-secret"))(make_job({"x": 1}))
    said = str(caught.value)
    assert said.endswith("redirects are not followed (to http://app:***@127.0.0.1:1/secret)")
    for secret in ("hunter2", "token", "abc", "frag"):
        assert secret not in said


async def test_response_over_max_response_fails_permanently(
    receiver: Receiver, client: HttpClient
) -> None:
    with pytest.raises(Permanent, match="over max_response"):
        await post_to(client, receiver.url("/big"), max_response=1000)(make_job())
    assert await post_to(client, receiver.url("/big"), max_response=100_000)(make_job()) == (
        "x" * 100_000
    )


async def test_the_task_deadline_bounds_the_request(receiver: Receiver, client: HttpClient) -> None:
    run = post_to(client, receiver.url("/slow"))
    with pytest.raises(TimeoutError):
        await run(make_job(within=3.0))  # room to connect and send on a stalled machine
    assert receiver.arrived.is_set()
    # The session is still sound for the next task.
    assert await post_to(client, receiver.url("/text"))(make_job()) == "plain words"


async def test_the_consumers_timeout_cancels_the_request_cleanly(
    receiver: Receiver, client: HttpClient
) -> None:
    run = post_to(client, receiver.url("/slow"))
    timeouts: list[asyncio.Timeout] = []

    async def like_the_consumer() -> JSON:
        async with asyncio.timeout(30) as timeout:
            timeouts.append(timeout)
            return await run(make_job())

    task = asyncio.create_task(like_the_consumer())
    await receiver.arrived.wait()
    timeouts[0].reschedule(asyncio.get_running_loop().time())
    with pytest.raises(TimeoutError):
        await task
    assert await post_to(client, receiver.url("/text"))(make_job()) == "plain words"


async def test_connection_refused_is_retryable(client: HttpClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port any more.
    with pytest.raises(aiohttp.ClientConnectionError) as caught:
        await post_to(client, f"http://127.0.0.1:{port}/")(make_job())
    assert not isinstance(caught.value, Permanent)


async def test_no_connection_within_connect_timeout_is_retryable(client: HttpClient) -> None:
    # A listener that never accepts, its backlog filled: the next connect hangs.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        try:
            run = post_to(client, f"http://127.0.0.1:{port}/", connect_timeout=0.2)
            with pytest.raises(ConnectTimeout, match=r"no connection within 0\.2s") as caught:
                await run(make_job())
        finally:
            for filler in fillers:
                filler.close()
    assert not isinstance(caught.value, Permanent | TimeoutError)


async def test_max_connections_bounds_requests_in_flight(
    receiver: Receiver, client: HttpClient
) -> None:
    run = post_to(client, receiver.url("/slow"), max_connections=1)
    runs = [asyncio.ensure_future(run(make_job(task_id=name))) for name in ("one", "two")]
    await receiver.arrived.wait()
    # The first request is held by the server. Give the second a window it must not use:
    # it waits for the type's one connection.
    done, _ = await asyncio.wait(runs, timeout=0.2)
    assert not done
    assert len(receiver.seen) == 1
    receiver.release.set()
    assert await asyncio.gather(*runs) == [{"late": True}, {"late": True}]
    assert len(receiver.seen) == 2


async def test_signature_verifies_with_the_documented_procedure(
    receiver: Receiver, client: HttpClient, tmp_path: Path
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    run = post_to(client, receiver.url("/json"), secret=read_secret(str(secret_file)))
    await run(make_job({"amount": 12}))
    [seen] = receiver.seen
    header = seen.headers["X-Offload-Signature"]
    now = time.time()
    assert verify(SECRET.encode(), header, seen.body, now)
    assert not verify(SECRET.encode(), header, seen.body + b" ", now)  # a changed body
    assert not verify(b"another secret", header, seen.body, now)
    assert not verify(SECRET.encode(), header, seen.body, now + 3600)  # a replay, later


def test_config_reports_every_bad_http_key(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    raw = {
        "types": {
            "a": {"kind": "http", "url": "ftp://example.org/", "connect_timeout": 0},
            "b": {"kind": "http", "url": "/relative", "secret_file": str(tmp_path / "none")},
            "c": {"kind": "http", "url": "http://example.org/", "secret_file": str(empty)},
        }
    }
    with pytest.raises(ConfigError) as caught:
        parse(raw)
    keys = [p.split(" ")[0] for p in caught.value.problems]
    assert sorted(keys) == [
        "types.a.connect_timeout",
        "types.a.url",
        "types.b.secret_file",
        "types.b.url",
        "types.c.secret_file",
    ]
    with pytest.raises(ConfigError) as caught:
        parse({"types": {"d": {"kind": "http", "max_connections": 0, "redirects": True}}})
    keys = [p.split(" ")[0].rstrip(":") for p in caught.value.problems]
    assert sorted(keys) == ["types.d.max_connections", "types.d.redirects", "types.d.url"]


async def test_configured_type_posts_signed_with_documented_defaults(
    receiver: Receiver, client: HttpClient, tmp_path: Path
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    raw = {"kind": "http", "url": receiver.url("/json"), "secret_file": str(secret_file)}
    config = parse({"types": {"hook": raw}})
    tc = config.types["hook"]
    assert isinstance(tc, HttpType)
    assert (tc.connect_timeout, tc.max_connections, tc.max_response) == (5.0, 100, 65536)
    with ThreadPoolExecutor(1) as threads:
        types = build_types(config, threads, client)
    assert await types["hook"].executor(make_job([1])) == {"ok": True, "echo": [1]}
    [seen] = receiver.seen
    assert verify(SECRET.encode(), seen.headers["X-Offload-Signature"], seen.body, time.time())


async def test_a_closed_client_refuses_work(receiver: Receiver) -> None:
    client = HttpClient()
    await client.aclose()  # closing an unopened client is fine, too
    with pytest.raises(RuntimeError):
        await post_to(client, receiver.url("/json"))(make_job())
