"""What a reload (SIGHUP to a real `offload serve`) does to authentication beyond the token
set: an open event stream whose token the new file revokes, or no longer lets read, ends
with `event: error` (401) and gets nothing more; and a file without tokens is refused while
the daemon listens on a socket that is not loopback (one systemd passed, whatever
`server.listen` says), as `offload serve` refuses it at start.

Each reload ends with READY=1 on the notify socket (tests/systemd_harness.py): the tests
wait for it, not for its effects."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from tests.harness import (
    ACTIVATE,
    READY_TIMEOUT,
    REAP_TIMEOUT,
    REPO_ROOT,
    TEST_NET,
    Daemon,
    DaemonConfig,
    daemon_env,
    listening,
)
from tests.slowclients import (
    read_to_end,
    read_until,
    request,
    unread_connection,
    write_config,
    write_tokens,
)
from tests.systemd_harness import NotifySocket, open_notify_socket, open_process, reload

WAIT = 20.0
WATCHER = "watcher-token-0123456789"
OTHER = "other-token-0123456789"
ADMIN = "admin-token-0123456789"


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    with open_notify_socket() as sock:
        yield sock


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def submit(http: aiohttp.ClientSession, url: str, payload: object) -> str:
    body = {"type": "noop", "payload": payload}
    async with http.post(f"{url}/v1/tasks", json=body, headers=bearer(ADMIN)) as resp:
        assert resp.status == 202, await resp.text()
        task_id: str = (await resp.json())["id"]
        return task_id


@pytest.mark.parametrize("change", ["removed", "scope"])
async def test_a_stream_whose_token_a_reload_revokes_ends_and_gets_nothing_more(
    tmp_path: Path, notify: NotifySocket, change: str
) -> None:
    tokens = tmp_path / "tokens"
    lines = {"watcher": ("read", WATCHER), "other": ("read", OTHER), "ops": ("admin", ADMIN)}
    write_tokens(tokens, lines)
    config = write_config(tmp_path / "offload.toml", auth={"tokens_file": str(tokens)})
    env = {"NOTIFY_SOCKET": notify.address}
    async with (
        open_process(config, tmp_path / "daemon.log", env=env) as daemon,
        aiohttp.ClientSession() as http,
    ):
        async with asyncio.timeout(WAIT):
            await notify.wait_for("READY", "1")
        watched = request("/v1/events", f"Authorization: Bearer {WATCHER}", "Connection: close")
        kept = request("/v1/events", f"Authorization: Bearer {OTHER}")
        async with (
            unread_connection(daemon.url, watched, rcvbuf=None) as watcher,
            unread_connection(daemon.url, kept, rcvbuf=None) as other,
        ):
            async with asyncio.timeout(WAIT):
                before = await submit(http, daemon.url, {"note": "before"})
                await read_until(watcher, before.encode())  # both streams work
                await read_until(other, before.encode())

            if change == "removed":
                del lines["watcher"]
            else:
                lines["watcher"] = ("submit", WATCHER)
            write_tokens(tokens, lines)
            status = await reload(daemon, notify)
            assert status.startswith("reloaded"), status

            async with asyncio.timeout(WAIT):
                after = await submit(http, daemon.url, {"note": "after-revocation"})
                await read_until(other, after.encode())  # a token still valid keeps reading
                ended = await read_to_end(watcher)  # the revoked one's stream ended
            assert after.encode() not in ended
            error = ended[ended.index(b"event: error") :]
            assert b'"code":"unauthorized"' in error
            assert b'"field":"Authorization"' in error
        async with http.get(f"{daemon.url}/v1/events", headers=bearer(WATCHER)) as resp:
            assert resp.status == (401 if change == "removed" else 403)


@asynccontextmanager
async def activated(
    config: DaemonConfig, passed: Sequence[socket.socket], log: Path, notify: NotifySocket
) -> AsyncIterator[Daemon]:
    """`offload serve` on `config`, handed `passed` as systemd would; yields once READY=1
    came. Killed (if it still runs) and reaped on exit."""
    fds = [sock.fileno() for sock in passed]
    argv = [sys.executable, "-c", ACTIVATE, ",".join(map(str, fds))]
    argv += ["serve", "--config", str(config.path)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=REPO_ROOT,
                env={**daemon_env(), "NOTIFY_SOCKET": notify.address},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=fds,
                start_new_session=True,
            )
        daemon = Daemon(config, proc, log, http)
        try:
            try:
                async with asyncio.timeout(READY_TIMEOUT):
                    await notify.wait_for("READY", "1")
            except TimeoutError:
                raise AssertionError(f"no READY=1; log:\n{daemon.log_tail()}") from None
            yield daemon
        finally:
            if daemon.returncode is None:
                daemon.kill()
            async with asyncio.timeout(REAP_TIMEOUT):
                await daemon.wait_exit()


@pytest.mark.parametrize("public", [True, False], ids=["test-net-socket", "loopback-only"])
async def test_a_reload_cannot_drop_the_tokens_while_a_passed_socket_is_not_loopback(
    tmp_path: Path, notify: NotifySocket, public: bool
) -> None:
    """The file says 127.0.0.1 (so `check-config` passes it without tokens), but systemd
    also passed a socket on a TEST-NET address: a reload to no tokens is refused, and the
    token stays needed. With the loopback socket alone, the same reload applies."""
    tokens = tmp_path / "tokens"
    write_tokens(tokens, {"ops": ("admin", ADMIN)})
    with ExitStack() as stack:
        passed = [stack.enter_context(listening(socket.AF_INET, ("127.0.0.1", 0)))]
        if public:
            passed.append(stack.enter_context(listening(socket.AF_INET, (TEST_NET, 0))))
        port = passed[0].getsockname()[1]
        path = tmp_path / "offload.toml"
        config = write_config(path, auth={"tokens_file": str(tokens)}, port=port)
        async with activated(config, passed, tmp_path / "daemon.log", notify) as daemon:
            assert (await daemon.request("GET", "/v1/tasks")).status == 401

            write_config(path, auth={"tokens_file": ""}, port=port)
            status = await reload(daemon, notify)
            if public:
                assert status.startswith("reload refused"), status
                assert (await daemon.request("GET", "/v1/tasks")).status == 401
                async with (
                    aiohttp.ClientSession(headers=bearer(ADMIN)) as http,
                    http.get(f"{daemon.url}/v1/tasks") as resp,
                ):
                    assert resp.status == 200
            else:
                assert status.startswith("reloaded"), status
                assert (await daemon.request("GET", "/v1/tasks")).status == 200


def lax_warnings(log: Path, tokens: Path) -> list[str]:
    """The lines of `log` that warn about the mode of `tokens`, formatted or not."""
    return [line for line in log.read_text().splitlines() if f"{tokens} has mode" in line]


async def test_a_lax_tokens_file_is_logged_once_at_start_and_once_per_reload(
    tmp_path: Path, notify: NotifySocket
) -> None:
    """Once, though the config's check reads the file before the daemon does; and for what
    the mode allows (0644: others read the tokens, nobody else may write them)."""
    tokens = tmp_path / "tokens"
    write_tokens(tokens, {"ops": ("admin", ADMIN)})
    tokens.chmod(0o644)
    config = write_config(tmp_path / "offload.toml", auth={"tokens_file": str(tokens)})
    log = tmp_path / "daemon.log"
    async with open_process(config, log, env={"NOTIFY_SOCKET": notify.address}) as daemon:
        async with asyncio.timeout(WAIT):
            await notify.wait_for("READY", "1")
        [at_start] = lax_warnings(log, tokens)
        assert "event=auth.tokens_file_lax" in at_start
        assert "other users can read its tokens;" in at_start
        assert "change" not in at_start

        status = await reload(daemon, notify)
        assert status.startswith("reloaded"), status
        assert len(lax_warnings(log, tokens)) == 2
