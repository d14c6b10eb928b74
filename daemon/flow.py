"""Flow control: which queues the feeder claims from, and how many tasks from each.

Weighted fair selection shares each round's room among the queues with due work in
proportion to their weights (rounded at random, so shares are fair on average); strict
order gives the room to the heaviest queue first and to the next only when it runs dry.
Per-queue concurrency caps and token-bucket rate limits bound each share; paused queues get
none. The plan is recomputed every round, so no state but the buckets persists.
"""

from __future__ import annotations

import collections
import math
import random
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
    rand: random.Random = field(default_factory=random.Random)
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
        """Split `room` among `active` queues: by weight, or all to the first in strict order."""
        limits = {n: self.limit(n) for n in active}
        active = [n for n in active if limits[n] > 0]
        if not active or room <= 0:
            return []
        if self.strict:
            first = max(active, key=lambda n: (self.queues[n].weight, n))
            return [(first, min(room, limits[first]))]
        total = sum(self.queues[n].weight for n in active)
        exact = {n: room * self.queues[n].weight / total for n in active}
        share = {n: int(exact[n]) for n in active}
        spare = room - sum(share.values())
        # Hand out what rounding left, one at a time, drawn by the fractional parts.
        fractions = {n: exact[n] - share[n] for n in active}
        while spare > 0 and any(fractions.values()):
            pick = self.rand.choices(list(fractions), weights=list(fractions.values()))[0]
            share[pick] += 1
            fractions[pick] = 0.0
            spare -= 1
        return [(n, min(share[n], limits[n])) for n in active if min(share[n], limits[n]) > 0]

    def taken(self, name: str, n: int, asked: int) -> None:
        bucket = self.buckets.get(name)
        if bucket is not None:
            bucket.take(n)
        if n < asked:
            self.hungry.discard(name)
        else:
            self.hungry.add(name)

    def wake_in(self) -> float | None:
        """When a rate-limited queue that may have work gets its next token."""
        waits = [
            b.next_token_in()
            for name, b in self.buckets.items()
            if name in self.hungry and name not in self.paused and self.limit(name) == 0
        ]
        return min(waits) if waits else None


async def load_flow(config: Config, store: Store) -> Flow:
    """The flow of `config`, with the paused queues the store remembers."""
    strict, queues = queue_settings(config)
    return Flow(strict, queues, paused=await store.paused_queues())
