"""The `offload` command as a process: `check-config` names every problem and exits 78
(EX_CONFIG), accepts config.example.toml, and `serve` refuses a broken config with 78. With
sockets from systemd (LISTEN_FDS), `serve` serves every one, or refuses with 78 one it
cannot serve or one off loopback without tokens."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec
import pytest

from tests.harness import (
    ACTIVATE,
    READY_TIMEOUT,
    REAP_TIMEOUT,
    REPO_ROOT,
    TEST_NET,
    TomlValue,
    daemon_env,
    free_port,
    listening,
    render_toml,
)
from tests.systemd_harness import open_notify_socket

EX_CONFIG = 78
RUN_TIMEOUT = 30.0


@dataclass(frozen=True)
class Fault:
    """One problem: `table.name = value` in an otherwise valid config, to be reported under
    `key`."""

    key: str
    table: str
    name: str
    value: TomlValue


UNKNOWN_KEY = Fault("server.colour", "server", "colour", "blue")
WRONG_TYPE = Fault("workers.concurrency", "workers", "concurrency", "many")
BAD_DURATION = Fault("types.slow.timeout", "types.slow", "timeout", "soon")
UNKNOWN_MODULE = Fault("types.ghost.handler", "types.ghost", "handler", "tests.no_such_module:run")
ALL_FAULTS = [UNKNOWN_KEY, WRONG_TYPE, BAD_DURATION, UNKNOWN_MODULE]


def write_config(path: Path, faults: list[Fault], *, listen: str | None = None) -> None:
    """A valid config (store beside `path`, `listen` or a free port of 127.0.0.1) with
    `faults` written over it."""
    tables: dict[str, dict[str, TomlValue]] = {
        "server": {"listen": listen or f"127.0.0.1:{free_port()}"},
        "store": {"url": f"sqlite:///{path.parent / 'offload.db'}"},
        "workers": {"concurrency": 4, "grace_period": "5s"},
        "types.slow": {"kind": "python", "handler": "tests.handlers:noop", "timeout": "5m"},
        "types.ghost": {"kind": "python", "handler": "tests.handlers:noop"},
    }
    for fault in faults:
        tables.setdefault(fault.table, {})[fault.name] = fault.value
    path.write_text(render_toml(tables), encoding="utf-8")


def run_offload(
    *args: str, launch: tuple[str, ...] = ("-m", "daemon"), pass_fds: Sequence[int] = ()
) -> subprocess.CompletedProcess[str]:
    """Run `python -m daemon ARGS` (or `python LAUNCH ARGS`, with `pass_fds` open) from the
    repo root; bounded in time."""
    return subprocess.run(
        [sys.executable, *launch, *args],
        cwd=REPO_ROOT,
        env=daemon_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
        pass_fds=pass_fds,
    )


def test_check_config_names_every_problem_and_exits_78(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    write_config(config, ALL_FAULTS)
    done = run_offload("check-config", str(config))
    assert done.returncode == EX_CONFIG, done.stderr
    assert str(config) in done.stderr
    for fault in ALL_FAULTS:
        assert fault.key in done.stderr


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("soon", 'expected a duration like "500ms", "30s", "5m", "2h" or "7d"'),
        (0, "expected a duration > 0"),
        ("-1s", 'expected a duration like "500ms"'),
    ],
)
def test_check_config_names_a_bad_body_timeout(
    tmp_path: Path, value: TomlValue, expected: str
) -> None:
    config = tmp_path / "slow-body.toml"
    write_config(config, [Fault("server.body_timeout", "server", "body_timeout", value)])
    done = run_offload("check-config", str(config))
    assert done.returncode == EX_CONFIG, done.stderr
    assert str(config) in done.stderr
    assert f"server.body_timeout = {value!r}: {expected}" in done.stderr, done.stderr


def test_check_config_accepts_the_example() -> None:
    done = run_offload("check-config", str(REPO_ROOT / "config.example.toml"))
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize(("mode", "noted"), [(0o644, True), (0o600, False)])
def test_check_config_notes_a_tokens_file_others_can_read(
    tmp_path: Path, mode: int, noted: bool
) -> None:
    """Not a problem (exit 0), but said where an operator looks before a start or reload."""
    tokens = tmp_path / "tokens"
    tokens.write_text("ci submit,read ci-token-0123456789abcdef0123\n", encoding="utf-8")
    tokens.chmod(mode)
    config = tmp_path / "with-tokens.toml"
    write_config(config, [Fault("auth.tokens_file", "auth", "tokens_file", str(tokens))])
    done = run_offload("check-config", str(config))
    assert done.returncode == 0, done.stderr
    if noted:
        assert done.stderr.startswith(f"note: auth.tokens_file {tokens} has mode 0o644: "), (
            done.stderr
        )
        assert "other users can read its tokens" in done.stderr
        assert "chmod 600" in done.stderr
    else:
        assert done.stderr == ""


def test_check_config_accepts_the_base_of_the_broken_configs(tmp_path: Path) -> None:
    """The broken configs of this module fail only because of their faults."""
    config = tmp_path / "clean.toml"
    write_config(config, [])
    done = run_offload("check-config", str(config))
    assert (done.returncode, done.stderr) == (0, "")


def test_serve_refuses_a_broken_config_with_78_and_writes_nothing(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    write_config(config, ALL_FAULTS)
    done = run_offload("serve", "--config", str(config))
    assert done.returncode == EX_CONFIG, done.stderr
    assert not (tmp_path / "offload.db").exists()


def test_serve_refuses_a_missing_config_with_78(tmp_path: Path) -> None:
    done = run_offload("serve", "--config", str(tmp_path / "absent.toml"))
    assert done.returncode == EX_CONFIG, done.stderr


def test_serve_refuses_a_database_of_a_newer_offload_with_78(tmp_path: Path) -> None:
    """An older binary after an upgrade migrated the store (a rollback): no restart mends
    that, so it is exit 78, which the unit does not restart, and the file is left as is."""
    config = tmp_path / "offload.toml"
    write_config(config, [])
    db = tmp_path / "offload.db"
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA user_version = 999")
    done = run_offload("serve", "--config", str(config))
    assert done.returncode == EX_CONFIG, done.stderr
    assert "schema version 999" in done.stderr
    assert "restore a backup" in done.stderr
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 999


WAIT = 20.0  # seconds for what must come (READY=1, an answer, the exit after SIGTERM)


def activate(config: Path, passed: Sequence[int]) -> subprocess.CompletedProcess[str]:
    """`offload serve --config CONFIG`, handed the descriptors `passed` as systemd would."""
    fds = ",".join(map(str, passed))
    args = ("serve", "--config", str(config))
    return run_offload(*args, launch=("-c", ACTIVATE, fds), pass_fds=passed)


def test_every_socket_from_systemd_is_held_to_the_loopback_rule(tmp_path: Path) -> None:
    """`server.listen` off loopback needs tokens; so does each ListenStream= of the socket
    unit, which the daemon only sees as the sockets systemd passes it (LISTEN_FDS)."""
    config = tmp_path / "offload.toml"
    write_config(config, [])
    with (
        listening(socket.AF_INET, ("127.0.0.1", 0)) as local,
        listening(socket.AF_INET, (TEST_NET, 0)) as remote,
    ):
        done = activate(config, [local.fileno(), remote.fileno()])
        port = remote.getsockname()[1]
    assert done.returncode == EX_CONFIG, done.stderr
    assert f"ListenStream= {TEST_NET}:{port} (fd 4): a non-loopback address needs tokens" in (
        done.stderr
    )
    assert "ListenStream= 127.0.0.1" not in done.stderr  # the loopback one passes


@contextlib.contextmanager
def not_listening(kind: str) -> Iterator[int]:
    """The fd of something systemd may pass that offload cannot serve."""
    if kind == "pipe":
        read, write = os.pipe()
        try:
            yield read
        finally:
            os.close(read)
            os.close(write)
        return
    sock_type = socket.SOCK_DGRAM if kind == "datagram" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, sock_type) as sock:
        sock.bind(("127.0.0.1", 0))  # and no listen(): Accept=yes passes such a one
        yield sock.fileno()


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("datagram", "a SOCK_DGRAM socket, not a stream one"),
        ("unlistened", "not listening"),
        ("pipe", "not a socket"),
    ],
)
def test_a_passed_fd_that_is_not_a_listening_stream_socket_is_refused(
    tmp_path: Path, kind: str, problem: str
) -> None:
    config = tmp_path / "offload.toml"
    write_config(config, [])
    with listening(socket.AF_INET, ("127.0.0.1", 0)) as good, not_listening(kind) as bad:
        done = activate(config, [good.fileno(), bad])
    assert done.returncode == EX_CONFIG, done.stderr
    assert f"offload.socket: fd 4 from systemd (LISTEN_FDS): {problem}" in done.stderr


@contextlib.asynccontextmanager
async def activated_serve(
    config: Path, passed: Sequence[socket.socket], log: Path, env: Mapping[str, str]
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`offload serve` handed `passed` as systemd would, `env` added, its output in `log`;
    killed (if it still runs) and reaped on exit."""
    fds = [sock.fileno() for sock in passed]
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-c", ACTIVATE, ",".join(map(str, fds))),
            *("serve", "--config", str(config)),
            cwd=REPO_ROOT,
            env={**daemon_env(), **env},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            pass_fds=fds,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        async with asyncio.timeout(REAP_TIMEOUT):
            await proc.wait()


