"""The HTTP edge of a real `offload serve` over loopback, where it meets clients that are not
its own: a compressed body from a sender without a token (never inflated, never drained),
connections that never finish their headers (closed at `server.header_timeout`), more
connections than `server.max_connections` (closed at once; the others keep working), and web
pages (another Origin, a cross-site fetch, a rebound DNS name: 403, nothing changes).

Raw sockets where the behaviour is below HTTP, aiohttp where headers are the point. Every
wait is bounded by `asyncio.timeout()`; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import tempfile
import zlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness import (
    HOST,
    READY_TIMEOUT,
    Daemon,
    DaemonConfig,
    DaemonExited,
    Offload,
    eventually,
    free_port,
)

QUICK = 10.0  # seconds an answer or a close may take: far below what a failure takes
LINGER = 10.0  # seconds aiohttp reads on, by default, after answering a request early
TOKEN = "submit-0123456789abcdef"
EVIL = "http://evil.example"
NOOP = {"type": "noop", "delay": 3600}
SCHEDULE = """
[[schedules]]
name = "nightly"
cron = "0 3 * * *"
type = "noop"
"""


# -- daemons ----------------------------------------------------------------------------


def write_config(offload: Offload, listen: str, server: str = "", more: str = "") -> DaemonConfig:
    """A config with one `noop` type, `server` lines added to [server] and `more` after."""
    db = offload.tmp_path / "edge.db"
    text = (
        f'[server]\nlisten = "{listen}"\n{server}\n'
        f'[store]\nurl = "sqlite:///{db}"\nsynchronous = "normal"\n'
        '[types.noop]\nkind = "python"\nhandler = "daemon.builtins:noop"\n'
        f"{more}\n"
    )
    path = offload.tmp_path / f"edge-{len(list(offload.tmp_path.glob('edge-*.toml')))}.toml"
    path.write_text(text, encoding="utf-8")
    return DaemonConfig(path=path, url=f"http://{listen}", db=db)


async def start(offload: Offload, server: str = "", more: str = "") -> Daemon:
    return await offload.start(write_config(offload, f"{HOST}:{free_port()}", server, more))


def with_token(offload: Offload) -> str:
    """The [auth] table of a tokens file holding TOKEN (scope submit)."""
    tokens = offload.tmp_path / "tokens"
    tokens.write_text(f"submitter submit {TOKEN}\n")
    tokens.chmod(0o600)
    return f'[auth]\ntokens_file = "{tokens}"\n'


def port_of(daemon: Daemon) -> int:
    return int(daemon.url.rpartition(":")[2])


def cpu_seconds(pid: int) -> float:
    """User and system CPU the process has used (utime and stime of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- raw HTTP ---------------------------------------------------------------------------


class Conn:
    """One raw connection to a daemon: send bytes, read answers, see it closed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def answer(self) -> tuple[int, bytes]:
        """The status and body of the next answer (within QUICK)."""
        async with asyncio.timeout(QUICK):
            head = await self.reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head.decode("latin-1").split("\r\n")
            length = next(
                int(line.partition(":")[2])
                for line in lines
                if line.lower().startswith("content-length:")
            )
            return int(status_line.split(" ")[1]), await self.reader.readexactly(length)

    async def closed(self, within: float = QUICK) -> bool:
        """Whether the daemon closes the connection (sending nothing more) `within` s."""
        try:
            async with asyncio.timeout(within):
                return await self.reader.read(1) == b""
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True


@asynccontextmanager
async def connect(daemon: Daemon) -> AsyncIterator[Conn]:
    reader, writer = await asyncio.open_connection(HOST, port_of(daemon))
    try:
        yield Conn(reader, writer)
    finally:
        writer.close()


def request(daemon: Daemon, method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    """A request's bytes, with a Host of the daemon's own address and a Content-Length."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port_of(daemon)}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def gzip_bomb(mib: int) -> bytes:
    """A valid gzip body of `mib` MiB of zeros, about a thousandth of that in size: one
    fully flushed deflate block of 1 MiB, repeated (compressing it all takes seconds)."""
    zeros = bytes(1 << 20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"  # no name, no mtime, unix
    trailer = struct.pack("<II", crc, (mib << 20) & 0xFFFFFFFF)
    return header + block * mib + deflate.flush() + trailer


# -- 1. compressed bodies ---------------------------------------------------------------


async def test_a_compressed_body_is_not_inflated_or_drained_for_a_sender_without_a_token(
    offload: Offload,
) -> None:
    """1 MiB of gzip inflates to 1 GiB: about a second of the event loop's CPU. A request
    refused before its body is read costs the daemon the bytes it received, no inflating;
    if more is on its way, the connection closes after the answer rather than read on (as
    aiohttp would for 10 s). Only an authenticated submission is inflated, and only up to
    server.max_body (413)."""
    daemon = await start(offload, more=with_token(offload))
    bomb = gzip_bomb(256)
    gzipped = {"Content_Type": "application/json", "Content_Encoding": "gzip"}
    before = cpu_seconds(daemon.pid)

    for path, status in [("/healthz", 405), ("/v1/tasks", 401), ("/v1/tasks/batch", 401)]:
        async with connect(daemon) as conn:
            conn.send(request(daemon, "POST", path, bomb, **gzipped))
            assert (await conn.answer())[0] == status, path
        async with connect(daemon) as conn:
            whole = request(daemon, "POST", path, bomb, **gzipped)
            conn.send(whole[: len(whole) // 2])  # the rest is still to come
            assert (await conn.answer())[0] == status, path
            assert await conn.closed(within=LINGER / 2), path
    async with connect(daemon) as conn:
        token = {"Authorization": f"Bearer {TOKEN}"}
        conn.send(request(daemon, "POST", "/v1/tasks", bomb, **gzipped, **token))
        status, body = await conn.answer()
        assert status == 413, body
        assert json.loads(body)["error"]["code"] == "too_large"
        # A compressed body within the limit is inflated once, by the API.
        task = zlib.compress(json.dumps({**NOOP, "payload": "x" * 1000}).encode())
        gzipped["Content_Encoding"] = "deflate"
        conn.send(request(daemon, "POST", "/v1/tasks", task, **gzipped, **token))
        status, body = await conn.answer()
        assert status == 202, body
        assert json.loads(body)["payload"] == "x" * 1000

    used = cpu_seconds(daemon.pid) - before
    assert used < 0.5, f"the daemon spent {used:.2f}s of CPU on 8 requests"
    assert (await daemon.request("GET", "/healthz")).status == 200


# -- 2. slow headers, many connections --------------------------------------------------


async def test_headers_that_do_not_arrive_in_time_close_the_connection_and_nothing_else(
    offload: Offload,
) -> None:
    """server.header_timeout (1 s here) closes a half-sent request (408) and a connection that
    sends nothing; a long-poll, an event stream and an idle keep-alive connection outlive it."""
    daemon = await start(offload, server='header_timeout = "1s"\nsse_heartbeat = "200ms"')
    task = await daemon.request("POST", "/v1/tasks", json=NOOP)
    task_id = json.loads(task.body)["id"]
    loop = asyncio.get_running_loop()

    async with AsyncExitStack() as stack:
        kept = await stack.enter_async_context(connect(daemon))
        kept.send(request(daemon, "GET", "/healthz"))
        assert (await kept.answer())[0] == 200
        events = await stack.enter_async_context(connect(daemon))
        events.send(request(daemon, "GET", "/v1/events"))
        async with asyncio.timeout(QUICK):
            assert b" 200 " in await events.reader.readuntil(b"\r\n\r\n")
        poll = await stack.enter_async_context(connect(daemon))
        polled_at = loop.time()
        poll.send(request(daemon, "GET", f"/v1/tasks/{task_id}?wait=3"))
        silent = await stack.enter_async_context(connect(daemon))
        async with connect(daemon) as slow:
            slow.send(b"GET /v1/tas")
            status, body = await slow.answer()
            assert status == 408, body
            assert json.loads(body)["error"]["code"] == "request_timeout"
            assert await slow.closed()
        assert await silent.closed()

        # The long-poll runs its 3 s, past the deadline: its headers had arrived.
        status, body = await poll.answer()
        assert status == 200, body
        assert loop.time() - polled_at >= 2.5
        # The stream is still live: it carries the next task's events.
        later = json.loads((await daemon.request("POST", "/v1/tasks", json=NOOP)).body)["id"]
        async with asyncio.timeout(QUICK):
            while later.encode() not in await events.reader.readline():
                pass
        # Idle since its answer for longer than header_timeout, and still served.
        kept.send(request(daemon, "GET", "/healthz"))
        assert (await kept.answer())[0] == 200

    metrics = (await daemon.request("GET", "/metrics")).body.decode()
    assert 'offload_http_requests_total{code="408",route="malformed"} 1.0' in metrics


async def test_connections_past_max_connections_are_closed_and_the_others_keep_working(
    offload: Offload,
) -> None:
    daemon = await start(offload, server="max_connections = 4")

    async def served(stack: AsyncExitStack) -> Conn | None:
        """A connection that got an answer; None if it was closed at the cap (one of the
        harness's closing connections may still count for a moment)."""
        conn = await stack.enter_async_context(connect(daemon))
        conn.send(request(daemon, "GET", "/healthz"))
        try:
            return conn if (await conn.answer())[0] == 200 else None
        except (asyncio.IncompleteReadError, ConnectionResetError):
            return None

    async with AsyncExitStack() as stack:
        held = []
        async with asyncio.timeout(QUICK):
            for _ in range(4):
                held.append(await eventually(lambda: served(stack)))
        async with connect(daemon) as extra:
            assert await extra.closed()
        for conn in held:
            conn.send(request(daemon, "GET", "/healthz"))
            assert (await conn.answer())[0] == 200
        held[0].writer.close()
        async with asyncio.timeout(QUICK):
            again = await eventually(lambda: served(stack))
        again.send(request(daemon, "GET", "/metrics"))
        status, body = await again.answer()
    assert status == 200
    assert 'offload_http_requests_total{code="503",route="over_capacity"}' in body.decode()


# -- 3. web pages -----------------------------------------------------------------------


@asynccontextmanager
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=QUICK)) as http:
        yield http


async def call(
    http: aiohttp.ClientSession,
    daemon: Daemon,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    *,
    data: bytes | None = None,
) -> tuple[int, Any]:
    async with http.request(method, daemon.url + path, headers=headers, data=data) as resp:
        return resp.status, json.loads(await resp.read())


def refused(reply: tuple[int, Any], status: int, field: str) -> bool:
    code = {403: "forbidden", 415: "unsupported_media_type"}[status]
    return reply[0] == status and reply[1]["error"] == {
        "code": code,
        "message": reply[1]["error"]["message"],
        "field": field,
    }


async def test_a_web_page_of_another_origin_changes_nothing(offload: Offload) -> None:
    """What a browser sends to any origin without asking first (a form or text/plain POST,
    or one without a body) is refused, naming the header, and nothing changes."""
    daemon = await start(offload, more=SCHEDULE)
    async with session() as http:
        status, task = await call(
            http,
            daemon,
            "POST",
            "/v1/tasks",
            data=json.dumps(NOOP).encode(),
            headers={"Content-Type": "application/json"},
        )
        assert status == 202
        assert (await call(http, daemon, "DELETE", f"/v1/tasks/{task['id']}"))[0] == 200
        paths = [
            "/v1/queues/default/pause",
            "/v1/schedules/nightly/pause",
            f"/v1/tasks/{task['id']}/retry",
        ]
        for path in paths:
            for body, kind in [(b"x", "text/plain"), (b"a=b", "application/x-www-form-urlencoded")]:
                headers = {"Origin": EVIL, "Content-Type": kind}
                reply = await call(http, daemon, "POST", path, headers, data=body)
                assert refused(reply, 403, "Origin"), (path, reply)
            reply = await call(http, daemon, "POST", path, {"Origin": "null"})
            assert refused(reply, 403, "Origin"), (path, reply)
        submit = {"Origin": EVIL, "Content-Type": "application/json"}
        reply = await call(http, daemon, "POST", "/v1/tasks", submit, data=b'{"type": "noop"}')
        assert refused(reply, 403, "Origin")
        reply = await call(http, daemon, "GET", "/v1/tasks", {"Sec-Fetch-Site": "cross-site"})
        assert refused(reply, 403, "Sec-Fetch-Site")
        # Without an Origin, a body must still say it is JSON.
        reply = await call(
            http, daemon, "POST", paths[0], {"Content-Type": "text/plain"}, data=b"x"
        )
        assert refused(reply, 415, "Content-Type")

        (queue,) = (await call(http, daemon, "GET", "/v1/queues"))[1]["queues"]
        (schedule,) = (await call(http, daemon, "GET", "/v1/schedules"))[1]["schedules"]
        tasks = (await call(http, daemon, "GET", "/v1/tasks"))[1]["tasks"]
    assert not queue["paused"]
    assert not schedule["paused"]
    assert [t["state"] for t in tasks] == ["cancelled"]


async def test_the_daemons_own_origin_and_programs_are_served(offload: Offload) -> None:
    daemon = await start(offload)
    own = daemon.url
    async with session() as http:
        reply = await call(http, daemon, "POST", "/v1/queues/default/pause", {"Origin": own})
        assert reply[0] == 200, reply
        reply = await call(
            http, daemon, "POST", "/v1/queues/default/resume", {"Sec-Fetch-Site": "same-origin"}
        )
        assert reply[0] == 200, reply
        json_body = {"Content-Type": "application/json"}
        reply = await call(http, daemon, "POST", "/v1/queues/default/pause", json_body, data=b"{}")
        assert reply[0] == 200, reply


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("evil.example:{port}", 403),
        ("evil.example", 403),
        ("localhost.evil.example:{port}", 403),
        ("localhost:{port}", 200),
        ("localhost", 200),
        ("127.0.0.1:{port}", 200),
        ("[::1]:{port}", 200),
    ],
)
async def test_without_tokens_a_dns_name_other_than_localhost_is_refused(
    offload: Offload, host: str, status: int
) -> None:
    """A page on a domain rebound to 127.0.0.1 reaches the daemon with its own name as Host."""
    daemon = await start(offload)
    async with session() as http:
        headers = {"Host": host.format(port=port_of(daemon))}
        reply = await call(http, daemon, "GET", "/v1/tasks", headers)
    if status == 403:
        assert refused(reply, 403, "Host"), reply
    else:
        assert reply[0] == 200, reply


