"""The development server (`make dev`: `adev runserver daemon/dev.py --app-factory
create_app`): the same runtime and services as `offload serve`, served by aiohttp's own
runner; under a real adev, bound to loopback only, and stopped at a reload or Ctrl-C in time
to put running tasks back before adev's SIGKILL."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from daemon.config import load
from daemon.dev import DEV_GRACE, dev_app
from tests.harness import (
    REAP_TIMEOUT,
    REPO_ROOT,
    daemon_env,
    eventually,
    free_port,
    read_rows,
    render_toml,
)

ADEV = Path(sys.executable).with_name("adev")
ADEV_WITHIN = 30.0  # seconds for adev to start its app, or to restart it after a change
# adev SIGKILLs its app 5 s after the SIGINT (aiohttp_devtools/runserver/watch.py).
ADEV_KILLS_AFTER = 5.0
KILLED = "sending SIGKILL"  # adev's log line when the app outlived those 5 s


async def test_the_app_factory_serves_the_api_runs_tasks_and_calls_back(tmp_path: Path) -> None:
    called = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        called.set()
        return web.Response(status=204)

    receiver = web.Application()
    receiver.router.add_post("/done", receive)
    receiving = web.AppRunner(receiver)
    await receiving.setup()
    await web.TCPSite(receiving, "127.0.0.1", 0).start()
    target = f"http://127.0.0.1:{receiving.addresses[0][1]}/done"
    config = tmp_path / "dev.toml"
    config.write_text(
        f'[store]\nurl = "sqlite:{tmp_path / "dev.db"}"\n\n[log]\nlevel = "warning"\n\n'
        '[types.noop]\nkind = "python"\nhandler = "daemon.builtins:noop"\n\n'
        f'[callbacks.done]\nurl = "{target}"\n'
    )
    runner = web.AppRunner(await dev_app(load(config)))
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        async with aiohttp.ClientSession(f"http://{host}:{port}") as http:
            async with http.get("/readyz") as ready:
                assert ready.status == 200
            body = {"type": "noop", "callback": "done"}
            async with http.post("/v1/tasks", json=body) as accepted:
                assert accepted.status == 202
                task = await accepted.json()
            async with http.get(f"/v1/tasks/{task['id']}", params={"wait": "10"}) as done:
                assert (await done.json())["state"] == "succeeded"
            async with asyncio.timeout(10):
                await called.wait()
    finally:
        await runner.cleanup()  # the app's cleanup: the drain, then the store closes
        await receiving.cleanup()

    with closing(sqlite3.connect(tmp_path / "dev.db")) as db:
        row = db.execute("SELECT state FROM tasks WHERE id = ?", (task["id"],)).fetchone()
    assert row == ("succeeded",)


def test_the_dev_grace_leaves_time_before_adevs_sigkill() -> None:
    assert DEV_GRACE <= ADEV_KILLS_AFTER - 1.5


def make_dev_args() -> list[str]:
    """What `make dev` passes to adev (the Makefile's `dev` recipe)."""
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = re.search(r"^dev:.*\n\t(.+)$", makefile, re.MULTILINE)
    assert recipe is not None, "the Makefile has a dev target"
    command, *args = shlex.split(recipe.group(1))
    assert command == "$(BIN)/adev"
    return args


def test_make_dev_keeps_clear_of_the_example_callback() -> None:
    args = make_dev_args()
    assert args[:4] == ["runserver", "daemon/dev.py", "--app-factory", "create_app"]
    ports = {int(args[args.index(flag) + 1]) for flag in ("--port", "--aux-port")}
    example = load(REPO_ROOT / "config.example.toml")
    called = {urlsplit(callback.url).port for callback in example.callbacks.values()}
    assert called
    assert ports.isdisjoint(called), "the example callback would hit adev's own servers"


# -- under a real adev -------------------------------------------------------------------------


@dataclass
class Adev:
    proc: asyncio.subprocess.Process
    root: Path  # adev's --root: the directory it watches for changes
    log: Path
    port: int
    aux_port: int

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@asynccontextmanager
async def open_adev(tmp_path: Path, config: Path) -> AsyncIterator[Adev]:
    """`adev runserver` of daemon/dev.py's `create_app`, as `make dev` runs it, but on free
    ports and watching a directory of its own (an app.py importing the factory), so that a
    test can make it reload. In a session of its own: Ctrl-C is SIGINT to its group."""
    root = tmp_path / "app"
    root.mkdir()
    (root / "app.py").write_text("from daemon.dev import create_app as create_app\n")
    log = tmp_path / "adev.log"
    port, aux_port = free_port(), free_port()
    argv = [str(ADEV), "runserver", "app.py", "--root", str(root), "--app-factory", "create_app"]
    argv += ["--port", str(port), "--aux-port", str(aux_port)]
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=root,
            env={**daemon_env(), "OFFLOAD_CONFIG": str(config)},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        yield Adev(proc, root, log, port, aux_port)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
        async with asyncio.timeout(REAP_TIMEOUT):
            await proc.wait()


async def get_json(http: aiohttp.ClientSession, path: str) -> Any:
    """The JSON of a 200 to GET `path`; None while the app is down or restarting."""
    try:
        async with http.get(path) as resp:
            return await resp.json() if resp.status == 200 else None
    except aiohttp.ClientConnectionError:
        return None


def refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_make_dev_serves_loopback_only_and_puts_running_tasks_back_at_reload_and_ctrl_c(
    tmp_path: Path,
) -> None:
    db, config = tmp_path / "dev.db", tmp_path / "dev.toml"
    config.write_text(
        render_toml(
            {
                "store": {"url": f"sqlite:{db}", "synchronous": "normal"},
                "workers": {"grace_period": "30s"},  # the default, which adev would cut
                "log": {"level": "info"},
                "types.sleep": {"kind": "python", "handler": "daemon.builtins:sleep"},
            }
        )
    )
    async with (
        open_adev(tmp_path, config) as adev,
        aiohttp.ClientSession(f"http://127.0.0.1:{adev.port}") as http,
    ):

        async def ready() -> bool | None:
            assert adev.proc.returncode is None, adev.log_text()
            return True if await get_json(http, "/readyz") is not None else None

        async with asyncio.timeout(ADEV_WITHIN):
            await eventually(ready)
        # Bound to 127.0.0.1 alone, not 0.0.0.0 (which would also take 127.0.0.2), the app
        # and adev's aux server alike.
        assert not refused("127.0.0.1", adev.aux_port)
        assert refused("127.0.0.2", adev.port), "the app listens beyond 127.0.0.1"
        assert refused("127.0.0.2", adev.aux_port), "adev's aux server listens beyond 127.0.0.1"

        body = {"type": "sleep", "payload": {"seconds": 600}}
        async with http.post("/v1/tasks", json=body) as resp:
            assert resp.status == 202, await resp.text()
            task_id = (await resp.json())["id"]

        async def started(after: str | None) -> dict[str, Any] | None:
            task = await get_json(http, f"/v1/tasks/{task_id}")
            if task is None or task["state"] != "running" or task["started_at"] == after:
                return None
            return dict(task)

        async with asyncio.timeout(ADEV_WITHIN):
            first = await eventually(lambda: started(None))

        # A code change: adev stops the app (SIGINT, SIGKILL 5 s later) and starts it anew.
        (adev.root / "changed.py").write_text("")
        async with asyncio.timeout(ADEV_WITHIN):
            again = await eventually(lambda: started(first["started_at"]))
        # Put back unspent by the old app, run again by the new: one attempt, no failure.
        assert (again["attempts"], again["history"]) == (1, []), adev.log_text()

        # Ctrl-C: SIGINT to the terminal's process group, adev and its app.
        os.killpg(adev.proc.pid, signal.SIGINT)
        async with asyncio.timeout(ADEV_WITHIN):
            assert await adev.proc.wait() == 0, adev.log_text()
    assert KILLED not in adev.log_text()
    row = read_rows(db)[task_id]
    assert (row.state, row.attempts, row.last_error) == ("queued", 0, None), adev.log_text()
