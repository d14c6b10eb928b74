"""The development app factory (`adev runserver daemon/dev.py --app-factory create_app`):
the same runtime and services as `offload serve`, served by aiohttp's own runner over
loopback."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from daemon.dev import create_app


async def test_the_app_factory_serves_the_api_runs_tasks_and_calls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
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
    monkeypatch.setenv("OFFLOAD_CONFIG", str(config))
    runner = web.AppRunner(await create_app())
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
