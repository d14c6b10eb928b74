"""Flow control: which queues the feeder claims from, and how many tasks from each.

Weighted fair selection shares each round's room among the queues with due work in
proportion to their weights (smooth weighted round robin, as nginx balances upstreams); strict
order gives the room to the heaviest queue first and to the next only when it runs dry.
Per-queue concurrency caps and token-bucket rate limits bound each share; paused queues get
none. The plan is recomputed every round, so no state but the buckets persists.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from daemon.config import Config, QueueConfig, queue_settings
from daemon.store.base import Store


class TokenBucket:
    """`rate` tokens per second, at most `burst` held."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = float(burst or max(1, math.ceil(rate)))
        self.clock = clock
        self.tokens = self.burst
        self.stamp = clock()

    def available(self) -> int:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return int(self.tokens)

    def take(self, n: int) -> None:
        self.tokens -= n

    def next_token_in(self) -> float:
        """Seconds until one whole token is there."""
        self.available()
        return max(0.0, (1 - self.tokens) / self.rate)


@dataclass
class Flow:
    strict: bool
    queues: dict[str, QueueConfig]
    paused: set[str] = field(default_factory=set)
    busy: collections.Counter[str] = field(default_factory=collections.Counter)
    credit: collections.Counter[str] = field(default_factory=collections.Counter)
    buckets: dict[str, TokenBucket] = field(default_factory=dict)
    # Queues whose last claim came back full (or that were nudged): they may have due work.
    hungry: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.configure(self.strict, self.queues)

    def configure(self, strict: bool, queues: dict[str, QueueConfig]) -> None:
        """Take new settings (a reload); buckets of unchanged rates keep their tokens."""
        self.strict, self.queues = strict, queues
        old = self.buckets
        self.buckets = {}
        for name, q in queues.items():
            kept = old.get(name)
            if (
                q.rate
                and kept is not None
                and (kept.rate, kept.burst)
                == (
                    q.rate,
                    float(q.burst or max(1, math.ceil(q.rate))),
                )
            ):
                self.buckets[name] = kept
            elif q.rate:
                self.buckets[name] = TokenBucket(q.rate, q.burst)
        self.hungry = set(queues)

    @property
    def simple(self) -> bool:
        """No queue needs its own share: one claim over every unpaused queue will do."""
        weights = {q.weight for q in self.queues.values()}
        return (
            not self.strict
            and len(weights) <= 1
            and not self.buckets
            and not any(q.concurrency for q in self.queues.values())
        )

    def limit(self, name: str) -> int:
        """How many more of this queue may start now (caps and tokens), ignoring room."""
        q = self.queues.get(name)
        if name in self.paused or q is None:
            return 0
        left = math.inf
        if q.concurrency:
            left = q.concurrency - self.busy[name]
        bucket = self.buckets.get(name)
        if bucket is not None:
            left = min(left, bucket.available())
        return max(0, int(min(left, 1 << 30)))

    def shares(self, room: int, active: list[str]) -> list[tuple[str, int]]:
        """Split `room` among `active` queues: by weight (smooth weighted round robin, whose
        credits carry over between rounds, so any run of claims matches the weights), or
        all to the heaviest in strict order."""
        limits = {n: self.limit(n) for n in active}
        active = [n for n in active if limits[n] > 0]
        if not active or room <= 0:
            return []
        if self.strict:
            first = max(active, key=lambda n: (self.queues[n].weight, n))
            return [(first, min(room, limits[first]))]
        share: collections.Counter[str] = collections.Counter()
        for _ in range(room):
            open_ = [n for n in active if share[n] < limits[n]]
            if not open_:
                break
            for n in open_:
                self.credit[n] += self.queues[n].weight
            pick = max(open_, key=lambda n: self.credit[n])
            self.credit[pick] -= sum(self.queues[n].weight for n in open_)
            share[pick] += 1
        return [(n, share[n]) for n in active if share[n]]

    def taken(self, name: str, n: int, asked: int) -> None:
        bucket = self.buckets.get(name)
        if bucket is not None:
            bucket.take(n)
        if n < asked:
            self.hungry.discard(name)
        else:
            self.hungry.add(name)

    def wake_in(self) -> float | None:
        """When a rate-limited queue that may have work gets its next token (0: it has one
        now). A queue at its concurrency cap is left out: a run that ends wakes the feeder."""
        waits = []
        for name, bucket in self.buckets.items():
            q = self.queues[name]
            if name not in self.hungry or name in self.paused:
                continue
            if q.concurrency and self.busy[name] >= q.concurrency:
                continue
            waits.append(bucket.next_token_in())
        return min(waits) if waits else None


async def load_flow(config: Config, store: Store) -> Flow:
    """The flow of `config`, with the paused queues the store remembers."""
    strict, queues = queue_settings(config)
    return Flow(strict, queues, paused=await store.paused_queues())
