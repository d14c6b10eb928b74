"""Per-task overhead of each executor kind: how fast a daemon drains tasks that do nothing,
run as a trivial command (`true`), a POST to a trivial HTTP receiver on loopback (the bare
aiohttp server of `bare_server.py`), and a no-op Python handler.

    .venv/bin/python bench/executors.py [--tasks 3000] [--concurrency 16]

The tasks are committed before the daemon starts; the figure is tasks / (last finished -
first started) from the store's own timestamps.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.harness import out

KINDS = {
    "python": '[types.pynoop]\nkind = "python"\nhandler = "daemon.builtins:noop"\n',
    "command": '[types.cmdtrue]\nkind = "command"\nargv = ["true"]\n',
    "http": '[types.webnoop]\nkind = "http"\nurl = "http://127.0.0.1:{port}/v1/tasks"\n',
}
TYPE_OF = {"python": "pynoop", "command": "cmdtrue", "http": "webnoop"}
TIMEOUT = 300.0


def drain(kind: str, tasks: int, concurrency: int, receiver_port: int) -> tuple[float, int]:
    """(tasks per second, tasks that succeeded) for one executor kind."""
    with harness.workdir() as directory:
        db = directory / "offload.db"
        harness.fill_store(db, tasks, task_type=TYPE_OF[kind])
        settings = harness.Settings(
            concurrency=concurrency,
            log_level="warning",
            extra_toml=KINDS[kind].format(port=receiver_port),
        )
        with harness.daemon(directory, settings, db=db) as d:
            conn = harness.read_only(db)
            try:
                deadline = time.monotonic() + TIMEOUT
                while harness.unfinished(conn) and time.monotonic() < deadline:
                    time.sleep(0.05)  # a benchmark's poll of the store, bounded by TIMEOUT
                row = conn.execute(
                    "SELECT count(*), min(started_at), max(finished_at) FROM tasks "
                    "WHERE state = 'succeeded'"
                ).fetchone()
            finally:
                conn.close()
            _ = d
    succeeded, first, last = int(row[0]), row[1], row[2]
    rate = succeeded / (last - first) if succeeded and last > first else 0.0
    return rate, succeeded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    port = harness.free_port()
    receiver = subprocess.Popen(
        [sys.executable, "-m", "bench.bare_server", "--port", str(port)],
        cwd=Path(__file__).resolve().parent.parent,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                harness.http("GET", f"http://127.0.0.1:{port}/readyz")
                break
            except OSError:
                time.sleep(0.05)  # waiting for the receiver to listen, bounded
        load = harness.OtherLoad()
        rows = [["executor", "tasks", "succeeded", "tasks/s", "per task"]]
        for kind in ("python", "http", "command"):
            rate, ok = drain(kind, args.tasks, args.concurrency, port)
            per = f"{1e6 / rate:.0f} µs" if rate else "-"
            rows.append([kind, str(args.tasks), str(ok), f"{rate:,.0f}", per])
        out(harness.table(rows))
        out(f"concurrency {args.concurrency}; {harness.machine()}")
        out(load.report(0.0))
        out(f"reproduce: {harness.command_line()}")
    finally:
        receiver.terminate()
        receiver.wait(10)


if __name__ == "__main__":
    main()
