"""The development app factory (`adev runserver daemon/dev.py --app-factory create_app`):
the same runtime as `offload serve`, served by aiohttp's own runner over loopback."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from daemon.dev import create_app


async def test_the_app_factory_serves_the_api_and_runs_tasks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "dev.toml"
    config.write_text(
        f'[store]\nurl = "sqlite:{tmp_path / "dev.db"}"\n\n[log]\nlevel = "warning"\n\n'
        '[types.noop]\nkind = "python"\nhandler = "daemon.builtins:noop"\n'
    )
    monkeypatch.setenv("OFFLOAD_CONFIG", str(config))
    runner = web.AppRunner(await create_app())
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        async with aiohttp.ClientSession(f"http://{host}:{port}") as http:
            async with http.get("/readyz") as ready:
                assert ready.status == 200
            async with http.post("/v1/tasks", json={"type": "noop"}) as accepted:
                assert accepted.status == 202
                task = await accepted.json()
            async with http.get(f"/v1/tasks/{task['id']}", params={"wait": "10"}) as done:
                assert (await done.json())["state"] == "succeeded"
    finally:
        await runner.cleanup()  # the app's cleanup: the drain, then the store closes

    with closing(sqlite3.connect(tmp_path / "dev.db")) as db:
        row = db.execute("SELECT state FROM tasks WHERE id = ?", (task["id"],)).fetchone()
    assert row == ("succeeded",)
