"""Several `offload serve` processes sharing one PostgreSQL database (tests/pg.py): every task
runs exactly once when all is well; a node killed or frozen loses its tasks to the others
within its lease; a frozen node that wakes changes nothing; PostgreSQL going away makes
admission answer 503 (never 202 without a commit, never 500) and the daemons carry on when
it is back. Executions are counted by the handlers (tests/pghandlers.py), outside the store.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]
import pytest

from daemon.config import StoreConfig
from daemon.ids import new_id
from daemon.models import NewTask
from daemon.store import open_store
from tests import pg, pghandlers
from tests.harness import Daemon, DaemonConfig, Offload, TomlValue, free_port, render_toml

T = TypeVar("T")
LEASE = 3.0  # seconds: the lease of these tests' daemons; heartbeat and rescue every LEASE / 3
RESCUE_EVERY = LEASE / 3
SLACK = 12.0  # seconds for a loaded 2-CPU machine to notice, claim and run, beyond the lease
TYPES = {
    "record": "tests.pghandlers:record",
    "hold": "tests.pghandlers:hold",
    "pause": "tests.pghandlers:pause",
    "span": "tests.pghandlers:span",
}


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A fresh database on the session's PostgreSQL, dropped after the test."""
    async with pg.open_database() as url:
        yield url


def node_config(
    offload: Offload, url: str, name: str, workers: dict[str, TomlValue] | None = None
) -> DaemonConfig:
    """A daemon config on `url` with the handlers of tests/pghandlers.py and a short lease."""
    port = free_port()
    tables: dict[str, dict[str, TomlValue]] = {
        "server": {"listen": f"127.0.0.1:{port}"},
        "store": {"url": url, "pool_size": 4},
        "workers": {"lease": f"{LEASE:g}s", "grace_period": "2s", **(workers or {})},
        "log": {"level": "warning"},
    }
    for type_name, handler in TYPES.items():
        tables[f"types.{type_name}"] = {"kind": "python", "handler": handler}
    path = offload.tmp_path / f"{name}.toml"
    path.write_text(render_toml(tables), encoding="utf-8")
    return DaemonConfig(path=path, url=f"http://127.0.0.1:{port}", db=Path("/nonexistent"))


async def until(probe: Callable[[], Awaitable[T | None]], within: float, what: str) -> T:
    """Poll `probe` (every 0.1 s: the state is in another process) until it returns a value;
    fail after `within` seconds."""
    try:
        async with asyncio.timeout(within):
            while (value := await probe()) is None:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            return value
    except TimeoutError:
        raise AssertionError(f"not within {within:g}s: {what}") from None


async def rows(url: str) -> dict[str, dict[str, Any]]:
    """Every task row, as PostgreSQL holds it."""
    conn = await asyncpg.connect(url)
    try:
        found = await conn.fetch(
            "SELECT id, state, attempts, owner, lease_until, finished_at, result, last_error, "
            "changed FROM offload_tasks"
        )
    finally:
        await conn.close()
    return {r["id"]: dict(r) for r in found}


async def states(url: str) -> Counter[str]:
    conn = await asyncpg.connect(url)
    try:
        found = await conn.fetch("SELECT state, count(*) FROM offload_tasks GROUP BY state")
    finally:
        await conn.close()
    return Counter({r[0]: r[1] for r in found})


async def all_succeeded(url: str, count: int) -> bool | None:
    return True if (await states(url)).get("succeeded") == count else None


def noop_task(payload: bytes) -> NewTask:
    now = time.time()
    return NewTask(
        id=new_id(now),
        type="record",
        queue="default",
        payload=payload,
        priority=0,
        run_at=now,
        created_at=now,
        timeout=60.0,
        max_attempts=3,
    )


