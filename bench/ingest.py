"""Ingest: how many `POST /v1/tasks` a daemon acknowledges per second (each one committed to
SQLite before its 202), against a bare aiohttp+uvloop server that only parses the JSON.

wrk (`apt-get install wrk`) posts `{"type":"noop","payload":{}}` with `-t2 -c64 -d10s`;
the daemon's consumers run the noop tasks as they come (the hardest case: the loop shares
its time between answering POSTs and running thousands of tasks a second). `--sleep N`
posts `sleep` tasks of N seconds instead (the slow work offload is for: the consumers run
them throughout, 16 at a time), and `--delay` submits noop tasks for later (admission
alone, nothing runs). `--busy N` runs N CPU-bound processes beside (a machine shared with
other work: the daemon's two threads compete for the CPU, the bare server's one less so).
`max_pending` is high enough that nothing is refused. Runs the
bare server, then the daemon with `store.synchronous` = "normal" and = "full", and prints
requests/s, non-2xx answers, latency, the ratio daemon/bare (the median of each round's
ratio to that round's bare server), and how far the consumers kept up.

    .venv/bin/python bench/ingest.py [--duration 10] [--connections 64] [--threads 2]
        [--log-level info] [--delay SECONDS | --sleep SECONDS] [--busy N] [--repeat 1]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.harness import out

WARMUP = 2  # seconds of wrk before each measured run, not counted


@dataclass
class WrkResult:
    requests: int
    rps: float
    non_2xx: int
    socket_errors: str
    p50: str
    p99: str
    cpu: dict[str, float]  # the server's CPU seconds during the run, by thread
    noise: str
    commits: str

    def cpu_per_request(self, key: str) -> str:
        return f"{self.cpu[key] / self.requests * 1e6:.0f} µs" if self.requests else "?"


def run_wrk(url: str, lua: Path, args: argparse.Namespace, seconds: int, pid: int) -> WrkResult:
    """Run wrk against `url`, whose server is process `pid`."""
    cmd = [
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(lua),
        f"{url}/v1/tasks",
    ]
    commits_before = harness.commits(url)
    load = harness.OtherLoad()
    cpu_before = harness.thread_cpu(pid)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True)
    cpu = harness.cpu_delta(cpu_before, harness.thread_cpu(pid))
    noise = load.report(sum(cpu.values()))
    commits = harness.commits_since(url, commits_before) if commits_before else ""
    text = done.stdout
    rps = float(_find(r"Requests/sec:\s+([\d.]+)", text))
    requests = int(_find(r"(\d+) requests in", text))
    non_2xx = int(_find(r"Non-2xx or 3xx responses:\s+(\d+)", text, "0"))
    errors = _find(r"Socket errors:\s+(.*)", text, "none").strip()
    p50 = _find(r"\n\s+50%\s+(\S+)", text, "?")
    p99 = _find(r"\n\s+99%\s+(\S+)", text, "?")
    return WrkResult(requests, rps, non_2xx, errors, p50, p99, cpu, noise, commits)


def _find(pattern: str, text: str, default: str | None = None) -> str:
    m = re.search(pattern, text)
    if m is None:
        if default is None:
            raise RuntimeError(f"wrk output has no {pattern!r}:\n{text}")
        return default
    return m.group(1)


def bare(lua: Path, args: argparse.Namespace) -> WrkResult:
    with harness.bare_server() as (url, proc):
        run_wrk(url, lua, args, WARMUP, proc.pid)
        return run_wrk(url, lua, args, args.duration, proc.pid)


@dataclass
class DaemonResult:
    wrk: WrkResult
    accepted: int  # rows in the store after the measured run (warm-up included)
    done_at_end: int  # of those, finished when wrk stopped
    catch_up: float  # seconds until the consumers had finished the rest


def daemon(sub: Path, lua: Path, args: argparse.Namespace, synchronous: str) -> DaemonResult:
    sub.mkdir()
    settings = harness.Settings(
        synchronous=synchronous,
        concurrency=args.concurrency,
        prefetch=args.prefetch,
        log_level=args.log_level,
    )
    with harness.daemon(sub, settings) as d:
        run_wrk(d.url, lua, args, WARMUP, d.pid)
        result = run_wrk(d.url, lua, args, args.duration, d.pid)
        conn = harness.read_only(d.db)
        try:
            total = int(conn.execute("SELECT count(*) FROM tasks").fetchone()[0])
            left = left_at_end = harness.unfinished(conn)
            begun = time.monotonic()
            while left and _runs_all(args) and time.monotonic() - begun < 120:
                time.sleep(0.05)
                left = harness.unfinished(conn)
            catch_up = time.monotonic() - begun
        finally:
            conn.close()
    for note in d.notes:
        out(note)
    return DaemonResult(result, total, total - left_at_end, catch_up)


def _runs_all(args: argparse.Namespace) -> bool:
    """Whether the consumers can finish the flood soon after wrk stops (noop tasks, now)."""
    return args.delay is None and args.sleep is None


def _median_run(runs: list[WrkResult]) -> WrkResult:
    return sorted(runs, key=lambda r: r.rps)[len(runs) // 2]


def _all(runs: list[WrkResult]) -> str:
    return " / ".join(f"{r.rps:,.0f}" for r in runs)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of wrk per target")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16, help="workers.concurrency")
    parser.add_argument("--log-level", default="info", help="the daemon's log.level")
    parser.add_argument("--prefetch", type=int, default=None, help="workers.prefetch")
    parser.add_argument(
        "--delay",
        type=float,
        default=None,
        help="submit the tasks delayed by this many seconds: admission alone, nothing runs",
    )
    parser.add_argument(
        "--sleep",
        type=float,
        default=None,
        help="post `sleep` tasks of this many seconds instead of noop: slow work running",
    )
    parser.add_argument(
        "--busy", type=int, default=0, help="CPU-bound processes running beside, 0 to 4"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds (bare, normal, full); the median is shown"
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install -y wrk")
    if args.delay is not None and args.sleep is not None:
        sys.exit("--delay and --sleep are alternatives")
    if not 1 <= args.duration <= 120 or not 1 <= args.repeat <= 10:
        sys.exit("--duration must be within 1..120 and --repeat within 1..10")
    if not 0 <= args.busy <= 4:
        sys.exit("--busy must be within 0..4")
    return args


# A busy loop that ends by itself after the given seconds, should this script be killed.
_BUSY = (
    "import sys, time\n"
    "end = time.monotonic() + float(sys.argv[1])\n"
    "while time.monotonic() < end: pass"
)


@contextlib.contextmanager
def busy(count: int, seconds: float) -> Iterator[None]:
    """`count` CPU-bound processes for the block (at most `seconds`)."""
    procs = [subprocess.Popen([sys.executable, "-c", _BUSY, str(seconds)]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _rounds(
    lua: Path,
    args: argparse.Namespace,
    directory: Path,
    bares: list[WrkResult],
    daemons: dict[str, list[DaemonResult]],
) -> None:
    """Each round: the bare server, then the daemon with each `synchronous`."""
    for round_ in range(args.repeat):
        bares.append(bare(lua, args))
        for sync, runs in daemons.items():
            runs.append(daemon(directory / f"{sync}-{round_}", lua, args, sync))


def main() -> None:
    args = _arguments()

    out(
        f"# ingest: POST /v1/tasks, wrk -t{args.threads} -c{args.connections} "
        f"-d{args.duration}s, concurrency {args.concurrency}, log.level={args.log_level}, "
        f"{'' if args.delay is None else f'tasks delayed {args.delay:g}s, '}"
        f"{'' if args.sleep is None else f'sleep tasks of {args.sleep:g}s, '}"
        f"{'' if not args.busy else f'{args.busy} CPU-bound process(es) beside, '}"
        f"{args.repeat} round(s)"
    )
    out(f"# {harness.machine()}")
    bares: list[WrkResult] = []
    daemons: dict[str, list[DaemonResult]] = {"normal": [], "full": []}
    with harness.workdir() as directory:
        body: dict[str, object] = {"type": "noop", "payload": {}}
        if args.sleep is not None:
            body = {"type": "sleep", "payload": {"seconds": args.sleep}}
        if args.delay is not None:
            body["delay"] = args.delay
        lua = harness.wrk_post_script(directory / "post.lua", body)
        limit = args.repeat * 3 * (args.duration + 120)
        with busy(args.busy, limit):
            _rounds(lua, args, directory, bares, daemons)

    base = _median_run(bares)
    rows = [
        ["server", "requests/s", "daemon/bare", "non-2xx", "socket errors", "p50", "p99",
         "CPU/req: loop", "CPU/req: threads", "every round"]
    ]  # fmt: skip
    rows.append(
        ["bare aiohttp", f"{base.rps:,.0f}", "1.00", str(base.non_2xx), base.socket_errors,
         base.p50, base.p99, base.cpu_per_request("main"), base.cpu_per_request("threads"),
         _all(bares)]
    )  # fmt: skip
    medians: dict[str, DaemonResult] = {}
    ratios: dict[str, list[float]] = {}
    for sync, runs in daemons.items():
        r = medians[sync] = sorted(runs, key=lambda x: x.wrk.rps)[len(runs) // 2]
        w = r.wrk
        # Each round's daemon against that round's bare server, run just before it: the VM's
        # speed drifts between rounds more than between two runs of one round.
        ratios[sync] = [x.wrk.rps / b.rps for x, b in zip(runs, bares, strict=True)]
        ratio = statistics.median(ratios[sync])
        rows.append(
            [f"offload synchronous={sync}", f"{w.rps:,.0f}", f"{ratio:.2f}",
             str(w.non_2xx), w.socket_errors, w.p50, w.p99, w.cpu_per_request("main"),
             w.cpu_per_request("threads"), _all([x.wrk for x in runs])]
        )  # fmt: skip
    out(harness.table(rows))
    out()
    for sync, each in ratios.items():
        out(f"synchronous={sync}: daemon/bare per round {' / '.join(f'{x:.2f}' for x in each)}")
    out(f"bare (median round): {base.noise}")
    for sync, r in medians.items():
        out(f"synchronous={sync} (median round): {r.wrk.commits}; {r.wrk.noise}")
    for sync, r in medians.items():
        if not _runs_all(args):
            out(
                f"synchronous={sync}: {r.accepted:,} tasks accepted (warm-up included), "
                f"{r.done_at_end:,} finished when wrk stopped"
            )
            continue
        out(
            f"synchronous={sync}: {r.accepted:,} tasks accepted (warm-up included), "
            f"{r.done_at_end:,} finished when wrk stopped, the rest {r.catch_up:.2f}s later"
        )
    out()
    out(f"reproduce: {harness.command_line()}")


if __name__ == "__main__":
    main()
