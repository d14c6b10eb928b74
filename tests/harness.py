"""End-to-end harness: real `offload serve` processes on 127.0.0.1, real SQLite files.

`open_offload()` (the `offload` fixture of conftest.py) gives an `Offload`, which writes
configs into a test's `tmp_path` and starts daemons with `python -m daemon serve`. It owns
every process it starts and one HTTP session; on exit it kills and reaps whatever still
runs, then closes the session. Waits are polls (`eventually`, `Daemon.wait_ready`) or
`Daemon.wait_exit`; callers bound each with `asyncio.timeout()`. Nothing sleeps to sync.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgspec
from multidict import CIMultiDictProxy

T = TypeVar("T")
TomlValue = str | int | float | bool

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
POLL = 0.02  # seconds between two looks of a poll
READY_TIMEOUT = 20.0
REAP_TIMEOUT = 10.0
# Variables that would tie a test daemon to the caller's systemd or config.
_SCRUBBED_ENV = frozenset(
    {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "OFFLOAD_CONFIG"}
    | {"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "CREDENTIALS_DIRECTORY"}
)


# -- what the API answers ----------------------------------------------------------------


class AttemptJson(msgspec.Struct, frozen=True):
    attempt: int
    error: str


class TaskJson(msgspec.Struct, frozen=True):
    """The fields of a task the tests look at (the API sends more)."""

    id: str
    type: str
    state: str
    attempts: int
    max_attempts: int
    started_at: str | None
    finished_at: str | None
    last_error: str | None
    result: Any
    history: list[AttemptJson]


class TaskPageJson(msgspec.Struct, frozen=True):
    tasks: list[TaskJson]
    next_cursor: str | None


class ErrorBodyJson(msgspec.Struct, frozen=True):
    code: str
    message: str
    field: str | None = None


class ErrorJson(msgspec.Struct, frozen=True):
    error: ErrorBodyJson


@dataclass(frozen=True)
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self, tp: type[T]) -> T:
        return msgspec.json.decode(self.body, type=tp)


# -- configs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonConfig:
    """A config file the harness wrote, and what it points at."""

    path: Path
    url: str  # http://127.0.0.1:PORT
    db: Path  # the SQLite file


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the kernel picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _toml_value(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string.
        return msgspec.json.encode(value).decode()
    return repr(value)


def render_toml(tables: Mapping[str, Mapping[str, TomlValue]]) -> str:
    """TOML text for flat tables of scalars; dotted table names nest as TOML defines."""
    lines: list[str] = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
        lines.append("")
    return "\n".join(lines)


# -- a running daemon ------------------------------------------------------------------


class DaemonExited(AssertionError):
    """The daemon ended while a test expected it to serve."""


class Daemon:
    """One `offload serve` process. Build it with `Offload.start()`."""

    def __init__(
        self,
        config: DaemonConfig,
        proc: asyncio.subprocess.Process,
        log: Path,
        http: aiohttp.ClientSession,
    ) -> None:
        self.config = config
        self._proc = proc
        self.log_path = log
        self._http = http

    @property
    def url(self) -> str:
        return self.config.url

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def signal(self, sig: signal.Signals) -> None:
        self._proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: no handler, no drain, no commit."""
        self._proc.kill()

    def log_text(self) -> str:
        """The daemon's stderr so far; for failure messages only, never for assertions."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    async def wait_exit(self) -> int:
        """The exit code, once the process has ended (bound the wait with asyncio.timeout)."""
        return await self._proc.wait()

    async def wait_ready(self) -> None:
        """Poll GET /readyz until it answers 200; fail at once if the process exits."""
        while True:
            if self.returncode is not None:
                raise DaemonExited(
                    f"offload exited with {self.returncode} before it was ready; log tail:\n"
                    f"{self.log_tail()}"
                )
            try:
                if (await self.request("GET", "/readyz")).status == 200:
                    return
            except aiohttp.ClientConnectionError:
                pass  # not listening yet
            await asyncio.sleep(POLL)

    # -- HTTP ------------------------------------------------------------------------------

    async def request(self, method: str, path: str, *, json: object = None) -> Reply:
        body = None if json is None else msgspec.json.encode(json)
        headers = {} if body is None else {"Content-Type": "application/json"}
        async with self._http.request(method, self.url + path, data=body, headers=headers) as resp:
            return Reply(resp.status, resp.headers, await resp.read())

    async def submit(self, type_: str, payload: object) -> TaskJson:
        """POST a task; fails unless it is accepted (202)."""
        reply = await self.request("POST", "/v1/tasks", json={"type": type_, "payload": payload})
        assert reply.status == 202, (reply.status, reply.body)
        return reply.json(TaskJson)

    async def submit_many(
        self, type_: str, payloads: Sequence[object], *, at_once: int = 32
    ) -> list[TaskJson]:
        """POST tasks, `at_once` in flight; returns them in the order of `payloads`."""
        gate = asyncio.Semaphore(at_once)

        async def one(payload: object) -> TaskJson:
            async with gate:
                return await self.submit(type_, payload)

        return list(await asyncio.gather(*(one(p) for p in payloads)))

    async def task(self, task_id: str, *, wait: float = 0) -> TaskJson:
        path = f"/v1/tasks/{task_id}" + (f"?wait={wait:g}" if wait else "")
        reply = await self.request("GET", path)
        assert reply.status == 200, (reply.status, reply.body)
        return reply.json(TaskJson)

    async def tasks(self, *, state: str | None = None) -> list[TaskJson]:
        """Every task (filtered by `state`), following the cursor; bounded to 100 pages."""
        found: list[TaskJson] = []
        cursor: str | None = None
        for _ in range(100):
            query = "limit=1000" + (f"&state={state}" if state else "")
            if cursor is not None:
                query += f"&cursor={cursor}"
            reply = await self.request("GET", f"/v1/tasks?{query}")
            assert reply.status == 200, (reply.status, reply.body)
            page = reply.json(TaskPageJson)
            found += page.tasks
            cursor = page.next_cursor
            if cursor is None:
                return found
        raise AssertionError("more than 100 pages of tasks")


# -- the factory -----------------------------------------------------------------------


@asynccontextmanager
async def open_offload(tmp_path: Path) -> AsyncIterator[Offload]:
    """An `Offload` for `tmp_path`. On exit every daemon it started that still runs is killed
    and reaped, then its HTTP session closes."""
    # force_close: no keep-alive, so a daemon restarted on the same port never meets a
    # pooled connection to its dead predecessor.
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True),
        timeout=aiohttp.ClientTimeout(total=60),
    ) as http:
        offload = Offload(tmp_path, http)
        try:
            yield offload
        finally:
            await offload.kill_all()


class Offload:
    """Writes configs into `tmp_path` and starts daemons. Build it with `open_offload()`."""

    def __init__(self, tmp_path: Path, http: aiohttp.ClientSession) -> None:
        self.tmp_path = tmp_path
        self._http = http
        self._daemons: list[Daemon] = []
        self._configs = 0

    def config(
        self,
        *,
        types: Mapping[str, str],
        workers: Mapping[str, TomlValue] | None = None,
        synchronous: str = "normal",
        db: Path | None = None,
    ) -> DaemonConfig:
        """Write a config: a free port on 127.0.0.1, SQLite at `db` (default
        `tmp_path/offload.db`), `workers` settings, and one python task type per entry of
        `types` (name → "module:function")."""
        self._configs += 1
        db = db or self.tmp_path / "offload.db"
        port = free_port()
        tables: dict[str, Mapping[str, TomlValue]] = {
            "server": {"listen": f"{HOST}:{port}"},
            "store": {"url": f"sqlite:///{db}", "synchronous": synchronous},
            "workers": dict(workers or {}),
            "log": {"level": "info"},
        }
        for name, handler in types.items():
            tables[f"types.{name}"] = {"kind": "python", "handler": handler}
        path = self.tmp_path / f"offload-{self._configs}.toml"
        path.write_text(render_toml(tables), encoding="utf-8")
        return DaemonConfig(path=path, url=f"http://{HOST}:{port}", db=db)

    async def start(self, config: DaemonConfig, *, ready: bool = True) -> Daemon:
        """Start `offload serve` on `config`; with `ready`, return once /readyz says 200."""
        log = self.tmp_path / f"daemon-{len(self._daemons) + 1}.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *serve_argv(config.path),
                cwd=REPO_ROOT,
                env=daemon_env(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                # Its own session: a Ctrl-C at the terminal reaches pytest, not the daemons.
                start_new_session=True,
            )
        daemon = Daemon(config, proc, log, self._http)
        self._daemons.append(daemon)
        if ready:
            try:
                async with asyncio.timeout(READY_TIMEOUT):
                    await daemon.wait_ready()
            except TimeoutError:
                raise AssertionError(
                    f"offload not ready after {READY_TIMEOUT:g}s; log tail:\n{daemon.log_tail()}"
                ) from None
        return daemon

    async def kill_all(self) -> None:
        """Kill every daemon still running, then reap them all."""
        alive = [d for d in self._daemons if d.returncode is None]
        for daemon in alive:
            daemon.kill()
        async with asyncio.timeout(REAP_TIMEOUT):
            for daemon in alive:
                await daemon.wait_exit()

    def logs(self) -> list[tuple[str, str]]:
        """(name, stderr) of every daemon started, for the report of a failed test."""
        return [(d.log_path.name, d.log_text()) for d in self._daemons]


def serve_argv(config: Path) -> list[str]:
    return [sys.executable, "-m", "daemon", "serve", "--config", str(config)]


def daemon_env() -> dict[str, str]:
    """This environment, without systemd's variables, with the repo root on PYTHONPATH so
    `tests.handlers` imports."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    paths = [str(REPO_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


