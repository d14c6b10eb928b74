"""Completion callbacks: a real local HTTP server receives a task's final representation,
verifies its signature, and a failing receiver is retried; the delivery shows on the task."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.inproc import Daemon, assert_error, open_daemon

SECRET = b"callback-secret-0123456789"


@dataclass
class Receiver:
    """A callback target: answers `fail_first` requests with 500, then 200."""

    fail_first: int = 0
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((dict(request.headers), await request.read()))
        if len(self.received) <= self.fail_first:
            return web.Response(status=500)
        self.arrived.set()
        return web.Response(status=204)


@asynccontextmanager
async def serving(receiver: Receiver) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/done", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/done"
    finally:
        await runner.cleanup()


def verify(headers: dict[str, str], body: bytes) -> bool:
    """What a receiver does, as the README says."""
    parts = dict(p.split("=", 1) for p in headers["X-Offload-Signature"].split(","))
    expected = hmac.new(SECRET, parts["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
    fresh = abs(time.time() - int(parts["t"])) < 300
    return fresh and hmac.compare_digest(expected, parts["v1"])


def callbacks(url: str, secret: Path) -> dict[str, Any]:
    return {
        "callbacks": {
            "done": {
                "url": url,
                "secret_file": str(secret),
                "backoff": {"initial": "50ms", "max": "100ms", "jitter": 0.0},
                "max_attempts": 3,
            }
        }
    }


async def callback_state(daemon: Daemon, task_id: str, want: str) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while True:
        task = await daemon.task(task_id)
        if task["callback"]["state"] == want:
            return task
        assert time.monotonic() < deadline, task["callback"]
        await asyncio.sleep(0.02)  # polling the task's delivery state, bounded


async def test_a_callback_is_delivered_signed_with_the_final_task(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\n")
    receiver = Receiver()
    async with serving(receiver) as url, open_daemon(tmp_path, callbacks(url, secret)) as daemon:
        task = await daemon.submit({"type": "noop", "payload": {"n": 7}, "callback": "done"})
        assert task["callback"] == {
            "name": "done",
            "state": "pending",
            "attempts": 0,
            "last_error": None,
        }
        done = await callback_state(daemon, task["id"], "delivered")
    ((headers, body),) = receiver.received
    assert verify(headers, body)
    sent = json.loads(body)
    assert (sent["id"], sent["state"], sent["payload"]) == (task["id"], "succeeded", {"n": 7})
    assert headers["X-Offload-Task-Id"] == task["id"]
    assert done["callback"]["attempts"] == 1


async def test_a_failing_receiver_is_retried_until_it_answers(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    receiver = Receiver(fail_first=1)
    async with serving(receiver) as url, open_daemon(tmp_path, callbacks(url, secret)) as daemon:
        task = await daemon.submit({"type": "noop", "callback": "done"})
        done = await callback_state(daemon, task["id"], "delivered")
    assert len(receiver.received) == 2
    assert all(verify(h, b) for h, b in receiver.received)
    assert done["callback"]["attempts"] == 2


async def test_a_receiver_that_never_answers_ends_failed(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    receiver = Receiver(fail_first=100)
    async with serving(receiver) as url, open_daemon(tmp_path, callbacks(url, secret)) as daemon:
        task = await daemon.submit({"type": "noop", "callback": "done"})
        done = await callback_state(daemon, task["id"], "failed")
    assert len(receiver.received) == 3  # max_attempts
    assert done["callback"]["last_error"] == "HTTP 500"


async def test_an_unknown_callback_is_refused(tmp_path: Path) -> None:
    async with open_daemon(tmp_path) as daemon:
        reply = await daemon.request("POST", "/v1/tasks", json={"type": "noop", "callback": "nope"})
        assert_error(reply, 422, "invalid", "callback")
        assert await daemon.count() == 0


async def test_a_secret_file_gone_fails_attempts_not_the_daemon(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    receiver = Receiver()
    async with serving(receiver) as url:
        config = callbacks(url, secret)
        config["callbacks"]["done"] |= {"max_attempts": 50, "backoff": {"initial": "200ms"}}
        async with open_daemon(tmp_path, config) as daemon:
            secret.unlink()  # a rotation gone wrong, after the daemon checked it at start
            task = await daemon.submit({"type": "noop", "callback": "done"})
            deadline = time.monotonic() + 15
            while "FileNotFoundError" not in str(
                (await daemon.task(task["id"]))["callback"]["last_error"]
            ):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)  # polling the task's delivery state, bounded
            secret.write_bytes(SECRET)  # put back: the next attempt signs and delivers
            done = await callback_state(daemon, task["id"], "delivered")
            assert not daemon.serving.done()
    ((headers, body),) = receiver.received
    assert verify(headers, body)
    assert done["callback"]["attempts"] >= 2
