"""Instructions per `POST /v1/tasks`: the daemon and the bare aiohttp server under valgrind's
callgrind, which counts the instructions each thread executes.

This VM's speed swings two- to threefold with its host, so requests/s cannot tell a change
of a few percent from noise; an instruction count can (two runs agree within 1 %). It counts
user-space work only: system calls, cache misses and waits for the GIL are not in it, and
the daemon runs ~50 times slower under valgrind, so commits hold fewer tasks than under
wrk at full speed. Use it to compare two versions of the code, and `ingest.py` for what
users get.

Each server gets `--warmup` seconds of wrk, then its counters are zeroed, then
`--duration` seconds of wrk are counted. The daemon runs with its tasks delayed (admission
alone) and, unless `--admission-only`, again with its noop tasks running as they come.
`--slow-clock 50` slows the daemon's `time.time()` as much as valgrind slows the daemon
(see `clock/sitecustomize.py`), so that what it shares within a millisecond is shared as
often as under load.

    .venv/bin/python bench/instructions.py [--duration 20] [--connections 16]
        [--admission-only] [--slow-clock 50]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.harness import out

DUMP_TIMEOUT = 120.0  # seconds callgrind gets to write its counts


@dataclass
class Count:
    requests: int
    main: float  # instructions per request on the event loop's thread
    others: float  # in every other thread (the SQLite writer, readers, executors)


def wrk(url: str, lua: Path, connections: int, seconds: int) -> int:
    """Requests wrk completed against `url` in `seconds`."""
    done = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s", "-s", str(lua),
         f"{url}/v1/tasks"],
        capture_output=True, text=True, timeout=seconds + 120, check=True,
    )  # fmt: skip
    found = re.search(r"(\d+) requests in", done.stdout)
    if found is None:
        raise RuntimeError(f"wrk printed no request count:\n{done.stdout}")
    return int(found.group(1))


def callgrind(out_dir: Path) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        "--separate-threads=yes",
        f"--callgrind-out-file={out_dir}/cg.%p",
    ]


def counted(url: str, pid: int, lua: Path, args: argparse.Namespace, out_dir: Path) -> Count:
    """Warm up, zero the counters, run wrk, dump: instructions per request by thread."""
    wrk(url, lua, args.connections, args.warmup)
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
    requests = wrk(url, lua, args.connections, args.duration)
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    # The dump after zeroing is part 1: one file per thread, cg.PID.1-NN (thread 01 is main).
    deadline = time.monotonic() + DUMP_TIMEOUT
    files: list[Path] = []
    while time.monotonic() < deadline and not files:
        files = sorted(out_dir.glob(f"cg.{pid}.1-*"))
        time.sleep(0.2)
    if not files:
        raise RuntimeError("callgrind wrote no dump")
    by_thread = {f.name.rsplit("-", 1)[1]: _total(f) for f in files}
    main = by_thread.pop("01", 0)
    return Count(requests, main / requests, sum(by_thread.values()) / requests)


def _total(path: Path) -> int:
    """The instructions a callgrind file counts (its `summary:` line, or `totals:`)."""
    deadline = time.monotonic() + DUMP_TIMEOUT
    while time.monotonic() < deadline:
        found = re.search(r"^(?:summary|totals): (\d+)", path.read_text(), re.MULTILINE)
        if found:
            return int(found.group(1))
        time.sleep(0.2)  # the file is still being written
    raise RuntimeError(f"{path} has no summary line")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=20, help="seconds of wrk counted")
    parser.add_argument("--warmup", type=int, default=5, help="seconds of wrk not counted")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--admission-only", action="store_true", help="skip the running case")
    parser.add_argument(
        "--slow-clock", type=float, default=1.0, help="the daemon's time.time() runs N x slower"
    )
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", "wrk"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed: apt-get install -y valgrind wrk")

    out(f"# instructions per POST /v1/tasks under callgrind, wrk -t1 -c{args.connections}, "
        f"{args.duration}s counted after {args.warmup}s, the daemon's clock "
        f"{args.slow_clock:g}x slower")  # fmt: skip
    out(f"# {harness.machine()}")
    out("| server | requests counted | event loop thread | other threads | all |")
    out("|---|---|---|---|---|")
    noop: dict[str, object] = {"type": "noop", "payload": {}}
    cases = [("daemon, tasks delayed (admission alone)", {**noop, "delay": 3600})]
    if not args.admission_only:
        cases.append(("daemon, noop tasks running", noop))
    with harness.workdir() as work:
        lua = harness.wrk_post_script(work / "post.lua", noop)
        d = Path(tempfile.mkdtemp(dir=work))
        with harness.bare_server(callgrind(d), harness.READY_TIMEOUT) as (url, proc):
            _row("bare aiohttp", counted(url, proc.pid, lua, args, d))
        _slow_clock(args.slow_clock)  # for the daemons started from here on
        for i, (name, task) in enumerate(cases):
            lua = harness.wrk_post_script(work / f"case{i}.lua", task)
            d = Path(tempfile.mkdtemp(dir=work))
            with harness.daemon(d, harness.Settings(), wrapper=callgrind(d)) as dm:
                _row(name, counted(dm.url, dm.pid, lua, args, d))
    out()
    out(f"reproduce: {harness.command_line()}")


def _slow_clock(rate: float) -> None:
    """Processes started after this see `time.time()` advance `rate` times slower."""
    if rate > 1:
        os.environ["OFFLOAD_BENCH_SLOW_CLOCK"] = str(rate)
        clock = str(Path(__file__).resolve().parent / "clock")
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (clock, os.environ.get("PYTHONPATH")) if p
        )


def _row(name: str, c: Count) -> None:
    out(f"| {name} | {c.requests:,} | {c.main:,.0f} | {c.others:,.0f} | {c.main + c.others:,.0f} |")


if __name__ == "__main__":
    main()
