"""PostgreSQL drain: how fast one daemon, then two, finish a backlog of no-op tasks that
share one PostgreSQL database (built-in `noop` type).

A PostgreSQL server is started from the machine's binaries in a temporary directory (as
`tests/pg.py` does, but durable: fsync and synchronous_commit on, unless --no-fsync). For
each run the tasks are committed to a fresh database through the store's own `admit()`
before the daemons start, so only the draining is timed; the script then watches the
database until nothing is queued or running and reads the runs' own timestamps:

  tasks/s = tasks / (last finished_at - first started_at)     (the daemons' clocks)

    .venv/bin/python bench/pg_drain.py [--tasks 30000] [--daemons 1,2] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg  # type: ignore[import-untyped]

from bench import harness
from bench.harness import out
from tests import pg

TIMEOUT = 300.0  # seconds a drain may take before the run is abandoned
POLL = 0.05
DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
TUNED = {"shared_buffers": "256MB", "max_wal_size": "4GB", "checkpoint_timeout": "15min"}


@dataclass
class Result:
    daemons: int
    succeeded: int
    span: float  # first started_at .. last finished_at
    daemon_cpu: float  # CPU seconds of the daemons from readiness to done
    server_cpu: float  # CPU seconds of PostgreSQL's processes meanwhile
    other_cpu: float  # CPU seconds every other process on the machine used meanwhile
    wall: float  # seconds from readiness to done

    def per_task(self, cpu: float) -> str:
        return f"{cpu / self.succeeded * 1e6:.0f} µs" if self.succeeded else "?"

    @property
    def rate(self) -> float:
        return self.succeeded / self.span if self.span > 0 else 0.0


def config_toml(port: int, url: str, concurrency: int, prefetch: int, log_level: str) -> str:
    return f"""
[server]
listen = "127.0.0.1:{port}"

[store]
url = "{url}"

[workers]
concurrency = {concurrency}
prefetch = {prefetch}
max_pending = 10000000
grace_period = "5s"

[log]
level = "{log_level}"

[types.noop]
kind = "python"
handler = "daemon.builtins:noop"
"""


async def fill(url: str, count: int, batch: int = 5000) -> float:
    """Commit `count` queued noop tasks through the PostgreSQL store's `admit()`."""
    from daemon.config import StoreConfig
    from daemon.ids import new_id
    from daemon.models import NewTask
    from daemon.store import open_store

    begun = time.monotonic()
    async with open_store(StoreConfig(url=url)) as store:
        done = 0
        while done < count:
            now = time.time()
            tasks = [
                NewTask(
                    id=new_id(now),
                    type="noop",
                    queue="default",
                    payload=b"{}",
                    priority=0,
                    run_at=now,
                    created_at=now,
                    timeout=300.0,
                    max_attempts=3,
                )
                for _ in range(min(batch, count - done))
            ]
            await store.admit(tasks, max_pending=2**62)
            done += len(tasks)
    return time.monotonic() - begun


def cpu_of(pids: list[int]) -> float:
    return sum(sum(harness.thread_cpu(pid).values()) for pid in pids)


def server_pids(server: pg.PostgresServer) -> list[int]:
    """The postmaster and its children (the backends serving the daemons)."""
    head = int((server.data / "postmaster.pid").read_text().split()[0])
    found = [head]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == head:
                    found.append(int(entry.name))
    return found


@contextlib.contextmanager
def daemons(directory: Path, url: str, n: int, args: argparse.Namespace) -> Iterator[list[int]]:
    """Start `n` daemons on `url`, wait until each answers /readyz, stop them on exit."""
    procs: list[subprocess.Popen[bytes]] = []
    env = dict(os.environ)
    env.pop("JOURNAL_STREAM", None)
    try:
        for i in range(n):
            port = harness.free_port()
            config = directory / f"offload-{i}.toml"
            prefetch = args.prefetch if args.prefetch is not None else args.concurrency
            config.write_text(config_toml(port, url, args.concurrency, prefetch, args.log_level))
            with (directory / f"offload-{i}.log").open("wb") as log:
                procs.append(
                    subprocess.Popen(
                        [str(harness.OFFLOAD), "serve", "--config", str(config)],
                        cwd=directory,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                    )
                )
            wait_ready(procs[-1], port, directory / f"offload-{i}.log")
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(harness.STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + harness.READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"offload exited with {proc.returncode}:\n{log.read_text()}")
        try:
            harness.http("GET", f"http://127.0.0.1:{port}/healthz", timeout=1.0)
            if harness.http("GET", f"http://127.0.0.1:{port}/readyz", timeout=1.0):
                return
        except OSError:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"offload was not ready within {harness.READY_TIMEOUT:g}s")


