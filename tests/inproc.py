"""Fixtures and helpers for the in-process tests: a real daemon (`serve()` as a task on the
test's loop, a real SQLite file in `tmp_path`, real HTTP on 127.0.0.1) and a `store` fixture
parametrized over every Store backend.

Test modules import what they use explicitly. Fixtures are registered under a short name
(`api`, `store`) and defined as `*_fixture` so the import does not clash with the
parameter; the import therefore carries `# noqa: F401`.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from daemon.config import Config, StoreConfig, parse
from daemon.ids import new_ids
from daemon.lifecycle import serve
from daemon.models import Counts, NewTask
from daemon.signals import Stop
from daemon.stats import Stats
from daemon.store import Store, open_store
from tests import apphandlers
from tests.apphandlers import Gate

START_WITHIN = 10.0  # seconds for the daemon to answer /readyz
STOP_WITHIN = 30.0  # seconds for serve() to return once stopped
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})

# A small, fast daemon: every handler the API tests use, tiny backoffs, a short grace.
TEST_TYPES: dict[str, dict[str, Any]] = {
    "sleep": {"kind": "python", "handler": "daemon.builtins:sleep"},
    "noop": {"kind": "python", "handler": "daemon.builtins:noop", "timeout": "1m"},
    "block": {"kind": "python", "handler": "tests.apphandlers:block"},
    "flaky": {"kind": "python", "handler": "tests.apphandlers:fail_while_flag"},
    "inner_timeout": {"kind": "python", "handler": "tests.apphandlers:inner_timeout"},
    "always_fail": {
        "kind": "python",
        "handler": "tests.apphandlers:always_fail",
        "max_attempts": 3,
        "backoff": {"initial": "10ms", "max": "50ms", "jitter": 0.0},
    },
    "permanent": {
        "kind": "python",
        "handler": "tests.apphandlers:permanent",
        "max_attempts": 5,
        "backoff": {"initial": "10ms", "max": "50ms"},
    },
}


def free_port() -> int:
    """A port that was free a moment ago (`open_daemon` retries if someone took it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` applied table by table (a copy; neither is changed)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def make_config(tmp_path: Path, port: int, overrides: dict[str, Any] | None = None) -> Config:
    raw = {
        "server": {"listen": f"127.0.0.1:{port}", "max_body": "64KiB", "max_wait": "30s"},
        "store": {"url": f"sqlite:{tmp_path / 'offload.db'}", "synchronous": "normal"},
        "workers": {"concurrency": 4, "max_pending": 1000, "grace_period": "10s"},
        "log": {"level": "warning"},
        "types": TEST_TYPES,
    }
    return parse(merge(raw, overrides or {}), source="tests/inproc.py")


@dataclass(frozen=True)
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: Any  # decoded JSON, or the raw text if it is not JSON
    elapsed: float


@dataclass
class Daemon:
    """A running daemon and an HTTP client for it. Built by `open_daemon()`."""

    config: Config
    stop: Stop
    serving: asyncio.Task[Stats]
    http: aiohttp.ClientSession
    gates: list[Gate] = field(default_factory=list)

    async def request(self, method: str, path: str, **kwargs: Any) -> Reply:
        started = time.monotonic()
        async with self.http.request(method, path, **kwargs) as resp:
            raw = await resp.read()
            elapsed = time.monotonic() - started
            try:
                body: Any = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
            return Reply(resp.status, resp.headers, body, elapsed)

    async def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST a task that must be accepted; returns the task."""
        reply = await self.request("POST", "/v1/tasks", json=body)
        assert reply.status == 202, reply.body
        task: dict[str, Any] = reply.body
        return task

    async def task(self, task_id: str) -> dict[str, Any]:
        reply = await self.request("GET", f"/v1/tasks/{task_id}")
        assert reply.status == 200, reply.body
        task: dict[str, Any] = reply.body
        return task

    async def ended(self, task_id: str, within: float = 10.0) -> dict[str, Any]:
        """Long-poll until the task is terminal; fail the test after `within` seconds."""
        deadline = time.monotonic() + within
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"task {task_id} did not end within {within}s"
            wait = min(left, self.config.server.max_wait)
            reply = await self.request("GET", f"/v1/tasks/{task_id}", params={"wait": f"{wait}"})
            assert reply.status == 200, reply.body
            if reply.body["state"] in TERMINAL:
                task: dict[str, Any] = reply.body
                return task

    async def list_all(self, **params: str) -> list[dict[str, Any]]:
        """Every task matching `params`, following the cursor."""
        tasks: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            query = {"limit": "1000", **params}
            if cursor is not None:
                query["cursor"] = cursor
            reply = await self.request("GET", "/v1/tasks", params=query)
            assert reply.status == 200, reply.body
            tasks += reply.body["tasks"]
            cursor = reply.body["next_cursor"]
            if cursor is None:
                return tasks

    async def count(self) -> int:
        return len(await self.list_all())

    def gate(self) -> Gate:
        """A gate for a `block` task, released and forgotten when the daemon closes."""
        gate = apphandlers.open_gate()
        self.gates.append(gate)
        return gate

    async def shutdown(self, *, hurry: bool = False) -> Stats:
        """Request the stop (twice with `hurry`: skip the grace) and wait for serve()."""
        self.stop.request()
        if hurry:
            self.stop.request()
        async with asyncio.timeout(STOP_WITHIN):
            return await self.serving


async def _ready_once(http: aiohttp.ClientSession) -> bool:
    try:
        async with http.get("/readyz") as resp:
            return resp.status == 200
    except aiohttp.ClientConnectionError:
        return False


async def _until_ready(serving: asyncio.Task[Stats], http: aiohttp.ClientSession) -> None:
    """Poll /readyz until 200; raise whatever serve() raised if it ends first (a probe may
    hang on a port someone else holds, so each one races serve())."""
    async with asyncio.timeout(START_WITHIN):
        while True:
            probe = asyncio.create_task(_ready_once(http))
            await asyncio.wait({probe, serving}, return_when=asyncio.FIRST_COMPLETED)
            if serving.done():
                probe.cancel()
                await asyncio.wait({probe})
                serving.result()
                raise AssertionError("serve() returned before it was ready")
            if probe.result():
                return
            # Not a sleep: wake at once if serve() fails, else probe again shortly.
            await asyncio.wait({serving}, timeout=0.01)


def _address_in_use(exc: BaseException) -> bool:
    """serve() raises the bind error inside the ExceptionGroup of its TaskGroup."""
    if isinstance(exc, BaseExceptionGroup):
        return any(_address_in_use(e) for e in exc.exceptions)
    return isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE


@asynccontextmanager
async def open_daemon(
    tmp_path: Path, overrides: dict[str, Any] | None = None
) -> AsyncIterator[Daemon]:
    """Start `serve()` with the test config merged with `overrides` on a free port, yield it
    once /readyz answers 200. On exit its gates are released, it is stopped (hurried: no
    grace), serve() must return without an exception, and the client closes."""
    for _ in range(5):
        config = make_config(tmp_path, free_port(), overrides)
        stop = Stop()
        serving = asyncio.create_task(serve(config, stop=stop), name="offload")
        http = aiohttp.ClientSession(
            base_url=f"http://{config.server.listen}",
            timeout=aiohttp.ClientTimeout(total=STOP_WITHIN),
        )
        try:
            await _until_ready(serving, http)
        except BaseException as exc:
            await http.close()
            if not serving.done():
                stop.request()
                stop.request()
            await asyncio.wait({serving})
            if not serving.cancelled():
                serving.exception()  # retrieved: `exc` is what the test sees
            if _address_in_use(exc):
                continue  # another process took the port between free_port() and the bind
            raise
        break
    else:
        raise AssertionError("no free port after 5 tries")
    daemon = Daemon(config, stop, serving, http)
    try:
        yield daemon
    finally:
        try:
            for gate in daemon.gates:
                apphandlers.close_gate(gate)
            if not serving.done():
                await daemon.shutdown(hurry=True)
            serving.result()
        finally:
            await http.close()


@pytest.fixture(name="api")
async def api_fixture(tmp_path: Path) -> AsyncIterator[Daemon]:
    """A daemon with the default test config."""
    async with open_daemon(tmp_path) as daemon:
        yield daemon


def assert_error(reply: Reply, status: int, code: str, field: str | None = None) -> None:
    """`reply` is the contract's JSON error with this status, code and (if given) field."""
    assert reply.status == status, (reply.status, reply.body)
    assert reply.headers.get("Content-Type", "").startswith("application/json")
    assert isinstance(reply.body, dict), reply.body
    assert set(reply.body) == {"error"}, reply.body
    error = reply.body["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str)
    assert error["message"]
    assert error.get("field") == field, error


def delayed_tasks(count: int, *, types: dict[int, str] | None = None) -> list[NewTask]:
    """`count` `noop` tasks queued for an hour from now (none runs during a test), ids in
    order; task n is of type `types[n]` where that is given."""
    now = time.time()
    ids = new_ids(count, now)
    types = types or {}
    return [
        NewTask(id=ids[n], type=types.get(n, "noop"), queue="default", payload=b"{}",
                priority=0, run_at=now + 3600, created_at=now, timeout=60.0, max_attempts=3)
        for n in range(count)
    ]  # fmt: skip


async def prefill(tmp_path: Path, tasks: list[NewTask]) -> None:
    """Commit `tasks`, in order, into the store a daemon of `open_daemon(tmp_path)` serves,
    before it starts (as fast as the store admits: no HTTP)."""
    async with open_store(make_config(tmp_path, free_port()).store) as store:
        for at in range(0, len(tasks), 5000):
            await store.admit(tasks[at : at + 5000], max_pending=2**62)


async def stored_counts(config: Config) -> Counts:
    """What the daemon's store holds, read by opening it afresh (the daemon must be stopped)."""
    async with open_store(config.store) as store:
        return await store.counts()


# -- the Store backends the contract suite runs against ---------------------------------------


def open_sqlite_store(tmp_path: Path) -> AbstractAsyncContextManager[Store]:
    return open_store(StoreConfig(url=f"sqlite:{tmp_path / 'store.db'}", synchronous="normal"))


@asynccontextmanager
async def open_postgres_store(tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh database on the session's PostgreSQL (tests/pg.py; the test skips when
    PostgreSQL is not installed), dropped after the store closes."""
    from tests import pg

    async with pg.open_database() as url, open_store(StoreConfig(url=url, pool_size=4)) as store:
        yield store


# One entry per backend; each opens an empty store that is closed on exit.
STORE_BACKENDS: dict[str, Callable[[Path], AbstractAsyncContextManager[Store]]] = {
    "sqlite": open_sqlite_store,
    "postgres": open_postgres_store,
}


@pytest.fixture(name="store", params=sorted(STORE_BACKENDS))
async def store_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An empty store of each backend, closed after the test."""
    async with STORE_BACKENDS[request.param](tmp_path) as store:
        yield store