# -- observing from outside --------------------------------------------------------------


async def eventually(probe: Callable[[], Awaitable[T | None]], *, every: float = POLL) -> T:
    """Call `probe` every `every` s until it returns something other than None, and return
    that. Callers bound the wait with `asyncio.timeout()`."""
    # Polling, not an Event: what we wait for happens in another process.
    while (value := await probe()) is None:  # noqa: ASYNC110
        await asyncio.sleep(every)
    return value


def runs(log: Path) -> list[tuple[str, int]]:
    """(task id, attempt) of every run the handlers of `tests.handlers` noted in `log`."""
    try:
        text = log.read_text()
    except FileNotFoundError:
        return []
    noted = (line.split() for line in text.splitlines() if line)
    return [(task_id, int(attempt)) for task_id, attempt in noted]


def executions(log: Path) -> Counter[str]:
    """How many runs of each task id were noted in `log`."""
    return Counter(task_id for task_id, _ in runs(log))


@dataclass(frozen=True)
class Row:
    """A task row as the SQLite file holds it."""

    id: str
    state: str
    attempts: int
    started_at: float | None
    last_error: str | None


def read_rows(db: Path) -> dict[str, Row]:
    """Every task row of `db`, read through a read-only connection (the WAL included)."""
    uri = db.absolute().as_uri() + "?mode=ro"
    with closing(sqlite3.connect(uri, uri=True)) as conn:
        rows = conn.execute(
            "SELECT id, state, attempts, started_at, last_error FROM tasks"
        ).fetchall()
    return {r[0]: Row(*r) for r in rows}