@pytest.mark.timeout(400)  # room for the 240 s bound below
async def test_three_daemons_run_each_of_30000_tasks_exactly_once(
    pg_url: str, offload: Offload, tmp_path: Path
) -> None:
    log = tmp_path / "runs.log"
    nodes = [
        # A long lease: this test is about sharing work, not rescue, and a node starved of
        # CPU past a short one would see its tasks rescued and run twice.
        await offload.start(
            node_config(offload, pg_url, f"n{i}", {"concurrency": 16, "lease": "60s"})
        )
        for i in range(3)
    ]
    payload = b'{"log": "%s"}' % str(log).encode()
    # Most tasks are admitted straight into the database (their NOTIFY wakes the nodes),
    # some through each node's API while the others drain.
    async with open_store(StoreConfig(url=pg_url, pool_size=2)) as store:
        for _ in range(29):
            await store.admit([noop_task(payload) for _ in range(1000)], max_pending=10**6)
    submitted = []
    for node in nodes:
        submitted += await node.submit_many("record", [{"log": str(log)}] * 333)
    total = 29_000 + len(submitted)

    await until(lambda: all_succeeded(pg_url, total), 240, f"{total} tasks succeeded")

    ran = pghandlers.runs(str(log))
    by_task = Counter(task_id for task_id, _, _ in ran)
    assert len(by_task) == total
    assert set(by_task.values()) == {1}, [t for t, n in by_task.items() if n > 1][:5]
    assert {attempt for _, attempt, _ in ran} == {1}
    assert {pid for _, _, pid in ran} == {node.pid for node in nodes}
    assert await states(pg_url) == Counter(succeeded=total)
    assert all(node.returncode is None for node in nodes)


async def hold_tasks(node: Daemon, log: Path, release: Path, count: int) -> list[str]:
    """Submit `count` `hold` tasks to `node` and wait until each has started."""
    body = {"log": str(log), "release": str(release)}
    ids = [t.id for t in await node.submit_many("hold", [body] * count)]

    async def started() -> bool | None:
        return True if len(pghandlers.runs(str(log))) >= count else None

    await until(started, 30, f"{count} hold tasks started")
    return ids


async def test_kill_9_of_a_node_hands_its_running_tasks_to_the_others_within_the_lease(
    pg_url: str, offload: Offload, tmp_path: Path
) -> None:
    log, release = tmp_path / "runs.log", tmp_path / "release"
    doomed = await offload.start(node_config(offload, pg_url, "doomed", {"concurrency": 100}))
    ids = await hold_tasks(doomed, log, release, 100)
    others = [
        await offload.start(node_config(offload, pg_url, f"n{i}", {"concurrency": 60}))
        for i in range(2)
    ]

    doomed.kill()
    killed_at = time.monotonic()
    release.touch()
    await until(lambda: all_succeeded(pg_url, 100), LEASE + RESCUE_EVERY + SLACK, "rescue")
    took = time.monotonic() - killed_at

    ran = pghandlers.runs(str(log))
    assert sorted((t, a) for t, a, _ in ran) == sorted(
        [(t, 1) for t in ids] + [(t, 2) for t in ids]
    )
    assert {pid for _, a, pid in ran if a == 1} == {doomed.pid}
    assert {pid for _, a, pid in ran if a == 2} <= {node.pid for node in others}
    found = await rows(pg_url)
    assert {(r["state"], r["attempts"], r["owner"]) for r in found.values()} == {
        ("succeeded", 2, None)
    }
    assert took < LEASE + RESCUE_EVERY + SLACK


async def test_a_frozen_node_that_wakes_after_losing_its_lease_changes_no_row(
    pg_url: str, offload: Offload, tmp_path: Path
) -> None:
    log, release = tmp_path / "runs.log", tmp_path / "release"
    frozen = await offload.start(node_config(offload, pg_url, "frozen", {"concurrency": 20}))
    ids = await hold_tasks(frozen, log, release, 20)

    frozen.signal(signal.SIGSTOP)
    try:
        release.touch()  # the frozen node's runs will see it the moment it wakes
        rescuer = await offload.start(node_config(offload, pg_url, "rescuer"))
        await until(lambda: all_succeeded(pg_url, 20), LEASE + RESCUE_EVERY + SLACK, "rescue")
        before = await rows(pg_url)
    finally:
        frozen.signal(signal.SIGCONT)
    # Its runs end now and it tries to record them (or its heartbeat finds them lost
    # first); a graceful stop waits for every write it still attempts.
    frozen.signal(signal.SIGTERM)
    async with asyncio.timeout(30):
        assert await frozen.wait_exit() == 0

    assert await rows(pg_url) == before
    ran = pghandlers.runs(str(log))
    assert sorted((t, a, p) for t, a, p in ran) == sorted(
        [(t, 1, frozen.pid) for t in ids] + [(t, 2, rescuer.pid) for t in ids]
    )
    assert {r["state"] for r in before.values()} == {"succeeded"}


