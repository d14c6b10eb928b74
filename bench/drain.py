"""Drain: how fast a daemon finishes a backlog of queued no-op tasks (built-in `noop` type).

The tasks are committed to a fresh SQLite file through the store's own `admit()` before the
daemon starts, so only the draining is timed. The daemon is then started; the script watches
the file (read-only) until no task is queued or running, and reads the run's own timestamps:

  tasks/s = tasks / (last finished_at - first started_at)     (the daemon's clock)

It also prints the wall time from /readyz answering 200 to the last task observed done.
Runs once per `--concurrency` value.

    .venv/bin/python bench/drain.py [--tasks 20000] [--concurrency 16,64]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.harness import out

TIMEOUT = 300.0  # seconds a drain may take before the run is abandoned
POLL = 0.005


@dataclass
class DrainResult:
    concurrency: int
    tasks: int
    succeeded: int
    span: float  # first started_at .. last finished_at
    from_ready: float  # /readyz 200 .. last task seen done (poll granularity POLL)
    done_at_ready: int  # tasks already finished when /readyz first answered
    fill_seconds: float
    rss_kib: int
    cpu: dict[str, float]  # CPU seconds of the daemon from readiness to done, by thread
    noise: str
    commits: str

    def cpu_per_task(self, key: str) -> str:
        return f"{self.cpu[key] / self.succeeded * 1e6:.0f} µs" if self.succeeded else "?"

    @property
    def rate(self) -> float:
        return self.succeeded / self.span if self.span > 0 else 0.0


def drain_once(args: argparse.Namespace, concurrency: int) -> DrainResult:
    with harness.workdir() as directory:
        db = directory / "offload.db"
        filled = harness.fill_store(db, args.tasks, synchronous=args.synchronous)
        settings = harness.Settings(
            synchronous=args.synchronous,
            concurrency=concurrency,
            prefetch=args.prefetch,
            log_level=args.log_level,
        )
        with harness.daemon(directory, settings, db=db) as d:
            conn = harness.read_only(db)
            try:
                commits_at_ready = harness.commits(d.url)
                load = harness.OtherLoad()
                cpu_at_ready = harness.thread_cpu(d.pid)
                left_at_ready = harness.unfinished(conn)
                deadline = time.monotonic() + TIMEOUT
                left = left_at_ready
                peak_rss = d.rss_kib()
                while left and time.monotonic() < deadline:
                    time.sleep(POLL)
                    left = harness.unfinished(conn)
                    peak_rss = max(peak_rss, d.rss_kib())
                seen_done = time.time()
                cpu = harness.cpu_delta(cpu_at_ready, harness.thread_cpu(d.pid))
                noise = load.report(sum(cpu.values()))
                commits = harness.commits_since(d.url, commits_at_ready)
                row = conn.execute(
                    "SELECT count(*), min(started_at), max(finished_at) FROM tasks "
                    "WHERE state = 'succeeded'"
                ).fetchone()
            finally:
                conn.close()
        for note in d.notes:
            out(note)
    succeeded, first, last = int(row[0]), row[1], row[2]
    return DrainResult(
        concurrency=concurrency,
        tasks=args.tasks,
        succeeded=succeeded,
        span=(last - first) if succeeded else 0.0,
        from_ready=seen_done - d.ready_at,
        done_at_ready=args.tasks - left_at_ready,
        fill_seconds=filled,
        rss_kib=peak_rss,
        cpu=cpu,
        noise=noise,
        commits=commits,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument(
        "--concurrency", default="16,64", help="workers.concurrency values, comma-separated"
    )
    parser.add_argument(
        "--prefetch", type=int, default=None, help="workers.prefetch (default: the shipped one)"
    )
    parser.add_argument("--synchronous", default="full", choices=("normal", "full"))
    parser.add_argument("--log-level", default="info", help="the daemon's log.level")
    parser.add_argument("--repeat", type=int, default=1, help="runs per setting; median shown")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    if not 1 <= args.tasks <= 1_000_000 or not 1 <= args.repeat <= 10:
        sys.exit("--tasks must be within 1..1,000,000 and --repeat within 1..10")

    prefetch = "default" if args.prefetch is None else args.prefetch
    out(f"# drain: {args.tasks:,} queued noop tasks, synchronous={args.synchronous}, "
        f"log.level={args.log_level}, prefetch={prefetch}")  # fmt: skip
    out(f"# {harness.machine()}")
    runs: dict[int, list[DrainResult]] = {c: [] for c in levels}
    for _ in range(args.repeat):
        for c in levels:
            runs[c].append(drain_once(args, c))
    results = [sorted(rs, key=lambda r: r.rate)[len(rs) // 2] for rs in runs.values()]
    rows = [
        ["concurrency", "succeeded", "drain time", "tasks/s", "readyz→done", "done before ready",
         "peak RSS", "CPU/task: loop", "CPU/task: threads", "every run (tasks/s)"]
    ]  # fmt: skip
    for r in results:
        rows.append(
            [str(r.concurrency), f"{r.succeeded:,}", f"{r.span:.2f}s", f"{r.rate:,.0f}",
             f"{r.from_ready:.2f}s", f"{r.done_at_ready:,}", f"{r.rss_kib / 1024:.0f} MiB",
             r.cpu_per_task("main"), r.cpu_per_task("threads"),
             " / ".join(f"{x.rate:,.0f}" for x in runs[r.concurrency])]
        )  # fmt: skip
    out(harness.table(rows))
    out()
    for r in results:
        out(f"concurrency {r.concurrency} (median run): {r.commits}; {r.noise}")
    out(f"(filling the store took {results[0].fill_seconds:.1f}s per run, not timed)")
    out(f"reproduce: {harness.command_line()}")


if __name__ == "__main__":
    main()
