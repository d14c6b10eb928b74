"""The queued and running tasks of each queue, counted in memory by the writer thread.

An index on (queue, state) answered this before, at the price of an index entry changed on
every admission, claim and outcome: a fifth of the writer's time in a drain. The writer
thread changes every row, so it keeps the count as it goes, and the store recounts from
the table when a transaction rolls back.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict

from daemon.models import Counts

QUEUED, RUNNING = "queued", "running"


class Unfinished:
    def __init__(self) -> None:
        self._by: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.total = 0  # queued + running, over every queue: what max_pending bounds

    def add(self, queue: str, state: str, n: int = 1) -> None:
        self._by[queue, state] += n
        self.total += n

    def remove(self, queue: str, state: str, n: int = 1) -> None:
        self._drop(queue, state, n)
        self.total -= n

    def move(self, queue: str, before: str, after: str) -> None:
        self._drop(queue, before, 1)
        self._by[queue, after] += 1

    def _drop(self, queue: str, state: str, n: int) -> None:
        left = self._by[queue, state] - n
        if left:
            self._by[queue, state] = left
        else:  # queues come and go by name: keep none at zero
            del self._by[queue, state]

    def recount(self, conn: sqlite3.Connection) -> None:
        """From the table (at open, and after a rollback): a scan of the unfinished rows.
        Its GROUP BY sorts them; with temporary storage in memory (the connection's
        setting) a million queued tasks took 40 MiB for good, so this sort may spill to a
        file past the page cache's size."""
        self._by.clear()
        self.total = 0
        conn.execute("PRAGMA temp_store = FILE")
        try:
            for queue, state, n in conn.execute(
                "SELECT queue, state, count(*) FROM tasks WHERE state IN ('queued', 'running') "
                "GROUP BY queue, state"
            ):
                self.add(queue, state, n)
        finally:
            conn.execute("PRAGMA temp_store = MEMORY")

    def by_queue(self) -> dict[str, Counts]:
        """Any thread: the copy is one step under the GIL, so never half-changed."""
        found: dict[str, dict[str, int]] = {}
        for (queue, state), n in dict(self._by).items():
            if n:
                found.setdefault(queue, {})[state] = n
        return {queue: Counts(**by_state) for queue, by_state in found.items()}
