"""Latency: from submission to the start of the handler, under a steady submission rate.

An open-loop client POSTs `stamp` tasks (`bench/handlers.py`: the handler returns the Unix
time at which it started) at a fixed rate for a bounded time, over keep-alive connections.
For each task it keeps the time just before the request was sent. Afterwards it reads every
row from the SQLite file (read-only) and reports, over the tasks after the warm-up second:

- send → handler start: the handler's own `time.time()` minus the client's send time
  (same machine, same clock): what a submitter waits before its work begins;
- created_at → started_at: the daemon's timestamps as stored (REAL seconds, so not the
  API's millisecond-rounded RFC 3339 text): admission to claim;
- the 202 round trip as the client saw it.

Runs with `store.synchronous` = "normal" and "full". For scale it also measures, at the same
rate, two floors that no daemon code is in: the 202 round trip of `bench/bare_server.py`,
and a 1-byte ping-pong with an echoing child process (what waking a process that sat idle
for 1/rate seconds costs on this machine; offload's path from a POST to a handler start
wakes a thread or process about five times: client → loop → writer → loop → writer → loop).

    .venv/bin/python bench/latency.py [--rate 200] [--duration 15]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.harness import out, percentile

WARMUP = 1.0  # seconds of submissions left out of the figures
FINISH_TIMEOUT = 60.0  # seconds the daemon gets to start every task after the last POST
BODY = msgspec.json.encode({"type": "stamp", "payload": {}})


@dataclass
class Sent:
    at: float  # time.time() just before the request
    rtt: float  # seconds until the 202 was read
    task_id: str


@dataclass
class Series:
    name: str
    values: list[float]  # seconds, sorted

    def cells(self) -> list[str]:
        v = self.values
        return [
            self.name,
            f"{len(v):,}",
            _ms(percentile(v, 50)),
            _ms(percentile(v, 99)),
            _ms(percentile(v, 99.9)),
            _ms(v[-1] if v else float("nan")),
        ]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


async def submit_steadily(url: str, rate: float, duration: float) -> tuple[list[Sent], int]:
    """POST `rate` tasks a second for `duration` seconds on a fixed schedule (a late send is
    not made up by a burst: the next one keeps its own slot). Returns the accepted tasks and
    the number of failed submissions."""
    count = int(rate * duration)
    sent: list[Sent] = []
    failures = 0
    connector = aiohttp.TCPConnector(limit=64)
    headers = {"Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> None:
            nonlocal failures
            at = time.time()
            try:
                async with session.post(f"{url}/v1/tasks", data=BODY, headers=headers) as r:
                    body = await r.read()
                    if r.status != 202:
                        failures += 1
                        return
            except (aiohttp.ClientError, TimeoutError):
                failures += 1
                return
            task_id = msgspec.json.decode(body)["id"]
            sent.append(Sent(at, time.time() - at, task_id))

        loop = asyncio.get_running_loop()
        begin = loop.time()
        pending: set[asyncio.Task[None]] = set()
        for i in range(count):
            delay = begin + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one())
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending, timeout=30)
    return sent, failures


def ping_pong_floor(rate: float, duration: float) -> list[float]:
    """Round trips of one byte to an echoing child process, one every 1/rate seconds."""
    parent, child = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the echo child: no Python cleanup, no shared state
        parent.close()
        while data := child.recv(64):
            child.sendall(data)
        os._exit(0)
    child.close()
    times = []
    try:
        begin = time.monotonic()
        for i in range(int(rate * duration)):
            delay = begin + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            t = time.perf_counter()
            parent.sendall(b"x")
            parent.recv(64)
            times.append(time.perf_counter() - t)
    finally:
        parent.close()
        os.waitpid(pid, 0)
    return sorted(times[int(rate * WARMUP) :])


def bare_round_trips(rate: float, duration: float) -> list[float]:
    """The 202 round trips of the bare aiohttp server under the same client and rate."""
    with harness.bare_server() as (url, _):
        asyncio.run(submit_steadily(url, 50, 1.0))
        sent, _ = asyncio.run(submit_steadily(url, rate, duration))
    first = min(s.at for s in sent)
    return sorted(s.rtt for s in sent if s.at >= first + WARMUP)


@dataclass
class RunResult:
    synchronous: str
    series: list[Series]
    accepted: int
    failures: int
    not_started: int
    achieved_rate: float
    noise: str


def run_once(args: argparse.Namespace, synchronous: str) -> RunResult:
    with harness.workdir() as directory:
        settings = harness.Settings(
            synchronous=synchronous, concurrency=args.concurrency, log_level=args.log_level
        )
        with harness.daemon(directory, settings) as d:
            # Warm the connection pool and the code paths, then start from an empty queue.
            asyncio.run(submit_steadily(d.url, 50, 1.0))
            _wait_all_started(d.db)
            load = harness.OtherLoad()
            cpu_before = harness.thread_cpu(d.pid)
            sent, failures = asyncio.run(submit_steadily(d.url, args.rate, args.duration))
            cpu = harness.cpu_delta(cpu_before, harness.thread_cpu(d.pid))
            noise = load.report(sum(cpu.values()))
            _wait_all_started(d.db)
            conn = harness.read_only(d.db)
            try:
                rows = {
                    r[0]: (r[1], r[2], r[3])
                    for r in conn.execute("SELECT id, created_at, started_at, result FROM tasks")
                }
            finally:
                conn.close()
        for note in d.notes:
            out(note)
    first = min(s.at for s in sent)
    last = max(s.at for s in sent)
    kept = [s for s in sent if s.at >= first + WARMUP]
    e2e, internal, rtt = [], [], []
    not_started = 0
    for s in kept:
        created, started, result = rows[s.task_id]
        if started is None or result is None:
            not_started += 1
            continue
        handler_start = msgspec.json.decode(result)["started"]
        e2e.append(handler_start - s.at)
        internal.append(started - created)
        rtt.append(s.rtt)
    return RunResult(
        synchronous=synchronous,
        series=[
            Series("send → handler start", sorted(e2e)),
            Series("created_at → started_at (store)", sorted(internal)),
            Series("POST round trip (202)", sorted(rtt)),
        ],
        accepted=len(sent),
        failures=failures,
        not_started=not_started,
        achieved_rate=(len(sent) - 1) / (last - first) if last > first else 0.0,
        noise=noise,
    )


def _wait_all_started(db: Path) -> None:
    conn = harness.read_only(db)
    try:
        deadline = time.monotonic() + FINISH_TIMEOUT
        while harness.unfinished(conn) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0, help="submissions per second")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of submissions")
    parser.add_argument("--concurrency", type=int, default=16, help="workers.concurrency")
    parser.add_argument("--log-level", default="info", help="the daemon's log.level")
    parser.add_argument("--synchronous", default="normal,full", help="comma-separated")
    args = parser.parse_args()
    if not 0 < args.rate <= 5000 or not 0 < args.duration <= 300:
        sys.exit("--rate must be in (0, 5000] and --duration in (0, 300]")

    out(f"# latency: {args.rate:g} submissions/s for {args.duration:g}s, stamp tasks, "
        f"concurrency {args.concurrency}, first {WARMUP:g}s left out")  # fmt: skip
    out(f"# {harness.machine()}")
    results = [run_once(args, s) for s in args.synchronous.split(",")]
    floors = [
        Series("bare aiohttp: POST round trip", bare_round_trips(args.rate, args.duration)),
        Series("ping-pong with a process", ping_pong_floor(args.rate, args.duration)),
    ]
    rows = [["server", "measure", "tasks", "p50", "p99", "p99.9", "max"]]
    for r in results:
        for series in r.series:
            rows.append([f"offload synchronous={r.synchronous}", *series.cells()])
    for series in floors:
        rows.append(["floor", *series.cells()])
    out(harness.table(rows))
    out()
    for r in results:
        out(
            f"synchronous={r.synchronous}: {r.accepted:,} accepted at {r.achieved_rate:.1f}/s, "
            f"{r.failures} failed submissions, {r.not_started} not started in time; "
            f"{r.noise}"
        )
    out(f"reproduce: {harness.command_line()}")


if __name__ == "__main__":
    main()