# The store's own counter of unfinished tasks: a sum of 16 rows, so watching costs nothing.
UNFINISHED = "SELECT sum(n) FROM offload_pending"
SPAN = (
    "SELECT count(*), min(started_at), max(finished_at) FROM offload_tasks "
    "WHERE state = 'succeeded'"
)


def drain_once(server: pg.PostgresServer, n: int, args: argparse.Namespace) -> Result:
    url = asyncio.run(pg.new_database(server))
    try:
        asyncio.run(fill(url, args.tasks))
        with (
            tempfile.TemporaryDirectory(prefix="offload-pg-bench-") as d,
            daemons(Path(d), url, n, args) as pids,
        ):
            pg_pids = server_pids(server)
            before = cpu_of(pids), cpu_of(pg_pids), machine_busy(), time.monotonic()
            row = asyncio.run(watch(url))
            daemon_cpu = cpu_of(pids) - before[0]
            server_cpu = cpu_of([p for p in server_pids(server) if p in pg_pids]) - before[1]
            other = machine_busy() - before[2] - daemon_cpu - server_cpu
            wall = time.monotonic() - before[3]
    finally:
        asyncio.run(pg.drop_database(server, url))
    succeeded, first, last = int(row[0]), row[1], row[2]
    span = (last - first) if succeeded else 0.0
    return Result(n, succeeded, span, daemon_cpu, server_cpu, max(0.0, other), wall)


def machine_busy() -> float:
    """CPU seconds all CPUs spent not idle since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


async def watch(url: str) -> asyncpg.Record:
    """Wait until no task is queued or running (through one connection, opened before the
    CPU counts start), then read the span of the runs."""
    conn = await asyncpg.connect(url)
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if await conn.fetchval(UNFINISHED) == 0:
                break
            await asyncio.sleep(POLL)
        return await conn.fetchrow(SPAN)
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=30_000)
    parser.add_argument("--daemons", default="1,2", help="daemon counts, comma-separated")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--prefetch", type=int, default=None, help="default: = concurrency")
    parser.add_argument("--log-level", default="warning", help="the daemons' log.level")
    parser.add_argument(
        "--no-fsync", action="store_true", help="PostgreSQL with fsync and sync commit off"
    )
    args = parser.parse_args()
    settings = dict(TUNED) if args.no_fsync else {**TUNED, **DURABLE}
    durability = "without fsync" if args.no_fsync else "durable (fsync, synchronous_commit on)"
    out(f"# pg_drain: {args.tasks:,} queued noop tasks, concurrency {args.concurrency} per "
        f"daemon, log.level={args.log_level}, PostgreSQL {durability}")  # fmt: skip
    out(f"# {harness.machine()}")
    server = pg.PostgresServer.start(settings)
    try:
        results = [drain_once(server, int(n), args) for n in args.daemons.split(",")]
    finally:
        server.destroy()
    rows = [["daemons", "succeeded", "drain time", "tasks/s", "CPU/task: daemons",
             "CPU/task: PostgreSQL", "other processes' CPU"]]  # fmt: skip
    cpus = os.cpu_count() or 1
    for r in results:
        rows.append([str(r.daemons), f"{r.succeeded:,}", f"{r.span:.2f}s", f"{r.rate:,.0f}",
                     r.per_task(r.daemon_cpu), r.per_task(r.server_cpu),
                     f"{r.other_cpu / (r.wall * cpus):.0%} of the machine"])  # fmt: skip
    out(harness.table(rows))
    out(f"reproduce: {harness.command_line()}")


if __name__ == "__main__":
    main()
