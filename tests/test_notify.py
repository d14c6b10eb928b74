"""sd_notify from a real `offload serve`, received on a real AF_UNIX datagram socket bound
at a path or at an abstract `@name`, as systemd's end of the protocol would be.

READY=1 comes once the listener is bound (/readyz answers at once), with a STATUS= naming
the address; STATUS= lines carry live counts; WATCHDOG=1 repeats at half WATCHDOG_USEC
when the watchdog is meant for this process (WATCHDOG_PID unset or ours) and never
otherwise; STOPPING=1 comes as soon as SIGTERM arrives, while the daemon still drains.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import Offload, TaskJson, eventually, executions
from tests.systemd_harness import NotifySocket, open_notify_socket, open_process

WAIT = 20.0  # seconds for a message that must come
PING_USEC = 200_000  # WATCHDOG_USEC of these tests: a ping every 0.1 s
# `exec` keeps the PID, so the variable names the daemon itself, as systemd sets it.
OWN_WATCHDOG_PID = ("/bin/sh", "-c", 'export WATCHDOG_PID=$$; exec "$@"', "sh")
HOLD = {"hold": "tests.handlers:hold", "sleep": "daemon.builtins:sleep"}


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    """A notify socket bound at a path (the address kinds are tested once, below)."""
    with open_notify_socket() as sock:
        yield sock


def hold_payload(tmp_path: Path) -> dict[str, object]:
    return {"log": str(tmp_path / "runs.log"), "release": str(tmp_path / "release")}


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
async def test_ready_comes_once_the_listener_answers(
    offload: Offload, tmp_path: Path, abstract: bool
) -> None:
    config = offload.config(types=HOLD)
    with open_notify_socket(abstract=abstract) as notify:
        env = {"NOTIFY_SOCKET": notify.address}
        async with open_process(config, tmp_path / "daemon.log", env=env, ready=False) as daemon:
            async with asyncio.timeout(WAIT):
                ready = await notify.wait_for("READY", "1")
            # One request, no retry: READY=1 promised a bound listener, a recovered store.
            assert (await daemon.request("GET", "/readyz")).status == 200
            assert config.url in ready["STATUS"]
            assert [m for m in notify.messages if m.get("READY") == "1"] == [ready]


@pytest.mark.parametrize("own_pid", [False, True], ids=["pid-unset", "pid-ours"])
async def test_watchdog_pings_repeat_while_the_daemon_is_healthy(
    offload: Offload, tmp_path: Path, notify: NotifySocket, own_pid: bool
) -> None:
    config = offload.config(types=HOLD)
    env = {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": str(PING_USEC)}
    wrapper = OWN_WATCHDOG_PID if own_pid else ()
    async with open_process(config, tmp_path / "daemon.log", env=env, wrapper=wrapper):
        async with asyncio.timeout(WAIT):
            await notify.wait_for("READY", "1")
            pings = [await notify.wait_for("WATCHDOG", "1") for _ in range(5)]
    # Each ping comes with the live status, from the same health check.
    assert all(p.get("STATUS") for p in pings), pings


async def test_no_watchdog_pings_when_the_watchdog_is_for_another_process(
    offload: Offload, tmp_path: Path, notify: NotifySocket
) -> None:
    config = offload.config(types=HOLD)
    env = {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": str(PING_USEC)}
    env["WATCHDOG_PID"] = "1"  # inherited from a parent: not ours to feed
    async with open_process(config, tmp_path / "daemon.log", env=env) as daemon:
        async with asyncio.timeout(WAIT):
            await notify.wait_for("READY", "1")
            # A window of five ping intervals, measured by a task that takes that long.
            task = await daemon.submit("sleep", {"seconds": 5 * PING_USEC / 1e6})
            ended = await daemon.task(task.id, wait=10)
        assert ended.state == "succeeded"
    notify.receive_nowait()
    assert not [m for m in notify.messages if "WATCHDOG" in m], notify.messages


async def test_status_reports_running_tasks_and_the_accept_rate(
    offload: Offload, tmp_path: Path, notify: NotifySocket
) -> None:
    config = offload.config(types=HOLD, workers={"concurrency": 1})
    env = {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": str(PING_USEC)}
    async with open_process(config, tmp_path / "daemon.log", env=env) as daemon:
        # A STATUS= the daemon cannot send at once (the socket's queue holds ~10) is dropped,
        # as under systemd: so read as we go, and submit again until a rate shows.
        notify.receive_nowait()
        running = accepted = False  # the one running task (concurrency 1); a rate above 0
        async with asyncio.timeout(WAIT):
            while not (running and accepted):
                if not accepted:
                    await daemon.submit("hold", hold_payload(tmp_path))
                status = (await notify.wait_for("STATUS"))["STATUS"]
                running = running or _count(status, r"running (\d+)") == 1
                accepted = accepted or bool(_count(status, r"accepted ([0-9.]+)/s"))
        assert running and accepted
        (tmp_path / "release").touch()


async def test_status_reports_queued_tasks(
    offload: Offload, tmp_path: Path, notify: NotifySocket
) -> None:
    config = offload.config(types=HOLD, workers={"concurrency": 1})
    env = {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": str(PING_USEC)}
    async with open_process(config, tmp_path / "daemon.log", env=env) as daemon:
        await daemon.submit_many("hold", [hold_payload(tmp_path)] * 3)
        try:
            async with asyncio.timeout(WAIT):  # a STATUS= every 0.1 s; room for stalls
                await _status_where(notify, lambda s: _count(s, r"queued (\d+)") == 2)
        finally:
            (tmp_path / "release").touch()


async def test_stopping_is_sent_as_soon_as_sigterm_arrives(
    offload: Offload, tmp_path: Path, notify: NotifySocket
) -> None:
    config = offload.config(types=HOLD, workers={"grace_period": "60s"})
    env = {"NOTIFY_SOCKET": notify.address}
    async with open_process(config, tmp_path / "daemon.log", env=env) as daemon:
        task = await daemon.submit("hold", hold_payload(tmp_path))
        async with asyncio.timeout(WAIT):
            await notify.wait_for("READY", "1")
            await eventually(lambda: _started(tmp_path / "runs.log", 1))
            daemon.signal(signal.SIGTERM)
            stopping_message = await notify.wait_for("STOPPING", "1")
        # It asks systemd for the time this stop may need: the 60 s grace and the rest, past
        # the unit's TimeoutStopSec= (60 s).
        extend = int(stopping_message["EXTEND_TIMEOUT_USEC"]) / 1e6
        assert 60 + 10 < extend <= 60 + 30, stopping_message
        # Sent at the start of the drain, not at the exit: the task still runs.
        running: TaskJson = await daemon.task(task.id)
        assert running.state == "running"
        assert (await daemon.request("GET", "/readyz")).status == 503
        (tmp_path / "release").touch()
        async with asyncio.timeout(WAIT):
            assert await daemon.wait_exit() == 0
    notify.receive_nowait()
    stopping = next(i for i, m in enumerate(notify.messages) if m.get("STOPPING") == "1")
    assert not [m for m in notify.messages[stopping:] if m.get("READY") == "1"]


async def _started(log: Path, n: int) -> bool | None:
    return True if len(executions(log)) >= n else None


def _count(status: str, pattern: str) -> float | None:
    found = re.search(pattern, status)
    return float(found.group(1)) if found else None


async def _status_where(notify: NotifySocket, accept: Callable[[str], bool]) -> str:
    """The first STATUS= (already received or coming) that `accept` takes."""
    for message in list(notify.messages):
        if "STATUS" in message and accept(message["STATUS"]):
            return message["STATUS"]
    while True:
        message = await notify.wait_for("STATUS")
        if accept(message["STATUS"]):
            return message["STATUS"]


async def test_a_locked_store_shows_in_the_status_and_the_watchdog_goes_on(
    offload: Offload, tmp_path: Path, notify: NotifySocket
) -> None:
    """A store the daemon cannot write (the SQLite file locked by another program; on
    PostgreSQL, the database down) is reported in STATUS=, and the pings go on: a restart by
    the watchdog would stop every running task and not bring the store back."""
    config = offload.config(types=HOLD)
    env = {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": str(PING_USEC)}

    async def status_until(wanted: Callable[[str], bool]) -> dict[str, str]:
        while True:
            message = await notify.receive()
            if "STATUS" in message and wanted(message["STATUS"]):
                return message

    def unavailable(status: str) -> bool:
        return status.startswith("store unavailable")

    async with open_process(config, tmp_path / "daemon.log", env=env) as daemon:
        async with asyncio.timeout(WAIT):
            await notify.wait_for("READY", "1")
        lock = sqlite3.connect(config.db, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # the write lock, until ROLLBACK
        try:
            async with asyncio.timeout(WAIT):
                first = await status_until(unavailable)
                during = [await notify.wait_for("WATCHDOG", "1") for _ in range(5)]
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        assert first.get("WATCHDOG") == "1"
        assert all(unavailable(m["STATUS"]) for m in during), during
        async with asyncio.timeout(WAIT):
            await status_until(lambda status: not unavailable(status))
        assert daemon.returncode is None
    log = (tmp_path / "daemon.log").read_text()
    assert log.count("event=systemd.store_unhealthy") == 1  # once per spell, not per check
    assert "event=systemd.store_healthy" in log
