"""The `offload` command as a process: `check-config` names every problem and exits 78
(EX_CONFIG), accepts config.example.toml, and `serve` refuses a broken config with 78."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from tests.harness import REPO_ROOT, TomlValue, daemon_env, free_port, render_toml

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


def write_config(path: Path, faults: list[Fault]) -> None:
    """A valid config (store beside `path`) with `faults` written over it."""
    tables: dict[str, dict[str, TomlValue]] = {
        "server": {"listen": f"127.0.0.1:{free_port()}"},
        "store": {"url": f"sqlite:///{path.parent / 'offload.db'}"},
        "workers": {"concurrency": 4, "grace_period": "5s"},
        "types.slow": {"kind": "python", "handler": "tests.handlers:noop", "timeout": "5m"},
        "types.ghost": {"kind": "python", "handler": "tests.handlers:noop"},
    }
    for fault in faults:
        tables[fault.table][fault.name] = fault.value
    path.write_text(render_toml(tables), encoding="utf-8")


def run_offload(
    *args: str, launch: tuple[str, ...] = ("-m", "daemon")
) -> subprocess.CompletedProcess[str]:
    """Run `python -m daemon ARGS` (or `python LAUNCH ARGS`) from the repo root; bounded in
    time."""
    return subprocess.run(
        [sys.executable, *launch, *args],
        cwd=REPO_ROOT,
        env=daemon_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def test_check_config_names_every_problem_and_exits_78(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    write_config(config, ALL_FAULTS)
    done = run_offload("check-config", str(config))
    assert done.returncode == EX_CONFIG, done.stderr
    assert str(config) in done.stderr
    for fault in ALL_FAULTS:
        assert fault.key in done.stderr


def test_check_config_accepts_the_example() -> None:
    done = run_offload("check-config", str(REPO_ROOT / "config.example.toml"))
    assert (done.returncode, done.stderr) == (0, "")


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


ACTIVATE = """
import os, socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.setsockopt(socket.IPPROTO_IP, 15, 1)  # IP_FREEBIND: an address no interface has
sock.bind(("192.0.2.1", 0))  # TEST-NET-1: nothing can reach it
sock.listen()
if sock.fileno() != 3:
    os.dup2(sock.fileno(), 3)
os.set_inheritable(3, True)  # a socket is made close-on-exec
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execv(sys.executable, [sys.executable, "-m", "daemon", *sys.argv[1:]])
"""


def test_a_socket_from_systemd_is_held_to_the_loopback_rule(tmp_path: Path) -> None:
    """`server.listen` off loopback needs tokens; so does a ListenStream= of the socket
    unit, which the daemon only sees as the socket systemd passes it (LISTEN_FDS)."""
    config = tmp_path / "offload.toml"
    write_config(config, [])
    done = run_offload("serve", "--config", str(config), launch=("-c", ACTIVATE))
    assert done.returncode == EX_CONFIG, done.stderr
    assert "ListenStream= 192.0.2.1:" in done.stderr
    assert "needs tokens" in done.stderr
