"""One daemon while PostgreSQL is down: readiness says the store is unavailable (every POST
would answer 503), `/metrics` still answers with what the process knows, and a stop that
cannot put its runs back says what becomes of them (their leases run out, then a daemon
puts them back, the interrupted run counted as an attempt) and is right."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from tests import pg, pghandlers
from tests.harness import Daemon, Offload
from tests.test_postgres_cluster import all_succeeded, hold_tasks, node_config, rows, until

WITHIN = 60.0  # seconds; the health check runs every 5 s


async def readiness(daemon: Daemon, status: int) -> dict[str, object] | None:
    reply = await daemon.request("GET", "/readyz")
    return reply.json(dict) if reply.status == status else None


async def test_readiness_fails_and_metrics_answer_while_postgresql_is_down(
    offload: Offload, tmp_path: Path
) -> None:
    server = pg.start_server()
    try:
        url = await pg.new_database(server)
        log, release = tmp_path / "runs.log", tmp_path / "release"
        node = await offload.start(node_config(offload, url, "n"))
        (task_id,) = await hold_tasks(node, log, release, 1)
        metrics = (await node.request("GET", "/metrics")).body.decode()
        assert 'offload_tasks{queue="default",state="running"} 1.0' in metrics

        await asyncio.to_thread(server.halt, "fast")
        body = await until(lambda: readiness(node, 503), WITHIN, "/readyz fails")
        assert body["status"] == "store_unavailable", body
        assert body["error"]["code"] == "store_unavailable", body  # type: ignore[index]
        submission = {"type": "record", "payload": {"log": str(log)}}
        refused = await node.request("POST", "/v1/tasks", json=submission)
        assert refused.status == 503, refused.body
        began = time.monotonic()
        scraped = await node.request("GET", "/metrics")
        took = time.monotonic() - began
        assert scraped.status == 200, scraped.body
        text = scraped.body.decode()
        assert "offload_tasks_running 1.0" in text  # the process's own
        assert "offload_tasks{" not in text  # left out, not stale
        assert took < 10  # well within a scrape timeout (the store gets 2 s)

        await asyncio.to_thread(server.resume)
        assert (await until(lambda: readiness(node, 200), WITHIN, "/readyz passes")) == {
            "status": "ready"
        }
        release.touch()
        done = await node.task(task_id, wait=WITHIN)
        assert done.state == "succeeded"
    finally:
        await offload.kill_all()
        server.destroy()


async def test_a_stop_during_an_outage_leaves_the_runs_to_their_leases_and_says_so(
    offload: Offload, tmp_path: Path
) -> None:
    server = pg.start_server()
    try:
        url = await pg.new_database(server)
        log, release = tmp_path / "runs.log", tmp_path / "release"
        first = await offload.start(node_config(offload, url, "first"))
        ids = await hold_tasks(first, log, release, 2)

        await asyncio.to_thread(server.halt, "fast")
        first.signal(signal.SIGTERM)  # the grace (2 s) passes, the put-backs cannot be written
        async with asyncio.timeout(WITHIN):
            assert await first.wait_exit() == 0
        said = first.log_path.read_text()  # what is under test is what the log tells
        assert "event=drain.outcomes_lost" in said
        assert "until their leases expire (workers.lease, 3s); then a daemon puts them" in said
        assert "next start" not in said

        # And so it goes: the leases run out, another daemon puts the tasks back and runs
        # them, the interrupted run counted as an attempt.
        await asyncio.to_thread(server.resume)
        found = await rows(url)
        assert {(found[t]["state"], found[t]["attempts"]) for t in ids} == {("running", 1)}
        release.touch()
        await offload.start(node_config(offload, url, "second"))
        await until(lambda: all_succeeded(url, len(ids)), WITHIN, "the tasks ran again")
        assert {(r["state"], r["attempts"]) for r in (await rows(url)).values()} == {
            ("succeeded", 2)
        }
        assert len(pghandlers.runs(str(log))) == 4
    finally:
        await offload.kill_all()
        server.destroy()
