"""Prometheus metrics (`GET /metrics`), in a registry of this daemon's own.

Counters and histograms are updated where things happen (consumer, admission, HTTP
route wrapper, store commits); the counters touched for every request and task are `Tally`s,
plain numbers the event loop adds to and a scrape reads. The `offload_tasks{state,queue}`
gauge is read from the store at scrape time, at most once per `SNAPSHOT_TTL`, so scrapes
cannot load the store.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, TypeVar

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from daemon.models import Counts

M = TypeVar("M", bound=MetricWrapperBase)

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

SNAPSHOT_TTL = 2.0
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, 3600)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class _UnfinishedTasks(Collector):
    """`offload_tasks{state,queue}` from the latest snapshot of the store."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Counts] = {}

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "offload_tasks", "Unfinished tasks by state and queue.", labels=["state", "queue"]
        )
        for queue, counts in sorted(self.snapshot.items()):
            family.add_metric(["queued", queue], counts.queued)
            family.add_metric(["running", queue], counts.running)
        yield family


class Tally(Collector):
    """A counter family counted by the event loop alone, read by scrapes (also on the loop):
    a dict of plain numbers. prometheus_client's `Counter` takes a lock and looks up its
    child on every increment, a few microseconds on the path of each request and task."""

    def __init__(
        self, registry: prometheus_client.CollectorRegistry, name: str, doc: str, labels: list[str]
    ) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.counts: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def add(self, labels: tuple[str, ...], amount: float = 1) -> None:
        """Count `amount` for `labels`, one value for each of the family's label names."""
        self.counts[labels] = self.counts.get(labels, 0) + amount

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for labels, count in sorted(self.counts.items()):
            family.add_metric(labels, count)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        r = self.registry
        self.tasks = Tally(
            r,
            "offload_tasks",
            "Runs that ended, by outcome (succeeded, failed, retried, cancelled, released).",
            ["type", "queue", "outcome"],
        )
        self.duration = prometheus_client.Histogram(
            "offload_task_duration_seconds",
            "How long runs took.",
            ["type"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.running = prometheus_client.Gauge(
            "offload_tasks_running", "Tasks running in this daemon.", registry=r
        )
        self.accepted = Tally(
            r, "offload_tasks_accepted", "Tasks committed by admission.", ["type", "queue"]
        )
        self.rejected = Tally(
            r, "offload_admission_rejected", "Submissions refused, by reason.", ["reason"]
        )
        self.http = Tally(r, "offload_http_requests", "HTTP requests answered.", ["route", "code"])
        self.commit_seconds = prometheus_client.Histogram(
            "offload_store_commit_duration_seconds",
            "Time to apply and commit one batch.",
            buckets=COMMIT_BUCKETS,
            registry=r,
        )
        self.commit_batch = prometheus_client.Histogram(
            "offload_store_commit_batch_size",
            "Operations per committed transaction.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.store_tuples = prometheus_client.Gauge(
            "offload_store_tuples",
            "Row versions in the task table (PostgreSQL).",
            ["kind"],
            registry=r,
        )
        self.store_vacuumed = prometheus_client.Gauge(
            "offload_store_last_vacuum_timestamp_seconds",
            "Last (auto)vacuum of the task table (PostgreSQL).",
            registry=r,
        )
        self._unfinished = _UnfinishedTasks()
        r.register(self._unfinished)
        self._taken = 0.0
        self._children: dict[tuple[object, ...], Any] = {}

    def child(self, metric: M, *labels: str) -> M:
        """`metric.labels(*labels)`, remembered: the library's lookup costs microseconds
        per call, on the path of every task and request."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def observe_commit(self, seconds: float, operations: int) -> None:
        """Called from the store's writer thread (prometheus_client is thread-safe)."""
        self.commit_seconds.observe(seconds)
        self.commit_batch.observe(operations)

    def stale(self) -> bool:
        return time.monotonic() - self._taken > SNAPSHOT_TTL

    def refresh(self, unfinished: dict[str, Counts], running: int) -> None:
        self._unfinished.snapshot = unfinished
        self.running.set(running)
        self._taken = time.monotonic()

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
