"""GET /metrics after a known workload, on a real daemon over real HTTP (tests/inproc.py),
parsed with prometheus_client's own parser: the counters equal what was done, the
`offload_tasks{state,queue}` gauge equals what is queued and running, the store's commit
histograms have observations."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.metrics import DURATION_BUCKETS, MAX_QUEUE_NAMES, OTHER_QUEUE, Spread
from tests.inproc import Daemon, open_daemon

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
SETTLE = 10.0  # seconds for the numbers to catch up (the gauge is a snapshot of <= 2 s)


async def scrape(api: Daemon) -> Samples:
    reply = await api.request("GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(reply.body):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when the series does not exist (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def settled(
    api: Daemon, expected: Mapping[tuple[str, frozenset[tuple[str, str]]], float]
) -> Samples:
    """Scrape until every expected sample has its value; fail after SETTLE seconds with a
    report of the differences."""
    deadline = time.monotonic() + SETTLE
    while True:
        samples = await scrape(api)
        wrong = {
            k: (samples.get(k, 0.0), v) for k, v in expected.items() if samples.get(k, 0.0) != v
        }
        if not wrong:
            return samples
        assert time.monotonic() < deadline, f"(got, expected) after {SETTLE}s: {wrong}"
        await asyncio.sleep(0.05)  # counters move after the store commits; look again


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return (name, frozenset(labels.items()))


async def test_counters_equal_a_known_workload(tmp_path: Path) -> None:
    succeeded, failed, flaky, rejected = 5, 3, 2, 4
    async with open_daemon(tmp_path) as api:
        ids = [
            (await api.submit({"type": "noop", "payload": None}))["id"] for _ in range(succeeded)
        ]
        ids += [
            (await api.submit({"type": "permanent", "payload": None}))["id"] for _ in range(failed)
        ]
        # always_fail: three attempts, so two retries, then it fails.
        ids += [
            (await api.submit({"type": "always_fail", "payload": None}))["id"] for _ in range(flaky)
        ]
        for _ in range(rejected):
            reply = await api.request("POST", "/v1/tasks", json={"type": "no-such-type"})
            assert reply.status == 422
        assert {(await api.ended(i))["state"] for i in ids} == {"succeeded", "failed"}
        accepted = succeeded + failed + flaky
        default = {"queue": "default"}
        samples = await settled(
            api,
            {
                key("offload_tasks_total", type="noop", outcome="succeeded", **default): succeeded,
                key("offload_tasks_total", type="permanent", outcome="failed", **default): failed,
                key("offload_tasks_total", type="always_fail", outcome="retried", **default): 2
                * flaky,
                key("offload_tasks_total", type="always_fail", outcome="failed", **default): flaky,
                key("offload_tasks_accepted_total", type="noop", **default): succeeded,
                key("offload_tasks_accepted_total", type="permanent", **default): failed,
                key("offload_tasks_accepted_total", type="always_fail", **default): flaky,
                key("offload_admission_rejected_total", reason="invalid"): rejected,
                key("offload_task_duration_seconds_count", type="noop"): succeeded,
                key("offload_task_duration_seconds_count", type="always_fail"): 3 * flaky,
                key("offload_http_requests_total", route="/v1/tasks", code="202"): accepted,
                key("offload_http_requests_total", route="/v1/tasks", code="422"): rejected,
                key("offload_tasks_running"): 0,
            },
        )
    assert (
        value(samples, "offload_tasks_total", type="noop", queue="default", outcome="failed") == 0
    )
    # Every accepted task and every outcome went through a group commit.
    assert value(samples, "offload_store_commit_duration_seconds_count") > 0
    assert value(samples, "offload_store_commit_batch_size_sum") >= accepted
    assert value(samples, "offload_store_commit_batch_size_count") == value(
        samples, "offload_store_commit_duration_seconds_count"
    )


async def test_the_unfinished_gauge_counts_queued_and_running_by_queue(tmp_path: Path) -> None:
    slow = {"kind": "python", "handler": "tests.apphandlers:block", "queue": "slow"}
    overrides = {"workers": {"concurrency": 4}, "types": {"slow_block": slow}}
    async with open_daemon(tmp_path, overrides) as api:
        gates = [api.gate() for _ in range(6)]
        for gate in gates[:3]:
            await api.submit({"type": "block", "payload": {"gate": gate.key}})
        await api.submit({"type": "slow_block", "payload": {"gate": gates[3].key}})
        async with asyncio.timeout(10):
            for gate in gates[:4]:
                await gate.started.wait()
        # All four consumers are busy: these two stay queued.
        for gate in gates[4:]:
            await api.submit({"type": "block", "payload": {"gate": gate.key}})
        await settled(
            api,
            {
                key("offload_tasks", state="running", queue="default"): 3,
                key("offload_tasks", state="queued", queue="default"): 2,
                key("offload_tasks", state="running", queue="slow"): 1,
                key("offload_tasks", state="queued", queue="slow"): 0,
                key("offload_tasks_running"): 4,
            },
        )
        for gate in gates:
            gate.release.set()
        await settled(
            api,
            {
                key("offload_tasks", state="running", queue="default"): 0,
                key("offload_tasks", state="queued", queue="default"): 0,
                key("offload_tasks_total", type="block", queue="default", outcome="succeeded"): 5,
                key("offload_tasks_total", type="slow_block", queue="slow", outcome="succeeded"): 1,
            },
        )


async def test_unmatched_routes_are_counted_under_one_label(tmp_path: Path) -> None:
    async with open_daemon(tmp_path) as api:
        for path in ("/nope", "/v1/nope/1", "/v1/tasks/x/y"):
            assert (await api.request("GET", path)).status == 404
        await settled(api, {key("offload_http_requests_total", route="unmatched", code="404"): 3})


def test_spread_writes_what_a_prometheus_histogram_writes() -> None:
    """`Spread` (the loop's own histogram) is exposed exactly like prometheus_client's
    Histogram given the same observations, edges of buckets included."""
    theirs_registry = prometheus_client.CollectorRegistry()
    theirs = prometheus_client.Histogram(
        "d_seconds", "How long.", ["type"], buckets=DURATION_BUCKETS, registry=theirs_registry
    )
    ours_registry = prometheus_client.CollectorRegistry()
    ours = Spread(ours_registry, "d_seconds", "How long.", "type", DURATION_BUCKETS)
    rng = random.Random(3)
    values = [*DURATION_BUCKETS, 0.0, 7200.0, *(rng.expovariate(2.0) for _ in range(500))]
    for i, v in enumerate(values):
        label = ("noop", "sleep")[i % 2]
        theirs.labels(label).observe(v)
        ours.observe(label, v)
    assert prometheus_client.generate_latest(ours_registry) == prometheus_client.generate_latest(
        theirs_registry
    )


async def test_queue_names_past_the_cap_are_counted_under_one_label(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Clients name queues, so the series a family keeps per queue are capped: the first
    MAX_QUEUE_NAMES names count on their own, later ones together under OTHER_QUEUE, and
    nothing is lost from the totals."""
    extra = 7
    names = [f"q{i}" for i in range(MAX_QUEUE_NAMES + extra)]
    caplog.set_level(logging.WARNING, logger="daemon.metrics")
    async with open_daemon(tmp_path, {"workers": {"max_pending": 2 * len(names)}}) as api:
        for start in range(0, len(names), 500):
            tasks = [
                {"type": "noop", "payload": None, "queue": q, "delay": 3600}
                for q in names[start : start + 500]
            ]
            reply = await api.request("POST", "/v1/tasks/batch", json={"tasks": tasks})
            assert reply.status == 202, reply.body
        accepted = {
            key("offload_tasks_accepted_total", type="noop", queue=q): 1
            for q in names[:MAX_QUEUE_NAMES]
        }
        accepted[key("offload_tasks_accepted_total", type="noop", queue=OTHER_QUEUE)] = extra
        samples = await settled(
            api,
            {
                **accepted,
                # The gauge comes from the store: every queue's count, the last names folded.
                key("offload_tasks", state="queued", queue=OTHER_QUEUE): extra,
                key("offload_tasks", state="queued", queue=names[0]): 1,
            },
        )
    series = [k for k in samples if k[0] == "offload_tasks_accepted_total"]
    assert len(series) == MAX_QUEUE_NAMES + 1
    assert sum(samples[k] for k in series) == len(names)
    gauge = [k for k in samples if k[0] == "offload_tasks" and ("state", "queued") in k[1]]
    assert len(gauge) == MAX_QUEUE_NAMES + 1
    assert sum(samples[k] for k in gauge) == len(names)
    folded = [r for r in caplog.records if getattr(r, "event", None) == "metrics.queues_folded"]
    assert [r.args[0] for r in folded] == ["offload_tasks_accepted"]  # type: ignore[index]
