"""What every benchmark shares: a daemon started on a free 127.0.0.1 port with a temporary
config and SQLite file, stopped and cleaned up on exit; a store filled before the start;
small HTTP helpers; RSS from /proc; percentiles and the result table.

Nothing here loops without a bound: every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
OFFLOAD = VENV_BIN / "offload"
PYTHON = VENV_BIN / "python"

READY_TIMEOUT = 120.0  # seconds a daemon gets to answer /readyz (1M queued rows open fast)
STOP_TIMEOUT = 30.0  # seconds a daemon gets to exit after SIGTERM before SIGKILL


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def command_line() -> str:
    """The command that reproduces this run, as typed from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        shown = str(script.relative_to(ROOT))
    except ValueError:
        shown = str(script)
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", shown, *sys.argv[1:]])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Settings:
    """The knobs of a benchmark daemon; everything else is the shipped default."""

    synchronous: str = "normal"
    concurrency: int = 16
    prefetch: int | None = None  # None: the shipped default
    max_pending: int = 10_000_000
    log_level: str = "info"
    extra_toml: str = ""


def config_toml(port: int, db: Path, s: Settings) -> str:
    return f"""
[server]
listen = "127.0.0.1:{port}"

[store]
url = "sqlite:///{db}"
synchronous = "{s.synchronous}"

[workers]
concurrency = {s.concurrency}
{"" if s.prefetch is None else f"prefetch = {s.prefetch}"}
max_pending = {s.max_pending}
grace_period = "5s"

[log]
level = "{s.log_level}"

[types.noop]
kind = "python"
handler = "daemon.builtins:noop"

[types.sleep]
kind = "python"
handler = "daemon.builtins:sleep"
timeout = "1h"

[types.stamp]
kind = "python"
handler = "bench.handlers:stamp"
{s.extra_toml}
"""


@dataclass
class Daemon:
    """A running `offload serve`. `url` is its base address."""

    proc: subprocess.Popen[bytes]
    port: int
    db: Path
    log: Path
    ready_at: float = 0.0  # time.time() when /readyz first answered 200
    started_at: float = 0.0  # time.time() just before the process was spawned
    notes: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        return rss_kib(self.pid)


@contextlib.contextmanager
def workdir(prefix: str = "offload-bench-") -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        yield Path(d)


@contextlib.contextmanager
def daemon(
    directory: Path, settings: Settings, *, db: Path | None = None, wrapper: Sequence[str] = ()
) -> Iterator[Daemon]:
    """Start `offload serve` in `directory` (the SQLite file is `db`, by default
    `directory/offload.db`), under the `wrapper` command if given (e.g. valgrind), wait until
    /readyz answers 200, and stop it on exit."""
    port = free_port()
    db = db or directory / "offload.db"
    config = directory / f"offload-{port}.toml"
    config.write_text(config_toml(port, db, settings), encoding="utf-8")
    log = directory / f"offload-{port}.log"
    env = dict(os.environ)
    # The daemon imports bench.handlers (the `stamp` type) from the repository root.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.pop("JOURNAL_STREAM", None)
    with log.open("wb") as log_file:
        started_at = time.time()
        proc = subprocess.Popen(
            [*wrapper, str(OFFLOAD), "serve", "--config", str(config)],
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    d = Daemon(proc=proc, port=port, db=db, log=log, started_at=started_at)
    try:
        d.ready_at = _wait_ready(d)
        yield d
    finally:
        _stop(d)


def wrk_post_script(path: Path, body: object) -> Path:
    """Write a wrk Lua script to `path` that POSTs `body` (made JSON) as application/json."""
    text = json.dumps(body, separators=(",", ":"))
    path.write_text(
        f"wrk.method = \"POST\"\nwrk.body = '{text}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n',
        encoding="utf-8",
    )
    return path


@contextlib.contextmanager
def bare_server(
    wrapper: Sequence[str] = (), timeout: float = 30.0
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start `bench/bare_server.py` (under `wrapper`, if given) on a free port, wait until its
    /readyz answers, and end it on exit; yields its base address and process."""
    port = free_port()
    proc = subprocess.Popen(
        [*wrapper, str(PYTHON), "-m", "bench.bare_server", "--port", str(port)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _await_ready(proc, url, timeout, "the bare server")
        yield url, proc
    finally:
        _end(proc, 10.0)


def _wait_ready(d: Daemon) -> float:
    return _await_ready(d.proc, d.url, READY_TIMEOUT, "offload", d.log)


def _await_ready(
    proc: subprocess.Popen[bytes], url: str, timeout: float, name: str, log: Path | None = None
) -> float:
    """Poll `url`/readyz until it answers 200 (returns when, as time.time()); fails if `proc`
    exits or `timeout` passes first, with the end of its `log` if it has one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}{_log_end(log)}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1.0) as r:
                if r.status == 200:
                    return time.time()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.005)
    raise RuntimeError(f"{name} was not ready within {timeout:g}s{_log_end(log)}")


def _stop(d: Daemon) -> None:
    _end(d.proc, STOP_TIMEOUT)
    if d.proc.returncode not in (0, -signal.SIGTERM):
        d.notes.append(f"offload exited with {d.proc.returncode}{_log_end(d.log)}")


