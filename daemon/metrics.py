"""Prometheus metrics (`GET /metrics`), in a registry of this daemon's own.

Counters and histograms are updated where things happen (consumer, admission, HTTP
route wrapper, store commits); the counters touched for every request and task are `Tally`s
and the run durations a `Spread`: plain numbers the event loop adds to and a scrape reads.
The `offload_tasks{state,queue}` gauge is read from the store at scrape time, at most once
per `SNAPSHOT_TTL`, so scrapes cannot load the store.
"""

from __future__ import annotations

import logging
import math
import time
from bisect import bisect_left
from collections.abc import Iterator

import prometheus_client
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from daemon.models import Counts

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

SNAPSHOT_TTL = 2.0
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, 3600)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Queue names come from clients, so a family labelled by queue could grow without end (and
# every scrape with it). The first MAX_QUEUE_NAMES names a family meets get series of their
# own; the tasks of any later one are counted under OTHER_QUEUE, which no queue can be named.
MAX_QUEUE_NAMES = 1000
OTHER_QUEUE = "(other)"

logger = logging.getLogger(__name__)


class _UnfinishedTasks(Collector):
    """`offload_tasks{state,queue}` from the latest snapshot of the store."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Counts] = {}

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "offload_tasks", "Unfinished tasks by state and queue.", labels=["state", "queue"]
        )
        named = sorted(self.snapshot.items())
        other = Counts()
        for _, counts in named[MAX_QUEUE_NAMES:]:
            other = Counts(other.queued + counts.queued, other.running + counts.running)
        for queue, counts in named[:MAX_QUEUE_NAMES]:
            family.add_metric(["queued", queue], counts.queued)
            family.add_metric(["running", queue], counts.running)
        if len(named) > MAX_QUEUE_NAMES:
            family.add_metric(["queued", OTHER_QUEUE], other.queued)
            family.add_metric(["running", OTHER_QUEUE], other.running)
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
        self._queue = labels.index("queue") if "queue" in labels else None
        self._queues: set[str] = set()
        self._folding = False
        registry.register(self)

    def add(self, labels: tuple[str, ...], amount: float = 1) -> None:
        """Count `amount` for `labels`, one value for each of the family's label names."""
        counts = self.counts
        if labels in counts:
            counts[labels] += amount
            return
        if self._queue is not None:
            labels = self._bounded(labels, self._queue)
        counts[labels] = counts.get(labels, 0) + amount

    def _bounded(self, labels: tuple[str, ...], at: int) -> tuple[str, ...]:
        """`labels`, its queue name folded into OTHER_QUEUE once the family has met
        MAX_QUEUE_NAMES others."""
        queue, known = labels[at], self._queues
        if queue in known:
            return labels
        if len(known) < MAX_QUEUE_NAMES:
            known.add(queue)
            return labels
        if not self._folding:
            self._folding = True
            logger.warning(
                "%s: more than %d queue names; later ones are counted as queue=%r",
                self.name,
                MAX_QUEUE_NAMES,
                OTHER_QUEUE,
                extra={"event": "metrics.queues_folded"},
            )
        return (*labels[:at], OTHER_QUEUE, *labels[at + 1 :])

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for labels, count in sorted(self.counts.items()):
            family.add_metric(labels, count)
        yield family


class Spread(Collector):
    """A histogram family with one label, observed by the event loop alone (see `Tally`):
    per label value, a count per bucket (not yet cumulative) and the sum."""

    def __init__(
        self,
        registry: prometheus_client.CollectorRegistry,
        name: str,
        doc: str,
        label: str,
        buckets: tuple[float, ...],
    ) -> None:
        self.name, self.doc, self.label = name, doc, label
        self.bounds = sorted(buckets)
        # The `le` labels as prometheus_client writes them ("0.001", "1.0", "+Inf").
        self._le: list[str] = [
            floatToGoString(b)  # type: ignore[no-untyped-call]
            for b in [*self.bounds, math.inf]
        ]
        self.series: dict[str, list[float]] = {}  # value -> [bucket counts..., +Inf, sum]
        registry.register(self)

    def observe(self, label: str, value: float) -> None:
        counts = self.series.get(label)
        if counts is None:
            counts = self.series[label] = [0] * (len(self.bounds) + 2)
        counts[bisect_left(self.bounds, value)] += 1  # the first bucket with value <= le
        counts[-1] += value

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.doc, labels=[self.label])
        for label, counts in sorted(self.series.items()):
            cumulative = 0.0
            buckets = []
            for le, count in zip(self._le, counts, strict=False):  # the sum is left out
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric([label], buckets, counts[-1])
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
        self.duration = Spread(
            r, "offload_task_duration_seconds", "How long runs took.", "type", DURATION_BUCKETS
        )
        self.running = prometheus_client.Gauge(
            "offload_tasks_running", "Tasks running in this daemon.", registry=r
        )
        self.streams = prometheus_client.Gauge(
            "offload_event_streams",
            "GET /v1/events streams open (at most server.max_streams).",
            registry=r,
        )
        self.accepted = Tally(
            r, "offload_tasks_accepted", "Tasks committed by admission.", ["type", "queue"]
        )
        self.rejected = Tally(
            r, "offload_admission_rejected", "Submissions refused, by reason.", ["reason"]
        )
        self.http = Tally(r, "offload_http_requests", "HTTP requests answered.", ["route", "code"])
        self.store_errors = Tally(
            r,
            "offload_store_errors",
            "Background store operations that failed and will be tried again.",
            ["operation"],
        )
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
