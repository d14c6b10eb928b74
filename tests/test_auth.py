"""Bearer tokens with scopes, against a real daemon over real HTTP (tests/inproc.py), and
`offload check-config` / `offload serve` as real processes for the listen-address rule.

No or a wrong token: 401 with `WWW-Authenticate: Bearer` and the error JSON; a token
without the scope: 403; a refused request writes nothing; open paths need no token;
tokens come from a file or from a systemd credential ($CREDENTIALS_DIRECTORY).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from daemon.auth import load_tokens
from daemon.config import AuthConfig
from tests.harness import REPO_ROOT, TomlValue, daemon_env, free_port, render_toml
from tests.inproc import Daemon, assert_error, open_daemon

TOKENS = {
    "submitter": ("submit", "submit-0123456789abcdef"),
    "reader": ("read", "read-0123456789abcdef"),
    "ops": ("admin", "admin-0123456789abcdef"),
}
WRONG = "wrong-0123456789abcdef"
NOOP = {"type": "noop", "payload": None}
EX_CONFIG = 78


def tokens_text() -> str:
    return "".join(f"{name} {scopes} {secret}\n" for name, (scopes, secret) in TOKENS.items())


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name][1]}"}


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Daemon]:
    """A daemon with the three tokens of TOKENS from a tokens file."""
    tokens = tmp_path / "tokens"
    tokens.write_text(tokens_text())
    async with open_daemon(tmp_path, {"auth": {"tokens_file": str(tokens)}}) as daemon:
        yield daemon


def assert_unauthorized(reply: Any) -> None:
    assert_error(reply, 401, "unauthorized", "Authorization")
    assert reply.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": f"Bearer {WRONG}"},
        {"Authorization": f"Basic {TOKENS['ops'][1]}"},
        {"Authorization": "Bearer "},
    ],
    ids=["none", "wrong", "not-bearer", "empty"],
)
async def test_no_token_or_a_wrong_one_is_401(api: Daemon, headers: dict[str, str]) -> None:
    assert_unauthorized(await api.request("GET", "/v1/tasks", headers=headers))
    assert_unauthorized(await api.request("POST", "/v1/tasks", json=NOOP, headers=headers))


async def test_the_scheme_is_case_insensitive(api: Daemon) -> None:
    for scheme in ("bearer", "BEARER"):
        headers = {"Authorization": f"{scheme} {TOKENS['reader'][1]}"}
        reply = await api.request("GET", "/v1/tasks", headers=headers)
        assert reply.status == 200, reply.body


async def test_each_scope_allows_its_own_requests_only(api: Daemon) -> None:
    submitted = await api.request("POST", "/v1/tasks", json=NOOP, headers=bearer("submitter"))
    assert submitted.status == 202, submitted.body
    task_id = submitted.body["id"]

    denied = await api.request("GET", f"/v1/tasks/{task_id}", headers=bearer("submitter"))
    assert_error(denied, 403, "forbidden", "scope")
    denied = await api.request("POST", "/v1/tasks", json=NOOP, headers=bearer("reader"))
    assert_error(denied, 403, "forbidden", "scope")

    read = await api.request("GET", f"/v1/tasks/{task_id}", headers=bearer("reader"))
    assert read.status == 200, read.body
    # admin implies the others.
    assert (await api.request("GET", "/v1/tasks", headers=bearer("ops"))).status == 200
    assert (await api.request("POST", "/v1/tasks", json=NOOP, headers=bearer("ops"))).status == 202


async def test_only_admin_cancels_and_retries(api: Daemon) -> None:
    gate = api.gate()
    body = {"type": "block", "payload": {"gate": gate.key}}
    submitted = await api.request("POST", "/v1/tasks", json=body, headers=bearer("submitter"))
    assert submitted.status == 202, submitted.body
    task_id = submitted.body["id"]
    async with asyncio.timeout(10):
        await gate.started.wait()

    for name in ("submitter", "reader"):
        denied = await api.request("DELETE", f"/v1/tasks/{task_id}", headers=bearer(name))
        assert_error(denied, 403, "forbidden", "scope")
        denied = await api.request("POST", f"/v1/tasks/{task_id}/retry", headers=bearer(name))
        assert_error(denied, 403, "forbidden", "scope")
    still = await api.request("GET", f"/v1/tasks/{task_id}", headers=bearer("reader"))
    assert still.body["state"] == "running"

    cancelled = await api.request("DELETE", f"/v1/tasks/{task_id}", headers=bearer("ops"))
    assert cancelled.status == 200, cancelled.body
    assert cancelled.body["state"] == "cancelled"
    async with asyncio.timeout(10):
        await gate.cancelled.wait()


async def test_a_refused_post_writes_nothing(api: Daemon) -> None:
    for headers in ({}, {"Authorization": f"Bearer {WRONG}"}, bearer("reader")):
        reply = await api.request("POST", "/v1/tasks", json=NOOP, headers=headers)
        assert reply.status in (401, 403), reply.body
    listed = await api.request("GET", "/v1/tasks", headers=bearer("reader"))
    assert listed.status == 200
    assert listed.body["tasks"] == []


@pytest.mark.parametrize(
    ("open_paths", "expected"),
    [
        (None, {"/healthz": 200, "/readyz": 200, "/metrics": 200, "/v1/tasks": 401}),
        (["/readyz"], {"/readyz": 200, "/healthz": 401, "/metrics": 401, "/v1/tasks": 401}),
    ],
    ids=["default", "readyz-only"],
)
async def test_open_paths_need_no_token(
    tmp_path: Path, open_paths: list[str] | None, expected: dict[str, int]
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(tokens_text())
    auth: dict[str, Any] = {"tokens_file": str(tokens)}
    if open_paths is not None:
        auth["open"] = open_paths
    async with open_daemon(tmp_path, {"auth": auth}) as api:
        got = {path: (await api.request("GET", path)).status for path in expected}
    assert got == expected


async def test_tokens_from_a_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "credentials"  # what LoadCredential= makes
    credentials.mkdir()
    (credentials / "offload-tokens").write_text(tokens_text())
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    async with open_daemon(tmp_path, {"auth": {"credential": "offload-tokens"}}) as api:
        assert_unauthorized(await api.request("GET", "/v1/tasks"))
        reply = await api.request("POST", "/v1/tasks", json=NOOP, headers=bearer("submitter"))
        assert reply.status == 202, reply.body


# -- the listen-address rule, as real processes -----------------------------------------------


async def offload_command(*args: str) -> tuple[int, str]:
    """Run `python -m daemon ARGS`; its exit code and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daemon",
        *args,
        cwd=REPO_ROOT,
        env=daemon_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(60):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:  # a serve that did not refuse: never leave it running
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def write_config(tmp_path: Path, listen: str, auth: dict[str, str | bool]) -> Path:
    path = tmp_path / "offload.toml"
    tables: dict[str, Mapping[str, TomlValue]] = {
        "server": {"listen": listen},
        "store": {"url": f"sqlite:///{tmp_path / 'offload.db'}"},
        "auth": auth,
    }
    path.write_text(render_toml(tables))
    return path