def _end(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL if `proc` is still there after `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def _log_end(log: Path | None) -> str:
    return "" if log is None else f":\n{_tail(log)}"


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# -- the store, before and after a run ----------------------------------------------------


def fill_store(
    db: Path,
    count: int,
    *,
    task_type: str = "noop",
    payload: bytes = b"{}",
    delay: float = 0.0,
    batch: int = 10_000,
    synchronous: str = "normal",
) -> float:
    """Commit `count` queued tasks into `db` through the SQLite store's own `admit()` (so the
    rows are exactly what the daemon writes), `batch` per transaction, with no daemon
    running. Returns the seconds it took."""
    return asyncio.run(
        _fill(db, count, task_type=task_type, payload=payload, delay=delay, batch=batch,
              sync=synchronous)
    )  # fmt: skip


async def _fill(
    db: Path, count: int, *, task_type: str, payload: bytes, delay: float, batch: int, sync: str
) -> float:
    from daemon.config import StoreConfig
    from daemon.ids import new_id
    from daemon.models import NewTask
    from daemon.store.sqlite import open_sqlite

    begun = time.monotonic()
    config = StoreConfig(url=f"sqlite:///{db}", synchronous=sync)  # type: ignore[arg-type]
    async with open_sqlite(config) as store:
        done = 0
        while done < count:
            n = min(batch, count - done)
            now = time.time()
            tasks = [
                NewTask(
                    id=new_id(now),
                    type=task_type,
                    queue="default",
                    payload=payload,
                    priority=0,
                    run_at=now + delay,
                    created_at=now,
                    timeout=300.0,
                    max_attempts=3,
                )
                for _ in range(n)
            ]
            await store.admit(tasks, max_pending=2**62)
            done += n
    return time.monotonic() - begun


def read_only(db: Path) -> sqlite3.Connection:
    """A read-only connection to a daemon's WAL database (safe while it runs)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def unfinished(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT count(*) FROM tasks WHERE state IN ('queued', 'running')").fetchone()
    return int(row[0])


# -- HTTP ---------------------------------------------------------------------------------


def http(method: str, url: str, body: object | None = None, timeout: float = 10.0) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@dataclass(frozen=True)
class Commits:
    """The store's group commits so far, from the daemon's /metrics."""

    count: float
    seconds: float
    operations: float

    def since(self, before: Commits) -> str:
        n = self.count - before.count
        if n <= 0:
            return "no commits"
        ops = (self.operations - before.operations) / n
        ms = (self.seconds - before.seconds) / n * 1000
        return f"{n:,.0f} commits, {ops:.1f} operations and {ms:.2f} ms each"


def commits(url: str) -> Commits | None:
    """None when the daemon does not export the commit metrics."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
            text = r.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    values: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("offload_store_commit_"):
            values[name] = float(value)
    try:
        return Commits(
            count=values["offload_store_commit_duration_seconds_count"],
            seconds=values["offload_store_commit_duration_seconds_sum"],
            operations=values["offload_store_commit_batch_size_sum"],
        )
    except KeyError:
        return None


def commits_since(url: str, before: Commits | None) -> str:
    after = commits(url)
    if before is None or after is None:
        return "commit metrics unavailable"
    return after.since(before)


# -- measurements -------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """VmRSS of `pid` in KiB, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by `pid`: {"main": the event loop's thread,
    "threads": all the others together (the SQLite writer, the reader, handler threads)}.
    Python 3.11 does not name OS threads, so they cannot be told apart further."""
    ticks = os.sysconf("SC_CLK_TCK")
    used = {"main": 0.0, "threads": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        # utime and stime are fields 14 and 15 of stat(5), counted after the ")" of comm.
        fields = stat[stat.rindex(")") + 2 :].split()
        seconds = (int(fields[11]) + int(fields[12])) / ticks
        used["main" if task.name == str(pid) else "threads"] += seconds
    return used


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def _machine_busy() -> float:
    """CPU seconds all CPUs spent not idle since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    """CPU seconds of this process and of its children already waited for (wrk)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class OtherLoad:
    """How much CPU processes other than this benchmark used while it measured: other work
    on a shared 2-CPU machine skews every figure, so each script reports it."""

    busy: float = field(default_factory=_machine_busy)
    own: float = field(default_factory=_own_cpu)
    wall: float = field(default_factory=time.monotonic)

    def report(self, daemon_cpu: float) -> str:
        """`daemon_cpu`: CPU seconds the measured server used meanwhile (not yet waited for)."""
        wall = time.monotonic() - self.wall
        other = (_machine_busy() - self.busy) - (_own_cpu() - self.own) - daemon_cpu
        share = other / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0
        return f"other processes used {max(0.0, other):.1f} CPU-s in {wall:.1f}s ({share:.0%})"


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(p / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def table(rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), sep, *(line(r) for r in rows[1:])])


def machine() -> str:
    cpus = os.cpu_count() or 0
    model = ""
    with contextlib.suppress(OSError):
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                model = text.split(":", 1)[1].strip()
                break
    return f"{cpus} CPU ({model or 'unknown'}), Python {sys.version.split()[0]}, {revision()}"


def revision() -> str:
    """The commit the daemon's code is at, and whether the work tree differs from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "daemon"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "offload at an unknown commit"
    return f"offload at {head}" + (" + uncommitted changes in daemon/" if dirty else "")
