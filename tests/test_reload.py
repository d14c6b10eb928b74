"""SIGHUP to a real `offload serve`: the config file is read again and what it says about
task types, concurrency and tokens applies at once; a file that does not validate changes
nothing, and the daemon keeps serving.

A reload ends with READY=1 on the notify socket (after RELOADING=1), as systemd expects, so
each test waits for that message instead of polling for its effects.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator, Mapping
from pathlib import Path

import aiohttp
import pytest

from tests.harness import (
    Daemon,
    DaemonConfig,
    ErrorJson,
    Offload,
    TomlValue,
    eventually,
    executions,
    read_rows,
    render_toml,
)
from tests.systemd_harness import NotifySocket, open_notify_socket, open_process, reload

WAIT = 20.0
HANDLERS = {
    "noop": "tests.handlers:noop",
    "record": "tests.handlers:record",
    "hold": "tests.handlers:hold",
}


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    with open_notify_socket() as sock:
        yield sock


def rewrite(
    config: DaemonConfig,
    types: list[str],
    *,
    workers: Mapping[str, TomlValue] | None = None,
    auth: Mapping[str, TomlValue] | None = None,
) -> None:
    """Replace the file of `config` (same listener and store) with these types and settings."""
    tables: dict[str, Mapping[str, TomlValue]] = {
        "server": {"listen": config.url.removeprefix("http://")},
        "store": {"url": f"sqlite:///{config.db}", "synchronous": "normal"},
        "workers": dict(workers or {}),
        "auth": dict(auth or {}),
        "log": {"level": "info"},
    }
    for name in types:
        tables[f"types.{name}"] = {"kind": "python", "handler": HANDLERS[name]}
    config.path.write_text(render_toml(tables))


async def post_status(daemon: Daemon, type_: str, payload: object) -> int:
    reply = await daemon.request("POST", "/v1/tasks", json={"type": type_, "payload": payload})
    if reply.status == 422:
        assert reply.json(ErrorJson).error.field == "type", reply.body
    return reply.status


async def test_added_and_removed_types_apply_at_once(
    offload: Offload, tmp_path: Path, notify: NotifySocket
) -> None:
    config = offload.config(types={"noop": HANDLERS["noop"], "record": HANDLERS["record"]})
    env = {"NOTIFY_SOCKET": notify.address}
    async with open_process(config, tmp_path / "daemon.log", env=env) as daemon:
        async with asyncio.timeout(WAIT):
            await notify.wait_for("READY", "1")
        record = {"log": str(tmp_path / "runs.log")}
        assert await post_status(daemon, "record", record) == 202
        assert await post_status(daemon, "hold", {}) == 422

        rewrite(config, ["noop", "hold"])
        status = await reload(daemon, notify)
        assert status.startswith("reloaded"), status
        hold = {"log": str(tmp_path / "runs.log"), "release": str(tmp_path / "release")}
        assert await post_status(daemon, "hold", hold) == 202
        assert await post_status(daemon, "record", record) == 422
        assert await post_status(daemon, "noop", None) == 202
        (tmp_path / "release").touch()


@pytest.mark.parametrize(
    "broken",
    [
        "[workers\nconcurrency = ",  # not TOML
        '[workers]\nconcurrency = 0\n[types.noop]\nkind = "python"\nhandler = "nope:nope"\n',
        # Valid but for a handler whose module raises at import (once, the daemon's end).
        '[types.noop]\nkind = "python"\nhandler = "tests.unimportable:run"\n',
    ],
    ids=["not-toml", "invalid", "handler-raises-at-import"],
)
async def test_a_broken_file_is_refused_and_the_daemon_keeps_serving(
    offload: Offload, tmp_path: Path, notify: NotifySocket, broken: str
) -> None:
    config = offload.config(types={"noop": HANDLERS["noop"]})
    env = {"NOTIFY_SOCKET": notify.address}
    async with open_process(config, tmp_path / "daemon.log", env=env) as daemon:
        async with asyncio.timeout(WAIT):
            await notify.wait_for("READY", "1")
        config.path.write_text(broken)
        status = await reload(daemon, notify)
        assert status.startswith("reload refused"), status
        assert daemon.returncode is None
        assert (await daemon.request("GET", "/readyz")).status == 200
        task = await daemon.submit("noop", None)
        assert (await daemon.task(task.id, wait=10)).state == "succeeded"

        # Fixed, the file is taken: the refusal left nothing stuck.
        rewrite(config, ["noop", "record"])
        assert (await reload(daemon, notify)).startswith("reloaded")
        assert await post_status(daemon, "record", {"log": str(tmp_path / "runs.log")}) == 202


async def test_more_concurrency_starts_waiting_tasks_and_leaves_running_ones_alone(
    offload: Offload, tmp_path: Path, notify: NotifySocket
) -> None:
    config = offload.config(types={"hold": HANDLERS["hold"]}, workers={"concurrency": 1})
    env = {"NOTIFY_SOCKET": notify.address}
    runs = tmp_path / "runs.log"
    hold = {"log": str(runs), "release": str(tmp_path / "release")}
    async with open_process(config, tmp_path / "daemon.log", env=env) as daemon:
        async with asyncio.timeout(WAIT):
            await notify.wait_for("READY", "1")
        tasks = await daemon.submit_many("hold", [hold] * 3)

        async def started(n: int) -> set[str] | None:
            ids = set(executions(runs))
            return ids if len(ids) >= n else None

        async with asyncio.timeout(WAIT):
            (first,) = await eventually(lambda: started(1))
        states = sorted([(await daemon.task(t.id)).state for t in tasks])
        assert states == ["queued", "queued", "running"]  # one consumer

        rewrite(config, ["hold"], workers={"concurrency": 3})
        assert (await reload(daemon, notify)).startswith("reloaded")
        async with asyncio.timeout(WAIT):  # the new consumers exist once READY=1 came
            assert await eventually(lambda: started(3)) == {t.id for t in tasks}

        (tmp_path / "release").touch()
        ended = [await daemon.task(t.id, wait=10) for t in tasks]
        assert {(t.state, t.attempts) for t in ended} == {("succeeded", 1)}
        assert executions(runs)[first] == 1  # the running task was not restarted


async def test_tokens_apply_at_once(offload: Offload, tmp_path: Path, notify: NotifySocket) -> None:
    config = offload.config(types={"noop": HANDLERS["noop"]})
    env = {"NOTIFY_SOCKET": notify.address}
    secret = "reloaded-token-0123456789"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ops admin {secret}\n")
    async with (
        open_process(config, tmp_path / "daemon.log", env=env) as daemon,
        aiohttp.ClientSession() as http,
    ):
        async with asyncio.timeout(WAIT):
            await notify.wait_for("READY", "1")
        async with http.get(f"{daemon.url}/v1/tasks") as resp:
            assert resp.status == 200  # no tokens yet: anonymous on loopback

        rewrite(config, ["noop"], auth={"tokens_file": str(tokens)})
        assert (await reload(daemon, notify)).startswith("reloaded")
        async with http.get(f"{daemon.url}/v1/tasks") as resp:
            assert resp.status == 401
        headers = {"Authorization": f"Bearer {secret}"}
        async with http.get(f"{daemon.url}/v1/tasks", headers=headers) as resp:
            assert resp.status == 200

        # A token rotated in the file alone (the config file unchanged) applies on SIGHUP.
        rotated = "rotated-token-9876543210"
        tokens.write_text(f"ops admin {rotated}\n")
        assert "auth: 1 tokens" in await reload(daemon, notify)
        async with http.get(f"{daemon.url}/v1/tasks", headers=headers) as resp:
            assert resp.status == 401
        headers = {"Authorization": f"Bearer {rotated}"}
        async with http.get(f"{daemon.url}/v1/tasks", headers=headers) as resp:
            assert resp.status == 200


async def test_a_reload_during_the_stop_is_skipped_and_starts_nothing(
    offload: Offload, tmp_path: Path, notify: NotifySocket
) -> None:
    """Once stopping, a SIGHUP that would raise the concurrency starts no consumer (the
    queued tasks stay queued, unspent), tells systemd nothing after STOPPING=1, and the
    daemon exits 0 when its one run ends."""
    config = offload.config(
        types={"hold": HANDLERS["hold"]}, workers={"concurrency": 1, "grace_period": 60}
    )
    env = {"NOTIFY_SOCKET": notify.address}
    runs = tmp_path / "runs.log"
    log = tmp_path / "daemon.log"
    hold = {"log": str(runs), "release": str(tmp_path / "release")}
    async with open_process(config, log, env=env) as daemon:
        async with asyncio.timeout(WAIT):
            await notify.wait_for("READY", "1")
        tasks = await daemon.submit_many("hold", [hold] * 3)

        async def started() -> list[str] | None:
            ids = list(executions(runs))
            return ids or None

        async with asyncio.timeout(WAIT):
            (first,) = await eventually(started)
        daemon.signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT):
            await notify.wait_for("STOPPING", "1")

        rewrite(config, ["hold"], workers={"concurrency": 3, "grace_period": 60})
        daemon.signal(signal.SIGHUP)

        async def skipped() -> bool | None:
            return "event=config.reload_skipped" in log.read_text() or None

        async with asyncio.timeout(WAIT):
            await eventually(skipped)
        (tmp_path / "release").touch()
        async with asyncio.timeout(WAIT):
            assert await daemon.wait_exit() == 0

    after_stop = notify.messages[[m.get("STOPPING") for m in notify.messages].index("1") :]
    after_stop += notify.receive_nowait()
    assert not [m for m in after_stop if "READY" in m or "RELOADING" in m], after_stop
    assert list(executions(runs)) == [first]  # no other run started
    rows = read_rows(config.db)
    assert rows[first].state == "succeeded"
    assert {(rows[t.id].state, rows[t.id].attempts) for t in tasks if t.id != first} == {
        ("queued", 0)
    }