async def test_a_non_loopback_listen_without_tokens_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, f"0.0.0.0:{free_port()}", {})
    code, err = await offload_command("check-config", str(config))
    assert code == EX_CONFIG
    assert "server.listen" in err
    # `serve` refuses the same file before it binds anything.
    code, _ = await offload_command("serve", "--config", str(config))
    assert code == EX_CONFIG


@pytest.mark.parametrize("how", ["tokens", "allow_anonymous"])
async def test_a_non_loopback_listen_with_tokens_or_explicitly_anonymous_is_accepted(
    tmp_path: Path, how: str
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(tokens_text())
    auth: dict[str, str | bool] = (
        {"tokens_file": str(tokens)} if how == "tokens" else {"allow_anonymous": True}
    )
    config = write_config(tmp_path, f"0.0.0.0:{free_port()}", auth)
    code, err = await offload_command("check-config", str(config))
    assert code == 0, err


async def test_a_credential_without_credentials_directory_is_a_config_error(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, "127.0.0.1:0", {"credential": "offload-tokens"})
    code, err = await offload_command("check-config", str(config))
    assert code == EX_CONFIG
    assert "auth.credential" in err


async def test_a_bad_tokens_file_is_a_config_error(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("ops admin tiny-secret\n")  # under 16 characters
    config = write_config(tmp_path, "127.0.0.1:0", {"tokens_file": str(tokens)})
    code, err = await offload_command("check-config", str(config))
    assert code == EX_CONFIG
    assert "auth.tokens_file" in err
    assert "tiny-secret" not in err  # the secret itself is not echoed


@pytest.mark.parametrize(
    ("mode", "said"),
    [
        (0o644, "other users can read its tokens;"),
        (0o620, "its group can change it (add a token of their own);"),
        (0o666, "other users can read its tokens, and its group and other users can change it"),
        (0o600, None),
        (0o640, None),
    ],
)
def test_a_tokens_file_others_may_read_or_write_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int, said: str | None
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("ci submit " + "b" * 32 + "\n")
    tokens.chmod(mode)
    caplog.set_level(logging.WARNING, logger="daemon.auth")

    assert len(load_tokens(AuthConfig(tokens_file=str(tokens)))) == 1

    lax = [r for r in caplog.records if getattr(r, "event", None) == "auth.tokens_file_lax"]
    assert len(lax) == int(said is not None)
    if said is not None:
        assert oct(mode) in lax[0].getMessage()
        assert said in lax[0].getMessage()
