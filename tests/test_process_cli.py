"""The `offload` command as a process: `check-config` names every problem and exits 78
(EX_CONFIG), accepts config.example.toml, and `serve` refuses a broken config with 78."""

from __future__ import annotations

import subprocess
import sys
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


def run_offload(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m daemon ARGS` from the repo root; bounded in time."""
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args],
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