class Accepted(msgspec.Struct):
    id: str


class Listed(msgspec.Struct):
    tasks: list[Accepted]


class Polled(msgspec.Struct):
    id: str
    state: str


async def test_every_socket_from_systemd_is_served(tmp_path: Path) -> None:
    """A TCP socket on loopback and a unix socket, passed together: HTTP over either reaches
    the one daemon (what is submitted over one is read over the other), READY=1 names both,
    and server.listen is not bound."""
    config = tmp_path / "offload.toml"
    from_config = tmp_path / "from-config.sock"
    write_config(config, [], listen=f"unix:{from_config}")
    log = tmp_path / "daemon.log"
    with contextlib.ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="offload-")))
        path = str(directory / "offload.sock")
        tcp = stack.enter_context(listening(socket.AF_INET, ("127.0.0.1", 0)))
        unix = stack.enter_context(listening(socket.AF_UNIX, path))
        notify = stack.enter_context(open_notify_socket())
        env = {"NOTIFY_SOCKET": notify.address}
        async with activated_serve(config, [tcp, unix], log, env) as proc:
            try:
                async with asyncio.timeout(READY_TIMEOUT):
                    ready = await notify.wait_for("READY", "1")
            except TimeoutError:
                raise AssertionError(f"no READY=1; log:\n{log.read_text()}") from None
            tcp_url = f"http://127.0.0.1:{tcp.getsockname()[1]}"
            assert ready["STATUS"] == f"ready on {tcp_url} and unix:{path}"
            timeout = aiohttp.ClientTimeout(total=WAIT)
            async with (
                aiohttp.ClientSession(tcp_url, timeout=timeout) as over_tcp,
                aiohttp.ClientSession(
                    "http://localhost",
                    connector=aiohttp.UnixConnector(path=path),
                    timeout=timeout,
                ) as over_unix,
            ):
                ids = []
                for http in (over_tcp, over_unix):
                    async with http.post("/v1/tasks", json={"type": "slow"}) as resp:
                        assert resp.status == 202, await resp.text()
                        ids.append(msgspec.json.decode(await resp.read(), type=Accepted).id)
                for http, task_id in ((over_unix, ids[0]), (over_tcp, ids[1])):
                    async with http.get(f"/v1/tasks/{task_id}", params={"wait": "10"}) as resp:
                        assert resp.status == 200, await resp.text()
                        polled = msgspec.json.decode(await resp.read(), type=Polled)
                    assert (polled.id, polled.state) == (task_id, "succeeded")
                for http in (over_tcp, over_unix):
                    async with http.get("/v1/tasks") as resp:
                        listed = msgspec.json.decode(await resp.read(), type=Listed)
                    assert sorted(t.id for t in listed.tasks) == sorted(ids)
            assert not from_config.exists()  # the sockets from systemd replace server.listen
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(WAIT):
                assert await proc.wait() == 0, log.read_text()


def listen_backlog(port: int) -> int:
    """The backlog of the listener on 127.0.0.1:`port` (ss's Send-Q for a listening socket)."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    (line,) = out.splitlines()
    return int(line.split()[2])


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
async def test_the_backlog_of_a_socket_from_systemd_is_kept(tmp_path: Path) -> None:
    """Serving a socket listen()s on it again: with aiohttp's default (128) the unit's
    Backlog= would shrink, and a restart's burst of connections be refused."""
    config = tmp_path / "offload.toml"
    write_config(config, [])
    log = tmp_path / "daemon.log"
    with socket.socket() as tcp, open_notify_socket() as notify:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(socket.SOMAXCONN)  # systemd's default Backlog=, and the unit's 4096
        port = tcp.getsockname()[1]
        before = listen_backlog(port)
        assert before > 128
        env = {"NOTIFY_SOCKET": notify.address}
        async with activated_serve(config, [tcp], log, env):
            try:
                async with asyncio.timeout(READY_TIMEOUT):
                    await notify.wait_for("READY", "1")
            except TimeoutError:
                raise AssertionError(f"no READY=1; log:\n{log.read_text()}") from None
            assert listen_backlog(port) == before
