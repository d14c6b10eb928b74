"""Memory: the daemon's RSS with a large number of queued tasks, and whether it grows with it.

For each size (by default 0, 100,000 and 1,000,000), a fresh SQLite file is filled through the
store's own `admit()` with `noop` tasks delayed by 30 days (so they stay queued), before the
daemon starts. Then, reading VmRSS (and the peak, VmHWM) from /proc/PID/status:

1. after the start (once /readyz answers, and a second later);
2. after activity: `--submit` noop tasks posted (due now, `--clients` at a time) and run to
   `succeeded`, and one `GET /v1/tasks?state=queued&limit=100`.

It also prints how long the activity took, since work on a store full of delayed tasks
should cost what it costs on an empty one.

    .venv/bin/python bench/memory.py [--sizes 0,100000,1000000] [--submit 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.harness import out

DELAY = 30 * 86400.0  # the queued tasks wait this long: they never run during the benchmark
ACTIVITY_TIMEOUT = 600.0  # seconds the submitted tasks get to succeed
BODY = b'{"type":"noop","payload":{}}'


@dataclass
class MemResult:
    queued: int
    fill_seconds: float
    db_mib: float
    start_seconds: float  # spawn .. /readyz 200
    rss_ready: int  # KiB
    rss_settled: int
    rss_after: int
    hwm: int
    submit_seconds: float  # posting the activity's tasks
    run_seconds: float  # from the first POST until all of them succeeded
    list_seconds: float
    submitted: int
    failures: int


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} for pid {pid}")


async def post_many(url: str, count: int, clients: int) -> tuple[int, int, float]:
    """POST `count` noop tasks, `clients` at a time; returns (accepted, failed, seconds)."""
    accepted = failures = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    headers = {"Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=30)
    begun = time.monotonic()
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def client() -> None:
            nonlocal accepted, failures
            while not queue.empty():
                queue.get_nowait()
                try:
                    async with session.post(f"{url}/v1/tasks", data=BODY, headers=headers) as r:
                        await r.read()
                        if r.status == 202:
                            accepted += 1
                        else:
                            failures += 1
                except (aiohttp.ClientError, TimeoutError):
                    failures += 1

        await asyncio.gather(*(client() for _ in range(clients)))
    return accepted, failures, time.monotonic() - begun


def measure(directory: Path, size: int, args: argparse.Namespace) -> MemResult:
    db = directory / "offload.db"
    filled = harness.fill_store(db, size, delay=DELAY, batch=50_000)
    db_mib = db.stat().st_size / 2**20
    settings = harness.Settings(
        synchronous=args.synchronous, concurrency=args.concurrency, log_level=args.log_level
    )
    with harness.daemon(directory, settings, db=db) as d:
        start_seconds = d.ready_at - d.started_at
        rss_ready = d.rss_kib()
        time.sleep(1.0)
        rss_settled = d.rss_kib()
        begun = time.monotonic()
        accepted, failures, submit_seconds = asyncio.run(
            post_many(d.url, args.submit, args.clients)
        )
        conn = harness.read_only(db)
        try:
            deadline = time.monotonic() + ACTIVITY_TIMEOUT
            done = 0
            while time.monotonic() < deadline:
                done = int(
                    conn.execute("SELECT count(*) FROM tasks WHERE state = 'succeeded'").fetchone()[
                        0
                    ]
                )
                if done >= accepted:
                    break
                time.sleep(0.05)
        finally:
            conn.close()
        run_seconds = time.monotonic() - begun
        listed = time.monotonic()
        harness.http("GET", f"{d.url}/v1/tasks?state=queued&limit=100", timeout=120)
        list_seconds = time.monotonic() - listed
        time.sleep(0.5)
        rss_after = d.rss_kib()
        hwm = status_kib(d.pid, "VmHWM")
    for note in d.notes:
        out(note)
    if done < accepted:
        out(f"warning: only {done:,} of {accepted:,} submitted tasks succeeded in time")
    return MemResult(
        queued=size,
        fill_seconds=filled,
        db_mib=db_mib,
        start_seconds=start_seconds,
        rss_ready=rss_ready,
        rss_settled=rss_settled,
        rss_after=rss_after,
        hwm=hwm,
        submit_seconds=submit_seconds,
        run_seconds=run_seconds,
        list_seconds=list_seconds,
        submitted=accepted,
        failures=failures,
    )


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0,100000,1000000", help="queued tasks, comma-separated")
    parser.add_argument("--submit", type=int, default=5000, help="tasks posted and run")
    parser.add_argument("--clients", type=int, default=16, help="concurrent POSTs")
    parser.add_argument("--concurrency", type=int, default=16, help="workers.concurrency")
    parser.add_argument("--synchronous", default="full", choices=("normal", "full"))
    parser.add_argument("--log-level", default="info", help="the daemon's log.level")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if any(not 0 <= s <= 5_000_000 for s in sizes) or not 0 <= args.submit <= 1_000_000:
        sys.exit("sizes must be within 0..5,000,000 and --submit within 0..1,000,000")

    out(f"# memory: queued tasks delayed {DELAY / 86400:g} days, then {args.submit:,} noop "
        f"tasks submitted and run, synchronous={args.synchronous}")  # fmt: skip
    out(f"# {harness.machine()}")
    results = []
    for size in sizes:
        with harness.workdir() as directory:
            results.append(measure(directory, size, args))
    rows = [
        ["queued", "db file", "start", "RSS ready", "RSS +1s", "RSS after activity", "peak (HWM)",
         "activity", "list queued"]
    ]  # fmt: skip
    for r in results:
        rows.append(
            [f"{r.queued:,}", f"{r.db_mib:.0f} MiB", f"{r.start_seconds:.2f}s", _mib(r.rss_ready),
             _mib(r.rss_settled), _mib(r.rss_after), _mib(r.hwm),
             f"{r.submitted:,} in {r.run_seconds:.1f}s", f"{r.list_seconds * 1000:.0f} ms"]
        )  # fmt: skip
    out(harness.table(rows))
    out()
    for r in results:
        out(
            f"{r.queued:,} queued: store filled in {r.fill_seconds:.1f}s (not timed); "
            f"{r.submitted:,} posted in {r.submit_seconds:.1f}s ({r.failures} failed), all "
            f"succeeded {r.run_seconds:.1f}s after the first POST "
            f"({r.submitted / r.run_seconds if r.run_seconds else 0:,.0f} tasks/s)"
        )
    out(f"reproduce: {harness.command_line()}")


if __name__ == "__main__":
    main()
