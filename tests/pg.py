"""A real PostgreSQL for the tests, from the machine's own binaries (initdb, pg_ctl).

`shared_server()` starts one server per test session, lazily, in a temporary directory, on
a free port of 127.0.0.1 with its unix socket in that directory, and stops it (and deletes
the directory) when the session ends. `new_database()` gives each test a fresh database,
and `open_database()` drops it again. As root the server runs as the `postgres` user (it
refuses to run as root). Tests that need PostgreSQL skip, naming the reason, only when the
binaries are not installed; a server that is installed but fails to start fails the test.
`start_server()` makes a private server for a test that stops and restarts it.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest

SUPERUSER = "offload"
START_TIMEOUT = 60  # seconds pg_ctl waits for the server to accept connections
# Fast and small: the tests check semantics, not durability across a power cut.
TEST_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "64MB",
    "log_min_messages": "warning",
}


def find_bin() -> Path | None:
    """The directory of initdb and pg_ctl: $OFFLOAD_PG_BIN, the newest
    /usr/lib/postgresql/*/bin, or the one of pg_ctl on PATH."""
    candidates = [os.environ.get("OFFLOAD_PG_BIN", "")]
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted(versions, key=lambda p: int(p.split("/")[-2]), reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path is not None:
        candidates.append(str(Path(os.path.realpath(on_path)).parent))
    for candidate in candidates:
        if candidate and all((Path(candidate) / b).is_file() for b in ("initdb", "pg_ctl")):
            return Path(candidate)
    return None


class NotInstalled(RuntimeError):
    pass


PREFIX = "offload-pg-"


def _reap_orphans() -> None:
    """Stop and delete the servers of test sessions that died without cleaning up (a
    killed pytest runs no atexit): their owner.pid names a process that is gone."""
    for owner in Path(tempfile.gettempdir()).glob(f"{PREFIX}*/owner.pid"):
        try:
            os.kill(int(owner.read_text()), 0)
        except ProcessLookupError:
            pass  # the owner is gone: an orphan
        except (ValueError, OSError):
            continue
        else:
            continue
        bin_dir = find_bin()
        user = "postgres" if os.geteuid() == 0 else None
        if bin_dir is not None:
            PostgresServer(bin_dir, owner.parent, 0, user).destroy()


def start_server(settings: dict[str, str] | None = None) -> PostgresServer:
    """`PostgresServer.start()` for a test: skip it when PostgreSQL is not installed."""
    try:
        return PostgresServer.start(settings)
    except NotInstalled as exc:
        pytest.skip(str(exc))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class PostgresServer:
    """One PostgreSQL server in `root` (data in root/data, socket and log beside it)."""

    bin: Path
    root: Path
    port: int
    _user: str | None  # run the binaries as this user (when we are root)

    @classmethod
    def start(cls, settings: dict[str, str] | None = None) -> PostgresServer:
        """initdb and start a server in a new temporary directory, with TEST_SETTINGS
        updated by `settings`. Raises `NotInstalled` when the binaries are missing."""
        bin_dir = find_bin()
        if bin_dir is None:
            raise NotInstalled("PostgreSQL is not installed (no initdb/pg_ctl; set OFFLOAD_PG_BIN)")
        user = "postgres" if os.geteuid() == 0 else None
        _reap_orphans()
        root = Path(tempfile.mkdtemp(prefix=PREFIX))
        (root / "owner.pid").write_text(str(os.getpid()))
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        server = cls(bin_dir, root, _free_port(), user)
        try:
            server._run(
                "initdb",
                "-D",
                str(server.data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            )
        except BaseException:
            server.destroy()
            raise
        conf = {**TEST_SETTINGS, **(settings or {})}
        conf["port"] = str(server.port)
        conf["unix_socket_directories"] = str(root)
        with (server.data / "postgresql.conf").open("a") as f:
            f.writelines(f"{key} = '{value}'\n" for key, value in conf.items())
        try:
            server.resume()
        except BaseException:
            server.destroy()
            raise
        return server

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _run(self, program: str, *args: str) -> None:
        argv = [str(self.bin / program), *args]
        if self._user is not None:
            argv = ["runuser", "-u", self._user, "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            try:
                log = (self.root / "server.log").read_text(errors="replace")[-2000:]
            except OSError:
                log = ""
            raise RuntimeError(
                f"{program} failed ({done.returncode}):\n{done.stderr}\nserver log:\n{log}"
            )

    def resume(self) -> None:
        """Start (or start again) the server and wait until it accepts connections."""
        log = self.root / "server.log"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(log), "-w", "-t", str(START_TIMEOUT),
                  "start")  # fmt: skip

    def halt(self, mode: str = "fast") -> None:
        """Stop the server: "fast" ends every session and checkpoints; "immediate" is a
        crash."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        """Stop the server if it runs and delete its directory."""
        if (self.data / "postmaster.pid").exists():
            with suppress(RuntimeError):
                self.halt("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


_shared: list[PostgresServer] = []
_names = itertools.count(1)


def shared_server() -> PostgresServer:
    """The session's server, started at the first call and destroyed at exit."""
    if not _shared:
        server = start_server()
        atexit.register(server.destroy)
        _shared.append(server)
    return _shared[0]


async def new_database(server: PostgresServer) -> str:
    """A fresh, empty database on `server`; returns its URL."""
    name = f"t{os.getpid()}_{next(_names)}"
    conn = await asyncpg.connect(server.url())
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return server.url(name)


async def drop_database(server: PostgresServer, url: str) -> None:
    """Drop the database of `url`, ending its sessions (daemons may have been killed)."""
    name = url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(server.url())
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@asynccontextmanager
async def open_database(server: PostgresServer | None = None) -> AsyncIterator[str]:
    """The URL of a fresh database on `server` (the shared one by default), dropped on exit."""
    server = server or shared_server()
    url = await new_database(server)
    try:
        yield url
    finally:
        await drop_database(server, url)