OUTAGE = 30.0  # seconds PostgreSQL stays down


class Load:
    """POSTs `pause` tasks to the nodes, `width` at a time, until stopped; keeps every
    answer's status and every accepted task's id with the time it was accepted."""

    def __init__(self, nodes: list[Daemon], log: Path, width: int = 8) -> None:
        self.nodes = nodes
        self.log = log
        self.width = width
        self.accepted: list[tuple[float, str]] = []
        self.sent: dict[str, float] = {}  # accepted task id: when its POST was sent
        self.statuses: list[tuple[float, int, bytes]] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        await asyncio.gather(*(self._one(i) for i in range(self.width)))

    async def _one(self, n: int) -> None:
        node = self.nodes[n % len(self.nodes)]
        body = {"type": "pause", "payload": {"log": str(self.log), "seconds": 0.05}}
        while not self.stop.is_set():
            sent = time.monotonic()
            reply = await node.request("POST", "/v1/tasks", json=body)
            now = time.monotonic()
            self.statuses.append((now, reply.status, reply.body[:200]))
            if reply.status == 202:
                task_id = reply.json(dict)["id"]
                self.accepted.append((now, task_id))
                self.sent[task_id] = sent
            else:
                # Refused: come back after a moment, as a client honouring Retry-After would.
                await asyncio.sleep(0.05)

    def accepted_since(self, moment: float) -> int:
        return sum(1 for at, _ in self.accepted if at > moment)


async def test_postgresql_down_for_30s_under_load_answers_503_and_loses_nothing(
    offload: Offload, tmp_path: Path
) -> None:
    server = pg.start_server()
    try:
        url = await pg.new_database(server)
        await _outage(server, url, offload, tmp_path)
    finally:
        await offload.kill_all()
        server.destroy()


async def _outage(server: pg.PostgresServer, url: str, offload: Offload, tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    nodes = [
        await offload.start(node_config(offload, url, f"n{i}", {"concurrency": 8}))
        for i in range(2)
    ]
    load = Load(nodes, log)
    loading = asyncio.create_task(load.run())
    try:
        started = time.monotonic()
        await until(lambda: _count(load.accepted_since(started), 100), 30, "100 accepted")

        await asyncio.to_thread(server.halt, "fast")
        down_at = time.monotonic()
        during = await nodes[0].request("GET", f"/v1/tasks/{load.accepted[0][1]}")
        await asyncio.sleep(OUTAGE)  # the outage itself: the scenario, not a wait for state
        up_from = time.monotonic()
        await asyncio.to_thread(server.resume)
        back_at = time.monotonic()
        await until(lambda: _count(load.accepted_since(back_at), 50), 60, "accepting again")
    finally:
        load.stop.set()
        await loading

    accepted = {task_id for _, task_id in load.accepted}
    await until(lambda: _settled(url), 90, "every task ended")

    codes = Counter(status for _, status, _ in load.statuses)
    assert set(codes) <= {202, 503}, [s for s in load.statuses if s[1] not in (202, 503)][:3]
    assert codes[503] > 0
    # Nothing sent once PostgreSQL was down is acknowledged before it is back (an answer to
    # a POST committed before the halt may still arrive after it).
    assert not [t for a, t in load.accepted if load.sent[t] > down_at and a < up_from]
    assert during.status == 503, during.body
    # Nothing acknowledged is lost. (A task whose commit the outage interrupted may exist
    # though its POST answered 503: the client could not know, and retries it.)
    found = await rows(url)
    assert accepted <= set(found)
    assert {found[t]["state"] for t in accepted} == {"succeeded"}
    assert accepted <= {task_id for task_id, _, _ in pghandlers.runs(str(log))}
    assert all(node.returncode is None for node in nodes)  # they recovered without a restart


async def _settled(url: str) -> bool | None:
    counts = await states(url)
    return True if counts["queued"] + counts["running"] == 0 else None


async def _count(have: int, want: int) -> bool | None:
    return True if have >= want else None
