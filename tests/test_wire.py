"""Timestamps as the API writes them: RFC 3339, UTC, milliseconds truncated."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from daemon import wire


def reference(t: float) -> str:
    """What datetime writes for the millisecond `t` falls in."""
    millis = int(t * 1000)
    moment = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=millis)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


EDGES = [
    0.0,
    0.0005,
    0.999,
    1.9999999999999998,
    1_000_000_000.9995,
    1_800_000_000.001,
    253_402_300_799.999,  # the last millisecond of 9999
]


@pytest.mark.parametrize("t", EDGES)
def test_edges_match_datetime(t: float) -> None:
    wire._written.clear()
    assert wire.rfc3339(t) == reference(t)


def test_many_instants_match_datetime_also_when_cached() -> None:
    rng = random.Random(7)
    instants = [rng.uniform(0, 253_402_300_799) for _ in range(5000)]
    first = [wire.rfc3339(t) for t in instants]
    again = [wire.rfc3339(t) for t in instants]  # partly from the cache now
    expected = [reference(t) for t in instants]
    assert first == expected
    assert again == expected


def test_before_1970_and_none() -> None:
    wire._written.clear()
    assert wire.rfc3339(-1.5) == "1969-12-31T23:59:58.500Z"
    assert wire.rfc3339(None) is None


def test_instants_of_one_millisecond_share_their_text() -> None:
    wire._written.clear()
    base = 1_800_000_000.123
    instants = [base + k * 0.0001 for k in range(9)]  # all within .123
    texts = [wire.rfc3339(t) for t in instants]
    assert texts == [reference(t) for t in instants]
    assert set(texts) == {"2027-01-15T08:00:00.123Z"}
    assert len(wire._written) == 1