def count_states(db: Path) -> Counter[str]:
    """How many rows of `db` are in each state."""
    uri = db.absolute().as_uri() + "?mode=ro"
    with closing(sqlite3.connect(uri, uri=True)) as conn:
        rows = conn.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall()
    return Counter({state: n for state, n in rows})


# systemd's part between its fork and the exec: the descriptors the test passed (listed in
# argv[1]) become fds 3, 4, ... in that order, LISTEN_FDS counts them, and LISTEN_PID names
# this process, which the exec of `python -m daemon ARGS` keeps.
ACTIVATE = """
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
# Copies above 3..3+n first: placing one must not overwrite another not yet placed.
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 3 + len(fds)) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)  # inheritable, as systemd passes them
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)))
os.execv(sys.executable, [sys.executable, "-m", "daemon", *sys.argv[2:]])
"""
TEST_NET = "192.0.2.1"  # TEST-NET-1: no interface has it, nothing can reach it
IP_FREEBIND = 15  # bind an address no interface has (Linux; `socket` names it from 3.12)


@contextmanager
def listening(
    family: socket.AddressFamily, address: str | tuple[str, int]
) -> Iterator[socket.socket]:
    """A listening stream socket bound at `address`, as ListenStream= makes one."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        if isinstance(address, tuple) and address[0] == TEST_NET:
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)  # no interface has it
        sock.bind(address)
        sock.listen()
        yield sock
