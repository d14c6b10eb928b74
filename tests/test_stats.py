"""Completion rates: per queue, overall (their sum), over a sliding window, and the
Retry-After they give."""

from __future__ import annotations

from daemon.stats import WINDOW, Stats


def test_overall_rate_counts_every_queue_once() -> None:
    stats = Stats(started=0.0)
    for i in range(100):
        stats.completed("a", now=10.0 + i * 0.1)
    for i in range(50):
        stats.completed("b", now=12.0 + i * 0.1)
    stats.completed(now=15.0)  # a run without a queue name still counts overall
    span = 20.0  # seconds since the start, under the window
    assert stats.completion_rate(20.0, queue="a") == 100 / span
    assert stats.completion_rate(20.0, queue="b") == 50 / span
    assert stats.completion_rate(20.0) == 151 / span
    assert stats.retry_after(10, now=20.0) == 2  # ceil(10 / 7.55)


def test_rates_forget_what_left_the_window() -> None:
    stats = Stats(started=0.0)
    for i in range(30):
        stats.completed("a", now=100.0 + i * 0.01)
    later = 100.0 + WINDOW + 1
    assert stats.completion_rate(later) == 0.0
    assert stats.completion_rate(later, queue="a") == 0.0
    assert stats.retry_after(5, now=later) == 60  # no recent rate: the cap


def test_queues_named_once_are_forgotten_once_idle() -> None:
    stats = Stats(started=0.0)
    for n in range(1000):  # a queue per job: each seen once, a second apart
        stats.completed(f"job-{n}", now=float(n))
    held = stats.queues_tracked()
    assert held <= WINDOW + 1, held  # only those within the window
    assert abs(stats.completion_rate(999.5) - 1.0) < 1e-9  # still one a second overall
