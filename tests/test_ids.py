"""Task ids: ULID layout, strictly increasing within one process, single or in batches."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from daemon import ids
from daemon.ids import is_id, new_id, new_ids

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def decode(task_id: str) -> int:
    value = 0
    for char in task_id:
        value = value * 32 + CROCKFORD.index(char)
    return value


@pytest.fixture(autouse=True)
def _no_earlier_ids() -> Iterator[None]:
    """These tests issue ids for fixed moments; ids issued before (at the real time, which
    may be later than those moments) would carry forward into them, and theirs (2030) into
    the tests after. Each starts from none and leaves the state as it found it."""
    kept = ids._Last.value, ids._Last.head
    ids._Last.value, ids._Last.head = 0, (-1, "")
    yield
    ids._Last.value, ids._Last.head = kept


def test_an_id_encodes_its_millisecond_and_ids_of_one_moment_count_up() -> None:
    now = 1_800_000_000.123
    issued = [new_id(now) for _ in range(3000)]  # many share the millisecond: monotonic
    issued += [*new_ids(1500, now), new_id(now + 1), *new_ids(2, now + 2)]
    values = [decode(i) for i in issued]
    assert all(is_id(i) for i in issued)
    assert values == sorted(set(values))  # strictly increasing
    assert issued == sorted(issued)  # so the text sorts as the number does
    assert values[0] >> 80 == int(now * 1000)
    assert values[-1] >> 80 >= int((now + 2) * 1000)
    # Within the millisecond each id is the one before plus one.
    assert {b - a for a, b in itertools.pairwise(values[:4500])} == {1}


def test_ids_across_the_boundary_of_their_cached_head_are_encoded_whole() -> None:
    now = 1_800_000_000.5
    # The next id of this millisecond is 3 below a multiple of 2**20: the first 22
    # characters, cached between ids, change after it.
    ids._Last.value = (int(now * 1000) << 80) | (0xABCDE << 20) | 0xFFFFC
    issued = [new_id(now) for _ in range(6)]
    start = ids._Last.value - 5
    assert [decode(i) for i in issued] == list(range(start, start + 6))


def test_an_id_from_a_new_moment_starts_from_fresh_randomness() -> None:
    first, second = new_id(1_900_000_000.0), new_id(1_900_000_001.0)
    assert decode(second) >> 80 == 1_900_000_001_000
    assert decode(second) - decode(first) != 1 << 80  # not the last one carried over