async def test_with_tokens_any_host_is_served_and_another_origin_still_is_not(
    offload: Offload,
) -> None:
    daemon = await start(offload, more=with_token(offload))
    token = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    async with session() as http:
        headers = {**token, "Host": "offload.internal.example"}
        reply = await call(http, daemon, "POST", "/v1/tasks", headers, data=b'{"type": "noop"}')
        assert reply[0] == 202, reply
        headers = {**token, "Origin": EVIL}
        reply = await call(http, daemon, "POST", "/v1/tasks", headers, data=b'{"type": "noop"}')
        assert refused(reply, 403, "Origin"), reply


async def test_over_a_unix_socket_any_host_is_served(offload: Offload) -> None:
    """No browser reaches a unix socket; clients name whatever host their URL has."""
    with tempfile.TemporaryDirectory(prefix="offload-") as directory:
        sock = Path(directory) / "offload.sock"
        daemon = await offload.start(write_config(offload, f"unix:{sock}"), ready=False)
        connector = aiohttp.UnixConnector(path=str(sock))
        async with aiohttp.ClientSession(connector=connector) as http:

            async def tasks() -> int | None:
                if daemon.returncode is not None:
                    raise DaemonExited(daemon.log_tail())
                try:
                    async with http.get("http://evil.example/v1/tasks") as resp:
                        return resp.status
                except aiohttp.ClientConnectionError:
                    return None  # not bound yet

            async with asyncio.timeout(READY_TIMEOUT):
                assert await eventually(tasks) == 200
